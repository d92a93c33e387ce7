"""The KV-cache service layer: keys, layouts, storage, the server's service and the adapters.

An inference engine's scheduler uses :class:`SchedulerAdapter` (or
:class:`PollingSchedulerAdapter`), each worker a :class:`WorkerAdapter`; ``kvrpc serve`` runs
the server (:func:`~kvrpc.kv.server.serving.serve_kv`). Each name lives in the module that owns it.
"""

from kvrpc.kv.client import (
    LoadStoreOp,
    PollingSchedulerAdapter,
    RetrieveProgress,
    SchedulerAdapter,
    WorkerAdapter,
    WorkerStats,
)
from kvrpc.kv.cuda_ipc import CudaIPCWrapper
from kvrpc.kv.keys import (
    CacheKey,
    KeyBatch,
    blocks_per_chunk,
    hashes_from_block_hashes,
    hashes_from_tokens,
    salted_root,
)
from kvrpc.kv.layout import SKIP_BLOCK, KVLayout, LayoutKind
from kvrpc.kv.outcomes import KeyStatus
from kvrpc.kv.protocols import KV_PROTOCOLS, kv_registry
from kvrpc.kv.server.service import KVService
from kvrpc.kv.server.serving import KVServerSettings, serve_kv
from kvrpc.kv.shm import release_shared, shared_empty

__all__ = [
    "KV_PROTOCOLS",
    "SKIP_BLOCK",
    "CacheKey",
    "CudaIPCWrapper",
    "KVLayout",
    "KVServerSettings",
    "KVService",
    "KeyBatch",
    "KeyStatus",
    "LayoutKind",
    "LoadStoreOp",
    "PollingSchedulerAdapter",
    "RetrieveProgress",
    "SchedulerAdapter",
    "WorkerAdapter",
    "WorkerStats",
    "blocks_per_chunk",
    "hashes_from_block_hashes",
    "hashes_from_tokens",
    "kv_registry",
    "release_shared",
    "salted_root",
    "serve_kv",
    "shared_empty",
]
