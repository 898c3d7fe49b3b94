"""Step periods of the training loop, measured without ever synchronising the device.

A step's period is the time from the end of one training step to the end of the next within the
same epoch: it covers data loading, forward/backward/optimizer and every callback hook, which is
what throughput is made of. :class:`ClockStepTimer` reads an injected clock at each mark.
:class:`CudaStepTimer` records one CUDA event per step on the current stream and reads the elapsed
times later, only for events the device has already passed (``Event.query()``), so the training
thread never waits for the GPU; only :meth:`CudaStepTimer.finish`, at the end of fit, waits.

Examples:
    >>> from lightning_evalguard.engine.clock import FakeClock
    >>> from lightning_evalguard.engine.sla import StepTimes
    >>> clock, times = FakeClock(), StepTimes(window=10)
    >>> timer = ClockStepTimer(clock)
    >>> for busy in (False, False, True):
    ...     clock.advance(0.5)
    ...     timer.mark(busy=busy)
    >>> timer.drain(times), times.idle.values(), times.busy.values()
    (2, [0.5], [0.5])
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

from lightning_evalguard.engine.clock import Clock
from lightning_evalguard.engine.sla import StepTimes

__all__ = ["ClockStepTimer", "CudaStepTimer", "StepTimer"]


class StepTimer(Protocol):
    """Marks step ends and turns consecutive marks into step periods."""

    source: str

    def mark(self, *, busy: bool) -> None:
        """A training step ended now; ``busy``: background work was in flight during it."""
        ...

    def new_period(self) -> None:
        """The next mark starts a fresh sequence (epoch boundary): it is not paired with the last one."""
        ...

    def drain(self, out: StepTimes) -> int:
        """Move the periods known so far into ``out``; returns how many."""
        ...

    def finish(self, out: StepTimes) -> int:
        """Like :meth:`drain`, and wait for periods still in flight (end of fit only)."""
        ...


class ClockStepTimer:
    """Step periods from a host clock (CPU training, or any clock a test injects)."""

    source = "clock"

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._last: float | None = None
        self._ready: list[tuple[float, bool]] = []

    def mark(self, *, busy: bool) -> None:
        """Record a step end at the clock's current time."""
        now = self._clock.now()
        if self._last is not None:
            self._ready.append((now - self._last, busy))
        self._last = now

    def new_period(self) -> None:
        """Do not pair the next mark with the previous one."""
        self._last = None

    def drain(self, out: StepTimes) -> int:
        """Hand the finished periods to ``out``."""
        ready, self._ready = self._ready, []
        for duration, busy in ready:
            out.add(duration, busy=busy)
        return len(ready)

    def finish(self, out: StepTimes) -> int:
        """Same as :meth:`drain`: nothing is ever in flight."""
        return self.drain(out)


class CudaStepTimer:
    """Step periods from CUDA events on the current stream of ``device``, read lazily.

    Args:
        device: the CUDA device index (or ``torch.device``) training runs on.
        max_in_flight: most events waiting for the device; beyond that, marks are skipped (a device
            that far behind the host means periods are dominated by the queue anyway).
    """

    source = "cuda_events"

    def __init__(self, device: Any, max_in_flight: int = 4096) -> None:
        import torch  # only where a device event is touched

        self._torch = torch
        self._device = device
        self._max = max_in_flight
        self._pending: deque[tuple[Any, bool, bool]] = deque()  # (event, busy, starts_sequence)
        self._free: list[Any] = []
        self._prev: Any = None
        self._fresh = True
        self.skipped = 0

    def _event(self) -> Any:
        if self._free:
            return self._free.pop()
        return self._torch.cuda.Event(enable_timing=True)

    def mark(self, *, busy: bool) -> None:
        """Record an event on the current stream (asynchronous: it returns at once)."""
        if len(self._pending) >= self._max:
            self.skipped += 1
            self._fresh = True  # the next recorded mark cannot pair with one that was skipped
            return
        event = self._event()
        event.record(self._torch.cuda.current_stream(self._device))
        self._pending.append((event, busy, self._fresh))
        self._fresh = False

    def new_period(self) -> None:
        """Do not pair the next mark with the previous one."""
        self._fresh = True

    def drain(self, out: StepTimes) -> int:
        """Read every event the device has passed, oldest first; stop at the first it has not."""
        return self._read(out, wait=False)

    def finish(self, out: StepTimes) -> int:
        """Wait for the last event, then read everything."""
        if self._pending:
            self._pending[-1][0].synchronize()
        n = self._read(out, wait=True)
        self._free.clear()
        self._prev = None
        return n

    def _read(self, out: StepTimes, *, wait: bool) -> int:
        n = 0
        while self._pending and (wait or self._pending[0][0].query()):
            event, busy, starts = self._pending.popleft()
            if self._prev is not None:
                if not starts:
                    out.add(self._prev.elapsed_time(event) / 1000.0, busy=busy)  # ms -> s
                    n += 1
                self._free.append(self._prev)
            self._prev = event
        return n
