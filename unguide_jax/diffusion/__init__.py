"""Prompt to pixels: schedulers, the lax.scan sampler, the StableDiffusion pipeline and its batching,
prompt inputs and image outputs."""
