"""Peak memory of this process and its devices, for logs and benchmarks."""

from __future__ import annotations

import resource
from collections.abc import Sequence

import jax


def max_rss_mib() -> float:
    """High-water mark of this process's resident set size in MiB (Linux: ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_peak_mib(devices: Sequence[jax.Device] | None = None) -> float | None:
    """The largest `peak_bytes_in_use` over `devices` (default: the local devices) in MiB.

    None when no device reports it (CPU reports no memory stats).
    """
    peaks = []
    for device in jax.local_devices() if devices is None else devices:
        try:
            stats = device.memory_stats() or {}
        except Exception:  # backends without memory stats may raise instead of returning None
            stats = {}
        if "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) / 2**20 if peaks else None


def peak_memory_mib() -> float:
    """Peak memory so far in MiB: `device_peak_mib()` when the backend reports it (GPU, TPU),
    else this process's peak resident set size."""
    peak = device_peak_mib()
    return max_rss_mib() if peak is None else peak
