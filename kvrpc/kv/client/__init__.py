"""The engine side of the KV service: the scheduler's and the workers' adapters."""

from kvrpc.kv.client.adapters import (
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
