"""The inline runner: evaluation runs synchronously on the thread that submits it.

Same guards as the other modes (deadline, breaker, counters), so it serves for debugging and as
the baseline the benchmarks compare against. A job stuck in one long C call cannot be abandoned
here: it blocks the caller until it returns (use ``mode="subprocess"`` for code that may hang).
"""

from __future__ import annotations

import threading

from lightning_evalguard.engine.jobs import Job
from lightning_evalguard.engine.runners.base import Execute, ThreadJobRunner, _Worker

__all__ = ["InlineRunner"]


class InlineRunner(ThreadJobRunner):
    """Runs each job on the submitting thread as soon as it is queued.

    Args:
        execute: runs one job, returns its result.
        cancel_grace: seconds after the deadline before a job that ignores cancellation is counted
            as stuck (it cannot be abandoned: it runs on the caller's thread).
    """

    name = "inline"

    def __init__(self, execute: Execute, *, cancel_grace: float = 5.0, threads: int | None = None) -> None:
        super().__init__(execute, cancel_grace=cancel_grace)
        if threads is not None and threads < 1:
            raise ValueError(f"`threads` must be >= 1 or None, got {threads!r}")
        self.threads = threads
        self.stuck = 0

    def start(self) -> None:
        """Nothing to start: jobs run on the caller's thread."""

    def submitted(self) -> None:
        ctx = self.ctx
        assert ctx is not None
        job = ctx.queue.get(timeout=0)
        if job is None:
            return
        worker = _Worker(threading.current_thread())
        with self._workers_lock:
            self._workers.append(worker)
        previous = None
        if self.threads is not None:
            import torch

            previous = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        try:
            self._run_job(worker, job)
        finally:
            if previous is not None:
                torch.set_num_threads(previous)  # the caller's (training's) own setting
            with self._workers_lock:
                self._workers.remove(worker)

    def _on_grace(self, worker: _Worker, job: Job) -> None:
        with worker.lock:
            if worker.job is job:
                self.stuck += 1

    def close(self, timeout: float) -> None:
        self._closing = True
        if self.ctx is not None:
            self._cancel_running()

    def stats(self) -> dict[str, float | int]:
        return {"stuck_inline": self.stuck}
