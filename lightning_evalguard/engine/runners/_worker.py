"""The evaluation worker process: entry point of every ``spawn``-started worker generation.

It receives, once, the snapshot slots (shared-memory or CUDA IPC buffers) and the payload (the
module's structure, the dataloaders, ``eval_fn``), then serves jobs until told to stop::

    parent -> worker   ("run", job_id, slot_index, step, epoch) | ("stop",)
    worker -> parent   ("ready", pid) | ("start_failed", traceback_text)
                       ("loaded", job_id, load_s)        copied: the slot may be reused from now on
                       ("ok", job_id, Collected) | ("failed", job_id, error_bytes, traceback_text)

Messages are plain pickles (never torch's shared-memory reductions). The worker evaluates at a lower
CPU priority (every thread renice'd once it is set up), ignores ``SIGINT`` (the parent owns
shutdown: Ctrl-C in a terminal reaches the whole process group), dies with its parent (Linux
``PR_SET_PDEATHSIG``), prints a C-level traceback on a fatal signal (:mod:`faulthandler`), and
collects garbage after every job.

Test hook: when ``EVALGUARD_WORKER_RLIMIT_AS_MB`` is set in the environment of the training process,
each worker caps its address space (``RLIMIT_AS``) at that many MB above its size once set up, so a
test of an unbounded allocation cannot take the machine down. CPU only: a CUDA context reserves far
more address space than that.

Nothing here imports Lightning; unpickling the module imports what its class needs.
"""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import os
import pickle
import signal
import sys
import time
import traceback
from typing import Any

__all__ = ["RLIMIT_ENV", "lower_priority", "main", "nice_target"]

RLIMIT_ENV = "EVALGUARD_WORKER_RLIMIT_AS_MB"
_PR_SET_PDEATHSIG = 1


def _send(conn: Any, message: tuple[Any, ...]) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def nice_target(niceness: int) -> int:
    """The nice value ``niceness`` steps below this process's priority (capped at 19)."""
    if niceness <= 0 or not hasattr(os, "getpriority"):
        return 0
    return min(19, os.getpriority(os.PRIO_PROCESS, 0) + niceness)


def lower_priority(target: int, pid: int = 0) -> None:
    """Set the nice value of every thread of ``pid`` (0: this process) to ``target``, unless lower.

    Linux keeps a nice value per thread and a new thread inherits its creator's: threads started
    before this call (torch's pools, a DataLoader's) are renice'd one by one. Best effort: a process
    that is gone, or a system that refuses, is left as it is.
    """
    if target <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid or os.getpid()}/task")]
    except OSError:  # no /proc: the process as a whole
        tids = [pid]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < target:
                os.setpriority(os.PRIO_PROCESS, tid, target)
        except OSError:
            pass


def _die_with_parent(parent_pid: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def _limit_address_space() -> None:
    extra_mb = os.environ.get(RLIMIT_ENV)
    if not extra_mb:
        return
    import resource

    with open("/proc/self/status") as status:
        vm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = vm_kb * 1024 + int(float(extra_mb) * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


class _State:
    """The worker's module copy, its program, and the views of every slot."""

    def __init__(self, buffers: list[Any], payload_buffer: Any, payload_size: int) -> None:
        import torch

        from lightning_evalguard.engine.program import EvalProgram
        from lightning_evalguard.engine.runners._payload import WorkerPayload, load_module
        from lightning_evalguard.engine.snapshot import state_tensors

        payload = WorkerPayload.decode(ctypes.string_at(payload_buffer.data_ptr(), payload_size))
        self.device = torch.device(payload.eval_device)
        module = load_module(payload.module, payload.placeholders)
        # The actual Parameter / buffer objects (tied ones once), in state_tensors order.
        self.objects = list(module.parameters()) + list(module.buffers())
        mismatch = payload.layout.matches(self.objects)
        if mismatch is not None:
            raise RuntimeError(f"the module rebuilt in the worker does not match the snapshot: {mismatch}")
        self.slots = [payload.layout.views(buffer) for buffer in buffers]
        self.slot_cuda = bool(buffers) and buffers[0].is_cuda
        # Evaluating where the slots live, the module *uses* the slot (no copy: the slot stays held
        # until the job ends); on another device it copies the slot over and lets it go at once.
        self.aliases = not payload.copy_slots and bool(buffers) and buffers[0].device == self.device
        if self.aliases and self.slots:
            self._point(0)  # drops the placeholders before anything is allocated on the device
        module.to(self.device)
        module.requires_grad_(False)
        module.eval()
        self.module = module
        self.state = [] if self.aliases else state_tensors(module)
        loaders: list[Any] = pickle.loads(payload.dataloaders) if payload.dataloaders is not None else []
        if payload.dataloader_factory is not None:
            loaders = _as_list(pickle.loads(payload.dataloader_factory)())
        eval_fn = pickle.loads(payload.eval_fn) if payload.eval_fn is not None else None
        self.program = EvalProgram(loaders, payload.limit_batches, eval_fn)

    def _point(self, index: int) -> None:
        # ``.data`` swaps the storage under each object, so tied weights stay tied.
        for obj, view in zip(self.objects, self.slots[index], strict=True):
            obj.data = view

    def load(self, index: int) -> bool:
        """Make the module evaluate slot ``index`` (the parent already waited for its CUDA copy).

        Returns:
            ``True`` if the slot was copied and may be reused now; ``False`` if the module reads
            the slot itself until the job ends.
        """
        import torch

        slot = self.slots[index]
        if self.aliases:
            self._point(index)
            return False
        with torch.no_grad():
            for dst, src in zip(self.state, slot, strict=True):  # across devices (e.g. a spare GPU)
                dst.copy_(src, non_blocking=True)
        if self.slot_cuda:  # pragma: no cover - GPU
            torch.cuda.synchronize(slot[0].device)
        if self.device.type == "cuda":  # pragma: no cover - GPU
            torch.cuda.synchronize(self.device)
        return True

    def finish(self) -> None:
        """The job's work is done: nothing may still read the slot after this returns."""
        if self.aliases and self.device.type == "cuda":  # pragma: no cover - GPU
            import torch

            torch.cuda.synchronize(self.device)

    def cleanup(self) -> None:
        gc.collect()
        if self.device.type == "cuda" or self.slot_cuda:  # pragma: no cover - GPU
            import torch

            torch.cuda.empty_cache()

    def close(self) -> None:
        """Let go of the slots (CUDA IPC handles must be released before the process exits)."""
        self.slots = []
        self.state = []
        self.objects = []
        self.module = None
        self.program = None  # type: ignore[assignment]
        if self.slot_cuda:  # pragma: no cover - GPU
            import torch

            torch.cuda.synchronize()
            gc.collect()
            torch.cuda.ipc_collect()


def _as_list(loaders: Any) -> list[Any]:
    """A dataloader, a sequence of them, or a mapping of them (values, in order) as a list."""
    from collections.abc import Mapping

    if isinstance(loaders, Mapping):
        return list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    return [loaders]


def _error_message(job_id: int, exc: BaseException) -> tuple[Any, ...]:
    text = "".join(traceback.format_exception(exc))
    try:
        import cloudpickle

        data = cloudpickle.dumps(exc)
        pickle.loads(data)  # what the parent will do; some exceptions do not round-trip
    except Exception:
        data = None
    return ("failed", job_id, data, text)


def main(conn: Any, config: dict[str, Any], buffers: list[Any], payload_buffer: Any, payload_size: int) -> None:
    """Worker entry point (run by ``multiprocessing`` with the ``spawn`` start method)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(int(config["parent_pid"]))
    faulthandler.enable()
    threads = int(config.get("threads", 0))
    if threads > 0:  # as many intra-op threads as the training process allows itself
        import torch

        torch.set_num_threads(threads)
    try:
        state = _State(buffers, payload_buffer, payload_size)
        del buffers, payload_buffer  # the views keep what is needed
        _limit_address_space()
        # Evaluations run at a lower priority than training. A spare was niced at launch; a worker
        # that an evaluation is waiting for set up at full speed.
        lower_priority(int(config.get("nice", 0)))
    except BaseException as exc:
        _send(conn, ("start_failed", "".join(traceback.format_exception(exc))))
        conn.close()
        sys.exit(1)
    _send(conn, ("ready", os.getpid()))
    code = 0
    try:
        _serve(conn, state)
    except BaseException:  # the pipe broke mid-reply: the parent is gone or gave up on us
        traceback.print_exc()
        code = 1
    finally:
        state.close()
        conn.close()
    # Skip the interpreter's teardown of torch and Lightning (most of a second): the slots and the
    # CUDA IPC handles are released above, and nothing else here needs an orderly exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve(conn: Any, state: _State) -> None:
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the parent is gone
            return
        if message[0] == "stop":
            return
        _, job_id, index, _step, _epoch = message
        try:
            start = time.perf_counter()
            if state.load(index):
                _send(conn, ("loaded", job_id, time.perf_counter() - start))
            result = state.program.run(state.module)
            state.finish()
        except BaseException as exc:  # the evaluation's own failure, whatever it is
            reply = _error_message(job_id, exc)
        else:
            reply = ("ok", job_id, result)
        finally:
            state.cleanup()
        _send(conn, reply)
