"""How much of evaluation's cost does GuardedEvaluation hide behind training?

One workload, measured in one process, several ways:

- ``noeval``: training only (Lightning's validation off, no callback);
- ``lightning``: Lightning's own validation loop every epoch (training waits for it);
- ``guarded-<mode>``: GuardedEvaluation(mode) every epoch, for each mode asked for.

The workload is an MLP whose evaluation costs about 40 % of its training time. The figure of merit
is the overlap efficiency E = (T_lightning - T_guarded) / (T_lightning - T_noeval): 1.0 means the
evaluation is entirely hidden, 0.0 means it costs as much as Lightning's blocking loop.

Run:  python benchmarks/eval_overlap.py [--modes stream,inline,subprocess] [--threads 1] [--repeats 3]

With ``--threads 1`` (the default) training and evaluation each get one of this machine's two
cores; ``--threads 2`` gives both to whichever runs, which is what Lightning's sequential loop likes
best and concurrent evaluation likes least.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

WIDTH, DEPTH = 768, 3
EVAL_THREADS: int | None = None  # --eval-threads


def build_module_class() -> type:
    from lightning.pytorch import LightningModule

    class MLP(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            layers: list[torch.nn.Module] = []
            for _ in range(DEPTH):
                layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()]
            self.net = torch.nn.Sequential(*layers, torch.nn.Linear(WIDTH, 10))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            logits = self.net(x)
            self.log("val/loss", torch.nn.functional.cross_entropy(logits, y))
            self.log("val/acc", (logits.argmax(-1) == y).float().mean())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return MLP


def loaders(n_train: int, n_val: int) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    xt, yt = torch.randn(n_train, WIDTH, generator=g), torch.randint(0, 10, (n_train,), generator=g)
    xv, yv = torch.randn(n_val, WIDTH, generator=g), torch.randint(0, 10, (n_val,), generator=g)
    return (DataLoader(TensorDataset(xt, yt), batch_size=128),
            DataLoader(TensorDataset(xv, yv), batch_size=512))


def run(config: str, epochs: int, n_train: int, n_val: int) -> tuple[float, dict[str, Any]]:
    from lightning.pytorch import Trainer

    from lightning_evalguard import GuardedEvaluation

    torch.manual_seed(0)
    train, val = loaders(n_train, n_val)
    callbacks: list[Any] = []
    guard = None
    kwargs: dict[str, Any] = {}
    if config == "noeval":
        kwargs["limit_val_batches"] = 0
    elif config.startswith("guarded-"):
        mode = config.split("-")[1]
        # subprocess-warm: the worker starts in the background at fit start (warm_start=True)
        # instead of at the first evaluation, so that evaluation does not wait for its cold start.
        # max_pending=epochs: no evaluation is ever skipped, so E prices every one of them.
        guard = GuardedEvaluation(mode=mode, timeout=600.0, final_timeout=600.0,  # type: ignore[arg-type]
                                  max_pending=epochs, warm_start=config.endswith("-warm"),
                                  eval_threads=EVAL_THREADS)
        callbacks.append(guard)
    trainer = Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, **kwargs)
    module = build_module_class()()
    start = time.perf_counter()
    trainer.fit(module, train, val)
    elapsed = time.perf_counter() - start
    return elapsed, (guard.stats() if guard is not None else {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="stream,inline,subprocess",
                        help="GuardedEvaluation modes, comma-separated (subprocess also runs with warm_start)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: a core each)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-samples", type=int, default=12_800)
    parser.add_argument("--val-samples", type=int, default=15_360)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-threads", type=int, default=None,
                        help="GuardedEvaluation(eval_threads=...): torch threads of the evaluation")
    args = parser.parse_args()
    global EVAL_THREADS
    EVAL_THREADS = args.eval_threads
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    modes = [m for m in args.modes.split(",") if m]
    configs = ["noeval", "lightning", *(f"guarded-{m}" for m in modes)]
    if "subprocess" in modes:
        configs.append("guarded-subprocess-warm")
    run("noeval", 1, args.train_samples // 4, args.val_samples // 4)  # warm-up: imports, allocator
    times: dict[str, list[float]] = {c: [] for c in configs}
    stats: dict[str, dict[str, Any]] = {}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every config alike
        for config in configs:
            elapsed, s = run(config, args.epochs, args.train_samples, args.val_samples)
            times[config].append(elapsed)
            stats[config] = s
    med = {c: statistics.median(t) for c, t in times.items()}
    eval_cost = med["lightning"] - med["noeval"]
    print(f"eval_overlap: {args.epochs} epochs, {args.train_samples} train / {args.val_samples} val samples, "
          f"torch threads={args.threads}, eval_threads={args.eval_threads}, cpus={os.cpu_count()}, "
          f"median of {args.repeats}")
    print(f"evaluation costs {eval_cost / med['noeval']:.0%} of training time under Lightning's loop")
    print(f"{'config':<20}{'fit s':>9}{'vs noeval':>11}{'E':>8}{'completed':>11}{'latency p50 s':>15}")
    for config in configs:
        e = (med["lightning"] - med[config]) / eval_cost if config.startswith("guarded") and eval_cost > 0 else None
        s = stats.get(config, {})
        print(f"{config:<20}{med[config]:>9.3f}{med[config] / med['noeval']:>10.2f}x"
              f"{'' if e is None else f'{e:.2f}':>8}{s.get('completed', ''):>11}"
              f"{'' if not s else format(s.get('latency_p50_s', 0.0), '.3f'):>15}")


if __name__ == "__main__":
    main()
