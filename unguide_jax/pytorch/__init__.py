"""PyTorch side (needs the ``torch`` extra): the reference implementation of UnGuide used by tests and benchmarks."""
