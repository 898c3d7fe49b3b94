from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_evalguard.engine.jobs import Job, JobCancelled, JobQueue


def job(i: int) -> Job:
    return Job(i, step=i, epoch=0)


def test_skip_drops_the_new_request() -> None:
    q = JobQueue(max_pending=2, when_full="skip")
    for i in range(2):
        assert q.make_room() == (True, [])
        q.put(job(i))
    assert q.make_room() == (False, [])
    assert q.dropped["queue_full"] == 1
    assert [q.get(0).id for _ in range(2)] == [0, 1]


def test_replace_keeps_only_the_newest_pending() -> None:
    q = JobQueue(max_pending=1, when_full="replace")
    jobs = [job(i) for i in range(5)]
    for j in jobs:
        ok, _ = q.make_room()
        assert ok
        q.put(j)
    assert q.dropped["replaced"] == 4
    assert [j.state for j in jobs] == ["replaced"] * 4 + ["pending"]
    assert q.get(0) is jobs[-1]
    assert len(q) == 0


def test_wait_blocks_until_a_consumer_takes_a_job() -> None:
    q = JobQueue(max_pending=1, when_full="wait", wait_timeout=30.0)
    q.make_room()
    q.put(job(0))
    taken = threading.Event()

    def consumer() -> None:
        time.sleep(0.05)  # let the producer block first
        q.get()
        taken.set()

    t = threading.Thread(target=consumer)
    t.start()
    ok, evicted = q.make_room()
    t.join()
    assert ok
    assert taken.is_set()
    assert not evicted
    assert not q.dropped


def test_wait_gives_up_after_wait_timeout() -> None:
    q = JobQueue(max_pending=1, when_full="wait", wait_timeout=0.05)
    q.make_room()
    q.put(job(0))
    start = time.monotonic()
    assert q.make_room() == (False, [])
    assert time.monotonic() - start >= 0.04
    assert q.dropped["wait_timeout"] == 1


def test_close_wakes_a_waiting_producer_and_consumers() -> None:
    q = JobQueue(max_pending=1, when_full="wait", wait_timeout=60.0)
    q.make_room()
    q.put(job(0))
    results: list = []
    t = threading.Thread(target=lambda: results.append(q.make_room()))
    t.start()
    time.sleep(0.05)
    q.close()
    t.join(5)
    assert results == [(False, [])]
    assert q.get(0).id == 0  # what is left can still be drained...
    assert q.get() is None  # ...then get() returns None instead of blocking


def test_put_without_room_is_a_bug() -> None:
    q = JobQueue(max_pending=1)
    q.put(job(0))
    with pytest.raises(RuntimeError, match="full"):
        q.put(job(1))


def test_job_first_outcome_wins() -> None:
    j = job(1)
    assert j.start(now=1.0)
    assert j.finish("timeout", now=3.0)
    assert not j.finish("ok", now=3.5, result={"x": 1.0})
    assert j.state == "timeout"
    assert j.result is None
    assert j.latency_s == 2.0
    assert not j.start(now=4.0)


def test_cancel_is_checked_cooperatively() -> None:
    j = job(1)
    j.check()
    j.request_cancel("timeout")
    j.request_cancel("shutdown")  # the first reason stays
    with pytest.raises(JobCancelled, match="timeout"):
        j.check()
    assert not isinstance(JobCancelled(), Exception)  # `except Exception` in user code won't swallow it


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_pending": 0}, r"`max_pending` must be an int >= 1, got 0"),
        ({"when_full": "drop"}, r"`when_full` must be one of .* got 'drop'"),
        ({"wait_timeout": -1}, r"`wait_timeout` must be a number >= 0, got -1"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        JobQueue(**kwargs)


@settings(max_examples=200, deadline=None)
@given(
    max_pending=st.integers(1, 4),
    when_full=st.sampled_from(["skip", "replace"]),
    ops=st.lists(st.sampled_from(["offer", "take"]), max_size=60),
)
def test_accounting_is_exact_under_any_sequence(max_pending: int, when_full: str, ops: list[str]) -> None:
    q = JobQueue(max_pending=max_pending, when_full=when_full)
    offered = taken = 0
    next_id = 0
    for op in ops:
        if op == "offer":
            offered += 1
            ok, _ = q.make_room()
            if ok:
                q.put(job(next_id))
                next_id += 1
        elif q.get(timeout=0) is not None:
            taken += 1
        assert len(q) <= max_pending
    dropped = q.dropped["queue_full"] + q.dropped["replaced"]
    assert offered == taken + len(q) + dropped
