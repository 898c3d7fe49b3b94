"""The evaluator with real inline and stream runners (no Lightning)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from lightning_evalguard.engine.clock import FakeClock
from lightning_evalguard.engine.evaluator import Evaluator
from lightning_evalguard.engine.jobs import Job
from lightning_evalguard.engine.runners.inline import InlineRunner
from lightning_evalguard.engine.runners.stream import StreamRunner
from lightning_evalguard.engine.snapshot import SnapshotPool
from lightning_evalguard.errors import EvalTimeout

OUTCOMES = ("completed", "failed", "timed_out", "cancelled", "replaced", "pending", "running")


def identity_holds(stats: dict[str, Any]) -> bool:
    return stats["submitted"] == sum(stats[k] for k in OUTCOMES)


def value_of(job: Job) -> float:
    return float(job.slot.tensors[0])


def make(execute: Callable[[Job], Any], *, runner: str = "stream", **kwargs: Any) -> Evaluator:
    max_pending = kwargs.pop("max_pending", 1)
    cancel_grace = kwargs.pop("cancel_grace", 5.0)
    pool = SnapshotPool(lambda: [torch.zeros(())], size=max_pending + 1)
    r = (StreamRunner(execute, cancel_grace=cancel_grace) if runner == "stream"
         else InlineRunner(execute, cancel_grace=cancel_grace))
    return Evaluator(r, pool, max_pending=max_pending, watchdog_tick=0.01, **kwargs)


@pytest.fixture
def closing() -> Iterator[list[Evaluator]]:
    made: list[Evaluator] = []
    yield made
    for ev in made:
        ev.close()


def test_stream_results_come_back_in_order_off_the_calling_thread(closing: list[Evaluator]) -> None:
    threads: list[str] = []

    def execute(job: Job) -> float:
        threads.append(threading.current_thread().name)
        return value_of(job)

    ev = make(execute, when_full="wait", timeout=10.0)
    closing.append(ev)
    for i in range(5):
        assert ev.request(step=i, epoch=0, sources=[torch.tensor(float(i))]) == "submitted"
    assert ev.wait_idle(10.0)
    jobs = ev.drain()
    assert [j.result for j in jobs] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [j.step for j in jobs] == [0, 1, 2, 3, 4]
    assert set(threads) == {"evalguard-eval-0"}
    stats = ev.stats()
    assert stats["completed"] == 5
    assert identity_holds(stats)


def test_job_sees_its_snapshot_not_the_live_tensor(closing: list[Evaluator]) -> None:
    gate = threading.Event()

    def execute(job: Job) -> float:
        gate.wait(10)
        return value_of(job)

    ev = make(execute, timeout=10.0)
    closing.append(ev)
    live = torch.tensor(1.0)
    ev.request(step=1, epoch=0, sources=[live])
    live.fill_(99.0)  # training goes on before the evaluation reads the weights
    gate.set()
    assert ev.wait_idle(10.0)
    assert [j.result for j in ev.drain()] == [1.0]


def test_python_level_hang_times_out_and_the_worker_carries_on(closing: list[Evaluator]) -> None:
    def execute(job: Job) -> float:
        while job.step == 1:  # a sleep loop: stopped by the injected cancellation
            time.sleep(0.01)
        return value_of(job)

    ev = make(execute, timeout=0.3, cancel_grace=3.0)
    closing.append(ev)
    ev.request(step=1, epoch=0, sources=[torch.tensor(1.0)])
    assert ev.wait_idle(10.0)
    ev.request(step=2, epoch=0, sources=[torch.tensor(2.0)])
    assert ev.wait_idle(10.0)
    hung, ok = ev.drain()
    assert hung.state == "timeout"
    assert isinstance(hung.error, EvalTimeout)
    assert 0.3 <= hung.latency_s <= 0.3 + 1.0
    assert ok.state == "ok"
    assert ok.result == 2.0
    stats = ev.stats()
    assert stats["timed_out"] == 1
    assert stats["abandoned_threads"] == 0
    assert stats["worker_threads"] == 1
    assert identity_holds(stats)


def test_thread_stuck_in_a_c_call_is_abandoned_then_evaluation_gives_up(closing: list[Evaluator]) -> None:
    release = threading.Event()

    def execute(job: Job) -> float:
        if job.step in (1, 3):
            release.wait(60)  # one long blocking call: cancellation cannot reach it
        return value_of(job)

    ev = make(execute, timeout=0.2, cancel_grace=0.2, failure_threshold=10)
    closing.append(ev)
    try:
        ev.request(step=1, epoch=0, sources=[torch.tensor(1.0)])
        assert ev.wait_idle(10.0)  # abandoned threads do not count as running
        ev.request(step=2, epoch=0, sources=[torch.tensor(2.0)])  # a fresh worker takes it
        assert ev.wait_idle(10.0)
        assert [j.state for j in ev.drain()] == ["timeout", "ok"]
        assert ev.stats()["abandoned_threads"] == 1
        assert ev.pool.retired == 1

        ev.request(step=3, epoch=0, sources=[torch.tensor(3.0)])
        assert ev.wait_idle(10.0)
        stats = ev.stats()
        assert stats["abandoned_threads"] == 2
        assert ev.gave_up is not None
        assert "abandoned" in ev.gave_up
        assert stats["breaker_state"] == 1
        assert ev.request(step=4, epoch=0, sources=[torch.tensor(4.0)]) == "skipped_breaker_open"
        assert identity_holds(ev.stats())
    finally:
        release.set()  # let the stuck threads return; they exit without touching the pool


def test_breaker_opens_then_half_open_trial_closes_it_with_a_fake_clock(closing: list[Evaluator]) -> None:
    clock = FakeClock()
    failing = {"on": True}

    def execute(job: Job) -> float:
        if failing["on"]:
            raise RuntimeError("eval broke")
        return value_of(job)

    ev = make(execute, runner="inline", failure_threshold=2, recovery_time=30.0, clock=clock, timeout=60.0)
    closing.append(ev)
    outcomes = [ev.request(step=i, epoch=0, sources=[torch.tensor(0.0)]) for i in range(4)]
    assert outcomes == ["submitted", "submitted", "skipped_breaker_open", "skipped_breaker_open"]
    assert ev.stats()["breaker_state"] == 1
    clock.advance(30.0)
    failing["on"] = False
    assert ev.request(step=5, epoch=0, sources=[torch.tensor(5.0)]) == "submitted"  # the trial
    assert ev.stats()["breaker_state"] == 0
    jobs = ev.drain()
    assert [j.state for j in jobs] == ["failed", "failed", "ok"]
    assert isinstance(jobs[0].error, RuntimeError)
    stats = ev.stats()
    assert stats["failed"] == 2
    assert stats["skipped_breaker_open"] == 2
    assert identity_holds(stats)


def test_failed_trial_reopens(closing: list[Evaluator]) -> None:
    clock = FakeClock()

    def execute(job: Job) -> float:
        raise ValueError("still broken")

    ev = make(execute, runner="inline", failure_threshold=1, recovery_time=5.0, clock=clock, timeout=60.0)
    closing.append(ev)
    ev.request(step=0, epoch=0, sources=[torch.tensor(0.0)])
    clock.advance(5.0)
    assert ev.request(step=1, epoch=0, sources=[torch.tensor(0.0)]) == "submitted"
    assert ev.breaker.state == "open"
    assert ev.request(step=2, epoch=0, sources=[torch.tensor(0.0)]) == "skipped_breaker_open"


def test_inline_timeout_interrupts_the_calling_thread(closing: list[Evaluator]) -> None:
    def execute(job: Job) -> float:
        while True:
            time.sleep(0.01)

    ev = make(execute, runner="inline", timeout=0.2)
    closing.append(ev)
    start = time.monotonic()
    assert ev.request(step=0, epoch=0, sources=[torch.tensor(0.0)]) == "submitted"
    assert time.monotonic() - start < 0.2 + 2.0
    (job,) = ev.drain()
    assert job.state == "timeout"
    time.sleep(0.05)  # no stray cancellation lands in the caller afterwards
    assert ev.stats()["timed_out"] == 1


@pytest.mark.parametrize("when_full", ["skip", "replace", "wait"])
def test_queue_policies_under_a_slow_evaluation(when_full: str, closing: list[Evaluator]) -> None:
    def execute(job: Job) -> float:
        time.sleep(0.02)
        return value_of(job)

    ev = make(execute, when_full=when_full, max_pending=2, timeout=10.0)
    closing.append(ev)
    for i in range(40):  # a trigger per "step", much faster than evaluation
        ev.request(step=i, epoch=0, sources=[torch.tensor(float(i))])
        assert ev.pool.allocated <= 3
    assert ev.wait_idle(10.0)
    stats = ev.stats()
    assert identity_holds(stats)
    assert stats["snapshot_slots_peak"] <= 3
    results = [j.result for j in ev.drain() if j.state == "ok"]
    assert results == sorted(results)  # in order
    if when_full == "skip":
        assert stats["skipped_queue_full"] > 0
        assert stats["submitted"] + stats["skipped_queue_full"] == 40
    elif when_full == "replace":
        assert stats["replaced"] > 0
        assert stats["submitted"] == 40
        assert results[-1] == 39.0  # the newest snapshot always survives
    else:
        assert stats["skipped_queue_full"] == 0
        assert stats["completed"] == 40


def test_close_cancels_pending_and_running_and_stops_threads(closing: list[Evaluator]) -> None:
    started = threading.Event()

    def execute(job: Job) -> float:
        started.set()
        while True:
            job.check()
            time.sleep(0.01)

    ev = make(execute, max_pending=2, timeout=60.0)
    ev.request(step=0, epoch=0, sources=[torch.tensor(0.0)])
    assert started.wait(5)  # one running...
    for i in (1, 2):  # ...and two queued behind it
        assert ev.request(step=i, epoch=0, sources=[torch.tensor(0.0)]) == "submitted"
    ev.close(timeout=5.0)
    ev.close()  # idempotent
    stats = ev.stats()
    assert stats["cancelled"] == 3
    assert stats["running"] == 0
    assert stats["pending"] == 0
    assert identity_holds(stats)
    assert not any(t.name.startswith("evalguard") for t in threading.enumerate())
    assert ev.request(step=9, epoch=0, sources=[torch.tensor(0.0)]) == "closed"


def test_state_dict_keeps_counters_and_counts_in_flight_as_cancelled(closing: list[Evaluator]) -> None:
    gate = threading.Event()
    ev = make(lambda job: gate.wait(10) and 1.0, timeout=30.0)
    closing.append(ev)
    ev.request(step=0, epoch=0, sources=[torch.tensor(0.0)])
    state = ev.state_dict()
    gate.set()
    restored = make(value_of, timeout=30.0)
    closing.append(restored)
    restored.load_state_dict(state)
    stats = restored.stats()
    assert stats["submitted"] == 1
    assert stats["cancelled"] == 1
    assert identity_holds(stats)
