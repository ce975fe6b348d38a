"""XLA:CPU gives wrong values when programs run on two CPU devices of one process at the same time.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/xla_cpu_concurrency_repro.py [DIR]
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/xla_cpu_concurrency_repro.py --replay DIR

docs/xla-cpu-concurrent-devices.md has the write-up. No sharding and no collectives: one jitted DDIM sampler
(a tiny random Stable Diffusion UNet, 10 rows, 10 steps, classifier-free guidance), compiled for device 0 and
for device 1 with the same inputs, is run

- one device at a time (each call waited for): both equal the first result, bit for bit, every time;
- on both devices at once (dispatched back to back, then waited for): rows at the edges of the batch
  differ, by up to about 4, and by different amounts from call to call.

The first form builds the sampler with this package and also writes it to DIR as serialized StableHLO
(``jax.export``) with its inputs; ``--replay DIR`` runs that file with jax and numpy alone, for a report to
XLA. Either prints one JSON line: the largest difference from the first result per row, for each way.
"""
import json
import sys
from pathlib import Path

import jax
import numpy as np


def compare(run, args, rows: int, calls: int = 4) -> dict:
    assert jax.local_device_count() >= 2, "run with XLA_FLAGS=--xla_force_host_platform_device_count=2"
    placed = [jax.device_put(args, d) for d in jax.local_devices()[:2]]
    first = np.asarray(run(*placed[0]))

    def worst(outputs):
        return np.max([np.abs(np.asarray(o) - first).reshape(rows, -1).max(axis=1) for o in outputs], axis=0)

    one_at_a_time = np.zeros(rows)
    at_once = np.zeros(rows)
    for _ in range(calls):
        one_at_a_time = np.maximum(one_at_a_time, worst([jax.block_until_ready(run(*a)) for a in placed]))
        at_once = np.maximum(at_once, worst([run(*a) for a in placed]))
    return dict(jax=jax.__version__, one_at_a_time=one_at_a_time.tolist(), at_once=at_once.tolist())


def build(folder: Path):
    """A tiny random Stable Diffusion model and the sampler's inputs: (model, inputs, rows)."""
    from unguide_jax.loading.random_model import ensure_random_model
    from unguide_jax.loading.resolve import load_model

    sd = load_model(str(ensure_random_model(folder / "model", seed=0)))
    rows = 10
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((rows, *sd.latent_shape(None, None))).astype(np.float32)
    cond = np.asarray(sd.encode_prompts([f"prompt {i}" for i in range(rows)]))
    uncond = np.asarray(sd.encode_prompts([""] * rows))
    params = jax.tree.map(np.asarray, sd.params["unet"])
    return sd, (params, cond, uncond, latents, np.full((rows,), 7.5, np.float32), np.arange(rows, dtype=np.uint32)), rows


def export(sd, args, folder: Path) -> None:
    """The sampler as serialized StableHLO (compiler options are not part of it: replay sets them), and its
    inputs as flat arrays: all that --replay needs."""
    from unguide_jax.diffusion.sampler import sample_latents

    unwrapped = sample_latents.__wrapped__
    exported = jax.export.export(jax.jit(lambda *a: unwrapped(sd.unet, sd.scheduler, 10, 0.0, *a)))(*args)
    (folder / "sampler.stablehlo").write_bytes(exported.serialize())
    np.savez(folder / "inputs.npz", **{f"{i:04d}": leaf for i, leaf in enumerate(jax.tree.leaves(args))})


def replay(folder: Path) -> dict:
    exported = jax.export.deserialize(bytearray((folder / "sampler.stablehlo").read_bytes()))
    with np.load(folder / "inputs.npz") as saved:
        leaves = [saved[k] for k in sorted(saved.files)]
    args = jax.tree.unflatten(exported.in_tree, leaves)[0]
    # The sampler's former XLA option (YNNPACK fusions off: convolutions through XLA's own runtime); with XLA's
    # defaults this program stays right, though the package's full sampling path did not.
    run = jax.jit(lambda *a: exported.call(*a), compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""})
    return compare(run, args, rows=leaves[-1].shape[0])


def main(argv: list[str]) -> dict:
    if argv[:1] == ["--replay"]:
        return replay(Path(argv[1]))
    folder = Path(argv[0] if argv else ".cache/xla-repro")
    folder.mkdir(parents=True, exist_ok=True)
    from unguide_jax.diffusion.sampler import sample_latents

    sd, args, rows = build(folder)
    export(sd, args, folder)
    return compare(lambda *a: sample_latents(sd.unet, sd.scheduler, 10, 0.0, *a), args, rows)


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
