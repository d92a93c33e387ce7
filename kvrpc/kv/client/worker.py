"""The worker's adapter: register its KV cache, store and retrieve requests' chunks.

It sits on a :class:`~kvrpc.client.SyncClient` (its own event-loop thread), so an engine's
worker calls it from plain threads and never waits on the network: submits return at once,
and :meth:`WorkerAdapter.get_finished` reports what has completed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from kvrpc.errors import KVConfigError, KVError, KvrpcError
from kvrpc.futures import MessagingFuture
from kvrpc.kv import protocols
from kvrpc.kv.client.completions import Completions, InlineTarget
from kvrpc.kv.client.events import EventRing, Ready, wait_for
from kvrpc.kv.client.hosts import server_for_rank, server_urls
from kvrpc.kv.client.ledger import RequestLedger
from kvrpc.kv.client.link import ServerLink
from kvrpc.kv.client.ops import (
    NO_BLOCKS,
    ChunkPlan,
    LoadStoreOp,
    check_engine_id,
    plan_chunks,
    scoped_request_id,
)
from kvrpc.kv.client.progress import RetrieveProgress
from kvrpc.kv.cuda_ipc import CudaIPCWrapper
from kvrpc.kv.layout import KVLayout, LayoutKind, gather_chunks
from kvrpc.kv.protocols import (
    KVCacheRegistration,
    TransferMode,
)
from kvrpc.kv.shm import shared_ref

__all__ = ["WorkerAdapter"]

logger = logging.getLogger("kvrpc.kv")

#: Seconds between attempts to register a KV cache again with a server that forgot it.
_REREGISTER_INTERVAL = 1.0
#: Ready events a cuda_ipc worker makes at registration, for the server to open then: a
#: store and a retrieve in flight at once each hold one.
_READY_EVENTS = 2


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

    ``server_url`` is one URL, or one per host of an engine that spans hosts, in host order:
    then this worker talks to ``server_for_rank(urls, kv_rank, world_size)`` (see
    :mod:`~kvrpc.kv.client.hosts`: ranks in contiguous blocks per host); an engine that
    places ranks otherwise picks the URL itself. ``engine_id`` must be its scheduler's
    (see :class:`~kvrpc.kv.client.scheduler.SchedulerAdapter`): a retrieve names its
    requests' sessions by it, and releases their pins as it copies. The registration
    carries it too, so that the server releases only the pins of this engine's sessions.
    """

    def __init__(
        self,
        server_url: str | Sequence[str],
        model_name: str,
        world_size: int,
        kv_rank: int,
        block_size: int,
        *,
        transfer_mode: TransferMode | None = None,
        retrieve_deadline: float | None = None,
        engine_id: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        keepalive_interval: float = 2.0,
        auth_token_file: str | None = None,
    ) -> None:
        if not 0 <= kv_rank < world_size:
            raise ValueError(f"kv_rank {kv_rank} is not in 0..{world_size - 1}")
        self.model_name = model_name
        self.world_size = world_size
        self.kv_rank = kv_rank
        self.block_size = block_size
        self.transfer_mode = transfer_mode
        self.retrieve_deadline = retrieve_deadline
        self.engine_id = check_engine_id(engine_id)
        self._link = ServerLink(
            server_for_rank(server_urls(server_url), kv_rank, world_size),
            block_size,
            timeout=timeout,
            connect_timeout=connect_timeout,
            keepalive_interval=keepalive_interval,
            auth_token_file=auth_token_file,
        )
        self.chunk_size = self._link.chunk_size
        self._blocks_per_chunk = self._link.blocks_per_chunk
        self._lock = threading.Lock()
        self._layers: list[torch.Tensor] = []
        self._layout: KVLayout | None = None
        self._registration: KVCacheRegistration | None = None
        self._instance_id: int | None = None
        self._mode: TransferMode = "shm"
        self._events: EventRing | None = None
        self._ledger = RequestLedger()
        self._registering = False
        self._next_register = 0.0
        self._completions = Completions(self._ledger, timeout, self._forget_instance)
        #: What this worker moved since it started (read under no lock: a snapshot may be
        #: one transfer behind).
        self.stats = self._ledger.stats

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
        events = EventRing(layers[0].device, _READY_EVENTS) if mode == "cuda_ipc" else None
        registration = KVCacheRegistration(
            model_name=self.model_name,
            world_size=self.world_size,
            worker_id=self.kv_rank,
            block_size=self.block_size,
            mode=mode,
            layout=layout,
            tensors=tensors,
            cuda_tensors=wrappers,
            ready_events=[] if events is None else events.handles(),
            engine_id=self.engine_id,
        )
        instance_id = self._link.call(protocols.REGISTER_KV_CACHE, registration)
        with self._lock:
            self._layers, self._layout, self._mode = layers, layout, mode
            self._registration, self._instance_id = registration, instance_id
            self._events = events
            self._ledger.chunk_nbytes = layout.chunk_nbytes(self._blocks_per_chunk)

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
        self._ledger.storing_again(request_ids)
        if not owners:
            return
        instance_id = self._instance()
        if instance_id is None:
            self._ledger.count(stores_dropped=len(owners))
            return
        chunks: list[torch.Tensor] = []
        ready: Ready | None = None
        if self._mode == "cuda_ipc":
            ready = self._ready_after(event)
        else:
            wait_for(event)
        if self._mode == "inline":
            assert self._layout is not None
            nbytes = self._layout.chunk_nbytes(self._blocks_per_chunk)
            chunks = [torch.empty(nbytes, dtype=torch.uint8) for _ in owners]
            gather_chunks(self._layers, self._layout, rows, chunks)
            rows = NO_BLOCKS
        self._ledger.stores_sent(request_ids)
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
            self._ledger.count(stores_dropped=len(owners))
            self._completions.store_answered(request_ids, None)
            return
        except BaseException:
            self._give_back(ready)
            self._completions.store_answered(request_ids, None)
            raise

        def done(future: MessagingFuture[Any]) -> None:
            self._give_back(ready, future)
            self._completions.store_answered(request_ids, future, len(owners))

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
        self._ledger.retrieves_sent(request_ids)
        if not owners:
            self._completions.retrieve_settled(request_ids, [], rows, None, progress)
            return progress
        instance_id = self._instance()
        if instance_id is None:
            self._completions.retrieve_settled(request_ids, owners, rows, None, progress)
            return progress
        ready: Ready | None = None
        if self._mode == "cuda_ipc":
            ready = self._ready_after(event)
        else:
            wait_for(event)
        engine_id = self.engine_id
        # The server's names for the chunks' sessions; the ledger keeps the engine's own.
        wire_owners = (
            owners if engine_id is None else [scoped_request_id(engine_id, o) for o in owners]
        )
        try:
            if ready is not None:
                deadline = None if self.retrieve_deadline is None else float(self.retrieve_deadline)
                protocol = protocols.RETRIEVE_CUDA_LAYERS if layerwise else protocols.RETRIEVE_CUDA
                future = self._link.submit(
                    protocol, instance_id, wire_owners, keys, rows, ready.handle, deadline
                )
            else:
                future = self._link.submit(protocols.RETRIEVE, instance_id, wire_owners, keys, rows)
        except KvrpcError as exc:
            logger.warning("retrieve not sent, its blocks will be recomputed: %s", exc)
            self._give_back(ready)
            self._completions.retrieve_settled(request_ids, owners, rows, None, progress)
            return progress
        except BaseException:
            self._give_back(ready)
            self._completions.retrieve_settled(request_ids, owners, rows, None, progress)
            raise

        inline = self._inline_target()

        # Runs on the client's loop thread: returning the event and handing the reply to
        # the completion threads is all it does (see completions).
        def done(future: MessagingFuture[Any]) -> None:
            self._give_back(ready, future)
            self._completions.retrieve_answered(request_ids, owners, rows, future, progress, inline)

        future.add_done_callback(done)
        return progress

    def _forget_instance(self) -> None:
        """The server no longer knows this cache: the next submit registers it again."""
        with self._lock:
            self._instance_id = None

    def _inline_target(self) -> InlineTarget | None:
        """Where an inline retrieve's reply bytes go; None in the modes the server copies in."""
        with self._lock:
            if self._mode != "inline" or self._layout is None:
                return None
            return InlineTarget(self._layers, self._layout)

    def _ready_after(self, event: Any) -> Ready:
        """An interprocess event recorded after ``event`` (or after the current stream's work)."""
        with self._lock:
            ring = self._events
        assert ring is not None
        return ring.record_after(event)

    def _give_back(self, ready: Ready | None, future: MessagingFuture[Any] | None = None) -> None:
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
    ) -> ChunkPlan:
        """The keys, block-id rows and owners of every chunk the ops move (see ops)."""
        return plan_chunks(
            request_ids,
            ops,
            model_name=self.model_name,
            world_size=self.world_size,
            kv_rank=self.kv_rank,
            chunk_size=self.chunk_size,
            block_size=self.block_size,
            per_chunk=self._blocks_per_chunk,
            retrieve=retrieve,
        )

    # ------------------------------------------------------------------ results

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """``(finished_stores, finished_retrieves)`` since the last call, each id once.

        ``finished_req_ids`` are the requests the engine has finished. Such a request is a
        finished store once it has no store in flight (at once if it never had one); a
        request is a finished retrieve once all its retrieves completed. An id already
        returned is not returned again when the engine reports it again.
        """
        return self._ledger.finished(finished_req_ids)

    def wait_for_stores(self, request_ids: Sequence[str], timeout: float) -> bool:
        """Wait until none of these requests has a store in flight; False on timeout.

        An engine about to reuse a request's blocks (it preempted the request) calls this
        first where the server reads the blocks itself (``cuda_ipc``, ``shm``). In the inline
        mode the bytes were copied at submit, so it returns at once.
        """
        if self._mode == "inline":
            return True
        return self._ledger.wait_for_stores(request_ids, timeout)

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Block ids that retrieves could not fill since the last call (to recompute)."""
        return self._ledger.take_load_errors()

    def shutdown(self) -> None:
        """Unregister the KV cache (best effort), close the connection, end its threads.

        Retrieves answered before the connection closed are settled first.
        """
        with self._lock:
            instance_id, self._instance_id = self._instance_id, None
            self._registration = None
        if instance_id is not None:
            try:
                self._link.call(protocols.UNREGISTER_KV_CACHE, instance_id)
            except Exception as exc:  # the server drops it anyway when we go silent
                logger.debug("unregister failed: %s", exc)
        self._link.close()
        self._completions.shutdown()  # no reply can arrive now: the client is closed

    close = shutdown

    def __enter__(self) -> WorkerAdapter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


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
