"""``kvrpc bench e2e``: time to first token on a real model, with and without a cache hit.

A ``transformers`` Llama with random weights (the 8B shape by default: 32 layers, hidden
4096, 32 heads, 8 KV heads, head dim 128, bfloat16) runs in this process through
:class:`~kvrpc.integrations.transformers.CachingEngine`, its paged KV cache shared with a
``kvrpc serve`` child by CUDA IPC. For each prompt length ``L`` (prefix ``L`` tokens, then a
64-token suffix), rounds interleave, each timed from the lookup to the first token on the
host:

* **miss**: a prompt never seen: a lookup that finds nothing, then the whole prefill;
* **hit**: the stored prefix with a new suffix: lookup, retrieve of the prefix's KV into
  fresh blocks, then the suffix's compute; **hit, layer-wise**: the same with the retrieve
  moving layer by layer, each layer's attention waiting only for its own layer;
* baselines of the same run: **transformers** (the model's own forward over the prompt, no
  kvrpc: the miss must not be slower), **suffix only** (the suffix over a prefix already in
  the engine's blocks: the compute a hit cannot avoid) and the **transfer bound** (the
  prefix's KV bytes over the pinned host-to-device rate measured here).

Then the **decode** figure: the step time of a request decoding while another request's
stores run back to back (a 16k-token prefix, 2 GiB in the 8B shape: the server gathering
from the same GPU), against idle steps.

Medians are reported with the spread (min, max) of the rounds; ``--plot`` draws TTFT
against prompt length (needs matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

import torch

from kvrpc.bench._child import default_url, kv_server_child
from kvrpc.bench.kv import goal, timed
from kvrpc.errors import KVError
from kvrpc.kv.client import LoadStoreOp
from kvrpc.kv.keys import hashes_from_tokens

__all__ = ["E2EBenchOptions", "ModelShape", "random_llama", "run_e2e_bench"]

_SUFFIX = 64
_BLOCK_SIZE = 16
_CHUNK_SIZE = 256
_GOALS = {"whole": 6.0, "layerwise": 10.0, "bound": 1.25, "decode": 1.05}


@dataclass(frozen=True)
class ModelShape:
    """A Llama's sizes; the default is the 8B shape."""

    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    intermediate: int = 14336
    vocab: int = 128256

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.hidden // self.heads

    def kv_bytes(self, tokens: int, itemsize: int) -> int:
        """Bytes of ``tokens`` tokens' keys and values over every layer."""
        return tokens * self.layers * 2 * self.kv_heads * self.head_dim * itemsize


#: The CPU smoke run's model: real compute, seconds not minutes.
TINY = ModelShape(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=256)


@dataclass(frozen=True)
class E2EBenchOptions:
    """The workload of ``kvrpc bench e2e``; see the module docstring."""

    lengths: tuple[int, ...] = (1024, 4096, 16384, 32768)
    rounds: int = 5
    shape: ModelShape = ModelShape()
    device: str = "cuda"
    decode_steps: int = 40
    plot: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> E2EBenchOptions:
        """The options of a parsed ``kvrpc bench e2e`` command line."""
        cpu = args.device == "cpu"
        quick = bool(args.quick)
        lengths = args.lengths or ((256, 512) if cpu else (1024, 4096) if quick else None)
        shape = TINY if cpu else ModelShape()
        if args.layers:
            shape = replace(shape, layers=args.layers)
        return cls(
            lengths=tuple(lengths) if lengths else cls.lengths,
            rounds=args.rounds or (2 if quick or cpu else 5),
            shape=shape,
            device=args.device,
            decode_steps=10 if quick or cpu else 40,
            plot=args.plot,
        )


def random_llama(shape: ModelShape, device: str, dtype: torch.dtype, max_tokens: int) -> Any:
    """A ``LlamaForCausalLM`` of ``shape`` with seeded random weights, made on ``device``."""
    import transformers

    library = cast(Any, transformers)
    config = library.LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_tokens,
    )
    torch.manual_seed(8)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in place, never first in float32 on the host
    try:
        with torch.device(device):
            model = library.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def _progress(text: str) -> None:
    print(f"[bench e2e] {text}", file=sys.stderr, flush=True)


def _spread(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in seconds]
    return {
        "median": round(statistics.median(ms), 2),
        "min": round(min(ms), 2),
        "max": round(max(ms), 2),
    }


def _pinned_rates(device: str, nbytes: int, rounds: int) -> tuple[float, float]:
    """Median pinned host-to-device and device-to-host rates (bytes/s) of ``nbytes``."""
    if device != "cuda":
        return math.nan, math.nan
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    gpu.copy_(host)
    h2d = [timed(lambda: gpu.copy_(host, non_blocking=True)) for _ in range(rounds)]
    d2h = [timed(lambda: host.copy_(gpu, non_blocking=True)) for _ in range(rounds)]
    return nbytes / statistics.median(h2d), nbytes / statistics.median(d2h)


def _transformers_prefill(model: Any, tokens: list[int], device: str) -> int:
    """The model's own forward over the prompt (no kvrpc, no paging): its greedy next token."""
    with torch.inference_mode():
        ids = torch.tensor([tokens], device=device)
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        return int(model.lm_head(hidden[:, -1:])[0, -1].argmax())


def run_e2e_bench(options: E2EBenchOptions) -> dict[str, Any]:
    """Take the figures (see the module docstring); ``KVError`` if a hit is not a hit."""
    from kvrpc.integrations.transformers import CachingEngine

    device = options.device
    if device == "cuda" and not torch.cuda.is_available():
        raise KVError("kvrpc bench e2e needs a CUDA GPU (or --device cpu for a smoke run)")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape, lengths = options.shape, sorted(options.lengths)
    longest = max(lengths) + 2 * _SUFFIX + options.decode_steps + 1024
    generator = torch.Generator().manual_seed(11)

    def fresh(count: int) -> list[int]:
        tokens: list[int] = torch.randint(0, shape.vocab, (count,), generator=generator).tolist()
        return tokens

    item = dtype.itemsize
    pool_bytes = sum(shape.kv_bytes(n, item) for n in lengths) + 3 * shape.kv_bytes(16384, item)
    num_blocks = -(-3 * longest // _BLOCK_SIZE)
    figures: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "model": (
            f"Llama {shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads, "
            f"{shape.kv_heads} KV heads, head dim {shape.head_dim}, {dtype}, random weights"
        ),
        "suffix_tokens": _SUFFIX,
        "rounds": options.rounds,
    }
    _progress(f"model: {figures['model']} on {device}")
    model = random_llama(shape, device, dtype, longest)
    h2d, d2h = _pinned_rates(device, 1 << 31, options.rounds)
    figures["pinned_h2d_gb_per_s"] = round(h2d / 1e9, 2)
    figures["pinned_d2h_gb_per_s"] = round(d2h / 1e9, 2)
    with (
        tempfile.TemporaryDirectory(prefix="kvrpc-bench-e2e-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        url = default_url(tmp)
        server_options = (
            "--chunk-size",
            str(_CHUNK_SIZE),
            "--cpu-buffer-size",
            f"{max(0.05, pool_bytes / (1 << 30)):.3f}",
        )
        child = stack.enter_context(kv_server_child(url, tmp, *server_options))
        _progress(f"server {child.pid}: {child.ready_line}")
        engine = stack.enter_context(
            CachingEngine(model, url, model_name="bench-e2e", num_blocks=num_blocks, timeout=120)
        )
        serial = iter(range(1 << 62))

        def rid(kind: str) -> str:
            return f"{kind}-{next(serial)}"

        # The decode figure stores a 16k-token request's KV (2 GiB in the 8B shape), or the
        # longest prompt's where there is none.
        source_length = 16384 if 16384 in lengths else lengths[-1]
        rows: dict[int, dict[str, list[float]]] = {}
        keep: dict[int, Any] = {}
        for length in lengths:
            prefix = fresh(length)
            warm = engine.prefill(rid("warm"), prefix + fresh(_SUFFIX))
            engine.wait_for_stores([warm.request_id])
            engine.release(warm)
            for layerwise in (False, True):  # untimed: the first transfers pay set-up costs
                first = engine.prefill(
                    rid("first"), prefix + fresh(_SUFFIX), layerwise=layerwise, store=False
                )
                if first.cached_tokens != length:
                    raise KVError(
                        f"the {length}-token prefix was not a hit ({first.cached_tokens})"
                    )
                engine.release(first)
            taken: dict[str, list[float]] = {
                k: [] for k in ("miss", "hit", "hit_layerwise", "suffix_only", "transformers")
            }
            for turn in range(options.rounds):
                _progress(f"{length} tokens: round {turn + 1}/{options.rounds}")
                miss = engine.prefill(rid("miss"), fresh(length + _SUFFIX), store=False)
                if miss.cached_tokens:
                    raise KVError("a fresh prompt hit the cache")
                taken["miss"].append(miss.seconds)
                engine.release(miss)
                for name, layerwise in (("hit", False), ("hit_layerwise", True)):
                    hit = engine.prefill(
                        rid(name), prefix + fresh(_SUFFIX), layerwise=layerwise, store=False
                    )
                    if hit.cached_tokens != length or hit.recomputed:
                        raise KVError(f"a {length}-token hit retrieved {hit.cached_tokens} tokens")
                    taken[name].append(hit.seconds)
                    if name == "hit":
                        taken["suffix_only"].append(_suffix_only(engine, hit, fresh(_SUFFIX)))
                    if length == source_length and name == "hit" and length not in keep:
                        keep[length] = hit  # the decode figure's store source
                    else:
                        engine.release(hit)
                prompt = fresh(length + _SUFFIX)
                start = time.perf_counter()  # the token read back synchronizes
                _transformers_prefill(model, prompt, device)
                taken["transformers"].append(time.perf_counter() - start)
            rows[length] = taken
        for length, taken in rows.items():
            spread = {name: _spread(seconds) for name, seconds in taken.items()}
            bound_ms = shape.kv_bytes(length, item) / h2d * 1e3
            figures[f"ttft_{length}"] = {
                **spread,
                "transfer_bound_ms": round(bound_ms, 2),
                "kv_bytes": shape.kv_bytes(length, item),
                "miss_to_hit": round(spread["miss"]["median"] / spread["hit"]["median"], 2),
                "miss_to_hit_layerwise": round(
                    spread["miss"]["median"] / spread["hit_layerwise"]["median"], 2
                ),
                "miss_to_transformers": round(
                    spread["miss"]["median"] / spread["transformers"]["median"], 3
                ),
                "hit_to_bound": round(
                    spread["hit"]["median"] / (bound_ms + spread["suffix_only"]["median"]), 3
                ),
            }
        figures.update(_decode_figures(engine, keep.get(source_length), options, fresh))
        for hit in keep.values():
            engine.release(hit)
    figures.update(_goals(figures))
    if options.plot:
        _plot(figures, lengths, options.plot)
        figures["plot"] = options.plot
    return figures


def _suffix_only(engine: Any, hit: Any, suffix: list[int]) -> float:
    """A suffix computed over a prefix already in ``hit``'s blocks, to its first token."""
    length = hit.cached_tokens

    def compute() -> int:
        return int(engine.runner.forward(suffix, length, hit.block_table)[-1].argmax())

    return timed(compute, cuda=engine.device.type == "cuda")


def _decode_figures(
    engine: Any, source: Any, options: E2EBenchOptions, fresh: Callable[[int], list[int]]
) -> dict[str, Any]:
    """Decode step times idle and while another request's stores run back to back."""
    if source is None:
        return {}
    request = engine.prefill("decode", fresh(1024), store=False)
    table, position = request.block_table, len(request.token_ids)
    token = [request.first_token]

    def step() -> tuple[float, float]:
        nonlocal position
        if position >= len(table) * engine.cache.block_size:
            table.extend(engine.cache.allocate(1))
        start = time.perf_counter()
        token[0] = int(engine.runner.forward([token[0]], position, table)[-1].argmax())
        position += 1
        return start, time.perf_counter()

    for _ in range(5):
        step()
    # Back to back, each of new tokens (so every chunk is copied). The hashes are an
    # engine's own work, done before it stores; here they are made first.
    chunk = engine.chunk_size
    phases = 3
    per_phase = max(4, options.decode_steps // phases)
    ops = [
        LoadStoreOp(
            source.block_table,
            chunk_hashes=hashes_from_tokens(fresh(source.cached_tokens), chunk),
        )
        for _ in range(per_phase * 2 * phases)
    ]
    unused = iter(ops)  # each op once: a store of chunks already there copies nothing
    stored_bytes = engine.worker.stats.stored_bytes
    idle: list[float] = []
    during: list[float] = []
    busy: list[tuple[float, float]] = []
    # Idle and busy phases alternate, so that a drift of the host's speed (decode here is
    # bound by kernel launches) lands on both sides.
    for phase in range(phases):
        idle.extend(end - start for start, end in (step() for _ in range(per_phase)))
        stop = threading.Event()
        spans: list[tuple[float, float]] = []

        def stores(
            spans: list[tuple[float, float]] = spans,
            stop: threading.Event = stop,
            phase: int = phase,
        ) -> None:
            for op in unused:
                if stop.is_set():
                    return
                request_id = f"background-{phase}-{len(spans)}"
                start = time.perf_counter()
                engine.worker.submit_store_request(request_id, op)
                engine.wait_for_stores([request_id], timeout=120)
                spans.append((start, time.perf_counter()))

        thread = threading.Thread(target=stores)
        thread.start()
        steps = [step() for _ in range(per_phase)]
        stop.set()
        thread.join()
        if not spans:
            raise KVError("no background store completed")
        # Steps inside the stores' span: between two stores the next is submitted at once.
        first, last = spans[0][0], spans[-1][1]
        during.extend(end - start for start, end in steps if first <= start and end <= last)
        busy.extend(spans)
    engine.release(request)
    moved = engine.worker.stats.stored_bytes - stored_bytes
    idle_ms, during_ms = _spread(idle), _spread(during) if during else {}
    ratio = during_ms["median"] / idle_ms["median"] if during else math.nan
    return {
        "decode_idle_step_ms": idle_ms,
        "decode_during_store_step_ms": during_ms,
        "decode_steps_during_stores": len(during),
        "decode_stores": len(busy),
        "decode_store_bytes_each": moved // len(busy),
        "decode_store_ms": _spread([end - start for start, end in busy]),
        "decode_during_store_to_idle": round(ratio, 3),
    }


def _goals(figures: dict[str, Any]) -> dict[str, str]:
    """The issue's goals, from the 16k-token row and the decode figure, where present."""
    out: dict[str, str] = {}
    row = figures.get("ttft_16384")
    if row is not None:
        out["goal_whole"] = goal(
            row["miss_to_hit"] >= _GOALS["whole"],
            f"TTFT miss / hit at 16k, whole retrieve >= {_GOALS['whole']:g}",
        )
        out["goal_layerwise"] = goal(
            row["miss_to_hit_layerwise"] >= _GOALS["layerwise"],
            f"TTFT miss / hit at 16k, layer-wise retrieve >= {_GOALS['layerwise']:g}",
        )
        out["goal_bound"] = goal(
            row["hit_to_bound"] <= _GOALS["bound"],
            f"TTFT hit / (KV bytes / pinned H2D + suffix compute) <= {_GOALS['bound']:g}",
        )
    ratio = figures.get("decode_during_store_to_idle")
    if ratio is not None:
        out["goal_decode"] = goal(
            ratio <= _GOALS["decode"],
            f"decode step while a store runs / idle step <= {_GOALS['decode']:g}",
        )
    return out


def _plot(figures: dict[str, Any], lengths: list[int], path: str) -> None:
    """TTFT against prompt length: miss, hit (whole and layer-wise), the transfer bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [figures[f"ttft_{n}"] for n in lengths]
    figure, axes = cast(Any, plt).subplots(figsize=(7, 4.5))
    for name, label, style in (
        ("miss", "miss (full prefill)", "o-"),
        ("hit", "hit, whole retrieve", "s-"),
        ("hit_layerwise", "hit, layer-wise retrieve", "^-"),
        ("suffix_only", "suffix compute only", "x:"),
    ):
        medians = [row[name]["median"] for row in rows]
        low = [m - row[name]["min"] for m, row in zip(medians, rows, strict=True)]
        high = [row[name]["max"] - m for m, row in zip(medians, rows, strict=True)]
        axes.errorbar(lengths, medians, yerr=[low, high], fmt=style, capsize=3, label=label)
    bound = [row["transfer_bound_ms"] for row in rows]
    axes.plot(lengths, bound, "k--", label="transfer bound (KV bytes / pinned H2D)")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks(lengths, [f"{n // 1024}k" for n in lengths])
    axes.set_xlabel(f"cached prefix (tokens), plus a {figures['suffix_tokens']}-token suffix")
    axes.set_ylabel("time to first token (ms)")
    axes.set_title(f"kvrpc TTFT, {figures['device']}", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
