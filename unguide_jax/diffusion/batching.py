"""Many images in fixed-size batches: the loop shared by sample.py, the evaluation and the quality gate.

Requests are grouped by image size; each batch is padded to ``batch_size`` (repeating its last
request) so that every batch of a size reuses one compiled sampler. On a model placed on a mesh
(``StableDiffusion.on_mesh``), ``batch_size`` is rounded up to a multiple of the mesh's data size, so
that the padding the devices need is filled with requests.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from unguide_jax.diffusion.many_guidance import FLAGGED_RULES, generate_many
from unguide_jax.diffusion.pipeline import StableDiffusion
from unguide_jax.parallel.batches import padded_rows
from unguide_jax.parallel.hosts import is_main_process
from unguide_jax.parallel.supervise import report_progress


class NonFiniteImage(RuntimeError):
    """Sampling produced NaN/inf latents: the uint8 cast would hide them (as a black image)."""


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    prompt: str
    seed: int
    guidance_scale: float = 7.5
    w: float | tuple[float, ...] | None = None  # UnGuidance weight (None: no mixing); K edits: one per edit
    height: int | None = None   # None: the model's default size
    width: int | None = None
    flags: tuple[bool, ...] | None = None        # K edits, combine "flagged": the edits the probe flagged


def generate_images(sd: StableDiffusion, requests: Sequence[ImageRequest], *, batch_size: int, num_steps: int,
                    eta: float = 0.0, negative_prompt: str = "", edit=None, fused: bool = True,
                    desc: str = "sampling", progress: bool = True, edit_name: str = "",
                    on_batch: Callable[[list[int], list[np.ndarray]], None] | None = None,
                    combine: str = "flagged-mean", sampler: str = "ddim") -> list[np.ndarray]:
    """One uint8 image per request, in request order. ``on_batch(indices, images)`` is called as each
    batch is done (e.g. to write its PNGs, so that an interrupted run keeps what it made).

    ``edit`` None: the base model. ``edit`` given: requests with ``w`` None sample the edited model,
    the others UnGuidance with their w (a batch never mixes the two). ``edit`` a tuple of K edits: every
    request is UnGuidance with K edits, its w one per edit (and its ``flags`` for the flagged rules),
    sampled by ``many_guidance.generate_many``.

    Each image's final latents are checked: a NaN/inf one raises ``NonFiniteImage`` naming the prompt,
    the seed and ``edit_name`` (what the edit is, for the message) before its batch reaches ``on_batch``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch_size = padded_rows(batch_size, sd.mesh)
    if edit is None and any(r.w is not None for r in requests):
        raise ValueError("UnGuidance requests (w given) need an edit")
    size = lambda r: (r.height or sd.default_size, r.width or sd.default_size, r.w is None)  # noqa: E731
    order = sorted(range(len(requests)), key=lambda i: size(requests[i]))
    groups = [list(g) for _, g in itertools.groupby(order, key=lambda i: size(requests[i]))]
    batches = [g[i:i + batch_size] for g in groups for i in range(0, len(g), batch_size)]
    results: dict[int, np.ndarray] = {}
    for done, batch in enumerate(tqdm(batches, desc=desc, unit="batch",
                                      disable=not progress or not batches or not is_main_process())):
        if done:
            report_progress(f"{done} of {len(batches)} batches" + (f" of {desc}" if desc else ""))
        padded = [requests[i] for i in batch + [batch[-1]] * (batch_size - len(batch))]
        height, width, plain = size(padded[0])
        common = dict(guidance_scale=[r.guidance_scale for r in padded], num_steps=num_steps, eta=eta, height=height,
                      width=width, negative_prompt=negative_prompt, fused=fused, sampler=sampler)
        if isinstance(edit, tuple):
            out = generate_many(sd, [r.prompt for r in padded], [r.seed for r in padded], edits=edit,
                                w=[r.w for r in padded], combine=combine,
                                flags=[r.flags for r in padded] if combine in FLAGGED_RULES else None, **common)
        else:
            out = sd.generate([r.prompt for r in padded], [r.seed for r in padded], edit=edit,
                              w=None if plain else [r.w for r in padded], **common)
        latents = getattr(out, "latents", None)
        latents = np.asarray(out.images if latents is None else latents, np.float32)
        for row, i in enumerate(batch):
            if not np.all(np.isfinite(latents[row])):
                r = requests[i]
                with_edit = (f" with the edit {edit_name}" if edit_name else " with an edit") if edit is not None else ""
                weight = f", w={r.w}" if r.w is not None else ""
                raise NonFiniteImage(
                    f"the image of prompt {r.prompt!r} (seed {r.seed}, guidance {r.guidance_scale}{weight}) has "
                    f"non-finite latents (NaN/inf){with_edit}; nothing of its batch was written. The edit or the "
                    "settings make the model diverge (a too strong edit, or float16 overflow?)")
        for i, image in zip(batch, out.images):
            results[i] = image
        if on_batch is not None:
            on_batch(batch, [results[i] for i in batch])
    return [results[i] for i in range(len(requests))]
