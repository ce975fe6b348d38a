"""UnGuide objective and train step (and the reference code's timestep modes).

The timestep arithmetic of both modes is checked against the reference code's numbers; the jitted train step
(random draws + objective + gradient + optimizer) against a plain step-by-step implementation written
here from the paper's definition, on a tiny one-block UNet, for the same draws (reference mode), and the pure
loss function given x_T, t_enc, t (corrected mode, at the edge cases t_enc = 0 and 49).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import tiny_models
from unguide_jax.diffusion.schedulers import SchedulerConfig
from unguide_jax.edits.lora import LoraConfig, init_lora, merge
from unguide_jax.erasers.concepts import Concept
from unguide_jax.erasers.unguide.objective import (
    ConceptEmbeddings,
    ObjectiveConfig,
    draw_samples,
    embed_concept,
    latent_timestep,
    num_sampling_steps,
    query_timestep_range,
    sampling_timesteps,
    unguide_loss_jit,
)
from unguide_jax.erasers.unguide.train_step import (
    init_train_state,
    make_optimizer,
    make_train_step,
)

SD = SchedulerConfig()  # SD 1.x: scaled-linear betas, leading spacing, steps_offset 1, set_alpha_to_one False
LORA = LoraConfig(rank=1, alpha=8.0, targets="object", init="random")
CONTEXT_LEN, CONTEXT_DIM = 5, 16


# --- timestep modes: which timesteps run, where z ends, which t is queried --------------------------------------

@pytest.mark.parametrize("k", range(50))
def test_reference_mode_reproduces_the_quirks_of_the_reference_code(k):
    objective = ObjectiveConfig(timestep_mode="reference")
    run = sampling_timesteps(SD, objective, k)
    # Quirk 1: the first timestep (981) is dropped; x_T is treated as the latent at 961.
    assert run[0] == 961 and 981 not in run
    # Quirk 2: k >= 2 runs 50 - k steps leaving z at ᾱ(20k - 39); k in {0, 1} runs all 49.
    expected_steps = 49 if k in (0, 1) else 50 - k
    np.testing.assert_array_equal(run, 961 - 20 * np.arange(expected_steps))
    assert num_sampling_steps(objective, k) == expected_steps
    level = latent_timestep(SD, objective, k)
    if k >= 2:
        assert level == 20 * k - 39
    else:
        assert level < 0  # ᾱ_prev of the last step (t = 1) is ᾱ_0 (set_alpha_to_one False)
    # Quirk 3: the model is queried at t in [20k, 20k + 19].
    low, high = query_timestep_range(SD, objective, k)
    assert (low, high) == (20 * k, 20 * k + 20)


@pytest.mark.parametrize("k", range(50))
def test_corrected_mode_queries_the_true_timestep(k):
    objective = ObjectiveConfig(timestep_mode="corrected")
    run = sampling_timesteps(SD, objective, k)
    np.testing.assert_array_equal(run, 981 - 20 * np.arange(49 - k))
    assert latent_timestep(SD, objective, k) == 20 * k + 1
    assert tuple(query_timestep_range(SD, objective, k)) == (20 * k + 1, 20 * k + 2)


def test_timestep_arithmetic_is_the_same_traced_and_in_numpy():
    """The jitted step uses the traced path of these functions; the tests above check the numpy one."""
    ks = np.arange(50)
    for mode in ("reference", "corrected"):
        objective = ObjectiveConfig(timestep_mode=mode)
        traced = jax.jit(lambda k: (num_sampling_steps(objective, k), *query_timestep_range(SD, objective, k),  # noqa: B023
                                    latent_timestep(SD, objective, k)))(jnp.asarray(ks))
        for got, want in zip(traced, (num_sampling_steps(objective, ks), *query_timestep_range(SD, objective, ks),
                                      latent_timestep(SD, objective, ks))):
            np.testing.assert_array_equal(np.asarray(got), want)


def test_objective_config_rejects_unknown_modes():
    with pytest.raises(ValueError, match="timestep_mode"):
        ObjectiveConfig(timestep_mode="fixed")
    with pytest.raises(ValueError, match="samples_per_step"):
        ObjectiveConfig(samples_per_step=0)


# --- the train step against a plain implementation ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    """The tiny UNet, an adapter that is not the identity (so sampling with the base instead of the
    current LoRA model would show), and a two-pair concept."""
    unet, params = tiny_models.flax_unet(CONTEXT_DIM, CONTEXT_LEN)
    fresh = init_lora(jax.random.key(1), params, LORA)
    adapter = jax.tree.map(lambda x: 0.05 * jax.random.normal(jax.random.key(2), x.shape), fresh)
    keys = jax.random.split(jax.random.key(3), 3)
    embeddings = ConceptEmbeddings(
        target=jax.random.normal(keys[0], (2, CONTEXT_LEN, CONTEXT_DIM)),
        reference=jax.random.normal(keys[1], (2, CONTEXT_LEN, CONTEXT_DIM)),
        uncond=jax.random.normal(keys[2], (1, CONTEXT_LEN, CONTEXT_DIM)),
    )
    forward = jax.jit(lambda p, z, t, c: unet.apply({"params": p}, z, t, c))

    @jax.jit  # eager would be op by op: slower than compiling
    @jax.value_and_grad
    def prediction_loss_and_grad(a, z, t, target, eps_star):
        pred = unet.apply({"params": merge(params, [(a, LORA.alpha)])}, z, t, target)
        return jnp.mean((pred - eps_star) ** 2)

    return dict(unet=unet, params=params, adapter=adapter, embeddings=embeddings, forward=forward,
                prediction_loss_and_grad=prediction_loss_and_grad)


def _plain_alphas_cumprod():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def _plain_sample_loss_and_grad(tiny, mode, x_T, k, t, pair, objective):
    """One sample of the objective, step by step as the paper's code computes it, with its adapter gradient."""
    _, params, adapter, emb, forward = tiny["unet"], tiny["params"], tiny["adapter"], tiny["embeddings"], tiny["forward"]
    alphas = _plain_alphas_cumprod()
    lora_params = merge(params, [(adapter, LORA.alpha)])
    target, reference, uncond = emb.target[pair][None], emb.reference[pair][None], emb.uncond
    if mode == "reference":
        run = [961 - 20 * j for j in range(min(50 - k, 49))]
        assert 20 * k <= t < 20 * k + 20
    else:
        run = [981 - 20 * j for j in range(49 - k)]
        assert t == 20 * k + 1
    z = np.asarray(x_T, np.float64)[None]
    for step in run:
        out = np.asarray(forward(lora_params, jnp.asarray(np.concatenate([z, z]), jnp.float32), step,
                                 jnp.concatenate([uncond, target])), np.float64)
        eps = out[:1] + objective.start_guidance * (out[1:] - out[:1])
        a, a_prev = alphas[step], alphas[step - 20] if step - 20 >= 0 else alphas[0]
        x0 = (z - np.sqrt(1 - a) * eps) / np.sqrt(a)
        z = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    z = jnp.asarray(z, jnp.float32)
    base = forward(params, jnp.concatenate([z, z]), t, jnp.concatenate([reference, target]))
    e0, ep = base[:1], base[1:]
    eps_star = e0 - objective.negative_guidance * (ep - e0)

    loss, grad = tiny["prediction_loss_and_grad"](adapter, z, t, target, eps_star)
    return float(loss), grad, len(run)


def test_train_step_equals_a_plain_step_by_step_implementation(tiny):
    """Same draws (from the state's key), two samples with different t_enc and concept pairs:
    the loss and the SGD(lr=1) update, i.e. the gradient, match the plain implementation.

    Reference mode: its quirks are the easy thing to get wrong; the sampling loop is shared by both
    modes, which differ only in the timestep functions checked above, traced and untraced."""
    mode = "reference"
    objective = ObjectiveConfig(timestep_mode=mode, samples_per_step=2)
    sgd = optax.sgd(1.0)
    state = init_train_state(jax.random.key(7), tiny["params"], LORA, sgd)
    state = state.replace(adapter=tiny["adapter"], opt_state=sgd.init(tiny["adapter"]))
    adapter_before = jax.tree.map(np.asarray, state.adapter)
    x_T, t_enc, t, pair = jax.tree.map(np.asarray, draw_samples(
        jax.random.split(state.key)[1], SD, objective, (8, 8, 4), num_pairs=2))
    assert t_enc[0] != t_enc[1]  # different trajectory lengths in one batch

    step = make_train_step(tiny["unet"], SD, LORA, objective, sgd)
    state, metrics = step(state, tiny["params"], tiny["embeddings"])

    plain = [_plain_sample_loss_and_grad(tiny, mode, x_T[i], int(t_enc[i]), int(t[i]), int(pair[i]), objective)
             for i in range(2)]
    assert float(metrics["loss"]) == pytest.approx(np.mean([p[0] for p in plain]), rel=1e-4)
    assert (int(metrics["t_enc"]), int(metrics["t"])) == (t_enc[0], t[0])
    assert int(state.step) == 1
    expected = jax.tree.map(lambda a, g0, g1: a - (g0 + g1) / 2, adapter_before, plain[0][1], plain[1][1])
    changed = jax.tree.map(lambda new, old: float(np.abs(new - old).max()), state.adapter, adapter_before)
    assert min(jax.tree.leaves(changed)) > 0  # both A and B get a gradient
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6),
                 jax.tree.map(np.asarray, state.adapter), expected)


def test_unguide_loss_for_given_draws_equals_the_plain_implementation(tiny):
    """The pure function a parity test feeds: corrected mode, 49 sampling steps and none at all."""
    objective = ObjectiveConfig(timestep_mode="corrected", samples_per_step=2)
    x_T = np.asarray(jax.random.normal(jax.random.key(11), (2, 8, 8, 4)))
    t_enc, t, pair = np.array([0, 49]), np.array([1, 981]), np.array([1, 0])
    loss, aux = unguide_loss_jit(tiny["unet"], SD, LORA, objective, tiny["params"], tiny["adapter"], tiny["embeddings"],
                        x_T, t_enc, t, pair)
    np.testing.assert_array_equal(aux["steps"], [49, 0])
    np.testing.assert_array_equal(aux["z"][1], x_T[1])  # t_enc = 49: x_T is the latent at 981
    plain = [_plain_sample_loss_and_grad(tiny, "corrected", x_T[i], int(t_enc[i]), int(t[i]), int(pair[i]), objective)
             for i in range(2)]
    assert float(loss) == pytest.approx(np.mean([p[0] for p in plain]), rel=1e-4)


# --- small pieces ---------------------------------------------------------------------------------------

def test_optimizer_is_the_references_adam():
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = [{"w": jnp.array([0.5, -1.0, 2.0])}, {"w": jnp.array([-0.1, 0.3, 0.0])}]
    opt = make_optimizer(3e-5)
    state, p = opt.init(params), params
    m = v = np.zeros(3)
    want = np.asarray(params["w"])
    for i, g in enumerate(grads, start=1):
        updates, state = opt.update(g, state, p)
        p = optax.apply_updates(p, updates)
        g = np.asarray(g["w"], np.float64)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g**2
        want = want - 3e-5 * (m / (1 - 0.9**i)) / (np.sqrt(v / (1 - 0.999**i)) + 1e-8)
    np.testing.assert_allclose(p["w"], want, rtol=1e-6)


def test_init_train_state_wants_a_typed_key(tiny):
    with pytest.raises(TypeError, match="typed PRNG key"):
        init_train_state(jax.random.PRNGKey(0), tiny["params"], LORA, make_optimizer(1e-3))
    state = init_train_state(jax.random.key(0), tiny["params"], LORA, make_optimizer(1e-3))
    assert state.step.dtype == jnp.int32 and state.step.shape == ()
    assert all(float(jnp.abs(ab["lora_B"]).max()) == 0 for ab in state.adapter.values())


def test_embed_concept_broadcasts_a_single_reference():
    class FakePipeline:
        def encode_prompts(self, prompts):
            return jnp.stack([jnp.full((3, 2), float(len(p))) for p in prompts])

    concept = Concept(name="x", targets=("a cat", "a kitty cat"), references=("the forest!",))
    emb = embed_concept(FakePipeline(), concept)
    assert emb.target.shape == emb.reference.shape == (2, 3, 2) and emb.uncond.shape == (1, 3, 2)
    np.testing.assert_array_equal(emb.reference[:, 0, 0], [11.0, 11.0])
    np.testing.assert_array_equal(emb.target[:, 0, 0], [5.0, 11.0])
    assert float(emb.uncond[0, 0, 0]) == 0.0
