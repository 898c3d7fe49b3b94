"""GuardedEvaluation in real Trainer.fit runs (stream and inline modes)."""

from __future__ import annotations

import asyncio
import copy
import signal
import threading
import time
import warnings
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lightning_evalguard import EvalGuardWarning, GuardedEvaluation
from tests.models import (
    Classifier,
    HangAtEpoch,
    MemoryLogger,
    Raising,
    SlowValidation,
    StuckInCall,
    make_loader,
)

OUTCOMES = ("completed", "failed", "timed_out", "cancelled", "replaced", "pending", "running")


def val_loaders(n: int = 2) -> list:
    return [make_loader(48, seed=1), make_loader(32, seed=2)][:n]


def fit(model: LightningModule, guard: Callback, *, n_val: int = 2, extra: list | None = None,
        logger: Any = False, n_train: int = 128, **trainer_kwargs: Any) -> Trainer:
    trainer_kwargs.setdefault("max_epochs", 2)
    trainer = Trainer(
        callbacks=[guard, *(extra or [])],
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=trainer_kwargs.pop("enable_checkpointing", False),
        **trainer_kwargs,
    )
    trainer.fit(model, make_loader(n_train, shuffle=True), val_loaders(n_val))
    return trainer


def identity_holds(stats: dict[str, Any]) -> bool:
    return stats["submitted"] == sum(stats[k] for k in OUTCOMES)


def evalguard_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("evalguard")]


@pytest.mark.parametrize("mode", ["stream", "inline"])
def test_results_equal_lightnings_own_validation(mode: str) -> None:
    seed_everything(0)
    model = Classifier()
    guard = GuardedEvaluation(mode=mode, timeout=60.0)
    trainer = fit(model, guard, max_epochs=2)
    stats = guard.stats()
    assert stats["completed"] == 2
    assert stats["delivered"] == 2
    # The last snapshot was taken after the last optimizer step: the same weights validate() sees.
    reference = trainer.validate(model, val_loaders(), verbose=False)
    expected = {k: v for d in reference for k, v in d.items()}
    assert set(expected) == set(guard.last_metrics)
    assert len(expected) == 6  # loss, first_logit, acc x 2 dataloaders
    diff = max(abs(guard.last_metrics[k] - expected[k]) for k in expected)
    assert diff <= 1e-6
    for key, value in expected.items():
        assert float(trainer.callback_metrics[key]) == pytest.approx(value, abs=1e-6)


class RecordWeights(Callback):
    """Keeps the weights after every step where GuardedEvaluation triggers, and when results land."""

    def __init__(self, guard: GuardedEvaluation, every: int) -> None:
        self.guard, self.every = guard, every
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.delivered_at: list[int] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            self.weights[trainer.global_step] = copy.deepcopy(pl_module.state_dict())
        while len(self.delivered_at) < self.guard.delivered:
            self.delivered_at.append(trainer.global_step)


def test_snapshot_is_consistent_while_training_moves_on() -> None:
    seed_everything(1)
    model = SlowValidation(delay=0.01, lr=0.5)
    guard = GuardedEvaluation(every_n_epochs=None, every_n_steps=3, timeout=60.0, when_full="skip")
    recorder = RecordWeights(guard, every=3)
    logger = MemoryLogger()
    fit(model, guard, extra=[recorder], logger=logger, max_epochs=3, n_train=512)
    rows = logger.rows_with("evalguard/snapshot_step")
    assert len(rows) >= 3
    # Training went on while evaluations ran: results landed many steps after their snapshot.
    snapshot_steps = [step for step, _ in rows]
    lags = [delivered - snap for delivered, snap in zip(recorder.delivered_at, snapshot_steps, strict=False)]
    assert max(lags) >= 3
    checker = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    for step, row in rows:
        assert row["evalguard/snapshot_step"] == step
        assert row["evalguard/eval_latency_s"] > 0
        offline = Classifier()
        offline.load_state_dict(recorder.weights[step])
        reference = {k: v for d in checker.validate(offline, val_loaders(), verbose=False) for k, v in d.items()}
        for key, value in reference.items():
            assert row[key] == pytest.approx(value, abs=1e-6), (step, key)


def test_hanging_validation_step_times_out_and_other_epochs_are_logged() -> None:
    model = HangAtEpoch(hang_epoch=1)
    guard = GuardedEvaluation(timeout=1.0, cancel_grace=3.0, max_pending=3, final_timeout=30.0)
    logger = MemoryLogger()
    with pytest.warns(EvalGuardWarning, match="timed out"):
        trainer = fit(model, guard, logger=logger, max_epochs=4)
    assert trainer.state.finished
    stats = guard.stats()
    assert stats["timed_out"] == 1
    assert stats["completed"] == 3
    assert stats["abandoned_threads"] == 0
    logged_epochs = sorted(int(row["epoch"]) for _, row in logger.rows_with("val/loss/dataloader_idx_0"))
    assert logged_epochs == [0, 2, 3]
    _, events = guard.events.since(0)
    (end,) = [e for e in events if e.kind == "eval_end" and e.fields["outcome"] == "timeout"]
    assert end.fields["latency_s"] <= 1.0 + 1.0


def test_validation_stuck_in_one_long_call_abandons_threads_and_gives_up() -> None:
    StuckInCall.release.clear()
    guard = GuardedEvaluation(timeout=0.3, cancel_grace=0.3, max_pending=2, final_timeout=20.0)
    try:
        start = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = fit(StuckInCall(), guard, max_epochs=3)
        assert trainer.state.finished
        assert time.monotonic() - start < 20
        stats = guard.stats()
        assert stats["abandoned_threads"] == 2
        assert stats["timed_out"] == 2
        assert stats["breaker_state"] == 1  # pinned open for the rest of the run
        assert identity_holds(stats)
        messages = [str(w.message) for w in caught if issubclass(w.category, EvalGuardWarning)]
        assert any("abandoned" in m for m in messages)
    finally:
        StuckInCall.release.set()


def test_raising_validation_opens_the_breaker_and_warns_once() -> None:
    guard = GuardedEvaluation(mode="inline", failure_threshold=2, recovery_time=300.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(Raising(), guard, max_epochs=5)
    assert trainer.state.finished
    stats = guard.stats()
    assert stats["failed"] == 2
    assert stats["skipped_breaker_open"] == 3
    assert stats["breaker_state"] == 1
    failures = [w for w in caught if "validation exploded" in str(w.message)]
    assert len(failures) == 1  # once per distinct error
    assert "Traceback" in str(failures[0].message)
    assert sum("circuit breaker is open" in str(w.message) for w in caught) == 1


@pytest.mark.parametrize("when_full", ["skip", "replace", "wait"])
def test_queue_policies_with_a_trigger_every_step(when_full: str) -> None:
    guard = GuardedEvaluation(every_n_epochs=None, every_n_steps=1, max_pending=2, when_full=when_full,
                              limit_batches=1, timeout=30.0)
    fit(SlowValidation(delay=0.01), guard, n_val=1, max_steps=30, max_epochs=-1)
    stats = guard.stats()
    assert identity_holds(stats)
    assert stats["pending"] == 0
    assert stats["running"] == 0
    assert stats["snapshot_slots_peak"] <= 3
    assert stats["submitted"] + stats["skipped_queue_full"] == 30
    if when_full == "skip":
        assert stats["skipped_queue_full"] > 0
    elif when_full == "replace":
        assert stats["replaced"] > 0
    else:
        assert stats["completed"] == 30


def test_early_stopping_acts_on_asynchronous_results() -> None:
    seed_everything(0)
    model = Classifier(lr=0.0)  # nothing improves
    stopper = EarlyStopping(monitor="val/loss", patience=2, mode="min")
    trainer = fit(model, GuardedEvaluation(), n_val=1, extra=[stopper], max_epochs=30)
    assert stopper.stopped_epoch > 0
    assert trainer.current_epoch < 10


def test_model_checkpoint_monitors_asynchronous_results(tmp_path: Any) -> None:
    seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/loss", save_top_k=1, mode="min")
    logger = MemoryLogger()
    fit(Classifier(), GuardedEvaluation(), n_val=1, extra=[checkpoint], logger=logger, max_epochs=3,
        enable_checkpointing=True)
    assert checkpoint.best_model_path
    assert (tmp_path / checkpoint.best_model_path.split("/")[-1]).exists()
    logged = [row["val/loss"] for _, row in logger.rows_with("val/loss")]
    assert len(logged) == 3
    # Every delivered result was offered to the checkpoint callback: it kept the best of them.
    assert float(checkpoint.best_model_score) == pytest.approx(min(logged), abs=1e-6)


class InterruptAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_keyboard_interrupt_mid_run_leaves_no_thread() -> None:
    guard = GuardedEvaluation(every_n_epochs=None, every_n_steps=2, timeout=60.0)
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning turns Ctrl-C into a graceful exit(1)
            fit(SlowValidation(delay=0.2), guard, extra=[InterruptAt(5)], max_epochs=5)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 5.0
    while evalguard_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert evalguard_threads() == []
    assert guard.stats()["cancelled"] >= 1


class CountingClassifier(Classifier):
    def __init__(self) -> None:
        super().__init__(num_val_loaders=1)
        self.calls = 0

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.calls += 1
        super().validation_step(batch, batch_idx, dataloader_idx)


def test_lightnings_own_validation_loop_is_off_during_fit_and_restored_after() -> None:
    model = CountingClassifier()
    guard = GuardedEvaluation()
    trainer = fit(model, guard, n_val=1, max_epochs=2, limit_val_batches=2)
    assert model.calls == 0  # only the snapshot copies ran validation_step
    assert guard.stats()["completed"] == 2
    assert trainer.limit_val_batches == 2
    trainer.validate(model, val_loaders(1), verbose=False)
    assert model.calls == 2  # Lightning's loop works again, with the user's limit


class SlotsAtTrainStart(Callback):
    def __init__(self, guard: GuardedEvaluation) -> None:
        self.guard = guard
        self.slots = -1

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.slots = int(self.guard.stats()["snapshot_slots"])


def test_first_snapshot_slot_is_made_before_training_and_idle_slots_can_be_released() -> None:
    guard = GuardedEvaluation(every_n_epochs=None, every_n_steps=1, max_pending=3, when_full="wait",
                              limit_batches=1)
    probe = SlotsAtTrainStart(guard)
    seen: list[int] = []

    class Release(Callback):
        def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
            assert guard._evaluator is not None
            guard._evaluator.wait_idle(30)
            seen.append(guard.release_buffers(min_idle_s=0.0))

    fit(SlowValidation(delay=0.01), guard, n_val=1, extra=[probe, Release()], max_epochs=2)
    assert probe.slots == 1  # the module copy was made at fit start, not at the first trigger
    assert guard.stats()["snapshot_slots_peak"] >= 2
    assert seen[0] > 0  # idle slots beyond one were given back
    assert guard.stats()["final_wait_s"] >= 0.0


def test_trainer_limit_val_batches_is_respected_by_default() -> None:
    logger = MemoryLogger()
    guard = GuardedEvaluation(eval_fn=lambda module, dl: {"batches": float(sum(1 for _ in dl))})
    fit(Classifier(), guard, logger=logger, limit_val_batches=1, max_epochs=1)
    (_, row), = logger.rows_with("batches/dataloader_idx_0")
    assert row["batches/dataloader_idx_0"] == 1.0


def test_resume_keeps_counters(tmp_path: Any) -> None:
    seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    guard = GuardedEvaluation(mode="inline")
    fit(Classifier(), guard, extra=[checkpoint], max_epochs=2, enable_checkpointing=True)
    assert guard.stats()["completed"] == 2
    resumed = GuardedEvaluation(mode="inline")
    trainer = Trainer(callbacks=[resumed, ModelCheckpoint(dirpath=tmp_path)], max_epochs=3, logger=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Classifier(), make_loader(128), val_loaders(), ckpt_path=str(tmp_path / "last.ckpt"))
    stats = resumed.stats()
    assert stats["submitted"] == 3
    assert stats["completed"] == 3


@pytest.mark.parametrize("eval_fn", ["tests.models:mean_logit_eval", "tests.models.async_mean_logit_eval"])
def test_eval_fn_from_an_import_path(eval_fn: str) -> None:
    logger = MemoryLogger()
    guard = GuardedEvaluation(eval_fn=eval_fn, prefix="guard/")
    fit(Classifier(), guard, n_val=1, logger=logger, max_epochs=1)
    (_, row), = logger.rows_with("guard/custom/mean_logit")
    assert isinstance(row["guard/custom/mean_logit"], float)


def test_async_eval_fn_inline_inside_a_running_event_loop() -> None:
    """Like a Jupyter cell: fit() is called while an event loop runs on the same thread."""
    logger = MemoryLogger()

    async def cell() -> None:
        guard = GuardedEvaluation(mode="inline", eval_fn="tests.models:async_mean_logit_eval")
        fit(Classifier(), guard, n_val=1, logger=logger, max_epochs=1)

    asyncio.run(cell())
    assert logger.rows_with("custom/mean_logit")


def test_eval_fn_returning_garbage_is_a_counted_failure() -> None:
    guard = GuardedEvaluation(mode="inline", eval_fn=lambda module, dl: ["not", "a", "mapping"])
    with pytest.warns(EvalGuardWarning, match="expected a mapping of str to numbers"):
        fit(Classifier(), guard, n_val=1, max_epochs=2)
    assert guard.stats()["failed"] == 2


def test_no_validation_data_fails_at_fit_start_with_a_clear_error() -> None:
    guard = GuardedEvaluation()
    trainer = Trainer(callbacks=[guard], max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False)
    with pytest.raises(ValueError, match="found no validation dataloader"):
        trainer.fit(Classifier(), make_loader(32))
    assert evalguard_threads() == []


def test_two_instances_coexist_with_distinct_state_keys() -> None:
    a = GuardedEvaluation(prefix="a/")
    b = GuardedEvaluation(prefix="b/", every_n_epochs=None, every_n_steps=4)
    assert a.state_key != b.state_key
    logger = MemoryLogger()
    model = CountingClassifier()
    trainer = fit(model, a, n_val=1, extra=[b], logger=logger, max_epochs=1, limit_val_batches=2)
    assert logger.rows_with("a/val/loss")
    assert logger.rows_with("b/val/loss")
    assert model.calls == 0  # Lightning's own loop stayed off
    assert trainer.limit_val_batches == 2  # and the user's setting came back, whichever stopped first
    assert a._user_limit_val_batches == b._user_limit_val_batches == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "threads"}, ValueError, r"`mode` must be one of .* got 'threads'"),
        ({"every_n_epochs": 0}, ValueError, r"`every_n_epochs` must be a positive int or None, got 0"),
        ({"every_n_steps": -3}, ValueError, r"`every_n_steps` must be a positive int or None, got -3"),
        ({"every_n_epochs": None}, ValueError, r"both None"),
        ({"timeout": -1.0}, ValueError, r"`timeout` must be a finite number > 0, got -1.0"),
        ({"timeout": 0}, ValueError, r"`timeout` must be a finite number > 0, got 0"),
        ({"max_pending": 0}, ValueError, r"`max_pending` must be an int >= 1, got 0"),
        ({"when_full": "block"}, ValueError, r"`when_full` must be one of .* got 'block'"),
        ({"failure_threshold": 0}, ValueError, r"`failure_threshold` must be an int >= 1, got 0"),
        ({"recovery_time": float("nan")}, ValueError, r"`recovery_time` must be a finite number >= 0, got nan"),
        ({"final_timeout": -5}, ValueError, r"`final_timeout` must be a finite number >= 0, got -5"),
        ({"limit_batches": 1.5}, ValueError, r"`limit_batches` must be .* got 1.5"),
        ({"eval_fn": 42}, TypeError, r"`eval_fn` must be a callable or an import path string, got 42"),
        ({"eval_fn": "no.such.module:fn"}, ValueError, r"`eval_fn`='no.such.module:fn' could not be imported"),
        ({"prefix": 3}, TypeError, r"`prefix` must be a str, got 3"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        GuardedEvaluation(**kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stream_mode_on_cuda_matches_validate_without_host_sync() -> None:
    seed_everything(0)
    model = Classifier()
    guard = GuardedEvaluation(mode="stream", timeout=120.0)
    trainer = fit(model, guard, accelerator="gpu", devices=1, max_epochs=2)
    assert guard.stats()["completed"] == 2
    reference = {k: v for d in trainer.validate(model, val_loaders(), verbose=False) for k, v in d.items()}
    assert max(abs(guard.last_metrics[k] - v) for k, v in reference.items()) <= 1e-5


@pytest.mark.parametrize("progress_bar", [True, False])
def test_progress_bar_shows_the_evaluation_state(progress_bar: bool) -> None:
    guard = GuardedEvaluation(mode="inline", progress_bar=progress_bar)
    trainer = fit(Classifier(), guard, n_val=1, max_epochs=2, n_train=64)
    shown = trainer.progress_bar_metrics
    if progress_bar:
        assert shown["eval_step"] == trainer.global_step  # the last snapshot: after the last step
        assert shown["eval_queued"] == 0
    else:
        assert "eval_step" not in shown
        assert "eval_queued" not in shown
