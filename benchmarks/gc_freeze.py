"""What a full garbage collection costs with torch and Lightning loaded, before and after
``gc.freeze()`` (what ``ResourceCleanup(freeze_startup_objects=True)`` does at train start).

Run:  python benchmarks/gc_freeze.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time


def timed_collections(repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import lightning.pytorch  # noqa: F401
    import torch  # noqa: F401
    import wandb  # noqa: F401

    from lightning_evalguard import BufferedLogging, GuardedEvaluation, PerformanceMonitor, ResourceCleanup

    _ = (BufferedLogging, GuardedEvaluation, PerformanceMonitor, ResourceCleanup)
    gc.collect()
    tracked = len(gc.get_objects())
    before = timed_collections(args.repeats)
    gc.freeze()
    frozen = gc.get_freeze_count()
    after = timed_collections(args.repeats)
    gc.unfreeze()
    print(f"gc_freeze: {tracked} tracked objects with torch, lightning, wandb and evalguard imported; "
          f"median of {args.repeats}")
    print(f"full gc.collect() before gc.freeze()   {statistics.median(before) * 1e3:10.3f} ms")
    print(f"full gc.collect() after  gc.freeze()   {statistics.median(after) * 1e6:10.1f} us"
          f"   ({frozen} objects frozen)")
    print(f"ratio {statistics.median(before) / max(statistics.median(after), 1e-9):,.0f}x")


if __name__ == "__main__":
    main()
