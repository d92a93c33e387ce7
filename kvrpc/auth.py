"""The shared-secret handshake, with no I/O: nonces, MACs, the decisions and the rate limit.

A transport with an :class:`Authenticator` in its options runs this handshake on every new
connection (or, over ZeroMQ, every new routing identity) before it decodes any request. Four
one-frame messages, each framed as the transport frames any message (``docs/wire.md``)::

    client -> server   HELLO      b"KVA1" 0x01 client_nonce(32)
    server -> client   CHALLENGE  b"KVA1" 0x02 server_nonce(32)
    client -> server   ANSWER     b"KVA1" 0x03 HMAC-SHA256(token, CLIENT_LABEL + sn + cn)
    server -> client   ACCEPT     b"KVA1" 0x04 HMAC-SHA256(token, SERVER_LABEL + sn + cn)
                  or   REFUSE     b"KVA1" 0x05 reason (UTF-8)

The ANSWER proves to the server that the client holds the token; the ACCEPT proves the same
of the server to the client, so a client never sends its requests to an impostor. Both MACs
cover both nonces, so neither side can replay an old exchange; the two labels keep one side's
proof from serving as the other's. MACs are compared with :func:`hmac.compare_digest`.

:class:`ServerHandshake` and :class:`ClientHandshake` are the two state machines: bytes in,
bytes out and a verdict, tested without sockets. :class:`FailureLimiter` is the per-peer
token bucket that limits failed handshakes. The transports keep only the plumbing.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from kvrpc.errors import AuthenticationFailed

__all__ = [
    "CLIENT_LABEL",
    "MAGIC",
    "MIN_TOKEN_BYTES",
    "NONCE_BYTES",
    "SERVER_LABEL",
    "Authenticator",
    "ClientHandshake",
    "FailureLimiter",
    "Kind",
    "ServerHandshake",
    "Verdict",
    "client_mac",
    "is_handshake",
    "message",
    "new_nonce",
    "refusal_error",
    "server_mac",
]

#: The first bytes of every handshake message (a msgpack header never starts with 0x4B 'K').
MAGIC: Final = b"KVA1"
#: Bytes of each side's random nonce.
NONCE_BYTES: Final = 32
#: The shortest token accepted: 16 bytes (128 bits) of secret.
MIN_TOKEN_BYTES: Final = 16
#: What the client's MAC is over, ahead of the two nonces.
CLIENT_LABEL: Final = b"kvrpc-auth/1 client"
#: What the server's MAC is over, ahead of the two nonces.
SERVER_LABEL: Final = b"kvrpc-auth/1 server"
_MAC_BYTES: Final = 32
# The longest handshake message: a REFUSE with a reason of a line or two.
MAX_MESSAGE_BYTES: Final = 512


class Kind(enum.IntEnum):
    """The byte after :data:`MAGIC`: which handshake message this is."""

    HELLO = 1
    CHALLENGE = 2
    ANSWER = 3
    ACCEPT = 4
    REFUSE = 5


def new_nonce() -> bytes:
    """:data:`NONCE_BYTES` bytes from the OS's cryptographic random source."""
    return secrets.token_bytes(NONCE_BYTES)


def message(kind: Kind, body: bytes) -> bytes:
    """The one frame of a handshake message of ``kind`` carrying ``body``."""
    return MAGIC + bytes((kind,)) + body


def is_handshake(frames: Sequence[bytes | memoryview | bytearray]) -> bool:
    """Whether ``frames`` is shaped like a handshake message (one frame, the magic first)."""
    return len(frames) == 1 and bytes(frames[0][: len(MAGIC)]) == MAGIC


def _parse(frames: Sequence[bytes | memoryview | bytearray]) -> tuple[Kind, bytes] | None:
    if len(frames) != 1:
        return None
    frame = bytes(frames[0][: MAX_MESSAGE_BYTES + 1])
    if len(frame) < len(MAGIC) + 1 or len(frame) > MAX_MESSAGE_BYTES:
        return None
    if frame[: len(MAGIC)] != MAGIC:
        return None
    try:
        kind = Kind(frame[len(MAGIC)])
    except ValueError:
        return None
    return kind, frame[len(MAGIC) + 1 :]


def client_mac(token: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """The client's proof: HMAC-SHA256 of ``CLIENT_LABEL + server_nonce + client_nonce``."""
    return hmac.digest(token, CLIENT_LABEL + server_nonce + client_nonce, hashlib.sha256)


def server_mac(token: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """The server's proof: HMAC-SHA256 of ``SERVER_LABEL + server_nonce + client_nonce``."""
    return hmac.digest(token, SERVER_LABEL + server_nonce + client_nonce, hashlib.sha256)


def refusal_error(
    frames: Sequence[bytes | memoryview | bytearray], where: str
) -> AuthenticationFailed | None:
    """The error for a REFUSE that a client without a token got in place of a reply; else None.

    A server that requires the handshake answers a peer's first request with a REFUSE and
    hangs up; this turns that into an error that says what to do.
    """
    parsed = _parse(frames)
    if parsed is None or parsed[0] is not Kind.REFUSE:
        return None
    return AuthenticationFailed(
        f"{where} requires authentication and refused this client "
        f"({parsed[1].decode(errors='replace')}); give the client the server's token file "
        "(auth_token_file=)"
    )


class Verdict(enum.Enum):
    """Where a :class:`ServerHandshake` stands after a message."""

    PENDING = "pending"  #: send the reply, wait for the next message
    ACCEPTED = "accepted"  #: send the reply; the peer's later messages are requests
    REFUSED = "refused"  #: send the reply (a REFUSE), then drop the peer


@dataclass(frozen=True, slots=True)
class Step:
    """What the server does after one handshake message: send ``reply``, then ``verdict``.

    ``reason`` says why a refused handshake failed, for the log.
    """

    verdict: Verdict
    reply: bytes
    reason: str = ""


class ServerHandshake:
    """The server's side of one peer's handshake: HELLO, then ANSWER, then done.

    Feed each message the peer sends to :meth:`receive` until the verdict is not
    ``PENDING``. Anything out of order or misshapen refuses the peer; so does a wrong MAC.
    Not thread-safe; one per peer.
    """

    __slots__ = ("_client_nonce", "_nonce", "_token", "verdict")

    def __init__(self, token: bytes, nonce: bytes | None = None) -> None:
        self._token = token
        self._nonce = nonce if nonce is not None else new_nonce()
        self._client_nonce: bytes | None = None
        self.verdict = Verdict.PENDING

    def receive(self, frames: Sequence[bytes | memoryview | bytearray]) -> Step:
        """Take the peer's next message; the step says what to send and where it stands."""
        if self.verdict is not Verdict.PENDING:
            return self._refuse("a handshake message after the handshake ended")
        parsed = _parse(frames)
        if parsed is None:
            return self._refuse("a message that is not a handshake message, before authenticating")
        kind, body = parsed
        if self._client_nonce is None:
            if kind is not Kind.HELLO or len(body) != NONCE_BYTES:
                return self._refuse("the first message was not a HELLO with a 32-byte nonce")
            self._client_nonce = body
            return Step(Verdict.PENDING, message(Kind.CHALLENGE, self._nonce))
        if kind is not Kind.ANSWER or len(body) != _MAC_BYTES:
            return self._refuse("the second message was not an ANSWER with a 32-byte MAC")
        expected = client_mac(self._token, self._nonce, self._client_nonce)
        if not hmac.compare_digest(body, expected):
            return self._refuse("wrong token")
        self.verdict = Verdict.ACCEPTED
        proof = server_mac(self._token, self._nonce, self._client_nonce)
        return Step(Verdict.ACCEPTED, message(Kind.ACCEPT, proof))

    def _refuse(self, reason: str) -> Step:
        self.verdict = Verdict.REFUSED
        return refusal(reason)


def refusal(reason: str) -> Step:
    """A REFUSE message for ``reason`` (the peer reads it; it names no secret)."""
    text = f"authentication failed: {reason}".encode()[: MAX_MESSAGE_BYTES - len(MAGIC) - 1]
    return Step(Verdict.REFUSED, message(Kind.REFUSE, text), reason)


class ClientHandshake:
    """The client's side: :meth:`hello` first, then each server message to :meth:`receive`.

    ``receive`` returns the ANSWER to send after the CHALLENGE, and None once the server's
    ACCEPT has proved that it holds the token too (:attr:`done` is then True). A REFUSE, a
    wrong server proof or a message out of order raises :class:`AuthenticationFailed`.
    """

    __slots__ = ("_nonce", "_server_nonce", "_token", "_where", "done")

    def __init__(self, token: bytes, where: str, nonce: bytes | None = None) -> None:
        self._token = token
        self._where = where
        self._nonce = nonce if nonce is not None else new_nonce()
        self._server_nonce: bytes | None = None
        self.done = False

    def hello(self) -> bytes:
        """The HELLO frame, to send first."""
        return message(Kind.HELLO, self._nonce)

    def receive(self, frames: Sequence[bytes | memoryview | bytearray]) -> bytes | None:
        """Take the server's next message; return the frame to send, or None when done."""
        parsed = _parse(frames)
        if parsed is None:
            raise self._failed("it answered the handshake with something else; is it kvrpc?")
        kind, body = parsed
        if kind is Kind.REFUSE:
            raise self._failed(
                f"the server said: {body.decode(errors='replace')}; check that the client's "
                "token file holds the server's token"
            )
        if self._server_nonce is None:
            if kind is not Kind.CHALLENGE or len(body) != NONCE_BYTES:
                raise self._failed("its first handshake message was not a CHALLENGE")
            self._server_nonce = body
            return message(Kind.ANSWER, client_mac(self._token, body, self._nonce))
        if kind is not Kind.ACCEPT or self.done:
            raise self._failed("its handshake messages came out of order")
        expected = server_mac(self._token, self._server_nonce, self._nonce)
        if not hmac.compare_digest(body, expected):
            raise self._failed("the server does not hold this client's token (wrong server?)")
        self.done = True
        return None

    def _failed(self, why: str) -> AuthenticationFailed:
        return AuthenticationFailed(f"authentication with {self._where} failed: {why}")


class FailureLimiter:
    """A token bucket per peer key (an address, a uid) that limits failed handshakes.

    Each key may fail ``burst`` times at once and then once per ``1 / rate`` seconds; while
    its bucket is empty, :meth:`allowed` is False and the transport refuses that key's new
    handshakes without a nonce or a MAC. At most ``max_keys`` keys are remembered (the one
    idle longest is forgotten first), so the memory it takes is bounded. ``now`` is any
    monotonic clock in seconds. Not thread-safe.
    """

    def __init__(self, rate: float = 1.0, burst: int = 10, max_keys: int = 4096) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be > 0, burst and max_keys >= 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        # key -> (tokens, at): tokens as of time ``at``; most recently touched last.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _tokens(self, key: str, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            return float(self.burst)
        tokens, at = bucket
        return min(float(self.burst), tokens + (now - at) * self.rate)

    def allowed(self, key: str, now: float) -> bool:
        """Whether ``key`` may start a handshake now (it has a failure left to spend)."""
        return self._tokens(key, now) >= 1.0

    def failed(self, key: str, now: float) -> None:
        """Spend one of ``key``'s failures."""
        tokens = max(0.0, self._tokens(key, now) - 1.0)
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until ``key`` may try again (0 if it may now)."""
        missing = 1.0 - self._tokens(key, now)
        return max(0.0, missing / self.rate)


@dataclass(frozen=True, slots=True)
class Authenticator:
    """The shared secret and the handshake's limits, as :class:`TransportOptions` carry it.

    ``token``: the secret, at least :data:`MIN_TOKEN_BYTES` bytes. ``handshake_timeout``:
    seconds a server gives a new peer to finish the handshake before dropping it (and a
    client waits for the server's replies). ``max_pending``: peers a server lets be in the
    middle of a handshake at once; more are refused at once. ``failure_rate`` and
    ``failure_burst`` set each peer key's :class:`FailureLimiter`. The token is left out of
    ``repr``.
    """

    token: bytes = field(repr=False)
    handshake_timeout: float = 5.0
    max_pending: int = 128
    failure_rate: float = 1.0
    failure_burst: int = 10

    def __post_init__(self) -> None:
        if len(self.token) < MIN_TOKEN_BYTES:
            raise ValueError(
                f"an auth token must be at least {MIN_TOKEN_BYTES} bytes, not {len(self.token)}"
            )

    def server_handshake(self) -> ServerHandshake:
        """A fresh server side of one peer's handshake."""
        return ServerHandshake(self.token)

    def client_handshake(self, where: str) -> ClientHandshake:
        """A fresh client side, for a connection to ``where`` (named in its errors)."""
        return ClientHandshake(self.token, where)

    def limiter(self) -> FailureLimiter:
        """A failure limiter with this authenticator's rate and burst."""
        return FailureLimiter(self.failure_rate, self.failure_burst)
