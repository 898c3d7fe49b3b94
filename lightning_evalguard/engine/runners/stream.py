"""The stream runner: a persistent background thread runs jobs, on a side CUDA stream on GPU.

Training never waits for it. On CUDA the worker's stream first waits for the snapshot's copy event
and records the slot's free event when done, so neither the host nor the main stream synchronise.

A Python thread cannot be killed. At a job's deadline the job counts as timed out at once and
cancellation is injected; a thread still inside the job ``cancel_grace`` seconds later is stuck in C
code: it is *abandoned* (its slot is retired, a fresh worker thread takes later jobs) and counted.
After ``max_abandoned`` abandoned threads the runner gives up: the evaluator pins the breaker open,
since each abandoned thread still holds memory and may hold the GIL.

Examples:
    >>> from lightning_evalguard.engine.evaluator import Evaluator
    >>> from lightning_evalguard.engine.snapshot import SnapshotPool
    >>> import torch
    >>> pool = SnapshotPool(lambda: [torch.zeros(1)], size=2)
    >>> ev = Evaluator(StreamRunner(lambda job: {"v": float(job.slot.tensors[0])}), pool, timeout=5.0)
    >>> ev.start(); ev.request(step=1, epoch=0, sources=[torch.ones(1)])
    'submitted'
    >>> ev.wait_idle(5.0), [job.result for job in ev.drain()]
    (True, [{'v': 1.0}])
    >>> ev.close()
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from lightning_evalguard.engine.jobs import Job
from lightning_evalguard.engine.runners.base import Execute, ThreadJobRunner, _Worker

__all__ = ["StreamRunner"]


class StreamRunner(ThreadJobRunner):
    """Background-thread runner.

    Args:
        execute: runs one job, returns its result (called on the worker thread).
        cancel_grace: seconds a timed-out job gets to stop before its thread is abandoned.
        max_abandoned: abandoned threads after which the runner gives up for good.
        name: prefix of the worker threads' names.
        threads: torch intra-op threads of the worker thread (``torch.set_num_threads`` is per
            thread); ``None`` keeps the process default.
    """

    name = "stream"

    def __init__(
        self,
        execute: Execute,
        *,
        cancel_grace: float = 5.0,
        max_abandoned: int = 2,
        name: str = "evalguard-eval",
        threads: int | None = None,
    ) -> None:
        super().__init__(execute, cancel_grace=cancel_grace)
        if max_abandoned < 1:
            raise ValueError(f"`max_abandoned` must be >= 1, got {max_abandoned!r}")
        if threads is not None and threads < 1:
            raise ValueError(f"`threads` must be >= 1 or None, got {threads!r}")
        self.threads = threads
        self.max_abandoned = max_abandoned
        self.thread_name = name
        self.abandoned = 0
        self._generation = itertools.count()
        self._streams = threading.local()

    # -- workers ---------------------------------------------------------------------------------
    def start(self) -> None:
        with self._workers_lock:
            if self._workers or self._closing:
                return
        self._spawn()

    def _spawn(self) -> None:
        thread = threading.Thread(
            target=lambda: self._loop(worker), name=f"{self.thread_name}-{next(self._generation)}", daemon=True
        )
        worker = _Worker(thread)
        with self._workers_lock:
            self._workers.append(worker)
        thread.start()

    def _loop(self, worker: _Worker) -> None:
        from lightning_evalguard.engine.jobs import JobCancelled

        ctx = self.ctx
        assert ctx is not None
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)  # this thread's OpenMP team only
        try:
            while not self._closing and not worker.abandoned:
                try:
                    job = ctx.queue.get()
                    if job is None:
                        return
                    self._run_job(worker, job)
                except JobCancelled:  # a late injection; the job is accounted for already
                    continue
        finally:
            with self._workers_lock:
                if worker in self._workers:
                    self._workers.remove(worker)

    # -- CUDA ------------------------------------------------------------------------------------
    def _run_execute(self, job: Job) -> Any:
        slot = job.slot
        if slot is None or not getattr(slot, "is_cuda", False):
            return self._execute(job)
        return self._run_on_side_stream(job)  # pragma: no cover - GPU

    def _run_on_side_stream(self, job: Job) -> Any:  # pragma: no cover - GPU
        import torch

        slot = job.slot
        device = slot.tensors[0].device
        stream = getattr(self._streams, "stream", None)
        if stream is None or stream.device != device:
            stream = self._streams.stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            if slot.copied_event is not None:
                stream.wait_event(slot.copied_event)
            try:
                return self._execute(job)
            finally:
                free = torch.cuda.Event()
                free.record(stream)
                slot.free_event = free

    # -- stuck threads -----------------------------------------------------------------------------
    def _on_grace(self, worker: _Worker, job: Job) -> None:
        ctx = self.ctx
        assert ctx is not None
        with worker.lock:
            if worker.job is not job or worker.abandoned:
                return  # it let go in time
            worker.abandoned = True
        with self._workers_lock:
            if worker in self._workers:
                self._workers.remove(worker)
            self.abandoned += 1
            abandoned = self.abandoned
        ctx.retire(job.slot)
        ctx.events.emit("thread_abandoned", job=job.id, thread=worker.thread.name, total=abandoned)
        if abandoned >= self.max_abandoned:
            ctx.give_up(
                f"{abandoned} evaluation threads were stuck past their timeout and abandoned; "
                "evaluation is off for the rest of the run (use mode='subprocess' for code that can hang)"
            )
        elif not self._closing:
            self._spawn()

    # -- shutdown ----------------------------------------------------------------------------------
    def close(self, timeout: float) -> None:
        if self.ctx is None:
            return
        self._closing = True
        self.ctx.queue.close()
        self._cancel_running()
        with self._workers_lock:
            workers = list(self._workers)
        deadline = time.monotonic() + timeout  # a real wait, whatever clock times the jobs
        for worker in workers:
            if worker.thread is not threading.current_thread():
                worker.thread.join(max(0.0, deadline - time.monotonic()))

    def stats(self) -> dict[str, float | int]:
        with self._workers_lock:
            alive = sum(1 for w in self._workers if w.thread.is_alive())
        return {"abandoned_threads": self.abandoned, "worker_threads": alive}
