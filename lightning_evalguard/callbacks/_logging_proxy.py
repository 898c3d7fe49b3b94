"""The logger proxy that :class:`~lightning_evalguard.BufferedLogging` puts in ``trainer.loggers``.

It implements Lightning's :class:`~lightning.pytorch.loggers.Logger` over a
:class:`~lightning_evalguard.engine.buffer.LogPipeline`:

- ``log_metrics`` goes to the pipeline (rules, bounded buffer, background flusher);
- ``log_hyperparams`` and every other ``log_*`` method of the real logger (``log_image``,
  ``log_table``, ``log_text``...) are queued behind the rows already logged, in order;
- everything else (``experiment``, ``name``, ``version``, ``save_dir``, ``log_dir``, ``watch``,
  ``log_graph``, ``after_save_checkpoint``, private attributes) is the real logger's, synchronously;
- it reports the real logger's class, so ``isinstance(trainer.logger, WandbLogger)`` and Lightning's
  own checks (``trainer.log_dir`` for TensorBoard/CSV loggers) behave as without the proxy.

After the pipeline is closed (teardown), the proxy passes every call straight to the real logger.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import Logger
from typing_extensions import override

from lightning_evalguard.engine.buffer import Call, LogPipeline, Row

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["LoggerProxy", "LoggerSink"]


class LoggerSink:
    """The flusher's view of a real Lightning logger (runs on the flusher thread)."""

    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def send_row(self, row: Row) -> None:
        self.logger.log_metrics(row.values, step=row.step)

    def send_call(self, call: Call) -> None:
        getattr(self.logger, call.name)(*call.args, **call.kwargs)

    def after_batch(self) -> None:
        # Lightning calls save() after each log_metrics; once per batch is the same for the logger.
        self.logger.save()


class HotPathTimer:
    """Time spent on the training thread, shared by a callback and its proxies."""

    SAMPLES = 4096  # power of two: the ring index is masked

    def __init__(self) -> None:
        self.total_ns = 0
        self.calls = 0
        self.log_ns = [0] * self.SAMPLES
        self.log_count = 0

    def add_hook(self, started_ns: int) -> None:
        self.total_ns += time.perf_counter_ns() - started_ns
        self.calls += 1

    def log_samples(self) -> list[int]:
        return self.log_ns[: min(self.log_count, self.SAMPLES)]


class LoggerProxy(Logger):
    """Stands in for ``logger`` in ``trainer.loggers`` while :class:`BufferedLogging` is set up.

    Args:
        logger: the real logger.
        pipeline: the buffer and flusher in front of it.
        timer: where time on the training thread is added up.
        on_error: called with an unexpected exception of the pipeline (never raised to the caller).
    """

    def __init__(
        self,
        logger: Logger,
        pipeline: LogPipeline,
        timer: HotPathTimer,
        on_error: Callable[[BaseException], None],
    ) -> None:
        super().__init__()
        self._evalguard_real = logger
        self._evalguard_pipeline = pipeline
        self._evalguard_timer = timer
        self._evalguard_on_error = on_error

    # -- identity --------------------------------------------------------------------------------
    @property
    def wrapped(self) -> Logger:
        """The real logger."""
        return self._evalguard_real

    @property
    def pipeline(self) -> LogPipeline:
        """The buffer and flusher in front of the real logger."""
        return self._evalguard_pipeline

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # isinstance() sees the real logger's class
        return type(self._evalguard_real)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # The proxy is transient: pickling it (spawn launchers, deepcopy) yields the real logger.
        return self._evalguard_real.__reduce_ex__(protocol)

    def __repr__(self) -> str:
        return f"BufferedLogging proxy of {self._evalguard_real!r}"

    # -- the hot path ----------------------------------------------------------------------------
    @override
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        started = time.perf_counter_ns()
        pipeline = self._evalguard_pipeline
        if pipeline.closed:
            self._evalguard_real.log_metrics(dict(metrics), step)
            return
        try:
            pipeline.log(metrics, step)
        except Exception as exc:  # never raise into training
            self._evalguard_on_error(exc)
        elapsed = time.perf_counter_ns() - started
        timer = self._evalguard_timer
        timer.total_ns += elapsed
        timer.calls += 1
        timer.log_ns[timer.log_count & (HotPathTimer.SAMPLES - 1)] = elapsed
        timer.log_count += 1

    # -- queued calls ----------------------------------------------------------------------------
    def _queue_call(self, name: str, *args: Any, **kwargs: Any) -> None:
        started = time.perf_counter_ns()
        pipeline = self._evalguard_pipeline
        if pipeline.closed:
            getattr(self._evalguard_real, name)(*args, **kwargs)
            return
        try:
            pipeline.call(name, args, kwargs)
        except Exception as exc:
            self._evalguard_on_error(exc)
        self._evalguard_timer.add_hook(started)

    @override
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self._queue_call("log_hyperparams", params, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the proxy does not define: they are the real logger's.
        if name.startswith("__") or name.startswith("_evalguard_"):
            raise AttributeError(name)
        real = self.__dict__.get("_evalguard_real")
        if real is None:
            raise AttributeError(name)
        value = getattr(real, name)
        if name.startswith("log_") and callable(value):
            return partial(self._queue_call, name)
        return value

    # -- synchronous, the real logger's ----------------------------------------------------------
    @property
    @override
    def name(self) -> str | None:
        return self._evalguard_real.name

    @property
    @override
    def version(self) -> int | str | None:
        return self._evalguard_real.version

    @property
    @override
    def save_dir(self) -> str | None:
        return self._evalguard_real.save_dir

    @property
    @override
    def log_dir(self) -> str | None:
        return self._evalguard_real.log_dir

    @property
    @override
    def root_dir(self) -> str | None:
        return self._evalguard_real.root_dir

    @property
    @override
    def group_separator(self) -> str:
        return self._evalguard_real.group_separator

    @property
    def experiment(self) -> Any:
        """The real logger's experiment (writes through it bypass the buffer and its ordering)."""
        return self._evalguard_real.experiment  # type: ignore[attr-defined]

    @override
    def log_graph(self, model: Any, input_array: Any = None) -> None:
        # Synchronous: tracing a graph runs the model, which must not race the training step.
        self._evalguard_real.log_graph(model, input_array)

    @override
    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        # Synchronous: loggers that upload checkpoints read files ModelCheckpoint may soon delete.
        self._evalguard_real.after_save_checkpoint(checkpoint_callback)

    @override
    def save(self) -> None:
        """No-op on the training thread: the flusher calls the real ``save()`` after each batch."""

    @override
    def finalize(self, status: str) -> None:
        """Flush what is buffered (within ``flush_timeout``), then finalize the real logger."""
        pipeline = self._evalguard_pipeline
        if not pipeline.closed:
            pipeline.flush(pipeline.config.flush_timeout)
        self._evalguard_real.finalize(status)
