"""One evaluation worker process, seen from the training process: launch, talk, signal, reap.

:class:`WorkerProcess` wraps a ``spawn``-started :class:`multiprocessing.Process` and its end of a
fresh duplex pipe (one per worker generation: a pipe whose reader was killed mid-read is unusable).
Signals go through a Linux pidfd when there is one, so a signal can never reach a recycled pid.
Its mutable fields (``state``, ``job``, ``slot``) belong to the runner and are guarded by its lock.

A worker does not re-import the training script's main module, as ``spawn`` children normally
do: cloudpickle ships whatever the worker needs from ``__main__`` by value, and a script without
an ``if __name__ == "__main__":`` guard would otherwise run its whole training again inside the
worker. See :func:`spawning_without_main`.

Also here: how a worker's exit code reads (:func:`describe_exit`) and how an exception raised in
the worker comes back (:func:`remote_error`).
"""

from __future__ import annotations

import contextlib
import multiprocessing.spawn
import os
import pickle
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from lightning_evalguard.engine.jobs import Job
from lightning_evalguard.engine.runners import _worker
from lightning_evalguard.engine.snapshot import Slot
from lightning_evalguard.errors import EvalFailed

__all__ = ["RemoteTraceback", "WorkerProcess", "describe_exit", "remote_error", "spawning_without_main"]

_MAIN_KEYS = ("init_main_from_name", "init_main_from_path")
_spawning = threading.local()
_install_lock = threading.Lock()


class _PreparationWithoutMain:
    """Wraps ``multiprocessing.spawn.get_preparation_data``: unchanged, except on a thread inside
    :func:`spawning_without_main`, where the child is told not to import the main module."""

    def __init__(self, wrapped: Callable[[str], dict[str, Any]]) -> None:
        self.wrapped = wrapped

    def __call__(self, name: str) -> dict[str, Any]:
        data = self.wrapped(name)
        if getattr(_spawning, "without_main", False):
            for key in _MAIN_KEYS:
                data.pop(key, None)
        return data


@contextlib.contextmanager
def spawning_without_main() -> Iterator[None]:
    """Processes this thread starts with ``spawn`` meanwhile do not import ``__main__``.

    ``multiprocessing`` offers no switch for it, so its ``get_preparation_data`` is wrapped once
    (a pass-through for every other caller and thread).
    """
    with _install_lock:
        current = multiprocessing.spawn.get_preparation_data
        if not isinstance(current, _PreparationWithoutMain):
            multiprocessing.spawn.get_preparation_data = _PreparationWithoutMain(current)
    _spawning.without_main = True
    try:
        yield
    finally:
        _spawning.without_main = False


def describe_exit(exitcode: int | None) -> str:
    """``"exit code 3"`` or ``"exit code -11 (SIGSEGV)"``."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"exit code {exitcode} ({signal.Signals(-exitcode).name})"
        except ValueError:
            pass
    return f"exit code {exitcode}"


class RemoteTraceback(Exception):
    """The worker's traceback text, set as the ``__cause__`` of an exception it raised."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text.rstrip()


def remote_error(data: bytes | None, text: str) -> BaseException:
    """The exception the worker raised (its own type when it unpickles, else :class:`EvalFailed`),
    with the worker's traceback as its cause."""
    exc: Any = None
    if data is not None:
        try:
            exc = pickle.loads(data)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        return EvalFailed(f"evaluation failed in the worker process:\n{text.rstrip()}")
    exc.__cause__ = RemoteTraceback(text)
    exc.__traceback__ = None
    return exc


class WorkerProcess:
    """A worker process, its pipe, and what it is doing.

    ``state``: starting -> ready <-> busy; any -> doomed (signalled, being killed) -> dead (reaped).

    Args:
        process: the started process.
        conn: the training process's end of the pipe.
        generation: 1, 2, ... in launch order.
        launched_at: clock time of the launch.
    """

    __slots__ = (
        "cold_start_s",
        "conn",
        "eof",
        "generation",
        "job",
        "launched_at",
        "pid",
        "pidfd",
        "process",
        "slot",
        "start_error",
        "state",
    )

    def __init__(self, process: Any, conn: Any, generation: int, launched_at: float) -> None:
        self.process = process
        self.conn = conn
        self.generation = generation
        self.launched_at = launched_at
        self.pid: int = process.pid or 0
        self.state = "starting"
        self.eof = False
        self.job: Job | None = None
        self.slot: Slot | None = None  # held until the worker is done with it, or dead
        self.start_error: str | None = None
        self.cold_start_s = 0.0
        self.pidfd: int | None = None
        if hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):
                self.pidfd = os.pidfd_open(self.pid)

    @classmethod
    def launch(
        cls, context: Any, *, generation: int, launched_at: float, nice: int, name: str, args: tuple[Any, ...]
    ) -> WorkerProcess:
        """Start a worker running :func:`._worker.main` over a fresh pipe; with ``nice`` > 0, at that
        nice value from the start (its imports included).

        ``args`` follow the pipe end in ``main``'s signature; they are pickled now, while the
        process is being spawned, so shared-memory file descriptors travel with the spawn.
        """
        parent_conn, child_conn = context.Pipe(duplex=True)
        try:
            process = context.Process(
                target=_worker.main,
                args=(child_conn, *args),
                name=name,
                daemon=False,  # a daemonic process may not start DataLoader workers
            )
            with spawning_without_main():
                process.start()
        except BaseException:
            parent_conn.close()
            raise
        finally:
            child_conn.close()
        worker = cls(process, parent_conn, generation, launched_at)
        _worker.lower_priority(nice, worker.pid)
        return worker

    # -- talking -------------------------------------------------------------------------------
    def send(self, message: tuple[Any, ...]) -> None:
        """Send one message (raises ``OSError`` / ``EOFError`` if the worker is gone)."""
        self.conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def messages(self) -> Iterator[tuple[Any, ...]]:
        """Every message received so far, without blocking; sets :attr:`eof` when the pipe closed."""
        while not self.eof:
            try:
                if not self.conn.poll():
                    return
                message = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                self.eof = True
                return
            yield message

    # -- life and death ------------------------------------------------------------------------
    def alive(self) -> bool:
        """Whether the process runs (reaps it if it has ended)."""
        return bool(self.process.is_alive())

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    @property
    def sentinel(self) -> int:
        return self.process.sentinel

    def signal(self, sig: int) -> bool:
        """Send ``sig`` unless the process has been reaped; ``True`` if it was sent.

        The caller holds the lock under which the process is reaped, so the pid cannot be reaped
        (and recycled) between the check and the signal; the pidfd makes that doubly sure.
        """
        if self.state == "dead" or self.process.exitcode is not None:
            return False
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
            else:
                os.kill(self.pid, sig)
        except OSError:  # ProcessLookupError included: it is gone
            return False
        return True

    def join(self, timeout: float) -> None:
        with contextlib.suppress(ValueError):  # already closed
            self.process.join(timeout)

    def dispose(self) -> None:
        """Close the pipe, the pidfd and the process object (after it was reaped)."""
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None
        with contextlib.suppress(ValueError):
            self.process.close()

    def __repr__(self) -> str:
        return f"WorkerProcess(generation={self.generation}, pid={self.pid}, state={self.state!r})"
