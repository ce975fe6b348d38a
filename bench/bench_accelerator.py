#!/usr/bin/env python
"""Every accelerator figure, one JSON file per run: SD 1.5's in one run, SDXL's in a second
(``bench/accelerator.sh`` runs this).

    bash bench/accelerator.sh                       # GPU/TPU: SD 1.5-size UNet, random weights; < 10 min
    bash bench/accelerator.sh --only sdxl sdxl.json # GPU/TPU: the SDXL sections only; < 10 min
    bash bench/accelerator.sh --tiny /tmp/acc.json  # any host, the CPU too: tiny UNets, the same sections and keys

Sections, in this order (JAX only, one device, random weights: the values do not change the cost):
- ``unet_forward_bfloat16``, ``unet_forward_float32``: one UNet forward over the CFG rows of a batch of
  prompts (AOT-compiled, as bench_unet.py), seconds per call, achieved TFLOP/s and MFU. fp32 runs at
  matmul precision "highest" (true fp32, no TF32), bf16 at the default.
- ``sampling``: 50-step DDIM with plain CFG, bf16, images/s.
- ``unguide``: UnGuide's per-image cost over plain CFG, with its probe (bench_unguide.py's components
  and formula: the fused sampler + the object setting's probe, R = 30 draws once per prompt and D("")
  once, amortised over N = 32 images per prompt), bf16.
- ``train_step``: the SD 1.5-size UnGuide training step (bench_memory.py's), bf16, seconds per
  iteration and the compiled step's memory_analysis bytes.
- ``sdxl_unet_forward_bfloat16``: as ``unet_forward_bfloat16``, for SDXL base 1.0's UNet (2.6 B,
  ``loading.sd_configs.SDXL_BASE``) at 128x128 latents (1024 px), the packed context (77 + 1 tokens of
  2048: the pooled text embedding and the time ids of a 1024 px image in the last token), 4 prompts.
- ``sdxl_train_step``: as ``train_step``, for the SDXL UNet at 128x128 latents, bf16, remat "blocks"
  (bench_memory.py --model sdxl's step, on one device).

``--only`` takes section names and the groups ``sd15`` (the first five) and ``sdxl`` (the last two).

Each section runs in its own ``try``: a failure (out of memory, say) is recorded as that section's
``error`` and the next section runs. The file is rewritten after every section, so a run killed at a
time limit keeps what it finished. Exit status 1 only when no section ran.

FLOPs and MFU. MFU = model FLOPs per call / seconds per call / the chip's bf16 dense peak (*_PEAK_BF16;
for fp32 too, so fp32's MFU shows what fp32 costs against the chip's best; unknown chip: null). The
model FLOPs are XLA's own count (HloCostAnalysis) of the fp32 forward, lowered for the CPU backend with
the attention unchunked (SDXL: on the packed context's 78 tokens). Not each compile's
``compiled.cost_analysis()`` figure, which is also recorded (``compiled_flops``): that count takes a
loop body once (the query-chunked attention is a ``lax.map``: on SD 1.5 at 64x64 it misses 1.8 of
12.6 TFLOP), skips cuDNN's attention kernel (bf16 on a GPU), and is not implemented before
compilation by the GPU plugin.

Time on an H100/H200-class GPU (how the 10 minutes are kept). XLA counts 0.79 TFLOP per UNet row at
64x64 (SD 1.5). At 30 % of the 989 TFLOP/s bf16 peak: a 16-row bf16 forward ~0.04 s, fp32 ("highest",
CUDA cores, ~50 TFLOP/s) ~0.3 s; 50-step sampling of 16 images (1 600 rows) ~4 s; UnGuide's round
(plain 4 s, fused 64 rows x 50 steps ~8 s, the probe of 4 prompts, 4 x 30 draws x (2 x 9 + 2) rows,
~6 s, D("") ~1.5 s) ~20 s; a training iteration (~25 CFG steps of 2 rows, then 2 UNet calls and one
backward: small batches, far from peak) ~0.5 s. The timed calls of each section stop at its budget
(SECTION_BUDGET_S, 145 s in all; at least one call after the warm-up), so they take about 3 minutes.
Compiles cannot be cut short: seven programs (two forwards, two samplers, two probe shapes, the train
step), perhaps 30-60 s each. A section is skipped when less of the run's budget (``--budget-s``, 540 s)
is left than it needs to start (SECTION_START_S), so the later sections give way, not the limit.

SDXL (``--only sdxl``, a second command: after the SD 1.5 sections the budget is expected to leave
the SDXL ones too little to start, and they are skipped). XLA counts 6.77 TFLOP per SDXL UNet row at 128x128, 8.6x SD 1.5's
0.79 at 64x64: an 8-row bf16 forward ~0.2 s at 30 % of peak; a training iteration (~25 CFG steps of
2 rows, then 2 UNet calls and one backward, the UNet blocks recomputed) ~2-4 s (SD 1.5's ~0.5 s
scaled by the FLOPs: 4 s; larger matmuls run nearer the peak). The timed calls stop at 15 s and 45
s. The compiles are the cost: the random weights' draw (2.6 B parameters), the forward, and the train
step (SDXL has 70 transformer blocks to SD 1.5's 16), perhaps 1-4 min each; the train step needs
SECTION_START_S (300 s) of the budget left to start. Memory: the one-device bf16 step needs 43 GB
by XLA CPU's analysis (docs/benchmarks.md), within an 80 GB GPU; on a smaller one it may run out of
memory, which the section records as its error.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: makes bench.* importable

from bench.bench_memory import CONTEXT_LENGTH, context_shape, unguide_train_step  # noqa: E402
from bench.bench_unet import SD15_UNET, compile_forward  # noqa: E402
from bench.bench_unguide import (  # noqa: E402
    interleaved,
    jax_components,
    jax_per_image,
    random_adapter,
)
from unguide_jax.loading.sd_configs import SDXL_BASE  # noqa: E402

# bf16 dense peak FLOP/s per chip. Sources: NVIDIA's H100, H200 and A100 datasheets (the dense figure:
# half the "with sparsity" one; H100 SXM and H200 1979/2, H100 PCIe 1513/2, H100/H200 NVL 1671/2, A100
# 312); Google Cloud TPU system-architecture pages (docs.cloud.google.com/tpu/docs/v4, v5e, v5p, v6e,
# "peak compute per chip (bf16)"). GPUs by substring of the device kind, the first match wins (PCIe and
# NVL before SXM; GH200's GPU is the H100/H200 SXM part); TPUs by the exact kind JAX reports ("TPU v5
# lite" is v5e, "TPU v5" v5p, "TPU v6 lite" v6e; "TPU v4 lite" is not a v4).
GPU_PEAK_BF16 = (("h100 pcie", 756.5e12), ("h100 nvl", 835.5e12), ("h200 nvl", 835.5e12),
                 ("h100", 989.4e12), ("h200", 989.4e12), ("a100", 312e12))
TPU_PEAK_BF16 = {"tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5": 459e12, "tpu v5p": 459e12,
                 "tpu v6 lite": 918e12, "tpu v6e": 918e12}

SECTIONS = ("unet_forward_bfloat16", "unet_forward_float32", "sampling", "unguide", "train_step",
            "sdxl_unet_forward_bfloat16", "sdxl_train_step")
# --only's groups: the SD 1.5 sections and the SDXL ones.
GROUPS = {"sd15": SECTIONS[:5], "sdxl": SECTIONS[5:]}
# Seconds of timed calls per section, after its compile and warm-up (see the module docstring).
SECTION_BUDGET_S = dict(unet_forward_bfloat16=15, unet_forward_float32=20, sampling=20, unguide=60, train_step=30,
                        sdxl_unet_forward_bfloat16=15, sdxl_train_step=45)
# Seconds of the run's budget a section needs left to start: compile(s), warm-up and one timed round.
SECTION_START_S = dict(unet_forward_bfloat16=45, unet_forward_float32=45, sampling=60, unguide=150, train_step=120,
                       sdxl_unet_forward_bfloat16=150, sdxl_train_step=300)
# The SDXL UnGuide step's remat policy (the SD 1.5 step's is off).
SDXL_TRAIN_REMAT = "blocks"
# Most numbers in the random weights' one normal draw (Bench.params): 512 MB of fp32.
MAX_DRAW = 2**27


def peak_bf16_flops(device_kind: str) -> float | None:
    """The chip's bf16 dense peak in FLOP/s, None for a chip not in the tables."""
    kind = device_kind.strip().lower()
    if kind.startswith("tpu"):
        return TPU_PEAK_BF16.get(kind)
    return next((peak for pattern, peak in GPU_PEAK_BF16 if pattern in kind), None)


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str
    unet: dict                # diffusers UNet config
    latent: int               # latent height and width
    forward_batch: int        # prompts: the forward runs over their 2x CFG rows
    sample_batch: int         # images per sampler call (sampling and unguide)
    steps: int                # DDIM steps
    probe_prompts: int
    probe_draws: int          # R, object setting
    images_per_prompt: int    # N, over which the probe is amortised
    repeats: int              # most timed calls per component
    budget_scale: float       # x SECTION_BUDGET_S and SECTION_START_S


FULL = Settings(model="SD 1.5 UNet (860M), random weights", unet=SD15_UNET, latent=64, forward_batch=8,
                sample_batch=16, steps=50, probe_prompts=4, probe_draws=30, images_per_prompt=32, repeats=20,
                budget_scale=1.0)
# The SDXL sections: a forward and the train step (the sampler fields are not used).
FULL_SDXL = dataclasses.replace(FULL, model="SDXL base 1.0 UNet (2.6B), random weights", unet=SDXL_BASE.unet,
                                latent=128, forward_batch=4)

# A tiny UNet of SDXL's layout: a first level without attention, per-level transformer depth, linear
# projections, the text_time add-embedding (pooled text 24 wide + 6 time ids of 8 features each).
TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
    norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
    attention_head_dim=(2, 2, 4), transformer_layers_per_block=(1, 2, 2), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8,
)


def tiny_settings() -> Settings:
    """The same sections on a tiny UNet. One probed prompt, so that the probe and D("") share one
    compiled shape."""
    from unguide_jax.loading.diffusers_folder import component_config_dict
    from unguide_jax.loading.random_model import tiny_configs

    return Settings(model="tiny random UNet (loading.random_model), random weights",
                    unet=component_config_dict("unet", tiny_configs()[0]), latent=8, forward_batch=2, sample_batch=2,
                    steps=4, probe_prompts=1, probe_draws=2, images_per_prompt=32, repeats=2, budget_scale=0.1)


def tiny_sdxl_settings() -> Settings:
    """The SDXL sections on a tiny UNet of SDXL's layout (TINY_SDXL_UNET)."""
    return dataclasses.replace(tiny_settings(), model="tiny random SDXL-layout UNet, random weights",
                               unet=TINY_SDXL_UNET)


def selected_sections(only: str) -> list[str]:
    """--only's comma-separated section names and groups (GROUPS) -> section names in SECTIONS' order
    (empty: all); ValueError for an unknown name."""
    names = [name.strip() for name in only.split(",") if name.strip()]
    unknown = sorted(set(names) - set(SECTIONS) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}: choose from {', '.join(SECTIONS)} or the groups "
                         f"{', '.join(GROUPS)}")
    chosen = {section for name in names for section in GROUPS.get(name, (name,))}
    return [name for name in SECTIONS if name in chosen]


@contextlib.contextmanager
def unchunked_attention():
    """Attention traced without query chunks (the FLOP count needs no loops; nothing runs)."""
    from unguide_jax.models import layers

    saved, layers.ATTENTION_SCORE_BYTES = layers.ATTENTION_SCORE_BYTES, 2**62
    try:
        yield
    finally:
        layers.ATTENTION_SCORE_BYTES = saved


class Bench:
    """The settings, the UNet modules and their random parameters, built on first use."""

    def __init__(self, settings: Settings):
        self.s = settings
        self._params: dict = {}
        self._flops_per_row: float | None = None
        self.flops_error: str | None = None
        import jax.numpy as jnp

        self.dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

    def unet(self, dtype: str, remat: str = ""):
        from unguide_jax.models.unet import UNet2DConditionModel, UNetConfig

        jdtype = self.dtypes[dtype]
        return UNet2DConditionModel(UNetConfig.from_dict(self.s.unet), dtype=jdtype, param_dtype=jdtype, remat=remat)

    @property
    def width(self) -> int:
        return int(self.s.unet["cross_attention_dim"])

    @property
    def config(self):
        from unguide_jax.models.unet import UNetConfig

        return UNetConfig.from_dict(self.s.unet)

    @property
    def tokens(self) -> int:
        """Context tokens: 77, and for an SDXL (text_time) UNet one more, the packed pooled text and time ids."""
        return context_shape(self.config)[1]

    @property
    def channels(self) -> int:
        return int(self.s.unet.get("in_channels", 4))

    def params(self, dtype: str):
        """Random weights (N(0, 0.02) kernels, unit norm scales, zero biases), drawn on the device in one
        jitted call from one normal draw (a draw per leaf makes a program that compiles for a minute on
        the CPU), and no UNet forward compiled for them, as ``unet.init`` would. The draw holds at most
        MAX_DRAW numbers, which the kernels reuse cyclically when they have more (SDXL's 2.6 B drawn at
        once: an fp32 array of 10 GB with more elements than an int32 indexes, and a 22 GB peak on the
        CPU, against 8 GB and half the time with the pool; the values do not change the cost)."""
        if dtype not in self._params:
            import jax
            import jax.numpy as jnp

            from unguide_jax.models.layers import abstract_params

            unet = self.unet(dtype)
            leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params(unet, *unet.init_inputs()))
            names = [str(getattr(path[-1], "key", path[-1])) for path, _ in leaves]
            drawn = sum(math.prod(leaf.shape) for (_, leaf), name in zip(leaves, names) if name not in ("scale", "bias"))
            pool = min(drawn, MAX_DRAW)

            @jax.jit
            def draw(key):
                flat, offset, out = 0.02 * jax.random.normal(key, (pool,), jnp.float32), 0, []
                for (_, leaf), name in zip(leaves, names):
                    if name in ("scale", "bias"):
                        out.append((jnp.ones if name == "scale" else jnp.zeros)(leaf.shape, leaf.dtype))
                        continue
                    size = math.prod(leaf.shape)
                    start = offset % (pool - size + 1)  # fits: the largest kernel (SD 1.5, SDXL) has 29.5 M
                    out.append(flat[start:start + size].reshape(leaf.shape).astype(leaf.dtype))
                    offset += size
                return treedef.unflatten(out)

            self._params[dtype] = jax.block_until_ready(draw(jax.random.key(0)))
        return self._params[dtype]

    def drop(self, dtype: str) -> None:
        self._params.pop(dtype, None)

    def flops_per_row(self) -> float | None:
        """XLA's FLOP count of one UNet row's forward at the bench's latent size (module docstring); None,
        and ``flops_error`` set, when the count fails (the timings stand without it)."""
        if self._flops_per_row is None and self.flops_error is None:
            try:
                self._flops_per_row = self._count_flops_per_row()
            except Exception as error:  # noqa: BLE001 (a missing count must not lose the section's timings)
                self.flops_error = "".join(traceback.format_exception_only(error)).strip()[-2000:]
        return self._flops_per_row

    def _count_flops_per_row(self) -> float:
        import jax
        import jax.numpy as jnp
        from jax.sharding import SingleDeviceSharding

        from unguide_jax.models.layers import abstract_params

        on_cpu = SingleDeviceSharding(jax.devices("cpu")[0])
        unet = self.unet("float32")
        rows = 2 * self.s.forward_batch

        def spec(shape):
            return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=on_cpu)

        params = jax.tree.map(lambda a: spec(a.shape), abstract_params(unet, *unet.init_inputs()))
        with unchunked_attention():
            lowered = jax.jit(lambda p, x, c: unet.apply({"params": p}, x, 500, c)).lower(
                params, spec((rows, self.s.latent, self.s.latent, self.channels)),
                spec((rows, self.tokens, self.width)))
        return float(lowered.cost_analysis()["flops"]) / rows

    def contexts(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        """Random text states (B, 77, D), fp32; for an SDXL UNet packed (``models.unet.pack_context``) with
        a random pooled embedding and the time ids of a (latent x 8) px image, (B, 78, D)."""
        from unguide_jax.models.unet import pack_context, size_time_ids

        states = rng.standard_normal((batch, CONTEXT_LENGTH, self.width), dtype=np.float32)
        pooled = self.config.pooled_dim
        if pooled is None:
            return states
        px = 8 * self.s.latent
        time_ids = np.tile(np.array(size_time_ids(px, px), np.float32), (batch, 1))
        return np.asarray(pack_context(states, rng.standard_normal((batch, pooled), dtype=np.float32), time_ids))

    def prompts(self, batch: int):
        """(cond (B, T, D), uncond (B, T, D): one row repeated, x_T (B, h, w, c)), fp32, fixed per batch;
        T = 77 (SDXL: 78, ``contexts``)."""
        import jax.numpy as jnp

        rng = np.random.default_rng(batch)
        cond = self.contexts(rng, batch)
        uncond = np.repeat(self.contexts(rng, 1), batch, axis=0)
        x_T = rng.standard_normal((batch, self.s.latent, self.s.latent, self.channels), dtype=np.float32)
        return jnp.asarray(cond), jnp.asarray(uncond), jnp.asarray(x_T)


def throughput(bench: Bench, rows: int, seconds: float, peak: float | None) -> dict:
    """Model FLOPs of ``rows`` UNet rows done in ``seconds``, as TFLOP/s and MFU (None where unknown)."""
    per_row = bench.flops_per_row()
    if per_row is None:
        return dict(model_flops=None, tflops_per_s=None, mfu=None, flops_error=bench.flops_error)
    achieved = per_row * rows / seconds
    return dict(model_flops=per_row * rows, tflops_per_s=achieved / 1e12, mfu=achieved / peak if peak else None,
                flops_error=None)


def unet_forward(bench: Bench, dtype: str, budget_s: float, peak: float | None) -> dict:
    import jax
    import jax.numpy as jnp

    s, rows = bench.s, 2 * bench.s.forward_batch
    unet, params = bench.unet(dtype), bench.params(dtype)
    cond, uncond, x_T = bench.prompts(s.forward_batch)
    jdtype = bench.dtypes[dtype]
    sample = jnp.concatenate([x_T, x_T]).astype(jdtype)
    context = jnp.concatenate([uncond, cond]).astype(jdtype)
    precision = "highest" if dtype == "float32" else "default"
    started = time.perf_counter()
    with jax.default_matmul_precision(precision):
        compiled = compile_forward(unet, params, sample, context)
    compile_s = time.perf_counter() - started
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    first, timing = interleaved({"forward": lambda: compiled(params, sample, 500, context)}, s.repeats, budget_s)
    seconds = timing["forward"]["wall_median_s"]
    return dict(model=s.model, dtype=dtype, matmul_precision=precision, batch=s.forward_batch, unet_rows=rows,
                latent=s.latent, context_tokens=bench.tokens, compile_s=compile_s, warmup_s=first["forward"],
                seconds_per_call=seconds,
                calls=timing["forward"]["calls"], compiled_flops=float(cost["flops"]) if cost and "flops" in cost else None,
                **throughput(bench, rows, seconds, peak))


def sampling(bench: Bench, budget_s: float, peak: float | None) -> dict:
    import jax.numpy as jnp

    from unguide_jax.diffusion.sampler import sample_latents
    from unguide_jax.diffusion.schedulers import SchedulerConfig

    s, b = bench.s, bench.s.sample_batch
    unet, params = bench.unet("bfloat16"), bench.params("bfloat16")
    cond, uncond, x_T = bench.prompts(b)
    scales, seeds = jnp.full((b,), 7.5), jnp.arange(b)
    # Called through the jit (not AOT) so that the unguide section's plain sampler, the same call, reuses
    # this compile; the first call's time includes it.
    first, timing = interleaved({"plain CFG": lambda: sample_latents(
        unet, SchedulerConfig(), s.steps, 0.0, params, cond, uncond, x_T, scales, seeds)}, s.repeats, budget_s)
    seconds = timing["plain CFG"]["wall_median_s"]
    return dict(dtype="bfloat16", batch=b, unet_rows_per_step=2 * b, steps=s.steps, latent=s.latent,
                first_call_s=first["plain CFG"], seconds_per_batch=seconds, calls=timing["plain CFG"]["calls"],
                images_per_s=b / seconds, **throughput(bench, s.steps * 2 * b, seconds, peak))


def unguide(bench: Bench, budget_s: float) -> dict:
    from unguide_jax.diffusion.schedulers import SchedulerConfig
    from unguide_jax.edits.edit import lora_edit
    from unguide_jax.edits.lora import LoraConfig

    s, b = bench.s, bench.s.sample_batch
    unet, params = bench.unet("bfloat16"), bench.params("bfloat16")
    cond, uncond, x_T = bench.prompts(b)
    lora = LoraConfig(rank=1, alpha=8.0, targets="object", init="random")
    edit = lora_edit(random_adapter(params, lora, np.random.default_rng(0)), lora.alpha)
    components = jax_components(unet, SchedulerConfig(), params, edit, cond, uncond, x_T, s.steps, s.probe_draws,
                                s.probe_prompts, split=False, i2p=False)
    # Two timed rounds at most, as bench_unguide.py: a round is the costliest of all the sections.
    first, timing = interleaved(components, min(s.repeats, 2), budget_s)
    wall = {name: t["wall_median_s"] for name, t in timing.items()}
    per_image = jax_per_image(wall, b, s.probe_prompts, s.images_per_prompt, s.probe_draws)
    with_probe = per_image[f"UnGuide fused + probe R={s.probe_draws} once per prompt, N={s.images_per_prompt}"]
    sampling_only = per_image["UnGuide fused, sampling only"]
    plain = per_image["plain CFG"]
    return dict(dtype="bfloat16", batch=b, steps=s.steps, latent=s.latent, probe_prompts=s.probe_prompts,
                probe_draws=s.probe_draws, images_per_prompt=s.images_per_prompt, plain_cfg_s_per_image=plain,
                unguide_s_per_image=with_probe, unguide_sampling_only_s_per_image=sampling_only,
                unguide_over_plain=with_probe / plain, sampling_only_over_plain=sampling_only / plain,
                component_s=wall, calls=min(t["calls"] for t in timing.values()), first_call_s=first)


def train_step(bench: Bench, budget_s: float, remat: str = "") -> dict:
    import jax
    import jax.numpy as jnp

    from unguide_jax.diffusion.memory import needed_bytes
    from unguide_jax.erasers.unguide.objective import (
        ConceptEmbeddings,
        ObjectiveConfig,
        num_sampling_steps,
    )
    from unguide_jax.erasers.unguide.train_step import init_train_state

    s = bench.s
    # remat changes what the backward pass recomputes, not the parameters: the same random weights serve.
    unet, params = bench.unet("bfloat16", remat), bench.params("bfloat16")
    step, lora_config, optimizer, _ = unguide_train_step(unet, 1, s.latent)
    state = init_train_state(jax.random.key(0), params, lora_config, optimizer)
    rng = np.random.default_rng(1)
    target, reference, uncond = (jnp.asarray(bench.contexts(rng, 1)) for _ in range(3))
    embeddings = ConceptEmbeddings(target=target, reference=reference, uncond=uncond)
    started = time.perf_counter()
    compiled = step.lower(state, params, embeddings).compile()
    compile_s = time.perf_counter() - started
    stats = compiled.memory_analysis()
    memory = None if stats is None else dict(
        argument_bytes=int(stats.argument_size_in_bytes), output_bytes=int(stats.output_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes), alias_bytes=int(getattr(stats, "alias_size_in_bytes", 0)),
        generated_code_bytes=int(getattr(stats, "generated_code_size_in_bytes", 0)), total_bytes=needed_bytes(compiled))
    carry, t_enc = {"state": state}, []

    def one_iteration():
        carry["state"], metrics = compiled(carry["state"], params, embeddings)  # the step donates its state
        t_enc.append(metrics["t_enc"])
        return carry["state"], metrics

    first, timing = interleaved({"train step": one_iteration}, s.repeats, budget_s)
    # The trajectory's length is drawn per iteration (t_enc): the mean of the timed ones says how much
    # sampling the median stands for.
    steps = [int(num_sampling_steps(ObjectiveConfig(), int(t))) for t in jax.device_get(t_enc[1:])]
    return dict(model=s.model, dtype="bfloat16", remat=remat or "off", batch=1, latent=s.latent,
                context_tokens=bench.tokens, lora="rank 1, attn2 K/V (object)", compile_s=compile_s,
                warmup_s=first["train step"], seconds_per_iteration=timing["train step"]["wall_median_s"],
                seconds_per_iteration_mean=timing["train step"]["wall_mean_s"], calls=timing["train step"]["calls"],
                mean_sampling_steps=float(np.mean(steps)), memory_analysis=memory)


def write(report: dict, out: Path) -> None:
    from unguide_jax.parallel.hosts import is_main_process

    if not is_main_process():
        return
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)


def summary(name: str, entry: dict) -> str:
    if entry["status"] != "ok":
        return f"{name}: {entry['status']}: {entry.get('error')}"
    mfu = lambda e: "n/a" if e.get("mfu") is None else f"{100 * e['mfu']:.1f} %"  # noqa: E731
    if "unet_forward" in name:
        return (f"{name}: {entry['seconds_per_call']:.4f} s per call ({entry['unet_rows']} rows), "
                f"{entry['tflops_per_s']:.1f} TFLOP/s, MFU {mfu(entry)}")
    if name == "sampling":
        return f"sampling: {entry['images_per_s']:.2f} images/s ({entry['steps']} steps, batch {entry['batch']}), MFU {mfu(entry)}"
    if name == "unguide":
        return (f"unguide: {entry['unguide_s_per_image']:.4f} s per image with the probe, "
                f"{entry['unguide_over_plain']:.2f}x plain CFG ({entry['plain_cfg_s_per_image']:.4f} s)")
    memory = entry["memory_analysis"] or {}
    total = memory.get("total_bytes")
    return (f"{name}: {entry['seconds_per_iteration']:.3f} s per iteration (median), "
            f"{'n/a' if total is None else f'{total / 2**30:.2f} GiB'} per the memory analysis")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default="bench-accelerator.json", help="the JSON file to write")
    parser.add_argument("--tiny", action="store_true", help="tiny UNets, 8x8 latents, 4 steps: checks the run anywhere")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="the whole run's time budget: a section that would start with less left than it needs is skipped")
    parser.add_argument("--only", default="", help=f"comma-separated sections to run (of {', '.join(SECTIONS)}), "
                                                   f"or groups of them ({', '.join(GROUPS)})")
    args = parser.parse_args()
    try:
        only = selected_sections(args.only)
    except ValueError as error:
        parser.error(str(error))
    if args.budget_s <= 0:
        parser.error("--budget-s must be > 0")
    out = Path(args.out)
    if not out.parent.is_dir():
        parser.error(f"the output's folder {out.parent} does not exist")
    started = time.perf_counter()

    import jax
    import jaxlib.version

    from unguide_jax.diffusion.memory import bytes_per_device

    settings, sdxl_settings = (tiny_settings(), tiny_sdxl_settings()) if args.tiny else (FULL, FULL_SDXL)
    if args.tiny:
        # What the tiny run checks is the code path, not the figures: XLA's optimisations off roughly
        # halve its compiles, most of its time on a CPU (as tests/conftest.py does for the suite).
        jax.config.update("jax_disable_most_optimizations", True)
    bench, sdxl_bench = Bench(settings), Bench(sdxl_settings)
    device = jax.devices()[0]
    peak = peak_bf16_flops(device.device_kind)
    report = dict(
        tiny=args.tiny, started_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device_kind=device.device_kind, platform=device.platform, device_count=jax.device_count(),
        devices_used=1, process_count=jax.process_count(), jax_version=jax.__version__,
        jaxlib_version=jaxlib.version.__version__,
        device_memory_bytes=bytes_per_device(), peak_bf16_flops_per_device=peak,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        xla_most_optimizations_disabled=bool(jax.config.read("jax_disable_most_optimizations")), model=settings.model,
        latent=settings.latent, sdxl_model=sdxl_settings.model, sdxl_latent=sdxl_settings.latent,
        budget_s=args.budget_s, wall_s=None, sections={name: dict(status="not run", error=None) for name in SECTIONS})
    print(f"JAX {jax.__version__} on {jax.device_count()} x {device.device_kind} ({device.platform}); "
          f"bf16 peak {'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}; {settings.model}; "
          f"SDXL sections: {sdxl_settings.model}; writing {out}", flush=True)
    write(report, out)

    def budget(name: str) -> float:
        """Seconds of timed calls: the section's own budget, less if the run's would not leave its start
        allowance (compile and warm-up) for them."""
        left = args.budget_s - (time.perf_counter() - started)
        return max(0.0, min(SECTION_BUDGET_S[name], left - SECTION_START_S[name]) * settings.budget_scale)

    runs = dict(
        unet_forward_bfloat16=lambda: unet_forward(bench, "bfloat16", budget("unet_forward_bfloat16"), peak),
        unet_forward_float32=lambda: unet_forward(bench, "float32", budget("unet_forward_float32"), peak),
        sampling=lambda: sampling(bench, budget("sampling"), peak),
        unguide=lambda: unguide(bench, budget("unguide")),
        train_step=lambda: train_step(bench, budget("train_step")),
        sdxl_unet_forward_bfloat16=lambda: unet_forward(sdxl_bench, "bfloat16", budget("sdxl_unet_forward_bfloat16"),
                                                        peak),
        sdxl_train_step=lambda: train_step(sdxl_bench, budget("sdxl_train_step"), SDXL_TRAIN_REMAT),
    )
    for name in SECTIONS:
        if only and name not in only:
            report["sections"][name] = dict(status="skipped", error="not in --only")
            continue
        left = args.budget_s - (time.perf_counter() - started)
        needs = SECTION_START_S[name] * settings.budget_scale
        if left < needs:
            report["sections"][name] = dict(status="skipped", error=f"{left:.0f} s of the run's budget left, "
                                                                     f"the section needs about {needs:.0f} s to start")
        else:
            report["sections"][name] = dict(status="running", error=None)
            write(report, out)
            section_started = time.perf_counter()
            try:
                entry = dict(status="ok", error=None, **runs[name]())
            except Exception as error:  # noqa: BLE001 (one section's failure, e.g. out of memory, must not end the run)
                entry = dict(status="error", error="".join(traceback.format_exception_only(error)).strip()[-4000:])
            entry["section_s"] = time.perf_counter() - section_started
            report["sections"][name] = entry
        if name == "unet_forward_float32":
            bench.drop("float32")  # the later sections are bf16
        if name == "train_step":
            bench.drop("bfloat16")  # the SDXL sections have their own weights
        report["wall_s"] = time.perf_counter() - started
        write(report, out)
        print(summary(name, report["sections"][name]), flush=True)
    ran = [name for name, entry in report["sections"].items() if entry["status"] == "ok"]
    print(f"{len(ran)} of {len(SECTIONS)} sections ran in {report['wall_s']:.0f} s; wrote {out}")
    if not ran:
        sys.exit(1)


if __name__ == "__main__":
    main()
