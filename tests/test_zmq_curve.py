"""ZMQ CURVE on zmq+tcp: key files, real sockets, and who gets a request served."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from kvrpc import AsyncClient, RPCServer, cli
from kvrpc.codec import encode_request
from kvrpc.curve import client_curve_keys, server_curve_keys, write_keypair
from kvrpc.errors import KvrpcError
from kvrpc.token_file import TokenFileError

zmq = pytest.importorskip("zmq")
pytest.importorskip("kvrpc_zmq")
if not zmq.has("curve"):
    pytest.skip("this libzmq has no CURVE", allow_module_level=True)

REFUSED = 1.0  # seconds a refused client is given to connect before it must give up


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return write_keypair(tmp_path / "keys")


def test_keygen_writes_a_private_keypair_and_never_replaces_one(tmp_path: Path) -> None:
    public, secret = write_keypair(tmp_path)
    for path in (public, secret):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = server_curve_keys(secret)
    assert loaded is not None and loaded.public == public.read_bytes().strip()
    assert b"secret" not in repr(loaded).encode() and loaded.secret.decode() not in repr(loaded)
    with pytest.raises(FileExistsError):
        write_keypair(tmp_path)
    assert cli.main(["keygen-curve", str(tmp_path)]) == 1  # says so, replaces nothing
    assert server_curve_keys(secret) == loaded


def test_a_secret_key_file_others_can_read_or_that_holds_no_key_is_refused(
    keys: tuple[Path, Path], tmp_path: Path
) -> None:
    _, secret = keys
    os.chmod(secret, 0o640)
    with pytest.raises(TokenFileError, match="chmod 600"):
        server_curve_keys(secret)
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a key\n")
    os.chmod(junk, 0o600)
    with pytest.raises(TokenFileError, match="40 in Z85"):
        server_curve_keys(junk)
    with pytest.raises(TokenFileError, match="cannot open"):
        client_curve_keys(tmp_path / "missing.key")


def test_curve_on_a_url_other_than_zmq_tcp_is_refused_with_a_clear_error(
    keys: tuple[Path, Path], tmp_path: Path
) -> None:
    public, secret = keys
    for url in (f"zmq+ipc://{tmp_path}/s.sock", f"unix://{tmp_path}/s.sock"):
        with pytest.raises(ValueError, match="zmq\\+tcp:// URLs only"):
            RPCServer(url, curve_secret_file=str(secret))
        with pytest.raises(ValueError, match="zmq\\+tcp:// URLs only"):
            AsyncClient(url, curve_server_key_file=str(public))


async def test_only_a_client_with_the_servers_public_key_gets_a_request_served(
    keys: tuple[Path, Path], tmp_path: Path
) -> None:
    public, secret = keys
    other_public, _ = write_keypair(tmp_path / "other")
    url = f"zmq+tcp://127.0.0.1:{_free_port()}"
    async with RPCServer(url, curve_secret_file=str(secret)) as server:
        # No CURVE at all, and CURVE with another server's key: neither completes zmq's
        # handshake, so the connect gives up within its timeout and nothing is served.
        with pytest.raises(KvrpcError):
            async with AsyncClient(url, connect_timeout=REFUSED, timeout=REFUSED) as plain:
                await plain.call("rpc.ping")
        with pytest.raises(KvrpcError):
            async with AsyncClient(
                url,
                connect_timeout=REFUSED,
                timeout=REFUSED,
                curve_server_key_file=str(other_public),
            ) as wrong:
                await wrong.call("rpc.ping")
        assert server.stats.requests == 0
        async with AsyncClient(url, timeout=10.0, curve_server_key_file=str(public)) as good:
            assert await good.call("rpc.ping") == "pong"
            assert await good.call("rpc.echo", b"x" * 100_000) == b"x" * 100_000
        assert server.stats.requests == 2


async def test_a_raw_dealer_without_curve_gets_nothing_served(keys: tuple[Path, Path]) -> None:
    """A peer that skips the client library (no IMMEDIATE, so zmq queues its request)."""
    public, secret = keys
    port = _free_port()
    url = f"zmq+tcp://127.0.0.1:{port}"
    async with RPCServer(url, curve_secret_file=str(secret)) as server:
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        try:
            dealer.send_multipart(encode_request(1, "rpc.ping", ()))
            # No reply: the request never arrived (the wait runs beside the server's loop).
            assert await asyncio.to_thread(dealer.poll, int(REFUSED * 1000)) == 0
            # The server still serves those that hold the key, on connections of their own.
            async with AsyncClient(url, timeout=10.0, curve_server_key_file=str(public)) as good:
                assert await good.call("rpc.ping") == "pong"
        finally:
            dealer.close(linger=0)
        assert server.stats.requests == 1  # the good client's ping only


def test_a_sync_client_and_its_direct_lane_call_over_curve(keys: tuple[Path, Path]) -> None:
    from kvrpc.client import SyncClient

    public, secret = keys
    url = f"zmq+tcp://127.0.0.1:{_free_port()}"
    started = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def serve() -> None:
        async with RPCServer(url, curve_secret_file=str(secret)):
            started.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert started.wait(10.0)
        with SyncClient(url, timeout=10.0, curve_server_key_file=str(public)) as client:
            assert client.call("rpc.ping") == "pong"
            assert client.call("rpc.echo", b"y" * 1000) == b"y" * 1000
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10.0)
        loop.close()


def test_serve_refuses_curve_without_a_zmq_tcp_url_or_with_an_open_key_file(
    keys: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, secret = keys
    unix = f"unix://{tmp_path}/s.sock"
    assert cli.main(["serve", "--url", unix, "--curve-secret-file", str(secret)]) == 2
    assert "zmq+tcp:// URLs only" in capsys.readouterr().err
    os.chmod(secret, 0o644)
    tcp = f"zmq+tcp://127.0.0.1:{_free_port()}"
    assert cli.main(["serve", "--url", tcp, "--curve-secret-file", str(secret)]) == 2
    assert "chmod 600" in capsys.readouterr().err
