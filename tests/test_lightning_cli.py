"""All four callbacks from a LightningCLI YAML file (examples/digits/config.yaml), in-process and
as a user runs it; bad values fail with a first line that names the parameter."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest

from lightning_evalguard import BufferedLogging, GuardedEvaluation, PerformanceMonitor, ResourceCleanup
from lightning_evalguard.demo import digit_accuracy
from lightning_evalguard.testing import find_wandb_runs, read_wandb_run
from tests.conftest import finish_wandb

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits"
CONFIG = EXAMPLE / "config.yaml"


def load_train_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("digits_train", EXAMPLE / "train.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def overrides(out: Path, epochs: int) -> list[str]:
    return [
        f"--trainer.max_epochs={epochs}",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.enable_progress_bar=false",
    ]


def test_the_yaml_builds_all_four_callbacks_and_trains(wandb_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI warns when args and argv both carry options
    train = load_train_script()
    cli = train.main(["fit", "--config", str(CONFIG), *overrides(wandb_dir, epochs=2)])
    callbacks = cli.trainer.callbacks
    guards = [cb for cb in callbacks if isinstance(cb, GuardedEvaluation)]
    assert [g.mode for g in guards] == ["stream", "stream"]
    epoch_guard, probe = guards
    assert probe.eval_fn is digit_accuracy  # an import path in YAML becomes the function
    assert probe.every_n_epochs is None
    assert probe.every_n_steps == 10
    assert probe.when_full == "replace"
    (logging,) = [cb for cb in callbacks if isinstance(cb, BufferedLogging)]
    assert logging.rules == {"train/*": "mean:5", "probe/*": "last:2", "*": "all"}
    assert logging.config.when_full == "spill"
    assert any(isinstance(cb, ResourceCleanup) for cb in callbacks)
    (monitor,) = [cb for cb in callbacks if isinstance(cb, PerformanceMonitor)]
    assert monitor.on_violation == "log"

    assert epoch_guard.stats()["completed"] == 2
    assert probe.stats()["completed"] >= 1
    assert monitor.last_report_path is not None
    assert Path(monitor.last_report_path).is_file()
    finish_wandb()
    run = read_wandb_run(find_wandb_runs(wandb_dir)[0])
    assert run.complete
    assert len(run.series("val/acc")) == 2
    assert run.series("probe/top1")
    assert run.config["lr"] == 0.01  # hyperparameters went through BufferedLogging's ordered queue too


@pytest.mark.slow
def test_the_cli_runs_as_a_user_runs_it_with_warnings_as_errors(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLE / "train.py"), "fit", "--config", str(CONFIG),
         *overrides(tmp_path, epochs=1)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max_epochs=1` reached" in proc.stderr
    run = read_wandb_run(find_wandb_runs(tmp_path)[0])
    assert run.complete or run.history  # the logger's process may end before W&B's exit record
    assert (tmp_path / "config.yaml").is_file()  # LightningCLI saved the resolved config


@pytest.mark.parametrize(
    ("old", "new", "first_line"),
    [
        ("mode: stream", "mode: bogus", "GuardedEvaluation: parameter 'mode': Expected a typing.Literal"),
        ("timeout: 120.0", "timeout: -1.0", "`timeout` must be a finite number > 0, got -1.0"),
        ('"train/*": "mean:5"', '"train/*": "median:5"', "median"),
        ("on_violation: log", "on_violation: shout", "parameter 'on_violation'"),
    ],
)
def test_a_bad_value_fails_with_a_first_line_naming_the_parameter(
    old: str, new: str, first_line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])
    bad = tmp_path / "bad.yaml"
    text = CONFIG.read_text()
    assert old in text
    bad.write_text(text.replace(old, new, 1))
    train = load_train_script()
    warnings.simplefilter("ignore")  # pytest restores the filters after the test
    with pytest.raises(SystemExit) as exit_info:
        train.main(["fit", "--config", str(bad), *overrides(tmp_path, epochs=1)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    first = err.lstrip().splitlines()[0]
    assert first.startswith("error: ")
    assert first_line in first
