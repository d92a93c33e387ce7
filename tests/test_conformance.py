"""The transport conformance suite (kvrpc.testing) against every transport in this repo."""

from __future__ import annotations

import itertools
import os
import socket
import struct
import tempfile
import time
from collections.abc import Mapping

import pytest

from kvrpc.testing import TransportCase, TransportConformance
from kvrpc.transport import parse_url

_names = itertools.count()
_socket_dir = tempfile.mkdtemp(prefix="kvrpc-", dir="/tmp")  # short: AF_UNIX paths are capped


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _socket_path() -> str:
    return os.path.join(_socket_dir, f"s{os.getpid()}-{next(_names)}")


def raw_connect(url: str) -> socket.socket:
    """A plain blocking socket to the server at ``url``."""
    parsed = parse_url(url)
    if parsed.port is not None:
        return socket.create_connection((parsed.host, parsed.port), timeout=10)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    for _ in range(1000):
        try:
            sock.connect(parsed.path)
            return sock
        except BlockingIOError:  # the listen backlog is full for a moment: a storm's doing
            time.sleep(0.001)
    sock.close()
    raise TimeoutError(f"could not connect to {parsed.path}: backlog stayed full")


# ---------------------------------------------------------------- malformed wire input


def zmtp_inputs(cap: int) -> Mapping[str, bytes]:
    """Bytes that break ZMTP 3.1 at each stage: greeting, handshake, framing."""
    greeting = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\0") + bytes(32)
    name, value = b"Socket-Type", b"DEALER"
    body = b"\x05READY" + bytes([len(name)]) + name + struct.pack("!I", len(value)) + value
    ready = b"\x04" + bytes([len(body)]) + body
    return {
        "random bytes": os.urandom(300),
        "half a greeting": greeting[:5],
        "a frame size over the cap": greeting + ready + b"\x02" + struct.pack("!Q", cap + 1),
        "half a frame": greeting + ready + b"\x00\x64" + b"x" * 10,
    }


def unix_inputs(cap: int) -> Mapping[str, bytes]:
    """Bytes that break kvrpc-unix framing: counts, lengths, truncation."""
    return {
        "random bytes": os.urandom(300),
        "no frames": struct.pack("!I", 0),
        "too many frames": struct.pack("!I", 1_000_000),
        "a length prefix over the cap": struct.pack("!IQ", 1, cap + 1),
        "half a frame": struct.pack("!IQ", 1, 100) + b"x" * 10,
    }


class TestInproc(TransportConformance):
    @pytest.fixture
    def transport_case(self) -> TransportCase:
        return TransportCase("inproc", make_url=lambda: f"inproc://conformance-{next(_names)}")


class TestZmqIpc(TransportConformance):
    @pytest.fixture
    def transport_case(self) -> TransportCase:
        return TransportCase(
            "zmq+ipc",
            make_url=lambda: f"zmq+ipc://{_socket_path()}",
            raw_connect=raw_connect,
            raw_inputs=zmtp_inputs,
        )


class TestZmqTcp(TransportConformance):
    @pytest.fixture
    def transport_case(self) -> TransportCase:
        return TransportCase(
            "zmq+tcp",
            make_url=lambda: f"zmq+tcp://127.0.0.1:{_free_port()}",
            raw_connect=raw_connect,
            raw_inputs=zmtp_inputs,
        )


class TestUnix(TransportConformance):
    @pytest.fixture
    def transport_case(self) -> TransportCase:
        return TransportCase(
            "unix",
            make_url=lambda: f"unix://{_socket_path()}",
            raw_connect=raw_connect,
            raw_inputs=unix_inputs,
        )


def test_every_installed_transport_runs_the_suite() -> None:
    from importlib.metadata import entry_points

    covered = {"inproc", "zmq+ipc", "zmq+tcp", "unix"}
    installed = {entry.name for entry in entry_points(group="kvrpc.transports")}
    assert installed, "the transport plugins are not installed"
    assert installed <= covered, f"no conformance case for {sorted(installed - covered)}"
    suites = {cls.__name__ for cls in TransportConformance.__subclasses__()}
    assert {"TestInproc", "TestZmqIpc", "TestZmqTcp", "TestUnix"} <= suites
