"""lightning_evalguard: PyTorch Lightning callbacks that keep evaluation, logging and cleanup off the
training thread's critical path, with hard bounds on each.

Examples:
    >>> from lightning_evalguard import GuardedEvaluation
    >>> GuardedEvaluation(mode="stream", every_n_epochs=1, timeout=600.0).mode
    'stream'

Public names are imported lazily (PEP 562), so ``import lightning_evalguard`` stays cheap: it does
not import Lightning, torch, wandb or matplotlib until a name that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_evalguard._version import __version__

# name -> module that defines it; kept in one table so __all__, __getattr__ and __dir__ agree.
_LAZY: dict[str, str] = {
    "BufferedLogging": "lightning_evalguard.callbacks.logging",
    "CircuitOpen": "lightning_evalguard.errors",
    "EvalFailed": "lightning_evalguard.errors",
    "EvalGuardError": "lightning_evalguard.errors",
    "EvalGuardWarning": "lightning_evalguard.errors",
    "EvalTimeout": "lightning_evalguard.errors",
    "EvaluationError": "lightning_evalguard.errors",
    "GuardedEvaluation": "lightning_evalguard.callbacks.evaluation",
    "LoggingBackendError": "lightning_evalguard.errors",
    "PerformanceMonitor": "lightning_evalguard.callbacks.monitor",
    "ResourceCleanup": "lightning_evalguard.callbacks.cleanup",
    "SLAViolation": "lightning_evalguard.errors",
    "SpillError": "lightning_evalguard.errors",
    "WorkerCrashed": "lightning_evalguard.errors",
}

__all__ = [
    "BufferedLogging",
    "CircuitOpen",
    "EvalFailed",
    "EvalGuardError",
    "EvalGuardWarning",
    "EvalTimeout",
    "EvaluationError",
    "GuardedEvaluation",
    "LoggingBackendError",
    "PerformanceMonitor",
    "ResourceCleanup",
    "SLAViolation",
    "SpillError",
    "WorkerCrashed",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from lightning_evalguard.callbacks.cleanup import ResourceCleanup
    from lightning_evalguard.callbacks.evaluation import GuardedEvaluation
    from lightning_evalguard.callbacks.logging import BufferedLogging
    from lightning_evalguard.callbacks.monitor import PerformanceMonitor
    from lightning_evalguard.errors import (
        CircuitOpen,
        EvalFailed,
        EvalGuardError,
        EvalGuardWarning,
        EvalTimeout,
        EvaluationError,
        LoggingBackendError,
        SLAViolation,
        SpillError,
        WorkerCrashed,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_evalguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
