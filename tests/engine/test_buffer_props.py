"""Property test of the buffer's accounting: random sequences of logging, backend failures and
recoveries, transient errors, a full buffer, a full disk, time passing, and shutdown. After every
step the ledger identity holds; at the end the backend saw each row at most once, in order, and
the spill files on disk hold exactly what the ledger calls spilled."""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lightning_evalguard.engine.buffer import LogConfig, LogPipeline, WarnOnce
from lightning_evalguard.engine.buffer.core import row_bytes
from lightning_evalguard.engine.buffer.spill import iter_rows, list_segments, load_progress
from lightning_evalguard.engine.clock import FakeClock
from lightning_evalguard.testing import FullDisk

from .test_buffer import ListSink, assert_identity

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

VALUES = st.one_of(st.floats(allow_nan=True), st.integers(-5, 5), st.just("not a number"), st.none())


class BufferMachine(RuleBasedStateMachine):
    @initialize(
        when_full=st.sampled_from(["spill", "drop_oldest", "drop_newest"]),
        rows_capacity=st.integers(1, 6),
        max_retries=st.integers(0, 2),
        rules=st.sampled_from([None, {"m": "mean:3", "*": "all"}, {"e": "every:2", "d": "drop"}]),
    )
    def setup(self, when_full: str, rows_capacity: int, max_retries: int, rules: dict[str, str] | None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="evalguard-props-"))
        self.clock = FakeClock()
        self.sink = ListSink()
        capacity = rows_capacity * row_bytes({"m": 0.0, "e": 0.0, "d": 0.0})
        self.pipe = LogPipeline(
            LogConfig(
                rules=rules,
                max_buffer_mb=capacity / 2**20,
                when_full=when_full,  # type: ignore[arg-type]
                max_batch=3,
                max_retries=max_retries,
                retry_backoff=0.5,
                max_backoff=2.0,
                failure_threshold=2,
                recovery_time=10.0,
                max_spill_mb=4000 / 2**20,
            ),
            self.sink,
            spill_dir=self.dir / "spill",
            clock=self.clock,
            sleep=self.clock.sleep,
            rng=random.Random(0),
            warn=WarnOnce(),
        )
        self.disk: FullDisk | None = None
        self.step_no = 0

    @rule(keys=st.lists(st.sampled_from(["m", "e", "d", "x"]), min_size=1, max_size=3, unique=True), data=st.data())
    def log(self, keys: list[str], data: Any) -> None:
        row = {key: data.draw(VALUES) for key in keys}
        self.pipe.log(row, self.step_no)
        self.step_no += 1

    @rule(n=st.integers(2, 4))
    def log_several(self, n: int) -> None:
        for _ in range(n):
            self.pipe.log({"x": float(self.step_no)}, self.step_no)
            self.step_no += 1

    @rule()
    def call(self) -> None:
        self.pipe.call("log_hyperparams", ({"lr": 0.1},), {})

    @rule()
    def flush_cycle(self) -> None:
        self.pipe.flusher.step()

    @rule()
    def backend_down(self) -> None:
        self.sink.down = True

    @rule()
    def backend_up(self) -> None:
        self.sink.down = False

    @rule(n=st.integers(1, 3))
    def transient_errors(self, n: int) -> None:
        self.sink.fail_next = n

    @rule(seconds=st.sampled_from([1.0, 10.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: self.disk is None)
    @rule()
    def disk_fills(self) -> None:
        self.disk = FullDisk(self.dir)
        self.disk.__enter__()

    @precondition(lambda self: self.disk is not None)
    @rule()
    def disk_freed(self) -> None:
        assert self.disk is not None
        self.disk.__exit__(None, None, None)
        self.disk = None

    @invariant()
    def ledger_identity(self) -> None:
        stats = self.pipe.stats()
        assert_identity(stats)
        assert stats["buffer_bytes"] >= 0
        assert stats["pending"] >= 0
        assert stats["spilled"] >= 0

    def _values_on_disk(self) -> int:
        total = 0
        for segment in list_segments(self.dir):
            for record, _ in iter_rows(segment, load_progress(segment)):
                total += len(record["metrics"])
        return total

    def teardown(self) -> None:
        try:
            if self.disk is not None:
                self.disk.__exit__(None, None, None)
            # The spill files hold exactly what the ledger calls spilled.
            assert self._values_on_disk() == self.pipe.stats()["spilled"]
            # The backend recovers: everything spilled or queued is delivered, once, in order.
            self.sink.down = False
            self.sink.fail_next = 0
            self.clock.advance(60.0)
            while self.pipe.flusher.step() == "progress":
                pass
            self.pipe.close(1.0)  # no thread: emits open windows, spills what is left
            while self.pipe.flusher.step() == "progress":
                pass
            stats = self.pipe.stats()
            assert_identity(stats)
            assert stats["pending"] == 0
            assert stats["held_in_windows"] == 0
            seqs = [seq for seq, _, values in self.sink.rows if "call" not in values]
            assert seqs == sorted(set(seqs)), "rows delivered twice or out of order"
            delivered_values = sum(len(values) for _, _, values in self.sink.rows if "call" not in values)
            assert delivered_values == stats["delivered"]
            assert self._values_on_disk() == stats["spilled"]
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


TestBufferAccounting = BufferMachine.TestCase
TestBufferAccounting.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
