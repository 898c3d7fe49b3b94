"""Retry waits: exponential backoff with jitter.

The flusher retries a failed send ``max_retries`` times; before the k-th retry it waits
``Backoff.delay(k)``: ``base * 2**(k-1)`` capped at ``cap``, shortened by a random fraction of at
most ``jitter`` so that many processes hitting the same backend do not retry in lockstep. The random
source is injected, so tests are deterministic.

Examples:
    >>> import random
    >>> backoff = Backoff(base=0.5, cap=1.5, jitter=0.0)
    >>> [backoff.delay(k) for k in (1, 2, 3, 4)]
    [0.5, 1.0, 1.5, 1.5]
    >>> 0.25 <= Backoff(base=0.5, jitter=0.5, rng=random.Random(0)).delay(1) <= 0.5
    True
"""

from __future__ import annotations

import math
import random

__all__ = ["Backoff"]


class Backoff:
    """Exponential backoff with jitter.

    Args:
        base: wait before the first retry, in seconds (> 0).
        cap: longest wait, in seconds (>= base).
        jitter: fraction in [0, 1] by which a wait may be randomly shortened.
        rng: random source (``random.Random(seed)`` in tests).

    Raises:
        ValueError: for a non-positive ``base``, ``cap < base`` or ``jitter`` outside [0, 1].
    """

    def __init__(self, base: float = 0.2, cap: float = 10.0, jitter: float = 0.5, rng: random.Random | None = None):
        if not isinstance(base, (int, float)) or not math.isfinite(base) or base <= 0:
            raise ValueError(f"`retry_backoff` must be a finite number > 0, got {base!r}")
        if not isinstance(cap, (int, float)) or not cap >= base:
            raise ValueError(f"`max_backoff` must be a number >= `retry_backoff` ({base!r}), got {cap!r}")
        if not isinstance(jitter, (int, float)) or not 0.0 <= jitter <= 1.0:
            raise ValueError(f"`jitter` must be in [0, 1], got {jitter!r}")
        self.base = float(base)
        self.cap = float(cap)
        self.jitter = float(jitter)
        self._rng = rng if rng is not None else random.Random()

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        full = min(self.cap, self.base * 2.0 ** min(max(retry - 1, 0), 62))
        return full * (1.0 - self.jitter * self._rng.random())

    def __repr__(self) -> str:
        return f"Backoff(base={self.base}, cap={self.cap}, jitter={self.jitter})"
