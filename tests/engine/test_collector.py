from __future__ import annotations

import math

import pytest
import torch
import torchmetrics

from lightning_evalguard.engine.collector import Collector, infer_batch_size


def test_mean_is_weighted_by_batch_size_inferred_from_the_batch() -> None:
    c = Collector()
    c.set_batch(0, batch=(torch.zeros(2, 5), torch.zeros(2)))
    c.log("loss", torch.tensor(1.0))
    c.set_batch(0, batch={"x": torch.zeros(6, 5)})
    c.log("loss", 3.0)
    assert c.compute().values == {"loss": 2.5}


def test_explicit_batch_size_wins() -> None:
    c = Collector()
    c.set_batch(0, batch=torch.zeros(100, 2))
    c.log("a", 1.0, batch_size=1)
    c.log("a", 4.0, batch_size=3)
    assert c.compute().values["a"] == pytest.approx(13 / 4)


@pytest.mark.parametrize(("reduce_fx", "expected"), [("sum", 6.0), ("max", 3.0), ("min", 1.0), (torch.max, 3.0)])
def test_other_reductions_are_unweighted(reduce_fx: object, expected: float) -> None:
    c = Collector()
    for value, size in [(1.0, 10), (2.0, 1), (3.0, 5)]:
        c.set_batch(0, batch_size=size)
        c.log("x", value, reduce_fx=reduce_fx)
    assert c.compute().values["x"] == expected


def test_metric_object_is_computed_once_at_the_end_then_reset() -> None:
    acc = torchmetrics.Accuracy(task="multiclass", num_classes=3)
    c = Collector()
    batches = [(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1])), (torch.tensor([2]), torch.tensor([2]))]
    for preds, target in batches:
        c.set_batch(0, batch=preds)
        acc(preds, target)
        c.log("acc", acc)
    assert c.compute().values["acc"] == pytest.approx(3 / 4)
    assert acc.update_count == 0  # reset for the next epoch


def test_several_dataloaders_get_lightnings_suffix() -> None:
    c = Collector(num_dataloaders=2)
    c.set_batch(0, batch_size=1)
    c.log("loss", 1.0)
    c.log("shared", 5.0, add_dataloader_idx=False)
    c.set_batch(1, batch_size=1)
    c.log("loss", 2.0)
    assert c.compute().values == {"loss/dataloader_idx_0": 1.0, "shared": 5.0, "loss/dataloader_idx_1": 2.0}


def test_logger_and_prog_bar_flags_are_kept() -> None:
    c = Collector()
    c.set_batch(0, batch_size=1)
    c.log("hidden", 1.0, logger=False)
    c.log("shown", 1.0, prog_bar=True)
    c.log_dict({"a": 1.0, "b": torch.tensor(2.0)})
    out = c.compute()
    assert out.logger_keys == {"shown", "a", "b"}
    assert out.prog_bar_keys == {"shown"}


def test_non_finite_values_pass_through() -> None:
    c = Collector()
    c.set_batch(0, batch_size=1)
    c.log("x", math.inf, reduce_fx="max")
    assert c.compute().values["x"] == math.inf


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (torch.ones(3), ValueError, r"needs a scalar, got a tensor of shape \(3,\)"),
        ("text", TypeError, r"needs a number, a scalar tensor or a Metric"),
    ],
)
def test_bad_values_are_rejected_with_the_key(value: object, error: type, match: str) -> None:
    c = Collector()
    c.set_batch(0, batch_size=1)
    with pytest.raises(error, match=match):
        c.log("val/x", value)


def test_bad_reduce_fx() -> None:
    c = Collector()
    with pytest.raises(ValueError, match=r"`reduce_fx` must be one of"):
        c.log("x", 1.0, reduce_fx="median")


def test_infer_batch_size_like_lightning() -> None:
    assert infer_batch_size(torch.zeros(7, 2)) == 7
    assert infer_batch_size([{"a": torch.zeros(3)}, torch.zeros(9)]) == 3
    assert infer_batch_size(torch.tensor(1.0)) == 1
    assert infer_batch_size(None) == 1
