"""``kvrpc bench gpu``: the GPU path's figures, each against a baseline of the same run.

* **transfer**: a ``cuda_ipc`` worker (this process) stores a batch of chunks from its paged
  GPU KV cache into a ``kvrpc serve`` child and retrieves it into other blocks, timed from
  submit to ``get_finished``; against a plain pinned device-to-host (and host-to-device)
  copy of the same number of bytes, one contiguous ``copy_``. Rounds interleave the four.
* **first transfer**: the first store and the first retrieve after registration, timed
  apart from those warm rounds against the same pinned copies (``first_store_ratio``,
  ``first_retrieve_ratio``), with the server's longest event-loop stall during each: what
  an engine's first request sees of whatever a copy pays once. The registration's own time
  and stall come with them (``register_ms``, ``register_loop_lag_max_us``).
* **stall**: while stores run back to back, the server's event-loop lag (``--loop-probe``:
  how late a callback handed to the loop from another thread runs) and the ``rpc.ping``
  round trip of a second client, against the same ping with the server idle.
* **duplex**: a store and a retrieve of a batch each, submitted together (PCIe is full
  duplex: the copy engine runs them on two lanes at once), against a pinned D2H and a pinned
  H2D run at once on two streams.
* **first layer**: a layer-wise retrieve of the batch (its chunk hashes given, as a
  scheduler hands them over), timed on the worker's host from the submit to the server's
  stamp saying layer 0's copy is enqueued (``first_layer_enqueued_ms``; goal under 1 ms),
  to layer 0 in its blocks, and to the whole retrieve.
* **memory**: the server's peak GPU allocation (its copy engine's staging and temporaries)
  against one batch's bytes.
* **checksums**: the store with checksums (the copy engine folds every chunk on the GPU
  beside its copy) against the same store on a second ``kvrpc serve --no-checksums`` child
  that the worker registered with too, rounds alternating between the two: the overhead of
  the median store time and of the engine's GPU time (goal: below 3%).
* **store paths**: the store through the gather kernels against the store through DMA alone
  (``kvrpc serve --store-copies``: the main server's setting, and a third child with the
  other), rounds alternating, on blocks in runs of a chunk each (random chunks) so that
  the DMA path applies; with the driver calls it took and the batches it handed to the
  kernels (``store_path_dma_fallbacks``, 0 unless the plan was too fragmented).

Default workload (the issue's): 32 layers of ``[2, 4000, 16, 8, 128]`` bfloat16, chunks of
256 tokens (16 blocks), 64 chunks a batch (2 GiB), block ids drawn at random (``--block-runs
N``: in random runs of N consecutive blocks), stores through the kernels (``--store-copies
dma``: through DMA, where the block table allows).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch

from kvrpc.bench._child import default_url, kv_server_child
from kvrpc.bench.kv import figure_url, goal, timed, wait_finished
from kvrpc.client import SyncClient
from kvrpc.errors import KVError
from kvrpc.kv import protocols
from kvrpc.kv.client import LoadStoreOp, WorkerAdapter
from kvrpc.kv.keys import hashes_from_tokens
from kvrpc.kv.layout import KVLayout
from kvrpc.progress import Progress
from kvrpc.protocol import PING

__all__ = ["GPUBenchOptions", "block_order", "first_transfer_figures", "run_gpu_bench"]

_T = TypeVar("_T")

_MODEL = "kvrpc-bench-gpu"
_BLOCK_SIZE = 16
_CHUNK_SIZE = 256
_TRANSFER_GOAL = 0.95
_FIRST_GOAL = 0.9
_STALL_GOAL_US = 1000
_PING_GOAL = 2.0
_MEMORY_GOAL = 2.0
_DUPLEX_GOAL = 0.95  # a store and a retrieve at once / a pinned D2H and H2D at once
_FIRST_LAYER_GOAL_MS = 1.0
_CHECKSUM_GOAL = 0.03  # store time with checksums / without, minus 1, at most


@dataclass(frozen=True)
class GPUBenchOptions:
    """The workload of ``kvrpc bench gpu``; see the module docstring for the defaults."""

    url: str | None = None
    layers: int = 32
    blocks: int = 4000
    heads: int = 8
    head_dim: int = 64 * 2
    chunks: int = 64
    rounds: int = 5
    storm: int = 6
    pings: int = 2000
    group_mib: int = 256
    store_copies: str = "kernels"
    block_runs: int = 1

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> GPUBenchOptions:
        """The options of a parsed ``kvrpc bench gpu`` command line."""
        quick = bool(args.quick)
        return cls(
            url=args.url,
            layers=args.layers or (4 if quick else 32),
            blocks=args.blocks or (1024 if quick else 4000),
            heads=args.heads,
            head_dim=args.head_dim,
            chunks=args.chunks or (8 if quick else 64),
            rounds=args.rounds or (2 if quick else 5),
            storm=2 if quick else 6,
            pings=200 if quick else 2000,
            group_mib=args.group_mib,
            store_copies=args.store_copies,
            block_runs=args.block_runs,
        )


def block_order(blocks: int, run: int, seed: int) -> list[int]:
    """Block ids ``0 .. blocks - 1`` in random runs of ``run`` ascending consecutive ids.

    The runs start at multiples of ``run`` (a last, shorter run holds the remainder), in an
    order drawn from ``seed``: ``run`` 1 is a plain random permutation.
    """
    starts = torch.randperm(-(-blocks // run), generator=torch.Generator().manual_seed(seed))
    return [b for s in starts.tolist() for b in range(s * run, min(blocks, (s + 1) * run))]


def _timed_copy(dst: torch.Tensor, src: torch.Tensor) -> float:
    return timed(lambda: dst.copy_(src, non_blocking=True))


# On a terminal, a status line rewritten in place; piped, nothing (see kvrpc.progress).
_progress = Progress("bench gpu")


@_progress.closing
def run_gpu_bench(options: GPUBenchOptions) -> dict[str, Any]:
    """Take the GPU figures; raises :class:`KVError` if a store or retrieve misbehaves."""
    if not torch.cuda.is_available():
        raise KVError("kvrpc bench gpu needs a CUDA GPU; this process sees none")
    shape = (2, options.blocks, _BLOCK_SIZE, options.heads, options.head_dim)
    per_chunk = _CHUNK_SIZE // _BLOCK_SIZE
    if 2 * options.chunks * per_chunk > options.blocks:
        raise KVError(
            f"{options.chunks} chunks twice over need {2 * options.chunks * per_chunk} "
            f"blocks; the cache has {options.blocks}"
        )
    layers = [
        torch.empty(shape, dtype=torch.bfloat16, device="cuda") for _ in range(options.layers)
    ]
    generator = torch.Generator(device="cuda").manual_seed(5)
    for layer in layers:
        layer.view(torch.uint8).random_(generator=generator)
    layout = KVLayout.from_tensors(layers)
    chunk_nbytes = layout.chunk_nbytes(per_chunk)
    nbytes = options.chunks * chunk_nbytes
    order = block_order(options.blocks, options.block_runs, seed=6)
    moved = options.chunks * per_chunk
    store_ids, retrieve_ids = order[:moved], order[moved : 2 * moved]
    tokens = torch.randint(0, 32000, (options.chunks * _CHUNK_SIZE,)).tolist()
    device_name = torch.cuda.get_device_name()
    figures: dict[str, Any] = {
        "device": device_name,
        "layout": layout.describe(),
        "chunks": options.chunks,
        "batch_bytes": nbytes,
        "store_copies": options.store_copies,
        "block_runs": options.block_runs,
    }
    pool_gib = max(1.0, 2.25 * nbytes / (1 << 30))  # two batches: the duplex figure
    with (
        tempfile.TemporaryDirectory(prefix="kvrpc-bench-gpu-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        url = options.url or default_url(tmp)
        figures["url"] = url
        server_options = (
            "--chunk-size",
            str(_CHUNK_SIZE),
            "--cpu-buffer-size",
            f"{pool_gib:.3f}",
            "--loop-probe",
            "--cuda-group-mib",
            str(options.group_mib),
        )
        child = stack.enter_context(
            kv_server_child(url, tmp, *server_options, "--store-copies", options.store_copies)
        )
        _progress(f"server {child.pid}: {child.ready_line}")
        client = stack.enter_context(SyncClient(url, registry=protocols.kv_registry(), timeout=300))
        worker = stack.enter_context(WorkerAdapter(url, _MODEL, 1, 0, _BLOCK_SIZE))
        # Registration maps the layers and (where the server warms its copy engine up)
        # pays the first copy's one-time costs: its time and the loop's longest stall.
        client.call(protocols.STATS)
        started = time.perf_counter()
        worker.register_kv_caches({f"layer.{i}": t for i, t in enumerate(layers)})
        figures["register_ms"] = round((time.perf_counter() - started) * 1e3, 2)
        lag = client.call(protocols.STATS)
        figures["register_loop_lag_max_us"] = int(lag.get("loop_lag_max_us", 0))
        store_op, retrieve_op = LoadStoreOp(store_ids, tokens), LoadStoreOp(retrieve_ids, tokens)
        gpu = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        serial = iter(range(1 << 62))

        def storer(
            worker: WorkerAdapter, client: SyncClient, op: LoadStoreOp | None = None
        ) -> Callable[..., Any]:
            def store(check: bool = True) -> tuple[float, dict[str, Any]]:
                request_id = f"store-{next(serial)}"
                torch.cuda.synchronize()
                start = time.perf_counter()
                worker.submit_store_request(request_id, store_op if op is None else op)
                wait_finished(worker, request_id, store=True, poll=0.0001)
                elapsed = time.perf_counter() - start
                stats: dict[str, Any] = {}
                if check:  # not during the stall figure: kv.stats restarts the lag sample
                    stats = client.call(protocols.STATS)
                    if stats["chunks"] != options.chunks:
                        raise KVError(f"a store of {options.chunks} chunks left {stats['chunks']}")
                return elapsed, stats

            return store

        store = storer(worker, client)

        def retrieve() -> tuple[float, dict[str, Any]]:
            request_id = f"retrieve-{next(serial)}"
            start = time.perf_counter()
            worker.submit_retrieve_request(request_id, retrieve_op)
            wait_finished(worker, request_id, store=False, poll=0.0001)
            elapsed = time.perf_counter() - start
            if worker.get_block_ids_with_load_errors():
                raise KVError("a retrieve could not fill every block")
            stats = client.call(protocols.STATS)
            client.call(protocols.CLEAR)
            return elapsed, stats

        def fresh_retrieve() -> tuple[float, dict[str, Any]]:
            client.call(protocols.STATS)  # the loop-lag sample starts here
            return retrieve()

        _progress(
            f"transfer: {options.chunks} chunks of {chunk_nbytes >> 20} MiB "
            f"({layout.describe()}), {nbytes / 1e9:.2f} GB a batch, on {device_name}"
        )
        # The first store and retrieve after registration, apart from the warm rounds:
        # whatever a copy pays once shows here. kv.stats returns the loop-lag samples since
        # the last kv.stats, so one just before each and the one each takes after it cover
        # that copy alone. The retrieve is checked byte for byte.
        client.call(protocols.STATS)
        first_store = store()
        first_retrieve = _check_retrieve(layers, store_ids, retrieve_ids, fresh_retrieve)
        _timed_copy(host, gpu)
        _timed_copy(gpu, host)
        taken: dict[str, list[float]] = {"store": [], "d2h": [], "retrieve": [], "h2d": []}
        gpu_seconds: dict[str, list[float]] = {"store": [], "retrieve": []}
        handler_seconds: dict[str, list[float]] = {"store": [], "retrieve": []}

        def record(name: str, result: tuple[float, dict[str, Any]]) -> None:
            elapsed, stats = result
            taken[name].append(elapsed)
            gpu_seconds[name].append(stats["cuda_last_batch_gpu_us"] / 1e6)
            handler_seconds[name].append(stats["cuda_last_handler_us"] / 1e6)

        for turn in range(options.rounds):
            _progress(f"round {turn + 1}/{options.rounds}")
            taken["d2h"].append(_timed_copy(host, gpu))
            record("store", store())
            taken["h2d"].append(_timed_copy(gpu, host))
            record("retrieve", retrieve())
        for name, seconds in taken.items():
            median = statistics.median(seconds)
            figures[f"{name}_ms"] = round(median * 1e3, 2)
            figures[f"{name}_gb_per_s"] = round(nbytes / median / 1e9, 2)
        for name, seconds in gpu_seconds.items():  # the copy engine's own GPU time
            figures[f"{name}_engine_gpu_ms"] = round(statistics.median(seconds) * 1e3, 2)
        # The server's handler, start to reply: the reply goes once the copy is enqueued.
        for name, seconds in handler_seconds.items():
            figures[f"{name}_handler_ms"] = round(statistics.median(seconds) * 1e3, 2)
        store_ratio = figures["store_gb_per_s"] / figures["d2h_gb_per_s"]
        retrieve_ratio = figures["retrieve_gb_per_s"] / figures["h2d_gb_per_s"]
        figures["store_to_d2h_ratio"] = round(store_ratio, 3)
        figures["retrieve_to_h2d_ratio"] = round(retrieve_ratio, 3)
        # Each round's own ratio (its copy against the pinned copy just before it): the
        # spread a caller running the bench several times compares against the goal.
        figures["store_to_d2h_ratio_spread"] = _spread(taken["d2h"], taken["store"])
        figures["retrieve_to_h2d_ratio_spread"] = _spread(taken["h2d"], taken["retrieve"])
        figures["transfer_goal"] = goal(
            min(store_ratio, retrieve_ratio) >= _TRANSFER_GOAL,
            f"store and retrieve each >= {_TRANSFER_GOAL:g}x a pinned copy of the same bytes",
        )
        figures.update(
            first_transfer_figures(
                first_store,
                first_retrieve,
                statistics.median(taken["d2h"]),
                statistics.median(taken["h2d"]),
            )
        )
        figures.update(
            _duplex(options, worker, client, store_ids, retrieve_ids, tokens, nbytes, figures)
        )
        figures.update(_stall(options, url, client, store))
        figures.update(_first_layer(options, worker, client, store, retrieve_ids, tokens))
        client.call(protocols.CLEAR)
        off_url = figure_url(url, 1)
        same_path = ("--store-copies", options.store_copies)
        stack.enter_context(
            kv_server_child(off_url, tmp, *server_options, *same_path, "--no-checksums")
        )
        off_client = stack.enter_context(
            SyncClient(off_url, registry=protocols.kv_registry(), timeout=300)
        )
        off_worker = stack.enter_context(WorkerAdapter(off_url, _MODEL, 1, 0, _BLOCK_SIZE))
        off_worker.register_kv_caches({f"layer.{i}": t for i, t in enumerate(layers)})
        figures.update(
            _checksum_cost(options, (store, client), (storer(off_worker, off_client), off_client))
        )
        # The other store path, on a third child, against this server's: on blocks in runs
        # of a chunk each (chunks in random order), which the DMA path copies a run at once.
        other = "dma" if options.store_copies == "kernels" else "kernels"
        other_url = figure_url(url, 2)
        stack.enter_context(
            kv_server_child(other_url, tmp, *server_options, "--store-copies", other)
        )
        other_client = stack.enter_context(
            SyncClient(other_url, registry=protocols.kv_registry(), timeout=300)
        )
        other_worker = stack.enter_context(WorkerAdapter(other_url, _MODEL, 1, 0, _BLOCK_SIZE))
        other_worker.register_kv_caches({f"layer.{i}": t for i, t in enumerate(layers)})
        runs_op = LoadStoreOp(block_order(options.blocks, per_chunk, seed=7)[:moved], tokens)
        paths = {
            options.store_copies: (storer(worker, client, runs_op), client),
            other: (storer(other_worker, other_client, runs_op), other_client),
        }
        figures.update(_store_paths(options, paths, nbytes, figures["d2h_gb_per_s"]))
        stats = client.call(protocols.STATS)
        peak = int(stats.get("cuda_peak_allocated_bytes", 0))
        figures["engine_staging_bytes"] = int(stats.get("cuda_staging_bytes", 0))
        # Which path the main server's stores took, over the whole run (all of its figures).
        figures["engine_dma_stores"] = int(stats.get("cuda_dma_stores", 0))
        figures["engine_dma_store_fallbacks"] = int(stats.get("cuda_dma_store_fallbacks", 0))
        figures["engine_peak_gpu_bytes"] = peak
        figures["engine_peak_to_batch"] = round(peak / nbytes, 3)
        figures["memory_goal"] = goal(
            peak <= _MEMORY_GOAL * nbytes, f"copy engine GPU memory <= {_MEMORY_GOAL:g}x a batch"
        )
    return figures


def first_transfer_figures(
    store: tuple[float, dict[str, Any]],
    retrieve: tuple[float, dict[str, Any]],
    d2h_seconds: float,
    h2d_seconds: float,
) -> dict[str, Any]:
    """The first store's and retrieve's figures, against the warm pinned copies' medians.

    ``store`` and ``retrieve`` are each (seconds, the ``kv.stats`` taken just after it, whose
    loop-lag figures cover that copy alone); ``d2h_seconds`` and ``h2d_seconds`` are the
    pinned copies of the same bytes, measured in the same run.
    """
    figures: dict[str, Any] = {}
    lags = []
    for name, (seconds, stats), pinned in (
        ("store", store, d2h_seconds),
        ("retrieve", retrieve, h2d_seconds),
    ):
        figures[f"first_{name}_ms"] = round(seconds * 1e3, 2)
        figures[f"first_{name}_ratio"] = round(pinned / seconds, 3)
        figures[f"first_{name}_engine_gpu_ms"] = round(
            stats.get("cuda_last_batch_gpu_us", 0) / 1e3, 2
        )
        figures[f"first_{name}_handler_ms"] = round(stats.get("cuda_last_handler_us", 0) / 1e3, 2)
        lag = int(stats.get("loop_lag_max_us", 0))
        figures[f"first_{name}_loop_lag_max_us"] = lag
        figures[f"first_{name}_loop_lag_samples"] = int(stats.get("loop_lag_samples", 0))
        # A collection stops the loop too: beside a long stall, says whether it was the GC's.
        figures[f"first_{name}_gc_pause_max_us"] = int(stats.get("gc_pause_max_us", 0))
        lags.append(lag)
    ratio = min(figures["first_store_ratio"], figures["first_retrieve_ratio"])
    figures["first_transfer_goal"] = goal(
        ratio >= _FIRST_GOAL,
        f"first store and first retrieve after registration each >= {_FIRST_GOAL:g}x a "
        "pinned copy of the same bytes",
    )
    figures["first_stall_goal"] = goal(
        max(lags) < _STALL_GOAL_US,
        f"longest loop stall during the first store and the first retrieve < {_STALL_GOAL_US} us",
    )
    return figures


def _checksum_cost(
    options: GPUBenchOptions,
    with_sums: tuple[Callable[..., Any], SyncClient],
    without: tuple[Callable[..., Any], SyncClient],
) -> dict[str, Any]:
    """The store with checksums against the store without, rounds alternating.

    Each side is (its store, a client of its server); every store is cleared after, so the
    next one stores the batch afresh. The first store of the server without checksums
    (its warm-up) is not timed.
    """
    without[0]()
    without[1].call(protocols.CLEAR)
    taken: dict[str, list[float]] = {"on": [], "off": []}
    engine: dict[str, list[float]] = {"on": [], "off": []}
    for turn in range(options.rounds):
        _progress(f"checksums: round {turn + 1}/{options.rounds}")
        for name, (store, client) in (("on", with_sums), ("off", without)):
            elapsed, stats = store()
            client.call(protocols.CLEAR)
            taken[name].append(elapsed)
            engine[name].append(stats["cuda_last_batch_gpu_us"] / 1e6)
    on, off = statistics.median(taken["on"]), statistics.median(taken["off"])
    on_gpu, off_gpu = statistics.median(engine["on"]), statistics.median(engine["off"])
    overhead = on / off - 1
    return {
        "store_checksums_on_ms": round(on * 1e3, 2),
        "store_checksums_off_ms": round(off * 1e3, 2),
        "store_checksum_overhead": round(overhead, 4),
        "store_engine_gpu_checksums_on_ms": round(on_gpu * 1e3, 2),
        "store_engine_gpu_checksums_off_ms": round(off_gpu * 1e3, 2),
        "store_engine_gpu_checksum_overhead": round(on_gpu / off_gpu - 1, 4),
        "checksum_goal": goal(
            overhead < _CHECKSUM_GOAL,
            f"store with checksums < {1 + _CHECKSUM_GOAL:g}x the store without",
        ),
    }


def _store_paths(
    options: GPUBenchOptions,
    paths: dict[str, tuple[Callable[..., Any], SyncClient]],
    nbytes: int,
    d2h_gb_per_s: float,
) -> dict[str, Any]:
    """The store through the kernels against the store through DMA, rounds alternating.

    ``paths`` maps each ``--store-copies`` value to a store on a server of that setting and
    a client of it; every store is cleared after it. Each server's first store of these
    blocks is not timed (the DMA side's first plan, the kernel side's first use of them).
    """
    for store, client in paths.values():
        store()
        client.call(protocols.CLEAR)
    taken: dict[str, list[float]] = {name: [] for name in paths}
    engine: dict[str, list[float]] = {name: [] for name in paths}
    last: dict[str, dict[str, Any]] = {}
    for turn in range(options.rounds):
        _progress(f"store paths: round {turn + 1}/{options.rounds}")
        for name, (store, client) in sorted(paths.items()):
            elapsed, stats = store()
            client.call(protocols.CLEAR)
            taken[name].append(elapsed)
            engine[name].append(stats["cuda_last_batch_gpu_us"] / 1e6)
            last[name] = stats
    figures: dict[str, Any] = {}
    for name in sorted(paths):
        median = statistics.median(taken[name])
        figures[f"store_path_{name}_ms"] = round(median * 1e3, 2)
        figures[f"store_path_{name}_gb_per_s"] = round(nbytes / median / 1e9, 2)
        figures[f"store_path_{name}_to_d2h"] = round(nbytes / median / 1e9 / d2h_gb_per_s, 3)
        figures[f"store_path_{name}_engine_gpu_ms"] = round(
            statistics.median(engine[name]) * 1e3, 2
        )
    dma = last.get("dma", {})
    figures["store_path_dma_stores"] = int(dma.get("cuda_dma_stores", 0))
    figures["store_path_dma_fallbacks"] = int(dma.get("cuda_dma_store_fallbacks", 0))
    figures["store_path_dma_copies"] = int(dma.get("cuda_dma_copies", 0))
    if "dma" in paths and "kernels" in paths:
        ratio = statistics.median(taken["dma"]) / statistics.median(taken["kernels"])
        figures["store_path_dma_to_kernels"] = round(ratio, 3)
    return figures


def _spread(pinned: list[float], taken: list[float]) -> list[float]:
    """[min, max] over the rounds of each round's pinned copy time over its own copy's."""
    ratios = [p / t for p, t in zip(pinned, taken, strict=True)]
    return [round(min(ratios), 3), round(max(ratios), 3)]


def _both_ways(nbytes: int, rounds: int) -> float:
    """Median seconds of a pinned D2H and a pinned H2D of ``nbytes`` each, run at once."""
    up = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    down = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    streams = [cast(Any, torch.cuda).Stream(), cast(Any, torch.cuda).Stream()]
    taken = []
    for _ in range(rounds + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.cuda.stream(streams[0]):
            down.copy_(a, non_blocking=True)
        with torch.cuda.stream(streams[1]):
            b.copy_(up, non_blocking=True)
        torch.cuda.synchronize()
        taken.append(time.perf_counter() - start)
    return statistics.median(taken[1:])


def _duplex(
    options: GPUBenchOptions,
    worker: WorkerAdapter,
    client: SyncClient,
    store_ids: list[int],
    retrieve_ids: list[int],
    tokens: list[int],
    nbytes: int,
    figures: dict[str, Any],
) -> dict[str, Any]:
    """A store and a retrieve of a batch each, submitted together, against pinned both ways.

    The retrieve's chunks are stored first; the store's are new each round, so both move
    every byte.
    """
    taken = []
    for turn in range(options.rounds + 1):  # the first round is a warm-up
        client.call(protocols.CLEAR)
        worker.submit_store_request(f"duplex-base-{turn}", LoadStoreOp(store_ids, tokens))
        wait_finished(worker, f"duplex-base-{turn}", store=True, poll=0.0001)
        generator = torch.Generator().manual_seed(100 + turn)
        other = torch.randint(0, 32000, (len(tokens),), generator=generator).tolist()
        torch.cuda.synchronize()
        start = time.perf_counter()
        worker.submit_store_request(f"duplex-s-{turn}", LoadStoreOp(store_ids, other))
        worker.submit_retrieve_request(f"duplex-r-{turn}", LoadStoreOp(retrieve_ids, tokens))
        wait_finished(worker, f"duplex-r-{turn}", store=False, poll=0.0001)
        wait_finished(worker, f"duplex-s-{turn}", store=True, poll=0.0001)
        taken.append(time.perf_counter() - start)
        if worker.get_block_ids_with_load_errors():
            raise KVError("a retrieve beside a store could not fill every block")
        stats = client.call(protocols.STATS)
        if stats["chunks"] != 2 * options.chunks:
            raise KVError(f"a store beside a retrieve left {stats['chunks']} chunks")
    client.call(protocols.CLEAR)
    duplex = statistics.median(taken[1:])
    both = _both_ways(nbytes, options.rounds)
    one_way = max(figures["d2h_gb_per_s"], figures["h2d_gb_per_s"])
    rate = 2 * nbytes / duplex / 1e9
    ratio = rate / one_way
    return {
        "duplex_ms": round(duplex * 1e3, 2),
        "duplex_spread_ms": [round(min(taken[1:]) * 1e3, 2), round(max(taken[1:]) * 1e3, 2)],
        "duplex_gb_per_s": round(rate, 2),
        "pinned_both_ways_ms": round(both * 1e3, 2),
        "pinned_both_ways_gb_per_s": round(2 * nbytes / both / 1e9, 2),
        "duplex_to_one_way": round(ratio, 3),
        "duplex_to_pinned_both_ways": round(both / duplex, 3),
        "duplex_goal": goal(
            both / duplex >= _DUPLEX_GOAL,
            f"a store and a retrieve at once >= {_DUPLEX_GOAL:g}x a pinned D2H and H2D at once",
        ),
    }


def _first_layer(
    options: GPUBenchOptions,
    worker: WorkerAdapter,
    client: SyncClient,
    store: Callable[..., tuple[float, dict[str, Any]]],
    retrieve_ids: list[int],
    tokens: list[int],
) -> dict[str, Any]:
    """A layer-wise retrieve's host time to its first layer, round by round.

    Each round stores the batch, then retrieves it layer-wise with the chunk hashes given
    (hashed once, as an engine's scheduler has them) and times, from the submit: the
    server's stamp that layer 0's copy is enqueued, layer 0 in its blocks, and the whole
    retrieve settled. The stamp is polled every few microseconds, sleeping between polls:
    a loop that never lets go of the GIL would starve the client's own thread, which reads
    the reply (by up to the interpreter's 5 ms switch interval a hand-over).
    """
    hashes = hashes_from_tokens(tokens, _CHUNK_SIZE)
    op = LoadStoreOp(retrieve_ids, chunk_hashes=hashes)
    enqueued, first, whole = [], [], []
    for turn in range(options.rounds + 1):  # the first round is a warm-up
        _progress(f"first layer: round {turn + 1}/{options.rounds + 1}")
        client.call(protocols.CLEAR)
        store()
        request_id = f"layers-{turn}"
        start = time.perf_counter()
        progress = worker.submit_retrieve_request(request_id, op, layerwise=True)
        while not progress.layer_enqueued(0):
            # Let go of the GIL: this process's client thread must read the reply first.
            time.sleep(5e-6)
        at_enqueued = time.perf_counter()
        if not progress.wait_layer(0, timeout=60):
            raise KVError("a layer-wise retrieve's first layer did not arrive")
        at_first = time.perf_counter()
        if not progress.wait(60):
            raise KVError("a layer-wise retrieve could not fill every block")
        at_whole = time.perf_counter()
        wait_finished(worker, request_id, store=False, poll=0.0001)
        if turn:
            enqueued.append(at_enqueued - start)
            first.append(at_first - start)
            whole.append(at_whole - start)
    client.call(protocols.CLEAR)

    def ms(seconds: list[float]) -> dict[str, Any]:
        return {
            "p50": round(statistics.median(seconds) * 1e3, 3),
            "spread": [round(min(seconds) * 1e3, 3), round(max(seconds) * 1e3, 3)],
        }

    median = statistics.median(enqueued) * 1e3
    return {
        "first_layer_enqueued_ms": ms(enqueued),
        "first_layer_in_blocks_ms": ms(first),
        "layerwise_retrieve_ms": ms(whole),
        "first_layer_goal": goal(
            median < _FIRST_LAYER_GOAL_MS,
            f"host time from a layer-wise retrieve's submit to layer 0's copy enqueued "
            f"< {_FIRST_LAYER_GOAL_MS:g} ms",
        ),
    }


def _check_retrieve(
    layers: list[torch.Tensor], stored: list[int], into: list[int], retrieve: Callable[[], _T]
) -> _T:
    """Retrieve once; every retrieved block must equal the block it was stored from.

    Returns what ``retrieve()`` returned.
    """
    a, b = torch.tensor(stored, device="cuda"), torch.tensor(into, device="cuda")

    def same() -> bool:
        return all(
            torch.equal(
                t.view(torch.uint8).index_select(1, a), t.view(torch.uint8).index_select(1, b)
            )
            for t in layers
        )

    if same():
        raise KVError("stored and target blocks already hold the same bytes")
    result = retrieve()
    if not same():
        raise KVError("the retrieved blocks do not hold the bytes that were stored")
    return result


def _stall(options: GPUBenchOptions, url: str, client: SyncClient, store: Any) -> dict[str, Any]:
    """Ping p50 idle and during back-to-back stores; the server's loop lag during them."""
    with SyncClient(url, timeout=30) as pinger:

        def pings(count: int | None, stop: threading.Event | None) -> list[float]:
            taken: list[float] = []
            while (count is None or len(taken) < count) and not (stop and stop.is_set()):
                start = time.perf_counter()
                pinger.call(PING)
                taken.append(time.perf_counter() - start)
            return taken

        pings(100, None)
        idle = pings(options.pings, None)
        client.call(protocols.STATS)  # starts the loop-lag sample afresh
        time.sleep(1.0)
        idle_lag = client.call(protocols.STATS)
        stop = threading.Event()
        during: list[float] = []
        thread = threading.Thread(target=lambda: during.extend(pings(None, stop)))
        _progress(f"stall: {options.storm} stores back to back while a client pings")
        client.call(protocols.STATS)
        thread.start()
        for _ in range(options.storm):
            store(check=False)
            client.call(protocols.CLEAR)
        stop.set()
        thread.join()
        storm_lag = client.call(protocols.STATS)
    idle_p50 = statistics.median(idle)
    storm_p50 = statistics.median(during) if during else float("nan")
    longest = int(storm_lag.get("loop_lag_max_us", 0))
    return {
        "ping_idle_p50_us": round(idle_p50 * 1e6, 1),
        "ping_storm_p50_us": round(storm_p50 * 1e6, 1),
        "ping_storm_pings": len(during),
        "ping_storm_to_idle": round(storm_p50 / idle_p50, 2),
        "loop_lag_idle_p99_us": int(idle_lag.get("loop_lag_p99_us", 0)),
        "loop_lag_idle_max_us": int(idle_lag.get("loop_lag_max_us", 0)),
        "loop_lag_storm_p50_us": int(storm_lag.get("loop_lag_p50_us", 0)),
        "loop_lag_storm_p99_us": int(storm_lag.get("loop_lag_p99_us", 0)),
        "loop_lag_storm_max_us": longest,
        "loop_lag_storm_samples": int(storm_lag.get("loop_lag_samples", 0)),
        "stall_goal": goal(
            longest < _STALL_GOAL_US and storm_p50 <= _PING_GOAL * idle_p50,
            f"longest loop stall < {_STALL_GOAL_US} us and ping p50 <= {_PING_GOAL:g}x idle",
        ),
    }
