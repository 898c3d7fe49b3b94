"""Snapshot slots a worker *process* can read: shared-memory (CPU) or CUDA IPC (GPU) buffers.

:class:`SharedSlots` allocates ``count`` slots up front, each one flat byte buffer holding every
parameter and buffer of the module (64-byte aligned views, in the order of
:func:`~lightning_evalguard.engine.snapshot.state_tensors`). The buffers travel to a worker once per
worker generation, as arguments of its ``spawn`` start; after that a job only names its slot by
index, and nothing is pickled per evaluation.

- CPU: ``share_memory_()`` buffers (torch's ``file_descriptor`` strategy). The name of the segment
  is unlinked as soon as it is created and the worker receives a duplicated file descriptor, so no
  ``/dev/shm`` entry exists to leak, even if the process is killed; the memory goes back to the
  system when the last mapping closes.
- CUDA: plain device buffers on the training device, shared through CUDA IPC by torch's
  multiprocessing reductions.

:meth:`SharedSlots.slot_factory` feeds a :class:`~lightning_evalguard.engine.snapshot.SnapshotPool`:
each slot it makes is one region, tagged with a :class:`SlotHandle`; a region becomes free again
when the pool lets go of that slot.

Examples:
    >>> import torch
    >>> live = torch.nn.Linear(3, 2)
    >>> slots = SharedSlots.like(live, count=2)
    >>> tensors, handle = slots.slot_factory()
    >>> handle.index, [tuple(t.shape) for t in tensors], tensors[0].is_shared()
    (0, [(2, 3), (2,)], True)
    >>> slots.close()
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_evalguard.engine.snapshot import state_tensors

__all__ = ["ALIGN", "SharedSlots", "SlotHandle", "SlotLayout", "check_shm_space"]

ALIGN = 64  # bytes; every view starts on a cache line, so any dtype can view its bytes
SHM_DIR = "/dev/shm"


@dataclass(frozen=True)
class SlotLayout:
    """Where each tensor of a snapshot lives inside one flat byte buffer (plain, picklable data)."""

    offsets: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    nbytes: int

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor]) -> SlotLayout:
        """The layout of ``tensors`` (dense, strided tensors only).

        Raises:
            TypeError: for a sparse, quantized or otherwise non-strided tensor.
        """
        offsets, shapes, dtypes = [], [], []
        cursor = 0
        for i, t in enumerate(tensors):
            if t.layout != torch.strided or t.is_quantized:
                raise TypeError(
                    f"state tensor #{i} has layout {t.layout} (quantized={t.is_quantized}); "
                    "subprocess evaluation supports dense tensors only"
                )
            offsets.append(cursor)
            shapes.append(tuple(t.shape))
            dtypes.append(t.dtype)
            cursor += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        return cls(tuple(offsets), tuple(shapes), tuple(dtypes), max(cursor, ALIGN))

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of ``buffer`` (a flat ``uint8`` tensor of :attr:`nbytes`), one per tensor."""
        out = []
        for offset, shape, dtype in zip(self.offsets, self.shapes, self.dtypes, strict=True):
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            out.append(buffer[offset : offset + size].view(dtype).view(shape))
        return out

    def matches(self, tensors: Sequence[torch.Tensor]) -> str | None:
        """``None`` if ``tensors`` fit this layout, else what differs (for an error message)."""
        if len(tensors) != len(self.shapes):
            return f"the layout has {len(self.shapes)} tensors, the module {len(tensors)}"
        for i, (t, shape, dtype) in enumerate(zip(tensors, self.shapes, self.dtypes, strict=True)):
            if tuple(t.shape) != shape or t.dtype != dtype:
                return f"tensor #{i} is {tuple(t.shape)}/{t.dtype}, the layout says {shape}/{dtype}"
        return None


class SlotHandle:
    """Tags a pool slot with the shared region it lives in (the pool keeps it as ``Slot.payload``)."""

    __slots__ = ("__weakref__", "index")

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"SlotHandle(index={self.index})"


def check_shm_space(nbytes: int, what: str) -> None:
    """Raise a clear error if ``/dev/shm`` cannot hold ``nbytes`` more bytes.

    Writing past the size of a ``tmpfs`` kills the writer with ``SIGBUS``; a Docker container
    gets 64 MB by default. Checked before the buffers are touched.

    Raises:
        RuntimeError: not enough free space.
    """
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:  # no /dev/shm (not Linux): nothing to check against
        return
    free = stat.f_bavail * stat.f_frsize
    if nbytes > free:
        raise RuntimeError(
            f"{what} needs {nbytes / 2**20:.1f} MB of shared memory but {SHM_DIR} has {free / 2**20:.1f} MB free. "
            "Give the machine more shared memory (Docker: `--shm-size=2g`), lower `max_pending`, or use "
            "mode='stream'."
        )


def _alloc(nbytes: int, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.zeros(nbytes, dtype=torch.uint8, device=device)
    # zero_() touches every page now: a shortfall shows at set-up, not mid-run.
    return torch.empty(nbytes, dtype=torch.uint8).share_memory_().zero_()


class SharedSlots:
    """``count`` preallocated snapshot regions a worker process can map.

    Args:
        layout: where each tensor lives in a region.
        count: how many regions (``max_pending + 1``).
        device: ``cpu`` (shared memory) or a CUDA device (IPC buffers).

    Raises:
        RuntimeError: ``/dev/shm`` is too small for the CPU buffers.
    """

    def __init__(self, layout: SlotLayout, count: int, device: torch.device | str = "cpu") -> None:
        if count < 1:
            raise ValueError(f"`count` must be >= 1, got {count!r}")
        self.layout = layout
        self.device = torch.device(device)
        if self.device.type != "cuda":
            check_shm_space(layout.nbytes * count, f"{count} snapshot slot(s) of {layout.nbytes / 2**20:.1f} MB")
        self.buffers: list[torch.Tensor] = [_alloc(layout.nbytes, self.device) for _ in range(count)]
        self._views = [layout.views(b) for b in self.buffers]
        self._claimed = [False] * count
        self._lock = threading.Lock()
        self.closed = False

    @classmethod
    def like(cls, module: torch.nn.Module, count: int, device: torch.device | str | None = None) -> SharedSlots:
        """Regions shaped like ``module``'s parameters and buffers, on ``device`` (default: CUDA
        if the module is on CUDA, else CPU shared memory)."""
        tensors = state_tensors(module)
        if device is None:
            device = tensors[0].device if tensors and tensors[0].is_cuda else "cpu"
        return cls(SlotLayout.of(tensors), count, device)

    @property
    def count(self) -> int:
        return len(self.buffers)

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes * len(self.buffers)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def views(self, index: int) -> list[torch.Tensor]:
        """The typed tensors of region ``index``."""
        return self._views[index]

    def slot_factory(self) -> tuple[list[torch.Tensor], SlotHandle | None]:
        """Make one pool slot: the tensors of a free region and its handle.

        The pool never holds more slots than there are regions, and a region is freed when the
        slot that used it is dropped, so a region is normally free. Should none be (a dropped slot
        still referenced somewhere), the slot gets private memory and a ``None`` handle, and the
        runner fails a job that uses it instead of sharing a region two slots write to.
        """
        with self._lock:
            if self.closed:
                raise RuntimeError("SharedSlots is closed")
            for index, claimed in enumerate(self._claimed):
                if not claimed:
                    self._claimed[index] = True
                    handle = SlotHandle(index)
                    weakref.finalize(handle, self._free, index)
                    return list(self._views[index]), handle
        return [torch.empty_like(v) for v in self._views[0]], None

    def _free(self, index: int) -> None:
        with self._lock:
            if index < len(self._claimed):
                self._claimed[index] = False

    def claimed(self) -> int:
        """How many regions pool slots currently use."""
        with self._lock:
            return sum(self._claimed)

    def close(self) -> None:
        """Drop this object's references to the buffers (idempotent). The memory is returned once
        the pool's slots and every worker mapping are gone too."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.buffers = []
            self._views = []
            self._claimed = []
        if self.is_cuda and torch.cuda.is_available():  # pragma: no cover - GPU
            torch.cuda.ipc_collect()  # free blocks whose IPC consumers are gone

    def __repr__(self) -> str:
        return f"SharedSlots(count={self.count}, nbytes={self.nbytes}, device={str(self.device)!r})"
