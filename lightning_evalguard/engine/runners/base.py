"""What every runner shares: the context it gets from the evaluator, and thread interruption.

A runner takes jobs from the evaluator's queue, runs them, and reports each outcome with
:meth:`RunnerContext.finish`. It gives a slot back with :meth:`RunnerContext.release` only once
nothing reads it any more, and hands it over with :meth:`RunnerContext.retire` when a stuck reader
may still hold it.
"""

from __future__ import annotations

import ctypes
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning_evalguard.engine.clock import Clock
from lightning_evalguard.engine.events import EventLog
from lightning_evalguard.engine.jobs import Job, JobCancelled, JobQueue
from lightning_evalguard.engine.snapshot import Slot
from lightning_evalguard.engine.watchdog import Watchdog

__all__ = ["Execute", "Runner", "RunnerContext", "clear_async_exception", "interrupt_thread"]

Execute = Callable[[Job], Any]


@dataclass
class RunnerContext:
    """Everything a runner needs from the evaluator that owns it."""

    queue: JobQueue
    watchdog: Watchdog
    clock: Clock
    timeout: float
    events: EventLog
    finish: Callable[[Job, str, Any, BaseException | None], bool]
    release: Callable[[Slot], None]
    retire: Callable[[Slot], None]
    give_up: Callable[[str], None]


class Runner(ABC):
    """Runs evaluation jobs. Subclasses: inline, stream (thread), subprocess (process)."""

    name = "base"

    def __init__(self) -> None:
        self.ctx: RunnerContext | None = None

    def bind(self, ctx: RunnerContext) -> None:
        """Attach to the evaluator's queue, watchdog and bookkeeping (once, before :meth:`start`)."""
        self.ctx = ctx

    @abstractmethod
    def start(self) -> None:
        """Get ready to take jobs (start threads or processes)."""

    def submitted(self) -> None:  # noqa: B027 - optional hook
        """Called on the submitting thread right after a job was queued."""

    @abstractmethod
    def running(self) -> int:
        """How many jobs are executing now."""

    @abstractmethod
    def close(self, timeout: float) -> None:
        """Stop taking jobs, cancel the running one, release resources. Idempotent."""

    def stats(self) -> dict[str, float | int]:
        """Runner-specific counters (merged into the evaluator's stats)."""
        return {}


def interrupt_thread(thread: threading.Thread, exc_type: type[BaseException] = JobCancelled) -> bool:
    """Schedule ``exc_type`` to be raised in ``thread`` at its next bytecode.

    This stops Python-level loops (``while True: time.sleep(0.01)``) in another thread. A thread
    blocked inside one long C call only sees it when that call returns.
    """
    ident = thread.ident
    if ident is None or not thread.is_alive():
        return False
    set_async = ctypes.pythonapi.PyThreadState_SetAsyncExc
    return set_async(ctypes.c_ulong(ident), ctypes.py_object(exc_type)) == 1


def clear_async_exception(thread: threading.Thread) -> None:
    """Revoke an exception scheduled by :func:`interrupt_thread` that has not been raised yet."""
    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), None)


class _Worker:
    """A thread running jobs, and what it is running now (guarded by ``lock``)."""

    __slots__ = ("abandoned", "interrupted", "job", "lock", "thread")

    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread
        self.job: Job | None = None
        self.lock = threading.Lock()
        self.abandoned = False
        self.interrupted = False


class ThreadJobRunner(Runner):
    """Shared by the inline and stream runners: runs a job on a Python thread, under a deadline.

    At the deadline the job is declared timed out at once (the breaker sees it, training never
    waits), cancellation is requested (checked between batches) and :class:`JobCancelled` is
    injected into the thread, which stops Python-level loops. A thread that has not let go of the
    job ``cancel_grace`` seconds later is stuck in C code: see :meth:`_on_grace`.

    Injection is only ever armed while the thread is inside the job, under the worker's lock, and
    revoked under that lock when the job returns, so it cannot land in the runner's own code.
    """

    def __init__(self, execute: Execute, *, cancel_grace: float = 5.0) -> None:
        super().__init__()
        self._execute = execute
        self.cancel_grace = float(cancel_grace)
        self._workers: list[_Worker] = []
        self._workers_lock = threading.Lock()
        self._closing = False

    def running(self) -> int:
        with self._workers_lock:
            workers = list(self._workers)
        return sum(1 for w in workers if w.job is not None and not w.abandoned)

    # -- one job ---------------------------------------------------------------------------------
    def _run_job(self, worker: _Worker, job: Job) -> None:
        ctx = self.ctx
        assert ctx is not None
        if not job.start(ctx.clock.now()):  # cancelled or replaced while it waited
            ctx.release(job.slot)
            return
        assert job.started_at is not None
        with worker.lock:
            worker.job = job
            worker.interrupted = False
        ctx.events.emit("eval_start", job=job.id, step=job.step, epoch=job.epoch)
        ctx.watchdog.watch(("deadline", job.id), job.started_at + ctx.timeout, lambda: self._on_deadline(worker, job))
        state, result, error = "ok", None, None
        try:
            try:
                result = self._run_execute(job)
            finally:
                while True:  # an injected exception may land while disarming: disarm again
                    try:
                        self._disarm(worker)
                        break
                    except JobCancelled:
                        continue
        except JobCancelled:
            state = "timeout" if job.cancel_reason == "timeout" else "cancelled"
        except BaseException as exc:  # the job's own failure, whatever it is
            state, error = "failed", exc
        ctx.watchdog.unwatch(("deadline", job.id))
        ctx.watchdog.unwatch(("grace", job.id))
        ctx.finish(job, state, result, error)
        with worker.lock:
            abandoned = worker.abandoned
        if not abandoned:  # an abandoned worker's slot was retired: never touch it again
            ctx.release(job.slot)

    def _run_execute(self, job: Job) -> Any:
        return self._execute(job)

    @staticmethod
    def _disarm(worker: _Worker) -> None:
        with worker.lock:
            worker.job = None
            if worker.interrupted:
                clear_async_exception(worker.thread)

    def _interrupt(self, worker: _Worker, job: Job, reason: str) -> None:
        """Request cancel and inject it into the worker thread, at most once per job."""
        job.request_cancel(reason)
        with worker.lock:
            if worker.job is job and not worker.interrupted:
                worker.interrupted = True
                interrupt_thread(worker.thread)

    def _on_deadline(self, worker: _Worker, job: Job) -> None:
        ctx = self.ctx
        assert ctx is not None
        assert job.started_at is not None
        from lightning_evalguard.errors import EvalTimeout

        now = ctx.clock.now()
        if not ctx.finish(job, "timeout", None, EvalTimeout(now - job.started_at, ctx.timeout)):
            return  # it finished just in time
        self._interrupt(worker, job, "timeout")
        ctx.watchdog.watch(("grace", job.id), now + self.cancel_grace, lambda: self._on_grace(worker, job))

    def _on_grace(self, worker: _Worker, job: Job) -> None:
        """The job's thread ignored cancellation for ``cancel_grace`` seconds."""

    # -- shutdown --------------------------------------------------------------------------------
    def _cancel_running(self) -> None:
        ctx = self.ctx
        assert ctx is not None
        with self._workers_lock:
            workers = list(self._workers)
        for worker in workers:
            job = worker.job
            if job is not None and not worker.abandoned:
                ctx.finish(job, "cancelled", None, None)
                self._interrupt(worker, job, "shutdown")
