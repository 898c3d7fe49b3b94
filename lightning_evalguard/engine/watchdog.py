"""A watchdog: one daemon thread that fires actions at deadlines and measures its own lateness.

Components register ``watch(key, deadline, action)``; when the clock passes ``deadline`` the
watchdog calls ``action()`` on its thread (each call guarded: an error is counted, never fatal).
Between deadlines it wakes every ``tick`` seconds, and records how late each wake-up was: that
*scheduling lag* shows when the process is so loaded (GIL, CPU) that timeouts fire late.

Tests drive :meth:`Watchdog.poll` by hand with a fake clock instead of starting the thread.

Examples:
    >>> from lightning_evalguard.engine.clock import FakeClock
    >>> clock, fired = FakeClock(), []
    >>> dog = Watchdog(tick=0.05, clock=clock)
    >>> dog.watch("job-1", deadline=5.0, action=lambda: fired.append("job-1"))
    >>> dog.poll(); clock.advance(5.0); dog.poll(), fired
    0
    (1, ['job-1'])
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable

from lightning_evalguard.engine.clock import SYSTEM_CLOCK, Clock

__all__ = ["Watchdog", "percentile"]

log = logging.getLogger(__name__)


def percentile(values: list[float] | deque[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by linear interpolation; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class Watchdog:
    """Deadline tracker with one background thread.

    Args:
        tick: longest sleep between checks, seconds (> 0). Also the lag sampling period.
        clock: time source.
        name: thread name.
        lag_window: how many recent lag samples the percentiles use.
    """

    def __init__(
        self,
        tick: float = 0.05,
        clock: Clock = SYSTEM_CLOCK,
        name: str = "evalguard-watchdog",
        lag_window: int = 1024,
    ) -> None:
        if not tick > 0:
            raise ValueError(f"`tick` must be > 0, got {tick!r}")
        self.tick = float(tick)
        self.name = name
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Hashable]] = []
        self._actions: dict[Hashable, tuple[float, int, Callable[[], None]]] = {}
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._lags: deque[float] = deque(maxlen=lag_window)
        self.lag_max_s = 0.0
        self.fired = 0
        self.action_errors = 0

    # -- registration --------------------------------------------------------------------------
    def watch(self, key: Hashable, deadline: float, action: Callable[[], None]) -> None:
        """Call ``action`` once when the clock reaches ``deadline``. Re-watching a key replaces it."""
        with self._cond:
            seq = next(self._seq)
            self._actions[key] = (deadline, seq, action)
            heapq.heappush(self._heap, (deadline, seq, key))
            self._cond.notify()

    def unwatch(self, key: Hashable) -> bool:
        """Forget ``key``; ``True`` if it was still armed."""
        with self._cond:
            return self._actions.pop(key, None) is not None

    def armed(self) -> int:
        """How many deadlines are registered."""
        with self._cond:
            return len(self._actions)

    # -- firing --------------------------------------------------------------------------------
    def _pop_due(self, now: float) -> list[Callable[[], None]]:
        due = []
        while self._heap and self._heap[0][0] <= now:
            _, seq, key = heapq.heappop(self._heap)
            entry = self._actions.get(key)
            if entry is not None and entry[1] == seq:  # not replaced or unwatched since
                del self._actions[key]
                due.append(entry[2])
        return due

    def poll(self) -> int:
        """Fire every action whose deadline has passed; return how many fired."""
        with self._cond:
            due = self._pop_due(self._clock.now())
        for action in due:
            try:
                action()
            except Exception:  # an action's bug must not kill the watchdog
                self.action_errors += 1
                log.exception("evalguard watchdog action failed")
        self.fired += len(due)
        return len(due)

    def record_lag(self, lag: float) -> None:
        """Record one scheduling-lag sample (seconds late)."""
        lag = max(0.0, lag)
        self._lags.append(lag)
        self.lag_max_s = max(self.lag_max_s, lag)

    def lag_percentile(self, q: float) -> float:
        """Quantile ``q`` of recent scheduling lag, seconds."""
        return percentile(list(self._lags), q)

    # -- thread --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread (idempotent)."""
        with self._cond:
            if self._thread is not None or self._stop:
                return
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                now = self._clock.now()
                wake = now + self.tick
                if self._heap:
                    wake = min(wake, self._heap[0][0])
                notified = self._cond.wait(timeout=max(0.0, wake - now))
                if self._stop:
                    return
            if not notified:  # woke on time-out: how late were we?
                self.record_lag(self._clock.now() - wake)
            self.poll()

    def close(self, timeout: float = 5.0) -> None:
        """Stop and join the thread; pending deadlines are dropped. Idempotent."""
        with self._cond:
            self._stop = True
            self._actions.clear()
            self._heap.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
