"""Spill segments on disk: format, rotation, cap, replay cursor and marks, torn and lost files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lightning_evalguard.engine.buffer import LogConfig, LogPipeline, Row, SpillFailure, SpillStore, WarnOnce
from lightning_evalguard.engine.buffer.spill import (
    iter_rows,
    list_segments,
    load_progress,
    mark_replayed,
    read_header,
    save_progress,
)
from lightning_evalguard.engine.clock import FakeClock
from lightning_evalguard.testing import FullDisk

from .test_buffer import ListSink, assert_identity


def rows(start: int, stop: int) -> list[Row]:
    return [
        Row(seq, seq * 10, {"loss": seq / 2, "acc": float("nan") if seq == 3 else 1.0}) for seq in range(start, stop)
    ]


def test_segments_have_a_header_and_one_json_row_per_line(tmp_path: Path) -> None:
    store = SpillStore(tmp_path, max_bytes=1 << 20, meta={"logger": "WandbLogger", "version": "abc123"})
    store.append(rows(0, 4))
    store.close()
    (segment,) = list_segments(tmp_path)
    header = read_header(segment)
    assert header["evalguard_spill"] == 1
    assert (header["logger"], header["version"]) == ("WandbLogger", "abc123")
    records = [record for record, _ in iter_rows(segment)]
    assert [(r["seq"], r["step"]) for r in records] == [(0, 0), (1, 10), (2, 20), (3, 30)]
    assert records[1]["metrics"]["loss"] == 0.5
    assert records[3]["metrics"]["acc"] != records[3]["metrics"]["acc"]  # NaN survives the round trip
    assert len(segment.read_text().splitlines()) == 5


def test_rotation_and_in_order_replay_across_segments(tmp_path: Path) -> None:
    store = SpillStore(tmp_path, max_bytes=1 << 20, segment_bytes=300)
    for start in range(0, 20, 2):
        store.append(rows(start, start + 2))
    segments = list_segments(tmp_path)
    assert len(segments) > 3
    assert store.backlog_rows == 20
    seen = []
    while store.backlog_rows:
        for entry in store.read_backlog(3):
            seen.append(entry.row.seq)
            assert store.advance(entry) == 2
        store.commit()
    assert seen == list(range(20))
    assert store.backlog_values == 0
    # Rotated segments fully replayed are marked at once; one still open is marked when closed.
    marked = [p for p in tmp_path.iterdir() if p.name.endswith(".replayed")]
    assert len(marked) >= len(segments) - 1
    store.close()
    assert list_segments(tmp_path) == []
    assert all(p.name.endswith(".replayed") for p in tmp_path.iterdir())


def test_partial_replay_is_recorded_for_the_cli(tmp_path: Path) -> None:
    store = SpillStore(tmp_path, max_bytes=1 << 20)
    store.append(rows(0, 5))
    entries = store.read_backlog(2)
    for entry in entries:
        store.advance(entry)
    store.close()
    (segment,) = list_segments(tmp_path)
    offset = load_progress(segment)
    assert offset == entries[-1].end
    assert [record["seq"] for record, _ in iter_rows(segment, offset)] == [2, 3, 4]


def test_cap_refuses_rows_as_spill_full(tmp_path: Path) -> None:
    store = SpillStore(tmp_path, max_bytes=500)
    store.append(rows(0, 2))
    with pytest.raises(SpillFailure, match="max_spill_mb") as info:
        store.append(rows(2, 10))
    assert info.value.reason == "spill_full"
    assert store.rows_written == 2


def test_a_failed_write_leaves_no_torn_row_behind(tmp_path: Path) -> None:
    store = SpillStore(tmp_path, max_bytes=1 << 20)
    store.append(rows(0, 2))
    (segment,) = list_segments(tmp_path)
    size = segment.stat().st_size
    with FullDisk(tmp_path), pytest.raises(SpillFailure, match="No space left") as info:
        store.append(rows(2, 4))
    assert info.value.reason == "spill_failed"
    assert segment.stat().st_size == size
    store.append(rows(4, 5))
    assert [e.row.seq for e in store.read_backlog(10)] == [0, 1, 4]
    store.close()
    with pytest.raises(SpillFailure, match="closed"):
        store.append(rows(5, 6))


def test_unwritable_directory_raises_spill_failed(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    store = SpillStore(tmp_path / "file" / "spill", max_bytes=1 << 20)
    with pytest.raises(SpillFailure) as info:
        store.append(rows(0, 1))
    assert info.value.reason == "spill_failed"
    assert isinstance(info.value.cause, OSError)


def test_iter_rows_stops_at_a_torn_line_and_skips_garbage(tmp_path: Path) -> None:
    store = SpillStore(tmp_path, max_bytes=1 << 20)
    store.append(rows(0, 2))
    store.close()
    (segment,) = list_segments(tmp_path)
    with open(segment, "a", encoding="utf-8") as fh:
        fh.write("not json\n")
        fh.write(json.dumps({"seq": 9, "step": 90, "metrics": {"x": 1.0}}) + "\n")
        fh.write('{"seq": 10, "step": 100, "metr')  # a crash mid-write
    assert [record["seq"] for record, _ in iter_rows(segment)] == [0, 1, 9]


def test_progress_and_marks_are_atomic_files(tmp_path: Path) -> None:
    segment = tmp_path / "spill-x.jsonl"
    segment.write_text("{}\n")
    assert load_progress(segment) == 0
    save_progress(segment, 123)
    assert load_progress(segment) == 123
    marked = mark_replayed(segment)
    assert marked.name == "spill-x.jsonl.replayed"
    assert not os.path.exists(f"{segment}.progress")
    assert list_segments(tmp_path) == []


def test_a_lost_spill_file_is_counted_as_spill_failed(tmp_path: Path) -> None:
    clock = FakeClock()
    sink = ListSink()
    pipe = LogPipeline(
        LogConfig(max_retries=0, retry_backoff=0.1, max_backoff=1.0, failure_threshold=100),
        sink,
        spill_dir=tmp_path,
        clock=clock,
        sleep=clock.sleep,
        warn=WarnOnce(),
    )
    sink.down = True
    for step in range(3):
        pipe.log({"x": float(step), "y": 0.0}, step)
    with pytest.warns(RuntimeWarning):
        pipe.flusher.step()
    assert pipe.stats()["spilled"] == 6
    for segment in list_segments(tmp_path):
        segment.unlink()  # someone cleaned the directory mid-run
    sink.down = False
    pipe.log({"x": 3.0, "y": 0.0}, 3)
    with pytest.warns(RuntimeWarning, match="could not be read back"):
        pipe.flusher.step()
    pipe.flusher.step()
    s = pipe.stats()
    assert (s["spilled"], s["dropped_spill_failed"], s["delivered"]) == (0, 6, 2)
    assert_identity(s)
    assert sink.steps() == [3]
