"""The KV-cache service end to end: adapters and raw ``kv.*`` calls to served KVServices.

Every test runs against live servers over each transport (``inproc``, ``unix``, ``zmq+ipc``;
the harness is in ``conftest.py``). What is tested here lives in the I/O: byte copies in every
transfer mode, the real disk tier, mappings, the transports, the adapters, the wire errors
and the handlers' answers. The rules the state core decides (pins, sessions, eviction,
prefetch jobs, leases, registration and batch checks) are specified without a server in
``test_state.py``; a few of them are also checked here end to end, across the transports.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, overload

import msgpack
import pytest
import torch

from kvrpc import AsyncClient
from kvrpc.codec import WIRE_VERSION, MessageKind, decode, encode_request
from kvrpc.cuda import CudaEventHandle
from kvrpc.errors import (
    CudaUnavailable,
    KVConfigError,
    KVError,
    NotOwner,
    NotSharedMemory,
    Status,
    UnknownInstance,
    UnknownJob,
)
from kvrpc.kv import (
    KeyBatch,
    LoadStoreOp,
    PollingSchedulerAdapter,
    SchedulerAdapter,
    WorkerAdapter,
    kv_registry,
)
from kvrpc.kv import protocols as kv
from kvrpc.kv.cuda_ipc import CudaIPCWrapper
from kvrpc.kv.layout import KVLayout, LayoutKind
from kvrpc.kv.outcomes import KeyStatus
from kvrpc.kv.protocols import KVCacheRegistration
from kvrpc.server import PeerInfo
from kvrpc.testing import raw

from .conftest import (
    BLOCK,
    BPC,
    CHUNK,
    CREDENTIALS,
    LAYER_SHAPE,
    LAYERS,
    MODEL,
    NUM_BLOCKS,
    OK,
    SLOT,
    WAIT,
    WORLD,
    Baseline,
    Keep,
    KVServer,
    RawClient,
    blocks,
    chunk_hashes,
    fill_random,
    lookup_tokens,
    open_workers,
    prompt,
    registration,
    retrieve_all,
    rows,
    same_blocks,
    store_all,
    wait_until,
)

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


# ------------------------------------------------------------------ sessions and registrations


def test_end_session_release_pins_and_unregister_answer_over_the_wire_what_they_released(
    kv_server: KVServer, kv_cache: Callable[..., list[torch.Tensor]], opened: Keep
) -> None:
    # What each releases is test_state.py's to specify; here, the handlers' answers.
    raw = opened(RawClient(kv_server.url, world_size=1))
    stranger = opened(RawClient(kv_server.url, world_size=1))
    worker = raw.register(0, kv_cache())
    hashes = chunk_hashes(2, seed=30)
    assert worker.store(hashes, 0) == [OK, OK]
    assert raw.lookup_count("r", hashes) == 2
    assert kv_server.stats()["pinned_chunks"] == 2
    assert raw.end_session("r") == 2
    assert raw.end_session("r") == 0  # already ended
    stats = kv_server.stats()
    assert (stats["pinned_chunks"], stats["sessions"]) == (0, 0)
    assert raw.lookup_count("again", hashes) == 2
    keys = KeyBatch.from_hashes(MODEL, 1, None, hashes[:1])
    assert raw.call(kv.RELEASE_PINS, "again", keys) == 1
    assert raw.call(kv.RELEASE_PINS, "again", keys) == 0
    assert raw.end_session("again") == 1

    with pytest.raises(NotOwner, match="another client's KV cache"):
        stranger.call(kv.UNREGISTER_KV_CACHE, worker.instance)
    assert raw.call(kv.UNREGISTER_KV_CACHE, worker.instance) is True
    assert raw.call(kv.UNREGISTER_KV_CACHE, worker.instance) is False
    assert kv_server.stats()["instances"] == 0
    with pytest.raises(UnknownInstance):
        worker.store(chunk_hashes(1, seed=31), 4)


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


def test_a_check_of_a_pending_lookup_waits_its_poll_grace_for_the_answer(
    kv_server: KVServer,
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    # A scheduler polling without sleeping holds the GIL that the client's loop thread needs
    # to read the answer; a check that waits a little (with the GIL released) lets it land.
    workers = open_workers(kv_server.url, kv_cache, opened)
    tokens = prompt(2, seed=61)
    store_all(workers, "s", LoadStoreOp(blocks(0, 2), token_ids=tokens))
    scheduler = opened(SchedulerAdapter(kv_server.url, MODEL, WORLD, 0, BLOCK, poll_grace=0.9))
    kv_server.stall()
    scheduler.maybe_submit_lookup_request("graced", token_ids=tokens)
    # The answer can come only after this resume, which races with the check below: a check
    # that only glanced (poll_grace=0) would mostly see None, one that waits sees the answer.
    threading.Thread(target=kv_server.resume).start()
    assert scheduler.check_lookup_result("graced") == 2 * CHUNK


class CountedTokens(Sequence[int]):
    """Token ids that count their reads: hashing them reads them, a repeated check must not."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.reads = 0

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> list[int]: ...
    def __getitem__(self, index: int | slice) -> int | list[int]:
        self.reads += 1
        return self.ids[index]


def test_a_waiting_request_is_hashed_once_however_often_it_is_submitted_and_checked(
    kv_server: KVServer, kv_cache: Callable[..., list[torch.Tensor]], opened: Keep
) -> None:
    # vLLM asks again for a request that waits; the adapter answers from what it has.
    workers = open_workers(kv_server.url, kv_cache, opened)
    ids = prompt(2, seed=62, extra=3)
    store_all(workers, "s", LoadStoreOp(blocks(0, 2), token_ids=ids))
    scheduler = opened(SchedulerAdapter(kv_server.url, MODEL, WORLD, 0, BLOCK))
    tokens = CountedTokens(ids)
    kv_server.stall()
    scheduler.maybe_submit_lookup_request("waiting", token_ids=tokens)
    hashed = tokens.reads
    assert hashed > 0
    for _ in range(3):
        scheduler.maybe_submit_lookup_request("waiting", token_ids=tokens)
        assert scheduler.check_lookup_result("waiting") is None  # the server is stalled
    kv_server.resume()
    assert lookup_tokens(scheduler, "waiting", token_ids=tokens) == 2 * CHUNK
    assert tokens.reads == hashed
    # Told to forget it, the adapter keeps nothing: the next lookup hashes the prompt again,
    # and finds the same chunks.
    scheduler.cleanup_lookup_result("waiting")
    assert lookup_tokens(scheduler, "waiting", token_ids=tokens) == 2 * CHUNK
    assert tokens.reads == 2 * hashed


def test_a_poll_grace_outside_zero_to_one_second_is_refused(kv_server: KVServer) -> None:
    for grace in (-1e-6, 1.0):
        with pytest.raises(KVConfigError, match="poll_grace"):
            SchedulerAdapter(kv_server.url, MODEL, WORLD, 0, BLOCK, poll_grace=grace)


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
    assert worker.store(a, 0) == [OK, OK]
    assert worker.store(c, 4) == [OK, OK]
    kv_server.wait_stats("a and c written to disk", tier_saves=4, pinned_chunks=0)
    assert worker.store(b, 8) == [OK] * 4  # evicts a and c from memory
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

    assert worker.retrieve("ra", a, 40) == [OK, OK]
    assert worker.retrieve("rc", c, 48) == [OK, OK]
    assert same_blocks(worker.layers, blocks(0, 2), blocks(40, 2))
    assert same_blocks(worker.layers, blocks(4, 2), blocks(48, 2))
    assert kv_server.stats()["pinned_chunks"] == 0


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


#: The tests' layout as its ext payload carries it (ext code 7: kvrpc.kv.layout's wire form).
LAYOUT_WIRE: dict[str, Any] = {
    "kind": "paged",
    "num_layers": LAYERS,
    "shape": list(LAYER_SHAPE),
    "dtype": "float16",
}
LAYOUT_EXT = 7
BAD_LAYOUTS: dict[str, tuple[bytes, str]] = {
    "not-msgpack": (b"\xc1", "malformed KVLayout"),
    "truncated": (msgpack.packb(LAYOUT_WIRE)[:-4], "malformed KVLayout"),
    "not-a-dict": (msgpack.packb(list(LAYOUT_WIRE.values())), "exactly the keys"),
    "extra-key": (msgpack.packb({**LAYOUT_WIRE, "num_blocks": NUM_BLOCKS}), "exactly the keys"),
    "unknown-kind": (msgpack.packb({**LAYOUT_WIRE, "kind": "ragged"}), "unknown KV layout kind"),
    "no-k-and-v": (
        msgpack.packb({**LAYOUT_WIRE, "shape": [3, NUM_BLOCKS, BLOCK, 1, 8]}),
        "holds K and V on dim 0, which must be 2",
    ),
    "dtype-alias": (msgpack.packb({**LAYOUT_WIRE, "dtype": "half"}), "is an alias"),
}


def register_request(request_id: int, layout_payload: bytes) -> list[bytes]:
    """A ``kv.register_kv_cache`` request as a peer frames it, with these layout ext bytes.

    A registration model travels as its field dict (see kvrpc.codec); an honest client can
    only send a layout that is well formed, so this one is packed by hand.
    """
    fields = {
        "model_name": MODEL,
        "world_size": WORLD,
        "worker_id": 1,
        "block_size": BLOCK,
        "mode": "inline",
        "layout": msgpack.ExtType(LAYOUT_EXT, layout_payload),
        "tensors": [],
        "cuda_tensors": [],
    }
    args = [secrets.token_bytes(16), fields]
    name = kv.REGISTER_KV_CACHE.name
    header = [WIRE_VERSION, int(MessageKind.REQUEST), request_id, name, args]
    return [msgpack.packb(header, use_bin_type=True)]


@pytest.mark.parametrize(("payload", "says"), BAD_LAYOUTS.values(), ids=list(BAD_LAYOUTS.keys()))
def test_a_malformed_layout_is_refused_at_the_servers_door_and_the_server_stays_healthy(
    payload: bytes, says: str, baseline: Baseline
) -> None:
    async def exchange() -> list[Any]:
        peer = await raw.RawClient(baseline.server.url).connect()
        try:
            replies = []
            requests = (
                register_request(7, payload),
                encode_request(8, "rpc.ping", []),  # the same connection still serves
                register_request(9, msgpack.packb(LAYOUT_WIRE)),  # and so does the same frame
            )
            for frames in requests:
                await peer.send(frames)
                replies.append(decode(await peer.recv(WAIT)))
            return replies
        finally:
            await peer.close()

    refused, pong, registered = asyncio.run(exchange())

    assert (refused.kind, refused.request_id) == (MessageKind.ERROR, 7)
    status, error_type, message = refused.payload
    assert (status, error_type) == (Status.PROTOCOL, "ProtocolError") and says in message
    assert (pong.kind, pong.payload) == (MessageKind.RESPONSE, "pong")
    assert registered.kind is MessageKind.RESPONSE and isinstance(registered.payload, int)
    assert baseline.server.stats()["instances"] == 2  # the baseline's and the good one's
    assert baseline.still_healthy()


def test_block_ids_out_of_range_refuse_only_their_keys(baseline: Baseline) -> None:
    raw, worker = baseline.raw, baseline.worker
    hashes = chunk_hashes(3, seed=81)
    ids = rows(0, 3)
    ids[1, 1] = NUM_BLOCKS
    answer = raw.call(kv.STORE, worker.instance, worker.keys(hashes), ids, [])
    assert answer.statuses == [OK, KeyStatus.BAD_BLOCK_ID, OK]
    assert answer.detail == f"block id {NUM_BLOCKS} is outside this KV cache's 0..{NUM_BLOCKS - 1}"
    ids[1, 1] = -2  # -1 is SKIP_BLOCK in a retrieve; anything lower is out of range
    reply = raw.call(kv.RETRIEVE, worker.instance, ["r"] * 3, worker.keys(hashes), ids)
    assert reply.statuses == [OK, KeyStatus.BAD_BLOCK_ID, OK]
    assert reply.detail == f"block id -2 is outside this KV cache's 0..{NUM_BLOCKS - 1}"
    assert same_blocks(worker.layers, blocks(0, 1), blocks(0, 1))
    assert baseline.still_healthy()


def test_a_retrieve_leaves_blocks_marked_skip_as_they_were(baseline: Baseline) -> None:
    raw, worker = baseline.raw, baseline.worker
    hashes = chunk_hashes(1, seed=84)
    assert raw.call(kv.STORE, worker.instance, worker.keys(hashes), rows(0, 1), []).ok() == [0]
    target = rows(BPC, 1)
    target[0, 0] = -1  # the engine holds this block's tokens itself
    before = [layer.view(torch.int16)[:, BPC].clone() for layer in worker.layers]

    reply = raw.call(kv.RETRIEVE, worker.instance, ["r"], worker.keys(hashes), target)

    assert reply.statuses == [OK]
    assert same_blocks(worker.layers, list(range(BPC + 1, 2 * BPC)), list(range(1, BPC)))
    assert all(
        torch.equal(layer.view(torch.int16)[:, BPC], old)
        for layer, old in zip(worker.layers, before, strict=True)
    )
    other = worker.keys(chunk_hashes(1, seed=85))
    answer = raw.call(kv.STORE, worker.instance, other, target, [])  # a store never skips
    assert answer.statuses == [KeyStatus.BAD_BLOCK_ID]
    assert answer.detail == f"block id -1 is outside this KV cache's 0..{NUM_BLOCKS - 1}"


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
        assert answer.statuses == [KeyStatus.WRONG_NAMESPACE] * 2
        assert f"keys are for model {model!r} world size {world_size}" in answer.detail
        reply = raw.call(kv.RETRIEVE, worker.instance, ["r", "r"], keys, rows(0, 2))
        assert reply.statuses == [KeyStatus.WRONG_NAMESPACE] * 2
        assert "keys are for model" in reply.detail
    rank1_keys = KeyBatch.from_hashes(MODEL, WORLD, 1, hashes)
    answer = raw.call(kv.STORE, worker.instance, rank1_keys, rows(0, 2), [])
    assert answer.statuses == [KeyStatus.WRONG_WORKER] * 2 and "worker id 1" in answer.detail
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
    assert worker.store(old, 0) == [OK, OK]
    assert worker.store(new, 4) == [OK, OK]
    statuses = worker.retrieve("r", old + new, 40)
    assert statuses == [KeyStatus.NOT_IN_CACHE] * 2 + [OK, OK]
    stats = kv_server.stats()
    assert (stats["retrieve_misses"], stats["retrieves"]) == (2, 2)
    assert same_blocks(worker.layers, blocks(4, 2), blocks(44, 2))
    assert kv_server.ping() == "pong"


def test_a_second_store_of_a_key_is_refused_and_keeps_the_first_copy(
    baseline: Baseline,
) -> None:
    worker = baseline.worker
    hashes = chunk_hashes(1, seed=87)
    assert worker.store(hashes, 0) == [OK]
    assert worker.store(hashes, 10) == [KeyStatus.ALREADY_STORED]
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
        raw.call(kv.LOOKUP, "r", worker.keys(chunk_hashes(1, seed=88)), None)
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
    assert worker.store(a, 0) == [OK, OK]
    kv_server.wait_stats("a on disk", tier_saves=2, pinned_chunks=0)
    assert worker.store(b, 4) == [OK] * 4  # a is on disk only now
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
    # The silence is the server's clock moved past the client timeout (on its own loop),
    # not a real one: a short timeout could forget the worker again before its next store.
    timeout = 60.0
    kv_server = start_server(client_timeout=timeout)
    ((worker, layers),) = open_workers(
        kv_server.url, kv_cache, opened, world_size=1, keepalive_interval=3600.0
    )

    async def expire() -> int:
        return kv_server.service.expire_clients(time.monotonic() + timeout + 1)

    assert asyncio.run_coroutine_threadsafe(expire(), kv_server.loop).result(WAIT) == 1
    kv_server.wait_stats("the worker to be dropped", instances=0, clients_expired=1)
    first, second, third = (prompt(1, seed=s) for s in (94, 95, 96))
    store_all([(worker, layers)], "refused", LoadStoreOp(blocks(0, 1), token_ids=first))
    assert kv_server.stats()["stores"] == 0
    # The next store sends the registration again in the background and is dropped rather
    # than wait for it: an engine's step never waits on a server that lost track of it.
    store_all([(worker, layers)], "dropped", LoadStoreOp(blocks(2, 1), token_ids=second))
    assert worker.stats.dropped_stores == 2
    kv_server.wait_stats("the worker to register again", instances=1)
    kv_server.settle(worker)  # and the worker has seen the registration's reply
    store_all([(worker, layers)], "stored", LoadStoreOp(blocks(4, 1), token_ids=third))
    stats = kv_server.stats()
    assert (stats["stores"], stats["instances"], stats["clients_expired"]) == (1, 1, 1)
    assert worker.stats.stored_chunks == 1
    assert worker.stats.dropped_stores == 2


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
        before = await client.call(kv.LOOKUP, client_id, "r", lookup_keys, None)
        store = await client.submit(kv.STORE, client_id, instance, keys, rows(0, chunks), [])
        lookups: list[asyncio.Future[Any]] = []
        # Retrieves of the last chunk, each into blocks of its own (those after the stored
        # ones): one that finds the chunk must copy exactly the stored bytes.
        retrieves: list[tuple[int, asyncio.Future[Any]]] = []
        while not store.done() or len(lookups) < 20:
            lookups.append(await client.submit(kv.LOOKUP, client_id, "r", lookup_keys, None))
            if len(retrieves) < chunks:
                into = (chunks + len(retrieves)) * BPC
                retrieve = kv.RETRIEVE, client_id, instance, ["r"], last_key, rows(into, 1)
                retrieves.append((into, await client.submit(*retrieve)))
            await asyncio.sleep(0)
        assert (await store).statuses == [OK] * chunks
        answers = [await lookup for lookup in lookups]
        found = [(into, (await reply).statuses == [OK]) for into, reply in retrieves]
        after = await client.call(kv.LOOKUP, client_id, "r", lookup_keys, None)

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
    assert raw.register(0, original).store(hashes, 0) == [OK, OK]
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
    assert worker.retrieve("r", hashes, 20) == [OK, OK]
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
