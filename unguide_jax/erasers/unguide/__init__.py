"""UnGuide: the erasure objective, the jitted LoRA train step, the w probe and the sampling modes of
UnGuidance.

Spec: ../shared/spec/unguide.md §1–§5.
"""
