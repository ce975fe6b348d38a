"""The retention job (unguide_jax/evaluation/retention.py): the CLIP score's arithmetic, the caption files, the
FID's inputs and (where torch-fidelity imports) the FID itself, the command end to end on a tiny random SD model
and a tiny random CLIP, and the CLIP evaluator's embeddings on 8 devices against one."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.devices import ALL_CPU_DEVICES, run_script
from tests.test_clip_evaluation import tiny_clip  # noqa: F401  (the module fixture: a tiny transformers CLIP)
from unguide_jax.evaluation import retention
from unguide_jax.evaluation.retention import (
    MissingFidPackage,
    clip_scores,
    read_captions,
    summarize,
)
from unguide_jax.evaluation.retention_config import RetentionConfig
from unguide_jax.settings import ConfigError, to_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parent.parent


# --- the CLIP score -----------------------------------------------------------------------------------------


def test_clip_score_is_100_times_the_clamped_cosine_of_each_pair():
    images = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    texts = np.array([[2.0, 0.0], [4.0, 3.0], [-1.0, 0.0], [1.0, 0.0]])
    # Pairs, not all against all: 1, 24/25 (unnormalised inputs), -1 clamped to 0, orthogonal 0.
    np.testing.assert_allclose(clip_scores(images, texts), [100.0, 96.0, 0.0, 0.0], atol=1e-12)
    summary = summarize([100.0, 96.0, 0.0, 0.0])
    assert summary["n"] == 4 and summary["mean"] == pytest.approx(49.0)
    assert summary["std"] == pytest.approx(np.std([100.0, 96.0, 0.0, 0.0], ddof=1))
    assert summarize([42.0]) == {"mean": 42.0, "std": 0.0, "n": 1}
    with pytest.raises(ValueError, match="one image embedding per caption"):
        clip_scores(images, texts[:3])


# --- caption files ------------------------------------------------------------------------------------------


def test_coco_captions_give_each_images_first_caption_in_image_order(tmp_path):
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"info": {}, "images": [{"id": 9}, {"id": 3}], "annotations": [
        {"image_id": 9, "id": 50, "caption": "A dog on a sofa. "},
        {"image_id": 3, "id": 71, "caption": "Second caption of image 3"},
        {"image_id": 3, "id": 12, "caption": "A cat\nin a box."},
        {"image_id": 9, "id": 40, "caption": "First caption of image 9"}]}))
    assert read_captions(path) == [("A cat\nin a box.", "captions_val2014.json:image_id=3"),
                                   ("First caption of image 9", "captions_val2014.json:image_id=9")]
    assert read_captions(path, limit=1) == [("A cat\nin a box.", "captions_val2014.json:image_id=3")]


def test_csv_and_text_captions(tmp_path):
    table = tmp_path / "captions.csv"
    table.write_text('id,caption,url\n1,"a red car, parked",x\n2,  a bowl of fruit ,y\n')
    assert read_captions(table) == [("a red car, parked", "captions.csv:2"), ("a bowl of fruit", "captions.csv:3")]
    lines = tmp_path / "captions.txt"
    lines.write_text("a red car\n\n  a bowl of fruit  \na tree\n")
    assert read_captions(lines, limit=2) == [("a red car", "captions.txt:1"), ("a bowl of fruit", "captions.txt:3")]


@pytest.mark.parametrize("name, content, problem", [
    ("absent.txt", None, "no file at"),
    ("captions.tsv", "a\tb\n", "unknown caption file type '.tsv'"),
    ("captions.json", '{"annotations": [', "is not valid JSON (line 1, column"),
    ("captions.json", '{"images": []}', "is not a COCO captions file: it needs an \"annotations\" list"),
    ("captions.json", '{"annotations": [{"image_id": 1}]}', "annotations[0] needs an image_id and a caption"),
    ("captions.csv", "prompt\na cat\n", "needs a 'caption' column, found ['prompt']"),
    ("captions.csv", "caption\na cat\n\"\"\n", "row 3: empty caption"),
    ("captions.txt", "\n  \n", "holds no caption"),
    ("captions.txt", b"a caf\xe9\n", "line 1, column 6: byte 0xe9 is not UTF-8"),
])
def test_a_bad_caption_file_is_a_one_line_error_naming_it(tmp_path, name, content, problem):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        read_captions(path)
    message = str(err.value)
    assert problem in message and str(path) in message and "\n" not in message, message


def test_no_caption_file_is_named_as_the_setting():
    with pytest.raises(ConfigError, match=r"^config.captions is empty"):
        read_captions("")


# --- the settings ----------------------------------------------------------------------------------------------


def test_the_command_and_the_python_api_start_from_the_same_settings(capsys):
    from unguide_jax.cli import sample as sample_cli
    from unguide_jax.presets import load_config_file

    assert sample_cli.main(["--config", "evaluate.py:retention", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == to_dict(RetentionConfig())
    assert load_config_file("evaluate.py:retention") == {"job": "retention"}  # no default repeated
    config = RetentionConfig()
    assert [m.mode for m in config.method_rows()] == ["base", "adapter", "unguide"]
    with pytest.raises(ConfigError, match=r"config.edits: the methods use edits \['unguide'\]"):
        RetentionConfig(edits={})


# --- FID ------------------------------------------------------------------------------------------------------


def test_the_fid_is_refused_without_its_inception_weights_before_anything_loads(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red car\n")
    references = tmp_path / "references"
    references.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(references / "a.jpg")
    # A model and a CLIP that do not exist: the FID's settings are checked before either loads.
    base = dict(model=str(tmp_path / "no-model"), clip=str(tmp_path / "no-clip"), captions=str(captions),
                fid_reference=str(references), out_dir=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"^config.inception is empty: the FID .* weights-inception-2015-12-05"):
        retention.run_retention(base)
    missing = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(ConfigError, match=f"Inception weights file {missing} does not exist"):
        retention.run_retention(dict(base, inception=str(missing)))
    with pytest.raises(ConfigError, match="config.fid_reference: no folder at"):
        retention.run_retention(dict(base, inception=str(captions), fid_reference=str(tmp_path / "none")))


def test_a_missing_fid_package_is_named_with_what_to_install(monkeypatch, tmp_path):
    from unguide_jax.cli.config import exit_code_of

    for module in ("torch_fidelity", "torch_fidelity.feature_extractor_inceptionv3", "torch_fidelity.metric_fid"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed (even where an earlier test imported it)
    with pytest.raises(MissingFidPackage, match=r"pip install 'unguide-jax\[fid\]'") as err:
        retention.InceptionFID(tmp_path / "weights.pth")
    assert exit_code_of(err.value) == 2


def test_references_are_fitted_to_the_generated_size_as_resize_and_centre_crop():
    wide = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (32, 1, 3)))
    fitted = retention.fit_reference(wide, 16, 16)
    assert fitted.shape == (16, 16, 3)
    expected = np.asarray(wide.resize((32, 16), Image.BILINEAR))[:, 8:24]  # shorter side to 16, the middle kept
    np.testing.assert_array_equal(fitted, expected)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """torch-fidelity's InceptionV3 with random weights, saved as a weights file (its own are a download)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as err:  # noqa: BLE001 (a torchvision built for another torch raises RuntimeError)
        pytest.skip(f"torch-fidelity does not import here ({type(err).__name__}: {str(err).splitlines()[-1]}): "
                    "the FID's own test needs the fid extra")
    import torch

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random initialisation

    folder = tmp_path_factory.mktemp("inception")
    empty = folder / "empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    weights = folder / "random-inception.pth"
    torch.save(Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)).state_dict(),
               weights)
    return weights


def test_the_fid_is_torch_fidelitys_on_the_same_images(random_inception, tmp_path):
    """Ours (the reference side through reference_statistics, kept in its cache) against torch-fidelity's own
    calculate_metrics on the two folders. On the 64-d features: the 2048-d FID's eigenvalues of a 2048 x 2048
    product take half a minute here, and the arithmetic is the same."""
    import torch_fidelity

    rng = np.random.default_rng(0)
    sets = {}
    for name, shift in (("a", 0), ("b", 60)):
        folder = tmp_path / name
        folder.mkdir()
        images = np.clip(rng.integers(0, 196, (3, 48, 48, 3)) + shift, 0, 255).astype(np.uint8)
        for i, image in enumerate(images):
            Image.fromarray(image).save(folder / f"{i}.png")
        sets[name] = images
    fid = retention.InceptionFID(random_inception, features="64")
    cache = tmp_path / "fid_reference.npz"
    reference, count = retention.reference_statistics(fid, tmp_path / "b", 48, 48, cache)
    ours = fid.distance(fid.statistics(fid.features(iter([sets["a"][:2], sets["a"][2:]]))), reference)
    theirs = torch_fidelity.calculate_metrics(input1=str(tmp_path / "a"), input2=str(tmp_path / "b"), fid=True,
                                              cuda=False, cache=False, verbose=False, save_cpu_ram=True,
                                              feature_layer_fid="64",
                                              feature_extractor_weights_path=str(random_inception))
    assert count == 3 and ours > 0
    assert ours == pytest.approx(theirs[torch_fidelity.KEY_METRIC_FID], rel=1e-4)
    # The references' statistics are kept, and used again while the files are the same.
    again, _ = retention.reference_statistics(fid, tmp_path / "b", 48, 48, cache)
    assert cache.is_file() and np.array_equal(reference["sigma"], again["sigma"])


def test_an_inception_file_that_is_not_plain_tensors_is_refused(random_inception, tmp_path):
    bad = tmp_path / "not-weights.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=f"config.inception: {bad} is not a PyTorch state dict"):
        retention.InceptionFID(bad)


# --- the command end to end -----------------------------------------------------------------------------------


def random_lora(model: Path, path: Path) -> Path:
    """A LoRA with random A and B: an edit that changes the model, without a training run's compile."""
    import jax

    from unguide_jax.edits.lora import LoraConfig, init_lora
    from unguide_jax.loading.edit_files import save_adapter
    from unguide_jax.loading.resolve import load_model

    unet = load_model(str(model)).params["unet"]
    config = LoraConfig(rank=1, alpha=8.0, init="random")
    adapter = init_lora(jax.random.key(0), unet, config)
    rng = np.random.default_rng(0)
    adapter = {m: dict(ab, lora_B=0.02 * rng.standard_normal(ab["lora_B"].shape, np.float32)) for m, ab in adapter.items()}
    return save_adapter(path, adapter, config)


TWO_METHODS = [{"name": "base model", "mode": "base"}, {"name": "LoRA only", "edit": "unguide", "mode": "adapter"}]


def test_retention_command_end_to_end_on_tiny_models(tiny_pipeline_dir, tiny_clip, tmp_path, capsys,  # noqa: F811
                                                     monkeypatch):
    """Plumbing (random models draw noise): one image per caption with seed + i, each image's CLIP embedding paired
    with its caption's, results.json and the table; a rerun reuses every image. The base and LoRA rows (the UnGuide
    row: test_retention_with_the_default_rows)."""
    import sample

    from unguide_jax.evaluation.evaluators import ClipEvaluator

    # The random CLIP's cosines may all be negative (scores 0): what the job pairs is checked on its inputs.
    paired = []
    monkeypatch.setattr(retention, "clip_scores", lambda images, texts: paired.append((images, texts))
                        or clip_scores(images, texts))
    folder, _ = tiny_pipeline_dir("sd1")
    clip_folder, _ = tiny_clip
    lora = random_lora(folder, tmp_path / "adapter.safetensors")
    captions = tmp_path / "captions.csv"
    captions.write_text("caption\nthe cat\na photo of the cat\nof the\n")
    out = tmp_path / "retention"
    args = ["--config", f"{REPO}/configs/evaluate.py:retention", f"--config.model={folder}",
            f"--config.captions={captions}", "--config.limit=2", f"--config.clip={clip_folder}",
            f"--config.edits={json.dumps({'unguide': [str(lora)]})}", f"--config.methods={json.dumps(TWO_METHODS)}",
            "--config.num_steps=2", "--config.seed=7", f"--config.out_dir={out}"]
    assert sample.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["caption"], r["seed"]) for r in results["captions"]] == [("the cat", 7), ("a photo of the cat", 8)]
    assert results["settings"]["captions_used"] == 2 and results["settings"]["fid"] is None
    assert list(results["methods"]) == ["base model", "LoRA only"]
    evaluator = ClipEvaluator(str(clip_folder))
    texts = evaluator.text_embeddings(["the cat", "a photo of the cat"])
    embedded = []
    for (images_in, texts_in), method in zip(paired, results["methods"].values()):
        assert method["images_generated"] == 2 and method["clip_score"]["n"] == 2 and "fid" not in method
        pngs = np.stack([np.asarray(Image.open(out / method["folder"] / r["file"])) for r in results["captions"]])
        embedded.append(evaluator.image_embeddings(pngs))
        np.testing.assert_allclose(images_in, embedded[-1], atol=1e-5)  # image i of the method's folder ...
        np.testing.assert_allclose(texts_in, texts, atol=1e-5)          # ... against caption i
        np.testing.assert_allclose(method["clip_scores"], clip_scores(images_in, texts_in))
        assert method["clip_score"]["mean"] == pytest.approx(np.mean(method["clip_scores"]))
    assert len(paired) == 2 and np.abs(embedded[0] - embedded[1]).max() > 1e-4  # the edit draws other images
    printed = capsys.readouterr().out
    assert "| method | CLIP score ↑ |" in printed and "| LoRA only |" in printed and "Hessel et al. 2021" in printed
    assert sample.main(args) == 0  # reused: no image drawn again
    again = json.loads((out / "results.json").read_text())["methods"]
    assert all(m["images_generated"] == 0 and m["images_kept"] == 2 for m in again.values())
    assert again["LoRA only"]["clip_scores"] == results["methods"]["LoRA only"]["clip_scores"]
    assert len(paired) == 2  # ... and no image scored again (clip_scores.json)
    capsys.readouterr()
    assert sample.main(args + ["--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "Dry run of the retention job" in plan
    assert "| LoRA only | 0 | 2 |" in plan and "| 0 (2) |" in plan  # nothing to draw, nothing to score


def test_retention_with_the_fid_end_to_end(random_inception, tiny_pipeline_dir, tiny_clip, tmp_path,  # noqa: F811
                                           monkeypatch):
    """The FID column: references of other sizes fitted to the model's, their statistics kept for a rerun."""
    import functools

    folder, _ = tiny_pipeline_dir("sd1")
    clip_folder, _ = tiny_clip
    # The 64-d features, for speed (see test_the_fid_is_torch_fidelitys_on_the_same_images).
    monkeypatch.setattr(retention, "InceptionFID", functools.partial(retention.InceptionFID, features="64"))
    references = tmp_path / "references"
    references.mkdir()
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(40, 30), (30, 50), (32, 32)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(references / f"{i}.jpg")
    captions = tmp_path / "captions.txt"
    captions.write_text("the cat\nof the\n")
    out = tmp_path / "retention"
    config = dict(model=str(folder), captions=str(captions), clip=str(clip_folder), methods=[TWO_METHODS[0]],
                  edits={}, num_steps=2, fid_reference=str(references), inception=str(random_inception),
                  out_dir=str(out))
    retention.run_retention(config)
    results = json.loads((out / "results.json").read_text())
    fid = results["settings"]["fid"]
    assert fid["reference_images"] == 3 and fid["size"] == [32, 32] and fid["features"] == "64"
    assert np.isfinite(results["methods"]["base model"]["fid"]) and (out / "fid_reference.npz").is_file()
    assert "| method | CLIP score ↑ | FID ↓ |" in (out / "results.md").read_text()


def test_retention_with_the_default_rows(tiny_pipeline_dir, tiny_clip, tmp_path):  # noqa: F811
    """Base, LoRA only and UnGuide (a small probe; the paper's rule, as the random LoRA names no concept)."""
    folder, _ = tiny_pipeline_dir("sd1")
    clip_folder, _ = tiny_clip
    captions = tmp_path / "captions.txt"
    captions.write_text("the cat\na photo of the cat\n")
    lora = random_lora(folder, tmp_path / "adapter.safetensors")
    out = retention.run_retention(dict(model=str(folder), captions=str(captions), clip=str(clip_folder),
                                       edits={"unguide": [str(lora)]}, num_steps=2,
                                       probe=dict(draws=2, ddim_steps=10, t_enc=7, rule="paper"),
                                       out_dir=str(tmp_path / "out")))
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["base model", "LoRA only", "UnGuide"]
    unguide = results["methods"]["UnGuide"]
    assert 0 <= unguide["captions_to_edit"] <= 2 and unguide["clip_score"]["n"] == 2
    assert "the probe sent" in (out / "results.md").read_text()


# --- the CLIP evaluator over devices ----------------------------------------------------------------------------

EMBED_ON_DEVICES = """
import json, sys
import numpy as np
from unguide_jax.evaluation.evaluators import ClipEvaluator

evaluator = ClipEvaluator(sys.argv[1], batch_size=4)
images = np.random.default_rng(0).integers(0, 256, (5, 40, 36, 3), dtype=np.uint8)
print(json.dumps({"devices": int(evaluator.mesh.devices.size) if evaluator.mesh is not None else 1,
                  "images": evaluator.image_embeddings(images).tolist(),
                  "texts": evaluator.text_embeddings(["the cat", "of the", "a photo of the cat"]).tolist()}))
"""


def test_clip_embeddings_on_eight_devices_equal_one_devices(tiny_clip):  # noqa: F811
    """5 images in batches of 4: 2 batches on one device, 1 padded batch of 8 rows over 8 devices."""
    from unguide_jax.evaluation.evaluators import ClipEvaluator

    folder, _ = tiny_clip
    one = ClipEvaluator(str(folder), batch_size=4)
    assert one.mesh is None
    images = np.random.default_rng(0).integers(0, 256, (5, 40, 36, 3), dtype=np.uint8)
    # The XLA:CPU guard (parallel.mesh.job_devices) would put the job on one of the 8 devices: lifted, so that the
    # rows really split over 8.
    eight = run_script(EMBED_ON_DEVICES, 8, str(folder), extra_env=ALL_CPU_DEVICES)
    assert eight["devices"] == 8
    np.testing.assert_allclose(np.asarray(eight["images"]), one.image_embeddings(images), atol=1e-5)
    np.testing.assert_allclose(np.asarray(eight["texts"]),
                               one.text_embeddings(["the cat", "of the", "a photo of the cat"]), atol=1e-5)


def test_clip_embeddings_over_two_processes_equal_one_devices(tiny_clip):  # noqa: F811
    """Two hosts of one device each: each embeds its rows, and both get every row."""
    from tests.devices import assert_ok, launch
    from unguide_jax.evaluation.evaluators import ClipEvaluator

    folder, _ = tiny_clip
    script = ("from unguide_jax.parallel.hosts import maybe_initialize_distributed\n"
              "maybe_initialize_distributed()\n" + EMBED_ON_DEVICES)
    results = launch(["-c", script, str(folder)], processes=2, devices_per_process=1, timeout=600)
    assert_ok(results)
    one = ClipEvaluator(str(folder), batch_size=4)
    images = np.random.default_rng(0).integers(0, 256, (5, 40, 36, 3), dtype=np.uint8)
    for result in results:
        record = json.loads(result.stdout.strip().splitlines()[-1])
        assert record["devices"] == 2
        np.testing.assert_allclose(np.asarray(record["images"]), one.image_embeddings(images), atol=1e-5)
        np.testing.assert_allclose(np.asarray(record["texts"]),
                                   one.text_embeddings(["the cat", "of the", "a photo of the cat"]), atol=1e-5)
