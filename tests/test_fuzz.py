"""The fuzz suite: a real ``kvrpc serve`` under junk from many hostile peers, per transport.

The server must never die, must keep answering a well-behaved client's pings throughout, and
its memory and descriptors must stay bounded. ``KVRPC_FUZZ_INPUTS`` sets the inputs per
transport (``nox -s fuzz`` runs a third of a million each: a million in all).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping

import pytest
from test_conformance import _free_port, _socket_path, raw_connect, unix_inputs, zmtp_inputs

from kvrpc.kv.protocols import KV_PROTOCOLS
from kvrpc.protocol import ProtocolRegistry
from kvrpc.testing.fuzz import fuzz_server

INPUTS = int(os.environ.get("KVRPC_FUZZ_INPUTS", "50000"))
SEED = int(os.environ.get("KVRPC_FUZZ_SEED", "12"))
CAP = 256 * 1024 * 1024  # kvrpc serve's max_message_size

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

CASES: dict[str, tuple[Callable[[], str], Callable[[int], Mapping[str, bytes]]]] = {
    "unix": (lambda: f"unix://{_socket_path()}", unix_inputs),
    "zmq+ipc": (lambda: f"zmq+ipc://{_socket_path()}", zmtp_inputs),
    "zmq+tcp": (lambda: f"zmq+tcp://127.0.0.1:{_free_port()}", zmtp_inputs),
}


@pytest.fixture(params=sorted(CASES))
def served(request: pytest.FixtureRequest) -> Iterator[tuple[str, subprocess.Popen[str], str]]:
    make_url, _ = CASES[request.param]
    url = make_url()
    child = subprocess.Popen(
        [sys.executable, "-m", "kvrpc", "serve", "--url", url, "--chunk-size", "16",
         "--cpu-buffer-size", "0.01", "--client-timeout", "2", "--insecure"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        ready = child.stdout.readline()
        assert ready.startswith(f"kvrpc ready {url}"), child.stderr.read() if child.stderr else ""
        yield request.param, child, url
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
        child.communicate(timeout=60)


def test_a_server_under_junk_from_many_peers_lives_answers_and_stays_bounded(
    served: tuple[str, subprocess.Popen[str], str],
) -> None:
    scheme, child, url = served
    names = [p.name for p in KV_PROTOCOLS] + ProtocolRegistry.with_builtins().names()
    report = fuzz_server(
        url,
        inputs=INPUTS,
        pid=child.pid,
        peers=8,
        seed=SEED,
        names=names,
        raw_connect=raw_connect,
        wire_prefixes=list(CASES[scheme][1](CAP).values()),
    )
    summary = json.dumps(report.as_dict())
    print(summary)
    assert report.server_alive and child.poll() is None, summary
    assert report.inputs >= INPUTS and report.peer_errors == [], summary
    assert report.wire_inputs > 0 and report.reconnects > 0, summary
    assert report.ping_failures == [], summary
    assert report.pings >= 10, summary
    # Bounded: the second half of the run may not grow the server as a leak would.
    assert report.rss_end_bytes - report.rss_half_bytes < 48 * 1024 * 1024, summary
    assert report.fds_end <= report.fds_start + 4, summary
    stats = subprocess.run(
        [sys.executable, "-m", "kvrpc", "stats", url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert stats.returncode == 0, stats.stderr
    counters = json.loads(stats.stdout)["rpc"]
    assert counters["malformed"] + counters["error_replies"] > INPUTS // 10, counters
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 0, stderr[-3000:]
