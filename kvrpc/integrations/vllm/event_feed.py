"""The connector's subscriptions to ``kv.events``: a thread per server, one bounded queue.

vLLM's scheduler thread must never wait on the network, so each server gets a thread of
its own that holds one ``kv.events`` stream (on a client of its own, apart from the
lookups' connection, so that a burst of events never delays a lookup) and puts what it
reads into a queue the scheduler thread drains without waiting (:meth:`EventFeed.take`).

Every subscription asks for a snapshot first, and the thread puts ``(server, None)`` into
the queue before it, so that the reader knows what follows is a snapshot (see
:class:`~kvrpc.integrations.vllm.block_events.BlockEvents`). The thread subscribes again,
with a snapshot, after a gap event (the server dropped events this subscriber did not read
in time), after the stream breaks (the server died or restarted: the client reconnects
when the stream is opened again) and after it ends (the server is shutting down), waiting
between failed attempts from 50 ms up to 5 s. A server without ``kv.events`` (an older
kvrpc) is given up on, with a warning.

**Bounded.** The queue holds at most ``max_events`` items; a thread that finds it full
waits, and stops reading its stream: the stream's credits then stop the server, whose own
buffer for this subscriber (``server_buffer`` events) overflows into a gap, which brings a
fresh snapshot once the queue drains. An engine that stops stepping (idle, with nothing to
schedule) therefore costs at most the queue and the server's buffer, and resynchronises when
it steps again.

**Shutdown.** :meth:`EventFeed.close` stops every stream (the server runs its producer's
``finally`` at once, whether or not the transport reports the hang-up) and wakes its reader,
closes the clients, wakes a thread waiting on the full queue, and joins the threads.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from typing import Final

from kvrpc.client import SyncClient
from kvrpc.client_streams import SyncStream
from kvrpc.errors import ClientClosed, KvrpcError, StreamIdle, UnknownProtocol
from kvrpc.kv import protocols
from kvrpc.kv.protocols import EventsRequest, KVEvent

__all__ = ["EventFeed", "FeedItem"]

logger = logging.getLogger("kvrpc.vllm")

FeedItem = tuple[int, KVEvent | None]
"""``(server, event)``: an event of the server numbered ``server`` (its place in ``urls``),
or None where a new subscription, with a snapshot, begins."""

_FIRST_RETRY: Final = 0.05
_LAST_RETRY: Final = 5.0


class EventFeed:
    """One ``kv.events`` subscription per URL, read by a daemon thread each, into a queue.

    ``connect_timeout`` and ``auth_token_file`` are the clients' (as the adapters'). Start
    the threads with :meth:`start`; :meth:`take` may be called from any one thread.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        connect_timeout: float = 5.0,
        auth_token_file: str | None = None,
        max_events: int = 4096,
        server_buffer: int = 4096,
    ) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, not {max_events}")
        self.urls = list(urls)
        self.connect_timeout = connect_timeout
        self.auth_token_file = auth_token_file
        self.max_events = max_events
        self.request = EventsRequest(snapshot=True, buffer=server_buffer)
        self.subscriptions = 0
        """Subscriptions opened so far, over all servers (the first of each, and every
        resubscription)."""
        self._queue: deque[FeedItem] = deque()
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._lock = threading.Lock()  # guards _clients against close()
        self._clients: list[SyncClient | None] = [None] * len(self.urls)
        self._streams: list[SyncStream | None] = [None] * len(self.urls)
        self._threads = [
            threading.Thread(
                target=self._run, args=(index,), daemon=True, name=f"kvrpc-vllm-events-{index}"
            )
            for index in range(len(self.urls))
        ]

    def start(self) -> None:
        """Start the threads (they connect, subscribe and read by themselves)."""
        for thread in self._threads:
            thread.start()

    def take(self, max_hashes: int = 4096) -> list[FeedItem]:
        """What the threads read since the last call, in order per server; never waits.

        Stops once the items taken carry ``max_hashes`` chunk hashes (at least one item is
        taken), so that one call costs its caller a bounded time; the rest waits for the
        next call.
        """
        taken: list[FeedItem] = []
        hashes = 0
        with self._cond:
            queue = self._queue
            while queue and (not taken or hashes < max_hashes):
                item = queue.popleft()
                taken.append(item)
                if item[1] is not None:
                    hashes += len(item[1].hashes)
            if taken:
                self._cond.notify_all()
        return taken

    def __len__(self) -> int:
        """Items waiting in the queue."""
        with self._cond:
            return len(self._queue)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closing.is_set()

    def alive(self) -> int:
        """How many of the threads still run."""
        return sum(thread.is_alive() for thread in self._threads)

    def close(self, timeout: float = 5.0) -> None:
        """End every subscription and join the threads (each for up to ``timeout`` s)."""
        self._closing.set()
        with self._cond:
            self._cond.notify_all()
        with self._lock:
            clients, self._clients = self._clients, [None] * len(self.urls)
            streams, self._streams = self._streams, [None] * len(self.urls)
        for stream in streams:
            if stream is not None:
                # The cancel goes out before the client closes: a transport that does not
                # report a peer's hang-up (zmq) would leave the server's producer waiting.
                # It also wakes this stream's reader thread, which sees a clean end.
                stream.close()
        for client in clients:
            if client is not None:
                client.close()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)
        with self._cond:
            self._queue.clear()

    # ------------------------------------------------------------------ the threads

    def _put(self, item: FeedItem) -> bool:
        """Queue ``item``, waiting while the queue is full; False once closing."""
        with self._cond:
            while len(self._queue) >= self.max_events and not self._closing.is_set():
                self._cond.wait()
            if self._closing.is_set():
                return False
            self._queue.append(item)
            return True

    def _client(self, index: int) -> SyncClient | None:
        """Server ``index``'s client, connected now if need be; None if it cannot be."""
        with self._lock:
            client = self._clients[index]
        if client is not None:
            return client
        client = SyncClient(
            self.urls[index],
            registry=protocols.kv_registry(),
            connect_timeout=self.connect_timeout,
            auth_token_file=self.auth_token_file,
        )
        with self._lock:
            if self._closing.is_set():
                client.close()
                return None
            self._clients[index] = client
        return client

    def _run(self, index: int) -> None:
        url = self.urls[index]
        retry = _FIRST_RETRY
        failing = False
        while not self._closing.is_set():
            resubscribe_now = False
            try:
                client = self._client(index)
                if client is None or not self._put((index, None)):
                    return
                with self._lock:
                    self.subscriptions += 1
                stream = client.stream(protocols.EVENTS, self.request, timeout=None)
                with self._lock:
                    if self._closing.is_set():
                        stream.close()
                        return
                    self._streams[index] = stream
                with stream:
                    for event in stream:
                        if failing:
                            logger.info("kv.events from %s flow again", url)
                            failing = False
                        retry = _FIRST_RETRY
                        if not self._put((index, event)):
                            return
                        if event.kind == "gap":
                            # Events were lost: a fresh snapshot tells what is held now.
                            resubscribe_now = True
                            break
            except UnknownProtocol:
                logger.warning(
                    "the kvrpc server at %s has no kv.events (an older kvrpc): vLLM gets "
                    "no KV events of its chunks",
                    url,
                )
                return
            except StreamIdle:
                # This engine stopped taking events (it is idle, or slow): the queue is
                # full, and the server gave up waiting. Subscribe again once it drains.
                logger.debug("kv.events from %s idle; subscribing again", url)
                resubscribe_now = True
            except ClientClosed:
                if self._closing.is_set():
                    return
                with self._lock:  # closed under us by someone else: a new one next time
                    self._clients[index] = None
            except KvrpcError as exc:
                if not self._closing.is_set():
                    log = logger.debug if failing else logger.warning
                    log("kv.events from %s stopped (%s); subscribing again", url, exc)
                    failing = True
            except Exception:  # never let the thread die silently
                logger.exception("kv.events from %s failed; subscribing again", url)
                failing = True
            if resubscribe_now:
                continue
            if self._closing.wait(retry):
                return
            retry = min(retry * 2, _LAST_RETRY)
