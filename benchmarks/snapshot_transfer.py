"""Per-evaluation cost of getting the weights into a worker process: slot pool vs pickling vs the floor.

Three ways to hand the same ~50M float32 parameters (200 MB) to a separate process, each measured
per evaluation, after a warm-up, in one run:

- ``bare copy``: ``torch._foreach_copy_`` of the same tensors into preallocated in-process buffers:
  the floor, one memory copy and nothing else;
- ``slot pool``: GuardedEvaluation's subprocess path (Evaluator + SubprocessRunner): the training
  thread copies into a free shared-memory slot and sends ``(job, slot, step, epoch)``; the worker's
  module evaluates the slot in place (default), or copies it into its own weights
  (``copy_slots=True``, what evaluation on another device does). Reported as the training thread's
  cost (``capture``), the worker's load, and end to end (request to the worker's evaluation
  starting);
- ``pickle + queue``: ``queue.put(pickle.dumps(model.state_dict()))`` to a spawned process that
  unpickles and ``load_state_dict``s it, acknowledged back: what a plain multiprocessing design does.

Targets (issue 3): slot pool <= 2x the bare copy, and >= 20x faster than pickling.

Run:  python benchmarks/snapshot_transfer.py [--params-m 50] [--repeats 5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pickle
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def build_model(params_m: float) -> torch.nn.Module:
    width = 2048
    layers = max(1, round(params_m * 1e6 / (width * width + width)))
    return torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))


def started_at(module: Any, dataloader: Any) -> dict[str, float]:
    """The evaluation: report when it started (CLOCK_MONOTONIC is system-wide on Linux)."""
    return {"t": time.monotonic()}


def bare_copy(model: torch.nn.Module, repeats: int) -> list[float]:
    from lightning_evalguard.engine.snapshot import state_tensors

    src = state_tensors(model)
    dst = [torch.empty_like(t) for t in src]
    torch._foreach_copy_(dst, src)  # warm-up: fault the pages in
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch._foreach_copy_(dst, src)
        times.append(time.perf_counter() - start)
    return times


def slot_pool(model: torch.nn.Module, repeats: int, copy_slots: bool = False) -> dict[str, list[float]]:
    from lightning_evalguard.engine.evaluator import Evaluator
    from lightning_evalguard.engine.program import EvalProgram
    from lightning_evalguard.engine.runners.subprocess import SubprocessRunner
    from lightning_evalguard.engine.snapshot import SnapshotPool, state_tensors

    runner = SubprocessRunner.for_module(
        model, EvalProgram([], eval_fn=started_at), slots=2, spare_worker=False, copy_slots=copy_slots
    )
    ev = Evaluator(runner, SnapshotPool(runner.slot_factory, size=2), timeout=600.0)
    out: dict[str, list[float]] = {"capture": [], "load": [], "end_to_end": []}
    try:
        for i in range(repeats + 1):  # the first one pays the worker's cold start: not counted
            start = time.monotonic()
            assert ev.request(step=i, epoch=0, sources=state_tensors(model)) == "submitted"
            capture = ev.pool.last_copy_s
            assert ev.wait_idle(600.0)
            (job,) = ev.drain()
            assert job.state == "ok", job.error
            if i:
                out["capture"].append(capture)
                out["load"].append(runner.last_load_s)
                out["end_to_end"].append(job.result.values["t"] - start)
        out["cold_start"] = [runner.last_cold_start_s]
    finally:
        ev.close()
    return out


def _pickle_worker(conn: Any, queue: Any, model: torch.nn.Module) -> None:
    while True:
        data = queue.get()
        if data is None:
            return
        model.load_state_dict(pickle.loads(data))
        conn.send(time.monotonic())


def pickle_queue(model: torch.nn.Module, repeats: int) -> dict[str, list[float]]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_pickle_worker, args=(child, queue, model), daemon=True)
    process.start()
    out: dict[str, list[float]] = {"sender": [], "end_to_end": []}
    try:
        for i in range(repeats + 1):  # the first one waits for the process to start: not counted
            start = time.monotonic()
            queue.put(pickle.dumps(model.state_dict(), protocol=pickle.HIGHEST_PROTOCOL))
            sent = time.monotonic()
            done = parent.recv()
            if i:
                out["sender"].append(sent - start)
                out["end_to_end"].append(done - start)
    finally:
        queue.put(None)
        process.join(30)
        queue.close()
        queue.join_thread()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params-m", type=float, default=50.0, help="millions of float32 parameters")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.params_m)
    n = sum(p.numel() for p in model.parameters())
    mb = n * 4 / 2**20
    med = statistics.median

    bare = med(bare_copy(model, args.repeats))
    pool = slot_pool(model, args.repeats)
    copied = slot_pool(model, args.repeats, copy_slots=True)
    pick = pickle_queue(model, args.repeats)

    print(f"snapshot_transfer: {n / 1e6:.1f}M float32 parameters ({mb:.0f} MB), median of {args.repeats}, "
          f"torch threads={torch.get_num_threads()}, cpus={os.cpu_count()}")
    rows = [
        ("bare copy_ (floor)", bare, None),
        ("slot pool: training-thread capture", med(pool["capture"]), None),
        ("slot pool: end to end (in place)", med(pool["end_to_end"]), None),
        ("slot pool, copy_slots: worker load", med(copied["load"]), None),
        ("slot pool, copy_slots: end to end", med(copied["end_to_end"]), None),
        ("pickle + queue: sender", med(pick["sender"]), None),
        ("pickle + queue: end to end", med(pick["end_to_end"]), None),
    ]
    print(f"{'path':<40}{'seconds':>10}{'GB/s':>8}{'x bare':>9}")
    for name, seconds, _ in rows:
        print(f"{name:<40}{seconds:>10.4f}{mb / 1024 / seconds:>8.2f}{seconds / bare:>8.2f}x")
    e2e, cap = med(pool["end_to_end"]), med(pool["capture"])
    print(f"worker cold start (once per worker generation): {pool['cold_start'][0]:.2f}s")
    print(f"training-thread cost: pool capture = {cap / bare:.2f}x bare copy (target <= 2x); "
          f"pickling costs the sender {med(pick['sender']) / cap:.0f}x the pool's capture")
    print(f"end to end: pool = {e2e / bare:.2f}x bare copy; pickling is {med(pick['end_to_end']) / e2e:.0f}x "
          f"slower than the pool (target >= 20x)")


if __name__ == "__main__":
    main()
