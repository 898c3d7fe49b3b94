"""Fault injectors and readers for testing code that uses lightning_evalguard.

These are the same tools the package's own test suite uses; they are public so users can check
their own training scripts against hangs, crashes and flaky backends.

Sections: evaluation faults (for :class:`~lightning_evalguard.GuardedEvaluation`), logging faults
(for :class:`~lightning_evalguard.BufferedLogging`) and the W&B offline run reader.
"""

from __future__ import annotations

import errno
import json
import os
import random
import struct
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from typing_extensions import override

from lightning_evalguard.engine.clock import SYSTEM_CLOCK, Clock, FakeClock
from lightning_evalguard.engine.events import EventLog

__all__: list[str] = [
    "AllocatingEval",
    "BusyCallback",
    "CrashingEval",
    "EvalFault",
    "FailingLogger",
    "FaultSequence",
    "FaultyValidation",
    "FlakyLogger",
    "FullDisk",
    "HangingEval",
    "HangingLogger",
    "LeakingCallback",
    "RaisingEval",
    "SigtermIgnoringEval",
    "SlowHookCallback",
    "SlowLogger",
    "StepClock",
    "WandbRunRecords",
    "find_wandb_runs",
    "read_wandb_run",
]

# ---- evaluation faults -------------------------------------------------------------------------
# For GuardedEvaluation: evaluations that hang, ignore SIGTERM, exit, segfault, raise or allocate
# without bound. Each is a small picklable callable, usable as ``eval_fn`` (it takes ``(module,
# dataloader)``), or put into a LightningModule's ``validation_step`` with :class:`FaultyValidation`.
# The process-level ones (exit, segfault, ignoring SIGTERM, unbounded allocation) are meant for
# ``mode="subprocess"``: in the training process they would take training down with them.


class EvalFault:
    """Base of the evaluation faults: :meth:`trigger` does the damage, :meth:`fire` triggers it if armed.

    Called as an ``eval_fn``, a fault fires and, if it returns at all, reports
    ``{"fault/fired": 1.0}`` (``0.0`` when it was not armed).

    Args:
        once_file: if given, the fault fires only once: for the first call that finds this file
            absent (it is created atomically just before), across processes and worker restarts.
            Later calls do nothing, so a test can check that the next evaluation succeeds.

    Examples:
        >>> import os, tempfile
        >>> once = os.path.join(tempfile.mkdtemp(), "fired")
        >>> fault = RaisingEval("boom", once_file=once)
        >>> try:
        ...     fault(None, None)
        ... except RuntimeError as exc:
        ...     print(exc)
        boom
        >>> fault(None, None)  # the second time it is disarmed
        {'fault/fired': 0.0}
    """

    def __init__(self, once_file: str | os.PathLike[str] | None = None) -> None:
        self.once_file = os.fspath(once_file) if once_file is not None else None

    def armed(self) -> bool:
        """Whether the fault fires now (consumes the ``once_file`` if there is one)."""
        if self.once_file is None:
            return True
        try:
            fd = os.open(self.once_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def trigger(self) -> None:
        """Do the damage (subclasses)."""
        raise NotImplementedError

    def fire(self) -> bool:
        """Trigger the fault if it is armed; ``True`` if it fired (and returned)."""
        if not self.armed():
            return False
        self.trigger()
        return True

    def __call__(self, module: Any = None, dataloader: Any = None) -> dict[str, float]:
        return {"fault/fired": float(self.fire())}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(once_file={self.once_file!r})"


def _sleep_until(seconds: float | None) -> None:
    import time

    deadline = None if seconds is None else time.monotonic() + seconds
    while deadline is None or time.monotonic() < deadline:
        time.sleep(0.01)  # a Python-level loop: a signal's default action still kills the process


class HangingEval(EvalFault):
    """Hangs for ``seconds`` (``None``: for ever) in a sleep loop, the way a stuck evaluation does.

    Args:
        seconds: how long to hang; ``None`` never returns.
        once_file: see :class:`EvalFault`.
    """

    def __init__(self, seconds: float | None = None, once_file: str | os.PathLike[str] | None = None) -> None:
        super().__init__(once_file)
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0):
            raise ValueError(f"`seconds` must be a number >= 0 or None, got {seconds!r}")
        self.seconds = seconds

    def trigger(self) -> None:
        _sleep_until(self.seconds)


class SigtermIgnoringEval(HangingEval):
    """Ignores ``SIGTERM``, then hangs: only ``SIGKILL`` stops it (subprocess mode; main thread only)."""

    def trigger(self) -> None:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _sleep_until(self.seconds)


class CrashingEval(EvalFault):
    """Kills its own process: ``kind="exit"`` calls ``os._exit(exit_code)``, ``kind="segfault"``
    reads address 0 (``ctypes.string_at(0)``), as a crashing C extension would. Subprocess mode only.

    Args:
        kind: ``"exit"`` or ``"segfault"``.
        exit_code: the exit code for ``kind="exit"``.
        once_file: see :class:`EvalFault`.
    """

    def __init__(
        self,
        kind: Literal["exit", "segfault"] = "exit",
        exit_code: int = 3,
        once_file: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(once_file)
        if kind not in ("exit", "segfault"):
            raise ValueError(f"`kind` must be 'exit' or 'segfault', got {kind!r}")
        self.kind = kind
        self.exit_code = int(exit_code)

    def trigger(self) -> None:
        if self.kind == "exit":
            os._exit(self.exit_code)
        import ctypes
        import faulthandler

        faulthandler.disable()  # a test segfault needs no C traceback on stderr
        ctypes.string_at(0)


class RaisingEval(EvalFault):
    """Raises ``error(message)``.

    Args:
        message: the exception message.
        error: the exception class.
        once_file: see :class:`EvalFault`.
    """

    def __init__(
        self,
        message: str = "injected evaluation failure",
        error: type[BaseException] = RuntimeError,
        once_file: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(once_file)
        self.message = message
        self.error = error

    def trigger(self) -> None:
        raise self.error(self.message)


class AllocatingEval(EvalFault):
    """Allocates (and touches) ``chunk_mb`` after ``chunk_mb`` of host memory, keeping all of it.

    Without ``max_mb`` it stops only when an allocation fails (``MemoryError``): run it under a
    memory limit, e.g. a worker with ``EVALGUARD_WORKER_RLIMIT_AS_MB`` set (see
    :mod:`lightning_evalguard.engine.runners._worker`), never unguarded in a test process.

    Args:
        chunk_mb: size of each allocation, MB.
        max_mb: a safety stop: raise ``MemoryError("AllocatingEval reached max_mb=...")`` there.
        once_file: see :class:`EvalFault`.
    """

    def __init__(
        self, chunk_mb: float = 16.0, max_mb: float | None = None, once_file: str | os.PathLike[str] | None = None
    ) -> None:
        super().__init__(once_file)
        if isinstance(chunk_mb, bool) or not isinstance(chunk_mb, (int, float)) or chunk_mb <= 0:
            raise ValueError(f"`chunk_mb` must be a number > 0, got {chunk_mb!r}")
        self.chunk_mb = float(chunk_mb)
        self.max_mb = max_mb

    def trigger(self) -> None:
        chunk = int(self.chunk_mb * 2**20)
        held: list[bytearray] = []
        while self.max_mb is None or len(held) * self.chunk_mb < self.max_mb:
            block = bytearray(chunk)
            memoryview(block)[::4096] = b"\x01" * len(range(0, chunk, 4096))  # touch every page
            held.append(block)
        raise MemoryError(f"AllocatingEval reached max_mb={self.max_mb}")


class FaultSequence(EvalFault):
    """Fires the first of ``faults`` that is still armed: with ``once_file`` faults, evaluation k gets
    fault k, whatever worker runs it; once all have fired, evaluations run normally.

    Args:
        faults: the faults, in order.
    """

    def __init__(self, faults: list[EvalFault]) -> None:
        super().__init__(None)
        self.faults = list(faults)

    def fire(self) -> bool:
        return any(fault.fire() for fault in self.faults)


class FaultyValidation:
    """LightningModule mixin: ``validation_step`` fires ``self.validation_fault`` before the real one.

    Put it first in the bases, and set ``validation_fault`` (class or instance attribute)::

        class Broken(FaultyValidation, MyModel):
            validation_fault = CrashingEval("segfault", once_file="/tmp/crash-once")
    """

    validation_fault: EvalFault | None = None

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.validation_fault is not None:
            self.validation_fault.fire()
        return super().validation_step(*args, **kwargs)  # type: ignore[misc]


# ---- logging faults ----------------------------------------------------------------------------
# For BufferedLogging: loggers that fail, fail sometimes, hang or are slow, each wrapping a real
# logger (or recording rows itself), and a spill directory on a full disk.


class _FaultyLogger(Logger):
    """A Lightning logger that injects a fault in ``log_metrics`` and otherwise forwards to ``logger``.

    Rows that get through are recorded in :attr:`rows` (``(step, metrics)``) and passed to the wrapped
    logger, if any; every other method and attribute is the wrapped logger's.
    """

    def __init__(self, logger: Logger | None = None) -> None:
        super().__init__()
        self.inner = logger
        self.rows: list[tuple[int | None, dict[str, Any]]] = []
        self.calls = 0  # log_metrics calls, failed or not
        self.failures = 0
        self._lock = threading.Lock()

    def _fault(self, call: int) -> None:
        """Raise, wait or hang for call number ``call`` (1-based)."""

    @override
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        with self._lock:
            self.calls += 1
            call = self.calls
        try:
            self._fault(call)
        except Exception:
            with self._lock:
                self.failures += 1
            raise
        with self._lock:
            self.rows.append((step, dict(metrics)))
        if self.inner is not None:
            self.inner.log_metrics(dict(metrics), step)

    @override
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        if self.inner is not None:
            self.inner.log_hyperparams(params, *args, **kwargs)

    @property
    @override
    def name(self) -> str | None:
        return self.inner.name if self.inner is not None else type(self).__name__

    @property
    @override
    def version(self) -> int | str | None:
        return self.inner.version if self.inner is not None else 0

    @property
    @override
    def save_dir(self) -> str | None:
        return self.inner.save_dir if self.inner is not None else None

    @property
    @override
    def log_dir(self) -> str | None:
        return self.inner.log_dir if self.inner is not None else None

    @property
    def experiment(self) -> Any:
        """The wrapped logger's experiment (``None`` without one)."""
        return getattr(self.inner, "experiment", None)

    @override
    def save(self) -> None:
        if self.inner is not None:
            self.inner.save()

    @override
    def finalize(self, status: str) -> None:
        if self.inner is not None:
            self.inner.finalize(status)

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if name.startswith("__") or inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


class FailingLogger(_FaultyLogger):
    """A logger whose ``log_metrics`` always raises ``error`` (default: ``ConnectionError``).

    Examples:
        >>> logger = FailingLogger()
        >>> logger.log_metrics({"loss": 1.0}, step=0)
        Traceback (most recent call last):
        ...
        ConnectionError: injected logging failure (call 1)
    """

    def __init__(self, logger: Logger | None = None, error: type[Exception] = ConnectionError) -> None:
        super().__init__(logger)
        self.error = error

    @override
    def _fault(self, call: int) -> None:
        raise self.error(f"injected logging failure (call {call})")


class FlakyLogger(_FaultyLogger):
    """A logger whose ``log_metrics`` raises ``ConnectionError`` on a seeded ``failure_rate`` of calls.

    Args:
        logger: the logger that receives the calls that succeed (optional).
        failure_rate: probability in [0, 1) that a call fails.
        seed: seed of the failure sequence (the same seed fails the same calls).

    Examples:
        >>> logger = FlakyLogger(failure_rate=0.3, seed=0)
        >>> outcomes = []
        >>> for step in range(1000):
        ...     try:
        ...         logger.log_metrics({"x": 1.0}, step)
        ...     except ConnectionError:
        ...         pass
        >>> 250 < logger.failures < 350, len(logger.rows) + logger.failures
        (True, 1000)
    """

    def __init__(self, logger: Logger | None = None, failure_rate: float = 0.3, seed: int = 0) -> None:
        if not isinstance(failure_rate, (int, float)) or not 0.0 <= failure_rate < 1.0:
            raise ValueError(f"`failure_rate` must be in [0, 1), got {failure_rate!r}")
        super().__init__(logger)
        self.failure_rate = float(failure_rate)
        self._rng = random.Random(seed)

    @override
    def _fault(self, call: int) -> None:
        with self._lock:
            fail = self._rng.random() < self.failure_rate
        if fail:
            raise ConnectionError(f"injected flaky logging failure (call {call})")


class HangingLogger(_FaultyLogger):
    """A logger whose ``log_metrics`` calls after the first ``hang_after`` block until :meth:`release`.

    A blocked call returns (and its row goes through) once released, or after ``max_hang`` seconds so
    that a forgotten release cannot keep a thread alive for ever. :attr:`hanging` is set when the
    first call starts to hang, for tests to wait on.

    Examples:
        >>> logger = HangingLogger(hang_after=1)
        >>> logger.log_metrics({"x": 1.0}, step=0)  # the first call goes through
        >>> logger.release(); logger.log_metrics({"x": 2.0}, step=1)  # released: no hang
        >>> [step for step, _ in logger.rows]
        [0, 1]
    """

    def __init__(self, logger: Logger | None = None, hang_after: int = 0, max_hang: float = 120.0) -> None:
        if isinstance(hang_after, bool) or not isinstance(hang_after, int) or hang_after < 0:
            raise ValueError(f"`hang_after` must be an int >= 0, got {hang_after!r}")
        super().__init__(logger)
        self.hang_after = hang_after
        self.max_hang = float(max_hang)
        self.hanging = threading.Event()
        self._released = threading.Event()

    @override
    def _fault(self, call: int) -> None:
        if call > self.hang_after and not self._released.is_set():
            self.hanging.set()
            self._released.wait(self.max_hang)

    def release(self) -> None:
        """Let every blocked call (and every later one) through."""
        self._released.set()


class SlowLogger(_FaultyLogger):
    """A logger whose ``log_metrics`` takes ``delay`` seconds more than the wrapped logger's.

    Examples:
        >>> logger = SlowLogger(delay=0.0)
        >>> logger.log_metrics({"x": 1.0}, step=0); logger.calls
        1
    """

    def __init__(self, logger: Logger | None = None, delay: float = 0.05, clock: Clock = SYSTEM_CLOCK) -> None:
        if not isinstance(delay, (int, float)) or delay < 0:
            raise ValueError(f"`delay` must be a number >= 0, got {delay!r}")
        super().__init__(logger)
        self.delay = float(delay)
        self._clock = clock

    @override
    def _fault(self, call: int) -> None:
        self._clock.sleep(self.delay)


class FullDisk:
    """Context manager: spill files under ``path`` behave as on a full disk (writes raise ENOSPC).

    It replaces only the write function of :mod:`lightning_evalguard.engine.buffer.spill`, for files
    under ``path``, so the rest of the process (checkpoints, W&B) is unaffected. Files already open
    fail too, as on a disk that fills up mid-run.

    Examples:
        >>> import tempfile
        >>> from lightning_evalguard.engine.buffer import Row, SpillStore, SpillFailure
        >>> directory = tempfile.mkdtemp()
        >>> with FullDisk(directory):
        ...     try:
        ...         SpillStore(directory, max_bytes=1 << 20).append([Row(1, 0, {"x": 1.0})])
        ...     except SpillFailure as exc:
        ...         print(exc.reason, exc.cause.errno == errno.ENOSPC)
        spill_failed True
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.failed_writes = 0
        self._saved: Any = None

    def _write(self, fh: Any, data: bytes) -> None:
        target = os.path.abspath(os.fspath(getattr(fh, "name", "")))
        if (target + os.sep).startswith(self.path + os.sep):
            self.failed_writes += 1
            raise OSError(errno.ENOSPC, "No space left on device (injected by FullDisk)")
        self._saved(fh, data)

    def __enter__(self) -> FullDisk:
        from lightning_evalguard.engine.buffer import spill

        self._saved = spill._write
        spill._write = self._write
        return self

    def __exit__(self, *exc: object) -> None:
        from lightning_evalguard.engine.buffer import spill

        spill._write = self._saved


# ---- W&B offline run reader --------------------------------------------------------------------
# An offline run (``wandb/offline-run-*/run-*.wandb``) is a LevelDB-style log: a 7-byte header
# (":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks, each ``crc32 (4) | length (2) |
# type (1) | data``; a record too long for a block is split into FIRST/MIDDLE/LAST chunks. Each
# record is a ``wandb.proto.wandb_internal_pb2.Record``. The file is complete after
# ``wandb.finish()``, which writes the ``exit`` record.

_WANDB_IDENT = b":W&B"
_WANDB_MAGIC = 0xBEE1
_WANDB_BLOCK = 32 * 1024
_CHUNK_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class WandbRunRecords:
    """What an offline W&B run file holds.

    Attributes:
        path: the ``.wandb`` file read.
        history: one dict per ``run.log`` call, in order (keys as logged; W&B adds ``_step``,
            ``_runtime``, ``_timestamp``); values decoded from JSON (NaN and infinities included).
        summary: the last summary values.
        config: the run config (``log_hyperparams``), values decoded from JSON.
        complete: True when the ``exit`` record is there (``wandb.finish()`` ran).
        exit_code: the run's exit code, when complete.
        record_counts: how many records of each type.
    """

    path: str
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    exit_code: int | None = None
    record_counts: dict[str, int] = field(default_factory=dict)

    def series(self, key: str, step_key: str = "trainer/global_step") -> list[tuple[Any, Any]]:
        """``(step, value)`` for each history row holding ``key``, in order."""
        return [(row.get(step_key), row[key]) for row in self.history if key in row]


def find_wandb_runs(root: str | os.PathLike[str]) -> list[Path]:
    """The ``run-*.wandb`` files of offline runs under ``root`` (recursively), oldest first."""
    return sorted(Path(root).rglob("offline-run-*/run-*.wandb"), key=lambda p: (p.parent.name, str(p)))


def _wandb_payloads(data: bytes, path: str) -> tuple[list[bytes], bool]:
    """The record payloads of a W&B log, and whether it ended cleanly (no torn record)."""
    if len(data) < 7 or data[:4] != _WANDB_IDENT:
        raise ValueError(f"{path!r} is not a W&B run file (bad header {data[:7]!r})")
    magic, version = struct.unpack_from("<HB", data, 4)
    if magic != _WANDB_MAGIC or version > 1:
        raise ValueError(f"{path!r}: unknown W&B log format (magic {magic:#x}, version {version})")
    payloads: list[bytes] = []
    pending: list[bytes] | None = None
    offset = 7
    while offset < len(data):
        left_in_block = _WANDB_BLOCK - offset % _WANDB_BLOCK
        if left_in_block < _CHUNK_HEADER.size:
            offset += left_in_block  # block trailer: zero padding
            continue
        if offset + _CHUNK_HEADER.size > len(data):
            return payloads, False
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, offset)
        if kind == 0 and length == 0:  # zero padding to the end of a block
            offset += left_in_block
            continue
        start = offset + _CHUNK_HEADER.size
        chunk = data[start : start + length]
        if len(chunk) < length:
            return payloads, False  # torn write at the end (the run is still being written)
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path!r}: checksum mismatch in the chunk at byte {offset}")
        offset = start + length
        if kind == _FULL:
            payloads.append(chunk)
        elif kind == _FIRST:
            pending = [chunk]
        elif kind == _MIDDLE and pending is not None:
            pending.append(chunk)
        elif kind == _LAST and pending is not None:
            payloads.append(b"".join([*pending, chunk]))
            pending = None
        else:
            raise ValueError(f"{path!r}: unexpected chunk type {kind} at byte {offset - length - 7}")
    return payloads, pending is None


def _item_key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


def _item_value(item: Any) -> Any:
    """A history value: the typed ``value`` field of newer SDKs, else the legacy ``value_json``."""
    kind = item.WhichOneof("value") if hasattr(item, "WhichOneof") else None
    if kind == "none":
        return None
    if kind == "json":
        return json.loads(item.json)
    if kind is not None:
        return getattr(item, kind)
    return json.loads(item.value_json)


def read_wandb_run(path: str | os.PathLike[str]) -> WandbRunRecords:
    """Read an offline W&B run file, or the single offline run under a directory.

    Args:
        path: a ``run-*.wandb`` file, or a directory holding exactly one offline run
            (a ``save_dir``, its ``wandb/`` folder or an ``offline-run-*`` folder).

    Raises:
        FileNotFoundError: no run file where expected.
        ValueError: several runs under the directory, or a file that is not a valid W&B log.

    Examples:
        >>> records = read_wandb_run(tmp_path)  # doctest: +SKIP
        >>> records.complete, records.series("train/loss")[:2]  # doctest: +SKIP
        (True, [(0, 2.31), (1, 2.28)])
    """
    from wandb.proto import wandb_internal_pb2  # imported here: wandb is slow to import

    target = Path(path)
    if target.is_dir():
        runs = find_wandb_runs(target)
        if not runs:
            raise FileNotFoundError(f"no offline W&B run (offline-run-*/run-*.wandb) under {str(target)!r}")
        if len(runs) > 1:
            raise ValueError(f"{len(runs)} offline W&B runs under {str(target)!r}; pass one file: {runs}")
        target = runs[0]
    payloads, clean = _wandb_payloads(target.read_bytes(), str(target))
    out = WandbRunRecords(path=str(target))
    record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
    for payload in payloads:
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type") or "unknown"
        out.record_counts[kind] = out.record_counts.get(kind, 0) + 1
        if kind == "history":
            out.history.append({_item_key(i): _item_value(i) for i in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                out.summary[_item_key(item)] = json.loads(item.value_json)
            for item in record.summary.remove:
                out.summary.pop(_item_key(item), None)
        elif kind == "config":
            for item in record.config.update:
                out.config[_item_key(item)] = json.loads(item.value_json)
        elif kind == "run":
            for item in record.run.config.update:
                out.config[_item_key(item)] = json.loads(item.value_json)
        elif kind == "exit":
            out.complete = clean
            out.exit_code = int(record.exit.exit_code)
    return out


# ---- monitor/cleanup faults ---------------------------------------------------------------------
# For ResourceCleanup and PerformanceMonitor: a leak, a slow evalguard hook, background work that
# slows the steps it overlaps, and a fake clock that advances as training steps run.


class LeakingCallback(Callback):
    """Leaks ``bytes_per_step`` of touched host memory at every training step (a list that only grows).

    Args:
        bytes_per_step: bytes kept per training step (filled, so they count in RSS at once).

    Examples:
        >>> leak = LeakingCallback(bytes_per_step=1024)
        >>> leak.on_train_batch_end(None, None, None, None, 0)
        >>> leak.leaked_bytes
        1024
    """

    def __init__(self, bytes_per_step: int = 1 << 20) -> None:
        if isinstance(bytes_per_step, bool) or not isinstance(bytes_per_step, int) or bytes_per_step < 1:
            raise ValueError(f"`bytes_per_step` must be an int >= 1, got {bytes_per_step!r}")
        self.bytes_per_step = bytes_per_step
        self.leaked: list[bytes] = []

    @property
    def leaked_bytes(self) -> int:
        """Bytes held so far."""
        return len(self.leaked) * self.bytes_per_step

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.leaked.append(b"\x01" * self.bytes_per_step)

    def release(self) -> None:
        """Stop leaking what was leaked so far (for the end of a test)."""
        self.leaked.clear()


class SlowHookCallback(Callback):
    """A callback with the evalguard surface whose ``on_train_batch_end`` takes ``delay_s``.

    The delay is counted in its ``stats()["hook_time_s"]``, as an evalguard callback's own hook time
    is, so :class:`~lightning_evalguard.PerformanceMonitor` sees it as hook overhead. It waits with
    ``clock.sleep``: a :class:`~lightning_evalguard.engine.clock.FakeClock` advances instead.

    Args:
        delay_s: seconds each slow hook takes.
        every_n_steps: be slow at every n-th training step only.
        clock: time source (and sleeper).

    Examples:
        >>> clock = FakeClock()
        >>> slow = SlowHookCallback(0.002, clock=clock)
        >>> slow.on_train_batch_end(None, None, None, None, 0)
        >>> slow.stats()["hook_time_s"], clock.now()
        (0.002, 0.002)
    """

    def __init__(self, delay_s: float = 0.005, *, every_n_steps: int = 1, clock: Clock = SYSTEM_CLOCK) -> None:
        if isinstance(delay_s, bool) or not isinstance(delay_s, (int, float)) or delay_s < 0:
            raise ValueError(f"`delay_s` must be a number >= 0, got {delay_s!r}")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be an int >= 1, got {every_n_steps!r}")
        self.delay_s = float(delay_s)
        self.every_n_steps = every_n_steps
        self._clock = clock
        self.events = EventLog("slow_hook", clock=clock)
        self.hook_time_s = 0.0
        self.hook_calls = 0
        self._steps = 0

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        start = self._clock.now()
        self._steps += 1
        if self._steps % self.every_n_steps == 0:
            self._clock.sleep(self.delay_s)
        self.hook_time_s += self._clock.now() - start
        self.hook_calls += 1

    def stats(self) -> dict[str, float | int]:
        """``hook_time_s`` and ``hook_calls``, like every evalguard callback."""
        return {"hook_time_s": self.hook_time_s, "hook_calls": self.hook_calls}


class BusyCallback(Callback):
    """Pretends background work is in flight during some epochs, and slows the steps it overlaps.

    ``busy()`` is true during the chosen epochs; each step then takes ``extra_s`` longer (waited
    with ``clock.sleep``), the way a real evaluation thread competing for the host slows training.
    That time is contention, not hook time: ``stats()["hook_time_s"]`` stays 0. With
    ``extra_s=0`` it is the calibration case: busy and idle steps cost the same.

    Args:
        extra_s: extra seconds per step while busy.
        busy_epochs: ``"odd"``, ``"even"``, ``"all"`` or ``"none"``.
        clock: time source (and sleeper).

    Examples:
        >>> from types import SimpleNamespace
        >>> busy = BusyCallback(0.005, busy_epochs="odd", clock=FakeClock())
        >>> busy.on_train_epoch_start(SimpleNamespace(current_epoch=1, global_step=8), None)
        >>> busy.busy()
        True
    """

    def __init__(
        self,
        extra_s: float = 0.0,
        *,
        busy_epochs: Literal["odd", "even", "all", "none"] = "odd",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if isinstance(extra_s, bool) or not isinstance(extra_s, (int, float)) or extra_s < 0:
            raise ValueError(f"`extra_s` must be a number >= 0, got {extra_s!r}")
        if busy_epochs not in ("odd", "even", "all", "none"):
            raise ValueError(f"`busy_epochs` must be 'odd', 'even', 'all' or 'none', got {busy_epochs!r}")
        self.extra_s = float(extra_s)
        self.busy_epochs = busy_epochs
        self._clock = clock
        self.events = EventLog("busy", clock=clock)
        self._busy = False
        self.busy_steps = 0

    def busy(self) -> bool:
        """Whether the pretend background work is in flight."""
        return self._busy

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        odd = trainer.current_epoch % 2 == 1
        self._busy = {"odd": odd, "even": not odd, "all": True, "none": False}[self.busy_epochs]
        if self._busy:
            self.events.emit("eval_start", job=trainer.current_epoch, step=trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._busy:
            self.busy_steps += 1
            self._clock.sleep(self.extra_s)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._busy:
            self.events.emit("eval_end", job=trainer.current_epoch, step=trainer.global_step, outcome="ok")
        self._busy = False

    def stats(self) -> dict[str, float | int]:
        """``busy_steps``; ``hook_time_s`` is 0 (its cost is contention, not hook time)."""
        return {"busy_steps": self.busy_steps, "hook_time_s": 0.0, "hook_calls": 0}


class StepClock(Callback):
    """Advances a :class:`~lightning_evalguard.engine.clock.FakeClock` by ``step_s`` at each training step.

    Stands in for the compute of a step in tests that run a real ``Trainer.fit`` on fake time, so
    step-time figures are exact and no test waits on the wall clock.

    Examples:
        >>> clock = FakeClock()
        >>> StepClock(clock, step_s=0.01).on_train_batch_start(None, None, None, 0)
        >>> clock.now()
        0.01
    """

    def __init__(self, clock: FakeClock, step_s: float = 0.01) -> None:
        if not isinstance(clock, FakeClock):
            raise TypeError(f"`clock` must be a FakeClock, got {clock!r}")
        if isinstance(step_s, bool) or not isinstance(step_s, (int, float)) or step_s < 0:
            raise ValueError(f"`step_s` must be a number >= 0, got {step_s!r}")
        self.clock = clock
        self.step_s = float(step_s)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.clock.advance(self.step_s)
