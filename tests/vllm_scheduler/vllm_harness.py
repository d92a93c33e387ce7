"""What the vLLM scheduler tests drive: vLLM's own config, Scheduler and connector factory.

Only the model runner is not vLLM's: its CPU build has no kernels for this vLLM wheel, so
each worker process (one per tensor-parallel rank) stands in for it. It allocates the KV
cache with vLLM's own ``allocate_kv_cache`` (the real per-layer views, in vLLM's layout),
loads the connector through vLLM's factory, and for every step does what vLLM's model runner
does around a forward: bind the metadata, ``start_load_kv`` (before the forward when the step
has synchronous loads, after it otherwise, as vLLM's ``KVConnectorModelRunnerMixin`` does),
then layer by layer what vLLM's attention layers do: ``wait_for_layer_load`` (vLLM's
``maybe_transfer_kv_layer``), write the scheduled tokens' KV (a pure function of token,
position, layer and rank, standing in for attention) and read the context's KV, noting every
block that did not hold what it should; then ``wait_for_save``, ``get_finished``,
``get_block_ids_with_load_errors``, stats, clear.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from multiprocessing.connection import Connection
from typing import Any

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

BLOCK_SIZE = 16
NUM_BLOCKS = 256
LAYERS = 2
KV_HEADS = 2  # in all; each of the two ranks holds one
HEAD_SIZE = 16
CONNECTOR = {
    "kv_connector": "KvrpcConnector",
    "kv_connector_module_path": "kvrpc.integrations.vllm",
    "kv_role": "kv_both",
}


def save_tiny_model() -> str:
    """A tiny Llama config in a fresh directory (the scheduler needs no weights)."""
    from transformers import LlamaConfig

    path = tempfile.mkdtemp(prefix="kvrpc-vllm-model-")
    LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_SIZE,
        max_position_embeddings=4096,
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(path)
    return path


def vllm_config(
    model: str,
    extra: dict[str, Any],
    tp: int = 2,
    rank: int = 0,
    engine_id: str | None = None,
    kv_events: Any = None,
) -> Any:
    """vLLM's own VllmConfig for the tiny model, with KvrpcConnector and ``extra``.

    ``engine_id`` is the scheduler's, for a worker's config: vLLM hands its workers the
    engine's own config, engine id included, where this harness builds one per process.
    ``kv_events`` is vLLM's ``KVEventsConfig`` (None: vLLM publishes no KV events).
    """
    from vllm.config import (
        CacheConfig,
        DeviceConfig,
        KVTransferConfig,
        ModelConfig,
        ParallelConfig,
        SchedulerConfig,
        VllmConfig,
    )

    model_config = ModelConfig(
        model=model, skip_tokenizer_init=True, dtype="float32", seed=0, max_model_len=4096
    )
    config = VllmConfig(
        model_config=model_config,
        scheduler_config=SchedulerConfig(
            max_num_seqs=8,
            max_num_batched_tokens=256,
            max_model_len=4096,
            enable_chunked_prefill=True,
            is_encoder_decoder=False,
        ),
        cache_config=CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=True),
        # vLLM's default kv_load_failure_policy ("fail"): the connector makes it "recompute".
        kv_transfer_config=KVTransferConfig(
            **CONNECTOR, engine_id=engine_id, kv_connector_extra_config=extra
        ),
        device_config=DeviceConfig("cpu"),
        parallel_config=ParallelConfig(tensor_parallel_size=tp),
        kv_events_config=kv_events,
    )
    config.parallel_config.rank = rank
    config.cache_config.num_gpu_blocks = NUM_BLOCKS
    return config


def kv_cache_config(tp: int = 2) -> Any:
    """One full-attention group of every layer, laid out layer by layer as vLLM does."""
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        KVCacheTensor,
    )

    spec = FullAttentionSpec(
        block_size=BLOCK_SIZE,
        num_kv_heads=KV_HEADS // tp,
        head_size=HEAD_SIZE,
        dtype=torch.float32,
    )
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    page = spec.page_size_bytes
    return KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[
            KVCacheTensor(
                size=page * NUM_BLOCKS * LAYERS,
                layers=names,
                layer_stride=page * NUM_BLOCKS,
                block_stride=page,
            )
        ],
        kv_cache_groups=[KVCacheGroupSpec(names, spec)],
    )


def kv_value(token: int, position: int, layer: int, rank: int) -> float:
    """The stand-in for attention's KV of one token: equal prefixes give equal bytes."""
    return float(token * 1_000 + position) + layer * 0.25 + rank * 0.125


def wrong_blocks(layer: torch.Tensor, index: int, rank: int, reads: list[Any]) -> set[int]:
    """The blocks among ``reads`` ((block, offset, token, position)) not holding their KV."""
    if not reads:
        return set()
    blocks, offsets, tokens, positions = (torch.tensor(c) for c in zip(*reads, strict=True))
    # kv_value for every read at once (float64 holds those float32 values exactly).
    expected = (tokens * 1_000 + positions).to(torch.float64) + index * 0.25 + rank * 0.125
    found = layer[blocks, :, offsets, :].to(torch.float64)  # [reads, heads, content]
    wrong = (found != expected[:, None, None]).flatten(1).any(dim=1)
    return set(blocks[wrong].tolist())


def worker_main(
    conn: Connection, model: str, extra: dict[str, Any], rank: int, tp: int, engine_id: str
) -> None:
    """A tensor-parallel rank's worker process, driven over ``conn`` (see the module doc)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.worker.utils import allocate_kv_cache

    config = vllm_config(model, extra, tp, rank, engine_id)
    cache_config = kv_cache_config(tp)
    try:
        connector = KVConnectorFactory.create_connector(
            config, KVConnectorRole.WORKER, cache_config
        )
        caches = allocate_kv_cache(cache_config, torch.device("cpu"), KVCacheLayout.LBNHC)
        connector.register_kv_caches(caches)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    names, layers = list(caches), list(caches.values())
    conn.send(("ready", [(list(t.shape), list(t.stride())) for t in layers]))
    while True:
        command, *args = conn.recv()
        if command == "step":
            metadata, finished, writes, reads, sync_loads = args
            connector.bind_connector_metadata(pickle.loads(metadata))
            connector.handle_preemptions(connector._get_connector_metadata())
            if sync_loads:  # they feed this forward
                connector.start_load_kv(None)
            wrong: dict[str, set[int]] = {}
            for index, (name, layer) in enumerate(zip(names, layers, strict=True)):
                # vLLM's attention layers call this whatever the connector does with it.
                connector.wait_for_layer_load(name)
                for block, offset, token, position in writes:
                    # [blocks, heads, tokens, content]: one token of every head.
                    layer[block, :, offset, :] = kv_value(token, position, index, rank)
                for request_id, context in reads.items():
                    bad = wrong_blocks(layer, index, rank, context)
                    if bad:
                        wrong.setdefault(request_id, set()).update(bad)
            if not sync_loads:  # asynchronous loads start after the forward is launched
                connector.start_load_kv(None)
            connector.wait_for_save()
            sending, recving = connector.get_finished(set(finished))
            output = KVConnectorOutput(
                finished_sending=sending,
                finished_recving=recving,
                kv_connector_stats=connector.get_kv_connector_stats(),
                invalid_block_ids=connector.get_block_ids_with_load_errors(),
            )
            connector.clear_connector_metadata()
            conn.send(("output", output, wrong))
        elif command == "blocks":
            (block_ids,) = args
            conn.send(("blocks", [layer[block_ids].clone() for layer in layers]))
        elif command == "fill":
            block, value = args
            for layer in layers:
                layer[block] = value
            conn.send(("filled",))
        elif command == "stop":
            connector.shutdown()
            conn.send(("stopped",))
            return
