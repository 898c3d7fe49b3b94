"""PerformanceMonitor's figures and SLA verdicts, computed from plain inputs.

The inputs are what the callback collects on the training thread: other callbacks' ``stats()``
dicts, a :class:`~lightning_evalguard.engine.sla.StepTimes`, memory readings and growth series.
Everything here is a pure function of them, so the figures are tested without a Trainer.

Examples:
    >>> evaluation_figures([{"completed": 3, "pending": 1, "running": 1, "latency_p95_s": 2.0},
    ...                     {"completed": 1, "latency_p95_s": 5.0}])["eval_queue_depth"]
    2.0
    >>> from lightning_evalguard.engine.sla import AlertBook
    >>> new, active = judge(AlertBook(), {"watchdog_lag_p95_s": 0.3}, {"scheduler_lag": 0.1}, t=0.0, step=5)
    >>> [a.kind for a in new], active
    (['scheduler_lag'], {'scheduler_lag': 0.3})
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from lightning_evalguard.engine.memory import MemoryReading
from lightning_evalguard.engine.sla import MB, Alert, AlertBook, GrowthSeries, StepTimes, median, percentile

__all__ = [
    "ALERT_FIGURES",
    "evaluation_figures",
    "judge",
    "logging_figures",
    "memory_figures",
    "step_figures",
]

Stats = Sequence[Mapping[str, float]]

ALERT_FIGURES: dict[str, tuple[str, str | None]] = {
    "step_slowdown": ("step_slowdown", "step_slowdown_lower"),
    "hook_overhead": ("hook_overhead", None),
    "logging_failure_rate": ("logging_failure_rate", None),
    "memory_growth": ("host_growth_mb_per_hour", "host_growth_judged_mb_per_hour"),
    "cuda_memory_growth": ("cuda_growth_mb_per_hour", "cuda_growth_judged_mb_per_hour"),
    "scheduler_lag": ("watchdog_lag_p95_s", None),
    "eval_latency": ("eval_latency_p95_s", None),
}
"""Alert kind -> (the figure reported, the figure judged against the threshold, if another one)."""


def _total(stats: Stats, *keys: str) -> float:
    """Sum over callbacks and keys; ``nan`` when there is no callback to read."""
    return float(sum(s.get(k, 0.0) for s in stats for k in keys)) if stats else math.nan


def _worst(stats: Stats, key: str) -> float:
    values = [s[key] for s in stats if key in s and math.isfinite(s[key])]
    return max(values) if values else math.nan


def step_figures(times: StepTimes, min_samples: int) -> dict[str, float]:
    """Step-period figures; the slowdown is ``nan`` until :meth:`StepTimes.slowdown` can tell."""
    every = times.all_values()
    slowdown = times.slowdown(min_samples)
    return {
        "measured_steps": float(times.count),
        "busy_steps": float(times.busy_count),
        "step_time_p50_s": median(every),
        "step_time_p95_s": percentile(every, 95.0),
        "step_time_idle_p50_s": times.idle.median(),
        "step_time_busy_p50_s": times.busy.median(),
        "step_slowdown": slowdown.estimate if slowdown else math.nan,
        "step_slowdown_lower": slowdown.lower if slowdown else math.nan,
    }


def evaluation_figures(stats: Stats) -> dict[str, float]:
    """From GuardedEvaluation ``stats()`` dicts: counts add up, latencies and lags take the worst."""
    return {
        "eval_submitted": _total(stats, "submitted"),
        "eval_completed": _total(stats, "completed"),
        "eval_failed": _total(stats, "failed"),
        "eval_timed_out": _total(stats, "timed_out"),
        "eval_cancelled": _total(stats, "cancelled"),
        "eval_skipped": _total(stats, "skipped_breaker_open", "skipped_queue_full"),
        "eval_queue_depth": _total(stats, "pending", "running"),
        "eval_last_latency_s": _worst(stats, "last_latency_s"),
        "eval_latency_p50_s": _worst(stats, "latency_p50_s"),
        "eval_latency_p95_s": _worst(stats, "latency_p95_s"),
        "eval_breaker_state": _worst(stats, "breaker_state"),
        "watchdog_lag_p95_s": _worst(stats, "watchdog_lag_p95_s"),
        "watchdog_lag_max_s": _worst(stats, "watchdog_lag_max_s"),
    }


def logging_figures(stats: Stats) -> dict[str, float]:
    """From BufferedLogging ``stats()`` dicts, with the accounting gap (0 when every row is counted)."""
    dropped = float(sum(v for s in stats for k, v in s.items() if k.startswith("dropped_"))) if stats else math.nan
    accepted = _total(stats, "accepted")
    return {
        "logging_accepted": accepted,
        "logging_delivered": _total(stats, "delivered"),
        "logging_pending": _total(stats, "pending"),
        "logging_spilled": _total(stats, "spilled"),
        "logging_dropped": dropped,
        "logging_accounting_gap": accepted - _total(stats, "delivered", "pending", "spilled") - dropped,
        "logging_failure_rate": _worst(stats, "logging_failure_rate"),
        "logging_flush_latency_p95_s": _worst(stats, "flush_latency_p95_s"),
        "logging_buffer_peak_bytes": _worst(stats, "buffer_peak_bytes"),
        "logging_breaker_state": _worst(stats, "breaker_state"),
    }


def memory_figures(reading: MemoryReading, host: GrowthSeries, cuda: GrowthSeries) -> dict[str, float]:
    """The latest reading in MB, and each series' growth: MB/hour, MB/epoch and the judged MB/hour."""
    figures = {"host_rss_mb": reading.host_rss / MB, "cuda_allocated_mb": reading.cuda_allocated / MB}
    for name, series in (("host", host), ("cuda", cuda)):
        per_hour, per_epoch = series.mb_per_hour(), series.mb_per_epoch()
        figures[f"{name}_growth_mb_per_hour"] = per_hour.slope if per_hour else math.nan
        figures[f"{name}_growth_mb_per_epoch"] = per_epoch.slope if per_epoch else math.nan
        figures[f"{name}_growth_judged_mb_per_hour"] = series.judged_mb_per_hour()
    return figures


def judge(
    book: AlertBook,
    figures: Mapping[str, float],
    limits: Mapping[str, float],
    *,
    t: float,
    step: int,
    epoch: int = 0,
) -> tuple[list[Alert], dict[str, float]]:
    """Check every limited kind (see :data:`ALERT_FIGURES`) in ``book``.

    Returns the alerts raised for the first time now, and kind -> reported figure for every kind
    in violation at this check.
    """
    new: list[Alert] = []
    active: dict[str, float] = {}
    for kind, limit in limits.items():
        figure, judged = ALERT_FIGURES[kind]
        value = figures.get(figure, math.nan)
        before = book.violations.get(kind, 0)
        alert = book.check(
            kind,
            value,
            limit,
            t=t,
            step=step,
            epoch=epoch,
            judged=None if judged is None else figures.get(judged, math.nan),
        )
        if book.violations.get(kind, 0) > before:
            active[kind] = value
        if alert is not None:
            new.append(alert)
    return new, active
