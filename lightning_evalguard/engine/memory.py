"""Memory readings and releases: host RSS (psutil) and CUDA allocated / reserved / peak (torch).

Both libraries are imported when first used, and torch only if the caller already imported it:
reading memory never initialises CUDA in a process that does not use it.

Examples:
    >>> reading = read_memory()
    >>> reading.host_rss > 0
    True
    >>> reading.as_mb()["host_rss_mb"] > 0
    True
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["MemoryReading", "cuda_in_use", "host_rss_bytes", "read_memory", "release_cuda_cache"]

_MB = float(2**20)
_process: Any = None


def host_rss_bytes() -> int:
    """Resident set size of this process in bytes."""
    global _process
    if _process is None:
        import psutil  # not at import time: ``import lightning_evalguard`` stays light

        _process = psutil.Process()
    return int(_process.memory_info().rss)


def _torch() -> Any:
    return sys.modules.get("torch")


def cuda_in_use(device: int | None = None) -> bool:
    """Whether this process has initialised CUDA (and ``device``, when given, is a valid index).

    Never initialises CUDA itself.
    """
    torch = _torch()
    if torch is None or not torch.cuda.is_initialized():
        return False
    return device is None or 0 <= device < torch.cuda.device_count()


@dataclass(frozen=True, slots=True)
class MemoryReading:
    """Memory of this process at one moment, in bytes (CUDA figures are 0 where CUDA is not in use)."""

    host_rss: int
    cuda_allocated: int = 0
    cuda_reserved: int = 0
    cuda_peak_allocated: int = 0

    def as_mb(self) -> dict[str, float]:
        """The same figures in MB (2**20 bytes), keyed ``host_rss_mb``, ``cuda_allocated_mb``, ..."""
        return {
            "host_rss_mb": self.host_rss / _MB,
            "cuda_allocated_mb": self.cuda_allocated / _MB,
            "cuda_reserved_mb": self.cuda_reserved / _MB,
            "cuda_peak_allocated_mb": self.cuda_peak_allocated / _MB,
        }


def read_memory(device: int | None = None) -> MemoryReading:
    """Host RSS, and CUDA memory of ``device`` (the current device when ``None``) if CUDA is in use.

    Costs tens of microseconds (one ``/proc`` read, three allocator queries): fine at epoch ends and
    every few steps, not meant for every step.
    """
    rss = host_rss_bytes()
    if not cuda_in_use(device):
        return MemoryReading(rss)
    cuda = _torch().cuda
    return MemoryReading(
        rss,
        int(cuda.memory_allocated(device)),
        int(cuda.memory_reserved(device)),
        int(cuda.max_memory_allocated(device)),
    )


def release_cuda_cache(device: int | None = None, *, empty_cache: bool = True, reset_peak: bool = True) -> bool:
    """Return cached CUDA blocks to the driver and/or restart the peak-memory statistics of ``device``.

    A no-op (returning ``False``) where CUDA is not in use. ``empty_cache`` makes the next
    allocations go back to ``cudaMalloc``; call it at epoch ends, never per step.
    """
    if not cuda_in_use(device):
        return False
    cuda = _torch().cuda
    if empty_cache:
        if device is None:
            cuda.empty_cache()
        else:
            with cuda.device(device):
                cuda.empty_cache()
    if reset_peak:
        cuda.reset_peak_memory_stats(device)
    return True
