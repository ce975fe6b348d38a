"""The paper's protocols as presets (``evaluate.py:sd14-table1``, ``evaluate.py:sd14-i2p``), their dry run, and a
rerun that redoes nothing: end to end on a tiny random SD 1.x model and a tiny random CLIP (plumbing: random
models draw noise), counts made small by overrides."""
import json
from pathlib import Path

import pytest

from tests.test_clip_evaluation import tiny_clip  # noqa: F401  (the fixture)
from tests.test_i2p import write_i2p_csv

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parent.parent
CLASSES = ("cat", "dog")


def _overrides(tmp_path: Path, folder, clip_folder) -> list[str]:
    """sd14-table1 on two classes, one image per prompt, two steps, a small probe; the LoRAs trained with the
    paper's settings (unguide.py:sd15-object) for one iteration."""
    (tmp_path / "fast.py").write_text(
        "from unguide_jax.presets import load_config_file\n\n\n"
        "def get_config(preset='default'):\n"
        "    return dict(load_config_file('unguide.py:sd15-object'), iterations=1, objective=dict(ddim_steps=4))\n")
    erasures = [{"concept": c, "edits": {"unguide": [str(tmp_path / f"lora-{c}")]}} for c in CLASSES]
    return ["--config", f"{REPO}/configs/evaluate.py:sd14-table1", f"--config.model={folder}",
            f"--config.evaluator=clip:{clip_folder}", f"--config.erasures={json.dumps(erasures)}",
            f"--config.train_missing={json.dumps({'unguide': str(tmp_path / 'fast.py')})}",
            f"--config.out_dir={tmp_path / 'eval'}", "--config.images_per_prompt=1", "--config.num_steps=2",
            "--config.batch_size=13", "--config.probe.draws=2", "--config.probe.ddim_steps=10",
            "--config.probe.t_enc=7"]


def test_the_presets_say_what_to_pass_before_anything_loads(capsys):
    import sample

    assert sample.main(["--config", "evaluate.py:sd14-table1", "--help"]) == 0
    assert "--dry-run" in capsys.readouterr().out
    assert sample.main(["--config", "evaluate.py:sd14-table1", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: config.model and config.evaluator are empty: pass --config.model=")
    assert "--config.evaluator=clip:SOURCE" in err
    assert sample.main(["--config", "evaluate.py:sd14-table1", "--config.model=embedded",
                        "--config.evaluator=embedded"]) == 2
    err = capsys.readouterr().err.strip()
    assert "config.model=embedded and config.evaluator=embedded know only the shapes model's" in err
    assert sample.main(["--config", "evaluate.py:sd14-i2p", "--config.csv=x.csv"]) == 2
    assert "config.model is empty: pass --config.model=" in capsys.readouterr().err
    assert sample.main(["--config", "sample.py", "--dry-run"]) == 2
    assert "--dry-run plans the evaluation jobs" in capsys.readouterr().err


def test_sd14_table1_plans_runs_to_the_table_and_reruns_nothing(tiny_pipeline_dir, tiny_clip, tmp_path,  # noqa: F811
                                                                capsys, monkeypatch):
    import sample

    from unguide_jax import jobs
    from unguide_jax.cli.config import parse_cli
    from unguide_jax.cli.sample import sample_or_evaluate
    from unguide_jax.evaluation import erasure
    from unguide_jax.evaluation.evaluators import ClipEvaluator

    folder, _ = tiny_pipeline_dir("sd1")
    args = _overrides(tmp_path, folder, tiny_clip[0])
    calls = {"generate": 0, "score": 0}
    generate, scores = erasure.generate_images, ClipEvaluator.scores

    def counted_generate(*a, **k):
        calls["generate"] += 1
        return generate(*a, **k)

    def counted_scores(self, images, prompt_set):
        calls["score"] += len(images)
        return scores(self, images, prompt_set)

    monkeypatch.setattr(erasure, "generate_images", counted_generate)
    monkeypatch.setattr(ClipEvaluator, "scores", counted_scores)

    # The dry run: the plan, and nothing generated, scored or trained.
    assert sample.main(args + ["--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "Dry run of the evaluate job" in plan and "Trained first (2 run(s)" in plan
    # cat's and dog's 13 prompts share the ten class prompts: the base model draws 16 images, reuses 10
    assert "| base model | 16 | 10 |" in plan
    assert "Estimated wall time here:" in plan and "ms per row" in plan
    assert calls == {"generate": 0, "score": 0}
    assert not (tmp_path / "lora-cat").exists() and not (tmp_path / "eval" / "cache" / "images").exists()
    planned = jobs.plan(parse_cli(args, "sample.py", sample_or_evaluate), measure=False)

    # The run: trains both LoRAs, then the table.
    assert sample.main(args) == 0
    assert "| UnGuide (the paper's rule) |" in capsys.readouterr().out
    first = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert first["settings"]["trained_first"] == [str(tmp_path / f"lora-{c}") for c in CLASSES]
    work = first["settings"]["work"]
    assert work["images_generated"] > 0 and calls["generate"] > 0
    assert work["scores_computed"] == calls["score"] > 0 and work["probes_run"] == 4  # 2 rules × 2 classes
    assert [c["concept"] for c in first["concepts"]] == list(CLASSES)
    # The plan's arithmetic against the run's own counts: the probes' UNet rows exactly (WProbe counts them), the
    # images as an upper bound (before its probe runs, an unguide row's w, hence its reuse, is unknown).
    for stage in planned.stages:
        assert stage.probe_rows == sum(c["methods"][stage.name].get("probe_unet_rows", 0) for c in first["concepts"])
    assert sum(s.images for s in planned.stages) >= work["images_generated"]

    # The rerun: every image, score and probe comes from out_dir/cache.
    calls.update(generate=0, score=0)
    assert sample.main(args) == 0
    assert "This run generated 0 images" in capsys.readouterr().out
    again = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert calls == {"generate": 0, "score": 0}
    assert again["settings"]["work"]["images_generated"] == 0 and again["settings"]["work"]["scores_computed"] == 0
    assert again["settings"]["work"]["probes_run"] == 0 and again["settings"]["trained_first"] == []
    assert again["average"] == first["average"]
    # The dry run now finds everything.
    assert sample.main(args + ["--dry-run"]) == 0
    assert "| base model | 0 | 26 |" in capsys.readouterr().out


def test_sd14_i2p_dry_run_counts_the_rows_and_the_lora_to_train(tiny_pipeline_dir, tmp_path, capsys):
    import sample

    folder, _ = tiny_pipeline_dir("sd1")
    csv = write_i2p_csv(tmp_path / "i2p.csv", [("the cat", 0.0, 11, 7, 512, 512), ("a photo of the cat", 30.0, 12, 12,
                                                                                    512, 512),
                                                ("a cat", 10.0, 13, 7, 512, 512)])
    lora = tmp_path / "nudity"
    assert sample.main(["--config", f"{REPO}/configs/evaluate.py:sd14-i2p", f"--config.model={folder}",
                        f"--config.csv={csv}", f"--config.edits={json.dumps({'unguide': [str(lora)]})}",
                        f"--config.out_dir={tmp_path / 'i2p'}", "--config.num_steps=2", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "2 I2P rows of i2p.csv with nudity_percentage > 0" in plan  # the paper's subset
    assert "| base model | 2 | 0 |" in plan and "unguide: unguide.py:sd15-nudity, 200 iterations" in plan
    assert not lora.exists() and not (tmp_path / "i2p").exists()


def test_the_protocols_on_hand_made_clip_embeddings():
    """From CLIP's cosines to the table on a CIFAR-10 concept: MACE (metrics/evaluate_clip_accuracy.py:34-57)
    takes softmax(100 · cos) over the ten class texts and averages the prompt's class probability over its
    images, synonyms against the erased class; the UnGuide authors (compute_metrics.py:150-173,
    merge_metrics_results.py) take it over the 13 prompt texts and credit each image with its own text."""
    import numpy as np

    from unguide_jax.erasers.concepts import load_concept
    from unguide_jax.evaluation.erasure import score
    from unguide_jax.evaluation.evaluators import ClipEvaluator, clip_prompt_set

    ps = clip_prompt_set(load_concept("cat"))
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    by_text = dict(zip(ps.prompts, unit(rng.standard_normal((13, 8)))))
    evaluator = ClipEvaluator.__new__(ClipEvaluator)  # no weights: the embeddings are given
    evaluator.text_embeddings = lambda texts: np.stack([by_text[t] for t in texts])
    images = unit(rng.standard_normal((26, 8)))
    owners = np.repeat(np.arange(13), 2)

    def softmax(logits):
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    class_texts = np.stack([by_text[t] for t in ps.class_names])
    class_probs, text_probs = evaluator._softmax(images, ps.class_names), evaluator._softmax(images, ps.prompts)
    np.testing.assert_allclose(class_probs, softmax(100 * images @ class_texts.T), rtol=1e-12)
    np.testing.assert_allclose(text_probs, softmax(100 * images @ np.stack(list(by_text.values())).T), rtol=1e-12)
    got = score(ps, class_probs, owners, text_probs)
    own_class = [0, 0, 0, 0] + list(range(1, 10))  # target and synonyms: the erased class; other i: class i
    mace = [class_probs[owners == i, own_class[i]].mean() for i in range(13)]
    reference = [text_probs[owners == i, i].mean() for i in range(13)]
    for protocol, per_prompt in (("mace", mace), ("reference", reference)):
        assert got[protocol]["acc_e"] == pytest.approx(per_prompt[0])
        assert got[protocol]["acc_g"] == pytest.approx(np.mean(per_prompt[1:4]))
        assert got[protocol]["acc_s"] == pytest.approx(np.mean(per_prompt[4:]))
