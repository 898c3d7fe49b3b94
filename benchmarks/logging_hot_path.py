"""BufferedLogging vs WandbLogger (offline), side by side, in one process.

1. Hot path: the cost on the training thread of one ``log_metrics`` call with 5 and with 50 keys,
   through the BufferedLogging proxy vs straight into ``WandbLogger``. Same logger, same metrics.
2. End to end: ``Trainer.fit`` wall time with ``log_every_n_steps=1`` and logging disabled (the
   baseline), a logger that does nothing (Lightning's own per-step logging work), direct W&B, and
   W&B through BufferedLogging; runs interleaved, median of repeats.

Prints figures and ratios against the baseline measured in the same run. Not a test.

    python benchmarks/logging_hot_path.py [--calls 5000] [--steps 300] [--repeats 5]

Two end-to-end scenarios: a CPU-bound loop, where the training thread holds the GIL most of the
step (the flusher's W&B calls then compete with it for the GIL), and a device-bound loop, where the
training thread waits on the device with the GIL released (as on a GPU; stood in for by a sleep).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.setdefault("WANDB_DISABLE_CODE", "true")
os.environ.setdefault("WANDB__DISABLE_STATS", "true")

import torch
import wandb
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger, WandbLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_evalguard import BufferedLogging


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def time_calls(log: Any, metrics: dict[str, float], calls: int) -> list[float]:
    """Nanoseconds per call; the first 5 % are warm-up and dropped."""
    out = []
    for step in range(calls):
        started = time.perf_counter_ns()
        log(metrics, step)
        out.append(time.perf_counter_ns() - started)
    return out[calls // 20 :]


def hot_path(calls: int, root: str) -> None:
    print(f"\n== hot path: one log_metrics call on the training thread ({calls} calls each) ==")
    print(f"{'keys':>5} {'path':<18} {'median us':>10} {'p99 us':>10} {'mean us':>10}")
    for keys in (5, 50):
        metrics = {f"train/metric_{k}": 0.1 * k for k in range(keys)}
        logger = WandbLogger(offline=True, save_dir=root, project="evalguard-bench")
        _ = logger.experiment
        direct = time_calls(logger.log_metrics, metrics, calls)
        callback = BufferedLogging(stats_every_n_steps=0)
        trainer = SimpleNamespace(global_rank=0, loggers=[logger], default_root_dir=root, global_step=0)
        callback.setup(trainer, None, "fit")  # type: ignore[arg-type]  # what Trainer.fit does
        proxy = trainer.loggers[0]
        buffered = time_calls(proxy.log_metrics, metrics, calls)
        callback.teardown(trainer, None, "fit")  # type: ignore[arg-type]
        stats = callback.stats()
        wandb.finish()
        for name, samples in (("WandbLogger", direct), ("BufferedLogging", buffered)):
            print(
                f"{keys:>5} {name:<18} {statistics.median(samples) / 1e3:>10.2f} "
                f"{percentile(samples, 0.99) / 1e3:>10.2f} {statistics.fmean(samples) / 1e3:>10.2f}"
            )
        print(
            f"{keys:>5} ratio direct/proxy: median {statistics.median(direct) / statistics.median(buffered):.0f}x, "
            f"mean {statistics.fmean(direct) / statistics.fmean(buffered):.0f}x "
            f"(delivered {stats['delivered']}/{stats['accepted']} values, "
            f"callback hot_path_ns_p50 {stats['hot_path_ns_p50'] / 1e3:.2f} us)"
        )


class NullLogger(Logger):
    """Takes every call and does nothing: isolates Lightning's own per-step logging work."""

    @property
    def name(self) -> str:
        return "null"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


class LoopTimer(Callback):
    """Wall and training-thread CPU seconds from the first to the last training step: the steady
    state, without logger start-up (``wandb.init``) or the final flush at teardown."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.started = (time.perf_counter(), time.thread_time())

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.wall = time.perf_counter() - self.started[0]
        self.cpu = time.thread_time() - self.started[1]


@dataclass(frozen=True)
class Scenario:
    title: str
    width: int
    batch: int
    keys: int
    device_wait_ms: float = 0.0  # the training thread waits with the GIL released, as on a GPU


class MLP(LightningModule):
    def __init__(self, width: int, keys: int, device_wait_ms: float = 0.0) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU(),
            torch.nn.Linear(width, 1),
        )  # fmt: skip
        self.keys = keys
        self.device_wait_s = device_wait_ms / 1e3

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.device_wait_s:
            time.sleep(self.device_wait_s)  # stands for kernels running on a GPU: the GIL is free
        self.log("train/loss", loss)
        detached = loss.detach()
        self.log_dict({f"train/extra_{k}": detached * k for k in range(self.keys - 1)})
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def fit_once(mode: str, steps: int, scenario: Scenario, root: str) -> tuple[float, float, dict[str, Any]]:
    """Wall and training-thread CPU seconds of the training loop of one fit (the CPU figure does not
    count the flusher thread or other processes, so it is steadier on a shared machine)."""
    torch.manual_seed(0)
    width, batch = scenario.width, scenario.batch
    data = TensorDataset(torch.randn(steps * batch, width), torch.randn(steps * batch, 1))
    timer = LoopTimer()
    callbacks: list[Any] = [timer]
    logger: Any = False
    if mode == "null logger":
        logger = NullLogger()
    elif mode != "no logging":
        logger = WandbLogger(offline=True, save_dir=root, project="evalguard-bench")
    if mode == "BufferedLogging":
        callbacks.append(BufferedLogging(stats_every_n_steps=0))
    trainer = Trainer(
        max_epochs=1,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
    )
    trainer.fit(MLP(width, scenario.keys, scenario.device_wait_ms), DataLoader(data, batch_size=batch))
    stats = callbacks[-1].stats() if mode == "BufferedLogging" else {}
    wandb.finish()
    return timer.wall, timer.cpu, stats


def end_to_end(steps: int, repeats: int, scenario: Scenario, root: str) -> None:
    modes = ("no logging", "null logger", "WandbLogger", "BufferedLogging")
    print(
        f"\n== end to end, {scenario.title}: Trainer.fit training loop (first to last step), {steps} steps, "
        f"log_every_n_steps=1, {scenario.keys} keys per step, MLP width {scenario.width}, batch {scenario.batch}, "
        f"device wait {scenario.device_wait_ms} ms/step, torch threads {torch.get_num_threads()}, "
        f"median of {repeats} =="
    )
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    last: dict[str, Any] = {}
    fit_once("no logging", 20, scenario, root)  # warm-up: imports, allocator, first W&B init
    fit_once("WandbLogger", 20, scenario, root)
    for _ in range(repeats):
        for mode in modes:  # interleaved, so drift on a shared machine hits every mode alike
            elapsed, thread_cpu, stats = fit_once(mode, steps, scenario, root)
            wall[mode].append(elapsed)
            cpu[mode].append(thread_cpu)
            last = stats or last
    base_wall, base_cpu = statistics.median(wall["no logging"]), statistics.median(cpu["no logging"])
    header = f"{'mode':<16} {'wall ms/step':>12} {'vs none':>8} {'train-thread CPU ms/step':>25} {'vs none':>8}"
    print(f"{header}   wall runs (s)")
    for mode in modes:
        w, c = statistics.median(wall[mode]), statistics.median(cpu[mode])
        runs = " ".join(f"{t:.2f}" for t in wall[mode])
        print(
            f"{mode:<16} {1e3 * w / steps:>12.2f} {100 * (w / base_wall - 1):>+7.1f}% "
            f"{1e3 * c / steps:>25.2f} {100 * (c / base_cpu - 1):>+7.1f}%   {runs}"
        )
    null_w, null_c = statistics.median(wall["null logger"]), statistics.median(cpu["null logger"])
    for mode in ("WandbLogger", "BufferedLogging"):
        w, c = statistics.median(wall[mode]), statistics.median(cpu[mode])
        print(
            f"{mode} vs null logger (the backend's own cost): wall {100 * (w / null_w - 1):+.1f}%, "
            f"training-thread CPU {100 * (c / null_c - 1):+.1f}% ({1e3 * (c - null_c) / steps:+.3f} ms/step)"
        )
    print(
        f"BufferedLogging: hook time {last.get('hook_time_s', 0.0):.3f} s, "
        f"hot_path_ns_p50 {last.get('hot_path_ns_p50', 0) / 1e3:.2f} us, "
        f"delivered {last.get('delivered')}/{last.get('accepted')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--keys", type=int, default=5)
    parser.add_argument("--device-wait-ms", type=float, default=5.0, help="for the device-bound scenario")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1: on a 2-core machine, OpenMP workers that spin after each op "
        "would take the core the flusher runs on; a GPU training process leaves the CPU mostly idle)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="evalguard-bench-") as root:
        hot_path(args.calls, root)
        for scenario in (
            Scenario(
                "CPU-bound (the training thread holds the GIL most of the step)", args.width, args.batch, args.keys
            ),
            Scenario(
                "device-bound (the training thread waits on the device, GIL released)",
                args.width, args.batch, args.keys, args.device_wait_ms,
            ),
        ):  # fmt: skip
            end_to_end(args.steps, args.repeats, scenario, root)
    wandb.teardown()


if __name__ == "__main__":
    main()
