"""GuardedEvaluation(mode="subprocess") in real Trainer.fit runs, with real worker processes.

Each fit starts workers that import Lightning (a few seconds each), so the faults share one run:
evaluation k of that run meets fault k, whatever worker runs it (``FaultSequence`` of once-faults).
Detection latencies are measured at the engine level (tests/engine/test_subprocess_runner.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from typing import Any

import psutil
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader, Dataset

from lightning_evalguard import EvalGuardWarning, GuardedEvaluation
from lightning_evalguard.engine.runners._worker import RLIMIT_ENV
from lightning_evalguard.testing import (
    AllocatingEval,
    CrashingEval,
    FaultSequence,
    FaultyValidation,
    HangingEval,
    RaisingEval,
    SigtermIgnoringEval,
)
from tests.models import Classifier, make_loader

pytestmark = pytest.mark.slow


def val_loaders(n: int = 2) -> list[DataLoader]:
    return [make_loader(48, seed=1), make_loader(32, seed=2)][:n]


def fit(model: LightningModule, guard: GuardedEvaluation, *, n_val: int = 2, extra: list[Callback] | None = None,
        val: Any = None, **trainer_kwargs: Any) -> Trainer:
    trainer_kwargs.setdefault("max_epochs", 2)
    trainer = Trainer(
        callbacks=[guard, *(extra or [])],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **trainer_kwargs,
    )
    trainer.fit(model, make_loader(128, shuffle=True), val if val is not None else val_loaders(n_val))
    return trainer


def worker_pids(guard: GuardedEvaluation) -> list[int]:
    return [e.fields["pid"] for e in guard.events.since(0)[1] if e.kind == "worker_started"]


def outcomes(guard: GuardedEvaluation) -> list[str]:
    ends = sorted((e.fields["job"], e.fields["outcome"]) for e in guard.events.since(0)[1] if e.kind == "eval_end")
    return [outcome for _, outcome in ends]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def evalguard_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("evalguard")]


def shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


def test_results_equal_lightnings_own_validation_for_a_main_module_class() -> None:
    class ScriptClassifier(Classifier):
        """Stands for a class defined in a script's ``__main__`` or a notebook: pickled by value."""

        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            super().validation_step(batch, batch_idx, dataloader_idx)

    ScriptClassifier.__module__ = "__main__"
    shm_before = shm()
    seed_everything(0)
    model = ScriptClassifier()
    guard = GuardedEvaluation(mode="subprocess", timeout=120.0, max_pending=2, spare_worker=False)
    trainer = fit(model, guard, max_epochs=2)

    stats = guard.stats()
    assert (stats["completed"], stats["delivered"], stats["respawns"]) == (2, 2, 0)
    assert stats["worker_cold_start_s"] > 0
    assert stats["snapshot_copy_s"] > 0
    assert "worker_pid" in stats
    reference = trainer.validate(model, val_loaders(), verbose=False)
    expected = {k: v for d in reference for k, v in d.items()}
    assert set(expected) == set(guard.last_metrics)
    assert len(expected) == 6  # loss, first_logit, acc x 2 dataloaders
    assert max(abs(guard.last_metrics[k] - expected[k]) for k in expected) <= 1e-6

    (pid,) = worker_pids(guard)
    assert gone(pid)
    assert shm() == shm_before
    assert evalguard_threads() == []


GUARDLESS_SCRIPT = textwrap.dedent("""
    # A training script as people write them: no `if __name__ == "__main__":` guard.
    import torch
    from lightning.pytorch import LightningModule, Trainer
    from torch.utils.data import DataLoader, TensorDataset
    from lightning_evalguard import GuardedEvaluation

    print("TRAINING STARTS", flush=True)

    class Net(LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.log("val/out", self.layer(batch[0]).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = DataLoader(TensorDataset(torch.randn(32, 4)), batch_size=8)
    guard = GuardedEvaluation(mode="subprocess", timeout=120.0, max_pending=2, spare_worker=False)
    trainer = Trainer(max_epochs=2, callbacks=[guard], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Net(), data, data)
    print("COMPLETED", guard.stats()["completed"], flush=True)
""")


def test_a_script_without_main_guard_is_not_run_again_by_the_worker(tmp_path: Any) -> None:
    script = tmp_path / "train.py"
    script.write_text(GUARDLESS_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("TRAINING STARTS") == 1  # the worker did not re-import the script
    assert "COMPLETED 2" in done.stdout  # and it evaluated the script's __main__ class


class FaultyClassifier(FaultyValidation, Classifier):
    pass


def test_every_fault_is_contained_training_finishes_and_no_worker_outlives_fit(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(RLIMIT_ENV, "256")  # the allocation fault hits a 256 MB cap inside the worker
    once = [str(tmp_path / f"fault-{i}") for i in range(6)]
    model = FaultyClassifier(num_val_loaders=1)
    model.validation_fault = FaultSequence([
        HangingEval(once_file=once[0]),
        SigtermIgnoringEval(once_file=once[1]),
        CrashingEval("exit", exit_code=3, once_file=once[2]),
        CrashingEval("segfault", once_file=once[3]),
        RaisingEval("injected evaluation failure", once_file=once[4]),
        AllocatingEval(chunk_mb=16, max_mb=8192, once_file=once[5]),
    ])
    shm_before = shm()
    guard = GuardedEvaluation(
        mode="subprocess",
        timeout=2.0,
        kill_grace=1.0,
        max_pending=7,  # every epoch's snapshot is queued, so evaluation k meets fault k
        failure_threshold=10,
        final_timeout=180.0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(model, guard, n_val=1, max_epochs=7)

    assert trainer.current_epoch == 7  # training finished every epoch
    assert outcomes(guard) == ["timeout", "timeout", "failed", "failed", "failed", "failed", "ok"]
    stats = guard.stats()
    assert (stats["timed_out"], stats["failed"], stats["completed"], stats["delivered"]) == (2, 4, 1, 1)
    assert stats["respawns"] == 4  # hang, SIGTERM ignored, exit, segfault; raising and MemoryError keep the worker
    assert stats["workers_killed"] >= 1  # the SIGTERM-ignoring one needed SIGKILL
    assert stats["breaker_state"] == 0  # the last evaluation succeeded
    messages = "\n".join(str(w.message) for w in caught if issubclass(w.category, EvalGuardWarning))
    for expected in ("timed out", "exit code 3", "SIGSEGV", "injected evaluation failure", "MemoryError"):
        assert expected in messages
    pids = worker_pids(guard)
    assert len(pids) >= 5
    assert all(gone(pid) for pid in pids)
    assert shm() == shm_before
    assert evalguard_threads() == []


class InterruptWhenBusy(Callback):
    """Presses Ctrl-C (raises KeyboardInterrupt in a training hook) once the worker is mid-evaluation."""

    def __init__(self, guard: GuardedEvaluation) -> None:
        self.guard = guard

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        evaluator = self.guard._evaluator
        if trainer.global_step >= 2 and evaluator is not None:
            assert evaluator.runner.wait_until(lambda s: s["worker_busy"] == 1, 120.0)  # type: ignore[attr-defined]
            raise KeyboardInterrupt


def test_ctrl_c_mid_evaluation_leaves_no_process_thread_or_segment() -> None:
    shm_before = shm()
    model = FaultyClassifier(num_val_loaders=1)
    model.validation_fault = HangingEval()
    guard = GuardedEvaluation(mode="subprocess", every_n_epochs=None, every_n_steps=2, timeout=120.0)
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning turns Ctrl-C into a graceful exit(1)
            fit(model, guard, n_val=1, extra=[InterruptWhenBusy(guard)], max_epochs=5)
    finally:
        signal.signal(signal.SIGINT, previous)
    pids = worker_pids(guard)
    assert pids
    assert all(gone(pid) for pid in pids)  # stopped and reaped before fit returned
    assert evalguard_threads() == []
    assert shm() == shm_before
    assert guard.stats()["cancelled"] >= 1


class LockedDataset(Dataset):
    """A dataset holding a lock: it cannot be pickled, so it cannot travel to a worker."""

    def __init__(self) -> None:
        self.inner = make_loader(64).dataset
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> Any:
        return self.inner[i]


def test_unpicklable_dataloader_is_refused_at_setup_and_dataloader_factory_fixes_it() -> None:
    guard = GuardedEvaluation(mode="subprocess", timeout=120.0)
    with pytest.raises(TypeError, match=r"cannot be pickled.*dataloader_factory"):
        fit(Classifier(num_val_loaders=1), guard, val=DataLoader(LockedDataset(), batch_size=16))
    assert guard.stats()["submitted"] == 0
    assert evalguard_threads() == []

    seed_everything(0)
    model = Classifier(num_val_loaders=1)
    guard = GuardedEvaluation(
        mode="subprocess", timeout=120.0, max_pending=2, spare_worker=False,
        dataloader_factory="tests.models:make_loader",  # built in the worker: make_loader() -> 64 rows
    )
    trainer = fit(model, guard, val=DataLoader(LockedDataset(), batch_size=16))
    assert guard.stats()["completed"] == 2
    (reference,) = trainer.validate(model, make_loader(), verbose=False)
    assert set(reference) == set(guard.last_metrics)
    assert max(abs(guard.last_metrics[k] - v) for k, v in reference.items()) <= 1e-6


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kill_grace": -1.0}, ValueError, r"`kill_grace` must be a finite number >= 0, got -1\.0"),
        ({"kill_grace": float("inf")}, ValueError, r"`kill_grace`.*got inf"),
        ({"spare_worker": "yes"}, TypeError, r"`spare_worker` must be a bool, got 'yes'"),
        ({"max_respawns": -1}, ValueError, r"`max_respawns` must be an int >= 0, got -1"),
        ({"max_respawns": 2.5}, ValueError, r"`max_respawns` must be an int >= 0, got 2\.5"),
        ({"eval_device": "gpu:0"}, ValueError, r"`eval_device` must be a device string .* got 'gpu:0'"),
        ({"eval_device": 1}, ValueError, r"`eval_device` must be a device string .* got 1"),
        ({"dataloader_factory": 3}, TypeError, r"`dataloader_factory` must be a callable or an import path"),
        ({"dataloader_factory": "tests.models:nothing_here"}, ValueError, r"`dataloader_factory`=.*could not be"),
        ({"mode": "stream", "eval_device": "cpu"}, ValueError, r"`eval_device` is only used with mode='subprocess'"),
        ({"mode": "inline", "dataloader_factory": "tests.models:make_loader"}, ValueError,
         r"`dataloader_factory` is only used with mode='subprocess'"),
        ({"warm_start": 1}, TypeError, r"`warm_start` must be a bool, got 1"),
        ({"mode": "stream", "warm_start": True}, ValueError, r"`warm_start` is only used with mode='subprocess'"),
    ],
)
def test_bad_subprocess_arguments_are_refused(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    kwargs.setdefault("mode", "subprocess")
    with pytest.raises(error, match=match):
        GuardedEvaluation(**kwargs)


def test_stats_have_the_worker_figures_before_fit() -> None:
    stats = GuardedEvaluation(mode="subprocess").stats()
    assert {"respawns", "worker_pid", "worker_cold_start_s", "snapshot_copy_s"} <= set(stats)
    assert stats["worker_pid"] == 0


class WaitForWorker(Callback):
    """At the first step, waits (bounded) until the guard reports a live worker."""

    def __init__(self, guard: GuardedEvaluation) -> None:
        self.guard = guard
        self.pid = 0

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step != 1:
            return
        deadline = time.monotonic() + 120
        while not self.pid and time.monotonic() < deadline:
            self.pid = int(self.guard.stats()["worker_pid"])
            time.sleep(0.05)


def test_warm_start_starts_the_worker_before_any_evaluation_and_release_buffers_frees_nothing() -> None:
    guard = GuardedEvaluation(mode="subprocess", warm_start=True, every_n_epochs=50, spare_worker=False)
    probe = WaitForWorker(guard)
    fit(Classifier(num_val_loaders=1), guard, n_val=1, extra=[probe], max_epochs=1)
    assert probe.pid > 0  # up while the first epoch trained, though no evaluation was due
    assert guard.stats()["submitted"] == 0
    assert guard.release_buffers() == 0  # the shared slots are the worker's for the whole fit
    assert gone(probe.pid)


def test_eval_device_on_a_machine_without_cuda_fails_at_setup() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    guard = GuardedEvaluation(mode="subprocess", eval_device="cuda:0")
    with pytest.raises(ValueError, match="CUDA is not available"):
        fit(Classifier(num_val_loaders=1), guard, n_val=1)
