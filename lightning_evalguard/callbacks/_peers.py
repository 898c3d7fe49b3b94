"""How evalguard callbacks find and read each other in ``trainer.callbacks``, and log from rank 0.

Callbacks are matched by duck typing on the public contract, not by importing each other's modules:
a callback that has ``stats()`` takes part in the monitor's accounting, one with ``busy()`` marks
steps as "in flight", one named ``GuardedEvaluation`` (or with ``release_buffers()``) is an
evaluation peer, one named ``BufferedLogging`` a logging peer. So any of them may be absent, and a
user's own callback can opt in by offering the same methods.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = [
    "busy_peers",
    "evaluation_peers",
    "log_to_loggers",
    "logging_peers",
    "named",
    "peer_name",
    "read_stats",
    "stats_peers",
    "warn_once",
]

_log = logging.getLogger("lightning_evalguard")


def named(obj: object, class_name: str) -> bool:
    """Whether ``obj``'s class, or a base class, is called ``class_name`` (no import needed)."""
    return any(cls.__name__ == class_name for cls in type(obj).__mro__)


def _has(obj: object, method: str) -> bool:
    return callable(getattr(obj, method, None))


def evaluation_peers(callbacks: Iterable[object]) -> list[Any]:
    """GuardedEvaluation instances (or look-alikes offering ``release_buffers()`` and ``stats()``)."""
    return [
        cb for cb in callbacks if named(cb, "GuardedEvaluation") or (_has(cb, "release_buffers") and _has(cb, "stats"))
    ]


def logging_peers(callbacks: Iterable[object]) -> list[Any]:
    """BufferedLogging instances."""
    return [cb for cb in callbacks if named(cb, "BufferedLogging") and _has(cb, "stats")]


def busy_peers(callbacks: Iterable[object], exclude: object = None) -> list[Any]:
    """Callbacks offering ``busy()``: background work of theirs may be in flight."""
    return [cb for cb in callbacks if cb is not exclude and _has(cb, "busy")]


def stats_peers(callbacks: Iterable[object], exclude: object = None) -> list[Any]:
    """Callbacks offering ``stats()`` (the evalguard surface)."""
    return [cb for cb in callbacks if cb is not exclude and _has(cb, "stats")]


def peer_name(cb: object) -> str:
    """A stable, readable name for reports: the ``state_key`` when it is a string, else the class name."""
    key = getattr(cb, "state_key", None)
    return key if isinstance(key, str) else type(cb).__qualname__


def read_stats(cb: Any, on_error: Callable[[BaseException], None] | None = None) -> dict[str, float]:
    """``cb.stats()`` as plain floats; a peer whose ``stats()`` fails reads as empty (and is reported)."""
    try:
        raw: Mapping[str, Any] = cb.stats()
        return {str(k): float(v) for k, v in raw.items() if isinstance(v, (int, float))}
    except Exception as exc:  # a broken peer must not take the training run down with it
        if on_error is not None:
            on_error(exc)
        return {}


def log_to_loggers(trainer: Any, metrics: Mapping[str, float], on_error: Callable[[BaseException], None]) -> None:
    """Send ``metrics`` to every logger of the trainer at its global step, from global rank 0 only.

    Non-finite values are left out (loggers disagree on NaN). A logger that raises is reported
    through ``on_error``; evalguard's own low-rate figures never fail a run.
    """
    if not metrics or not getattr(trainer, "is_global_zero", True):
        return
    clean = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
    if not clean:
        return
    for logger in getattr(trainer, "loggers", ()):
        try:
            logger.log_metrics(clean, step=trainer.global_step)
        except Exception as exc:
            on_error(exc)


def warn_once(seen: set[str], key: str, message: str) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen."""
    if key not in seen:
        seen.add(key)
        _log.warning(message)
