"""Ownership and per-client caps end to end, over a real Unix socket.

A second client names the first one's instance, session and prefetch job: every call is
refused with a clear error and the first client's state is untouched. A second *process*
that learned the first client's id is refused too: on ``unix://`` the server binds a client
id to the process (uid, pid from ``SO_PEERCRED``) that first used it. A client at a cap gets
``CLIENT_LIMIT`` over the wire while another client carries on. The rules themselves are
tested as plain calls in ``test_caps.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvrpc.errors import ClientLimitReached, NotOwner, Status, UnknownInstance, UnknownJob
from kvrpc.kv import KeyBatch
from kvrpc.kv import protocols as kv

from .conftest import (
    OK,
    KVServer,
    RawClient,
    chunk_hashes,
    rows,
    start_kv_server,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def serve(sock_dir: str) -> Iterator[Callable[..., KVServer]]:
    """Start KV servers on Unix sockets with given settings; stopped after the test."""
    servers: list[KVServer] = []

    def start(**settings: Any) -> KVServer:
        running = start_kv_server(f"unix://{sock_dir}/kv-{len(servers)}.sock", **settings)
        servers.append(running)
        return running

    yield start
    for running in servers:
        running.stop()


@pytest.fixture
def clients(serve: Callable[..., KVServer]) -> Iterator[Callable[[KVServer], RawClient]]:
    """Raw clients of a server, closed after the test (before the servers stop)."""
    made: list[RawClient] = []

    def connect(server: KVServer) -> RawClient:
        made.append(RawClient(server.url))
        return made[-1]

    yield connect
    for client in reversed(made):
        client.close()


def test_another_client_can_never_name_this_ones_instance_session_or_job(
    serve: Callable[..., KVServer],
    clients: Callable[[KVServer], RawClient],
    kv_cache: Callable[..., list[torch.Tensor]],
    tmp_path: Path,
) -> None:
    server = serve(slots=4, disk_dir=tmp_path / "disk")
    owner, intruder = clients(server), clients(server)
    worker = owner.register(0, kv_cache())
    on_disk = chunk_hashes(2, seed=1)
    assert worker.store(on_disk, 0) == [OK] * 2
    wait_until(server.stats, lambda s: s["tier_saves"] >= 2, "the disk saves")
    assert worker.store(chunk_hashes(4, seed=2), 8) == [OK] * 4  # evicts on_disk
    # Their saves pin their slots until written: the prefetch needs a slot to load into.
    wait_until(server.stats, lambda s: s["tier_saves"] >= 6, "the second disk saves")
    in_l1 = chunk_hashes(4, seed=2)[:1]
    assert owner.lookup_count("session", in_l1) == 1
    job = owner.lookup("job", on_disk)
    assert isinstance(job, str), "the lookup should have started a prefetch from disk"
    # Once the job has loaded and pinned both chunks, nothing changes but what calls change.
    before = wait_until(
        server.stats,
        lambda s: s["prefetched"] >= 2 and s["pinned_chunks"] == 3,
        "the prefetch to load and pin both chunks",
    )

    keys = worker.keys(in_l1)
    lookup_keys = KeyBatch.from_hashes(owner.model, owner.world_size, None, in_l1)
    with pytest.raises(UnknownInstance, match="for this client"):
        intruder.call(kv.STORE, worker.instance, keys, rows(20, 1), [])
    with pytest.raises(UnknownInstance, match="for this client"):
        intruder.call(kv.RETRIEVE, worker.instance, ["session"], keys, rows(20, 1))
    with pytest.raises(NotOwner, match="another client's KV cache"):
        intruder.call(kv.UNREGISTER_KV_CACHE, worker.instance)
    with pytest.raises(NotOwner, match="another client's open session"):
        intruder.lookup("session", in_l1)
    with pytest.raises(NotOwner, match="another client's open session"):
        intruder.end_session("session")
    with pytest.raises(NotOwner, match="another client's open session"):
        intruder.call(kv.RELEASE_PINS, "session", lookup_keys)
    with pytest.raises(UnknownJob):
        intruder.query(job)

    after = server.stats()
    assert after["not_owner"] == before["not_owner"] + 4  # the NOT_OWNER refusals, counted
    for field in ("instances", "sessions", "pinned_chunks", "prefetch_jobs_open"):
        assert after[field] == before[field], field
    # The owner's state works as before: its job's count, its session, its instance.
    count = wait_until(lambda: owner.query(job), lambda n: n is not None, "the job's count")
    assert count == 2
    assert worker.round_trips(in_l1, 8, 40)
    assert owner.end_session("session") == 1
    assert owner.call(kv.UNREGISTER_KV_CACHE, worker.instance) is True


_INTRUDER = """
import sys
from kvrpc.client import SyncClient
from kvrpc.errors import KvrpcError
from kvrpc.kv import kv_registry
from kvrpc.kv import protocols as kv

url, stolen, instance = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
own = b"another-process!"
client = SyncClient(url, registry=kv_registry(), timeout=5.0)
calls = [
    ("own keepalive", kv.KEEPALIVE, own),
    ("keepalive", kv.KEEPALIVE, stolen),
    ("end_session", kv.END_SESSION, stolen, "test-model", 2, "session"),
    ("unregister", kv.UNREGISTER_KV_CACHE, stolen, instance),
    ("goodbye", kv.GOODBYE, stolen),
]
try:
    for name, protocol, *args in calls:
        try:
            client.call(protocol, *args)
            print(name, "ok", flush=True)
        except KvrpcError as exc:
            print(name, int(exc.status), flush=True)
finally:
    client.close()
"""


def test_another_process_with_this_clients_id_is_refused_and_changes_nothing(
    serve: Callable[..., KVServer],
    clients: Callable[[KVServer], RawClient],
    kv_cache: Callable[..., list[torch.Tensor]],
) -> None:
    server = serve()
    owner = clients(server)
    worker = owner.register(0, kv_cache())
    hashes = chunk_hashes(1, seed=3)
    assert worker.store(hashes, 0) == [OK]
    assert owner.lookup_count("session", hashes) == 1

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "transports" / "zmq"), str(ROOT / "transports" / "unix"), str(ROOT)]
    )
    done = subprocess.run(
        [sys.executable, "-c", _INTRUDER, server.url, owner.client_id.hex(), str(worker.instance)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )
    answers = dict(line.rsplit(" ", 1) for line in done.stdout.splitlines())
    refused = str(int(Status.NOT_OWNER))
    assert answers == {
        "own keepalive": "ok",  # the process talks to the server: it is refused, not lost
        "keepalive": refused,
        "end_session": refused,
        "unregister": refused,
        "goodbye": refused,
    }, done.stderr
    stats = server.stats()
    assert (stats["instances"], stats["sessions"], stats["pinned_chunks"]) == (1, 1, 1)
    assert worker.round_trips(hashes, 0, 30)  # the owner, in its own process, carries on
    assert owner.end_session("session") == 1


def test_a_client_at_a_cap_gets_client_limit_while_another_carries_on(
    serve: Callable[..., KVServer],
    clients: Callable[[KVServer], RawClient],
    kv_cache: Callable[..., list[torch.Tensor]],
) -> None:
    server = serve(max_sessions_per_client=2, max_registrations_per_client=1)
    busy, calm = clients(server), clients(server)
    layers = kv_cache()
    worker = busy.register(0, layers)
    with pytest.raises(ClientLimitReached, match="--max-registrations-per-client") as refused:
        busy.register(1, kv_cache())
    assert refused.value.status == Status.CLIENT_LIMIT
    hashes = chunk_hashes(2, seed=4)
    assert worker.store(hashes, 0) == [OK] * 2
    assert busy.lookup_count("r1", hashes) == 2
    assert busy.lookup_count("r2", hashes[:1]) == 1
    with pytest.raises(ClientLimitReached, match="--max-sessions-per-client"):
        busy.lookup("r3", hashes)

    stats = server.stats()
    assert (stats["instances"], stats["sessions"], stats["pinned_chunks"]) == (1, 2, 2)
    assert stats["client_limits"] == 2
    calm.register(1, kv_cache())  # the other client's own allowance
    assert calm.lookup_count("r3", hashes) == 0  # rank 1 holds none of them: a count, no cap
    assert busy.end_session("r1") == 2
    assert busy.lookup_count("r4", hashes) == 0  # a freed session; rank 1 now counts too
    assert worker.round_trips(hashes, 0, 30)
