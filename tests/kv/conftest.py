"""The harness of the KV server's end-to-end tests: live servers, raw clients, KV caches.

Each test starts its own servers (``serve_kv`` in a thread with its own event loop) through
the ``start_server`` fixture, once per transport (``inproc``, ``unix``, ``zmq+ipc``), so the
adapters' SyncClients and the tests' raw clients talk to them exactly as they would to
``kvrpc serve``. The KV caches are tiny: two layers of ``[2, 64, 4, 1, 8]`` float16 (64 blocks
of 4 tokens), chunks of 8 tokens, so 2 blocks and 512 bytes per chunk.

The state rules (pins, sessions, eviction, prefetch jobs, leases) are tested without any of
this in ``test_state.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import torch

from kvrpc import RPCServer
from kvrpc.client import SyncClient
from kvrpc.kv import (
    KeyBatch,
    KVService,
    LoadStoreOp,
    SchedulerAdapter,
    WorkerAdapter,
    hashes_from_tokens,
    kv_registry,
    release_shared,
    shared_empty,
)
from kvrpc.kv import protocols as kv
from kvrpc.kv.layout import KVLayout
from kvrpc.kv.outcomes import KeyStatus, StoreReply
from kvrpc.kv.protocols import KVCacheRegistration, RetrieveReply
from kvrpc.kv.server.serving import GB, KVServerSettings, serve_kv
from kvrpc.kv.shm import shared_ref
from kvrpc.protocol import PING, STATS
from kvrpc.testing.waiting import wait_until as shared_wait_until
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

OK = KeyStatus.OK  #: a key that was copied


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
    url: str,
    *,
    slots: int = 64,
    client_timeout: float = 10.0,
    disk_dir: Path | None = None,
    **extra: Any,
) -> KVServer:
    """Serve a KVService with a pool of ``slots`` chunk slots at ``url``, in a thread.

    ``extra`` are more :class:`KVServerSettings` fields (``redis_url``, say).
    """
    settings = KVServerSettings(
        **extra,
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


def wait_until(
    get: Callable[[], T], ok: Callable[[T], bool], what: str, timeout: float = WAIT
) -> T:
    """Poll ``get()`` until ``ok`` holds for its value; fail naming ``what`` after ``timeout``.

    For state only observable by asking (a server's counters): the deadline bounds a hang,
    it never decides a test's outcome. :func:`kvrpc.testing.waiting.wait_until` with this
    directory's ``WAIT``.
    """
    return shared_wait_until(get, ok, what, timeout)


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
    engine_id: str | None = None,
) -> KVCacheRegistration:
    """What a worker of ``rank`` (of engine ``engine_id``) sends to register ``layers`` (shm)."""
    return KVCacheRegistration(
        model_name=model,
        world_size=world_size,
        worker_id=rank,
        block_size=BLOCK,
        mode="shm",
        layout=KVLayout.from_tensors(layers),
        tensors=[shared_ref(t) for t in layers],
        engine_id=engine_id,
    )


def rows(first: int, chunks: int) -> torch.Tensor:
    """The block-id rows ``kv.store``/``kv.retrieve`` take: ``[chunks, BPC]`` int64."""
    return torch.tensor(blocks(first, chunks), dtype=torch.int64).view(chunks, BPC)


class RawClient:
    """``kv.*`` spoken directly with a client id of its own, to see what adapters only log.

    It sends no keepalives: it is alive only while it makes calls. Its registrations and
    lookups declare ``engine_id`` (None: no engine id), as an engine's adapters do.
    """

    def __init__(
        self,
        url: str,
        *,
        model: str = MODEL,
        world_size: int = WORLD,
        engine_id: str | None = None,
    ) -> None:
        self.sync = SyncClient(url, registry=kv_registry(), timeout=WAIT)
        self.client_id = secrets.token_bytes(16)
        self.model = model
        self.world_size = world_size
        self.engine_id = engine_id

    def call(self, protocol: Any, *args: Any) -> Any:
        return self.sync.call(protocol, self.client_id, *args)

    def register(self, rank: int, layers: list[torch.Tensor]) -> RawWorker:
        spec = registration(
            rank, layers, model=self.model, world_size=self.world_size, engine_id=self.engine_id
        )
        return RawWorker(self, rank, self.call(kv.REGISTER_KV_CACHE, spec), layers)

    def lookup(self, request_id: str, hashes: list[bytes]) -> int | str:
        keys = KeyBatch.from_hashes(self.model, self.world_size, None, hashes)
        answer: int | str = self.call(kv.LOOKUP, request_id, keys, self.engine_id)
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

    def store(self, hashes: list[bytes], first_block: int) -> list[KeyStatus]:
        """Store one chunk per hash from blocks ``first_block`` on; a status per key."""
        reply: StoreReply = self.client.call(
            kv.STORE, self.instance, self.keys(hashes), rows(first_block, len(hashes)), []
        )
        return reply.statuses

    def retrieve(self, request_id: str, hashes: list[bytes], first_block: int) -> list[KeyStatus]:
        """Retrieve one chunk per hash into blocks ``first_block`` on; a status per key."""
        reply: RetrieveReply = self.client.call(
            kv.RETRIEVE,
            self.instance,
            [request_id] * len(hashes),
            self.keys(hashes),
            rows(first_block, len(hashes)),
        )
        assert reply.chunks == []  # the shm mode writes the blocks; no bytes come back
        return reply.statuses

    def round_trips(self, hashes: list[bytes], stored_at: int, into: int) -> bool:
        """Retrieve ``hashes`` into blocks ``into``: all found and equal to ``stored_at``'s."""
        statuses = self.retrieve(f"check-{secrets.token_hex(4)}", hashes, into)
        return statuses == [KeyStatus.OK] * len(hashes) and same_blocks(
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


# ------------------------------------------------------------------ a server after bad input


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
    assert worker.store(chunk_hashes(2, seed=80), 0) == [OK, OK]
    return Baseline(kv_server, raw, worker)
