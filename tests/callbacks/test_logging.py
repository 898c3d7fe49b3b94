"""BufferedLogging in real ``Trainer.fit`` runs: a real offline ``WandbLogger`` read back from its run
file, the fault injectors of ``lightning_evalguard.testing``, Ctrl-C, resume and shutdown paths."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_evalguard import BufferedLogging
from lightning_evalguard.callbacks._logging_proxy import LoggerProxy
from lightning_evalguard.engine.buffer.spill import iter_rows, list_segments, load_progress, read_header
from lightning_evalguard.testing import (
    FailingLogger,
    FlakyLogger,
    FullDisk,
    HangingLogger,
    SlowLogger,
    read_wandb_run,
)
from tests.conftest import finish_wandb

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore:.*anonymous.*")

# Fast retries, so fault tests take milliseconds of backoff, not seconds.
FAST = {"retry_backoff": 0.001, "max_backoff": 0.005, "flush_interval": 0.05}


class TinyModel(LightningModule):
    """Logs ``train/a`` (an affine function of the step) and ``train/b`` (a sine) every step, and
    records what it logged, at which global step, for the test to compare with what landed."""

    def __init__(self, lr: float = 0.01, interrupt_at: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 1)
        self.logged: list[tuple[int, float, float]] = []
        self.logger_types: set[type] = set()
        self.train_seconds = 0.0
        self.interrupted_at: float | None = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        step = self.global_step
        # self.log stores values as float32 tensors: record them as they will be logged.
        a, b = 0.5 * step + 1.0, torch.tensor(math.sin(step)).item()
        self.log("train/a", a)
        self.log("train/b", b)
        self.log("train/loss", loss)
        self.logged.append((step, a, b))
        self.logger_types.add(type(self.logger))
        real = getattr(self.logger, "wrapped", self.logger)
        assert isinstance(self.logger, type(real))  # the proxy passes for the real logger
        if step == self.hparams.interrupt_at:
            self.interrupted_at = time.monotonic()
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C
        return loss

    def on_train_start(self) -> None:
        self._started = time.monotonic()

    def on_train_end(self) -> None:
        self.train_seconds = time.monotonic() - self._started

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def loader(steps: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(steps, 4, generator=g), torch.randn(steps, 1, generator=g)))


def fit(
    callbacks: list[Any], logger: Any, steps: int, tmp_path: Path, model: TinyModel | None = None, **kwargs: Any
) -> tuple[Trainer, TinyModel]:
    model = model or TinyModel()
    trainer = Trainer(
        max_epochs=1,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        **kwargs,
    )
    trainer.fit(model, loader(steps))
    return trainer, model


def assert_identity(stats: dict[str, Any]) -> None:
    dropped = sum(v for k, v in stats.items() if k.startswith("dropped_"))
    assert stats["accepted"] == stats["delivered"] + stats["pending"] + stats["spilled"] + dropped, stats


def spilled_on_disk(directory: Path) -> int:
    return sum(
        len(record["metrics"]) for seg in list_segments(directory) for record, _ in iter_rows(seg, load_progress(seg))
    )


def flusher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("evalguard-log-flusher")]


# -- construction ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rules": {"train/*": "avg:10"}}, ValueError, r"rules\['train/\*'\].*'avg:10'"),
        ({"rules": {"train/[x": "all"}}, ValueError, r"'train/\[x'"),
        ({"rules": ["*"]}, TypeError, r"`rules` must be a dict.*\['\*'\]"),
        ({"loggers": "WandbLogger"}, TypeError, "`loggers` must be a list.*'WandbLogger'"),
        ({"max_buffer_mb": 0}, ValueError, "`max_buffer_mb` must be a finite number > 0, got 0"),
        ({"max_buffer_mb": float("inf")}, ValueError, "`max_buffer_mb`.*inf"),
        ({"when_full": "wait"}, ValueError, "`when_full` must be one of.*got 'wait'"),
        ({"flush_interval": -1.0}, ValueError, "`flush_interval`.*-1.0"),
        ({"max_batch": 0}, ValueError, "`max_batch` must be an int >= 1, got 0"),
        ({"max_batch": 2.5}, ValueError, "`max_batch`.*2.5"),
        ({"flush_timeout": 0}, ValueError, "`flush_timeout`.*got 0"),
        ({"max_retries": -1}, ValueError, "`max_retries` must be an int >= 0, got -1"),
        ({"retry_backoff": 0}, ValueError, "`retry_backoff`.*got 0"),
        ({"retry_backoff": 2.0, "max_backoff": 1.0}, ValueError, "`max_backoff` must be >= `retry_backoff`"),
        ({"send_timeout": "10"}, ValueError, "`send_timeout`.*'10'"),
        ({"failure_threshold": 0}, ValueError, "`failure_threshold`.*got 0"),
        ({"recovery_time": -5}, ValueError, "`recovery_time`.*-5"),
        ({"spill_dir": 3}, TypeError, "`spill_dir` must be a str path or None, got 3"),
        ({"spill_dir": ""}, ValueError, "`spill_dir`.*''"),
        ({"max_spill_mb": -1}, ValueError, "`max_spill_mb`.*-1"),
        ({"stats_every_n_steps": -1}, ValueError, "`stats_every_n_steps` must be an int >= 0, got -1"),
    ],
)
def test_arguments_are_checked_at_construction(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        BufferedLogging(**kwargs)


def test_built_from_a_lightning_cli_yaml_config() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--callback", type=BufferedLogging)
    config = parser.parse_string(
        textwrap.dedent(
            """
            callback:
              class_path: lightning_evalguard.BufferedLogging
              init_args:
                rules: {"train/*": "mean:10", "*": "all"}
                when_full: drop_oldest
                max_buffer_mb: 8
            """
        )
    )
    callback = parser.instantiate(config).callback
    assert isinstance(callback, BufferedLogging)
    assert callback.rules == {"train/*": "mean:10", "*": "all"}
    assert callback.config.when_full == "drop_oldest"
    assert callback.config.max_buffer_mb == 8.0


def test_instances_coexist_and_other_ranks_are_left_alone() -> None:
    a = BufferedLogging(loggers=["WandbLogger"])
    b = BufferedLogging(loggers=["CSVLogger"], rules={"*": "every:2"})
    assert a.state_key != b.state_key
    real = FailingLogger()
    trainer = SimpleNamespace(global_rank=1, loggers=[real])
    a.setup(trainer, None, "fit")  # type: ignore[arg-type]
    assert trainer.loggers == [real]
    assert a.stats()["hook_calls"] == 1
    assert flusher_threads() == []


# -- real W&B ----------------------------------------------------------------------------------------
def test_every_value_reaches_wandb_in_order_and_mean_windows_are_exact(wandb_dir: Path) -> None:
    callback = BufferedLogging(rules={"train/b": "mean:10", "*": "all"}, stats_every_n_steps=10)
    logger = WandbLogger(offline=True, save_dir=str(wandb_dir), project="evalguard-tests")
    trainer, model = fit([callback], logger, 35, wandb_dir)

    assert model.logger_types == {LoggerProxy}  # the proxy was in place during training
    assert trainer.logger is logger  # and the real logger is back after
    assert flusher_threads() == []
    stats = callback.stats()
    assert_identity(stats)
    assert stats["delivered"] == stats["accepted"]
    assert stats["pending"] == stats["spilled"] == 0
    assert stats["hook_calls"] > 35
    assert stats["hot_path_ns_p50"] > 0
    assert {e.kind for e in callback.events.since(0)[1]} >= {"flush"}

    finish_wandb()
    run = read_wandb_run(wandb_dir)
    assert run.complete
    assert run.config["lr"] == 0.01  # log_hyperparams went through the queue
    # "all": every value, in order, with the global step it was logged at.
    assert run.series("train/a") == [(step, a) for step, a, _ in model.logged]
    # "mean:10": one point per 10 values at the step of the last one; the open window is emitted at the end.
    expected = []
    for start in range(0, len(model.logged), 10):
        window = model.logged[start : start + 10]
        expected.append((window[-1][0], sum(b for _, _, b in window) / len(window)))
    got = run.series("train/b")
    assert [s for s, _ in got] == [9, 19, 29, 34]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-12)
    # The callback's own figures, at a low rate.
    assert [s for s, _ in run.series("evalguard/log/accepted")][:3] == [10, 20, 30]


def test_flaky_backend_everything_delivered_once(wandb_dir: Path) -> None:
    flaky = FlakyLogger(WandbLogger(offline=True, save_dir=str(wandb_dir), project="evalguard-tests"), 0.3, seed=1)
    callback = BufferedLogging(max_retries=3, failure_threshold=3, recovery_time=0.05, stats_every_n_steps=0, **FAST)
    _, model = fit([callback], flaky, 60, wandb_dir)

    stats = callback.stats()
    assert_identity(stats)
    assert stats["failed_attempts"] == flaky.failures > 0
    assert stats["delivered"] == stats["accepted"]
    assert 0.15 < stats["logging_failure_rate"] < 0.45
    finish_wandb()
    run = read_wandb_run(wandb_dir)
    assert run.complete, (run.record_counts, run.path)
    assert run.series("train/a") == [(step, a) for step, a, _ in model.logged]  # once each, in order


# -- injected faults ---------------------------------------------------------------------------------
def test_always_failing_backend_spills_everything_and_training_finishes(tmp_path: Path) -> None:
    failing = FailingLogger()
    callback = BufferedLogging(
        spill_dir=str(tmp_path / "spill"), failure_threshold=2, recovery_time=3600, stats_every_n_steps=0, **FAST
    )
    with pytest.warns(RuntimeWarning, match="ConnectionError") as record:
        trainer, model = fit([callback], failing, 30, tmp_path)
    assert trainer.state.finished
    assert len(model.logged) == 30
    stats = callback.stats()
    assert_identity(stats)
    assert stats["delivered"] == 0
    assert stats["spilled"] == stats["accepted"] > 0
    assert stats["breaker_state"] == 1  # open, as it was at the end
    assert stats["failed_attempts"] == failing.calls == failing.failures  # every metrics call failed
    assert stats["logging_failure_rate"] == stats["failed_attempts"] / stats["send_attempts"] > 0.8
    assert spilled_on_disk(tmp_path / "spill") == stats["spilled"]
    assert sum("ConnectionError" in str(w.message) for w in record) == 1  # warned once
    (segment, *_) = list_segments(tmp_path / "spill")
    assert read_header(segment)["logger"] == "FailingLogger"
    kinds = {e.kind for e in callback.events.since(0)[1]}
    assert {"send_failed", "spill"} <= kinds


def test_full_disk_counts_rows_as_spill_failed(tmp_path: Path) -> None:
    callback = BufferedLogging(spill_dir=str(tmp_path / "spill"), failure_threshold=1, stats_every_n_steps=0, **FAST)
    with FullDisk(tmp_path / "spill"), pytest.warns(RuntimeWarning, match="No space left"):
        trainer, _ = fit([callback], FailingLogger(), 20, tmp_path)
    assert trainer.state.finished
    stats = callback.stats()
    assert_identity(stats)
    assert stats["dropped_spill_failed"] == stats["accepted"] > 0
    assert stats["spilled"] == 0


def test_hanging_backend_is_abandoned_and_training_finishes(tmp_path: Path) -> None:
    hanging = HangingLogger(hang_after=3)
    callback = BufferedLogging(
        spill_dir=str(tmp_path / "spill"), send_timeout=0.2, flush_timeout=10.0, stats_every_n_steps=0, **FAST
    )
    try:
        started = time.monotonic()
        trainer, _ = fit([callback], hanging, 30, tmp_path)
        elapsed = time.monotonic() - started
        assert trainer.state.finished
        assert elapsed < 10.0
        stats = callback.stats()
        assert_identity(stats)
        assert stats["abandoned_calls"] == 3  # then the breaker is locked open
        values_per_row = 4  # train/a, train/b, train/loss and Lightning's epoch
        assert stats["dropped_abandoned"] == 3 * values_per_row
        assert stats["delivered"] == 3 * values_per_row  # the three rows before the hang
        assert stats["spilled"] == stats["accepted"] - 6 * values_per_row
        assert trainer.logger is hanging
    finally:
        hanging.release()
    for thread in flusher_threads():
        thread.join(10)


def test_slow_backend_does_not_slow_training(tmp_path: Path) -> None:
    slow = SlowLogger(delay=0.05)
    callback = BufferedLogging(stats_every_n_steps=0, flush_interval=0.05)
    trainer, model = fit([callback], slow, 40, tmp_path)
    stats = callback.stats()
    assert stats["delivered"] == stats["accepted"]  # the shutdown flush had time for all of it
    assert len(slow.rows) == 40  # one row per step
    assert model.train_seconds < 0.5 * 40 * 0.05, model.train_seconds
    assert stats["hot_path_ns_p50"] < 1_000_000
    assert trainer.logger is slow


def test_ctrl_c_flush_is_bounded_and_leaves_no_thread(tmp_path: Path) -> None:
    slow = SlowLogger(delay=0.1)
    callback = BufferedLogging(spill_dir=str(tmp_path / "spill"), flush_timeout=0.5, stats_every_n_steps=0)
    model = TinyModel(interrupt_at=25)
    try:
        with pytest.raises(SystemExit):
            fit([callback], slow, 40, tmp_path, model=model)
        returned = time.monotonic()
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning leaves it ignored
    assert model.interrupted_at is not None
    assert returned - model.interrupted_at < 0.5 + 2.0  # flush_timeout, plus a generous margin
    for thread in flusher_threads():  # at most one, abandoned in its last (0.1 s) call
        thread.join(2.0)
    assert flusher_threads() == []
    stats = callback.stats()
    assert_identity(stats)
    assert stats["pending"] == 0
    assert stats["spilled"] > 0
    assert stats["delivered"] > 0
    assert spilled_on_disk(tmp_path / "spill") == stats["spilled"]


# -- proxy, checkpoints, resume ----------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*exists and is not empty", "ignore:.*resuming from a checkpoint")
def test_csv_logger_directories_and_checkpoints_unchanged_and_counters_resume(tmp_path: Path) -> None:
    def run(callback: BufferedLogging | None, root: Path, steps: int, ckpt: str | None = None) -> Trainer:
        logger = CSVLogger(root, name="csv", version=0)
        checkpoint = ModelCheckpoint(save_last=True)
        callbacks: list[Any] = [checkpoint] if callback is None else [callback, checkpoint]
        trainer = Trainer(
            max_steps=steps,
            logger=logger,
            callbacks=callbacks,
            log_every_n_steps=1,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        torch.manual_seed(0)
        trainer.fit(TinyModel(), loader(40), ckpt_path=ckpt)
        return trainer

    plain = run(None, tmp_path / "plain", 10)
    callback = BufferedLogging(stats_every_n_steps=0)
    buffered = run(callback, tmp_path / "buffered", 10)
    # Lightning's own paths see the same logger (trainer.log_dir checks the logger's class).
    assert Path(buffered.log_dir).relative_to(tmp_path / "buffered") == Path(plain.log_dir).relative_to(
        tmp_path / "plain"
    )
    plain_ckpt = Path(plain.checkpoint_callback.last_model_path).relative_to(tmp_path / "plain")  # type: ignore[union-attr]
    last = Path(buffered.checkpoint_callback.last_model_path)  # type: ignore[union-attr]
    assert last.relative_to(tmp_path / "buffered") == plain_ckpt
    metrics = (Path(buffered.log_dir) / "metrics.csv").read_text()
    assert metrics == (Path(plain.log_dir) / "metrics.csv").read_text()
    assert (Path(buffered.log_dir) / "hparams.yaml").read_text() == (Path(plain.log_dir) / "hparams.yaml").read_text()

    first = callback.stats()
    resumed = BufferedLogging(stats_every_n_steps=0)
    run(resumed, tmp_path / "buffered", 15, ckpt=str(last))
    again = resumed.stats()
    assert again["accepted"] == first["accepted"] + 5 * 4  # five more steps of four values
    assert again["delivered"] == again["accepted"]
    assert_identity(again)


def test_proxy_queues_log_calls_in_order_and_forwards_the_rest(tmp_path: Path) -> None:
    class Recorder(Logger):
        def __init__(self) -> None:
            super().__init__()
            self.events: list[Any] = []
            self.secret = "forwarded"

        @property
        def name(self) -> str:
            return "recorder"

        @property
        def version(self) -> int:
            return 7

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.events.append(("metrics", step, dict(metrics)))

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            self.events.append(("hparams", params))

        def log_text(self, key: str, text: str) -> None:
            self.events.append(("text", key, text))

        def finalize(self, status: str) -> None:
            self.events.append(("finalize", status))

    real = Recorder()
    callback = BufferedLogging(stats_every_n_steps=0, flush_interval=3600)
    trainer = SimpleNamespace(global_rank=0, loggers=[real], default_root_dir=str(tmp_path), global_step=0)
    callback.setup(trainer, None, "fit")  # type: ignore[arg-type]
    (proxy,) = trainer.loggers
    assert isinstance(proxy, LoggerProxy)
    assert isinstance(proxy, Recorder)
    assert (proxy.name, proxy.version, proxy.secret) == ("recorder", 7, "forwarded")
    proxy.log_metrics({"x": 1.0}, step=1)
    proxy.log_text("note", "hello")
    proxy.log_hyperparams({"lr": 0.1})
    proxy.log_metrics({"x": 2.0, "bad": "text"}, step=2)
    assert real.events == []  # nothing sent on the calling thread
    proxy.finalize("success")  # flushes first, then finalizes the real logger
    assert real.events == [
        ("metrics", 1, {"x": 1.0}),
        ("text", "note", "hello"),
        ("hparams", {"lr": 0.1}),
        ("metrics", 2, {"x": 2.0}),
        ("finalize", "success"),
    ]
    callback.teardown(trainer, None, "fit")  # type: ignore[arg-type]
    callback.teardown(trainer, None, "fit")  # type: ignore[arg-type]  # idempotent
    assert trainer.loggers == [real]
    stats = callback.stats()
    assert (stats["accepted"], stats["delivered"], stats["dropped_invalid"], stats["calls_done"]) == (3, 2, 1, 2)
    assert flusher_threads() == []


def test_atexit_flushes_when_teardown_never_runs(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from types import SimpleNamespace
        from lightning.pytorch.loggers import CSVLogger
        from lightning_evalguard import BufferedLogging

        logger = CSVLogger({str(tmp_path)!r}, name="run", version=0)
        callback = BufferedLogging(flush_interval=3600, stats_every_n_steps=0)
        trainer = SimpleNamespace(global_rank=0, loggers=[logger], default_root_dir={str(tmp_path)!r})
        callback.setup(trainer, None, "fit")
        for step in range(5):
            trainer.loggers[0].log_metrics({{"x": float(step)}}, step)
        # the script ends without teardown: the atexit hook flushes
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    lines = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()
    assert len(lines) == 6  # header and the five rows
