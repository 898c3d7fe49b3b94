"""SubprocessRunner with real spawned workers, real signals and real crashes (no Trainer).

Worker cold starts cost about a second each here: the payload is a plain ``torch.nn.Module`` and the
fault injectors travel by value (see ``_by_value``), so no worker imports Lightning.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle
import psutil
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_evalguard.testing as faults
from lightning_evalguard.engine.evaluator import Evaluator
from lightning_evalguard.engine.jobs import Job
from lightning_evalguard.engine.program import EvalProgram
from lightning_evalguard.engine.runners._worker import RLIMIT_ENV
from lightning_evalguard.engine.runners.subprocess import SubprocessRunner
from lightning_evalguard.engine.snapshot import SnapshotPool, state_tensors
from lightning_evalguard.errors import EvalTimeout, WorkerCrashed

pytestmark = pytest.mark.slow

WAIT = 60.0  # generous bound for anything that includes a worker cold start on a loaded machine


@pytest.fixture(scope="module", autouse=True)
def _by_value() -> Iterator[None]:
    """Ship the fault classes and this module's helpers by value: importing them by reference in the
    worker would import Lightning (``lightning_evalguard.testing`` does), 3 s per cold start."""
    cloudpickle.register_pickle_by_value(faults)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    cloudpickle.unregister_pickle_by_value(faults)


def weight_sum(module: Any, dataloader: Any) -> dict[str, float]:
    return {"w": float(module.weight.sum()), "pid": float(os.getpid())}


def slow_weight_sum(module: Any, dataloader: Any) -> dict[str, float]:
    time.sleep(0.3)  # long enough for the next snapshot to land in another slot
    return weight_sum(module, dataloader)


class Stamped:
    """Writes ``time.monotonic()`` (system-wide on Linux) to ``path``, then fires ``fault``."""

    def __init__(self, fault: Any, path: str) -> None:
        self.fault = fault
        self.path = path

    def __call__(self, module: Any, dataloader: Any) -> dict[str, float]:
        with open(self.path, "w") as fh:
            fh.write(repr(time.monotonic()))
        self.fault.trigger()
        return {}


class WhenWeight:
    """Fires ``fault`` when the snapshot's first weight equals ``value``; else reports the weights.

    The snapshot decides, as training state would: no shared state between test and worker."""

    def __init__(self, value: float, fault: Any) -> None:
        self.value = value
        self.fault = fault

    def __call__(self, module: Any, dataloader: Any) -> dict[str, float]:
        if float(module.weight[0, 0]) == self.value:
            self.fault(module, dataloader)
        return weight_sum(module, dataloader)


class IgnoreSigtermThenTell:
    """Ignores SIGTERM, says so over a Unix socket (the test blocks on it: no polling), then hangs."""

    def __init__(self, address: str) -> None:
        self.address = address

    def __call__(self, module: Any, dataloader: Any) -> dict[str, float]:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(self.address)
            sock.sendall(b"!")
        while True:
            time.sleep(0.01)


class Harness:
    """An Evaluator over a SubprocessRunner on a small live module."""

    def __init__(
        self,
        eval_fn: Any,
        *,
        timeout: float,
        dataloaders: list[Any] | None = None,
        device: str = "cpu",
        max_pending: int = 1,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("spare_worker", False)
        kwargs.setdefault("kill_grace", 1.0)
        self.module = torch.nn.Linear(4, 2).to(device)
        program = EvalProgram(dataloaders or [], None, eval_fn)
        self.runner = SubprocessRunner.for_module(self.module, program, slots=max_pending + 1, **kwargs)
        self.ev = Evaluator(
            self.runner,
            SnapshotPool(self.runner.slot_factory, size=max_pending + 1),
            max_pending=max_pending,
            timeout=timeout,
            failure_threshold=100,
            watchdog_tick=0.02,
        )

    def fill(self, value: float) -> None:
        with torch.no_grad():
            self.module.weight.fill_(value)

    def submit(self, step: int) -> str:
        return self.ev.request(step=step, epoch=0, sources=state_tensors(self.module))

    def outcomes(self, timeout: float = WAIT) -> list[Job]:
        assert self.ev.wait_idle(timeout), "evaluation did not finish"
        return self.ev.drain()

    def run_one(self, step: int, timeout: float = WAIT) -> Job:
        assert self.submit(step) == "submitted"
        (job,) = self.outcomes(timeout)
        return job

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e.as_dict() for e in self.ev.events.since(0)[1] if e.kind == kind]

    def exit_of(self, pid: int) -> dict[str, Any]:
        (event,) = [e for e in self.events("worker_exit") if e["pid"] == pid]
        return event


@pytest.fixture
def harness() -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(eval_fn: Any, *, timeout: float = 30.0, **kwargs: Any) -> Harness:
        made.append(Harness(eval_fn, timeout=timeout, **kwargs))
        return made[-1]

    yield make
    for h in made:
        h.ev.close(timeout=5.0)


def dispatcher_cpu_s(runner: SubprocessRunner, window_s: float) -> float:
    """CPU seconds the runner's dispatcher thread burns over ``window_s`` of wall time."""
    native = runner._thread.native_id  # type: ignore[union-attr]

    def cpu() -> float:
        (t,) = [t for t in psutil.Process().threads() if t.id == native]
        return t.user_time + t.system_time

    before = cpu()
    time.sleep(window_s)  # the measurement window itself, not a wait for an event
    return cpu() - before


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- results ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("copy_slots", [False, True], ids=["in-place", "copied"])
def test_evaluates_the_snapshot_in_a_persistent_niced_worker(harness: Callable[..., Harness], copy_slots: bool) -> None:
    h = harness(slow_weight_sum, copy_slots=copy_slots, max_pending=2)
    h.fill(1.0)
    assert h.submit(step=1) == "submitted"
    h.fill(5.0)  # training moves on before the (cold-starting) worker has read the slot
    (job,) = h.outcomes()
    assert job.state == "ok", job.error
    assert job.result.values["w"] == 8.0  # 8 weights of 1.0: the snapshot, not the live weights
    pid = int(job.result.values["pid"])
    assert pid != os.getpid()
    assert psutil.Process(pid).nice() > psutil.Process().nice()  # lower CPU priority

    second = h.run_one(step=2)
    assert second.state == "ok", second.error
    assert second.result.values == {"w": 40.0, "pid": float(pid)}  # same worker, new weights

    h.fill(2.0)
    assert h.submit(step=3) == "submitted"
    h.fill(3.0)
    assert h.submit(step=4) == "submitted"  # while step 3 holds a slot: another slot
    assert [job.result.values["w"] for job in h.outcomes()] == [16.0, 24.0]
    if not copy_slots:  # (a copied slot may be handed back before the next snapshot)
        assert h.ev.stats()["snapshot_slots"] == 2
    stats = h.ev.stats()
    assert stats["respawns"] == 0
    assert stats["workers_started"] == 1
    assert stats["worker_pid"] == pid
    assert stats["worker_cold_start_s"] > 0
    assert (stats["worker_load_s"] > 0) == copy_slots  # in place: no copy at all
    assert h.ev.pool.in_use == 0  # slots came back once the worker was done with them
    assert dispatcher_cpu_s(h.runner, window_s=0.5) < 0.05  # idle means idle: no busy loop
    h.ev.close()
    assert gone(pid)


def test_dataloaders_travel_once_or_are_built_in_the_worker(harness: Callable[..., Harness]) -> None:
    x = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    loader = DataLoader(TensorDataset(x), batch_size=4)

    def output_sum(module: Any, dataloader: Any) -> dict[str, float]:
        return {"out": float(sum(module(batch).sum() for (batch,) in dataloader))}

    shipped = harness(output_sum, dataloaders=[loader])
    built = harness(output_sum, dataloader_factory=lambda: DataLoader(TensorDataset(x), batch_size=4))
    for h in (shipped, built):
        h.fill(0.5)
        with torch.no_grad():
            h.module.bias.zero_()
    with torch.inference_mode():
        expected = float(sum(shipped.module(batch).sum() for (batch,) in loader))
    for h in (shipped, built):
        job = h.run_one(step=1)
        assert job.state == "ok", job.error
        assert job.result.values["out"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("eval_device", ["cuda:0", "cpu"], ids=["ipc-in-place", "ipc-copied-to-cpu"])
def test_cuda_slots_travel_by_ipc(harness: Callable[..., Harness], eval_device: str) -> None:
    h = harness(weight_sum, device="cuda:0", eval_device=eval_device)
    assert all(b.is_cuda for b in h.runner.slots.buffers)  # CUDA IPC buffers, not host memory
    h.fill(1.0)
    assert h.submit(step=1) == "submitted"
    h.fill(5.0)  # the copy stream ordered the snapshot before this write
    (job,) = h.outcomes()
    assert job.state == "ok", job.error
    assert job.result.values["w"] == 8.0
    assert h.run_one(step=2).result.values["w"] == 40.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kill_grace": -1.0}, r"`kill_grace` must be a finite number >= 0, got -1\.0"),
        ({"start_timeout": 0}, r"`start_timeout` must be a finite number > 0, got 0"),
        ({"poll_interval": float("nan")}, r"`poll_interval` must be a finite number > 0, got nan"),
        ({"max_respawns": -2}, r"`max_respawns` must be an int >= 0, got -2"),
        ({"spare_worker": 1}, r"`spare_worker` must be a bool, got 1"),
    ],
)
def test_bad_runner_arguments_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SubprocessRunner.for_module(torch.nn.Linear(2, 1), EvalProgram([], eval_fn=weight_sum), slots=2, **kwargs)


def test_unpicklable_dataloader_or_module_is_refused_at_setup() -> None:
    class Locked(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.lock = threading.Lock()

        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.zeros(4)

    module = torch.nn.Linear(4, 2)
    with pytest.raises(TypeError, match=r"dataloader\(s\).*cannot be pickled.*dataloader_factory"):
        SubprocessRunner.for_module(module, EvalProgram([DataLoader(Locked())]), slots=2)
    module.handle = threading.Lock()  # type: ignore[assignment]
    with pytest.raises(TypeError, match=r"copy of Linear.*cannot be pickled.*__getstate__"):
        SubprocessRunner.for_module(module, EvalProgram([], eval_fn=weight_sum), slots=2)
    lazy = torch.nn.LazyLinear(2)
    with pytest.raises(ValueError, match="lazy"):
        SubprocessRunner.for_module(lazy, EvalProgram([], eval_fn=weight_sum), slots=2)


# -- faults ----------------------------------------------------------------------------------------
HANG = 7.0  # the weight value that makes WhenWeight fire


def test_hang_is_killed_and_the_spare_takes_the_next_job_at_once(harness: Callable[..., Harness]) -> None:
    timeout, grace = 1.0, 2.0
    h = harness(
        WhenWeight(HANG, faults.HangingEval()), timeout=timeout, kill_grace=grace, spare_worker=True, niceness=0
    )
    h.fill(1.0)
    assert h.run_one(step=1).state == "ok"
    assert h.runner.wait_until(lambda s: s["spare_ready"] == 1, WAIT), "the spare never got ready"
    first_pid = int(h.ev.stats()["worker_pid"])

    h.fill(HANG)
    assert h.submit(step=2) == "submitted"
    assert h.runner.wait_until(lambda s: s["worker_busy"] == 1, WAIT)
    h.fill(1.0)
    assert h.submit(step=3) == "submitted"  # queued behind the hang
    hung, after = h.outcomes()

    assert hung.state == "timeout"
    assert isinstance(hung.error, EvalTimeout)
    deadline = hung.started_at + timeout
    assert hung.finished_at - deadline < 0.5  # declared timed out at the deadline
    assert after.state == "ok", after.error
    assert after.result.values["pid"] != first_pid  # ran on the promoted spare ...
    assert after.started_at - deadline < 0.5  # ... without a cold start
    h.ev.close()
    exit_event = h.exit_of(first_pid)
    assert exit_event["exitcode"] == -15  # SIGTERM was enough
    assert exit_event["t"] - hung.started_at <= timeout + grace + 0.5
    stats = h.ev.stats()
    assert (stats["timed_out"], stats["respawns"], stats["workers_killed"]) == (1, 1, 0)
    assert gone(first_pid)


def test_sigterm_ignoring_eval_is_killed_after_kill_grace(harness: Callable[..., Harness], tmp_path: Any) -> None:
    timeout, grace = 2.0, 1.0
    address = str(tmp_path / "told")
    h = harness(WhenWeight(HANG, IgnoreSigtermThenTell(address)), timeout=timeout, kill_grace=grace, niceness=0)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(address)
        server.listen(1)
        server.settimeout(WAIT)
        h.fill(HANG)
        assert h.submit(step=1) == "submitted"
        told, _ = server.accept()
        told.close()
        told_at = time.monotonic()
    (hung,) = h.outcomes()
    assert hung.state == "timeout"
    assert told_at < hung.started_at + timeout, "the worker was not even ignoring SIGTERM by the deadline"
    pid = int(h.events("eval_start")[0]["worker_pid"])
    h.fill(1.0)
    after = h.run_one(step=2)  # a fresh worker (no spare), over fresh pipes
    assert after.state == "ok", after.error
    assert int(after.result.values["pid"]) != pid
    assert h.runner.wait_until(lambda s: s["workers_alive"] == 1, WAIT)  # the killed one is reaped
    exit_event = h.exit_of(pid)
    assert exit_event["exitcode"] == -9  # SIGTERM was ignored: SIGKILL
    lived = exit_event["t"] - hung.started_at
    assert timeout + grace - 0.05 <= lived <= timeout + grace + 0.5
    stats = h.ev.stats()
    assert (stats["timed_out"], stats["completed"], stats["respawns"], stats["workers_killed"]) == (1, 1, 1, 1)


@pytest.mark.parametrize(
    ("kind", "exitcode", "described"), [("exit", 3, "exit code 3"), ("segfault", -11, "exit code -11 (SIGSEGV)")]
)
def test_crash_is_detected_within_half_a_second(
    harness: Callable[..., Harness], tmp_path: Any, kind: str, exitcode: int, described: str
) -> None:
    stamp = str(tmp_path / "crashed_at")
    h = harness(WhenWeight(HANG, Stamped(faults.CrashingEval(kind, exit_code=3), stamp)), niceness=0)
    h.fill(HANG)
    crashed = h.run_one(step=1)
    assert crashed.state == "failed"
    assert isinstance(crashed.error, WorkerCrashed)
    assert crashed.error.exitcode == exitcode
    assert described in str(crashed.error)
    assert "step 1" in str(crashed.error)
    with open(stamp) as fh:
        crash_time = float(fh.read())
    assert crashed.finished_at - crash_time <= 0.5

    h.fill(1.0)
    after = h.run_one(step=2)  # the respawned worker evaluates the next snapshot
    assert after.state == "ok", after.error
    assert h.ev.stats()["respawns"] == 1


def test_raising_eval_fails_the_job_and_keeps_the_worker(harness: Callable[..., Harness]) -> None:
    h = harness(WhenWeight(HANG, faults.RaisingEval("bad batch", error=ValueError)))
    h.fill(HANG)
    failed = h.run_one(step=1)
    assert failed.state == "failed"
    assert isinstance(failed.error, ValueError)
    assert str(failed.error) == "bad batch"
    assert "in trigger" in str(failed.error.__cause__)  # the worker's traceback travels along
    h.fill(1.0)
    after = h.run_one(step=2)
    assert after.state == "ok", after.error
    assert h.ev.stats()["respawns"] == 0
    assert int(after.result.values["pid"]) == int(h.events("eval_start")[0]["worker_pid"])


def test_unbounded_allocation_is_contained_by_the_worker_limit(
    harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(RLIMIT_ENV, "256")  # workers cap their address space 256 MB above their size
    h = harness(WhenWeight(HANG, faults.AllocatingEval(chunk_mb=16, max_mb=8192)))
    h.fill(HANG)
    failed = h.run_one(step=1)
    assert failed.state == "failed"
    assert isinstance(failed.error, MemoryError)
    assert "max_mb" not in str(failed.error)  # stopped by the limit, not by the safety stop
    h.fill(1.0)
    assert h.run_one(step=2).state == "ok"


def test_gives_up_after_max_respawns(harness: Callable[..., Harness]) -> None:
    h = harness(faults.CrashingEval("exit", exit_code=4), max_respawns=1)
    assert h.run_one(step=1).state == "failed"
    assert h.run_one(step=2).state == "failed"  # on the one respawn allowed
    assert h.runner.wait_until(lambda s: s["gave_up"] == 1, WAIT)
    assert h.ev.stats()["workers_lost"] == 2
    assert h.ev.gave_up is not None
    assert "max_respawns=1" in h.ev.gave_up
    assert "exit code 4" in h.ev.gave_up
    assert h.submit(step=3) == "skipped_breaker_open"  # for good
    assert h.runner.worker_pids() == []


def test_setup_error_in_the_worker_gives_up_at_once(harness: Callable[..., Harness]) -> None:
    def broken_factory() -> Any:
        raise ImportError("no module named 'private_data'")

    h = harness(weight_sum, dataloader_factory=broken_factory, max_respawns=5)
    assert h.submit(step=1) == "submitted"
    (job,) = h.outcomes()
    assert job.state == "cancelled"  # it never ran
    assert h.ev.gave_up is not None
    assert "could not be set up" in h.ev.gave_up
    assert "private_data" in h.ev.gave_up
    assert h.ev.stats()["workers_started"] == 1  # a set-up error is not retried


# -- shutdown ----------------------------------------------------------------------------------------
def test_close_kills_a_busy_worker_and_leaves_no_process_or_shared_memory(
    harness: Callable[..., Harness], tmp_path: Any
) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    address = str(tmp_path / "told")
    h = harness(WhenWeight(HANG, IgnoreSigtermThenTell(address)), timeout=600.0, spare_worker=True)
    h.fill(1.0)
    assert h.run_one(step=1).state == "ok"
    assert h.runner.wait_until(lambda s: s["spare_ready"] == 1, WAIT)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(address)
        server.listen(1)
        server.settimeout(WAIT)
        h.fill(HANG)
        assert h.submit(step=2) == "submitted"
        told, _ = server.accept()  # the worker now ignores SIGTERM, mid-evaluation
        with told:
            assert told.recv(1) == b"!"
    pids = h.runner.worker_pids()
    assert len(pids) == 2
    start = time.monotonic()
    h.ev.close(timeout=1.0)
    assert time.monotonic() - start < 1.0 + 2.0
    (job,) = h.ev.drain()
    assert job.state == "cancelled"
    assert all(gone(pid) for pid in pids)
    assert h.runner.worker_pids() == []
    assert set(os.listdir("/dev/shm")) == shm_before
    assert h.ev.stats()["workers_killed"] == 1  # the SIGTERM-ignoring one; the idle spare just stopped
