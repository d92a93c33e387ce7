"""A worker's bookkeeping: which requests have transfers in flight, which have finished.

:class:`RequestLedger` is what :meth:`WorkerAdapter.get_finished
<kvrpc.kv.client.worker.WorkerAdapter.get_finished>`, ``wait_for_stores`` and
``get_block_ids_with_load_errors`` read, and what the adapter's submits and completions
write; :class:`WorkerStats` its counters. It holds no tensors and sends nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvrpc.kv.layout import SKIP_BLOCK

__all__ = ["RequestLedger", "WorkerStats"]

#: Request ids returned by ``get_finished`` that are remembered, to never return one twice.
_REMEMBERED_FINISHED = 65536


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


class RequestLedger:
    """Stores and retrieves in flight per request, finished requests, load errors, counters.

    Thread-safe: submits write it from the engine's threads, retrieve completions from the
    adapter's completion threads, store replies from the client's loop thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Notified (under ``_lock``) whenever a store settles.
        self._settled = threading.Condition(self._lock)
        self._stores_in_flight: dict[str, int] = {}
        self._retrieves_in_flight: dict[str, int] = {}
        self._engine_finished: set[str] = set()
        self._finished_retrieves: set[str] = set()
        self._returned: OrderedDict[str, None] = OrderedDict()
        self._failed_blocks: set[int] = set()
        #: Bytes of one chunk, set at registration: what each counted chunk adds to the bytes.
        self.chunk_nbytes = 0
        #: What the worker moved since it started (read under no lock: a snapshot may be one
        #: transfer behind).
        self.stats = WorkerStats()

    # ------------------------------------------------------------------ stores

    def storing_again(self, request_ids: Sequence[str]) -> None:
        """A new store for these requests: report them finished again once it settles."""
        with self._lock:
            for request_id in request_ids:
                self._returned.pop(request_id, None)

    def stores_sent(self, request_ids: Sequence[str]) -> None:
        """One more store in flight for each id (an id may appear more than once)."""
        with self._lock:
            _count_in(self._stores_in_flight, request_ids)

    def stores_settled(self, request_ids: Sequence[str]) -> None:
        """The store sent for these ids has its answer (or never went)."""
        with self._lock:
            _count_out(self._stores_in_flight, request_ids)
            self._settled.notify_all()

    def wait_for_stores(self, request_ids: Sequence[str], timeout: float) -> bool:
        """Wait until none of these requests has a store in flight; False on timeout."""
        with self._settled:  # woken by each settled store, not polled: no GIL taken meanwhile
            return self._settled.wait_for(
                lambda: not any(r in self._stores_in_flight for r in request_ids), timeout
            )

    # ------------------------------------------------------------------ retrieves

    def retrieves_sent(self, request_ids: Sequence[str]) -> None:
        """One more retrieve in flight for each id (an id may appear more than once)."""
        with self._lock:
            _count_in(self._retrieves_in_flight, request_ids)

    def retrieves_settled(
        self, request_ids: Sequence[str], failed_rows: Iterable[Sequence[int]]
    ) -> None:
        """The retrieve for these ids settled; the blocks of ``failed_rows`` are load errors.

        A request with no retrieve left in flight becomes a finished retrieve.
        """
        with self._lock:
            for row in failed_rows:
                self._failed_blocks.update(b for b in row if b != SKIP_BLOCK)
            self._finished_retrieves.update(_count_out(self._retrieves_in_flight, request_ids))

    def take_load_errors(self) -> set[int]:
        """Block ids that retrieves could not fill since the last call."""
        with self._lock:
            failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    # ------------------------------------------------------------------ both

    def count(
        self, *, stores: int = 0, stores_dropped: int = 0, retrieves: int = 0, failed: int = 0
    ) -> None:
        """Add chunks stored, not stored, retrieved and not retrieved to :attr:`stats`."""
        nbytes = self.chunk_nbytes
        with self._lock:
            stats = self.stats
            stats.stored_chunks += stores
            stats.stored_bytes += stores * nbytes
            stats.dropped_stores += stores_dropped
            stats.retrieved_chunks += retrieves
            stats.retrieved_bytes += retrieves * nbytes
            stats.failed_retrieves += failed

    def finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
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
