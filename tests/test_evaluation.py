"""The erasure evaluation's scoring (spec unguide.md §6), by hand-made classifier outputs."""
import numpy as np
import pytest

from unguide_jax.erasers.concepts import load_concept
from unguide_jax.evaluation.erasure import PromptSet, harmonic_overall, score


def test_prompt_set_of_a_shipped_concept():
    ps = PromptSet.from_concept(load_concept("shapes-circle"))
    assert ps.erased == 0 and len(ps.items) == 13  # target, 3 synonyms, 9 other classes ("" left to the probe)
    assert [k for _, k, _ in ps.items].count("synonym") == 3
    assert sorted(c for _, k, c in ps.items if k == "other") == list(range(1, 10))
    with pytest.raises(ValueError, match="object concepts of the shapes model"):
        PromptSet.from_concept(load_concept("cat"))


def test_scores_under_both_protocols():
    ps = PromptSet(erased=0, items=(("t", "target", 0), ("s1", "synonym", 0), ("s2", "synonym", 0),
                                    ("o1", "other", 1), ("o2", "other", 2)))
    owners = np.repeat(np.arange(5), 2)
    p = np.full((10, 3), 0.1)
    hit = lambda c, strength=0.8: np.eye(3)[c] * (strength - 0.1) + 0.1  # noqa: E731
    p[0], p[1] = hit(0), hit(1)          # target: one image still the erased class
    p[2], p[3] = hit(2), hit(2)          # synonym 1: erased
    p[4], p[5] = hit(0), hit(0)          # synonym 2: leaks
    p[6], p[7] = hit(1), hit(1)          # other 1: kept
    p[8], p[9] = hit(2), hit(0)          # other 2: one image turned into the erased class
    got = score(ps, p, owners)
    mace = got["mace"]
    assert (mace["acc_e"], mace["acc_g"], mace["acc_s"]) == (0.5, 0.5, 0.75)
    assert mace["h_o"] == pytest.approx(3 / (2 + 1 / 0.75 + 2))
    # reference: texts per class (3, 1, 1): an image's score is its class's share of 3 p_0 + p_1 + p_2.
    ref = got["reference"]
    share = lambda probs, c: (probs * [3, 1, 1])[c] / (probs * [3, 1, 1]).sum()  # noqa: E731
    assert ref["acc_e"] == pytest.approx((share(p[0], 0) + share(p[1], 0)) / 2)
    assert ref["acc_s"] == pytest.approx(np.mean([share(p[6], 1), share(p[7], 1), share(p[8], 2), share(p[9], 2)]))
    assert ref["per_prompt"]["s2"] == pytest.approx(share(p[4], 0))


def test_harmonic_overall_is_zero_when_a_term_is():
    assert harmonic_overall(1.0, 0.9, 0.1) == 0.0
    assert harmonic_overall(0.0, 1.0, 0.0) == pytest.approx(1.0)


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


def test_shipped_shapes_concepts_carry_anchors_and_paraphrases():
    from unguide_jax.shapes.data import CLASSES, class_named_in

    for cls in CLASSES:
        concept = load_concept(f"shapes-{cls}")
        assert len(concept.forget_anchors) == 5 and len(concept.retain_anchors) == 45
        assert all(class_named_in(p) == CLASSES.index(cls) for p in concept.forget_anchors)
        assert len(concept.paraphrases) == 3
        for prompt in concept.paraphrases:  # never the class name nor a synonym of any class
            assert class_named_in(prompt) is None, prompt


def test_evaluation_command_end_to_end_on_a_tiny_model(tiny_pipeline_dir, tmp_path, capsys):
    """Plumbing only (a random tiny model draws noise): every method row, both protocols, paraphrases, attack."""
    import json
    from pathlib import Path

    import sample
    import train

    repo = Path(__file__).resolve().parent.parent
    folder, _ = tiny_pipeline_dir("sd1")
    lora_run = tmp_path / "lora"
    assert train.main(["--config", f"{repo}/configs/unguide.py:tiny", f"--config.model={folder}",
                       f"--config.run_dir={lora_run}", "--config.iterations=1"]) == 0
    # UnGuidance over the other erasers' edits: tests/test_erasers_cli.py.
    erasures = [{"concept": "shapes-circle", "edits": {"unguide": [str(lora_run)]}}]
    methods = [{"name": "base model", "mode": "base"}, {"name": "LoRA only", "edit": "unguide", "mode": "adapter"},
               {"name": "UnGuide", "edit": "unguide", "mode": "unguide"}]
    out = tmp_path / "eval"
    assert sample.main(["--config", f"{repo}/configs/evaluate.py:tiny", f"--config.model={folder}",
                        f"--config.erasures={json.dumps(erasures)}", f"--config.methods={json.dumps(methods)}",
                        "--config.paraphrases=true", "--config.attack.enabled=true", "--config.attack.images=2",
                        "--config.attack.settings.iterations=2", f"--config.out_dir={out}",
                        # One compiled sampler and one compiled probe serve the prompts, the paraphrases and "":
                        # 2 rows a call, 1 prompt a probe call.
                        "--config.batch_size=2", "--config.probe.prompt_chunk=1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["average"]) == [m["name"] for m in methods]
    circle = results["concepts"][0]
    assert circle["erased_class"] == "circle" and len(circle["paraphrases"]) == 3
    for name, row in circle["methods"].items():
        for protocol in ("mace", "reference"):
            assert set(row[protocol]) >= {"acc_e", "acc_s", "acc_g", "h_o", "per_prompt"}
            assert len(row[protocol]["per_prompt"]) == 13
        assert 0 <= row["paraphrase_leakage"] <= 1
        assert ("attack" in row) == (name != "base model")
    assert set(circle["methods"]["UnGuide"]["probe"]) == set(p for p, _, _ in circle["prompts"]) | set(circle["paraphrases"])
    assert len(circle["methods"]["UnGuide"]["attack"]["prompts"]) == 2
    table = capsys.readouterr().out
    assert "| UnGuide |" in table and "attack: before → after" in table
    assert len(list((out / "shapes-circle" / "unguide").glob("*.png"))) == 16 * 2
