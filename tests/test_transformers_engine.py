"""The transformers engine driver end to end: a real Llama forward over paged blocks, a real
``kvrpc serve``, prefixes stored and retrieved through the adapters the vLLM connector uses.

The model is a tiny Llama (2 layers, hidden 64) with seeded random weights: real compute,
nothing downloaded. On the CPU it runs in float32 with its KV in shared memory (the server
copies in place); the ``cuda`` cases run the same checks in bfloat16 on CUDA tensors, moved
by the server's copy engine over CUDA IPC (on the GPU machine, ``pytest -m cuda``).

What "the same" means, as the tests assert it:

* a hit's logits are bit-identical to the suffix computed over the KV this engine computed
  itself (the retrieved bytes are those bytes);
* they equal a full recompute of the whole prompt within ``TOLERANCE`` of the logits'
  scale (a full prefill runs differently shaped matmuls, so the last bits may differ);
* greedy decoding gives the same tokens;
* a decode step over the context slots kept on the device gives the logits of a step that
  rebuilds them (bit for bit), a padded static-shape step the same within ``TOLERANCE``,
  and a step replayed from a CUDA graph the same tokens.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvrpc.errors import KVConfigError
from kvrpc.integrations.transformers import (
    CachingEngine,
    ContextSlots,
    Decoder,
    PagedKVCache,
    PagedLlama,
    slot_indices,
)
from kvrpc.integrations.transformers import engine as engine_module
from kvrpc.kv.client import ops as ops_module
from kvrpc.testing.serve import ServeProcess
from kvrpc.transport import local_url

CHUNK = 32  # the server's chunk size: two blocks of 16
#: Largest difference from a full recompute, as a fraction of the largest logit.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

cuda = pytest.mark.cuda
no_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: runs on the GPU machine with `pytest -m cuda`",
)
DEVICES = [
    pytest.param(("cpu", torch.float32), id="cpu-fp32"),
    pytest.param(("cuda", torch.bfloat16), id="cuda-bf16", marks=[cuda, no_gpu]),
]
_ids = itertools.count()


def tiny_llama(device: str, dtype: torch.dtype) -> Any:
    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.5,  # spread-out logits: greedy picks are not near ties
    )
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


@pytest.fixture
def server(tmp_path: Any) -> Iterator[ServeProcess]:
    serve = ServeProcess(
        local_url(str(tmp_path), "kv.sock"),
        "--chunk-size",
        str(CHUNK),
        "--cpu-buffer-size",
        "0.05",
        log_dir=str(tmp_path),
    )
    serve.start()
    yield serve
    serve.stop()


@pytest.fixture(params=DEVICES)
def engine(request: Any, server: ServeProcess) -> Iterator[CachingEngine]:
    device, dtype = request.param
    model = tiny_llama(device, dtype)
    with CachingEngine(
        model, server.url, model_name=f"tiny-{device}", num_blocks=256, timeout=10
    ) as running:
        yield running


def prompt(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (length,), generator=generator).tolist()


def rid() -> str:
    return f"request-{next(_ids)}"


def scale_of(logits: torch.Tensor) -> float:
    return float(logits.abs().max())


def own_kv_suffix(engine: CachingEngine, tokens: list[int], start: int, n: int) -> torch.Tensor:
    """The suffix's logits over a prefix this engine computed into its own blocks."""
    table = engine.cache.allocate(engine.cache.blocks_for(len(tokens)))
    try:
        engine.runner.forward(tokens[:start], 0, table)
        return engine.runner.forward(tokens[start:], start, table, logits_for=n)
    finally:
        engine.cache.free(table)


def tiny_runner(device: str, dtype: torch.dtype, num_blocks: int = 64) -> PagedLlama:
    cache = PagedKVCache.empty(
        num_layers=2,
        num_blocks=num_blocks,
        block_size=16,
        kv_heads=2,
        head_dim=16,
        dtype=dtype,
        device=device,
    )
    return PagedLlama(tiny_llama(device, dtype), cache)


def rebuilt_decode(
    runner: PagedLlama, table: list[int], length: int, token: int, steps: int
) -> list[torch.Tensor]:
    """Each step's logits through ``forward``, every context slot rebuilt on the host."""
    out = []
    for position in range(length, length + steps):
        if position >= len(table) * runner.cache.block_size:
            table.extend(runner.cache.allocate(1))
        logits = runner.forward([token], position, table)
        out.append(logits)
        token = int(logits[-1].argmax())
    return out


def decoded(
    decoder: Decoder, table: list[int], length: int, token: int, steps: int, **kw: Any
) -> list[torch.Tensor]:
    """Each step's logits through ``decoder``, from a request of ``length`` tokens."""
    decoder.start(table, length, **kw)
    out = []
    for _ in range(steps):
        logits = decoder.step(token, table)
        out.append(logits)
        token = int(logits[-1].argmax())
    return out


def stored_prefix(engine: CachingEngine, prefix: list[int]) -> None:
    first = engine.prefill(rid(), [*prefix, 1, 2, 3])
    assert first.cached_tokens == 0
    engine.wait_for_stores([first.request_id])
    engine.release(first)


# ---------------------------------------------------------------------- the model alone


def test_the_paged_forward_computes_what_transformers_computes() -> None:
    model = tiny_llama("cpu", torch.float32)
    cache = PagedKVCache.empty(
        num_layers=2,
        num_blocks=64,
        block_size=16,
        kv_heads=2,
        head_dim=16,
        dtype=torch.float32,
        device="cpu",
    )
    tokens = prompt(150, seed=1)
    table = cache.allocate(cache.blocks_for(150))
    ours = PagedLlama(model, cache).forward(tokens, 0, table, logits_for=150)
    with torch.inference_mode():
        theirs = model(torch.tensor([tokens])).logits[0].float()
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5 * scale_of(theirs))


def test_token_slots_follow_the_block_table() -> None:
    slots = slot_indices([7, 2, 9], 14, 34, 16)
    assert slots.tolist() == [7 * 16 + 14, 7 * 16 + 15] + [2 * 16 + i for i in range(16)] + [
        9 * 16,
        9 * 16 + 1,
    ]
    with pytest.raises(KVConfigError, match="need 3 blocks; the table has 2"):
        slot_indices([1, 2], 0, 40, 16)


def test_context_slots_grow_by_one_a_step_as_slot_indices_would_build_them() -> None:
    blocks = iter([30, 4, 17, 8, 25])
    table = [7, 2]
    slots = ContextSlots(64, 16, "cpu")
    slots.reset(table, 14)
    assert slots.view().tolist() == slot_indices(table, 0, 14, 16).tolist()
    for _ in range(40):  # across three block boundaries, the table extended as it goes
        if slots.length >= len(table) * 16:
            table.append(next(blocks))
        position, slot = slots.append(table)
        assert position == slots.length - 1
        assert slot == table[position // 16] * 16 + position % 16
        assert slots.view().tolist() == slot_indices(table, 0, slots.length, 16).tolist()
        # The rest pads with position 0's slot: finite KV, hidden by the padded step's mask.
        assert slots.slots[slots.length :].tolist() == [7 * 16] * (64 - slots.length)
    bigger = ContextSlots(128, 16, "cpu")
    bigger.take(slots)
    assert bigger.view().tolist() == slots.view().tolist()
    assert bigger.slots[slots.length :].tolist() == [7 * 16] * (128 - slots.length)


def test_context_slots_refuse_a_full_buffer_and_a_short_table() -> None:
    slots = ContextSlots(20, 16, "cpu")
    with pytest.raises(KVConfigError, match="cannot take a 21-token request"):
        slots.reset([1, 2], 21)
    slots.reset([1], 16)
    with pytest.raises(KVConfigError, match="position 16 needs 2 blocks; the table has 1"):
        slots.append([1])
    assert slots.length == 16  # nothing changed
    for _ in range(4):
        slots.append([1, 2])
    with pytest.raises(KVConfigError, match="20 slots are full"):
        slots.append([1, 2])


def test_an_eager_decode_step_over_device_slots_is_the_rebuilt_step_bit_for_bit() -> None:
    runner = tiny_runner("cpu", torch.float32)
    tokens = prompt(45, seed=12)
    table = runner.cache.allocate(runner.cache.blocks_for(45))
    runner.forward(tokens, 0, table)
    first = prompt(1, seed=13)[0]
    # 40 steps from position 45: across block boundaries and, with a bucket of 64, from
    # one buffer to a larger one mid-request.
    rebuilt = rebuilt_decode(runner, list(table), 45, first, 40)
    decoder = Decoder(runner, bucket=64)
    ours = decoded(decoder, list(table), 45, first, 40)
    assert decoder.capacity == 128  # it moved
    for step, (a, b) in enumerate(zip(ours, rebuilt, strict=True)):
        assert torch.equal(a, b), step


def test_a_padded_static_shape_step_is_the_plain_step_even_over_nan_blocks() -> None:
    runner = tiny_runner("cpu", torch.float32)
    for layer in runner.cache.layers:  # unwritten blocks: a padded key must never read them
        layer.fill_(math.nan)
    runner.cache.allocate(3)  # the request's blocks are not the first ones
    tokens = prompt(50, seed=14)
    table = runner.cache.allocate(runner.cache.blocks_for(50))
    runner.forward(tokens, 0, table)
    first = prompt(1, seed=15)[0]
    plain = decoded(Decoder(runner, bucket=64), list(table), 50, first, 30)
    padded_decoder = Decoder(runner, mode="padded", bucket=64)
    padded = decoded(padded_decoder, list(table), 50, first, 30)
    assert padded_decoder.capacity == 128  # 50 + 30 tokens: moved from the 64-slot buffer
    for step, (a, b) in enumerate(zip(padded, plain, strict=True)):
        assert bool(torch.isfinite(a).all()), step
        assert float((a - b).abs().max()) <= TOLERANCE[torch.float32] * scale_of(b), step
        assert int(a.argmax()) == int(b.argmax()), step


def test_cuda_graphs_refuse_a_model_on_the_cpu(tmp_path: Any) -> None:
    # The engine refuses before it connects: no server listens at this URL.
    nowhere = local_url(str(tmp_path), "none.sock")
    with pytest.raises(KVConfigError, match="cuda_graphs needs the model on a CUDA device"):
        CachingEngine(
            tiny_llama("cpu", torch.float32),
            nowhere,
            model_name="m",
            num_blocks=4,
            cuda_graphs=True,
        )
    runner = tiny_runner("cpu", torch.float32, num_blocks=4)
    with pytest.raises(KVConfigError, match="CUDA graphs need the model and its KV cache"):
        Decoder(runner, mode="graphed")
    with pytest.raises(KVConfigError, match="a decode mode is one of eager, padded, graphed"):
        Decoder(runner, mode="fast")  # type: ignore[arg-type]


@cuda
@no_gpu
def test_a_decode_replayed_from_cuda_graphs_gives_the_eager_tokens() -> None:
    runner = tiny_runner("cuda", torch.bfloat16)
    tokens = prompt(40, seed=16)
    eager_table = runner.cache.allocate(runner.cache.blocks_for(40))
    graph_table = runner.cache.allocate(runner.cache.blocks_for(40))
    first = int(runner.forward(tokens, 0, eager_table)[-1].argmax())
    runner.forward(tokens, 0, graph_table)
    eager = decoded(Decoder(runner), eager_table, 40, first, 16)
    graphed_decoder = Decoder(runner, mode="graphed", bucket=16)
    # A bucket of 16 tokens: the request (40 + 16) outgrows its first graph's 48 mid-way.
    graphed = decoded(graphed_decoder, graph_table, 40, first, 16, reserve=1)
    assert graphed_decoder.graphs == 2 and graphed_decoder.capacity == 64
    assert [int(a.argmax()) for a in graphed] == [int(b.argmax()) for b in eager]
    for step, (a, b) in enumerate(zip(graphed, eager, strict=True)):
        assert float((a - b).abs().max()) <= TOLERANCE[torch.bfloat16] * scale_of(b), step
    # The graphs' KV is the eager steps' KV: the same blocks' bytes, position for position.
    for layer in runner.cache.layers:
        flat = layer.view(2, -1, 2, 16)
        ours = flat[:, slot_indices(graph_table, 0, 56, 16).cuda()]
        theirs = flat[:, slot_indices(eager_table, 0, 56, 16).cuda()]
        assert float((ours.float() - theirs.float()).abs().max()) <= 2e-2 * float(
            theirs.float().abs().max()
        )
    # A second request replays the graph captured already.
    again = decoded(graphed_decoder, graph_table, 40, first, 16, reserve=1)
    assert graphed_decoder.graphs == 2
    assert [int(a.argmax()) for a in again] == [int(b.argmax()) for b in graphed]


def test_a_full_cache_refuses_to_allocate_and_names_the_counts() -> None:
    cache = PagedKVCache.empty(
        num_layers=1,
        num_blocks=4,
        block_size=16,
        kv_heads=1,
        head_dim=8,
        dtype=torch.float32,
        device="cpu",
    )
    taken = cache.allocate(3)
    assert len(set(taken)) == 3
    with pytest.raises(KVConfigError, match="2 KV blocks asked for, 1 of 4 free"):
        cache.allocate(2)
    cache.free(taken)
    assert len(cache.allocate(4)) == 4


def test_blocks_freed_together_come_back_in_the_order_they_were_handed_out() -> None:
    cache = PagedKVCache.empty(
        num_layers=1,
        num_blocks=12,
        block_size=16,
        kv_heads=1,
        head_dim=8,
        dtype=torch.float32,
        device="cpu",
    )
    first = cache.allocate(5)
    assert first == [0, 1, 2, 3, 4]  # a fresh cache hands out an ascending run
    second = cache.allocate(3)
    cache.free(first)
    assert cache.allocate(5) == first  # still ascending: one run for a DMA store
    cache.free(second)
    assert cache.allocate(2) == second[:2]


def test_importing_the_driver_does_not_import_transformers() -> None:
    code = (
        "import sys, kvrpc, kvrpc.integrations.transformers; "
        "assert 'transformers' not in sys.modules; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# ---------------------------------------------------------------------- over a server


@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layerwise"])
def test_a_hit_computes_only_the_suffix_and_changes_no_logit(
    engine: CachingEngine, layerwise: bool
) -> None:
    prefix = prompt(4 * CHUNK + 10, seed=2)  # 4 whole chunks and a part
    stored_prefix(engine, prefix)
    tokens = prefix + prompt(20, seed=3)
    suffix = len(tokens) - 4 * CHUNK

    hit = engine.prefill(rid(), tokens, logits_for=suffix, layerwise=layerwise, store=False)

    assert hit.cached_tokens == 4 * CHUNK and not hit.recomputed
    assert torch.equal(hit.logits, own_kv_suffix(engine, tokens, 4 * CHUNK, suffix))
    full = engine.prefill(rid(), tokens, cached_tokens=0, logits_for=suffix, store=False)
    assert full.cached_tokens == 0
    bound = TOLERANCE[engine.runner.model.dtype] * scale_of(full.logits)
    assert float((hit.logits - full.logits).abs().max()) <= bound
    assert engine.decode(hit, 32) == engine.decode(full, 32)
    stats = engine.worker.stats
    assert stats.retrieved_chunks == 4 and stats.failed_retrieves == 0


def test_layerwise_and_whole_retrieves_give_the_same_bytes(engine: CachingEngine) -> None:
    prefix = prompt(3 * CHUNK, seed=4)
    stored_prefix(engine, prefix)
    tokens = prefix + prompt(9, seed=5)
    whole = engine.prefill(rid(), tokens, logits_for=9, layerwise=False, store=False)
    layered = engine.prefill(rid(), tokens, logits_for=9, layerwise=True, store=False)
    assert whole.cached_tokens == layered.cached_tokens == 3 * CHUNK
    assert torch.equal(whole.logits, layered.logits)
    blocks = 3 * CHUNK // engine.cache.block_size
    for layer in engine.cache.layers:
        assert torch.equal(
            layer[:, whole.block_table[:blocks]], layer[:, layered.block_table[:blocks]]
        )


def test_a_miss_is_a_plain_prefill(engine: CachingEngine) -> None:
    tokens = prompt(2 * CHUNK + 5, seed=6)
    miss = engine.prefill(rid(), tokens, logits_for=4, store=False)
    assert miss.cached_tokens == 0 and not miss.recomputed
    again = engine.prefill(rid(), tokens, cached_tokens=0, logits_for=4, store=False)
    assert torch.equal(miss.logits, again.logits)


def test_a_prompt_of_whole_chunks_still_computes_its_last_token(engine: CachingEngine) -> None:
    tokens = prompt(2 * CHUNK, seed=7)
    stored_prefix(engine, tokens)
    hit = engine.prefill(rid(), tokens, store=False)
    # The last chunk is computed: its last token gives the logits.
    assert hit.cached_tokens == CHUNK, (engine.worker.stats, engine.lookup(rid(), tokens))
    full = engine.prefill(rid(), tokens, cached_tokens=0, store=False)
    assert hit.first_token == full.first_token


@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layerwise"])
def test_a_retrieve_that_fails_is_recomputed_with_the_same_logits(
    engine: CachingEngine, server: ServeProcess, layerwise: bool
) -> None:
    prefix = prompt(3 * CHUNK, seed=8)
    stored_prefix(engine, prefix)
    tokens = prefix + prompt(12, seed=9)
    request_id = rid()
    cached = engine.lookup(request_id, tokens)
    assert cached == 3 * CHUNK
    server.kill()  # after the lookup said hit, before the retrieve

    served = engine.prefill(
        request_id, tokens, cached_tokens=cached, logits_for=12, layerwise=layerwise, store=False
    )

    assert served.recomputed and served.cached_tokens == 0
    assert engine.worker.stats.failed_retrieves == 3
    full = engine.prefill(rid(), tokens, cached_tokens=0, logits_for=12, store=False)
    assert torch.equal(served.logits, full.logits)


def test_a_prefill_hashes_its_prompt_once_for_the_lookup_retrieve_and_store(
    engine: CachingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine's hashing counted where it calls it, and the adapters' own (the one
    # prompt_hashes calls for token ids) counted too: it must not run at all.
    calls: dict[str, list[int]] = {"engine": [], "adapters": []}

    def counting(name: str, real: Any) -> Any:
        def hashes(token_ids: Any, chunk_size: int, cache_salt: str | None = None) -> Any:
            calls[name].append(len(token_ids))
            return real(token_ids, chunk_size, cache_salt)

        return hashes

    monkeypatch.setattr(
        engine_module, "hashes_from_tokens", counting("engine", engine_module.hashes_from_tokens)
    )
    monkeypatch.setattr(
        ops_module, "hashes_from_tokens", counting("adapters", ops_module.hashes_from_tokens)
    )
    prefix = prompt(3 * CHUNK, seed=10)
    first = engine.prefill(rid(), [*prefix, 4, 5])  # a miss: lookup and store
    engine.wait_for_stores([first.request_id])
    assert first.cached_tokens == 0
    assert calls == {"engine": [3 * CHUNK + 2], "adapters": []}
    assert len(first.chunk_hashes) == 3

    tokens = prefix + prompt(7, seed=11)
    hit = engine.prefill(rid(), tokens, logits_for=7)  # lookup, retrieve and store
    engine.wait_for_stores([hit.request_id])

    assert hit.cached_tokens == 3 * CHUNK and not hit.recomputed
    assert calls == {"engine": [3 * CHUNK + 2, 3 * CHUNK + 7], "adapters": []}
    assert hit.chunk_hashes == first.chunk_hashes  # the same prefix, the same keys
    assert torch.equal(hit.logits, own_kv_suffix(engine, tokens, 3 * CHUNK, 7))
    assert engine.worker.stats.retrieved_chunks == 3
    # A prefill that neither looks up nor stores hashes nothing; the public lookup, given
    # only tokens, hashes them itself and still finds the prefix.
    engine.prefill(rid(), tokens, cached_tokens=0, store=False)
    assert len(calls["engine"]) == 2
    assert engine.lookup(rid(), tokens) == 3 * CHUNK
    assert len(calls["engine"]) == 3 and calls["adapters"] == []


def test_the_engine_decodes_what_a_step_rebuilding_its_slots_decodes(
    engine: CachingEngine,
) -> None:
    tokens = prompt(2 * CHUNK + 3, seed=17)
    done = engine.prefill(rid(), tokens, cached_tokens=0, store=False)
    table = list(done.block_table)
    rebuilt = rebuilt_decode(engine.runner, table, len(tokens), done.first_token, 24)
    engine.cache.free(table[len(done.block_table) :])
    theirs = [done.first_token, *(int(logits[-1].argmax()) for logits in rebuilt)]
    assert engine.decode(done, 25) == theirs
    assert engine.decode(done, 1) == [done.first_token]
    engine.release(done)


@cuda
@no_gpu
def test_the_engine_decodes_the_same_tokens_with_cuda_graphs(engine: CachingEngine) -> None:
    if engine.device.type != "cuda":
        pytest.skip("CUDA graphs: the cuda-bf16 engine only")
    tokens = prompt(2 * CHUNK + 3, seed=18)
    done = engine.prefill(rid(), tokens, cached_tokens=0, store=False)
    eager = engine.decode(done, 16)
    assert engine.decode(done, 16, cuda_graphs=True) == eager
    assert engine.decoder(True).graphs == 1
    engine.release(done)
