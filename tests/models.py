"""Small, deterministic Lightning modules and data for the tests (CPU, a few ms per step)."""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
import torchmetrics
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, TensorDataset

N_FEATURES, N_CLASSES = 8, 3


def make_loader(n: int = 64, batch_size: int = 16, seed: int = 0, shuffle: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # learnable, 3 classes
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


class Classifier(LightningModule):
    """Logs a float, a tensor and torchmetrics Accuracy objects (one per dataloader)."""

    def __init__(self, lr: float = 0.1, num_val_loaders: int = 2) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(torch.nn.Linear(N_FEATURES, 16), torch.nn.ReLU(), torch.nn.Linear(16, N_CLASSES))
        self.bn = torch.nn.BatchNorm1d(N_FEATURES)  # a buffer that changes in training
        self.val_acc = torch.nn.ModuleList(
            torchmetrics.Accuracy(task="multiclass", num_classes=N_CLASSES) for _ in range(num_val_loaders)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.bn(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        logits = self(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        self.log("val/loss", loss)  # a tensor, batch-size weighted mean
        self.log("val/first_logit", float(logits[0, 0]))  # a float
        self.val_acc[dataloader_idx](logits, y)
        self.log("val/acc", self.val_acc[dataloader_idx])  # a Metric object: compute() at epoch end

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class SlowValidation(Classifier):
    """validation_step sleeps ``delay`` seconds per batch (releases the GIL like real compute)."""

    def __init__(self, delay: float = 0.05, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.delay = delay

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        time.sleep(self.delay)
        super().validation_step(batch, batch_idx, dataloader_idx)


class HangAtEpoch(Classifier):
    """validation_step loops in Python (sleep 10 ms at a time) for ever on one epoch's snapshot."""

    def __init__(self, hang_epoch: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hang_epoch = hang_epoch
        self.register_buffer("epoch_seen", torch.zeros((), dtype=torch.long))

    def on_train_epoch_start(self) -> None:
        self.epoch_seen.fill_(self.current_epoch)  # travels with the snapshot

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        while int(self.epoch_seen) == self.hang_epoch:
            time.sleep(0.01)
        super().validation_step(batch, batch_idx, dataloader_idx)


class StuckInCall(Classifier):
    """validation_step blocks in one long C call (an Event wait) until ``release`` is set."""

    release = threading.Event()

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        type(self).release.wait(60)
        super().validation_step(batch, batch_idx, dataloader_idx)


class Raising(Classifier):
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        raise RuntimeError("validation exploded")


class TinyRegressor(LightningModule):
    """One linear layer, no validation: the cheapest real training loop (4 inputs, 1 target)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class MemoryLogger(Logger):
    """A complete in-memory Lightning logger: every ``log_metrics`` call is kept, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []
        self.hparams: list[Any] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.hparams.append(params)

    def rows_with(self, key: str) -> list[tuple[int | None, dict[str, float]]]:
        return [(step, row) for step, row in self.rows if key in row]

    def values(self, key: str) -> list[float]:
        return [row[key] for _, row in self.rows if key in row]


def mean_logit_eval(module: torch.nn.Module, dataloader: Any) -> dict[str, float]:
    """An ``eval_fn`` (importable as ``tests.models:mean_logit_eval``)."""
    total, count = 0.0, 0
    for x, _ in dataloader:
        total += float(module(x).mean()) * len(x)
        count += len(x)
    return {"custom/mean_logit": total / count}


async def async_mean_logit_eval(module: torch.nn.Module, dataloader: Any) -> dict[str, float]:
    """The same, as a coroutine function."""
    import asyncio

    await asyncio.sleep(0)
    return mean_logit_eval(module, dataloader)
