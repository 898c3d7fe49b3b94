"""Shared fixtures. The autouse `no_leaks` fixture fails any test that leaves a thread or a child
process running: the package's promise is that nothing it starts outlives `fit`."""

from __future__ import annotations

import os

# Before anything imports wandb or Lightning.
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.setdefault("WANDB_DISABLE_CODE", "true")
os.environ.setdefault("WANDB__DISABLE_STATS", "true")
os.environ.setdefault("PL_DISABLE_FORK", "1")

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

try:  # tqdm's monitor thread lives for the whole process; it is not ours to police.
    import tqdm

    tqdm.tqdm.monitor_interval = 0
except ImportError:  # pragma: no cover
    pass

# Processes that a library starts once per interpreter and keeps for its lifetime, by design.
_SINGLETON_PROCESS_MARKERS = (
    "multiprocessing.resource_tracker",
    "multiprocessing.forkserver",
)
LEAK_GRACE_S = 10.0


def _is_singleton(proc: psutil.Process) -> bool:
    try:
        cmdline = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return True  # gone already
    return any(marker in cmdline for marker in _SINGLETON_PROCESS_MARKERS)


def _children() -> dict[int, psutil.Process]:
    out = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                out[proc.pid] = proc
        except psutil.NoSuchProcess:
            continue
    return out


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves behind a thread or child process it started."""
    threads_before = {t.ident for t in threading.enumerate()}
    children_before = set(_children())
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        threads = [t for t in threading.enumerate() if t.ident not in threads_before and t.is_alive()]
        procs = [p for pid, p in _children().items() if pid not in children_before and not _is_singleton(p)]
        if (not threads and not procs) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for proc in procs:  # do not poison the rest of the session
        try:
            proc.kill()
            proc.wait(5)
        except psutil.Error:
            pass
    problems = [f"thread {t.name!r} (daemon={t.daemon})" for t in threads]
    problems += [f"process {p.pid}" for p in procs]
    if problems:
        pytest.fail(f"test left running after {LEAK_GRACE_S:.0f}s: " + ", ".join(problems), pytrace=False)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def finish_wandb() -> None:
    """End the W&B run and stop the wandb-core service: only then is an offline run file complete
    (``finish()`` alone can return before the service has written its last block)."""
    import wandb

    wandb.finish()
    wandb.teardown()


@pytest.fixture
def wandb_dir(tmp_path: Path) -> Iterator[Path]:
    """A save_dir for an offline WandbLogger; the run and the wandb-core service are ended after."""
    yield tmp_path
    finish_wandb()
