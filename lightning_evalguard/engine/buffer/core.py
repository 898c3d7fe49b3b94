"""The bounded buffer between the training thread and the flusher, and the ledger that accounts for
every value it accepted.

Units: the ledger counts metric *values* (one key at one step), because that is what can be dropped
individually (an invalid value in an otherwise good row). At every moment, under the buffer's lock::

    accepted == delivered + pending + spilled + sum(dropped.values())

``pending`` is what the buffer holds (queued or in flight); ``spilled`` is what sits in spill files
not yet replayed (a replay moves it to ``delivered``). Calls that are not metric rows
(``log_hyperparams``, ``log_image``, ...) go through the same queue, in order, and are counted apart.

Examples:
    >>> buf = MetricBuffer(max_bytes=1 << 20, when_full="drop_newest")
    >>> buf.put_row({"loss": 0.5, "acc": 0.9}, step=3)
    >>> [row] = buf.take(10)
    >>> buf.resolve(row, DELIVERED)
    True
    >>> s = buf.snapshot(); s["accepted"], s["delivered"], s["pending"]
    (2, 2, 0)
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Literal, TypeAlias

from lightning_evalguard.engine.clock import SYSTEM_CLOCK, Clock

__all__ = [
    "DELIVERED",
    "DROP_REASONS",
    "SPILLED",
    "WHEN_FULL",
    "Call",
    "Item",
    "MetricBuffer",
    "Row",
]

WHEN_FULL: Final = ("spill", "drop_oldest", "drop_newest", "block")
WhenFull: TypeAlias = Literal["spill", "drop_oldest", "drop_newest", "block"]
#: Why values were dropped. ``unconfirmed``: pending when the checkpoint a run resumed from was saved.
DROP_REASONS: Final = ("invalid", "oldest", "newest", "spill_failed", "spill_full", "abandoned", "unconfirmed")
DELIVERED: Final = "delivered"
SPILLED: Final = "spilled"

# Bytes held per row beyond the dict itself: the Row object and its deque slot; per value, a float
# object. Keys are not counted: the row shares the caller's key strings.
_ROW_OVERHEAD: Final = 80
_VALUE_BYTES: Final = 24
_CALL_OVERHEAD: Final = 256


class Row:
    """One row of metric values at a step, as held in the buffer."""

    __slots__ = ("nbytes", "seq", "step", "values")

    def __init__(self, seq: int, step: int | None, values: dict[str, Any], nbytes: int = 0) -> None:
        self.seq = seq
        self.step = step
        self.values = values
        self.nbytes = nbytes or row_bytes(values)

    def __repr__(self) -> str:
        return f"Row(seq={self.seq}, step={self.step}, values={self.values!r})"


class Call:
    """A non-metric call on the real logger (``log_hyperparams``, ``log_image``...), kept in order."""

    __slots__ = ("args", "kwargs", "name", "nbytes", "seq")

    def __init__(self, seq: int, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.seq = seq
        self.name = name
        self.args = args
        self.kwargs = kwargs
        self.nbytes = call_bytes(args, kwargs)

    def __repr__(self) -> str:
        return f"Call(seq={self.seq}, name={self.name!r})"


Item: TypeAlias = "Row | Call"


def row_bytes(values: dict[str, Any]) -> int:
    """Estimated bytes a row holds: the dict, its value objects and the row itself."""
    return sys.getsizeof(values) + _VALUE_BYTES * len(values) + _ROW_OVERHEAD


def call_bytes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Shallow estimate for a queued call: arrays and tensors count their ``nbytes``."""
    total = _CALL_OVERHEAD
    for arg in (*args, *kwargs.values()):
        parts = arg if isinstance(arg, (list, tuple)) else (arg,)
        for part in parts:
            nbytes = getattr(part, "nbytes", None)
            total += nbytes if isinstance(nbytes, int) else sys.getsizeof(part)
    return total


class MetricBuffer:
    """Thread-safe FIFO of rows and calls, bounded in bytes, with the value ledger.

    The training thread calls :meth:`put_row` / :meth:`put_call`; the flusher calls :meth:`take`
    (items stay counted as pending while in flight) and then :meth:`resolve` for each item. A *generation*
    number lets a watchdog take the in-flight batch away from a flusher stuck in a call: after
    :meth:`abandon_head`, the old flusher's later resolutions are ignored.

    Args:
        max_bytes: bound on the bytes held (estimated, see :func:`row_bytes`).
        when_full: ``"spill"`` (oldest queued rows go to ``overflow``), ``"drop_oldest"``,
            ``"drop_newest"`` or ``"block"`` (the caller waits up to ``block_timeout`` for room, then
            the new row is dropped as ``newest``).
        overflow: for ``"spill"``: writes evicted rows; returns ``None`` on success or the drop
            reason (``"spill_failed"``, ``"spill_full"``).
        block_timeout: longest wait of a ``"block"`` put, in seconds.
        wake_items: queue length at which the flusher is woken before its interval.
        on_wait: called every few milliseconds while a ``"block"`` put waits (the watchdog).
        clock: time source for ``block_timeout``.
    """

    def __init__(
        self,
        max_bytes: int,
        when_full: WhenFull = "spill",
        *,
        overflow: Callable[[list[Row]], str | None] | None = None,
        block_timeout: float = 30.0,
        wake_items: int = 512,
        on_wait: Callable[[], None] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if when_full not in WHEN_FULL:
            raise ValueError(f"`when_full` must be one of {WHEN_FULL}, got {when_full!r}")
        if when_full == "spill" and overflow is None:
            raise ValueError("`when_full='spill'` needs an `overflow` writer")
        self.max_bytes = int(max_bytes)
        self.when_full = when_full
        self._overflow = overflow
        self._block_timeout = float(block_timeout)
        self._wake_items = max(1, int(wake_items))
        self._on_wait = on_wait
        self._clock = clock
        self._lock = threading.Lock()
        #: Notified when the flusher should wake, and when room frees up for a blocked put.
        self.cond = threading.Condition(self._lock)
        self._queue: deque[Row | Call] = deque()
        self._inflight: deque[Row | Call] = deque()
        self._seq = 0
        self._gen = 0
        self._blocked = 0
        self.closed = False
        self.wake_requested = False
        # ledger (values) -- only changed under the lock
        self.accepted = 0
        self.delivered = 0
        self.pending = 0
        self.spilled = 0
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.replayed = 0
        self.failed_attempts = 0
        self.send_attempts = 0
        self.retries = 0
        # calls (not values)
        self.calls_accepted = 0
        self.calls_done = 0
        self.calls_dropped = 0
        # memory
        self.bytes = 0
        self.peak_bytes = 0

    # -- training thread -------------------------------------------------------------------------
    def put_row(self, values: dict[str, Any], step: int | None) -> None:
        """Append a row (the dict is kept as it is: pass a fresh one). Never raises for a full buffer."""
        n = len(values)
        if not n:
            return
        nbytes = sys.getsizeof(values) + _VALUE_BYTES * n + _ROW_OVERHEAD
        with self._lock:
            self._seq += 1
            row = Row(self._seq, step, values, nbytes)
            self.accepted += n
            self.pending += n
            full = self.bytes + nbytes > self.max_bytes and (self._queue or self._inflight)
            if full and not self._make_room(row):
                return
            self._queue.append(row)
            self.bytes += nbytes
            if self.bytes > self.peak_bytes:
                self.peak_bytes = self.bytes
            if len(self._queue) == self._wake_items:
                self.wake_requested = True
                self.cond.notify_all()

    def put_call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Append a non-metric call; it runs on the flusher after everything queued before it.
        Calls count against ``max_bytes`` too (an image is big); a call that cannot be made room
        for is dropped (calls cannot be spilled). Returns whether it was queued."""
        call = Call(0, name, args, kwargs)
        with self._lock:
            self._seq += 1
            call.seq = self._seq
            self.calls_accepted += 1
            full = self.bytes + call.nbytes > self.max_bytes and (self._queue or self._inflight)
            if full and not self._make_room(call):
                return False
            self._queue.append(call)
            self.bytes += call.nbytes
            self.peak_bytes = max(self.peak_bytes, self.bytes)
            return True

    def count_invalid(self, n: int) -> None:
        """``n`` values that were not numbers: accepted and dropped at once."""
        with self._lock:
            self.accepted += n
            self.dropped["invalid"] += n

    def _make_room(self, item: Row | Call) -> bool:
        """Called with the lock held when ``item`` does not fit. True if it should be queued."""
        policy = self.when_full
        if policy == "drop_newest":
            self._drop_locked(item, "newest")
            return False
        if policy == "block":
            return self._wait_for_room(item)
        evicted: list[Row] = []
        while self._queue and self.bytes + item.nbytes > self.max_bytes:
            old = self._queue.popleft()
            self.bytes -= old.nbytes
            if isinstance(old, Row) and policy == "spill":
                evicted.append(old)
            else:
                self._drop_locked(old, "oldest")
        fits = self.bytes + item.nbytes <= self.max_bytes or not self._inflight
        if not fits:
            # Only items in flight are left: they cannot be taken back, so the new one gives way.
            if isinstance(item, Row) and policy == "spill":
                evicted.append(item)
            else:
                self._drop_locked(item, "newest")
        if evicted:
            self._spill_evicted(evicted)
        return fits

    def _spill_evicted(self, rows: list[Row]) -> None:
        # Disk I/O without the lock, so the flusher is not held up; the rows stay pending meanwhile.
        self._lock.release()
        try:
            reason = self._overflow(rows) if self._overflow is not None else "spill_failed"
        except Exception:  # the overflow writer is supposed to report, not raise; stay safe anyway
            reason = "spill_failed"
        finally:
            self._lock.acquire()
        n = sum(len(r.values) for r in rows)
        self.pending -= n
        if reason is None:
            self.spilled += n
        else:
            self.dropped[reason] += n

    def _wait_for_room(self, item: Row | Call) -> bool:
        deadline = self._clock.now() + self._block_timeout
        self._blocked += 1
        self.wake_requested = True
        self.cond.notify_all()
        try:
            while self.bytes + item.nbytes > self.max_bytes and (self._queue or self._inflight):
                if self.closed or self._clock.now() >= deadline:
                    self._drop_locked(item, "newest")
                    return False
                self.cond.wait(0.01)
                if self._on_wait is not None:
                    self._lock.release()
                    try:
                        self._on_wait()
                    finally:
                        self._lock.acquire()
            return True
        finally:
            self._blocked -= 1

    def _drop_locked(self, item: Row | Call, reason: str) -> None:
        """Drop an item no longer (or never) queued: a row's values under ``reason``, or a call."""
        if isinstance(item, Call):
            self.calls_dropped += 1
            return
        n = len(item.values)
        self.pending -= n
        self.dropped[reason] += n

    # -- flusher ---------------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        """Bumped each time a stuck flusher's batch is taken away from it."""
        return self._gen

    def queued(self) -> int:
        """Items (rows and calls) waiting to be taken."""
        return len(self._queue)

    def idle(self) -> bool:
        """Nothing queued and nothing in flight."""
        with self._lock:
            return not self._queue and not self._inflight

    def take(self, max_items: int, gen: int | None = None) -> list[Row | Call]:
        """Move up to ``max_items`` items from the queue to in-flight, oldest first."""
        with self._lock:
            if gen is not None and gen != self._gen:
                return []
            self.wake_requested = False
            n = min(max_items, len(self._queue))
            items = [self._queue.popleft() for _ in range(n)]
            self._inflight.extend(items)
            return items

    def resolve(self, item: Row | Call, outcome: str, gen: int | None = None) -> bool:
        """Settle an in-flight item: ``"delivered"``, ``"spilled"``, or a drop reason (for a call,
        anything but ``"delivered"`` counts it dropped). False (and nothing changes) when ``gen`` is
        stale or the item is no longer in flight."""
        with self._lock:
            if gen is not None and gen != self._gen:
                return False
            try:
                self._inflight.remove(item)
            except ValueError:
                return False
            self.bytes -= item.nbytes
            if isinstance(item, Call):
                if outcome == DELIVERED:
                    self.calls_done += 1
                else:
                    self.calls_dropped += 1
            else:
                n = len(item.values)
                self.pending -= n
                if outcome == DELIVERED:
                    self.delivered += n
                elif outcome == SPILLED:
                    self.spilled += n
                else:
                    self.dropped[outcome] += n
            if self._blocked:
                self.cond.notify_all()
            return True

    def requeue_inflight(self, gen: int | None = None) -> int:
        """Put unresolved in-flight items back at the head of the queue, in order."""
        with self._lock:
            if gen is not None and gen != self._gen:
                return 0
            n = len(self._inflight)
            self._queue.extendleft(reversed(self._inflight))
            self._inflight.clear()
            return n

    def abandon_head(self, item: Row | Call, gen: int, still_stuck: Callable[[], bool]) -> bool:
        """Watchdog: the flusher of generation ``gen`` is stuck sending ``item``. If ``still_stuck()``
        (checked under the lock), count ``item`` abandoned, hand the rest of its batch back to the
        queue and bump the generation, so the stuck flusher's later resolutions are ignored."""
        with self._lock:
            if gen != self._gen or not still_stuck() or not self._inflight or self._inflight[0] is not item:
                return False
            self._inflight.popleft()
            self.bytes -= item.nbytes
            if isinstance(item, Call):
                self.calls_dropped += 1
            else:
                self.pending -= len(item.values)
                self.dropped["abandoned"] += len(item.values)
            self._queue.extendleft(reversed(self._inflight))
            self._inflight.clear()
            self._gen += 1
            self.cond.notify_all()
            return True

    def abandon_replay(self, gen: int, still_stuck: Callable[[], bool], advance: Callable[[], int]) -> bool:
        """Watchdog, for a stuck replay of a spilled row: ``advance()`` moves the spill cursor past it
        and returns its values, counted ``dropped_abandoned``; the generation is bumped."""
        with self._lock:
            if gen != self._gen or not still_stuck():
                return False
            n = advance()
            self.spilled -= n
            self.dropped["abandoned"] += n
            self._gen += 1
            self.cond.notify_all()
            return True

    def bump_generation(self) -> int:
        """Disown the current flusher (it has stopped or is stuck between items)."""
        with self._lock:
            self._gen += 1
            return self._gen

    def record_replayed(self, advance: Callable[[], int], gen: int | None = None) -> bool:
        """A spilled row was sent again: ``advance()`` moves the spill cursor past it and returns its
        values, which move from spilled to delivered. False (nothing done) when ``gen`` is stale."""
        with self._lock:
            if gen is not None and gen != self._gen:
                return False
            n = advance()
            self.spilled -= n
            self.delivered += n
            self.replayed += n
            return True

    def record_spill_lost(self, n: int, reason: str) -> None:
        """``n`` spilled values can no longer be replayed (unreadable file, abandoned replay)."""
        with self._lock:
            self.spilled -= n
            self.dropped[reason] += n

    def record_attempt(self, *, failed: bool, retry: bool = False) -> None:
        """One send attempt to the real logger; ``retry`` when another attempt will follow."""
        with self._lock:
            self.send_attempts += 1
            self.failed_attempts += failed
            self.retries += retry

    def wake(self) -> None:
        """Ask the flusher to run now."""
        with self._lock:
            self.wake_requested = True
            self.cond.notify_all()

    def close(self) -> None:
        """Refuse to block from now on (blocked puts drop their row as ``newest``)."""
        with self._lock:
            self.closed = True
            self.cond.notify_all()

    # -- accounting ------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, int]:
        """The ledger and memory figures, consistent with each other (taken under the lock)."""
        with self._lock:
            out = {
                "accepted": self.accepted,
                "delivered": self.delivered,
                "pending": self.pending,
                "spilled": self.spilled,
                **{f"dropped_{reason}": n for reason, n in self.dropped.items()},
                "replayed": self.replayed,
                "send_attempts": self.send_attempts,
                "failed_attempts": self.failed_attempts,
                "retries": self.retries,
                "calls_accepted": self.calls_accepted,
                "calls_done": self.calls_done,
                "calls_dropped": self.calls_dropped,
                "calls_pending": self.calls_accepted - self.calls_done - self.calls_dropped,
                "buffer_bytes": self.bytes,
                "buffer_peak_bytes": self.peak_bytes,
                "queued_items": len(self._queue),
                "inflight_items": len(self._inflight),
            }
        return out

    def load_counters(self, saved: dict[str, Any]) -> None:
        """Start from counters saved by a previous process. What it held pending then is now out of
        reach: counted as ``dropped_unconfirmed``."""
        with self._lock:
            get = saved.get
            self.accepted += int(get("accepted", 0))
            self.delivered += int(get("delivered", 0))
            self.spilled += int(get("spilled", 0))
            for reason in DROP_REASONS:
                self.dropped[reason] += int(get(f"dropped_{reason}", 0))
            self.dropped["unconfirmed"] += int(get("pending", 0))
            self.replayed += int(get("replayed", 0))
            self.send_attempts += int(get("send_attempts", 0))
            self.failed_attempts += int(get("failed_attempts", 0))
            self.retries += int(get("retries", 0))
            self.calls_accepted += int(get("calls_accepted", 0))
            self.calls_done += int(get("calls_done", 0))
            self.calls_dropped += int(get("calls_dropped", 0)) + int(get("calls_pending", 0))
            self.peak_bytes = max(self.peak_bytes, int(get("buffer_peak_bytes", 0)))
