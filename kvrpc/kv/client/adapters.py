"""The API an inference engine's connector calls: scheduler and worker adapters.

Both sit on a :class:`~kvrpc.client.SyncClient` (its own event-loop thread), so an engine
calls them from plain threads and never waits on the network unless it asks to: submits
return at once, results are polled (``check_lookup_result``, ``get_finished``).

Each adapter makes a random ``client_id`` that names what it owns on the server (registered
KV caches, lookup pins, prefetch jobs) and sends ``kv.keepalive`` from a small thread
every couple of seconds, so the server releases all of it if the process dies; closing an
adapter releases it at once (``kv.goodbye``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from kvrpc.client import SyncClient
from kvrpc.cuda import CudaEventHandle, new_ipc_event, poll_event
from kvrpc.errors import (
    ConnectionLost,
    KVConfigError,
    KVError,
    KvrpcError,
    RequestTimeout,
    TransportError,
    UnknownInstance,
    UnknownProtocol,
)
from kvrpc.futures import MessagingFuture
from kvrpc.kv import protocols
from kvrpc.kv.cuda_ipc import CudaIPCWrapper
from kvrpc.kv.keys import (
    KeyBatch,
    blocks_per_chunk,
    check_hashes,
    hashes_from_block_hashes,
    hashes_from_tokens,
)
from kvrpc.kv.layout import (
    SKIP_BLOCK,
    KVLayout,
    LayoutKind,
    gather_chunks,
    scatter_chunks,
)
from kvrpc.kv.protocols import (
    CudaCopyReply,
    KVCacheRegistration,
    LayerCopyReply,
    RetrieveReply,
    TransferMode,
)
from kvrpc.kv.shm import shared_ref
from kvrpc.protocol import ProtocolDefinition

__all__ = [
    "LoadStoreOp",
    "PollingSchedulerAdapter",
    "RetrieveProgress",
    "SchedulerAdapter",
    "WorkerAdapter",
    "WorkerStats",
]

logger = logging.getLogger("kvrpc.kv")

#: Request ids returned by ``get_finished`` that are remembered, to never return one twice.
_REMEMBERED_FINISHED = 65536
#: Seconds between polls of a layer-wise retrieve's next layer event.
_LAYER_POLL_S = 20e-6
#: Seconds between attempts to register a KV cache again with a server that forgot it.
_REREGISTER_INTERVAL = 1.0


@dataclass(frozen=True)
class LoadStoreOp:
    """One request's store or retrieve: which tokens, and the blocks that hold them.

    ``block_ids`` are the request's KV blocks from block ``block_offset`` on (block
    ``block_ids[j]`` holds tokens ``(block_offset + j) * block_size`` onwards); an engine
    may give only the blocks covering ``[start, end)``. The chunk hashes come from exactly
    one of ``token_ids`` (hashed under ``cache_salt``), the engine's ``block_hashes`` (the
    same source the scheduler looked up with) or ``chunk_hashes`` already computed (from
    chunk 0 on, as :func:`~kvrpc.kv.keys.hashes_from_tokens` returns them). Only whole
    chunks inside ``[start, end)`` move (``end == 0``: up to the last whole chunk): a chunk
    that begins before ``start`` is skipped. A retrieve leaves alone the blocks holding its
    first ``skip_first_n_tokens`` tokens from ``start`` (ones the engine holds already and
    may be reading), writing the rest of their chunk.
    """

    block_ids: Sequence[int]
    token_ids: Sequence[int] | torch.Tensor | None = None
    block_hashes: Sequence[bytes | int] | None = None
    start: int = 0
    end: int = 0
    chunk_hashes: Sequence[bytes] | None = None
    cache_salt: str | None = None
    block_offset: int = 0
    skip_first_n_tokens: int = 0

    def first_written_block(self, block_size: int) -> int:
        """The first block a retrieve may write: blocks before it hold skipped tokens."""
        return -(-(self.start + self.skip_first_n_tokens) // block_size)


class _ServerLink:
    """A SyncClient to a KV server, its chunk geometry, the client id and keepalive thread."""

    def __init__(
        self,
        url: str,
        block_size: int,
        *,
        timeout: float,
        connect_timeout: float,
        keepalive_interval: float,
    ) -> None:
        self.url = url
        hint = f"start one with: kvrpc serve --url {url}"
        try:
            self.client = SyncClient(
                url,
                registry=protocols.kv_registry(),
                timeout=timeout,
                connect_timeout=connect_timeout,
            )
        except TransportError as exc:
            raise KVError(f"cannot reach a kvrpc KV server at {url}: {exc}; {hint}") from exc
        try:
            self.chunk_size: int = self.client.call(
                protocols.GET_CHUNK_SIZE, timeout=connect_timeout
            )
        except (RequestTimeout, ConnectionLost) as exc:
            self.client.close()
            raise KVError(
                f"no kvrpc KV server answered at {url} within {connect_timeout:g} s; {hint}"
            ) from exc
        except UnknownProtocol as exc:
            self.client.close()
            raise KVError(
                f"the server at {url} is a kvrpc server without the kv.* protocols; {hint}"
            ) from exc
        try:  # a chunk size the engine's blocks do not divide is an error at start-up
            self.blocks_per_chunk = blocks_per_chunk(self.chunk_size, block_size)
        except KVConfigError:
            self.client.close()
            raise
        self.client_id = secrets.token_bytes(16)
        self._untracked: set[MessagingFuture[Any]] = set()
        self._untracked_lock = threading.Lock()
        self._closed = threading.Event()
        self._keepalive = threading.Thread(
            target=self._keep_alive,
            args=(keepalive_interval,),
            daemon=True,
            name="kvrpc-kv-keepalive",
        )
        self._keepalive.start()

    def _keep_alive(self, interval: float) -> None:
        while not self._closed.wait(interval):
            try:
                self.client.submit(protocols.KEEPALIVE, self.client_id)
            except Exception:  # the client closed meanwhile; the loop ends on the next wait
                logger.debug("keepalive not sent", exc_info=True)

    def submit(self, protocol: ProtocolDefinition, *args: Any) -> MessagingFuture[Any]:
        """Submit a ``kv.*`` call that carries this adapter's client id first."""
        return self.client.submit(protocol, self.client_id, *args)

    def call(self, protocol: ProtocolDefinition, *args: Any) -> Any:
        """Call a ``kv.*`` protocol that carries this adapter's client id first."""
        return self.client.call(protocol, self.client_id, *args)

    def track(self, future: MessagingFuture[Any], what: str, request_id: str) -> None:
        """Keep a call nobody waits for until it completes; failures are logged."""
        with self._untracked_lock:
            self._untracked.add(future)

        def done(future: MessagingFuture[Any]) -> None:
            with self._untracked_lock:
                self._untracked.discard(future)
            exc = future.exception()
            if exc is not None:
                logger.warning("%s for request %r failed: %s", what, request_id, exc)

        future.add_done_callback(done)

    def close(self, flush_timeout: float = 2.0) -> None:
        """Wait (briefly) for calls nobody waits for, such as end_session, then close."""
        self._closed.set()
        deadline = time.monotonic() + flush_timeout
        with self._untracked_lock:
            pending = list(self._untracked)
        for future in pending:
            future.wait(max(0.0, deadline - time.monotonic()))
        try:  # the server would release our state after client_timeout anyway
            self.client.call(protocols.GOODBYE, self.client_id, timeout=flush_timeout)
        except Exception as exc:
            logger.debug("goodbye not delivered: %s", exc)
        self.client.close()


def _hashes_for(
    chunk_size: int,
    per_chunk: int,
    token_ids: Sequence[int] | torch.Tensor | None,
    block_hashes: Sequence[bytes | int] | None,
    chunk_hashes: Sequence[bytes] | None = None,
    cache_salt: str | None = None,
) -> list[bytes]:
    given = [token_ids is not None, block_hashes is not None, chunk_hashes is not None]
    if sum(given) != 1:
        raise ValueError("give exactly one of token_ids, block_hashes and chunk_hashes")
    if chunk_hashes is not None:
        hashes = list(chunk_hashes)
        check_hashes(hashes)
        return hashes
    if token_ids is not None:
        return hashes_from_tokens(token_ids, chunk_size, cache_salt)
    if cache_salt:
        raise ValueError("a cache_salt salts token ids; block hashes carry the engine's own")
    assert block_hashes is not None
    return hashes_from_block_hashes(block_hashes, per_chunk)


class SchedulerAdapter:
    """The scheduler's side: how many prompt tokens the server holds, asked without waiting.

    ``maybe_submit_lookup_request`` sends the lookup; ``check_lookup_result`` returns None
    until the answer (and any prefetch it started) is in, then the matched token count, a
    multiple of the server's chunk size. The matched chunks stay pinned on the server for
    the request's workers to retrieve until :meth:`end_session`. Use from one thread.
    """

    def __init__(
        self,
        server_url: str,
        model_name: str,
        world_size: int,
        kv_rank: int,
        block_size: int,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        keepalive_interval: float = 2.0,
    ) -> None:
        self.model_name = model_name
        self.world_size = world_size
        self.kv_rank = kv_rank
        self.block_size = block_size
        self._link = _ServerLink(
            server_url,
            block_size,
            timeout=timeout,
            connect_timeout=connect_timeout,
            keepalive_interval=keepalive_interval,
        )
        self.chunk_size = self._link.chunk_size
        self._blocks_per_chunk = self._link.blocks_per_chunk
        self._lookups: dict[str, _Lookup] = {}

    def num_blocks_per_chunk(self) -> int:
        """KV blocks per chunk: the server's chunk size over the engine's block size."""
        return self._blocks_per_chunk

    def maybe_submit_lookup_request(
        self,
        request_id: str,
        block_hashes: Sequence[bytes | int] | None = None,
        token_ids: Sequence[int] | torch.Tensor | None = None,
        *,
        cache_salt: str | None = None,
        chunk_hashes: Sequence[bytes] | None = None,
    ) -> None:
        """Start a lookup for ``request_id`` unless one is pending or answered already.

        The prompt is given as exactly one of ``token_ids`` (hashed under ``cache_salt``:
        another salt never hits), the engine's ``block_hashes`` or ``chunk_hashes``. A
        lookup that cannot be sent (the server is gone) counts as 0 matched tokens.
        """
        if request_id in self._lookups:
            return
        hashes = _hashes_for(
            self.chunk_size,
            self._blocks_per_chunk,
            token_ids,
            block_hashes,
            chunk_hashes,
            cache_salt,
        )
        keys = KeyBatch(self.model_name, self.world_size, None, b"".join(hashes))
        try:
            future = self._link.submit(protocols.LOOKUP, request_id, keys)
        except KvrpcError as exc:
            logger.warning("lookup for request %r not sent, computing it: %s", request_id, exc)
            self._lookups[request_id] = _Lookup(None, tokens=0)
            return
        self._lookups[request_id] = _Lookup(future, hashes=hashes)

    def free_lookup_locks(
        self,
        request_id: str,
        start: int,
        end: int,
        *,
        token_ids: Sequence[int] | torch.Tensor | None = None,
        cache_salt: str | None = None,
        chunk_hashes: Sequence[bytes] | None = None,
    ) -> None:
        """Release the request's pins on the whole chunks inside tokens ``[start, end)`` now.

        For chunks the engine holds itself (its own prefix cache hit them), so the server may
        evict them before the request ends. A chunk only partly inside is kept. Without a
        prompt given, the lookup's own chunk hashes are used. Does not wait for the reply.
        """
        first = -(-start // self.chunk_size)
        last = end // self.chunk_size
        if last <= first:
            return
        if token_ids is None and chunk_hashes is None:
            lookup = self._lookups.get(request_id)
            if lookup is None or lookup.hashes is None:
                raise KVError(f"no lookup hashes are known for request {request_id!r}")
            chunk_hashes = lookup.hashes
        hashes = _hashes_for(
            self.chunk_size, self._blocks_per_chunk, token_ids, None, chunk_hashes, cache_salt
        )[first:last]
        if not hashes:
            return
        keys = KeyBatch(self.model_name, self.world_size, None, b"".join(hashes))
        try:
            future = self._link.submit(protocols.RELEASE_PINS, request_id, keys)
        except KvrpcError as exc:  # the session's pins go with it, or with this client
            logger.debug("release_pins for %r not sent: %s", request_id, exc)
            return
        self._link.track(future, "release_pins", request_id)

    def check_lookup_result(self, request_id: str) -> int | None:
        """Tokens matched for ``request_id``, or None while the lookup is pending.

        A lookup that failed (server gone, timeout) counts as 0 matched tokens, logged: the
        engine then computes the prompt. Raises :class:`KVError` for an id never submitted.
        """
        lookup = self._lookups.get(request_id)
        if lookup is None:
            raise KVError(f"no lookup was submitted for request {request_id!r}")
        if lookup.tokens is not None:
            return lookup.tokens
        future = lookup.future
        assert future is not None
        if not future.done():
            return None
        try:
            answer = future.result()
        except Exception as exc:
            logger.warning("lookup for request %r failed, computing it: %s", request_id, exc)
            lookup.tokens = 0
            return 0
        if isinstance(answer, str) or answer is None:  # a prefetch job: ask for its count
            if isinstance(answer, str):
                lookup.job = answer
            assert lookup.job is not None
            try:
                lookup.future = self._link.submit(protocols.QUERY_PREFETCH_STATUS, lookup.job)
            except KvrpcError as exc:
                logger.warning("prefetch status for %r not asked: %s", request_id, exc)
                lookup.tokens = 0
                return 0
            return None
        lookup.tokens = int(answer) * self.chunk_size
        return lookup.tokens

    def cleanup_lookup_result(self, request_id: str) -> None:
        """Forget ``request_id``'s lookup here (the server keeps its pins until end_session)."""
        self._lookups.pop(request_id, None)

    def end_session(self, request_id: str) -> None:
        """The request is done: the server releases its pins. Does not wait for the reply."""
        self._lookups.pop(request_id, None)
        try:
            future = self._link.submit(
                protocols.END_SESSION, self.model_name, self.world_size, request_id
            )
        except KvrpcError as exc:  # the server releases them when this client goes silent
            logger.debug("end_session for %r not sent: %s", request_id, exc)
            return
        self._link.track(future, "end_session", request_id)

    def clear(self, timeout: float = 10.0) -> int:
        """Drop every unpinned chunk from the server's memory (``kv.clear``); how many went.

        Waits up to ``timeout`` seconds for the answer; an engine resetting its own prefix
        cache (new weights, say) calls this so that no stale chunk can hit.
        """
        cleared: int = self._link.client.call(protocols.CLEAR, timeout=timeout)
        return cleared

    def close(self) -> None:
        """Close the connection; the server drops this scheduler's pins and jobs at once."""
        self._link.close()

    shutdown = close

    def __enter__(self) -> SchedulerAdapter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(eq=False)
class _Lookup:
    future: MessagingFuture[Any] | None
    job: str | None = None
    tokens: int | None = None
    hashes: list[bytes] | None = None


class PollingSchedulerAdapter(SchedulerAdapter):
    """A :class:`SchedulerAdapter` whose ``check_lookup_result`` waits for the answer.

    It polls every ``poll_interval`` seconds for at most ``lookup_timeout`` seconds; on
    timeout it logs a warning, forgets the request (ending its server session) and returns
    0, so the engine computes the prompt instead of waiting.
    """

    def __init__(
        self,
        server_url: str,
        model_name: str,
        world_size: int,
        kv_rank: int,
        block_size: int,
        *,
        poll_interval: float = 0.005,
        lookup_timeout: float = 5.0,
        **options: Any,
    ) -> None:
        super().__init__(server_url, model_name, world_size, kv_rank, block_size, **options)
        self.poll_interval = poll_interval
        self.lookup_timeout = lookup_timeout

    def check_lookup_result(self, request_id: str) -> int:
        """Tokens matched for ``request_id``, waiting up to ``lookup_timeout`` seconds."""
        deadline = time.monotonic() + self.lookup_timeout
        while True:
            tokens = super().check_lookup_result(request_id)
            if tokens is not None:
                return tokens
            left = deadline - time.monotonic()
            if left <= 0:
                logger.warning(
                    "lookup for request %r took over %g s; computing it instead",
                    request_id,
                    self.lookup_timeout,
                )
                self.end_session(request_id)
                return 0
            # Waiting on the reply itself rather than sleeping: an answer that arrives
            # within the interval is seen at once, not at the next tick.
            future = self._lookups[request_id].future
            assert future is not None
            future.wait(min(self.poll_interval, left))


@dataclass
class WorkerStats:
    """Chunks and bytes a :class:`WorkerAdapter` moved, and the chunks it could not move.

    ``dropped_stores`` counts chunks not stored (the server out of reach, full, or refusing
    them); ``failed_retrieves`` chunks whose blocks became load errors. Counters only grow.
    """

    stored_chunks: int = 0
    stored_bytes: int = 0
    dropped_stores: int = 0
    retrieved_chunks: int = 0
    retrieved_bytes: int = 0
    failed_retrieves: int = 0


class RetrieveProgress:
    """How far one submitted retrieve has got, layer by layer.

    Returned by :meth:`WorkerAdapter.batched_submit_retrieve_requests`. A layer-wise
    ``cuda_ipc`` retrieve (``layerwise=True``) completes layer by layer, and
    :meth:`wait_layer` returns as soon as layer ``l`` of every chunk is in its blocks, which
    is what an engine's per-layer hook (vLLM's ``wait_for_layer_load``) needs. Otherwise
    every layer completes at once, with the whole retrieve. Either way ``False`` means the
    retrieve did not fill every block it was asked to (the blocks are load errors, see
    :meth:`WorkerAdapter.get_block_ids_with_load_errors`) or the wait timed out.
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self._finished = threading.Event()
        self._ok = False
        self._answered = threading.Event()
        self._layer_events: list[CudaEventHandle] = []
        self._partial = False

    def wait_layer(self, layer: int, timeout: float | None = None) -> bool:
        """Block until layer ``layer`` is written (True) or the retrieve failed (False).

        Also False once ``timeout`` seconds pass. Polls the server's event every 20 us (the
        host waits, never a stream: see :mod:`kvrpc.cuda`).
        """
        if not 0 <= layer < max(1, self.num_layers):
            raise ValueError(f"layer {layer} is not in 0..{self.num_layers - 1}")
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._answered.wait(timeout):
            return False
        if self._partial:
            return False
        if self._finished.is_set() or not self._layer_events:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            return self._finished.wait(left) and self._ok
        try:  # opened on first use: a handle seen before is open already (kvrpc.cuda)
            event = self._layer_events[layer].open()
        except Exception as exc:
            logger.warning("cannot open the server's event for layer %d: %s", layer, exc)
            return False
        while not event.query():
            if self._finished.is_set():  # failed meanwhile (the completion timed out)
                return self._ok
            if deadline is not None and time.monotonic() >= deadline:
                return False
            # No back-off: a layer arrives every millisecond or so, and the caller has
            # nothing to do until it does.
            time.sleep(_LAYER_POLL_S)
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the whole retrieve is settled; True if it filled every block."""
        return self._finished.wait(timeout) and self._ok

    def done(self) -> bool:
        """True once the retrieve is settled (filled or failed); never blocks."""
        return self._finished.is_set()

    def _answer(self, layer_events: list[CudaEventHandle], whole: bool) -> None:
        self._layer_events = layer_events
        self._partial = not whole
        self._answered.set()

    def _finish(self, ok: bool) -> None:
        self._ok = ok
        self._finished.set()
        self._answered.set()


class WorkerAdapter:
    """A worker's side: register its KV cache, store and retrieve requests' chunks.

    Submits return at once; :meth:`get_finished` reports which requests' stores and
    retrieves have completed. Thread-safe. The transfer mode follows the KV tensors:

    * CUDA tensors: ``cuda_ipc``. The server maps them by CUDA IPC and its GPU copy engine
      moves the blocks; the ``event`` given to a submit (a ``torch.cuda.Event`` recorded
      after the engine wrote, or last read, the blocks) orders the copy after the engine's
      work without blocking this thread. A retrieve is reported finished once the blocks
      hold the data. ``retrieve_deadline`` (seconds) bounds how long a retrieve may wait
      to start; past it, it fails, but only once no late copy can write the blocks.
    * CPU tensors from :func:`kvrpc.kv.shared_empty`: ``shm`` (the server copies the blocks
      itself); or ``transfer_mode="inline"`` to send the bytes in the messages (any host).
    """

    def __init__(
        self,
        server_url: str,
        model_name: str,
        world_size: int,
        kv_rank: int,
        block_size: int,
        *,
        transfer_mode: TransferMode | None = None,
        retrieve_deadline: float | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        keepalive_interval: float = 2.0,
    ) -> None:
        if not 0 <= kv_rank < world_size:
            raise ValueError(f"kv_rank {kv_rank} is not in 0..{world_size - 1}")
        self.model_name = model_name
        self.world_size = world_size
        self.kv_rank = kv_rank
        self.block_size = block_size
        self.transfer_mode = transfer_mode
        self.retrieve_deadline = retrieve_deadline
        self._link = _ServerLink(
            server_url,
            block_size,
            timeout=timeout,
            connect_timeout=connect_timeout,
            keepalive_interval=keepalive_interval,
        )
        self.chunk_size = self._link.chunk_size
        self._blocks_per_chunk = self._link.blocks_per_chunk
        self._lock = threading.Lock()
        #: Notified (under ``_lock``) whenever a store settles.
        self._settled = threading.Condition(self._lock)
        self._layers: list[torch.Tensor] = []
        self._layout: KVLayout | None = None
        self._registration: KVCacheRegistration | None = None
        self._instance_id: int | None = None
        self._mode: TransferMode = "shm"
        self._events: _EventRing | None = None
        self._stores_in_flight: dict[str, int] = {}
        self._retrieves_in_flight: dict[str, int] = {}
        self._engine_finished: set[str] = set()
        self._finished_retrieves: set[str] = set()
        self._returned: OrderedDict[str, None] = OrderedDict()
        self._failed_blocks: set[int] = set()
        self._registering = False
        self._next_register = 0.0
        self._chunk_nbytes = 0
        self._waiters: concurrent.futures.ThreadPoolExecutor | None = None
        self._timeout = timeout
        #: What this worker moved since it started (read under no lock: a snapshot may be
        #: one transfer behind).
        self.stats = WorkerStats()

    # ------------------------------------------------------------------ registration

    def register_kv_caches(
        self, kv_caches: dict[str, torch.Tensor], kind: LayoutKind | None = None
    ) -> None:
        """Register this worker's KV tensors (one per layer, in layer order) with the server.

        ``kind`` is the tensors' :class:`~kvrpc.kv.layout.LayoutKind`, guessed from their
        shape when not given (4-D layers always need it).

        Raises :class:`NotSharedMemory` for CPU tensors not made by ``shared_empty`` in the
        ``shm`` mode, :class:`KVConfigError` for tensors that do not form one layout or that
        the transfer mode cannot move (a CUDA tensor that is a view into a larger one, say).
        """
        layers = list(kv_caches.values())
        if not layers:
            raise KVConfigError("register_kv_caches needs at least one layer's tensor")
        layout = KVLayout.from_tensors(layers, kind)
        if layout.block_size != self.block_size:
            raise KVConfigError(
                f"the KV tensors hold blocks of {layout.block_size} tokens, but the adapter "
                f"was made with block_size={self.block_size}"
            )
        mode = _mode_for(layers[0].device, self.transfer_mode)
        tensors = [shared_ref(t) for t in layers] if mode == "shm" else []
        wrappers = [CudaIPCWrapper.from_tensor(t) for t in layers] if mode == "cuda_ipc" else []
        registration = KVCacheRegistration(
            model_name=self.model_name,
            world_size=self.world_size,
            worker_id=self.kv_rank,
            block_size=self.block_size,
            mode=mode,
            layout=layout,
            tensors=tensors,
            cuda_tensors=wrappers,
        )
        events = _EventRing(layers[0].device) if mode == "cuda_ipc" else None
        instance_id = self._link.call(protocols.REGISTER_KV_CACHE, registration)
        with self._lock:
            self._layers, self._layout, self._mode = layers, layout, mode
            self._registration, self._instance_id = registration, instance_id
            self._events = events
            self._chunk_nbytes = layout.chunk_nbytes(self._blocks_per_chunk)

    def _instance(self) -> int | None:
        """The instance id to use now, or None while the server does not know this cache.

        Never waits: a server that forgot the cache (restarted, or this worker was silent too
        long) is sent the registration again in the background, at most once a second, and
        transfers meanwhile fail at once (stores dropped, retrieves reported as load errors).
        """
        with self._lock:
            instance_id, registration = self._instance_id, self._registration
            if registration is None:
                raise KVError("register_kv_caches must be called before storing or retrieving")
            if instance_id is not None:
                return instance_id
            now = time.monotonic()
            if self._registering or now < self._next_register:
                return None
            self._registering = True
            self._next_register = now + _REREGISTER_INTERVAL
        try:
            future = self._link.submit(protocols.REGISTER_KV_CACHE, registration)
        except KvrpcError as exc:
            logger.debug("registering again not sent: %s", exc)
            with self._lock:
                self._registering = False
            return None

        def registered(future: MessagingFuture[Any]) -> None:
            exc = future.exception()
            with self._lock:
                self._registering = False
                if exc is None and self._registration is registration:
                    self._instance_id = int(future.result())
            if exc is None:
                logger.info("registered this worker's KV cache with the server again")
            else:
                logger.warning("registering this worker's KV cache again failed: %s", exc)

        future.add_done_callback(registered)
        return None

    # ------------------------------------------------------------------ submits

    def submit_store_request(self, request_id: str, op: LoadStoreOp, event: Any = None) -> None:
        """Store ``op``'s whole chunks; ``event`` (None on CPU) is waited on first."""
        self.batched_submit_store_requests([request_id], [op], event)

    def submit_retrieve_request(
        self, request_id: str, op: LoadStoreOp, event: Any = None, *, layerwise: bool = False
    ) -> RetrieveProgress:
        """Retrieve ``op``'s whole chunks into its blocks; see :meth:`get_finished`."""
        return self.batched_submit_retrieve_requests([request_id], [op], event, layerwise=layerwise)

    def batched_submit_store_requests(
        self, request_ids: Sequence[str], ops: Sequence[LoadStoreOp], event: Any = None
    ) -> None:
        """Store several requests' chunks in one message.

        Bad input (too few block ids; in the inline mode also block ids out of range, which
        this process copies itself) raises here, before anything is counted as in flight, so
        such a request is reported finished at once. In the shm mode the server refuses an
        out-of-range key with a reason and stores the others. While the server is out of
        reach the chunks are dropped (counted in :attr:`stats`), never waited for.
        """
        keys, rows, owners = self._plan(request_ids, ops, retrieve=False)
        with self._lock:
            for request_id in request_ids:
                self._returned.pop(request_id, None)  # a new store: report it again
        if not owners:
            return
        instance_id = self._instance()
        if instance_id is None:
            self._count(stores_dropped=len(owners))
            return
        chunks: list[torch.Tensor] = []
        ready: _Ready | None = None
        if self._mode == "cuda_ipc":
            ready = self._ready_after(event)
        else:
            _wait_for(event)
        if self._mode == "inline":
            assert self._layout is not None
            nbytes = self._layout.chunk_nbytes(self._blocks_per_chunk)
            chunks = [torch.empty(nbytes, dtype=torch.uint8) for _ in owners]
            gather_chunks(self._layers, self._layout, rows, chunks)
            rows = _NO_BLOCKS
        with self._lock:
            _count_in(self._stores_in_flight, request_ids)
        try:
            if ready is not None:
                future = self._link.submit(
                    protocols.STORE_CUDA, instance_id, keys, rows, ready.handle
                )
            else:
                future = self._link.submit(protocols.STORE, instance_id, keys, rows, chunks)
        except KvrpcError as exc:
            logger.warning("store not sent, %d chunks dropped: %s", len(owners), exc)
            self._give_back(ready)
            self._count(stores_dropped=len(owners))
            self._stores_done(request_ids, None)
            return
        except BaseException:
            self._give_back(ready)
            self._stores_done(request_ids, None)
            raise

        def done(future: MessagingFuture[Any]) -> None:
            self._give_back(ready, future)
            self._stores_done(request_ids, future, len(owners))

        future.add_done_callback(done)

    def batched_submit_retrieve_requests(
        self,
        request_ids: Sequence[str],
        ops: Sequence[LoadStoreOp],
        event: Any = None,
        *,
        layerwise: bool = False,
    ) -> RetrieveProgress:
        """Retrieve several requests' chunks in one message; returns its progress.

        With ``layerwise`` (``cuda_ipc`` only; ignored in the other modes, which complete
        all layers at once) the server copies layer 0 of every chunk first, then layer 1,
        and :meth:`RetrieveProgress.wait_layer` tells when each layer is in.

        Bad input raises here, before anything is counted as in flight. While the server is
        out of reach the retrieve fails at once: its blocks are load errors (see
        :meth:`get_block_ids_with_load_errors`) and the requests are finished retrieves.
        """
        keys, rows, owners = self._plan(request_ids, ops, retrieve=True)
        progress = RetrieveProgress(len(self._layers))
        with self._lock:
            _count_in(self._retrieves_in_flight, request_ids)
        if not owners:
            self._retrieves_done(request_ids, [], rows, None, progress)
            return progress
        instance_id = self._instance()
        if instance_id is None:
            self._retrieves_done(request_ids, owners, rows, None, progress)
            return progress
        ready: _Ready | None = None
        if self._mode == "cuda_ipc":
            ready = self._ready_after(event)
        else:
            _wait_for(event)
        try:
            if ready is not None:
                deadline = None if self.retrieve_deadline is None else float(self.retrieve_deadline)
                protocol = protocols.RETRIEVE_CUDA_LAYERS if layerwise else protocols.RETRIEVE_CUDA
                future = self._link.submit(
                    protocol, instance_id, owners, keys, rows, ready.handle, deadline
                )
            else:
                future = self._link.submit(protocols.RETRIEVE, instance_id, owners, keys, rows)
        except KvrpcError as exc:
            logger.warning("retrieve not sent, its blocks will be recomputed: %s", exc)
            self._give_back(ready)
            self._retrieves_done(request_ids, owners, rows, None, progress)
            return progress
        except BaseException:
            self._give_back(ready)
            self._retrieves_done(request_ids, owners, rows, None, progress)
            raise

        def done(future: MessagingFuture[Any]) -> None:
            self._give_back(ready, future)
            if future.exception() is None and isinstance(future.result(), LayerCopyReply):
                # Opening the events and polling the last one must not hold up this
                # client's loop thread (its other replies and keepalives).
                self._layer_waits().submit(
                    self._layers_done, request_ids, owners, rows, future, progress
                )
            else:
                self._retrieves_done(request_ids, owners, rows, future, progress)

        future.add_done_callback(done)
        return progress

    def _layer_waits(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._waiters is None:
                self._waiters = concurrent.futures.ThreadPoolExecutor(2, "kvrpc-layer-wait")
            return self._waiters

    def _layers_done(
        self,
        request_ids: Sequence[str],
        owners: list[str],
        rows: torch.Tensor,
        future: MessagingFuture[Any],
        progress: RetrieveProgress,
    ) -> None:
        """Open a layer-wise reply's events, then settle once the last one completed."""
        reply = future.result()
        handles = reply.layer_events
        # A key that failed at the door (evicted since the lookup, say) leaves its blocks
        # unwritten: no layer of this retrieve is complete, whatever the events say.
        progress._answer(handles, all(error is None for error in reply.errors))
        try:
            last = handles[-1].open() if handles else None
        except Exception as exc:
            logger.warning("cannot open the server's layer events: %s", exc)
            self._retrieves_done(request_ids, owners, rows, None, progress)
            return
        if last is not None and not poll_event(last, self._timeout):
            logger.warning(
                "a layer-wise retrieve did not complete within %g s; its blocks will be recomputed",
                self._timeout,
            )
            self._retrieves_done(request_ids, owners, rows, None, progress)
            return
        self._retrieves_done(request_ids, owners, rows, future, progress)

    def _ready_after(self, event: Any) -> _Ready:
        """An interprocess event recorded after ``event`` (or after the current stream's work)."""
        with self._lock:
            ring = self._events
        assert ring is not None
        return ring.record_after(event)

    def _give_back(self, ready: _Ready | None, future: MessagingFuture[Any] | None = None) -> None:
        # An event whose call got no answer (a timeout, a lost connection) may still be
        # polled by the server: recording it again could let a copy start too early. It is
        # dropped instead of reused.
        if future is not None and future.exception() is not None:
            return
        with self._lock:
            ring = self._events
        if ready is not None and ring is not None:
            ring.give_back(ready)

    def _plan(
        self, request_ids: Sequence[str], ops: Sequence[LoadStoreOp], *, retrieve: bool
    ) -> tuple[KeyBatch, torch.Tensor, list[str]]:
        """The keys, block-id rows and owning request id of every chunk the ops move.

        In a retrieve's rows, the blocks an op skips (``skip_first_n_tokens``) are
        ``SKIP_BLOCK``.
        """
        if len(request_ids) != len(ops):
            raise ValueError(f"{len(request_ids)} request ids but {len(ops)} ops; give one each")
        per_chunk, chunk_size = self._blocks_per_chunk, self.chunk_size
        block_size = self.block_size
        hashes: list[bytes] = []
        block_ids: list[int] = []
        owners: list[str] = []
        for request_id, op in zip(request_ids, ops, strict=True):
            chunk_hashes = _hashes_for(
                chunk_size,
                per_chunk,
                op.token_ids,
                op.block_hashes,
                op.chunk_hashes,
                op.cache_salt,
            )
            first = -(-op.start // chunk_size)
            last = (
                len(chunk_hashes) if op.end == 0 else min(op.end // chunk_size, len(chunk_hashes))
            )
            if last <= first:
                continue
            offset = op.block_offset
            if offset < 0 or offset > first * per_chunk:
                raise ValueError(
                    f"request {request_id!r}: block_offset {offset} is past the first chunk "
                    f"moved, which starts at block {first * per_chunk}"
                )
            if len(op.block_ids) + offset < last * per_chunk:
                raise ValueError(
                    f"request {request_id!r}: {last} chunks need block ids up to block "
                    f"{last * per_chunk}, the op has {len(op.block_ids)} from block {offset}"
                )
            hashes.extend(chunk_hashes[first:last])
            picked = list(op.block_ids[first * per_chunk - offset : last * per_chunk - offset])
            if retrieve and op.skip_first_n_tokens > 0:
                # Blocks that begin before start + skip hold tokens the engine has already.
                held = op.first_written_block(block_size) - first * per_chunk
                picked[: max(0, held)] = [SKIP_BLOCK] * min(max(0, held), len(picked))
            block_ids.extend(picked)
            owners.extend([request_id] * (last - first))
        keys = KeyBatch(self.model_name, self.world_size, self.kv_rank, b"".join(hashes))
        rows = torch.tensor(block_ids, dtype=torch.int64).view(len(owners), per_chunk)
        return keys, rows, owners

    # ------------------------------------------------------------------ completions

    def _stores_done(
        self, request_ids: Sequence[str], future: MessagingFuture[Any] | None, chunks: int = 0
    ) -> None:
        if future is not None:
            reply = self._note_outcome("store", future)
            errors = reply.errors if isinstance(reply, CudaCopyReply) else reply
            if isinstance(errors, list):
                # "already stored" is not a loss: the chunk is there.
                stored = sum(1 for e in errors if e is None or e == "already stored")
                self._count(stores=stored, stores_dropped=len(errors) - stored)
            else:  # the call failed: none of its chunks was stored
                self._count(stores_dropped=chunks)
        with self._lock:
            _count_out(self._stores_in_flight, request_ids)
            self._settled.notify_all()

    def _count(
        self, *, stores: int = 0, stores_dropped: int = 0, retrieves: int = 0, failed: int = 0
    ) -> None:
        nbytes = self._chunk_nbytes
        with self._lock:
            stats = self.stats
            stats.stored_chunks += stores
            stats.stored_bytes += stores * nbytes
            stats.dropped_stores += stores_dropped
            stats.retrieved_chunks += retrieves
            stats.retrieved_bytes += retrieves * nbytes
            stats.failed_retrieves += failed

    def _retrieves_done(
        self,
        request_ids: Sequence[str],
        owners: list[str],
        rows: torch.Tensor,
        future: MessagingFuture[Any] | None,
        progress: RetrieveProgress,
    ) -> None:
        failed: list[int] = []
        if future is not None:
            reply = self._note_outcome("retrieve", future)
            if isinstance(reply, CudaCopyReply):
                # The server replies once its copy completed; waiting on the event it sends
                # keeps the CUDA future's contract (and returns at once).
                future.to_cuda_future().wait()
            errors = (
                reply.errors
                if isinstance(reply, RetrieveReply | CudaCopyReply | LayerCopyReply)
                else [""] * len(owners)
            )
            ok = [i for i, error in enumerate(errors) if error is None]
            failed = [i for i, error in enumerate(errors) if error is not None]
            if self._mode == "inline" and ok and isinstance(reply, RetrieveReply):
                assert self._layout is not None
                try:
                    chunks = [reply.chunks[i] for i in ok]
                    scatter_chunks(self._layers, self._layout, rows[ok], chunks)
                except Exception as exc:  # the blocks' contents are unknown now: all failed
                    logger.warning("writing retrieved chunks into the KV cache failed: %s", exc)
                    failed = list(range(len(owners)))
        elif owners:
            failed = list(range(len(owners)))
        if owners:
            self._count(retrieves=len(owners) - len(failed), failed=len(failed))
        with self._lock:
            for i in failed:
                self._failed_blocks.update(b for b in rows[i].tolist() if b != SKIP_BLOCK)
            self._finished_retrieves.update(_count_out(self._retrieves_in_flight, request_ids))
        progress._finish(not failed)

    def _note_outcome(self, what: str, future: MessagingFuture[Any]) -> Any:
        try:
            reply = future.result()
        except UnknownInstance:
            with self._lock:
                self._instance_id = None  # the next submit registers again
            logger.warning("%s refused: the server no longer knows this worker", what)
            return None
        except Exception as exc:
            logger.warning("%s failed: %s", what, exc)
            return None
        errors = (
            reply.errors
            if isinstance(reply, RetrieveReply | CudaCopyReply | LayerCopyReply)
            else reply
        )
        problems = [e for e in errors if e is not None]
        if problems:
            logger.debug(
                "%s: %d of %d chunks not moved: %s", what, len(problems), len(errors), problems[0]
            )
        return reply

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """``(finished_stores, finished_retrieves)`` since the last call, each id once.

        ``finished_req_ids`` are the requests the engine has finished. Such a request is a
        finished store once it has no store in flight (at once if it never had one); a
        request is a finished retrieve once all its retrieves completed. An id already
        returned is not returned again when the engine reports it again.
        """
        with self._lock:
            self._engine_finished.update(finished_req_ids)
            stores = {
                rid
                for rid in self._engine_finished
                if rid not in self._stores_in_flight and rid not in self._returned
            }
            self._engine_finished.difference_update(stores)
            self._engine_finished.difference_update(self._returned)
            for rid in stores:
                self._returned[rid] = None
            while len(self._returned) > _REMEMBERED_FINISHED:
                self._returned.popitem(last=False)
            retrieves, self._finished_retrieves = self._finished_retrieves, set()
        return stores, retrieves

    def wait_for_stores(self, request_ids: Sequence[str], timeout: float) -> bool:
        """Wait until none of these requests has a store in flight; False on timeout.

        An engine about to reuse a request's blocks (it preempted the request) calls this
        first where the server reads the blocks itself (``cuda_ipc``, ``shm``). In the inline
        mode the bytes were copied at submit, so it returns at once.
        """
        if self._mode == "inline":
            return True
        with self._settled:  # woken by each settled store, not polled: no GIL taken meanwhile
            return self._settled.wait_for(
                lambda: not any(r in self._stores_in_flight for r in request_ids), timeout
            )

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Block ids that retrieves could not fill since the last call (to recompute)."""
        with self._lock:
            failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def shutdown(self) -> None:
        """Unregister the KV cache (best effort) and close the connection."""
        with self._lock:
            instance_id, self._instance_id = self._instance_id, None
            self._registration = None
        if instance_id is not None:
            try:
                self._link.call(protocols.UNREGISTER_KV_CACHE, instance_id)
            except Exception as exc:  # the server drops it anyway when we go silent
                logger.debug("unregister failed: %s", exc)
        self._link.close()
        with self._lock:
            waiters, self._waiters = self._waiters, None
        if waiters is not None:
            waiters.shutdown(wait=True)

    close = shutdown

    def __enter__(self) -> WorkerAdapter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


_NO_BLOCKS = torch.empty(0, dtype=torch.int64)


def _count_in(in_flight: dict[str, int], request_ids: Sequence[str]) -> None:
    """One more operation in flight for each id (an id may appear more than once)."""
    for request_id in request_ids:
        in_flight[request_id] = in_flight.get(request_id, 0) + 1


def _count_out(in_flight: dict[str, int], request_ids: Sequence[str]) -> list[str]:
    """One operation fewer in flight for each id; returns the ids that have none left."""
    settled = []
    for request_id in request_ids:
        left = in_flight.get(request_id, 0) - 1
        if left > 0:
            in_flight[request_id] = left
        else:
            in_flight.pop(request_id, None)
            settled.append(request_id)
    return settled


def _mode_for(device: torch.device, asked: TransferMode | None) -> TransferMode:
    """The transfer mode for KV tensors on ``device``; refuses one that cannot move them."""
    if device.type == "cuda":
        if asked not in (None, "cuda_ipc"):
            raise KVConfigError(
                f"KV tensors on {device} move only in the cuda_ipc transfer mode, not {asked!r}; "
                "leave transfer_mode unset"
            )
        return "cuda_ipc"
    if device.type != "cpu":
        raise KVConfigError(f"KV tensors on {device} are not supported; use CUDA or CPU tensors")
    if asked == "cuda_ipc":
        raise KVConfigError("the cuda_ipc transfer mode needs CUDA tensors; these are on the CPU")
    return asked or "shm"


@dataclass(frozen=True, eq=False)
class _Ready:
    """An interprocess event of this worker and its handle, for one submit at a time."""

    event: Any
    handle: CudaEventHandle


class _EventRing:
    """The interprocess events a cuda_ipc worker tells the server to wait for.

    An event goes back to the ring when its call's reply arrives: by then the server has
    seen it complete, so recording it again cannot change what that call waited for.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._free: list[_Ready] = []
        self._lock = threading.Lock()
        self._side: Any = None

    def record_after(self, after: Any) -> _Ready:
        """Take an event and record it after ``after`` (an event), or on the current stream."""
        cuda = cast(Any, torch.cuda)
        with self._lock:
            ready = self._free.pop() if self._free else None
            if after is not None and self._side is None:
                self._side = cuda.Stream(self.device)
        if ready is None:
            ready = _Ready(*new_ipc_event(self.device))
        if after is None:
            ready.event.record(cuda.current_stream(self.device))
        else:
            # Recorded on a side stream that waits for the engine's event, so the engine's
            # own streams are left as they were.
            self._side.wait_event(after)
            ready.event.record(self._side)
        return ready

    def give_back(self, ready: _Ready) -> None:
        """Return an event whose call has been answered."""
        with self._lock:
            self._free.append(ready)


def _wait_for(event: Any) -> None:
    # On CPU the engine passes None; a GPU event means "the KV is written once this fires".
    if event is not None:
        event.synchronize()
