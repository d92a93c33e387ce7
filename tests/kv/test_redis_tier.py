"""The Redis tier, against real redis-servers started on loopback for each test.

Its pure parts first (value headers, the circuit breaker), then :class:`RedisTier` on its
own (writes, finds, loads, corruption, a store killed, paused and full), then whole KV
servers sharing one Redis (and one Redis Cluster): what one stores, another serves.
Nothing here fakes Redis; where ``redis-server`` is missing the tests are skipped with the
reason (``tools/ensure-redis-server.sh`` installs it, as nox's tests session does).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from kvrpc.kv import LoadStoreOp, PollingSchedulerAdapter, WorkerAdapter, integrity
from kvrpc.kv.layout import KVLayout, LayoutKind
from kvrpc.kv.server import poolkeys
from kvrpc.kv.server.records import Namespace
from kvrpc.kv.server.tiers import values
from kvrpc.kv.server.tiers.breaker import Breaker, BreakerState
from kvrpc.testing.redis_server import RedisCluster, RedisProcess, redis_available
from kvrpc.testing.waiting import until

from .conftest import (
    BLOCK,
    CHUNK,
    LAYER_SHAPE,
    LAYERS,
    MODEL,
    OK,
    WAIT,
    Keep,
    KVServer,
    RawClient,
    blocks,
    chunk_hashes,
    fill_random,
    prompt,
    retrieve_all,
    store_all,
    wait_until,
)

needs_redis = pytest.mark.skipif(
    not redis_available(), reason="redis-server/redis-cli not installed"
)

# ------------------------------------------------------------------ pure parts


def test_a_header_round_trips_and_anything_else_is_no_header() -> None:
    raw = values.pack_header(b"n" * 8, 1000, 400, 0xDEADBEEF)
    assert len(raw) == values.HEADER_SIZE
    header = values.unpack_header(raw)
    assert header == values.Header(b"n" * 8, 1000, 3, 0xDEADBEEF, 400)
    assert header.spans() == [(0, 400), (400, 800), (800, 1000)]
    assert values.unpack_header(None) is None
    assert values.unpack_header(raw[:-1]) is None  # cut short
    assert values.unpack_header(b"XXXX" + raw[4:]) is None  # not this format
    assert values.unpack_header(raw[:4] + b"\x09\x00" + raw[6:]) is None  # another version
    assert values.unpack_header(raw[:6] + b"\x04\x00" + raw[8:]) is None  # parts do not add up


def test_parts_cover_the_chunk_once_and_keys_name_model_rank_layout_and_chunk_size() -> None:
    assert values.part_spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert values.part_spans(8, 4) == [(0, 4), (4, 8)]
    assert values.part_spans(3, 4) == [(0, 3)]
    pool_key = b"\xab" * 32 + poolkeys.worker_suffix(b"\x01" * 8, 3)
    base = values.key_base(b"pre:", "org/{model}", 4, 256, pool_key)
    assert base == b"pre:org/(model)/w4/r3/" + b"01" * 8 + b"/c256/" + b"ab" * 32
    assert values.header_key(base) == base + b":h"
    assert values.part_keys(base, 2) == [base + b":0", base + b":1"]


def test_a_breaker_opens_on_a_failure_probes_after_its_backoff_and_doubles_it() -> None:
    breaker = Breaker(backoff=1.0, max_backoff=3.0)
    assert breaker.allows() and breaker.state is BreakerState.UP
    breaker.failed(now=10.0)
    assert not breaker.allows() and breaker.state is BreakerState.SKIPPED
    assert breaker.wait(10.5) == 0.5 and not breaker.probe_due(10.5)
    assert breaker.probe_due(11.0) and breaker.state is BreakerState.PROBING
    assert not breaker.allows()  # a probe decides, not real traffic
    breaker.failed(now=11.0)  # the probe failed: twice as long
    assert breaker.reopens_at == 13.0 and breaker.probe_due(13.0)
    breaker.failed(now=13.0)
    assert breaker.backoff == 3.0  # capped
    assert breaker.probe_due(16.0)
    breaker.succeeded()
    assert breaker.allows() and breaker.backoff == 1.0 and breaker.trips == 1
    breaker.succeeded()  # an UP breaker stays up
    assert breaker.allows()


# ------------------------------------------------------------------ the tier on its own

NBYTES = 10_000
LAYOUT = KVLayout(LayoutKind.PAGED, 2, (2, 64, 4, 1, 8), "float16")


def namespace(model: str = "tier-model") -> Namespace:
    ns_id = poolkeys.namespace_id(model, 1, 4, LAYOUT)
    suffix = poolkeys.worker_suffix(ns_id, 0)
    form = poolkeys.chunk_form(LAYOUT)
    return Namespace(ns_id, model, 1, 4, form, LAYOUT, NBYTES, [suffix], {0: suffix})


def chunk(seed: int) -> torch.Tensor:
    return torch.randint(
        0, 256, (NBYTES,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def pool_key(ns: Namespace, seed: int) -> bytes:
    return bytes([seed % 256]) * 32 + ns.suffixes[0]


def base_of(ns: Namespace, seed: int) -> bytes:
    """The name every key of chunk ``seed`` starts with, as :class:`Tier` writes it."""
    return values.key_base(b"kvrpc:", ns.model_name, 1, 8, pool_key(ns, seed))


@pytest.fixture
def redis() -> Iterator[RedisProcess]:
    if not redis_available():
        pytest.skip("redis-server/redis-cli not installed")
    with RedisProcess() as server:
        yield server


def store_client(redis: RedisProcess) -> Any:
    """A plain redis-py client of the test's own, to change what the store holds."""
    import redis as redis_py

    return redis_py.Redis.from_url(redis.url)


class Tier:
    """A RedisTier with its background work running, for one test."""

    def __init__(self, url: str, **settings: Any) -> None:
        from kvrpc.kv.server.tiers.redistier import RedisSettings, RedisTier

        self.tier = RedisTier(RedisSettings(url, part_bytes=4096, **settings), chunk_tokens=8)
        #: The keys whose writes are done with their data (written, skipped or dropped).
        self.released: list[bytes] = []
        self._released_more = asyncio.Event()

    async def __aenter__(self) -> Tier:
        self.task = asyncio.create_task(self.tier.run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.tier.aclose()

    def offer(
        self, ns: Namespace, seed: int, data: torch.Tensor, checksum: int | None = None
    ) -> bool:
        key = pool_key(ns, seed)
        return self.tier.offer(ns, key, data, lambda: self._release(key), checksum)

    async def released_count(self, count: int, timeout: float = WAIT) -> None:
        """Wait until ``count`` writes are done with their data (the tier tells each)."""
        async with asyncio.timeout(timeout):
            while len(self.released) < count:
                self._released_more.clear()
                await self._released_more.wait()

    def _release(self, key: bytes) -> None:  # on the loop, from the tier's writer
        self.released.append(key)
        self._released_more.set()

    async def load(self, ns: Namespace, seed: int) -> torch.Tensor | None:
        key = pool_key(ns, seed)
        [header] = await self.tier.find(ns, [key])
        if header is None:
            return None
        out = torch.zeros(NBYTES, dtype=torch.uint8)
        return out if await self.tier.load(ns, key, header, out) else None


READS = pytest.mark.parametrize("direct", [True, False], ids=["direct", "redis-py"])


@needs_redis
@READS
async def test_a_written_chunk_is_found_and_loaded_byte_identical_in_parts(
    redis: RedisProcess, direct: bool
) -> None:
    ns = namespace()
    data = chunk(1)
    async with Tier(redis.url, direct_reads=direct) as t:
        assert t.offer(ns, 1, data)
        await t.released_count(1)
        assert t.tier.stats()["writes"] == 1
        loaded = await t.load(ns, 1)
        assert loaded is not None and torch.equal(loaded, data)
        assert await t.load(ns, 2) is None  # never written
        assert not t.offer(ns, 1, data)  # known to be there: not written again
        # Three parts of at most 4096 bytes and a header, under readable names.
        keys = sorted(redis.cli("--scan", "--pattern", "kvrpc:tier-model/*").split())
        assert len(keys) == 4 and keys[-1].endswith(":h")
        assert t.tier.stats() | {} == t.tier.stats()  # a fresh dict each time
        stats = t.tier.stats()
        assert (stats["hits"], stats["misses"], stats["loads"], stats["state"]) == (1, 1, 1, 0)
        assert stats["direct_loads"] == (1 if direct else 0)


@needs_redis
@READS
async def test_a_corrupted_part_or_header_is_a_miss_counted_and_deleted(
    redis: RedisProcess, direct: bool
) -> None:
    ns = namespace()
    async with Tier(redis.url, direct_reads=direct) as t:
        for seed in (1, 2):
            assert t.offer(ns, seed, chunk(seed))
        await t.released_count(2)
        base1 = base_of(ns, 1)
        base2 = base_of(ns, 2)
        # One byte of a part changed (same length): only the checksum can tell.
        part = base1 + b":1"
        direct = store_client(redis)
        direct.setrange(part, 7, b"\x00" if chunk(1)[4096 + 7] else b"\x01")
        direct.set(base2 + b":h", b"not a header")
        assert await t.load(ns, 1) is None
        assert await t.load(ns, 2) is None
        assert t.tier.stats()["corrupt"] == 2
        assert direct.exists(base1 + b":h", part, base2 + b":h") == 0


@needs_redis
async def test_the_header_carries_the_chunks_own_checksum(redis: RedisProcess) -> None:
    ns = namespace()
    async with Tier(redis.url) as t:
        given = integrity.checksum(chunk(1))
        assert t.offer(ns, 1, chunk(1), given)
        assert t.offer(ns, 2, chunk(2))  # stored without one: the writer computes it
        await t.released_count(2)
        assert t.tier.stats()["writes"] == 2
        headers = await t.tier.find(ns, [pool_key(ns, 1), pool_key(ns, 2)])
        assert [h.checksum if h else None for h in headers] == [
            given,
            integrity.checksum(chunk(2)),
        ]


@needs_redis
@READS
@pytest.mark.parametrize("offset", [0, 4095, 4096, 8191, NBYTES - 1], ids=lambda o: f"byte{o}")
async def test_every_corrupt_byte_planted_in_a_part_is_detected_as_a_miss_and_deleted(
    redis: RedisProcess, direct: bool, offset: int
) -> None:
    ns = namespace()
    async with Tier(redis.url, direct_reads=direct) as t:
        for seed in (1, 2):
            assert t.offer(ns, seed, chunk(seed))
        await t.released_count(2)
        base = base_of(ns, 1)
        part, at = divmod(offset, 4096)
        store = store_client(redis)
        old = store.getrange(base + b":%d" % part, at, at)
        store.setrange(base + b":%d" % part, at, bytes([old[0] ^ 0x04]))
        assert await t.load(ns, 1) is None
        assert t.tier.stats()["corrupt"] == 1
        assert store.exists(base + b":h", base + b":0", base + b":1", base + b":2") == 0
        loaded = await t.load(ns, 2)
        assert loaded is not None and torch.equal(loaded, chunk(2))


@needs_redis
async def test_a_value_whose_checksum_names_other_bytes_is_never_loaded(
    redis: RedisProcess,
) -> None:
    ns = namespace()
    async with Tier(redis.url) as t:
        wrong = integrity.checksum(chunk(9))
        assert t.offer(ns, 1, chunk(1), wrong)
        await t.released_count(1)
        assert t.tier.stats()["writes"] == 1
        assert await t.load(ns, 1) is None
        assert t.tier.stats()["corrupt"] == 1


@needs_redis
@READS
async def test_a_part_cut_short_or_of_another_type_is_a_miss_and_the_next_load_works(
    redis: RedisProcess, direct: bool
) -> None:
    ns = namespace()
    async with Tier(redis.url, direct_reads=direct) as t:
        for seed in (1, 2, 3):
            assert t.offer(ns, seed, chunk(seed))
        await t.released_count(3)
        store = store_client(redis)
        base1 = base_of(ns, 1)
        base2 = base_of(ns, 2)
        store.set(base1 + b":0", b"short")  # a value of another length than its span
        store.delete(base2 + b":2")
        store.rpush(base2 + b":2", b"x")  # WRONGTYPE for GET
        assert await t.load(ns, 1) is None
        assert await t.load(ns, 2) is None
        assert t.tier.stats()["corrupt"] == 2 and t.tier.available()
        loaded = await t.load(ns, 3)  # the connection that read the bad replies still works
        assert loaded is not None and torch.equal(loaded, chunk(3))


@needs_redis
def test_direct_reads_log_in_with_the_urls_password_and_database() -> None:
    if not redis_available():
        pytest.skip("redis-server/redis-cli not installed")
    ns = namespace()

    async def round_trip(url: str) -> dict[str, int]:
        async with Tier(url) as t:
            assert t.offer(ns, 5, chunk(5))
            await t.released_count(1)
            loaded = await t.load(ns, 5)
            assert loaded is not None and torch.equal(loaded, chunk(5))
            return t.tier.stats()

    with RedisProcess() as server:
        server.cli("config", "set", "requirepass", "s3cret")  # after start: it pings without
        stats = asyncio.run(round_trip(f"redis://:s3cret@127.0.0.1:{server.port}/3"))
        assert stats["direct_loads"] == 1 and stats["writes"] == 1
        assert int(server.cli("-a", "s3cret", "-n", "3", "dbsize")) == 4  # in database 3


@needs_redis
async def test_a_header_of_another_namespace_or_length_is_never_loaded(
    redis: RedisProcess,
) -> None:
    ns = namespace()
    async with Tier(redis.url) as t:
        assert t.offer(ns, 3, chunk(3))
        await t.released_count(1)
        base = base_of(ns, 3)
        store_client(redis).set(base + b":h", values.pack_header(ns.id, NBYTES - 1, NBYTES, 0))
        assert await t.load(ns, 3) is None
        assert t.tier.stats()["corrupt"] == 1


@needs_redis
async def test_writes_past_the_budget_are_dropped_and_counted_never_queued(
    redis: RedisProcess,
) -> None:
    ns = namespace()
    async with Tier(redis.url, write_budget=2 * NBYTES) as t:
        redis.pause()  # nothing is written while paused: the queue fills
        try:
            offered = [t.offer(ns, seed, chunk(seed)) for seed in range(5)]
            assert offered == [True, True, False, False, False]
            stats = t.tier.stats()
            assert stats["write_dropped"] == 3
            assert stats["write_queued_bytes"] <= 2 * NBYTES
        finally:
            redis.resume()
        await t.released_count(2)
        assert t.tier.stats()["write_queued_bytes"] == 0


@needs_redis
async def test_a_killed_store_is_skipped_fast_and_used_again_once_it_is_back(
    redis: RedisProcess,
) -> None:
    ns = namespace()
    async with Tier(redis.url, timeout=0.5) as t:
        assert t.offer(ns, 1, chunk(1))
        await t.released_count(1)
        redis.kill()
        started = time.monotonic()
        assert await t.tier.find(ns, [pool_key(ns, 1)]) == [None]
        assert time.monotonic() - started < 5  # bounded by the deadline, not a hang
        assert not t.tier.available()
        assert t.tier.stats()["state"] == int(BreakerState.SKIPPED)
        assert not t.offer(ns, 2, chunk(2))  # skipped, counted
        assert t.tier.stats()["write_skipped"] == 1
        assert await t.tier.find(ns, [pool_key(ns, 1)]) == [None]  # asks nothing while skipped
        redis.start()  # an empty server on the same port
        # The probe is the tier's own timer, with no event to wait on.
        await until(t.tier.available, "the probe to bring the tier back", 30)
        assert t.offer(ns, 2, chunk(2))
        await t.released_count(2)
        loaded = await t.load(ns, 2)
        assert loaded is not None and torch.equal(loaded, chunk(2))


@needs_redis
async def test_a_full_store_refuses_writes_counted_and_reads_go_on(
    redis: RedisProcess,
) -> None:
    ns = namespace()
    async with Tier(redis.url) as t:
        assert t.offer(ns, 1, chunk(1))
        await t.released_count(1)
        used = int(redis.cli("info", "memory").split("used_memory:")[1].split()[0])
        redis.cli("config", "set", "maxmemory", str(used + 1000))
        redis.cli("config", "set", "maxmemory-policy", "noeviction")
        for seed in range(2, 6):
            assert t.offer(ns, seed, chunk(seed))
        await t.released_count(5)
        stats = t.tier.stats()
        assert stats["write_errors"] >= 1 and stats["state"] == 0  # refused, not down
        loaded = await t.load(ns, 1)
        assert loaded is not None and torch.equal(loaded, chunk(1))


@needs_redis
async def test_a_key_of_another_type_is_a_bad_key_deleted_and_the_tier_stays_up(
    redis: RedisProcess,
) -> None:
    ns = namespace()
    async with Tier(redis.url) as t:
        for seed in (1, 2):
            assert t.offer(ns, seed, chunk(seed))
        await t.released_count(2)
        base1 = base_of(ns, 1)
        base2 = base_of(ns, 2)
        direct = store_client(redis)
        # GET on a list answers WRONGTYPE: an error reply from a store that is up.
        direct.delete(base1 + b":0", base2 + b":h")
        direct.rpush(base1 + b":0", b"x")
        direct.rpush(base2 + b":h", b"x")
        headers = await t.tier.find(ns, [pool_key(ns, 1), pool_key(ns, 2)])
        assert headers[0] is not None and headers[1] is None
        assert await t.load(ns, 1) is None
        stats = t.tier.stats()
        assert (stats["corrupt"], stats["state"], stats["trips"]) == (2, 0, 0)
        assert direct.exists(base1 + b":h", base1 + b":0", base2 + b":h") == 0


@needs_redis
async def test_the_deadline_covers_the_wait_for_a_connection(redis: RedisProcess) -> None:
    ns = namespace()
    async with Tier(redis.url, timeout=0.2, connections=1) as t:
        # The test takes the tier's one connection, as an operation that never ends would.
        async with t.tier._limit:
            headers = await asyncio.wait_for(t.tier.find(ns, [pool_key(ns, 1)]), timeout=30)
        assert headers == [None]
        assert t.tier.stats()["timeouts"] == 1 and not t.tier.available()


@needs_redis
async def test_the_stores_memory_and_its_limit_are_reported(redis: RedisProcess) -> None:
    redis.cli("config", "set", "maxmemory", str(64 << 20))
    async with Tier(redis.url) as t:
        # Read by the tier's own timer, with no event to wait on.
        await until(lambda: t.tier.stats()["capacity"] == 64 << 20, "the first INFO memory")
        assert t.tier.stats()["used_bytes"] > 0


# ------------------------------------------------------------------ servers sharing a Redis


def share(
    start_server: Callable[..., KVServer], url: str, **settings: Any
) -> tuple[KVServer, KVServer]:
    """Two KV servers (no shared memory between them) over one Redis at ``url``."""
    first = start_server(slots=16, redis_url=url, **settings)
    second = start_server(slots=16, redis_url=url, **settings)
    return first, second


def shm_round_trip(
    a: KVServer, b: KVServer, kv_cache: Callable[..., list[torch.Tensor]], opened: Keep
) -> None:
    """Store 3 chunks through ``a``; ``b`` finds them in Redis and retrieves them intact."""
    writer = opened(RawClient(a.url, world_size=1)).register(0, kv_cache())
    reader_client = opened(RawClient(b.url, world_size=1))
    reader = reader_client.register(0, kv_cache())
    hashes = chunk_hashes(3, 80)
    before = a.stats()["redis_writes"]
    assert writer.store(hashes, 0) == [OK] * 3
    a.wait_stats("written to Redis", redis_writes=before + 3, redis_write_queued=0)
    job = reader_client.lookup("r", hashes)
    assert isinstance(job, str), "a lookup that L1 misses asks Redis through a prefetch job"
    assert wait_until(lambda: reader_client.query(job), lambda n: n is not None, "job") == 3
    assert reader.retrieve("r", hashes, 40) == [OK] * 3
    for layer_a, layer_b in zip(writer.layers, reader.layers, strict=True):
        bits_a, bits_b = layer_a.view(torch.int16), layer_b.view(torch.int16)
        assert torch.equal(bits_a[:, blocks(0, 3)], bits_b[:, blocks(40, 3)])
    assert reader_client.end_session("r") == 0  # the retrieve released every pin
    assert b.stats()["redis_loads"] >= 3
    assert b.stats()["redis_direct_loads"] == b.stats()["redis_loads"]  # past redis-py


@needs_redis
def test_what_one_server_stores_another_serves_from_a_shared_redis_in_shm_mode(
    redis: RedisProcess,
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    a, b = share(start_server, redis.url)
    shm_round_trip(a, b, kv_cache, opened)


@needs_redis
def test_what_one_server_stores_another_serves_in_the_inline_mode(
    redis: RedisProcess, start_server: Callable[..., KVServer], opened: Keep
) -> None:
    a, b = share(start_server, redis.url)
    caches: list[list[torch.Tensor]] = []
    workers = []
    for server, seed in ((a, 1), (b, 2)):
        worker = opened(WorkerAdapter(server.url, MODEL, 1, 0, BLOCK, transfer_mode="inline"))
        layers = [torch.empty(LAYER_SHAPE, dtype=torch.float16) for _ in range(LAYERS)]
        fill_random(layers, seed=seed)
        worker.register_kv_caches({f"layer.{i}": t for i, t in enumerate(layers)})
        workers.append(worker)
        caches.append(layers)
    tokens = prompt(3, seed=90)
    store_all([(workers[0], caches[0])], "s", LoadStoreOp(blocks(0, 3), token_ids=tokens))
    a.wait_stats("written to Redis", redis_writes=3, pinned_chunks=0)
    scheduler = opened(PollingSchedulerAdapter(b.url, MODEL, 1, 0, BLOCK))
    scheduler.maybe_submit_lookup_request("r", token_ids=tokens)
    assert scheduler.check_lookup_result("r") == 3 * CHUNK
    retrieve_all([(workers[1], caches[1])], "r", LoadStoreOp(blocks(20, 3), token_ids=tokens))
    assert workers[1].get_block_ids_with_load_errors() == set()
    for layer_a, layer_b in zip(caches[0], caches[1], strict=True):
        bits_a, bits_b = layer_a.view(torch.int16), layer_b.view(torch.int16)
        assert torch.equal(bits_a[:, blocks(0, 3)], bits_b[:, blocks(20, 3)])


@needs_redis
def test_lookups_answer_while_redis_is_down_and_the_tier_comes_back_by_itself(
    redis: RedisProcess,
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    a, b = share(start_server, redis.url, redis_timeout=0.5)
    raw_b = opened(RawClient(b.url, world_size=1))
    worker_b = raw_b.register(0, kv_cache())
    local = chunk_hashes(2, 81)
    assert worker_b.store(local, 0) == [OK, OK]
    b.wait_stats("written", redis_writes=2, pinned_chunks=0)
    redis.kill()
    # L1 keeps serving; a lookup past L1 ends as a job that counts what L1 has.
    assert raw_b.probe(local) == 2
    job = raw_b.lookup("down", local + chunk_hashes(2, 82))
    count = (
        job
        if isinstance(job, int)
        else wait_until(
            lambda: raw_b.query(job), lambda n: n is not None, "the job while Redis is down"
        )
    )
    assert count == 2
    stats = b.wait_stats("the tier skipped", redis_state=int(BreakerState.SKIPPED))
    assert stats["redis_errors"] + stats["redis_timeouts"] >= 1
    # While skipped, a lookup does not ask Redis: a count at once, not a job.
    assert isinstance(raw_b.lookup("skipped", local + chunk_hashes(2, 83)), int)
    assert worker_b.store(chunk_hashes(1, 84), 10) == [OK]  # stores go on
    for request_id in ("down", "skipped"):
        raw_b.end_session(request_id)
    redis.start()
    b.wait_stats("the tier back", redis_state=int(BreakerState.UP))
    shm_round_trip(b, a, kv_cache, opened)


@needs_redis
def test_a_paused_redis_blocks_no_store_and_no_lookup(
    redis: RedisProcess,
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    budget = 4 * 512  # four chunks of 512 bytes
    a = start_server(
        slots=16, redis_url=redis.url, redis_timeout=0.5, redis_write_budget=budget / (1 << 30)
    )
    raw = opened(RawClient(a.url, world_size=1))
    worker = raw.register(0, kv_cache())
    redis.pause()
    try:
        for i in range(4):  # every store is answered while Redis answers nothing
            assert worker.store(chunk_hashes(3, 85 + i), 0) == [OK] * 3
            assert a.stats()["redis_write_queued_bytes"] <= budget
        assert raw.probe(chunk_hashes(3, 85)) == 3
        stats = a.wait_stats("the tier skipped", redis_state=int(BreakerState.SKIPPED))
        assert stats["redis_write_dropped"] + stats["redis_write_skipped"] >= 8
    finally:
        redis.resume()
    a.wait_stats("the tier back", redis_state=int(BreakerState.UP), redis_write_queued_bytes=0)
    assert a.stats()["pinned_chunks"] == 0


@needs_redis
def test_servers_share_chunks_through_a_redis_cluster(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    with RedisCluster(3) as cluster:
        a, b = share(start_server, cluster.url, redis_cluster=True)
        shm_round_trip(a, b, kv_cache, opened)
        spread = [int(node.cli("dbsize")) for node in cluster.nodes]
        assert sum(spread) == 3 * 2 and sum(n > 0 for n in spread) >= 2  # parts and headers
        a.stop()
        b.stop()
