"""Orbax run checkpoints on a toy train state: exact round trip, keep-K, resume == uninterrupted,
and damaged or cut-off saves are never restored silently."""
import json
import shutil

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from unguide_jax.edits.lora import LoraConfig
from unguide_jax.loading.edit_files import (
    load_adapter,
    read_adapter_metadata,
    save_adapter,
)
from unguide_jax.training.checkpoints import (
    RECORD_FILE,
    CheckpointError,
    RunCheckpoints,
    abstract_like,
)
from unguide_jax.training.loop import MetricsLog, NonFiniteLoss, train_loop


@flax.struct.dataclass
class ToyState:
    step: jax.Array
    adapter: dict
    opt_state: optax.OptState
    key: jax.Array


OPTIMIZER = optax.adam(0.05)
TARGET = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)


def toy_state(seed: int = 0) -> ToyState:
    key_a, key = jax.random.split(jax.random.key(seed))
    adapter = {"down.attn2.to_k": {"lora_A": jax.random.normal(key_a, (3, 2)), "lora_B": jnp.zeros((2, 4))}}
    return ToyState(step=jnp.int32(0), adapter=adapter, opt_state=OPTIMIZER.init(adapter), key=key)


@jax.jit
def toy_step(state: ToyState):
    """A noisy regression of A @ B onto TARGET: the noise comes from the state's key, as in the real step."""
    key, noise_key = jax.random.split(state.key)
    noise = 0.1 * jax.random.normal(noise_key, TARGET.shape)

    def loss_fn(adapter):
        ab = adapter["down.attn2.to_k"]
        return jnp.mean((ab["lora_A"] @ ab["lora_B"] - TARGET - noise) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.adapter)
    updates, opt_state = OPTIMIZER.update(grads, state.opt_state, state.adapter)
    new = state.replace(step=state.step + 1, adapter=optax.apply_updates(state.adapter, updates),
                        opt_state=opt_state, key=key)
    return new, {"loss": loss, "t": jnp.int32(0)}


def assert_states_equal(a, b, atol=0.0):
    la, lb = jax.tree.leaves(abstract_like(a)), jax.tree.leaves(abstract_like(b))
    assert [(x.shape, x.dtype) for x in la] == [(x.shape, x.dtype) for x in lb]
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def advance(state, n):
    for _ in range(n):
        state, _ = toy_step(state)
    return state


def test_round_trip_is_exact_and_lands_on_the_target_sharding(tmp_path):
    state = advance(toy_state(), 3)
    config = {"learning_rate": 0.05, "lora": {"rank": 2}, "export": ["peft"]}
    with RunCheckpoints(tmp_path / "ck", keep=3) as checkpoints:
        checkpoints.save(3, state, config)
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
                              state)
        restored, restored_config = checkpoints.restore(target)
    assert restored_config == config
    assert_states_equal(restored, state)
    assert isinstance(restored, ToyState) and jax.dtypes.issubdtype(restored.key.dtype, jax.dtypes.prng_key)
    assert all(x.sharding == NamedSharding(mesh, P()) for x in jax.tree.leaves(restored))
    # The restored key continues the same random stream.
    assert_states_equal(advance(restored, 2), advance(state, 2))


def test_keeps_the_newest_k_and_lists_only_complete_steps(tmp_path):
    state = toy_state()
    with RunCheckpoints(tmp_path / "ck", keep=2) as checkpoints:
        for step in (1, 2, 3, 4):
            state = advance(state, 1)
            checkpoints.save(step, state, {})
        assert checkpoints.steps() == [3, 4]
        with pytest.raises(CheckpointError, match="already exists"):
            checkpoints.save(4, state, {})


def test_resumed_run_ends_with_the_same_adapter_as_an_uninterrupted_one(tmp_path):
    def run(run_dir, iterations, resume):
        with RunCheckpoints(run_dir / "checkpoints", keep=2) as checkpoints:
            state = toy_state()
            if resume:
                state, _ = checkpoints.restore(abstract_like(state))
            log = MetricsLog(run_dir / "metrics.jsonl", resume_from_step=int(state.step) if resume else None)
            return train_loop(state, toy_step, iterations=iterations, checkpoint_every=2, checkpoints=checkpoints,
                              config={"iterations": iterations}, log=log, progress=False)

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    straight = run(tmp_path / "a", 7, resume=False)
    run(tmp_path / "b", 4, resume=False)
    resumed = run(tmp_path / "b", 7, resume=True)
    assert int(resumed.step) == 7
    assert_states_equal(resumed, straight, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))


def test_metrics_of_a_cut_off_session_are_dropped_on_resume(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl", resume_from_step=None)
    for step in range(1, 6):
        log({"step": step, "loss": 0.1})
    MetricsLog(tmp_path / "m.jsonl", resume_from_step=2)
    assert [json.loads(x)["step"] for x in (tmp_path / "m.jsonl").read_text().splitlines()] == [1, 2]


def _saved_steps(tmp_path, steps=(2, 4)):
    state = toy_state()
    with RunCheckpoints(tmp_path / "ck", keep=5) as checkpoints:
        for step in steps:
            state = advance(state, 2)
            checkpoints.save(step, state, {"step": step})
    return state


def test_an_unfinalized_save_is_skipped(tmp_path):
    state = _saved_steps(tmp_path)
    # A save cut off before Orbax committed it: a half-written temporary folder.
    tmp_dir = tmp_path / "ck" / "6.orbax-checkpoint-tmp-1234"
    shutil.copytree(tmp_path / "ck" / "4", tmp_dir)
    (tmp_dir / RECORD_FILE).unlink()
    # A save cut off after Orbax's commit but before our record: committed, yet incomplete.
    shutil.copytree(tmp_path / "ck" / "4", tmp_path / "ck" / "8")
    (tmp_path / "ck" / "8" / RECORD_FILE).unlink()
    with RunCheckpoints(tmp_path / "ck", keep=5) as checkpoints:
        assert checkpoints.steps() == [2, 4] and checkpoints.latest_step() == 4
        with pytest.warns(UserWarning, match="incomplete checkpoint"):
            restored, config = checkpoints.restore(abstract_like(state))
        assert config == {"step": 4} and int(restored.step) == 4
        assert_states_equal(restored, state)
        assert not (tmp_path / "ck" / "8").exists()
        checkpoints.save(8, restored, {"step": 8})  # the cut-off step can be saved again
        assert checkpoints.steps() == [2, 4, 8]


@pytest.mark.parametrize("damage", ["flip a byte", "truncate"])
def test_a_damaged_checkpoint_raises_instead_of_restoring_wrong_numbers(tmp_path, damage):
    state = _saved_steps(tmp_path)
    data_files = [p for p in (tmp_path / "ck" / "4" / "state").rglob("*") if p.is_file() and "/d/" in p.as_posix()]
    biggest = max(data_files, key=lambda p: p.stat().st_size)
    raw = bytearray(biggest.read_bytes())
    if damage == "flip a byte":
        raw[len(raw) // 2] ^= 0x01  # Orbax alone restores this without complaint
    else:
        raw = raw[: len(raw) // 2]
    biggest.write_bytes(bytes(raw))
    with RunCheckpoints(tmp_path / "ck", keep=5) as checkpoints:
        with pytest.raises(CheckpointError, match=r"checkpoint .*/4 is damaged: state/.* does not match its checksum"):
            checkpoints.restore(abstract_like(state))
        restored, _ = checkpoints.restore(abstract_like(state), step=2)  # older checkpoints still restore
        assert int(restored.step) == 2


def test_a_target_of_another_shape_is_a_clear_error(tmp_path):
    state = _saved_steps(tmp_path, steps=(2,))
    wrong = state.replace(adapter={"down.attn2.to_k": {"lora_A": jnp.zeros((3, 5)), "lora_B": jnp.zeros((5, 4))}})
    wrong = wrong.replace(opt_state=OPTIMIZER.init(wrong.adapter))
    with RunCheckpoints(tmp_path / "ck") as checkpoints:
        with pytest.raises(CheckpointError, match="does not fit this run's train state"):
            checkpoints.restore(abstract_like(wrong))
        with pytest.raises(ValueError, match="no sharding"):
            checkpoints.restore(jax.eval_shape(lambda: state))


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    def poisoned_step(state):
        state, metrics = toy_step(state)
        return state, dict(metrics, loss=jnp.where(state.step >= 4, jnp.nan, metrics["loss"]))

    with RunCheckpoints(tmp_path / "ck", keep=3) as checkpoints:
        log = MetricsLog(tmp_path / "metrics.jsonl", resume_from_step=None)
        with pytest.raises(NonFiniteLoss, match=r"loss is nan at step 4; training stopped \(the last good checkpoint "
                                                r"is step 3"):
            train_loop(toy_state(), poisoned_step, iterations=10, checkpoint_every=1, checkpoints=checkpoints,
                       config={}, log=log, progress=False)
        assert checkpoints.steps() == [1, 2, 3]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_adapter_file_round_trip_and_errors(tmp_path):
    adapter = toy_state().adapter
    config = LoraConfig(rank=2, alpha=4.0, targets=r"attn2\.to_k$", init="random")
    path = save_adapter(tmp_path / "adapter.safetensors", adapter, config, extra={"concept": {"name": "x"}})
    loaded, loaded_config = load_adapter(path)
    assert loaded_config == config
    np.testing.assert_array_equal(loaded["down.attn2.to_k"]["lora_A"], adapter["down.attn2.to_k"]["lora_A"])
    assert read_adapter_metadata(path) == {"concept": {"name": "x"}}
    with pytest.raises(ValueError, match="rank 2, the config says 1"):
        save_adapter(tmp_path / "bad.safetensors", adapter, LoraConfig(rank=1, init="random"))
    from safetensors.numpy import save_file
    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an unguide-jax adapter"):
        load_adapter(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="missing adapter file"):
        load_adapter(tmp_path / "nope.safetensors")


RESHARD_SCRIPT = """
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tests.test_checkpoints import advance, assert_states_equal, toy_state
from unguide_jax.training.checkpoints import RunCheckpoints
devices = np.asarray(jax.devices())
assert devices.size == 4
def placed(tree, mesh, spec):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec(x))), tree)
wide = Mesh(devices.reshape(1, 4), ("data", "fsdp"))
state = advance(toy_state(), 3)
state = jax.device_put(state, jax.tree.map(lambda a: a.sharding, placed(state, wide, lambda x: P())))  # replicated on 4
with RunCheckpoints(CK, keep=1) as checkpoints:
    checkpoints.save(3, state, {})
    narrow = Mesh(devices[:2].reshape(1, 2), ("data", "fsdp"))
    target = placed(state, narrow, lambda x: P("fsdp") if x.ndim == 2 and x.shape[0] % 2 == 0 else P())
    restored, _ = checkpoints.restore(target)
assert_states_equal(restored, state)
b = restored.adapter["down.attn2.to_k"]["lora_B"]
assert b.sharding == NamedSharding(narrow, P("fsdp")) and len(b.addressable_shards) == 2, b.sharding
print("resharded", [s.data.shape for s in b.addressable_shards])
"""


def test_restore_reshards_onto_another_mesh(tmp_path):
    """Saved from 4 devices, restored split over 2: the target shardings decide the placement."""
    from tests.devices import ALL_CPU_DEVICES, launch

    script = f"CK = {str(tmp_path / 'ck')!r}\n" + RESHARD_SCRIPT
    (out,) = launch(["-c", script], processes=1, devices_per_process=4, timeout=300, extra_env=ALL_CPU_DEVICES)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resharded [(1, 4), (1, 4)]" in out.stdout  # lora_B (2, 4) split in two rows
