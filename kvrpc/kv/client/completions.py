"""What a worker does with its calls' replies: count them, write retrieved bytes, settle.

A reply arrives on the :class:`~kvrpc.client.SyncClient`'s event-loop thread, which also
carries the adapter's other replies and its keepalives, so nothing slow may run there:

* a ``cuda_ipc`` reply comes once the server's copy is enqueued and carries the event
  recorded after it; the request settles when that event completes, which the adapter's
  :class:`~kvrpc.kv.client.watcher.EventWatcher` polls for on its own thread;
* an inline retrieve's bytes are written into the KV tensors on the adapter's completion
  threads;
* any other reply (shm, or a CUDA one that copied nothing) needs only counting, done where
  it arrives or on those threads.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from kvrpc.errors import UnknownInstance
from kvrpc.futures import MessagingFuture
from kvrpc.kv.client.ledger import RequestLedger
from kvrpc.kv.client.progress import RetrieveProgress
from kvrpc.kv.client.watcher import EventWatcher
from kvrpc.kv.layout import KVLayout, scatter_chunks
from kvrpc.kv.outcomes import KeyOutcomes, KeyStatus
from kvrpc.kv.protocols import CudaCopyReply, LayerCopyReply, RetrieveReply
from kvrpc.kv.stamps import StampedEvent, open_stamps

__all__ = ["Completions", "InlineTarget"]

logger = logging.getLogger("kvrpc.kv")

#: Threads writing one worker's inline retrieves into its KV tensors.
_COMPLETION_THREADS = 2
#: Seconds a shutdown waits for copies still in flight (a 2 GiB one takes ~40 ms): bounded,
#: since a server that died mid-copy leaves its event pending for ever.
_SHUTDOWN_WAIT = 5.0


class InlineTarget(NamedTuple):
    """The KV tensors an inline retrieve writes its reply's bytes into, and their layout."""

    layers: list[torch.Tensor]
    layout: KVLayout


class Completions:
    """Settles a worker's stores and retrieves as their replies arrive (or fail to).

    ``forgotten`` is called when the server no longer knows the worker's KV cache, so that
    the next submit registers it again; ``timeout`` bounds each wait for a server's event.
    Owns its completion threads and its event watcher (``events``, by default one for CUDA
    events; each started on first use): :meth:`shutdown` ends them.
    """

    def __init__(
        self,
        ledger: RequestLedger,
        timeout: float,
        forgotten: Callable[[], None],
        events: EventWatcher | None = None,
    ) -> None:
        self._ledger = ledger
        self._timeout = timeout
        self._forgotten = forgotten
        self._lock = threading.Lock()
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._events = EventWatcher() if events is None else events
        self._closed = False

    # ------------------------------------------------------------------ stores

    def store_answered(
        self, request_ids: Sequence[str], future: MessagingFuture[Any] | None, chunks: int = 0
    ) -> None:
        """Count a store's outcome (None: it was never sent) and settle its requests.

        Runs where the reply arrives, the loop thread included, and does no wait there: a
        ``cuda_ipc`` store settles once the server's event completes (the engine may reuse
        the blocks only then), which the watcher notices; any other store settles at once.
        """
        reply = None if future is None else self._note_outcome("store", future)
        if isinstance(reply, CudaCopyReply) and reply.cuda_event is not None:
            settle = functools.partial(self._store_copied, request_ids, reply.statuses, chunks)
            self._events.watch(reply.cuda_event, self._timeout, settle)
            return
        if future is not None:
            self._count_store(reply.statuses if isinstance(reply, KeyOutcomes) else None, chunks)
        self._ledger.stores_settled(request_ids)

    def _store_copied(
        self, request_ids: Sequence[str], statuses: list[KeyStatus], chunks: int, ok: bool
    ) -> None:
        if not ok:
            logger.warning(
                "a store's copy did not complete within %g s; its chunks count as dropped",
                self._timeout,
            )
        try:
            self._count_store(statuses if ok else None, chunks)
        finally:  # whatever happened, the engine must not wait for this store for ever
            self._ledger.stores_settled(request_ids)

    def _count_store(self, statuses: list[KeyStatus] | None, chunks: int) -> None:
        if statuses is not None:
            # ALREADY_STORED is not a loss: the chunk is there.
            stored = sum(1 for status in statuses if status.held)
            self._ledger.count(stores=stored, stores_dropped=len(statuses) - stored)
        else:  # the call failed: none of its chunks was stored
            self._ledger.count(stores_dropped=chunks)

    # ------------------------------------------------------------------ retrieves

    def retrieve_answered(
        self,
        request_ids: Sequence[str],
        owners: list[str],
        rows: torch.Tensor,
        future: MessagingFuture[Any],
        progress: RetrieveProgress,
        inline: InlineTarget | None,
    ) -> None:
        """A retrieve's reply arrived (or its call failed): settle it once its copy is done.

        Called from the future's done-callback, on the client's loop thread: a ``cuda_ipc``
        reply goes to the event watcher, anything else to a completion thread, so that the
        loop stays free for this worker's other replies.
        """
        reply = future.result() if future.exception() is None else None
        if isinstance(reply, LayerCopyReply):
            self._layers_answered(request_ids, owners, rows, future, progress, reply)
            return
        if isinstance(reply, CudaCopyReply) and reply.cuda_event is not None:
            settle = functools.partial(
                self._retrieve_copied, request_ids, owners, rows, future, progress
            )
            self._events.watch(reply.cuda_event, self._timeout, settle)
            return
        work = (request_ids, owners, rows, future, progress, inline)
        with self._lock:
            if not self._closed:
                if self._threads is None:
                    self._threads = concurrent.futures.ThreadPoolExecutor(
                        _COMPLETION_THREADS, "kvrpc-kv-complete"
                    )
                self._threads.submit(self._complete, *work)
                return
        # Shut down: the client is closed and its loop thread gone, so this is a thread
        # of the engine's (a submit racing shutdown) and the work may run right here.
        self._complete(*work)

    def _complete(
        self,
        request_ids: Sequence[str],
        owners: list[str],
        rows: torch.Tensor,
        future: MessagingFuture[Any] | None,
        progress: RetrieveProgress,
        inline: InlineTarget | None,
    ) -> None:
        try:
            self.retrieve_settled(request_ids, owners, rows, future, progress, inline)
        except Exception:
            # A bug here must not leave the engine waiting forever for this retrieve.
            logger.exception("settling a retrieve failed; its blocks will be recomputed")
            if not progress.done():
                self.retrieve_settled(request_ids, owners, rows, None, progress)

    def _layers_answered(
        self,
        request_ids: Sequence[str],
        owners: list[str],
        rows: torch.Tensor,
        future: MessagingFuture[Any],
        progress: RetrieveProgress,
        reply: LayerCopyReply,
    ) -> None:
        """Hand a layer-wise reply's events to the progress; settle once the last completed.

        The reply may come before the server has recorded its events: each layer is polled
        through its stamp first (:class:`~kvrpc.kv.stamps.StampedEvent`).
        """
        handles = reply.layer_events
        gates = _layer_gates(reply)
        # A key that failed at the door (evicted since the lookup, say) leaves its blocks
        # unwritten: no layer of this retrieve is complete, whatever the events say.
        progress._answer(gates, not reply.failed())
        if not handles:
            self.retrieve_settled(request_ids, owners, rows, future, progress)
            return
        settle = functools.partial(
            self._retrieve_copied, request_ids, owners, rows, future, progress
        )
        self._events.watch_event(gates[-1], self._timeout, settle)

    def _retrieve_copied(
        self,
        request_ids: Sequence[str],
        owners: list[str],
        rows: torch.Tensor,
        future: MessagingFuture[Any],
        progress: RetrieveProgress,
        ok: bool,
    ) -> None:
        if not ok:
            logger.warning(
                "a retrieve's copy did not complete within %g s; its blocks will be recomputed",
                self._timeout,
            )
        self._complete(request_ids, owners, rows, future if ok else None, progress, None)

    def retrieve_settled(
        self,
        request_ids: Sequence[str],
        owners: list[str],
        rows: torch.Tensor,
        future: MessagingFuture[Any] | None,
        progress: RetrieveProgress,
        inline: InlineTarget | None = None,
    ) -> None:
        """Count a retrieve's outcome (None: no usable reply) and settle its requests.

        A chunk the reply does not report as moved, or every chunk when there is no reply or
        writing an inline reply's bytes fails, leaves its blocks as load errors. A
        ``cuda_ipc`` reply's event has completed by now (see :meth:`retrieve_answered`).
        """
        failed: list[int] = []
        if future is not None:
            reply = self._note_outcome("retrieve", future)
            if isinstance(reply, KeyOutcomes):
                ok, failed = reply.ok(), reply.failed()
            else:
                ok, failed = [], list(range(len(owners)))
            if inline is not None and ok and isinstance(reply, RetrieveReply):
                try:
                    chunks = [reply.chunks[i] for i in ok]
                    scatter_chunks(inline.layers, inline.layout, rows[ok], chunks)
                except Exception as exc:  # the blocks' contents are unknown now: all failed
                    logger.warning("writing retrieved chunks into the KV cache failed: %s", exc)
                    failed = list(range(len(owners)))
        elif owners:
            failed = list(range(len(owners)))
        if owners:
            self._ledger.count(retrieves=len(owners) - len(failed), failed=len(failed))
        with progress._settling() as records:
            # Given up on (see RetrieveProgress.give_up): its caller reported every block.
            failed_rows = (rows[i].tolist() for i in failed) if records else ()
            self._ledger.retrieves_settled(request_ids, failed_rows)
            progress._finish(not failed)

    def _note_outcome(self, what: str, future: MessagingFuture[Any]) -> Any:
        try:
            reply = future.result()
        except UnknownInstance:
            self._forgotten()  # the next submit registers again
            logger.warning("%s refused: the server no longer knows this worker", what)
            return None
        except Exception as exc:
            logger.warning("%s failed: %s", what, exc)
            return None
        if isinstance(reply, KeyOutcomes) and reply.detail:
            logger.debug(
                "%s: %d of %d chunks not moved: %s",
                what,
                len(reply.failed()),
                len(reply.statuses),
                reply.detail,
            )
        return reply

    def shutdown(self) -> None:
        """Finish the completion work handed over so far and end the completion threads.

        Call once no reply can arrive (the client closed); work handed over later runs on
        the caller's thread. Copies still pending get up to ``timeout`` seconds (at most
        :data:`_SHUTDOWN_WAIT`) to complete; past it their requests settle as failed.
        """
        with self._lock:
            self._closed = True
            threads, self._threads = self._threads, None
        if threads is not None:
            threads.shutdown(wait=True)
        self._events.close(min(self._timeout, _SHUTDOWN_WAIT))


class _Unreadable:
    """The gate of a reply whose stamps cannot be mapped: never known to be recorded."""

    def query(self) -> bool:
        return False


def _layer_gates(reply: LayerCopyReply) -> list[Any]:
    """What to poll for each layer of a layer-wise reply (see :mod:`kvrpc.kv.stamps`).

    Stamps that cannot be mapped (a server of another user, a ``/dev/shm`` not shared with
    it) leave no way to tell a recorded event from an old one: every layer then stays
    pending, so the layer waits fail and the retrieve settles as failed only after the
    client timeout, by when any copy the server still made is long over.
    """
    handles = reply.layer_events
    if reply.stamps is None:
        return [StampedEvent(handle.open) for handle in handles]
    try:
        stamps = open_stamps(reply.stamps)
    except Exception as exc:
        logger.warning(
            "cannot map the server's layer stamps (%s): layer-wise retrieves will fail and be "
            "recomputed; run the server as the workers' user, sharing their /dev/shm",
            exc,
        )
        return [_Unreadable() for _ in handles]
    first = reply.first_turn
    return [
        StampedEvent(handle.open, stamps, first + layer) for layer, handle in enumerate(handles)
    ]
