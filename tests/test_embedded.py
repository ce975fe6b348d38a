"""The shipped shapes model and evaluator: they load (ours and diffusers), agree, and do their job."""
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from unguide_jax.diffusion.schedulers import SchedulerConfig
from unguide_jax.loading.diffusers_folder import (
    build_module,
    load_component,
    load_tokenizer,
    save_component,
)
from unguide_jax.loading.random_model import MERGES
from unguide_jax.loading.resolve import load_model
from unguide_jax.loading.tokenizer import write_clip_tokenizer
from unguide_jax.models.vae import AutoencoderKL
from unguide_jax.resources import EMBEDDED_MODEL, EVALUATOR, RECIPE_RECORD
from unguide_jax.shapes import data as shapes
from unguide_jax.shapes import pretrain
from unguide_jax.shapes.classifier import (
    evaluate_on_fresh_images,
    load_classifier,
    load_evaluator,
)
from unguide_jax.shapes.recipe import STAGES

# Only the BPE file inside the wheel is read: importing open_clip would need torchvision, which we do not install.
needs_open_clip_wheel = pytest.mark.skipif(importlib.util.find_spec("open_clip") is None,
                                           reason="pip install --no-deps open_clip_torch (the README test command does)")
# Seeds the recipe never used (its evaluator trained on 101 and was scored on 102).
FRESH_SEED = 90210

# Recipe stages trained from scratch: the recipe rebuilds the shipped model, which no user path does.
# Run them with --runslow before changing shapes/pretrain.py or shapes/recipe.py.
RECIPE_TRAINING = pytest.mark.slow


def recipe_preset(preset: str) -> dict:
    """A preset of configs/embedded.py with every key (the file lists only what differs from the defaults)."""
    from unguide_jax.presets import load_config_file
    from unguide_jax.settings import as_config, to_dict
    from unguide_jax.shapes.recipe_config import RecipeConfig

    path = Path(__file__).resolve().parent.parent / "configs" / "embedded.py"
    return to_dict(as_config(load_config_file(f"{path}:{preset}"), RecipeConfig))


@pytest.fixture(scope="module")
def embedded():
    return load_model("embedded")


@pytest.fixture(scope="module")
def evaluator():
    return load_evaluator()


@pytest.fixture(scope="module")
def gate_record():
    """The shipped model's quality-gate record (its figures, settings and per-prompt counts)."""
    return json.loads((RECIPE_RECORD / "quality.json").read_text())


def test_shipped_weights_are_small_and_the_model_is_fp32():
    from safetensors import safe_open

    model_files, evaluator_files = list(EMBEDDED_MODEL.rglob("*.safetensors")), list(EVALUATOR.rglob("*.safetensors"))
    assert len(model_files) == 3 and len(evaluator_files) == 1
    assert sum(f.stat().st_size for f in model_files + evaluator_files) <= 20 * 2**20
    # fp32 so that every library loads the model in one dtype (tests/test_shipped_model_torch.py); the
    # evaluator is ours alone.
    for files, dtype in ((model_files, "F32"), (evaluator_files, "F16")):
        for f in files:
            with safe_open(f, "np") as st:
                assert {st.get_slice(k).get_dtype() for k in st.keys()} == {dtype}, f
    assert json.loads((EMBEDDED_MODEL / "text_encoder" / "config.json").read_text())["torch_dtype"] == "float32"


def test_shipped_tokenizer_is_the_real_clip_tokenizer(embedded):
    ids = embedded.tokenize(["a photo of a cat"])[0]
    assert list(ids[:7]) == [49406, 320, 1125, 539, 320, 2368, 49407]  # open_clip's ids
    assert len(embedded.tokenizer) == 49408 and embedded.tokenizer.model_max_length == 77


@needs_open_clip_wheel
def test_clip_tokenizer_built_offline_from_open_clip(tmp_path, embedded):
    from unguide_jax.loading.tokenizer import open_clip_merges

    tokenizer = load_tokenizer(write_clip_tokenizer(tmp_path, open_clip_merges()))
    captions = ["a photo of the striped intersection mark", "An image of a DOTTED half-moon!", ""]
    assert tokenizer(captions).input_ids == embedded.tokenizer(captions).input_ids


def test_diffusers_loads_the_shipped_model_and_draws_the_same_image(embedded):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(EMBEDDED_MODEL), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a photo of the star", "a photo of the striped heart"]
    x_t = np.random.default_rng(0).standard_normal((2, *embedded.latent_shape(None, None)), dtype=np.float32)
    with torch.no_grad():
        expected = pipe(prompts, num_inference_steps=20, guidance_scale=7.5, output_type="np", eta=0.0,
                        latents=torch.from_numpy(x_t.transpose(0, 3, 1, 2).copy())).images
    got = embedded.generate(prompts, [0, 1], guidance_scale=7.5, num_steps=20, latents=x_t).images
    assert np.abs(got.astype(int) - np.round(expected * 255).astype(int)).max() <= 2


def test_evaluator_accuracy_on_fresh_procedural_images(evaluator):
    metrics = evaluate_on_fresh_images(evaluator, FRESH_SEED, 1000)
    assert metrics["class_accuracy"] >= 0.98, metrics
    assert metrics["style_accuracy"] >= 0.98, metrics


def test_evaluator_metrics_on_a_small_draw_name_only_the_classes_it_holds(evaluator):
    metrics = evaluate_on_fresh_images(evaluator, FRESH_SEED, 4)  # fewer images than classes
    assert 1 <= len(metrics["per_class_accuracy"]) <= 4, metrics
    json.dumps(metrics, allow_nan=False)  # what save_classifier writes must stay valid JSON


def test_evaluator_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_classifier(tmp_path)


def test_recipe_record_ships_with_the_model(gate_record):
    assert gate_record["settings"]["guidance_scale"] == 7.5 and gate_record["settings"]["num_steps"] == 50
    assert gate_record["settings"]["images_per_prompt"] >= 32
    recipe = json.loads((RECIPE_RECORD / "recipe.json").read_text())
    assert tuple(recipe["stages"]) == STAGES  # every stage, the decoder fine-tune included
    decoder = json.loads((EMBEDDED_MODEL / "training_metrics.json").read_text())["vae_decoder"]
    assert decoder["round_trip_after"]["class_accuracy"] > decoder["round_trip_before"]["class_accuracy"]


def test_quality_gate_counts_what_each_prompt_drew(embedded, evaluator):
    """The gate's record keeps, per prompt, how many images the evaluator put in each class; the accuracies
    and the confusion table are read from those counts. (2 steps: the images are noise, the bookkeeping is not.)"""
    from unguide_jax.shapes.quality import (
        format_quality_table,
        gate_prompts,
        run_quality_gate,
    )

    metrics, grid = run_quality_gate(embedded, evaluator, images_per_prompt=2, style_images_per_prompt=1, num_steps=2,
                                     guidance_scale=7.5, seed=0, batch_size=128)
    rows = metrics["per_prompt"]
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in gate_prompts()]
    for r in rows:
        assert len(r["predicted_class_counts"]) == len(shapes.CLASSES)
        assert sum(r["predicted_class_counts"]) == r["images"] == (1 if r["kind"] == "style" else 2)
        assert r["class_accuracy"] == r["predicted_class_counts"][r["label"]] / r["images"]
    table = format_quality_table(metrics)
    confusion = table[table.index("| prompted"):].splitlines()
    assert len(confusion) == 2 + len(shapes.CLASSES)
    assert confusion[2].startswith("| circle |") and confusion[2].count("|") == len(shapes.CLASSES) + 2
    size = 32 + 2  # an image and its padding
    assert grid.shape[:2] == (len(shapes.CLASSES) * size + 2, 2 * size + 2)  # a row of 2 images per class prompt


_GATE_SAMPLES = """
import json, sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from unguide_jax.loading.resolve import load_model
from unguide_jax.shapes.classifier import load_evaluator
r = json.loads(sys.argv[1])
images = load_model("embedded").generate(r["prompts"], r["seeds"], guidance_scale=r["guidance_scale"],
                                         num_steps=r["num_steps"], eta=r["eta"]).images
print(json.dumps(load_evaluator().predict(images)[0].tolist()))
"""


def test_shipped_model_draws_what_its_gate_record_says(gate_record):
    """Three of the gate's class prompts sampled again exactly as the gate sampled them (its seeds, CFG, steps
    and image count, 96 images): per prompt, the evaluator's counts match the shipped record within one image
    moved. So the recorded gate figures are the shipped model's own (weights that drew other images would
    move these counts too), and the gate test below can read them. Which three: the first, a middle and the
    last class, fixed, so the check is the same in every run (all ten: 320 images, 2 minutes more). In a
    process compiled with XLA's optimisations and default emitters: it runs 96 x 50 UNet steps (the sampling
    25 s there; the whole test 108 s in-process with the suite's compile settings)."""
    from tests.devices import run_script
    from unguide_jax.shapes.quality import gate_prompts

    settings = gate_record["settings"]
    n = settings["images_per_prompt"]
    class_prompts = [item for item in gate_prompts() if item["kind"] == "class"]
    class_prompts = [class_prompts[0], class_prompts[len(class_prompts) // 2], class_prompts[-1]]
    recorded = {r["prompt"]: r["predicted_class_counts"] for r in gate_record["per_prompt"] if r["kind"] == "class"}
    request = dict(prompts=[item["prompt"] for item in class_prompts for _ in range(n)],
                   seeds=[settings["seed"] + j for _ in class_prompts for j in range(n)],
                   **{k: settings[k] for k in ("guidance_scale", "num_steps", "eta")})
    predicted = np.asarray(run_script(_GATE_SAMPLES, 1, json.dumps(request), optimised=True))
    assert predicted.shape == (3 * n,)
    for k, item in enumerate(class_prompts):
        counts = np.bincount(predicted[k * n:(k + 1) * n], minlength=len(shapes.CLASSES))
        moved = np.abs(counts - np.asarray(recorded[item["prompt"]])).sum() // 2
        assert moved <= 1, (item["prompt"], counts.tolist(), recorded[item["prompt"]])


def test_shipped_model_passes_its_quality_gate(gate_record):
    """The quality gate, read from the shipped record (which the test above ties to the shipped weights):
    >= 90 % over the class prompts and >= 80 % over the synonym prompts, 32 images each, CFG 7.5, 50 DDIM steps.
    (The live test it replaces drew 16 images per class against an 87.5 % bar; a model at the phase-10 rates
    would have cleared that half of the time while 2.8 points under the gate.)"""
    # Its settings are checked by test_recipe_record_ships_with_the_model.
    assert gate_record["class_prompt_accuracy"] >= 0.90 and gate_record["synonym_prompt_accuracy"] >= 0.80


# --- the recipe's training stages, on tiny configs --------------------------------------------------

TINY_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
TINY_VAE = dict(block_out_channels=[8, 8], layers_per_block=1, latent_channels=4, norm_num_groups=4,
                steps=80, batch_size=4, learning_rate=2e-3, warmup=2, kl_weight=1e-6, data_seed=5)


def test_vae_stage_lowers_its_loss():
    _, _, metrics = pretrain.train_vae(TINY_VAE, 16, seed=0, log=lambda record: None)
    assert metrics["final_loss"] < 0.8 * metrics["first_loss"], metrics


@RECIPE_TRAINING
def test_a_training_loop_cut_off_midway_resumes_to_the_same_weights(tmp_path):
    """The VAE loop checkpoints every 2 steps; the last checkpoint of a 6-step run (after step 4), resumed, must end
    exactly where the uninterrupted run ended."""
    cfg = dict(TINY_VAE, steps=6)
    checkpoint = pretrain.LoopCheckpoint(tmp_path / "loop.safetensors", every=2)
    _, uninterrupted, _ = pretrain.train_vae(cfg, 16, seed=0, log=lambda record: None, checkpoint=checkpoint)
    logs = []
    _, resumed, _ = pretrain.train_vae(cfg, 16, seed=0, log=logs.append, checkpoint=checkpoint)
    assert {"stage": "vae", "resumed_at": 4} in logs
    jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted)
    with pytest.raises(ValueError, match="written by another configuration"):
        pretrain.train_vae(dict(cfg, block_out_channels=[8]), 16, seed=0, log=lambda r: None, checkpoint=checkpoint)


@RECIPE_TRAINING
def test_decoder_stage_keeps_the_encoder_and_lowers_its_loss():
    """The decoder fine-tune trains the decoder only: the encoder (and so every latent a UNet trains on)
    comes back bit-identical, while the reconstruction loss falls."""
    vae_cfg = pretrain.vae_config(TINY_VAE, 16)
    vae = AutoencoderKL(vae_cfg)
    params = jax.jit(vae.init)(jax.random.key(0), *vae.init_inputs())["params"]
    cfg = dict(steps=80, batch_size=8, learning_rate=5e-3, warmup=2, data_seed=6, layouts=["centred", "wide"])
    logs = []
    tuned, metrics = pretrain.train_decoder(cfg, vae, params, 16, seed=0, log=logs.append)
    # From a random encoder the latents say little, so the loss falls slowly (0.92 -> 0.76 in 80 steps).
    assert metrics["final_loss"] < 0.9 * metrics["first_loss"], metrics
    for part in pretrain.ENCODER_PARTS:
        jax.tree.map(np.testing.assert_array_equal, tuned[part], params[part])
    assert set(tuned) == set(params)
    assert not np.array_equal(tuned["decoder"]["conv_out"]["kernel"], params["decoder"]["conv_out"]["kernel"])
    assert {r["stage"] for r in logs} == {"vae_decoder"}
    with pytest.raises(ValueError, match=r"lack \['quant_conv'\]"):
        pretrain.train_decoder(cfg, vae, {k: v for k, v in params.items() if k != "quant_conv"}, 16, seed=0,
                               log=logs.append)


def test_round_trip_accuracy_scores_what_the_decoder_gives_back(embedded, evaluator):
    """The shipped VAE gives the evaluator back most shapes; one whose decoder outputs a constant gives back none."""
    images, _, labels, styles = shapes.batch(FRESH_SEED, 0, 200, 32, layout="centred")
    vae, params = embedded.vae, jax.tree.map(jnp.asarray, embedded.params["vae"])
    scores = pretrain.round_trip_accuracy(vae, params, evaluator, images, labels, styles, batch_size=64)
    assert scores["class_accuracy"] > 0.85, scores
    assert set(scores["per_style"]) == set(shapes.STYLES) and set(scores["per_class"]) == set(shapes.CLASSES)
    flat = jax.tree.map(jnp.zeros_like, params["decoder"]["conv_out"])
    blank = dict(params, decoder=dict(params["decoder"], conv_out=flat))
    assert pretrain.round_trip_accuracy(vae, blank, evaluator, images, labels, styles)["class_accuracy"] < 0.3


@RECIPE_TRAINING
def test_diffusion_stage_lowers_its_loss(tmp_path):
    vae_cfg = pretrain.vae_config(TINY_VAE, 16)
    vae = AutoencoderKL(vae_cfg)
    vae_params = jax.jit(vae.init)(jax.random.key(0), *vae.init_inputs())["params"]
    save_component(tmp_path / "vae", "vae", vae_cfg, vae_params)  # the stage's hand-over goes through disk
    vae, vae_params = load_component(tmp_path / "vae", "vae")
    images, captions, _, _ = shapes.batch(7, 0, 16, 16)
    mean, logvar = pretrain.encode_dataset(vae, vae_params, images)
    tokenizer = load_tokenizer(write_clip_tokenizer(tmp_path / "tokenizer", MERGES))
    data = pretrain.DiffusionData(mean, logvar, pretrain.tokenize_captions(tokenizer, captions),
                                  pretrain.tokenize_captions(tokenizer, [""])[0])
    text_cfg = pretrain.text_config(TINY_TEXT, len(tokenizer), tokenizer.model_max_length)
    text_encoder = build_module("text_encoder", text_cfg)
    text_params = text_encoder.init(jax.random.key(1), *text_encoder.init_inputs())["params"]
    unet_cfg = pretrain.unet_config(dict(block_out_channels=[16, 32], attention_heads=[2, 2], layers_per_block=1,
                                         norm_num_groups=8), mean.shape[1], mean.shape[-1], text_cfg.hidden_size)
    cfg = dict(steps=60, batch_size=8, learning_rate=2e-3, warmup=2, ema_decay=0.9, caption_dropout=0.1,
               loss_weighting="min_snr", min_snr_gamma=5.0)
    args = (unet_cfg, text_cfg, vae_cfg, SchedulerConfig(), data, text_params)
    *_, trained, metrics = pretrain.train_diffusion(cfg, *args, seed=0, log=lambda record: None)
    assert metrics["final_loss"] < 0.8 * metrics["first_loss"], metrics

    # A warm start begins from the given weights: with a zero learning rate they come back unchanged
    # (up to the EMA's rounding, d·w + (1 - d)·w).
    frozen = dict(cfg, steps=2, learning_rate=0.0)
    *_, same, _ = pretrain.train_diffusion(frozen, *args, seed=1, log=lambda record: None, init_params=trained)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), same, trained)
    other = jax.tree.map(lambda a: a[..., :1] if a.ndim == 4 else a, trained)
    with pytest.raises(ValueError, match="init_unet does not fit"):
        pretrain.train_diffusion(frozen, *args, seed=1, log=lambda record: None, init_params=other)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weighting_is_the_same_x0_weighting_for_every_target(prediction_type):
    """Min-SNR-γ weights the x0 error by min(SNR, γ) whatever the network predicts: an ε or v error,
    weighted, must equal min(SNR, γ) times the x0 error it implies."""
    from unguide_jax.diffusion.schedulers import (
        NoiseSchedule,
        add_noise,
        training_target,
    )

    config = SchedulerConfig(prediction_type=prediction_type)
    schedule = NoiseSchedule.from_config(config)
    t = jnp.array([1, 20, 100, 400, 999])
    x0, noise, err = (jax.random.normal(jax.random.key(i), (5, 4, 4, 2)) for i in range(3))
    target = training_target(config, schedule, x0, noise, t)
    prediction = target + 0.1 * err
    alpha = schedule.alphas_cumprod[t][:, None, None, None]
    xt = add_noise(schedule, x0, noise, t)
    implied_x0 = {"epsilon": (xt - jnp.sqrt(1 - alpha) * prediction) / jnp.sqrt(alpha),
                  "v_prediction": jnp.sqrt(alpha) * xt - jnp.sqrt(1 - alpha) * prediction,
                  "sample": prediction}[prediction_type]
    snr = alpha[:, 0, 0, 0] / (1 - alpha[:, 0, 0, 0])
    weights = pretrain.loss_weights("min_snr", 5.0, prediction_type, schedule, t)
    weighted = weights * jnp.mean((prediction - target) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(weighted, jnp.minimum(snr, 5.0) * jnp.mean((implied_x0 - x0) ** 2, axis=(1, 2, 3)),
                               rtol=2e-3)
    np.testing.assert_array_equal(pretrain.loss_weights("none", 5.0, prediction_type, schedule, t), 1.0)
    with pytest.raises(ValueError, match="unknown loss_weighting 'snr'"):
        pretrain.loss_weights("snr", 5.0, prediction_type, schedule, t)


@RECIPE_TRAINING
def test_text_encoder_stage_learns_class_and_style_from_captions(tmp_path):
    captions, labels, styles = pretrain.all_captions()
    assert len(set(captions)) == len(captions) == 10 * 4 * 5 * len(shapes.TEMPLATES)
    assert captions[labels.tolist().index(shapes.CLASSES.index("ring"))].endswith("ring")
    tokenizer = load_tokenizer(write_clip_tokenizer(tmp_path / "tokenizer", MERGES))
    text_cfg = pretrain.text_config(TINY_TEXT, len(tokenizer), tokenizer.model_max_length)
    cfg = dict(TINY_TEXT, steps=150, batch_size=64, learning_rate=1e-2, warmup=5)
    _, metrics = pretrain.train_text_encoder(cfg, text_cfg, tokenizer, seed=0, log=lambda record: None)
    assert metrics["final_loss"] < 0.5 * metrics["first_loss"], metrics
    assert metrics["class_accuracy_at_eos"] > 0.3, metrics  # chance: 0.1


def test_recipe_reuses_a_finished_stage_only_with_the_same_settings(tmp_path):
    from unguide_jax.shapes.recipe import run_recipe

    config = recipe_preset("tiny")
    config.update(work_dir=str(tmp_path), stages=["vae"])
    (tmp_path / "vae").mkdir()
    (tmp_path / "recipe.json").write_text(json.dumps(dict(config, vae=dict(config["vae"], steps=99))))
    with pytest.raises(ValueError, match=r"vae was made with other settings of \['vae'\]"):
        run_recipe(config)
    with pytest.raises(ValueError, match="unknown recipe stages"):
        run_recipe(dict(config, stages=["vea"]))
    bad_weights = dict(config, work_dir=str(tmp_path / "bad"), diffusion=dict(config["diffusion"], class_weights={"hexagon": 2}))
    with pytest.raises(ValueError, match="unknown classes"):
        run_recipe(bad_weights)
    assert not (tmp_path / "bad").exists()  # failed before any stage, or even the work dir


@needs_open_clip_wheel
def test_recipe_copies_a_stage_from_another_run_only_when_made_with_the_same_settings(tmp_path):
    from unguide_jax.shapes.recipe import run_recipe

    config = recipe_preset("tiny")
    source = tmp_path / "source"
    run_recipe(dict(config, work_dir=str(source), stages=["tokenizer"]))
    (source / "tokenizer" / "marker").write_text("made by the source run")

    same = run_recipe(dict(config, work_dir=str(tmp_path / "same"), stages=["tokenizer"], reuse_from=str(source)))
    assert (same / "tokenizer" / "marker").is_file()
    assert '"reused_from"' in (same / "metrics.jsonl").read_text()

    other_settings = dict(config, tokenizer=dict(config["tokenizer"], max_length=32))
    other = run_recipe(dict(other_settings, work_dir=str(tmp_path / "other"), stages=["tokenizer"],
                            reuse_from=str(source)))
    assert not (other / "tokenizer" / "marker").exists()  # made afresh
    assert load_tokenizer(other / "tokenizer").model_max_length == 32
    with pytest.raises(FileNotFoundError, match="is not a recipe run"):
        run_recipe(dict(config, work_dir=str(tmp_path / "x"), stages=["tokenizer"], reuse_from=str(tmp_path / "none")))


def test_shipped_model_unpacks_into_a_run_that_the_next_phase_reuses(tmp_path):
    from unguide_jax.shapes.recipe import (
        EVALUATOR_DIR,
        MODEL_DIR,
        run_recipe,
        unpack_shipped,
    )

    unpacked = unpack_shipped(tmp_path / "shipped")
    _, unet_params = load_component(unpacked / MODEL_DIR / "unet", "unet")
    _, shipped_unet = load_component(EMBEDDED_MODEL / "unet", "unet")
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), unet_params, shipped_unet)))
    with pytest.raises(FileExistsError, match="holds a recipe run already"):
        unpack_shipped(unpacked)

    # The early stages of the shipped model are what the recipe's settings make: a next phase copies them.
    config = recipe_preset("default")
    early = ["tokenizer", "evaluator", "vae", "text_encoder"]
    if (unpacked / "vae_decoder").is_dir():  # made with the decoder stage, at the settings of the phase that ran it
        config = recipe_preset("ninth")
        early.insert(3, "vae_decoder")
    work = run_recipe(dict(config, work_dir=str(tmp_path / "next"), stages=early, reuse_from=str(unpacked)))
    reused = [json.loads(line)["stage"] for line in (work / "metrics.jsonl").read_text().splitlines()
              if "reused_from" in line]
    assert reused == early
    assert (work / EVALUATOR_DIR / "model.safetensors").is_file() and (work / "vae" / "metrics.json").is_file()


@RECIPE_TRAINING
@needs_open_clip_wheel
def test_recipe_ships_the_tuned_decoder_with_the_vae_stage_encoder(tmp_path):
    from unguide_jax.shapes.recipe import MODEL_DIR, run_recipe

    config = recipe_preset("tiny")
    stages = ["tokenizer", "evaluator", "vae", "vae_decoder", "text_encoder", "diffusion"]
    work = run_recipe(dict(config, work_dir=str(tmp_path), stages=stages))
    as_shipped = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float16), tree)  # noqa: E731
    shipped = as_shipped(load_component(work / MODEL_DIR / "vae", "vae")[1])
    stage_vae, tuned = (as_shipped(load_component(work / name, "vae")[1]) for name in ("vae", "vae_decoder"))
    jax.tree.map(np.testing.assert_array_equal, shipped, tuned)
    jax.tree.map(np.testing.assert_array_equal, shipped["encoder"], stage_vae["encoder"])
    assert not np.array_equal(shipped["decoder"]["conv_out"]["kernel"], stage_vae["decoder"]["conv_out"]["kernel"])
    decoder_metrics = json.loads((work / MODEL_DIR / "training_metrics.json").read_text())["vae_decoder"]
    assert set(decoder_metrics["round_trip_after"]) == {"class_accuracy", "per_style", "per_class"}
    from safetensors import safe_open

    for f in (work / MODEL_DIR).rglob("*.safetensors"):  # what publish ships: fp32, one dtype for every library
        with safe_open(f, "np") as st:
            assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"F32"}, f


def test_diffusion_and_gate_depend_on_the_decoder_settings_only_when_the_recipe_tunes_it():
    from unguide_jax.shapes.recipe import _changed_settings

    config = recipe_preset("tiny")
    other_decoder = dict(config, vae_decoder=dict(config["vae_decoder"], steps=7))
    made_before_the_stage = {k: v for k, v in config.items() if k != "vae_decoder"}
    for stage in ("diffusion", "quality"):
        assert _changed_settings(stage, config, other_decoder) == []  # the stage is not run: its settings do not matter
        assert _changed_settings(stage, made_before_the_stage, config) == []
        tuned = dict(config, stages=[*config["stages"], "vae_decoder"])
        assert _changed_settings(stage, config, tuned) == ["vae_decoder"]
        assert _changed_settings(stage, tuned, dict(other_decoder, stages=tuned["stages"])) == ["vae_decoder"]
    assert _changed_settings("vae_decoder", config, other_decoder) == ["vae_decoder"]
    assert _changed_settings("text_encoder", config, other_decoder) == []


def test_blur_augmentation_keeps_sigma_zero_images_and_mean_colour():
    from unguide_jax.shapes.classifier import blur_matrices

    ops = np.asarray(blur_matrices(jax.numpy.asarray([0.0, 1.2]), 16))
    np.testing.assert_allclose(ops[0], np.eye(16), atol=1e-6)
    np.testing.assert_allclose(ops[1].sum(-1), 1.0, atol=1e-5)
    assert ops[1][8, 8] < 0.5 and ops[1][8, 7] > 0.1
