"""Will a compiled program fit? Its own memory analysis against what the devices have, before it runs.

An allocator failure deep in XLA ("Out of memory allocating 4298844082680 bytes") names neither the
request nor the fix; ``check_fits`` turns the same fact into one line, before the first step runs.
"""
from __future__ import annotations

import os

import jax


class NotEnoughMemory(MemoryError):
    """A request needs more memory per device than the devices have."""


def bytes_per_device() -> int | None:
    """Memory one local device may use: the accelerator's limit, or on the CPU the host's available
    memory shared by its (possibly fake) devices. None when unknown."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
        return int(available) // max(1, jax.local_device_count())
    return None


def needed_bytes(compiled) -> int | None:
    """Per-device bytes a compiled program needs at its peak (arguments, outputs, working memory)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 (some backends do not implement it)
        return None
    if stats is None:
        return None
    aliased = getattr(stats, "alias_size_in_bytes", 0)
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes - aliased)


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_fits(compiled, what: str, advice: str) -> None:
    """``NotEnoughMemory`` naming ``what`` (the request) when ``compiled`` needs more than a device has."""
    needed, available = needed_bytes(compiled), bytes_per_device()
    if needed is None or available is None or needed <= available:
        return
    raise NotEnoughMemory(f"{what} needs {gib(needed)} per device, {gib(available)} are available: {advice}")
