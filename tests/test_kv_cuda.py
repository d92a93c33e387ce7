"""The GPU path end to end: CUDA IPC handles and events, the copy engine, cuda_ipc workers.

A ``kvrpc serve`` child maps the workers' GPU KV caches; workers are spawned processes (and
the test process itself), all on one GPU, standing for an engine's TP ranks. Runs on the
GPU machine (``pytest -m cuda``); skipped, with the reason, where there is no GPU.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvrpc.bench._child import kv_server_child
from kvrpc.client import SyncClient
from kvrpc.cuda import CudaEventHandle, device_uuid
from kvrpc.errors import CudaUnavailable, KVConfigError
from kvrpc.futures import MessagingFuture
from kvrpc.kv import LoadStoreOp, PollingSchedulerAdapter, WorkerAdapter, kv_registry
from kvrpc.kv import protocols as kv
from kvrpc.kv.cuda_ipc import CudaIPCWrapper

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU: runs on the GPU machine with `pytest -m cuda`",
    ),
]

BLOCK_SIZE = 16
CHUNK_SIZE = 64  # four blocks per chunk
NUM_BLOCKS = 256
HEADS, HEAD_DIM = 4, 64
LAYERS = 4
SHAPES = {
    "paged": (2, NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM),
    "blocks_first": (NUM_BLOCKS, 2, BLOCK_SIZE, HEADS, HEAD_DIM),
    "mla": (NUM_BLOCKS, BLOCK_SIZE, 2 * HEADS * HEAD_DIM),  # same bytes per block
}
BLOCK_DIM = {"paged": 1, "blocks_first": 0, "mla": 0}
DTYPES = ("bfloat16", "float16", "float8_e4m3fn")
SPIN = int(4e9)  # GPU clock cycles of torch.cuda._sleep: about two seconds on an H100


def _tokens(seed: int, chunks: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 32000, (chunks * CHUNK_SIZE,), generator=generator).tolist()


def _make_layers(
    kind: str, dtype: str, seed: int, num_blocks: int = NUM_BLOCKS
) -> list[torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    shape = list(SHAPES[kind])
    shape[BLOCK_DIM[kind]] = num_blocks
    layers = []
    for _ in range(LAYERS):
        raw = torch.empty(shape, dtype=getattr(torch, dtype), device="cuda")
        raw.view(torch.uint8).random_(generator=generator)
        layers.append(raw)
    return layers


def _digest(layers: list[torch.Tensor], kind: str, block_ids: list[int]) -> str:
    ids = torch.tensor(block_ids, device="cuda")
    digest = hashlib.sha256()
    for layer in layers:
        picked = layer.index_select(BLOCK_DIM[kind], ids).contiguous().view(torch.uint8)
        digest.update(picked.cpu().numpy().tobytes())
    return digest.hexdigest()


def _wait(adapter: WorkerAdapter, request_id: str, store: bool, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stores, retrieves = adapter.get_finished({request_id} if store else set())
        if request_id in (stores if store else retrieves):
            return
        time.sleep(0.001)
    raise AssertionError(f"{request_id} not finished within {timeout} s")


# ---------------------------------------------------------------------- worker processes


def _worker_main(
    url: str,
    model: str,
    world_size: int,
    rank: int,
    kind: str,
    dtype: str,
    num_blocks: int,
    pipe: multiprocessing.connection.Connection,
) -> None:
    """A stand-in engine worker with a GPU KV cache, driven over a pipe."""
    layers = _make_layers(kind, dtype, seed=1000 + rank, num_blocks=num_blocks)
    adapter = WorkerAdapter(url, model, world_size, rank, BLOCK_SIZE, keepalive_interval=0.2)
    adapter.register_kv_caches({f"layer{i}": t for i, t in enumerate(layers)})
    pipe.send((os.getpid(), torch.cuda.mem_get_info()[0]))
    while (command := pipe.recv()) is not None:
        request_id, tokens, block_ids, spin, die = command
        if spin:  # the KV is "written" only once this kernel ends
            torch.cuda._sleep(spin)
        adapter.submit_store_request(request_id, LoadStoreOp(block_ids, tokens))
        if die:
            os.kill(os.getpid(), signal.SIGKILL)
        _wait(adapter, request_id, store=True)
        pipe.send(_digest(layers, kind, block_ids))
    adapter.shutdown()


class Worker:
    """A spawned worker process and its pipe."""

    def __init__(
        self,
        url: str,
        model: str,
        world_size: int,
        rank: int,
        kind: str,
        dtype: str,
        num_blocks: int = NUM_BLOCKS,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipe, child_end = context.Pipe()
        args = (url, model, world_size, rank, kind, dtype, num_blocks, child_end)
        self.process = context.Process(target=_worker_main, args=args)
        self.process.start()
        deadline = time.monotonic() + 120
        while not self.pipe.poll(0.2):
            assert self.process.is_alive(), f"worker exited with {self.process.exitcode}"
            assert time.monotonic() < deadline, "worker did not start within 120 s"
        self.pid, self.free_after_start = self.pipe.recv()

    def store(self, request_id: str, tokens: list[int], block_ids: list[int], **kw: Any) -> None:
        self.pipe.send((request_id, tokens, block_ids, kw.get("spin", 0), kw.get("die")))

    def result(self, timeout: float = 120.0) -> Any:
        assert self.pipe.poll(timeout), "worker did not answer"
        return self.pipe.recv()

    def close(self) -> None:
        if self.process.is_alive():
            self.pipe.send(None)
            self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One ``kvrpc serve`` child for the module, pool slots sized for the widest chunk."""
    tmp = tmp_path_factory.mktemp("cuda")
    url = f"unix://{tmp}/kv.sock"
    options = ("--chunk-size", str(CHUNK_SIZE), "--cpu-buffer-size", "1", "--client-timeout", "3")
    with kv_server_child(url, str(tmp), *options) as child:
        # The pool's slot size is the first registered layout's chunk: register a 2-byte
        # dtype first so that every layout and dtype of these tests fits.
        sizer = WorkerAdapter(url, "sizer", 1, 0, BLOCK_SIZE)
        sizer_layers = _make_layers("paged", "bfloat16", 0)
        sizer.register_kv_caches({f"l{i}": t for i, t in enumerate(sizer_layers)})
        sizer.shutdown()
        yield url
        del child


@pytest.fixture(scope="module")
def dma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ``kvrpc serve --store-copies dma --verify-retrieves`` child for the module.

    Verifying every retrieve checks the checksums the DMA store folded on the CPU against
    the chunk's bytes back in the blocks (on the GPU): a fold that differs from the GPU's
    fails the retrieve as CHECKSUM_MISMATCH.
    """
    tmp = tmp_path_factory.mktemp("cuda-dma")
    url = f"unix://{tmp}/kv.sock"
    options = ("--chunk-size", str(CHUNK_SIZE), "--cpu-buffer-size", "1", "--client-timeout", "3")
    dma = ("--store-copies", "dma", "--verify-retrieves")
    with kv_server_child(url, str(tmp), *options, *dma) as child:
        yield url
        del child


@pytest.fixture
def client(server: str) -> Iterator[SyncClient]:
    with SyncClient(server, registry=kv_registry(), timeout=30) as client:
        yield client


def _stats(client: SyncClient) -> dict[str, int]:
    stats: dict[str, int] = client.call(kv.STATS)
    return stats


# ---------------------------------------------------------------------- wrapper and future


def test_ipc_wrapper_refuses_non_contiguous_and_cpu_tensors() -> None:
    base = torch.zeros(8, 8, device="cuda")
    with pytest.raises(KVConfigError, match="contiguous"):
        CudaIPCWrapper.from_tensor(base.t())
    with pytest.raises(KVConfigError, match="contiguous"):
        CudaIPCWrapper.from_tensor(base[:, 1:])
    with pytest.raises(KVConfigError, match="cpu"):
        CudaIPCWrapper.from_tensor(torch.zeros(4))
    # A contiguous view at an offset is shared (an engine carves its layers out of one
    # buffer); the offset travels with it.
    assert CudaIPCWrapper.from_tensor(base[1:]).tensor_offset == 8
    assert CudaIPCWrapper.from_tensor(base).tensor_offset == 0


def _open_views_in_child(
    wrappers: list[bytes], pipe: multiprocessing.connection.Connection
) -> None:
    opened = [CudaIPCWrapper.deserialize(w).to_tensor() for w in wrappers]
    pipe.send([hashlib.sha256(t.cpu().view(torch.uint8).numpy()).hexdigest() for t in opened])
    pipe.recv()
    for tensor in opened:  # bit for bit, whatever the bf16 values (NaNs included)
        tensor.view(torch.int16).bitwise_not_()
    torch.cuda.synchronize()
    pipe.send("inverted")


def test_ipc_wrapper_of_views_at_offsets_opens_them_in_another_process() -> None:
    # vLLM's way: one raw byte buffer, each layer a bf16 view at its offset. A 2-byte lead
    # puts even layer 0 at an offset (1 element), and a tail guards the last layer's end.
    count, lead, tail = 4096, 2, 6
    raw = torch.empty(lead + 3 * 2 * count + tail, dtype=torch.uint8, device="cuda")
    raw.random_(generator=torch.Generator(device="cuda").manual_seed(12))
    views = [
        raw[lead + 2 * count * i : lead + 2 * count * (i + 1)].view(torch.bfloat16).view(64, -1)
        for i in range(3)
    ]
    wrappers = [CudaIPCWrapper.from_tensor(v) for v in views]
    assert [w.tensor_offset for w in wrappers] == [1, 1 + count, 1 + 2 * count]
    before = raw.clone()
    torch.cuda.synchronize()
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(
        target=_open_views_in_child, args=([w.serialize() for w in wrappers], child)
    )
    process.start()
    try:
        assert parent.poll(120), "the child did not open the views"
        digests = parent.recv()
        assert digests == [
            hashlib.sha256(v.cpu().view(torch.uint8).numpy()).hexdigest() for v in views
        ], "the child sees other bytes than the views hold"
        parent.send("invert them")
        assert parent.poll(60)
        assert parent.recv() == "inverted"
    finally:
        process.join(30)
    # Only the views' bytes changed, in place: the lead and tail are as they were.
    middle = slice(lead, lead + 3 * 2 * count)
    assert torch.equal(raw[middle], before[middle].bitwise_not())
    assert torch.equal(raw[:lead], before[:lead])
    assert torch.equal(raw[-tail:], before[-tail:])


def _open_in_child(wrapper: bytes, pipe: multiprocessing.connection.Connection) -> None:
    opened = CudaIPCWrapper.deserialize(wrapper)
    first, second = opened.to_tensor(), opened.to_tensor()
    pipe.send((first is second, float(first.float().sum()), str(first.device)))
    pipe.recv()
    first.mul_(2)  # the owner sees the change: one memory, not a copy
    torch.cuda.synchronize()
    pipe.send("doubled")


def test_ipc_wrapper_opens_by_uuid_in_another_process_once() -> None:
    tensor = torch.arange(1 << 16, dtype=torch.float32, device="cuda")
    wrapper = CudaIPCWrapper.from_tensor(tensor)
    assert wrapper.device_uuid == device_uuid(tensor.device)
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    # The child names the GPU by UUID, so its ordinals need not match ours.
    env_before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = f"GPU-{wrapper.device_uuid}"
    try:
        process = context.Process(target=_open_in_child, args=(wrapper.serialize(), child))
        process.start()
    finally:
        if env_before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = env_before
    assert parent.poll(120)
    same, total, device = parent.recv()
    assert same, "a second to_tensor() opened the handle again"
    assert total == float(tensor.sum())
    assert device.startswith("cuda")
    parent.send("double it")
    assert parent.poll(60)
    assert parent.recv() == "doubled"
    assert torch.equal(tensor, torch.arange(1 << 16, dtype=torch.float32, device="cuda") * 2)
    process.join(30)


def test_ipc_wrapper_for_a_gpu_this_process_cannot_see() -> None:
    wrapper = CudaIPCWrapper.from_tensor(torch.zeros(4, device="cuda"))
    elsewhere = CudaIPCWrapper.deserialize(
        wrapper.serialize().replace(wrapper.device_uuid.encode(), b"0" * 36)
    )
    with pytest.raises(CudaUnavailable, match="no GPU with UUID"):
        elsewhere.to_tensor()


def _event_producer(pipe: multiprocessing.connection.Connection) -> None:
    from kvrpc.cuda import new_ipc_event

    event, handle = new_ipc_event()
    torch.cuda._sleep(SPIN)
    event.record()
    pipe.send(handle)
    pipe.recv()  # stay alive until the consumer is done: see kvrpc.cuda on dead producers


def test_cuda_future_waits_for_the_producers_event() -> None:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_event_producer, args=(child,))
    process.start()
    try:
        assert parent.poll(120)
        handle = parent.recv()
        assert isinstance(handle, CudaEventHandle)
        future: MessagingFuture[CudaEventHandle] = MessagingFuture()
        cuda_future = future.to_cuda_future()
        assert not cuda_future.query(), "no reply yet"
        future.set_result(handle)
        assert not cuda_future.query(), "the producer's kernel is still running"
        stream = torch.cuda.Stream()
        # wait_on polls the pending event on the host; the stream is never made to wait on
        # it (kvrpc.cuda's rule), so work on it runs meanwhile.
        with pytest.raises(TimeoutError):
            cuda_future.wait_on(stream, timeout=0.05)
        marker = torch.cuda.Event()
        marker.record(stream)
        marker.synchronize()
        assert not cuda_future.query(), "the stream ran while the producer's kernel still did"
        assert cuda_future.wait(timeout=0.05) is False
        cuda_future.wait_on(stream, timeout=60)
        assert cuda_future.query(), "wait_on returned before the producer's event completed"
        assert cuda_future.result(timeout=0) is handle
    finally:
        parent.send("done")
        process.join(30)


# ---------------------------------------------------------------------- store and retrieve


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(SHAPES))
def test_stored_in_one_process_retrieved_in_another_bitwise(
    server: str, kind: str, dtype: str
) -> None:
    model = f"bitwise-{kind}-{dtype}"
    worker = Worker(server, model, 1, 0, kind, dtype)
    try:
        tokens = _tokens(7, 6)
        order = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(3)).tolist()
        stored_ids, into_ids = order[:24], order[24:48]
        worker.store("s", tokens, stored_ids)
        stored_digest = worker.result()
        layers = _make_layers(kind, dtype, seed=99)  # other bytes everywhere
        with WorkerAdapter(server, model, 1, 0, BLOCK_SIZE) as here:
            here.register_kv_caches({f"layer{i}": t for i, t in enumerate(layers)})
            assert _digest(layers, kind, into_ids) != stored_digest
            here.submit_retrieve_request("r", LoadStoreOp(into_ids, tokens))
            _wait(here, "r", store=False)
            assert here.get_block_ids_with_load_errors() == set()
            assert _digest(layers, kind, into_ids) == stored_digest
    finally:
        worker.close()


@pytest.mark.parametrize("table", ["consecutive", "random"])
def test_a_dma_server_stores_what_a_lookup_then_finds_and_a_retrieve_brings_back_bitwise(
    dma_server: str, table: str
) -> None:
    model = f"dma-{table}"
    layers = _make_layers("paged", "bfloat16", seed=60)
    tokens = _tokens(61, 6)
    order = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(62)).tolist()
    stored = list(range(24)) if table == "consecutive" else order[:24]
    into = list(range(100, 124)) if table == "consecutive" else order[24:48]
    digest = _digest(layers, "paged", stored)
    with (
        SyncClient(dma_server, registry=kv_registry(), timeout=30) as client,
        WorkerAdapter(dma_server, model, 1, 0, BLOCK_SIZE) as worker,
    ):
        worker.register_kv_caches({f"layer{i}": t for i, t in enumerate(layers)})
        before = _stats(client)
        worker.submit_store_request("s", LoadStoreOp(stored, tokens))
        _wait(worker, "s", store=True)
        # Sent once the worker saw its store finish: finds every chunk, folded or not.
        with PollingSchedulerAdapter(dma_server, model, 1, 0, BLOCK_SIZE) as scheduler:
            scheduler.maybe_submit_lookup_request("look", token_ids=tokens)
            assert scheduler.check_lookup_result("look") == len(tokens)
            scheduler.end_session("look")
        assert _digest(layers, "paged", into) != digest
        worker.submit_retrieve_request("r", LoadStoreOp(into, tokens))
        _wait(worker, "r", store=False)
        assert worker.get_block_ids_with_load_errors() == set()
        assert _digest(layers, "paged", into) == digest
        after = _stats(client)
    # 6 chunks of 4 blocks and 4 layers: even a copy per block is within the free calls.
    assert after["cuda_dma_stores"] - before.get("cuda_dma_stores", 0) == 1
    assert after["cuda_dma_store_fallbacks"] == 0
    assert after["retrieve_corrupt"] == 0 and after["checksums_missed"] == 0


def test_two_workers_store_at_once_and_each_rank_gets_its_own_back(
    server: str, client: SyncClient
) -> None:
    model = "tp2"
    workers = [Worker(server, model, 2, rank, "paged", "bfloat16") for rank in (0, 1)]
    try:
        tokens = _tokens(11, 48)  # 48 chunks, 192 blocks, from each rank at once
        ids = list(range(192))
        for worker in workers:
            worker.store("both", tokens, ids)
        digests = [worker.result() for worker in workers]
        assert digests[0] != digests[1]
        with PollingSchedulerAdapter(server, model, 2, 0, BLOCK_SIZE) as scheduler:
            scheduler.maybe_submit_lookup_request("look", token_ids=tokens)
            assert scheduler.check_lookup_result("look") == len(tokens)
            scheduler.end_session("look")
        into = list(range(NUM_BLOCKS - 192, NUM_BLOCKS))
        for rank, digest in enumerate(digests):
            layers = _make_layers("paged", "bfloat16", seed=50 + rank)
            with WorkerAdapter(server, model, 2, rank, BLOCK_SIZE) as here:
                here.register_kv_caches({f"layer{i}": t for i, t in enumerate(layers)})
                here.submit_retrieve_request("back", LoadStoreOp(into, tokens))
                _wait(here, "back", store=False)
                assert here.get_block_ids_with_load_errors() == set()
            assert _digest(layers, "paged", into) == digest
    finally:
        for worker in workers:
            worker.close()


def _store_and_retrieve(adapter: WorkerAdapter, layers: list[torch.Tensor], seed: int) -> None:
    """One store and one retrieve into other blocks through ``adapter``, checked."""
    tokens = _tokens(seed, 4)
    digest = _digest(layers, "paged", list(range(16)))
    adapter.submit_store_request(f"s{seed}", LoadStoreOp(list(range(16)), tokens))
    _wait(adapter, f"s{seed}", store=True, timeout=10)
    adapter.submit_retrieve_request(f"r{seed}", LoadStoreOp(list(range(100, 116)), tokens))
    _wait(adapter, f"r{seed}", store=False, timeout=10)
    assert adapter.get_block_ids_with_load_errors() == set()
    assert _digest(layers, "paged", list(range(100, 116))) == digest


def test_a_worker_killed_mid_store_wedges_nothing_and_its_memory_is_freed(
    server: str, client: SyncClient
) -> None:
    layers = _make_layers("paged", "bfloat16", seed=8)
    with WorkerAdapter(server, "alive", 1, 0, BLOCK_SIZE) as alive:
        alive.register_kv_caches({f"layer{i}": t for i, t in enumerate(layers)})
        _store_and_retrieve(alive, layers, 1)  # the copy engine's buffers exist from here
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        instances = _stats(client)["instances"]
        # A 1 GiB KV cache, "written" only after a long kernel; the worker dies with that
        # kernel pending and its store submitted.
        doomed = Worker(server, "doomed", 1, 0, "paged", "bfloat16", num_blocks=4096)
        doomed.store("never", _tokens(5, 8), list(range(32)), spin=SPIN, die=True)
        doomed.process.join(30)
        assert doomed.process.exitcode == -signal.SIGKILL
        # Meanwhile another worker's stores and retrieves go through the same copy engine.
        started = time.monotonic()
        _store_and_retrieve(alive, layers, 2)
        assert time.monotonic() - started < 10
        # The dead worker is noticed (client timeout 3 s); its registration and mappings go.
        deadline = time.monotonic() + 10
        while _stats(client)["instances"] > instances and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = _stats(client)
        assert stats["instances"] == instances
        assert stats["pinned_chunks"] == 0
        deadline = time.monotonic() + 10
        while torch.cuda.mem_get_info()[0] < free_before - (64 << 20):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        leaked = free_before - torch.cuda.mem_get_info()[0]
        assert leaked < 64 << 20, f"{leaked >> 20} MiB of GPU memory not given back"
        _store_and_retrieve(alive, layers, 3)


@pytest.mark.parametrize("kind", ["paged", "blocks_first"])
def test_a_layerwise_retrieve_fills_each_layer_by_the_time_its_event_completes(
    server: str, kind: str
) -> None:
    layers = _make_layers(kind, "bfloat16", seed=71)
    dim = BLOCK_DIM[kind]
    tokens = _tokens(71, 6)
    stored, into = list(range(24)), list(range(200, 224))
    with WorkerAdapter(server, f"layerwise-{kind}", 1, 0, BLOCK_SIZE) as here:
        here.register_kv_caches({f"layer{i}": t for i, t in enumerate(layers)})
        here.submit_store_request("s", LoadStoreOp(stored, tokens))
        _wait(here, "s", store=True)
        # The first 40 tokens are the engine's own: the three blocks that hold them stay as
        # they are (the third holds tokens 32-39, and the retrieve must not write it).
        held = torch.tensor(into[:3], device="cuda")
        before = [layer.view(torch.uint8).index_select(dim, held) for layer in layers]
        op = LoadStoreOp(into, tokens, skip_first_n_tokens=40)
        progress = here.submit_retrieve_request("r", op, layerwise=True)
        a = torch.tensor(stored[3:], device="cuda")
        b = torch.tensor(into[3:], device="cuda")
        for index, layer in enumerate(layers):
            assert progress.wait_layer(index, timeout=30)
            # Checked before waiting for any later layer: this layer's own event sufficed.
            raw = layer.view(torch.uint8)  # random bytes hold NaNs: compare bytes, not values
            assert torch.equal(raw.index_select(dim, a), raw.index_select(dim, b)), index
        assert progress.wait(30)
        _wait(here, "r", store=False)
        assert here.get_block_ids_with_load_errors() == set()
        for layer, old in zip(layers, before, strict=True):
            assert torch.equal(layer.view(torch.uint8).index_select(dim, held), old)


def test_a_layerwise_retrieve_of_a_missing_chunk_fails_that_chunk_only(server: str) -> None:
    layers = _make_layers("paged", "bfloat16", seed=72)
    tokens = _tokens(72, 4)
    with WorkerAdapter(server, "layerwise-miss", 1, 0, BLOCK_SIZE) as here:
        here.register_kv_caches({f"layer{i}": t for i, t in enumerate(layers)})
        here.submit_store_request("s", LoadStoreOp(list(range(8)), tokens, end=2 * CHUNK_SIZE))
        _wait(here, "s", store=True)
        progress = here.submit_retrieve_request(
            "r", LoadStoreOp(list(range(100, 116)), tokens), layerwise=True
        )
        assert not progress.wait(30)  # chunks 2 and 3 were never stored
        assert not progress.wait_layer(0, timeout=1)
        _wait(here, "r", store=False)
        assert here.get_block_ids_with_load_errors() == set(range(108, 116))
        assert _digest(layers, "paged", list(range(100, 108))) == _digest(
            layers, "paged", list(range(8))
        )


def test_a_store_and_a_retrieve_in_flight_together_both_move_the_right_bytes(
    server: str,
) -> None:
    layers = _make_layers("paged", "bfloat16", seed=73)
    first, second = _tokens(73, 12), _tokens(74, 12)
    with WorkerAdapter(server, "duplex", 1, 0, BLOCK_SIZE) as here:
        here.register_kv_caches({f"layer{i}": t for i, t in enumerate(layers)})
        here.submit_store_request("s1", LoadStoreOp(list(range(48)), first))
        _wait(here, "s1", store=True)
        stored_first = _digest(layers, "paged", list(range(48)))
        stored_second = _digest(layers, "paged", list(range(48, 96)))
        # Submitted back to back: the copy engine runs them on its two lanes at once.
        here.submit_store_request("s2", LoadStoreOp(list(range(48, 96)), second))
        here.submit_retrieve_request("r1", LoadStoreOp(list(range(150, 198)), first))
        _wait(here, "s2", store=True)
        _wait(here, "r1", store=False)
        assert here.get_block_ids_with_load_errors() == set()
        assert _digest(layers, "paged", list(range(150, 198))) == stored_first
        here.submit_retrieve_request("r2", LoadStoreOp(list(range(200, 248)), second))
        _wait(here, "r2", store=False)
        assert _digest(layers, "paged", list(range(200, 248))) == stored_second


def test_retrieve_past_its_deadline_fails_and_never_writes(server: str) -> None:
    model = "deadline"
    worker = Worker(server, model, 1, 0, "paged", "float16")
    try:
        tokens = _tokens(21, 4)
        worker.store("s", tokens, list(range(16)))
        worker.result()
    finally:
        worker.close()
    layers = _make_layers("paged", "float16", seed=4)
    into = list(range(200, 216))
    before = _digest(layers, "paged", into)
    with WorkerAdapter(server, model, 1, 0, BLOCK_SIZE, retrieve_deadline=0.2) as here:
        here.register_kv_caches({f"layer{i}": t for i, t in enumerate(layers)})
        # The engine's stream is busy past the deadline: the server must not start the copy.
        torch.cuda._sleep(SPIN)
        started = time.monotonic()
        here.submit_retrieve_request("late", LoadStoreOp(into, tokens))
        _wait(here, "late", store=False)
        assert time.monotonic() - started < 1.5, "the failure came only after the kernel ended"
        assert here.get_block_ids_with_load_errors() == set(into)
        torch.cuda.synchronize()  # whatever was queued has run now
        assert _digest(layers, "paged", into) == before, "a late copy wrote the blocks"
        # The same retrieve in time succeeds.
        here.submit_retrieve_request("ok", LoadStoreOp(into, tokens))
        _wait(here, "ok", store=False)
        assert here.get_block_ids_with_load_errors() == set()
        assert _digest(layers, "paged", into) != before


def test_sigkilled_idle_worker_is_noticed_within_ten_seconds_at_default_timeout(
    tmp_path: Path,
) -> None:
    url = f"unix://{tmp_path}/kv.sock"
    with (
        kv_server_child(url, str(tmp_path), "--chunk-size", str(CHUNK_SIZE)),
        SyncClient(url, registry=kv_registry(), timeout=30) as client,
    ):
        worker = Worker(url, "killed", 1, 0, "paged", "bfloat16")
        worker.store("s", _tokens(2, 4), list(range(16)))
        worker.result()
        with PollingSchedulerAdapter(url, "killed", 1, 0, BLOCK_SIZE) as scheduler:
            scheduler.maybe_submit_lookup_request("pinned", token_ids=_tokens(2, 4))
            assert scheduler.check_lookup_result("pinned") == 4 * CHUNK_SIZE
            assert _stats(client)["pinned_chunks"] == 4
            os.kill(worker.pid, signal.SIGKILL)
            killed = time.monotonic()
            while _stats(client)["instances"] and time.monotonic() - killed < 15:
                time.sleep(0.05)
            noticed = time.monotonic() - killed
            assert _stats(client)["instances"] == 0
            assert noticed < 10, f"noticed after {noticed:.1f} s"
            assert _stats(client)["pinned_chunks"] == 0, "the dead rank's pins stay"
        worker.process.join(10)


def test_a_server_killed_mid_copy_fails_the_retrieve_in_time_and_never_reports_half_a_copy(
    tmp_path: Path,
) -> None:
    """The server answers a retrieve once its copy is enqueued; if it dies mid-copy, the
    copy's event never completes: the worker's watcher gives up at its timeout and reports
    every block as a load error, or (had the copy finished first) the blocks hold the chunks;
    never a success over half-written blocks, and shutting down does not hang."""
    # 32 layers of 2,048 blocks: a retrieve of 64 chunks is 2 GiB, ~40 ms on the link.
    layers = [
        torch.empty((2, 2048, BLOCK_SIZE, 8, 128), dtype=torch.bfloat16, device="cuda")
        for _ in range(32)
    ]
    generator = torch.Generator(device="cuda").manual_seed(11)
    for layer in layers:
        layer.view(torch.uint8).random_(generator=generator)
    stored, retrieved = list(range(1024)), list(range(1024, 2048))
    tokens = _tokens(12, 64 * 256 // CHUNK_SIZE)
    digest = _digest(layers, "paged", stored)
    url = f"unix://{tmp_path}/kv.sock"
    options = ("--chunk-size", "256", "--cpu-buffer-size", "2.5")
    with kv_server_child(url, str(tmp_path), *options) as child:
        adapter = WorkerAdapter(url, "killed", 1, 0, BLOCK_SIZE, timeout=5.0)
        adapter.register_kv_caches({f"layer{i}": t for i, t in enumerate(layers)})
        adapter.submit_store_request("s", LoadStoreOp(stored, tokens))
        _wait(adapter, "s", store=True, timeout=30)
        adapter.submit_retrieve_request("r", LoadStoreOp(retrieved, tokens))
        time.sleep(0.015)  # the copy is under way: answered or about to be
        os.kill(child.pid, signal.SIGKILL)
        started = time.monotonic()
        _wait(adapter, "r", store=False, timeout=30)
        assert time.monotonic() - started < 15
        failed = adapter.get_block_ids_with_load_errors()
        if failed:
            assert failed == set(retrieved)
        else:
            assert _digest(layers, "paged", retrieved) == digest
        started = time.monotonic()
        adapter.shutdown()
        assert time.monotonic() - started < 10
