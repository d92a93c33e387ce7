"""What a worker does with its calls' replies: count them, write retrieved bytes, settle.

A reply arrives on the :class:`~kvrpc.client.SyncClient`'s event-loop thread, which also
carries the adapter's other replies and its keepalives, so nothing slow may run there. A
retrieve's completion work (writing an inline reply's bytes into the KV tensors, waiting on
the server's CUDA events) runs on the adapter's own completion threads: the loop thread
only hands the reply over. A store's reply needs only counting, done where it arrives.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from kvrpc.cuda import poll_event
from kvrpc.errors import UnknownInstance
from kvrpc.futures import MessagingFuture
from kvrpc.kv.client.ledger import RequestLedger
from kvrpc.kv.client.progress import RetrieveProgress
from kvrpc.kv.layout import KVLayout, scatter_chunks
from kvrpc.kv.protocols import CudaCopyReply, LayerCopyReply, RetrieveReply

__all__ = ["Completions", "InlineTarget"]

logger = logging.getLogger("kvrpc.kv")

#: Threads settling one worker's retrieves: two, so that one layer-wise retrieve polling its
#: last event does not hold up the next one's completion.
_COMPLETION_THREADS = 2


class InlineTarget(NamedTuple):
    """The KV tensors an inline retrieve writes its reply's bytes into, and their layout."""

    layers: list[torch.Tensor]
    layout: KVLayout


class Completions:
    """Settles a worker's stores and retrieves as their replies arrive (or fail to).

    ``forgotten`` is called when the server no longer knows the worker's KV cache, so that
    the next submit registers it again; ``timeout`` bounds each wait for a server's event.
    Owns its completion threads (started on first use): :meth:`shutdown` ends them.
    """

    def __init__(
        self, ledger: RequestLedger, timeout: float, forgotten: Callable[[], None]
    ) -> None:
        self._ledger = ledger
        self._timeout = timeout
        self._forgotten = forgotten
        self._lock = threading.Lock()
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False

    # ------------------------------------------------------------------ stores

    def store_answered(
        self, request_ids: Sequence[str], future: MessagingFuture[Any] | None, chunks: int = 0
    ) -> None:
        """Count a store's outcome (None: it was never sent) and settle its requests.

        Runs where the reply arrives, the loop thread included: it only counts (no copy, no
        wait), and queued behind retrieve work it would hold up ``wait_for_stores``, which
        an engine calls before it reuses blocks.
        """
        if future is not None:
            reply = self._note_outcome("store", future)
            errors = reply.errors if isinstance(reply, CudaCopyReply) else reply
            if isinstance(errors, list):
                # "already stored" is not a loss: the chunk is there.
                stored = sum(1 for e in errors if e is None or e == "already stored")
                self._ledger.count(stores=stored, stores_dropped=len(errors) - stored)
            else:  # the call failed: none of its chunks was stored
                self._ledger.count(stores_dropped=chunks)
        self._ledger.stores_settled(request_ids)

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
        """A retrieve's reply arrived (or its call failed): settle it on a completion thread.

        Called from the future's done-callback, on the client's loop thread: it only hands
        the work over, so that the loop stays free for this worker's other replies.
        """
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
        future: MessagingFuture[Any],
        progress: RetrieveProgress,
        inline: InlineTarget | None,
    ) -> None:
        try:
            if future.exception() is None and isinstance(future.result(), LayerCopyReply):
                self._layers_done(request_ids, owners, rows, future, progress)
            else:
                self.retrieve_settled(request_ids, owners, rows, future, progress, inline)
        except Exception:
            # A bug here must not leave the engine waiting forever for this retrieve.
            logger.exception("settling a retrieve failed; its blocks will be recomputed")
            if not progress.done():
                self.retrieve_settled(request_ids, owners, rows, None, progress)

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
            self.retrieve_settled(request_ids, owners, rows, None, progress)
            return
        if last is not None and not poll_event(last, self._timeout):
            logger.warning(
                "a layer-wise retrieve did not complete within %g s; its blocks will be recomputed",
                self._timeout,
            )
            self.retrieve_settled(request_ids, owners, rows, None, progress)
            return
        self.retrieve_settled(request_ids, owners, rows, future, progress)

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
        writing an inline reply's bytes fails, leaves its blocks as load errors.
        """
        failed: list[int] = []
        if future is not None:
            reply = self._note_outcome("retrieve", future)
            if isinstance(reply, CudaCopyReply) and not future.to_cuda_future().wait(self._timeout):
                # The server replies once its copy completed, so the event it sends has
                # completed and this returns at once; waiting on it keeps the CUDA future's
                # contract. Bounded, polled on this thread: a peer's event may never complete.
                logger.warning(
                    "a retrieve's copy did not complete within %g s; its blocks will be recomputed",
                    self._timeout,
                )
                reply = None
            errors = (
                reply.errors
                if isinstance(reply, RetrieveReply | CudaCopyReply | LayerCopyReply)
                else [""] * len(owners)
            )
            ok = [i for i, error in enumerate(errors) if error is None]
            failed = [i for i, error in enumerate(errors) if error is not None]
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
        self._ledger.retrieves_settled(request_ids, (rows[i].tolist() for i in failed))
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

    def shutdown(self) -> None:
        """Finish the completion work handed over so far and end the completion threads.

        Call once no reply can arrive (the client closed); work handed over later runs on
        the caller's thread.
        """
        with self._lock:
            self._closed = True
            threads, self._threads = self._threads, None
        if threads is not None:
            threads.shutdown(wait=True)
