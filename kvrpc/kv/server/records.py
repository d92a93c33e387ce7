"""What the KV server's state core keeps, and the plans it hands to the I/O shell.

Plain records, no behaviour: :mod:`kvrpc.kv.server.state` owns every rule that changes them.
A plan (:class:`StorePlan`, :class:`RetrievePlan`, :class:`Job`) is what the state decided
for one call; the shell runs its copies or loads and gives it back to be settled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvrpc.kv.layout import KVLayout
from kvrpc.kv.outcomes import KeyFailure

__all__ = [
    "Client",
    "Counters",
    "Instance",
    "Job",
    "Namespace",
    "Principal",
    "RetrievePlan",
    "Session",
    "SessionKey",
    "StorePlan",
]

#: A session's key: (namespace id, request id).
SessionKey = tuple[bytes, str]

#: Who a client is beyond its id, where the transport can tell: the kernel's (uid, pid) of
#: the process at the other end of a local socket (see :mod:`kvrpc.kv.server.access`).
Principal = tuple[int, int]


@dataclass(eq=False)
class Namespace:
    """One (model name, world size): its id in pool keys, its chunk form and rank suffixes.

    ``ranks`` maps each rank that registered on this server to its suffix, in rank order: a
    lookup counts the chunks these ranks hold. On one host that is every rank; with a
    server per host, each server answers for its own ranks and the scheduler takes the
    minimum over the servers.
    """

    id: bytes
    model_name: str
    world_size: int
    block_size: int
    form: tuple[str, int, tuple[int, ...], str]
    layout: KVLayout  #: the first registered layout (for messages)
    chunk_nbytes: int
    suffixes: list[bytes]
    ranks: dict[int, bytes] = field(default_factory=dict)


@dataclass(eq=False)
class Instance:
    """A registered worker KV cache, as the state sees it (its mappings live in the shell)."""

    id: int
    owner: bytes
    namespace: Namespace
    worker_id: int
    mode: str
    layout: KVLayout
    blocks_per_chunk: int
    chunk_nbytes: int
    suffix: bytes
    #: The engine its worker belongs to (its client's, bound at registration; None: no
    #: engine id). Its retrieves release only pins of that engine's sessions.
    engine_id: str | None = None
    #: Set once unregistered or its client left: copies not yet started must not start.
    closed: bool = False


@dataclass(eq=False)
class Session:
    """A request's pins: slot -> worker id of the chunk pinned there, and its prefetch jobs.

    ``engine_id`` is the engine of the scheduler client that opened it (None: no engine
    id): only that engine's workers release its pins by retrieving.
    """

    owner: bytes
    engine_id: str | None = None
    pins: dict[int, int] = field(default_factory=dict)
    jobs: set[str] = field(default_factory=set)


@dataclass(eq=False)
class Job:
    """A prefetch a lookup started: the keys to load from the lower tier, then the count.

    ``dropped`` is set when the job's request ended or its client left: from then on it
    loads and pins nothing. ``result`` is taken exactly once.
    """

    id: str
    owner: bytes
    session: SessionKey
    namespace: Namespace
    prefix: bytes  #: the hashes of the chunks the job may count: L1, tier and remote together
    to_load: list[bytes]  #: pool keys the tier holds and L1 does not
    total: int  #: keys in the lookup, for the miss count
    #: Past the local run: per chunk, the pool keys L1 lacks, to ask a remote tier for.
    remote: list[list[bytes]] = field(default_factory=list)
    result: int | None = None
    dropped: bool = False


@dataclass(eq=False)
class Client:
    """What one adapter (by client id) owns on this server, and when it was last heard.

    ``principal`` is the process the client id is bound to (None until a call comes from a
    peer the transport identifies); ``pins`` counts its sessions' pins and
    ``inflight_bytes`` the bytes its stores and retrieves are copying, for the caps of
    :class:`~kvrpc.kv.server.caps.ClientCaps`. ``engine_id`` is the engine the client
    declared in its first registration or lookup (``engine_bound`` from then on): every
    later one must declare the same.
    """

    last_seen: float
    principal: Principal | None = None
    engine_id: str | None = None
    engine_bound: bool = False
    instances: set[int] = field(default_factory=set)
    sessions: set[SessionKey] = field(default_factory=set)
    jobs: set[str] = field(default_factory=set)
    pins: int = 0
    inflight_bytes: int = 0


@dataclass(eq=False)
class StorePlan:
    """An admitted store: per key None or a :class:`KeyFailure`, and the slots it reserved.

    ``reserved`` pairs a key index with its slot; ``waiting`` holds the key indices that
    found the pool full while write-through saves were still pinning slots (the shell
    waits for a save to finish and asks again).
    """

    instance: Instance
    results: list[KeyFailure | None]
    keys: list[bytes]
    block_ids: torch.Tensor
    reserved: list[tuple[int, int]] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    #: Set by the shell once the copies are done: the checksum of each reserved slot's
    #: chunk, in ``reserved``'s order (None: stored without checksums).
    checksums: list[int] | None = None
    #: Bytes of the reserved slots counted in the client's ``inflight_bytes`` until settled.
    charged: int = 0


@dataclass(eq=False)
class RetrievePlan:
    """An admitted retrieve: per key None or a :class:`KeyFailure`, and the slots it pinned.

    ``checksums`` pairs with ``found``: the checksum each pinned chunk was committed with
    (None if it has none), for ``--verify-retrieves``.
    """

    instance: Instance
    request_ids: list[str]
    results: list[KeyFailure | None]
    block_ids: torch.Tensor
    found: list[tuple[int, int]] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    checksums: list[int | None] = field(default_factory=list)
    #: Bytes of the pinned slots counted in the client's ``inflight_bytes`` until settled.
    charged: int = 0


@dataclass
class Counters:
    """The service's event counts, reported by ``kv.stats``."""

    hits: int = 0
    misses: int = 0
    lookups: int = 0
    stores: int = 0
    store_refused: int = 0
    store_duplicates: int = 0
    retrieves: int = 0
    retrieve_misses: int = 0
    #: Retrieved chunks whose bytes in the worker's blocks failed their checksum
    #: (``--verify-retrieves``): failed, never handed over as good.
    retrieve_corrupt: int = 0
    store_bytes: int = 0  #: bytes of the chunks stored into L1
    retrieve_bytes: int = 0  #: bytes of the chunks retrieved from L1
    prefetch_jobs: int = 0
    prefetched: int = 0
    clients_expired: int = 0
    client_limits: int = 0  #: calls refused for a per-client cap
    not_owner: int = 0  #: calls refused for naming another client's state
    #: Retrieved keys whose request id named another engine's session: copied, that
    #: session's pins left alone.
    retrieve_other_engine: int = 0
    #: DMA-stored chunks committed before the CPU had folded their checksums (a handler
    #: saw the copy's event first), given their checksum once it was folded...
    checksums_late: int = 0
    #: ...and those that never got one: the slot was filled again first, or the fold failed.
    checksums_missed: int = 0
