"""``evalguard replay SPILL_DIR --project P [--run-id ID] [--offline]``: send spilled rows to W&B.

:class:`~lightning_evalguard.BufferedLogging` writes the rows its backend did not take to JSON-lines
spill files. What was not replayed during the run is sent here, after the run: segments oldest
first, rows in order, each with its ``trainer/global_step`` (the x-axis ``WandbLogger`` sets up).

Idempotent: a segment sent in full is renamed ``*.replayed`` and never read again; a segment cut short
(an error, Ctrl-C) keeps a ``.progress`` offset, so the next run starts after the last row sent.
Ctrl-C is taken between two rows, so each row is sent exactly once across an interrupt; only a
hard kill (SIGKILL, power loss) can send again the rows since the last progress record (500 at
most).

Only segments written for a W&B logger are sent; others (CSV, TensorBoard) are listed and skipped.

Examples:
    >>> run_replay("/nonexistent/spill", project="p", run_id=None, offline=True)  # doctest: +SKIP
    0
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from lightning_evalguard.engine.buffer.spill import iter_rows, list_segments, load_progress, mark_replayed, read_header
from lightning_evalguard.engine.buffer.spill import save_progress as _save_progress

__all__ = ["run_replay"]

PROGRESS_EVERY = 500  # rows between two progress records in a segment


def _is_wandb(header: dict[str, Any]) -> bool:
    return "wandb" in str(header.get("logger", "")).lower()


def _say(message: str) -> None:
    print(f"evalguard replay: {message}")


def run_replay(spill_dir: str | os.PathLike[str], *, project: str, run_id: str | None, offline: bool) -> int:
    """Send the unreplayed W&B spill segments under ``spill_dir`` to a W&B run.

    Args:
        spill_dir: a spill directory (searched recursively for ``spill-*.jsonl`` segments).
        project: the W&B project.
        run_id: an existing run to add the rows to (resumed); ``None`` for a new run.
        offline: write an offline run (``wandb sync`` it later) instead of sending now.

    Returns:
        0 when everything found was sent (or there was nothing to send), 1 on an error, 130 when
        interrupted (what was sent before is recorded and will not be sent again).
    """
    segments = list_segments(spill_dir)
    chosen: list[Path] = []
    for segment in segments:
        header = read_header(segment)
        if _is_wandb(header):
            chosen.append(segment)
        else:
            _say(f"skipping {segment} (written for {header.get('logger') or 'an unknown logger'}, not W&B)")
    if not chosen:
        _say(f"nothing to replay under {os.fspath(spill_dir)!r}")
        return 0
    versions = sorted({str(read_header(s).get("version")) for s in chosen} - {"None"})
    if run_id is None and versions:
        _say(f"rows come from run(s) {', '.join(versions)}; pass --run-id to add them to one of those")

    import wandb  # imported here: slow, and only this subcommand needs it

    try:
        run = wandb.init(
            project=project,
            id=run_id,
            resume="allow" if run_id else None,
            mode="offline" if offline else "online",
            job_type="evalguard-replay",
        )
        run.define_metric("trainer/global_step")
        run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    except Exception as exc:
        print(f"evalguard replay: error: cannot start a W&B run: {exc}", file=sys.stderr)
        return 1
    rows = 0
    status = 0
    stop = _CtrlC()
    try:
        with stop:
            for segment in chosen:
                rows += _send_segment(run, segment, stop)
    except KeyboardInterrupt:
        print("evalguard replay: interrupted; rerun to continue where it stopped", file=sys.stderr)
        status = 130
    except Exception as exc:  # progress up to the failure is recorded; a rerun continues from there
        print(f"evalguard replay: error: {exc!r}; rerun to continue where it stopped", file=sys.stderr)
        status = 1
    finally:
        run.finish(exit_code=status)
    where = f"{project}/{run.id}" + (" (offline run, `wandb sync` it)" if offline else "")
    _say(f"sent {rows} rows from {len(chosen)} spill file(s) to {where}")
    return status


class _CtrlC:
    """While active, Ctrl-C only sets a flag, read between two rows: a row is never cut in half
    between ``run.log`` and the record that it was sent (exactly once across an interrupt)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: object) -> None:
        self.requested = True

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _send_segment(run: Any, segment: Path, stop: _CtrlC) -> int:
    """Send one segment from its recorded progress; mark it replayed when done. Returns rows sent."""
    sent = 0
    done = load_progress(segment)  # byte offset after the last row known sent
    try:
        for record, end in iter_rows(segment, done):
            if stop.requested:
                raise KeyboardInterrupt
            row = dict(record["metrics"])
            if record.get("step") is not None:
                row["trainer/global_step"] = record["step"]
            run.log(row)
            sent += 1
            done = end
            if sent % PROGRESS_EVERY == 0:
                _save_progress(segment, done)
    except BaseException:
        if sent:
            _save_progress(segment, done)
        raise
    mark_replayed(segment)
    return sent
