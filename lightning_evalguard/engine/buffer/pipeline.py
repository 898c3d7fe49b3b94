"""One logger's whole path: rules -> bounded buffer -> flusher -> sink, with spill and replay.

:class:`LogConfig` holds and checks the settings (the callback's ``__init__`` arguments);
:class:`LogPipeline` is what a logger proxy calls on the training thread. Its :meth:`LogPipeline.log`
is the hot path: a type check, a dict copy, the sampling rule and an append under a lock.

Examples:
    >>> class ListSink:
    ...     def __init__(self): self.rows = []
    ...     def send_row(self, row): self.rows.append((row.step, row.values))
    ...     def send_call(self, call): pass
    ...     def after_batch(self): pass
    >>> sink = ListSink()
    >>> pipe = LogPipeline(LogConfig(rules={"loss": "mean:2"}, when_full="drop_newest"), sink)
    >>> pipe.start()
    >>> pipe.log({"loss": 1.0}, step=0); pipe.log({"loss": 2.0}, step=1)
    >>> pipe.close(timeout=5.0)
    >>> sink.rows
    [(1, {'loss': 1.5})]
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_evalguard.engine.breaker import CircuitBreaker
from lightning_evalguard.engine.buffer.core import WHEN_FULL, MetricBuffer, Row, WhenFull
from lightning_evalguard.engine.buffer.flusher import Flusher, Sink
from lightning_evalguard.engine.buffer.retry import Backoff
from lightning_evalguard.engine.buffer.spill import SpillFailure, SpillStore
from lightning_evalguard.engine.clock import SYSTEM_CLOCK, Clock
from lightning_evalguard.engine.events import EventLog
from lightning_evalguard.engine.sampler import RuleSet, Sampler, clean_values

__all__ = ["LogConfig", "LogPipeline", "WarnOnce", "quantile"]

_MB = 1 << 20


def _number(name: str, value: object, *, minimum: float, inclusive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value > minimum or (inclusive and value == minimum)):  # type: ignore[operator]
        return float(value)  # type: ignore[arg-type]
    bound = ">=" if inclusive else ">"
    raise ValueError(f"`{name}` must be a finite number {bound} {minimum:g}, got {value!r}")


def _integer(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")
    return value


@dataclass(kw_only=True, slots=True)
class LogConfig:
    """Settings of a :class:`LogPipeline`, checked at construction (see ``BufferedLogging`` for each).

    Raises:
        ValueError: a value out of range; the message names the parameter and quotes the value.
        TypeError: ``rules`` or ``spill_dir`` of the wrong type.
    """

    rules: Mapping[str, str] | None = None
    max_buffer_mb: float = 64.0
    when_full: WhenFull = "spill"
    flush_interval: float = 1.0
    max_batch: int = 512
    flush_timeout: float = 30.0
    max_retries: int = 3
    retry_backoff: float = 0.2
    max_backoff: float = 10.0
    send_timeout: float = 10.0
    failure_threshold: int = 3
    recovery_time: float = 30.0
    spill_dir: str | None = None
    max_spill_mb: float = 512.0
    ruleset: RuleSet = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.ruleset = RuleSet(self.rules)
        self.max_buffer_mb = _number("max_buffer_mb", self.max_buffer_mb, minimum=0.0)
        if self.when_full not in WHEN_FULL:
            raise ValueError(f"`when_full` must be one of {', '.join(map(repr, WHEN_FULL))}, got {self.when_full!r}")
        self.flush_interval = _number("flush_interval", self.flush_interval, minimum=0.0)
        self.max_batch = _integer("max_batch", self.max_batch, minimum=1)
        self.flush_timeout = _number("flush_timeout", self.flush_timeout, minimum=0.0)
        self.max_retries = _integer("max_retries", self.max_retries, minimum=0)
        self.retry_backoff = _number("retry_backoff", self.retry_backoff, minimum=0.0)
        self.max_backoff = _number("max_backoff", self.max_backoff, minimum=0.0)
        if self.max_backoff < self.retry_backoff:
            raise ValueError(
                f"`max_backoff` must be >= `retry_backoff` ({self.retry_backoff!r}), got {self.max_backoff!r}"
            )
        self.send_timeout = _number("send_timeout", self.send_timeout, minimum=0.0)
        self.failure_threshold = _integer("failure_threshold", self.failure_threshold, minimum=1)
        self.recovery_time = _number("recovery_time", self.recovery_time, minimum=0.0, inclusive=True)
        if self.spill_dir is not None and not isinstance(self.spill_dir, str):
            raise TypeError(f"`spill_dir` must be a str path or None, got {self.spill_dir!r}")
        if self.spill_dir == "":
            raise ValueError("`spill_dir` must be a non-empty path or None, got ''")
        self.max_spill_mb = _number("max_spill_mb", self.max_spill_mb, minimum=0.0)


class WarnOnce:
    """``warn(kind, message)``: a ``RuntimeWarning`` the first time each kind is seen; every call
    is counted in :attr:`counts`. Shared by a callback's pipelines so a fault warns once in all."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, kind: str, message: str) -> None:
        seen = kind in self.counts
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if not seen:
            warnings.warn(message, RuntimeWarning, stacklevel=2)


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (0.0 for no values).

    Examples:
        >>> quantile([5, 1, 3, 2, 4], 0.5), quantile([], 0.95)
        (3, 0.0)
    """
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class LogPipeline:
    """Sampler + :class:`MetricBuffer` + :class:`Flusher` (+ :class:`SpillStore`) for one logger.

    Args:
        config: the settings.
        sink: delivers rows and calls to the real logger.
        spill_dir: where spill files go (default ``config.spill_dir``; with neither, rows that cannot
            be delivered are dropped as ``spill_failed``).
        spill_meta: fields for the spill files' header (logger class, name, version).
        clock, sleep, rng: injected time, retry waits and jitter source (tests).
        events: where events go (shared by a callback's pipelines).
        warn: fault reporter, see :class:`WarnOnce`.
        name: flusher thread name.
    """

    def __init__(
        self,
        config: LogConfig,
        sink: Sink,
        *,
        spill_dir: str | os.PathLike[str] | None = None,
        spill_meta: Mapping[str, Any] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        sleep: Callable[[float], object] | None = None,
        rng: random.Random | None = None,
        events: EventLog | None = None,
        warn: Callable[[str, str], None] | None = None,
        name: str = "evalguard-log-flusher",
    ) -> None:
        self.config = config
        self.events = events if events is not None else EventLog("logging", clock=clock)
        self.warn = warn if warn is not None else WarnOnce()
        self.sampler = Sampler(config.ruleset)
        self._passthrough = self.sampler.passthrough
        self.spill: SpillStore | None = None
        spill_dir = spill_dir if spill_dir is not None else config.spill_dir
        if spill_dir is not None:
            self.spill = SpillStore(spill_dir, max_bytes=int(config.max_spill_mb * _MB), meta=spill_meta)
        self.breaker = CircuitBreaker(config.failure_threshold, config.recovery_time, clock=clock)
        self.buffer = MetricBuffer(
            int(config.max_buffer_mb * _MB),
            config.when_full if config.when_full != "spill" or self.spill is not None else "drop_oldest",
            overflow=self._overflow,
            block_timeout=config.flush_timeout,
            wake_items=config.max_batch,
            on_wait=self.poll,
            clock=clock,
        )
        self.flusher = Flusher(
            self.buffer,
            sink,
            spill=self.spill,
            breaker=self.breaker,
            backoff=Backoff(config.retry_backoff, config.max_backoff, rng=rng),
            max_retries=config.max_retries,
            max_batch=config.max_batch,
            flush_interval=config.flush_interval,
            send_timeout=config.send_timeout,
            clock=clock,
            sleep=sleep,
            events=self.events,
            warn=self.warn,
            name=name,
        )
        self.logged = 0
        self._closing = False
        self.closed = False

    # -- training thread -------------------------------------------------------------------------
    def log(self, metrics: Mapping[str, Any], step: int | None) -> None:
        """The hot path: check values, apply the rules, append. Never blocks unless
        ``when_full="block"``; never raises for a runtime fault."""
        values, invalid = clean_values(metrics)
        if invalid:
            self.buffer.count_invalid(len(invalid))
            self.warn(
                "invalid",
                f"BufferedLogging: values that are not numbers are dropped (counted as dropped_invalid): "
                f"{', '.join(map(repr, invalid[:5]))}",
            )
        self.logged += len(metrics)
        if not self._passthrough:
            values = self.sampler.process(values, step)
        if values:
            self.buffer.put_row(values, step)

    def log_direct(self, values: dict[str, Any], step: int | None) -> None:
        """Append a row of plain numbers without the rules (the callback's own ``evalguard/log/``)."""
        self.buffer.put_row(values, step)

    def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Queue a non-metric logger call, ordered with the rows."""
        if not self.buffer.put_call(name, args, kwargs):
            self.warn("call_dropped", f"BufferedLogging: logger call {name!r} dropped: no room in max_buffer_mb")

    def poll(self) -> None:
        """The watchdog, run from the training thread's hooks: abandons a call stuck in the logger."""
        self.flusher.check_stuck()

    def busy(self) -> bool:
        """True while the flusher is in a cycle (lock-free)."""
        return self.flusher.busy()

    def start(self) -> None:
        """Start the flusher thread."""
        self.flusher.start()

    def flush(self, timeout: float) -> bool:
        """Deliver (or spill) what is queued now; wait at most ``timeout`` seconds."""
        return self.flusher.flush(timeout)

    def begin_close(self) -> None:
        """Emit the open aggregation windows and start a final flush without waiting, so that
        several pipelines can drain at the same time before each :meth:`close`."""
        if self._closing:
            return
        self._closing = True
        for step, values in self.sampler.drain():
            self.buffer.put_row(values, step)
        self.flusher.request_flush()

    def close(self, timeout: float | None = None) -> None:
        """Emit the open aggregation windows, flush within ``timeout`` (default ``flush_timeout``),
        spill the rest, stop the thread. Idempotent."""
        if self.closed:
            return
        self.begin_close()
        self.closed = True
        self.flusher.close(self.config.flush_timeout if timeout is None else timeout)

    def _overflow(self, rows: list[Row]) -> str | None:
        assert self.spill is not None
        try:
            self.spill.append(rows)
        except SpillFailure as exc:
            self.warn(exc.reason, f"BufferedLogging: rows could not be spilled, they are dropped: {exc}")
            return exc.reason
        self.events.emit("spill", rows=len(rows), overflow=True)
        return None

    # -- accounting ------------------------------------------------------------------------------
    def stats(self) -> dict[str, int | float]:
        """Ledger, memory, breaker and timing figures (plain numbers)."""
        out: dict[str, int | float] = dict(self.buffer.snapshot())
        out["breaker_state"] = self.breaker.state_code
        out["flush_in_progress"] = int(self.flusher.busy())
        out["flush_latency_p95_s"] = float(quantile(list(self.flusher.latencies), 0.95))
        out["abandoned_calls"] = self.flusher.abandoned
        out["internal_errors"] = self.flusher.internal_errors
        out["logged"] = self.logged
        sampler = self.sampler.stats()
        out["sampled_out"] = sampler["skipped"]
        out["aggregated"] = sampler["folded"]
        out["held_in_windows"] = sampler["held"]
        out["spill_backlog"] = self.spill.backlog_values if self.spill is not None else 0
        out["spill_write_errors"] = self.spill.write_errors if self.spill is not None else 0
        return out
