"""One whole vLLM engine in a process of its own: ``python engine_child.py SPEC.json OUT.json``.

``test_vllm_engine`` starts this script once per engine, so that every engine begins with an
empty prefix cache and vLLM's process-wide state (its config, its distributed group, its
compiled ops) never meets another engine's. The spec says:

- ``model``: the model directory; ``prompts``: lists of token ids, generated one after the
  other, greedily, with ``max_tokens`` and one logprob per token;
- ``url``: the kvrpc server for ``KvrpcConnector``, or null for an engine without one;
- ``corrupt_loads``: zero every chunk a retrieve writes into the KV cache while reporting
  it loaded (only for the test that shows a wrong prefix is caught).

The result is one JSON object: per prompt the generated tokens, their logprobs and vLLM's
``num_cached_tokens``; the connector's counters as vLLM's stats loggers received them; and
how many chunk batches were corrupted. Imports nothing of kvrpc's tests.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

# Before vLLM is imported: its CPU build, no hub access, a small KV cache (the default takes
# most of the host's memory) and the engine core in this process, so the monkeypatch of the
# corrupting variant reaches the worker.
os.environ.update(
    VLLM_TARGET_DEVICE="cpu",
    HF_HUB_OFFLINE="1",
    VLLM_CPU_KVCACHE_SPACE="1",
    VLLM_ENABLE_V1_MULTIPROCESSING="0",
)

import torch
from vllm import EngineArgs, LLMEngine, SamplingParams
from vllm.config import KVTransferConfig
from vllm.inputs import TokensPrompt
from vllm.v1.metrics.loggers import StatLoggerBase

BLOCK_SIZE = 32  # the CPU attention backend's blocks are multiples of 32 tokens


class ConnectorStatsRecorder(StatLoggerBase):
    """Sums what each engine step reports about the connector, as vLLM's own loggers see it.

    ``connector`` holds KvrpcConnector's counters (both roles, via vLLM's aggregation);
    ``external_hit_tokens`` is vLLM's scheduler's own count of prompt tokens the connector
    supplied. Class attributes: vLLM builds the instance itself, and this process runs one
    engine.
    """

    connector: dict[str, int] = {}  # noqa: RUF012 - one engine per process, see above
    external_hit_tokens = 0

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        pass

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is None:
            return
        cls = ConnectorStatsRecorder
        for key, value in (scheduler_stats.kv_connector_stats or {}).items():
            cls.connector[key] = cls.connector.get(key, 0) + int(value)
        external = scheduler_stats.connector_prefix_cache_stats
        if external is not None:
            cls.external_hit_tokens += int(external.hits)

    def log_engine_initialized(self) -> None:
        pass


def corrupt_loads() -> list[int]:
    """Make the worker write zeros for every retrieved chunk, still reporting success.

    Returns a list that grows by one per corrupted batch, so the caller can tell the patch
    was reached. Patches the name the worker adapter's completions call, not kvrpc's layout
    module.
    """
    import kvrpc.kv.client.completions as completions

    real = completions.scatter_chunks
    calls: list[int] = []

    def scatter_zeros(layers: Any, layout: Any, block_ids: Any, srcs: Any) -> None:
        calls.append(len(srcs))
        real(layers, layout, block_ids, [torch.zeros_like(src) for src in srcs])

    completions.scatter_chunks = scatter_zeros
    return calls


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    corrupted = corrupt_loads() if spec.get("corrupt_loads") else []
    transfer = None
    if spec["url"] is not None:
        transfer = KVTransferConfig(
            kv_connector="KvrpcConnector",
            kv_connector_module_path="kvrpc.integrations.vllm",
            kv_role="kv_both",
            kv_connector_extra_config={"kvrpc.url": spec["url"]},
        )
    args = EngineArgs(
        model=spec["model"],
        skip_tokenizer_init=True,
        dtype="float32",
        block_size=BLOCK_SIZE,
        enforce_eager=True,
        seed=0,
        max_model_len=1024,
        # The engine without the connector is the reference: it computes every prompt in
        # full, never from its own prefix cache.
        enable_prefix_caching=transfer is not None,
        kv_transfer_config=transfer,
    )
    # LLMEngine rather than LLM: only it takes custom stat loggers, and those are where vLLM
    # delivers the connector's counters.
    engine = LLMEngine.from_engine_args(args, stat_loggers=[ConnectorStatsRecorder])
    params = SamplingParams(
        temperature=0.0, max_tokens=spec["max_tokens"], logprobs=1, ignore_eos=True
    )
    results = []
    for index, tokens in enumerate(spec["prompts"]):
        # One request at a time: the second may only look up what the first stored.
        engine.add_request(f"prompt-{index}", TokensPrompt(prompt_token_ids=tokens), params)
        final = None
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    final = output
        assert final is not None, "the engine finished without an output"
        completion = final.outputs[0]
        assert completion.logprobs is not None
        results.append(
            {
                "tokens": list(completion.token_ids),
                # The chosen token's logprob, which greedy decoding always includes.
                "logprobs": [
                    step[token].logprob
                    for step, token in zip(completion.logprobs, completion.token_ids, strict=True)
                ],
                "num_cached_tokens": final.num_cached_tokens,
            }
        )
    with open(out_path, "w") as f:
        json.dump(
            {
                "outputs": results,
                "connector": ConnectorStatsRecorder.connector,
                "external_hit_tokens": ConnectorStatsRecorder.external_hit_tokens,
                "corrupted_batches": len(corrupted),
            },
            f,
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
