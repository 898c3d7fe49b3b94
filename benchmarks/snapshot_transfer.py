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


class BareCopy:
    """The floor: ``_foreach_copy_`` into preallocated in-process buffers."""

    def __init__(self, model: torch.nn.Module) -> None:
        from lightning_evalguard.engine.snapshot import state_tensors

        self.src = state_tensors(model)
        self.dst = [torch.empty_like(t) for t in self.src]
        torch._foreach_copy_(self.dst, self.src)  # fault the pages in

    def once(self) -> dict[str, float]:
        start = time.perf_counter()
        torch._foreach_copy_(self.dst, self.src)
        return {"copy": time.perf_counter() - start}

    def close(self) -> None:
        pass


class SlotPool:
    """GuardedEvaluation's path: Evaluator + SubprocessRunner, one evaluation per call."""

    def __init__(self, model: torch.nn.Module, copy_slots: bool) -> None:
        from lightning_evalguard.engine.evaluator import Evaluator
        from lightning_evalguard.engine.program import EvalProgram
        from lightning_evalguard.engine.runners.subprocess import SubprocessRunner
        from lightning_evalguard.engine.snapshot import SnapshotPool

        self.model = model
        self.runner = SubprocessRunner.for_module(
            model, EvalProgram([], eval_fn=started_at), slots=2, spare_worker=False, copy_slots=copy_slots
        )
        self.ev = Evaluator(self.runner, SnapshotPool(self.runner.slot_factory, size=2), timeout=600.0)
        self.step = 0
        self.once()  # the worker's cold start

    def once(self) -> dict[str, float]:
        from lightning_evalguard.engine.snapshot import state_tensors

        self.step += 1
        start = time.monotonic()
        assert self.ev.request(step=self.step, epoch=0, sources=state_tensors(self.model)) == "submitted"
        capture = self.ev.pool.last_copy_s
        assert self.ev.wait_idle(600.0)
        (job,) = self.ev.drain()
        assert job.state == "ok", job.error
        return {"capture": capture, "load": self.runner.last_load_s, "end_to_end": job.result.values["t"] - start}

    def close(self) -> None:
        self.ev.close()


def _pickle_worker(conn: Any, queue: Any, model: torch.nn.Module) -> None:
    while True:
        data = queue.get()
        if data is None:
            return
        model.load_state_dict(pickle.loads(data))
        conn.send(time.monotonic())


class PickleQueue:
    """The plain multiprocessing design: pickle the state_dict, put it on a queue, load it there."""

    def __init__(self, model: torch.nn.Module) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.model = model
        self.queue = ctx.Queue()
        self.parent, child = ctx.Pipe()
        self.process = ctx.Process(target=_pickle_worker, args=(child, self.queue, model), daemon=True)
        self.process.start()
        self.once()  # the process start

    def once(self) -> dict[str, float]:
        start = time.monotonic()
        self.queue.put(pickle.dumps(self.model.state_dict(), protocol=pickle.HIGHEST_PROTOCOL))
        sent = time.monotonic()
        done = self.parent.recv()
        return {"sender": sent - start, "end_to_end": done - start}

    def close(self) -> None:
        self.queue.put(None)
        self.process.join(30)
        self.queue.close()
        self.queue.join_thread()


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

    paths: dict[str, Any] = {}
    try:
        paths["bare"] = BareCopy(model)
        paths["pool"] = SlotPool(model, copy_slots=False)
        paths["copied"] = SlotPool(model, copy_slots=True)
        paths["pickle"] = PickleQueue(model)
        samples: dict[str, dict[str, list[float]]] = {name: {} for name in paths}
        for _ in range(args.repeats):  # interleaved: drift on a shared machine hits every path alike
            for name, path in paths.items():
                for key, value in path.once().items():
                    samples[name].setdefault(key, []).append(value)
        cold_start = paths["pool"].runner.last_cold_start_s
    finally:
        for path in paths.values():
            path.close()
    bare = med(samples["bare"]["copy"])
    pool, copied, pick = samples["pool"], samples["copied"], samples["pickle"]

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
    print(f"worker cold start (once per worker generation): {cold_start:.2f}s")
    print(f"training-thread cost: pool capture = {cap / bare:.2f}x bare copy (target <= 2x); "
          f"pickling costs the sender {med(pick['sender']) / cap:.0f}x the pool's capture")
    print(f"end to end: pool = {e2e / bare:.2f}x bare copy; pickling is {med(pick['end_to_end']) / e2e:.0f}x "
          f"slower than the pool (target >= 20x)")


if __name__ == "__main__":
    main()
