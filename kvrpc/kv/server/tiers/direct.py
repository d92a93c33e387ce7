"""Connections that receive Redis values straight into pool slots (see :mod:`.resp`).

A :class:`DirectReader` keeps up to ``connections`` sockets per Redis node and sends one
pipeline of ``GET`` commands on each at a time; asyncio's buffered protocol hands the kernel
the slot's own memory to receive into. It reads only: the tier's writes, lookups and
deletes, and everything a cluster needs beyond "which node holds this key", stay with
redis-py.

Plain TCP (``redis://``) and Unix sockets (``unix://``) only, with the URL's user,
password and database. A ``rediss://`` tier reads through redis-py (see
:func:`direct_address`).
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from kvrpc.kv.server.tiers.resp import BulkReplies, Reply, ReplyKind, RespProtocolError, command

__all__ = ["Address", "DirectReader", "direct_address"]


@dataclass(frozen=True)
class Address:
    """Where one Redis node listens, and how to log in to it."""

    host: str = ""
    port: int = 0
    path: str = ""  #: a Unix socket's path (then host and port are unused)
    username: str | None = None
    password: str | None = None
    db: int = 0

    def at(self, host: str, port: int) -> Address:
        """The same login at another node (a cluster's)."""
        return Address(host, port, "", self.username, self.password, self.db)


def direct_address(url: str) -> Address | None:
    """The node a ``redis://`` or ``unix://`` URL names; None for any other scheme."""
    parts = urllib.parse.urlsplit(url)
    user = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password else None
    query = urllib.parse.parse_qs(parts.query)
    if parts.scheme == "redis":
        db = parts.path.lstrip("/") or query.get("db", ["0"])[0]
        return Address(
            parts.hostname or "localhost", parts.port or 6379, "", user, password, int(db)
        )
    if parts.scheme == "unix":
        return Address("", 0, parts.path, user, password, int(query.get("db", ["0"])[0]))
    return None


class _Connection(asyncio.BufferedProtocol):
    """One socket to a node: a pipeline at a time, its values received into their targets."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._replies: BulkReplies | None = None
        self._waiter: asyncio.Future[list[Reply]] | None = None
        self._lost: BaseException | None = None
        self._spare = memoryview(bytearray(1))

    # asyncio's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        # Bytes with no pipeline waiting are a protocol error, caught in buffer_updated.
        return self._spare if self._replies is None else self._replies.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        replies = self._replies
        try:
            if replies is None:
                raise RespProtocolError("the peer sent bytes no command asked for")
            replies.received(nbytes)
        except RespProtocolError as error:
            self._fail(error)
            return
        if replies.done:
            self._replies = None
            waiter, self._waiter = self._waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result(replies.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionResetError("the Redis node closed the connection"))

    # the reader's side

    @property
    def usable(self) -> bool:
        return self._lost is None and self._transport is not None

    async def pipeline(self, commands: bytes, targets: Sequence[memoryview]) -> list[Reply]:
        """Send ``commands`` (one per target) and wait for their replies."""
        if self._lost is not None:
            raise ConnectionResetError("the connection to the Redis node is gone")
        assert self._transport is not None and self._replies is None
        self._replies = BulkReplies(targets)
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(commands)
        return await self._waiter

    def _fail(self, error: BaseException) -> None:
        if self._lost is None:
            self._lost = error
        self._replies = None
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class DirectReader:
    """Reads values of known length straight into memory, over pooled connections.

    Callers bound their own parallelism (the tier's connection semaphore), so a node's pool
    never holds more sockets than that. A connection that fails, or whose call is cancelled
    mid-reply, is closed, never reused.
    """

    def __init__(self, default: Address) -> None:
        self.default = default
        self._idle: dict[Address, deque[_Connection]] = {}
        self._closed = False

    async def get_into(
        self, names: Sequence[bytes], targets: Sequence[memoryview], node: Address | None = None
    ) -> list[Reply]:
        """``GET`` each of ``names`` on ``node``; a value of ``len(target)`` bytes lands there.

        One pipeline on one connection. Raises ``OSError`` (``ConnectionError``) if the
        node cannot be reached or the connection breaks; the caller's deadline bounds it.
        """
        if len(names) != len(targets):
            raise ValueError(f"{len(names)} names but {len(targets)} targets")
        address = self.default if node is None else node
        connection = await self._connection(address)
        commands = b"".join(command(b"GET", name) for name in names)
        try:
            replies = await connection.pipeline(commands, targets)
        except BaseException:
            connection.close()  # mid-reply: its bytes are in an unknown state
            raise
        self._release(address, connection)
        return replies

    async def _connection(self, address: Address) -> _Connection:
        idle = self._idle.get(address)
        while idle:
            connection = idle.pop()
            if connection.usable:
                return connection
        if self._closed:
            raise ConnectionResetError("the Redis tier is closed")
        loop = asyncio.get_running_loop()
        if address.path:
            _, connection = await loop.create_unix_connection(_Connection, address.path)
        else:
            _, connection = await loop.create_connection(_Connection, address.host, address.port)
        try:
            await _log_in(connection, address)
        except BaseException:
            connection.close()
            raise
        return connection

    def _release(self, address: Address, connection: _Connection) -> None:
        if self._closed or not connection.usable:
            connection.close()
            return
        self._idle.setdefault(address, deque()).append(connection)

    def close(self) -> None:
        """Close every idle connection; those in use close when their call ends."""
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()


async def _log_in(connection: _Connection, address: Address) -> None:
    commands: list[bytes] = []
    if address.password is not None:
        login = [address.password.encode()]
        if address.username is not None:
            login.insert(0, address.username.encode())
        commands.append(command(b"AUTH", *login))
    if address.db:
        commands.append(command(b"SELECT", str(address.db).encode()))
    if not commands:
        return
    empty = memoryview(bytearray())
    replies = await connection.pipeline(b"".join(commands), [empty] * len(commands))
    for reply in replies:
        if reply.kind is not ReplyKind.SIMPLE:
            with contextlib.suppress(Exception):
                connection.close()
            raise ConnectionRefusedError(f"the Redis node refused the login: {reply.text}")
