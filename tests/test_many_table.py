"""The several-concept table (evaluation/many_table.py, evaluate.py:many) on the embedded model with random LoRAs:
the subsets, the prompts and scores of a subset, and the UnGuide row against ManyProbe + generate_many (the
per-row LoRA mix) computed here, the merged-LoRA row against the merged edit sampled here."""
import json

import jax
import numpy as np
import pytest

from unguide_jax.diffusion.many_guidance import generate_many
from unguide_jax.edits.merge import merge_loras
from unguide_jax.erasers.concepts import load_concept
from unguide_jax.erasers.unguide.many_probe import ManyProbe
from unguide_jax.erasers.unguide.probe import ProbeConfig
from unguide_jax.evaluation.evaluators import ShapesEvaluator
from unguide_jax.evaluation.many_config import ManyTableConfig
from unguide_jax.evaluation.many_table import (
    draw_subsets,
    run_many_table,
    scores_of,
    subset_prompts,
    table_prompts,
)
from unguide_jax.jobs import plan
from unguide_jax.loading.edit_files import save_adapter
from unguide_jax.loading.resolve import load_model
from unguide_jax.settings import ConfigError, as_config
from unguide_jax.training.sources import load_edit

CLASSES = ["shapes-arrow", "shapes-star", "shapes-ring"]
PROBE = dict(draws=2, ddim_steps=10, t_enc=7, prompt_chunk=16, rule="calibrated")


def test_subsets_are_every_class_for_one_and_distinct_draws_otherwise():
    ten = as_config({"job": "many", "sizes": [1, 2, 9], "subsets": 3}, ManyTableConfig)
    subsets = draw_subsets(ten)
    assert subsets[1] == [(c,) for c in ten.classes]
    assert len(subsets[2]) == 3 and len(set(subsets[2])) == 3 and all(len(s) == 2 for s in subsets[2])
    assert subsets == draw_subsets(ten)  # the same seed, the same subsets
    assert draw_subsets(as_config({"job": "many", "sizes": [2], "subset_seed": 1}, ManyTableConfig))[2] != subsets[2]
    few = as_config({"job": "many", "classes": CLASSES, "sizes": [2], "subsets": 5}, ManyTableConfig)
    assert draw_subsets(few)[2] == [("shapes-arrow", "shapes-star"), ("shapes-arrow", "shapes-ring"),
                                    ("shapes-star", "shapes-ring")]  # fewer than asked: every one
    with pytest.raises(ConfigError, match="sizes.*erasing every class"):
        as_config({"job": "many", "classes": CLASSES, "sizes": [3]}, ManyTableConfig)
    with pytest.raises(ConfigError, match="methods.*unknown rows"):
        as_config({"job": "many", "methods": ["base", "esd"]}, ManyTableConfig)


def test_subset_prompts_and_scores():
    concepts = {c: load_concept(c) for c in CLASSES}
    prompts = subset_prompts(concepts, ("shapes-star",))
    assert prompts[0] == ("a photo of the arrow", "kept") and ("a photo of the star", "erased") in prompts
    assert sum(role == "synonym" for _, role in prompts) == len(concepts["shapes-star"].synonyms)
    assert len(table_prompts(concepts).items) == sum(1 + len(c.synonyms) for c in concepts.values())
    per_prompt = {p: (0.2 if role == "erased" else 0.4 if role == "synonym" else 0.9) for p, role in prompts}
    scores = scores_of(per_prompt, prompts)
    assert scores["acc_e"] == pytest.approx(0.2) and scores["acc_g"] == pytest.approx(0.4)
    assert scores["acc_s"] == pytest.approx(0.9)
    assert scores["h_o"] == pytest.approx(3 / (1 / 0.8 + 1 / 0.9 + 1 / 0.6))


@pytest.fixture(scope="module")
def sd():
    return load_model("embedded")


@pytest.fixture(scope="module")
def lora_run(sd, tmp_path_factory):
    """concepts/<class>/adapter.safetensors: a random rank-1 LoRA per class (B ≠ 0)."""
    from unguide_jax.edits.lora import LoraConfig, init_lora

    run = tmp_path_factory.mktemp("many-run")
    config = LoraConfig(rank=1, alpha=8.0, init="random")
    for i, name in enumerate(CLASSES):
        adapter = init_lora(jax.random.key(i), sd.params["unet"], config)
        rng = np.random.default_rng(i)
        adapter = {p: {"lora_A": np.asarray(ab["lora_A"]),
                       "lora_B": (0.3 * rng.standard_normal(ab["lora_B"].shape)).astype(np.float32)}
                   for p, ab in adapter.items()}
        (run / "concepts" / name).mkdir(parents=True)
        save_adapter(run / "concepts" / name / "adapter.safetensors", adapter, config)
    return run


def class_credit(sd, images, prompts, concepts):
    """Each prompt's mean probability of the class it names."""
    items = {p: c for p, _, c in table_prompts(concepts).items}
    probs = ShapesEvaluator().class_probabilities(np.asarray(images), None)
    return {p: float(probs[i, items[p]]) for i, p in enumerate(prompts)}


def test_rows_match_the_library_computed_here(sd, lora_run, tmp_path):
    config = dict(job="many", classes=CLASSES, sizes=[2], subsets=1, methods=["base", "lora_merged", "unguide"],
                  lora_run=str(lora_run), train_missing="", images_per_prompt=1, num_steps=3, probe=PROBE,
                  batch_size=8, out_dir=str(tmp_path / "table"))
    dry = plan(as_config(config, ManyTableConfig), measure=False)
    assert [s.name for s in dry.stages][1:] == ["LoRA only (K LoRAs merged)", "UnGuide (one probe, K LoRAs)"]
    out = run_many_table(config)
    record = json.loads((out / "results.json").read_text())
    (row,) = record["subsets"]["2"]
    subset = tuple(row["classes"])
    concepts = {c: load_concept(c) for c in CLASSES}
    prompts = subset_prompts(concepts, subset)
    texts = [p for p, _ in prompts]
    seeds = [2024] * len(texts)
    edits = [load_edit(lora_run / "concepts" / c, sd.params["unet"])[0] for c in subset]

    merged = sd.generate(texts, seeds, num_steps=3, edit=merge_loras(edits))
    expected = scores_of(class_credit(sd, merged.images, texts, concepts), prompts)
    for metric in ("acc_e", "acc_s", "acc_g", "h_o"):
        assert row["methods"]["lora_merged"][metric] == pytest.approx(expected[metric], abs=1e-4), metric

    probe = ManyProbe(sd, edits, ProbeConfig(**PROBE), [list(concepts[c].targets) for c in subset]).run(texts, 7.5)
    assert probe.flags.any() and not probe.flags.all()  # the rule has something to choose between
    ours = generate_many(sd, texts, seeds, edits=edits, w=probe.w, flags=probe.flags, num_steps=3)
    expected = scores_of(class_credit(sd, ours.images, texts, concepts), prompts)
    for metric in ("acc_e", "acc_s", "acc_g", "h_o"):
        assert row["methods"]["unguide"][metric] == pytest.approx(expected[metric], abs=1e-3), metric
    assert "| 2 | 1 | UnGuide (one probe, K LoRAs) |" in (out / "results.md").read_text()
    # A rerun makes nothing again.
    again = json.loads((run_many_table(config) / "results.json").read_text())
    assert again["settings"]["work"].get("images_generated", 0) == 0
    for method, values in again["subsets"]["2"][0]["methods"].items():
        first = row["methods"][method]
        assert {k: v for k, v in values.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}


def test_a_missing_lora_run_is_named(tmp_path):
    config = dict(job="many", classes=CLASSES, sizes=[1], lora_run=str(tmp_path / "nothing"), train_missing="",
                  out_dir=str(tmp_path / "table"))
    with pytest.raises(FileNotFoundError, match=r"nothing has no LoRA for \['shapes-arrow'"):
        run_many_table(config)
