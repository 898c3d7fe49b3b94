"""engine.figures: PerformanceMonitor's figures and verdicts from plain inputs. No Trainer."""

from __future__ import annotations

import math

import pytest

from lightning_evalguard.engine.figures import (
    ALERT_FIGURES,
    evaluation_figures,
    judge,
    logging_figures,
    memory_figures,
    step_figures,
)
from lightning_evalguard.engine.memory import MemoryReading
from lightning_evalguard.engine.sla import MB, AlertBook, GrowthSeries, StepTimes


def test_evaluation_counts_add_up_and_latencies_take_the_worst() -> None:
    f = evaluation_figures(
        [
            {"submitted": 4, "completed": 2, "timed_out": 1, "skipped_queue_full": 2, "pending": 1, "running": 1},
            {"submitted": 1, "completed": 1, "skipped_breaker_open": 3, "latency_p95_s": 7.0},
            {"latency_p95_s": 2.0, "watchdog_lag_p95_s": math.nan},
        ]
    )
    assert (f["eval_submitted"], f["eval_completed"], f["eval_timed_out"]) == (5, 3, 1)
    assert f["eval_skipped"] == 5
    assert f["eval_queue_depth"] == 2
    assert f["eval_latency_p95_s"] == 7.0
    assert math.isnan(f["watchdog_lag_p95_s"])  # nothing finite to report


def test_without_the_callback_everything_is_unmeasured() -> None:
    assert all(math.isnan(v) for v in evaluation_figures([]).values())
    assert all(math.isnan(v) for v in logging_figures([]).values())


def test_logging_accounting_gap_shows_rows_nobody_counted() -> None:
    row = {"accepted": 100, "delivered": 90, "pending": 4, "spilled": 3, "dropped_oldest": 2, "dropped_invalid": 1}
    assert logging_figures([row])["logging_accounting_gap"] == 0
    assert logging_figures([row])["logging_dropped"] == 3
    assert logging_figures([{**row, "accepted": 105}])["logging_accounting_gap"] == 5
    assert logging_figures([row, {**row, "logging_failure_rate": 0.2}])["logging_failure_rate"] == 0.2


def test_step_figures_before_and_after_enough_samples() -> None:
    times = StepTimes(window=100)
    assert math.isnan(step_figures(times, 10)["step_slowdown"])
    for _ in range(20):
        times.add(0.010, busy=False)
    for _ in range(10):
        times.add(0.015, busy=True)
    f = step_figures(times, 10)
    assert f["step_slowdown"] == pytest.approx(0.5)
    assert f["step_time_idle_p50_s"] == 0.010
    assert (f["measured_steps"], f["busy_steps"]) == (30, 10)


def test_memory_figures_report_the_judged_rate_next_to_the_raw_one() -> None:
    host, cuda = GrowthSeries(), GrowthSeries()
    for i in range(6):
        host.add(t=3600.0 * i, epoch=float(i), value=(100 + 20 * i) * MB)  # 20 MB/hour, steady
    f = memory_figures(MemoryReading(200 * int(MB)), host, cuda)
    assert f["host_rss_mb"] == 200
    assert f["host_growth_mb_per_hour"] == pytest.approx(20.0)
    assert f["host_growth_judged_mb_per_hour"] == pytest.approx(20.0)
    assert math.isnan(f["cuda_growth_mb_per_hour"])


def test_judge_uses_the_judged_figure_and_reports_the_measured_one() -> None:
    book = AlertBook()
    figures = {
        "step_slowdown": 0.30,
        "step_slowdown_lower": 0.01,  # too noisy to call
        "host_growth_mb_per_hour": 5000.0,
        "host_growth_judged_mb_per_hour": math.nan,  # a wobble, not a rise
        "watchdog_lag_p95_s": 0.5,
    }
    limits = {"step_slowdown": 0.02, "memory_growth": 10.0, "scheduler_lag": 0.1}
    new, active = judge(book, figures, limits, t=1.0, step=10, epoch=2)
    assert [a.kind for a in new] == ["scheduler_lag"]
    assert active == {"scheduler_lag": 0.5}
    figures["step_slowdown_lower"] = 0.2
    new, active = judge(book, figures, limits, t=2.0, step=20)
    assert [(a.kind, a.value) for a in new] == [("step_slowdown", 0.30)]
    assert active == {"step_slowdown": 0.30, "scheduler_lag": 0.5}
    assert book.violations == {"scheduler_lag": 2, "step_slowdown": 1}


def test_every_alert_kind_names_a_figure_the_functions_produce() -> None:
    times = StepTimes(window=10)
    produced = {
        *step_figures(times, 10),
        *evaluation_figures([{}]),
        *logging_figures([{}]),
        *memory_figures(MemoryReading(1), GrowthSeries(), GrowthSeries()),
        "hook_overhead",  # computed by the callback from hook times
    }
    for figure, judged in ALERT_FIGURES.values():
        assert figure in produced
        assert judged is None or judged in produced
