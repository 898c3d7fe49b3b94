from __future__ import annotations

import threading
import time

import pytest

from lightning_evalguard.engine.clock import FakeClock
from lightning_evalguard.engine.watchdog import Watchdog, percentile


def test_fires_at_the_deadline_not_before() -> None:
    clock = FakeClock()
    dog = Watchdog(clock=clock)
    fired: list[str] = []
    dog.watch("a", 10.0, lambda: fired.append("a"))
    dog.watch("b", 5.0, lambda: fired.append("b"))
    clock.advance(4.99)
    assert dog.poll() == 0
    clock.advance(0.01)
    assert dog.poll() == 1
    clock.advance(100)
    assert dog.poll() == 1
    assert fired == ["b", "a"]
    assert dog.poll() == 0  # once only


def test_rewatch_replaces_and_unwatch_forgets() -> None:
    clock = FakeClock()
    dog = Watchdog(clock=clock)
    fired: list[int] = []
    dog.watch("k", 1.0, lambda: fired.append(1))
    dog.watch("k", 3.0, lambda: fired.append(3))
    dog.watch("gone", 1.0, lambda: fired.append(-1))
    assert dog.unwatch("gone")
    assert not dog.unwatch("gone")
    clock.advance(2.0)
    dog.poll()
    assert fired == []
    clock.advance(1.0)
    dog.poll()
    assert fired == [3]
    assert dog.armed() == 0


def test_a_failing_action_is_counted_and_does_not_stop_others() -> None:
    clock = FakeClock()
    dog = Watchdog(clock=clock)
    fired: list[str] = []

    def boom() -> None:
        raise RuntimeError("bug in an action")

    dog.watch("bad", 1.0, boom)
    dog.watch("good", 1.0, lambda: fired.append("good"))
    clock.advance(1.0)
    assert dog.poll() == 2
    assert dog.action_errors == 1
    assert fired == ["good"]


def test_thread_fires_deadlines_and_measures_lag() -> None:
    dog = Watchdog(tick=0.01)
    done = threading.Event()
    dog.start()
    try:
        dog.watch("x", time.monotonic() + 0.05, done.set)
        assert done.wait(5.0)
        deadline = time.monotonic() + 5
        while not dog._lags and time.monotonic() < deadline:  # a few ticks
            time.sleep(0.01)
        assert dog.lag_percentile(0.95) >= 0.0
        assert dog.lag_max_s < 5.0
        assert len(dog._lags) > 0
    finally:
        dog.close()
    assert not dog.running


def test_lag_reflects_a_blocked_interpreter() -> None:
    """A thread hogging the GIL delays the watchdog's ticks; the lag shows it."""
    dog = Watchdog(tick=0.005)
    dog.start()
    try:
        time.sleep(0.05)
        end = time.monotonic() + 0.3
        x = 0
        while time.monotonic() < end:  # pure-Python busy loop holds the GIL in 5 ms slices
            x += 1
        time.sleep(0.05)
    finally:
        dog.close()
    assert dog.lag_max_s > 0.0


def test_close_is_idempotent_and_drops_deadlines() -> None:
    dog = Watchdog(tick=0.01)
    dog.start()
    dog.watch("x", time.monotonic() + 60, lambda: None)
    dog.close()
    dog.close()
    assert dog.armed() == 0


def test_percentile() -> None:
    assert percentile([], 0.5) == 0.0
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([0.0, 10.0], 0.95) == pytest.approx(9.5)


def test_bad_tick() -> None:
    with pytest.raises(ValueError, match=r"`tick` must be > 0, got 0"):
        Watchdog(tick=0)
