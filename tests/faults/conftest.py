"""The fault campaigns' harness: how long each runs, and servers on every socket transport.

Every campaign runs bounded in the default test session; ``nox -s faults`` runs them longer by
setting ``KVRPC_FAULTS_SCALE`` (a whole number, 1 by default): each campaign repeats its
rounds, or grows its workload, that many times. The servers are real ``kvrpc serve`` children
(:class:`~kvrpc.testing.serve.ServeProcess`), killed and restarted with signals.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from kv.conftest import wait_until as kv_wait_until

from kvrpc.testing.serve import ServeProcess

T = TypeVar("T")


def _scale() -> int:
    text = os.environ.get("KVRPC_FAULTS_SCALE", "1")
    try:
        value = int(text)
    except ValueError:
        message = f"KVRPC_FAULTS_SCALE must be a whole number, not {text!r}"
        raise pytest.UsageError(message) from None
    if value < 1:
        raise pytest.UsageError(f"KVRPC_FAULTS_SCALE must be at least 1, not {value}")
    return value


#: How many times longer than in CI the campaigns run (``KVRPC_FAULTS_SCALE``).
SCALE = _scale()

#: Seconds any awaited event may take before a campaign gives up and fails: the bound on a
#: hang, far above the time the event takes on a loaded 2-core machine.
WAIT = 30.0

#: The transports ``kvrpc serve`` is killed on: a Unix socket, ZeroMQ over ipc, and ZeroMQ over
#: loopback TCP, with a token file and with ``--insecure``.
TRANSPORTS = ("unix", "zmq+ipc", "zmq+tcp-token", "zmq+tcp-insecure")


def scaled(n: int) -> int:
    """``n`` repetitions, times the campaign scale."""
    return n * SCALE


def free_port() -> int:
    """A loopback TCP port nobody listens on now (the server binds it again after a restart)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def token_file(directory: str | Path) -> str:
    """A fresh mode-0600 token file in ``directory``."""
    path = os.path.join(directory, f"token-{secrets.token_hex(4)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    return path


def server_for(transport: str, directory: str, *options: str) -> ServeProcess:
    """A (not yet started) ``kvrpc serve`` on ``transport`` with its sockets in ``directory``."""
    token = None
    if transport == "unix":
        url = f"unix://{directory}/kv.sock"
    elif transport == "zmq+ipc":
        url = f"zmq+ipc://{directory}/kv.sock"
    else:
        url = f"zmq+tcp://127.0.0.1:{free_port()}"
        token = token_file(directory) if transport == "zmq+tcp-token" else None
    return ServeProcess(url, *options, log_dir=directory, auth_token_file=token)


def wait_until(read: Callable[[], T], done: Callable[[T], bool], what: str) -> T:
    """:func:`kv.conftest.wait_until` with the campaigns' longer ``WAIT``."""
    return kv_wait_until(read, done, what, WAIT)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def serve(sock_dir: str) -> Iterator[Callable[..., ServeProcess]]:
    """Start ``kvrpc serve`` on a transport, with options; every server stopped at the end."""
    started: list[ServeProcess] = []

    def start(transport: str, *options: str) -> ServeProcess:
        server = server_for(transport, sock_dir, *options)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
