"""The offline W&B run reader of ``lightning_evalguard.testing``, on a real run file: records split
across 32 KiB blocks, typed values, a torn tail and a corrupted byte."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lightning_evalguard.testing import find_wandb_runs, read_wandb_run


@pytest.fixture(scope="module")
def run_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import wandb

    root = tmp_path_factory.mktemp("wandb_reader")
    run = wandb.init(project="evalguard-tests", dir=str(root), mode="offline", config={"big": "x" * 100_000})
    for step in range(300):
        run.log({"loss": 1.0 / (step + 1), "step_int": step, "name": f"s{step}", "flag": step % 2 == 0})
    run.log({"nan": math.nan, "inf": math.inf})
    run.finish()
    wandb.teardown()
    (path,) = find_wandb_runs(root)
    return path


def test_reads_history_config_and_the_exit_record(run_file: Path) -> None:
    assert run_file.stat().st_size > 3 * 32 * 1024  # several blocks; the config alone spans four
    run = read_wandb_run(run_file.parent.parent)  # a directory holding one run works too
    assert run.complete
    assert run.exit_code == 0
    assert run.config["big"] == "x" * 100_000
    assert len(run.history) == 301
    assert [row["step_int"] for row in run.history[:300]] == list(range(300))
    assert run.history[10]["loss"] == pytest.approx(1.0 / 11)
    assert run.history[11]["name"] == "s11"
    assert run.history[12]["flag"] is True
    assert math.isnan(run.history[300]["nan"])
    assert run.history[300]["inf"] == math.inf
    assert run.summary["step_int"] == 299
    assert run.series("loss", step_key="_step")[:2] == [(0, 1.0), (1, 0.5)]


def test_a_torn_tail_reads_as_incomplete(run_file: Path, tmp_path: Path) -> None:
    data = run_file.read_bytes()
    torn = tmp_path / "run-torn.wandb"
    torn.write_bytes(data[: len(data) - 40])  # the last record (the exit) cut in half
    run = read_wandb_run(torn)
    assert not run.complete
    assert len(run.history) == 301


def test_a_corrupted_byte_is_reported_with_its_offset(run_file: Path, tmp_path: Path) -> None:
    data = bytearray(run_file.read_bytes())
    data[40_000] ^= 0xFF
    bad = tmp_path / "run-bad.wandb"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_wandb_run(bad)
    (tmp_path / "not-a-run.wandb").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not a W&B run file"):
        read_wandb_run(tmp_path / "not-a-run.wandb")
    empty = tmp_path / "no_run_here"
    empty.mkdir()
    with pytest.raises(FileNotFoundError):
        read_wandb_run(empty)
