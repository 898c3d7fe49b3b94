"""``evalguard replay``: spilled rows reach an (offline) W&B run once each, in order, across reruns
and an interrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightning_evalguard.cli import main
from lightning_evalguard.engine.buffer import Row, SpillStore
from lightning_evalguard.engine.buffer.spill import list_segments
from lightning_evalguard.testing import find_wandb_runs, read_wandb_run


def spill(directory: Path, logger: str, seqs: range, segment_bytes: int | None = None) -> SpillStore:
    store = SpillStore(
        directory, max_bytes=1 << 30, segment_bytes=segment_bytes, meta={"logger": logger, "version": "run42"}
    )
    store.append([Row(seq, seq, {"train/loss": seq / 10, "epoch": 0}) for seq in seqs])
    store.close()
    return store


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    import wandb

    out = tmp_path / "wandb_out"
    out.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(out))
    yield out
    wandb.finish()
    wandb.teardown()


def test_replay_sends_wandb_rows_once_in_order_and_skips_other_loggers(
    tmp_path: Path, wandb_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import wandb

    spill_dir = tmp_path / "spill"
    spill(spill_dir / "WandbLogger-run42", "WandbLogger", range(0, 30), segment_bytes=1000)
    spill(spill_dir / "CSVLogger-0", "CSVLogger", range(0, 5))
    # A segment partly replayed during the run: the CLI starts after what was sent.
    partial = SpillStore(spill_dir / "WandbLogger-run42", max_bytes=1 << 30, meta={"logger": "WandbLogger"})
    partial.append([Row(seq, seq, {"train/loss": seq / 10, "epoch": 0}) for seq in range(30, 40)])
    for entry in partial.read_backlog(4):
        partial.advance(entry)
    partial.close()

    assert main(["replay", str(spill_dir), "--project", "evalguard-tests", "--offline"]) == 0
    out = capsys.readouterr().out
    assert "sent 36 rows" in out
    assert "skipping" in out
    assert "CSVLogger" in out
    assert "--run-id" in out  # the run the rows came from is named
    wandb.teardown()
    run = read_wandb_run(wandb_env)
    assert run.complete
    assert run.series("train/loss") == [(s, s / 10) for s in [*range(0, 30), *range(34, 40)]]
    remaining = list_segments(spill_dir)
    assert [json.loads(p.read_text().splitlines()[0])["logger"] for p in remaining] == ["CSVLogger"]

    # Idempotent: nothing left for W&B, no new run.
    assert main(["replay", str(spill_dir), "--project", "evalguard-tests", "--offline"]) == 0
    assert "nothing to replay" in capsys.readouterr().out
    assert len(find_wandb_runs(wandb_env)) == 1


def test_replay_of_an_empty_directory_and_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(tmp_path), "--project", "p"]) == 0
    assert "nothing to replay" in capsys.readouterr().out
    assert main(["replay", str(tmp_path / "missing"), "--project", "p"]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_interrupted_replay_continues_where_it_stopped(tmp_path: Path) -> None:
    spill_dir = tmp_path / "spill"
    rows = 6000
    spill(spill_dir, "WandbLogger", range(rows))
    env = {**os.environ, "WANDB_DIR": str(tmp_path), "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "lightning_evalguard", "replay", str(spill_dir), "--project", "p", "--offline"]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        progress = [Path(f"{seg}.progress") for seg in list_segments(spill_dir)]
        deadline = time.monotonic() + 60
        while not any(p.exists() for p in progress) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # another process: nothing to wait on but the file it writes
        first.send_signal(signal.SIGINT)  # Ctrl-C, mid-replay
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 130, err
    assert "rerun to continue" in err

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    runs = [read_wandb_run(path) for path in find_wandb_runs(tmp_path)]
    assert len(runs) == 2
    steps = [step for run in runs for step, _ in run.series("train/loss")]
    assert 0 < len(runs[0].series("train/loss")) < rows
    assert steps == list(range(rows))  # every row once, in order, across the two runs
