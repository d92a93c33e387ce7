"""The KV-cache service through real RPC: adapters and raw ``kv.*`` calls to a served KVService.

Each test starts its own server (``serve_kv`` on an ``inproc://`` address, in a thread with its
own event loop), so the adapters' SyncClients and the tests' AsyncClients talk to it exactly as
they would to ``kvrpc serve``. The KV caches are tiny: two layers of ``[2, 64, 4, 1, 8]``
float16 (64 blocks of 4 tokens), chunks of 8 tokens, so 2 blocks and 512 bytes per chunk.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import torch

from kvrpc import AsyncClient, RPCServer
from kvrpc.client import SyncClient
from kvrpc.cuda import CudaEventHandle
from kvrpc.errors import (
    CudaUnavailable,
    KVConfigError,
    KVError,
    NotSharedMemory,
    UnknownInstance,
    UnknownJob,
)
from kvrpc.kv import (
    KeyBatch,
    KVService,
    LoadStoreOp,
    PollingSchedulerAdapter,
    SchedulerAdapter,
    WorkerAdapter,
    hashes_from_tokens,
    kv_registry,
    release_shared,
    shared_empty,
)
from kvrpc.kv import protocols as kv
from kvrpc.kv.cuda_ipc import CudaIPCWrapper
from kvrpc.kv.layout import KVLayout, LayoutKind
from kvrpc.kv.protocols import KVCacheRegistration, RetrieveReply
from kvrpc.kv.server.serving import GB, KVServerSettings, serve_kv
from kvrpc.kv.shm import shared_ref
from kvrpc.protocol import PING, STATS
from kvrpc.server import PeerInfo
from kvrpc.transport import PeerCredentials

T = TypeVar("T")

MODEL = "test-model"
WORLD = 2
BLOCK = 4
CHUNK = 8
BPC = CHUNK // BLOCK  # blocks per chunk
NUM_BLOCKS = 64
LAYER_SHAPE = (2, NUM_BLOCKS, BLOCK, 1, 8)
LAYERS = 2
SLOT = LAYERS * 2 * BPC * BLOCK * 1 * 8 * 2  # bytes of one chunk: one pool slot
WAIT = 5.0  # seconds any expected event may take before a test gives up
CREDENTIALS = PeerCredentials(pid=1, uid=0, gid=0)

_names = itertools.count()


class Keep(Protocol):
    """The ``opened`` fixture: returns what it is given, and closes it after the test."""

    def __call__(self, thing: T, /) -> T: ...


# ------------------------------------------------------------------ the server


@dataclass(eq=False)
class KVServer:
    """A served KVService on its own loop thread; ``stall`` freezes that loop on purpose."""

    url: str
    server: RPCServer
    service: KVService
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    stats_client: SyncClient
    _release: threading.Event = field(default_factory=threading.Event)

    def stats(self) -> dict[str, int]:
        """``kv.stats`` from a client that owns nothing, so asking never counts as liveness."""
        answer: dict[str, int] = self.stats_client.call(kv.STATS)
        return answer

    def rpc_stats(self) -> dict[str, int]:
        """The RPC server's own counters (``in_flight``: requests not yet answered)."""
        answer: dict[str, int] = self.stats_client.call(STATS)
        return answer

    def ping(self) -> str:
        """``rpc.ping``: the server still answers."""
        answer: str = self.stats_client.call(PING, timeout=WAIT)
        return answer

    def wait_stats(self, what: str, **expected: int) -> dict[str, int]:
        """Poll ``kv.stats`` until every named counter has the expected value."""
        return wait_until(
            self.stats,
            lambda stats: all(stats[name] == value for name, value in expected.items()),
            what,
        )

    def stall(self) -> None:
        """Block the server's event loop (no request is handled) until :meth:`resume`."""
        self._release.clear()
        entered = threading.Event()

        def block() -> None:
            entered.set()
            self._release.wait(WAIT * 2)

        self.loop.call_soon_threadsafe(block)
        assert entered.wait(WAIT), "the server loop did not stall"

    def resume(self) -> None:
        """Let the stalled loop run again."""
        self._release.set()

    def settle(self, *adapters: WorkerAdapter | SchedulerAdapter) -> None:
        """Wait until every request the adapters sent so far is answered, and they saw it.

        A ping on an adapter's own connection is answered once the server has taken every
        earlier message of that connection (and started its handler); the server then counts
        a request in flight until its reply is handed to the client; a second ping comes back
        after those replies, whose completion callbacks have run by then.
        """
        for adapter in adapters:
            assert adapter._link.client.call(PING, timeout=WAIT) == "pong"
        wait_until(self.rpc_stats, lambda stats: stats["in_flight"] == 0, "requests answered")
        for adapter in adapters:
            assert adapter._link.client.call(PING, timeout=WAIT) == "pong"

    def stop(self) -> None:
        """Stop serving and join the thread."""
        self.resume()
        self.stats_client.close()
        self.server.stop()
        self.thread.join(WAIT * 2)
        assert not self.thread.is_alive(), "the KV server did not stop"


def start_kv_server(
    url: str, *, slots: int = 64, client_timeout: float = 10.0, disk_dir: Path | None = None
) -> KVServer:
    """Serve a KVService with a pool of ``slots`` chunk slots at ``url``, in a thread."""
    settings = KVServerSettings(
        url=url,
        chunk_size=CHUNK,
        cpu_buffer_size=slots * SLOT / GB,
        max_workers=2,
        client_timeout=client_timeout,
        disk_dir=None if disk_dir is None else str(disk_dir),
        disk_size=1 / 1024,
    )
    ready = threading.Event()
    started: dict[str, Any] = {}

    def on_ready(server: RPCServer, service: KVService) -> None:
        started.update(server=server, service=service, loop=asyncio.get_running_loop())
        ready.set()

    def run() -> None:
        try:
            asyncio.run(serve_kv(settings, on_ready=on_ready))
        except BaseException as exc:
            started["error"] = exc
            ready.set()
            raise

    thread = threading.Thread(target=run, name=f"kv-server {url}", daemon=True)
    thread.start()
    assert ready.wait(WAIT), "the KV server did not start"
    if "error" in started:
        raise started["error"]
    stats_client = SyncClient(url, registry=kv_registry(), timeout=WAIT)
    return KVServer(
        url, started["server"], started["service"], started["loop"], thread, stats_client
    )


@pytest.fixture(params=["inproc", "unix", "zmq+ipc"])
def start_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., KVServer]]:
    """Start KV servers with given settings; all are stopped after the test.

    Every test runs over each transport: over a socket the server takes requests straight
    from the transport's read callback, outside any task, which inproc does not show.
    """
    servers: list[KVServer] = []
    sockets = tmp_path_factory.mktemp("sockets")

    def start(**settings: Any) -> KVServer:
        name = f"kv-service-{next(_names)}"
        where = name if request.param == "inproc" else f"{sockets}/{name}.sock"
        running = start_kv_server(f"{request.param}://{where}", **settings)
        servers.append(running)
        return running

    yield start
    for running in servers:
        running.stop()


@pytest.fixture
def kv_server(start_server: Callable[..., KVServer]) -> KVServer:
    """A KV server with room for 64 chunks."""
    return start_server()


@pytest.fixture
def opened(start_server: Callable[..., KVServer]) -> Iterator[Keep]:
    """Keep adapters and clients to close after the test, before the servers stop."""
    things: list[Any] = []

    def keep(thing: T) -> T:
        things.append(thing)
        return thing

    yield keep
    for thing in reversed(things):
        thing.close()


@pytest.fixture
def kv_cache() -> Iterator[Callable[..., list[torch.Tensor]]]:
    """Per-layer KV tensors in shared memory, filled with random bits; released afterwards."""
    made: list[torch.Tensor] = []
    seeds = itertools.count(1)

    def make(shape: tuple[int, ...] = LAYER_SHAPE) -> list[torch.Tensor]:
        layers = [shared_empty(shape, torch.float16) for _ in range(LAYERS)]
        fill_random(layers, next(seeds))
        made.extend(layers)
        return layers

    yield make
    for tensor in made:
        release_shared(tensor)


# ------------------------------------------------------------------ helpers


def wait_until(get: Callable[[], T], ok: Callable[[T], bool], what: str) -> T:
    """Poll ``get()`` until ``ok`` holds for its value; fail naming ``what`` after WAIT s."""
    deadline = time.monotonic() + WAIT
    while True:
        value = get()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; last value {value!r}")
        time.sleep(0.005)


def fill_random(layers: list[torch.Tensor], seed: int) -> None:
    """Random bit patterns (as int16), so that every block differs from every other."""
    generator = torch.Generator().manual_seed(seed)
    for layer in layers:
        bits = torch.randint(-(2**15), 2**15, layer.shape, dtype=torch.int16, generator=generator)
        layer.view(torch.int16).copy_(bits)


def prompt(chunks: int, seed: int, extra: int = 0) -> list[int]:
    """Token ids of ``chunks`` whole chunks (plus ``extra`` tokens), different per seed."""
    return [seed * 100_000 + i for i in range(chunks * CHUNK + extra)]


def chunk_hashes(chunks: int, seed: int) -> list[bytes]:
    """The prefix-chained hashes of a ``chunks``-chunk prompt."""
    return hashes_from_tokens(prompt(chunks, seed), CHUNK)


def blocks(first: int, chunks: int) -> list[int]:
    """Block ids for ``chunks`` chunks, from block ``first`` on."""
    return list(range(first, first + chunks * BPC))


def same_blocks(layers: list[torch.Tensor], a: list[int], b: list[int]) -> bool:
    """Whether blocks ``a`` and ``b`` hold the same bits in every layer."""
    return all(
        torch.equal(layer.view(torch.int16)[:, a], layer.view(torch.int16)[:, b])
        for layer in layers
    )


def registration(
    rank: int,
    layers: list[torch.Tensor],
    *,
    model: str = MODEL,
    world_size: int = WORLD,
) -> KVCacheRegistration:
    """What a worker of ``rank`` sends to register ``layers`` (shared memory)."""
    return KVCacheRegistration(
        model_name=model,
        world_size=world_size,
        worker_id=rank,
        block_size=BLOCK,
        mode="shm",
        layout=KVLayout.from_tensors(layers),
        tensors=[shared_ref(t) for t in layers],
    )


def rows(first: int, chunks: int) -> torch.Tensor:
    """The block-id rows ``kv.store``/``kv.retrieve`` take: ``[chunks, BPC]`` int64."""
    return torch.tensor(blocks(first, chunks), dtype=torch.int64).view(chunks, BPC)


class RawClient:
    """``kv.*`` spoken directly with a client id of its own, to see what adapters only log.

    It sends no keepalives: it is alive only while it makes calls.
    """

    def __init__(self, url: str, *, model: str = MODEL, world_size: int = WORLD) -> None:
        self.sync = SyncClient(url, registry=kv_registry(), timeout=WAIT)
        self.client_id = secrets.token_bytes(16)
        self.model = model
        self.world_size = world_size

    def call(self, protocol: Any, *args: Any) -> Any:
        return self.sync.call(protocol, self.client_id, *args)

    def register(self, rank: int, layers: list[torch.Tensor]) -> RawWorker:
        spec = registration(rank, layers, model=self.model, world_size=self.world_size)
        return RawWorker(self, rank, self.call(kv.REGISTER_KV_CACHE, spec), layers)

    def lookup(self, request_id: str, hashes: list[bytes]) -> int | str:
        keys = KeyBatch.from_hashes(self.model, self.world_size, None, hashes)
        answer: int | str = self.call(kv.LOOKUP, request_id, keys)
        return answer

    def lookup_count(self, request_id: str, hashes: list[bytes]) -> int:
        """A lookup that must answer a count (no prefetch)."""
        answer = self.lookup(request_id, hashes)
        assert isinstance(answer, int), f"expected a count, got a prefetch job {answer!r}"
        return answer

    def probe(self, hashes: list[bytes]) -> int:
        """How many leading chunks are present, leaving no pins behind."""
        request_id = f"probe-{secrets.token_hex(4)}"
        count = self.lookup_count(request_id, hashes)
        self.end_session(request_id)
        return count

    def end_session(self, request_id: str) -> int:
        released: int = self.call(kv.END_SESSION, self.model, self.world_size, request_id)
        return released

    def query(self, job_id: str) -> int | None:
        answer: int | None = self.call(kv.QUERY_PREFETCH_STATUS, job_id)
        return answer

    def close(self) -> None:
        self.sync.close()


@dataclass(eq=False)
class RawWorker:
    """One registered KV cache of a :class:`RawClient`."""

    client: RawClient
    rank: int
    instance: int
    layers: list[torch.Tensor]

    def keys(self, hashes: list[bytes]) -> KeyBatch:
        return KeyBatch.from_hashes(self.client.model, self.client.world_size, self.rank, hashes)

    def store(self, hashes: list[bytes], first_block: int) -> list[str | None]:
        """Store one chunk per hash from blocks ``first_block`` on; per key None or why not."""
        answer: list[str | None] = self.client.call(
            kv.STORE, self.instance, self.keys(hashes), rows(first_block, len(hashes)), []
        )
        return answer

    def retrieve(self, request_id: str, hashes: list[bytes], first_block: int) -> list[str | None]:
        """Retrieve one chunk per hash into blocks ``first_block`` on; per key None or why not."""
        reply: RetrieveReply = self.client.call(
            kv.RETRIEVE,
            self.instance,
            [request_id] * len(hashes),
            self.keys(hashes),
            rows(first_block, len(hashes)),
        )
        assert reply.chunks == []  # the shm mode writes the blocks; no bytes come back
        return reply.errors

    def round_trips(self, hashes: list[bytes], stored_at: int, into: int) -> bool:
        """Retrieve ``hashes`` into blocks ``into``: all found and equal to ``stored_at``'s."""
        errors = self.retrieve(f"check-{secrets.token_hex(4)}", hashes, into)
        return errors == [None] * len(hashes) and same_blocks(
            self.layers, blocks(stored_at, len(hashes)), blocks(into, len(hashes))
        )


def open_workers(
    url: str,
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    world_size: int = WORLD,
    **options: Any,
) -> list[tuple[WorkerAdapter, list[torch.Tensor]]]:
    """A registered WorkerAdapter per rank, each with its own shared-memory KV cache."""
    workers = []
    for rank in range(world_size):
        worker = opened(WorkerAdapter(url, MODEL, world_size, rank, BLOCK, **options))
        layers = kv_cache()
        worker.register_kv_caches({f"layer.{i}": t for i, t in enumerate(layers)})
        workers.append((worker, layers))
    return workers


def wait_finished(worker: WorkerAdapter, request_id: str, *, store: bool) -> None:
    """Report ``request_id`` finished and poll until its store (or retrieve) is returned."""
    seen: set[str] = set()

    def poll() -> set[str]:
        stores, retrieves = worker.get_finished({request_id} if store else set())
        seen.update(stores if store else retrieves)
        return seen

    wait_until(poll, lambda ids: request_id in ids, f"{request_id!r} to finish")


def store_all(
    workers: list[tuple[WorkerAdapter, list[torch.Tensor]]], request_id: str, op: LoadStoreOp
) -> None:
    """Every worker stores ``op``; returns once all stores are done."""
    for worker, _ in workers:
        worker.submit_store_request(request_id, op)
    for worker, _ in workers:
        wait_finished(worker, request_id, store=True)


def retrieve_all(
    workers: list[tuple[WorkerAdapter, list[torch.Tensor]]], request_id: str, op: LoadStoreOp
) -> None:
    """Every worker retrieves ``op``; returns once all retrieves are done."""
    for worker, _ in workers:
        worker.submit_retrieve_request(request_id, op)
    for worker, _ in workers:
        wait_finished(worker, request_id, store=False)


def lookup_tokens(scheduler: SchedulerAdapter, request_id: str, **source: Any) -> int:
    """Submit a lookup and poll until the scheduler has its answer."""
    scheduler.maybe_submit_lookup_request(request_id, **source)
    answer = wait_until(
        lambda: scheduler.check_lookup_result(request_id),
        lambda tokens: tokens is not None,
        f"the lookup of {request_id!r}",
    )
    assert answer is not None
    return answer


# ------------------------------------------------------------------ store, lookup, retrieve


def test_stored_chunks_are_found_and_retrieved_into_other_blocks_byte_identical(
    kv_server: KVServer, kv_cache: Callable[..., list[torch.Tensor]], opened: Keep
) -> None:
    workers = open_workers(kv_server.url, kv_cache, opened)
    scheduler = opened(PollingSchedulerAdapter(kv_server.url, MODEL, WORLD, 0, BLOCK))
    tokens = prompt(3, seed=1)
    store_all(workers, "first", LoadStoreOp(blocks(0, 3), token_ids=tokens))

    scheduler.maybe_submit_lookup_request("second", token_ids=tokens)
    assert scheduler.check_lookup_result("second") == 3 * CHUNK
    retrieve_all(workers, "second", LoadStoreOp(blocks(20, 3), token_ids=tokens))

    for worker, layers in workers:
        assert worker.get_block_ids_with_load_errors() == set()
        assert same_blocks(layers, blocks(0, 3), blocks(20, 3))
    # The ranks hold different bytes, and each got its own back.
    rank0_layer, rank1_layer = workers[0][1][0], workers[1][1][0]
    assert not torch.equal(rank0_layer[:, blocks(20, 3)], rank1_layer[:, blocks(20, 3)])
    stats = kv_server.stats()
    assert (stats["stores"], stats["retrieves"], stats["chunks"]) == (6, 6, 6)


def test_lookup_counts_only_leading_chunks_present_on_every_rank(
    kv_server: KVServer, kv_cache: Callable[..., list[torch.Tensor]], opened: Keep
) -> None:
    (rank0, _), (rank1, _) = open_workers(kv_server.url, kv_cache, opened)
    scheduler = opened(SchedulerAdapter(kv_server.url, MODEL, WORLD, 0, BLOCK))
    tokens = prompt(3, seed=2)

    store_all([(rank0, [])], "r", LoadStoreOp(blocks(0, 3), token_ids=tokens))
    assert lookup_tokens(scheduler, "only-rank-0", token_ids=tokens) == 0

    store_all([(rank1, [])], "r", LoadStoreOp(blocks(0, 3), token_ids=tokens, end=2 * CHUNK))
    assert lookup_tokens(scheduler, "rank-1-has-two", token_ids=tokens) == 2 * CHUNK

    store_all([(rank1, [])], "r2", LoadStoreOp(blocks(0, 3), token_ids=tokens))
    assert lookup_tokens(scheduler, "both", token_ids=tokens) == 3 * CHUNK
    # A longer prompt with the same start matches the stored prefix; another start matches none.
    longer = tokens + prompt(2, seed=99)
    assert lookup_tokens(scheduler, "longer", token_ids=longer) == 3 * CHUNK
    assert lookup_tokens(scheduler, "other", token_ids=prompt(3, seed=3)) == 0


def test_only_whole_chunks_inside_start_and_end_are_stored(
    kv_server: KVServer, kv_cache: Callable[..., list[torch.Tensor]], opened: Keep
) -> None:
    workers = open_workers(kv_server.url, kv_cache, opened)
    scheduler = opened(SchedulerAdapter(kv_server.url, MODEL, WORLD, 0, BLOCK))
    tokens = prompt(3, seed=4, extra=CHUNK - 1)  # three whole chunks and a partial one

    # A chunk that begins before `start` is skipped: chunk 0 is not stored, so nothing matches.
    store_all(workers, "late", LoadStoreOp(blocks(0, 4), token_ids=tokens, start=CHUNK // 2))
    assert kv_server.stats()["chunks"] == 2 * WORLD
    assert lookup_tokens(scheduler, "a", token_ids=tokens) == 0

    store_all(workers, "all", LoadStoreOp(blocks(0, 4), token_ids=tokens))
    assert kv_server.stats()["chunks"] == 3 * WORLD  # the partial chunk is never stored
    assert lookup_tokens(scheduler, "b", token_ids=tokens) == 3 * CHUNK


@pytest.mark.parametrize("source", ["token_ids", "block_hashes"])
def test_token_and_block_hash_sources_name_the_same_keys_on_scheduler_and_worker(
    source: str,
    kv_server: KVServer,
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    workers = open_workers(kv_server.url, kv_cache, opened)
    scheduler = opened(SchedulerAdapter(kv_server.url, MODEL, WORLD, 0, BLOCK))
    tokens = prompt(2, seed=5)
    block_hashes = [secrets.token_bytes(16) for _ in range(2 * BPC)]
    sources: dict[str, dict[str, Any]] = {
        "token_ids": {"token_ids": tokens},
        "block_hashes": {"block_hashes": block_hashes},
    }
    chosen = sources[source]
    other = sources["block_hashes" if source == "token_ids" else "token_ids"]

    store_all(workers, "s", LoadStoreOp(blocks(0, 2), **chosen))
    assert lookup_tokens(scheduler, "same", **chosen) == 2 * CHUNK
    assert lookup_tokens(scheduler, "other", **other) == 0
    retrieve_all(workers, "same", LoadStoreOp(blocks(30, 2), **chosen))
    for worker, layers in workers:
        assert worker.get_block_ids_with_load_errors() == set()
        assert same_blocks(layers, blocks(0, 2), blocks(30, 2))


# ------------------------------------------------------------------ eviction and pins


def test_a_full_pool_evicts_the_least_recently_used_chunks(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    kv_server = start_server(slots=4)
    raw = opened(RawClient(kv_server.url, world_size=1))
    worker = raw.register(0, kv_cache())
    a, b, c = (chunk_hashes(2, seed) for seed in (10, 11, 12))
    assert worker.store(a, 0) == [None, None]
    assert worker.store(b, 4) == [None, None]
    assert raw.probe(a) == 2  # a use: a is now more recent than b

    assert worker.store(c, 8) == [None, None]

    assert (raw.probe(a), raw.probe(b), raw.probe(c)) == (2, 0, 2)
    stats = kv_server.stats()
    assert (stats["evictions"], stats["chunks"], stats["bytes_free"]) == (2, 4, 0)
    assert worker.retrieve("gone", b, 40) == ["not in the cache (never stored, or evicted)"] * 2
    assert worker.round_trips(a, stored_at=0, into=40)
    assert worker.round_trips(c, stored_at=8, into=48)


def test_looked_up_chunks_stay_pinned_while_more_is_stored_and_a_pinned_pool_refuses_stores(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    kv_server = start_server(slots=4)
    raw = opened(RawClient(kv_server.url, world_size=1))
    worker = raw.register(0, kv_cache())
    a, b, c, d, e = (chunk_hashes(2, seed) for seed in (20, 21, 22, 23, 24))
    assert worker.store(a, 0) == [None, None]
    assert raw.lookup_count("request-a", a) == 2  # oldest, but pinned from here on

    for i, more in enumerate((b, c, d)):
        assert worker.store(more, 4 + 4 * i) == [None, None]
        assert raw.probe(a) == 2
    assert kv_server.stats()["evictions"] == 4  # b, then c

    assert raw.lookup_count("request-d", d) == 2
    assert kv_server.stats()["pinned_chunks"] == 4
    refused = worker.store(e, 16)
    assert refused == ["no free slot: every chunk in the pool is pinned or being written"] * 2
    stats = kv_server.stats()
    assert (stats["store_refused"], stats["chunks"], stats["evictions"]) == (2, 4, 4)
    assert worker.round_trips(a, stored_at=0, into=40)  # the pinned chunks are intact


def test_end_session_releases_the_requests_pins(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    kv_server = start_server(slots=4)
    raw = opened(RawClient(kv_server.url, world_size=1))
    worker = raw.register(0, kv_cache())
    a, b, c = (chunk_hashes(2, seed) for seed in (30, 31, 32))
    assert worker.store(a, 0) == [None, None]
    assert worker.store(b, 4) == [None, None]
    assert raw.lookup_count("ra", a) == 2
    assert raw.lookup_count("rb", b) == 2
    assert kv_server.stats()["pinned_chunks"] == 4
    assert worker.store(c, 8)[0] is not None

    assert raw.end_session("ra") == 2
    assert raw.end_session("rb") == 2
    assert raw.end_session("rb") == 0  # already ended
    stats = kv_server.stats()
    assert (stats["pinned_chunks"], stats["sessions"]) == (0, 0)
    assert worker.store(c, 8) == [None, None]


def test_a_lookup_again_for_the_same_request_replaces_its_pins(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    kv_server = start_server(slots=4)
    raw = opened(RawClient(kv_server.url, world_size=1))
    worker = raw.register(0, kv_cache())
    a, b = chunk_hashes(2, 33), chunk_hashes(2, 34)
    assert worker.store(a, 0) == [None, None]
    assert worker.store(b, 4) == [None, None]
    assert raw.lookup_count("r", a) == 2
    assert raw.lookup_count("r", b[:1]) == 1
    stats = kv_server.stats()
    assert (stats["pinned_chunks"], stats["sessions"]) == (1, 1)


def test_unregistering_a_models_worker_releases_only_that_models_pins_on_its_rank(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    kv_server = start_server(slots=4)
    model_a = opened(RawClient(kv_server.url, model="model-a", world_size=1))
    model_b = opened(RawClient(kv_server.url, model="model-b", world_size=1))
    worker_a, worker_b = model_a.register(0, kv_cache()), model_b.register(0, kv_cache())
    hashes_a, hashes_b = chunk_hashes(2, seed=41), chunk_hashes(2, seed=42)
    assert worker_a.store(hashes_a, 0) == [None, None]
    assert worker_b.store(hashes_b, 0) == [None, None]
    assert model_a.lookup_count("ra", hashes_a) == 2
    assert model_b.lookup_count("rb", hashes_b) == 2
    assert kv_server.stats()["pinned_chunks"] == 4

    # Nobody can retrieve model a's chunks now; model b's rank 0 is still there.
    assert model_a.call(kv.UNREGISTER_KV_CACHE, worker_a.instance) is True
    assert kv_server.stats()["pinned_chunks"] == 2
    assert worker_b.store(chunk_hashes(2, seed=43), 4) == [None, None]  # evicts model a's
    assert worker_b.retrieve("rb", hashes_b, 40) == [None, None]
    assert same_blocks(worker_b.layers, blocks(0, 2), blocks(40, 2))


def test_a_retrieve_releases_its_requests_pin_for_that_rank_only(
    kv_server: KVServer, kv_cache: Callable[..., list[torch.Tensor]], opened: Keep
) -> None:
    raw = opened(RawClient(kv_server.url))
    rank0, rank1 = raw.register(0, kv_cache()), raw.register(1, kv_cache())
    hashes = chunk_hashes(3, seed=40)
    assert rank0.store(hashes, 0) == [None] * 3
    assert rank1.store(hashes, 0) == [None] * 3
    assert raw.lookup_count("r", hashes) == 3
    assert kv_server.stats()["pinned_chunks"] == 6

    assert rank0.retrieve("another-request", hashes, 20) == [None] * 3
    assert kv_server.stats()["pinned_chunks"] == 6
    assert rank0.retrieve("r", hashes, 20) == [None] * 3
    assert kv_server.stats()["pinned_chunks"] == 3
    assert rank1.retrieve("r", hashes, 20) == [None] * 3
    assert kv_server.stats()["pinned_chunks"] == 0
    assert same_blocks(rank1.layers, blocks(0, 3), blocks(20, 3))


# ------------------------------------------------------------------ get_finished


@dataclass
class Ctx:
    """What the get_finished steps act on: one worker (world size 1) and its server."""

    server: KVServer
    worker: WorkerAdapter


class Step(Protocol):
    """One row of a get_finished case: something the engine or the server does."""

    def run(self, ctx: Ctx) -> None: ...


@dataclass(frozen=True)
class Stall:
    """The server stops handling requests: what is submitted now stays in flight."""

    def run(self, ctx: Ctx) -> None:
        ctx.server.stall()


@dataclass(frozen=True)
class Resume:
    """The server handles requests again, and everything sent so far is answered."""

    def run(self, ctx: Ctx) -> None:
        ctx.server.resume()
        ctx.server.settle(ctx.worker)


@dataclass(frozen=True)
class Store:
    """Submit a store of two chunks for the request (its own prompt)."""

    request_id: str

    def run(self, ctx: Ctx) -> None:
        ctx.worker.submit_store_request(self.request_id, op_for(self.request_id, 0))


@dataclass(frozen=True)
class Retrieve:
    """Submit a retrieve of the request's two chunks into other blocks."""

    request_id: str

    def run(self, ctx: Ctx) -> None:
        ctx.worker.submit_retrieve_request(self.request_id, op_for(self.request_id, 32))


@dataclass(frozen=True)
class Settle:
    """Wait until every submit so far is answered and the worker saw the answer."""

    def run(self, ctx: Ctx) -> None:
        ctx.server.settle(ctx.worker)


@dataclass(frozen=True)
class Finished:
    """``get_finished(engine_finished)`` returns exactly these stores and retrieves."""

    engine_finished: frozenset[str]
    stores: frozenset[str] = frozenset()
    retrieves: frozenset[str] = frozenset()

    def run(self, ctx: Ctx) -> None:
        assert ctx.worker.get_finished(set(self.engine_finished)) == (
            set(self.stores),
            set(self.retrieves),
        )


@dataclass(frozen=True)
class MismatchedBatch:
    """A batched submit of two request ids and one op is refused before anything is sent."""

    kind: str

    def run(self, ctx: Ctx) -> None:
        submit = (
            ctx.worker.batched_submit_store_requests
            if self.kind == "store"
            else ctx.worker.batched_submit_retrieve_requests
        )
        with pytest.raises(ValueError, match="2 request ids but 1 ops"):
            submit(["a", "b"], [op_for("a", 0)])


def op_for(request_id: str, first_block: int) -> LoadStoreOp:
    seed = int.from_bytes(request_id.encode(), "little") % 1000
    return LoadStoreOp(blocks(first_block, 2), token_ids=prompt(2, seed=seed))


def finished(
    engine: set[str], stores: set[str] | None = None, retrieves: set[str] | None = None
) -> Finished:
    return Finished(frozenset(engine), frozenset(stores or ()), frozenset(retrieves or ()))


GET_FINISHED_CASES: dict[str, list[Step]] = {
    "store_in_flight_and_engine_not_finished_is_not_returned": [
        Stall(),
        Store("a"),
        finished(set()),
        Resume(),
        finished(set()),
    ],
    "store_in_flight_and_engine_finished_is_returned_once_the_store_is_done": [
        Stall(),
        Store("a"),
        finished({"a"}),
        finished(set()),
        Resume(),
        finished(set(), stores={"a"}),
        finished(set()),
    ],
    "engine_finished_after_the_store_is_done_is_returned_once": [
        Store("a"),
        Settle(),
        finished(set()),
        finished({"a"}, stores={"a"}),
        finished(set()),
    ],
    "engine_finished_without_any_store_is_returned_at_once": [
        finished({"x", "y"}, stores={"x", "y"}),
        finished(set()),
    ],
    "engine_repeating_an_id_does_not_get_it_twice": [
        Store("a"),
        Settle(),
        finished({"a", "x"}, stores={"a", "x"}),
        finished({"a", "x"}),
        finished({"a"}),
    ],
    "a_second_store_in_flight_holds_the_request_back_until_done": [
        Store("a"),
        Settle(),
        Stall(),
        Store("a"),
        finished({"a"}),
        Resume(),
        finished(set(), stores={"a"}),
    ],
    "retrieve_is_returned_once_when_done": [
        Store("a"),
        Settle(),
        Stall(),
        Retrieve("a"),
        finished(set()),
        Resume(),
        finished(set(), retrieves={"a"}),
        finished(set()),
    ],
    "retrieve_of_chunks_never_stored_is_still_returned": [
        Retrieve("b"),
        Settle(),
        finished(set(), retrieves={"b"}),
    ],
    "mismatched_batched_store_is_refused_and_leaves_nothing_in_flight": [
        MismatchedBatch("store"),
        finished({"a"}, stores={"a"}),
    ],
    "mismatched_batched_retrieve_is_refused_and_leaves_nothing_in_flight": [
        MismatchedBatch("retrieve"),
        finished(set()),
    ],
}


@pytest.mark.parametrize("steps", GET_FINISHED_CASES.values(), ids=GET_FINISHED_CASES.keys())
def test_get_finished_returns_each_request_once_when_the_engine_and_its_transfers_are_done(
    steps: list[Step],
    kv_server: KVServer,
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    ((worker, _),) = open_workers(kv_server.url, kv_cache, opened, world_size=1)
    ctx = Ctx(kv_server, worker)
    try:
        for step in steps:
            step.run(ctx)
    finally:
        kv_server.resume()


def test_a_retrieve_of_missing_chunks_reports_their_blocks_as_load_errors(
    kv_server: KVServer, kv_cache: Callable[..., list[torch.Tensor]], opened: Keep
) -> None:
    ((worker, _),) = open_workers(kv_server.url, kv_cache, opened, world_size=1)
    stored = prompt(1, seed=50)
    store_all([(worker, [])], "s", LoadStoreOp(blocks(0, 1), token_ids=stored))
    longer = stored + prompt(1, seed=51)  # chunk 1 was never stored
    retrieve_all([(worker, [])], "r", LoadStoreOp(blocks(10, 2), token_ids=longer))
    assert worker.get_block_ids_with_load_errors() == set(blocks(10, 2)[BPC:])
    assert worker.get_block_ids_with_load_errors() == set()


# ------------------------------------------------------------------ polling timeout


def test_polling_lookup_that_cannot_answer_in_time_counts_zero_and_ends_its_session(
    kv_server: KVServer,
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    caplog: pytest.LogCaptureFixture,
) -> None:
    workers = open_workers(kv_server.url, kv_cache, opened)
    tokens = prompt(2, seed=60)
    store_all(workers, "s", LoadStoreOp(blocks(0, 2), token_ids=tokens))
    scheduler = opened(
        PollingSchedulerAdapter(kv_server.url, MODEL, WORLD, 0, BLOCK, lookup_timeout=0.05)
    )

    kv_server.stall()
    try:
        scheduler.maybe_submit_lookup_request("slow", token_ids=tokens)
        with caplog.at_level(logging.WARNING, logger="kvrpc.kv"):
            started = time.monotonic()
            assert scheduler.check_lookup_result("slow") == 0
            assert time.monotonic() - started < 2.0
    finally:
        kv_server.resume()

    assert any(
        record.levelno == logging.WARNING and "'slow'" in record.getMessage()
        for record in caplog.records
    )
    with pytest.raises(KVError, match="no lookup was submitted"):
        scheduler.check_lookup_result("slow")
    kv_server.wait_stats("the timed-out session to end", sessions=0, pinned_chunks=0)
    # The late lookup pinned nothing for good: the next one of the prompt answers in full.
    assert lookup_tokens(scheduler, "again", token_ids=tokens) == 2 * CHUNK


def test_polling_lookup_timing_out_before_its_prefetch_job_arrives_leaves_no_job_open(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    tmp_path: Path,
) -> None:
    kv_server = start_server(slots=4, disk_dir=tmp_path)
    ((worker, layers),) = open_workers(kv_server.url, kv_cache, opened, world_size=1)
    first, second = prompt(2, seed=61), prompt(4, seed=62)
    store_all([(worker, layers)], "s1", LoadStoreOp(blocks(0, 2), token_ids=first))
    kv_server.wait_stats("first on disk", tier_saves=2, pinned_chunks=0)
    store_all([(worker, layers)], "s2", LoadStoreOp(blocks(4, 4), token_ids=second))
    kv_server.wait_stats("second on disk", tier_saves=6, pinned_chunks=0)
    scheduler = opened(
        PollingSchedulerAdapter(kv_server.url, MODEL, 1, 0, BLOCK, lookup_timeout=0.05)
    )

    kv_server.stall()
    try:
        scheduler.maybe_submit_lookup_request("slow", token_ids=first)
        assert scheduler.check_lookup_result("slow") == 0
    finally:
        kv_server.resume()
    kv_server.settle(scheduler)

    # The lookup answered with a prefetch job that nobody will ever ask about: the session
    # that ended with the request must take the job with it, or every such timeout leaks one.
    stats = kv_server.stats()
    assert (stats["prefetch_jobs"], stats["sessions"]) == (1, 0)
    assert stats["prefetch_jobs_open"] == 0
    kv_server.wait_stats("the prefetch to pin nothing", pinned_chunks=0)


# ------------------------------------------------------------------ prefetch


def test_a_lookup_of_chunks_evicted_to_disk_prefetches_them_as_a_job(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    tmp_path: Path,
) -> None:
    kv_server = start_server(slots=4, disk_dir=tmp_path)
    raw = opened(RawClient(kv_server.url, world_size=1))
    other_client = opened(RawClient(kv_server.url, world_size=1))
    worker = raw.register(0, kv_cache())
    a, c, b = chunk_hashes(2, 70), chunk_hashes(2, 71), chunk_hashes(4, 72)
    assert worker.store(a, 0) == [None, None]
    assert worker.store(c, 4) == [None, None]
    kv_server.wait_stats("a and c written to disk", tier_saves=4, pinned_chunks=0)
    assert worker.store(b, 8) == [None] * 4  # evicts a and c from memory
    kv_server.wait_stats("b written to disk", tier_saves=8, pinned_chunks=0)
    assert kv_server.stats()["evictions"] == 4

    job_a = raw.lookup("ra", a)
    job_c = raw.lookup("rc", c)
    assert isinstance(job_a, str) and isinstance(job_c, str)
    assert len(job_a) >= 16 and len(job_c) >= 16 and job_a != job_c

    with pytest.raises(UnknownJob):
        other_client.query(job_a)
    with pytest.raises(UnknownJob):
        raw.query("no-such-job")
    answers: list[int | None] = []

    def query_a() -> int | None:
        answers.append(raw.query(job_a))
        return answers[-1]

    assert wait_until(query_a, lambda got: got is not None, "job a") == 2
    assert all(answer is None for answer in answers[:-1])
    with pytest.raises(UnknownJob):
        raw.query(job_a)  # its count was taken
    assert wait_until(lambda: raw.query(job_c), lambda got: got is not None, "job c") == 2
    stats = kv_server.stats()
    assert (stats["prefetch_jobs"], stats["prefetch_jobs_open"], stats["prefetched"]) == (2, 0, 4)
    assert stats["pinned_chunks"] == 4  # the prefetched chunks wait for their retrieves

    assert worker.retrieve("ra", a, 40) == [None, None]
    assert worker.retrieve("rc", c, 48) == [None, None]
    assert same_blocks(worker.layers, blocks(0, 2), blocks(40, 2))
    assert same_blocks(worker.layers, blocks(4, 2), blocks(48, 2))
    assert kv_server.stats()["pinned_chunks"] == 0


def test_a_prefetch_superseded_by_a_new_lookup_of_its_request_pins_nothing_for_it(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    tmp_path: Path,
) -> None:
    kv_server = start_server(slots=4, disk_dir=tmp_path)
    raw = opened(RawClient(kv_server.url, world_size=1))
    second_connection = opened(RawClient(kv_server.url, world_size=1))
    second_connection.client_id = raw.client_id  # the same client, over another connection
    worker = raw.register(0, kv_cache())
    a, b = chunk_hashes(2, 75), chunk_hashes(4, 76)
    assert worker.store(a, 0) == [None, None]
    kv_server.wait_stats("a on disk", tier_saves=2, pinned_chunks=0)
    assert worker.store(b, 4) == [None] * 4  # a is on disk only now
    kv_server.wait_stats("b on disk", tier_saves=6, pinned_chunks=0)

    # Both lookups of request "r" wait in the server's queue, in this order: the second
    # replaces the first (and its job) before the first's prefetch has loaded anything.
    kv_server.stall()
    try:
        lookups = []
        for connection, hashes in ((raw, a), (second_connection, b[2:])):
            keys = KeyBatch.from_hashes(MODEL, 1, None, hashes)
            lookups.append(connection.sync.submit(kv.LOOKUP, raw.client_id, "r", keys))
            time.sleep(0.1)
    finally:
        kv_server.resume()
    assert isinstance(lookups[0].result(WAIT), str)
    assert lookups[1].result(WAIT) == 2
    deadline = time.monotonic() + 1.0  # the superseded prefetch may still load a, or not
    while kv_server.stats()["prefetched"] < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    stats = kv_server.stats()
    assert (stats["sessions"], stats["pinned_chunks"]) == (1, 2)  # b[2:] only
    assert raw.end_session("r") == 2


def test_scheduler_adapter_waits_for_a_prefetch_and_counts_its_tokens(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    tmp_path: Path,
) -> None:
    kv_server = start_server(slots=4, disk_dir=tmp_path)
    ((worker, layers),) = open_workers(kv_server.url, kv_cache, opened, world_size=1)
    scheduler = opened(PollingSchedulerAdapter(kv_server.url, MODEL, 1, 0, BLOCK))
    first, second = prompt(2, seed=73), prompt(4, seed=74)
    store_all([(worker, layers)], "s1", LoadStoreOp(blocks(0, 2), token_ids=first))
    kv_server.wait_stats("first on disk", tier_saves=2, pinned_chunks=0)
    store_all([(worker, layers)], "s2", LoadStoreOp(blocks(4, 4), token_ids=second))
    kv_server.wait_stats("second on disk", tier_saves=6, pinned_chunks=0)

    scheduler.maybe_submit_lookup_request("r", token_ids=first)
    assert scheduler.check_lookup_result("r") == 2 * CHUNK
    assert kv_server.stats()["prefetch_jobs"] == 1
    retrieve_all([(worker, layers)], "r", LoadStoreOp(blocks(40, 2), token_ids=first))
    assert same_blocks(layers, blocks(0, 2), blocks(40, 2))


# ------------------------------------------------------------------ bad input


@dataclass
class Baseline:
    """A raw client with rank 0 registered and two chunks stored at block 0."""

    server: KVServer
    raw: RawClient
    worker: RawWorker

    def still_healthy(self) -> bool:
        """The server answers pings, and the chunks stored first come back intact."""
        return self.server.ping() == "pong" and self.worker.round_trips(
            chunk_hashes(2, seed=80), stored_at=0, into=56
        )


@pytest.fixture
def baseline(
    kv_server: KVServer, kv_cache: Callable[..., list[torch.Tensor]], opened: Keep
) -> Baseline:
    """A server already holding some chunks, to check it stays healthy after bad input."""
    raw = opened(RawClient(kv_server.url))
    worker = raw.register(0, kv_cache())
    assert worker.store(chunk_hashes(2, seed=80), 0) == [None, None]
    return Baseline(kv_server, raw, worker)


def test_block_ids_out_of_range_refuse_only_their_keys(baseline: Baseline) -> None:
    raw, worker = baseline.raw, baseline.worker
    hashes = chunk_hashes(3, seed=81)
    ids = rows(0, 3)
    ids[1, 1] = NUM_BLOCKS
    answer = raw.call(kv.STORE, worker.instance, worker.keys(hashes), ids, [])
    assert answer[0] is None and answer[2] is None
    assert answer[1] == f"block id {NUM_BLOCKS} is outside this KV cache's 0..{NUM_BLOCKS - 1}"
    ids[1, 1] = -2  # -1 is SKIP_BLOCK in a retrieve; anything lower is out of range
    reply = raw.call(kv.RETRIEVE, worker.instance, ["r"] * 3, worker.keys(hashes), ids)
    assert reply.errors[0] is None
    assert reply.errors[1] == f"block id -2 is outside this KV cache's 0..{NUM_BLOCKS - 1}"
    assert reply.errors[2] is None
    assert same_blocks(worker.layers, blocks(0, 1), blocks(0, 1))
    assert baseline.still_healthy()


def test_a_retrieve_leaves_blocks_marked_skip_as_they_were(baseline: Baseline) -> None:
    raw, worker = baseline.raw, baseline.worker
    hashes = chunk_hashes(1, seed=84)
    assert raw.call(kv.STORE, worker.instance, worker.keys(hashes), rows(0, 1), []) == [None]
    target = rows(BPC, 1)
    target[0, 0] = -1  # the engine holds this block's tokens itself
    before = [layer.view(torch.int16)[:, BPC].clone() for layer in worker.layers]

    reply = raw.call(kv.RETRIEVE, worker.instance, ["r"], worker.keys(hashes), target)

    assert reply.errors == [None]
    assert same_blocks(worker.layers, list(range(BPC + 1, 2 * BPC)), list(range(1, BPC)))
    assert all(
        torch.equal(layer.view(torch.int16)[:, BPC], old)
        for layer, old in zip(worker.layers, before, strict=True)
    )
    other = worker.keys(chunk_hashes(1, seed=85))
    answer = raw.call(kv.STORE, worker.instance, other, target, [])  # a store never skips
    assert answer == [f"block id -1 is outside this KV cache's 0..{NUM_BLOCKS - 1}"]


def test_block_ids_of_the_wrong_shape_refuse_the_whole_batch(baseline: Baseline) -> None:
    raw, worker = baseline.raw, baseline.worker
    keys = worker.keys(chunk_hashes(2, seed=82))
    with pytest.raises(KVError, match=r"shape \[2, 2\]"):
        raw.call(kv.STORE, worker.instance, keys, rows(0, 2).view(-1), [])
    assert baseline.still_healthy()


def test_an_unknown_instance_id_is_refused(baseline: Baseline, opened: Keep) -> None:
    raw, worker = baseline.raw, baseline.worker
    keys = worker.keys(chunk_hashes(1, seed=83))
    with pytest.raises(UnknownInstance):
        raw.call(kv.STORE, worker.instance ^ 1, keys, rows(0, 1), [])
    stranger = opened(RawClient(baseline.server.url))
    with pytest.raises(UnknownInstance):  # an instance id is good only for its own client
        stranger.call(kv.RETRIEVE, worker.instance, ["r"], keys, rows(0, 1))
    assert baseline.still_healthy()


def test_registering_another_layout_for_the_same_model_and_world_size_is_refused(
    baseline: Baseline, kv_cache: Callable[..., list[torch.Tensor]], opened: Keep
) -> None:
    # Chunks of the same size, cut another way: 2 heads of 4, not 1 of 8.
    other_heads = kv_cache((2, NUM_BLOCKS, BLOCK, 2, 4))
    worker = opened(WorkerAdapter(baseline.server.url, MODEL, WORLD, 1, BLOCK))
    with pytest.raises(KVConfigError, match="must share a layout"):
        worker.register_kv_caches({f"layer.{i}": t for i, t in enumerate(other_heads)})
    assert baseline.server.stats()["instances"] == 1
    assert baseline.still_healthy()


def test_two_workers_registering_different_layouts_at_once_are_not_both_accepted(
    kv_server: KVServer, kv_cache: Callable[..., list[torch.Tensor]], opened: Keep
) -> None:
    first, second = opened(RawClient(kv_server.url)), opened(RawClient(kv_server.url))
    two_heads = kv_cache((2, NUM_BLOCKS, BLOCK, 2, 8))  # chunks twice the size
    # Both requests wait in the server's queue, so both handlers start before either ends.
    kv_server.stall()
    try:
        registering = [
            first.sync.submit(kv.REGISTER_KV_CACHE, first.client_id, registration(0, kv_cache())),
            second.sync.submit(kv.REGISTER_KV_CACHE, second.client_id, registration(1, two_heads)),
        ]
        time.sleep(0.2)
    finally:
        kv_server.resume()
    outcomes = [future.exception(WAIT) for future in registering]
    refused = [outcome for outcome in outcomes if outcome is not None]
    assert len(refused) == 1 and isinstance(refused[0], KVConfigError)
    assert kv_server.stats()["instances"] == 1


def test_keys_of_another_model_world_size_or_rank_are_refused_per_key(
    baseline: Baseline,
) -> None:
    raw, worker = baseline.raw, baseline.worker
    hashes = chunk_hashes(2, seed=84)
    for model, world_size in (("other-model", WORLD), (MODEL, 4)):
        keys = KeyBatch.from_hashes(model, world_size, 0, hashes)
        answer = raw.call(kv.STORE, worker.instance, keys, rows(0, 2), [])
        assert len(answer) == 2
        assert all(f"keys are for model {model!r} world size {world_size}" in a for a in answer)
        reply = raw.call(kv.RETRIEVE, worker.instance, ["r", "r"], keys, rows(0, 2))
        assert len(reply.errors) == 2
        assert all(error and "keys are for model" in error for error in reply.errors)
    rank1_keys = KeyBatch.from_hashes(MODEL, WORLD, 1, hashes)
    answer = raw.call(kv.STORE, worker.instance, rank1_keys, rows(0, 2), [])
    assert all("worker id 1" in a for a in answer)
    assert baseline.server.stats()["stores"] == 2  # the baseline's, nothing more
    assert baseline.still_healthy()


def test_a_retrieve_of_an_evicted_key_says_it_is_not_in_the_cache(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    kv_server = start_server(slots=2)
    raw = opened(RawClient(kv_server.url, world_size=1))
    worker = raw.register(0, kv_cache())
    old, new = chunk_hashes(2, seed=85), chunk_hashes(2, seed=86)
    assert worker.store(old, 0) == [None, None]
    assert worker.store(new, 4) == [None, None]
    errors = worker.retrieve("r", old + new, 40)
    assert errors == ["not in the cache (never stored, or evicted)"] * 2 + [None, None]
    stats = kv_server.stats()
    assert (stats["retrieve_misses"], stats["retrieves"]) == (2, 2)
    assert same_blocks(worker.layers, blocks(4, 2), blocks(44, 2))
    assert kv_server.ping() == "pong"


def test_a_second_store_of_a_key_is_refused_and_keeps_the_first_copy(
    baseline: Baseline,
) -> None:
    worker = baseline.worker
    hashes = chunk_hashes(1, seed=87)
    assert worker.store(hashes, 0) == [None]
    assert worker.store(hashes, 10) == ["already stored"]
    assert baseline.server.stats()["store_duplicates"] == 1
    assert worker.round_trips(hashes, stored_at=0, into=30)
    assert baseline.still_healthy()


def test_cpu_tensors_not_from_shared_empty_are_refused_naming_shared_empty(
    baseline: Baseline, opened: Keep
) -> None:
    worker = opened(WorkerAdapter(baseline.server.url, MODEL, WORLD, 1, BLOCK))
    plain = {f"layer.{i}": torch.zeros(LAYER_SHAPE, dtype=torch.float16) for i in range(LAYERS)}
    with pytest.raises(NotSharedMemory, match="shared_empty"):
        worker.register_kv_caches(plain)
    assert baseline.server.stats()["instances"] == 1
    assert baseline.still_healthy()


@pytest.mark.parametrize("adapter", [WorkerAdapter, SchedulerAdapter, PollingSchedulerAdapter])
def test_a_chunk_size_that_is_not_a_multiple_of_the_block_size_is_refused_at_construction(
    adapter: type[SchedulerAdapter] | type[WorkerAdapter], baseline: Baseline
) -> None:
    with pytest.raises(KVConfigError, match="not a multiple of block_size 3"):
        adapter(baseline.server.url, MODEL, WORLD, 0, 3)
    assert baseline.still_healthy()


def test_a_lookup_with_a_worker_id_is_refused(baseline: Baseline) -> None:
    raw, worker = baseline.raw, baseline.worker
    with pytest.raises(KVError, match="no worker id"):
        raw.call(kv.LOOKUP, "r", worker.keys(chunk_hashes(1, seed=88)))
    assert baseline.still_healthy()


# ------------------------------------------------------------------ silent clients


def test_a_silent_client_loses_its_instances_sessions_and_jobs_but_keepalive_keeps_them(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    tmp_path: Path,
) -> None:
    timeout = 0.5
    kv_server = start_server(slots=4, client_timeout=timeout, disk_dir=tmp_path)
    ((keeper, keeper_layers),) = open_workers(
        kv_server.url, kv_cache, opened, world_size=1, keepalive_interval=0.1
    )
    silent = opened(RawClient(kv_server.url, world_size=1))
    worker = silent.register(0, kv_cache())
    a, b = chunk_hashes(2, seed=90), chunk_hashes(4, seed=91)
    assert worker.store(a, 0) == [None, None]
    kv_server.wait_stats("a on disk", tier_saves=2, pinned_chunks=0)
    assert worker.store(b, 4) == [None] * 4  # a is on disk only now
    kv_server.wait_stats("b on disk", tier_saves=6, pinned_chunks=0)
    assert isinstance(silent.lookup("ra", a), str)  # a prefetch job, never asked about
    kv_server.wait_stats("a back in memory, evicting b's first two", prefetched=2)
    assert silent.lookup_count("rb", b[2:]) == 2
    held = kv_server.stats()
    assert (held["instances"], held["sessions"], held["prefetch_jobs_open"]) == (2, 2, 1)
    assert held["pinned_chunks"] == 4

    kv_server.wait_stats(
        "the silent client to be dropped",
        instances=1,
        sessions=0,
        pinned_chunks=0,
        prefetch_jobs_open=0,
        clients=1,
        clients_expired=1,
    )
    time.sleep(2 * timeout)
    stats = kv_server.stats()
    assert (stats["instances"], stats["clients"], stats["clients_expired"]) == (1, 1, 1)
    with pytest.raises(UnknownInstance):
        worker.store(chunk_hashes(1, seed=92), 0)
    # The keeper was never dropped (clients_expired counts the silent one only): it stores.
    tokens = prompt(1, seed=93)
    store_all([(keeper, keeper_layers)], "k", LoadStoreOp(blocks(0, 1), token_ids=tokens))
    assert kv_server.stats()["stores"] == 7


def test_a_worker_forgotten_after_silence_registers_again_without_waiting(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    kv_server = start_server(client_timeout=0.5)
    ((worker, layers),) = open_workers(
        kv_server.url, kv_cache, opened, world_size=1, keepalive_interval=60.0
    )
    kv_server.wait_stats("the worker to be dropped", instances=0, clients_expired=1)
    first, second, third = (prompt(1, seed=s) for s in (94, 95, 96))
    store_all([(worker, layers)], "refused", LoadStoreOp(blocks(0, 1), token_ids=first))
    assert kv_server.stats()["stores"] == 0
    # The next store sends the registration again in the background and is dropped rather
    # than wait for it: an engine's step never waits on a server that lost track of it.
    store_all([(worker, layers)], "dropped", LoadStoreOp(blocks(2, 1), token_ids=second))
    assert worker.stats.dropped_stores == 2
    kv_server.wait_stats("the worker to register again", instances=1)
    store_all([(worker, layers)], "stored", LoadStoreOp(blocks(4, 1), token_ids=third))
    stats = kv_server.stats()
    assert (stats["stores"], stats["instances"]) == (1, 1)
    assert worker.stats.stored_chunks == 1


# ------------------------------------------------------------------ inline transfers


def test_inline_transfers_move_plain_tensors_byte_identical(
    kv_server: KVServer, opened: Keep
) -> None:
    workers = []
    for rank in range(WORLD):
        worker = opened(
            WorkerAdapter(kv_server.url, MODEL, WORLD, rank, BLOCK, transfer_mode="inline")
        )
        layers = [torch.empty(LAYER_SHAPE, dtype=torch.float16) for _ in range(LAYERS)]
        fill_random(layers, seed=100 + rank)
        worker.register_kv_caches({f"layer.{i}": t for i, t in enumerate(layers)})
        workers.append((worker, layers))
    scheduler = opened(PollingSchedulerAdapter(kv_server.url, MODEL, WORLD, 0, BLOCK))
    tokens = prompt(3, seed=101)
    store_all(workers, "s", LoadStoreOp(blocks(0, 3), token_ids=tokens))
    scheduler.maybe_submit_lookup_request("r", token_ids=tokens)
    assert scheduler.check_lookup_result("r") == 3 * CHUNK
    retrieve_all(workers, "r", LoadStoreOp(blocks(40, 3), token_ids=tokens))
    for worker, layers in workers:
        assert worker.get_block_ids_with_load_errors() == set()
        assert same_blocks(layers, blocks(0, 3), blocks(40, 3))
    assert kv_server.stats()["pinned_chunks"] == 0


# ------------------------------------------------------------------ concurrency


async def test_lookups_during_a_store_see_none_or_all_of_its_chunks_never_more(
    start_server: Callable[..., KVServer], kv_cache: Callable[..., list[torch.Tensor]]
) -> None:
    # Chunks of 256 KiB, so that the store's copy takes long enough for lookups to overlap it.
    chunks, wide = 16, (2, NUM_BLOCKS, BLOCK, 64, 64)
    kv_server = start_server(slots=chunks * (256 << 10) // SLOT)
    layers = kv_cache(wide)
    hashes = chunk_hashes(chunks, seed=110)
    client_id = secrets.token_bytes(16)
    keys = KeyBatch.from_hashes(MODEL, 1, 0, hashes)
    last_key = KeyBatch.from_hashes(MODEL, 1, 0, hashes[-1:])
    lookup_keys = keys.with_worker_id(None)
    async with AsyncClient(kv_server.url, registry=kv_registry(), timeout=WAIT) as client:
        spec = registration(0, layers, world_size=1)
        instance = await client.call(kv.REGISTER_KV_CACHE, client_id, spec)
        before = await client.call(kv.LOOKUP, client_id, "r", lookup_keys)
        store = await client.submit(kv.STORE, client_id, instance, keys, rows(0, chunks), [])
        lookups: list[asyncio.Future[Any]] = []
        # Retrieves of the last chunk, each into blocks of its own (those after the stored
        # ones): one that finds the chunk must copy exactly the stored bytes.
        retrieves: list[tuple[int, asyncio.Future[Any]]] = []
        while not store.done() or len(lookups) < 20:
            lookups.append(await client.submit(kv.LOOKUP, client_id, "r", lookup_keys))
            if len(retrieves) < chunks:
                into = (chunks + len(retrieves)) * BPC
                retrieve = kv.RETRIEVE, client_id, instance, ["r"], last_key, rows(into, 1)
                retrieves.append((into, await client.submit(*retrieve)))
            await asyncio.sleep(0)
        assert await store == [None] * chunks
        answers = [await lookup for lookup in lookups]
        found = [(into, (await reply).errors == [None]) for into, reply in retrieves]
        after = await client.call(kv.LOOKUP, client_id, "r", lookup_keys)

    assert before == 0 and after == chunks
    assert set(answers) <= {0, chunks}
    assert answers == sorted(answers)
    last_stored = blocks((chunks - 1) * BPC, 1)
    for into, ok in found:
        assert not ok or same_blocks(layers, last_stored, blocks(into, 1))
    raw = RawClient(kv_server.url, world_size=1)
    try:
        assert raw.register(0, layers).round_trips(hashes, stored_at=0, into=chunks * BPC)
    finally:
        raw.close()


def test_a_restarted_server_finds_its_disk_chunks_only_for_the_same_model_and_layout(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    tmp_path: Path,
) -> None:
    hashes = chunk_hashes(2, 90)
    first = start_server(slots=4, disk_dir=tmp_path)
    raw = RawClient(first.url, world_size=1)
    original = kv_cache()
    assert raw.register(0, original).store(hashes, 0) == [None, None]
    first.wait_stats("written to disk", tier_saves=2, pinned_chunks=0)
    raw.close()
    first.stop()

    # Same bytes per chunk, another dtype: the old files must not be served as this layout.
    retyped = start_server(slots=4, disk_dir=tmp_path)
    raw = opened(RawClient(retyped.url, world_size=1))
    bf16 = [t.view(torch.bfloat16) for t in kv_cache()]
    raw.register(0, bf16)
    assert raw.lookup("r", hashes) == 0
    raw.close()
    retyped.stop()

    same = start_server(slots=4, disk_dir=tmp_path)
    raw = opened(RawClient(same.url, world_size=1))
    worker = raw.register(0, kv_cache())
    job = raw.lookup("r", hashes)
    assert isinstance(job, str)
    assert wait_until(lambda: raw.query(job), lambda got: got is not None, "the job") == 2
    assert worker.retrieve("r", hashes, 20) == [None, None]
    ids_then, ids_now = torch.tensor(blocks(0, 2)), torch.tensor(blocks(20, 2))
    assert all(
        torch.equal(old.view(torch.int16)[:, ids_then], new.view(torch.int16)[:, ids_now])
        for old, new in zip(original, worker.layers, strict=True)  # bits: random fp16 has NaNs
    )


# ------------------------------------------------------------------ the cuda_ipc mode without CUDA

no_gpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks a server and a worker without CUDA"
)
TEST_LAYOUT = KVLayout(LayoutKind.PAGED, LAYERS, LAYER_SHAPE, "float16")
FAKE_EVENT = CudaEventHandle("GPU-00000000-0000-0000-0000-000000000000", bytes(range(64)))


def cuda_registration(rank: int = 1) -> KVCacheRegistration:
    """A cuda_ipc registration of LAYERS made-up GPU layers of the tests' layout."""
    layer = CudaIPCWrapper(
        device_uuid=FAKE_EVENT.device_uuid,
        shape=LAYER_SHAPE,
        dtype="float16",
        handle=b"\x01" * 66,
        storage_size=2 * NUM_BLOCKS * BLOCK * 8 * 2,
        storage_offset=0,
        ref_counter_handle=b"\x02" * 66,
        ref_counter_offset=0,
        event_handle=b"\x03" * 64,
        event_sync_required=True,
    )
    return KVCacheRegistration(
        model_name=MODEL,
        world_size=WORLD,
        worker_id=rank,
        block_size=BLOCK,
        mode="cuda_ipc",
        layout=TEST_LAYOUT,
        cuda_tensors=[layer] * LAYERS,
    )


@no_gpu_only
def test_a_cuda_ipc_registration_on_a_server_without_cuda_is_refused_naming_cuda(
    baseline: Baseline,
) -> None:
    with pytest.raises(CudaUnavailable, match="this KV server has no CUDA"):
        baseline.raw.call(kv.REGISTER_KV_CACHE, cuda_registration())
    assert baseline.server.stats()["instances"] == 1
    assert baseline.still_healthy()


@no_gpu_only
def test_the_register_handler_of_a_server_without_cuda_raises_cuda_unavailable(
    baseline: Baseline,
) -> None:
    server = baseline.server
    registering = asyncio.run_coroutine_threadsafe(
        server.service.register_kv_cache(
            secrets.token_bytes(16), cuda_registration(), PeerInfo(b"p", "unix", CREDENTIALS)
        ),
        server.loop,
    )
    with pytest.raises(CudaUnavailable, match="this KV server has no CUDA"):
        registering.result(WAIT)
    assert server.stats()["instances"] == 1
    assert baseline.still_healthy()


def test_cuda_copies_into_a_cache_registered_in_the_shm_mode_are_refused_naming_the_mode(
    baseline: Baseline,
) -> None:
    raw, worker = baseline.raw, baseline.worker
    keys = worker.keys(chunk_hashes(1, seed=90))
    says = r"registered in the shm transfer mode: use kv\.store / kv\.retrieve"
    with pytest.raises(KVError, match=says) as store:
        raw.call(kv.STORE_CUDA, worker.instance, keys, rows(0, 1), FAKE_EVENT)
    with pytest.raises(KVError, match=says) as load:
        raw.call(kv.RETRIEVE_CUDA, worker.instance, ["r"], keys, rows(40, 1), FAKE_EVENT, None)
    assert type(store.value) is KVError and type(load.value) is KVError
    assert baseline.server.stats()["stores"] == 2  # the baseline's, nothing more
    assert baseline.still_healthy()


def test_cuda_copies_into_a_cache_registered_in_the_inline_mode_are_refused_naming_the_mode(
    kv_server: KVServer, opened: Keep
) -> None:
    raw = opened(RawClient(kv_server.url))
    spec = KVCacheRegistration(
        model_name=MODEL,
        world_size=WORLD,
        worker_id=0,
        block_size=BLOCK,
        mode="inline",
        layout=TEST_LAYOUT,
    )
    instance = raw.call(kv.REGISTER_KV_CACHE, spec)
    keys = KeyBatch.from_hashes(MODEL, WORLD, 0, chunk_hashes(1, seed=91))
    with pytest.raises(KVError, match=r"inline transfer mode: use kv\.store / kv\.retrieve"):
        raw.call(kv.STORE_CUDA, instance, keys, rows(0, 1), FAKE_EVENT)
    with pytest.raises(KVError, match="inline transfer mode"):
        raw.call(kv.RETRIEVE_CUDA, instance, ["r"], keys, rows(0, 1), FAKE_EVENT, 1.0)
    assert kv_server.stats()["stores"] == 0


def test_cuda_copies_for_an_unknown_instance_are_refused_like_other_copies(
    baseline: Baseline,
) -> None:
    raw, worker = baseline.raw, baseline.worker
    keys = worker.keys(chunk_hashes(1, seed=92))
    with pytest.raises(UnknownInstance):
        raw.call(kv.STORE_CUDA, worker.instance ^ 1, keys, rows(0, 1), FAKE_EVENT)
    with pytest.raises(UnknownInstance):
        raw.call(kv.RETRIEVE_CUDA, worker.instance ^ 1, ["r"], keys, rows(0, 1), FAKE_EVENT, None)
    assert baseline.still_healthy()


def test_the_cuda_ipc_mode_refuses_cpu_kv_tensors_before_asking_the_server(
    baseline: Baseline, kv_cache: Callable[..., list[torch.Tensor]], opened: Keep
) -> None:
    worker = opened(
        WorkerAdapter(baseline.server.url, MODEL, WORLD, 1, BLOCK, transfer_mode="cuda_ipc")
    )
    layers = kv_cache()  # from shared_empty: fine for shm, not for cuda_ipc
    with pytest.raises(KVConfigError, match="cuda_ipc transfer mode needs CUDA tensors"):
        worker.register_kv_caches({f"layer.{i}": t for i, t in enumerate(layers)})
    assert baseline.server.stats()["instances"] == 1
    assert baseline.still_healthy()
