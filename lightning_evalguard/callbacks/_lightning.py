"""Small Lightning-facing helpers shared by the callbacks (private).

They touch a few of Lightning's private attributes; each one is named here, once, so a Lightning
upgrade that moves them breaks in one place.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["HookTimer", "resolve_callable", "trainer_val_dataloaders"]


def resolve_callable(value: Any, parameter: str) -> Callable[..., Any] | None:
    """Turn an import path (``"pkg.mod:fn"`` or ``"pkg.mod.fn"``) into the callable it names.

    Raises:
        TypeError: ``value`` is neither ``None``, a callable nor a string.
        ValueError: the path cannot be imported or does not name a callable.
    """
    if value is None or callable(value):
        return value
    if not isinstance(value, str):
        raise TypeError(f"`{parameter}` must be a callable or an import path string, got {value!r}")
    module_name, sep, attr = value.partition(":")
    if not sep:
        module_name, _, attr = value.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"`{parameter}` must look like 'package.module:function', got {value!r}")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"`{parameter}`={value!r} could not be imported: {exc}") from exc
    if not callable(obj):
        raise ValueError(f"`{parameter}`={value!r} names {type(obj).__name__}, which is not callable")
    return obj


def trainer_val_dataloaders(trainer: Any) -> list[Any]:
    """The validation dataloaders ``fit`` was given (arguments, datamodule or module), flattened.

    Unlike Lightning's own loop these are not re-wrapped with a distributed sampler: evaluation on
    rank 0 sees the whole validation set, as a single-process run would.
    """
    from lightning.pytorch.utilities.combined_loader import CombinedLoader

    source = trainer.fit_loop.epoch_loop.val_loop._data_source  # Lightning private: _DataLoaderSource
    if not source.is_defined():
        return []
    loaders = source.dataloader()
    if loaders is None:
        return []
    combined = loaders if isinstance(loaders, CombinedLoader) else CombinedLoader(loaders, "sequential")
    return [dl for dl in combined.flattened if dl is not None]


class HookTimer:
    """Seconds spent in a callback's own hooks on the training thread (for the monitor)."""

    __slots__ = ("calls", "seconds")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def add(self, seconds: float) -> None:
        """Count one hook call that took ``seconds`` (for hot hooks, cheaper than the context manager)."""
        self.seconds += seconds
        self.calls += 1

    @contextmanager
    def __call__(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1
