"""UnGuide training iteration: our JAX objective and train step against the PyTorch reference.

The reference (unguide_jax/pytorch/reference.py) is written from the paper and its reference code with diffusers' UNet and DDIM
scheduler; here both sides get the same tiny random UNet, LoRA values, embeddings and draws
(x_T, t_enc, t). fp32 on CPU.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests import tiny_models
from unguide_jax.diffusion.schedulers import SchedulerConfig
from unguide_jax.edits.lora import LoraConfig, init_lora
from unguide_jax.erasers.unguide.objective import (
    ConceptEmbeddings,
    ObjectiveConfig,
    draw_samples,
    unguide_loss,
)
from unguide_jax.erasers.unguide.train_step import (
    init_train_state,
    make_optimizer,
    make_train_step,
)
from unguide_jax.loading.convert import torch_to_flax
from unguide_jax.models.layers import abstract_params
from unguide_jax.models.unet import UNet2DConditionModel, UNetConfig
from unguide_jax.pytorch import reference as tu

LATENT = 8         # latent height/width: small, the tiny UNet downsamples once
CONTEXT_LEN = 7
LORA = LoraConfig(rank=2, alpha=8.0, targets="object", init="random")  # rank 2 so that A @ B really contracts
LEARNING_RATE = 3e-5

# Tolerances, fp32 on CPU (observed worst case in brackets). Up to 49 CFG steps at scale 9 amplify the
# per-call rounding differences (~3e-7 for one UNet call) and the random tiny UNet drives |z| to ~60.
Z_RTOL = 1e-5        # max |z_jax - z_torch| / max |z_torch| after partial sampling  [1.6e-6]
LOSS_RTOL = 5e-5     # [4.7e-6]
GRAD_RTOL = 2e-4     # max abs gradient error / largest gradient entry  [1.5e-5]
# Adapter after Adam steps, as a fraction of the learning rate: Adam moves each entry by about lr, and
# entries with |grad| not far above eps = 1e-8 amplify the gradient's rounding  [7e-4].
ADAPTER_ATOL = 1e-2 * LEARNING_RATE


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    torch_unet = tiny_models.build_unet("sd1")
    unet = UNet2DConditionModel(UNetConfig.from_dict(dict(torch_unet.config)))
    params = torch_to_flax(torch_unet.state_dict(), abstract_params(unet, *unet.init_inputs()))
    wrappers = tu.add_lora(torch_unet, rank=LORA.rank, alpha=LORA.alpha)  # after conversion: it renames to_k/to_v
    rng = np.random.default_rng(7)
    width = unet.config.cross_attention_dim
    target, reference, uncond = (rng.standard_normal((1, CONTEXT_LEN, width), dtype=np.float32) for _ in range(3))
    embeddings = ConceptEmbeddings(target=jnp.asarray(target), reference=jnp.asarray(reference), uncond=jnp.asarray(uncond))
    return dict(torch_unet=torch_unet, wrappers=wrappers, unet=unet, params=params, embeddings=embeddings,
                torch_embeddings=tuple(torch.from_numpy(x) for x in (target, reference, uncond)),
                scheduler=tu.make_scheduler(), scheduler_config=SchedulerConfig())


def trained_adapter(params, seed: int = 3) -> dict:
    """An adapter as if mid-training (B != 0), so that sampling with the LoRA model differs from the base:
    with the fresh B = 0 a JAX side that sampled with the base model would pass unnoticed."""
    adapter = init_lora(jax.random.key(seed), params, LORA)
    rng = np.random.default_rng(seed)
    return {path: {"lora_A": np.asarray(ab["lora_A"]),
                   "lora_B": (0.02 * rng.standard_normal(ab["lora_B"].shape)).astype(np.float32)}
            for path, ab in adapter.items()}


def to_nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def torch_run(setup, mode, adapter, x_T, t_enc, t, optimizer=None):
    """One reference iteration; x_T is NHWC (1, h, w, c) numpy."""
    if adapter is not None:
        tu.set_adapter(setup["wrappers"], adapter)
    objective = tu.TorchObjective(timestep_mode=mode)
    return tu.unguide_iteration(setup["torch_unet"], setup["wrappers"], optimizer, setup["scheduler"], objective,
                                to_nchw(x_T), int(t_enc), int(t), *setup["torch_embeddings"])


def assert_trees_close(got: dict, expected: dict, atol: float, what: str):
    assert set(got) == set(expected), what
    for path in expected:
        for leaf in ("lora_A", "lora_B"):
            np.testing.assert_allclose(np.asarray(got[path][leaf]), expected[path][leaf], rtol=0, atol=atol,
                                       err_msg=f"{what}: {path}.{leaf}")


def test_reference_schedule_follows_the_spec():
    """The torch reference's timesteps against the reference code's numbers (no model involved)."""
    scheduler = tu.make_scheduler()
    for k in range(50):
        steps, query = tu.iteration_timesteps(scheduler, "reference", k, 20 * k + 19)
        assert steps[0] == 961 and query == 20 * k + 19  # quirk 1 (981 dropped), quirk 3 (the drawn t)
        assert len(steps) == (49 if k < 2 else 50 - k)  # quirk 2
        if k >= 2:
            assert steps[-1] - 20 == 20 * k - 39  # z is left at noise level alpha(20k - 39)
        steps, query = tu.iteration_timesteps(scheduler, "corrected", k, 20 * k + 1)
        assert len(steps) == 49 - k and query == 20 * k + 1 and (not steps or (steps[0] == 981 and steps[-1] - 20 == query))
    with pytest.raises(ValueError, match=r"outside \[40, 59\]"):
        tu.iteration_timesteps(scheduler, "reference", 2, 60)
    with pytest.raises(ValueError, match="queries at tau_k = 41"):
        tu.iteration_timesteps(scheduler, "corrected", 2, 40)


@pytest.fixture(scope="module")
def jax_value_and_grad(setup):
    """mode -> jitted (adapter, x_T, t_enc, t) -> ((loss, aux), grads); t_enc and t are traced: one compile per mode."""
    cache = {}

    def get(mode):
        if mode not in cache:
            objective = ObjectiveConfig(timestep_mode=mode)

            def loss(adapter, x_T, t_enc, t):
                return unguide_loss(setup["unet"], setup["scheduler_config"], LORA, objective, setup["params"],
                                    adapter, setup["embeddings"], x_T, t_enc, t)

            cache[mode] = jax.jit(jax.value_and_grad(loss, has_aux=True))
        return cache[mode]

    return get


# (mode, t_enc, t): reference t_enc 1 hits the code's clamp (49 steps, as 0) and t is drawn from [20k, 20k + 19];
# corrected queries at t = tau_k = 20k + 1, and t_enc 0 is its longest trajectory (49 steps, down to tau_0).
CASES = [("reference", 1, 37), ("reference", 27, 548), ("corrected", 0, 1), ("corrected", 35, 701)]


@pytest.mark.parametrize("mode, t_enc, t", CASES)
def test_loss_and_gradients_match_torch(setup, jax_value_and_grad, mode, t_enc, t):
    adapter = trained_adapter(setup["params"])
    x_T = np.random.default_rng(t_enc).standard_normal((1, LATENT, LATENT, 4), dtype=np.float32)
    expected = torch_run(setup, mode, adapter, x_T, t_enc, t)
    expected_grads = tu.get_gradients(setup["wrappers"])

    (loss, aux), grads = jax_value_and_grad(mode)(adapter, x_T, np.array([t_enc]), np.array([t]))
    assert int(aux["steps"][0]) == len(expected["sample_steps"])
    z = expected["z"].numpy()
    np.testing.assert_allclose(np.asarray(aux["z"]).transpose(0, 3, 1, 2), z, rtol=0, atol=Z_RTOL * np.abs(z).max())
    np.testing.assert_allclose(float(loss), expected["loss"], rtol=LOSS_RTOL)
    scale = max(float(np.abs(g).max()) for ab in expected_grads.values() for g in ab.values())
    assert scale > 0
    assert_trees_close(grads, expected_grads, GRAD_RTOL * scale, "gradient")


def test_train_steps_match_torch_adam(setup):
    """Two jitted train steps from the real init (A ~ N(0, 1/r), B = 0) against two torch Adam steps.

    The second step samples with a LoRA model that the first step changed, and runs Adam with moments.
    The draws are reproduced from the state's key the way the step makes them (checked against its metrics).
    """
    mode = "corrected"
    objective = ObjectiveConfig(timestep_mode=mode)
    optimizer = make_optimizer(LEARNING_RATE)
    state = init_train_state(jax.random.key(11), setup["params"], LORA, optimizer)
    initial = jax.tree.map(np.asarray, jax.device_get(state.adapter))
    step = make_train_step(setup["unet"], setup["scheduler_config"], LORA, objective, optimizer, latent_size=LATENT)

    tu.set_adapter(setup["wrappers"], initial)
    adam = tu.make_adam(setup["wrappers"], LEARNING_RATE)
    for i in range(2):
        _, draw_key = jax.random.split(state.key)
        x_T, t_enc, t, _ = draw_samples(draw_key, setup["scheduler_config"], objective, (LATENT, LATENT, 4), 1)
        state, metrics = step(state, setup["params"], setup["embeddings"])
        assert (int(metrics["t_enc"]), int(metrics["t"])) == (int(t_enc[0]), int(t[0])), "draws not reproduced"
        expected = torch_run(setup, mode, None, np.asarray(x_T), t_enc[0], t[0], optimizer=adam)
        np.testing.assert_allclose(float(metrics["loss"]), expected["loss"], rtol=LOSS_RTOL, err_msg=f"step {i}")
        after = jax.tree.map(np.asarray, jax.device_get(state.adapter))
        assert_trees_close(after, tu.get_adapter(setup["wrappers"]), ADAPTER_ATOL, f"adapter after step {i + 1}")
    assert int(state.step) == 2
    # The steps did move the adapter (B by about lr per entry), so the comparison above is not vacuous.
    moved = max(float(np.abs(after[p]["lora_B"] - initial[p]["lora_B"]).max()) for p in initial)
    assert moved > 0.5 * LEARNING_RATE


# --- UnGuidance: the w probe and the mixed sampler against the torch reference ------------------

PROBE_DRAWS = 3


@pytest.mark.parametrize("mode", ["reference", "corrected"])
def test_probe_matches_the_one_prompt_at_a_time_reference(setup, mode):
    """All prompts and draws in one vmapped call vs the reference procedure run prompt by prompt on the same
    draws: D(p), D(""), and the decision w of the paper's rule."""
    from unguide_jax.edits.edit import lora_edit
    from unguide_jax.erasers.unguide.probe import (
        ProbeConfig,
        decide,
        probe_distances,
        probe_draws,
    )

    adapter = trained_adapter(setup["params"])
    tu.set_adapter(setup["wrappers"], adapter)
    config = ProbeConfig(draws=PROBE_DRAWS, timestep_mode=mode, t_enc=40, seed=5, rule="paper")
    x_T, t = probe_draws(config, setup["scheduler_config"], (LATENT, LATENT, 4))
    rng = np.random.default_rng(3)
    width = setup["unet"].config.cross_attention_dim
    prompts = rng.standard_normal((3, CONTEXT_LEN, width), dtype=np.float32)
    uncond = np.asarray(setup["embeddings"].uncond)
    scales = np.array([7.5, 3.0, 7.5], np.float32)
    edit = lora_edit(adapter, LORA.alpha)
    got = np.asarray(probe_distances(setup["unet"], setup["scheduler_config"], config, setup["params"], edit,
                                     jnp.asarray(prompts), jnp.asarray(uncond), jnp.asarray(scales), x_T, t))
    got_empty = np.asarray(probe_distances(setup["unet"], setup["scheduler_config"], config, setup["params"], edit,
                                           jnp.asarray(uncond), jnp.asarray(uncond), jnp.ones(1), x_T, t))[0]

    scheduler = tu.make_scheduler()
    x_T_t, t_t = to_nchw(x_T), torch.from_numpy(np.array(t))
    expected = np.stack([tu.probe_prompt(setup["torch_unet"], setup["wrappers"], scheduler, mode, config.t_enc, x_T_t,
                                         t_t, torch.from_numpy(p[None]), torch.from_numpy(uncond), float(s))
                         for p, s in zip(prompts, scales)])
    expected_empty = tu.probe_prompt(setup["torch_unet"], setup["wrappers"], scheduler, mode, config.t_enc, x_T_t, t_t,
                                     torch.from_numpy(uncond), torch.from_numpy(uncond), 7.5)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    np.testing.assert_allclose(got_empty, expected_empty, rtol=1e-4)
    _, w, _ = decide(got, got_empty, config)
    _, expected_w, _ = decide(expected, expected_empty, config)
    np.testing.assert_array_equal(w, expected_w)


def test_unguidance_sampling_matches_the_two_model_reference(setup):
    """Per-prompt w (erase, keep, a fixed mix) through the whole DDIM loop, fused (one UNet call on 4B rows
    with a per-row adapter strength) and split (base and merged weights), vs two models in torch."""
    from unguide_jax.diffusion.sampler import sample_latents
    from unguide_jax.edits.edit import lora_edit

    adapter = trained_adapter(setup["params"], seed=4)
    tu.set_adapter(setup["wrappers"], adapter)
    steps, guidance, ws = 8, 7.5, [-1.0, 2.0, 0.5]
    rng = np.random.default_rng(9)
    width = setup["unet"].config.cross_attention_dim
    cond = rng.standard_normal((3, CONTEXT_LEN, width), dtype=np.float32)
    uncond = np.repeat(np.asarray(setup["embeddings"].uncond), 3, axis=0)
    x_T = rng.standard_normal((3, LATENT, LATENT, 4), dtype=np.float32)
    scheduler = tu.make_scheduler()
    scheduler.set_timesteps(steps)
    expected = np.concatenate([
        tu.unguidance_sample(setup["torch_unet"], setup["wrappers"], scheduler, to_nchw(x_T[i:i + 1]),
                             torch.from_numpy(cond[i:i + 1]), torch.from_numpy(uncond[i:i + 1]), guidance, w).numpy()
        for i, w in enumerate(ws)])
    for fused in (True, False):
        got = sample_latents(setup["unet"], setup["scheduler_config"], steps, 0.0, setup["params"], jnp.asarray(cond),
                             jnp.asarray(uncond), jnp.asarray(x_T), jnp.full((3,), guidance), jnp.arange(3),
                             lora_edit(adapter, LORA.alpha), jnp.asarray(ws), fused=fused)
        np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, rtol=0,
                                   atol=Z_RTOL * np.abs(expected).max(), err_msg=f"fused={fused}")
