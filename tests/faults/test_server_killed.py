"""``kvrpc serve`` SIGKILLed with calls in flight, on every socket transport.

Every call in flight when the server dies fails with ``ConnectionLost``: none is answered by
its deadline's ``RequestTimeout`` (which would mean the loss went unnoticed), none hangs, none
is left pending. The same clients then call a restarted server on the same URL.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from kvrpc.client import SyncClient
from kvrpc.errors import ConnectionLost
from kvrpc.futures import MessagingFuture
from kvrpc.kv import kv_registry
from kvrpc.protocol import ECHO, PING
from kvrpc.testing.serve import ServeProcess

from .conftest import WAIT, scaled

pytestmark = pytest.mark.faults

CLIENTS = 3
IN_FLIGHT = 100  # calls per client sent to a stopped server, so surely in flight at the kill
# A deadline no call reaches in a campaign that works: a RequestTimeout is a lost call.
CALL_TIMEOUT = 4 * WAIT


def _clients(server: ServeProcess) -> list[SyncClient]:
    return [
        SyncClient(
            server.url, registry=kv_registry(), timeout=CALL_TIMEOUT, **server.client_options()
        )
        for _ in range(CLIENTS)
    ]


def _outcome(future: MessagingFuture[object]) -> str:
    """'answered', 'lost' (ConnectionLost), or the test fails naming what else happened."""
    try:
        answer = future.result(WAIT * 2)
    except ConnectionLost:
        return "lost"
    except TimeoutError as exc:  # RequestTimeout is one; so is the wait above running out
        pytest.fail(f"a call in flight at the kill was not failed with ConnectionLost: {exc!r}")
    assert answer in ("pong", b"x" * 1024), f"a wrong answer: {answer!r}"
    return "answered"


def _call_again_after_restart(server: ServeProcess, clients: list[SyncClient]) -> None:
    server.start()
    for client in clients:
        assert client.call(PING, timeout=WAIT) == "pong"
        assert client.call(ECHO, b"y" * 4096, timeout=WAIT) == b"y" * 4096


def test_calls_in_flight_when_the_server_is_killed_all_fail_with_connection_lost(
    serve: Callable[..., ServeProcess], transport: str
) -> None:
    server = serve(transport)
    clients = _clients(server)
    try:
        for _ in range(scaled(2)):
            assert all(client.call(PING, timeout=WAIT) == "pong" for client in clients)
            server.pause()  # the calls below are sent, and none can be answered
            in_flight = [
                client.submit(ECHO if i % 2 else PING, *([b"x" * 1024] if i % 2 else []))
                for client in clients
                for i in range(IN_FLIGHT)
            ]
            server.kill()
            outcomes = [_outcome(future) for future in in_flight]
            assert outcomes == ["lost"] * len(in_flight)
            _call_again_after_restart(server, clients)
    finally:
        for client in clients:
            client.close()


def test_a_server_killed_under_a_stream_of_calls_leaves_each_answered_or_lost(
    serve: Callable[..., ServeProcess], transport: str
) -> None:
    """Calls keep coming while the server dies: each is answered, or fails ConnectionLost."""
    server = serve(transport)
    clients = _clients(server)
    stop = threading.Event()
    answered_before_kill = threading.Semaphore(0)
    futures: list[list[MessagingFuture[object]]] = [[] for _ in clients]

    def stream(index: int) -> None:
        client = clients[index]
        while not stop.is_set():
            window = [client.submit(PING) for _ in range(20)]
            futures[index] += window
            try:
                window[-1].result(WAIT * 2)
                answered_before_kill.release()
            except (ConnectionLost, TimeoutError):
                pass  # judged below, with every other call

    try:
        for _ in range(scaled(2)):
            threads = [threading.Thread(target=stream, args=(i,)) for i in range(CLIENTS)]
            stop.clear()
            for thread in threads:
                thread.start()
            for _ in range(CLIENTS * 3):  # every client has had windows answered
                assert answered_before_kill.acquire(timeout=WAIT)
            server.kill()
            lost_seen = [f for fs in futures for f in fs if f.done() and f.exception() is not None]
            # Calls sent after the kill and before the restart may wait for it (zmq queues
            # them for the reconnection): the restart comes before they are judged.
            server.start()
            stop.set()
            for thread in threads:
                thread.join(WAIT * 3)
                assert not thread.is_alive(), "a client's stream of calls hung"
            outcomes = [_outcome(f) for fs in futures for f in fs]
            assert "answered" in outcomes
            assert all(isinstance(f.exception(), ConnectionLost) for f in lost_seen)
            for each in futures:
                each.clear()
            while answered_before_kill.acquire(blocking=False):
                pass
            for client in clients:
                assert client.call(PING, timeout=WAIT) == "pong"
    finally:
        stop.set()
        for client in clients:
            client.close()
