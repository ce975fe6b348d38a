"""The erasure table scored by zero-shot CLIP (``evaluator=clip:SOURCE``), end to end on a tiny random SD 1.x
pipeline and a tiny random transformers CLIP saved to a folder: plumbing (random models draw noise), the
protocols' arithmetic is tests/test_evaluation.py's."""
import json
from pathlib import Path

import numpy as np
import pytest

from tests import tiny_models
from unguide_jax.loading.tokenizer import write_clip_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    text = dict(vocab_size=tiny_models.VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tiny_models.VOCAB_SIZE - 2,
                eos_token_id=tiny_models.VOCAB_SIZE - 1, pad_token_id=tiny_models.VOCAB_SIZE - 1)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(folder)
    write_clip_tokenizer(folder, tiny_models.TINY_MERGES)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32}, "crop_size": {"height": 32,
        "width": 32}, "do_resize": True, "do_center_crop": True, "do_normalize": True, "do_rescale": True,
        "resample": 3}))
    return folder, model


def test_clip_evaluator_scores_texts_as_transformers_does(tiny_clip):
    """The evaluator's probabilities are softmax(100 · cos) of transformers' own embeddings."""
    import torch

    from unguide_jax.erasers.concepts import load_concept
    from unguide_jax.evaluation.evaluators import ClipEvaluator
    from unguide_jax.loading.clip import preprocess_images

    folder, model = tiny_clip
    evaluator = ClipEvaluator(str(folder))
    prompt_set = evaluator.prompt_set(load_concept("dog"))
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    probs = evaluator.text_probabilities(images, prompt_set)
    assert probs.shape == (3, 13) and np.allclose(probs.sum(axis=1), 1.0)
    ids = evaluator.tokenizer(prompt_set.prompts, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    pixels = np.asarray(preprocess_images(images, evaluator.clip.processing))  # NHWC
    with torch.no_grad():
        image = model.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
        text = model.get_text_features(input_ids=ids)
    image, text = (getattr(x, "pooler_output", x) for x in (image, text))
    image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
    expected = torch.softmax(100.0 * image.double() @ text.double().T, dim=-1).numpy()
    np.testing.assert_allclose(probs, expected, atol=2e-4)


def test_the_table_with_a_clip_evaluator_end_to_end(tiny_pipeline_dir, tiny_clip, tmp_path):
    import sample
    import train

    repo = Path(__file__).resolve().parent.parent
    folder, _ = tiny_pipeline_dir("sd1")
    clip_folder, _ = tiny_clip
    lora_run = tmp_path / "lora"
    assert train.main(["--config", f"{repo}/configs/unguide.py:tiny", f"--config.model={folder}", "--config.concept=dog",
                       f"--config.run_dir={lora_run}", "--config.iterations=1"]) == 0
    out = tmp_path / "eval"
    erasures = [{"concept": "dog", "edits": {"unguide": [str(lora_run)]}}]
    assert sample.main(["--config", f"{repo}/configs/evaluate.py:tiny", f"--config.model={folder}",
                        f"--config.evaluator=clip:{clip_folder}", f"--config.erasures={json.dumps(erasures)}",
                        f"--config.out_dir={out}", "--config.images_per_prompt=1", "--config.num_steps=2",
                        "--config.batch_size=13", "--config.probe.prompt_chunk=4"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["evaluator"].startswith(f"zero-shot CLIP {clip_folder}")
    dog = results["concepts"][0]
    assert dog["erased_class"] == "a photo of the dog"
    for row in dog["methods"].values():
        for protocol in ("mace", "reference", "top1"):
            assert 0 <= row[protocol]["acc_e"] <= 1 and len(row[protocol]["per_prompt"]) == 13
    assert "scored by the zero-shot CLIP" in (out / "results.md").read_text()
