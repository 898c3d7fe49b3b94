"""The bounded buffer, its ledger and the flusher: driven by hand with a fake clock (no thread) where
possible, and with real threads only where the thread is what is tested (hangs, shutdown)."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from lightning_evalguard.engine.breaker import STATE_CODES
from lightning_evalguard.engine.buffer import Call, LogConfig, LogPipeline, MetricBuffer, Row, WarnOnce
from lightning_evalguard.engine.buffer.core import DELIVERED, row_bytes
from lightning_evalguard.engine.clock import FakeClock
from lightning_evalguard.testing import FullDisk


class ListSink:
    """A backend that records what it receives; ``down`` makes it raise, ``fail_next`` fails that many
    attempts, ``block_on`` makes the send of that step wait on ``release``."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int | None, dict[str, Any]]] = []
        self.calls: list[str] = []
        self.saves = 0
        self.down = False
        self.fail_next = 0
        self.attempts = 0
        self.block_on: int | None = None
        self.entered = threading.Event()
        self.release = threading.Event()

    def send_row(self, row: Row) -> None:
        self.attempts += 1
        if row.step == self.block_on:
            self.entered.set()
            assert self.release.wait(30), "test forgot to release the sink"
        if self.down:
            raise ConnectionError("backend down")
        if self.fail_next:
            self.fail_next -= 1
            raise TimeoutError("transient")
        self.rows.append((row.seq, row.step, dict(row.values)))

    def send_call(self, call: Call) -> None:
        if self.down:
            raise ConnectionError("backend down")
        self.calls.append(call.name)
        self.rows.append((call.seq, None, {"call": call.name}))

    def after_batch(self) -> None:
        self.saves += 1

    def steps(self) -> list[int | None]:
        return [step for _, step, values in self.rows if "call" not in values]


pytestmark = pytest.mark.filterwarnings("ignore:BufferedLogging. the logger raised:RuntimeWarning")


def assert_identity(stats: dict[str, Any]) -> None:
    dropped = sum(v for k, v in stats.items() if k.startswith("dropped_"))
    assert stats["accepted"] == stats["delivered"] + stats["pending"] + stats["spilled"] + dropped, stats


def make(tmp_path: Path | None = None, clock: FakeClock | None = None, **config: Any) -> tuple[LogPipeline, ListSink]:
    clock = clock or FakeClock()
    config.setdefault("retry_backoff", 0.1)
    config.setdefault("max_backoff", 1.0)
    sink = ListSink()
    pipe = LogPipeline(
        LogConfig(**config),
        sink,
        spill_dir=None if tmp_path is None else tmp_path / "spill",
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(0),
        warn=WarnOnce(),
    )
    return pipe, sink


def drain(pipe: LogPipeline) -> None:
    while pipe.flusher.step() == "progress":
        pass


def test_engine_does_not_import_lightning() -> None:
    code = (
        "import sys; import lightning_evalguard.engine.buffer, lightning_evalguard.engine.sampler; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'torch', 'wandb')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- buffer and ledger -----------------------------------------------------------------------------
def test_ledger_moves_values_through_every_state() -> None:
    buf = MetricBuffer(1 << 20, "drop_newest")
    buf.put_row({"a": 1.0, "b": 2.0}, step=0)
    buf.put_row({"a": 3.0}, step=1)
    buf.count_invalid(2)
    assert_identity(buf.snapshot())
    first, second = buf.take(10)
    assert buf.snapshot()["pending"] == 3  # in flight still counts as pending
    assert buf.resolve(first, DELIVERED)
    assert buf.resolve(second, "spilled")
    assert not buf.resolve(second, DELIVERED)  # settled once only
    s = buf.snapshot()
    assert (s["accepted"], s["delivered"], s["spilled"], s["dropped_invalid"], s["pending"]) == (5, 2, 1, 2, 0)
    assert_identity(s)
    assert s["buffer_bytes"] == 0
    assert s["buffer_peak_bytes"] > 0


def test_byte_estimate_tracks_real_memory() -> None:
    # As in training: each step makes fresh value objects (Lightning's tensor -> float) under the
    # same key strings; the row is the only thing holding them.
    buf = MetricBuffer(1 << 30, "drop_newest")
    keys = [f"train/metric_{k}" for k in range(20)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(2000):
        buf.put_row({key: float(i * k) + 0.5 for k, key in enumerate(keys)}, i)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    estimate = buf.snapshot()["buffer_bytes"]
    assert 0.8 * used < estimate < 1.25 * used, (estimate, used)


def test_drop_newest_and_drop_oldest_keep_the_bound() -> None:
    size = row_bytes({"x": 0.0})
    newest = MetricBuffer(3 * size, "drop_newest")
    oldest = MetricBuffer(3 * size, "drop_oldest")
    for step in range(5):
        newest.put_row({"x": float(step)}, step)
        oldest.put_row({"x": float(step)}, step)
    assert [r.step for r in newest.take(10)] == [0, 1, 2]
    assert [r.step for r in oldest.take(10)] == [2, 3, 4]
    for buf, reason in ((newest, "dropped_newest"), (oldest, "dropped_oldest")):
        s = buf.snapshot()
        assert s[reason] == 2
        assert s["buffer_peak_bytes"] <= 3 * size
        assert_identity(s)


def test_calls_count_against_the_bound() -> None:
    image = bytearray(10_000)  # stands for an image array handed to log_image
    size = row_bytes({"x": 0.0})
    newest = MetricBuffer(3 * size, "drop_newest")
    oldest = MetricBuffer(3 * size + 12_000, "drop_oldest")
    for buf in (newest, oldest):
        buf.put_row({"x": 0.0}, 0)
        buf.put_row({"x": 1.0}, 1)
    assert not newest.put_call("log_image", ("img", [image]), {})
    assert oldest.put_call("log_image", ("img", [image]), {})
    assert oldest.put_call("log_image", ("img", [image]), {})  # evicts the first call and the rows
    s_new, s_old = newest.snapshot(), oldest.snapshot()
    assert (s_new["calls_dropped"], s_new["queued_items"]) == (1, 2)
    assert (s_old["calls_dropped"], s_old["dropped_oldest"], s_old["queued_items"]) == (1, 2, 1)
    assert s_old["buffer_bytes"] <= 3 * size + 12_000
    assert_identity(s_old)


def test_spill_when_full_sends_the_oldest_rows_to_disk(tmp_path: Path) -> None:
    pipe, sink = make(tmp_path, max_buffer_mb=3 * row_bytes({"x": 0.0}) / 2**20, when_full="spill")
    for step in range(6):
        pipe.log({"x": float(step)}, step)
    s = pipe.stats()
    assert s["spilled"] == 3
    assert s["pending"] == 3
    assert_identity(s)
    drain(pipe)  # the backend is up: spilled rows are replayed first, then the buffer
    assert sink.steps() == [0, 1, 2, 3, 4, 5]
    s = pipe.stats()
    assert (s["delivered"], s["replayed"], s["spilled"]) == (6, 3, 0)
    pipe.close(1.0)


def test_block_waits_for_room_then_gives_up_after_flush_timeout() -> None:
    clock = FakeClock()
    size = row_bytes({"x": 0.0})
    waited = threading.Event()

    def on_wait() -> None:
        waited.set()
        clock.advance(1.0)

    buf = MetricBuffer(2 * size, "block", block_timeout=3.0, on_wait=on_wait, clock=clock)
    buf.put_row({"x": 0.0}, 0)
    buf.put_row({"x": 1.0}, 1)
    buf.put_row({"x": 2.0}, 2)  # nobody frees room: waits 3 (fake) seconds, then drops it
    s = buf.snapshot()
    assert s["dropped_newest"] == 1
    assert clock.now() >= 3.0
    # Now a consumer frees room while the producer waits.
    waited.clear()

    def consumer() -> None:
        waited.wait(10)
        (item,) = buf.take(1)
        buf.resolve(item, DELIVERED)

    thread = threading.Thread(target=consumer, name="test-consumer")
    thread.start()
    buf.put_row({"x": 3.0}, 3)
    thread.join(10)
    assert [r.step for r in buf.take(10)] == [1, 3]
    assert buf.snapshot()["dropped_newest"] == 1


def test_invalid_values_are_counted_and_warned_once() -> None:
    pipe, sink = make()
    with pytest.warns(RuntimeWarning, match="dropped_invalid.*'name'"):
        pipe.log({"loss": 1.0, "name": "run-1", "cfg": {"a": 1}}, 0)
    pipe.log({"loss": 2.0, "name": "run-1"}, 1)
    assert pipe.warn.counts["invalid"] == 2  # type: ignore[attr-defined]
    drain(pipe)
    s = pipe.stats()
    assert (s["accepted"], s["delivered"], s["dropped_invalid"]) == (5, 2, 3)
    assert sink.rows[0][2] == {"loss": 1.0}


# -- flusher: order, batches, retries --------------------------------------------------------------
def test_rows_and_calls_are_delivered_in_order_in_batches() -> None:
    pipe, sink = make(max_batch=4)
    for step in range(6):
        pipe.log({"x": float(step)}, step)
        if step == 2:
            pipe.call("log_hyperparams", ({"lr": 0.1},), {})
    assert pipe.flusher.step() == "progress"
    assert len(sink.rows) == 4
    assert sink.saves == 1
    drain(pipe)
    assert [seq for seq, _, _ in sink.rows] == sorted(seq for seq, _, _ in sink.rows)
    assert sink.rows[3][2] == {"call": "log_hyperparams"}
    s = pipe.stats()
    assert (s["delivered"], s["calls_done"], s["send_attempts"], s["failed_attempts"]) == (6, 1, 7, 0)


def test_transient_failures_are_retried_with_growing_backoff() -> None:
    clock = FakeClock()
    pipe, sink = make(clock=clock, max_retries=3, retry_backoff=0.5, max_backoff=10.0)
    pipe.log({"x": 1.0}, 0)
    sink.fail_next = 3
    drain(pipe)
    assert sink.steps() == [0]
    s = pipe.stats()
    assert (s["delivered"], s["failed_attempts"], s["retries"], s["send_attempts"]) == (1, 3, 3, 4)
    assert s["logged"] == 1
    assert pipe.breaker.state == "closed"
    # Equal jitter: each wait lies in [d/2, d] for d = 0.5, 1.0, 2.0.
    assert len(clock.slept) == 3
    for wait, full in zip(clock.slept, (0.5, 1.0, 2.0), strict=True):
        assert full / 2 <= wait <= full


def test_exhausted_retries_spill_and_the_spill_is_replayed_first_in_order(tmp_path: Path) -> None:
    pipe, sink = make(tmp_path, max_retries=1, failure_threshold=5, max_batch=3)
    for step in range(3):
        pipe.log({"x": float(step)}, step)
    sink.fail_next = 2  # step 0 fails twice: spilled, and steps 1-2 are spilled behind it
    pipe.flusher.step()
    s = pipe.stats()
    assert (s["spilled"], s["delivered"], s["send_attempts"]) == (3, 0, 2)
    assert_identity(s)
    for step in range(3, 6):
        pipe.log({"x": float(step)}, step)
    drain(pipe)
    assert sink.steps() == [0, 1, 2, 3, 4, 5]
    s = pipe.stats()
    assert (s["delivered"], s["replayed"], s["spilled"]) == (6, 3, 0)
    pipe.close(1.0)
    assert sorted(p.name.rsplit(".", 1)[-1] for p in (tmp_path / "spill").iterdir()) == ["replayed"]


def test_breaker_opens_spills_without_trying_then_a_trial_closes_it(tmp_path: Path) -> None:
    clock = FakeClock()
    pipe, sink = make(tmp_path, clock=clock, max_retries=0, failure_threshold=2, recovery_time=30.0, max_batch=2)
    sink.down = True
    for step in range(4):
        pipe.log({"x": float(step)}, step)
        drain(pipe)
    assert pipe.breaker.state == "open"
    attempts = pipe.stats()["send_attempts"]
    for step in range(4, 10):
        pipe.log({"x": float(step)}, step)
    drain(pipe)
    s = pipe.stats()
    assert s["send_attempts"] == attempts  # open: nothing is tried, everything goes to the spill
    assert (s["spilled"], s["breaker_state"]) == (10, STATE_CODES["open"])
    clock.advance(30.0)
    drain(pipe)  # half-open trial (one attempt) fails: open again, timer restarted
    assert pipe.breaker.state == "open"
    assert pipe.stats()["send_attempts"] == attempts + 1
    sink.down = False
    clock.advance(30.0)
    pipe.log({"x": 10.0}, 10)
    drain(pipe)
    assert pipe.breaker.state == "closed"
    assert sink.steps() == list(range(11))
    s = pipe.stats()
    assert (s["delivered"], s["spilled"], s["replayed"]) == (11, 0, 10)
    pipe.close(1.0)


def test_calls_are_dropped_and_counted_when_the_backend_is_down(tmp_path: Path) -> None:
    pipe, sink = make(tmp_path, max_retries=0)
    sink.down = True
    pipe.call("log_hyperparams", ({"lr": 0.1},), {})
    with pytest.warns(RuntimeWarning):
        drain(pipe)
    s = pipe.stats()
    assert (s["calls_accepted"], s["calls_dropped"], s["calls_pending"]) == (1, 1, 0)


# -- spill faults ----------------------------------------------------------------------------------
def test_unwritable_spill_dir_drops_rows_counted_and_warns_once(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the spill directory should be")
    clock = FakeClock()
    sink = ListSink()
    warn = WarnOnce()
    pipe = LogPipeline(
        LogConfig(max_retries=0, retry_backoff=0.1, max_backoff=1.0),
        sink,
        spill_dir=blocker / "spill",
        clock=clock,
        sleep=clock.sleep,
        warn=warn,
    )
    sink.down = True
    for step in range(5):
        pipe.log({"x": float(step), "y": 1.0}, step)
    with pytest.warns(RuntimeWarning) as record:
        drain(pipe)
    s = pipe.stats()
    assert s["dropped_spill_failed"] == 10
    assert s["spill_write_errors"] >= 1
    assert_identity(s)
    assert sum("could not be spilled" in str(w.message) for w in record) == 1
    assert warn.counts["spill_failed"] >= 2  # counted every time, warned once


def test_full_disk_drops_rows_as_spill_failed_then_recovers(tmp_path: Path) -> None:
    pipe, sink = make(tmp_path, max_retries=0, failure_threshold=100)
    sink.down = True
    pipe.log({"x": 0.0}, 0)
    drain(pipe)  # this one reaches the disk
    pipe.log({"x": 1.0}, 1)
    with FullDisk(tmp_path / "spill") as disk, pytest.warns(RuntimeWarning, match="No space left"):
        drain(pipe)
    assert disk.failed_writes >= 1
    pipe.log({"x": 2.0}, 2)
    drain(pipe)  # disk fine again
    s = pipe.stats()
    assert (s["spilled"], s["dropped_spill_failed"]) == (2, 1)
    sink.down = False
    drain(pipe)
    assert sink.steps() == [0, 2]  # the torn write left nothing behind to replay
    assert_identity(pipe.stats())
    pipe.close(1.0)


def test_spill_cap_refuses_rows_as_spill_full(tmp_path: Path) -> None:
    pipe, sink = make(tmp_path, max_retries=0, max_spill_mb=600 / 2**20, failure_threshold=100)
    sink.down = True
    for step in range(20):
        pipe.log({"x": float(step)}, step)
    with pytest.warns(RuntimeWarning, match="max_spill_mb"):
        drain(pipe)
    s = pipe.stats()
    assert s["spilled"] > 0
    assert s["dropped_spill_full"] > 0
    assert s["spilled"] + s["dropped_spill_full"] == 20
    pipe.close(1.0)


# -- threads: hangs and shutdown -------------------------------------------------------------------
def test_watchdog_abandons_a_hung_call_and_a_fresh_flusher_carries_on(tmp_path: Path) -> None:
    clock = FakeClock()
    pipe, sink = make(tmp_path, clock=clock, send_timeout=5.0, flush_interval=3600.0)
    sink.block_on = 1
    pipe.start()
    try:
        for step in range(4):
            pipe.log({"x": float(step)}, step)
        pipe.flusher.request_flush()
        assert sink.entered.wait(10)
        assert not pipe.flusher.check_stuck()  # not yet past send_timeout
        clock.advance(5.0)
        with pytest.warns(RuntimeWarning, match="send_timeout"):
            assert pipe.flusher.check_stuck()
        assert pipe.flush(10.0)
        assert sink.steps() == [0, 2, 3]
        s = pipe.stats()
        assert (s["dropped_abandoned"], s["delivered"], s["abandoned_calls"]) == (1, 3, 1)
        assert_identity(s)
        stuck = pipe.flusher._threads[0]
        assert stuck.is_alive()
        assert pipe.flusher.thread is not stuck
    finally:
        sink.release.set()
    stuck.join(10)
    assert not stuck.is_alive()
    assert pipe.stats()["delivered"] == 3  # the late return of the abandoned call is not counted
    pipe.close(5.0)


def test_repeated_hangs_lock_the_breaker_open(tmp_path: Path) -> None:
    clock = FakeClock()
    pipe, sink = make(tmp_path, clock=clock, send_timeout=1.0, flush_interval=3600.0, failure_threshold=100)
    pipe.flusher.max_abandoned = 2
    pipe.start()
    try:
        for hung_step in (0, 1):
            sink.block_on = hung_step
            sink.entered.clear()
            pipe.log({"x": float(hung_step)}, hung_step)
            pipe.flusher.request_flush()
            assert sink.entered.wait(10)
            clock.advance(1.0)
            with pytest.warns(RuntimeWarning):
                assert pipe.flusher.check_stuck()
        assert pipe.breaker.locked_reason is not None
        pipe.log({"x": 2.0}, 2)
        assert pipe.flush(10.0)
        s = pipe.stats()
        assert (s["dropped_abandoned"], s["spilled"], s["breaker_state"]) == (2, 1, STATE_CODES["open"])
    finally:
        sink.release.set()
    pipe.close(5.0)
    for thread in pipe.flusher._threads:
        thread.join(10)


def test_close_is_bounded_spills_the_rest_and_joins(tmp_path: Path) -> None:
    class SlowSink(ListSink):
        def send_row(self, row: Row) -> None:
            time.sleep(0.01)
            super().send_row(row)

    sink = SlowSink()
    pipe = LogPipeline(LogConfig(flush_interval=0.01, max_batch=16), sink, spill_dir=tmp_path / "spill")
    pipe.start()
    for step in range(2000):  # about 20 s of sending
        pipe.log({"x": float(step)}, step)
    started = time.monotonic()
    pipe.close(0.5)
    elapsed = time.monotonic() - started
    assert elapsed < 0.5 + 0.5, elapsed  # bounded (generous margin for a loaded machine)
    assert pipe.flusher.threads_alive() == []
    s = pipe.stats()
    assert s["pending"] == 0
    assert s["delivered"] > 0
    assert s["spilled"] > 0
    assert s["delivered"] + s["spilled"] == 2000
    assert sink.steps() == list(range(s["delivered"]))
    pipe.close(0.5)  # idempotent


def test_close_emits_open_windows_and_is_idempotent() -> None:
    pipe, sink = make(rules={"x": "mean:100"})
    pipe.start()
    for step in range(5):
        pipe.log({"x": float(step)}, step)
    pipe.close(5.0)
    pipe.close(5.0)
    assert sink.rows == [(1, 4, {"x": 2.0})]
    assert pipe.flusher.threads_alive() == []
