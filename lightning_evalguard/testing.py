"""Fault injectors and readers for testing code that uses lightning_evalguard.

These are the same tools the package's own test suite uses; they are public so users can check
their own training scripts against hangs, crashes and flaky backends.

Sections: evaluation faults (for :class:`~lightning_evalguard.GuardedEvaluation`), logging faults
(for :class:`~lightning_evalguard.BufferedLogging`) and the W&B offline run reader.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_evalguard.engine.clock import SYSTEM_CLOCK, Clock, FakeClock
from lightning_evalguard.engine.events import EventLog

__all__: list[str] = [
    "BusyCallback",
    "LeakingCallback",
    "SlowHookCallback",
    "StepClock",
]

# ---- evaluation faults -------------------------------------------------------------------------

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
