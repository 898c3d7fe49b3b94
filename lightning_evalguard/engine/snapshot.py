"""Consistent weight snapshots into preallocated, pooled buffers.

A snapshot is taken on the training thread, between two optimizer steps, by copying every
parameter and buffer of the live module into a :class:`Slot` of a :class:`SnapshotPool`. Slots are
allocated once (lazily, up to ``size``) and reused, so evaluation never holds the live tensors and
never allocates a model's worth of memory per evaluation.

On CUDA no host synchronisation happens. The protocol, per snapshot::

    main stream:  ... optimizer step ... [record E_ready] ............ [wait E_copied] next step ...
    copy stream:                  [wait E_ready][wait E_slot_free] copy_ -> [record E_copied]
    eval stream:                                          [wait E_copied] evaluate [record E_slot_free]

The copy stream starts when the main stream has finished the step, the next step cannot write the
weights before the copy has read them, and a slot is not overwritten before the evaluation reading
it has finished on the GPU. On CPU it is a plain ``copy_`` (one ``torch._foreach_copy_``).

Examples:
    >>> import torch
    >>> live = torch.nn.Linear(2, 1)
    >>> pool = SnapshotPool(lambda: clone_state(live), size=2)
    >>> slot = pool.acquire()
    >>> _ = pool.capture(slot, state_tensors(live))
    >>> before = live.weight.detach().clone()
    >>> with torch.no_grad(): _ = live.weight.add_(1.0)  # training moves on...
    >>> torch.equal(slot.tensors[0], before)              # ...the snapshot does not
    True
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["Slot", "SnapshotPool", "clone_state", "state_tensors"]


def state_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``module``, in a fixed order (parameters, then buffers)."""
    return [p.detach() for p in module.parameters()] + [b.detach() for b in module.buffers()]


def clone_state(module: torch.nn.Module) -> list[torch.Tensor]:
    """Fresh, uninitialised tensors shaped like :func:`state_tensors` of ``module``."""
    return [torch.empty_like(t) for t in state_tensors(module)]


class Slot:
    """One snapshot buffer: ``tensors`` (same order as the sources), plus an optional ``payload``
    whose state *is* those tensors (e.g. a shadow copy of the module that evaluation runs on)."""

    __slots__ = (
        "copied_event",
        "free_event",
        "in_use",
        "index",
        "last_used",
        "nbytes",
        "payload",
        "retired",
        "tensors",
    )

    def __init__(self, index: int, tensors: list[torch.Tensor], payload: Any = None) -> None:
        self.index = index
        self.tensors = tensors
        self.payload = payload
        self.in_use = False
        self.retired = False
        self.last_used = time.monotonic()
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self.copied_event: Any = None  # torch.cuda.Event once a CUDA copy was issued
        self.free_event: Any = None  # recorded by the reader's stream when it is done

    @property
    def is_cuda(self) -> bool:
        return bool(self.tensors) and self.tensors[0].is_cuda

    def __repr__(self) -> str:
        return f"Slot(index={self.index}, nbytes={self.nbytes}, in_use={self.in_use})"


class SnapshotPool:
    """Up to ``size`` reusable slots, created lazily by ``factory``.

    ``factory`` returns either a list of tensors, or ``(tensors, payload)``. It runs on the caller's
    thread (the training thread), because building a slot may copy the live module.

    Args:
        factory: makes the tensors (and payload) of one new slot.
        size: most live slots (``max_pending + 1`` so a free slot exists whenever the queue has room).
    """

    def __init__(self, factory: Callable[[], Any], size: int) -> None:
        if size < 1:
            raise ValueError(f"`size` must be >= 1, got {size!r}")
        self._factory = factory
        self.size = size
        self._slots: list[Slot] = []
        self._lock = threading.Lock()
        self._copy_streams: dict[Any, Any] = {}
        self._next_index = 0
        self.captures = 0
        self.retired = 0
        self.peak_allocated = 0
        self.last_copy_s = 0.0
        self.total_copy_s = 0.0

    # -- slot management -----------------------------------------------------------------------
    def _make_slot(self) -> Slot:
        made = self._factory()
        tensors, payload = made if isinstance(made, tuple) else (made, None)
        slot = Slot(self._next_index, list(tensors), payload)
        self._next_index += 1
        return slot

    def acquire(self) -> Slot | None:
        """A free slot (creating one if fewer than ``size`` exist), or ``None`` if all are busy."""
        with self._lock:
            for slot in self._slots:
                if not slot.in_use:
                    slot.in_use = True
                    slot.last_used = time.monotonic()
                    return slot
            if len(self._slots) >= self.size:
                return None
        slot = self._make_slot()  # outside the lock: may deep-copy a module
        slot.in_use = True
        with self._lock:
            self._slots.append(slot)
            self.peak_allocated = max(self.peak_allocated, len(self._slots))
        return slot

    def release(self, slot: Slot) -> None:
        """Give a slot back for reuse (no-op for a retired slot)."""
        with self._lock:
            slot.in_use = False

    def retire(self, slot: Slot) -> None:
        """Never reuse ``slot`` again (a stuck reader may still hold it); frees its place in the pool."""
        with self._lock:
            if slot in self._slots:
                self._slots.remove(slot)
                slot.retired = True
                self.retired += 1

    def release_idle(self, keep: int = 1, min_idle_s: float = 0.0) -> int:
        """Drop idle slots beyond ``keep`` that no job has used for ``min_idle_s`` seconds; return
        the bytes they held (freed once unreferenced). The age limit avoids churn: a slot dropped
        now and needed at the next trigger would be rebuilt on the training thread."""
        now = time.monotonic()
        with self._lock:
            idle = [s for s in self._slots if not s.in_use]
            idle.sort(key=lambda s: s.last_used, reverse=True)  # keep the most recently used
            drop = [s for s in idle[keep:] if now - s.last_used >= min_idle_s]
            for slot in drop:
                self._slots.remove(slot)
            return sum(s.nbytes for s in drop)

    def clear(self) -> None:
        """Forget every slot (at shutdown)."""
        with self._lock:
            self._slots.clear()

    @property
    def allocated(self) -> int:
        with self._lock:
            return len(self._slots)

    @property
    def in_use(self) -> int:
        with self._lock:
            return sum(s.in_use for s in self._slots)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._slots)

    # -- copying -------------------------------------------------------------------------------
    def capture(self, slot: Slot, sources: Sequence[torch.Tensor]) -> float:
        """Copy ``sources`` into ``slot``; return the host-side seconds it took.

        On CUDA this only enqueues work (see the module docstring): the returned time is the
        launch cost, and the main stream is made to wait for the copy before anything later.
        """
        if len(sources) != len(slot.tensors):
            raise ValueError(f"snapshot has {len(slot.tensors)} tensors but the module now has {len(sources)}")
        for dst, src in zip(slot.tensors, sources, strict=True):
            if dst.shape != src.shape or dst.dtype != src.dtype:
                raise ValueError(
                    f"snapshot tensor {tuple(dst.shape)}/{dst.dtype} does not match live tensor "
                    f"{tuple(src.shape)}/{src.dtype}"
                )
        start = time.perf_counter()
        with torch.no_grad():
            if slot.is_cuda and sources and sources[0].is_cuda:
                self._capture_cuda(slot, sources)
            else:
                if slot.tensors:
                    torch._foreach_copy_(slot.tensors, list(sources))
        elapsed = time.perf_counter() - start
        self.captures += 1
        self.last_copy_s = elapsed
        self.total_copy_s += elapsed
        return elapsed

    def _capture_cuda(self, slot: Slot, sources: Sequence[torch.Tensor]) -> None:  # pragma: no cover - GPU
        device = slot.tensors[0].device
        main = torch.cuda.current_stream(device)
        copy_stream = self._copy_streams.get(device)
        if copy_stream is None:
            copy_stream = self._copy_streams[device] = torch.cuda.Stream(device)
        ready = torch.cuda.Event()
        ready.record(main)
        with torch.cuda.stream(copy_stream):
            copy_stream.wait_event(ready)
            if slot.free_event is not None:  # the previous reader of this slot must be done
                copy_stream.wait_event(slot.free_event)
            torch._foreach_copy_(slot.tensors, list(sources))
            copied = torch.cuda.Event()
            copied.record(copy_stream)
        slot.copied_event = copied
        main.wait_event(copied)  # the next optimizer step cannot overwrite weights mid-copy
