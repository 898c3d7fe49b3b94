"""A stand-in for ``LightningModule.log`` / ``log_dict`` on the evaluation copy of a module.

While a job runs, the shadow module's ``log`` and ``log_dict`` are bound to a :class:`Collector`,
so a ``validation_step`` written for Lightning runs unchanged. Values are reduced over the epoch the
way Lightning reduces validation logs (``on_epoch=True``):

- ``reduce_fx="mean"`` (default): mean weighted by batch size (``batch_size=`` or inferred from the
  batch like Lightning: the first dimension of the first tensor found);
- ``"sum"``, ``"max"``, ``"min"``: plain reductions over the logged values;
- a torchmetrics ``Metric`` object: ``compute()`` at the end of the epoch, then ``reset()``;
- with several dataloaders, keys get Lightning's ``/dataloader_idx_{i}`` suffix.

Examples:
    >>> c = Collector(num_dataloaders=1)
    >>> c.set_batch(dataloader_idx=0, batch_size=2); c.log("val/loss", 1.0)
    >>> c.set_batch(dataloader_idx=0, batch_size=6); c.log("val/loss", 3.0)
    >>> c.compute().values
    {'val/loss': 2.5}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from numbers import Number
from typing import Any

__all__ = ["Collected", "Collector", "infer_batch_size"]

_REDUCE_ALIASES = {"mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min"}


def _reduce_name(reduce_fx: Any) -> str:
    if isinstance(reduce_fx, str):
        name = _REDUCE_ALIASES.get(reduce_fx.lower())
    else:  # torch.mean / torch.sum / torch.max / torch.min, like Lightning accepts
        name = _REDUCE_ALIASES.get(getattr(reduce_fx, "__name__", ""))
    if name is None:
        raise ValueError(f"`reduce_fx` must be one of 'mean', 'sum', 'max', 'min', got {reduce_fx!r}")
    return name


def infer_batch_size(batch: Any) -> int:
    """Batch size as Lightning infers it: dim 0 of the first tensor found (1 for a 0-d tensor)."""
    import torch

    def walk(obj: Any) -> Iterable[int]:
        if isinstance(obj, torch.Tensor):
            yield 1 if obj.ndim == 0 else int(obj.size(0))
        elif isinstance(obj, (str, bytes)):
            yield len(obj)
        elif isinstance(obj, Mapping):
            for value in obj.values():
                yield from walk(value)
        elif isinstance(obj, Iterable):
            for value in obj:
                yield from walk(value)

    for size in walk(batch):
        return size
    return 1


def _is_metric(value: Any) -> bool:
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics is a dependency
        return False
    return isinstance(value, Metric)


def _to_float(name: str, value: Any) -> float:
    import torch

    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"`self.log({name!r}, value)` needs a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().reshape(()).item())
    if isinstance(value, (Number, bool)):
        return float(value)  # type: ignore[arg-type]
    raise TypeError(f"`self.log({name!r}, value)` needs a number, a scalar tensor or a Metric, got {type(value)!r}")


@dataclass
class _Acc:
    reduce: str
    logger: bool
    prog_bar: bool
    total: float = 0.0
    weight: float = 0.0
    metric: Any = None

    def add(self, value: float, batch_size: int) -> None:
        if self.reduce == "mean":
            self.total += value * batch_size
            self.weight += batch_size
        elif self.reduce == "sum":
            self.total += value
            self.weight = 1.0
        elif self.weight == 0.0:
            self.total, self.weight = value, 1.0
        elif self.reduce == "max":
            self.total = max(self.total, value)
        else:
            self.total = min(self.total, value)

    def value(self) -> float:
        if self.metric is not None:
            return _to_float("metric", self.metric.compute())
        if self.reduce == "mean":
            return self.total / self.weight if self.weight else math.nan
        return self.total


@dataclass
class Collected:
    """What one evaluation logged: reduced ``values`` and which keys go to loggers / the progress bar."""

    values: dict[str, float] = field(default_factory=dict)
    logger_keys: set[str] = field(default_factory=set)
    prog_bar_keys: set[str] = field(default_factory=set)


class Collector:
    """Collects ``self.log`` calls over one evaluation epoch and reduces them like Lightning.

    Args:
        num_dataloaders: how many dataloaders the epoch runs over (for the key suffix).
    """

    def __init__(self, num_dataloaders: int = 1) -> None:
        self.num_dataloaders = num_dataloaders
        self._acc: dict[str, _Acc] = {}
        self._dataloader_idx = 0
        self._batch: Any = None
        self._batch_size: int | None = None

    def set_batch(self, dataloader_idx: int, batch: Any = None, batch_size: int | None = None) -> None:
        """Tell the collector which batch the next ``log`` calls belong to."""
        self._dataloader_idx = dataloader_idx
        self._batch = batch
        self._batch_size = batch_size

    def _current_batch_size(self) -> int:
        if self._batch_size is None:
            self._batch_size = infer_batch_size(self._batch)
        return self._batch_size

    def log(
        self,
        name: str,
        value: Any,
        prog_bar: bool = False,
        logger: bool | None = None,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        reduce_fx: str | Callable[..., Any] = "mean",
        enable_graph: bool = False,
        sync_dist: bool = False,
        sync_dist_group: Any = None,
        add_dataloader_idx: bool = True,
        batch_size: int | None = None,
        metric_attribute: str | None = None,
        rank_zero_only: bool = False,
    ) -> None:
        """Same signature as ``LightningModule.log``; only the epoch-level result is kept."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"`self.log` needs a non-empty string name, got {name!r}")
        key = name
        if add_dataloader_idx and self.num_dataloaders > 1:
            key = f"{name}/dataloader_idx_{self._dataloader_idx}"
        reduce = _reduce_name(reduce_fx)
        acc = self._acc.get(key)
        if acc is None:
            acc = self._acc[key] = _Acc(reduce, logger=logger is not False, prog_bar=bool(prog_bar))
        if _is_metric(value):
            acc.metric = value  # computed (and reset) once, at the end of the epoch
            return
        acc.add(_to_float(name, value), batch_size if batch_size is not None else self._current_batch_size())

    def log_dict(self, dictionary: Mapping[str, Any], **kwargs: Any) -> None:
        """Same as ``LightningModule.log_dict``: ``log`` for every item (a MetricCollection works too)."""
        for name, value in dictionary.items():
            self.log(name, value, **kwargs)

    def compute(self) -> Collected:
        """Reduce everything logged; computes and resets the Metric objects that were logged."""
        out = Collected()
        for key, acc in self._acc.items():
            out.values[key] = acc.value()
            if acc.metric is not None:
                acc.metric.reset()
            if acc.logger:
                out.logger_keys.add(key)
            if acc.prog_bar:
                out.prog_bar_keys.add(key)
        return out
