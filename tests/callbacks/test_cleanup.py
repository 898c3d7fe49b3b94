"""ResourceCleanup on real Trainer.fit runs (CPU; the CUDA paths where a GPU exists)."""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_evalguard import GuardedEvaluation, ResourceCleanup
from lightning_evalguard.engine.memory import MemoryReading, cuda_in_use, read_memory, release_cuda_cache
from tests.models import Classifier, MemoryLogger, TinyRegressor, make_loader

STEPS_PER_EPOCH = 8


def fit(callbacks: list[Callback], epochs: int = 4, logger: Any = False, **trainer_kwargs: Any) -> Trainer:
    data = TensorDataset(torch.randn(4 * STEPS_PER_EPOCH, 4), torch.randn(4 * STEPS_PER_EPOCH, 1))
    trainer = Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        **trainer_kwargs,
    )
    trainer.fit(TinyRegressor(), DataLoader(data, batch_size=4))
    return trainer


class FakeEvaluation(Callback):
    """GuardedEvaluation's surface: a job runs over the two steps before each step in ``finish_at``."""

    def __init__(
        self, finish_at: set[int], release_bytes: int = 1000, fail_release: bool = False, looks_busy: bool = True
    ) -> None:
        self.finish_at = finish_at
        self.release_bytes = release_bytes
        self.fail_release = fail_release
        self.looks_busy = looks_busy
        self.completed = 0
        self.step = 0
        self.stats_calls = 0
        self.release_calls = 0

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self.step = trainer.global_step
        if self.step in self.finish_at:
            self.completed += 1

    def busy(self) -> bool:
        return self.looks_busy and any(end - 2 <= self.step < end for end in self.finish_at)

    def stats(self) -> dict[str, float | int]:
        self.stats_calls += 1
        return {"completed": self.completed, "failed": 0, "timed_out": 0, "cancelled": 0, "hook_time_s": 0.0}

    def release_buffers(self) -> int:
        self.release_calls += 1
        if self.fail_release:
            raise RuntimeError("cannot release")
        return self.release_bytes


@pytest.fixture
def gc_off() -> Iterator[None]:
    """Only the callback collects: automatic collections would make the counts meaningless."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# ---- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every_n_epochs": -1}, ValueError, r"`every_n_epochs` must be >= 0 .*, got -1"),
        ({"every_n_epochs": 1.0}, TypeError, r"`every_n_epochs` must be an int, got 1.0"),
        ({"every_n_epochs": True}, TypeError, r"`every_n_epochs` must be an int, got True"),
        ({"gc_generation": 3}, ValueError, r"`gc_generation` must be 0, 1 or 2, got 3"),
        ({"gc_generation": "2"}, TypeError, r"`gc_generation` must be an int, got '2'"),
        ({"gc_collect": 1}, TypeError, r"`gc_collect` must be a bool, got 1"),
        ({"empty_cuda_cache": "yes"}, TypeError, r"`empty_cuda_cache` must be a bool, got 'yes'"),
        ({"reset_peak_memory": None}, TypeError, r"`reset_peak_memory` must be a bool, got None"),
        ({"after_evaluation": 0}, TypeError, r"`after_evaluation` must be a bool, got 0"),
        ({"freeze_startup_objects": 1}, TypeError, r"`freeze_startup_objects` must be a bool, got 1"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ResourceCleanup(**kwargs)


def test_builds_from_a_lightningcli_style_config() -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ResourceCleanup, "cleanup")
    cfg = parser.parse_args(["--cleanup.every_n_epochs=2", "--cleanup.gc_generation=1"])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    built = instantiate(cfg).cleanup
    assert (built.every_n_epochs, built.gc_generation, built.after_evaluation) == (2, 1, True)


# ---- epoch-end cleanups --------------------------------------------------------------------------


def test_cleans_up_every_n_epochs_and_logs_the_figures(gc_off: None) -> None:
    cleanup = ResourceCleanup(every_n_epochs=2)
    logger = MemoryLogger()
    fit([cleanup], epochs=5, logger=logger)
    stats = cleanup.stats()
    assert stats["epoch_cleanups"] == 2  # after epochs 2 and 4
    assert stats["cleanups"] == 2
    assert stats["evaluation_cleanups"] == 0
    assert stats["host_rss_after_bytes"] > 0
    assert stats["host_freed_bytes"] == stats["host_rss_before_bytes"] - stats["host_rss_after_bytes"]
    assert stats["last_duration_s"] > 0
    assert stats["total_duration_s"] >= stats["last_duration_s"]
    assert stats["hook_time_s"] >= stats["total_duration_s"]  # the cleanup runs inside its hooks
    assert stats["cuda_cache_releases"] == 0  # no CUDA here
    assert all(isinstance(v, (int, float)) for v in stats.values())
    rows = logger.rows_with("evalguard/mem/host_rss_mb")
    assert [step for step, _ in rows] == [2 * STEPS_PER_EPOCH, 4 * STEPS_PER_EPOCH]
    assert set(rows[0][1]) >= {
        "evalguard/mem/host_rss_mb",
        "evalguard/mem/host_freed_mb",
        "evalguard/mem/cuda_allocated_mb",
        "evalguard/mem/cuda_reserved_mb",
        "evalguard/mem/cleanup_time_s",
        "evalguard/mem/eval_buffers_freed_mb",
    }
    _, events = cleanup.events.since(0)
    assert [e.fields["reason"] for e in events] == ["epoch_end", "epoch_end"]


class MakeCycles(Callback):
    """Leaves unreachable reference cycles behind at each epoch end (before the cleanup runs)."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref[Any]] = []

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for _ in range(50):
            a: dict[str, Any] = {}
            a["self"] = a
            holder = _Node(a)
            self.refs.append(weakref.ref(holder))


class _Node:
    def __init__(self, payload: Any) -> None:
        self.payload = payload
        self.me = self


def test_gc_collects_cycles_at_the_cleanup(gc_off: None) -> None:
    cycles = MakeCycles()
    cleanup = ResourceCleanup(every_n_epochs=1)
    fit([cycles, cleanup], epochs=2)
    assert len(cycles.refs) == 100
    assert all(ref() is None for ref in cycles.refs)
    assert cleanup.stats()["gc_collected_total"] >= 100


class FreezeProbe(Callback):
    def __init__(self) -> None:
        self.frozen: list[int] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.frozen.append(gc.get_freeze_count())


@pytest.mark.parametrize("freeze", [True, False])
def test_startup_objects_are_frozen_for_the_fit_and_unfrozen_after(freeze: bool, gc_off: None) -> None:
    assert gc.get_freeze_count() == 0
    probe, cycles = FreezeProbe(), MakeCycles()
    cleanup = ResourceCleanup(every_n_epochs=1, freeze_startup_objects=freeze)
    fit([cycles, cleanup, probe], epochs=2)
    if freeze:
        # torch's and Lightning's objects, the module, the data: skipped by every later collection...
        assert min(probe.frozen) > 10_000
        # (frozen objects that die by reference counting leave the count)
        assert cleanup.stats()["gc_frozen_objects"] >= probe.frozen[0]
    else:
        assert probe.frozen == [0, 0]
    # ...while what training made is still collected, and nothing stays frozen after fit.
    assert all(ref() is None for ref in cycles.refs)
    assert gc.get_freeze_count() == 0


def test_without_gc_collect_cycles_survive(gc_off: None) -> None:
    cycles = MakeCycles()
    cleanup = ResourceCleanup(every_n_epochs=1, gc_collect=False)
    fit([cycles, cleanup], epochs=2)
    assert cleanup.stats()["gc_collected_total"] == 0
    assert all(ref() is not None for ref in cycles.refs)
    cycles.refs.clear()


def test_every_n_epochs_zero_means_only_after_evaluation() -> None:
    cleanup = ResourceCleanup(every_n_epochs=0, gc_generation=0)
    fit([cleanup], epochs=3)
    assert cleanup.stats()["cleanups"] == 0


# ---- after evaluation jobs -----------------------------------------------------------------------


def test_cleans_up_after_each_evaluation_job_and_releases_its_buffers() -> None:
    evaluation = FakeEvaluation(finish_at={3, 12, 25})
    cleanup = ResourceCleanup(every_n_epochs=0, gc_generation=0)
    cleanup.evaluation_cleanup_min_steps = 5
    fit([evaluation, cleanup], epochs=4)
    stats = cleanup.stats()
    assert stats["evaluation_cleanups"] == 3
    assert stats["evaluation_cleanups_deferred"] == 0
    assert stats["eval_buffers_freed_total_bytes"] == 3000
    assert evaluation.release_calls == 3
    _, events = cleanup.events.since(0)
    assert [e.fields["reason"] for e in events] == ["evaluation"] * 3


def test_jobs_that_never_look_busy_are_noticed_by_polling_and_stats_is_not_read_per_step() -> None:
    evaluation = FakeEvaluation(finish_at={3, 30}, looks_busy=False)
    cleanup = ResourceCleanup(every_n_epochs=0, gc_generation=0)
    cleanup.evaluation_cleanup_min_steps = 1
    cleanup.poll_every_n_steps = 10
    fit([evaluation, cleanup], epochs=4)  # 32 steps
    assert cleanup.stats()["evaluation_cleanups"] == 2
    assert evaluation.stats_calls == 1 + 32 // 10  # once at fit start, then every 10 steps
    _, events = cleanup.events.since(0)
    assert len(events) == 2


def test_jobs_ending_every_step_do_not_make_a_cleanup_per_step() -> None:
    steps = 4 * STEPS_PER_EPOCH
    evaluation = FakeEvaluation(finish_at=set(range(1, steps + 1)))
    cleanup = ResourceCleanup(every_n_epochs=0, gc_generation=0)
    cleanup.evaluation_cleanup_min_steps = 10
    cleanup.poll_every_n_steps = 1  # notice every job at once: only the spacing holds cleanups back
    fit([evaluation, cleanup], epochs=4)
    stats = cleanup.stats()
    assert 1 <= stats["evaluation_cleanups"] <= steps // 10 + 1
    assert stats["evaluation_cleanups_deferred"] > 0  # merged into the next allowed cleanup, not lost


def test_a_failing_release_is_counted_and_reported_once_and_training_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    evaluation = FakeEvaluation(finish_at={2, 12}, fail_release=True)
    cleanup = ResourceCleanup(every_n_epochs=1, gc_generation=0)
    cleanup.evaluation_cleanup_min_steps = 1
    with caplog.at_level(logging.WARNING, "lightning_evalguard"):
        fit([evaluation, cleanup], epochs=3)
    stats = cleanup.stats()
    assert stats["release_errors"] == stats["cleanups"] == 5  # 3 epoch ends + 2 jobs
    assert len([r for r in caplog.records if "release_buffers()" in r.getMessage()]) == 1


def test_after_evaluation_off_does_not_poll_the_evaluation_callback() -> None:
    evaluation = FakeEvaluation(finish_at={3, 12})
    cleanup = ResourceCleanup(every_n_epochs=1, gc_generation=0, after_evaluation=False)
    fit([evaluation, cleanup], epochs=2)
    assert cleanup.stats()["evaluation_cleanups"] == 0
    assert evaluation.stats_calls == 0
    assert evaluation.release_calls == 0


def test_with_the_real_guarded_evaluation(tmp_path: Path) -> None:
    guard = GuardedEvaluation(mode="stream", every_n_epochs=1, timeout=60.0)
    cleanup = ResourceCleanup(every_n_epochs=1, gc_generation=1)
    cleanup.evaluation_cleanup_min_steps = 1
    trainer = Trainer(
        max_epochs=3,
        callbacks=[guard, cleanup],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Classifier(), make_loader(128), [make_loader(32, seed=1)])
    stats = cleanup.stats()
    evaluation = guard.stats()
    assert evaluation["submitted"] + evaluation["skipped_queue_full"] == 3  # one may skip while another runs
    assert evaluation["completed"] == evaluation["submitted"]
    assert stats["epoch_cleanups"] == 3
    # Jobs ending within epochs 1 and 2 are seen at the next training step; the last ends after training.
    assert stats["evaluation_cleanups"] >= 1
    assert stats["release_errors"] == 0


# ---- lifecycle -----------------------------------------------------------------------------------


def test_state_round_trip_and_coexisting_instances() -> None:
    a = ResourceCleanup(every_n_epochs=1, gc_generation=0)
    b = ResourceCleanup(every_n_epochs=2, gc_generation=0)
    assert a.state_key != b.state_key
    fit([a, b], epochs=2)
    assert (a.stats()["epoch_cleanups"], b.stats()["epoch_cleanups"]) == (2, 1)
    restored = ResourceCleanup(every_n_epochs=1)
    restored.load_state_dict(a.state_dict())
    assert restored.stats()["epoch_cleanups"] == 2
    assert restored.stats()["cleanups"] == 2


class Explode(Callback):
    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == 5:
            raise RuntimeError("boom")


def test_an_exception_drops_its_references_to_other_callbacks() -> None:
    evaluation = FakeEvaluation(finish_at={2})
    cleanup = ResourceCleanup(every_n_epochs=1, gc_generation=0)
    with pytest.raises(RuntimeError, match="boom"):
        fit([evaluation, cleanup, Explode()], epochs=2)
    assert cleanup._peers == []


# ---- memory readings -----------------------------------------------------------------------------


def test_memory_readings_without_cuda_touch_nothing_on_the_device() -> None:
    reading = read_memory()
    assert reading.host_rss > 10 * 2**20
    if not torch.cuda.is_available():
        assert not cuda_in_use()
        assert (reading.cuda_allocated, reading.cuda_reserved) == (0, 0)
        assert release_cuda_cache() is False
    assert MemoryReading(2**20).as_mb()["host_rss_mb"] == 1.0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cache_is_released_at_epoch_ends_never_per_step() -> None:
    steps = 3 * STEPS_PER_EPOCH
    evaluation = FakeEvaluation(finish_at=set(range(1, steps + 1)))
    cleanup = ResourceCleanup(every_n_epochs=1, gc_generation=0)
    cleanup.evaluation_cleanup_min_steps = 10
    cleanup.poll_every_n_steps = 1
    fit([evaluation, cleanup], epochs=3, accelerator="gpu", devices=1)
    stats = cleanup.stats()
    assert stats["epoch_cleanups"] == 3
    assert stats["cuda_cache_releases"] == stats["cleanups"] <= 3 + steps // 10 + 1
    assert stats["cuda_peak_allocated_bytes"] > 0
    assert stats["cuda_reserved_after_bytes"] <= stats["cuda_reserved_before_bytes"]
    assert stats["cuda_allocated_after_bytes"] > 0  # the model's weights are still there


def test_docstring_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import doctest

    import lightning_evalguard.callbacks.cleanup as module

    monkeypatch.chdir(tmp_path)  # the example builds a Trainer
    tests = doctest.DocTestFinder().find(module.ResourceCleanup)
    results = [doctest.DocTestRunner().run(t) for t in tests]
    assert sum(r.attempted for r in results) > 0
    assert sum(r.failed for r in results) == 0
