"""KvrpcConnector under vLLM's own Scheduler, with a real ``kvrpc serve`` and two workers.

Runs in ``nox -s vllm`` (vLLM 0.33.0's wheel, on the CPU): vLLM's Scheduler loads the
connector through its own factory from a ``KVTransferConfig``, schedules, allocates blocks,
holds and frees them; two worker processes (tensor-parallel ranks 0 and 1) run the
connector's worker role on CPU KV tensors that vLLM's own ``allocate_kv_cache`` made. Only
the forward pass is not vLLM's (see ``vllm_harness``). Elsewhere these tests are skipped.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

vllm = pytest.importorskip("vllm", reason="the vLLM connector tests run in `nox -s vllm`")

import torch  # noqa: E402
import vllm_harness as harness  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from kvrpc.errors import KVConfigError  # noqa: E402
from kvrpc.integrations.vllm import KvrpcConnector, KvrpcConnectorStats  # noqa: E402
from kvrpc.testing.serve import ServeProcess  # noqa: E402

CHUNK = 64  # tokens per server chunk: 4 blocks of 16
WAITING_FOR_KV = RequestStatus.WAITING_FOR_REMOTE_KVS
TP = 2
init_none_hash(sha256)


# ---------------------------------------------------------------------- the pieces


class Server(ServeProcess):
    """A ``kvrpc serve`` child on a local socket, which a test may kill and restart."""

    def __init__(self, path: Path, scheme: str = "unix", cpu_buffer_size: str = "0.05") -> None:
        super().__init__(
            f"{scheme}://{path}",
            *("--chunk-size", str(CHUNK), "--cpu-buffer-size", cpu_buffer_size),
            *("--client-timeout", "5"),
        )


@dataclass
class Step:
    """What one engine step scheduled, and what each rank's forward saw and reported."""

    index: int
    sync_loads: bool  # vLLM's SchedulerOutput.has_sync_kv_loads
    new: dict[str, int]  # request newly scheduled -> its num_computed_tokens then
    scheduled: dict[str, int]  # request -> tokens scheduled
    statuses: dict[str, RequestStatus]  # every request vLLM holds, after schedule()
    external: dict[str, int]  # newly scheduled -> vLLM's num_external_cached_tokens
    load_errors: list[set[int]] = field(default_factory=list)  # per rank
    wrong_reads: list[dict[str, set[int]]] = field(default_factory=list)  # per rank


class Engine:
    """vLLM's Scheduler with KvrpcConnector, and two worker processes, stepped by hand."""

    def __init__(self, model: str, extra: dict[str, Any], kv_events: Any = None) -> None:
        self.closed = False
        self.config = harness.vllm_config(model, extra, TP, kv_events=kv_events)
        self.scheduler = Scheduler(
            vllm_config=self.config,
            kv_cache_config=harness.kv_cache_config(TP),
            log_stats=True,
            structured_output_manager=StructuredOutputManager(self.config),
            block_size=harness.BLOCK_SIZE,
        )
        context = multiprocessing.get_context("spawn")
        self.pipes = []
        self.workers = []
        engine_id = self.config.kv_transfer_config.engine_id
        for rank in range(TP):
            ours, theirs = context.Pipe()
            worker = context.Process(
                target=harness.worker_main,
                args=(theirs, model, extra, rank, TP, engine_id),
                daemon=True,
            )
            worker.start()
            self.pipes.append(ours)
            self.workers.append(worker)
        for pipe in self.pipes:
            kind, *detail = self._recv(pipe, 120)
            assert kind == "ready", detail
        self.aggregator = KVOutputAggregator(expected_finished_count=TP)
        self.requests: dict[str, Request] = {}
        self.tables: dict[str, list[int]] = {}
        self.stats = KvrpcConnectorStats()
        # vLLM stat loggers (a PrometheusStatLogger) that a test adds: every step's
        # SchedulerStats go to them, as vLLM's engine core client hands them on.
        self.stat_loggers: list[Any] = []
        self.load_errors: set[int] = set()
        self.scheduled: dict[str, int] = {}  # request -> tokens computed when first scheduled
        self.history: list[Step] = []
        # request -> (step, answer) for every get_num_new_matched_tokens vLLM made
        self.answers: dict[str, list[tuple[int, tuple[int | None, bool]]]] = {}
        asked = self.connector.get_num_new_matched_tokens

        def recording(request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
            answer = asked(request, num_computed_tokens)
            self.answers.setdefault(request.request_id, []).append((len(self.history), answer))
            return answer

        self.connector.get_num_new_matched_tokens = recording  # type: ignore[method-assign]

    @staticmethod
    def _recv(pipe: Any, timeout: float) -> Any:
        assert pipe.poll(timeout), "a worker did not answer in time"
        return pipe.recv()

    @property
    def connector(self) -> KvrpcConnector:
        connector = self.scheduler.connector
        assert isinstance(connector, KvrpcConnector)
        return connector

    def add(self, request_id: str, tokens: list[int], *, max_tokens: int = 2,
            cache_salt: str | None = None, lora: LoRARequest | None = None) -> Request:  # fmt: skip
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        request = Request(
            request_id, tokens, params, None, cache_salt=cache_salt, lora_request=lora,
            block_hasher=get_request_block_hasher(harness.BLOCK_SIZE, sha256),
        )  # fmt: skip
        self.requests[request_id] = request
        self.scheduler.add_request(request)
        return request

    def step(self, before_workers: Callable[[Any], None] | None = None) -> int:
        """One engine step; returns how many tokens it scheduled.

        ``before_workers`` sees the scheduler's output before the workers get it.
        """
        out = self.scheduler.schedule()
        record = Step(
            len(self.history),
            out.has_sync_kv_loads,
            {new.req_id: new.num_computed_tokens for new in out.scheduled_new_reqs},
            dict(out.num_scheduled_tokens),
            {r: request.status for r, request in self.scheduler.requests.items()},
            {
                new.req_id: stats.num_external_cached_tokens
                for new in out.scheduled_new_reqs
                if (stats := self.requests[new.req_id].prefill_stats) is not None
            },
        )
        self.history.append(record)
        if before_workers is not None:
            before_workers(out)
        writes: list[tuple[int, int, int, int]] = []
        reads: dict[str, list[tuple[int, int, int, int]]] = {}
        starts: dict[str, int] = {}
        for new in out.scheduled_new_reqs:
            self.tables[new.req_id] = list(new.block_ids[0])
            starts[new.req_id] = new.num_computed_tokens
            self.scheduled.setdefault(new.req_id, new.num_computed_tokens)
        cached = out.scheduled_cached_reqs
        for index, request_id in enumerate(cached.req_ids):
            ids = cached.new_block_ids[index]
            if request_id in cached.resumed_req_ids:
                self.tables[request_id] = list(ids[0]) if ids else []
            elif ids:
                self.tables[request_id].extend(ids[0])
            starts[request_id] = cached.num_computed_tokens[index]
        sampled: dict[str, list[int]] = {}
        for request_id, count in out.num_scheduled_tokens.items():
            request, table = self.requests[request_id], self.tables[request_id]
            start = starts[request_id]
            for position in range(start, start + count):
                block, offset = divmod(position, harness.BLOCK_SIZE)
                token = request.all_token_ids[position]
                writes.append((table[block], offset, token, position))
            # Attention reads the KV of every token before the scheduled ones.
            reads[request_id] = [
                (table[p // harness.BLOCK_SIZE], p % harness.BLOCK_SIZE,
                 request.all_token_ids[p], p)
                for p in range(start)
            ]  # fmt: skip
            # The last known token computed: the forward samples the next one.
            sampled[request_id] = [7] if start + count >= request.num_tokens else []
        metadata = pickle.dumps(out.kv_connector_metadata)
        for pipe in self.pipes:
            message = ("step", metadata, sorted(out.finished_req_ids), writes, reads,
                       out.has_sync_kv_loads)  # fmt: skip
            pipe.send(message)
        outputs = []
        for pipe in self.pipes:
            kind, kv_output, wrong = self._recv(pipe, 60)
            assert kind == "output"
            self.load_errors |= kv_output.invalid_block_ids
            record.load_errors.append(set(kv_output.invalid_block_ids or ()))
            record.wrong_reads.append(wrong)
            ids = list(out.num_scheduled_tokens)
            outputs.append(
                ModelRunnerOutput(
                    req_ids=ids,
                    req_id_to_index={r: i for i, r in enumerate(ids)},
                    sampled_token_ids=[sampled[r] for r in ids],
                    kv_connector_output=kv_output,
                )
            )
        engine_outputs = self.scheduler.update_from_output(out, self.aggregator.aggregate(outputs))
        # The stats as vLLM's logger gets them: both roles' counters, all workers summed.
        for engine_output in engine_outputs.values():
            stats = engine_output.scheduler_stats
            if stats is not None and stats.kv_connector_stats:
                self.stats.aggregate(
                    KvrpcConnector.build_kv_connector_stats(stats.kv_connector_stats)
                )
            for logger in self.stat_loggers:
                logger.record(scheduler_stats=stats, iteration_stats=None, engine_idx=0)
        return out.total_num_scheduled_tokens

    def run(self, done: Callable[[], bool], timeout: float = 60.0) -> None:
        """Step until ``done()``; fails past ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "the engine did not get there in time"
            if self.step() == 0:
                time.sleep(0.005)

    def finished(self, *request_ids: str) -> bool:
        return all(r not in self.scheduler.requests for r in request_ids)

    def serve(self, request_id: str, tokens: list[int], **options: Any) -> Request:
        """Add a request and run the engine until it is done and its blocks are freed."""
        request = self.add(request_id, tokens, **options)
        self.run(lambda: self.finished(request_id))
        return request

    def blocks(self, rank: int, block_ids: list[int]) -> list[torch.Tensor]:
        self.pipes[rank].send(("blocks", block_ids))
        kind, layers = self._recv(self.pipes[rank], 30)
        assert kind == "blocks"
        return list(layers)

    def fill(self, block: int, value: float) -> list[list[torch.Tensor]]:
        """Overwrite one block on every rank; returns its bytes per rank."""
        for pipe in self.pipes:
            pipe.send(("fill", block, value))
            assert self._recv(pipe, 30)[0] == "filled"
        return [self.blocks(rank, [block]) for rank in range(TP)]

    def close(self) -> None:
        """Stop the workers and the scheduler; idempotent (a test may close one early)."""
        if self.closed:
            return
        self.closed = True
        for pipe in self.pipes:
            pipe.send(("stop",))
        for pipe, worker in zip(self.pipes, self.workers, strict=True):
            if pipe.poll(30):
                pipe.recv()
            worker.join(10)
        self.scheduler.shutdown()  # as vLLM's engine core does: its publisher, the connector


def prompt(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 999, (length,), generator=generator).tolist()


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model() -> str:
    return harness.save_tiny_model()


@pytest.fixture(params=["unix"])
def scheme(request: pytest.FixtureRequest) -> str:
    """The transport to the server; a test that cares parametrizes it indirectly."""
    return str(request.param)


@pytest.fixture
def cpu_buffer_size(request: pytest.FixtureRequest) -> str:
    """The server's L1 in GiB; a test that needs evictions parametrizes it indirectly."""
    return str(getattr(request, "param", "0.05"))


@pytest.fixture
def server(scheme: str, cpu_buffer_size: str) -> Iterator[Server]:
    # In the temp dir, not pytest's tmp_path: a unix socket path must fit in 108 bytes.
    path = Path(tempfile.gettempdir()) / f"kv-{os.getpid()}-{time.monotonic_ns()}.sock"
    server = Server(path, scheme, cpu_buffer_size)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def engine(model: str, server: Server) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(kv_events: Any = None, **extra: Any) -> Engine:
        settings = {"kvrpc.url": server.url, "kvrpc.lookup_timeout": 2.0,
                    "kvrpc.timeout": 3.0, **extra}  # fmt: skip
        engines.append(Engine(model, settings, kv_events))
        return engines[-1]

    yield make
    for made in engines:
        made.close()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.02)


def rank_bytes(engine: Engine, block_ids: list[int]) -> list[list[torch.Tensor]]:
    return [engine.blocks(rank, block_ids) for rank in range(TP)]


def same(left: list[list[torch.Tensor]], right: list[list[torch.Tensor]]) -> bool:
    return all(
        torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        for rank_a, rank_b in zip(left, right, strict=True)
        for a, b in zip(rank_a, rank_b, strict=True)
    )


# ---------------------------------------------------------------------- the tests


def test_a_prefix_stored_by_one_request_is_loaded_by_the_next_byte_for_byte(
    engine: Callable[..., Engine], server: Server
) -> None:
    run = engine()
    shared = prompt(192, seed=1)
    first = shared + prompt(8, seed=2)
    run.serve("first", first)
    assert run.stats.data.get("hit_tokens", 0) == 0
    assert run.stats.data["stored_chunks"] == 3 * TP  # 200 tokens: 3 whole chunks, each rank
    first_blocks = run.tables["first"][:12]
    expected = rank_bytes(run, first_blocks)

    run.scheduler.reset_prefix_cache()  # vLLM's own cache forgets; kvrpc must supply it
    second = shared + prompt(40, seed=3)
    run.serve("second", second)

    # vLLM scheduled it with the 192 tokens the connector loaded as already computed.
    assert run.scheduled["second"] == 192
    assert run.stats.data["hit_tokens"] == 192
    assert run.stats.data["retrieved_chunks"] == 3 * TP
    assert run.load_errors == set()
    assert all(layer.abs().sum() > 0 for rank in expected for layer in rank)  # written
    assert same(rank_bytes(run, run.tables["second"][:12]), expected)
    assert server.stats()["pinned_chunks"] == 0


def test_another_cache_salt_never_hits(engine: Callable[..., Engine]) -> None:
    run = engine()
    shared = prompt(128, seed=4)
    run.serve("tenant-a", [*shared, 5], cache_salt="a")
    run.scheduler.reset_prefix_cache()
    run.serve("tenant-b", [*shared, 6], cache_salt="b")
    assert run.scheduled["tenant-b"] == 0
    run.scheduler.reset_prefix_cache()
    run.serve("tenant-a-again", [*shared, 7], cache_salt="a")
    assert run.scheduled["tenant-a-again"] == 128


def test_chunks_keyed_by_vllms_block_hashes_are_loaded_byte_for_byte_and_only_so(
    engine: Callable[..., Engine], server: Server
) -> None:
    """``kvrpc.chunk_keys = "block_hashes"``: the lookup hashes no token, and still hits."""
    run = engine(**{"kvrpc.chunk_keys": "block_hashes"})
    shared = prompt(192, seed=21)
    run.serve("first", shared + prompt(8, seed=22))
    assert run.stats.data["stored_chunks"] == 3 * TP
    expected = rank_bytes(run, run.tables["first"][:12])
    run.scheduler.reset_prefix_cache()
    run.serve("second", shared + prompt(40, seed=23))
    assert run.scheduled["second"] == 192
    assert run.load_errors == set()
    assert same(rank_bytes(run, run.tables["second"][:12]), expected)
    run.close()
    # Keys made from tokens name other chunks: an engine hashing tokens finds none of them.
    by_tokens = engine()
    by_tokens.serve("third", shared + prompt(8, seed=24))
    assert by_tokens.scheduled["third"] == 0


def test_a_lora_requests_chunks_never_serve_the_base_model_nor_another_lora(
    engine: Callable[..., Engine],
) -> None:
    """Keyed by vLLM's block hashes (they name the LoRA), though chunk_keys is 'tokens'."""
    run = engine()
    shared = prompt(128, seed=25)
    run.serve("base", [*shared, 1])
    run.scheduler.reset_prefix_cache()
    run.serve("lora-a", [*shared, 2], lora=LoRARequest("a", 1, "/adapters/a"))
    assert run.scheduled["lora-a"] == 0  # the base model's chunks are not the LoRA's
    run.scheduler.reset_prefix_cache()
    run.serve("lora-b", [*shared, 3], lora=LoRARequest("b", 2, "/adapters/b"))
    assert run.scheduled["lora-b"] == 0
    run.scheduler.reset_prefix_cache()
    run.serve("lora-a-again", [*shared, 4], lora=LoRARequest("a", 1, "/adapters/a"))
    assert run.scheduled["lora-a-again"] == 128
    run.scheduler.reset_prefix_cache()
    run.serve("base-again", [*shared, 5])
    assert run.scheduled["base-again"] == 128


def test_blocks_vllm_holds_of_a_partly_cached_chunk_are_not_written(
    engine: Callable[..., Engine], server: Server
) -> None:
    run = engine()
    shared = prompt(192, seed=5)
    run.serve("stored", [*shared, 1])
    run.scheduler.reset_prefix_cache()
    # 80 shared tokens (5 blocks) end up in vLLM's prefix cache: chunk 0 comes from kvrpc,
    # block 4 is computed by vLLM itself.
    run.serve("partial", shared[:80] + prompt(20, seed=6))
    assert run.scheduled["partial"] == 64
    local = run.tables["partial"][:5]
    # Make vLLM's own copy of block 4 recognisable: a retrieve writing it would show.
    poisoned = run.fill(local[4], -5.0)

    request = run.add("full", shared + prompt(30, seed=7), max_tokens=8)
    run.run(lambda: run.scheduled.get("full") is not None and request.num_output_tokens >= 1)
    assert run.scheduled["full"] == 192  # 80 local, 112 loaded
    table = run.tables["full"]
    assert table[:5] == local  # vLLM shares its cached blocks
    assert same(rank_bytes(run, [table[4]]), poisoned)  # left as vLLM had it
    assert run.load_errors == set()
    # Chunk 0 lies wholly inside vLLM's hit: its pins went as soon as blocks were allocated;
    # chunks 1 and 2 went with their retrieve. Nothing stays pinned while "full" decodes.
    assert server.stats()["pinned_chunks"] == 0
    run.run(lambda: run.finished("full"))


def test_a_preempted_request_finishes_with_its_blocks_held_and_freed(
    engine: Callable[..., Engine], server: Server
) -> None:
    run = engine()
    request = run.add("long", prompt(300, seed=8), max_tokens=20)
    run.run(lambda: request.num_output_tokens >= 2)
    wait_for(lambda: server.stats()["stores"] == 4 * TP, "its 4 chunks to be stored")
    # Preempt everything running, as vLLM does under memory pressure or a reset.
    run.scheduler.reset_prefix_cache(reset_running_requests=True)
    run.run(lambda: run.finished("long"))
    assert request.num_output_tokens == 20
    # It came back through a lookup: its own stored chunks (256 of its tokens) hit.
    assert run.stats.data["hit_tokens"] >= 256
    assert run.load_errors == set()
    pool = run.scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == harness.NUM_BLOCKS - 1


@pytest.mark.parametrize("scheme", ["unix", "zmq+ipc"], indirect=True)
def test_a_server_killed_mid_run_costs_hits_not_progress_and_hits_resume(
    engine: Callable[..., Engine], server: Server
) -> None:
    run = engine()
    shared = prompt(192, seed=9)
    run.serve("before", [*shared, 1])
    run.scheduler.reset_prefix_cache()
    loading = run.add("loading", [*shared, 2])
    killed: list[bool] = []

    def kill_once_a_retrieve_is_planned(out: Any) -> None:
        if not killed and any(t.retrieve for t in out.kv_connector_metadata.transfers):
            server.kill()  # the workers get the step after the server died
            killed.append(True)

    deadline = time.monotonic() + 20
    while not killed:
        assert time.monotonic() < deadline, "no retrieve was planned"
        run.step(kill_once_a_retrieve_is_planned)
        time.sleep(0.005)
    started = time.monotonic()
    run.run(lambda: run.finished("loading"), timeout=30)
    # Its retrieve failed as load errors; vLLM computed those blocks instead, without hanging.
    assert time.monotonic() - started < 15
    assert loading.num_output_tokens == 2
    assert run.load_errors >= set(run.tables["loading"][:12])
    assert run.scheduler.recompute_kv_load_failures  # the connector chose it, not the test
    during = run.add("during", prompt(130, seed=10))  # lookups miss, stores are dropped
    run.run(lambda: run.finished("during"), timeout=30)
    assert during.num_output_tokens == 2
    assert run.stats.data["dropped_stores"] >= 2 * TP

    server.start()
    deadline = time.monotonic() + 30
    attempt = 0
    while True:  # the workers register again by themselves; stores then go through
        attempt += 1
        run.serve(f"after-{attempt}", [*shared, 3, attempt])
        run.scheduler.reset_prefix_cache()
        probe = run.serve(f"probe-{attempt}", [*shared, 4, attempt])
        if run.scheduled[probe.request_id] == 192:
            break
        assert time.monotonic() < deadline, "hits did not resume after the server restarted"
        time.sleep(0.5)
    assert server.stats()["instances"] == TP


def test_resetting_vllms_cache_with_the_connector_empties_the_servers_too(
    engine: Callable[..., Engine], server: Server
) -> None:
    run = engine()
    shared = prompt(128, seed=11)
    run.serve("stored", [*shared, 1])
    assert server.stats()["chunks"] == 2 * TP
    assert run.scheduler.reset_prefix_cache(reset_connector=True)
    assert server.stats()["chunks"] == 0
    run.serve("after-reset", [*shared, 2])
    assert run.scheduled["after-reset"] == 0  # nothing stale can hit


def test_bad_extra_config_names_the_key_and_what_it_accepts(model: str, server: Server) -> None:
    with pytest.raises(KVConfigError, match=r"kvrpc\.timout.*kvrpc\.timeout"):
        Engine(model, {"kvrpc.url": server.url, "kvrpc.timout": 3})
    with pytest.raises(KVConfigError, match=r"kvrpc\.timeout = -1.*> 0"):
        Engine(model, {"kvrpc.url": server.url, "kvrpc.timeout": -1})
    with pytest.raises(KVConfigError, match="transfer_mode"):
        Engine(model, {"kvrpc.url": server.url, "kvrpc.transfer_mode": "rdma"})


# ---------------------------------------------------------------------- layer-wise loads


def test_the_stand_in_attention_notices_a_block_without_its_kv() -> None:
    layer = torch.zeros(4, 1, harness.BLOCK_SIZE, harness.HEAD_SIZE)
    read = (2, 3, 5, 7)  # block 2, offset 3: token 5 at position 7
    assert harness.wrong_blocks(layer, 1, 0, [read]) == {2}
    layer[2, :, 3, :] = harness.kv_value(5, 7, 1, 0)
    assert harness.wrong_blocks(layer, 1, 0, [read]) == set()
    assert harness.wrong_blocks(layer, 0, 0, [read]) == {2}  # another layer's KV


def test_layerwise_asks_vllm_for_piecewise_cuda_graphs_and_is_off_by_default() -> None:
    assert KvrpcConnector.requires_piecewise_for_cudagraph({"kvrpc.layerwise": True})
    assert not KvrpcConnector.requires_piecewise_for_cudagraph({})
    with pytest.raises(KVConfigError, match=r"kvrpc\.layerwise"):
        KvrpcConnector.requires_piecewise_for_cudagraph({"kvrpc.layerwise": "sometimes"})


@pytest.mark.parametrize("layerwise", [False, True], ids=["async", "layerwise"])
def test_a_layerwise_hit_is_scheduled_in_the_step_its_lookup_answers(
    engine: Callable[..., Engine], server: Server, layerwise: bool
) -> None:
    run = engine(**{"kvrpc.layerwise": layerwise})
    shared = prompt(192, seed=12)
    run.serve("first", shared + prompt(8, seed=13))
    expected = rank_bytes(run, run.tables["first"][:12])
    run.scheduler.reset_prefix_cache()  # vLLM's own cache forgets; kvrpc must supply it
    run.serve("second", shared + prompt(40, seed=14))

    answered, answer = next((at, a) for at, a in run.answers["second"] if a[0] is not None)
    scheduled = next(step for step in run.history if "second" in step.new)
    waited = [s.index for s in run.history if s.statuses.get("second") is WAITING_FOR_KV]
    if layerwise:
        # vLLM's synchronous load: scheduled with the 192 loaded tokens as computed in the
        # very step the lookup answered, the load inside that step's forward.
        assert answer == (192, False)
        assert scheduled.index == answered
        assert scheduled.sync_loads
        assert waited == []
    else:  # the default: vLLM parks it until the workers report the load finished
        assert answer == (192, True)
        assert scheduled.index > answered
        assert waited and not scheduled.sync_loads
    assert scheduled.new["second"] == 192
    assert scheduled.external["second"] == 192
    assert same(rank_bytes(run, run.tables["second"][:12]), expected)
    assert run.load_errors == set()
    assert run.stats.data["retrieved_chunks"] == 3 * TP
    # Every layer of every step read only blocks holding their KV: with layerwise, each
    # layer waited for its load before reading it.
    assert [s.wrong_reads for s in run.history if any(s.wrong_reads)] == []
    assert server.stats()["pinned_chunks"] == 0


def test_a_layerwise_load_from_a_killed_server_is_recomputed_in_the_next_step(
    engine: Callable[..., Engine], server: Server
) -> None:
    run = engine(**{"kvrpc.layerwise": True})
    shared = prompt(192, seed=15)
    run.serve("before", [*shared, 1])
    computed = rank_bytes(run, run.tables["before"][:12])
    run.scheduler.reset_prefix_cache()
    loading = run.add("loading", [*shared, 2])
    killed: list[Step] = []

    def kill_once_a_retrieve_is_planned(out: Any) -> None:
        if not killed and any(t.retrieve for t in out.kv_connector_metadata.transfers):
            server.kill()  # the workers get the step after the server died
            killed.append(run.history[-1])

    deadline = time.monotonic() + 20
    while not killed:
        assert time.monotonic() < deadline, "no retrieve was planned"
        run.step(kill_once_a_retrieve_is_planned)
        time.sleep(0.005)
    started = time.monotonic()
    run.run(lambda: run.finished("loading"), timeout=30)
    assert time.monotonic() - started < 15  # no wait hung on the dead server
    assert loading.num_output_tokens == 2

    (step,) = killed
    assert step.new["loading"] == 192 and step.sync_loads  # scheduled on the hit at once
    loaded = set(run.tables["loading"][:12])
    for rank in range(TP):
        # Reported by every rank in the step whose forward read them, as vLLM wants of
        # synchronous loads; and any block a layer read without its KV was among them.
        assert step.load_errors[rank] >= loaded
    for later in run.history:
        for rank in range(TP):
            for wrong in later.wrong_reads[rank].values():
                assert wrong <= later.load_errors[rank]
    # vLLM recomputed the prompt (193 tokens, not the 1 past the hit) and its blocks now
    # hold what the forward computes.
    assert sum(s.scheduled.get("loading", 0) for s in run.history) >= 193 + 1
    assert same(rank_bytes(run, run.tables["loading"][:12]), computed)
    assert run.scheduler.recompute_kv_load_failures

    during = run.serve("during", prompt(130, seed=16))  # lookups miss, stores are dropped
    assert during.num_output_tokens == 2


@pytest.mark.parametrize("layerwise", [False, True], ids=["async", "layerwise"])
def test_chunks_recomputed_after_a_failed_load_are_stored_again_once(
    engine: Callable[..., Engine], server: Server, layerwise: bool
) -> None:
    run = engine(**{"kvrpc.layerwise": layerwise})
    shared = prompt(192, seed=17)
    run.serve("before", [*shared, 1])  # chunks 0..2 on the server
    run.scheduler.reset_prefix_cache()
    tokens = shared + prompt(100, seed=18)  # 292 tokens: chunks 0..3 are whole
    run.add("loading", tokens)
    stores: list[tuple[int, int]] = []  # (step, chunk) of every store planned for it
    failed: list[int] = []  # the step whose load failed

    def record(out: Any) -> None:
        step = len(run.history) - 1
        for transfer in out.kv_connector_metadata.transfers:
            op = transfer.op
            if transfer.request_id == "loading" and not transfer.retrieve:
                stores.extend((step, c) for c in range(op.start // CHUNK, op.end // CHUNK))
        if not failed and any(t.retrieve for t in out.kv_connector_metadata.transfers):
            # The chunks leave the server between the lookup and the load, as an evicted
            # chunk would: the retrieve fails at the door, with the server up.
            run.connector.scheduler.end_session("loading")
            wait_for(lambda: server.stats()["pinned_chunks"] == 0, "the lookup's pins to go")
            assert run.connector.reset_cache()
            assert server.stats()["chunks"] == 0
            failed.append(step)

    deadline = time.monotonic() + 30
    while not run.finished("loading"):
        assert time.monotonic() < deadline, "the engine did not finish the request in time"
        if run.step(record) == 0:
            time.sleep(0.005)
    (at,) = failed
    loaded = set(run.tables["loading"][:12])
    for rank in range(TP):
        assert run.load_errors >= loaded
        if layerwise:  # in the step whose forward read them
            assert run.history[at].load_errors[rank] >= loaded
    # vLLM computed the prompt again; its chunks were stored from then on, each once, and
    # each worker stored each chunk once ("before"'s 3, then these 4: none of the step that
    # read the failed load, which the layer-wise forward computed chunk 3 in).
    assert sorted(chunk for step, chunk in stores if step > at) == [0, 1, 2, 3]
    wait_for(lambda: server.stats()["chunks"] == 4 * TP, "the recomputed chunks to be stored")
    assert run.stats.data["stored_chunks"] == (3 + 4) * TP
    expected = rank_bytes(run, run.tables["loading"][:16])

    run.scheduler.reset_prefix_cache()
    probe = run.serve("probe", tokens[:256] + prompt(8, seed=19))
    assert run.scheduled[probe.request_id] == 256  # all four chunks hit
    assert same(rank_bytes(run, run.tables["probe"][:16]), expected)
    probed = [s.wrong_reads for s in run.history if probe.request_id in s.scheduled]
    assert probed and not any(any(wrong) for wrong in probed)


# ---------------------------------------------------------------------- Prometheus metrics


def kvrpc_samples(labels: dict[str, str]) -> dict[str, float]:
    """Every ``vllm:kvrpc_*`` counter of one engine by stat key, read from the registry."""
    from prometheus_client import REGISTRY

    from kvrpc.integrations.vllm.prom import METRICS

    values = {}
    for key, (name, _) in METRICS.items():
        value = REGISTRY.get_sample_value(f"{name}_total", labels)
        assert value is not None, f"{name} has no series for {labels}"
        values[key] = value
    return values


def test_vllms_prometheus_logger_counts_a_store_and_a_hit_in_the_connectors_metrics(
    engine: Callable[..., Engine],
) -> None:
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    run = engine()
    # vLLM's own logger: it asks KvrpcConnector.build_prom_metrics (through vLLM's factory)
    # for the connector's metrics and feeds them every SchedulerStats.kv_connector_stats.
    prometheus = PrometheusStatLogger(run.config, engine_indexes=[0])
    run.stat_loggers.append(prometheus)
    labels = {"model_name": str(run.config.model_config.served_model_name), "engine": "0"}
    assert prometheus.per_engine_labelvalues[0] == list(labels.values())
    before = kvrpc_samples(labels)
    assert set(before.values()) == {0.0}

    shared = prompt(192, seed=17)
    run.serve("first", shared + prompt(8, seed=18))
    run.scheduler.reset_prefix_cache()  # vLLM's own cache forgets; kvrpc must supply it
    run.serve("second", shared + prompt(40, seed=19))
    assert run.scheduled["second"] == 192

    after = kvrpc_samples(labels)
    moved = {key: after[key] - before[key] for key in after}
    # One rank's share of a chunk: K and V of every layer, this rank's heads, float32.
    chunk_bytes = CHUNK * harness.LAYERS * 2 * (harness.KV_HEADS // TP) * harness.HEAD_SIZE * 4
    assert moved["lookups"] == 2
    assert moved["lookup_tokens"] == 200 + 232
    assert moved["hit_tokens"] == 192
    assert moved["retrieved_chunks"] == 3 * TP
    assert moved["retrieved_bytes"] == 3 * TP * chunk_bytes
    assert moved["stored_chunks"] == 3 * TP  # the second prompt's 4th chunk is not whole
    assert moved["stored_bytes"] == 3 * TP * chunk_bytes
    assert moved["lookup_failures"] == moved["dropped_stores"] == moved["failed_retrieves"] == 0
    # Exactly what the connector reported through vLLM's SchedulerStats, nothing lost.
    assert moved == {key: float(run.stats.data.get(key, 0)) for key in moved}


def test_every_connector_stat_moves_its_own_engines_counter_and_only_with_vllms_labels(
    model: str,
) -> None:
    from prometheus_client import REGISTRY
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorProm
    from vllm.v1.metrics.prometheus import unregister_vllm_metrics

    from kvrpc.integrations.vllm.connector import STAT_KEYS
    from kvrpc.integrations.vllm.prom import METRICS, KvrpcPromMetrics

    assert set(METRICS) == set(STAT_KEYS)
    config = harness.vllm_config(model, {"kvrpc.url": "unix:///nonexistent/kv.sock"})
    unregister_vllm_metrics()  # another test's PrometheusStatLogger registered them
    # vLLM's own wrapper: it finds the connector class through vLLM's factory and calls
    # its build_prom_metrics with vLLM's metric classes and label names.
    labelnames = ["model_name", "engine"]
    prom = KVConnectorProm(config, labelnames, {0: ["m", "0"], 1: ["m", "1"]})
    assert isinstance(prom.prom_metrics, KvrpcPromMetrics)

    # A payload as the scheduler sends it: the connector's stats object, as a dict.
    counts = {key: 10 * (index + 1) for index, key in enumerate(STAT_KEYS)}
    payload = KvrpcConnector.build_kv_connector_stats(counts).to_dict()
    prom.observe(payload, engine_idx=1)
    prom.observe({**payload, "lookups": 0, "a_newer_workers_key": 3}, engine_idx=1)

    expected = {key: float(2 * count) for key, count in counts.items()}
    expected["lookups"] = counts["lookups"]  # the second payload's 0 added nothing
    assert kvrpc_samples({"model_name": "m", "engine": "1"}) == expected
    assert set(kvrpc_samples({"model_name": "m", "engine": "0"}).values()) == {0.0}
    # Bounded cardinality: vLLM's two labels, one series per engine, nothing per request.
    names = {f"{name}_total" for name, _ in METRICS.values()}
    series = [
        sample for family in REGISTRY.collect() for sample in family.samples if sample.name in names
    ]
    assert {frozenset(sample.labels) for sample in series} == {frozenset(labelnames)}
    assert len(series) == 2 * len(METRICS)


# ---------------------------------------------------------------------- KV events


def external(hashes: Any) -> list[Any]:
    """Block hashes as vLLM's publisher sends them (64-bit ints unless told otherwise)."""
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    return [maybe_convert_block_hash(h) for h in hashes]


class Router:
    """What a router watching vLLM's KV-events publisher reads: every batch, in order.

    It asks the publisher's replay endpoint (vLLM's ``ZmqEventPublisher``) for every batch
    from the next sequence number on, so that it misses none (a PUB subscriber that joins
    late would), and decodes them with vLLM's own ``KVEventBatch`` type.
    """

    def __init__(self, replay_endpoint: str) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch, ZmqEventPublisher

        self._socket = zmq.Context.instance().socket(zmq.DEALER)
        self._socket.connect(replay_endpoint)
        self._decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self._end = ZmqEventPublisher.END_SEQ
        self.next_seq = 0
        self.events: list[Any] = []

    def poll(self) -> None:
        """Read every batch published since the last poll."""
        self._socket.send_multipart([b"", self.next_seq.to_bytes(8, "big")])
        while True:
            assert self._socket.poll(10_000), "vLLM's publisher did not answer a replay"
            _, _, seq, payload = self._socket.recv_multipart()
            if seq == self._end:
                return
            self.next_seq = int.from_bytes(seq, "big") + 1
            self.events.extend(self._decoder.decode(payload).events)

    def kvrpc(self, kind: type | None = None) -> list[Any]:
        """The events the connector told (ownership ``kvrpc:<tier>``), of ``kind`` if given."""
        return [
            e for e in self.events
            if (getattr(e, "ownership", None) or "").startswith("kvrpc:")
            and (kind is None or isinstance(e, kind))
        ]  # fmt: skip

    def view(self) -> set[Any]:
        """The block hashes the router believes kvrpc holds: told stored, not removed since."""
        from vllm.distributed.kv_events import BlockRemoved, BlockStored

        held: set[Any] = set()
        for event in self.kvrpc():
            if isinstance(event, BlockStored):
                held.update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                held.difference_update(event.block_hashes)
        return held

    def close(self) -> None:
        self._socket.close(linger=0)


@pytest.fixture
def publishing() -> Iterator[Callable[[], tuple[Any, Router]]]:
    """vLLM's KVEventsConfig with a ZMQ publisher on fresh ipc paths, and its Router."""
    from vllm.config import KVEventsConfig

    routers: list[Router] = []
    where = tempfile.mkdtemp(prefix="kvrpc-events-", dir="/tmp")

    def make() -> tuple[Any, Router]:
        base = f"ipc://{where}/{len(routers)}"
        config = KVEventsConfig(
            enable_kv_cache_events=True,
            publisher="zmq",
            endpoint=f"{base}-pub",
            replay_endpoint=f"{base}-replay",
            topic="kv",
        )
        routers.append(Router(f"{base}-replay"))
        return config, routers[-1]

    yield make
    for router in routers:
        router.close()


def until_told(run: Engine, router: Router, done: Callable[[], bool], what: str) -> None:
    """Step the engine (idle steps too: vLLM takes events in every step) until ``done()``."""
    deadline = time.monotonic() + 30
    while True:
        router.poll()
        if done():
            return
        assert time.monotonic() < deadline, f"vLLM's publisher never told {what}"
        if run.step() == 0:
            time.sleep(0.005)


def test_kvrpcs_stores_reach_vllms_publisher_in_vllms_own_block_hashes(
    engine: Callable[..., Engine], publishing: Callable[[], tuple[Any, Router]]
) -> None:
    from vllm.distributed.kv_events import MEDIUM_CPU, MEDIUM_GPU, BlockStored

    config, router = publishing()
    run = engine(kv_events=config)  # kvrpc.kv_events unset: on, since vLLM publishes
    assert run.connector.event_feed is not None
    first = run.serve("first", prompt(200, seed=20))
    until_told(run, router, lambda: len(router.view()) == 12, "3 stored chunks (12 blocks)")

    stored = router.kvrpc(BlockStored)
    assert all(type(e) is BlockStored for e in stored)  # vLLM's own type, through its codec
    # One event for the three chunks (each continues the previous one's chain), in the
    # block hashes vLLM itself gave those blocks, with their tokens.
    (told,) = stored
    assert told.block_hashes == external(first.block_hashes[:12])
    assert told.parent_block_hash is None
    assert told.token_ids == first.all_token_ids[:192]
    assert (told.block_size, told.group_idx) == (harness.BLOCK_SIZE, 0)
    assert (told.medium, told.ownership) == (MEDIUM_CPU, "kvrpc:l1")
    # vLLM's GPU events for the same blocks carry the same hashes: a router finds both.
    gpu = {h for e in router.events if isinstance(e, BlockStored) and e.medium == MEDIUM_GPU
           for h in e.block_hashes}  # fmt: skip
    assert set(told.block_hashes) <= gpu


def test_clearing_the_server_tells_vllm_the_blocks_kvrpc_let_go_of(
    engine: Callable[..., Engine],
    publishing: Callable[[], tuple[Any, Router]],
    server: Server,
) -> None:
    from vllm.distributed.kv_events import MEDIUM_CPU, AllBlocksCleared, BlockRemoved

    config, router = publishing()
    run = engine(kv_events=config)
    first = run.serve("first", prompt(140, seed=21))
    until_told(run, router, lambda: len(router.view()) == 8, "2 stored chunks")
    assert run.scheduler.reset_prefix_cache(reset_connector=True)  # vLLM's and kvrpc's
    until_told(run, router, lambda: not router.view(), "the chunks kv.clear dropped")
    (removed,) = router.kvrpc(BlockRemoved)
    assert removed.block_hashes == external(first.block_hashes[:8])
    assert (removed.medium, removed.ownership) == (MEDIUM_CPU, "kvrpc:l1")
    # vLLM's own reset said AllBlocksCleared (of its GPU cache); the connector never does,
    # since that event has no medium and would wipe a router's view of the GPU blocks.
    assert sum(isinstance(e, AllBlocksCleared) for e in router.events) == 1
    assert server.stats()["chunks"] == 0


@pytest.mark.parametrize("cpu_buffer_size", ["0.0001"], indirect=True)  # 6 rank-chunks
def test_chunks_the_server_evicts_are_told_removed_and_the_routers_view_is_the_servers(
    engine: Callable[..., Engine],
    publishing: Callable[[], tuple[Any, Router]],
    server: Server,
) -> None:
    from vllm.distributed.kv_events import BlockRemoved

    config, router = publishing()
    run = engine(kv_events=config)
    first = run.serve("first", prompt(200, seed=22))
    until_told(run, router, lambda: len(router.view()) == 12, "the first prompt's chunks")
    second = run.serve("second", prompt(200, seed=23))  # 3 more chunks: the first's go
    stored = set(external(second.block_hashes[:12]))
    until_told(run, router, lambda: router.view() == stored, "the second's stored, first's gone")
    assert server.stats()["evictions"] >= 3 * TP
    removed = {h for e in router.kvrpc(BlockRemoved) for h in e.block_hashes}
    assert removed == set(external(first.block_hashes[:12]))
    # What the router believes kvrpc holds is what it holds: 3 chunks on each rank.
    assert server.stats()["chunks"] == TP * len(router.view()) // (CHUNK // harness.BLOCK_SIZE)


def test_chunks_held_before_the_engine_started_are_told_by_kvrpc_hash_then_renamed(
    engine: Callable[..., Engine], publishing: Callable[[], tuple[Any, Router]]
) -> None:
    from vllm.distributed.kv_events import MEDIUM_CPU, BlockRemoved, BlockStored

    from kvrpc.kv.keys import hashes_from_tokens

    shared = prompt(192, seed=24)
    engine().serve("elsewhere", [*shared, 1])  # another engine, before this one started
    config, router = publishing()
    run = engine(kv_events=config)
    chunk_hashes = external(hashes_from_tokens(shared, CHUNK))
    until_told(run, router, lambda: router.view() == set(chunk_hashes), "the snapshot")
    unnamed = router.kvrpc(BlockStored)
    assert {(e.block_size, tuple(e.token_ids), e.medium) for e in unnamed} == {(0, (), MEDIUM_CPU)}

    run.scheduler.reset_prefix_cache()
    here = run.serve("here", [*shared, 2])  # its lookup hits them: now they have names
    assert run.scheduled["here"] == 192
    named = set(external(here.block_hashes[:12]))
    until_told(run, router, lambda: router.view() == named, "the chunks under vLLM's names")
    withdrawn = {h for e in router.kvrpc(BlockRemoved) for h in e.block_hashes}
    assert withdrawn == set(chunk_hashes)


def test_kv_events_follow_vllms_config_can_be_turned_off_and_end_with_the_connector(
    model: str, server: Server, publishing: Callable[[], tuple[Any, Router]]
) -> None:
    def scheduler(kv_events: Any = None, **extra: Any) -> Scheduler:
        # vLLM's Scheduler alone: it makes the scheduler-side connector; no workers needed.
        config = harness.vllm_config(model, {"kvrpc.url": server.url, **extra}, TP,
                                     kv_events=kv_events)  # fmt: skip
        return Scheduler(
            vllm_config=config,
            kv_cache_config=harness.kv_cache_config(TP),
            log_stats=False,
            structured_output_manager=StructuredOutputManager(config),
            block_size=harness.BLOCK_SIZE,
        )

    made = [
        scheduler(),  # vLLM publishes nothing: no subscription
        scheduler(publishing()[0], **{"kvrpc.kv_events": False}),
        scheduler(**{"kvrpc.kv_events": True}),  # on although vLLM publishes nothing
        scheduler(publishing()[0]),
    ]
    feeds = [s.connector.event_feed for s in made]  # type: ignore[union-attr]
    assert feeds[0] is None and feeds[1] is None
    for feed in feeds[2:]:
        assert feed is not None
        wait_for(lambda f=feed: f.subscriptions == 1 and f.alive() == 1, "a subscription")
    for each in made:
        each.shutdown()  # as vLLM's engine core does: the publisher, then the connector
    for feed in feeds[2:]:
        assert feed is not None and feed.closed and feed.alive() == 0
