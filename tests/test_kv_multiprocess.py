"""The KV-cache service across processes: a ``kvrpc serve`` child, two worker processes
(TP=2) with KV caches in shared memory, and the scheduler in the test process, over real
zmq and unix sockets.
"""

from __future__ import annotations

import ctypes
import hashlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvrpc.client import SyncClient
from kvrpc.errors import KVConfigError, KVError
from kvrpc.kv import LoadStoreOp, PollingSchedulerAdapter, WorkerAdapter, kv_registry
from kvrpc.kv import protocols as kv
from kvrpc.protocol import PING

WORLD_SIZE = 2
BLOCK_SIZE = 4
CHUNK_SIZE = 8  # two blocks per chunk
NUM_BLOCKS = 128
LAYER_SHAPE = (2, NUM_BLOCKS, BLOCK_SIZE, 2, 8)
LAYERS = 3
CHUNK_BYTES = (
    LAYERS * 2 * 2 * BLOCK_SIZE * 2 * 8 * 2
)  # layers, K/V, blocks, tokens, heads, dim, fp16
MODEL = "mp-model"


# ---------------------------------------------------------------------- worker processes


def _worker_main(url: str, rank: int, pipe: multiprocessing.connection.Connection) -> None:
    """A stand-in engine worker: answers commands from the test over a pipe."""
    from kvrpc.kv import LoadStoreOp, WorkerAdapter, shared_empty

    layers = [shared_empty(LAYER_SHAPE, torch.float16) for _ in range(LAYERS)]
    adapter = WorkerAdapter(url, MODEL, WORLD_SIZE, rank, BLOCK_SIZE, keepalive_interval=0.2)
    adapter.register_kv_caches({f"layer{i}": t for i, t in enumerate(layers)})
    pipe.send(os.getpid())

    def digest(block_ids: list[int]) -> str:
        ids = torch.tensor(block_ids)
        h = hashlib.sha256()
        for layer in layers:
            part = layer[:, ids].contiguous()
            h.update(ctypes.string_at(part.data_ptr(), part.numel() * part.element_size()))
        return h.hexdigest()

    while (command := pipe.recv()) is not None:
        what, request_id, tokens, block_ids, end = command
        op = LoadStoreOp(block_ids, token_ids=tokens, end=end)
        if what == "store":
            generator = torch.Generator().manual_seed(sum(tokens) * 10 + rank)
            ids = torch.tensor(block_ids)
            for layer in layers:
                layer[:, ids] = torch.randn(
                    (2, len(block_ids), *LAYER_SHAPE[2:]), generator=generator
                ).half()
            adapter.submit_store_request(request_id, op)
            finished: set[str] = set()
            while request_id not in finished:
                finished |= adapter.get_finished({request_id})[0]
                time.sleep(0.001)
        else:
            for layer in layers:  # so that a retrieve that writes nothing cannot pass
                layer[:, torch.tensor(block_ids)] = 0
            adapter.submit_retrieve_request(request_id, op)
            finished = set()
            while request_id not in finished:
                finished |= adapter.get_finished(set())[1]
                time.sleep(0.001)
        n = (end or len(tokens)) // CHUNK_SIZE * (CHUNK_SIZE // BLOCK_SIZE)
        pipe.send((digest(block_ids[:n]), sorted(adapter.get_block_ids_with_load_errors())))


class Workers:
    """The test's handle on the worker processes."""

    def __init__(self, url: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[multiprocessing.connection.Connection] = []
        self.processes: list[Any] = []
        for rank in range(WORLD_SIZE):
            ours, theirs = context.Pipe()
            process = context.Process(target=_worker_main, args=(url, rank, theirs), daemon=True)
            process.start()
            self.pipes.append(ours)
            self.processes.append(process)
        self.pids = [self._answer(pipe) for pipe in self.pipes]

    @staticmethod
    def _answer(pipe: multiprocessing.connection.Connection) -> Any:
        assert pipe.poll(60), "a worker process did not answer within 60 s"
        return pipe.recv()

    def run(self, *command: Any, ranks: range = range(WORLD_SIZE)) -> list[Any]:
        for rank in ranks:
            self.pipes[rank].send(command)
        return [self._answer(self.pipes[rank]) for rank in ranks]

    def store(
        self, request_id: str, tokens: list[int], block_ids: list[int], **kw: Any
    ) -> list[Any]:
        return self.run("store", request_id, tokens, block_ids, 0, **kw)

    def retrieve(
        self, request_id: str, tokens: list[int], block_ids: list[int], end: int
    ) -> list[Any]:
        return self.run("retrieve", request_id, tokens, block_ids, end)

    def close(self) -> None:
        for pipe, process in zip(self.pipes, self.processes, strict=True):
            if process.is_alive():
                pipe.send(None)
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(params=["zmq+ipc", "unix"])
def scheme(request: pytest.FixtureRequest) -> str:
    return str(request.param)


ServerFactory = Callable[..., str]


@pytest.fixture
def start_server(scheme: str, tmp_path: Path) -> Iterator[ServerFactory]:
    """Start ``kvrpc serve`` in a child process; returns its URL."""
    children: list[subprocess.Popen[str]] = []

    def start(slots: int = 256, client_timeout: float = 2.0, disk: bool = False) -> str:
        path = tmp_path / f"kv{len(children)}.sock"
        url = f"{scheme}://{path}"
        size_gib = repr(slots * CHUNK_BYTES / 2**30)
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvrpc",
                "serve",
                "--url",
                url,
                "--chunk-size",
                str(CHUNK_SIZE),
                "--cpu-buffer-size",
                size_gib,
                "--client-timeout",
                str(client_timeout),
                *(["--disk-dir", str(tmp_path / f"disk{len(children)}")] if disk else []),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        children.append(child)
        assert child.stdout is not None
        assert child.stdout.readline().startswith(f"kvrpc ready {url}")
        return url

    yield start
    for child in children:
        child.send_signal(signal.SIGTERM)
        assert child.wait(15) == 0


@pytest.fixture
def stack(
    start_server: ServerFactory,
) -> Iterator[Callable[..., tuple[str, Workers, PollingSchedulerAdapter]]]:
    """A server, two workers and a scheduler, all closed at the end."""
    opened: list[Any] = []

    def make(**server_options: Any) -> tuple[str, Workers, PollingSchedulerAdapter]:
        url = start_server(**server_options)
        workers = Workers(url)
        opened.append(workers)
        scheduler = PollingSchedulerAdapter(
            url, MODEL, WORLD_SIZE, 0, BLOCK_SIZE, lookup_timeout=10, keepalive_interval=0.2
        )
        opened.append(scheduler)
        return url, workers, scheduler

    yield make
    for thing in reversed(opened):
        thing.close()


def _stats(url: str) -> dict[str, int]:
    with SyncClient(url, registry=kv_registry(), timeout=10) as client:
        result: dict[str, int] = client.call(kv.STATS)
        return result


def _lookup(scheduler: PollingSchedulerAdapter, request_id: str, tokens: list[int]) -> int:
    scheduler.maybe_submit_lookup_request(request_id, token_ids=tokens)
    return scheduler.check_lookup_result(request_id)


def _prompt(seed: int, chunks: int, extra: int = 3) -> list[int]:
    return [(seed * 7919 + i * 31) % 50000 for i in range(chunks * CHUNK_SIZE + extra)]


def _blocks(first: int, chunks: int) -> list[int]:
    return list(range(first, first + chunks * CHUNK_SIZE // BLOCK_SIZE + 1))


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# ---------------------------------------------------------------------- tests


def test_two_workers_store_then_a_lookup_hits_and_retrieve_into_other_blocks_is_byte_identical(
    stack: Callable[..., tuple[str, Workers, PollingSchedulerAdapter]],
) -> None:
    url, workers, scheduler = stack()
    prompt = _prompt(1, chunks=4)
    assert _lookup(scheduler, "first", prompt) == 0
    stored = workers.store("first", prompt, _blocks(0, 4))
    scheduler.end_session("first")

    assert _lookup(scheduler, "second", prompt) == 4 * CHUNK_SIZE
    assert _stats(url)["pinned_chunks"] == 4 * WORLD_SIZE
    retrieved = workers.retrieve("second", prompt, _blocks(20, 4), 4 * CHUNK_SIZE)

    assert [digest for digest, _ in retrieved] == [digest for digest, _ in stored]
    assert all(not errors for _, errors in retrieved)
    assert stored[0][0] != stored[1][0], "each rank stores its own KV"
    stats = _stats(url)
    assert stats["pinned_chunks"] == 0, "each retrieve released its rank's pins"
    assert (stats["stores"], stats["retrieves"], stats["hits"]) == (8, 8, 4)


def test_a_prompt_stored_by_one_rank_only_is_not_a_hit(
    stack: Callable[..., tuple[str, Workers, PollingSchedulerAdapter]],
) -> None:
    _, workers, scheduler = stack()
    prompt = _prompt(2, chunks=3)
    workers.run("store", "r", prompt, _blocks(0, 3), 0, ranks=range(1))
    assert _lookup(scheduler, "r", prompt) == 0
    workers.run("store", "r", prompt, _blocks(0, 3), 0, ranks=range(1, 2))
    assert _lookup(scheduler, "r2", prompt) == 3 * CHUNK_SIZE


def test_pins_survive_pressure_end_session_releases_them_and_then_lru_evicts(
    stack: Callable[..., tuple[str, Workers, PollingSchedulerAdapter]],
) -> None:
    url, workers, scheduler = stack(slots=8)  # 4 chunks x 2 ranks fill the pool
    first, second = _prompt(3, chunks=4), _prompt(4, chunks=4)
    stored = workers.store("a", first, _blocks(0, 4))
    assert _lookup(scheduler, "a", first) == 4 * CHUNK_SIZE  # pins all 8 slots

    workers.store("b", second, _blocks(20, 4))
    stats = _stats(url)
    assert stats["store_refused"] == 8 and stats["evictions"] == 0
    assert _lookup(scheduler, "b", second) == 0
    assert [d for d, _ in workers.retrieve("a", first, _blocks(40, 4), 4 * CHUNK_SIZE)] == [
        d for d, _ in stored
    ]

    scheduler.end_session("a")
    scheduler.end_session("b")
    assert _wait_for(lambda: _stats(url)["pinned_chunks"] == 0, 5)
    workers.store("b2", second, _blocks(20, 4))
    stats = _stats(url)
    assert stats["evictions"] == 8 and stats["chunks"] == 8
    assert _lookup(scheduler, "c", first) == 0
    assert _lookup(scheduler, "d", second) == 4 * CHUNK_SIZE


def test_a_killed_worker_releases_its_registration_and_its_ranks_pins(
    stack: Callable[..., tuple[str, Workers, PollingSchedulerAdapter]],
) -> None:
    url, workers, scheduler = stack(client_timeout=1.0)
    prompt = _prompt(5, chunks=3)
    workers.store("a", prompt, _blocks(0, 3))
    assert _lookup(scheduler, "a", prompt) == 3 * CHUNK_SIZE
    assert _stats(url)["pinned_chunks"] == 6

    os.kill(workers.pids[1], signal.SIGKILL)
    for leftover in Path("/dev/shm").glob(f"kvrpc-{workers.pids[1]}-*"):
        leftover.unlink()  # a killed process cannot remove its shared memory; its mappings live on
    assert _wait_for(lambda: _stats(url)["instances"] == 1, 10)
    stats = _stats(url)
    assert stats["pinned_chunks"] == 3, "rank 1's pins went with it; rank 0's stay"
    assert stats["clients_expired"] == 1
    # The server stays healthy for the others.
    assert _lookup(scheduler, "b", prompt) == 3 * CHUNK_SIZE


def test_a_lookup_of_chunks_evicted_to_the_disk_tier_prefetches_them_and_they_retrieve_intact(
    stack: Callable[..., tuple[str, Workers, PollingSchedulerAdapter]],
) -> None:
    url, workers, scheduler = stack(slots=8, disk=True)
    first, second = _prompt(6, chunks=4), _prompt(7, chunks=4)
    stored = workers.store("a", first, _blocks(0, 4))
    workers.store("b", second, _blocks(20, 4))  # evicts the first prompt from memory
    assert _stats(url)["evictions"] == 8
    # The disk tier writes behind the eviction: a lookup made before its files are all
    # written would find only the part already on disk.
    assert _wait_for(lambda: _stats(url)["tier_files"] >= 8, 10)

    assert _lookup(scheduler, "c", first) == 4 * CHUNK_SIZE  # through a prefetch job
    stats = _stats(url)
    assert stats["prefetch_jobs"] == 1 and stats["prefetched"] == 8
    assert stats["prefetch_jobs_open"] == 0, "the adapter took the job's result"
    retrieved = workers.retrieve("c", first, _blocks(40, 4), 4 * CHUNK_SIZE)
    assert [d for d, _ in retrieved] == [d for d, _ in stored]


def test_a_polling_lookup_that_times_out_answers_zero_and_leaves_nothing_on_the_server(
    stack: Callable[..., tuple[str, Workers, PollingSchedulerAdapter]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, workers, scheduler = stack()
    prompt = _prompt(8, chunks=4)
    workers.store("a", prompt, _blocks(0, 4))
    scheduler.lookup_timeout = 1e-6  # no reply can cross a socket in time

    with caplog.at_level("WARNING", logger="kvrpc.kv"):
        assert _lookup(scheduler, "late", prompt) == 0
    assert "computing it instead" in caplog.text
    with pytest.raises(KVError, match="no lookup was submitted"):
        scheduler.check_lookup_result("late")  # its state went with the timeout

    # The late lookup still pinned chunks on the server; the end_session the timeout sent
    # releases them once it arrives (it follows the lookup on the same connection).
    def released() -> bool:
        stats = _stats(url)
        return (stats["sessions"], stats["pinned_chunks"]) == (0, 0)

    assert _wait_for(released, 5)


def test_lookups_during_a_store_of_the_same_chunks_only_ever_see_whole_stored_chunks(
    stack: Callable[..., tuple[str, Workers, PollingSchedulerAdapter]],
) -> None:
    _, workers, scheduler = stack()
    chunks = 24
    prompt = _prompt(9, chunks=chunks)
    for pipe in workers.pipes:  # both ranks start storing; the scheduler looks up meanwhile
        pipe.send(("store", "s", prompt, _blocks(0, chunks), 0))
    answers = []
    while not all(pipe.poll() for pipe in workers.pipes):
        answers.append(_lookup(scheduler, f"r{len(answers)}", prompt))
        scheduler.end_session(f"r{len(answers) - 1}")
    stored = [workers._answer(pipe) for pipe in workers.pipes]
    final = _lookup(scheduler, "final", prompt)

    assert answers, "the store finished before a single lookup"
    assert all(0 <= a <= chunks * CHUNK_SIZE and a % CHUNK_SIZE == 0 for a in answers)
    assert answers == sorted(answers), "a chunk seen stored never disappears again"
    assert final == chunks * CHUNK_SIZE
    retrieved = workers.retrieve("final", prompt, _blocks(60, chunks), final)
    assert [d for d, _ in retrieved] == [d for d, _ in stored]


@pytest.mark.parametrize("adapter", [PollingSchedulerAdapter, WorkerAdapter])
def test_an_adapter_without_a_server_fails_at_once_naming_the_url_and_how_to_start_one(
    scheme: str, tmp_path: Path, adapter: type[Any]
) -> None:
    url = f"{scheme}://{tmp_path}/nobody.sock"
    started = time.monotonic()
    with pytest.raises(KVError) as refused:
        adapter(url, MODEL, WORLD_SIZE, 0, BLOCK_SIZE, connect_timeout=1.0)
    assert time.monotonic() - started < 5
    assert url in str(refused.value)
    assert f"kvrpc serve --url {url}" in str(refused.value)


def test_an_adapter_whose_block_size_does_not_divide_the_chunk_size_fails_at_start_up(
    start_server: ServerFactory,
) -> None:
    url = start_server()
    with pytest.raises(KVConfigError, match=r"\b8\b.*\b3\b|\b3\b.*\b8\b"):
        WorkerAdapter(url, MODEL, WORLD_SIZE, 0, 3)


def test_an_inline_retrieve_writes_its_blocks_off_the_client_loop_thread_which_stays_free(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Writing a retrieve's bytes into the KV tensors is the worker's own slow work: were it
    # done on the SyncClient's loop thread, this worker's other replies and its keepalives
    # would wait behind it. The scatter is held until the test lets it go, so the order of
    # what happens is fixed; the timeouts only bound a failure, they measure nothing.
    import kvrpc.kv.client.completions as completions

    url = start_server()
    layers = [torch.randn(LAYER_SHAPE).half() for _ in range(LAYERS)]
    worker = WorkerAdapter(url, "inline-model", 1, 0, BLOCK_SIZE, transfer_mode="inline")
    real = completions.scatter_chunks
    entered, release = threading.Event(), threading.Event()
    scattered_on: list[threading.Thread] = []

    def held_scatter(*args: Any) -> None:
        scattered_on.append(threading.current_thread())
        entered.set()
        release.wait(120)
        real(*args)

    try:
        worker.register_kv_caches({f"layer{i}": t for i, t in enumerate(layers)})
        prompt = _prompt(10, chunks=2)
        worker.submit_store_request("s", LoadStoreOp(_blocks(0, 2), token_ids=prompt))
        assert _wait_for(lambda: "s" in worker.get_finished({"s"})[0], 60)
        for layer in layers:
            layer[:, 20:24] = 0

        monkeypatch.setattr(completions, "scatter_chunks", held_scatter)
        progress = worker.submit_retrieve_request(
            "r", LoadStoreOp(_blocks(20, 2), token_ids=prompt)
        )
        try:
            assert entered.wait(60), "the retrieve's reply never reached the scatter"
            loop_thread = worker._link.client._thread
            assert scattered_on[0] is not loop_thread, "scattered on the client's loop thread"
            assert scattered_on[0] is not threading.current_thread()
            # While the scatter is held, the same client still gets its replies. Waited for
            # on this thread: the call's own timeout runs on the loop thread, which a held
            # scatter there would stop too.
            ping = worker._link.client.submit(PING)
            keepalive = worker._link.submit(kv.KEEPALIVE)
            assert ping.wait(60) and ping.result() == "pong", "a ping waited for the scatter"
            assert keepalive.wait(60) and keepalive.exception() is None
            assert not progress.done(), "reported finished before its blocks were written"
            assert "r" not in worker.get_finished(set())[1]
        finally:
            release.set()
        assert progress.wait(60)
        assert _wait_for(lambda: "r" in worker.get_finished(set())[1], 60)
        assert not worker.get_block_ids_with_load_errors()
        for layer in layers:
            assert torch.equal(layer[:, 20:24], layer[:, 0:4])
    finally:
        release.set()
        worker.shutdown()
