"""engine.sla: robust statistics, slopes, step-time windows, growth series, alert book. No Trainer."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_evalguard.engine.clock import FakeClock
from lightning_evalguard.engine.sla import (
    MB,
    MIN_GROWTH_MB,
    AlertBook,
    GrowthSeries,
    RollingWindow,
    StepTimes,
    fit_line,
    least_squares_slope,
    mad,
    median,
    percentile,
)
from lightning_evalguard.engine.steptimer import ClockStepTimer

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


# ---- statistics ----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=50), st.floats(min_value=0, max_value=100))
def test_percentile_matches_numpy_linear(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-6)


def test_empty_inputs_are_nan_not_errors() -> None:
    assert math.isnan(median([]))
    assert math.isnan(percentile([], 95))
    assert math.isnan(mad([]))
    assert math.isnan(least_squares_slope([1.0], [2.0]))
    assert fit_line([], []) is None
    assert fit_line([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None  # no spread in x: no slope


@pytest.mark.parametrize("q", [-0.1, 100.5])
def test_percentile_rejects_out_of_range_q(q: float) -> None:
    with pytest.raises(ValueError, match=r"`q` must be within \[0, 100\]"):
        percentile([1.0], q)


def test_median_and_mad_ignore_an_outlier() -> None:
    values = [1.0, 1.1, 0.9, 1.0, 1000.0]
    assert median(values) == 1.0
    assert mad(values) == pytest.approx(0.1)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 100_000), min_size=3, max_size=40, unique=True).map(lambda v: [x / 10 for x in v]),
    st.floats(min_value=-100, max_value=100),
    st.floats(min_value=-100, max_value=100),
)
def test_fit_line_matches_numpy_polyfit(xs: list[float], slope: float, intercept: float) -> None:
    rng = random.Random(len(xs))
    ys = [slope * x + intercept + rng.uniform(-1, 1) for x in xs]
    fit = fit_line(xs, ys)
    assert fit is not None
    expected_slope, expected_intercept = np.polyfit(xs, ys, 1)
    assert fit.slope == pytest.approx(expected_slope, rel=1e-6, abs=1e-6)
    assert fit.intercept == pytest.approx(expected_intercept, rel=1e-6, abs=1e-3)
    assert fit.n == len(xs)
    assert fit.span == pytest.approx(max(xs) - min(xs))


def test_fit_line_standard_error_shrinks_with_more_points() -> None:
    rng = random.Random(0)
    few = [float(i) for i in range(5)]
    many = [float(i) for i in range(500)]
    noisy_few = fit_line(few, [2 * x + rng.gauss(0, 1) for x in few])
    noisy_many = fit_line(many, [2 * x + rng.gauss(0, 1) for x in many])
    assert noisy_few is not None
    assert noisy_many is not None
    assert noisy_many.slope_se < noisy_few.slope_se
    assert noisy_many.slope_lower() < noisy_many.slope < noisy_many.slope + 3 * noisy_many.slope_se
    two = fit_line([0.0, 1.0], [0.0, 1.0])
    assert two is not None
    assert two.slope_se == math.inf  # two points say nothing about the noise


def test_fit_line_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        fit_line([1.0, 2.0], [1.0])


# ---- windows and step times ----------------------------------------------------------------------


@pytest.mark.parametrize("maxlen", [0, -1, 1.5, True, "3"])
def test_rolling_window_rejects_bad_maxlen(maxlen: object) -> None:
    with pytest.raises(ValueError, match=r"`maxlen` must be an int >= 1, got"):
        RollingWindow(maxlen)  # type: ignore[arg-type]


def test_rolling_window_keeps_only_the_latest() -> None:
    window = RollingWindow(3)
    for v in (100.0, 1.0, 2.0, 3.0):
        window.add(v)
    assert window.values() == [1.0, 2.0, 3.0]
    assert window.median() == 2.0
    assert len(window) == 3
    window.clear()
    assert len(window) == 0
    assert window.median_se() == math.inf


def test_slowdown_needs_enough_samples_on_both_sides() -> None:
    times = StepTimes(window=50)
    for _ in range(5):
        times.add(0.01, busy=False)  # a baseline first
    for _ in range(9):
        times.add(0.01, busy=False)
        times.add(0.02, busy=True)
    assert times.slowdown(min_samples=10) is None
    times.add(0.01, busy=False)
    times.add(0.02, busy=True)
    slowdown = times.slowdown(min_samples=10)
    assert slowdown is not None
    assert slowdown.estimate == pytest.approx(1.0)
    assert slowdown.lower == pytest.approx(1.0)  # no noise, no margin
    assert (slowdown.n_busy, slowdown.n_idle) == (10, 15)
    assert (slowdown.busy_median_s, slowdown.idle_median_s) == (0.02, 0.01)


def test_busy_steps_without_an_idle_baseline_are_not_judged() -> None:
    times = StepTimes(window=50)
    for _ in range(30):
        times.add(0.02, busy=True)
    for _ in range(30):
        times.add(0.01, busy=False)
    assert times.slowdown(min_samples=10) is None


def test_slowdown_compares_busy_steps_with_their_neighbours_not_with_a_drifting_run() -> None:
    # Step time grows 0.05 % per step (a slow leak, say) and work runs at the start of every
    # 40-step epoch, costing nothing. Whole-run medians would call the drift a slowdown.
    times = StepTimes(window=200)
    for i in range(400):
        busy = i % 40 < 8
        times.add(0.010 * (1 + 0.0005 * i), busy=busy)
    s = times.slowdown(min_samples=10)
    assert s is not None
    assert abs(s.estimate) < 0.01
    assert s.lower < 0.02


def test_slowdown_lower_bound_absorbs_noise_but_not_a_real_slowdown() -> None:
    rng = random.Random(1)

    def steps(extra: float) -> StepTimes:
        times = StepTimes(window=200)
        for _ in range(200):
            # heavy-ish noise: 10 ms +- 10 %, with an occasional 5x outlier
            for busy in (False, True):
                base = 0.010 * (1 + rng.uniform(-0.1, 0.1)) * (5 if rng.random() < 0.02 else 1)
                times.add(base * (1 + extra) if busy else base, busy=busy)
        return times

    flat = steps(0.0).slowdown(10)
    assert flat is not None
    assert flat.lower < 0.02 < flat.lower + 0.1  # the point estimate may wander; the bound does not alert
    slow = steps(0.10).slowdown(10)
    assert slow is not None
    assert slow.lower > 0.02
    assert slow.estimate == pytest.approx(0.10, abs=0.03)


def test_clock_step_timer_pairs_marks_within_an_epoch_only() -> None:
    clock, times = FakeClock(), StepTimes(window=10)
    timer = ClockStepTimer(clock)
    for busy in (False, False, True):
        clock.advance(1.0)
        timer.mark(busy=busy)
    timer.new_period()
    clock.advance(100.0)  # the epoch boundary: not a step
    timer.mark(busy=False)
    clock.advance(2.0)
    timer.mark(busy=False)
    assert timer.finish(times) == 3
    assert sorted(times.idle.values()) == [1.0, 2.0]
    assert times.busy.values() == [1.0]


# ---- growth --------------------------------------------------------------------------------------


def test_growth_series_rates_per_hour_and_per_epoch() -> None:
    series = GrowthSeries()
    for i in range(10):  # 1 epoch every 6 minutes, +3 MB per epoch -> 30 MB/hour
        series.add(t=1000.0 + 360.0 * i, epoch=float(i + 1), value=(500 + 3 * i) * MB)
    per_hour, per_epoch = series.mb_per_hour(), series.mb_per_epoch()
    assert per_hour is not None
    assert per_epoch is not None
    assert per_hour.slope == pytest.approx(30.0)
    assert per_epoch.slope == pytest.approx(3.0)
    assert series.judged_mb_per_hour() == pytest.approx(30.0)


def test_flat_memory_with_allocator_steps_is_not_growth() -> None:
    # Fast epochs make any wobble a huge MB/hour rate; the rise floor keeps it from alerting.
    series = GrowthSeries()
    for i in range(12):
        series.add(t=0.1 * i, epoch=float(i), value=(400 + (1.0 if i >= 6 else 0.0)) * MB)
    fit = series.mb_per_hour()
    assert fit is not None
    assert fit.slope > 10.0  # as a raw rate, this would "violate" a 10 MB/h limit
    assert fit.rise < MIN_GROWTH_MB
    assert math.isnan(series.judged_mb_per_hour())


def test_growth_needs_a_few_readings() -> None:
    series = GrowthSeries()
    for i in range(3):
        series.add(t=float(i), epoch=float(i), value=100 * i * MB)
    assert math.isnan(series.judged_mb_per_hour())
    series.add(t=3.0, epoch=3.0, value=300 * MB)
    assert series.judged_mb_per_hour() > 0


def test_growth_series_thins_itself_but_spans_the_run() -> None:
    series = GrowthSeries(maxlen=8)
    for i in range(100):
        series.add(t=float(i), epoch=float(i), value=float(i) * MB)
    assert len(series) <= 8
    assert series.t[0] == 0.0
    assert series.t[-1] == 99.0
    fit = series.mb_per_hour()
    assert fit is not None
    assert fit.slope == pytest.approx(3600.0)


def test_growth_series_rejects_bad_maxlen() -> None:
    with pytest.raises(ValueError, match=r"`maxlen` must be an even int >= 4, got 5"):
        GrowthSeries(maxlen=5)


def test_unknown_epoch_positions_leave_per_epoch_unmeasured() -> None:
    series = GrowthSeries()
    for i in range(5):
        series.add(t=float(i), epoch=math.nan, value=float(i))
    assert series.mb_per_epoch() is None
    assert series.mb_per_hour() is not None


# ---- alerts --------------------------------------------------------------------------------------


def test_alert_book_reports_each_kind_once_and_counts_every_violation() -> None:
    book = AlertBook()
    assert book.check("lag", 0.05, 0.1, t=0.0, step=1) is None
    first = book.check("lag", 0.3, 0.1, t=1.0, step=2, epoch=0)
    assert first is not None
    assert (first.kind, first.value, first.threshold, first.step) == ("lag", 0.3, 0.1, 2)
    assert "measured 0.3 > threshold 0.1" in first.message()
    assert book.check("lag", 0.5, 0.1, t=2.0, step=3) is None
    assert book.check("rate", 0.5, 0.05, t=2.0, step=3) is not None
    assert book.violations == {"lag": 2, "rate": 1}
    assert book.worst["lag"] == 0.5
    assert [a.kind for a in book.alerts] == ["lag", "rate"]


@pytest.mark.parametrize(
    ("value", "threshold", "judged"),
    [(None, 0.1, None), (math.nan, 0.1, None), (0.5, None, None), (0.5, math.inf, None), (0.5, 0.1, 0.05)],
)
def test_unmeasured_figures_and_judged_bounds_do_not_alert(
    value: float | None, threshold: float | None, judged: float | None
) -> None:
    book = AlertBook()
    assert book.check("x", value, threshold, t=0.0, step=0, judged=judged) is None
    assert book.alerts == []


def test_alert_carries_the_point_estimate_while_judged_on_the_bound() -> None:
    alert = AlertBook().check("step_slowdown", 0.30, 0.02, t=0.0, step=5, judged=0.21)
    assert alert is not None
    assert alert.value == 0.30


def test_alert_book_state_round_trip_keeps_a_resumed_run_quiet() -> None:
    book = AlertBook()
    book.check("lag", 0.3, 0.1, t=1.0, step=2)
    restored = AlertBook()
    restored.load_state_dict(book.state_dict())
    assert restored.alerts == book.alerts
    assert restored.check("lag", 0.4, 0.1, t=9.0, step=20) is None
    assert restored.violations["lag"] == 2


@pytest.mark.parametrize("module", ["sla", "steptimer", "memory", "figures"])
def test_docstring_examples_run(module: str) -> None:
    import doctest
    import importlib

    mod = importlib.import_module(f"lightning_evalguard.engine.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
