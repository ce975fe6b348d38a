"""The erasure evaluation's scoring (the UnGuide paper's Table 1 protocol), by hand-made classifier outputs."""
import numpy as np
import pytest

from unguide_jax.erasers.concepts import load_concept
from unguide_jax.evaluation.erasure import harmonic_overall, score
from unguide_jax.evaluation.evaluators import PromptSet, check_evaluator, clip_prompt_set, shapes_prompt_set


def test_prompt_set_of_a_shipped_concept():
    ps = shapes_prompt_set(load_concept("shapes-circle"))
    assert ps.erased == 0 and len(ps.items) == 13  # target, 3 synonyms, 9 other classes ("" left to the probe)
    assert [k for _, k, _ in ps.items].count("synonym") == 3
    assert sorted(c for _, k, c in ps.items if k == "other") == list(range(1, 10))
    assert ps.class_names[ps.erased] == "circle"
    with pytest.raises(ValueError, match="object concepts of the shapes model.*evaluator=clip:SOURCE"):
        shapes_prompt_set(load_concept("cat"))


def test_clip_prompt_set_is_maces_class_texts():
    """For CLIP the classes are the target and the other prompts, MACE's "a photo of the {class}" texts for
    CIFAR-10; synonyms count for the erased class."""
    ps = clip_prompt_set(load_concept("dog"))
    assert ps.class_names[0] == "a photo of the dog" and len(ps.class_names) == 10
    assert ps.class_names[1:] == tuple(f"a photo of the {c}" for c in
                                       ("airplane", "automobile", "bird", "cat", "deer", "frog", "horse", "ship",
                                        "truck"))
    assert [c for p, k, c in ps.items if k == "synonym"] == [0, 0, 0]
    assert len(ps.prompts) == 13  # the authors' softmax runs over these 13 texts
    assert check_evaluator("clip:openai/clip-vit-base-patch32") is None
    assert "clip:SOURCE" in check_evaluator("clip:") and "clip:SOURCE" in check_evaluator("resnet")


def test_the_reference_protocol_credits_each_images_own_text_when_texts_are_scored():
    """With text probabilities (CLIP), an image credits its own prompt's text; texts of a class no longer tie."""
    ps = PromptSet(erased=0, items=(("t", "target", 0), ("s", "synonym", 0), ("o", "other", 1)),
                   class_names=("t", "o"))
    owners = np.array([0, 0, 1, 2])
    class_probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    text_probs = np.array([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3], [0.3, 0.1, 0.6]])
    ref = score(ps, class_probs, owners, text_probs)["reference"]
    assert ref["acc_e"] == pytest.approx((0.6 + 0.1) / 2)
    assert ref["acc_g"] == pytest.approx(0.5) and ref["acc_s"] == pytest.approx(0.6)
    mace = score(ps, class_probs, owners, text_probs)["mace"]  # unchanged by the texts
    assert (mace["acc_e"], mace["acc_g"], mace["acc_s"]) == pytest.approx(((0.9 + 0.2) / 2, 0.7, 0.6))


def test_scores_under_every_protocol_match_hand_computations():
    ps = PromptSet(erased=0, items=(("t", "target", 0), ("s1", "synonym", 0), ("s2", "synonym", 0),
                                    ("o1", "other", 1), ("o2", "other", 2)))
    owners = np.repeat(np.arange(5), 2)
    p = np.full((10, 3), 0.1)
    hit = lambda c, strength=0.8: np.eye(3)[c] * (strength - 0.1) + 0.1  # noqa: E731
    p[0], p[1] = hit(0), hit(1)          # target: one image still the erased class
    p[2], p[3] = hit(2), hit(2)          # synonym 1: erased
    p[4], p[5] = hit(0, 0.5), hit(0)     # synonym 2: leaks
    p[6], p[7] = hit(1), hit(1, 0.6)     # other 1: kept
    p[8], p[9] = hit(2), hit(0)          # other 2: one image turned into the erased class
    got = score(ps, p, owners)
    # MACE: the mean probability of the prompt's class (the erased class for synonyms).
    mace = got["mace"]
    assert mace["acc_e"] == pytest.approx((0.8 + 0.1) / 2)
    assert mace["acc_g"] == pytest.approx(((0.1 + 0.1) / 2 + (0.5 + 0.8) / 2) / 2)
    assert mace["acc_s"] == pytest.approx(((0.8 + 0.6) / 2 + (0.8 + 0.1) / 2) / 2)
    assert mace["h_o"] == pytest.approx(3 / (1 / 0.55 + 1 / 0.575 + 1 / 0.625))
    # reference: 5 texts, 3 of class 0; an image credits its own text: p_c / (3 p_0 + p_1 + p_2).
    ref = got["reference"]
    own = lambda probs, c: probs[c] / (probs * [3, 1, 1]).sum()  # noqa: E731
    assert ref["acc_e"] == pytest.approx((0.8 / 2.6 + 0.1 / 1.2) / 2)
    assert ref["acc_e"] == pytest.approx((own(p[0], 0) + own(p[1], 0)) / 2)
    assert ref["per_prompt"]["s2"] == pytest.approx((own(p[4], 0) + own(p[5], 0)) / 2)
    assert ref["acc_s"] == pytest.approx(np.mean([own(p[6], 1), own(p[7], 1), own(p[8], 2), own(p[9], 2)]))
    assert own(np.array([1.0, 0, 0]), 0) == pytest.approx(1 / 3)  # a perfect image of the erased class credits 1/(its texts)
    # top1 (an extra): argmax hits.
    top1 = got["top1"]
    assert (top1["acc_e"], top1["acc_g"], top1["acc_s"]) == (0.5, 0.5, 0.75)


def test_harmonic_overall_is_zero_when_a_term_is():
    assert harmonic_overall(1.0, 0.9, 0.1) == 0.0
    assert harmonic_overall(0.0, 1.0, 0.0) == pytest.approx(1.0)


def test_rule_agreements_count_the_prompts_each_bar_gives_the_oracles_w():
    from types import SimpleNamespace

    from unguide_jax.erasers.unguide.probe import ProbeConfig
    from unguide_jax.evaluation.erasure import rule_agreements

    config = SimpleNamespace(probe=ProbeConfig())  # the only part of the evaluation's config it reads
    erase, keep = config.probe.w_erase, config.probe.w_keep
    info = {"probe": {"a": {"D": 3.0}, "b": {"D": 1.5}, "c": {"D": 0.5}, "d": {"D": 2.5}}, "D_empty": 1.0,
            "probe_threshold": 2.0}
    oracle = [erase, keep, keep, erase]
    # paper bar 1.0: a, b, d erase (b wrong); calibrated bar 2.0: a, d erase (all right).
    assert rule_agreements(info, ["a", "b", "c", "d"], oracle, config) == {"paper": 0.75, "calibrated": 1.0}
    assert set(rule_agreements(dict(info, probe_threshold=None), ["a"], [erase], config)) == {"paper"}


def test_methods_parse_and_name_their_problems():
    from unguide_jax.evaluation.erasure import Method

    assert Method.from_config("unguide") == Method(name="unguide", edit="unguide", mode="unguide")
    assert Method.from_config({"name": "PURE", "edit": "pure", "mode": "adapter"}).edit == "pure"
    with pytest.raises(ValueError, match="unknown mode 'sideways'"):
        Method.from_config({"name": "x", "edit": "pure", "mode": "sideways"})
    with pytest.raises(ValueError, match="mode base takes no edit"):
        Method.from_config({"name": "x", "edit": "pure", "mode": "base"})
    with pytest.raises(ValueError, match=r"unknown keys \['weight'\]"):
        Method.from_config({"name": "x", "mode": "base", "weight": 1})
    with pytest.raises(ValueError, match="unknown probe timestep mode 'ddpm'"):
        Method.from_config({"name": "x", "edit": "unguide", "mode": "unguide", "timestep_mode": "ddpm"})
    with pytest.raises(ValueError, match="w_keep is the probe's, for mode unguide only"):
        Method.from_config({"name": "x", "edit": "unguide", "mode": "adapter", "w_keep": 1.0})
    # A row's own probe settings override the config's, the rest stays.
    from unguide_jax.erasers.unguide.probe import ProbeConfig

    guarded = Method.from_config({"name": "g", "edit": "unguide", "mode": "unguide", "w_keep": 0.5, "rule": "paper"})
    assert guarded.probe_of(ProbeConfig(draws=7)) == ProbeConfig(draws=7, w_keep=0.5, rule="paper")
    assert Method.from_config("unguide").probe_of(ProbeConfig(draws=7)) == ProbeConfig(draws=7)
    # The paper row of the ten-class table probes as the authors' code does, on LoRAs trained the same way.
    from unguide_jax.presets import load_config_file

    (paper,) = [Method.from_config(m) for m in load_config_file("evaluate.py:all-classes")["methods"]
                if isinstance(m, dict) and m.get("edit") == "unguide_paper"]
    assert (paper.rule, paper.timestep_mode) == ("paper", "reference")
    assert load_config_file("unguide.py:paper")["objective"]["timestep_mode"] == "reference"


def test_shipped_shapes_concepts_carry_anchors_and_paraphrases():
    from unguide_jax.shapes.data import CLASSES, class_named_in

    for cls in CLASSES:
        concept = load_concept(f"shapes-{cls}")
        assert len(concept.forget_anchors) == 5 and len(concept.retain_anchors) == 45
        assert all(class_named_in(p) == CLASSES.index(cls) for p in concept.forget_anchors)
        assert len(concept.paraphrases) == 3
        for prompt in concept.paraphrases:  # never the class name nor a synonym of any class
            assert class_named_in(prompt) is None, prompt


def _check_derived_settings(folder, run):
    """config.json records the transferred learning rate; A starts along the concept direction."""
    import json

    from unguide_jax.erasers.unguide.concept_direction import concept_directions
    from unguide_jax.erasers.unguide.transfer import transfer_settings
    from unguide_jax.loading.edit_files import load_adapter
    from unguide_jax.loading.resolve import load_model

    derived = json.loads((run / "config.json").read_text())["derived"]
    sd = load_model(str(folder))
    concept = load_concept("shapes-arrow")
    target = np.asarray(sd.encode_prompts(list(concept.targets)))
    expected = transfer_settings("kv_scale", 1e-3, sd.params["unet"], target)
    assert derived["transfer"] == "kv_scale" and derived["lora_init"] == "concept"
    assert derived["learning_rate"] == pytest.approx(expected.learning_rate, rel=1e-6)
    adapter, config = load_adapter(run / "adapter.safetensors")
    assert config.init == "concept"
    a = concept_directions(target, np.asarray(sd.encode_prompts(list(concept.references) + [""])), 1)[:, 0]
    for ab in adapter.values():  # A moves little in one step: it still points along the concept direction
        got = np.asarray(ab["lora_A"])[:, 0]
        assert abs(got @ a) / (np.linalg.norm(got) * np.linalg.norm(a)) > 0.99


def test_evaluation_command_end_to_end_on_a_tiny_model(tiny_pipeline_dir, tmp_path, capsys):
    """Plumbing only (a random tiny model draws noise): every method row, both protocols, paraphrases, the three
    attacks."""
    import json
    from pathlib import Path

    import sample
    import train

    repo = Path(__file__).resolve().parent.parent
    folder, _ = tiny_pipeline_dir("sd1")
    lora_run = tmp_path / "lora"
    # The defaults' way: the transferred learning rate and A started on the concept (tiny: "none", "random").
    assert train.main(["--config", f"{repo}/configs/unguide.py:tiny", f"--config.model={folder}",
                       f"--config.run_dir={lora_run}", "--config.iterations=1", "--config.transfer=kv_scale",
                       "--config.lora.init=concept"]) == 0
    assert "transfer kv_scale:" in capsys.readouterr().out
    _check_derived_settings(folder, lora_run)
    # UnGuidance over the other erasers' edits: tests/test_erasers_cli.py.
    erasures = [{"concept": "shapes-circle", "edits": {"unguide": [str(lora_run)]}}]
    methods = [{"name": "base model", "mode": "base"}, {"name": "LoRA only", "edit": "unguide", "mode": "adapter"},
               # the row's rule and timesteps over the config's
               {"name": "UnGuide", "edit": "unguide", "mode": "unguide", "rule": "calibrated", "timestep_mode": "reference"},
               {"name": "oracle", "edit": "unguide", "mode": "oracle"},
               {"name": "w -1", "edit": "unguide", "mode": "fixed", "w": -1.0},
               {"name": "w 2", "edit": "unguide", "mode": "fixed", "w": 2.0},
               {"name": "guarded", "edit": "unguide", "mode": "unguide", "w_keep": 0.5}]
    out = tmp_path / "eval"
    assert sample.main(["--config", f"{repo}/configs/evaluate.py:tiny", f"--config.model={folder}",
                        f"--config.erasures={json.dumps(erasures)}", f"--config.methods={json.dumps(methods)}",
                        "--config.paraphrases=true", "--config.attack.enabled=true", "--config.attack.images=1",
                        "--config.attack.settings.iterations=2", f"--config.out_dir={out}",
                        '--config.attack.kinds=["prefix", "pipeline", "ring_a_bell"]',
                        "--config.attack.ring_a_bell.iterations=2", "--config.attack.ring_a_bell.prompt_tokens=2",
                        # One compiled sampler and one compiled probe serve the prompts and the paraphrases:
                        # 16 prompts, one image each, in one batch.
                        "--config.images_per_prompt=1", "--config.num_steps=2", "--config.batch_size=16",
                        "--config.probe.prompt_chunk=4", "--config.probe.rule=paper"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["average"]) == [m["name"] for m in methods]
    circle = results["concepts"][0]
    assert circle["erased_class"] == "circle" and len(circle["paraphrases"]) == 3
    for name, row in circle["methods"].items():
        for protocol in ("mace", "reference", "top1"):
            assert set(row[protocol]) >= {"acc_e", "acc_s", "acc_g", "h_o", "per_prompt"}
            assert len(row[protocol]["per_prompt"]) == 13
        assert 0 <= row["paraphrase_leakage"] <= 1
        assert ("attacks" in row) == (name != "base model")
        if name != "base model":
            assert set(row["attacks"]) == {"prefix", "pipeline", "ring_a_bell"}
            assert all(len(a["prompts"]) == 1 and 0 <= a["success_rate"] <= 1 for a in row["attacks"].values())
    assert set(circle["methods"]["UnGuide"]["probe"]) == set(p for p, _, _ in circle["prompts"]) | set(circle["paraphrases"])
    lora = circle["methods"]["LoRA only"]["attacks"]
    # The LoRA alone samples from its edit: the probe-aware attack is the prefix attack itself.
    assert lora["pipeline"]["prompts"] == lora["prefix"]["prompts"] and lora["pipeline"]["w"] is None
    assert not lora["prefix"]["settings"]["probe_aware"]
    assert circle["methods"]["UnGuide"]["attacks"]["pipeline"]["settings"]["probe_aware"]
    # Ring-A-Bell's prompts do not depend on the row.
    assert len({tuple(r["attacks"]["ring_a_bell"]["prompts"]) for n, r in circle["methods"].items() if n != "base model"}) == 1
    guarded = circle["methods"]["guarded"]
    assert {v["w"] for v in guarded["probe"].values()} <= {-1.0, 0.5}
    assert all(w in (-1.0, 0.5) for a in guarded["attacks"].values() for w in a["w"])
    table = capsys.readouterr().out
    assert "| UnGuide |" in table and "prefix tokens: before → after" in table and "Ring-A-Bell: before → after" in table
    assert len(list((out / "shapes-circle" / "unguide").glob("*.png"))) == 16
    # The row's rule (calibrated: a threshold from the concept's own D) beats the config's (paper); the row also says
    # how often the paper's bar D("") would have agreed with the oracle.
    assert circle["methods"]["UnGuide"]["probe_rule"] == "calibrated"
    assert circle["methods"]["UnGuide"]["probe_timestep_mode"] == "reference"
    assert circle["methods"]["UnGuide"]["probe_threshold"] > 0
    assert set(circle["methods"]["UnGuide"]["rules_agree_with_oracle"]) == {"paper", "calibrated"}
    # The oracle row is fixed-w sampling: w -1 on the target and its synonyms, 2 on the other classes.
    import numpy as np
    from PIL import Image

    def images(row):
        return [np.asarray(Image.open(f)) for f in sorted((out / "shapes-circle" / row).glob("*.png"))]

    oracle, minus, plus = images("oracle"), images("w-1"), images("w-2")
    kinds = [k for _, k, _ in circle["prompts"]]
    for k, kind in enumerate(kinds):
        np.testing.assert_array_equal(oracle[k], minus[k] if kind != "other" else plus[k])


def test_missing_edits_are_trained_first_on_the_evaluated_model(tmp_path):
    from unguide_jax.evaluation.config import EvaluateConfig
    from unguide_jax.evaluation.erasure import train_missing_edits
    from unguide_jax.settings import as_config

    done = tmp_path / "done"
    done.mkdir()
    (done / "config.json").write_text("{}")
    (done / "adapter.safetensors").write_bytes(b"")
    erasures = [{"concept": "shapes-star", "edits": {"unguide": [str(tmp_path / "star")], "paper": [str(done)]}}]
    config = as_config(dict(erasures=erasures, model="/models/mine", methods=["base"],
                            train_missing={"unguide": "unguide.py", "paper": "unguide.py:paper"}), EvaluateConfig)
    calls = []
    assert train_missing_edits(config, calls.append) == [str(tmp_path / "star")]
    (trained,) = calls  # the paper edit's folder holds a run: not trained again
    assert (trained["concept"], trained["run_dir"], trained["model"]) == ("shapes-star", str(tmp_path / "star"),
                                                                          "/models/mine")
    from unguide_jax.training.config import UnguideTrainConfig, train_schema

    trained = as_config(trained, train_schema)  # the preset lists what differs; the rest are the defaults
    assert trained == UnguideTrainConfig(concept="shapes-star", run_dir=str(tmp_path / "star"), model="/models/mine",
                                         overwrite=True)


def test_lora_seeds_train_each_seed_in_its_own_folder_and_report_the_spread(tmp_path):
    from unguide_jax.evaluation.config import EvaluateConfig
    from unguide_jax.evaluation.erasure import format_table, spread, train_missing_edits
    from unguide_jax.settings import ConfigError, as_config

    erasures = [{"concept": "shapes-star", "edits": {"unguide": [str(tmp_path / "star")]}}]
    config = as_config(dict(erasures=erasures, methods=["base", "adapter"], train_missing={"unguide": "unguide.py"},
                            lora_seeds=[0, 3]), EvaluateConfig)
    calls = []
    for seed in config.lora_seeds:
        train_missing_edits(config, calls.append, seed)
    # the train config's own seed (0) keeps the folder's name; another seed gets its own folder
    assert [(c["run_dir"], c["seed"]) for c in calls] == [(str(tmp_path / "star"), 0),
                                                          (str(tmp_path / "star-seed3"), 3)]
    # A closed-form eraser (UCE) draws nothing: one folder for every seed, trained without a seed.
    closed = as_config(dict(erasures=[{"concept": "shapes-star", "edits": {"uce": [str(tmp_path / "uce")]}}],
                            methods=[{"name": "UCE", "edit": "uce", "mode": "adapter"}],
                            train_missing={"uce": "uce.py"}, lora_seeds=[1]), EvaluateConfig)
    calls.clear()
    train_missing_edits(closed, calls.append, 1)
    assert [c["run_dir"] for c in calls] == [str(tmp_path / "uce")] and "seed" not in calls[0]
    with pytest.raises(ConfigError, match="lora_seeds.*repeats a seed"):
        as_config(dict(erasures=erasures, lora_seeds=[1, 1]), EvaluateConfig)
    with pytest.raises(ConfigError, match="lora_seeds.*train_missing does not"):  # an edit whose seed is fixed
        as_config(dict(erasures=erasures, methods=["base", "adapter"], lora_seeds=[0, 1]), EvaluateConfig)

    def summary(acc_e):
        metrics = dict(acc_e=acc_e, acc_s=0.9, acc_g=0.1, h_o=0.8)
        return {"LoRA only": {"mace": metrics, "reference": metrics, "top1": metrics, "mode": "adapter",
                              "paraphrase_leakage": acc_e}}

    mean, std = spread([summary(0.1), summary(0.3)])
    row = mean["LoRA only"]
    assert row["mace"]["acc_e"] == pytest.approx(0.2) and row["paraphrase_leakage"] == pytest.approx(0.2)
    assert std["LoRA only"]["mace"]["acc_e"] == pytest.approx(0.1414, abs=1e-4)  # ddof 1
    assert std["LoRA only"]["mace"]["acc_s"] == 0.0
    assert "| LoRA only | 20.0% ± 14.1% | 90.0% ± 0.0% |" in format_table(mean, "mace", std)
