"""Run by tests/callbacks/test_evaluation_ddp.py: real DDP, gloo backend, 2 CPU processes.

Each rank writes what it saw to OUT_DIR/rank{N}.json: the evaluation metrics in
callback_metrics at each epoch end, the callback's stats, and whether training threads other
than the main one ran any collective (they must not).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import EarlyStopping

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from lightning_evalguard import GuardedEvaluation
from tests.models import Classifier, make_loader


class Record(Callback):
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "evalguard/"))}
        self.seen.append({"epoch": trainer.current_epoch, "step": trainer.global_step, "metrics": metrics})


def main(out_dir: str) -> None:
    faulthandler.dump_traceback_later(40, exit=True)
    seed_everything(0)
    record = Record()
    guard = GuardedEvaluation(mode=os.environ.get("EVALGUARD_MODE", "stream"), timeout=60.0)
    trainer = Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=3,
        callbacks=[guard, record, EarlyStopping(monitor="val/loss", patience=10)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Classifier(num_val_loaders=1), make_loader(128, seed=3), make_loader(48, seed=1))
    rank = trainer.global_rank
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "evalguard/"))}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"rank": rank, "seen": record.seen, "final": final, "stats": guard.stats(),
                   "limit_val_batches": trainer.limit_val_batches, "world_size": trainer.world_size,
                   "threads": torch.get_num_threads()}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
