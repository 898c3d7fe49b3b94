"""GuardedEvaluation under real DDP (gloo, 2 CPU processes), run as a script: inside pytest,
Lightning's DDP launcher would re-launch pytest itself on rank 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "scripts" / "ddp_evaluation.py"


@pytest.mark.slow
def test_rank_zero_evaluates_and_every_rank_sees_the_same_results(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[2]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    zero, one = ranks
    # Only rank 0 evaluated...
    assert zero["stats"]["completed"] == 3
    assert one["stats"]["submitted"] == 0
    # ...yet both ranks delivered every result, at the same hooks, with identical values.
    assert zero["stats"]["delivered"] == one["stats"]["delivered"] == 3
    assert zero["seen"] == one["seen"]
    assert zero["final"] == one["final"]
    assert "val/loss" in zero["final"]
    # 128 samples, 16 per batch, split over 2 ranks: 4 steps per epoch, the last snapshot at step 12.
    assert zero["final"]["evalguard/snapshot_step"] == 12
    assert "val/loss" in zero["seen"][1]["metrics"]  # results arrive while training goes on
    assert zero["limit_val_batches"] == one["limit_val_batches"] == 1.0  # restored after fit
