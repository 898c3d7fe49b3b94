from __future__ import annotations

import math
import threading

import pytest

from lightning_evalguard.engine.breaker import CircuitBreaker
from lightning_evalguard.engine.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=100.0)


def test_opens_after_threshold_consecutive_failures(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_threshold=3, recovery_time=10.0, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # resets the run of failures
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "open"
    assert breaker.state_code == 1
    assert breaker.transitions["opened"] == 1


def test_open_rejects_until_recovery_time_then_exactly_one_trial(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_threshold=1, recovery_time=10.0, clock=clock)
    breaker.record_failure()
    clock.advance(9.999)
    assert not breaker.allow()
    assert breaker.retry_in() == pytest.approx(0.001)
    clock.advance(0.001)
    assert breaker.allow()  # the trial
    assert breaker.state == "half_open"
    assert breaker.state_code == 2
    assert [breaker.allow() for _ in range(5)] == [False] * 5  # only one trial in flight
    assert breaker.rejected == 6


def test_successful_trial_closes(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_threshold=2, recovery_time=5.0, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.advance(5.0)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed"
    assert breaker.allow()
    assert breaker.transitions == {"opened": 1, "half_opened": 1, "closed": 1}


def test_failed_trial_reopens_and_restarts_the_timer(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_threshold=2, recovery_time=5.0, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.advance(5.0)
    assert breaker.allow()
    clock.advance(3.0)  # the trial ran for 3 s and failed
    breaker.record_failure()
    assert breaker.state == "open"
    clock.advance(4.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow()
    assert breaker.transitions["opened"] == 2


def test_cancelled_trial_is_released_for_a_new_one(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_threshold=1, recovery_time=5.0, clock=clock)
    breaker.record_failure()
    clock.advance(5.0)
    assert breaker.allow()
    breaker.release_trial()
    assert breaker.state == "open"
    assert breaker.allow()  # no new wait


def test_lock_open_never_lets_a_trial_through(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_threshold=3, recovery_time=1.0, clock=clock)
    breaker.lock_open("too many abandoned threads")
    clock.advance(1e6)
    assert not breaker.allow()
    breaker.record_success()
    assert breaker.state == "open"
    assert breaker.retry_in() == math.inf
    assert breaker.locked_reason == "too many abandoned threads"


def test_state_dict_round_trip_keeps_remaining_open_time(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_threshold=1, recovery_time=10.0, clock=clock)
    breaker.record_failure()
    clock.advance(4.0)
    state = breaker.state_dict()
    assert state["open_remaining_s"] == pytest.approx(6.0)

    other_clock = FakeClock(start=5000.0)  # a new process: another monotonic origin
    restored = CircuitBreaker(failure_threshold=1, recovery_time=10.0, clock=other_clock)
    restored.load_state_dict(state)
    assert restored.state == "open"
    assert restored.failures == 1
    other_clock.advance(5.9)
    assert not restored.allow()
    other_clock.advance(0.1)
    assert restored.allow()


def test_state_dict_half_open_comes_back_open_with_trial_due(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_threshold=1, recovery_time=10.0, clock=clock)
    breaker.record_failure()
    clock.advance(10.0)
    assert breaker.allow()
    restored = CircuitBreaker(failure_threshold=1, recovery_time=10.0, clock=FakeClock())
    restored.load_state_dict(breaker.state_dict())
    assert restored.state == "open"
    assert restored.allow()


def test_load_state_dict_tolerates_missing_keys(clock: FakeClock) -> None:
    breaker = CircuitBreaker(clock=clock)
    breaker.load_state_dict({})
    assert breaker.state == "closed"


def test_exactly_one_trial_under_concurrency(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_threshold=1, recovery_time=1.0, clock=clock)
    breaker.record_failure()
    clock.advance(1.0)
    barrier = threading.Barrier(8)
    results: list[bool] = []
    lock = threading.Lock()

    def contend() -> None:
        barrier.wait()
        allowed = [breaker.allow() for _ in range(200)]
        with lock:
            results.extend(allowed)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"failure_threshold": 0}, r"`failure_threshold` must be an int >= 1, got 0"),
        ({"failure_threshold": 1.5}, r"`failure_threshold` must be an int >= 1, got 1.5"),
        ({"failure_threshold": True}, r"`failure_threshold` must be an int >= 1, got True"),
        ({"recovery_time": -1.0}, r"`recovery_time` must be a finite number >= 0, got -1.0"),
        ({"recovery_time": math.inf}, r"`recovery_time` must be a finite number >= 0, got inf"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CircuitBreaker(**kwargs)
