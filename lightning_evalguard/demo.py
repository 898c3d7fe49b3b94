"""``evalguard demo``: train a small CNN on the bundled digits data with the evalguard callbacks.

Real data (1,797 handwritten digits shipped in the package), a real ``Trainer.fit``, a real
``WandbLogger`` in offline mode, and GuardedEvaluation running validation concurrently. At the end
it prints a summary of the figures and where the W&B offline run (and report) landed.

The CLI imports this module only when ``evalguard demo`` runs, so importing Lightning here costs
``evalguard --help`` nothing.

Examples:
    >>> images, labels = load_digits()
    >>> tuple(images.shape), int(labels.max())
    ((1797, 1, 8, 8), 9)
"""

from __future__ import annotations

import os
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchmetrics
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsClassifier", "DigitsDataModule", "load_digits", "run_demo"]


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled digits as ``(images, labels)``: float32 ``(N, 1, 8, 8)`` in [0, 1], int64 ``(N,)``."""
    with resources.files("lightning_evalguard.data").joinpath("digits.npz").open("rb") as fh:
        data = np.load(fh)
        images = torch.from_numpy(data["images"].astype("float32") / 16.0).unsqueeze(1)
        labels = torch.from_numpy(data["labels"].astype("int64"))
    return images, labels


class DigitsDataModule(LightningDataModule):
    """The bundled digits, split 80/20 into train and validation sets (fixed by ``seed``).

    Args:
        batch_size: training batch size.
        seed: seed of the split.
    """

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed

    def setup(self, stage: str) -> None:
        images, labels = load_digits()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        cut = int(0.8 * len(order))
        self.train_set = TensorDataset(images[order[:cut]], labels[order[:cut]])
        self.val_set = TensorDataset(images[order[cut:]], labels[order[cut:]])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class DigitsClassifier(LightningModule):
    """A small CNN for 8x8 digits: two 3x3 convolutions and a linear head.

    Args:
        lr: Adam learning rate.
    """

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(32 * 4 * 4, 10),
        )
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", torch.nn.functional.cross_entropy(logits, y), prog_bar=True)
        self.val_acc(logits, y)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digit_accuracy(module: torch.nn.Module, dataloader: Any) -> dict[str, float]:
    """An ``eval_fn`` for GuardedEvaluation: top-1 and top-2 accuracy (``lightning_evalguard.demo.digit_accuracy``)."""
    top1 = top2 = total = 0
    for x, y in dataloader:
        best = module(x).topk(2, dim=-1).indices
        top1 += int((best[:, 0] == y).sum())
        top2 += int((best == y[:, None]).any(dim=-1).sum())
        total += len(y)
    return {"top1": top1 / max(total, 1), "top2": top2 / max(total, 1)}


def _callbacks(mode: str, out: Path) -> list[Any]:
    from lightning_evalguard import BufferedLogging, GuardedEvaluation, PerformanceMonitor, ResourceCleanup

    return [
        GuardedEvaluation(mode=mode, every_n_epochs=1, timeout=120.0),  # type: ignore[arg-type]
        BufferedLogging(rules={"train/*": "mean:5", "*": "all"}, max_buffer_mb=16, spill_dir=str(out / "spill")),
        ResourceCleanup(every_n_epochs=1),
        PerformanceMonitor(on_violation="log", report_path=str(out / "evalguard_report.json")),
    ]


def run_demo(mode: str = "stream", epochs: int = 3, out: str = "evalguard_out") -> int:
    """Train the demo; returns the process exit code."""
    os.environ.setdefault("WANDB_SILENT", "true")
    import warnings

    import wandb
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import WandbLogger

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(0, verbose=False)
    callbacks = _callbacks(mode, out_dir)
    logger = WandbLogger(project="evalguard-demo", save_dir=str(out_dir), offline=True)
    trainer = Trainer(
        max_epochs=epochs, callbacks=list(callbacks), logger=logger, default_root_dir=str(out_dir),
        log_every_n_steps=1, enable_model_summary=False, enable_checkpointing=False,
    )
    start = time.perf_counter()
    run_dir = None
    try:
        trainer.fit(DigitsClassifier(), datamodule=DigitsDataModule())
    finally:
        if logger._experiment is not None:  # Lightning private: do not create a run just to name it
            run_dir = Path(logger.experiment.dir).parent
        wandb.finish()
    elapsed = time.perf_counter() - start
    print(summary(trainer, callbacks, elapsed))
    report_path = next((cb.last_report_path for cb in callbacks if hasattr(cb, "last_report_path")), None)
    picture = _draw(report_path)
    if run_dir is not None:
        print(f"W&B offline run:  {run_dir}")
    if report_path is not None:
        print(f"report:           {report_path}")
    if picture is not None:
        print(f"timeline picture: {picture}")
    return 0


def _draw(report_path: str | None) -> str | None:
    if report_path is None:
        return None
    try:
        from lightning_evalguard.report import draw_timeline, load_report

        return draw_timeline(load_report(report_path), str(Path(report_path).with_suffix("")) + "_timeline.png")
    except ImportError:
        print("(install 'lightning-evalguard[examples]' for matplotlib to draw the timeline picture)")
        return None


# (callback, stats key, label, format) rows of the summary table
_SUMMARY_ROWS = [
    ("GuardedEvaluation", "completed", "evaluations completed", "d"),
    ("GuardedEvaluation", "timed_out", "evaluations timed out", "d"),
    ("GuardedEvaluation", "failed", "evaluations failed", "d"),
    ("GuardedEvaluation", "skipped_queue_full", "evaluations skipped (queue full)", "d"),
    ("GuardedEvaluation", "latency_p50_s", "evaluation latency p50 (s)", ".3f"),
    ("GuardedEvaluation", "snapshot_copy_s", "snapshot copy on training thread (s)", ".6f"),
    ("BufferedLogging", "accepted", "values accepted for logging", "d"),
    ("BufferedLogging", "delivered", "values delivered to W&B", "d"),
    ("BufferedLogging", "spilled", "values spilled to disk", "d"),
    ("BufferedLogging", "hot_path_ns_p50", "log_metrics cost on training thread (ns, p50)", ".0f"),
    ("ResourceCleanup", "cleanups", "cleanups", "d"),
    ("PerformanceMonitor", "alerts", "SLA alerts", "d"),
]


def summary(trainer: Any, callbacks: list[Any], elapsed: float) -> str:
    """The table the demo prints at the end: validation metrics and each callback's key figures."""
    lines = [f"\nevalguard demo: {trainer.current_epoch} epochs, {trainer.global_step} steps in {elapsed:.1f}s"]
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    for key, value in sorted(metrics.items()):
        lines.append(f"  {key:<50}{value:>12.4f}")
    stats = {type(cb).__name__: cb.stats() for cb in callbacks}
    for name, key, label, fmt in _SUMMARY_ROWS:
        value = stats.get(name, {}).get(key)
        if value is not None:
            lines.append(f"  {label:<50}{format(int(value) if fmt == 'd' else value, fmt):>12}")
    return "\n".join(lines)
