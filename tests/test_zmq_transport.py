"""The zmq transport's edges a user meets: its ipc socket file, and a host that does not resolve."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from kvrpc.client import AsyncClient
from kvrpc.errors import TransportError
from kvrpc.transport import connect_client, create_server

pytest.importorskip("kvrpc_zmq")


async def test_an_ipc_server_removes_its_socket_file_when_closed(tmp_path: Path) -> None:
    path = tmp_path / "kv.sock"
    server = create_server(f"zmq+ipc://{path}")
    await server.start()
    assert path.is_socket()
    await server.close()
    assert not path.exists()


async def test_an_ipc_server_leaves_a_socket_file_that_another_server_made(tmp_path: Path) -> None:
    # Another server may find ours stale and take its path; its file must outlive our close.
    path = tmp_path / "kv.sock"
    server = create_server(f"zmq+ipc://{path}")
    await server.start()
    path.unlink()
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        other.bind(str(path))
        await server.close()
        assert path.is_socket()
    finally:
        other.close()


async def test_a_host_that_does_not_resolve_is_named_at_connect() -> None:
    # .invalid never resolves (RFC 6761): the error says so at once, not after a timeout.
    client = connect_client("zmq+tcp://no-such-host.invalid:5555")
    try:
        with pytest.raises(TransportError, match=r"'no-such-host\.invalid' does not resolve"):
            await client.connect()
    finally:
        await client.close()


async def test_the_client_reports_the_unresolved_host_not_a_missing_server() -> None:
    client = AsyncClient("zmq+tcp://no-such-host.invalid:5555", connect_timeout=60.0)
    with pytest.raises(TransportError) as failed:
        await client.connect()
    assert "no-such-host.invalid" in str(failed.value)
    assert "is the server running" not in str(failed.value)
