"""The shared-secret handshake over real sockets: unix, zmq+ipc and zmq+tcp.

Servers run in this process (``RPCServer`` with ``auth_token_file``); ``kvrpc serve`` runs as
a child where the behaviour lives in the command line (the token file's mode, --insecure).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq

from kvrpc import AsyncClient, RPCServer, SyncClient
from kvrpc.auth import Kind, is_handshake
from kvrpc.errors import AuthenticationFailed

SCHEMES = ["unix", "zmq+ipc", "zmq+tcp"]
KVRPC = [sys.executable, "-m", "kvrpc"]
PING = b"\x95\x02\x00\x07\xa8rpc.ping\x90"  # [2, 0, 7, "rpc.ping", []]


def _url(scheme: str, directory: str) -> str:
    if scheme == "zmq+tcp":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return f"zmq+tcp://127.0.0.1:{probe.getsockname()[1]}"
    return f"{scheme}://{directory}/s.sock"


def _token(directory: str, name: str = "token") -> str:
    path = Path(directory) / name
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.fixture(params=SCHEMES)
async def served(
    request: pytest.FixtureRequest, sock_dir: str
) -> AsyncIterator[tuple[RPCServer, str, str]]:
    url = _url(request.param, sock_dir)
    token = _token(sock_dir)
    async with RPCServer(url, auth_token_file=token) as server:
        yield server, url, token


async def test_a_client_with_the_token_calls_and_one_without_or_with_a_wrong_one_is_refused(
    served: tuple[RPCServer, str, str], sock_dir: str
) -> None:
    server, url, token = served
    async with AsyncClient(url, auth_token_file=token) as client:
        assert await client.call("rpc.ping") == "pong"
        wrong = _token(sock_dir, "wrong")
        with pytest.raises(AuthenticationFailed, match="wrong token"):
            await AsyncClient(url, auth_token_file=wrong, connect_timeout=10).connect()
        async with AsyncClient(url) as stranger:  # no token: its first call is refused
            with pytest.raises(AuthenticationFailed, match="auth_token_file"):
                await stranger.call("rpc.ping", timeout=10)
        # The server kept serving the client that holds the token.
        assert await client.call("rpc.ping") == "pong"
    assert server.stats.requests == 2
    counts = server.transport_stats()
    assert counts["auth_ok"] == 1
    assert counts["auth_failed"] == 2
    assert counts["unauthenticated"] == 1


async def test_a_sync_client_authenticates_its_loop_connection_and_its_direct_lane(
    served: tuple[RPCServer, str, str],
) -> None:
    server, url, token = served

    def calls() -> None:  # in a thread: the server answers from this test's loop
        with SyncClient(url, auth_token_file=token) as client:
            assert client.call("rpc.ping") == "pong"  # nothing pending: the lane's socket
            futures = [client.submit("rpc.ping") for _ in range(4)]  # the loop thread's
            assert [future.result(10) for future in futures] == ["pong"] * 4
            assert client.stats.direct_calls >= 1
            assert client.stats.replies == 5

    await asyncio.to_thread(calls)
    assert server.transport_stats()["auth_ok"] == 2  # the loop's connection and the lane's


async def test_a_sync_client_without_the_token_is_refused_on_the_lane_and_the_loop(
    served: tuple[RPCServer, str, str],
) -> None:
    server, url, _ = served

    def calls(direct: bool) -> None:
        with SyncClient(url, timeout=10, direct=direct) as client:  # noqa: SIM117
            with pytest.raises(AuthenticationFailed):
                client.call("rpc.ping")

    await asyncio.to_thread(calls, True)
    await asyncio.to_thread(calls, False)
    assert server.stats.requests == 0


async def test_a_client_with_a_token_fails_clearly_against_a_server_without_auth(
    sock_dir: str,
) -> None:
    url = _url("unix", sock_dir)
    async with RPCServer(url):
        client = AsyncClient(url, auth_token_file=_token(sock_dir), connect_timeout=20)
        client_auth = client.auth
        assert client_auth is not None
        object.__setattr__(client_auth, "handshake_timeout", 0.5)
        with pytest.raises(AuthenticationFailed, match="--auth-token-file"):
            await client.connect()


# ------------------------------------------------------------------ raw peers


def _frame(payload: bytes) -> bytes:
    return struct.pack(">IQ", 1, len(payload)) + payload


def _read_frames(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


async def test_a_raw_unix_peer_that_skips_the_handshake_gets_a_refusal_and_is_cut_off(
    sock_dir: str,
) -> None:
    url = _url("unix", sock_dir)
    async with RPCServer(url, auth_token_file=_token(sock_dir)) as server:

        def raw() -> bytes:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(30)
                sock.connect(url.removeprefix("unix://"))
                sock.sendall(_frame(PING) * 3)
                return _read_frames(sock)  # until the server hangs up

        answer = await asyncio.to_thread(raw)
        count, size = struct.unpack(">IQ", answer[:12])
        assert count == 1 and is_handshake([answer[12 : 12 + size]])
        assert answer[16] == Kind.REFUSE
        assert server.stats.requests == 0  # nothing was decoded
        assert server.transport_stats()["unauthenticated"] == 3


async def test_a_raw_unix_peer_that_floods_before_the_handshake_is_cut_off(
    sock_dir: str,
) -> None:
    url = _url("unix", sock_dir)
    async with RPCServer(url, auth_token_file=_token(sock_dir)) as server:

        def flood() -> None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(30)
                sock.connect(url.removeprefix("unix://"))
                # A frame announced as 1 MiB: the server reads a few KiB of it, then hangs up.
                sock.sendall(struct.pack(">IQ", 1, 1 << 20))
                with pytest.raises((BrokenPipeError, ConnectionResetError)):
                    for _ in range(1024):
                        sock.sendall(bytes(1024))
                    _read_frames(sock)
                    raise BrokenPipeError  # it hung up having read less than we sent

        await asyncio.to_thread(flood)
        assert server.stats.requests == 0
        assert server.transport_stats()["auth_failed"] == 1


@pytest.mark.parametrize("size", [(1 << 20) - 1, 1 << 20], ids=["bytearray", "mmap"])
async def test_a_raw_unix_peer_announcing_a_large_frame_before_the_handshake_is_cut_off_at_once(
    sock_dir: str, size: int
) -> None:
    # Only the frame's 12-byte prefix is sent: well within the pre-auth byte budget, so the
    # server must refuse the announcement itself, before it makes the frame a buffer (up
    # to 1 MiB otherwise). The handshake's deadline is put out of reach, so that the hang-up
    # can come from nothing else: that one would send a refusal first.
    url = _url("unix", sock_dir)
    token = _token(sock_dir)
    server = RPCServer(url, auth_token_file=token)
    auth = server._auth
    assert auth is not None
    object.__setattr__(auth, "handshake_timeout", 3600.0)
    async with server, AsyncClient(url, auth_token_file=token) as client:
        assert await client.call("rpc.ping") == "pong"

        def announce() -> bytes:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(60)
                sock.connect(url.removeprefix("unix://"))
                sock.sendall(struct.pack(">IQ", 1, size))
                return _read_frames(sock)  # until the server hangs up

        assert await asyncio.to_thread(announce) == b""  # no refusal: cut off, not timed out
        # The authenticated client is still served, messages over the pre-auth cap included.
        payload = bytes(range(256)) * 256  # 64 KiB: a frame of its own on the wire
        assert await client.call("rpc.echo", payload) == payload
    counts = server.transport_stats()
    assert (counts["auth_ok"], counts["auth_failed"], counts["malformed"]) == (1, 1, 0)
    assert server.stats.requests == 2


@pytest.mark.parametrize("scheme", ["zmq+ipc", "zmq+tcp"])
async def test_a_raw_dealer_that_skips_the_handshake_has_nothing_decoded(
    scheme: str, sock_dir: str
) -> None:
    url = _url(scheme, sock_dir)
    token = _token(sock_dir)
    async with RPCServer(url, auth_token_file=token) as server:
        endpoint = url.replace("zmq+", "").replace("ipc://", "ipc://")

        def raw() -> list[bytes]:
            context = zmq.Context.instance()
            dealer = context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.RCVTIMEO, 30_000)
            try:
                dealer.connect(endpoint)
                dealer.send(PING)
                refused: list[bytes] = dealer.recv_multipart()
                return refused
            finally:
                dealer.close()

        refused = await asyncio.to_thread(raw)
        assert is_handshake(refused) and refused[0][4] == Kind.REFUSE
        assert server.stats.requests == 0
        assert server.transport_stats()["unauthenticated"] == 1
        async with AsyncClient(url, auth_token_file=token) as client:  # others still served
            assert await client.call("rpc.ping") == "pong"


async def test_repeated_failures_from_one_peer_are_rate_limited(sock_dir: str) -> None:
    url = _url("unix", sock_dir)
    async with RPCServer(url, auth_token_file=_token(sock_dir)) as server:
        wrong = _token(sock_dir, "wrong")
        seen: list[str] = []
        for _ in range(12):  # the default burst is 10
            with pytest.raises(AuthenticationFailed) as failure:
                await AsyncClient(url, auth_token_file=wrong, connect_timeout=10).connect()
            seen.append(str(failure.value))
        assert "wrong token" in seen[0]
        assert "too many failed handshakes" in seen[-1]
        counts = server.transport_stats()
        assert counts["auth_failed"] == 10 and counts["auth_rate_limited"] == 2


# ------------------------------------------------------------------ kvrpc serve


@pytest.mark.parametrize(
    ("mode", "data", "message"),
    [
        (0o644, secrets.token_hex(32), "chmod 600"),
        (0o640, secrets.token_hex(32), "chmod 600"),
        (0o600, "", "at least 16"),
        (0o600, "short", "at least 16"),
    ],
    ids=["world-readable", "group-readable", "empty", "short"],
)
def test_kvrpc_serve_refuses_a_token_file_it_cannot_trust(
    sock_dir: str, mode: int, data: str, message: str
) -> None:
    path = Path(sock_dir) / "token"
    path.write_text(data)
    path.chmod(mode)
    done = subprocess.run(
        [*KVRPC, "serve", "--url", f"unix://{sock_dir}/s.sock", "--auth-token-file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


def test_kvrpc_serve_over_tcp_with_a_token_needs_no_insecure_and_ping_takes_the_token(
    sock_dir: str,
) -> None:
    url = _url("zmq+tcp", sock_dir)
    token = _token(sock_dir)
    child = subprocess.Popen(
        [*KVRPC, "serve", "--url", url, "--cpu-buffer-size", "0.01", "--auth-token-file", token],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        ready = child.stdout.readline()
        assert ready.startswith(f"kvrpc ready {url} ") and "auth=token" in ready, ready
        assert "unauthenticated" not in ready
        pinged = subprocess.run(
            [*KVRPC, "ping", url, "--count", "1", "--auth-token-file", token],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert pinged.returncode == 0 and "pong" in pinged.stdout, pinged.stderr
        refused = subprocess.run(
            [*KVRPC, "ping", url, "--count", "1"], capture_output=True, text=True, timeout=60
        )
        assert refused.returncode == 1 and "AuthenticationFailed" in refused.stderr
        counted = subprocess.run(
            [*KVRPC, "stats", url, "--json", "--auth-token-file", token],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert counted.returncode == 0, counted.stderr
        assert json.loads(counted.stdout)["rpc"]["requests"] >= 1
    finally:
        child.terminate()
        child.communicate(timeout=30)
