"""The client side of the auth handshake, driven over a blocking connection.

:class:`~kvrpc.auth.ClientHandshake` decides, with no I/O; this runs it on a
:class:`~kvrpc.transport.BlockingClientTransport` (a SyncClient's direct lane), the same way
for every transport that has one.
"""

from __future__ import annotations

import time

from kvrpc.auth import ClientHandshake
from kvrpc.errors import AuthenticationFailed, ConnectionLost
from kvrpc.transport.interface import BlockingClientTransport

__all__ = ["authenticate_blocking"]


def authenticate_blocking(
    conn: BlockingClientTransport, handshake: ClientHandshake, where: str, timeout: float
) -> None:
    """Run ``handshake`` on ``conn`` before anything else is sent, within ``timeout`` seconds.

    ``where`` names the server in errors. Raises :class:`AuthenticationFailed` when the
    server refuses, hangs up or does not answer in time.
    """
    deadline = time.monotonic() + timeout
    frame: bytes | None = handshake.hello()
    while frame is not None:
        if not conn.send([frame]):
            raise AuthenticationFailed(f"{where} went away during the handshake")
        try:
            reply = conn.recv(max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise AuthenticationFailed(
                f"{where} sent no handshake reply within {timeout}s; is the server started "
                "with --auth-token-file?"
            ) from None
        except ConnectionLost as exc:
            raise AuthenticationFailed(f"{where} went away during the handshake: {exc}") from None
        frame = handshake.receive([bytes(part) for part in reply])
