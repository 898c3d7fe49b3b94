"""A circuit breaker: stop sending work to something that keeps failing, then try it again.

States (numeric codes are what ``stats()`` report)::

    CLOSED (0) --failure_threshold consecutive failures--> OPEN (1)
    OPEN (1)   --recovery_time elapsed, next allow()----> HALF_OPEN (2), exactly one trial passes
    HALF_OPEN  --trial succeeds--> CLOSED;  --trial fails--> OPEN (the recovery timer restarts)

:meth:`CircuitBreaker.lock_open` pins it open for good (used when a component has given up, e.g.
after too many abandoned threads): no trial is ever let through again.

Examples:
    >>> from lightning_evalguard.engine.clock import FakeClock
    >>> clock = FakeClock()
    >>> breaker = CircuitBreaker(failure_threshold=2, recovery_time=10.0, clock=clock)
    >>> breaker.record_failure(); breaker.record_failure()
    >>> breaker.state, breaker.allow()
    ('open', False)
    >>> clock.advance(10.0)
    >>> breaker.allow(), breaker.state, breaker.allow()
    (True, 'half_open', False)
    >>> breaker.record_success()
    >>> breaker.state
    'closed'
"""

from __future__ import annotations

import math
import threading
from typing import Any

from lightning_evalguard.engine.clock import SYSTEM_CLOCK, Clock

__all__ = ["STATE_CODES", "CircuitBreaker"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATE_CODES: dict[str, int] = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}


class CircuitBreaker:
    """Thread-safe closed / open / half-open breaker.

    Args:
        failure_threshold: consecutive failures that open the breaker (>= 1).
        recovery_time: seconds the breaker stays open before one trial is allowed (>= 0).
        clock: time source; tests pass a :class:`~lightning_evalguard.engine.clock.FakeClock`.

    Raises:
        ValueError: for a threshold below 1 or a negative or non-finite recovery time.
    """

    def __init__(self, failure_threshold: int = 3, recovery_time: float = 300.0, clock: Clock = SYSTEM_CLOCK) -> None:
        if isinstance(failure_threshold, bool) or not isinstance(failure_threshold, int) or failure_threshold < 1:
            raise ValueError(f"`failure_threshold` must be an int >= 1, got {failure_threshold!r}")
        if not isinstance(recovery_time, (int, float)) or not math.isfinite(recovery_time) or recovery_time < 0:
            raise ValueError(f"`recovery_time` must be a finite number >= 0, got {recovery_time!r}")
        self.failure_threshold = failure_threshold
        self.recovery_time = float(recovery_time)
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._locked_reason: str | None = None
        self.transitions: dict[str, int] = {"opened": 0, "half_opened": 0, "closed": 0}
        self.successes = 0
        self.failures = 0
        self.rejected = 0

    # -- queries -------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"``."""
        with self._lock:
            return self._state

    @property
    def state_code(self) -> int:
        """0 closed, 1 open, 2 half-open."""
        return STATE_CODES[self.state]

    @property
    def locked_reason(self) -> str | None:
        """Why the breaker is pinned open, or ``None``."""
        return self._locked_reason

    def retry_in(self) -> float:
        """Seconds until the next trial may pass (0 when closed, ``inf`` when locked open)."""
        with self._lock:
            if self._locked_reason is not None:
                return math.inf
            if self._state != OPEN:
                return 0.0
            return max(0.0, self._opened_at + self.recovery_time - self._clock.now())

    # -- transitions ---------------------------------------------------------------------------
    def allow(self) -> bool:
        """Whether one unit of work may go ahead now.

        While open, returns ``False`` until ``recovery_time`` has passed; the first call after that
        moves to half-open and returns ``True`` once. Calls while that trial is in flight return
        ``False``. Every refusal is counted in :attr:`rejected`.
        """
        with self._lock:
            if self._state == CLOSED:
                return True
            if (
                self._state == OPEN
                and self._locked_reason is None
                and self._clock.now() - self._opened_at >= self.recovery_time
            ):
                self._state = HALF_OPEN
                self.transitions["half_opened"] += 1
                return True
            self.rejected += 1
            return False

    def record_success(self) -> None:
        """A unit of work succeeded: reset the failure count; a half-open trial closes the breaker."""
        with self._lock:
            self.successes += 1
            self._consecutive_failures = 0
            if self._state == HALF_OPEN and self._locked_reason is None:
                self._state = CLOSED
                self.transitions["closed"] += 1

    def record_failure(self) -> None:
        """A unit of work failed: may open the breaker (or re-open it after a failed trial)."""
        with self._lock:
            self.failures += 1
            self._consecutive_failures += 1
            if self._state == HALF_OPEN or (
                self._state == CLOSED and self._consecutive_failures >= self.failure_threshold
            ):
                self._open()

    def release_trial(self) -> None:
        """A half-open trial ended without a verdict (cancelled): allow a new trial at once."""
        with self._lock:
            if self._state == HALF_OPEN:
                self._state = OPEN
                self._opened_at = self._clock.now() - self.recovery_time

    def lock_open(self, reason: str) -> None:
        """Open the breaker for good; no trial will pass again. ``reason`` is kept for messages."""
        with self._lock:
            self._locked_reason = reason
            if self._state != OPEN:
                self._open()

    def _open(self) -> None:
        self._state = OPEN
        self._opened_at = self._clock.now()
        self.transitions["opened"] += 1

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain-data state. Open time is stored as time *remaining*, since clocks differ across runs."""
        with self._lock:
            remaining = 0.0
            if self._state == OPEN:
                remaining = max(0.0, self._opened_at + self.recovery_time - self._clock.now())
            return {
                "state": self._state,
                "consecutive_failures": self._consecutive_failures,
                "open_remaining_s": remaining,
                "locked_reason": self._locked_reason,
                "transitions": dict(self.transitions),
                "successes": self.successes,
                "failures": self.failures,
                "rejected": self.rejected,
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`. A half-open trial in flight at save time is not resumed:
        the breaker comes back open with its trial due at once."""
        with self._lock:
            saved = state.get("state", CLOSED)
            self._consecutive_failures = int(state.get("consecutive_failures", 0))
            self._locked_reason = state.get("locked_reason")
            self.transitions.update({k: int(v) for k, v in state.get("transitions", {}).items()})
            self.successes = int(state.get("successes", 0))
            self.failures = int(state.get("failures", 0))
            self.rejected = int(state.get("rejected", 0))
            now = self._clock.now()
            if saved == CLOSED and self._locked_reason is None:
                self._state = CLOSED
            else:
                remaining = 0.0 if saved == HALF_OPEN else float(state.get("open_remaining_s", 0.0))
                self._state = OPEN
                self._opened_at = now - self.recovery_time + remaining

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(state={self.state!r}, failure_threshold={self.failure_threshold}, "
            f"recovery_time={self.recovery_time})"
        )
