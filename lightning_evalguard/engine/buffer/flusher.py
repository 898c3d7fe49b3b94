"""The flusher: a background thread that empties the buffer into the real logger, in order.

Each cycle (every ``flush_interval`` seconds, or sooner when ``max_batch`` items are queued or a
flush is requested)::

    1. spilled rows first: while the breaker lets work through, replay them oldest first;
    2. if rows are still spilled (the backend is down), new rows join them in the spill file, so
       order is kept; calls are still tried when the breaker allows;
    3. otherwise take up to max_batch items and send each: up to 1 + max_retries attempts with
       backoff; a send that still fails opens the breaker after failure_threshold in a row, and its
       row is spilled (and everything after it, until the replay succeeds).

A call into the logger that hangs cannot be interrupted in Python. The *watchdog*
(:meth:`Flusher.check_stuck`, called from the training thread's hooks and while shutting down) sees a
call running past ``send_timeout``: it counts that row ``dropped_abandoned`` (it may or may not arrive),
hands the rest of the batch back to the queue and starts a fresh flusher thread; the stuck one exits
without touching the ledger when its call returns. After ``max_abandoned`` such hangs the breaker is
locked open and everything goes to the spill file.

Example (driven by hand with a fake clock, as the tests do; in use :meth:`start` runs it):
    >>> from lightning_evalguard.engine.buffer.core import MetricBuffer
    >>> from lightning_evalguard.engine.breaker import CircuitBreaker
    >>> class ListSink:
    ...     def __init__(self): self.rows = []
    ...     def send_row(self, row): self.rows.append((row.step, row.values))
    ...     def send_call(self, call): pass
    ...     def after_batch(self): pass
    >>> buf, sink = MetricBuffer(1 << 20, "drop_newest"), ListSink()
    >>> flusher = Flusher(buf, sink, spill=None, breaker=CircuitBreaker())
    >>> buf.put_row({"loss": 0.5}, step=1)
    >>> flusher.step()
    'progress'
    >>> sink.rows, buf.snapshot()["delivered"]
    ([(1, {'loss': 0.5})], 1)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Final, Literal, Protocol

from lightning_evalguard.engine.breaker import HALF_OPEN, CircuitBreaker
from lightning_evalguard.engine.buffer.core import DELIVERED, SPILLED, Call, MetricBuffer, Row
from lightning_evalguard.engine.buffer.retry import Backoff
from lightning_evalguard.engine.buffer.spill import SpillEntry, SpillFailure, SpillStore
from lightning_evalguard.engine.clock import SYSTEM_CLOCK, Clock
from lightning_evalguard.engine.events import EventLog

__all__ = ["Flusher", "Sink"]

Status = Literal["progress", "idle", "stale"]
_LATENCY_SAMPLES: Final = 256


class Sink(Protocol):
    """Where the flusher delivers: one call per row, in order (the real logger, through an adapter)."""

    def send_row(self, row: Row) -> None:
        """Deliver one row; raise on failure (the row is retried, then spilled)."""

    def send_call(self, call: Call) -> None:
        """Run one queued non-metric call on the real logger."""

    def after_batch(self) -> None:
        """Called after each batch (e.g. the logger's ``save()``)."""


@dataclass(frozen=True, slots=True)
class _InCall:
    """What the flusher is sending right now: the watchdog's view."""

    gen: int
    started: float
    item: Row | Call
    entry: SpillEntry | None


class Flusher:
    """Moves rows from a :class:`MetricBuffer` to a :class:`Sink` on a daemon thread.

    Args:
        buffer: the buffer to empty.
        sink: the real logger's adapter.
        spill: where undeliverable rows go; ``None`` drops them as ``spill_failed``.
        breaker: the backend's circuit breaker.
        backoff: waits between retries.
        max_retries: retries after a failed attempt (a send makes at most 1 + max_retries attempts).
        max_batch: most items per cycle.
        flush_interval: seconds between cycles when fewer than ``max_batch`` items are queued.
        send_timeout: seconds after which a call into the logger is abandoned (see module docs).
        max_abandoned: hangs after which the breaker is locked open for good.
        clock: time source; ``sleep`` waits between retries (default: interruptible real waits).
        events: where ``flush``, ``spill``, ``replay`` and ``send_failed`` events go.
        warn: ``warn(kind, message)`` for runtime faults; the caller warns once per kind.
        name: thread name (``evalguard-log-flusher`` plus a suffix per restart).
    """

    def __init__(
        self,
        buffer: MetricBuffer,
        sink: Sink,
        *,
        spill: SpillStore | None,
        breaker: CircuitBreaker,
        backoff: Backoff | None = None,
        max_retries: int = 3,
        max_batch: int = 512,
        flush_interval: float = 1.0,
        send_timeout: float = 10.0,
        max_abandoned: int = 3,
        clock: Clock = SYSTEM_CLOCK,
        sleep: Callable[[float], object] | None = None,
        events: EventLog | None = None,
        warn: Callable[[str, str], None] | None = None,
        name: str = "evalguard-log-flusher",
    ) -> None:
        self.buffer = buffer
        self.sink = sink
        self.spill = spill
        self.breaker = breaker
        self.backoff = backoff or Backoff()
        self.max_retries = max_retries
        self.max_batch = max_batch
        self.flush_interval = flush_interval
        self.send_timeout = send_timeout
        self.max_abandoned = max_abandoned
        self.clock = clock
        self.events = events if events is not None else EventLog("logging", clock=clock)
        self._warn = warn or (lambda kind, message: None)
        self.name = name
        self._stop = threading.Event()
        self._sleep = sleep if sleep is not None else self._stop.wait
        self._threads: list[threading.Thread] = []
        self._current: _InCall | None = None
        self._busy = False
        self._next_due = clock.now() + flush_interval
        self._flush_requested = 0
        self._flush_done = 0
        self._deadline: float | None = None
        self.abandoned = 0
        self.latencies: deque[float] = deque(maxlen=_LATENCY_SAMPLES)
        self.internal_errors = 0

    # -- thread ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the flusher thread for the buffer's current generation."""
        gen = self.buffer.generation
        suffix = f"-{len(self._threads)}" if self._threads else ""
        thread = threading.Thread(target=self._run, args=(gen,), name=self.name + suffix, daemon=True)
        self._threads.append(thread)
        thread.start()

    @property
    def thread(self) -> threading.Thread | None:
        """The current flusher thread (earlier ones were abandoned in a hung call)."""
        return self._threads[-1] if self._threads else None

    def busy(self) -> bool:
        """True while a cycle is running. Lock-free."""
        return self._busy

    def _run(self, gen: int) -> None:
        cond = self.buffer.cond
        while True:
            with cond:
                while not self._due(gen):
                    cond.wait(max(0.001, min(self._next_due - self.clock.now(), self.flush_interval)))
                if self._stop.is_set() or gen != self.buffer.generation:
                    return
                ticket = self._flush_requested
            try:
                while self.step(gen) == "progress" and (
                    ticket > self._flush_done or self.buffer.queued() >= self.max_batch
                ):
                    pass
            except Exception as exc:  # a bug here must not kill logging for the rest of the run
                self.internal_errors += 1
                self._warn("internal", f"BufferedLogging flusher error (logging continues): {exc!r}")
                self._stop.wait(min(1.0, self.flush_interval))
            if gen != self.buffer.generation:
                return
            with cond:
                self._next_due = self.clock.now() + self.flush_interval
                if ticket > self._flush_done:
                    self._flush_done = ticket
                cond.notify_all()

    def _due(self, gen: int) -> bool:
        """Called with the buffer's lock held."""
        if self._stop.is_set() or gen != self.buffer.generation:
            return True
        if self._flush_requested > self._flush_done or self.buffer.wake_requested:
            return True
        backlog = self.spill is not None and self.spill.backlog_rows > 0
        return self.clock.now() >= self._next_due and (self.buffer.queued() > 0 or backlog)

    def request_flush(self) -> int:
        """Ask for a cycle now, without waiting; returns a ticket for :meth:`wait_flushed`."""
        with self.buffer.cond:
            self._flush_requested += 1
            self.buffer.cond.notify_all()
            return self._flush_requested

    def wait_flushed(self, ticket: int, timeout: float) -> bool:
        """Wait until the flush of ``ticket`` is done: everything queued before it was tried
        (delivered, spilled or dropped). Runs the watchdog while waiting. True if done in time."""
        deadline = self.clock.now() + timeout
        cond = self.buffer.cond
        while True:
            thread = self.thread
            if thread is None or not thread.is_alive():
                return False
            with cond:
                if self._flush_done >= ticket:
                    return True
                remaining = deadline - self.clock.now()
                if remaining <= 0:
                    return False
                cond.wait(min(remaining, 0.05))
            self.check_stuck()

    def flush(self, timeout: float) -> bool:
        """Flush now and wait up to ``timeout`` seconds; True if everything queued was tried."""
        return self.wait_flushed(self.request_flush(), timeout)

    def close(self, timeout: float) -> None:
        """Flush (a pending :meth:`request_flush` counts) for up to 90 % of ``timeout``, then stop
        the thread; what is still queued or in flight is spilled on the caller's thread. A thread
        stuck in a call is abandoned (a daemon, it exits when the call returns). Idempotent."""
        if self._stop.is_set():
            return
        start = self.clock.now()
        self._deadline = start + timeout
        ticket = self._flush_requested if self._flush_requested > self._flush_done else self.request_flush()
        self.wait_flushed(ticket, 0.9 * timeout)
        self._stop.set()
        self.buffer.close()
        thread = self.thread
        if thread is not None:
            thread.join(max(0.0, start + timeout - self.clock.now()))
        if thread is not None and thread.is_alive():
            # Stuck in a call (or a very slow write): take its batch away; the call cannot be stopped.
            token = self._current
            if token is None or not self._abandon(token, restart=False):
                self.buffer.bump_generation()
        self.buffer.requeue_inflight()
        self._spill_everything()

    def threads_alive(self) -> list[threading.Thread]:
        """Flusher threads still running (a thread abandoned in a hung call stays until it returns)."""
        return [t for t in self._threads if t.is_alive()]

    def _spill_everything(self) -> None:
        """At shutdown, on the caller's thread: queued rows go to the spill file, calls are dropped."""
        gen = self.buffer.generation
        while True:
            items = self.buffer.take(max(self.max_batch, 1), gen)
            if not items:
                break
            self._spill_items(items, gen)
        if self.spill is not None:
            self.spill.close()

    # -- one cycle -------------------------------------------------------------------------------
    def step(self, gen: int | None = None) -> Status:
        """One cycle (see module docs). ``"progress"`` if it moved anything, ``"idle"`` if there
        was nothing it could do now, ``"stale"`` if this flusher was superseded by the watchdog."""
        if gen is None:
            gen = self.buffer.generation
        self._busy = True
        started = self.clock.now()
        moved = 0
        ok = True
        try:
            if self.spill is not None and self.spill.backlog_rows:
                replayed, ok = self._replay(gen)
                moved += replayed
                if gen != self.buffer.generation:
                    return "stale"
                if self.spill.backlog_rows:
                    # The backend is still refusing: new rows join the backlog, keeping order.
                    items = self.buffer.take(self.max_batch, gen)
                    sent, ok_items = self._send_items(items, gen, spill_rows=True)
                    moved += sent
                    ok = ok and ok_items
                    return "progress" if moved else "idle"
            items = self.buffer.take(self.max_batch, gen)
            if not items:
                return "progress" if moved else "idle"
            sent, ok = self._send_items(items, gen, spill_rows=False)
            moved += sent
            return "progress" if gen == self.buffer.generation else "stale"
        finally:
            self._busy = False
            if moved:
                duration = self.clock.now() - started
                self.latencies.append(duration)
                self.events.emit("flush", rows=moved, duration_s=duration, ok=ok)

    def _send_items(self, items: list[Row | Call], gen: int, *, spill_rows: bool) -> tuple[int, bool]:
        """Send (or spill) ``items`` in order. Returns (items handled, all delivered)."""
        handled = 0
        all_ok = True
        index = 0
        while index < len(items):
            if self._stop.is_set():  # shutting down: the closing thread spills what is left
                self.buffer.requeue_inflight(gen)
                return handled, False
            item = items[index]
            if isinstance(item, Row) and (spill_rows or (self.spill is not None and self.spill.backlog_rows)):
                # Rows go behind the spilled backlog, to keep their order: the whole run in one write.
                end = index + 1
                while end < len(items) and isinstance(items[end], Row):
                    end += 1
                if not self._spill_items(items[index:end], gen):
                    return handled, False
                handled += end - index
                all_ok = False
                index = end
                continue
            index += 1
            delivered = False
            if self.breaker.allow():
                sent = self._send(item, None, gen)
                if sent is None:
                    return handled, False  # superseded by the watchdog while sending
                delivered = sent
                if sent:
                    self.breaker.record_success()
                else:
                    self.breaker.record_failure()
            if delivered:
                still_mine = self.buffer.resolve(item, DELIVERED, gen)
                # Let the training thread have the GIL between two sends: a batch of W&B calls is
                # milliseconds of Python, and the training thread would otherwise wait for the
                # interpreter's switch interval each time it comes back from a kernel.
                time.sleep(0)
            elif isinstance(item, Row):
                still_mine = self._spill_items([item], gen)
            else:
                still_mine = self.buffer.resolve(item, "dropped", gen)
                self._warn("call_dropped", f"BufferedLogging: logger call {item.name!r} could not be delivered")
            if not still_mine:
                return handled, False
            all_ok = all_ok and delivered
            handled += 1
        try:
            self.sink.after_batch()
        except Exception as exc:
            self._warn("after_batch", f"BufferedLogging: logger save() failed: {exc!r}")
        return handled, all_ok

    def _spill_items(self, items: list[Row | Call], gen: int) -> bool:
        """Spill rows (calls cannot be spilled: dropped). False if this flusher was superseded."""
        rows = [i for i in items if isinstance(i, Row)]
        outcome = SPILLED
        if rows:
            if self.spill is None:
                outcome = "spill_failed"
            else:
                try:
                    self.spill.append(rows)
                except SpillFailure as exc:
                    outcome = exc.reason
                    self._warn(exc.reason, f"BufferedLogging: rows could not be spilled, they are dropped: {exc}")
            if outcome == SPILLED:
                self.events.emit("spill", rows=len(rows))
        for item in items:
            result = outcome if isinstance(item, Row) else "dropped"
            if not self.buffer.resolve(item, result, gen):
                return False
        return True

    def _replay(self, gen: int) -> tuple[int, bool]:
        """Send spilled rows, oldest first, while the breaker allows. Returns (rows, no failure)."""
        spill = self.spill
        assert spill is not None
        replayed = 0
        try:
            while spill.backlog_rows and not self._stop.is_set():
                if not self.breaker.allow():
                    return replayed, True
                try:
                    entries = spill.read_backlog(self.max_batch)
                except SpillFailure as exc:
                    self.breaker.release_trial()
                    lost = spill.skip_segment()
                    self.buffer.record_spill_lost(lost, "spill_failed")
                    self._warn("spill_read", f"BufferedLogging: a spill file could not be read back: {exc}")
                    continue
                for entry in entries:
                    outcome = self._send(entry.row, entry, gen)
                    if outcome is None:
                        return replayed, False
                    if not outcome:
                        self.breaker.record_failure()
                        return replayed, False
                    self.breaker.record_success()
                    if not self.buffer.record_replayed(partial(spill.advance, entry), gen):
                        return replayed, False
                    replayed += 1
                    if self.breaker.state != "closed":
                        break
            return replayed, True
        finally:
            if replayed:
                self.events.emit("replay", rows=replayed)
            spill.commit()

    def _send(self, item: Row | Call, entry: SpillEntry | None, gen: int) -> bool | None:
        """Deliver one item with retries. True, False (gave up), or None (superseded meanwhile)."""
        single_try = self.breaker.state == HALF_OPEN
        attempt = 0
        while True:
            attempt += 1
            token = _InCall(gen, self.clock.now(), item, entry)
            self._current = token
            error: Exception | None = None
            try:
                if isinstance(item, Row):
                    self.sink.send_row(item)
                else:
                    self.sink.send_call(item)
            except Exception as exc:
                error = exc
            finally:
                self._current = None
            if gen != self.buffer.generation:
                return None
            retry = (
                error is not None
                and not single_try
                and attempt <= self.max_retries
                and not self._stop.is_set()
            )
            delay = self.backoff.delay(attempt) if retry else 0.0
            if retry and self._deadline is not None and self.clock.now() + delay >= self._deadline:
                retry = False
            self.buffer.record_attempt(failed=error is not None, retry=retry)
            if error is None:
                return True
            self.events.emit("send_failed", attempt=attempt, error=repr(error)[:200], retry=retry)
            self._warn(
                f"send:{type(error).__name__}",
                f"BufferedLogging: the logger raised {error!r}; retrying with backoff, then spilling",
            )
            if not retry:
                return False
            self._sleep(delay)

    # -- watchdog --------------------------------------------------------------------------------
    def check_stuck(self) -> bool:
        """Abandon a call running past ``send_timeout``. Cheap when nothing is stuck."""
        token = self._current
        if token is None or self.clock.now() - token.started < self.send_timeout:
            return False
        return self._abandon(token, restart=not self._stop.is_set())

    def _abandon(self, token: _InCall, *, restart: bool) -> bool:
        def still() -> bool:
            return self._current is token

        if token.entry is None:
            done = self.buffer.abandon_head(token.item, token.gen, still)
        else:
            entry = token.entry
            spill = self.spill
            assert spill is not None
            done = self.buffer.abandon_replay(token.gen, still, lambda: spill.advance(entry))
        if not done:
            return False
        self._current = None
        self.abandoned += 1
        self.breaker.record_failure()
        self.events.emit("send_failed", abandoned=True, after_s=self.clock.now() - token.started)
        self._warn(
            "hang",
            f"BufferedLogging: a logger call ran past send_timeout={self.send_timeout}s; it was abandoned "
            "and counted as dropped_abandoned",
        )
        if self.abandoned >= self.max_abandoned:
            self.breaker.lock_open(f"the logger hung {self.abandoned} times")
            self._warn("locked", "BufferedLogging: the logger hung repeatedly; rows now go to the spill file")
        if restart:
            self.start()
        return True
