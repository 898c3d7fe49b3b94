"""Make docs/img/timeline.png from a real run: ``python docs/img/make_timeline.py [OUT_DIR]``.

A small CPU model trains for 8 epochs with all four evalguard callbacks, logging to a CSVLogger. Validation is slowed on
epoch 4 so that its job times out, and a callback leaks 512 KB per step so the memory alert fires.
The report is written to ``OUT_DIR/evalguard_report.json`` (default: a temporary directory), then
drawn exactly as ``evalguard report`` draws it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_evalguard import BufferedLogging, GuardedEvaluation, PerformanceMonitor, ResourceCleanup
from lightning_evalguard.report import draw_timeline, load_report, summary_table
from lightning_evalguard.testing import LeakingCallback


class Model(LightningModule):
    """An MLP whose validation takes 20 ms a batch, and 300 ms a batch on the snapshot of epoch 4."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(32, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 1),
        )
        self.register_buffer("epoch_seen", torch.zeros((), dtype=torch.long))

    def on_train_epoch_start(self) -> None:
        self.epoch_seen.fill_(self.current_epoch)  # travels with the snapshot

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        time.sleep(0.3 if int(self.epoch_seen) == 4 else 0.02)
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(n: int, seed: int) -> DataLoader:
    """Random regression data."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 32, generator=g), torch.randn(n, 1, generator=g)), batch_size=16)


def main() -> int:
    """Train, write the report, draw the picture next to this script."""
    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="evalguard_docs_")
    torch.set_num_threads(1)  # a shared machine: spinning intra-op threads would drown the picture in noise
    report_path = os.path.join(out, "evalguard_report.json")
    leak = LeakingCallback(bytes_per_step=512 * 1024)
    trainer = Trainer(
        max_epochs=8,
        callbacks=[
            GuardedEvaluation(mode="stream", every_n_epochs=1, timeout=0.5, cancel_grace=0.5),
            BufferedLogging(flush_interval=0.1),
            ResourceCleanup(every_n_epochs=1, gc_generation=1),
            leak,
            PerformanceMonitor(warmup_steps=20, log_every_n_steps=10, on_violation="log", report_path=report_path),
        ],
        logger=CSVLogger(out, name="run"),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out,
    )
    trainer.fit(Model(), loader(2048, 0), loader(64, 1))
    leak.release()
    report = load_report(report_path)
    print(summary_table(report))
    png = draw_timeline(report, os.path.join(os.path.dirname(os.path.abspath(__file__)), "timeline.png"))
    print(f"\nreport: {report_path}\npicture: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
