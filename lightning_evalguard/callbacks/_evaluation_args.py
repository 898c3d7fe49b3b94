"""GuardedEvaluation's argument checks (private): every bad value is refused at construction,
with a message that names the parameter and shows the value."""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_evalguard.engine.jobs import WHEN_FULL

__all__ = ["MODES", "check_arguments"]

MODES = ("stream", "subprocess", "inline")


def _check_positive_int_or_none(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"`{name}` must be a positive int or None, got {value!r}")


def _check_subprocess_only(mode: str, **params: Any) -> None:
    for name, value in params.items():
        if value is not None and mode != "subprocess":
            raise ValueError(f"`{name}` is only used with mode='subprocess', got {name}={value!r} with mode={mode!r}")


def _check_device(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ValueError(f"`{name}` must be a device string such as 'cuda:1' or 'cpu', got {value!r}")
    try:
        torch.device(value)
    except RuntimeError as exc:
        raise ValueError(f"`{name}` must be a device string such as 'cuda:1' or 'cpu', got {value!r}") from exc


def _check_number(name: str, value: Any, *, minimum: float, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        relation = ">" if strict else ">="
        raise ValueError(f"`{name}` must be a finite number {relation} {minimum}, got {value!r}")



def check_arguments(
    *,
    mode: Any,
    every_n_epochs: Any,
    every_n_steps: Any,
    timeout: Any,
    max_pending: Any,
    when_full: Any,
    failure_threshold: Any,
    recovery_time: Any,
    final_timeout: Any,
    limit_batches: Any,
    prefix: Any,
    cancel_grace: Any,
    kill_grace: Any,
    spare_worker: Any,
    max_respawns: Any,
    eval_device: Any,
    dataloader_factory: Any,
    warm_start: Any,
    progress_bar: Any,
    eval_threads: Any,
) -> None:
    """Check GuardedEvaluation's arguments; raise ``ValueError``/``TypeError`` naming the first bad one
    and showing its value (``eval_fn`` and ``dataloader_factory`` import paths are resolved by the
    callback itself)."""
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    _check_positive_int_or_none("every_n_epochs", every_n_epochs)
    _check_positive_int_or_none("every_n_steps", every_n_steps)
    if every_n_epochs is None and every_n_steps is None:
        raise ValueError("`every_n_epochs` and `every_n_steps` are both None: nothing would trigger evaluation")
    _check_number("timeout", timeout, minimum=0, strict=True)
    if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
        raise ValueError(f"`max_pending` must be an int >= 1, got {max_pending!r}")
    if when_full not in WHEN_FULL:
        raise ValueError(f"`when_full` must be one of {WHEN_FULL}, got {when_full!r}")
    if isinstance(failure_threshold, bool) or not isinstance(failure_threshold, int) or failure_threshold < 1:
        raise ValueError(f"`failure_threshold` must be an int >= 1, got {failure_threshold!r}")
    _check_number("recovery_time", recovery_time, minimum=0)
    _check_number("final_timeout", final_timeout, minimum=0)
    _check_number("cancel_grace", cancel_grace, minimum=0)
    _check_number("kill_grace", kill_grace, minimum=0)
    if not isinstance(spare_worker, bool):
        raise TypeError(f"`spare_worker` must be a bool, got {spare_worker!r}")
    if isinstance(max_respawns, bool) or not isinstance(max_respawns, int) or max_respawns < 0:
        raise ValueError(f"`max_respawns` must be an int >= 0, got {max_respawns!r}")
    _check_subprocess_only(mode, eval_device=eval_device, dataloader_factory=dataloader_factory)
    if eval_threads is not None and (
        isinstance(eval_threads, bool) or not isinstance(eval_threads, int) or eval_threads < 1
    ):
        raise ValueError(f"`eval_threads` must be an int >= 1 or None, got {eval_threads!r}")
    if not isinstance(progress_bar, bool):
        raise TypeError(f"`progress_bar` must be a bool, got {progress_bar!r}")
    if not isinstance(warm_start, bool):
        raise TypeError(f"`warm_start` must be a bool, got {warm_start!r}")
    if warm_start and mode != "subprocess":
        raise ValueError(
            f"`warm_start` is only used with mode='subprocess', got warm_start=True with mode={mode!r}"
        )
    if eval_device is not None:
        _check_device("eval_device", eval_device)
    if limit_batches is not None and (
        isinstance(limit_batches, bool)
        or not isinstance(limit_batches, (int, float))
        or (isinstance(limit_batches, int) and limit_batches < 0)
        or (isinstance(limit_batches, float) and not 0.0 <= limit_batches <= 1.0)
    ):
        raise ValueError(f"`limit_batches` must be an int >= 0, a float in [0, 1] or None, got {limit_batches!r}")
    if not isinstance(prefix, str):
        raise TypeError(f"`prefix` must be a str, got {prefix!r}")
