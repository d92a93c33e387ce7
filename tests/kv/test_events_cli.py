"""``kvrpc events`` as a user runs it: a real ``kvrpc serve`` child, real stores from a client.

Each test starts a ``kvrpc serve`` process on a Unix socket, a ``kvrpc events`` process
subscribed to it, and stores chunks from this process through a raw KV client (KV caches
in shared memory). A subscription is known to be taken once its ``--snapshot`` ends (the
``snapshot_end`` line is printed), so every store the test makes after that line is one
the subscriber must tell of; the lines are read as they come, by a thread, and a deadline
only bounds a hang.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from kvrpc.kv.events_command import as_json, describe
from kvrpc.kv.protocols import EVENTS_DEFAULT_BUFFER, KVEvent
from kvrpc.kv.server.serving import GB
from kvrpc.testing.serve import ServeProcess

from .conftest import CHUNK, MODEL, OK, SLOT, WAIT, RawClient, RawWorker, chunk_hashes

KVRPC = [sys.executable, "-m", "kvrpc"]


class Events:
    """A ``kvrpc events`` child whose stdout lines are read by a thread as they come."""

    def __init__(self, url: str, *flags: str) -> None:
        self.process = subprocess.Popen(
            [*KVRPC, "events", url, *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)  # the child closed its stdout: it is exiting

    def line(self) -> str:
        """The next line printed; fails if the child exits first or prints none in time."""
        got = self.poll(3 * WAIT)
        if got is None:
            pytest.fail(f"kvrpc events printed nothing more within {3 * WAIT}s")
        return got

    def poll(self, timeout: float) -> str | None:
        """The next line printed, or None if none came within ``timeout`` seconds.

        Fails if the child exited instead.
        """
        try:
            got = self._lines.get(timeout=timeout)
        except queue.Empty:
            return None
        if got is None:
            self._lines.put(None)
            pytest.fail(f"kvrpc events exited first; stderr: {self.finish()[1]}")
        return got

    def lines_until(self, last: Callable[[str], bool]) -> list[str]:
        """Lines up to and including the first for which ``last`` holds."""
        seen = [self.line()]
        while not last(seen[-1]):
            seen.append(self.line())
        return seen

    def finish(self) -> tuple[int, str]:
        """Wait for the child to exit: its status and its stderr."""
        assert self.process.stderr is not None
        status = self.process.wait(timeout=3 * WAIT)
        return status, self.process.stderr.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=3 * WAIT)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def serve(sock_dir: str, tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Start ``kvrpc serve`` children with chunks of 8 tokens and ``slots`` pool slots."""
    started: list[ServeProcess] = []

    def start(slots: int = 64) -> ServeProcess:
        url = f"unix://{sock_dir}/kv{len(started)}.sock"
        size = repr(slots * SLOT / GB)
        server = ServeProcess(
            url, "--chunk-size", str(CHUNK), "--cpu-buffer-size", size, log_dir=str(tmp_path)
        )
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def events() -> Iterator[Callable[..., Events]]:
    """Start ``kvrpc events`` children; each is killed after the test if still running."""
    started: list[Events] = []

    def start(url: str, *flags: str) -> Events:
        child = Events(url, *flags)
        started.append(child)
        return child

    yield start
    for child in started:
        child.close()


@pytest.fixture
def writer(kv_cache: Callable[..., list[torch.Tensor]]) -> Iterator[Callable[..., RawWorker]]:
    """Register rank 0 of a one-rank model on a server: a raw worker to store through."""
    clients: list[RawClient] = []

    def make(url: str, model: str = MODEL) -> RawWorker:
        client = RawClient(url, model=model, world_size=1)
        clients.append(client)
        return client.register(0, kv_cache())

    yield make
    for client in clients:
        client.close()


def is_end(line: str) -> bool:
    return " snapshot_end " in line


def is_json_end(line: str) -> bool:
    return json.loads(line)["kind"] == "snapshot_end"


def test_stores_and_evictions_appear_as_lines_and_count_ends_it(
    serve: Callable[..., ServeProcess],
    events: Callable[..., Events],
    writer: Callable[..., RawWorker],
) -> None:
    server = serve(slots=4)
    worker = writer(server.url)
    a, b = chunk_hashes(3, 1), chunk_hashes(2, 2)
    # An empty cache: the snapshot is its end alone; then the two stores and one eviction.
    watcher = events(server.url, "--snapshot", "--count", "4")
    assert is_end(watcher.line())
    assert worker.store(a, 0) == [OK] * 3
    assert worker.store(b, 8) == [OK] * 2  # room for 4: the oldest of a goes
    stored_a, evicted, stored_b = watcher.line(), watcher.line(), watcher.line()
    assert stored_a.split()[:3] == ["1", "stored", "l1"]
    assert f"{MODEL} ws=1 rank 0: 3 chunks of {CHUNK} tokens, first {a[0].hex()[:12]}" in stored_a
    assert evicted.split()[:2] == ["2", "removed"]  # room is made first, then b is stored
    assert f"1 chunk of {CHUNK} tokens, first {a[0].hex()[:12]} (evicted)" in evicted
    assert stored_b.split()[:2] == ["3", "stored"] and f"first {b[0].hex()[:12]}" in stored_b
    assert watcher.finish() == (0, "")  # --count 4: the end of the snapshot and three events


def test_json_lines_parse_and_a_snapshot_lists_what_is_held(
    serve: Callable[..., ServeProcess],
    events: Callable[..., Events],
    writer: Callable[..., RawWorker],
) -> None:
    server = serve()
    worker = writer(server.url)
    held = chunk_hashes(4, 3)
    assert worker.store(held, 0) == [OK] * 4
    watcher = events(server.url, "--snapshot", "--json")
    snapshot = [json.loads(line) for line in watcher.lines_until(is_json_end)]
    *chunks, end = snapshot
    assert {h for event in chunks for h in event["hashes"]} == {h.hex() for h in held}
    assert all(e["kind"] == "snapshot" and e["tier"] == "l1" for e in chunks)
    assert all((e["model_name"], e["world_size"], e["worker_id"]) == (MODEL, 1, 0) for e in chunks)
    assert all(e["chunk_tokens"] == CHUNK and len(e["namespace"]) == 16 for e in chunks)
    assert end["kind"] == "snapshot_end" and end["seq"] == chunks[0]["seq"]
    later = chunk_hashes(1, 4)
    assert worker.store(later, 8) == [OK]
    live = json.loads(watcher.line())
    assert (live["kind"], live["seq"], live["hashes"]) == (
        "stored",
        end["seq"] + 1,
        [later[0].hex()],
    )


def test_without_snapshot_only_live_events_come_and_a_namespace_filter_keeps_its_own(
    serve: Callable[..., ServeProcess],
    events: Callable[..., Events],
    writer: Callable[..., RawWorker],
) -> None:
    server = serve()
    ours, theirs = writer(server.url, "model-a"), writer(server.url, "model-b")
    assert ours.store(chunk_hashes(2, 5), 0) == [OK, OK]
    # The namespace id of model-a, as the JSON lines write it.
    probe = events(server.url, "--snapshot", "--json", "--count", "2")
    namespace = json.loads(probe.line())["namespace"]
    assert probe.finish()[0] == 0
    watcher = events(server.url, "--json", "--namespace", namespace)
    # Without a snapshot nothing marks the subscription taken: store marker chunks of
    # model-a until the first of them is printed; every store after that is seen.
    # (How long each wait lasts decides only how many markers are stored, not the outcome.)
    first = None
    for marker in range(50):
        assert ours.store(chunk_hashes(1, 100 + marker), 8) == [OK]
        first = watcher.poll(WAIT / 20)
        if first is not None:
            break
    assert first is not None, "kvrpc events never printed a marker store"
    assert json.loads(first)["kind"] == "stored"  # live, not a snapshot of model-a's chunks
    # Seen so far: markers only. Model-b's store goes first, but only model-a's comes.
    mine = chunk_hashes(3, 6)
    assert theirs.store(chunk_hashes(2, 7), 0) == [OK, OK]
    assert ours.store(mine, 16) == [OK] * 3
    got = [json.loads(line) for line in watcher.lines_until(lambda s: mine[0].hex() in s)]
    assert all(e["namespace"] == namespace for e in got)
    assert all(e["model_name"] == "model-a" for e in got)


def test_a_subscriber_stopped_past_its_buffer_prints_a_gap_naming_the_lost_range(
    serve: Callable[..., ServeProcess],
    events: Callable[..., Events],
    writer: Callable[..., RawWorker],
) -> None:
    server = serve(slots=8)
    worker = writer(server.url)
    # A buffer above the 2 events one store publishes at once (its evictions, then the
    # store), or each store would overflow it before any subscriber could take them.
    watcher = events(server.url, "--snapshot", "--buffer", "16")
    assert is_end(watcher.line())
    watcher.process.send_signal(signal.SIGSTOP)  # it reads nothing now
    try:
        # The first store fills the pool of 8; each later one is 8 evictions (one event)
        # and a store: 2 events. 399 in all: more than the client's window (256), the
        # handler's batch (32) and the buffer (16) can hold.
        for i in range(200):
            assert worker.store(chunk_hashes(8, 200 + i), 0) == [OK] * 8
    finally:
        watcher.process.send_signal(signal.SIGCONT)
    gap = watcher.lines_until(lambda line: line.split()[1] == "gap")[-1]
    words = gap.split()
    first, last = int(words[3]), int(words[5])
    assert 1 < first <= last == int(words[0]) < 399
    assert "--snapshot" in gap
    # After the gap: the newest events, numbered on from it, up to the last one.
    after = watcher.lines_until(lambda line: line.split()[0] == "399")
    assert [int(line.split()[0]) for line in after] == list(range(last + 1, 400))


def test_ctrl_c_exits_0_and_a_server_that_goes_away_exits_1_saying_so(
    serve: Callable[..., ServeProcess], events: Callable[..., Events]
) -> None:
    server = serve()
    interrupted = events(server.url, "--snapshot")
    stopped = events(server.url, "--snapshot")
    assert is_end(interrupted.line()) and is_end(stopped.line())
    interrupted.process.send_signal(signal.SIGINT)
    assert interrupted.finish() == (0, "")
    server.stop()  # SIGTERM: the server ends its streams as it shuts down
    status, err = stopped.finish()
    assert status == 1
    assert f"kvrpc events: {server.url} ended the event stream after 1 event" in err
    assert "shutting down" in err and "Traceback" not in err


def test_a_killed_server_ends_it_with_status_1_and_a_clear_message(
    serve: Callable[..., ServeProcess], events: Callable[..., Events]
) -> None:
    server = serve()
    watcher = events(server.url, "--snapshot")
    assert is_end(watcher.line())
    server.kill()
    status, err = watcher.finish()
    assert status == 1
    assert f"kvrpc events: lost the connection to {server.url} after 1 event" in err
    assert "Traceback" not in err


def test_no_server_or_a_server_without_kv_events_fails_with_a_message(
    sock_dir: str, events: Callable[..., Events]
) -> None:
    nobody = events(f"unix://{sock_dir}/none.sock", "--timeout", "2")
    status, err = nobody.finish()
    assert status == 1 and "is the server running?" in err and "Traceback" not in err
    url = f"unix://{sock_dir}/plain.sock"
    with subprocess.Popen(
        [sys.executable, "-m", "kvrpc.testing", url], stdout=subprocess.PIPE, text=True
    ) as plain:
        try:
            assert plain.stdout is not None and plain.stdout.readline() == "ready\n"
            status, err = events(url).finish()
        finally:
            plain.terminate()
    assert status == 1
    assert f"kvrpc events: {url} serves no kv.events" in err and "Traceback" not in err


def test_the_buffer_help_names_the_servers_default() -> None:
    done = subprocess.run([*KVRPC, "events", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert f"(default: the server's, {EVENTS_DEFAULT_BUFFER})" in " ".join(done.stdout.split())


# ------------------------------------------------------------------ the lines, without a server


def test_each_kind_reads_as_a_line_and_json_writes_bytes_as_hex() -> None:
    digest = bytes(range(32))
    moved = KVEvent(
        kind="moved", seq=7, tier="disk", namespace=b"\x01" * 8, worker_id=1,
        hashes=[digest], chunk_tokens=16, source="l1",
    )  # fmt: skip
    assert describe(moved) == (
        "       7 moved        disk  namespace 0101010101010101 rank 1: 1 chunk of 16 tokens, "
        "first 000102030405 (from l1)"
    )
    gap = KVEvent(kind="gap", seq=40, first=20, last=40)
    assert "events 20 to 40 were lost" in describe(gap)
    assert describe(KVEvent(kind="cleared", seq=3, tier="l1")).split() == [
        "3", "cleared", "l1", "holds", "no", "chunk", "now",
    ]  # fmt: skip
    fields = as_json(moved)
    assert json.loads(json.dumps(fields)) == fields
    assert (fields["namespace"], fields["hashes"]) == ("01" * 8, [digest.hex()])
    assert set(fields) == set(KVEvent.model_fields)
