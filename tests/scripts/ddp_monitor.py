"""Run by tests/callbacks/test_monitor.py: PerformanceMonitor(on_violation="raise") under real DDP.

Gloo backend, 2 CPU processes, a leak on every rank, fake time. Rank 0 measures and decides; the decision is
broadcast at the check, so both ranks must raise SLAViolation together: if only rank 0 raised, rank
1 would wait for ever in the next gradient all-reduce (faulthandler ends the run after 60 s).
Each rank writes OUT_DIR/rank{N}.json.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from lightning_evalguard import PerformanceMonitor, SLAViolation
from lightning_evalguard.engine.clock import FakeClock
from lightning_evalguard.testing import LeakingCallback, StepClock
from tests.models import TinyRegressor


def main(out_dir: str) -> None:
    faulthandler.dump_traceback_later(60, exit=True)
    seed_everything(0)
    clock = FakeClock()  # fake time: no figure but the leak can cross its threshold
    monitor = PerformanceMonitor(
        warmup_steps=4,
        log_every_n_steps=4,
        on_violation="raise",
        report_path=os.path.join(out_dir, "report.json"),
        clock=clock,
    )
    trainer = Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=8,
        callbacks=[StepClock(clock, 0.01), LeakingCallback(bytes_per_step=1 << 20), monitor],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    data = TensorDataset(torch.randn(512, 4), torch.randn(512, 1))
    raised: dict[str, Any] | None = None
    try:
        trainer.fit(TinyRegressor(), DataLoader(data, batch_size=16))
    except SLAViolation as exc:
        raised = {"kind": exc.kind, "value": exc.value, "threshold": exc.threshold}
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as fh:
        json.dump(
            {
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "raised": raised,
                "step": trainer.global_step,
                "report": monitor.last_report_path,
                "checks": monitor.stats()["checks"],
            },
            fh,
        )


if __name__ == "__main__":
    main(sys.argv[1])
