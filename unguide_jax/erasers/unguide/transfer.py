"""Transfer the paper's LoRA settings (made for SD 1.4) to the model at hand.

Adam moves every entry of B by about the learning rate per step whatever the layer's width, and A hardly
trains (0.3–0.8 % from its init in 200 steps), so after T steps a token c changes its key or value by

    ‖α (c A) B‖ ≈ α · ‖c‖ · lr · T · √out,   against   ‖c W‖ = ‖c‖ · s · √out,

s = ‖c W‖ / (‖c‖ √out): the scale W has on the text tokens it actually sees. The per-token relative change
of K and V is α·lr·T / s. Rule "kv_scale" keeps the paper's relative change: α, rank and T stay, and

    lr = lr_paper · s_model / s_SD1.4,

s_model measured on the model's cross-attention K/V kernels over the concept's target prompts (the
mean over layers), s_SD1.4 = 1/√768: the scale of a LeCun-initialised projection of SD 1.4's 768-d
context. That reference is an assumption, not a measurement (no SD 1.4 weights could be read here);
it is what trained K/V kernels keep on the shipped model (0.12–0.15 against 1/√64 = 0.125). (On
LeCun-initialised kernels of SD 1.4's shapes the rule gives back the paper's numbers by construction,
which checks the arithmetic, not the assumption.) The SD 1.x presets do not transfer
(``transfer = "none"``): they keep the paper's settings exactly.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from unguide_jax.edits.lora import target_modules
from unguide_jax.erasers.common import kernel

TRANSFER_RULES = ("none", "kv_scale")
SD14_CONTEXT_DIM = 768
SD14_KV_SCALE = 1.0 / math.sqrt(SD14_CONTEXT_DIM)


@dataclasses.dataclass(frozen=True)
class Transfer:
    rule: str
    learning_rate: float            # what training uses
    paper_learning_rate: float      # the configured (SD 1.4) value
    model_scale: float = float("nan")      # s_model: mean over the K/V layers
    reference_scale: float = SD14_KV_SCALE
    layer_scales: tuple[float, float] = (float("nan"), float("nan"))  # (min, max) over the K/V layers

    def record(self) -> dict:
        """What config.json keeps under ``derived``."""
        out = {"transfer": self.rule, "learning_rate": self.learning_rate,
               "paper_learning_rate": self.paper_learning_rate}
        if self.rule != "none":
            out.update(kv_scale_model=round(self.model_scale, 6), kv_scale_sd14=round(self.reference_scale, 6),
                       kv_scale_layers=[round(x, 6) for x in self.layer_scales])
        return out

    def describe(self) -> str:
        if self.rule == "none":
            return f"learning rate {self.learning_rate:.3g} (the paper's settings, not transferred)"
        return (f"transfer kv_scale: K/V scale on the target's tokens {self.model_scale:.4f} (layers "
                f"{self.layer_scales[0]:.4f}–{self.layer_scales[1]:.4f}) against SD 1.4's {self.reference_scale:.4f} "
                f"-> learning rate {self.paper_learning_rate:.3g} -> {self.learning_rate:.3g}")


def kv_scales(unet_params, context: np.ndarray) -> dict[str, float]:
    """s = ‖c W‖ / (‖c‖ √out) per cross-attention key/value kernel, over the tokens of ``context`` (N, L, D)."""
    tokens = np.asarray(context, np.float64).reshape(-1, np.shape(context)[-1])
    norm = np.linalg.norm(tokens)
    try:
        paths = target_modules(unet_params, "object")
    except ValueError:
        raise ValueError("transfer kv_scale needs cross-attention key/value projections (attn2.to_k/to_v); "
                         "this UNet has none: use transfer=none") from None
    out = {}
    for path in paths:
        w = np.asarray(kernel(unet_params, path), np.float64)
        out[path] = float(np.linalg.norm(tokens @ w) / (norm * math.sqrt(w.shape[-1])))
    return out


def transfer_settings(rule: str, learning_rate: float, unet_params=None, context=None) -> Transfer:
    """The learning rate training uses under ``rule`` (``context``: the concept's encoded target prompts)."""
    if rule not in TRANSFER_RULES:
        raise ValueError(f"unknown transfer rule {rule!r}; known: {TRANSFER_RULES}")
    if rule == "none":
        return Transfer(rule, learning_rate, learning_rate)
    scales = np.asarray(list(kv_scales(unet_params, context).values()))
    model_scale = float(scales.mean())
    return Transfer(rule, learning_rate * model_scale / SD14_KV_SCALE, learning_rate, model_scale, SD14_KV_SCALE,
                    (float(scales.min()), float(scales.max())))
