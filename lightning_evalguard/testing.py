"""Fault injectors and readers for testing code that uses lightning_evalguard.

These are the same tools the package's own test suite uses; they are public so users can check
their own training scripts against hangs, crashes and flaky backends.

Sections: evaluation faults (for :class:`~lightning_evalguard.GuardedEvaluation`), logging faults
(for :class:`~lightning_evalguard.BufferedLogging`) and the W&B offline run reader.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_evalguard.engine.clock import SYSTEM_CLOCK, Clock, FakeClock
from lightning_evalguard.engine.events import EventLog

__all__: list[str] = [
    "AllocatingEval",
    "BusyCallback",
    "CrashingEval",
    "EvalFault",
    "FaultSequence",
    "FaultyValidation",
    "HangingEval",
    "LeakingCallback",
    "RaisingEval",
    "SigtermIgnoringEval",
    "SlowHookCallback",
    "StepClock",
]

# ---- evaluation faults -------------------------------------------------------------------------
# For GuardedEvaluation: evaluations that hang, ignore SIGTERM, exit, segfault, raise or allocate
# without bound. Each is a small picklable callable, usable as ``eval_fn`` (it takes ``(module,
# dataloader)``), or put into a LightningModule's ``validation_step`` with :class:`FaultyValidation`.
# The process-level ones (exit, segfault, ignoring SIGTERM, unbounded allocation) are meant for
# ``mode="subprocess"``: in the training process they would take training down with them.


class EvalFault:
    """Base of the evaluation faults: :meth:`trigger` does the damage, :meth:`fire` triggers it if armed.

    Called as an ``eval_fn``, a fault fires and, if it returns at all, reports
    ``{"fault/fired": 1.0}`` (``0.0`` when it was not armed).

    Args:
        once_file: if given, the fault fires only once: for the first call that finds this file
            absent (it is created atomically just before), across processes and worker restarts.
            Later calls do nothing, so a test can check that the next evaluation succeeds.

    Example:
        >>> import os, tempfile
        >>> once = os.path.join(tempfile.mkdtemp(), "fired")
        >>> fault = RaisingEval("boom", once_file=once)
        >>> try:
        ...     fault(None, None)
        ... except RuntimeError as exc:
        ...     print(exc)
        boom
        >>> fault(None, None)  # the second time it is disarmed
        {'fault/fired': 0.0}
    """

    def __init__(self, once_file: str | os.PathLike[str] | None = None) -> None:
        self.once_file = os.fspath(once_file) if once_file is not None else None

    def armed(self) -> bool:
        """Whether the fault fires now (consumes the ``once_file`` if there is one)."""
        if self.once_file is None:
            return True
        try:
            fd = os.open(self.once_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def trigger(self) -> None:
        """Do the damage (subclasses)."""
        raise NotImplementedError

    def fire(self) -> bool:
        """Trigger the fault if it is armed; ``True`` if it fired (and returned)."""
        if not self.armed():
            return False
        self.trigger()
        return True

    def __call__(self, module: Any = None, dataloader: Any = None) -> dict[str, float]:
        return {"fault/fired": float(self.fire())}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(once_file={self.once_file!r})"


def _sleep_until(seconds: float | None) -> None:
    import time

    deadline = None if seconds is None else time.monotonic() + seconds
    while deadline is None or time.monotonic() < deadline:
        time.sleep(0.01)  # a Python-level loop: a signal's default action still kills the process


class HangingEval(EvalFault):
    """Hangs for ``seconds`` (``None``: for ever) in a sleep loop, the way a stuck evaluation does.

    Args:
        seconds: how long to hang; ``None`` never returns.
        once_file: see :class:`EvalFault`.
    """

    def __init__(self, seconds: float | None = None, once_file: str | os.PathLike[str] | None = None) -> None:
        super().__init__(once_file)
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0):
            raise ValueError(f"`seconds` must be a number >= 0 or None, got {seconds!r}")
        self.seconds = seconds

    def trigger(self) -> None:
        _sleep_until(self.seconds)


class SigtermIgnoringEval(HangingEval):
    """Ignores ``SIGTERM``, then hangs: only ``SIGKILL`` stops it (subprocess mode; main thread only)."""

    def trigger(self) -> None:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _sleep_until(self.seconds)


class CrashingEval(EvalFault):
    """Kills its own process: ``kind="exit"`` calls ``os._exit(exit_code)``, ``kind="segfault"``
    reads address 0 (``ctypes.string_at(0)``), as a crashing C extension would. Subprocess mode only.

    Args:
        kind: ``"exit"`` or ``"segfault"``.
        exit_code: the exit code for ``kind="exit"``.
        once_file: see :class:`EvalFault`.
    """

    def __init__(
        self,
        kind: Literal["exit", "segfault"] = "exit",
        exit_code: int = 3,
        once_file: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(once_file)
        if kind not in ("exit", "segfault"):
            raise ValueError(f"`kind` must be 'exit' or 'segfault', got {kind!r}")
        self.kind = kind
        self.exit_code = int(exit_code)

    def trigger(self) -> None:
        if self.kind == "exit":
            os._exit(self.exit_code)
        import ctypes
        import faulthandler

        faulthandler.disable()  # a test segfault needs no C traceback on stderr
        ctypes.string_at(0)


class RaisingEval(EvalFault):
    """Raises ``error(message)``.

    Args:
        message: the exception message.
        error: the exception class.
        once_file: see :class:`EvalFault`.
    """

    def __init__(
        self,
        message: str = "injected evaluation failure",
        error: type[BaseException] = RuntimeError,
        once_file: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(once_file)
        self.message = message
        self.error = error

    def trigger(self) -> None:
        raise self.error(self.message)


class AllocatingEval(EvalFault):
    """Allocates (and touches) ``chunk_mb`` after ``chunk_mb`` of host memory, keeping all of it.

    Without ``max_mb`` it stops only when an allocation fails (``MemoryError``): run it under a
    memory limit, e.g. a worker with ``EVALGUARD_WORKER_RLIMIT_AS_MB`` set (see
    :mod:`lightning_evalguard.engine.runners._worker`), never unguarded in a test process.

    Args:
        chunk_mb: size of each allocation, MB.
        max_mb: a safety stop: raise ``MemoryError("AllocatingEval reached max_mb=...")`` there.
        once_file: see :class:`EvalFault`.
    """

    def __init__(
        self, chunk_mb: float = 16.0, max_mb: float | None = None, once_file: str | os.PathLike[str] | None = None
    ) -> None:
        super().__init__(once_file)
        if isinstance(chunk_mb, bool) or not isinstance(chunk_mb, (int, float)) or chunk_mb <= 0:
            raise ValueError(f"`chunk_mb` must be a number > 0, got {chunk_mb!r}")
        self.chunk_mb = float(chunk_mb)
        self.max_mb = max_mb

    def trigger(self) -> None:
        chunk = int(self.chunk_mb * 2**20)
        held: list[bytearray] = []
        while self.max_mb is None or len(held) * self.chunk_mb < self.max_mb:
            block = bytearray(chunk)
            memoryview(block)[::4096] = b"\x01" * len(range(0, chunk, 4096))  # touch every page
            held.append(block)
        raise MemoryError(f"AllocatingEval reached max_mb={self.max_mb}")


class FaultSequence(EvalFault):
    """Fires the first of ``faults`` that is still armed: with ``once_file`` faults, evaluation k gets
    fault k, whatever worker runs it; once all have fired, evaluations run normally.

    Args:
        faults: the faults, in order.
    """

    def __init__(self, faults: list[EvalFault]) -> None:
        super().__init__(None)
        self.faults = list(faults)

    def fire(self) -> bool:
        return any(fault.fire() for fault in self.faults)


class FaultyValidation:
    """LightningModule mixin: ``validation_step`` fires ``self.validation_fault`` before the real one.

    Put it first in the bases, and set ``validation_fault`` (class or instance attribute)::

        class Broken(FaultyValidation, MyModel):
            validation_fault = CrashingEval("segfault", once_file="/tmp/crash-once")
    """

    validation_fault: EvalFault | None = None

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.validation_fault is not None:
            self.validation_fault.fire()
        return super().validation_step(*args, **kwargs)  # type: ignore[misc]


# ---- logging faults ----------------------------------------------------------------------------

# ---- W&B offline run reader --------------------------------------------------------------------


# ---- monitor/cleanup faults ---------------------------------------------------------------------
# For ResourceCleanup and PerformanceMonitor: a leak, a slow evalguard hook, background work that
# slows the steps it overlaps, and a fake clock that advances as training steps run.


class LeakingCallback(Callback):
    """Leaks ``bytes_per_step`` of touched host memory at every training step (a list that only grows).

    Args:
        bytes_per_step: bytes kept per training step (filled, so they count in RSS at once).

    Example:
        >>> leak = LeakingCallback(bytes_per_step=1024)
        >>> leak.on_train_batch_end(None, None, None, None, 0)
        >>> leak.leaked_bytes
        1024
    """

    def __init__(self, bytes_per_step: int = 1 << 20) -> None:
        if isinstance(bytes_per_step, bool) or not isinstance(bytes_per_step, int) or bytes_per_step < 1:
            raise ValueError(f"`bytes_per_step` must be an int >= 1, got {bytes_per_step!r}")
        self.bytes_per_step = bytes_per_step
        self.leaked: list[bytes] = []

    @property
    def leaked_bytes(self) -> int:
        """Bytes held so far."""
        return len(self.leaked) * self.bytes_per_step

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.leaked.append(b"\x01" * self.bytes_per_step)

    def release(self) -> None:
        """Stop leaking what was leaked so far (for the end of a test)."""
        self.leaked.clear()


class SlowHookCallback(Callback):
    """A callback with the evalguard surface whose ``on_train_batch_end`` takes ``delay_s``.

    The delay is counted in its ``stats()["hook_time_s"]``, as an evalguard callback's own hook time
    is, so :class:`~lightning_evalguard.PerformanceMonitor` sees it as hook overhead. It waits with
    ``clock.sleep``: a :class:`~lightning_evalguard.engine.clock.FakeClock` advances instead.

    Args:
        delay_s: seconds each slow hook takes.
        every_n_steps: be slow at every n-th training step only.
        clock: time source (and sleeper).
    """

    def __init__(self, delay_s: float = 0.005, *, every_n_steps: int = 1, clock: Clock = SYSTEM_CLOCK) -> None:
        if isinstance(delay_s, bool) or not isinstance(delay_s, (int, float)) or delay_s < 0:
            raise ValueError(f"`delay_s` must be a number >= 0, got {delay_s!r}")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be an int >= 1, got {every_n_steps!r}")
        self.delay_s = float(delay_s)
        self.every_n_steps = every_n_steps
        self._clock = clock
        self.events = EventLog("slow_hook", clock=clock)
        self.hook_time_s = 0.0
        self.hook_calls = 0
        self._steps = 0

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        start = self._clock.now()
        self._steps += 1
        if self._steps % self.every_n_steps == 0:
            self._clock.sleep(self.delay_s)
        self.hook_time_s += self._clock.now() - start
        self.hook_calls += 1

    def stats(self) -> dict[str, float | int]:
        """``hook_time_s`` and ``hook_calls``, like every evalguard callback."""
        return {"hook_time_s": self.hook_time_s, "hook_calls": self.hook_calls}


class BusyCallback(Callback):
    """Pretends background work is in flight during some epochs, and slows the steps it overlaps.

    ``busy()`` is true during the chosen epochs; each step then takes ``extra_s`` longer (waited
    with ``clock.sleep``), the way a real evaluation thread competing for the host slows training.
    That time is contention, not hook time: ``stats()["hook_time_s"]`` stays 0. With
    ``extra_s=0`` it is the calibration case: busy and idle steps cost the same.

    Args:
        extra_s: extra seconds per step while busy.
        busy_epochs: ``"odd"``, ``"even"``, ``"all"`` or ``"none"``.
        clock: time source (and sleeper).
    """

    def __init__(
        self,
        extra_s: float = 0.0,
        *,
        busy_epochs: Literal["odd", "even", "all", "none"] = "odd",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if isinstance(extra_s, bool) or not isinstance(extra_s, (int, float)) or extra_s < 0:
            raise ValueError(f"`extra_s` must be a number >= 0, got {extra_s!r}")
        if busy_epochs not in ("odd", "even", "all", "none"):
            raise ValueError(f"`busy_epochs` must be 'odd', 'even', 'all' or 'none', got {busy_epochs!r}")
        self.extra_s = float(extra_s)
        self.busy_epochs = busy_epochs
        self._clock = clock
        self.events = EventLog("busy", clock=clock)
        self._busy = False
        self.busy_steps = 0

    def busy(self) -> bool:
        """Whether the pretend background work is in flight."""
        return self._busy

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        odd = trainer.current_epoch % 2 == 1
        self._busy = {"odd": odd, "even": not odd, "all": True, "none": False}[self.busy_epochs]
        if self._busy:
            self.events.emit("eval_start", job=trainer.current_epoch, step=trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._busy:
            self.busy_steps += 1
            self._clock.sleep(self.extra_s)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._busy:
            self.events.emit("eval_end", job=trainer.current_epoch, step=trainer.global_step, outcome="ok")
        self._busy = False

    def stats(self) -> dict[str, float | int]:
        """``busy_steps``; ``hook_time_s`` is 0 (its cost is contention, not hook time)."""
        return {"busy_steps": self.busy_steps, "hook_time_s": 0.0, "hook_calls": 0}


class StepClock(Callback):
    """Advances a :class:`~lightning_evalguard.engine.clock.FakeClock` by ``step_s`` at each training step.

    Stands in for the compute of a step in tests that run a real ``Trainer.fit`` on fake time, so
    step-time figures are exact and no test waits on the wall clock.
    """

    def __init__(self, clock: FakeClock, step_s: float = 0.01) -> None:
        if not isinstance(clock, FakeClock):
            raise TypeError(f"`clock` must be a FakeClock, got {clock!r}")
        if isinstance(step_s, bool) or not isinstance(step_s, (int, float)) or step_s < 0:
            raise ValueError(f"`step_s` must be a number >= 0, got {step_s!r}")
        self.clock = clock
        self.step_s = float(step_s)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.clock.advance(self.step_s)
