"""The model card (README.md) every export gets: hub front matter that parses, the base model and the concept named,
settings, training, evaluation (or that there is none), and usage code for each exported format."""
import ast
import json
import re
import shutil
from pathlib import Path

import pytest

import train
from unguide_jax.publishing.model_card import (
    CARD_FILE,
    check_card_inputs,
    describe_source,
    write_model_card,
)

REPO = Path(__file__).resolve().parent.parent
TAGS = {"lora", "concept-erasure", "unguide", "text-to-image", "stable-diffusion"}


def parse_card(path: Path) -> tuple[dict, str]:
    """(front matter, markdown body) of a card: a YAML block between '---' lines, then the text."""
    text = path.read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert match, "the card does not open with a '---' front-matter block"
    try:
        import yaml
    except ImportError:  # PyYAML comes with huggingface_hub; without it, the flat subset this writer uses
        meta = _flat_yaml(match.group(1))
    else:
        meta = yaml.safe_load(match.group(1))
    assert isinstance(meta, dict)
    return meta, match.group(2)


def _flat_yaml(block: str) -> dict:
    meta, key = {}, None
    for line in block.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("- "):
            meta[key].append(json.loads(line[2:]))
            continue
        key, _, value = line.partition(":")
        meta[key] = json.loads(value) if value.strip() else []
    return meta


def python_blocks(body: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", body, re.S)


def run_train(config: str, folder, run_dir, *extra) -> Path:
    assert train.main(["--config", f"{REPO}/configs/{config}.py:tiny", f"--config.model={folder}",
                       f"--config.run_dir={run_dir}", *extra]) == 0
    return Path(run_dir)


@pytest.fixture(scope="module")
def embedded_unet():
    from unguide_jax.loading.diffusers_folder import load_component
    from unguide_jax.resources import EMBEDDED_MODEL

    return load_component(EMBEDDED_MODEL / "unet", "unet")


@pytest.fixture(scope="module")
def unguide_run(embedded_unet, tmp_path_factory):
    """A train.py run folder of UnGuide on the embedded model as the trainer leaves it (config.json, the adapter
    file with its metadata, export/ in two formats) and its unguide.json and card, as the train job writes them; the LoRA is the
    trainer's initial one (training it is tests/test_train_cli.py's business, and the slow test below's)."""
    import jax

    from unguide_jax.erasers.concepts import load_concept
    from unguide_jax.json_files import write_json
    from unguide_jax.loading.exports import export_edit
    from unguide_jax.publishing.export import publish_export
    from unguide_jax.settings import as_config, to_dict
    from unguide_jax.training.config import UnguideTrainConfig
    from unguide_jax.training.trainers import TRAINED

    unet, params = embedded_unet
    run = tmp_path_factory.mktemp("card") / "unguide-shapes-arrow"
    config = as_config(dict(method="unguide", model="embedded", run_dir=str(run), export=["peft", "kohya"]),
                       UnguideTrainConfig)
    trainer = TRAINED["unguide"](config)
    run.mkdir()
    write_json(run / "config.json", to_dict(config))
    edit = trainer.save(trainer.init(jax.random.key(config.seed), params), run, load_concept(config.concept), config)
    export_edit(list(config.export), run / "export", edit, unet, params)
    # unguide.json and the card, as the train job publishes them (no model needed: nothing is probed here)
    publish_export(run / "export", config.export, [run], None, edit, load_concept(config.concept).targets,
                   unet_params=params)
    return run


def test_train_run_export_card_names_model_concept_settings_and_both_uses(unguide_run):
    run = unguide_run
    meta, body = parse_card(run / "export" / CARD_FILE)
    assert meta["library_name"] == "diffusers" and TAGS <= set(meta["tags"])
    assert "base_model" not in meta  # the embedded model is on no hub: base_model takes hub ids only
    assert "embedded shapes model shipped with unguide-jax" in body and "not on the Hugging Face hub" in body
    assert "**shapes-arrow**" in body and "| a photo of the arrow | a photo of the sky |" in body
    assert "Forget anchors" not in body  # UnGuide trains on the target and reference prompts
    assert "UnGuide (Polowczyk et al." in body
    assert "| `lora.rank` | `1` |" in body and "| `lora.alpha` | `8.0` |" in body
    assert "0 steps (of 200 configured); Adam learning rate 3e-05; seed 0" in body
    assert "No evaluation was recorded" in body
    blocks = python_blocks(body)
    assert any("UnGuidePipeline" in b and "pipe.load_unguide(export)" in b for b in blocks)
    assert any('pipe.load_lora_weights(f"{export}/diffusers")' in b for b in blocks)
    assert any('weight_name="kohya.safetensors"' in b for b in blocks)
    for block in blocks:
        ast.parse(block)
        assert f'export = "{run / "export"}"' in block and "base = str(EMBEDDED_MODEL)" in block
    assert "- `unguide.json`" in body and "- `kohya.safetensors`" in body


def test_card_from_a_bare_adapter_file_says_what_is_unknown(unguide_run, tmp_path):
    bare = tmp_path / "shared" / "arrow.safetensors"
    bare.parent.mkdir()
    shutil.copy(unguide_run / "adapter.safetensors", bare)
    (tmp_path / "out").mkdir()
    meta, body = parse_card(write_model_card(tmp_path / "out", [bare], formats=["peft"],
                                             base_model="CompVis/stable-diffusion-v1-4"))
    assert meta["base_model"] == "CompVis/stable-diffusion-v1-4"
    assert "**shapes-arrow**" in body  # the adapter's metadata records the concept as trained
    assert "without the run folder's `config.json`" in body and "Every other setting is unknown." in body
    assert "| `rank` | `1` |" in body and "| `learning_rate` | `3e-05` |" in body
    assert "0 steps; Adam learning rate 3e-05; seed 0" in body  # the iterations configured are not in the file
    assert "the source records the base model embedded" in body  # made on one model, exported against another
    for block in python_blocks(body):
        ast.parse(block)
        assert 'base = "CompVis/stable-diffusion-v1-4"' in block
    # No unguide.json in that folder: UnGuidance is not offered, the plain LoRA is.
    assert "UnGuidePipeline" not in body and "load_lora_weights" in body

    foreign = tmp_path / "foreign.safetensors"  # a LoRA from elsewhere: nothing about it is known
    shutil.copy(unguide_run / "export" / "diffusers" / "pytorch_lora_weights.safetensors", foreign)
    _, body = parse_card(write_model_card(tmp_path / "out", [foreign], formats=["peft"]))
    assert "Concept: **unknown**" in body and "a base model that its source does not record (unknown)" in body
    assert "How this edit was trained is not recorded in its source (unknown)." in body


def test_closed_form_card_uses_its_own_formats(tmp_path):
    from unguide_jax.json_files import write_json
    from unguide_jax.settings import as_config, to_dict
    from unguide_jax.training.config import UceTrainConfig

    run = tmp_path / "uce-shapes-arrow"
    config = as_config(dict(method="uce", model="stabilityai/stable-diffusion-2-base", concept="shapes-star",
                            run_dir=str(run)), UceTrainConfig)
    write_json(run / "config.json", to_dict(config))
    (run / "export" / "diffusers").mkdir(parents=True)
    meta, body = parse_card(write_model_card(run / "export", [run], formats=config.export))
    assert config.export == ("peft", "partial_unet")
    assert meta["base_model"] == "stabilityai/stable-diffusion-2-base"
    assert {"uce", "lora", "concept-erasure"} <= set(meta["tags"]) and "unguide" not in meta["tags"]
    assert "**shapes-star**" in body and "Forget anchors" in body  # the prompts UCE computes its edit from
    assert "UCE (Gandikota et al." in body and "Computed in closed form: no training steps" in body
    assert "| `uce.lam` | `0.5` |" in body
    assert "UnGuidePipeline" not in body  # UnGuidance is offered for UnGuide's LoRA
    blocks = python_blocks(body)
    assert any("load_lora_weights" in b for b in blocks) and any("unet_edited.safetensors" in b for b in blocks)
    for block in blocks:
        ast.parse(block)
        assert 'base = "stabilityai/stable-diffusion-2-base"' in block


def test_merged_unet_card_builds_the_pipeline_around_the_merged_unet(unguide_run, tmp_path):
    meta, body = parse_card(write_model_card(tmp_path, [unguide_run], formats=["merged_unet"]))
    assert "base_model" not in meta and meta["library_name"] == "diffusers"
    block, = python_blocks(body)
    ast.parse(block)
    assert "from unguide_jax.resources import EMBEDDED_MODEL" in block
    assert "StableDiffusionPipeline.from_pretrained(base, unet=unet)" in block


def _results(concept: str, edit_sources: list[str]) -> dict:
    """A results.json of the erasure evaluation, its rows scored by the evaluation's own functions."""
    import numpy as np

    from unguide_jax.erasers.concepts import load_concept
    from unguide_jax.evaluation.erasure import average, score
    from unguide_jax.evaluation.evaluators import shapes_prompt_set

    prompt_set = shapes_prompt_set(load_concept(concept))
    owners = np.repeat(np.arange(len(prompt_set.items)), 2)
    probs = np.random.default_rng(0).dirichlet(np.ones(10), size=len(owners))
    methods = {"base model": dict(score(prompt_set, probs, owners), mode="base", edit=None),
               "UnGuide": dict(score(prompt_set, probs[::-1], owners), mode="unguide", edit="unguide")}
    entry = dict(concept=concept, erased_class="arrow", prompts=list(prompt_set.items), paraphrases=[],
                 methods=methods, edits={"unguide": [{"source": s, "kind": "lora"} for s in edit_sources]})
    return {"settings": {"images_per_prompt": 2, "seed": 2024, "guidance_scale": 7.5, "num_steps": 4,
                         "probe": {"draws": 2}},
            "average": average([entry], list(methods)), "concepts": [entry]}


def test_evaluation_table_goes_into_the_card_only_for_this_edit(unguide_run, tmp_path):
    run = unguide_run
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_results("shapes-arrow", [str(run / "adapter.safetensors")])))
    (tmp_path / "out").mkdir()
    _, body = parse_card(write_model_card(tmp_path / "out", [run], formats=["peft"], evaluation=results))
    evaluation = body.split("## Evaluation", 1)[1].split("## How to use", 1)[0]
    assert "| method | Acc_e ↓ | Acc_s ↑ | Acc_g ↓ | H_o ↑ |" in evaluation
    assert re.search(r"\| base model \| [\d.]+% \| [\d.]+% \| [\d.]+% \| – \|", evaluation)
    assert re.search(r"\| UnGuide \| [\d.]+% \| [\d.]+% \| [\d.]+% \| [\d.]+% \|", evaluation)
    assert "No evaluation was recorded" not in body

    other = tmp_path / "other.json"
    other.write_text(json.dumps(_results("shapes-arrow", [str(tmp_path / "another-run" / "adapter.safetensors")])))
    with pytest.raises(ValueError, match="does not evaluate this edit.*another-run"):
        check_card_inputs([run], other)
    i2p = tmp_path / "i2p.json"
    i2p.write_text(json.dumps({"settings": {}, "methods": {}, "rows": []}))
    with pytest.raises(ValueError, match="not the results.json of the erasure evaluation"):
        check_card_inputs([run], i2p)
    with pytest.raises(FileNotFoundError, match="missing edit source"):
        check_card_inputs([tmp_path / "nope"], None)


@pytest.mark.slow
def test_train_evaluate_and_export_again_with_the_measured_table(tiny_pipeline_dir, tmp_path):
    """The whole path: train.py writes the card with its export; the erasure evaluation measures the run;
    unguide-export writes the card again with the table of that run's rows."""
    import sample
    from unguide_jax.cli.export import main as export_main

    folder, _ = tiny_pipeline_dir("sd1")
    run = run_train("unguide", folder, tmp_path / "lora", "--config.iterations=1", '--config.export=["peft"]')
    _, body = parse_card(run / "export" / CARD_FILE)
    assert "Trained with unguide-jax (JAX/Flax): 1 step; Adam learning rate 0.001" in body
    assert "No evaluation was recorded" in body
    methods = [{"name": "base model", "mode": "base"}, {"name": "LoRA only", "edit": "unguide", "mode": "adapter"},
               {"name": "UnGuide", "edit": "unguide", "mode": "unguide"}]
    erasures = [{"concept": "shapes-arrow", "edits": {"unguide": [str(run)]}}]
    out = tmp_path / "eval"
    assert sample.main(["--config", f"{REPO}/configs/evaluate.py:tiny", f"--config.model={folder}",
                        f"--config.erasures={json.dumps(erasures)}", f"--config.methods={json.dumps(methods)}",
                        "--config.images_per_prompt=1", f"--config.out_dir={out}"]) == 0
    assert export_main([str(run), "--model", str(folder), "--out", str(tmp_path / "export"),
                        "--evaluation", str(out / "results.json")]) == 0
    _, body = parse_card(tmp_path / "export" / CARD_FILE)
    for name in ("base model", "LoRA only", "UnGuide"):
        assert re.search(rf"\| {name} \| [\d.]+% \|", body), name
    assert "No evaluation was recorded" not in body


def test_the_card_and_the_loader_classify_sources_alike(unguide_run, tmp_path):
    """One classifier (training.sources.classify_source) for the loader and the card: a run folder, our file
    inside it, a foreign LoRA file or folder; anything else is named."""
    from unguide_jax.training.sources import classify_source

    run = unguide_run
    expected = {run: "run folder", run / "adapter.safetensors": "run folder",
                run / "export" / "diffusers": "LoRA file", run / "export" / "kohya.safetensors": "LoRA file"}
    for source, kind in expected.items():
        assert classify_source(source).kind == kind, source
        assert describe_source(source).kind == kind, source
    assert classify_source(run).edit_file == run / "adapter.safetensors"
    (tmp_path / "weights.ckpt").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="weights.ckpt: edits are read from safetensors files"):
        describe_source(tmp_path / "weights.ckpt")
    with pytest.raises(FileNotFoundError, match="missing edit source"):
        classify_source(tmp_path / "nothing")
