"""vLLM's KV tensor layouts, end to end on a GPU: detected, registered, stored, retrieved.

Each case builds the per-layer tensors a vLLM connector is handed, the way vLLM builds them
(raw byte buffers, viewed as the KV dtype and permuted into the attention backend's logical
shape), without importing vLLM: it is not installed on the GPU machine. ``vllm_layout``
finds their kind and memory-order tensors; a :class:`WorkerAdapter` registers those in the
``cuda_ipc`` mode with a ``kvrpc serve`` child, which maps them by CUDA IPC (views at an
offset into one shared buffer included). Chunks stored from random blocks must come back
byte for byte into other blocks of another cache, and a retrieve must leave every byte
it was not asked to write as it was: the blocks it skips, the other blocks, and the bytes
between layers. Runs on the GPU machine (``pytest -m cuda``); skipped where there is no GPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from kvrpc.bench._child import kv_server_child
from kvrpc.integrations.vllm.layouts import vllm_layout
from kvrpc.kv import LoadStoreOp, WorkerAdapter
from kvrpc.kv.cuda_ipc import CudaIPCWrapper
from kvrpc.kv.keys import hashes_from_tokens
from kvrpc.kv.layout import LayoutKind

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU: runs on the GPU machine with `pytest -m cuda`",
    ),
]

BLOCK_SIZE = 16
CHUNK_SIZE = 64  # four blocks per chunk
PER_CHUNK = CHUNK_SIZE // BLOCK_SIZE
NUM_BLOCKS = 64
HEADS, HEAD_DIM = 4, 64
MLA_DIM = 576  # DeepSeek's latent (512) and rope (64) dims: the widest block of these cases
LAYERS = 3
DTYPE = torch.bfloat16
CHUNKS = 3


@dataclass(frozen=True)
class Case:
    """One layout vLLM may hand the connector.

    ``physical`` is one layer's shape in memory order (C-contiguous); ``to_logical`` the
    permutation of it that vLLM hands over; ``block_dim`` the blocks' dim in the logical
    shape. ``shared``: every layer is a view into one buffer at ``l * layer bytes`` (vLLM
    0.3x), else each layer has a buffer of its own (an attention backend's own tensor).
    """

    kind: LayoutKind
    physical: tuple[int, ...]
    to_logical: tuple[int, ...]
    block_dim: int
    shared: bool

    @property
    def layer_nbytes(self) -> int:
        return math.prod(self.physical) * DTYPE.itemsize


B, N, H, D, C = NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM, 2 * HEAD_DIM  # C: K and V side by side
_FIVE_D = {
    # FlashAttention [2, NB, BS, H, D]; its HND variant is [2, NB, H, BS, D] in memory.
    "flash_attn": (LayoutKind.PAGED, (2, B, N, H, D), (0, 1, 2, 3, 4), 1),
    "flash_attn_hnd": (LayoutKind.PAGED_HND, (2, B, H, N, D), (0, 1, 3, 2, 4), 1),
    # FlashInfer [NB, 2, BS, H, D]; HND is [NB, 2, H, BS, D] in memory.
    "flashinfer": (LayoutKind.BLOCKS_FIRST, (B, 2, N, H, D), (0, 1, 2, 3, 4), 0),
    "flashinfer_hnd": (LayoutKind.BLOCKS_FIRST_HND, (B, 2, H, N, D), (0, 1, 3, 2, 4), 0),
    "mla": (LayoutKind.MLA, (B, N, MLA_DIM), (0, 1, 2), 0),
}
CASES = {
    # vLLM 0.3x: logical [blocks, heads, tokens, content], memory order per KV cache layout,
    # every layer carved out of one buffer.
    "LBNHC": Case(LayoutKind.BNHC, (B, N, H, C), (0, 2, 1, 3), 0, shared=True),
    "LBHNC": Case(LayoutKind.BHNC, (B, H, N, C), (0, 1, 2, 3), 0, shared=True),
    "LHBNC": Case(LayoutKind.HBNC, (H, B, N, C), (1, 0, 2, 3), 0, shared=True),
    # The 5-D and MLA tensors both as per-layer allocations and as views into one buffer.
    **{
        f"{name}-{'shared' if shared else 'own'}": Case(kind, phys, perm, dim, shared)
        for name, (kind, phys, perm, dim) in _FIVE_D.items()
        for shared in (False, True)
    },
}


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _buffers(case: Case, seed: int, device: str = "cuda") -> list[torch.Tensor]:
    """The raw uint8 allocations behind a cache, filled with random bytes (NaNs and all)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    sizes = [LAYERS * case.layer_nbytes] if case.shared else [case.layer_nbytes] * LAYERS
    buffers = [torch.empty(n, dtype=torch.uint8, device=device) for n in sizes]
    for buffer in buffers:
        buffer.random_(generator=generator)
    return buffers


def _layers(case: Case, buffers: list[torch.Tensor]) -> list[torch.Tensor]:
    """The per-layer tensors vLLM would hand over, as views of ``buffers``."""
    if not case.shared:
        # A backend's own cache: raw bytes viewed as the dtype and the memory-order shape,
        # then permuted into the logical shape (vLLM's _reshape_kv_cache_tensors).
        return [b.view(DTYPE).view(case.physical).permute(case.to_logical) for b in buffers]
    # One buffer: byte views at each layer's offset, in the logical order's sizes and
    # strides, then reinterpreted as the dtype (the innermost dim is contiguous bytes).
    (buffer,) = buffers
    byte_shape = (*case.physical[:-1], case.physical[-1] * DTYPE.itemsize)
    byte_strides = _contiguous_strides(byte_shape)
    size = [byte_shape[i] for i in case.to_logical]
    stride = [byte_strides[i] for i in case.to_logical]
    return [
        torch.as_strided(buffer, size, stride, layer * case.layer_nbytes).view(DTYPE)
        for layer in range(LAYERS)
    ]


def _expect_written(
    case: Case,
    expected: list[torch.Tensor],
    source: list[torch.Tensor],
    into: list[int],
    from_blocks: list[int],
) -> None:
    """Write source blocks ``from_blocks`` into blocks ``into`` of the ``expected`` buffers."""
    device = expected[0].device
    into_ids = torch.tensor(into, dtype=torch.int64, device=device)
    from_ids = torch.tensor(from_blocks, dtype=torch.int64, device=device)
    # Copied as bytes (the last dim is contiguous in every layout): bit for bit, NaNs too.
    for dst, src in zip(_layers(case, expected), _layers(case, source), strict=True):
        picked = src.view(torch.uint8).index_select(case.block_dim, from_ids)
        dst.view(torch.uint8).index_copy_(case.block_dim, into_ids, picked)


def _same_bytes(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))


def _wait(adapter: WorkerAdapter, request_id: str, store: bool, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stores, retrieves = adapter.get_finished({request_id} if store else set())
        if request_id in (stores if store else retrieves):
            return
        time.sleep(0.001)
    raise AssertionError(f"{request_id} not finished within {timeout} s")


def _register(adapter: WorkerAdapter, case: Case, layers: list[torch.Tensor]) -> None:
    """What KvrpcConnector.register_kv_caches does: detect the layout, register it."""
    kind, physical = vllm_layout(layers)
    assert kind is case.kind
    for logical, tensor in zip(layers, physical, strict=True):
        assert tensor.is_contiguous()
        assert tensor.data_ptr() == logical.data_ptr(), "vllm_layout copied the tensor"
        assert tuple(tensor.shape) == case.physical
    adapter.register_kv_caches({f"layers.{i}.attn": t for i, t in enumerate(physical)}, kind)


@pytest.fixture(scope="module")
def kv_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One ``kvrpc serve`` child for the module: another process, so CUDA IPC is real."""
    tmp = tmp_path_factory.mktemp("vllm-layouts")
    url = f"unix://{tmp}/kv.sock"
    options = ("--chunk-size", str(CHUNK_SIZE), "--cpu-buffer-size", "1", "--client-timeout", "5")
    with kv_server_child(url, str(tmp), *options) as child:
        # The pool's slots are sized by the first registered layout's chunk: register the
        # widest (MLA's 576-wide latent) first, so every case's chunks fit.
        widest = CASES["mla-own"]
        with WorkerAdapter(url, "sizer", 1, 0, BLOCK_SIZE) as sizer:
            _register(sizer, widest, _layers(widest, _buffers(widest, 0)))
        yield url
        del child


@pytest.mark.parametrize("name", list(CASES))
def test_vllm_layout_stores_and_retrieves_bitwise_through_cuda_ipc(
    kv_server: str, name: str
) -> None:
    case = CASES[name]
    model = f"vllm-{name}"
    generator = torch.Generator().manual_seed(list(CASES).index(name))
    tokens = torch.randint(0, 32000, (CHUNKS * CHUNK_SIZE,), generator=generator).tolist()
    order = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(5)).tolist()
    stored = order[: CHUNKS * PER_CHUNK]  # 12 blocks, scattered
    into = order[CHUNKS * PER_CHUNK : 2 * CHUNKS * PER_CHUNK]
    into_skipping = order[2 * CHUNKS * PER_CHUNK : 2 * CHUNKS * PER_CHUNK + 2 * PER_CHUNK]

    source_buffers = _buffers(case, seed=1)
    target_buffers = _buffers(case, seed=2)  # other bytes everywhere
    source, target = _layers(case, source_buffers), _layers(case, target_buffers)
    if case.shared and LAYERS > 1:
        # The point of the shared cases: layers past the first sit at an offset in the
        # allocation, which the wrapper must carry to the server.
        assert CudaIPCWrapper.from_tensor(vllm_layout(source)[1][1]).tensor_offset > 0

    with (
        WorkerAdapter(kv_server, model, 1, 0, BLOCK_SIZE) as storer,
        WorkerAdapter(kv_server, model, 1, 0, BLOCK_SIZE) as retriever,
    ):
        _register(storer, case, source)
        _register(retriever, case, target)
        source_before = [b.clone() for b in source_buffers]

        storer.submit_store_request("s", LoadStoreOp(stored, tokens))
        _wait(storer, "s", store=True)
        assert storer.stats.stored_chunks == CHUNKS, storer.stats
        torch.cuda.synchronize()
        assert _same_bytes(source_buffers, source_before), "a store wrote the engine's cache"

        # Every chunk into other blocks of the other cache.
        expected = [b.clone() for b in target_buffers]
        _expect_written(case, expected, source_buffers, into, stored)
        assert not _same_bytes(target_buffers, expected)
        retriever.submit_retrieve_request("r", LoadStoreOp(into, tokens))
        _wait(retriever, "r", store=False)
        assert retriever.get_block_ids_with_load_errors() == set()
        torch.cuda.synchronize()
        assert _same_bytes(target_buffers, expected), "retrieved bytes differ"

        # Chunks 1 and 2 only, by chunk hash, with block ids from chunk 1's first block on;
        # the engine holds the first 20 tokens from start itself and may be reading them, so
        # the two blocks those tokens are in must keep their bytes, while the rest of chunk 1
        # and all of chunk 2 land.
        skip = BLOCK_SIZE + 4
        op = LoadStoreOp(
            into_skipping,
            chunk_hashes=hashes_from_tokens(tokens, CHUNK_SIZE),
            start=CHUNK_SIZE,
            block_offset=PER_CHUNK,
            skip_first_n_tokens=skip,
        )
        held = -(-skip // BLOCK_SIZE)
        _expect_written(
            case, expected, source_buffers, into_skipping[held:], stored[PER_CHUNK + held :]
        )
        retriever.submit_retrieve_request("r-skip", op)
        _wait(retriever, "r-skip", store=False)
        assert retriever.get_block_ids_with_load_errors() == set()
        assert retriever.stats.retrieved_chunks == CHUNKS + 2, retriever.stats
        torch.cuda.synchronize()
        assert _same_bytes(target_buffers, expected), "skipped or other blocks were written"
