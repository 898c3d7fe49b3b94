"""GuardedEvaluation: validation on a weight snapshot, concurrently with training, under hard bounds.

The callback is a thin adapter: :class:`~lightning_evalguard.engine.evaluator.Evaluator` does the
work (breaker, bounded queue, snapshot pool, watchdog, runner); this module turns Lightning hooks
into its calls and delivers results back into Lightning on the training thread.
"""

from __future__ import annotations

import copy
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from typing_extensions import override

from lightning_evalguard.callbacks._evaluation_args import check_arguments
from lightning_evalguard.callbacks._lightning import HookTimer, resolve_callable, trainer_val_dataloaders
from lightning_evalguard.engine.evaluator import Evaluator
from lightning_evalguard.engine.events import EventLog
from lightning_evalguard.engine.jobs import Job
from lightning_evalguard.engine.program import EvalProgram
from lightning_evalguard.engine.runners.base import Runner
from lightning_evalguard.engine.snapshot import SnapshotPool, state_tensors
from lightning_evalguard.errors import EvalGuardWarning

__all__ = ["GuardedEvaluation"]

# trainer -> its limit_val_batches before GuardedEvaluation turned Lightning's validation loop off.
_USER_LIMIT_VAL_BATCHES: weakref.WeakKeyDictionary[Trainer, int | float] = weakref.WeakKeyDictionary()


class GuardedEvaluation(Callback):
    """Runs evaluation concurrently with training, on a consistent snapshot of the weights.

    At each trigger (``every_n_epochs`` / ``every_n_steps``) the training thread copies the weights
    into a preallocated slot and queues a job; a runner evaluates the module's own
    ``validation_step`` (with its ``self.log`` calls and torchmetrics) over the validation
    dataloaders on that snapshot. Results come back on the training thread: they are logged to
    every logger at the snapshot's step, put into ``trainer.callback_metrics``, and handed to
    ``EarlyStopping`` and monitored ``ModelCheckpoint`` callbacks. Lightning's own validation loop
    is turned off during ``fit`` (no double evaluation).

    Nothing the evaluation does can stall or kill training: each job has a ``timeout``, repeated
    failures open a circuit breaker, the queue is bounded, and errors become counted warnings.

    Args:
        mode: ``"stream"`` (background thread; on CUDA a side stream), ``"subprocess"`` (a
            persistent worker process, hard-killable), or ``"inline"`` (synchronous, same guards;
            for debugging and as a baseline).
        every_n_epochs: evaluate after every N training epochs (``None``: not by epoch).
        every_n_steps: evaluate every N optimizer steps (``None``: not by step).
        timeout: seconds one evaluation may run before it counts as timed out.
        max_pending: most evaluations queued behind the running one.
        when_full: when the queue is full, ``"skip"`` the new one, ``"replace"`` the oldest queued
            one, or ``"wait"`` (block training, at most ``timeout`` seconds).
        failure_threshold: consecutive failed/timed-out evaluations that open the breaker.
        recovery_time: seconds the breaker stays open before one trial evaluation.
        final_timeout: at the end of training, seconds to wait for queued evaluations.
        limit_batches: batches per dataloader (int) or fraction (float in [0, 1]); ``None`` uses
            the Trainer's ``limit_val_batches`` (all batches if that is 0).
        eval_fn: replaces ``validation_step``: ``eval_fn(module, dataloader) -> Mapping[str, float]``,
            a callable or an import path such as ``"my_pkg.evals:accuracy"``; may be ``async``.
        prefix: prepended to every metric name the evaluation produces.
        cancel_grace: seconds a timed-out job gets to stop before its thread is abandoned; in
            subprocess mode, how long ``fit``'s end waits for the workers to stop before
            ``SIGKILL``.
        kill_grace: subprocess mode: seconds between ``SIGTERM`` and ``SIGKILL`` for a worker whose
            evaluation timed out.
        spare_worker: subprocess mode: keep a second worker warm, so a replacement after a kill or
            crash takes milliseconds instead of a multi-second cold start (it costs that
            worker's memory: a module copy and its imports).
        max_respawns: subprocess mode: worker replacements allowed per ``fit``; after that a
            lost worker turns evaluation off for the rest of the run (with a warning).
        eval_device: subprocess mode: the device the worker evaluates on (default: the training
            device), e.g. ``"cuda:1"`` for a spare GPU, or ``"cpu"``.
        dataloader_factory: subprocess mode: builds the validation dataloader(s) inside the
            worker instead of pickling the trainer's (for dataloaders that cannot be pickled):
            an import path such as ``"my_pkg.data:val_loader"`` or a picklable callable taking
            no argument and returning a dataloader, a list or a dict of them.
        warm_start: subprocess mode: start the worker in the background at fit start rather than
            at the first evaluation, so that evaluation does not wait for the worker's cold start
            (seconds of imports, which then compete with the first training steps instead).
        progress_bar: show the evaluation state in Lightning's progress bar: ``eval_queued`` (jobs
            queued or running) and ``eval_step`` (the snapshot step of the last result), next to
            the metrics your ``validation_step`` logs with ``prog_bar=True``.
        eval_threads: torch intra-op (CPU) threads the evaluation uses: of the worker thread in
            stream mode (``torch.set_num_threads`` is per thread), of the worker process in
            subprocess mode, for the duration of a job in inline mode. ``None`` (default): the
            training process's setting. On a CPU where training already uses every core, 1 keeps
            evaluation from oversubscribing them.

    Raises:
        ValueError: for an unknown mode, a non-positive interval, both triggers ``None``, a bad
            number, an ``eval_fn`` or ``dataloader_factory`` path that cannot be imported, a bad
            ``eval_device``, or ``eval_device`` / ``dataloader_factory`` outside subprocess mode.
        TypeError: for an ``eval_fn`` or ``dataloader_factory`` that is neither callable nor a
            string, or a non-bool ``spare_worker``.

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> guard = GuardedEvaluation(mode="stream", every_n_epochs=1, timeout=600.0)
        >>> trainer = Trainer(callbacks=[guard], logger=False, enable_progress_bar=False)
        >>> guard.stats()["submitted"]
        0
    """

    def __init__(
        self,
        mode: Literal["stream", "subprocess", "inline"] = "stream",
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        timeout: float = 600.0,
        max_pending: int = 1,
        when_full: Literal["skip", "replace", "wait"] = "skip",
        failure_threshold: int = 3,
        recovery_time: float = 300.0,
        final_timeout: float = 60.0,
        limit_batches: int | float | None = None,
        eval_fn: Callable[..., Any] | str | None = None,
        prefix: str = "",
        cancel_grace: float = 5.0,
        kill_grace: float = 5.0,
        spare_worker: bool = True,
        max_respawns: int = 5,
        eval_device: str | None = None,
        dataloader_factory: Callable[[], Any] | str | None = None,
        warm_start: bool = False,
        progress_bar: bool = True,
        eval_threads: int | None = None,
    ) -> None:
        check_arguments(
            mode=mode, every_n_epochs=every_n_epochs, every_n_steps=every_n_steps, timeout=timeout,
            max_pending=max_pending, when_full=when_full, failure_threshold=failure_threshold,
            recovery_time=recovery_time, final_timeout=final_timeout, limit_batches=limit_batches,
            prefix=prefix, cancel_grace=cancel_grace, kill_grace=kill_grace, spare_worker=spare_worker,
            max_respawns=max_respawns, eval_device=eval_device, dataloader_factory=dataloader_factory,
            warm_start=warm_start, progress_bar=progress_bar, eval_threads=eval_threads,
        )
        self.mode = mode
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.timeout = float(timeout)
        self.max_pending = max_pending
        self.when_full = when_full
        self.failure_threshold = failure_threshold
        self.recovery_time = float(recovery_time)
        self.final_timeout = float(final_timeout)
        self.limit_batches = limit_batches
        self.eval_fn_spec = eval_fn
        self.eval_fn = resolve_callable(eval_fn, "eval_fn")
        self.prefix = prefix
        self.cancel_grace = float(cancel_grace)
        self.kill_grace = float(kill_grace)
        self.spare_worker = spare_worker
        self.max_respawns = max_respawns
        self.eval_device = eval_device
        self.dataloader_factory_spec = dataloader_factory
        self.dataloader_factory = resolve_callable(dataloader_factory, "dataloader_factory")
        self.warm_start = warm_start
        self.progress_bar = progress_bar
        self.eval_threads = eval_threads

        self.events = EventLog("evaluation")
        self._evaluator: Evaluator | None = None
        self._program: EvalProgram | None = None
        self._restored: dict[str, Any] = {}
        self._hooks = HookTimer()
        self._user_limit_val_batches: int | float | None = None
        self._adopted: list[Callback] = []
        self._warned: set[str] = set()
        self._last_step_trigger = -1
        self._eval_rank = True
        self._world_size = 1
        self.delivered = 0
        self.final_wait_s = 0.0
        self.last_metrics: dict[str, float] = {}

    # -- public surface --------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            mode=self.mode, every_n_epochs=self.every_n_epochs, every_n_steps=self.every_n_steps, prefix=self.prefix
        )

    def stats(self) -> dict[str, float | int]:
        """Counters and figures as plain numbers (see the docs for every key)."""
        if self._evaluator is not None:
            out = self._evaluator.stats()
        else:
            out = dict.fromkeys(
                ("submitted", "completed", "failed", "timed_out", "cancelled", "skipped_breaker_open",
                 "skipped_queue_full", "replaced", "abandoned_threads", "pending", "running",
                 "breaker_state"), 0
            )
            out.update(dict.fromkeys(("last_latency_s", "latency_p50_s", "latency_p95_s",
                                      "watchdog_lag_p95_s", "watchdog_lag_max_s"), 0.0))
            if self.mode == "subprocess":  # the worker's figures, before any worker exists
                out.update(respawns=0, worker_pid=0, worker_cold_start_s=0.0, snapshot_copy_s=0.0)
            for name, value in self._restored.get("evaluator", {}).get("counts", {}).items():
                out[name] = value
        out.update(delivered=self.delivered, hook_time_s=self._hooks.seconds, hook_calls=self._hooks.calls,
                   final_wait_s=self.final_wait_s)
        return out

    def busy(self) -> bool:
        """Whether an evaluation is running or queued (cheap; for the monitor)."""
        ev = self._evaluator
        return ev is not None and (len(ev.queue) > 0 or ev.runner.running() > 0)

    def release_buffers(self, min_idle_s: float = 60.0) -> int:
        """Free snapshot slots beyond one that no evaluation has used for ``min_idle_s`` seconds;
        returns the bytes released.

        The age limit keeps a slot that overlapping evaluations keep needing: rebuilding it would
        copy the module on the training thread at the next trigger. In subprocess mode the shared
        slots are mapped by the worker for the whole fit: nothing is released and 0 is returned.
        """
        if self._evaluator is None or self.mode == "subprocess":
            return 0
        return self._evaluator.pool.release_idle(keep=1, min_idle_s=min_idle_s)

    @override
    def state_dict(self) -> dict[str, Any]:
        evaluator = self._evaluator.state_dict() if self._evaluator is not None else self._restored.get("evaluator", {})
        return {"evaluator": evaluator, "last_step_trigger": self._last_step_trigger, "delivered": self.delivered}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = copy.deepcopy(dict(state_dict))
        self._last_step_trigger = int(state_dict.get("last_step_trigger", -1))
        self.delivered = int(state_dict.get("delivered", 0))
        if self._evaluator is not None:
            self._evaluator.load_state_dict(self._restored.get("evaluator", {}))

    # -- set-up ----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        with self._hooks():
            # Turn Lightning's own validation loop off while we run evaluation (restored at teardown).
            # Several instances may share a trainer: the first one saves the user's value.
            if trainer not in _USER_LIMIT_VAL_BATCHES:
                _USER_LIMIT_VAL_BATCHES[trainer] = trainer.limit_val_batches
                trainer.limit_val_batches = 0
            self._user_limit_val_batches = _USER_LIMIT_VAL_BATCHES[trainer]

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with self._hooks():
            self._world_size = trainer.world_size
            self._eval_rank = trainer.global_rank == 0
            self._adopt_monitoring_callbacks(trainer)
            if self._eval_rank:
                self._build(trainer, pl_module)

    def _build(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dataloaders = trainer_val_dataloaders(trainer)
        if not dataloaders and self.eval_fn is None and self.dataloader_factory is None:
            raise ValueError(
                "GuardedEvaluation found no validation dataloader: pass `val_dataloaders` to `fit`, define "
                "`val_dataloader()` on the module or datamodule, or give `eval_fn`"
            )
        limit = self.limit_batches
        if limit is None and self._user_limit_val_batches not in (None, 0):
            limit = self._user_limit_val_batches
        self._program = EvalProgram(dataloaders, limit, self.eval_fn)
        if self._evaluator is not None:  # a second fit with this callback: keep the counters
            self._restored = {**self._restored, "evaluator": self._evaluator.state_dict()}
        runner, factory = self._make_runner(pl_module)
        self._evaluator = Evaluator(
            runner,
            SnapshotPool(factory, size=self.max_pending + 1),
            max_pending=self.max_pending,
            when_full=self.when_full,
            timeout=self.timeout,
            failure_threshold=self.failure_threshold,
            recovery_time=self.recovery_time,
            events=self.events,
        )
        if self._restored.get("evaluator"):
            self._evaluator.load_state_dict(self._restored["evaluator"])
        self._evaluator.start()
        if self.mode == "subprocess":
            if self.warm_start:
                runner.prestart()  # type: ignore[attr-defined]
        else:  # make the first slot now (a module copy), not on the training thread at the first trigger
            pool = self._evaluator.pool
            slot = pool.acquire()
            if slot is not None:
                pool.release(slot)

    def _make_runner(self, pl_module: LightningModule) -> tuple[Runner, Callable[[], Any]]:
        """The runner for ``mode`` and the factory of its snapshot slots."""
        if self.mode == "subprocess":
            return self._make_subprocess_runner(pl_module)

        def make_shadow() -> tuple[list[torch.Tensor], LightningModule]:
            # LightningModule.__getstate__ drops the trainer, so this copies the module only.
            shadow = copy.deepcopy(pl_module)
            shadow.requires_grad_(False)
            shadow.eval()
            return state_tensors(shadow), shadow

        runner: Runner
        if self.mode == "inline":
            from lightning_evalguard.engine.runners.inline import InlineRunner

            runner = InlineRunner(self._execute, cancel_grace=self.cancel_grace, threads=self.eval_threads)
        else:
            from lightning_evalguard.engine.runners.stream import StreamRunner

            runner = StreamRunner(self._execute, cancel_grace=self.cancel_grace, threads=self.eval_threads)
        return runner, make_shadow

    def _make_subprocess_runner(self, pl_module: LightningModule) -> tuple[Runner, Callable[[], Any]]:
        """A persistent worker process; the module, program and shared slots are built now, on the
        training thread, so a pickling problem is reported at set-up with what to change."""
        from lightning_evalguard.engine.runners.subprocess import SubprocessRunner

        assert self._program is not None
        program = self._program
        if self.dataloader_factory is not None:  # the worker builds its own; the trainer's stay here
            program = EvalProgram([], program.limit_batches, program.eval_fn)
        device = torch.device(self.eval_device) if self.eval_device is not None else pl_module.device
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"`eval_device`={self.eval_device!r} is a CUDA device, but CUDA is not available")
        try:
            runner = SubprocessRunner.for_module(
                pl_module,
                program,
                slots=self.max_pending + 1,
                eval_device=device,
                dataloader_factory=self.dataloader_factory,
                kill_grace=self.kill_grace,
                spare_worker=self.spare_worker,
                max_respawns=self.max_respawns,
                # A cold start imports torch and Lightning and builds the dataloaders: allow it more
                # than a short evaluation timeout.
                start_timeout=max(self.timeout, 300.0),
                threads=self.eval_threads,
            )
        except TypeError as exc:
            raise TypeError(f"GuardedEvaluation(mode='subprocess'): {exc}") from exc.__cause__
        return runner, runner.slot_factory

    def _execute(self, job: Job) -> Any:
        assert self._program is not None
        return self._program.run(job.slot.payload, job)

    def _adopt_monitoring_callbacks(self, trainer: Trainer) -> None:
        """EarlyStopping and monitored ModelCheckpoint act when our results arrive, as they would
        after Lightning's validation (Lightning private flags: they would otherwise check at
        train-epoch end, before any asynchronous result exists)."""
        self._adopted = []
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, EarlyStopping):
                cb._check_on_train_epoch_end = False
                self._adopted.append(cb)
            elif isinstance(cb, ModelCheckpoint) and cb.monitor is not None:
                cb._save_on_train_epoch_end = False
                self._adopted.append(cb)

    # -- triggers --------------------------------------------------------------------------------
    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Runs every step: kept to a few microseconds when there is nothing to do.
        start = time.perf_counter()
        try:
            triggered = False
            if self.every_n_steps is not None:
                step = trainer.global_step
                triggered = step > 0 and step != self._last_step_trigger and step % self.every_n_steps == 0
                if triggered:
                    self._last_step_trigger = step
                    self._request(trainer, pl_module)
            if triggered or (self._world_size == 1 and self._evaluator is not None and self._evaluator.has_outcomes()):
                self._sync_and_deliver(trainer, pl_module)
        finally:
            self._hooks.add(time.perf_counter() - start)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with self._hooks():
            if self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
                self._request(trainer, pl_module)
            self._sync_and_deliver(trainer, pl_module)

    def _request(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._evaluator is None:
            return
        outcome = self._evaluator.request(trainer.global_step, trainer.current_epoch, state_tensors(pl_module))
        if outcome == "skipped_breaker_open" and self._evaluator.gave_up is None:
            self._warn_once("breaker_open", "evaluation skipped: the circuit breaker is open after repeated failures")
        self._show_progress(trainer)

    def _show_progress(self, trainer: Trainer, last_step: int | None = None) -> None:
        """Evaluation state in the progress bar: jobs queued or running, and the snapshot step of
        the last result (written when they change, never per step)."""
        if not self.progress_bar:
            return
        metrics = trainer.progress_bar_metrics
        if self._evaluator is not None:
            metrics[f"{self.prefix}eval_queued"] = len(self._evaluator.queue) + self._evaluator.runner.running()
        if last_step is not None:
            metrics[f"{self.prefix}eval_step"] = last_step

    # -- delivery --------------------------------------------------------------------------------
    def _drain_records(self) -> list[dict[str, Any]]:
        """Finished jobs as plain, picklable records (broadcast as-is under DDP)."""
        if self._evaluator is None:
            return []
        records = []
        for job in self._evaluator.drain():
            record: dict[str, Any] = {"job": job.id, "step": job.step, "epoch": job.epoch, "state": job.state,
                                      "latency_s": job.latency_s}
            if job.state == "ok":
                result = job.result
                record["values"] = dict(result.values)
                record["logger_keys"] = sorted(result.logger_keys)
                record["prog_bar_keys"] = sorted(result.prog_bar_keys)
            elif job.error is not None:
                record["error"] = "".join(traceback.format_exception(job.error)).rstrip()
                first_line = (str(job.error).splitlines() or [""])[0]
                record["error_key"] = f"{type(job.error).__name__}: {first_line}"
            records.append(record)
        if self._evaluator.gave_up is not None:
            self._warn_once("gave_up", self._evaluator.gave_up)
        return records

    def _sync_and_deliver(self, trainer: Trainer, pl_module: LightningModule) -> None:
        records = self._drain_records() if self._eval_rank else []
        if self._world_size > 1:  # on the training thread, at the same hook on every rank
            records = trainer.strategy.broadcast(records, src=0)
        if records:
            self._deliver(trainer, pl_module, records)

    def _deliver(self, trainer: Trainer, pl_module: LightningModule, records: list[dict[str, Any]]) -> None:
        self._show_progress(trainer)
        for record in records:
            state = record["state"]
            if state == "ok":
                self._deliver_result(trainer, pl_module, record)
            elif state == "timeout":
                self._warn_once("timeout",
                                f"evaluation of step {record['step']} timed out after {self.timeout:g}s; "
                                "training went on (see GuardedEvaluation.stats())")
            elif state == "failed":
                self._warn_once(f"failed:{record.get('error_key')}",
                                f"evaluation of step {record['step']} failed ({record.get('error_key')}); "
                                f"training went on:\n{record.get('error')}")

    def _deliver_result(self, trainer: Trainer, pl_module: LightningModule, record: dict[str, Any]) -> None:
        values: Mapping[str, float] = record["values"]
        step, latency = record["step"], record["latency_s"] or 0.0
        named = {self.prefix + k: v for k, v in values.items()}
        extra = {"evalguard/eval_latency_s": latency, "evalguard/snapshot_step": float(step)}
        to_log = {self.prefix + k: values[k] for k in record["logger_keys"]}
        to_log.update(extra, epoch=float(record["epoch"]))
        for logger in trainer.loggers:
            logger.log_metrics(to_log, step=step)
        device = pl_module.device
        trainer.callback_metrics.update({k: torch.tensor(v, device=device) for k, v in {**named, **extra}.items()})
        trainer.progress_bar_metrics.update({self.prefix + k: values[k] for k in record["prog_bar_keys"]})
        self._show_progress(trainer, last_step=step)
        self.last_metrics = dict(named)
        self.delivered += 1
        for cb in self._adopted:
            cb.on_validation_end(trainer, pl_module)

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        if self._eval_rank:
            warnings.warn(message, EvalGuardWarning, stacklevel=2)

    # -- the end ---------------------------------------------------------------------------------
    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Waiting for the last evaluations happens once, after training: it is reported as
        # final_wait_s, not as per-step hook time.
        start = time.perf_counter()
        if self._evaluator is not None and not self._evaluator.wait_idle(self.final_timeout):
            self._warn_once("final_timeout", f"evaluations still running after final_timeout="
                            f"{self.final_timeout:g}s were cancelled")
        if self._evaluator is not None:
            self._evaluator.close(timeout=self.cancel_grace)
        self.final_wait_s = time.perf_counter() - start
        with self._hooks():
            self._sync_and_deliver(trainer, pl_module)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._shutdown(trainer)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._shutdown(trainer)

    def _shutdown(self, trainer: Trainer) -> None:
        """Stop everything we started (idempotent); restore Lightning's validation setting."""
        if self._evaluator is not None:
            self._evaluator.close(timeout=self.cancel_grace)
            self._evaluator.pool.clear()
        user_limit = _USER_LIMIT_VAL_BATCHES.pop(trainer, None)  # the first instance to stop restores it
        if user_limit is not None:
            trainer.limit_val_batches = user_limit

    def __repr__(self) -> str:
        return (
            f"GuardedEvaluation(mode={self.mode!r}, every_n_epochs={self.every_n_epochs}, "
            f"every_n_steps={self.every_n_steps}, timeout={self.timeout})"
        )
