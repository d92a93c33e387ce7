"""One adapter's connection to a KV server: its client, its id, its keepalives.

Each adapter makes a random ``client_id`` that names what it owns on the server (registered
KV caches, lookup pins, prefetch jobs) and sends ``kv.keepalive`` from a small thread
every couple of seconds, so the server releases all of it if the process dies; closing the
link releases it at once (``kv.goodbye``).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any

from kvrpc.client import SyncClient
from kvrpc.errors import (
    AuthenticationFailed,
    ConnectionLost,
    KVConfigError,
    KVError,
    RequestTimeout,
    TransportError,
    UnknownProtocol,
)
from kvrpc.futures import MessagingFuture
from kvrpc.kv import protocols
from kvrpc.kv.keys import blocks_per_chunk
from kvrpc.protocol import ProtocolDefinition

__all__ = ["ServerLink"]

logger = logging.getLogger("kvrpc.kv")


class ServerLink:
    """A SyncClient to a KV server, its chunk geometry, the client id and keepalive thread.

    Connects and reads the server's chunk size at once: raises :class:`KVError` naming the
    URL (and how to start a server there) if none answers within ``connect_timeout``, and
    :class:`KVConfigError` if ``block_size`` does not divide the chunk size.
    """

    def __init__(
        self,
        url: str,
        block_size: int,
        *,
        timeout: float,
        connect_timeout: float,
        keepalive_interval: float,
        auth_token_file: str | None = None,
    ) -> None:
        self.url = url
        hint = f"start one with: kvrpc serve --url {url}"
        try:
            self.client = SyncClient(
                url,
                registry=protocols.kv_registry(),
                timeout=timeout,
                connect_timeout=connect_timeout,
                auth_token_file=auth_token_file,
            )
        except AuthenticationFailed as exc:
            raise KVError(f"the KV server at {url} refused this client: {exc}") from exc
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

    def submit_direct(self, protocol: ProtocolDefinition, *args: Any) -> MessagingFuture[Any]:
        """:meth:`submit`, sent now from this thread, its reply read when the future is polled.

        See :meth:`~kvrpc.client.SyncClient.submit_direct`: for a caller that polls its
        futures from one thread, as a scheduler does.
        """
        return self.client.submit_direct(protocol, self.client_id, *args)

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
