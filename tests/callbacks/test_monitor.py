"""PerformanceMonitor on real Trainer.fit runs of a tiny CPU model.

Where time matters the monitor and the injected load share a FakeClock that advances as steps run
(StepClock), so step-time figures are exact and no test waits on, or asserts on, the wall clock.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_evalguard import PerformanceMonitor, SLAViolation
from lightning_evalguard.callbacks._peers import log_to_loggers
from lightning_evalguard.engine.clock import FakeClock
from lightning_evalguard.engine.events import EventLog
from lightning_evalguard.errors import EvalGuardWarning
from lightning_evalguard.testing import BusyCallback, LeakingCallback, SlowHookCallback, StepClock
from tests.models import MemoryLogger

STEPS_PER_EPOCH = 16


class Tiny(LightningModule):
    def __init__(self, step_sleep_s: float = 0.0) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.step_sleep_s = step_sleep_s

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)  # stands in for device time; the GIL is released
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(tmp_path: Path, callbacks: list[Callback], epochs: int = 6, logger: Any = False, model: Any = None) -> Trainer:
    data = TensorDataset(torch.randn(4 * STEPS_PER_EPOCH, 4), torch.randn(4 * STEPS_PER_EPOCH, 1))
    trainer = Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(model or Tiny(), DataLoader(data, batch_size=4))
    return trainer


def monitor(tmp_path: Path, clock: FakeClock | None = None, **kwargs: Any) -> PerformanceMonitor:
    kwargs = {"warmup_steps": 8, "log_every_n_steps": 8, "report_path": str(tmp_path / "report.json"), **kwargs}
    return PerformanceMonitor(clock=clock, **kwargs)


def eg_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, EvalGuardWarning)]


# ---- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_step_slowdown": -0.1}, ValueError, r"`max_step_slowdown` must be a finite number >= 0, got -0.1"),
        ({"max_step_slowdown": "2%"}, TypeError, r"`max_step_slowdown` must be a number, got '2%'"),
        ({"max_logging_failure_rate": math.nan}, ValueError, r"`max_logging_failure_rate` .* got nan"),
        ({"max_memory_growth_mb_per_hour": True}, TypeError, r"`max_memory_growth_mb_per_hour` .* got True"),
        ({"max_scheduler_lag": math.inf}, ValueError, r"`max_scheduler_lag` .* got inf"),
        ({"max_eval_latency": 0}, ValueError, r"`max_eval_latency` must be a finite number > 0, got 0"),
        ({"max_eval_latency": "1s"}, TypeError, r"`max_eval_latency` must be a number or None, got '1s'"),
        ({"warmup_steps": -1}, ValueError, r"`warmup_steps` must be >= 0, got -1"),
        ({"warmup_steps": 2.0}, TypeError, r"`warmup_steps` must be an int, got 2.0"),
        ({"window": 5}, ValueError, r"`window` must be >= 10, got 5"),
        ({"on_violation": "ignore"}, ValueError, r"`on_violation` must be one of .*, got 'ignore'"),
        ({"report_path": 3}, TypeError, r"`report_path` must be a str path or None, got 3"),
        ({"log_every_n_steps": 0}, ValueError, r"`log_every_n_steps` must be >= 1, got 0"),
        ({"clock": object()}, TypeError, r"`clock` must have now\(\) and sleep\(\)"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        PerformanceMonitor(**kwargs)


def test_builds_from_a_lightningcli_style_config() -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PerformanceMonitor, "monitor")
    cfg = parser.parse_args(
        ["--monitor.max_step_slowdown=0.05", "--monitor.on_violation=raise", "--monitor.max_eval_latency=30"]
    )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    built = instantiate(cfg).monitor
    assert isinstance(built, PerformanceMonitor)
    assert (built.max_step_slowdown, built.on_violation, built.max_eval_latency) == (0.05, "raise", 30.0)
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_args(["--monitor.on_violation=shout"])


# ---- calibration: flat runs stay quiet -----------------------------------------------------------


def test_flat_run_on_fake_time_raises_no_alert_and_measures_exactly(tmp_path: Path) -> None:
    clock = FakeClock()
    mon = monitor(tmp_path, clock)
    log = MemoryLogger()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(tmp_path, [StepClock(clock, 0.010), BusyCallback(0.0, busy_epochs="odd", clock=clock), mon], logger=log)
    assert eg_warnings(record) == []
    assert mon.alerts == []
    f = mon.figures()
    assert f["steps"] == 6 * STEPS_PER_EPOCH
    assert f["measured_steps"] == 6 * (STEPS_PER_EPOCH - 1) - 8  # no warm-up, no period across epoch ends
    assert f["step_time_idle_p50_s"] == pytest.approx(0.010)
    assert f["step_time_busy_p50_s"] == pytest.approx(0.010)
    assert f["step_slowdown"] == pytest.approx(0.0, abs=1e-9)
    assert f["hook_overhead"] == 0.0  # nothing in evalguard hooks takes fake time
    assert f["busy_steps"] > 0
    # figures reach the loggers at a low rate, alerts never
    rates = log.values("evalguard/step_time_p50_s")
    assert 6 <= len(rates) <= 6 * 3 + 1
    assert not [k for _, row in log.rows for k in row if k.startswith("evalguard/alert/")]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "completed"
    assert report["alerts"] == []


def test_flat_run_on_the_real_clock_raises_no_alert(tmp_path: Path) -> None:
    # Real time, real scheduling noise: a model whose step takes ~10 ms and a busy flag that
    # alternates by epoch without any extra load. Nothing may alert. (With 3 ms steps the monitor's
    # own ~60 us per step measured 1.2 % on a quiet machine and 2.9 % on a loaded one: too close
    # to the 2 % hook-overhead threshold for a test.)
    mon = monitor(tmp_path, warmup_steps=16, log_every_n_steps=16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(tmp_path, [BusyCallback(0.0, busy_epochs="odd"), mon], epochs=6, model=Tiny(step_sleep_s=0.01))
    assert eg_warnings(record) == []
    assert mon.alerts == [], mon.figures()
    f = mon.figures()
    assert f["step_time_p50_s"] >= 0.01
    assert math.isfinite(f["step_slowdown"])
    assert 0.0 <= f["hook_overhead"] < 0.02


# ---- injected faults alert within a few epochs ---------------------------------------------------


def test_injected_slowdown_alerts_once(tmp_path: Path) -> None:
    clock = FakeClock()
    mon = monitor(tmp_path, clock)
    with pytest.warns(EvalGuardWarning, match="'step_slowdown' violated") as record:
        fit(tmp_path, [StepClock(clock, 0.010), BusyCallback(0.005, busy_epochs="odd", clock=clock), mon])
    assert len([w for w in record if "step_slowdown" in str(w.message)]) == 1
    (alert,) = mon.alerts
    assert alert.kind == "step_slowdown"
    assert alert.value == pytest.approx(0.5)
    assert alert.threshold == 0.02
    assert alert.epoch <= 2
    assert mon.figures()["hook_overhead"] == 0.0  # contention is not hook time


def test_injected_slow_hook_alerts_hook_overhead_once_not_per_step(tmp_path: Path) -> None:
    clock = FakeClock()
    mon = monitor(tmp_path, clock)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(tmp_path, [StepClock(clock, 0.010), SlowHookCallback(0.001, clock=clock), mon])
    assert len([m for m in eg_warnings(record) if "hook_overhead" in m]) == 1
    assert [a.kind for a in mon.alerts] == ["hook_overhead"]
    assert mon.alerts[0].value == pytest.approx(1 / 11, rel=0.01)  # 1 ms of every 11 ms step
    assert mon.alerts[0].epoch <= 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["violations"]["hook_overhead"] > 5  # still counted at every check after the first
    assert report["figures"]["hook_time_per_step_s"] == pytest.approx(0.001)


def test_injected_leak_alerts_memory_growth(tmp_path: Path) -> None:
    clock = FakeClock()
    mon = monitor(tmp_path, clock, on_violation="log")
    leak = LeakingCallback(bytes_per_step=1 << 20)
    try:
        fit(tmp_path, [StepClock(clock, 0.010), leak, mon], epochs=5)
    finally:
        leak.release()
    kinds = [a.kind for a in mon.alerts]
    assert kinds == ["memory_growth"], mon.alerts
    assert mon.alerts[0].epoch <= 3
    f = mon.figures()
    assert f["host_growth_mb_per_epoch"] == pytest.approx(STEPS_PER_EPOCH, rel=0.15)  # 1 MB per step
    assert f["host_growth_mb_per_hour"] > 10.0


def test_raise_stops_the_run_with_the_figure_and_writes_a_failed_report(tmp_path: Path) -> None:
    clock = FakeClock()
    mon = monitor(tmp_path, clock, on_violation="raise")
    leak = LeakingCallback(bytes_per_step=1 << 20)
    try:
        with pytest.raises(SLAViolation) as info:
            fit(tmp_path, [StepClock(clock, 0.010), leak, mon], epochs=8)
    finally:
        leak.release()
    assert info.value.kind == "memory_growth"
    assert info.value.threshold == 10.0
    assert info.value.value > 10.0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "failed"
    assert report["error"].startswith("SLAViolation")
    assert [a["kind"] for a in report["alerts"]] == ["memory_growth"]
    assert report["figures"]["steps"] < 8 * STEPS_PER_EPOCH


def test_log_mode_logs_a_message_and_the_alert_metric_but_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    mon = monitor(tmp_path, clock, on_violation="log")
    log = MemoryLogger()
    with warnings.catch_warnings(record=True) as record, caplog.at_level(logging.WARNING, "lightning_evalguard"):
        warnings.simplefilter("always")
        fit(tmp_path, [StepClock(clock, 0.010), SlowHookCallback(0.002, clock=clock), mon], logger=log)
    assert eg_warnings(record) == []
    assert len([r for r in caplog.records if "'hook_overhead' violated" in r.getMessage()]) == 1
    alert_values = log.values("evalguard/alert/hook_overhead")
    assert len(alert_values) > 3  # logged at each check while violated
    assert all(v == pytest.approx(2 / 12, rel=0.05) for v in alert_values)


# ---- other callbacks' figures --------------------------------------------------------------------


class GuardedEvaluation(Callback):
    """Stands in for the real one: the monitor matches it by class name and reads its stats()."""

    def __init__(self, clock: FakeClock) -> None:
        self.events = EventLog("evaluation", clock=clock)
        self.figures = {"latency_p50_s": 2.0, "latency_p95_s": 3.0, "watchdog_lag_p95_s": 0.5}

    def busy(self) -> bool:
        return False

    def release_buffers(self) -> int:
        return 0

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.events.emit("eval_start", job=trainer.current_epoch, step=trainer.global_step)
        self.events.emit("eval_end", job=trainer.current_epoch, outcome="ok", latency_s=0.0)

    def stats(self) -> dict[str, float | int]:
        return {
            "submitted": 5,
            "completed": 3,
            "failed": 1,
            "timed_out": 1,
            "cancelled": 0,
            "skipped_breaker_open": 2,
            "skipped_queue_full": 1,
            "pending": 1,
            "running": 1,
            **self.figures,
            "hook_time_s": 0.0,
            "hook_calls": 0,
        }


class BufferedLogging(Callback):
    def __init__(self, failure_rate: float) -> None:
        self.failure_rate = failure_rate

    def busy(self) -> bool:
        return False

    def stats(self) -> dict[str, float | int]:
        return {
            "accepted": 100,
            "delivered": 90,
            "pending": 4,
            "spilled": 3,
            "dropped_full": 2,
            "dropped_oldest": 1,
            "logging_failure_rate": self.failure_rate,
            "hook_time_s": 0.0,
            "hook_calls": 0,
        }


def test_reads_evaluation_and_logging_stats_and_alerts_on_them(tmp_path: Path) -> None:
    clock = FakeClock()
    mon = monitor(tmp_path, clock, max_eval_latency=1.0, on_violation="log")
    evaluation = GuardedEvaluation(clock)
    fit(tmp_path, [StepClock(clock, 0.01), evaluation, BufferedLogging(0.2), mon], epochs=3)
    f = mon.figures()
    assert f["eval_latency_p95_s"] == 3.0
    assert f["eval_queue_depth"] == 2
    assert f["eval_skipped"] == 3
    assert f["eval_timed_out"] == 1
    assert f["watchdog_lag_p95_s"] == 0.5
    assert f["logging_dropped"] == 3
    assert f["logging_accounting_gap"] == 0  # accepted == delivered + pending + spilled + dropped
    assert f["logging_failure_rate"] == 0.2
    assert {a.kind for a in mon.alerts} == {"eval_latency", "scheduler_lag", "logging_failure_rate"}
    report = json.loads((tmp_path / "report.json").read_text())
    kinds = [e["kind"] for e in report["timeline"]["events"] if e["source"] == "evaluation"]
    assert kinds == ["eval_start", "eval_end"] * 3
    assert report["callbacks"]["GuardedEvaluation"]["stats"]["latency_p95_s"] == 3.0


def test_without_other_callbacks_their_figures_are_unmeasured_not_zero(tmp_path: Path) -> None:
    clock = FakeClock()
    mon = monitor(tmp_path, clock)
    fit(tmp_path, [StepClock(clock, 0.01), mon], epochs=2)
    f = mon.figures()
    assert math.isnan(f["eval_latency_p95_s"])
    assert math.isnan(f["logging_failure_rate"])
    assert math.isnan(f["step_slowdown"])  # nothing was ever busy
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["figures"]["eval_latency_p95_s"] is None  # strict JSON: no NaN


class FirstJobAllocates(Callback):
    """An evaluation look-alike whose first job, ending at epoch 0's end, allocates 32 MB for good."""

    def __init__(self) -> None:
        self.kept: list[bytes] = []
        self.completed = 0

    def release_buffers(self) -> int:
        return 0

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.kept:
            self.kept.append(b"\x01" * (32 << 20))
        self.completed += 1

    def stats(self) -> dict[str, float | int]:
        return {"submitted": self.completed, "completed": self.completed, "hook_time_s": 0.0}


def test_the_first_evaluations_one_off_allocation_is_not_growth(tmp_path: Path) -> None:
    clock = FakeClock()
    mon = monitor(tmp_path, clock, warmup_steps=4)
    evaluation = FirstJobAllocates()
    try:
        fit(tmp_path, [StepClock(clock, 0.01), evaluation, mon], epochs=6)
    finally:
        evaluation.kept.clear()
    assert mon.alerts == []
    assert abs(mon.figures()["host_growth_mb_per_epoch"]) < 2  # the 32 MB step is not in the series


# ---- lifecycle -----------------------------------------------------------------------------------


class Explode(Callback):
    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == 20:
            raise RuntimeError("boom")


def test_a_failed_run_still_gets_its_report(tmp_path: Path) -> None:
    clock = FakeClock()
    mon = monitor(tmp_path, clock)
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, [StepClock(clock, 0.01), mon, Explode()])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "failed"
    assert report["error"] == "RuntimeError: boom"
    assert sum(b["steps"] for b in report["timeline"]["steps"]) == 20
    assert mon.last_report_path == str(tmp_path / "report.json")


def test_default_report_path_is_the_loggers_log_dir(tmp_path: Path) -> None:
    mon = PerformanceMonitor(warmup_steps=0, log_every_n_steps=8, on_violation="log")
    logger = CSVLogger(tmp_path, name="run")
    fit(tmp_path, [mon], epochs=1, logger=logger)
    assert mon.last_report_path == str(Path(logger.log_dir) / "evalguard_report.json")
    assert Path(mon.last_report_path).is_file()
    report = json.loads(Path(mon.last_report_path).read_text())
    assert report["timing"] == "clock"
    assert report["config"]["report_path"] == mon.last_report_path


def test_two_monitors_coexist(tmp_path: Path) -> None:
    clock = FakeClock()
    a = PerformanceMonitor(clock=clock, warmup_steps=4, report_path=str(tmp_path / "a.json"))
    b = PerformanceMonitor(clock=clock, warmup_steps=4, report_path=str(tmp_path / "b.json"), on_violation="log")
    assert a.state_key != b.state_key
    trainer = fit(tmp_path, [StepClock(clock, 0.01), a, b], epochs=2)
    assert (tmp_path / "a.json").is_file()
    assert (tmp_path / "b.json").is_file()
    assert a.figures()["steps"] == b.figures()["steps"] == 2 * STEPS_PER_EPOCH
    ckpt = tmp_path / "c.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    assert a.state_key in saved
    assert b.state_key in saved


def test_a_resumed_run_does_not_warn_again_for_an_alert_it_already_raised(tmp_path: Path) -> None:
    clock = FakeClock()
    first = monitor(tmp_path, clock)
    with pytest.warns(EvalGuardWarning):
        fit(tmp_path, [StepClock(clock, 0.010), SlowHookCallback(0.001, clock=clock), first], epochs=2)
    second = monitor(tmp_path, clock)
    second.load_state_dict(first.state_dict())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(tmp_path, [StepClock(clock, 0.010), SlowHookCallback(0.001, clock=clock), second], epochs=2)
    assert eg_warnings(record) == []
    assert [a.kind for a in second.alerts] == ["hook_overhead"]


def test_figures_are_logged_from_global_rank_zero_only() -> None:
    class Rank:
        global_step = 7
        loggers = [MemoryLogger()]

        def __init__(self, zero: bool) -> None:
            self.is_global_zero = zero

    errors: list[BaseException] = []
    other, zero = Rank(False), Rank(True)
    log_to_loggers(other, {"evalguard/x": 1.0}, errors.append)
    log_to_loggers(zero, {"evalguard/x": 1.0, "evalguard/nan": math.nan}, errors.append)
    assert other.loggers[0].rows == [(7, {"evalguard/x": 1.0})]  # one shared logger list: zero's row only
    assert errors == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_times_come_from_events(tmp_path: Path) -> None:
    mon = PerformanceMonitor(warmup_steps=4, log_every_n_steps=8, report_path=str(tmp_path / "r.json"))
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        max_epochs=3,
        callbacks=[BusyCallback(0.0), mon],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(Tiny(), DataLoader(data, batch_size=4))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["timing"] == "cuda_events"
    f = mon.figures()
    assert f["measured_steps"] == 3 * (STEPS_PER_EPOCH - 1) - 4  # no period across epoch ends
    assert f["step_time_p50_s"] > 0
    assert math.isfinite(f["cuda_allocated_mb"])


@pytest.mark.slow
def test_raise_under_ddp_stops_every_rank_together(tmp_path: Path) -> None:
    # A script, as Lightning's DDP launcher would re-launch pytest itself on rank 1.
    script = Path(__file__).parent.parent / "scripts" / "ddp_monitor.py"
    env = {**os.environ, "PYTHONPATH": str(script.parents[2]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero["world_size"] == 2
    assert zero["raised"]["kind"] == one["raised"]["kind"] == "memory_growth"
    assert zero["raised"] == one["raised"]  # rank 1 raises rank 0's figure: it measures nothing itself
    assert zero["step"] == one["step"] < 8 * 16
    assert zero["checks"] > 0
    assert one["checks"] == 0
    assert zero["report"] == str(tmp_path / "report.json")
    assert one["report"] is None
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "failed"
    assert [a["kind"] for a in report["alerts"]] == ["memory_growth"]


@pytest.mark.parametrize(
    "target",
    [
        "lightning_evalguard.callbacks.monitor:PerformanceMonitor",
        "lightning_evalguard.report",
        "lightning_evalguard.testing:LeakingCallback",
        "lightning_evalguard.testing:SlowHookCallback",
        "lightning_evalguard.testing:BusyCallback",
        "lightning_evalguard.testing:StepClock",
    ],
)
def test_docstring_examples_run(target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import doctest
    import importlib

    module_name, _, attr = target.partition(":")
    obj = importlib.import_module(module_name)
    if attr:
        obj = getattr(obj, attr)
    monkeypatch.chdir(tmp_path)
    results = [doctest.DocTestRunner().run(t) for t in doctest.DocTestFinder().find(obj)]
    assert sum(r.attempted for r in results) > 0
    assert sum(r.failed for r in results) == 0


# ---- all four together ---------------------------------------------------------------------------


def test_all_four_callbacks_in_one_fit(tmp_path: Path) -> None:
    from lightning_evalguard import BufferedLogging, GuardedEvaluation, ResourceCleanup
    from tests.models import SlowValidation, make_loader

    guard = GuardedEvaluation(mode="stream", every_n_epochs=1, timeout=60.0)
    buffered = BufferedLogging(flush_interval=0.05, spill_dir=str(tmp_path / "spill"))
    cleanup = ResourceCleanup(every_n_epochs=1, gc_generation=1)
    cleanup.evaluation_cleanup_min_steps = 1
    cleanup.poll_every_n_steps = 1  # jobs run back to back here: notice each end at the next step
    mon = PerformanceMonitor(
        warmup_steps=4, log_every_n_steps=4, on_violation="log", report_path=str(tmp_path / "report.json")
    )
    rows = MemoryLogger()
    trainer = Trainer(
        max_epochs=4,
        callbacks=[guard, buffered, cleanup, mon],
        logger=rows,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(SlowValidation(delay=0.01), make_loader(128), [make_loader(32, seed=1)])

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "completed"
    classes = {c["class"] for c in report["callbacks"].values()}
    assert {"GuardedEvaluation", "BufferedLogging", "ResourceCleanup"} <= classes
    f = report["figures"]
    # an evaluation still running at the next epoch end may make one skip (max_pending=1, "skip")
    assert f["eval_submitted"] + f["eval_skipped"] == 4
    assert f["eval_completed"] == f["eval_submitted"] >= 2
    assert f["eval_latency_p95_s"] > 0
    assert f["logging_accepted"] > 0
    assert f["logging_accounting_gap"] == 0
    assert f["logging_failure_rate"] == 0
    assert f["hook_time_s"] > 0  # every callback's own hook time, summed
    # no leak here: the first evaluation's one-off allocations must not read as memory growth
    assert not {"memory_growth", "cuda_memory_growth"} & {a["kind"] for a in report["alerts"]}
    kinds = {e["kind"] for e in report["timeline"]["events"]}
    assert {"eval_start", "eval_end", "flush", "cleanup"} <= kinds
    # a job that ended before the last few steps was followed by a cleanup (on a loaded machine all
    # of them may end only after training, in GuardedEvaluation's final wait)
    last_steps_start = report["timeline"]["steps"][-1]["t0"]
    ends = [e["t"] for e in report["timeline"]["events"] if e["kind"] == "eval_end"]
    if any(t < last_steps_start for t in ends):
        assert cleanup.stats()["evaluation_cleanups"] >= 1
    # the monitor's own figures went through BufferedLogging's proxy to the real logger
    assert rows.rows_with("evalguard/step_time_p50_s")
    assert rows.rows_with("evalguard/mem/host_rss_mb")  # ResourceCleanup's
    assert rows.rows_with("val/loss")  # GuardedEvaluation's results
    assert buffered.stats()["pending"] == 0
