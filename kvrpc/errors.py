"""The one exception hierarchy of kvrpc, and the stable status codes it travels by.

Every error kvrpc raises derives from :class:`KvrpcError`, so ``except KvrpcError`` catches
all of them. An error that a server reports travels as ``[code, name, message]``: ``code``
is a :class:`Status` (or an extension's code, see :func:`register_error`), so renaming a
class never changes the protocol. The client raises the class registered for the code
(:func:`error_from_wire`); a handler's own exception, which has no code, becomes a
:class:`RemoteError` naming its type.
"""

from __future__ import annotations

import enum
from typing import Any, Final

__all__ = [
    "FIRST_EXTENSION_STATUS",
    "LAST_EXTENSION_STATUS",
    "AuthenticationFailed",
    "ClientClosed",
    "ConnectionLost",
    "ClientLimitReached",
    "CudaUnavailable",
    "DeadlinePassed",
    "DuplicateProtocol",
    "EncodeError",
    "InvalidURL",
    "KVConfigError",
    "KVError",
    "KvrpcError",
    "MessageTooLarge",
    "NotOwner",
    "NotSharedMemory",
    "PayloadValidationError",
    "ProtocolError",
    "RemoteError",
    "RequestTimeout",
    "ServerBusy",
    "Status",
    "StreamIdle",
    "TransportError",
    "TransportNotFound",
    "UnknownInstance",
    "UnknownJob",
    "UnknownProtocol",
    "VersionMismatch",
    "WrongThread",
    "error_from_wire",
    "error_to_wire",
    "register_error",
]


class KvrpcError(Exception):
    """Base class of every error raised by kvrpc."""

    @property
    def status(self) -> int:
        """The code this error travels by (:class:`Status`, or an extension's own)."""
        return _status_of(self)[0]


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


class StreamIdle(KvrpcError):
    """A stream ended because its consumer granted no credit within the idle timeout.

    The server holds a stream's producer while its consumer reads nothing, but not forever:
    ``stream_idle_timeout`` (a server setting) bounds it. Read streams steadily, or close
    the ones no longer read.
    """


class RemoteError(KvrpcError):
    """A handler on the server raised; ``remote_type`` names the exception class it raised.

    ``status`` is the code it came with: :attr:`Status.UNKNOWN` for a handler's own
    exception, or an extension's code that this side has not registered.
    """

    def __init__(self, remote_type: str, message: str, status: int = 1) -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.remote_message = message
        self._status = status

    @property
    def status(self) -> int:
        """The code it came with (see the class doc)."""
        return self._status


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


class AuthenticationFailed(TransportError):
    """The handshake with the server (or a client) failed: no token, a wrong one, or refused.

    The connection is unusable; nothing was sent on it. Give the client the server's token
    file (``auth_token_file=``), or check that the file holds the same token as the server's.
    """


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


class DeadlinePassed(KVError):
    """A retrieve's deadline passed before its copy started: no byte was written."""


class ClientLimitReached(KVError):
    """A per-client cap of the server was reached; nothing of the call was done.

    The caps bound registrations, sessions, pins, prefetch jobs and bytes of copies in
    flight (``kvrpc serve --max-...-per-client``). Nothing the client already had was lost:
    end sessions, take prefetch results or wait for copies to finish, then retry; or raise
    the cap.
    """


class NotOwner(KVError):
    """The call names state another client owns; nothing was changed.

    A request id whose session another client holds open, or a client id the server has
    bound to another process. Give each engine its own engine id, and each adapter its own
    client id (the adapters make one each).
    """


# ------------------------------------------------------------------------- status codes


class Status(enum.IntEnum):
    """The stable numeric codes of errors on the wire; kvrpc's own are 1-999.

    A code never changes meaning once released; classes may be renamed or moved freely.
    Codes 1-99 are the RPC core's, 100-199 the KV service's. Extensions register theirs in
    ``FIRST_EXTENSION_STATUS..LAST_EXTENSION_STATUS`` with :func:`register_error`.
    """

    UNKNOWN = 1  #: a handler raised an exception with no code: the client gets RemoteError
    PROTOCOL = 2  #: ProtocolError: the request could not be decoded
    ENCODE = 3  #: EncodeError: a value (the reply, say) has no wire form
    VERSION_MISMATCH = 4  #: VersionMismatch: the peer speaks another wire version
    MESSAGE_TOO_LARGE = 5  #: MessageTooLarge
    INVALID_PAYLOAD = 6  #: PayloadValidationError: a payload does not match its declared types
    UNKNOWN_PROTOCOL = 7  #: UnknownProtocol
    SERVER_BUSY = 8  #: ServerBusy: refused, nothing executed; may be retried
    TRANSPORT = 9  #: TransportError: the reply could not be sent as it was
    CUDA_UNAVAILABLE = 10  #: CudaUnavailable: the server has no CUDA for this request
    AUTHENTICATION_FAILED = 11  #: AuthenticationFailed: the auth handshake failed
    STREAM_IDLE = 12  #: StreamIdle: a stream's consumer granted no credit in time
    KV = 100  #: KVError: a KV-cache operation was refused
    KV_CONFIG = 101  #: KVConfigError: sizes or layouts that cannot work together
    UNKNOWN_INSTANCE = 102  #: UnknownInstance
    NOT_SHARED_MEMORY = 103  #: NotSharedMemory
    UNKNOWN_JOB = 104  #: UnknownJob
    DEADLINE_PASSED = 105  #: DeadlinePassed
    CLIENT_LIMIT = 106  #: ClientLimitReached: a per-client cap was reached, nothing done
    NOT_OWNER = 107  #: NotOwner: the call names another client's state, nothing done


#: The codes :func:`register_error` gives to extensions.
FIRST_EXTENSION_STATUS: Final = 1000
LAST_EXTENSION_STATUS: Final = 9999

_CLASS_OF: dict[int, type[KvrpcError]] = {}
_CODE_OF: dict[type[KvrpcError], int] = {}


def _register(code: int, cls: type[KvrpcError]) -> None:
    if code in _CLASS_OF:
        raise ValueError(f"status {code} is already {_CLASS_OF[code].__qualname__}'s")
    if cls in _CODE_OF:
        raise ValueError(f"{cls.__qualname__} already has status {_CODE_OF[cls]}")
    _CLASS_OF[code] = cls
    _CODE_OF[cls] = code


def register_error(code: int, cls: type[KvrpcError]) -> None:
    """Give an extension's error class a status code of its own, in every process.

    ``code`` must lie in ``FIRST_EXTENSION_STATUS..LAST_EXTENSION_STATUS``; ``cls`` must
    derive from :class:`KvrpcError` and take its message as its one argument. A client then
    raises ``cls`` for a server's ``cls`` (and its unregistered subclasses). Registering a
    code or a class twice raises ``ValueError``.
    """
    if not FIRST_EXTENSION_STATUS <= code <= LAST_EXTENSION_STATUS:
        raise ValueError(
            f"extension status codes lie in {FIRST_EXTENSION_STATUS}-{LAST_EXTENSION_STATUS}, "
            f"not {code}"
        )
    if not (isinstance(cls, type) and issubclass(cls, KvrpcError)):
        raise ValueError(f"a status code is for a KvrpcError subclass, not {cls!r}")
    _register(code, cls)


for _status, _cls in (
    (Status.PROTOCOL, ProtocolError),
    (Status.ENCODE, EncodeError),
    (Status.VERSION_MISMATCH, VersionMismatch),
    (Status.MESSAGE_TOO_LARGE, MessageTooLarge),
    (Status.INVALID_PAYLOAD, PayloadValidationError),
    (Status.UNKNOWN_PROTOCOL, UnknownProtocol),
    (Status.SERVER_BUSY, ServerBusy),
    (Status.TRANSPORT, TransportError),
    (Status.CUDA_UNAVAILABLE, CudaUnavailable),
    (Status.AUTHENTICATION_FAILED, AuthenticationFailed),
    (Status.STREAM_IDLE, StreamIdle),
    (Status.KV, KVError),
    (Status.KV_CONFIG, KVConfigError),
    (Status.UNKNOWN_INSTANCE, UnknownInstance),
    (Status.NOT_SHARED_MEMORY, NotSharedMemory),
    (Status.UNKNOWN_JOB, UnknownJob),
    (Status.DEADLINE_PASSED, DeadlinePassed),
    (Status.CLIENT_LIMIT, ClientLimitReached),
    (Status.NOT_OWNER, NotOwner),
):
    _register(_status, _cls)


def _status_of(exc: BaseException) -> tuple[int, str]:
    """The code of ``exc``'s nearest registered class, and that class's name.

    A subclass that has no code of its own travels as its nearest registered ancestor, so
    the client still catches it by that ancestor. Anything else is :attr:`Status.UNKNOWN`.
    A RemoteError passed on keeps the name it came with.
    """
    if isinstance(exc, RemoteError):
        return exc.status, exc.remote_type
    for cls in type(exc).__mro__:
        code = _CODE_OF.get(cls)
        if code is not None:
            return code, type(exc).__name__
    return Status.UNKNOWN, type(exc).__name__


def error_to_wire(exc: BaseException) -> tuple[int, str, str]:
    """``(code, type_name, message)``: how a server reports ``exc``."""
    code, name = _status_of(exc)
    message = exc.remote_message if isinstance(exc, RemoteError) else str(exc)
    return code, name, message


def error_from_wire(code: int, type_name: str, message: str) -> KvrpcError:
    """Rebuild the exception a server reported as ``(code, type_name, message)``.

    The class registered for ``code``; where the server's class was a subclass of it that
    this side does not know, its name leads the message. A code nobody registered (a
    handler's own exception, or an extension this side lacks) is a :class:`RemoteError`.
    """
    cls = _CLASS_OF.get(code)
    if cls is None:
        return RemoteError(type_name, message, code)
    if type_name != cls.__name__:
        message = f"{type_name}: {message}"
    return cls(message)
