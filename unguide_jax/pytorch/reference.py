"""A plain PyTorch/diffusers reference of one UnGuide training iteration (the UnGuide/ESD reference code's LoRA, objective and timesteps).

Written from the paper and its reference code, not from our JAX code, so that the parity test and the benchmark compare two
independent implementations. The random draws (x_T, t_enc, t) are arguments: the caller feeds the
same values to the JAX side.

One iteration:
  1. z = DDIM (eta 0) from x_T with the *LoRA* model, CFG ``start_guidance`` on the target prompt,
     stopped early at t_enc (where exactly depends on the timestep mode, see ``iteration_timesteps``);
     no gradient.
  2. e0 = eps_base(z, t, reference), ep = eps_base(z, t, target) with the frozen base model.
  3. eps* = e0 - gamma (ep - e0); loss = MSE(eps_lora(z, t, target), eps*); one Adam step on A, B only.

LoRA: y = W x + b + alpha (x A) B with A (in, r), B (r, out): alpha multiplies directly (no alpha/r).
The frozen base is the same UNet with its adapters switched off, which is the reference's separate
frozen copy without a second set of weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Iterator, Mapping

import numpy as np
import torch

# The object rule: the cross-attention key and value projections of every transformer block.
OBJECT_TARGETS = r"\.attn2\.to_[kv]$"
DDIM_STEPS = 50
TIMESTEP_MODES = ("corrected", "reference")


class LoraLinear(torch.nn.Module):
    """nn.Linear plus alpha (x A) B; the wrapped base layer is frozen."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.alpha = float(alpha)
        self.enabled = True
        # The reference's init (A with std 1/√r, as unguide_jax.edits.lora; B = 0, so training starts at the base
        # model). Comparisons overwrite both with the JAX side's values (set_adapter).
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = torch.nn.Parameter(torch.randn(base.in_features, rank, **like) / rank ** 0.5)
        self.lora_B = torch.nn.Parameter(torch.zeros(rank, base.out_features, **like))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.enabled:
            y = y + self.alpha * ((x @ self.lora_A) @ self.lora_B)
        return y


def add_lora(unet: torch.nn.Module, rank: int = 1, alpha: float = 8.0,
             targets: str = OBJECT_TARGETS) -> dict[str, LoraLinear]:
    """Freeze ``unet`` and wrap every Linear whose module path matches ``targets``; returns path -> wrapper."""
    unet.requires_grad_(False)
    regex = re.compile(targets)
    chosen = [name for name, mod in unet.named_modules() if regex.search(name) and isinstance(mod, torch.nn.Linear)]
    if not chosen:
        raise ValueError(f"LoRA targets {targets!r} match no Linear layer of the UNet")
    wrappers = {}
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        wrappers[name] = LoraLinear(getattr(parent, child), rank, alpha)
        setattr(parent, child, wrappers[name])
    return wrappers


def set_adapter(wrappers: Mapping[str, LoraLinear], adapter: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Load adapter values ({path: {"lora_A": (in, r), "lora_B": (r, out)}}, our JAX layout) into the wrappers."""
    if set(adapter) != set(wrappers):
        raise ValueError(f"adapter paths differ from the LoRA layers: only in the adapter "
                         f"{sorted(set(adapter) - set(wrappers))}, only in the model {sorted(set(wrappers) - set(adapter))}")
    with torch.no_grad():
        for path, mod in wrappers.items():
            for leaf in ("lora_A", "lora_B"):
                value = torch.tensor(np.asarray(adapter[path][leaf]), dtype=getattr(mod, leaf).dtype,
                                     device=getattr(mod, leaf).device)
                if value.shape != getattr(mod, leaf).shape:
                    raise ValueError(f"{path}.{leaf}: shape {tuple(value.shape)}, "
                                     f"the layer needs {tuple(getattr(mod, leaf).shape)}")
                getattr(mod, leaf).copy_(value)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().copy()


def get_adapter(wrappers: Mapping[str, LoraLinear]) -> dict[str, dict[str, np.ndarray]]:
    return {path: {"lora_A": _numpy(mod.lora_A), "lora_B": _numpy(mod.lora_B)} for path, mod in wrappers.items()}


def get_gradients(wrappers: Mapping[str, LoraLinear]) -> dict[str, dict[str, np.ndarray]]:
    return {path: {"lora_A": _numpy(mod.lora_A.grad), "lora_B": _numpy(mod.lora_B.grad)} for path, mod in wrappers.items()}


def lora_parameters(wrappers: Mapping[str, LoraLinear]) -> list[torch.nn.Parameter]:
    return [p for mod in wrappers.values() for p in (mod.lora_A, mod.lora_B)]


@contextlib.contextmanager
def adapters_off(wrappers: Mapping[str, LoraLinear]) -> Iterator[None]:
    """The frozen base model for the duration of the block."""
    for mod in wrappers.values():
        mod.enabled = False
    try:
        yield
    finally:
        for mod in wrappers.values():
            mod.enabled = True


def make_adam(wrappers: Mapping[str, LoraLinear], learning_rate: float = 3e-5) -> torch.optim.Adam:
    """The paper's optimiser: Adam beta 0.9/0.999, eps 1e-8, no weight decay, no schedule, no clipping."""
    return torch.optim.Adam(lora_parameters(wrappers), lr=learning_rate, betas=(0.9, 0.999), eps=1e-8)


def make_scheduler(num_train_timesteps: int = 1000, prediction_type: str = "epsilon"):
    """The reference's DDIM: scaled-linear betas 0.00085..0.012, tau = 1 + 20 i, alpha_prev(tau_0) = alpha_0 (ESD's sampler)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    scheduler.set_timesteps(DDIM_STEPS)
    return scheduler


def iteration_timesteps(scheduler, mode: str, t_enc: int, t: int) -> tuple[list[int], int]:
    """(DDIM timesteps run from x_T, the timestep the three UNet queries are told) for one iteration.

    ``scheduler.timesteps`` is tau_49..tau_0 = 981, 961, ..., 1.
    reference (the ESD/UnGuide code): the sampler drops 981 and treats x_T as the latent at 961
      (quirk 1); stopping at t_enc = k runs min(50 - k, 49) steps (quirk 2); the queries use the
      drawn t in [20k, 20k + 19] (quirk 3), 39-58 steps noisier than z is.
    corrected: the full schedule from 981; stopping at t_enc = k runs 49 - k steps, so z is at
      noise level tau_k = 20k + 1, and the queries use t = tau_k (any other t is an error).
    """
    taus = [int(x) for x in scheduler.timesteps]
    if len(taus) != DDIM_STEPS:
        raise ValueError(f"the scheduler has {len(taus)} timesteps set, the objective needs {DDIM_STEPS}")
    if not 0 <= t_enc < DDIM_STEPS:
        raise ValueError(f"t_enc must be in [0, {DDIM_STEPS - 1}], got {t_enc}")
    if mode == "reference":
        stride = scheduler.config.num_train_timesteps // DDIM_STEPS
        if not stride * t_enc <= t < stride * (t_enc + 1):
            raise ValueError(f"t = {t} is outside [{stride * t_enc}, {stride * (t_enc + 1) - 1}] for t_enc = {t_enc}")
        sampled = taus[1:]
        return sampled[: min(DDIM_STEPS - t_enc, len(sampled))], int(t)
    if mode == "corrected":
        tau = taus[DDIM_STEPS - 1 - t_enc]
        if t != tau:
            raise ValueError(f"corrected mode queries at tau_k = {tau} for t_enc = {t_enc}, got t = {t}")
        return taus[: DDIM_STEPS - 1 - t_enc], tau
    raise ValueError(f"timestep mode must be one of {TIMESTEP_MODES}, got {mode!r}")


@dataclasses.dataclass(frozen=True)
class TorchObjective:
    start_guidance: float = 9.0
    negative_guidance: float = 2.0
    timestep_mode: str = "corrected"


def _eps(unet, z: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
    timestep = torch.full((z.shape[0],), int(t), dtype=torch.long, device=z.device)
    return unet(z, timestep, context).sample


@torch.no_grad()
def partial_ddim(unet, scheduler, x_T: torch.Tensor, timesteps: list[int], cond: torch.Tensor, uncond: torch.Tensor,
                 guidance: float) -> torch.Tensor:
    """DDIM (eta 0) with CFG over ``timesteps``; both CFG branches in one batched UNet call."""
    z = x_T
    context = torch.cat([uncond, cond])
    for t in timesteps:
        out_uncond, out_cond = _eps(unet, torch.cat([z, z]), t, context).chunk(2)
        z = scheduler.step(out_uncond + guidance * (out_cond - out_uncond), t, z, eta=0.0).prev_sample
    return z


def unguide_iteration(unet, wrappers: Mapping[str, LoraLinear], optimizer: torch.optim.Optimizer | None, scheduler,
                      objective: TorchObjective, x_T: torch.Tensor, t_enc: int, t: int, target: torch.Tensor,
                      reference: torch.Tensor, uncond: torch.Tensor) -> dict[str, object]:
    """One UnGuide iteration (batch 1). Tensors are NCHW latents and (1, L, D) text embeddings.

    Leaves the gradients in the LoRA parameters; takes an Adam step when ``optimizer`` is given.
    Returns the loss, the latent z the queries saw, and the timesteps used.
    """
    sample_steps, query_t = iteration_timesteps(scheduler, objective.timestep_mode, t_enc, t)
    z = partial_ddim(unet, scheduler, x_T, sample_steps, target, uncond, objective.start_guidance)
    with torch.no_grad(), adapters_off(wrappers):
        e0 = _eps(unet, z, query_t, reference)
        ep = _eps(unet, z, query_t, target)
    goal = e0 - objective.negative_guidance * (ep - e0)
    for p in lora_parameters(wrappers):
        p.grad = None
    loss = torch.nn.functional.mse_loss(_eps(unet, z, query_t, target), goal)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return {"loss": float(loss.detach()), "z": z, "sample_steps": sample_steps, "query_t": query_t}


# --- UnGuidance: the w probe and the mixed sampler, one prompt at a time -----------------------

@torch.no_grad()
def probe_prompt(unet, wrappers: Mapping[str, LoraLinear], scheduler, mode: str, t_enc: int, x_T: torch.Tensor,
                 t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> np.ndarray:
    """‖eps_lora(z_p, t, p) − eps_base(z_p, t, p)‖₂ for each of the R draws (x_T (R, C, H, W), t (R,)) of one prompt.

    z_p: the *base* model's DDIM with CFG on p from x_T, stopped at t_enc as the training iteration
    stops (``iteration_timesteps``); the draws of one prompt go through the UNet as one batch, as the
    reference does.
    """
    draws = x_T.shape[0]
    steps = None
    for i in range(draws):  # every draw's t must be valid for the mode; the steps do not depend on t
        steps, _ = iteration_timesteps(scheduler, mode, t_enc, int(t[i]))
    cond, uncond = cond.expand(draws, -1, -1), uncond.expand(draws, -1, -1)
    with adapters_off(wrappers):
        z = partial_ddim(unet, scheduler, x_T, steps, cond, uncond, guidance)
        eps_base = unet(z, t.long(), cond).sample
    eps_lora = unet(z, t.long(), cond).sample
    return _numpy((eps_lora - eps_base).reshape(draws, -1).norm(dim=1))


@torch.no_grad()
def unguidance_sample(unet, wrappers: Mapping[str, LoraLinear], scheduler, x_T: torch.Tensor, cond: torch.Tensor,
                      uncond: torch.Tensor, guidance: float, w: float) -> torch.Tensor:
    """Full DDIM over ``scheduler.timesteps`` with eps = w·CFG_base + (1 − w)·CFG_lora (one prompt, batch 1)."""
    z = x_T
    context = torch.cat([uncond, cond])
    for t in scheduler.timesteps:
        with adapters_off(wrappers):
            base_u, base_c = _eps(unet, torch.cat([z, z]), int(t), context).chunk(2)
        lora_u, lora_c = _eps(unet, torch.cat([z, z]), int(t), context).chunk(2)
        eps = w * (base_u + guidance * (base_c - base_u)) + (1 - w) * (lora_u + guidance * (lora_c - lora_u))
        z = scheduler.step(eps, t, z, eta=0.0).prev_sample
    return z
