"""The raw baselines that ``kvrpc bench rpc`` divides kvrpc's figures by, found by URL scheme.

A baseline is the socket library a transport is built on, used the fastest plain way, with no
kvrpc in between: an echo server in a process of its own and a client of it. Baselines are
found through their own entry-point group, ``kvrpc.baselines`` (name: the URL scheme, value:
an object with :class:`RawBaseline`'s methods), so a transport plugin never imports its
benchmark and the benchmark never needs the plugin's internals. A baseline that also has a
blocking client says so by implementing :class:`SyncRawBaseline`, which is checked with
``isinstance``.
"""

from __future__ import annotations

import asyncio
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

from kvrpc.transport import TransportURL

__all__ = [
    "BASELINE_GROUP",
    "RawBaseline",
    "RawEchoClient",
    "SyncRawBaseline",
    "SyncRawEchoClient",
    "baseline_for",
]

#: The entry-point group that names each scheme's raw baseline.
BASELINE_GROUP = "kvrpc.baselines"


class RawEchoClient(Protocol):
    """An asyncio client of a raw echo server."""

    async def call(self, payload: bytes) -> bytes:
        """Send one message and await its echo."""
        ...

    async def submit(self, payload: bytes) -> asyncio.Future[bytes]:
        """Send one message; the future resolves with its echo (echoes come in order)."""
        ...

    async def close(self) -> None:
        """Disconnect."""
        ...


class SyncRawEchoClient(Protocol):
    """A blocking client of a raw echo server, used from one thread."""

    def send(self, payload: bytes) -> None:
        """Send one message without waiting for its echo."""
        ...

    def recv(self) -> bytes:
        """Block until the next echo arrives (echoes come in the order sent)."""
        ...

    def close(self) -> None:
        """Disconnect."""
        ...


@runtime_checkable
class RawBaseline(Protocol):
    """How the benchmark starts a raw echo server and reaches it from asyncio."""

    def server_argv(self, url: TransportURL) -> list[str]:
        """A command serving the echo at ``url`` that prints ``ready`` once it listens."""
        ...

    async def connect(self, url: TransportURL) -> RawEchoClient:
        """A client of that echo server."""
        ...


@runtime_checkable
class SyncRawBaseline(RawBaseline, Protocol):
    """A baseline that also offers a blocking client: what a synchronous caller would write."""

    def connect_sync(self, url: TransportURL) -> SyncRawEchoClient:
        """A blocking client of the echo server at ``url``."""
        ...


def baseline_for(scheme: str) -> RawBaseline | None:
    """The raw baseline registered for ``scheme``, or None when no distribution offers one."""
    for entry in entry_points(group=BASELINE_GROUP, name=scheme):
        baseline = entry.load()
        if not isinstance(baseline, RawBaseline):
            raise TypeError(f"{entry.value} (kvrpc.baselines {scheme!r}) is not a RawBaseline")
        return baseline
    return None
