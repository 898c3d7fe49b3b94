"""The README's main job (`evalguard demo`) and examples/faults.py, run the way a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_evalguard.testing import find_wandb_runs, read_wandb_run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_demo_trains_logs_to_wandb_offline_and_writes_the_report_and_picture(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run([sys.executable, "-m", "lightning_evalguard", "demo", "--epochs", "2", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "evalguard demo: 2 epochs" in text
    assert "evaluations completed" in text
    lines = dict(line.split(":", 1) for line in text.splitlines() if line.startswith(("report", "timeline", "W&B")))
    report = Path(lines["report"].strip())
    picture = Path(lines["timeline picture"].strip())
    assert report.is_file()
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run_file = read_wandb_run(find_wandb_runs(out)[0])
    assert run_file.complete
    assert len(run_file.series("val/acc")) == 2
    assert run_file.series("train/loss")  # aggregated by BufferedLogging's mean:5 rule


def test_faults_example_contains_a_hang_and_a_segfault(tmp_path: Path) -> None:
    proc = run([sys.executable, str(ROOT / "examples" / "faults.py"), "--out", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "both faults contained" in proc.stdout
    assert "timed out after 2s" in proc.stdout
    assert "SIGSEGV" in proc.stdout
