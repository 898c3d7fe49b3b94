"""Bounded metric buffer, background flusher, retries with backoff, spill to disk and replay.

Modules, one concept each:

- :mod:`.core`: the bounded FIFO (bytes, not items), the ``when_full`` policies, the value ledger;
- :mod:`.retry`: backoff with jitter between retries;
- :mod:`.spill`: JSON-lines spill segments, rotation, size cap, replay cursor and marks;
- :mod:`.flusher`: the background thread, the breaker around the backend, the hang watchdog;
- :mod:`.pipeline`: the settings and the object a logger proxy calls on the training thread.
"""

from lightning_evalguard.engine.buffer.core import DROP_REASONS, WHEN_FULL, Call, MetricBuffer, Row
from lightning_evalguard.engine.buffer.flusher import Flusher, Sink
from lightning_evalguard.engine.buffer.pipeline import LogConfig, LogPipeline, WarnOnce, quantile
from lightning_evalguard.engine.buffer.retry import Backoff
from lightning_evalguard.engine.buffer.spill import SpillFailure, SpillStore

__all__ = [
    "DROP_REASONS",
    "WHEN_FULL",
    "Backoff",
    "Call",
    "Flusher",
    "LogConfig",
    "LogPipeline",
    "MetricBuffer",
    "Row",
    "Sink",
    "SpillFailure",
    "SpillStore",
    "WarnOnce",
    "quantile",
]
