"""The JSON report and `evalguard report`: summary table and timeline PNG from a real run's report."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import Trainer

from lightning_evalguard import GuardedEvaluation, PerformanceMonitor, ResourceCleanup
from lightning_evalguard.cli import main
from lightning_evalguard.report import (
    SCHEMA,
    TimelineRecorder,
    draw_timeline,
    json_safe,
    load_report,
    summary_table,
    write_report,
)
from lightning_evalguard.testing import LeakingCallback
from tests.models import SlowValidation, make_loader

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def real_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real run: evaluation in a background thread, cleanups, and a leak that trips an alert."""
    out = tmp_path_factory.mktemp("run")
    path = out / "report.json"
    leak = LeakingCallback(bytes_per_step=1 << 20)
    trainer = Trainer(
        max_epochs=6,
        callbacks=[
            GuardedEvaluation(mode="stream", every_n_epochs=1, timeout=60.0),
            ResourceCleanup(every_n_epochs=1, gc_generation=1),
            leak,
            PerformanceMonitor(warmup_steps=4, log_every_n_steps=2, on_violation="log", report_path=str(path)),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out,
    )
    try:
        trainer.fit(SlowValidation(delay=0.01), make_loader(128), [make_loader(32, seed=1)])
    finally:
        leak.release()
    return path


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# ---- the report of a real run --------------------------------------------------------------------


def test_a_real_report_holds_config_figures_alerts_and_a_timeline(real_report: Path) -> None:
    report = load_report(real_report)
    assert report["schema"] == SCHEMA
    assert report["status"] == "completed"
    assert report["timing"] == "clock"
    assert report["config"]["warmup_steps"] == 4
    assert report["figures"]["steps"] == 6 * 8
    f = report["figures"]
    assert f["eval_submitted"] + f["eval_skipped"] == 6  # one may be skipped while another runs
    assert f["eval_completed"] == f["eval_submitted"] >= 2
    # the leak must alert; on a tiny model the real hook overhead and contention may alert too
    assert "memory_growth" in {a["kind"] for a in report["alerts"]}
    timeline = report["timeline"]
    assert sum(b["steps"] for b in timeline["steps"]) == 6 * 8
    kinds = [e["kind"] for e in timeline["events"]]
    assert kinds.count("eval_end") == f["eval_completed"]
    assert kinds.count("cleanup") >= 6
    assert "alert" in kinds
    times = [e["t"] for e in timeline["events"]]
    assert times == sorted(times)
    assert all(report["t0"] <= m["t"] for m in timeline["memory"])
    assert {"GuardedEvaluation", "ResourceCleanup"} <= {c["class"] for c in report["callbacks"].values()}
    json.loads(real_report.read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN/Infinity


def test_evalguard_report_prints_a_table_and_draws_a_png(
    real_report: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "timeline.png"
    assert main(["report", str(real_report), "-o", str(png)]) == 0
    out = capsys.readouterr().out
    assert "evalguard report: completed" in out
    assert "evaluation latency p95" in out
    assert "ALERT memory_growth" in out
    assert f"timeline written to {png}" in out
    width, height = png_size(png)
    assert (width, height) == (1100, 850)
    assert png.stat().st_size > 20_000  # drawn, not blank


def test_default_png_goes_next_to_the_report(real_report: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run.json"
    copy.write_text(real_report.read_text())
    assert main(["report", str(copy)]) == 0
    assert png_size(tmp_path / "run_timeline.png") == (1100, 850)


def test_a_file_that_is_not_a_report_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"hello": 1}))
    assert main(["report", str(bad)]) == 2
    assert "is not an evalguard report" in capsys.readouterr().err
    bad.write_text("{not json")
    assert main(["report", str(bad)]) == 2
    assert "is not JSON" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err


# ---- the pieces ----------------------------------------------------------------------------------


def minimal_report(**overrides: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "status": "failed",
        "error": "SLAViolation: SLA 'hook_overhead' violated",
        "t0": 100.0,
        "timing": "clock",
        "figures": {"steps": 40, "step_slowdown": math.nan, "hook_overhead": 0.09, "host_rss_mb": 512.25},
        "thresholds": {"step_slowdown": 0.02, "hook_overhead": 0.02},
        "alerts": [{"kind": "hook_overhead", "value": 0.09, "threshold": 0.02, "t": 101.0, "step": 20, "epoch": 1}],
        "timeline": {"steps": [], "memory": [], "events": [], "events_dropped": 0},
    }
    report.update(overrides)
    return report


def test_summary_table_marks_alerts_and_unmeasured_figures() -> None:
    text = summary_table(json_safe(minimal_report()))
    lines = text.splitlines()
    assert lines[0] == "evalguard report: failed, timing from clock"
    (slowdown,) = [line for line in lines if line.startswith("step slowdown")]
    assert slowdown.split()[-2:] == ["2.00%", "ok"]
    assert " - " in slowdown
    (overhead,) = [line for line in lines if line.startswith("evalguard hook overhead")]
    assert overhead.split()[-3:] == ["9.00%", "2.00%", "ALERT"]
    assert "ALERT hook_overhead: 0.09 > 0.02 at step 20 (epoch 1)" in lines
    assert lines[-1] == "run ended with: SLAViolation: SLA 'hook_overhead' violated"
    assert "host RSS" in text
    assert "512.2 MB" in text
    assert "evaluation latency p95" not in text  # figures absent from the report are not listed


def test_an_empty_timeline_still_draws(tmp_path: Path) -> None:
    path = draw_timeline(minimal_report(), tmp_path / "empty.png")
    assert png_size(Path(path)) == (1100, 850)


def test_eval_jobs_without_a_start_event_and_still_running_are_drawn(tmp_path: Path) -> None:
    events = [
        {"t": 101.0, "source": "evaluation", "kind": "eval_end", "job": 1, "outcome": "timeout", "latency_s": 0.5},
        {"t": 102.0, "source": "evaluation", "kind": "eval_start", "job": 2},
        {"t": 102.5, "source": "evaluation", "kind": "eval_skipped", "reason": "queue_full"},
        {"t": 103.0, "source": "logging", "kind": "flush", "rows": 3, "ok": False},
        {"t": 103.5, "source": "logging", "kind": "spill"},
    ]
    timeline = {"steps": [{"t0": 100.0, "t1": 104.0, "steps": 40, "busy_steps": 10, "step": 0, "epoch": 0}]}
    report = minimal_report(timeline={**timeline, "memory": [], "events": events, "events_dropped": 0})
    assert png_size(Path(draw_timeline(report, tmp_path / "t.png"))) == (1100, 850)


def test_write_report_is_strict_json_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "r.json"
    write_report(path, minimal_report(figures={"x": math.inf, "y": [math.nan, 1.0]}))
    data = json.loads(path.read_text())
    assert data["figures"] == {"x": None, "y": [None, 1.0]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary left behind


def test_timeline_recorder_stays_bounded_but_spans_the_run() -> None:
    rec = TimelineRecorder(max_points=8, max_events=3)
    for i in range(100):
        rec.step_batch(t0=float(i), t1=i + 1.0, steps=2, busy_steps=1, step=2 * i, epoch=0)
        rec.memory_reading(t=float(i), host_rss_mb=1.0)
    rec.add_events({"t": float(i), "source": "x", "kind": "k"} for i in range(5))
    data = rec.to_dict()
    assert len(data["steps"]) <= 8
    assert sum(b["steps"] for b in data["steps"]) == 200  # merged, never lost
    assert data["steps"][0]["t0"] == 0.0
    assert data["steps"][-1]["t1"] == 100.0
    assert len(data["memory"]) <= 8
    assert data["memory"][0]["t"] == 0.0
    assert (len(data["events"]), data["events_dropped"]) == (3, 2)
