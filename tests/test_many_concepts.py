"""K concepts in one run (erasers/unguide/many.py) against K single-concept runs with the same seeds.

The tiny random UNet, 3 Adam steps, concepts with their own embeddings and seeds. On one device: K = 3 in one
vmapped step (no mesh, and a 1 x 1 x 1 concept mesh). On 8 CPU devices (a subprocess: XLA_FLAGS must be set
before jax is imported): K = 4 over a concept=2 x data=2 x fsdp=2 mesh, its adapters against the single runs
computed here on one device. The packed trajectory loop on its own: each concept's z is its own run's.
"""
import inspect
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import tiny_models
from tests.devices import ALL_CPU_DEVICES, run_script
from unguide_jax.diffusion.schedulers import SchedulerConfig
from unguide_jax.edits.lora import LoraConfig
from unguide_jax.erasers.unguide.many import (
    concept_slice,
    default_slots,
    init_many_states,
    make_many_train_step,
    packed_trajectories,
    stack,
    stack_embeddings,
)
from unguide_jax.erasers.unguide.objective import (
    ConceptEmbeddings,
    ObjectiveConfig,
    num_sampling_steps,
    trajectory_latent,
)
from unguide_jax.erasers.unguide.train_step import init_train_state, make_optimizer, make_train_step
from unguide_jax.parallel.mesh import make_mesh

CONTEXT_LEN, CONTEXT_DIM = 5, 16
STEPS = 3
LORA = LoraConfig(rank=2, alpha=8.0, init="random")
# Two samples per step, so that the 8-device run splits them over "data"; few DDIM steps: the trajectory is
# checked in test_unguide_train_step, here only that each concept's slice computes its own run.
OBJECTIVE = ObjectiveConfig(ddim_steps=10, samples_per_step=2, timestep_mode="reference")
LEARNING_RATE = 1e-2



def concept_embeddings(i):
    k = jax.random.split(jax.random.key(100 + i), 3)
    return ConceptEmbeddings(target=jax.random.normal(k[0], (2, 5, 16)),
                             reference=jax.random.normal(k[1], (2, 5, 16)),
                             uncond=jax.random.normal(k[2], (1, 5, 16)))


def concept_key(i):
    return jax.random.key(10 + 7 * i)


_EIGHT_DEVICE_RUN = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from unguide_jax.edits.lora import LoraConfig
    from unguide_jax.diffusion.schedulers import SchedulerConfig
    from unguide_jax.parallel.mesh import make_mesh
    from unguide_jax.erasers.unguide.objective import ConceptEmbeddings, ObjectiveConfig
    from unguide_jax.erasers.unguide.train_step import make_optimizer
    from unguide_jax.erasers.unguide.many import init_many_states, make_many_train_step, stack_embeddings
    from tests.tiny_models import flax_unet
""") + inspect.getsource(concept_embeddings) + inspect.getsource(concept_key) + textwrap.dedent("""
    assert len(jax.devices()) == 8, jax.devices()
    K = 4
    unet, params = flax_unet(context_dim=16, context_len=5)
    lora_config = LoraConfig(rank=2, alpha=8.0, init="random")
    objective = ObjectiveConfig(ddim_steps=10, samples_per_step=2, timestep_mode="reference")
    optimizer = make_optimizer(1e-2)
    mesh = make_mesh(concept=2, data=2, fsdp=2)
    step = make_many_train_step(unet, SchedulerConfig(), lora_config, objective, optimizer, mesh=mesh)
    three = init_many_states([concept_key(i) for i in range(3)], params, lora_config, optimizer)
    try:
        step(three, params, stack_embeddings([concept_embeddings(i) for i in range(3)]))
        raise AssertionError("3 concepts over a concept axis of 2 ran")
    except ValueError as e:
        assert "3 concepts do not split over the mesh's concept axis of 2" in str(e), e
    states = init_many_states([concept_key(i) for i in range(K)], params, lora_config, optimizer)
    embeddings = stack_embeddings([concept_embeddings(i) for i in range(K)])
    losses = []
    for _ in range(3):
        states, metrics = step(states, params, embeddings)
        losses.append(np.asarray(metrics["loss"]).tolist())
    leaf = next(iter(states.adapter.values()))["lora_A"]
    np.savez(sys.argv[1], **{f"{path}/{name}": np.asarray(v) for path, ab in states.adapter.items()
                             for name, v in ab.items()})
    print(json.dumps(dict(losses=losses, steps=np.asarray(states.step).tolist(), mesh=dict(mesh.shape),
                          adapter_spec=[str(axis) for axis in leaf.sharding.spec], adapter_shard=list(leaf.addressable_shards[0].data.shape),
                          adapter_shape=list(leaf.shape))))
""")


def max_difference(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a, b)))


@pytest.fixture(scope="module")
def tiny():
    unet, params = tiny_models.flax_unet(CONTEXT_DIM, CONTEXT_LEN)
    return unet, params, make_optimizer(LEARNING_RATE)


@pytest.fixture(scope="module")
def single_runs(tiny):
    """Concept i's own run (make_train_step, one device): (adapter, losses) for i = 0..3."""
    unet, params, optimizer = tiny
    step = make_train_step(unet, SchedulerConfig(), LORA, OBJECTIVE, optimizer)
    runs = []
    for i in range(4):
        state = init_train_state(concept_key(i), params, LORA, optimizer)
        losses = []
        for _ in range(STEPS):
            state, metrics = step(state, params, concept_embeddings(i))
            losses.append(float(metrics["loss"]))
        runs.append((jax.tree.map(np.asarray, state.adapter), losses))
    # The adapters did train (B starts at zero), and differently per concept.
    assert min(float(np.abs(ab["lora_B"]).max()) for ab in runs[0][0].values()) > 1e-3
    assert max_difference(runs[0][0], runs[1][0]) > 1e-3
    return runs


@pytest.mark.parametrize("with_mesh", [False, True], ids=["no-mesh", "concept-mesh-1x1x1"])
def test_three_concepts_in_one_run_equal_three_single_runs(tiny, single_runs, with_mesh):
    unet, params, optimizer = tiny
    mesh = make_mesh(concept=1, data=1, fsdp=1, devices=jax.devices()[:1]) if with_mesh else None
    if with_mesh:
        assert mesh.axis_names == ("concept", "data", "fsdp")
    step = make_many_train_step(unet, SchedulerConfig(), LORA, OBJECTIVE, optimizer, mesh=mesh)
    states = init_many_states([concept_key(i) for i in range(3)], params, LORA, optimizer)
    embeddings = stack_embeddings([concept_embeddings(i) for i in range(3)])
    losses = []
    for _ in range(STEPS):
        states, metrics = step(states, params, embeddings)
        assert metrics["loss"].shape == (3,) and metrics["trajectory_iterations"].shape == (3,)
        losses.append(np.asarray(metrics["loss"]))
    np.testing.assert_array_equal(np.asarray(states.step), [STEPS] * 3)
    for k in range(3):
        adapter, single_losses = single_runs[k]
        assert max_difference(concept_slice(states, k).adapter, adapter) <= 1e-5, k
        np.testing.assert_allclose([loss[k] for loss in losses], single_losses, rtol=1e-5)


def test_eight_devices_equal_the_single_runs(single_runs, tmp_path):
    out = tmp_path / "adapters.npz"
    run = run_script(_EIGHT_DEVICE_RUN, 8, str(out), extra_env=ALL_CPU_DEVICES)
    assert run["mesh"] == {"concept": 2, "data": 2, "fsdp": 2} and run["steps"] == [STEPS] * 4
    # The stacked adapters are split over "concept": each device group holds two of the four.
    assert run["adapter_spec"][0] == "concept" and set(run["adapter_spec"][1:]) <= {"None"}
    assert run["adapter_shard"] == [2] + run["adapter_shape"][1:]
    with np.load(out) as arrays:
        stacked = dict(arrays)
    for k in range(4):
        adapter, single_losses = single_runs[k]
        got = {path: {name: stacked[f"{path}/{name}"][k] for name in ab} for path, ab in adapter.items()}
        assert max_difference(got, adapter) <= 1e-5, k
        np.testing.assert_allclose([loss[k] for loss in run["losses"]], single_losses, rtol=1e-5)


def test_packed_trajectories_give_each_concept_its_own_z(tiny):
    unet, params, _ = tiny
    k, slots = 3, 3
    # Adapters that change the model (B != 0), differently per concept: a slot given another concept's
    # adapter would get another z.
    adapters = stack([jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(50 + i), x.shape),
                                   init_train_state(concept_key(i), params, LORA, make_optimizer(1.0)).adapter)
                      for i in range(k)])
    embeddings = stack_embeddings([concept_embeddings(i) for i in range(k)])
    t_enc = jnp.array([[1, 8], [5, 9], [3, 7]], jnp.int32)  # DDIM steps 9, 2 | 5, 1 | 7, 3
    pair_index = jnp.array([[0, 1], [1, 1], [1, 0]], jnp.int32)
    x_T = jax.random.normal(jax.random.key(7), (k, 2, 16, 16, 4))
    packed = jax.jit(packed_trajectories, static_argnums=(0, 1, 2, 3, 10))
    z, iterations = packed(unet, SchedulerConfig(), LORA, OBJECTIVE, params, adapters, embeddings, x_T, t_enc,
                           pair_index, slots)
    own = jax.jit(trajectory_latent, static_argnums=(0, 1, 2, 3))
    for c in range(k):
        expected = own(unet, SchedulerConfig(), LORA, OBJECTIVE, params, concept_slice(adapters, c),
                       concept_slice(embeddings, c), x_T[c], t_enc[c], pair_index[c])
        other = own(unet, SchedulerConfig(), LORA, OBJECTIVE, params, concept_slice(adapters, (c + 1) % k),
                    concept_slice(embeddings, c), x_T[c], t_enc[c], pair_index[c])
        scale = float(jnp.abs(expected).max())
        error = float(jnp.abs(z[c] - expected).max())
        # To rounding (per-slot kernels, other batch shapes), far below what another adapter changes.
        assert error <= 1e-5 * scale and float(jnp.abs(other - expected).max()) > 1e-2 * scale, (c, error, scale)
    steps = np.asarray(num_sampling_steps(OBJECTIVE, np.asarray(t_enc))).ravel()
    # Longest-remaining-first: the optimum for unit steps, and half the UNet rows of running every
    # trajectory as long as the longest.
    assert int(iterations) == max(steps.max(), -(-steps.sum() // slots)) == 9
    assert int(iterations) * slots < steps.size * steps.max()


def test_default_slots():
    assert [default_slots(n) for n in (1, 2, 3, 4, 10)] == [1, 1, 2, 2, 5]
    assert default_slots(4, data=2) == 2 and default_slots(6, data=2) == 4 and default_slots(2, data=2) == 2


def test_init_is_the_single_init_per_concept(tiny):
    _, params, optimizer = tiny
    keys = jax.random.split(jax.random.key(4), 2)
    states = init_many_states(keys, params, LORA, optimizer)
    for k in range(2):
        single = init_train_state(keys[k], params, LORA, optimizer)
        sliced = concept_slice(states, k)
        assert max_difference(sliced.adapter, single.adapter) == 0
        np.testing.assert_array_equal(jax.random.key_data(sliced.key), jax.random.key_data(single.key))


def test_what_one_run_of_several_concepts_refuses(tiny):
    unet, params, optimizer = tiny
    other = ConceptEmbeddings(target=jnp.zeros((3, 5, 16)), reference=jnp.zeros((3, 5, 16)),
                              uncond=jnp.zeros((1, 5, 16)))
    with pytest.raises(ValueError, match=r"pairs per concept: \[2, 3\]"):
        stack_embeddings([concept_embeddings(0), other])
    with pytest.raises(ValueError, match="1 keys but 2 concept directions"):
        init_many_states([concept_key(0)], params, LORA, optimizer, directions_per_concept=[None, None])
    mesh = make_mesh(concept=1, data=1, fsdp=1, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="mesh concept=2 does not divide the 1 devices"):
        make_mesh(concept=2, data=1, fsdp=1, devices=jax.devices()[:1])
    assert mesh.shape["concept"] == 1
