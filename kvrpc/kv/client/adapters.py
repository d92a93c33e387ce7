"""Old home of the engine-side adapters, kept only for imports not yet moved (kvrpc.bench).

Import from :mod:`kvrpc.kv.client` instead; this module goes once nothing imports it.
"""

from kvrpc.kv.client import (
    LoadStoreOp,
    PollingSchedulerAdapter,
    RetrieveProgress,
    SchedulerAdapter,
    WorkerAdapter,
    WorkerStats,
)

__all__ = [
    "LoadStoreOp",
    "PollingSchedulerAdapter",
    "RetrieveProgress",
    "SchedulerAdapter",
    "WorkerAdapter",
    "WorkerStats",
]
