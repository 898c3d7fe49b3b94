"""BufferedLogging: cheap, bounded and fault-tolerant metric logging through the trainer's loggers.

The callback is a thin adapter: at ``setup`` it puts a :class:`LoggerProxy` in front of each logger,
backed by a :class:`~lightning_evalguard.engine.buffer.LogPipeline` (rules, bounded buffer,
background flusher, retries, circuit breaker, spill and replay); at ``teardown`` / ``on_exception``
/ interpreter exit it flushes within ``flush_timeout``, spills the rest and puts the real loggers
back. See ``docs/buffered_logging.md`` for guarantees and failure behaviour.
"""

from __future__ import annotations

import atexit
import os
import re
import time
from typing import TYPE_CHECKING, Any, Literal

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from typing_extensions import override

from lightning_evalguard.callbacks._logging_proxy import HotPathTimer, LoggerProxy, LoggerSink
from lightning_evalguard.engine.breaker import STATE_CODES
from lightning_evalguard.engine.buffer import DROP_REASONS, LogConfig, LogPipeline, WarnOnce, quantile
from lightning_evalguard.engine.events import EventLog

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["BufferedLogging"]

_STATE_VERSION = 1
# Counters that add up across loggers and across a resume (everything else is recomputed).
_SUMMED = (
    "accepted", "delivered", "pending", "spilled", *(f"dropped_{r}" for r in DROP_REASONS), "replayed",
    "send_attempts", "failed_attempts", "retries", "calls_accepted", "calls_done", "calls_dropped",
    "calls_pending", "buffer_bytes", "buffer_peak_bytes", "abandoned_calls", "internal_errors", "logged",
    "sampled_out", "aggregated", "held_in_windows", "spill_backlog", "spill_write_errors",
)  # fmt: skip
# What goes to the loggers under evalguard/log/ every `stats_every_n_steps` steps.
_LOGGED_STATS = (
    "accepted", "delivered", "pending", "spilled", "dropped", "replayed", "failed_attempts", "retries",
    "breaker_state", "buffer_bytes", "flush_latency_p95_s", "hot_path_ns_p50", "logging_failure_rate",
)  # fmt: skip
_SEVERITY = {STATE_CODES["closed"]: 0, STATE_CODES["half_open"]: 1, STATE_CODES["open"]: 2}


class BufferedLogging(Callback):
    """Take metric logging off the training thread: sample, aggregate, buffer, flush in background.

    Each logger in ``trainer.loggers`` (or those named in ``loggers``) is replaced during the run by
    a proxy whose ``log_metrics`` only applies the rules and appends to a buffer bounded in bytes; a
    background thread sends the rows to the real logger in order, with retries, a circuit breaker
    and a spill file on disk for what the backend does not take. Nothing is lost without being
    counted: ``accepted == delivered + pending + spilled + sum(dropped_*)`` at every moment.

    Use ``Trainer(log_every_n_steps=1)`` with aggregating rules, so they see every value.

    Args:
        rules: glob pattern -> rule, first match wins (``"all"``, ``"drop"``, ``"every:N"``,
            ``"mean:N"``, ``"min:N"``, ``"max:N"``, ``"last:N"``). Default ``{"*": "all"}``.
        loggers: class names of the loggers to wrap (e.g. ``["WandbLogger"]``); ``None``: all.
        max_buffer_mb: bound on the memory held by rows waiting to be sent.
        when_full: what a full buffer does with a new row: ``"spill"`` the oldest rows to disk,
            ``"drop_oldest"``, ``"drop_newest"``, or ``"block"`` the training thread (at most
            ``flush_timeout``, then the row is dropped as ``newest``).
        flush_interval: seconds between background flushes (sooner when ``max_batch`` rows wait).
        max_batch: most rows sent per flush.
        flush_timeout: bound on any shutdown flush (teardown, exception, exit), in seconds.
        max_retries: retries of a failed send, with exponential backoff and jitter.
        retry_backoff: wait before the first retry, in seconds (doubles each retry).
        max_backoff: longest wait between retries, in seconds.
        send_timeout: a call into the logger running longer is abandoned (counted as
            ``dropped_abandoned``) and the flusher moves on.
        failure_threshold: failed sends in a row that open the circuit breaker.
        recovery_time: seconds the breaker stays open before a trial send.
        spill_dir: directory for spill files; default ``<logger log_dir or save_dir>/evalguard_spill``.
            Each logger spills into its own subdirectory.
        max_spill_mb: bound on the spill files not yet replayed, per logger.
        stats_every_n_steps: log this callback's figures under ``evalguard/log/`` every N training
            steps (0: never).

    Raises:
        ValueError: an argument out of range, or an invalid rule or pattern (quoted in the message).
        TypeError: an argument of the wrong type.

    Examples:
        >>> logging = BufferedLogging(rules={"train/*": "mean:10", "*": "all"}, max_buffer_mb=64)
        >>> logging.rules
        {'train/*': 'mean:10', '*': 'all'}
        >>> # Trainer(callbacks=[logging], logger=WandbLogger(...), log_every_n_steps=1)
    """

    def __init__(
        self,
        rules: dict[str, str] | None = None,
        loggers: list[str] | None = None,
        max_buffer_mb: float = 64.0,
        when_full: Literal["spill", "drop_oldest", "drop_newest", "block"] = "spill",
        flush_interval: float = 1.0,
        max_batch: int = 512,
        flush_timeout: float = 30.0,
        max_retries: int = 3,
        retry_backoff: float = 0.2,
        max_backoff: float = 10.0,
        send_timeout: float = 10.0,
        failure_threshold: int = 3,
        recovery_time: float = 30.0,
        spill_dir: str | None = None,
        max_spill_mb: float = 512.0,
        stats_every_n_steps: int = 500,
    ) -> None:
        if rules is not None and not isinstance(rules, dict):
            raise TypeError(f"`rules` must be a dict of glob pattern to rule, or None, got {rules!r}")
        if loggers is not None and (
            not isinstance(loggers, (list, tuple)) or not all(isinstance(n, str) and n for n in loggers)
        ):
            raise TypeError(f"`loggers` must be a list of logger class names, or None, got {loggers!r}")
        if isinstance(stats_every_n_steps, bool) or not isinstance(stats_every_n_steps, int) or stats_every_n_steps < 0:
            raise ValueError(f"`stats_every_n_steps` must be an int >= 0, got {stats_every_n_steps!r}")
        self.config = LogConfig(
            rules=rules, max_buffer_mb=max_buffer_mb, when_full=when_full, flush_interval=flush_interval,
            max_batch=max_batch, flush_timeout=flush_timeout, max_retries=max_retries,
            retry_backoff=retry_backoff, max_backoff=max_backoff, send_timeout=send_timeout,
            failure_threshold=failure_threshold, recovery_time=recovery_time, spill_dir=spill_dir,
            max_spill_mb=max_spill_mb,
        )  # fmt: skip
        self.rules = self.config.ruleset.as_dict()
        self.loggers = list(loggers) if loggers is not None else None
        self.stats_every_n_steps = stats_every_n_steps
        #: ``flush``, ``spill``, ``replay`` and ``send_failed`` events, for PerformanceMonitor.
        self.events = EventLog("logging")
        self._warn = WarnOnce()
        self._timer = HotPathTimer()
        self._proxies: list[LoggerProxy] = []
        self._base: dict[str, int | float] = {}  # totals of closed pipelines and of a resumed run
        self._latencies: list[float] = []  # flush latencies of closed pipelines (last few hundred)
        self._saved_breakers: dict[str, Any] = {}
        self._last_breaker_state = STATE_CODES["closed"]  # reported once the loggers are closed
        self._stats_step = -1
        self._trainer: pl.Trainer | None = None
        self._atexit_registered = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(rules=self.rules, loggers=self.loggers)

    # -- hooks -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        started = time.perf_counter_ns()
        try:
            if self._proxies or trainer.global_rank != 0:
                return  # already set up; on other ranks Lightning's loggers write nothing anyway
            wrapped: list[Logger] = []
            for index, logger in enumerate(trainer.loggers):
                if self._should_wrap(logger):
                    logger = self._wrap(logger, index, trainer)
                wrapped.append(logger)
            if self._proxies:
                trainer.loggers = wrapped
                self._trainer = trainer
                if not self._atexit_registered:
                    atexit.register(self._close)
                    self._atexit_registered = True
        finally:
            self._timer.add_hook(started)

    def _should_wrap(self, logger: Logger) -> bool:
        if isinstance(logger, LoggerProxy):
            return False  # another BufferedLogging already buffers this logger
        return self.loggers is None or type(logger).__name__ in self.loggers

    def _wrap(self, logger: Logger, index: int, trainer: pl.Trainer) -> LoggerProxy:
        slot = _slot(logger, index)
        base_dir = self.config.spill_dir
        if base_dir is None:
            root = logger.log_dir or logger.save_dir or trainer.default_root_dir
            base_dir = os.path.join(os.fspath(root), "evalguard_spill")
        meta = {"logger": type(logger).__name__, "name": _text(logger.name), "version": _text(logger.version)}
        pipeline = LogPipeline(
            self.config,
            LoggerSink(logger),
            spill_dir=os.path.join(base_dir, slot),
            spill_meta=meta,
            events=self.events,
            warn=self._warn,
            name=f"evalguard-log-flusher[{slot}]",
        )
        saved = self._saved_breakers.pop(slot, None)
        if saved is not None:
            pipeline.breaker.load_state_dict(saved)
        pipeline.start()
        proxy = LoggerProxy(logger, pipeline, self._timer, self._internal_error)
        self._proxies.append(proxy)
        return proxy

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._proxies:
            return
        started = time.perf_counter_ns()
        try:
            for proxy in self._proxies:
                proxy.pipeline.poll()
            step = trainer.global_step
            due = self.stats_every_n_steps and step % self.stats_every_n_steps == 0 and step > 0
            if due and step != self._stats_step:  # once per step, also with gradient accumulation
                self._stats_step = step
                self._log_stats(step)
        except Exception as exc:
            self._internal_error(exc)
        finally:
            self._timer.add_hook(started)

    def _log_stats(self, step: int) -> None:
        stats = self.stats()
        stats["dropped"] = sum(v for k, v in stats.items() if k.startswith("dropped_"))
        row = {f"evalguard/log/{key}": stats[key] for key in _LOGGED_STATS}
        for proxy in self._proxies:
            proxy.pipeline.log_direct(dict(row), step)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close(trainer)

    def _close(self, trainer: pl.Trainer | None = None) -> None:
        """Flush every logger within one ``flush_timeout``, spill the rest, join the threads and
        put the real loggers back. Idempotent; also the ``atexit`` hook."""
        started = time.perf_counter_ns()
        try:
            proxies, self._proxies = self._proxies, []
            if not proxies:
                return
            trainer = trainer or self._trainer
            step = getattr(trainer, "global_step", None)
            if self.stats_every_n_steps and step is not None:
                self._proxies = proxies  # so the final figures reach the loggers too
                try:
                    self._log_stats(step)
                except Exception as exc:
                    self._internal_error(exc)
                finally:
                    self._proxies = []
            self._last_breaker_state = STATE_CODES["closed"]
            deadline = time.monotonic() + self.config.flush_timeout
            for proxy in proxies:  # all drain at once; each close then waits on the same deadline
                proxy.pipeline.begin_close()
            for proxy in proxies:
                try:
                    proxy.pipeline.close(max(0.0, deadline - time.monotonic()))
                except Exception as exc:
                    self._internal_error(exc)
                self._absorb(proxy.pipeline)
            if trainer is not None:
                trainer.loggers = [
                    logger.wrapped if isinstance(logger, LoggerProxy) and logger in proxies else logger
                    for logger in trainer.loggers
                ]
            self._trainer = None
            if self._atexit_registered:
                atexit.unregister(self._close)
                self._atexit_registered = False
        finally:
            self._timer.add_hook(started)

    def _settle(self, timeout: float) -> None:
        """Flush every logger at once and wait up to ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        tickets = [(proxy.pipeline.flusher, proxy.pipeline.flusher.request_flush()) for proxy in self._proxies]
        for flusher, ticket in tickets:
            flusher.wait_flushed(ticket, max(0.0, deadline - time.monotonic()))

    def _absorb(self, pipeline: LogPipeline) -> None:
        """Fold a closed pipeline's counters into the running totals."""
        stats = pipeline.stats()
        for key in _SUMMED:
            self._base[key] = self._base.get(key, 0) + stats.get(key, 0)
        self._last_breaker_state = _worst(self._last_breaker_state, int(stats["breaker_state"]))
        self._latencies = (self._latencies + list(pipeline.flusher.latencies))[-256:]

    def _internal_error(self, exc: BaseException) -> None:
        self._base["internal_errors"] = self._base.get("internal_errors", 0) + 1
        self._warn("internal", f"BufferedLogging: unexpected error, logging continues: {exc!r}")

    # -- figures ---------------------------------------------------------------------------------
    def busy(self) -> bool:
        """True while a background flush is in flight (lock-free)."""
        return any(proxy.pipeline.busy() for proxy in self._proxies)

    def stats(self) -> dict[str, float | int]:
        """Counters and timings as plain numbers (see the class docs for the identity they keep).

        Keys: ``accepted, delivered, pending, spilled, dropped_<reason>`` (``invalid, oldest,
        newest, spill_failed, spill_full, abandoned, unconfirmed``), ``replayed, send_attempts,
        failed_attempts, retries, logging_failure_rate, breaker_state`` (the worst of the loggers:
        0 closed, 1 open, 2 half-open; after teardown, as it was at the end), ``buffer_bytes,
        buffer_peak_bytes, flush_latency_p95_s, flush_in_progress, hot_path_ns_p50, hook_time_s,
        hook_calls``, the calls queued (``calls_*``) and the sampler's (``logged, sampled_out,
        aggregated, held_in_windows``).
        """
        totals: dict[str, int | float] = {key: self._base.get(key, 0) for key in _SUMMED}
        worst = STATE_CODES["closed"] if self._proxies else self._last_breaker_state
        latencies = list(self._latencies)
        busy = False
        for proxy in list(self._proxies):
            pipeline = proxy.pipeline
            stats = pipeline.stats()
            for key in _SUMMED:
                totals[key] += stats.get(key, 0)
            worst = _worst(worst, int(stats["breaker_state"]))
            latencies.extend(pipeline.flusher.latencies)
            busy = busy or bool(stats["flush_in_progress"])
        attempts = totals["send_attempts"]
        totals["logging_failure_rate"] = totals["failed_attempts"] / attempts if attempts else 0.0
        totals["breaker_state"] = worst
        totals["flush_in_progress"] = int(busy)
        totals["flush_latency_p95_s"] = float(quantile(latencies, 0.95))
        totals["hot_path_ns_p50"] = int(quantile(self._timer.log_samples(), 0.5))
        totals["hook_time_s"] = self._timer.total_ns / 1e9
        totals["hook_calls"] = self._timer.calls
        totals["warnings"] = sum(self._warn.counts.values())
        return totals

    # -- checkpointing ---------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        """Counters and breaker states. Called as a checkpoint is written: it first waits (at most
        1 s, or ``flush_timeout`` if smaller) for a flush, so the counters it keeps are settled."""
        started = time.perf_counter_ns()
        try:
            self._settle(min(1.0, self.config.flush_timeout))
        finally:
            self._timer.add_hook(started)
        stats = self.stats()
        return {
            "version": _STATE_VERSION,
            "totals": {key: stats[key] for key in _SUMMED},
            "breakers": {_slot(p.wrapped, i): p.pipeline.breaker.state_dict() for i, p in enumerate(self._proxies)},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the counters of a previous run. Values it still held when the checkpoint was
        written cannot be followed from here: they are counted as ``dropped_unconfirmed``."""
        totals = dict(state_dict.get("totals", {}))
        pending = totals.pop("pending", 0)
        totals["dropped_unconfirmed"] = totals.get("dropped_unconfirmed", 0) + pending
        totals["calls_dropped"] = totals.get("calls_dropped", 0) + totals.pop("calls_pending", 0)
        for volatile in ("buffer_bytes", "held_in_windows", "spill_backlog"):
            totals.pop(volatile, None)
        for key, value in totals.items():
            if key in _SUMMED:
                self._base[key] = self._base.get(key, 0) + value
        breakers = dict(state_dict.get("breakers", {}))
        for index, proxy in enumerate(self._proxies):
            saved = breakers.pop(_slot(proxy.wrapped, index), None)
            if saved is not None:
                proxy.pipeline.breaker.load_state_dict(saved)
        self._saved_breakers.update(breakers)


def _worst(a: int, b: int) -> int:
    """The more severe of two breaker state codes (open, then half-open, then closed)."""
    return a if _SEVERITY[a] >= _SEVERITY[b] else b


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _slot(logger: Logger, index: int) -> str:
    """A stable, filesystem-safe name for a wrapped logger: its class and version (or position)."""
    version = _text(getattr(logger, "version", None)) or str(index)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{type(logger).__name__}-{version}")
