"""The engine side of the KV service: the scheduler's and the workers' adapters.

Each name lives in the module that owns it: :mod:`~kvrpc.kv.client.scheduler` (the
scheduler's adapters), :mod:`~kvrpc.kv.client.worker` (the worker's), with what they are
made of beside them: :mod:`~kvrpc.kv.client.link` (the connection, client id and
keepalives), :mod:`~kvrpc.kv.client.hosts` (which host's server a rank talks to),
:mod:`~kvrpc.kv.client.ops` (what a transfer names, and the request ids the server sees),
:mod:`~kvrpc.kv.client.ledger` (what is in flight and finished),
:mod:`~kvrpc.kv.client.completions` (what happens when a reply arrives),
:mod:`~kvrpc.kv.client.progress` (a retrieve's progress) and
:mod:`~kvrpc.kv.client.events` (the worker's CUDA events).
"""

from kvrpc.kv.client.hosts import server_for_rank
from kvrpc.kv.client.ledger import WorkerStats
from kvrpc.kv.client.ops import LoadStoreOp, scoped_request_id
from kvrpc.kv.client.progress import RetrieveProgress
from kvrpc.kv.client.scheduler import PollingSchedulerAdapter, SchedulerAdapter
from kvrpc.kv.client.worker import WorkerAdapter

__all__ = [
    "LoadStoreOp",
    "PollingSchedulerAdapter",
    "RetrieveProgress",
    "SchedulerAdapter",
    "WorkerAdapter",
    "WorkerStats",
    "scoped_request_id",
    "server_for_rank",
]
