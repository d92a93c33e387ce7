"""The server's replies: encode a result or an error, hand it to the transport, count it.

:class:`Replies` is the one place where the server sends. It never waits: the transport seam
declares ``ServerTransport.send`` a plain method that never waits for a peer, so a reply is
sent in the same call that produced it, from a task or a transport's read callback alike,
and the order of replies is the order they were made in.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from kvrpc import codec
from kvrpc.codec import Buffer
from kvrpc.dispatch import Dispatcher
from kvrpc.errors import ConnectionLost, ProtocolError, TransportError, error_to_wire
from kvrpc.transport import Peer, ServerTransport

__all__ = ["Replies"]

logger = logging.getLogger("kvrpc.server")


class Replies:
    """Sends replies over ``transport`` and reports what happened to ``dispatcher``'s counters.

    ``transport`` is set by the server when it starts; not thread-safe (the loop's thread).
    """

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.transport: ServerTransport | None = None
        self._dispatcher = dispatcher

    def result(self, peer: Peer, request_id: int, value: Any) -> None:
        """Reply with ``value``; one that cannot be encoded or carried becomes an error reply."""
        dispatcher = self._dispatcher
        try:
            frames = codec.encode_response(request_id, value)
        except ProtocolError as exc:
            dispatcher.handler_failed()
            self.error(peer, request_id, exc)
            return
        try:
            self._send(peer, frames)
        except TransportError as exc:  # the transport cannot carry this reply (its frames)
            dispatcher.handler_failed()
            self.error(peer, request_id, exc)
            return
        dispatcher.response_sent()

    def items(self, peer: Peer, request_id: int, items: list[Any]) -> None:
        """Send one batch of stream ``request_id``'s items.

        Raises what stops the stream: :class:`ProtocolError` for an item with no wire form,
        :class:`TransportError` for a batch the transport cannot carry.
        """
        self._send(peer, codec.encode_items(request_id, items))

    def error(self, peer: Peer, request_id: int, exc: BaseException) -> None:
        """Reply with ``exc`` as ``[code, name, message]``."""
        logger.debug("request %d from %r failed", request_id, peer, exc_info=exc)
        frames = codec.encode_error(request_id, *error_to_wire(exc))
        try:
            self._send(peer, frames)
        except TransportError:
            logger.exception("could not send an error reply to %r", peer)
            return
        self._dispatcher.error_reply_sent()

    def _send(self, peer: Peer, frames: Sequence[Buffer]) -> None:
        transport = self.transport
        assert transport is not None
        with contextlib.suppress(ConnectionLost):  # a peer gone away takes no replies
            transport.send(peer, frames)
