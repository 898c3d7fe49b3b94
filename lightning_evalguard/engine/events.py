"""A bounded, thread-safe log of timestamped events: the raw material of the monitor's timeline.

Each evalguard callback owns one :class:`EventLog` (its ``events`` attribute). Background threads
append to it; :class:`~lightning_evalguard.PerformanceMonitor` reads it with a cursor and writes the
timeline into its JSON report. When full, the oldest events are dropped and counted.

Examples:
    >>> from lightning_evalguard.engine.clock import FakeClock
    >>> log = EventLog("evaluation", maxlen=2, clock=FakeClock(start=1.0))
    >>> log.emit("eval_start", job=1); log.emit("eval_end", job=1, outcome="ok"); log.emit("eval_start", job=2)
    >>> [e.kind for e in log.since(0)[1]], log.dropped
    (['eval_end', 'eval_start'], 1)
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from lightning_evalguard.engine.clock import SYSTEM_CLOCK, Clock

__all__ = ["Event", "EventLog"]


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened: monotonic time ``t``, the ``source`` component, a ``kind`` and fields."""

    seq: int
    t: float
    source: str
    kind: str
    fields: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {"seq": self.seq, "t": self.t, "source": self.source, "kind": self.kind, **self.fields}


class EventLog:
    """Bounded ring of :class:`Event` (oldest dropped first, counted in :attr:`dropped`).

    Args:
        source: name of the component writing here (``"evaluation"``, ``"logging"``, ...).
        maxlen: most events kept.
        clock: time source for the timestamps.
    """

    def __init__(self, source: str, maxlen: int = 10_000, clock: Clock = SYSTEM_CLOCK) -> None:
        if maxlen < 1:
            raise ValueError(f"`maxlen` must be >= 1, got {maxlen!r}")
        self.source = source
        self._clock = clock
        self._events: deque[Event] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self._seq = 0
        self.dropped = 0

    def emit(self, kind: str, **fields: Any) -> None:
        """Record an event now. Cheap; safe from any thread."""
        t = self._clock.now()
        with self._lock:
            if len(self._events) == self._events.maxlen:
                self.dropped += 1
            self._events.append(Event(self._seq, t, self.source, kind, fields))
            self._seq += 1

    def since(self, cursor: int) -> tuple[int, list[Event]]:
        """Events with ``seq >= cursor`` still held, and the cursor to pass next time."""
        with self._lock:
            events = [e for e in self._events if e.seq >= cursor]
            return self._seq, events

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)
