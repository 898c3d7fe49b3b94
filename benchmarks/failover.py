"""Failover time of subprocess evaluation: from a hang's deadline to the next evaluation running.

An evaluation hangs; at its ``timeout`` the watchdog marks it timed out and ``SIGTERM``s the worker.
The next snapshot is already queued behind it. The figure is the time from that deadline to the
next evaluation *starting inside a worker* (its ``eval_fn`` stamps ``time.monotonic()``, which is
system-wide on Linux), with and without the warm spare worker:

- with ``spare_worker=True`` the spare (already imported, module and dataloaders built) is promoted
  at once, loads the slot and runs;
- without, a new worker is spawned and pays the cold start (imports, unpickling) first.

Target (issue 3): with the spare, < 0.2 s.

Run:  python benchmarks/failover.py [--repeats 5] [--params-m 4] [--lightning]
(``--lightning`` makes the payload a LightningModule, so every cold start imports Lightning, as in
GuardedEvaluation; the default plain ``torch.nn.Module`` shows the floor.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

HANG = 7.0  # a snapshot whose marker is HANG makes the evaluation hang


class Marked(torch.nn.Module):
    def __init__(self, params_m: float) -> None:
        super().__init__()
        width = 1024
        layers = max(1, round(params_m * 1e6 / (width * width + width)))
        self.net = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
        self.register_buffer("marker", torch.zeros(()))


def build(params_m: float, lightning: bool) -> torch.nn.Module:
    if not lightning:
        return Marked(params_m)
    from lightning.pytorch import LightningModule

    class LitMarked(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Marked(params_m)

    return LitMarked()


def hang_or_stamp(module: Any, dataloader: Any) -> dict[str, float]:
    started = time.monotonic()
    marker = next(b for name, b in module.named_buffers() if name.endswith("marker"))
    while float(marker) == HANG:
        time.sleep(0.01)
    return {"t": started}


def trial_set(spare: bool, repeats: int, params_m: float, lightning: bool, timeout: float) -> list[float]:
    from lightning_evalguard.engine.evaluator import Evaluator
    from lightning_evalguard.engine.program import EvalProgram
    from lightning_evalguard.engine.runners.subprocess import SubprocessRunner
    from lightning_evalguard.engine.snapshot import SnapshotPool, state_tensors

    model = build(params_m, lightning)
    marker = next(b for name, b in model.named_buffers() if name.endswith("marker"))
    runner = SubprocessRunner.for_module(
        model, EvalProgram([], eval_fn=hang_or_stamp), slots=2, spare_worker=spare, kill_grace=1.0,
        max_respawns=repeats + 1,
    )
    ev = Evaluator(runner, SnapshotPool(runner.slot_factory, size=2), timeout=timeout, failure_threshold=100,
                   watchdog_tick=0.01)
    failovers = []
    step = 0

    def submit() -> None:
        nonlocal step
        step += 1
        assert ev.request(step=step, epoch=0, sources=state_tensors(model)) == "submitted"

    try:
        marker.fill_(0.0)
        submit()  # warm-up: the first worker's cold start
        assert ev.wait_idle(600.0)
        ev.drain()
        for _ in range(repeats):
            if spare:
                assert runner.wait_until(lambda s: s["spare_ready"] == 1, 600.0)
            marker.fill_(HANG)
            submit()
            assert runner.wait_until(lambda s: s["worker_busy"] == 1, 600.0)
            marker.fill_(0.0)
            submit()  # queued behind the hang
            assert ev.wait_idle(600.0)
            hung, after = ev.drain()
            assert hung.state == "timeout", hung.state
            assert after.state == "ok", after.error
            assert hung.started_at is not None
            failovers.append(after.result.values["t"] - (hung.started_at + timeout))
    finally:
        ev.close()
    return failovers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--params-m", type=float, default=4.0, help="millions of parameters")
    parser.add_argument("--timeout", type=float, default=1.0, help="the hanging evaluation's timeout, s")
    parser.add_argument("--lightning", action="store_true", help="a LightningModule payload (imports Lightning)")
    args = parser.parse_args()
    results = {spare: trial_set(spare, args.repeats, args.params_m, args.lightning, args.timeout)
               for spare in (True, False)}
    med = {spare: statistics.median(v) for spare, v in results.items()}
    print(f"failover: hang deadline -> next evaluation running; {args.params_m:g}M parameters, "
          f"{'LightningModule' if args.lightning else 'torch.nn.Module'} payload, median (max) of {args.repeats}, "
          f"cpus={os.cpu_count()}")
    for spare in (True, False):
        label = "with spare worker" if spare else "without spare (cold start)"
        print(f"{label:<30}{med[spare]:>9.3f}s  (max {max(results[spare]):.3f}s)")
    print(f"the spare is {med[False] / med[True]:.0f}x faster; target with the spare: < 0.2 s")


if __name__ == "__main__":
    main()
