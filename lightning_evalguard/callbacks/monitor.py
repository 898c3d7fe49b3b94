"""PerformanceMonitor: measure what evalguard costs the training loop, check SLAs, write a report."""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_evalguard._version import __version__
from lightning_evalguard.callbacks._peers import (
    busy_peers,
    evaluation_peers,
    log_to_loggers,
    logging_peers,
    peer_name,
    read_stats,
    stats_peers,
    warn_once,
)
from lightning_evalguard.engine.clock import SYSTEM_CLOCK, Clock
from lightning_evalguard.engine.events import EventLog
from lightning_evalguard.engine.figures import evaluation_figures, judge, logging_figures, memory_figures, step_figures
from lightning_evalguard.engine.memory import MemoryReading, read_memory
from lightning_evalguard.engine.sla import MB, Alert, AlertBook, GrowthSeries, StepTimes
from lightning_evalguard.engine.steptimer import ClockStepTimer, CudaStepTimer, StepTimer
from lightning_evalguard.errors import EvalGuardWarning, SLAViolation
from lightning_evalguard.report import SCHEMA, TimelineRecorder, write_report

__all__ = ["PerformanceMonitor"]

_log = logging.getLogger("lightning_evalguard")
_MIN_SAMPLES = 10  # steps on each side before a slowdown or an overhead is judged
_ON_VIOLATION = ("warn", "log", "raise")
REPORT_NAME = "evalguard_report.json"


def _check_limit(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number or None" if optional else "a number"
        raise TypeError(f"`{name}` must be {kind}, got {value!r}")
    if not math.isfinite(value) or value < 0 or (optional and value == 0):
        bound = "> 0" if optional else ">= 0"
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value!r}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}")


class PerformanceMonitor(Callback):
    """Measure the cost of evalguard on the training loop, check the SLAs, and write a JSON report.

    Every ``log_every_n_steps`` training steps and at each epoch end it measures, on global rank 0:

    - step periods (end of one training step to the end of the next, from its own hooks; on CUDA
      from events read lazily, never a device sync), and the slowdown of steps run while any
      evalguard callback is ``busy()`` (an evaluation or a flush in flight) against steps run
      while none is;
    - the share of training time spent in evalguard's own hooks (the ``hook_time_s`` each
      callback's ``stats()`` reports, plus the monitor's own);
    - evaluation latency p50/p95, queue depth, skipped / timed-out / failed jobs and the watchdog's
      scheduling lag (from :class:`~lightning_evalguard.GuardedEvaluation`), and the logging
      failure rate and row accounting (from :class:`~lightning_evalguard.BufferedLogging`);
    - memory growth of host RSS and CUDA allocated memory, by least squares, in MB/hour and
      MB/epoch, leaving out the warm-up.

    It logs them under ``evalguard/`` to the trainer's loggers. A figure over its threshold is a
    violation: ``evalguard/alert/<kind>`` is logged while it lasts, and the first violation of each
    kind warns (``"warn"``), logs a message (``"log"``) or raises
    :class:`~lightning_evalguard.SLAViolation` (``"raise"``). Noisy figures are judged with margin:
    a slowdown alerts when the lower end of its ~95 % interval is over the threshold, a memory
    growth when the slope's lower bound is and the fitted rise exceeds a few MB.

    At the end of fit (or when fit fails) it writes the JSON report that ``evalguard report``
    turns into a timeline picture.

    Args:
        max_step_slowdown: limit on the slowdown of steps while work is in flight, and on the share
            of time in evalguard hooks (0.02 = 2 %).
        max_logging_failure_rate: limit on BufferedLogging's failed share of send attempts.
        max_memory_growth_mb_per_hour: limit on the growth of host RSS and of CUDA allocated memory.
        max_scheduler_lag: limit in seconds on the evaluation watchdog's p95 scheduling lag.
        max_eval_latency: limit in seconds on the p95 evaluation latency; ``None`` for no limit.
        warmup_steps: training steps left out of every figure at the start of each fit.
        window: most recent steps kept (of each kind, busy and idle) for step-time figures.
        on_violation: ``"warn"``, ``"log"`` or ``"raise"``.
        report_path: where the JSON report goes; ``None`` for ``evalguard_report.json`` in the
            trainer's log directory.
        log_every_n_steps: how often (in training steps) figures are measured, checked and logged.
        clock: time source; ``None`` for the monotonic clock (and CUDA events on a GPU). Tests pass
            a :class:`~lightning_evalguard.engine.clock.FakeClock`.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: a negative or non-finite limit, ``warmup_steps < 0``, ``window < 10``,
            ``log_every_n_steps < 1`` or an unknown ``on_violation``.

    Examples:
        >>> monitor = PerformanceMonitor(max_step_slowdown=0.05, on_violation="log", report_path="run.json")
        >>> monitor.thresholds()["step_slowdown"]
        0.05
    """

    def __init__(
        self,
        max_step_slowdown: float = 0.02,
        max_logging_failure_rate: float = 0.05,
        max_memory_growth_mb_per_hour: float = 10.0,
        max_scheduler_lag: float = 0.1,
        max_eval_latency: float | None = None,
        warmup_steps: int = 20,
        window: int = 200,
        on_violation: Literal["warn", "log", "raise"] = "warn",
        report_path: str | None = None,
        log_every_n_steps: int = 50,
        clock: Clock | None = None,
    ) -> None:
        super().__init__()
        _check_limit("max_step_slowdown", max_step_slowdown)
        _check_limit("max_logging_failure_rate", max_logging_failure_rate)
        _check_limit("max_memory_growth_mb_per_hour", max_memory_growth_mb_per_hour)
        _check_limit("max_scheduler_lag", max_scheduler_lag)
        _check_limit("max_eval_latency", max_eval_latency, optional=True)
        _check_int("warmup_steps", warmup_steps, 0)
        _check_int("window", window, _MIN_SAMPLES)
        _check_int("log_every_n_steps", log_every_n_steps, 1)
        if on_violation not in _ON_VIOLATION:
            raise ValueError(f"`on_violation` must be one of {_ON_VIOLATION}, got {on_violation!r}")
        if report_path is not None and not isinstance(report_path, (str, os.PathLike)):
            raise TypeError(f"`report_path` must be a str path or None, got {report_path!r}")
        if clock is not None and not isinstance(clock, Clock):
            raise TypeError(f"`clock` must have now() and sleep() (a Clock), got {clock!r}")
        self.max_step_slowdown = float(max_step_slowdown)
        self.max_logging_failure_rate = float(max_logging_failure_rate)
        self.max_memory_growth_mb_per_hour = float(max_memory_growth_mb_per_hour)
        self.max_scheduler_lag = float(max_scheduler_lag)
        self.max_eval_latency = None if max_eval_latency is None else float(max_eval_latency)
        self.warmup_steps = warmup_steps
        self.window = window
        self.on_violation = on_violation
        self.report_path = None if report_path is None else os.fspath(report_path)
        self.log_every_n_steps = log_every_n_steps
        self._state_key = self._generate_state_key(report_path=self.report_path, on_violation=self.on_violation)
        self._clock_given = clock is not None
        self._clock: Clock = clock if clock is not None else SYSTEM_CLOCK
        self._book = AlertBook()
        self._hook_time = 0.0
        self._hook_calls = 0
        self._reset_run()

    def _reset_run(self) -> None:
        """Everything measured within one fit."""
        self.events = EventLog("monitor", clock=self._clock)
        self._times = StepTimes(self.window)
        self._timer: StepTimer = ClockStepTimer(self._clock)
        self._host = GrowthSeries(maxlen=256)
        self._cuda = GrowthSeries(maxlen=256)
        self._timeline = TimelineRecorder()
        self._busy_peers: list[Any] = []
        self._stats_peers: list[Any] = []
        self._eval_peers: list[Any] = []
        self._log_peers: list[Any] = []
        self._cursors: dict[int, int] = {}
        self._peer_stats: dict[int, dict[str, float]] = {}
        self._warned: set[str] = set()
        self._device: int | None = None
        self._steps = 0
        self._checks = 0
        self._busy_in_step = False
        self._batch: dict[str, Any] | None = None
        self._last_end: float | None = None
        self._warm_t: float | None = None
        self._warm_hook_time = 0.0
        self._t0: float | None = None
        self._report_file: str | None = None
        self._report_written: str | None = None
        self._figures: dict[str, float] = {}
        self._active: dict[str, float] = {}
        self._memory_now = MemoryReading(0)
        self._batch_idx = 0
        self._last_reading_step = -1
        self._memory_started = False
        self._epoch_ends_since_warm = 0
        self._rank_zero = True

    @property
    @override
    def state_key(self) -> str:
        # Cached: Lightning reads it around every hook call, to name the profiler section.
        return self._state_key

    # -- public figures ------------------------------------------------------------------------
    def thresholds(self) -> dict[str, float]:
        """Alert kind -> limit (``eval_latency`` only when ``max_eval_latency`` is set)."""
        limits = {
            "step_slowdown": self.max_step_slowdown,
            "hook_overhead": self.max_step_slowdown,
            "logging_failure_rate": self.max_logging_failure_rate,
            "memory_growth": self.max_memory_growth_mb_per_hour,
            "cuda_memory_growth": self.max_memory_growth_mb_per_hour,
            "scheduler_lag": self.max_scheduler_lag,
        }
        if self.max_eval_latency is not None:
            limits["eval_latency"] = self.max_eval_latency
        return limits

    @property
    def alerts(self) -> list[Alert]:
        """The first violation of each kind, in order."""
        return list(self._book.alerts)

    @property
    def last_report_path(self) -> str | None:
        """Where the report of the last fit was written (``None`` before that, or off rank 0)."""
        return self._report_written

    def figures(self) -> dict[str, float]:
        """Every figure as of the last check (``nan`` where not measured yet)."""
        return dict(self._figures)

    def stats(self) -> dict[str, float | int]:
        """The monitor's own counters plus :meth:`figures` (plain numbers)."""
        out: dict[str, float | int] = dict(self._figures)
        out.update(
            checks=self._checks,
            alerts=len(self._book.alerts),
            events_dropped=self._timeline.events_dropped,
            hook_time_s=self._hook_time,
            hook_calls=self._hook_calls,
        )
        return out

    # -- hooks ---------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._reset_run()
        # trainer.log_dir is a collective under DDP: resolve it here, where every rank calls it.
        if self.report_path is not None:
            self._report_file = self.report_path
        else:
            directory = trainer.log_dir or trainer.default_root_dir
            self._report_file = os.path.join(directory, REPORT_NAME)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rank_zero = trainer.is_global_zero
        if not self._rank_zero:
            return
        start = self._clock.now()
        self._t0 = start
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        self._busy_peers = busy_peers(callbacks, exclude=self)
        self._stats_peers = stats_peers(callbacks, exclude=self)
        self._eval_peers = evaluation_peers(callbacks)
        self._log_peers = logging_peers(callbacks)
        device = pl_module.device
        if device.type == "cuda":
            self._device = device.index
            if not self._clock_given:
                self._timer = CudaStepTimer(device)
        self._cursors = {id(p): 0 for p in [*self._stats_peers, self]}
        self._read_memory(trainer, epoch_end=False)  # a first reading; also pays psutil's import now
        self.events.emit("fit_start", step=trainer.global_step, timing=self._timer.source)
        self._add_hook_time(start)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._rank_zero:
            return
        start = self._clock.now()
        if self._last_end is None:
            self._last_end = start  # first step of an epoch: its batch starts now
        if self._busy_peers:
            self._busy_in_step = self._any_busy()
        self._add_hook_time(start)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._rank_zero:
            self._steps += 1
            self._maybe_check(trainer)
            return
        start = self._clock.now()
        busy = self._busy_in_step or (bool(self._busy_peers) and self._any_busy())
        self._busy_in_step = False
        self._batch_idx = batch_idx
        self._steps += 1
        if self._steps > self.warmup_steps:
            self._timer.mark(busy=busy)
        if self._steps == self.warmup_steps or (self._steps == 1 and self.warmup_steps == 0):
            self._warm_t = start
            self._warm_hook_time = self._hook_time_total(refresh=True)
        self._add_to_batch(start, busy, trainer)
        self._add_hook_time(start)
        self._maybe_check(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._rank_zero:
            self._timer.new_period()  # the gap across an epoch boundary is not a step
        self._check(trainer, epoch_end=True)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._rank_zero:
            self._timer.finish(self._times)  # the one wait for the device, at the very end
        self._check(trainer, epoch_end=False)  # every rank: under "raise" it is a collective
        if self._rank_zero:
            self._write_report(trainer, status="completed")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._rank_zero and self._report_written is None and self._t0 is not None:
            self._write_report(trainer, status="completed")
        self._release()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._rank_zero and self._report_written is None and self._t0 is not None:
            status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
            try:
                self._write_report(trainer, status=status, error=exception)
            except Exception as exc:  # never mask the run's own exception
                _log.warning("PerformanceMonitor: could not write the report: %r", exc)
        self._release()

    def _release(self) -> None:
        self._busy_peers = self._stats_peers = self._eval_peers = self._log_peers = []
        self._timer = ClockStepTimer(self._clock)  # drops CUDA events

    # -- per step ------------------------------------------------------------------------------
    def _any_busy(self) -> bool:
        for peer in self._busy_peers:
            try:
                if peer.busy():
                    return True
            except Exception as exc:
                warn_once(self._warned, f"busy{id(peer)}", f"PerformanceMonitor: {peer!r}.busy() failed: {exc!r}")
        return False

    def _add_to_batch(self, now: float, busy: bool, trainer: pl.Trainer) -> None:
        batch = self._batch
        if batch is None:
            prev = self._last_end if self._last_end is not None else now
            batch = self._batch = {
                "t0": prev,
                "steps": 0,
                "busy_steps": 0,
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
            }
        batch["steps"] += 1
        batch["busy_steps"] += int(busy)
        batch["t1"] = now
        self._last_end = now

    def _flush_batch(self) -> None:
        if self._batch is not None and self._batch["steps"] > 0:
            b = self._batch
            self._timeline.step_batch(
                t0=b["t0"], t1=b["t1"], steps=b["steps"], busy_steps=b["busy_steps"], step=b["step"], epoch=b["epoch"]
            )
        self._batch = None

    def _add_hook_time(self, start: float) -> None:
        self._hook_time += self._clock.now() - start
        self._hook_calls += 1

    # -- checks --------------------------------------------------------------------------------
    def _maybe_check(self, trainer: pl.Trainer) -> None:
        # Counted in training batches on every rank alike, so all ranks reach the same checks.
        if self._steps % self.log_every_n_steps == 0:
            self._check(trainer, epoch_end=False)

    def _check(self, trainer: pl.Trainer, *, epoch_end: bool) -> None:
        if not self._rank_zero:
            self._decide(trainer, None)
            return
        start = self._clock.now()
        self._checks += 1
        self._timer.drain(self._times)
        self._flush_batch()
        if epoch_end:
            self._last_end = None
        for peer in self._stats_peers:
            self._peer_stats[id(peer)] = read_stats(peer, self._on_stats_error)
        self._collect_events()
        self._read_memory(trainer, epoch_end=epoch_end)
        self._figures = self._compute_figures()
        new = self._judge(trainer) if self._warm_t is not None else []
        metrics = {self._metric_name(k): v for k, v in self._figures.items()}
        metrics.update({f"evalguard/alert/{k}": v for k, v in self._active.items()})
        log_to_loggers(trainer, metrics, self._on_log_error)
        self._add_hook_time(start)
        self._decide(trainer, new[0] if new else None)

    def _collect_events(self) -> None:
        for peer in [*self._stats_peers, self]:
            log = getattr(peer, "events", None)
            if not isinstance(log, EventLog):
                continue
            cursor, events = log.since(self._cursors.get(id(peer), 0))
            self._cursors[id(peer)] = cursor
            self._timeline.add_events(e.as_dict() for e in events)

    def _read_memory(self, trainer: pl.Trainer, *, epoch_end: bool) -> None:
        reading = read_memory(self._device)
        self._memory_now = reading
        if trainer.global_step == self._last_reading_step and not epoch_end:
            # The check at fit end follows the last epoch end's at the same step, when Lightning has
            # already moved current_epoch on: a second point there would sit one epoch too far.
            return
        self._last_reading_step = trainer.global_step
        now = self._clock.now()
        batches = trainer.num_training_batches
        epoch = float(trainer.current_epoch)
        if epoch_end:
            epoch += 1.0
        elif math.isfinite(batches) and batches > 0:
            epoch += min(1.0, (self._batch_idx + 1) / batches)
        else:
            epoch = math.nan
        self._timeline.memory_reading(
            t=now,
            step=trainer.global_step,
            epoch=epoch,
            host_rss_mb=reading.host_rss / MB,
            cuda_allocated_mb=reading.cuda_allocated / MB,
            cuda_reserved_mb=reading.cuda_reserved / MB,
        )
        if self._memory_settled(epoch_end):
            self._host.add(t=now, epoch=epoch, value=reading.host_rss)
            if reading.cuda_allocated or len(self._cuda):
                self._cuda.add(t=now, epoch=epoch, value=reading.cuda_allocated)

    def _memory_settled(self, epoch_end: bool) -> bool:
        """Whether memory readings may count towards growth: after the warm-up and, with
        GuardedEvaluation, after its first job has ended (that job allocates its snapshot slot and
        shadow module once, which is not growth). If no job has been submitted two epoch ends
        after the warm-up, evaluation is rare and readings start anyway."""
        if self._memory_started or self._warm_t is None:
            return self._memory_started
        stats = [self._peer_stats.get(id(p), {}) for p in self._eval_peers]
        finished = sum(s.get(k, 0.0) for s in stats for k in ("completed", "failed", "timed_out", "cancelled"))
        submitted = sum(s.get("submitted", 0.0) for s in stats)
        self._epoch_ends_since_warm += int(epoch_end)
        self._memory_started = (
            not self._eval_peers or finished > 0 or (submitted == 0 and self._epoch_ends_since_warm >= 2)
        )
        return self._memory_started

    def _hook_time_total(self, refresh: bool = False) -> float:
        total = self._hook_time
        for peer in self._stats_peers:
            if refresh:
                self._peer_stats[id(peer)] = read_stats(peer, self._on_stats_error)
            total += self._peer_stats.get(id(peer), {}).get("hook_time_s", 0.0)
        return total

    def _compute_figures(self) -> dict[str, float]:
        f = {"steps": float(self._steps), **step_figures(self._times, _MIN_SAMPLES)}
        hook_total = self._hook_time_total()
        f["hook_time_s"] = hook_total
        f["hook_time_per_step_s"] = f["hook_overhead"] = math.nan
        if self._warm_t is not None and self._times.count >= _MIN_SAMPLES:
            elapsed = self._clock.now() - self._warm_t
            spent = hook_total - self._warm_hook_time
            f["hook_time_per_step_s"] = spent / max(1, self._steps - self.warmup_steps)
            f["hook_overhead"] = spent / elapsed if elapsed > 0 else math.nan
        f.update(evaluation_figures([self._peer_stats.get(id(p), {}) for p in self._eval_peers]))
        f.update(logging_figures([self._peer_stats.get(id(p), {}) for p in self._log_peers]))
        f.update(memory_figures(self._memory_now, self._host, self._cuda))
        return f

    def _judge(self, trainer: pl.Trainer) -> list[Alert]:
        limits = self.thresholds()
        new, self._active = judge(
            self._book,
            self._figures,
            limits,
            t=self._clock.now(),
            step=trainer.global_step,
            epoch=trainer.current_epoch,
        )
        for alert in new:
            self.events.emit("alert", sla=alert.kind, value=alert.value, threshold=alert.threshold, step=alert.step)
            self._announce(alert)
        return new

    def _announce(self, alert: Alert) -> None:
        if self.on_violation == "warn":
            rank_zero_warn(alert.message(), category=EvalGuardWarning)
        elif self.on_violation == "log":
            _log.warning(alert.message())

    def _decide(self, trainer: pl.Trainer, alert: Alert | None) -> None:
        """With ``on_violation="raise"``, raise the first new violation on every rank together."""
        if self.on_violation != "raise":
            return
        decision = (alert.kind, alert.value, alert.threshold) if alert is not None else None
        if trainer.world_size > 1:
            decision = trainer.strategy.broadcast(decision, src=0)
        if decision is not None:
            raise SLAViolation(*decision)

    @staticmethod
    def _metric_name(figure: str) -> str:
        if figure.startswith(("host_", "cuda_")):
            return f"evalguard/mem/{figure}"
        return f"evalguard/{figure}"

    def _on_stats_error(self, exc: BaseException) -> None:
        warn_once(self._warned, "stats", f"PerformanceMonitor: a callback's stats() failed: {exc!r}")

    def _on_log_error(self, exc: BaseException) -> None:
        warn_once(self._warned, "log", f"PerformanceMonitor: a logger refused evalguard/ figures: {exc!r}")

    # -- the report ----------------------------------------------------------------------------
    def report(self, status: str = "running", error: BaseException | None = None) -> dict[str, Any]:
        """The JSON report as a dict (what is written at the end of fit)."""
        return {
            "schema": SCHEMA,
            "version": __version__,
            "status": status,
            "error": None if error is None else f"{type(error).__name__}: {error}",
            "created_unix": time.time(),
            "t0": self._t0,
            "timing": self._timer.source if self._t0 is not None else None,
            "config": {
                "max_step_slowdown": self.max_step_slowdown,
                "max_logging_failure_rate": self.max_logging_failure_rate,
                "max_memory_growth_mb_per_hour": self.max_memory_growth_mb_per_hour,
                "max_scheduler_lag": self.max_scheduler_lag,
                "max_eval_latency": self.max_eval_latency,
                "warmup_steps": self.warmup_steps,
                "window": self.window,
                "on_violation": self.on_violation,
                "report_path": self._report_file,
                "log_every_n_steps": self.log_every_n_steps,
            },
            "figures": self.figures(),
            "thresholds": self.thresholds(),
            "callbacks": {
                peer_name(p): {"class": type(p).__qualname__, "stats": self._peer_stats.get(id(p), {})}
                for p in self._stats_peers
            },
            "alerts": [a.as_dict() for a in self._book.alerts],
            "violations": dict(self._book.violations),
            "timeline": self._timeline.to_dict(),
        }

    def _write_report(self, trainer: pl.Trainer, *, status: str, error: BaseException | None = None) -> None:
        if self._report_file is None:
            return
        if status != "completed":
            # A failed run gets whatever was measured up to the failure.
            self._timer.drain(self._times)
            self._flush_batch()
            self._collect_events()
        self._report_written = write_report(self._report_file, self.report(status, error))
        _log.info("evalguard report written to %s", self._report_written)

    # -- persistence ---------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"alerts": self._book.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._book.load_state_dict(state_dict.get("alerts", {}))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(max_step_slowdown={self.max_step_slowdown}, "
            f"max_logging_failure_rate={self.max_logging_failure_rate}, "
            f"max_memory_growth_mb_per_hour={self.max_memory_growth_mb_per_hour}, "
            f"max_scheduler_lag={self.max_scheduler_lag}, max_eval_latency={self.max_eval_latency}, "
            f"on_violation={self.on_violation!r})"
        )
