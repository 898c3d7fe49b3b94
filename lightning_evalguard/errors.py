"""Exceptions raised by lightning_evalguard.

Every runtime fault the package reports comes from one tree, so a user can catch all of them with
``except EvalGuardError``. Errors carry the figures that explain them as attributes.

::

    EvalGuardError
    ├── EvaluationError                 an evaluation job did not produce a result
    │   ├── EvalTimeout                 ran past its ``timeout`` (elapsed_s, timeout)
    │   ├── EvalFailed                  its code raised or returned something unusable
    │   └── WorkerCrashed               its worker process died (exitcode)
    ├── CircuitOpen                     the circuit breaker refuses work (state, retry_in_s)
    ├── LoggingBackendError             the real logger failed (attempts)
    ├── SpillError                      rows could not be written to the spill file
    └── SLAViolation                    a measured figure crossed its threshold (kind, value, threshold)

    EvalGuardWarning (UserWarning)      runtime faults that were contained: filter them by category

Arguments checked at construction raise the built-in ``ValueError`` / ``TypeError`` instead: they
are programming errors, not runtime faults.
"""

from __future__ import annotations

__all__ = [
    "CircuitOpen",
    "EvalFailed",
    "EvalGuardError",
    "EvalGuardWarning",
    "EvalTimeout",
    "EvaluationError",
    "LoggingBackendError",
    "SLAViolation",
    "SpillError",
    "WorkerCrashed",
]


class EvalGuardError(Exception):
    """Base class of every runtime error raised by lightning_evalguard."""


class EvalGuardWarning(UserWarning):
    """A fault that was contained (a failed evaluation, a logger outage, ...): training went on."""


class EvaluationError(EvalGuardError):
    """An evaluation job ended without a result."""


class EvalTimeout(EvaluationError):
    """An evaluation job ran past its deadline.

    Attributes:
        elapsed_s: seconds the job had run when it was stopped.
        timeout: the configured limit in seconds.
    """

    def __init__(self, elapsed_s: float, timeout: float, message: str | None = None) -> None:
        self.elapsed_s = float(elapsed_s)
        self.timeout = float(timeout)
        super().__init__(message or f"evaluation ran {elapsed_s:.3f}s, past its timeout of {timeout:.3f}s")


class EvalFailed(EvaluationError):
    """An evaluation job raised, or returned something that is not a mapping of numbers."""


class WorkerCrashed(EvaluationError):
    """An evaluation worker process died while running a job.

    Attributes:
        exitcode: the process exit code (negative: killed by that signal number).
    """

    def __init__(self, exitcode: int | None, message: str | None = None) -> None:
        self.exitcode = exitcode
        super().__init__(message or f"evaluation worker died with exit code {exitcode}")


class CircuitOpen(EvalGuardError):
    """The circuit breaker is open and refuses work.

    Attributes:
        retry_in_s: seconds until a trial is allowed (``inf`` when it stays open).
    """

    def __init__(self, retry_in_s: float, message: str | None = None) -> None:
        self.retry_in_s = float(retry_in_s)
        super().__init__(message or f"circuit breaker open; next trial in {retry_in_s:.1f}s")


class LoggingBackendError(EvalGuardError):
    """The real logger failed to accept a batch of rows.

    Attributes:
        attempts: how many times the send was tried.
    """

    def __init__(self, attempts: int, message: str | None = None) -> None:
        self.attempts = int(attempts)
        super().__init__(message or f"logger failed after {attempts} attempt(s)")


class SpillError(EvalGuardError):
    """Rows could not be written to the spill file (disk full, unwritable directory, ...)."""


class SLAViolation(EvalGuardError):
    """A measured figure crossed its threshold.

    Attributes:
        kind: which SLA (``"step_slowdown"``, ``"memory_growth"``, ...).
        value: the measured figure.
        threshold: the configured limit.
    """

    def __init__(self, kind: str, value: float, threshold: float, message: str | None = None) -> None:
        self.kind = kind
        self.value = float(value)
        self.threshold = float(threshold)
        super().__init__(message or f"SLA {kind!r} violated: measured {value:.6g} > threshold {threshold:.6g}")
