"""What a worker process receives once per generation: the module's structure and the program.

The module is pickled with cloudpickle (so a class defined in a notebook, a script's ``__main__``
or a function travels by value) *without its weights*: every parameter and buffer is replaced by a
placeholder naming its index in :func:`~lightning_evalguard.engine.snapshot.state_tensors` order.
The worker rebuilds empty tensors of the same shape and fills them from a snapshot slot before each
job, so the payload stays small whatever the model size, and is built once, on the training
thread, at set-up. Pickling errors surface there, with a message saying what to change.

Both sides live here; the worker side imports nothing of Lightning until it unpickles the module.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning_evalguard.engine.shm import SlotLayout

__all__ = ["Placeholder", "WorkerPayload", "build_payload", "check_materialized", "load_module"]

_STATE = "evalguard-state"

# (shape, dtype, requires_grad, is_parameter) of one state tensor
Placeholder = tuple[tuple[int, ...], Any, bool, bool]


@dataclass
class WorkerPayload:
    """Everything a worker generation needs besides the slots (plain data and cloudpickled bytes)."""

    module: bytes
    placeholders: list[Placeholder]
    layout: SlotLayout
    dataloaders: bytes | None
    eval_fn: bytes | None
    dataloader_factory: bytes | None
    limit_batches: int | float | None
    eval_device: str
    copy_slots: bool = False

    def encode(self) -> bytes:
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def decode(data: bytes) -> WorkerPayload:
        payload = pickle.loads(data)
        if not isinstance(payload, WorkerPayload):
            raise TypeError(f"worker payload decoded to {type(payload).__name__}")
        return payload


def _cloudpickle(obj: Any, what: str, advice: str) -> bytes:
    import cloudpickle

    try:
        return bytes(cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception as exc:
        raise TypeError(
            f"subprocess evaluation sends {what} to its worker process, but it cannot be pickled "
            f"({type(exc).__name__}: {exc}). {advice}"
        ) from exc


def check_materialized(module: Any) -> None:
    """Raise a clear error if ``module`` still has lazy (shape-less) parameters or buffers.

    Raises:
        ValueError: an uninitialized lazy parameter or buffer.
    """
    import torch

    for i, t in enumerate(list(module.parameters()) + list(module.buffers())):
        if torch.nn.parameter.is_lazy(t):
            raise ValueError(
                f"state tensor #{i} of {type(module).__name__} is an uninitialized lazy parameter; subprocess "
                "evaluation needs every shape known when training starts: run one forward pass before `fit` "
                "(or use non-lazy layers)"
            )


def _pickle_module(module: Any) -> tuple[bytes, list[Placeholder]]:
    import cloudpickle
    import torch

    check_materialized(module)
    state = list(module.parameters()) + list(module.buffers())
    index = {id(t): i for i, t in enumerate(state)}
    placeholders: list[Placeholder] = [
        (tuple(t.shape), t.dtype, bool(t.requires_grad), isinstance(t, torch.nn.Parameter)) for t in state
    ]

    class _Pickler(cloudpickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            # Exact types only: a tensor subclass pickles itself (with its data), which still works.
            if type(obj) in (torch.Tensor, torch.nn.Parameter):
                i = index.get(id(obj))
                if i is not None:
                    return (_STATE, i)
            return None

    buffer = io.BytesIO()
    try:
        _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(module)
    except Exception as exc:
        raise TypeError(
            f"subprocess evaluation sends a copy of {type(module).__name__} (without its weights) to its worker "
            f"process, but it cannot be pickled ({type(exc).__name__}: {exc}). Keep unpicklable attributes "
            "(open files, locks, clients, generators) off the module, or drop them in `__getstate__`."
        ) from exc
    return buffer.getvalue(), placeholders


def build_payload(
    module: Any,
    *,
    dataloaders: list[Any],
    eval_fn: Callable[..., Any] | None,
    limit_batches: int | float | None,
    eval_device: str,
    layout: SlotLayout,
    dataloader_factory: Callable[..., Any] | None = None,
    copy_slots: bool = False,
) -> WorkerPayload:
    """Pickle what a worker needs (on the training thread, at set-up).

    Raises:
        TypeError: the module, the dataloaders, ``eval_fn`` or ``dataloader_factory`` cannot be
            pickled; the message says which and how to fix it.
        ValueError: the module still has lazy (shape-less) parameters.
    """
    module_bytes, placeholders = _pickle_module(module)
    loaders = None
    if dataloader_factory is None and dataloaders:
        loaders = _cloudpickle(
            list(dataloaders),
            "the validation dataloader(s)",
            "Make them picklable (a DataLoader over a picklable Dataset: with cloudpickle, lambdas and local "
            "classes are fine), or pass `dataloader_factory=`: an import path such as "
            "'my_project.data:val_dataloader', or a picklable callable, that builds the validation "
            "dataloader(s) inside the worker.",
        )
    fn = None
    if eval_fn is not None:
        fn = _cloudpickle(eval_fn, "`eval_fn`", "Use a module-level function or a picklable callable object.")
    factory = None
    if dataloader_factory is not None:
        factory = _cloudpickle(
            dataloader_factory, "`dataloader_factory`", "Use an import path string or a module-level function."
        )
    return WorkerPayload(
        module_bytes, placeholders, layout, loaders, fn, factory, limit_batches, eval_device, copy_slots
    )


def load_module(data: bytes, placeholders: list[Placeholder]) -> Any:
    """Worker side: unpickle the module, with fresh empty tensors where its state was."""
    import torch

    made: dict[int, Any] = {}  # one object per index keeps tied weights tied

    class _Unpickler(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            if not (isinstance(pid, tuple) and len(pid) == 2 and pid[0] == _STATE):
                raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
            i = pid[1]
            if i not in made:
                shape, dtype, requires_grad, is_param = placeholders[i]
                tensor = torch.empty(shape, dtype=dtype)
                made[i] = torch.nn.Parameter(tensor, requires_grad=requires_grad) if is_param else tensor
            return made[i]

    return _Unpickler(io.BytesIO(data)).load()
