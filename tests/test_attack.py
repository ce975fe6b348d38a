"""The prefix attack (unguide_jax/evaluation/attack.py) on the tiny random SD1 model with a random LoRA: the batched
attack against one ``run_attack`` per image, on 8 CPU devices against one (a subprocess: XLA_FLAGS must be set
before jax is imported), and the UnGuide pipeline target's limits (w fixed at 0: the edit; at 1: the base model),
its smooth w and its gradients."""
import inspect
import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.devices import ALL_CPU_DEVICES, run_script
from unguide_jax.edits.edit import Edit
from unguide_jax.erasers.unguide.probe import ProbeConfig
from unguide_jax.evaluation.attack import (
    AttackConfig,
    PipelineTarget,
    attack_loss,
    attacked_context,
    pipeline_inputs,
    prefix_attack,
    prefixed_ids,
    run_attack,
    smooth_w,
    token_table,
)

PROMPT = "a photo of the cat"
SEEDS = [3, 11, 4]
CONFIG = AttackConfig(prefix_tokens=2, iterations=3, seed=5)
# A short probe trajectory (corrected mode: 10 − 1 − 8 = 1 CFG step): the test is about the loss, not the probe.
PROBE = ProbeConfig(draws=4, ddim_steps=10, t_enc=8, rule="paper")


def make_edit(sd):
    """A LoRA on the cross-attention K/V with B random, so that the edit changes the model."""
    from unguide_jax.edits.edit import lora_edit
    from unguide_jax.edits.lora import LoraConfig, init_lora

    adapter = init_lora(jax.random.key(0), sd.params["unet"], LoraConfig(rank=2, targets="object", init="random"))
    adapter = {path: dict(ab, lora_B=0.05 * jax.random.normal(jax.random.fold_in(jax.random.key(1), i),
                                                               ab["lora_B"].shape))
               for i, (path, ab) in enumerate(sorted(adapter.items()))}
    return lora_edit(adapter, 8.0)


def make_targets(sd, n):
    return np.random.default_rng(7).standard_normal((n, *sd.latent_shape(None, None))).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_sd(tiny_pipeline_dir):
    from unguide_jax.loading.diffusers_folder import load_pipeline

    folder, _ = tiny_pipeline_dir("sd1")
    return load_pipeline(folder)


@pytest.fixture(scope="module")
def edit(tiny_sd):
    return make_edit(tiny_sd)


@pytest.fixture(scope="module")
def batched(tiny_sd, edit):
    return prefix_attack(tiny_sd, edit, CONFIG, PROMPT, make_targets(tiny_sd, len(SEEDS)), SEEDS)


def test_batched_attack_equals_one_run_attack_per_image(tiny_sd, edit, batched):
    sd = tiny_sd
    x0 = make_targets(sd, len(SEEDS))
    ids = jnp.asarray(prefixed_ids(sd, PROMPT, CONFIG.prefix_tokens))
    assert batched.ids.shape == (3, len(ids)) and batched.losses.shape == (3, CONFIG.iterations)
    assert batched.contexts.shape[:2] == (3, len(ids)) and batched.settings["target"] is None
    for j, seed in enumerate(SEEDS):
        adv_ids, prefix, losses = run_attack(sd.unet, sd.text_encoder, sd.scheduler, CONFIG, sd.params["unet"],
                                             sd.params["text_encoder"], edit, ids, jnp.asarray(x0[j:j + 1]),
                                             jax.random.key(CONFIG.seed + seed))
        np.testing.assert_array_equal(batched.ids[j], np.asarray(adv_ids))
        np.testing.assert_allclose(batched.losses[j], np.asarray(losses), atol=1e-5, rtol=0)
        np.testing.assert_allclose(batched.contexts[j], np.asarray(attacked_context(sd, adv_ids, prefix, CONFIG)[0]),
                                   atol=1e-5, rtol=0)
        special = set(sd.tokenizer.all_special_ids)
        assert batched.texts[j] == sd.tokenizer.decode([int(i) for i in adv_ids if int(i) not in special])
    # The prefix is what the attack changed: the prompt's own tokens stay.
    kept = np.asarray(ids)[CONFIG.prefix_tokens + 1:]
    np.testing.assert_array_equal(batched.ids[:, CONFIG.prefix_tokens + 1:], np.broadcast_to(kept, (3, len(kept))))
    assert np.isfinite(batched.losses).all()


_EIGHT_DEVICE_RUN = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from unguide_jax.loading.diffusers_folder import load_pipeline
    from unguide_jax.parallel.batches import data_mesh
    from unguide_jax.evaluation.attack import AttackConfig, prefix_attack

    assert len(jax.devices()) == 8, jax.devices()
""") + inspect.getsource(make_edit) + inspect.getsource(make_targets) + textwrap.dedent("""
    sd = load_pipeline(sys.argv[1]).on_mesh(data_mesh())
    config = AttackConfig(**json.loads(sys.argv[2]))
    seeds = json.loads(sys.argv[4])
    result = prefix_attack(sd, make_edit(sd), config, sys.argv[3], make_targets(sd, len(seeds)), seeds)
    print(json.dumps(dict(data=sd.data_size, ids=result.ids.tolist(), losses=result.losses.tolist(),
                          contexts=result.contexts.tolist(), texts=result.texts)))
""")


def test_eight_devices_equal_one(tiny_pipeline_dir, batched):
    """3 images padded to 8 rows, one per device."""
    import dataclasses

    folder, _ = tiny_pipeline_dir("sd1")
    run = run_script(_EIGHT_DEVICE_RUN, 8, str(folder), json.dumps(dataclasses.asdict(CONFIG)), PROMPT,
                     json.dumps(SEEDS), extra_env=ALL_CPU_DEVICES)
    assert run["data"] == 8
    np.testing.assert_array_equal(np.asarray(run["ids"]), batched.ids)
    np.testing.assert_allclose(np.asarray(run["losses"]), batched.losses, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(run["contexts"]), batched.contexts, atol=1e-5, rtol=0)
    assert run["texts"] == batched.texts


# --- the pipeline target --------------------------------------------------------------------------------------


def test_smooth_w_steps_from_w_keep_to_w_erase_at_the_bar():
    bar, w_erase, w_keep = 1.0, -1.0, 2.0
    d = jnp.asarray([0.0, 0.5, 1.0, 1.5, 10.0])
    w = np.asarray(smooth_w(d, bar, w_erase, w_keep, 0.05))
    np.testing.assert_allclose(w[[0, -1]], [w_keep, w_erase], atol=1e-6)  # D ≪ bar, D ≫ bar
    assert w[2] == pytest.approx((w_erase + w_keep) / 2)  # at the bar: halfway
    assert np.all(np.diff(w) < 0)  # monotone from w_keep down to w_erase
    # A narrower sigmoid is closer to the probe's step a bar's tenth away from it.
    narrow, wide = (float(smooth_w(1.1, bar, w_erase, w_keep, temperature)) for temperature in (0.01, 0.1))
    assert abs(narrow - w_erase) < abs(wide - w_erase)


def _target(w_erase, w_keep, bar=1.0, draws=2):
    return PipelineTarget(bar=bar, w_erase=w_erase, w_keep=w_keep, probe=PROBE, draws=draws)


def _loss_fn(sd):
    """The attack's loss at a given prefix and draw, jitted: (edit, pipeline inputs or None, prefix, t, ε, x0)."""
    ids = jnp.asarray(prefixed_ids(sd, PROMPT, CONFIG.prefix_tokens))

    def loss(edit, pipeline, prefix, t, noise, x0):
        return attack_loss(sd.unet, sd.text_encoder, sd.scheduler, CONFIG, sd.params["unet"],
                           sd.params["text_encoder"], edit, ids, x0, prefix, t, noise, pipeline)

    return loss


@pytest.fixture(scope="module")
def draw(tiny_sd):
    """One (prefix, t, ε, x0) the loss is compared on."""
    table = token_table(tiny_sd.params["text_encoder"])
    x0 = jnp.asarray(make_targets(tiny_sd, 1))
    noise = jax.random.normal(jax.random.key(2), x0.shape)
    return table[jnp.asarray([5, 40])] + 0.01, jnp.asarray([400]), noise, x0


def test_pipeline_loss_with_w_fixed_at_0_is_the_edits_and_at_1_the_base_models(tiny_sd, edit, draw):
    loss = jax.jit(_loss_fn(tiny_sd))
    shape = tiny_sd.latent_shape(None, None)
    plain = float(loss(edit, None, *draw))
    base = float(loss(Edit(), None, *draw))
    assert abs(plain - base) > 1e-4  # the edit matters here
    # w_erase = w_keep: w is that constant whatever D̂, so ε_w is the edit's (w = 0) or the base model's (w = 1).
    w0 = float(loss(edit, pipeline_inputs(tiny_sd, _target(0.0, 0.0), shape), *draw))
    w1 = float(loss(edit, pipeline_inputs(tiny_sd, _target(1.0, 1.0), shape), *draw))
    assert w0 == pytest.approx(plain, rel=1e-5) and w1 == pytest.approx(base, rel=1e-5)
    # A constant w skips the probe; through the probe (the smooth step between equal values) the loss is the same.
    probed = pipeline_inputs(tiny_sd, _target(1.0, 1.0), shape)
    assert probed.constant_w
    assert float(loss(edit, probed.replace(constant_w=False), *draw)) == pytest.approx(w1, rel=1e-5)


def test_pipeline_gradients_are_finite_and_reach_the_prefix_through_the_probe(tiny_sd, edit, draw):
    prefix, t, noise, x0 = draw
    shape = tiny_sd.latent_shape(None, None)
    loss = _loss_fn(tiny_sd)
    grad = jax.jit(jax.grad(lambda p, pipeline: loss(edit, pipeline, p, t, noise, x0)))
    mixed = np.asarray(grad(prefix, pipeline_inputs(tiny_sd, _target(-1.0, 2.0), shape)))
    assert np.isfinite(mixed).all() and np.abs(mixed).max() > 0
    # With the edit's own ε (w ≡ 0) the probe's term is gone: the gradient differs once w depends on D̂.
    flat = np.asarray(grad(prefix, pipeline_inputs(tiny_sd, _target(0.0, 0.0), shape)))
    assert np.isfinite(flat).all() and np.abs(mixed - flat).max() > 0


def test_prefix_attack_on_the_pipeline(tiny_sd, edit, batched):
    """One image (each image's attack is its own: the first of ``batched``) and one probe draw, for time."""
    sd = tiny_sd
    x0 = make_targets(sd, len(SEEDS))[:1]
    # w ≡ 0: the same attack as on the edit alone.
    same = prefix_attack(sd, edit, CONFIG, PROMPT, x0, SEEDS[:1], target=_target(0.0, 0.0, draws=1))
    np.testing.assert_array_equal(same.ids, batched.ids[:1])
    np.testing.assert_allclose(same.losses, batched.losses[:1], rtol=1e-4)
    assert same.settings["target"]["w_erase"] == 0.0 and same.settings["target"]["guidance_scale"] == 7.5
    # The paper's w values: the loss is UnGuidance's, not the edit's; finite, and a real token prefix comes out.
    attacked = prefix_attack(sd, edit, CONFIG, PROMPT, x0, SEEDS[:1], target=_target(-1.0, 2.0, draws=1))
    assert np.isfinite(attacked.losses).all() and np.isfinite(attacked.contexts).all()
    assert np.abs(attacked.losses[0, 0] - batched.losses[0, 0]) > 1e-4
    assert attacked.ids.shape == (1, batched.ids.shape[1]) and attacked.texts[0]


def test_pipeline_target_checks_its_numbers():
    with pytest.raises(ValueError, match="draws must be in"):
        PipelineTarget(bar=1.0, w_erase=-1.0, w_keep=2.0, probe=PROBE, draws=5)
    with pytest.raises(ValueError, match="bar must be > 0"):
        PipelineTarget(bar=0.0, w_erase=-1.0, w_keep=2.0, probe=PROBE)


def test_pipeline_target_from_a_probe_takes_its_bar_and_w_values():
    from types import SimpleNamespace

    def probe(threshold, rule):
        config = ProbeConfig(draws=4, rule=rule, w_erase=-0.5, w_keep=1.5)
        return SimpleNamespace(config=config, d_empty=0.3, threshold=lambda guidance_scale: threshold)

    calibrated = PipelineTarget.from_probe(probe(0.8, "calibrated"), draws=3)
    assert (calibrated.bar, calibrated.w_erase, calibrated.w_keep, calibrated.draws) == (0.8, -0.5, 1.5, 3)
    assert PipelineTarget.from_probe(probe(None, "paper")).bar == 0.3  # the paper's bar: D("")
