"""Service-level figures and alerts: rolling windows, robust statistics, growth slopes, thresholds.

This is the measuring half of :class:`~lightning_evalguard.PerformanceMonitor`; the callback only
feeds it step times, memory readings and other callbacks' ``stats()``. Nothing here imports
Lightning or torch, and every time-stamped value comes from the caller, so tests drive it with a
:class:`~lightning_evalguard.engine.clock.FakeClock` or plain numbers.

How each figure decides a violation (the figures themselves are always reported as measured):

- step slowdown: ``median(busy) / median(idle) - 1``; a violation needs the *lower* end of its
  ~95 % interval above the threshold, so scheduler noise on a busy host does not raise alerts;
- memory growth: least-squares slope of the readings against time (MB/hour) and against epochs
  (MB/epoch); a violation needs the slope's lower bound above the threshold *and* a fitted rise over
  the window of at least :data:`MIN_GROWTH_MB`, since a rate extrapolated from a few flat-ish
  seconds of readings is not evidence of a leak;
- everything else (rates, latencies, lags) is compared to its threshold as is.

Examples:
    >>> times = StepTimes(window=100)
    >>> for _ in range(20):
    ...     times.add(0.010, busy=False)
    ...     times.add(0.013, busy=True)
    >>> s = times.slowdown(min_samples=10)
    >>> round(s.estimate, 3), round(s.lower, 3)
    (0.3, 0.3)
    >>> book = AlertBook()
    >>> book.check("step_slowdown", s.lower, 0.02, t=1.0, step=40).kind
    'step_slowdown'
    >>> book.check("step_slowdown", s.lower, 0.02, t=2.0, step=80) is None  # reported once per kind
    True
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "MB",
    "MIN_GROWTH_MB",
    "Alert",
    "AlertBook",
    "GrowthSeries",
    "LinearFit",
    "RollingWindow",
    "Slowdown",
    "StepTimes",
    "fit_line",
    "least_squares_slope",
    "mad",
    "median",
    "percentile",
]

MB = float(2**20)
"""Bytes in the "MB" of every figure here (a mebibyte, as in torch's memory summaries)."""

MIN_GROWTH_MB = 4.0
"""Smallest fitted rise (MB over the whole window) that counts as growth rather than noise.

A process with torch and Lightning loaded holds a flat RSS to the page once warm; 4 MB is several
allocator arenas, well above that noise and well below any leak worth paging someone for.
"""

_Z = 1.96  # two-sided ~95 % normal quantile, for the lower bounds below
_MEDIAN_SE = 1.2533  # sqrt(pi/2): standard error of a median, in units of sigma / sqrt(n)
_MAD_SIGMA = 1.4826  # MAD -> sigma for normal data


# ---- robust statistics ---------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    """The median, or ``nan`` for no values.

    >>> median([3.0, 1.0, 2.0]), median([])
    (2.0, nan)
    """
    return percentile(values, 50.0)


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation between order statistics, or ``nan``.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 95)
    3.85
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"`q` must be within [0, 100], got {q!r}")
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def mad(values: Sequence[float]) -> float:
    """Median absolute deviation from the median (``nan`` for no values).

    >>> mad([1.0, 2.0, 3.0, 100.0])
    1.0
    """
    centre = median(values)
    return median(abs(v - centre) for v in values)


@dataclass(frozen=True, slots=True)
class LinearFit:
    """An ordinary least-squares line ``y = slope * x + intercept`` over ``n`` points.

    ``slope_se`` is the slope's standard error (``inf`` with fewer than 3 points); ``span`` is
    ``max(x) - min(x)``.
    """

    slope: float
    intercept: float
    slope_se: float
    n: int
    span: float

    def slope_lower(self, z: float = _Z) -> float:
        """Lower end of the slope's ~95 % interval (``-inf`` when it cannot be estimated)."""
        return self.slope - z * self.slope_se

    @property
    def rise(self) -> float:
        """Fitted change of ``y`` across the points: ``slope * span``."""
        return self.slope * self.span


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> LinearFit | None:
    """Least-squares line through the points; ``None`` with fewer than 2 points or no spread in ``x``.

    >>> fit = fit_line([0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 5.0, 7.0])
    >>> fit.slope, fit.intercept, fit.slope_se, fit.rise
    (2.0, 1.0, 0.0, 6.0)
    """
    if len(xs) != len(ys):
        raise ValueError(f"`xs` and `ys` differ in length: {len(xs)} != {len(ys)}")
    n = len(xs)
    if n < 2:
        return None
    mx = math.fsum(xs) / n
    my = math.fsum(ys) / n
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    if sxx <= 0.0:
        return None
    sxy = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    intercept = my - slope * mx
    if n > 2:
        sse = math.fsum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys, strict=True))
        slope_se = math.sqrt(max(sse, 0.0) / (n - 2) / sxx)
    else:
        slope_se = math.inf
    return LinearFit(slope, intercept, slope_se, n, max(xs) - min(xs))


def least_squares_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Slope of the least-squares line, or ``nan`` when it is undefined.

    >>> least_squares_slope([0.0, 1.0, 2.0], [5.0, 5.5, 6.0])
    0.5
    """
    fit = fit_line(xs, ys)
    return math.nan if fit is None else fit.slope


# ---- rolling windows -----------------------------------------------------------------------------


class RollingWindow:
    """The last ``maxlen`` values, with robust summaries.

    Args:
        maxlen: how many of the most recent values are kept (>= 1).
    """

    __slots__ = ("_values",)

    def __init__(self, maxlen: int) -> None:
        if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1:
            raise ValueError(f"`maxlen` must be an int >= 1, got {maxlen!r}")
        self._values: deque[float] = deque(maxlen=maxlen)

    def add(self, value: float) -> None:
        """Append one value (the oldest falls out when full)."""
        self._values.append(float(value))

    def values(self) -> list[float]:
        """A copy of the values, oldest first."""
        return list(self._values)

    def median(self) -> float:
        """Median of the window (``nan`` when empty)."""
        return median(self._values)

    def percentile(self, q: float) -> float:
        """``q``-th percentile of the window (``nan`` when empty)."""
        return percentile(self._values, q)

    def median_se(self) -> float:
        """Robust standard error of the median: ``1.2533 * 1.4826 * MAD / sqrt(n)``."""
        n = len(self._values)
        if n == 0:
            return math.inf
        return _MEDIAN_SE * _MAD_SIGMA * mad(list(self._values)) / math.sqrt(n)

    def clear(self) -> None:
        """Forget every value."""
        self._values.clear()

    def __len__(self) -> int:
        return len(self._values)


@dataclass(frozen=True, slots=True)
class Slowdown:
    """Relative slowdown of steps taken while background work was in flight.

    ``estimate`` is the median, over busy steps, of ``busy step / median of the idle steps just
    before it`` minus 1; ``lower`` is the lower end of its ~95 % interval, the figure alerts are
    judged on. ``busy_median_s`` and ``idle_median_s`` are the plain medians of each window.
    """

    estimate: float
    lower: float
    busy_median_s: float
    idle_median_s: float
    n_busy: int
    n_idle: int


class StepTimes:
    """Step durations split by whether any background work was in flight during the step.

    Each busy step is compared with the median of the ``baseline`` idle steps that came just
    before it, not with idle steps from anywhere in the run: step times drift (data, allocator,
    thermal state, a leak), and background work tends to run at the same point of every epoch, so
    comparing whole-run medians would count that drift as slowdown.

    Args:
        window: how many of the latest busy and of the latest idle steps are kept (each).
        baseline: idle steps in the local baseline of a busy step (the first 5 are needed).

    Examples:
        >>> times = StepTimes(window=100)
        >>> for i in range(100):  # in each block of 20 steps, the first 5 overlap background work
        ...     busy = i % 20 < 5
        ...     times.add(0.012 if busy else 0.010, busy=busy)
        >>> s = times.slowdown(min_samples=10)
        >>> round(s.estimate, 3), s.n_busy  # the first block has no idle baseline yet
        (0.2, 20)
    """

    def __init__(self, window: int, baseline: int = 20) -> None:
        self.busy = RollingWindow(window)
        self.idle = RollingWindow(window)
        self.ratios = RollingWindow(window)
        self._recent_idle: deque[float] = deque(maxlen=max(5, baseline))
        self.count = 0
        self.busy_count = 0

    def add(self, duration_s: float, *, busy: bool) -> None:
        """Record one step (in the order the steps ran)."""
        self.count += 1
        if busy:
            self.busy_count += 1
            self.busy.add(duration_s)
            if len(self._recent_idle) >= 5:
                base = median(self._recent_idle)
                if base > 0.0:
                    self.ratios.add(duration_s / base)
        else:
            self.idle.add(duration_s)
            self._recent_idle.append(duration_s)

    def median_s(self) -> float:
        """Median step time, idle steps preferred (they are the undisturbed baseline)."""
        return self.idle.median() if len(self.idle) else self.busy.median()

    def all_values(self) -> list[float]:
        """Every kept duration, busy and idle."""
        return self.idle.values() + self.busy.values()

    def slowdown(self, min_samples: int) -> Slowdown | None:
        """The slowdown estimate, or ``None`` until ``min_samples`` busy steps have a baseline
        and ``min_samples`` idle steps were seen."""
        nb, ni = len(self.ratios), len(self.idle)
        if nb < min_samples or ni < min_samples:
            return None
        estimate = self.ratios.median() - 1.0
        mi = self.idle.median()
        # The busy ratios' own noise, plus that of a baseline median (shared by neighbouring ratios).
        rel_idle_sigma = _MAD_SIGMA * mad(self.idle.values()) / mi if mi > 0 else 0.0
        baseline_se = _MEDIAN_SE * rel_idle_sigma / math.sqrt(len(self._recent_idle))
        margin = _Z * math.hypot(self.ratios.median_se(), baseline_se)
        return Slowdown(estimate, estimate - margin, self.busy.median(), mi, nb, ni)


# ---- growth over time ----------------------------------------------------------------------------


class GrowthSeries:
    """Readings of one quantity (bytes) at times and epoch positions, bounded in memory.

    When ``maxlen`` readings are held, every other one is dropped, so the series always spans the
    whole run at a coarser grain instead of forgetting its start.

    Args:
        maxlen: most readings kept (>= 4, even).

    Examples:
        >>> series = GrowthSeries()
        >>> for i in range(6):
        ...     series.add(t=600.0 * i, epoch=float(i), value=(100 + 2 * i) * MB)  # +2 MB per 10 min
        >>> series.mb_per_hour().slope, series.mb_per_epoch().slope
        (12.0, 2.0)
    """

    def __init__(self, maxlen: int = 512) -> None:
        if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 4 or maxlen % 2:
            raise ValueError(f"`maxlen` must be an even int >= 4, got {maxlen!r}")
        self.maxlen = maxlen
        self.t: list[float] = []
        self.epoch: list[float] = []
        self.value: list[float] = []

    def add(self, *, t: float, epoch: float, value: float) -> None:
        """Record a reading of ``value`` bytes at monotonic time ``t`` and epoch position ``epoch``."""
        if len(self.t) >= self.maxlen:
            self.t, self.epoch, self.value = self.t[::2], self.epoch[::2], self.value[::2]
        self.t.append(float(t))
        self.epoch.append(float(epoch))
        self.value.append(float(value))

    def mb_per_hour(self) -> LinearFit | None:
        """Least-squares fit of MB against hours."""
        return fit_line([t / 3600.0 for t in self.t], [v / MB for v in self.value])

    def mb_per_epoch(self) -> LinearFit | None:
        """Least-squares fit of MB against epochs (``None`` when epoch positions are unknown)."""
        pairs = [(e, v / MB) for e, v in zip(self.epoch, self.value, strict=True) if math.isfinite(e)]
        return fit_line([e for e, _ in pairs], [v for _, v in pairs])

    def judged_mb_per_hour(self, min_points: int = 4) -> float:
        """The growth rate alerts are judged on, in MB/hour.

        That is the slope's lower bound, or ``nan`` with fewer than ``min_points`` readings or a
        fitted rise under :data:`MIN_GROWTH_MB`.
        """
        fit = self.mb_per_hour()
        if fit is None or fit.n < min_points or fit.rise < MIN_GROWTH_MB:
            return math.nan
        return fit.slope_lower()

    def __len__(self) -> int:
        return len(self.t)


# ---- thresholds and alerts -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Alert:
    """The first violation of one kind of SLA: the figure, its threshold, and when it happened."""

    kind: str
    value: float
    threshold: float
    t: float
    step: int
    epoch: int

    def message(self) -> str:
        """One line for a warning or a log."""
        return (
            f"evalguard SLA {self.kind!r} violated at step {self.step}: "
            f"measured {self.value:.6g} > threshold {self.threshold:.6g}"
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return asdict(self)


class AlertBook:
    """Decides violations and remembers them, so each kind is reported once, not once per check.

    Every violating check is counted (``violations[kind]``); only the first of each kind returns an
    :class:`Alert`.
    """

    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        self.violations: dict[str, int] = {}
        self.worst: dict[str, float] = {}

    def check(
        self,
        kind: str,
        value: float | None,
        threshold: float | None,
        *,
        t: float,
        step: int,
        epoch: int = 0,
        judged: float | None = None,
    ) -> Alert | None:
        """Compare a figure to its threshold; return a new :class:`Alert` on the first violation of ``kind``.

        Args:
            kind: which SLA.
            value: the measured figure (reported in the alert).
            threshold: its limit.
            t: monotonic time of the check.
            step: training step of the check.
            epoch: epoch of the check.
            judged: the figure compared with ``threshold`` when it is not ``value`` itself (a lower
                confidence bound, say); defaults to ``value``.

        ``None`` or non-finite figures and thresholds never violate: a figure not measured yet is
        not a violation.
        """
        test = value if judged is None else judged
        if value is None or test is None or threshold is None:
            return None
        if not (math.isfinite(test) and math.isfinite(threshold)) or test <= threshold:
            return None
        self.violations[kind] = self.violations.get(kind, 0) + 1
        self.worst[kind] = max(self.worst.get(kind, -math.inf), float(value))
        if self.fired(kind):
            return None
        alert = Alert(kind, float(value), float(threshold), float(t), int(step), int(epoch))
        self.alerts.append(alert)
        return alert

    def fired(self, kind: str) -> bool:
        """Whether ``kind`` has been reported."""
        return any(a.kind == kind for a in self.alerts)

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (a resumed run does not warn again for a kind it warned about)."""
        return {
            "alerts": [a.as_dict() for a in self.alerts],
            "violations": dict(self.violations),
            "worst": dict(self.worst),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.alerts = [Alert(**a) for a in state.get("alerts", [])]
        self.violations = {str(k): int(v) for k, v in state.get("violations", {}).items()}
        self.worst = {str(k): float(v) for k, v in state.get("worst", {}).items()}
