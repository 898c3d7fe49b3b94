"""The evaluator: breaker, bounded queue, snapshot pool, watchdog and a runner, wired together.

Everything the callback needs is here, without Lightning:

- :meth:`Evaluator.request` (training thread): breaker check, full-queue policy, snapshot into a
  free slot, queue the job;
- runners report outcomes through :meth:`Evaluator.finish` (any thread): counters, breaker,
  latency, events, and the outbox;
- :meth:`Evaluator.drain` (training thread): finished jobs, to deliver their results there;
- :meth:`Evaluator.close`: cancel what is pending, stop the runner and the watchdog.

The counters always satisfy ``submitted == completed + failed + timed_out + cancelled + replaced
+ pending + running``.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

from lightning_evalguard.engine.breaker import STATE_CODES, CircuitBreaker
from lightning_evalguard.engine.clock import SYSTEM_CLOCK, Clock
from lightning_evalguard.engine.events import EventLog
from lightning_evalguard.engine.jobs import Job, JobQueue
from lightning_evalguard.engine.runners.base import Runner, RunnerContext
from lightning_evalguard.engine.snapshot import Slot, SnapshotPool
from lightning_evalguard.engine.watchdog import Watchdog, percentile

__all__ = ["OUTCOME_COUNTERS", "Evaluator"]

# job state -> stats() counter
OUTCOME_COUNTERS = {
    "ok": "completed",
    "failed": "failed",
    "timeout": "timed_out",
    "cancelled": "cancelled",
    "replaced": "replaced",
}
_COUNTERS = ("submitted", "skipped_breaker_open", "skipped_queue_full", *OUTCOME_COUNTERS.values())


class Evaluator:
    """Runs evaluation jobs on snapshots, under a breaker, a bounded queue and a watchdog.

    Args:
        runner: executes the jobs (inline, stream or subprocess runner).
        pool: snapshot slots (size ``max_pending + 1``).
        max_pending: most queued jobs.
        when_full: ``"skip"``, ``"replace"`` or ``"wait"`` (blocks :meth:`request` up to ``timeout``).
        timeout: seconds a job may run.
        failure_threshold: consecutive failures that open the breaker.
        recovery_time: seconds the breaker stays open before a trial job.
        clock: time source.
        events: where start/end/skip events go.
        watchdog_tick: the watchdog's wake-up period, seconds.
    """

    def __init__(
        self,
        runner: Runner,
        pool: SnapshotPool,
        *,
        max_pending: int = 1,
        when_full: str = "skip",
        timeout: float = 600.0,
        failure_threshold: int = 3,
        recovery_time: float = 300.0,
        clock: Clock = SYSTEM_CLOCK,
        events: EventLog | None = None,
        watchdog_tick: float = 0.05,
    ) -> None:
        self.runner = runner
        self.pool = pool
        self.timeout = float(timeout)
        self.clock = clock
        self.events = events if events is not None else EventLog("evaluation", clock=clock)
        self.queue = JobQueue(max_pending, when_full, wait_timeout=timeout)
        self.breaker = CircuitBreaker(failure_threshold, recovery_time, clock)
        self.watchdog = Watchdog(watchdog_tick, clock)
        self.counts: Counter[str] = Counter({name: 0 for name in _COUNTERS})
        self._outbox: deque[Job] = deque()
        self._latencies: deque[float] = deque(maxlen=512)
        self._last_latency = 0.0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._started = False
        self._closed = False
        self.gave_up: str | None = None
        runner.bind(
            RunnerContext(
                queue=self.queue,
                watchdog=self.watchdog,
                clock=clock,
                timeout=self.timeout,
                events=self.events,
                finish=self.finish,
                release=self._release,
                retire=self._retire,
                give_up=self._give_up,
            )
        )

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the watchdog and the runner (idempotent)."""
        if self._started or self._closed:
            return
        self._started = True
        self.watchdog.start()
        self.runner.start()

    def close(self, timeout: float = 5.0) -> None:
        """Cancel pending and running jobs, stop the runner and the watchdog. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.queue.close()
        for job in self.queue.take_all():
            self.finish(job, "cancelled", None, None)
            self._release(job.slot)
        self.runner.close(timeout)
        self.watchdog.close(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- training thread -------------------------------------------------------------------------
    def request(self, step: int, epoch: int, sources: Sequence[Any]) -> str:
        """Snapshot ``sources`` and queue an evaluation of it, unless the breaker or queue refuse.

        Returns:
            ``"submitted"``, ``"skipped_breaker_open"``, ``"skipped_queue_full"`` or ``"closed"``.
        """
        if self._closed:
            return "closed"
        if not self._started:
            self.start()
        if not self.breaker.allow():
            self._count("skipped_breaker_open")
            self.events.emit("eval_skipped", reason="breaker_open", step=step)
            return "skipped_breaker_open"
        ok, evicted = self.queue.make_room()
        for job in evicted:
            self._record_outcome(job)
            self._release(job.slot)
        slot = self.pool.acquire() if ok else None
        if slot is None:
            self._count("skipped_queue_full")
            self.breaker.release_trial()  # if this was a half-open trial, it never ran
            self.events.emit("eval_skipped", reason="queue_full", step=step)
            return "skipped_queue_full"
        try:
            self.pool.capture(slot, sources)
        except BaseException:
            self.pool.release(slot)
            self.breaker.release_trial()
            raise
        job = Job(next(self._ids), step, epoch, slot, self.clock.now())
        self.queue.put(job)
        self._count("submitted")
        self.events.emit("eval_submitted", job=job.id, step=step, epoch=epoch)
        self.runner.submitted()
        return "submitted"

    def has_outcomes(self) -> bool:
        """Whether :meth:`drain` would return something (lock-free: a hint for the hot path)."""
        return bool(self._outbox)

    def drain(self) -> list[Job]:
        """Jobs that reached an outcome since the last call, in the order they did."""
        out = []
        with self._lock:
            while self._outbox:
                out.append(self._outbox.popleft())
        return out

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is pending or running (``True``), or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout  # a real wait, whatever clock times the jobs
        with self._idle:
            while len(self.queue) or self.runner.running():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(min(remaining, 0.05))
        return True

    # -- any thread --------------------------------------------------------------------------------
    def finish(self, job: Job, state: str, result: Any, error: BaseException | None) -> bool:
        """Decide a job's outcome (first caller wins) and account for it."""
        if not job.finish(state, self.clock.now(), result=result, error=error):
            return False
        self._record_outcome(job)
        return True

    def _record_outcome(self, job: Job) -> None:
        state = job.state
        with self._lock:
            self.counts[OUTCOME_COUNTERS[state]] += 1
            latency = job.latency_s
            if state == "ok" and latency is not None:
                self._latencies.append(latency)
                self._last_latency = latency
            self._outbox.append(job)
            self._idle.notify_all()
        if state == "ok":
            self.breaker.record_success()
        elif state in ("failed", "timeout"):
            self.breaker.record_failure()
        elif state == "cancelled":
            self.breaker.release_trial()
        self.events.emit(
            "eval_end", job=job.id, step=job.step, epoch=job.epoch, outcome=state, latency_s=job.latency_s
        )

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def _release(self, slot: Slot | None) -> None:
        if slot is not None:
            self.pool.release(slot)
        with self._idle:
            self._idle.notify_all()

    def _retire(self, slot: Slot | None) -> None:
        if slot is not None:
            self.pool.retire(slot)

    def _give_up(self, reason: str) -> None:
        self.gave_up = reason
        self.breaker.lock_open(reason)
        self.events.emit("gave_up", reason=reason)
        for job in self.queue.take_all():  # nothing will run them
            self.finish(job, "cancelled", None, None)
            self._release(job.slot)

    # -- figures -----------------------------------------------------------------------------------
    def stats(self) -> dict[str, float | int]:
        """Counters and figures as plain numbers."""
        with self._lock:
            counts = dict(self.counts)
            latencies = list(self._latencies)
            last = self._last_latency
        out: dict[str, float | int] = dict(counts)
        out.update(
            pending=len(self.queue),
            running=self.runner.running(),
            breaker_state=STATE_CODES[self.breaker.state],
            last_latency_s=last,
            latency_p50_s=percentile(latencies, 0.5),
            latency_p95_s=percentile(latencies, 0.95),
            watchdog_lag_p95_s=self.watchdog.lag_percentile(0.95),
            watchdog_lag_max_s=self.watchdog.lag_max_s,
            snapshot_copy_s=self.pool.last_copy_s,
            snapshot_bytes=self.pool.nbytes,
            snapshot_slots=self.pool.allocated,
            snapshot_slots_peak=self.pool.peak_allocated,
            queue_high_water=self.queue.high_water,
            abandoned_threads=0,
        )
        out.update(self.runner.stats())
        return out

    def state_dict(self) -> dict[str, Any]:
        """Counters and breaker state, plain data."""
        with self._lock:
            counts = dict(self.counts)
        # Jobs in flight do not survive a restart: save them as cancelled so the counters add up.
        counts["cancelled"] += len(self.queue) + self.runner.running()
        return {"counts": counts, "breaker": self.breaker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters and breaker state (unknown keys ignored, missing ones kept)."""
        with self._lock:
            for name, value in state.get("counts", {}).items():
                if name in self.counts:
                    self.counts[name] = int(value)
        if "breaker" in state:
            self.breaker.load_state_dict(state["breaker"])
