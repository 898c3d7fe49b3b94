"""The subprocess runner: a persistent, hard-killable worker process evaluates the snapshots.

A thread cannot be killed; a process can. Whatever the evaluation does (hang in C code, segfault,
leak memory, hold the GIL), training goes on and nothing is left behind.

- **Workers** are started with the ``spawn`` context, lazily at the first job, at a lower CPU
  priority. Each *generation* gets fresh pipes, the snapshot slots (shared-memory or CUDA IPC
  buffers, see :mod:`~lightning_evalguard.engine.shm`) and the payload (module structure, program,
  see :mod:`._payload`) once; per job only ``(job id, slot index, step, epoch)`` crosses the pipe.
  The worker copies the slot into its own module copy and says ``loaded``: the slot goes back to
  the pool then, long before the evaluation ends.
- **Dispatcher**: one thread sends jobs to the active worker and waits on its pipe, its process
  sentinel and a wake-up pipe at once (:func:`multiprocessing.connection.wait`), so a dead worker is
  seen at once, never through a blocking ``get()``; it also polls ``is_alive`` every
  ``poll_interval`` while a worker is busy or starting.
- **Timeout**: at the job's deadline the watchdog marks the job timed out, sends ``SIGTERM`` and
  arms ``SIGKILL`` ``kill_grace`` seconds later. The doomed worker is dropped at once; the next job
  goes to the warm **spare** (``spare_worker=True``), which skips the multi-second cold start.
- **Crash**: a worker that dies mid-job fails that job with
  :class:`~lightning_evalguard.errors.WorkerCrashed` (exit code, signal name).
- **Respawn**: every lost worker (timeout kill, crash, failed start) is replaced and counted;
  launches after repeated losses are backed off; after ``max_respawns`` respawns the next loss
  makes the runner give up: the evaluator pins its breaker open.
- **Shutdown** (``close``): the running job is cancelled; idle workers get a ``stop`` message,
  busy or starting ones ``SIGTERM``; whatever is left after ``timeout`` gets ``SIGKILL``; every
  process is reaped and the shared buffers released.

Examples:
    >>> import torch
    >>> from lightning_evalguard.engine.evaluator import Evaluator
    >>> from lightning_evalguard.engine.program import EvalProgram
    >>> from lightning_evalguard.engine.snapshot import SnapshotPool, state_tensors
    >>> live = torch.nn.Linear(4, 1)
    >>> program = EvalProgram([], eval_fn=lambda module, _: {"w": float(module.weight.sum())})
    >>> runner = SubprocessRunner.for_module(live, program, slots=2, spare_worker=False)
    >>> ev = Evaluator(runner, SnapshotPool(runner.slot_factory, size=2), timeout=120.0)
    >>> with torch.no_grad(): _ = live.weight.fill_(0.5)
    >>> ev.request(step=1, epoch=0, sources=state_tensors(live))
    'submitted'
    >>> ev.wait_idle(120.0), [job.result.values for job in ev.drain()]
    (True, [{'w': 2.0}])
    >>> ev.close()
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import itertools
import logging
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from lightning_evalguard.engine.jobs import Job
from lightning_evalguard.engine.program import EvalProgram
from lightning_evalguard.engine.runners import _worker
from lightning_evalguard.engine.runners._payload import WorkerPayload, build_payload, check_materialized
from lightning_evalguard.engine.runners._process import WorkerProcess, describe_exit, remote_error
from lightning_evalguard.engine.runners.base import Runner
from lightning_evalguard.engine.shm import SharedSlots, SlotHandle, SlotLayout, check_shm_space
from lightning_evalguard.engine.snapshot import Slot, state_tensors
from lightning_evalguard.errors import EvalFailed, EvalTimeout, WorkerCrashed

__all__ = ["SubprocessRunner"]

log = logging.getLogger(__name__)


def _check_seconds(name: str, value: Any, *, positive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ValueError(f"`{name}` must be a finite number {'>' if positive else '>='} 0, got {value!r}")


def _device(device: str | torch.device) -> torch.device:
    """``device`` with its index filled in for CUDA (``"cuda"`` means the current device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class SubprocessRunner(Runner):
    """Runs jobs in a persistent ``spawn``-started worker process, with a warm spare.

    Build it with :meth:`for_module` and give :meth:`slot_factory` to the
    :class:`~lightning_evalguard.engine.snapshot.SnapshotPool` (same ``size`` as the slots).

    Args:
        payload: what every worker generation receives (see :func:`._payload.build_payload`).
        slots: the shared snapshot regions the pool's slots live in.
        kill_grace: seconds between ``SIGTERM`` and ``SIGKILL`` for a timed-out worker.
        spare_worker: keep a second, idle worker warm for fast failover.
        max_respawns: worker replacements allowed; the next loss gives up for good.
        start_timeout: seconds a worker may take to get ready (imports, unpickling, dataloaders).
        respawn_backoff: delay before the launch after the second consecutive loss, doubled for
            each further one (the first replacement is immediate); reset by a successful job.
        max_backoff: cap of that delay, seconds.
        niceness: how much lower the workers' CPU priority is than the training process's.
        poll_interval: liveness poll period while a worker is busy or starting, seconds.
        name: prefix of the process and thread names.
        threads: torch intra-op threads of each worker; ``None``: as many as the training process.

    Raises:
        ValueError: on a bad argument.
    """

    name = "subprocess"

    def __init__(
        self,
        payload: WorkerPayload,
        slots: SharedSlots,
        *,
        kill_grace: float = 5.0,
        spare_worker: bool = True,
        max_respawns: int = 5,
        start_timeout: float = 300.0,
        respawn_backoff: float = 0.5,
        max_backoff: float = 30.0,
        niceness: int = 10,
        poll_interval: float = 0.1,
        name: str = "evalguard-eval",
        threads: int | None = None,
    ) -> None:
        super().__init__()
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"`threads` must be an int >= 1 or None, got {threads!r}")
        self.threads = threads
        _check_seconds("kill_grace", kill_grace)
        _check_seconds("respawn_backoff", respawn_backoff)
        _check_seconds("max_backoff", max_backoff)
        _check_seconds("start_timeout", start_timeout, positive=True)
        _check_seconds("poll_interval", poll_interval, positive=True)
        if isinstance(max_respawns, bool) or not isinstance(max_respawns, int) or max_respawns < 0:
            raise ValueError(f"`max_respawns` must be an int >= 0, got {max_respawns!r}")
        if not isinstance(spare_worker, bool):
            raise ValueError(f"`spare_worker` must be a bool, got {spare_worker!r}")
        self.slots = slots
        self.kill_grace = float(kill_grace)
        self.spare_worker = spare_worker
        self.max_respawns = max_respawns
        self.start_timeout = float(start_timeout)
        self.respawn_backoff = float(respawn_backoff)
        self.max_backoff = float(max_backoff)
        self.poll_interval = float(poll_interval)
        self.thread_name = name
        self._mp = multiprocessing.get_context("spawn")
        self._nice = _worker.nice_target(niceness)
        data = payload.encode()
        check_shm_space(len(data), "the evaluation worker's payload")
        self._payload_size = len(data)
        self._payload = torch.empty(max(1, len(data)), dtype=torch.uint8).share_memory_()
        ctypes.memmove(self._payload.data_ptr(), data, len(data))

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified on every worker state change
        self._workers: list[WorkerProcess] = []
        self._active: WorkerProcess | None = None
        self._spare: WorkerProcess | None = None
        self._job: Job | None = None
        self._busy = False
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._generations = itertools.count(1)
        self._demand = False
        self._ever_ready = False
        self._closing = False
        self._closed = False
        self._close_timeout = 5.0
        self._give_up_reason: str | None = None
        self._gave_up = False
        self._consecutive_losses = 0
        self._spare_urgent = False
        self._next_launch_at = -math.inf
        self.respawns = 0
        self.losses = 0
        self.workers_started = 0
        self.workers_killed = 0
        self.last_cold_start_s = 0.0
        self.last_load_s = 0.0
        self.last_loss: str | None = None

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def for_module(
        cls,
        module: torch.nn.Module,
        program: EvalProgram,
        *,
        slots: int,
        eval_device: str | torch.device | None = None,
        dataloader_factory: Callable[[], Any] | None = None,
        copy_slots: bool = False,
        **kwargs: Any,
    ) -> SubprocessRunner:
        """A runner evaluating copies of ``module`` with ``program``, on ``slots`` shared slots.

        Slots live on the module's device (CUDA IPC buffers on a GPU, else CPU shared memory);
        ``eval_device`` (default: the module's device) is where the worker evaluates. There, the
        worker's module evaluates the slot in place (no copy; the slot is held until the job
        ends), unless ``copy_slots`` is set or the devices differ: then it copies the slot into
        its own weights and hands the slot back at once.

        Raises:
            TypeError: the module, the dataloaders, ``eval_fn`` or ``dataloader_factory`` cannot be
                pickled (the message says how to fix it).
            ValueError: lazy parameters, or a bad argument.
            RuntimeError: not enough shared memory for the slots.
        """
        check_materialized(module)
        tensors = state_tensors(module)
        slot_device = tensors[0].device if tensors and tensors[0].is_cuda else torch.device("cpu")
        eval_device = _device(eval_device if eval_device is not None else tensors[0].device if tensors else "cpu")
        layout = SlotLayout.of(tensors)
        payload = build_payload(
            module,
            dataloaders=program.dataloaders,
            eval_fn=program.eval_fn,
            limit_batches=program.limit_batches,
            eval_device=str(eval_device),
            layout=layout,
            dataloader_factory=dataloader_factory,
            copy_slots=copy_slots,
        )
        return cls(payload, SharedSlots(layout, slots, slot_device), **kwargs)

    def slot_factory(self) -> tuple[list[torch.Tensor], SlotHandle | None]:
        """Factory for the :class:`~lightning_evalguard.engine.snapshot.SnapshotPool`."""
        return self.slots.slot_factory()

    # -- Runner interface ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the dispatcher thread; the first worker starts with the first job."""
        with self._lock:
            if self._thread is not None or self._closing:
                return
            self._thread = threading.Thread(target=self._run, name=f"{self.thread_name}-dispatch", daemon=True)
        atexit.register(self._at_exit)
        self._thread.start()

    def submitted(self) -> None:
        self._wake()

    def prestart(self) -> None:
        """Start the first worker now, in the background, instead of with the first job."""
        with self._lock:
            self._demand = True
        self._wake()

    def running(self) -> int:
        return 1 if self._busy else 0

    def close(self, timeout: float) -> None:
        """Cancel the running job, stop every worker (``stop``, ``SIGTERM``, then ``SIGKILL``
        after ``timeout``), reap them and release the shared buffers. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = self._closing = True
            self._close_timeout = max(0.0, float(timeout))
            thread = self._thread
        self._wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(self._close_timeout + 10.0)
            if thread.is_alive():  # pragma: no cover - a wedged dispatcher: kill from here
                log.error("evalguard dispatcher did not stop; killing the evaluation workers")
                self._at_exit()
        with self._lock:
            wake = (self._wake_r, self._wake_w)
            self._wake_r = self._wake_w = -1
        for fd in wake:
            if fd >= 0:
                os.close(fd)
        self.slots.close()
        self._payload = torch.empty(0, dtype=torch.uint8)
        atexit.unregister(self._at_exit)

    def stats(self) -> dict[str, float | int]:
        with self._lock:
            return self._stats()

    def _stats(self) -> dict[str, float | int]:
        active, spare = self._active, self._spare
        return {
            "respawns": self.respawns,
            "worker_pid": active.pid if active is not None and active.state != "dead" else 0,
            "worker_cold_start_s": self.last_cold_start_s,
            "worker_load_s": self.last_load_s,
            "workers_started": self.workers_started,
            "workers_lost": self.losses,
            "workers_killed": self.workers_killed,
            "spare_ready": int(spare is not None and spare.state == "ready"),
            "worker_busy": int(active is not None and active.state == "busy"),
            "workers_alive": len(self._workers),
            "gave_up": int(self._gave_up),
            "abandoned_threads": 0,
        }

    def wait_until(self, predicate: Callable[[dict[str, float | int]], bool], timeout: float) -> bool:
        """Block until ``predicate(self.stats())`` holds (re-checked at every worker state change),
        or ``timeout`` seconds pass; return whether it holds. For tests and benchmarks, e.g.
        ``runner.wait_until(lambda s: s["spare_ready"], 60)``."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self._stats()), timeout)

    def worker_pids(self) -> list[int]:
        """Pids of every worker process not yet reaped (active, spare, being killed)."""
        with self._lock:
            return [w.pid for w in self._workers]

    # -- dispatcher thread ---------------------------------------------------------------------
    def _now(self) -> float:
        assert self.ctx is not None
        return self.ctx.clock.now()

    def _wake(self) -> None:
        with self._lock:
            fd = self._wake_w
            if fd < 0:
                return
            with contextlib.suppress(BlockingIOError, OSError):  # full pipe: a wake-up is pending
                os.write(fd, b"\0")

    def _run(self) -> None:
        try:
            while not self._closing:
                self._step()
                self._wait(self._next_wait())
        except BaseException as exc:  # a bug here must not take training down: give up instead
            log.exception("evalguard subprocess dispatcher failed")
            if not self._closing and self.ctx is not None:
                self.ctx.give_up(
                    f"the evaluation dispatcher failed ({exc!r}): evaluation is off for the rest of the run"
                )
        finally:
            self._shutdown_workers(self._close_timeout)

    def _step(self) -> None:
        ctx = self.ctx
        assert ctx is not None
        self._reap()
        if self._give_up_reason is not None and not self._gave_up:
            self._give_up()
        if self._gave_up:
            return
        now = self._now()
        with self._lock:
            late = [w for w in self._workers if w.state == "starting" and now - w.launched_at > self.start_timeout]
        for w in late:
            self._doom(w, f"did not get ready within start_timeout={self.start_timeout:g}s")
        if not self._demand and len(ctx.queue) > 0:
            self._demand = True  # lazily: the first worker starts with the first job
        if self._demand and self._give_up_reason is None:
            self._ensure_active(now)
            self._ensure_spare(now)
            self._dispatch()

    def _next_wait(self) -> float:
        """How long the dispatcher may sleep when nothing wakes it: a poll period while a worker
        starts, runs or dies; until a backed-off launch is due; else a second (a safety net)."""
        with self._lock:
            if any(w.state != "ready" for w in self._workers):
                return self.poll_interval
        until_launch = self._next_launch_at - self._now()
        if self._demand and not self._gave_up and until_launch > 0:
            return min(1.0, until_launch)
        return 1.0

    def _wait(self, timeout: float) -> None:
        with self._lock:
            workers = list(self._workers)
            wake = self._wake_r
        waitables: list[Any] = [wake] if wake >= 0 else []
        for w in workers:
            waitables.append(w.sentinel)
            if not w.eof:
                waitables.append(w.conn)
        ready = multiprocessing.connection.wait(waitables, timeout)
        if wake in ready:
            with contextlib.suppress(BlockingIOError, OSError):
                while os.read(wake, 512):
                    pass
        for w in workers:
            if not w.eof and w.conn in ready:
                self._drain(w)

    def _drain(self, w: WorkerProcess) -> None:
        """Handle every message the worker has sent so far."""
        for message in w.messages():
            self._on_message(w, message)

    def _on_message(self, w: WorkerProcess, message: tuple[Any, ...]) -> None:
        ctx = self.ctx
        assert ctx is not None
        kind = message[0]
        if kind == "ready":
            with self._lock:
                if w.state != "starting":
                    return
                w.state = "ready"
                w.cold_start_s = self._now() - w.launched_at
                self.last_cold_start_s = w.cold_start_s
                self._ever_ready = True
                self._changed.notify_all()
            ctx.events.emit("worker_ready", pid=w.pid, generation=w.generation, cold_start_s=w.cold_start_s)
        elif kind == "start_failed":
            w.start_error = str(message[1])
        elif kind == "loaded":
            _, job_id, load_s = message
            self.last_load_s = float(load_s)
            with self._lock:
                slot = w.slot if w.job is not None and w.job.id == job_id else None
                if slot is not None:
                    w.slot = None
            if slot is not None:
                self._release(w.job, slot)
        elif kind in ("ok", "failed"):
            self._on_result(w, message)

    def _on_result(self, w: WorkerProcess, message: tuple[Any, ...]) -> None:
        ctx = self.ctx
        assert ctx is not None
        with self._lock:
            job = w.job
            if job is None or job.id != message[1]:
                return  # a late answer from a worker already written off
            slot, w.job, w.slot = w.slot, None, None
            if w.state == "busy":
                w.state = "ready"
            self._changed.notify_all()
        ctx.watchdog.unwatch(("deadline", job.id))
        if message[0] == "ok":
            if ctx.finish(job, "ok", message[2], None):
                with self._lock:
                    self._consecutive_losses = 0
        else:
            ctx.finish(job, "failed", None, remote_error(message[2], message[3]))
        if slot is not None:
            self._release(job, slot)
        with self._lock:
            if self._job is job:
                self._job = None
                self._busy = False

    def _release(self, job: Job | None, slot: Slot) -> None:
        assert self.ctx is not None
        self.ctx.release(slot)
        if job is not None and job.slot is slot:
            job.slot = None  # the pool is then the slot's only owner: its region frees with it

    # -- workers ---------------------------------------------------------------------------------
    def _launch(self, spare: bool) -> WorkerProcess | None:
        """Start a worker. Nobody waits for a spare: it sets up niced. An evaluation may be
        waiting for any other worker: it sets up at full priority, and lowers it when ready."""
        ctx = self.ctx
        assert ctx is not None
        generation = next(self._generations)
        config = {
            "parent_pid": os.getpid(),
            "nice": self._nice,
            "generation": generation,
            "threads": self.threads or torch.get_num_threads(),
        }
        try:
            w = WorkerProcess.launch(
                self._mp,
                generation=generation,
                launched_at=self._now(),
                nice=self._nice if spare else 0,
                name=f"{self.thread_name}-worker-{generation}",
                args=(config, self.slots.buffers, self._payload, self._payload_size),
            )
        except Exception as exc:
            log.exception("evalguard could not start an evaluation worker")
            self._lost(None, f"could not start a worker process ({exc!r})")
            return None
        with self._lock:
            self._workers.append(w)
            self.workers_started += 1
            self._changed.notify_all()
        ctx.events.emit("worker_started", pid=w.pid, generation=generation)
        return w

    def _ensure_active(self, now: float) -> None:
        with self._lock:
            if self._active is not None:
                return
            if self._spare is not None:
                self._active, self._spare = self._spare, None
                promoted: WorkerProcess | None = self._active
                self._changed.notify_all()
            else:
                promoted = None
        if promoted is not None:
            assert self.ctx is not None
            self.ctx.events.emit("worker_promoted", pid=promoted.pid, generation=promoted.generation)
            return
        if now >= self._next_launch_at:
            w = self._launch(spare=False)
            with self._lock:
                if w is not None and self._active is None:
                    self._active = w
                    self._changed.notify_all()

    def _ensure_spare(self, now: float) -> None:
        """Start the spare at the first quiet moment (the active worker up and idle, nothing
        queued: its cold start then slows no evaluation), or at once after a loss (losses come
        in runs)."""
        assert self.ctx is not None
        if not self.spare_worker or now < self._next_launch_at:
            return
        queued = len(self.ctx.queue)
        with self._lock:
            active = self._active
            if self._spare is not None or active is None or active.state == "starting":
                return  # one cold start at a time
            quiet = active.state == "ready" and queued == 0
            if not (quiet or self._spare_urgent):
                return
        w = self._launch(spare=True)
        with self._lock:
            self._spare_urgent = False
            if w is not None and self._spare is None:
                self._spare = w
                self._changed.notify_all()

    def _dispatch(self) -> None:
        ctx = self.ctx
        assert ctx is not None
        with self._lock:
            w = self._active
            if w is None or w.state != "ready" or self._job is not None:
                return
            self._busy = True  # before get(): wait_idle must not see "nothing queued, nothing running"
        while True:
            job = ctx.queue.get(timeout=0)
            if job is None:
                with self._lock:
                    self._busy = self._job is not None
                return
            slot = job.slot
            handle = slot.payload if slot is not None and isinstance(slot.payload, SlotHandle) else None
            if handle is None:
                if job.start(self._now()):
                    ctx.finish(job, "failed", None, EvalFailed(
                        "no shared-memory snapshot region was free for this job (a dropped slot is still "
                        "referenced); the evaluation was skipped"))
                if slot is not None:
                    self._release(job, slot)
                continue
            if slot.copied_event is not None:  # pragma: no cover - GPU: the IPC reader needs the copy done
                slot.copied_event.synchronize()
            if not job.start(self._now()):  # cancelled or replaced while it waited
                self._release(job, slot)
                continue
            break
        assert job.started_at is not None
        with self._lock:
            w.state, w.job, w.slot = "busy", job, slot
            self._job = job
            self._changed.notify_all()
        ctx.events.emit("eval_start", job=job.id, step=job.step, epoch=job.epoch, worker_pid=w.pid)
        ctx.watchdog.watch(
            ("deadline", job.id), job.started_at + ctx.timeout, functools.partial(self._on_deadline, w, job)
        )
        with contextlib.suppress(OSError, EOFError):  # a worker that died under us: _reap reports it
            w.send(("run", job.id, handle.index, job.step, job.epoch))

    def _reap(self) -> None:
        with self._lock:
            dead = [w for w in self._workers if not w.alive()]
        for w in dead:
            self._on_exit(w)

    def _on_exit(self, w: WorkerProcess) -> None:
        """A worker process has ended (and is reaped): account for it."""
        ctx = self.ctx
        assert ctx is not None
        if w.state == "dead":
            return
        self._drain(w)  # a result sent just before dying still counts
        exitcode = w.exitcode
        with self._lock:
            if w in self._workers:
                self._workers.remove(w)
            if self._active is w:
                self._active = None
            if self._spare is w:
                self._spare = None
            expected = w.state == "doomed" or self._closing
            starting = w.state == "starting"
            w.state = "dead"
            self._changed.notify_all()
            job, slot, w.job, w.slot = w.job, w.slot, None, None
        ctx.watchdog.unwatch(("kill", w.generation))
        what = describe_exit(exitcode)
        if job is not None:
            ctx.watchdog.unwatch(("deadline", job.id))
            ctx.finish(job, "failed", None, WorkerCrashed(
                exitcode, f"evaluation worker (pid {w.pid}) died with {what} while evaluating step {job.step}"))
        if slot is not None:  # the process is gone: nothing reads the slot any more
            self._release(job, slot)
        with self._lock:
            if job is not None and self._job is job:
                self._job = None
                self._busy = False
        w.dispose()
        ctx.events.emit("worker_exit", pid=w.pid, generation=w.generation, exitcode=exitcode, expected=expected)
        if expected:
            return
        if starting:
            reason = f"evaluation worker (pid {w.pid}) died with {what} before it was ready"
            if w.start_error:
                reason += f":\n{w.start_error.rstrip()}"
                if not self._ever_ready:  # a set-up error that every new worker would repeat
                    with self._lock:
                        self.losses += 1
                        self._changed.notify_all()
                    self._give_up_reason = (
                        "the evaluation worker could not be set up; evaluation is off for the rest of the run. "
                        + reason
                    )
                    return
        elif job is not None:
            reason = f"evaluation worker (pid {w.pid}) died with {what} while evaluating step {job.step}"
        else:
            reason = f"evaluation worker (pid {w.pid}) died with {what} while idle"
        self._lost(w, reason)

    def _lost(self, w: WorkerProcess | None, reason: str) -> None:
        """Count a lost worker; schedule its replacement (backed off) or decide to give up."""
        with self._lock:
            self.losses += 1
            self.last_loss = reason
            self._changed.notify_all()
            if self.respawns >= self.max_respawns:
                if self._give_up_reason is None:
                    self._give_up_reason = (
                        f"the evaluation worker was lost {self.losses} time(s) and max_respawns={self.max_respawns} "
                        f"is reached: evaluation is off for the rest of the run. Last: {reason}"
                    )
                return
            self.respawns += 1
            self._consecutive_losses += 1
            self._spare_urgent = True
            k = self._consecutive_losses
            delay = 0.0 if k <= 1 else min(self.max_backoff, self.respawn_backoff * 2 ** (k - 2))
            self._next_launch_at = max(self._next_launch_at, self._now() + delay)
        assert self.ctx is not None
        self.ctx.events.emit("worker_lost", pid=w.pid if w else 0, reason=reason, respawns=self.respawns)
        self._wake()

    def _give_up(self) -> None:
        assert self.ctx is not None
        assert self._give_up_reason is not None
        log.warning("evalguard: %s", self._give_up_reason)
        self.ctx.give_up(self._give_up_reason)
        with self._lock:
            self._gave_up = True
            self._changed.notify_all()
            workers = [w for w in self._workers if w.state in ("starting", "ready")]
        for w in workers:  # nothing will run on them again
            self._stop(w)

    def _stop(self, w: WorkerProcess) -> None:
        """Ask an idle worker to exit; signal a busy or starting one."""
        with self._lock:
            state = w.state
        if state == "ready":
            try:
                w.send(("stop",))
                return
            except (OSError, EOFError):
                pass
        if state != "dead":
            self._signal(w, signal.SIGTERM)

    def _signal(self, w: WorkerProcess, sig: int) -> bool:
        """Send ``sig`` unless the process has been reaped (reaping happens under the same lock)."""
        with self._lock:
            return w.signal(sig)

    def _doom(self, w: WorkerProcess, reason: str) -> None:
        """Write a worker off: drop it from its role, ``SIGTERM`` now, ``SIGKILL`` after ``kill_grace``."""
        ctx = self.ctx
        assert ctx is not None
        with self._lock:
            if w.state in ("doomed", "dead"):
                return
            w.state = "doomed"
            self._changed.notify_all()
            if self._active is w:
                self._active = None
            if self._spare is w:
                self._spare = None
            if self._job is not None and self._job is w.job:
                self._job = None
                self._busy = False
        self._signal(w, signal.SIGTERM)
        ctx.watchdog.watch(("kill", w.generation), self._now() + self.kill_grace, functools.partial(self._kill, w))
        ctx.events.emit("worker_doomed", pid=w.pid, generation=w.generation, reason=reason)
        self._lost(w, f"evaluation worker (pid {w.pid}) {reason}")

    def _kill(self, w: WorkerProcess) -> None:
        if self._signal(w, signal.SIGKILL):
            with self._lock:
                self.workers_killed += 1
            self._wake()

    def _on_deadline(self, w: WorkerProcess, job: Job) -> None:
        """Watchdog action at a job's deadline (watchdog thread)."""
        ctx = self.ctx
        assert ctx is not None
        assert job.started_at is not None
        elapsed = self._now() - job.started_at
        if not ctx.finish(job, "timeout", None, EvalTimeout(elapsed, ctx.timeout)):
            return  # it finished just in time
        self._doom(w, f"timed out after {ctx.timeout:g}s evaluating step {job.step}")
        self._wake()

    # -- shutdown ----------------------------------------------------------------------------------
    def _shutdown_workers(self, timeout: float) -> None:
        """Stop and reap every worker (dispatcher thread: Linux's parent-death signal is tied to
        the thread that started the workers, so they must not outlive it)."""
        ctx = self.ctx
        assert ctx is not None
        with self._lock:
            self._closing = True
            job = self._job
            workers = list(self._workers)
        if job is not None:
            ctx.watchdog.unwatch(("deadline", job.id))
            ctx.finish(job, "cancelled", None, None)
        for w in workers:
            self._stop(w)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                alive = [w for w in self._workers if w.alive()]
            remaining = deadline - time.monotonic()
            if not alive or remaining <= 0:
                break
            multiprocessing.connection.wait([w.sentinel for w in alive], min(remaining, 0.1))
        for w in alive:
            if self._signal(w, signal.SIGKILL):
                with self._lock:
                    self.workers_killed += 1
        for w in workers:
            w.join(5.0)
            self._on_exit(w)
        with self._lock:
            self._busy = False

    def _at_exit(self) -> None:
        """Interpreter exit without ``close()``: kill the workers now, or ``multiprocessing``'s own
        exit handler would wait for them for ever."""
        with self._lock:
            workers = list(self._workers)
        for w in workers:
            self._signal(w, signal.SIGKILL)
            w.join(5.0)
