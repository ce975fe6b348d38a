"""PyTorch side (needs the ``torch`` extra): ``UnGuidePipeline`` and, for SDXL, ``UnGuideXLPipeline`` (UnGuide for
diffusers users) and the reference implementation of UnGuide used by tests and benchmarks
(``unguide_jax.pytorch.reference``).

Names load on first use, so that importing this package (and ``unguide_jax``) does not import torch::

    from unguide_jax.pytorch import UnGuidePipeline
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from unguide_jax.lazy_names import lazy_names

_EXPORTS = {
    "AdaptersProbeResult": "unguide_jax.pytorch.unguide_pipeline",
    "UnGuideAdapter": "unguide_jax.pytorch.unguide_pipeline",
    "UnGuidePipeline": "unguide_jax.pytorch.unguide_pipeline",
    "UnGuidePipelineOutput": "unguide_jax.pytorch.unguide_pipeline",
    "UnGuideXLPipeline": "unguide_jax.pytorch.unguide_pipeline",
    "jax_latents": "unguide_jax.pytorch.unguide_pipeline",
    "jax_probe_draws": "unguide_jax.pytorch.unguide_pipeline",
}

__all__ = ["AdaptersProbeResult", "UnGuideAdapter", "UnGuidePipeline", "UnGuidePipelineOutput", "UnGuideXLPipeline",
           "jax_latents", "jax_probe_draws"]

if TYPE_CHECKING:
    from unguide_jax.pytorch.unguide_pipeline import (
        AdaptersProbeResult,
        UnGuideAdapter,
        UnGuidePipeline,
        UnGuidePipelineOutput,
        UnGuideXLPipeline,
        jax_latents,
        jax_probe_draws,
    )


__getattr__, __dir__ = lazy_names(__name__, globals(), _EXPORTS)
