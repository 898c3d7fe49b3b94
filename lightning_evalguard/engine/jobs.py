"""Evaluation jobs and the bounded queue that holds the pending ones.

A :class:`Job` is one evaluation of one weight snapshot. Its state only moves forward, under its own
lock, so the thread that runs it and the watchdog that times it out cannot both decide its outcome::

    pending --> running --> ok | failed | timeout | cancelled
    pending --> cancelled | replaced

:class:`JobQueue` holds at most ``max_pending`` jobs. When it is full, ``when_full`` decides:
``"skip"`` drops the new request, ``"replace"`` drops the oldest pending job for the new one, and
``"wait"`` blocks the producer (the training thread) until there is room, at most ``wait_timeout``
seconds. Every drop is counted by reason in :attr:`JobQueue.dropped`.

Examples:
    >>> q = JobQueue(max_pending=1, when_full="replace")
    >>> first, second = Job(1, step=10, epoch=0), Job(2, step=20, epoch=0)
    >>> q.make_room(); q.put(first)
    (True, [])
    >>> ok, evicted = q.make_room(); q.put(second)
    >>> ok, [job.id for job in evicted], evicted[0].state, q.dropped["replaced"]
    (True, [1], 'replaced', 1)
"""

from __future__ import annotations

import math
import threading
from collections import Counter, deque
from typing import Any, Literal

__all__ = ["FINAL_STATES", "WHEN_FULL", "Job", "JobCancelled", "JobQueue"]

WhenFull = Literal["skip", "replace", "wait"]
WHEN_FULL: tuple[str, ...] = ("skip", "replace", "wait")
FINAL_STATES = frozenset({"ok", "failed", "timeout", "cancelled", "replaced"})


class JobCancelled(BaseException):
    """Raised inside a running job to stop it (cooperatively, or injected into its thread).

    A ``BaseException`` like :class:`asyncio.CancelledError`, so evaluation code that catches
    ``Exception`` does not swallow it.
    """


class Job:
    """One evaluation of one snapshot.

    Args:
        job_id: unique, increasing id.
        step: ``trainer.global_step`` when the snapshot was taken.
        epoch: ``trainer.current_epoch`` when the snapshot was taken.
        slot: the snapshot buffer this job reads (owned by the snapshot pool).
        submitted_at: clock time of submission.
    """

    __slots__ = (
        "_lock",
        "cancel_reason",
        "epoch",
        "error",
        "finished_at",
        "id",
        "result",
        "slot",
        "started_at",
        "state",
        "step",
        "submitted_at",
    )

    def __init__(self, job_id: int, step: int, epoch: int, slot: Any = None, submitted_at: float = 0.0) -> None:
        self.id = job_id
        self.step = step
        self.epoch = epoch
        self.slot = slot
        self.submitted_at = submitted_at
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.state = "pending"
        self.result: Any = None
        self.error: BaseException | None = None
        self.cancel_reason: str | None = None
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def latency_s(self) -> float | None:
        """Seconds from start to outcome (``None`` if it never ran or has not ended)."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    def start(self, now: float) -> bool:
        """Pending -> running. ``False`` if the job was cancelled or replaced meanwhile."""
        with self._lock:
            if self.state != "pending":
                return False
            self.state = "running"
            self.started_at = now
            return True

    def finish(self, state: str, now: float, *, result: Any = None, error: BaseException | None = None) -> bool:
        """Decide the outcome. Only the first call wins; later ones return ``False``."""
        if state not in FINAL_STATES:
            raise ValueError(f"`state` must be one of {sorted(FINAL_STATES)}, got {state!r}")
        with self._lock:
            if self.state in FINAL_STATES:
                return False
            self.state = state
            self.finished_at = now
            self.result = result
            self.error = error
            return True

    def request_cancel(self, reason: str) -> None:
        """Ask a running job to stop at its next check (see :meth:`check`)."""
        with self._lock:
            if self.cancel_reason is None:
                self.cancel_reason = reason

    def check(self) -> None:
        """Raise :class:`JobCancelled` if a cancel was requested. Called between batches."""
        if self.cancel_reason is not None:
            raise JobCancelled(self.cancel_reason)

    def __repr__(self) -> str:
        return f"Job(id={self.id}, step={self.step}, epoch={self.epoch}, state={self.state!r})"


class JobQueue:
    """Bounded FIFO of pending jobs with a full-queue policy.

    One producer (the training thread) calls :meth:`make_room` then :meth:`put`; consumers call
    :meth:`get`. Thread-safe.

    Args:
        max_pending: most jobs held (>= 1).
        when_full: ``"skip"``, ``"replace"`` or ``"wait"``.
        wait_timeout: longest :meth:`make_room` blocks under ``"wait"``, in seconds.

    Raises:
        ValueError: on a bad argument.
    """

    def __init__(self, max_pending: int = 1, when_full: str = "skip", wait_timeout: float = 600.0) -> None:
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"`max_pending` must be an int >= 1, got {max_pending!r}")
        if when_full not in WHEN_FULL:
            raise ValueError(f"`when_full` must be one of {WHEN_FULL}, got {when_full!r}")
        if not isinstance(wait_timeout, (int, float)) or math.isnan(wait_timeout) or wait_timeout < 0:
            raise ValueError(f"`wait_timeout` must be a number >= 0, got {wait_timeout!r}")
        self.max_pending = max_pending
        self.when_full = when_full
        self.wait_timeout = float(wait_timeout)
        self._items: deque[Job] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self.dropped: Counter[str] = Counter()
        self.high_water = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def make_room(self) -> tuple[bool, list[Job]]:
        """Apply the full-queue policy before a new job is built.

        Returns:
            ``(ok, evicted)``: ``ok`` is whether a new job may be put; ``evicted`` are jobs removed
            under ``"replace"`` (already marked ``replaced``; the caller releases their slots).
        """
        with self._cond:
            if self._closed:
                self.dropped["closed"] += 1
                return False, []
            if len(self._items) < self.max_pending:
                return True, []
            if self.when_full == "skip":
                self.dropped["queue_full"] += 1
                return False, []
            if self.when_full == "replace":
                evicted = []
                while len(self._items) >= self.max_pending:
                    job = self._items.popleft()
                    if job.finish("replaced", now=job.submitted_at):
                        self.dropped["replaced"] += 1
                        evicted.append(job)
                self._cond.notify_all()
                return True, evicted
            # "wait": block the producer until a consumer takes a job, or the queue closes.
            has_room = self._cond.wait_for(
                lambda: self._closed or len(self._items) < self.max_pending, timeout=self.wait_timeout
            )
            if self._closed:
                self.dropped["closed"] += 1
                return False, []
            if not has_room:
                self.dropped["wait_timeout"] += 1
                return False, []
            return True, []

    def put(self, job: Job) -> None:
        """Append a job (after :meth:`make_room` said yes)."""
        with self._cond:
            if self._closed:
                raise RuntimeError("JobQueue is closed")
            if len(self._items) >= self.max_pending:
                raise RuntimeError("JobQueue is full: call make_room() first")
            self._items.append(job)
            self.high_water = max(self.high_water, len(self._items))
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> Job | None:
        """Take the oldest pending job; ``None`` on timeout or once closed and empty."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or bool(self._items), timeout=timeout)
            if not self._items:
                return None
            job = self._items.popleft()
            self._cond.notify_all()
            return job

    def take_all(self) -> list[Job]:
        """Remove and return every pending job (used to cancel them)."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return items

    def close(self) -> None:
        """Wake every waiter; later :meth:`get` calls drain what is left, then return ``None``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
