"""Fault injectors and readers for testing code that uses lightning_evalguard.

These are the same tools the package's own test suite uses; they are public so users can check
their own training scripts against hangs, crashes and flaky backends.

Sections: evaluation faults (for :class:`~lightning_evalguard.GuardedEvaluation`), logging faults
(for :class:`~lightning_evalguard.BufferedLogging`) and the W&B offline run reader.
"""

from __future__ import annotations

__all__: list[str] = []

# ---- evaluation faults -------------------------------------------------------------------------

# ---- logging faults ----------------------------------------------------------------------------

# ---- W&B offline run reader --------------------------------------------------------------------
