from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_evalguard.engine.jobs import Job, JobCancelled
from lightning_evalguard.engine.program import EvalProgram, batches_for
from lightning_evalguard.errors import EvalFailed


def loader(n: int = 40, bs: int = 10) -> DataLoader:
    return DataLoader(TensorDataset(torch.arange(n, dtype=torch.float32)), batch_size=bs)


class Plain(torch.nn.Module):
    """Not a LightningModule: the program only needs validation_step and self.log."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.seen: list[int] = []

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        self.seen.append(batch_idx)
        assert not torch.is_grad_enabled()
        assert not self.training
        self.log("val/mean_x", (x * self.w).mean())


@pytest.mark.parametrize(
    ("limit", "expected"), [(None, 4), (2, 2), (10, 4), (0.5, 2), (1.0, 4), (0.0, 0), (0, 0)]
)
def test_limit_batches_like_lightning(limit: int | float | None, expected: int) -> None:
    assert batches_for(loader(), limit) == expected
    module = Plain()
    program = EvalProgram([loader()], limit_batches=limit)
    if expected:
        program.run(module)
    assert module.seen == list(range(expected))


def test_runs_validation_step_with_log_bound_to_a_collector() -> None:
    module = Plain()
    module.train()
    out = EvalProgram([loader()]).run(module)
    assert out.values == {"val/mean_x": pytest.approx(19.5)}
    assert "log" not in module.__dict__  # the binding is undone


def test_cancel_stops_at_the_next_batch() -> None:
    module = Plain()
    job = Job(1, step=0, epoch=0)

    class CancelAfterTwo(Plain):
        def validation_step(self, batch, batch_idx):
            super().validation_step(batch, batch_idx)
            if batch_idx == 1:
                job.request_cancel("timeout")

    module = CancelAfterTwo()
    with pytest.raises(JobCancelled):
        EvalProgram([loader()]).run(module, job)
    assert module.seen == [0, 1]


def test_eval_fn_gets_each_dataloader_and_keys_are_suffixed() -> None:
    def eval_fn(module, dl):
        return {"n": sum(len(b[0]) for b in dl), "t": torch.tensor(2.0)}

    out = EvalProgram([loader(40), loader(30)], limit_batches=2, eval_fn=eval_fn).run(Plain())
    assert out.values == {"n/dataloader_idx_0": 20.0, "t/dataloader_idx_0": 2.0,
                          "n/dataloader_idx_1": 20.0, "t/dataloader_idx_1": 2.0}


@pytest.mark.parametrize(
    ("result", "match"),
    [
        ([1.0], r"returned list, expected a mapping of str to numbers"),
        ({"a": "x"}, r"non-numeric value for 'a'"),
        ({"a": None}, r"non-numeric value for 'a'"),
        ({1: 1.0}, r"non-string key 1"),
    ],
)
def test_eval_fn_bad_results_fail_clearly(result: object, match: str) -> None:
    with pytest.raises(EvalFailed, match=match):
        EvalProgram([loader()], eval_fn=lambda m, dl: result).run(Plain())


def test_coroutine_eval_fn_runs_on_its_own_loop() -> None:
    loops: list[asyncio.AbstractEventLoop] = []

    async def eval_fn(module, dl):
        loops.append(asyncio.get_running_loop())
        await asyncio.sleep(0)
        return {"ok": 1.0}

    assert EvalProgram([loader()], eval_fn=eval_fn).run(Plain()).values == {"ok": 1.0}
    assert loops[0].is_closed()


def test_coroutine_eval_fn_inside_a_running_loop_like_jupyter() -> None:
    seen: dict[str, object] = {}

    async def eval_fn(module, dl):
        seen["loop"] = asyncio.get_running_loop()
        seen["thread"] = threading.current_thread()
        return {"ok": 2.0}

    async def notebook_cell():
        outer = asyncio.get_running_loop()
        values = EvalProgram([loader()], eval_fn=eval_fn).run(Plain()).values
        return outer, values

    outer, values = asyncio.run(notebook_cell())
    assert values == {"ok": 2.0}
    assert seen["loop"] is not outer
    assert seen["thread"] is not threading.main_thread()


def test_coroutine_eval_fn_is_cancelled_with_its_job() -> None:
    job = Job(1, step=0, epoch=0)
    started = threading.Event()

    async def eval_fn(module, dl):
        started.set()
        await asyncio.sleep(60)
        return {}

    threading.Timer(0.05, lambda: job.request_cancel("timeout")).start()
    with pytest.raises(JobCancelled):
        EvalProgram([loader()], eval_fn=eval_fn).run(Plain(), job)
    assert started.is_set()


def test_module_without_validation_step_fails_clearly() -> None:
    with pytest.raises(EvalFailed, match="has no validation_step"):
        EvalProgram([loader()]).run(torch.nn.Linear(1, 1))
