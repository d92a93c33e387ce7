"""docs/wire.md is enough to write a client: one written from it alone talks to ``kvrpc serve``.

The client below uses a plain socket, ``struct`` and ``msgpack``, and nothing of kvrpc: every
constant in it (the unix framing, the header's five fields, the kinds, the ext codes, the
status codes) is one that docs/wire.md states. The server is a real ``kvrpc serve`` child
process on a ``unix://`` socket. If the code and the page drift apart, these tests fail.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import pytest

# --------------------------------------------------------------- what docs/wire.md says

WIRE_VERSION = 3
REQUEST, RESPONSE, ERROR = 0, 1, 2
OPEN, ITEMS, CREDIT, CANCEL = 3, 4, 5, 6
EXT_BUFFER, EXT_TUPLE = 0, 2
BUFFER_REF = struct.Struct("<IB")  # frame index, then 0 for a byte string
COUNT = struct.Struct(">I")
LENGTH = struct.Struct(">Q")
STATUS_PROTOCOL = 2
STATUS_VERSION_MISMATCH = 4
STATUS_INVALID_PAYLOAD = 6
STATUS_UNKNOWN_PROTOCOL = 7

SERVE = [sys.executable, "-m", "kvrpc", "serve"]
WAIT = 30.0  # seconds a socket read may block before the test gives up, never a measurement


class WireClient:
    """A kvrpc client over ``unix://``, as docs/wire.md specifies it."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        self.sock.connect(path)

    def close(self) -> None:
        self.sock.close()

    def send_frames(self, frames: list[bytes]) -> None:
        prefix = COUNT.pack(len(frames)) + b"".join(LENGTH.pack(len(f)) for f in frames)
        self.sock.sendall(prefix + b"".join(frames))

    def send_header(self, header: list[Any], buffers: Sequence[bytes] = ()) -> None:
        self.send_frames([msgpack.packb(header, use_bin_type=True), *buffers])

    def recv_frames(self) -> list[bytes]:
        (count,) = COUNT.unpack(self.read_exactly(COUNT.size))
        lengths = [LENGTH.unpack(self.read_exactly(LENGTH.size))[0] for _ in range(count)]
        return [self.read_exactly(n) for n in lengths]

    def recv(self) -> list[Any]:
        """The next reply's header, with out-of-band buffers and tuples resolved."""
        frames = self.recv_frames()

        def ext_hook(code: int, data: bytes) -> Any:
            if code == EXT_BUFFER:
                index, _kind = BUFFER_REF.unpack(data)
                return frames[index]
            if code == EXT_TUPLE:
                return tuple(msgpack.unpackb(data, ext_hook=ext_hook, raw=False))
            return msgpack.ExtType(code, data)

        header: list[Any] = msgpack.unpackb(
            frames[0], ext_hook=ext_hook, raw=False, strict_map_key=False
        )
        return header

    def call(self, request_id: int, name: str, args: list[Any]) -> list[Any]:
        self.send_header([WIRE_VERSION, REQUEST, request_id, name, args])
        return self.recv()

    def read_exactly(self, size: int) -> bytes:
        """Exactly ``size`` bytes from the stream."""
        chunks = []
        while size:
            chunk = self.sock.recv(size)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)


def tuple_ext(*items: Any) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_TUPLE, msgpack.packb(list(items), use_bin_type=True))


# ------------------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def socket_path() -> Iterator[str]:
    """The socket of a ``kvrpc serve`` child, shared by this module's tests."""
    directory = tempfile.mkdtemp(prefix="kvrpc-wire-", dir="/tmp")  # AF_UNIX paths are short
    path = f"{directory}/kv.sock"
    url = f"unix://{path}"
    child = subprocess.Popen(
        [*SERVE, "--url", url, "--cpu-buffer-size", "0.01"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        ready = child.stdout.readline()
        assert ready.startswith(f"kvrpc ready {url}"), ready + child.stderr.read()[-2000:]
        yield path
    finally:
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=30)
        shutil.rmtree(directory, ignore_errors=True)
    assert child.returncode == 0, stderr[-2000:]


@pytest.fixture
def client(socket_path: str) -> Iterator[WireClient]:
    connection = WireClient(socket_path)
    yield connection
    connection.close()


# ------------------------------------------------------------------------------- the tests


def test_a_ping_written_from_the_spec_gets_pong_under_its_request_id(client: WireClient) -> None:
    assert client.call(41, "rpc.ping", []) == [WIRE_VERSION, RESPONSE, 41, "", "pong"]


def test_the_byte_by_byte_ping_of_the_spec_is_what_the_server_sends(client: WireClient) -> None:
    client.sock.sendall(bytes.fromhex("00000001 000000000000000e 9503 0001 a8 7270632e70696e67 90"))
    reply = bytes.fromhex("00000001 000000000000000a 95 0301 01 a0 a4 706f6e67")
    assert client.read_exactly(len(reply)) == reply


def test_echo_returns_tuples_and_out_of_band_bytes_as_the_spec_encodes_them(
    client: WireClient,
) -> None:
    big = bytes(range(256)) * 16  # 4 KiB: the server lifts it out of band in its reply
    ref = msgpack.ExtType(EXT_BUFFER, BUFFER_REF.pack(1, 0))
    value = {"n": -3, "tuple": tuple_ext(1, "two", None), "big": ref, "small": b"\x00\x01"}
    client.send_header([WIRE_VERSION, REQUEST, 42, "rpc.echo", [value]], [big])
    frames = client.recv_frames()
    assert len(frames) == 2 and frames[1] == big  # the reply's buffer is a frame of its own
    header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
    assert header[:4] == [WIRE_VERSION, RESPONSE, 42, ""]
    echoed = header[4]
    assert echoed["big"] == msgpack.ExtType(EXT_BUFFER, BUFFER_REF.pack(1, 0))
    assert echoed["tuple"].code == EXT_TUPLE
    assert msgpack.unpackb(echoed["tuple"].data, raw=False) == [1, "two", None]
    assert (echoed["n"], echoed["small"]) == (-3, b"\x00\x01")


def test_replies_to_pipelined_requests_are_matched_by_request_id(client: WireClient) -> None:
    for request_id in (7, 8, 9):
        client.send_header([WIRE_VERSION, REQUEST, request_id, "rpc.echo", [request_id * 10]])
    replies = {reply[2]: reply[4] for reply in (client.recv() for _ in range(3))}
    assert replies == {7: 70, 8: 80, 9: 90}


def test_an_unknown_protocol_is_an_error_reply_with_status_7(client: WireClient) -> None:
    version, kind, request_id, name, payload = client.call(5, "rpc.no_such_thing", [])
    assert (version, kind, request_id, name) == (WIRE_VERSION, ERROR, 5, "")
    status, type_name, message = payload
    assert (status, type_name) == (STATUS_UNKNOWN_PROTOCOL, "UnknownProtocol")
    assert "rpc.no_such_thing" in message


def test_arguments_of_the_wrong_type_get_status_6(client: WireClient) -> None:
    # rpc.echo takes exactly one argument.
    assert client.call(6, "rpc.echo", [1, 2])[4][0] == STATUS_INVALID_PAYLOAD
    # kv.keepalive takes one bin: a str is not bytes to the strict validation.
    reply = client.call(7, "kv.keepalive", ["not bytes"])
    assert reply[1] == ERROR and reply[4][0] == STATUS_INVALID_PAYLOAD


def test_another_wire_version_is_refused_with_status_4_in_version_3(client: WireClient) -> None:
    client.send_header([1, REQUEST, 3, "rpc.ping", []])
    version, kind, request_id, _, (status, type_name, message) = client.recv()
    assert (version, kind, request_id) == (WIRE_VERSION, ERROR, 3)
    assert (status, type_name) == (STATUS_VERSION_MISMATCH, "VersionMismatch")
    assert "1" in message and "3" in message
    assert client.call(4, "rpc.ping", [])[4] == "pong"  # the connection is still good


def test_a_stream_written_from_the_spec_is_credited_item_by_item_then_ends(
    client: WireClient,
) -> None:
    client.send_header([WIRE_VERSION, OPEN, 9, "rpc.count", [2, [5]]])
    received: list[int] = []
    while len(received) < 2:  # exactly the credit: two items, in one message or two
        version, kind, request_id, _, items = client.recv()
        assert (version, kind, request_id) == (WIRE_VERSION, ITEMS, 9)
        received += items
    assert received == [0, 1]
    client.send_header([WIRE_VERSION, CREDIT, 9, "", [10]])
    while True:
        version, kind, request_id, _, payload = client.recv()
        if kind == RESPONSE:
            assert payload is None
            break
        assert kind == ITEMS
        received += payload
    assert received == [0, 1, 2, 3, 4]
    assert client.call(10, "rpc.ping", [])[4] == "pong"


def test_a_cancelled_stream_sends_nothing_more(client: WireClient) -> None:
    client.send_header([WIRE_VERSION, OPEN, 9, "rpc.count", [1, [10**9]]])
    assert client.recv()[1:3] == [ITEMS, 9]
    client.send_header([WIRE_VERSION, CANCEL, 9, "", []])
    client.send_header([WIRE_VERSION, CREDIT, 9, "", [5]])  # too late: ignored
    assert client.call(10, "rpc.ping", []) == [WIRE_VERSION, RESPONSE, 10, "", "pong"]


def test_a_plain_request_of_a_streamed_protocol_is_refused_with_status_2(
    client: WireClient,
) -> None:
    client.send_header([WIRE_VERSION, REQUEST, 4, "rpc.count", [3]])
    reply = client.recv()
    assert reply[1:3] == [ERROR, 4] and reply[4][0] == STATUS_PROTOCOL


def test_an_unreferenced_buffer_frame_is_a_protocol_error(client: WireClient) -> None:
    client.send_header([WIRE_VERSION, REQUEST, 11, "rpc.echo", [b"x"]], [b"stray frame"])
    reply = client.recv()
    assert reply[1:3] == [ERROR, 11] and reply[4][0] == STATUS_PROTOCOL


# ------------------------------------------------------------------ the auth handshake
# What docs/wire.md, "The auth handshake", says, with hashlib and hmac and nothing of kvrpc.

AUTH_MAGIC = b"KVA1"
HELLO, CHALLENGE, ANSWER, ACCEPT, REFUSE = 1, 2, 3, 4, 5
CLIENT_LABEL, SERVER_LABEL = b"kvrpc-auth/1 client", b"kvrpc-auth/1 server"
TOKEN = b"a token of 32 bytes for the spec"


def _mac(label: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(TOKEN, label + server_nonce + client_nonce, hashlib.sha256).digest()


@pytest.fixture(scope="module")
def auth_socket_path() -> Iterator[str]:
    """A ``kvrpc serve`` child started with a token file."""
    directory = tempfile.mkdtemp(prefix="kvrpc-wire-", dir="/tmp")
    path = f"{directory}/kv.sock"
    token = Path(directory) / "token"
    token.write_bytes(TOKEN + b"\n")  # the trailing newline is not part of the token
    token.chmod(0o600)
    url = f"unix://{path}"
    child = subprocess.Popen(
        [*SERVE, "--url", url, "--cpu-buffer-size", "0.01", "--auth-token-file", str(token)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stderr is not None
        ready = child.stdout.readline()
        assert ready.startswith(f"kvrpc ready {url}"), ready + child.stderr.read()[-2000:]
        yield path
    finally:
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=30)
        shutil.rmtree(directory, ignore_errors=True)
    assert child.returncode == 0, stderr[-2000:]


def test_a_client_written_from_the_spec_authenticates_then_calls(auth_socket_path: str) -> None:
    client = WireClient(auth_socket_path)
    try:
        client_nonce = os.urandom(32)
        client.send_frames([AUTH_MAGIC + bytes((HELLO,)) + client_nonce])
        (challenge,) = client.recv_frames()
        assert challenge[:5] == AUTH_MAGIC + bytes((CHALLENGE,)) and len(challenge) == 37
        server_nonce = challenge[5:]
        answer = _mac(CLIENT_LABEL, server_nonce, client_nonce)
        client.send_frames([AUTH_MAGIC + bytes((ANSWER,)) + answer])
        (accept,) = client.recv_frames()
        assert accept == AUTH_MAGIC + bytes((ACCEPT,)) + _mac(
            SERVER_LABEL, server_nonce, client_nonce
        )
        assert client.call(41, "rpc.ping", []) == [WIRE_VERSION, RESPONSE, 41, "", "pong"]
    finally:
        client.close()


def test_a_request_before_the_handshake_gets_a_refuse_and_a_hang_up(
    auth_socket_path: str,
) -> None:
    client = WireClient(auth_socket_path)
    try:
        client.send_header([WIRE_VERSION, REQUEST, 1, "rpc.ping", []])
        (refused,) = client.recv_frames()
        assert refused[:5] == AUTH_MAGIC + bytes((REFUSE,))
        assert b"authentication failed" in refused[5:]
        assert client.sock.recv(1) == b""  # then the server hangs up
    finally:
        client.close()
