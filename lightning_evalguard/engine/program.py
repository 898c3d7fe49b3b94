"""What one evaluation job executes, whichever runner runs it.

:class:`EvalProgram` holds the dataloaders, the batch limits and an optional user ``eval_fn``. Its
:meth:`~EvalProgram.run` evaluates a module (the snapshot's shadow copy, never the live one):

- default: the module's own ``validation_step`` over every dataloader, in ``torch.inference_mode()``
  and ``eval()`` mode, with ``self.log`` bound to a :class:`~.collector.Collector`, and the module's
  ``on_validation_epoch_start`` / ``on_validation_batch_start`` / ``on_validation_batch_end`` /
  ``on_validation_epoch_end`` hooks called as Lightning calls them;
- ``eval_fn(module, dataloader) -> Mapping[str, float]`` once per dataloader (keys suffixed with
  ``/dataloader_idx_{i}`` when there are several); a coroutine function runs on the worker's own
  event loop (never the caller's, so it is safe in Jupyter).

The job is checked for cancellation between batches: dataloaders are wrapped so that even a custom
``eval_fn`` stops at the next batch once its job is cancelled, and stops at ``limit_batches``.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from numbers import Number
from typing import Any

from lightning_evalguard.engine.collector import Collected, Collector
from lightning_evalguard.engine.jobs import Job, JobCancelled
from lightning_evalguard.errors import EvalFailed

__all__ = ["EvalProgram", "batches_for", "validate_metrics"]

EvalFn = Callable[[Any, Any], Any]


def batches_for(dataloader: Any, limit: int | float | None) -> int | float:
    """How many batches to take from ``dataloader`` under ``limit`` (Lightning's semantics:
    an int is a count, a float in [0, 1] a fraction of ``len(dataloader)``)."""
    try:
        length: float = len(dataloader)
    except TypeError:
        length = math.inf
    if limit is None:
        return length
    if isinstance(limit, float):
        if math.isinf(length):
            return math.inf if limit > 0 else 0
        return int(length * limit)
    return min(length, limit)


class _Guarded(Iterable[Any]):
    """A dataloader that stops at its limit and raises at the next batch once the job is cancelled."""

    def __init__(self, dataloader: Any, limit: int | float, job: Job | None) -> None:
        self.dataloader = dataloader
        self.limit = limit
        self.job = job

    def __len__(self) -> int:
        length = len(self.dataloader)
        return length if math.isinf(self.limit) else min(length, int(self.limit))

    def __iter__(self) -> Iterator[Any]:
        if self.limit <= 0:
            return
        for i, batch in enumerate(self.dataloader):
            if self.job is not None:
                self.job.check()
            yield batch
            if i + 1 >= self.limit:
                return

    def __getattr__(self, name: str) -> Any:  # batch_size, dataset, ... for eval_fn code
        return getattr(self.dataloader, name)


def validate_metrics(result: Any, where: str) -> dict[str, float]:
    """Check an ``eval_fn`` result is a mapping of str to numbers; return it as floats."""
    if not isinstance(result, Mapping):
        raise EvalFailed(f"{where} returned {type(result).__name__}, expected a mapping of str to numbers")
    out: dict[str, float] = {}
    for key, value in result.items():
        if not isinstance(key, str):
            raise EvalFailed(f"{where} returned a non-string key {key!r}")
        try:
            import torch

            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
        except ImportError:  # pragma: no cover
            pass
        if isinstance(value, bool) or not isinstance(value, Number):
            raise EvalFailed(f"{where} returned a non-numeric value for {key!r}: {value!r}")
        out[key] = float(value)  # type: ignore[arg-type]
    return out


def _metrics_in(module: Any) -> list[Any]:
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover
        return []
    return [m for m in module.modules() if isinstance(m, Metric)]


def _module_device(module: Any) -> Any:
    device = getattr(module, "device", None)
    if device is not None:
        return device
    for tensor in module.parameters():
        return tensor.device
    return None


def _call_hook(module: Any, name: str, *args: Any) -> Any:
    hook = getattr(module, name, None)
    return hook(*args) if callable(hook) else None


class EvalProgram:
    """Dataloaders + limits + optional ``eval_fn``: everything a runner needs to evaluate a module.

    Args:
        dataloaders: the validation dataloaders (may be empty when ``eval_fn`` needs none).
        limit_batches: per-dataloader batch limit (int count or float fraction), ``None`` for all.
        eval_fn: replaces the module's ``validation_step``; called as ``eval_fn(module, dataloader)``.
    """

    def __init__(
        self,
        dataloaders: Sequence[Any],
        limit_batches: int | float | None = None,
        eval_fn: EvalFn | None = None,
    ) -> None:
        self.dataloaders = list(dataloaders)
        self.limit_batches = limit_batches
        self.eval_fn = eval_fn

    def guarded(self, job: Job | None) -> list[_Guarded]:
        """The dataloaders wrapped with their limits and the job's cancellation check."""
        return [_Guarded(dl, batches_for(dl, self.limit_batches), job) for dl in self.dataloaders]

    def run(self, module: Any, job: Job | None = None) -> Collected:
        """Evaluate ``module``; raises :class:`EvalFailed` for unusable results, and lets the
        module's own exceptions (and :class:`JobCancelled`) propagate."""
        import torch

        module.eval()
        with torch.inference_mode():
            if self.eval_fn is not None:
                return self._run_eval_fn(module, job)
            return self._run_validation(module, job)

    # -- default: the module's validation_step ---------------------------------------------------
    def _run_validation(self, module: Any, job: Job | None) -> Collected:
        if not callable(getattr(module, "validation_step", None)):
            raise EvalFailed(f"{type(module).__name__} has no validation_step and no eval_fn was given")
        for metric in _metrics_in(module):
            metric.reset()  # a cancelled job may have left state behind
            # Evaluation sees the whole validation set in one place: a torchmetrics sync would be a
            # collective from a background thread (a deadlock under DDP), so never sync.
            metric.sync_on_compute = False
            metric._to_sync = False
            metric.dist_sync_on_step = False
        loaders = self.guarded(job)
        collector = Collector(num_dataloaders=len(loaders))
        original = {name: module.__dict__.get(name) for name in ("log", "log_dict")}
        module.__dict__["log"] = collector.log
        module.__dict__["log_dict"] = collector.log_dict
        try:
            device = _module_device(module)
            multi = len(loaders) > 1
            _call_hook(module, "on_validation_epoch_start")
            for dl_idx, loader in enumerate(loaders):
                for batch_idx, batch in enumerate(loader):
                    if device is not None:
                        batch = _transfer(module, batch, device, dl_idx)
                    collector.set_batch(dl_idx, batch)
                    extra = (dl_idx,) if multi else ()
                    _call_hook(module, "on_validation_batch_start", batch, batch_idx, *extra)
                    outputs = module.validation_step(batch, batch_idx, *extra)
                    _call_hook(module, "on_validation_batch_end", outputs, batch, batch_idx, *extra)
            _call_hook(module, "on_validation_epoch_end")
            return collector.compute()
        finally:
            for name, value in original.items():
                if value is None:
                    module.__dict__.pop(name, None)
                else:
                    module.__dict__[name] = value

    # -- custom eval_fn ----------------------------------------------------------------------------
    def _run_eval_fn(self, module: Any, job: Job | None) -> Collected:
        assert self.eval_fn is not None
        loaders: list[Any] = list(self.guarded(job)) or [None]
        name = getattr(self.eval_fn, "__qualname__", repr(self.eval_fn))
        out = Collected()
        for idx, loader in enumerate(loaders):
            result = self.eval_fn(module, loader)
            if inspect.isawaitable(result):
                result = self._await(result, job)
            values = validate_metrics(result, f"eval_fn {name}")
            for key, value in values.items():
                full = f"{key}/dataloader_idx_{idx}" if len(loaders) > 1 else key
                out.values[full] = value
                out.logger_keys.add(full)
        return out

    def _await(self, awaitable: Any, job: Job | None) -> Any:
        """Run a coroutine on a private event loop of this job (never on a loop already running)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:  # e.g. the inline runner inside Jupyter: run it on a helper thread instead
            return _run_in_thread(awaitable)
        loop = asyncio.new_event_loop()
        try:
            return self._run_task(loop, awaitable, job)
        finally:
            loop.close()

    @staticmethod
    def _run_task(loop: asyncio.AbstractEventLoop, awaitable: Any, job: Job | None) -> Any:
        task = loop.create_task(_as_coroutine(awaitable))
        watcher = None
        if job is not None:
            def poll_cancel() -> None:
                if job.cancel_reason is not None:
                    task.cancel()
                else:
                    loop.call_later(0.02, poll_cancel)

            watcher = loop.call_soon(poll_cancel)
        try:
            return loop.run_until_complete(task)
        except asyncio.CancelledError:
            raise JobCancelled(job.cancel_reason if job is not None else "cancelled") from None
        finally:
            if watcher is not None:
                watcher.cancel()


async def _as_coroutine(awaitable: Any) -> Any:
    return await awaitable


def _run_in_thread(awaitable: Any) -> Any:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(_as_coroutine(awaitable))
        except BaseException as exc:  # re-raised on the calling thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="evalguard-eval-loop", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _transfer(module: Any, batch: Any, device: Any, dataloader_idx: int) -> Any:
    """Move a batch with the module's own hooks when it has them (as Lightning does)."""
    if hasattr(module, "transfer_batch_to_device"):
        batch = _call_hook(module, "on_before_batch_transfer", batch, dataloader_idx) if hasattr(
            module, "on_before_batch_transfer"
        ) else batch
        batch = module.transfer_batch_to_device(batch, device, dataloader_idx)
        if hasattr(module, "on_after_batch_transfer"):
            batch = module.on_after_batch_transfer(batch, dataloader_idx)
        return batch
    return _move(batch, device)


def _move(obj: Any, device: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_move(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(v, device) for v in obj)
    if isinstance(obj, Mapping):
        return type(obj)({k: _move(v, device) for k, v in obj.items()})  # type: ignore[call-arg]
    return obj
