"""UnGuide: the erasure objective, the jitted LoRA train step, the w probe and the sampling modes of
UnGuidance.

Paper: Polowczyk et al., "UnGuide: Learning to Forget with LoRA-Guided Diffusion Models", arXiv 2508.05755.
"""
