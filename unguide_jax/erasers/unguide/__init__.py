"""UnGuide training core: concept files, the erasure objective, the jitted train step and its sharding.

Spec: /work/shared/spec/unguide.md §1–§3, §5.
"""
