"""The ``kv.*`` protocols: what travels between the adapters and a KV-cache server.

Each operation is a :class:`~kvrpc.protocol.ProtocolDefinition` whose handler type is chosen
for what the handler does:

* NONBLOCKING, plain functions: operations that only read or change the server's tables
  (lookup, prefetch status, end session, chunk size, stats, clear, keepalive, goodbye). They
  finish within microseconds on the event loop, with no thread hop.
* NONBLOCKING, ``async def``: register, store and retrieve (and unregister, to match), in
  both their CPU and their CUDA forms. They change the tables on the loop and hand the slow
  part (opening mappings, byte copies) to the service's copy executor or to a GPU's copy
  engine, awaiting it, so neither the loop nor the server's BLOCKING pool waits on a copy.

None is BLOCKING on purpose: a BLOCKING handler runs in a pool thread, and the service's
tables are changed only on the loop thread so that they need no locks.

Every call that creates state carries the caller's ``client_id`` (16 random bytes made by the
adapter): what it creates (registered caches, sessions' pins, prefetch jobs) belongs to that
client and is released when the client says ``kv.goodbye`` or goes silent for longer than
the server's ``client_timeout`` (the adapters send ``kv.keepalive`` every couple of
seconds).
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from kvrpc.cuda import CudaEventHandle
from kvrpc.kv.cuda_ipc import CudaIPCWrapper
from kvrpc.kv.keys import KeyBatch
from kvrpc.kv.layout import KVLayout
from kvrpc.kv.outcomes import KeyOutcomes, StoreReply
from kvrpc.kv.shm import SharedTensorRef
from kvrpc.protocol import ProtocolDefinition, ProtocolRegistry

__all__ = [
    "CLEAR",
    "EVENTS_DEFAULT_BUFFER",
    "EVENTS_MAX_BUFFER",
    "END_SESSION",
    "GET_CHUNK_SIZE",
    "GOODBYE",
    "KEEPALIVE",
    "KV_PROTOCOLS",
    "LOOKUP",
    "QUERY_PREFETCH_STATUS",
    "REGISTER_KV_CACHE",
    "RELEASE_PINS",
    "RETRIEVE",
    "RETRIEVE_CUDA",
    "RETRIEVE_CUDA_LAYERS",
    "STATS",
    "STORE",
    "STORE_CUDA",
    "UNREGISTER_KV_CACHE",
    "CudaCopyReply",
    "EngineId",
    "EventKindName",
    "EventsRequest",
    "KVEvent",
    "LayerCopyReply",
    "KVCacheRegistration",
    "RetrieveReply",
    "StoreReply",
    "kv_registry",
]

#: How a worker's KV bytes reach the server: GPU memory shared by CUDA IPC, CPU shared
#: memory, or inside the messages.
TransferMode = Literal["cuda_ipc", "shm", "inline"]

#: An engine id on the wire: non-empty, without ``/`` (the separator the adapters put
#: between it and a request id, :func:`~kvrpc.kv.client.ops.scoped_request_id`). Checked
#: while the payload decodes, so a handler never sees another.
EngineId = Annotated[str, Field(min_length=1, pattern=r"^[^/]+$")]


class KVCacheRegistration(BaseModel):
    """One worker's KV cache as it registers it: who it is, its layout, where its bytes are.

    ``tensors`` holds one :class:`~kvrpc.kv.shm.SharedTensorRef` per layer for the ``shm``
    mode; ``cuda_tensors`` one :class:`~kvrpc.kv.cuda_ipc.CudaIPCWrapper` per layer for
    ``cuda_ipc``, and ``ready_events`` the interprocess events the worker will record first
    for the server to wait on (``cuda_ipc`` only; ignored otherwise), which the server opens
    while it registers rather than in the first copies. The layout and the refs are wire
    types of their own, checked while the payload decodes, so a handler never parses them.

    ``engine_id`` is the worker's engine (its scheduler's, None for none): the server binds
    the worker's client to it, and the worker's retrieves release only the pins of
    sessions that engine's scheduler opened.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    model_name: str = Field(min_length=1)
    world_size: int = Field(ge=1)
    worker_id: int = Field(ge=0)
    block_size: int = Field(ge=1)
    mode: TransferMode
    layout: KVLayout
    tensors: list[SharedTensorRef] = []
    cuda_tensors: list[CudaIPCWrapper] = []
    ready_events: list[CudaEventHandle] = []
    engine_id: EngineId | None = None


class RetrieveReply(KeyOutcomes):
    """Per-key outcome of a retrieve (``statuses``, see :class:`~kvrpc.kv.outcomes.KeyOutcomes`).

    ``chunks`` carries the chunk bytes (one uint8 tensor per key, empty for failed keys)
    in the ``inline`` mode, and is empty in the ``shm`` mode, where the server wrote the
    blocks itself.
    """

    chunks: list[torch.Tensor] = Field(default_factory=list)


class CudaCopyReply(KeyOutcomes):
    """Per-key outcome of a ``cuda_ipc`` store or retrieve, and the copy's completion event.

    ``statuses[i]`` is OK when key ``i`` is copied. The server replies once the copy is
    enqueued: ``cuda_event`` (None when nothing is copied) is recorded on its copy stream
    after the batch and completes when the whole batch has been copied. A worker polls it
    (:func:`~kvrpc.cuda.poll_event`, or ``CUDAMessagingFuture.wait`` with a timeout) and
    never makes a stream wait on it, nor blocks on it without a timeout: the server could
    die mid-copy, and then the event would never complete.
    """

    cuda_event: CudaEventHandle | None = None


class LayerCopyReply(KeyOutcomes):
    """Per-key outcome of a layer-wise ``cuda_ipc`` retrieve, and one event per layer.

    Sent before the copy is enqueued: ``layer_events[l]`` (recorded on the server's copy
    stream) completes when layer ``l`` of every copied chunk is in its blocks, and the last
    one when the whole batch is, but only once the stamp of turn ``first_turn + l`` in
    ``stamps`` says it was recorded (:mod:`kvrpc.kv.stamps`); a failed stamp means that layer
    and the ones after it were never written. ``stamps`` is None when the events were all
    recorded before the reply. A worker polls (never makes a stream wait on them: see
    :mod:`kvrpc.cuda`). Empty when nothing was copied.
    """

    layer_events: list[CudaEventHandle] = Field(default_factory=list)
    stamps: SharedTensorRef | None = None
    first_turn: int = 0


#: What a :class:`KVEvent` tells (see :class:`kvrpc.kv.server.events.EventKind`).
EventKindName = Literal["stored", "removed", "moved", "cleared", "snapshot", "snapshot_end", "gap"]

#: Live events a ``kv.events`` subscription buffers by default, and at most.
EVENTS_DEFAULT_BUFFER: Final = 1024
EVENTS_MAX_BUFFER: Final = 1 << 16


class KVEvent(BaseModel):
    """One item of ``kv.events``: a numbered fact about what the server's cache holds.

    ``kind`` says what (stored, removed, moved, cleared; snapshot and snapshot_end for a
    snapshot; gap for lost events); ``seq`` increases along the stream (every snapshot
    item, and its end, carries the number it was taken at). Chunk events carry ``tier``
    (``l1``, ``disk``, ``redis``), the 8-byte ``namespace`` id, the model and world size
    that registered it (None if unknown to the server since it started), the rank
    (``worker_id``), the 32-byte chunk ``hashes`` and ``chunk_tokens``, the tokens of each
    chunk. The server knows no chunk's position in its prompt: hash ``i`` of a prompt
    hashed by :func:`~kvrpc.kv.keys.hashes_from_tokens` covers its tokens
    ``[i * chunk_tokens, (i + 1) * chunk_tokens)``. ``source`` is the tier a move copied
    from, ``reason`` why chunks were removed (``evicted``, ``deleted``, ``cleared``), and a
    gap names the lost range ``first`` to ``last``: the subscriber may subscribe again
    with a snapshot.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: EventKindName
    seq: int = Field(ge=0)
    tier: str = ""
    namespace: bytes = b""
    model_name: str | None = None
    world_size: int | None = None
    worker_id: int | None = None
    hashes: list[bytes] = Field(default_factory=list)
    chunk_tokens: int = Field(default=0, ge=0)
    source: str | None = None
    reason: str | None = None
    first: int | None = None
    last: int | None = None


class EventsRequest(BaseModel):
    """What a ``kv.events`` subscriber asks for.

    ``snapshot``: first every chunk held now, then the live events, with no gap and no
    duplicate between the two. ``buffer``: the live events the server keeps for this
    subscriber while it does not read; past it the oldest are dropped and a gap event
    says which. ``namespace``: only that namespace id's chunk events (events of no
    namespace, such as cleared and gap, always come).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    snapshot: bool = False
    buffer: int = Field(default=EVENTS_DEFAULT_BUFFER, ge=1, le=EVENTS_MAX_BUFFER)
    namespace: bytes | None = Field(default=None, min_length=8, max_length=8)


REGISTER_KV_CACHE = ProtocolDefinition(
    "kv.register_kv_cache",
    (bytes, KVCacheRegistration),
    int,
    doc="Register a worker's KV cache; returns the instance id its stores and retrieves use.",
)
UNREGISTER_KV_CACHE = ProtocolDefinition(
    "kv.unregister_kv_cache",
    (bytes, int),
    bool,
    doc="Forget a registered KV cache and close its mappings; False if it was not registered.",
)
STORE = ProtocolDefinition(
    "kv.store",
    (bytes, int, KeyBatch, torch.Tensor, list[torch.Tensor]),
    StoreReply,
    doc=(
        "Store chunks: (client, instance, keys, block ids [n, blocks_per_chunk], inline "
        "chunk bytes or []); a status per key."
    ),
)
RETRIEVE = ProtocolDefinition(
    "kv.retrieve",
    (bytes, int, list[str], KeyBatch, torch.Tensor),
    RetrieveReply,
    doc=(
        "Retrieve chunks into the given block ids: (client, instance, request id per key, "
        "keys, block ids); releases the sessions' pins on what it copied (only sessions of "
        "the worker's engine)."
    ),
)
STORE_CUDA = ProtocolDefinition(
    "kv.store_cuda",
    (bytes, int, KeyBatch, torch.Tensor, CudaEventHandle),
    CudaCopyReply,
    doc=(
        "Store chunks from a cuda_ipc worker's GPU blocks: (client, instance, keys, block ids "
        "[n, blocks_per_chunk], the worker's event after which the blocks hold the KV). "
        "Answered once the copy is enqueued; the reply's event completes when it is done."
    ),
)
RETRIEVE_CUDA = ProtocolDefinition(
    "kv.retrieve_cuda",
    (bytes, int, list[str], KeyBatch, torch.Tensor, CudaEventHandle, float | None),
    CudaCopyReply,
    doc=(
        "Retrieve chunks into a cuda_ipc worker's GPU blocks: (client, instance, request id "
        "per key, keys, block ids, the worker's event after which the blocks may be written, "
        "deadline in seconds or None). Answered once the copy is enqueued; the reply's "
        "event completes when it is done. Past the deadline a copy that has not started is "
        "not started, and the reply says so (with no event: no byte is written)."
    ),
)
RETRIEVE_CUDA_LAYERS = ProtocolDefinition(
    "kv.retrieve_cuda_layers",
    (bytes, int, list[str], KeyBatch, torch.Tensor, CudaEventHandle, float | None),
    LayerCopyReply,
    doc=(
        "kv.retrieve_cuda in layer order: the same arguments; replies once the copy is "
        "enqueued, with an event per layer that completes when that layer is written."
    ),
)
LOOKUP = ProtocolDefinition(
    "kv.lookup",
    (bytes, str, KeyBatch, EngineId | None),
    int | str,
    doc=(
        "(client, request id, keys without worker id, the client's engine id or None: "
        "non-empty, without '/'): count the leading chunks present for every rank and pin "
        "them for the request; a str answer is a prefetch job id for "
        "kv.query_prefetch_status."
    ),
)
QUERY_PREFETCH_STATUS = ProtocolDefinition(
    "kv.query_prefetch_status",
    (bytes, str),
    int | None,
    doc="None while the prefetch runs; then its chunk count, exactly once.",
)
END_SESSION = ProtocolDefinition(
    "kv.end_session",
    (bytes, str, int, str),
    int,
    doc="(client, model name, world size, request id): release the request's pins.",
)
RELEASE_PINS = ProtocolDefinition(
    "kv.release_pins",
    (bytes, str, KeyBatch),
    int,
    doc=(
        "(client, request id, keys without worker id): release the request's pins on these "
        "chunks for every rank, before its session ends (the engine holds them itself); "
        "returns how many pins were released."
    ),
)
GET_CHUNK_SIZE = ProtocolDefinition(
    "kv.get_chunk_size", (), int, doc="Tokens per chunk on this server."
)
STATS = ProtocolDefinition(
    "kv.stats", (), dict[str, int], doc="Hits, misses, stores, evictions, bytes, pins, sessions."
)
CLEAR = ProtocolDefinition(
    "kv.clear",
    (),
    int,
    doc="Drop every unpinned chunk from memory (L1, not a disk tier); returns how many.",
)
KEEPALIVE = ProtocolDefinition(
    "kv.keepalive", (bytes,), None, doc="Tell the server the client is alive."
)
GOODBYE = ProtocolDefinition(
    "kv.goodbye",
    (bytes,),
    None,
    doc="The client is closing: release what it registered, pinned and started, now.",
)

EVENTS = ProtocolDefinition(
    "kv.events",
    (EventsRequest,),
    KVEvent,
    stream=True,
    doc=(
        "A stream of what the cache holds: stored, removed, moved, cleared (a snapshot of "
        "every chunk held first, if asked), with sequence numbers and gap events."
    ),
)

#: Every ``kv.*`` protocol, in the order the docs list them.
KV_PROTOCOLS: tuple[ProtocolDefinition, ...] = (
    REGISTER_KV_CACHE,
    UNREGISTER_KV_CACHE,
    STORE,
    RETRIEVE,
    STORE_CUDA,
    RETRIEVE_CUDA,
    RETRIEVE_CUDA_LAYERS,
    LOOKUP,
    QUERY_PREFETCH_STATUS,
    END_SESSION,
    RELEASE_PINS,
    GET_CHUNK_SIZE,
    STATS,
    CLEAR,
    KEEPALIVE,
    GOODBYE,
    EVENTS,
)


def kv_registry() -> ProtocolRegistry:
    """A registry with kvrpc's built-in ``rpc.*`` protocols and every ``kv.*`` protocol."""
    registry = ProtocolRegistry.with_builtins()
    registry.extend(KV_PROTOCOLS)
    return registry
