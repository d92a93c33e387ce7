"""The one exception hierarchy of kvrpc.

Every error kvrpc raises derives from :class:`KvrpcError`, so ``except KvrpcError`` catches
all of them. Errors that a server reports back to a client travel by their class name; the
client raises the same class again when kvrpc knows it (see :func:`error_from_wire`), and a
:class:`RemoteError` carrying the remote type name otherwise.
"""

from __future__ import annotations

from typing import Any


class KvrpcError(Exception):
    """Base class of every error raised by kvrpc."""


class ProtocolError(KvrpcError):
    """A message could not be decoded: malformed frames, bad msgpack, or a wrong wire version.

    ``request_id`` and ``kind`` hold what the decoder could read of the header before it
    failed (``None`` where it got no further), so that a server can still reply.
    """

    def __init__(self, message: str, *, request_id: int | None = None, kind: Any = None) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.kind = kind


class EncodeError(ProtocolError, TypeError):
    """A value cannot be encoded: its type is not a wire type and has no registered ext type."""


class VersionMismatch(ProtocolError):
    """The peer speaks another wire-protocol version; upgrade the older side."""


class MessageTooLarge(ProtocolError):
    """A message is larger than the configured ``max_message_size``."""


class PayloadValidationError(KvrpcError):
    """A payload or response does not match the types its protocol definition declares."""


class UnknownProtocol(KvrpcError):
    """No protocol of that name is registered (on the server, or in the local registry)."""


class DuplicateProtocol(KvrpcError):
    """A protocol name, or a handler for it, was registered twice."""


class ServerBusy(KvrpcError):
    """The server refused the request: too many requests in flight, or it is shutting down.

    Nothing was executed; the call may be retried later.
    """


class RemoteError(KvrpcError):
    """A handler on the server raised; ``remote_type`` names the exception class it raised."""

    def __init__(self, remote_type: str, message: str) -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.remote_message = message


class ConnectionLost(KvrpcError):
    """The connection to the peer closed or broke; calls that were pending fail with this."""


class RequestTimeout(KvrpcError, TimeoutError):
    """No reply arrived within the call's timeout; a late reply is dropped, never delivered."""


class ClientClosed(KvrpcError):
    """The client was used before it was opened or after it was closed."""


class WrongThread(KvrpcError, RuntimeError):
    """A blocking call was made from the event-loop thread that would have to answer it.

    For example ``SyncClient.call`` from a ``MessagingFuture`` done-callback, which runs on
    the client's own loop thread: waiting there would stop that loop, and with it every
    reply and timeout of the client. Make the call from another thread.
    """


class TransportError(KvrpcError):
    """A transport could not be created, bound, or connected, or a message could not be sent."""


class TransportNotFound(TransportError):
    """No installed transport plugin handles the URL's scheme."""


class InvalidURL(TransportError):
    """A transport URL could not be parsed."""


class CudaUnavailable(KvrpcError):
    """A CUDA feature was asked for in a process without a CUDA build of torch or a GPU."""


class KVError(KvrpcError):
    """A KV-cache operation was refused; the message says which input and what to do."""


class KVConfigError(KVError, ValueError):
    """Sizes or layouts that cannot work together.

    For example a chunk size that is not a multiple of the block size, KV tensors of
    different shapes, or a layout whose chunk does not fit the server pool's slots.
    """


class UnknownInstance(KVError):
    """No KV cache is registered under that instance id.

    It was never registered, or it was unregistered when its worker ended; register the
    worker's KV cache (again) first.
    """


class NotSharedMemory(KVError):
    """A CPU tensor given for the ``shm`` transfer mode is not in shared memory.

    Allocate such tensors with :func:`kvrpc.kv.shared_empty`.
    """


class UnknownJob(KVError):
    """A prefetch job id that this client never got, or whose result it already took."""


# Errors a server may report that the client re-raises as themselves rather than wrapping them
# in RemoteError: they describe the request, not a failure inside a handler.
_WIRE_ERRORS: dict[str, type[KvrpcError]] = {
    cls.__name__: cls
    for cls in (
        ProtocolError,
        VersionMismatch,
        MessageTooLarge,
        PayloadValidationError,
        UnknownProtocol,
        ServerBusy,
        KVError,
        KVConfigError,
        UnknownInstance,
        NotSharedMemory,
        UnknownJob,
        CudaUnavailable,
    )
}


def error_from_wire(type_name: str, message: str) -> KvrpcError:
    """Rebuild the exception a server reported as ``(type_name, message)``."""
    cls = _WIRE_ERRORS.get(type_name)
    if cls is not None:
        return cls(message)
    return RemoteError(type_name, message)
