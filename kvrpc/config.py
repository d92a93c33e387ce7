"""Validated settings of servers and clients.

Each class checks its values once, when a server or client is made, so that a zero thread pool
or a negative timeout is an error naming the setting rather than a hang later on. This module
imports pydantic; the server and client import it only when they are constructed, which keeps
``import kvrpc`` light.
"""

from __future__ import annotations

from typing import Any, TypedDict, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["ClientConfig", "ClientSettings", "ServerConfig", "ServerSettings", "load"]

KiB = 1024
MiB = 1024 * KiB

C = TypeVar("C", bound=BaseModel)


class _Settings(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")


class ServerConfig(_Settings):
    """Limits of an :class:`~kvrpc.server.RPCServer`."""

    #: Threads that run BLOCKING handlers.
    max_workers: int = Field(8, ge=1)
    #: Largest message accepted, header and buffers together, in bytes.
    max_message_size: int = Field(256 * MiB, ge=64)
    #: Requests one client may have running at once; more are answered ``ServerBusy``.
    max_in_flight_per_peer: int = Field(256, ge=1)
    #: Requests all clients together may have running at once (None: no cap beyond the
    #: per-client one); more are answered ``ServerBusy``.
    max_in_flight: int | None = Field(None, ge=1)
    #: Seconds shutdown waits for running requests before cancelling them.
    shutdown_grace: float = Field(5.0, ge=0)
    #: Seconds a client may leave its replies unread, with more waiting to be sent, before
    #: the server gives up on it (drops its connection, or the replies queued for it).
    peer_stall_timeout: float = Field(10.0, gt=0)
    #: Requests read but not yet handled, over all clients, past which the server stops
    #: reading (the senders then wait); it reads again at half of it. See
    #: :class:`~kvrpc.transport.Inbox`.
    inbox_limit: int = Field(1024, ge=2)
    #: Requests of one read handled at once, straight from the read callback; the rest are
    #: queued and taken one per client in turn, this many per event-loop turn.
    inbox_burst: int = Field(64, ge=1)
    #: Bytes of requests (their frames' lengths) handled at most in one read, and per turn of
    #: the queue, beside ``inbox_burst``'s count; a larger request is handled alone. 256 KiB
    #: lets 64 small pipelined calls go at once while a client flooding 64 KiB requests gets
    #: 3 handled per turn, so another client's request waits behind about 200 KiB of work, not
    #: a megabyte. See :class:`~kvrpc.transport.Inbox`.
    inbox_burst_bytes: int = Field(256 * KiB, ge=1)
    #: Seconds a stream's producer waits for credit from a consumer that reads nothing
    #: before the stream ends with ``StreamIdle``.
    stream_idle_timeout: float = Field(60.0, gt=0)
    #: A file holding the shared secret (mode 0600, this user's): every peer must pass the
    #: handshake of :mod:`kvrpc.auth` with it before any request of its is decoded. None: no
    #: handshake (local sockets are then guarded by their file modes alone).
    auth_token_file: str | None = None
    #: The server's CURVE secret key file (mode 0600, see :mod:`kvrpc.curve`): a zmq+tcp
    #: listener then encrypts and admits only clients that know its public key. None: none.
    curve_secret_file: str | None = None


class ServerSettings(TypedDict, total=False):
    """The keywords of :class:`~kvrpc.server.RPCServer` that set a :class:`ServerConfig` field.

    Names and types only: a keyword left out takes the field's default, which is written in
    :class:`ServerConfig` alone.
    """

    max_workers: int
    max_message_size: int
    max_in_flight_per_peer: int
    max_in_flight: int | None
    shutdown_grace: float
    peer_stall_timeout: float
    inbox_limit: int
    inbox_burst: int
    inbox_burst_bytes: int
    stream_idle_timeout: float
    auth_token_file: str | None
    curve_secret_file: str | None


class ClientConfig(_Settings):
    """Limits of an :class:`~kvrpc.client.AsyncClient` (and so of a ``SyncClient``)."""

    #: Default per-call deadline in seconds; None waits forever.
    timeout: float | None = Field(30.0, gt=0)
    #: Seconds to wait for the transport to connect.
    connect_timeout: float = Field(10.0, gt=0)
    #: Seconds a call made while the connection is down waits for it to come back.
    reconnect_timeout: float = Field(2.0, ge=0)
    #: Largest message accepted from the server, in bytes.
    max_message_size: int = Field(256 * MiB, ge=64)
    #: Calls pending at once; further submits wait for a free slot.
    max_in_flight: int = Field(1024, ge=1)
    #: The server's token file (mode 0600, this user's), for a server that requires the
    #: handshake; None for one that does not.
    auth_token_file: str | None = None
    #: The server's CURVE public key file (``kvrpc keygen-curve``), for a zmq+tcp server
    #: started with a CURVE secret key; None for one without.
    curve_server_key_file: str | None = None


class ClientSettings(TypedDict, total=False):
    """The keywords of :class:`~kvrpc.client.AsyncClient` that set a :class:`ClientConfig` field.

    Names and types only: a keyword left out takes the field's default, which is written in
    :class:`ClientConfig` alone.
    """

    timeout: float | None
    connect_timeout: float
    reconnect_timeout: float
    max_message_size: int
    max_in_flight: int
    auth_token_file: str | None
    curve_server_key_file: str | None


def load(settings: type[C], owner: str, **values: Any) -> C:
    """Build ``settings`` from ``values``; a bad value raises ``ValueError`` naming it."""
    try:
        return settings(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}={err.get('input')!r}: {err['msg']}"
            for err in exc.errors(include_url=False)
        )
        raise ValueError(f"{owner}: {problems}") from None
