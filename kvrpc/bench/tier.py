"""``kvrpc bench tier``: the Redis tier's figures, each beside its baseline of the same run.

Three figures (``--only`` picks some):

- **prefetch**: how fast the tier fetches chunks, beside plain redis-py. The same chunks are
  written once; then rounds alternate between the readers, each fetching every chunk
  with the same parallelism (all chunks at once, one pipeline each), after an untimed round
  each that opens their connections:

  - *kvrpc*: :class:`~kvrpc.kv.server.tiers.redistier.RedisTier`, as a prefetch job uses
    it: one round trip for the headers, then each chunk's parts received straight into its
    slot (direct reads) and checked against lengths and CRC;
  - *kvrpc via redis-py*: the same tier with ``direct_reads`` off (as a ``rediss://`` tier
    reads): parts through redis-py, copied into the slot, then checked;
  - *baseline*: redis-py's asyncio client with hiredis, the fastest plain use of it: a
    pipeline of GETs per chunk over the same keys, the bytes left where redis-py put them.

  Reported per round as GB/s, with the median ratio. Goal: at least 1.
- **lookup**: a scheduler's lookup of a 32k-token prompt that L1 holds whole, on a
  ``kvrpc serve`` with a Redis tier and on one without, the two taking turns (the lookup of
  ``kvrpc bench kv``). Goal: p50 with / p50 without at most 1.1.
- **outage**: a server's resident memory while Redis is down and a worker goes on storing
  fresh prompts for ``--outage-seconds``. L1 is filled once with Redis up (so the pool's
  pages are resident) and the writes drained; then Redis is killed (``--outage kill``) or
  stopped with SIGSTOP (``pause``), the stores go on, and ``VmRSS`` is read after each. Then
  Redis comes back and the figure says whether the tier was used again. Goal: the peak at
  most 1.05 x (the resident memory before the outage + the write budget).

The lookup and outage figures run their ``kvrpc serve`` children against a local
redis-server of their own (the outage must stop it); the prefetch figure uses
``--redis-url`` where one is given, else a local redis-server or ``--cluster``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvrpc.bench._child import kv_server_child
from kvrpc.bench.kv import (
    goal,
    interleaved,
    lookup_scheduler,
    proc_status,
    serve_stored_prompt,
    timed_lookup,
    wait_finished,
)
from kvrpc.bench.rpc import percentile
from kvrpc.client import SyncClient
from kvrpc.errors import KVError
from kvrpc.kv import protocols
from kvrpc.kv.client import LoadStoreOp, WorkerAdapter
from kvrpc.kv.layout import KVLayout, LayoutKind
from kvrpc.kv.server import poolkeys
from kvrpc.kv.server.records import Namespace
from kvrpc.kv.server.tiers import values
from kvrpc.kv.shm import release_shared, shared_empty
from kvrpc.progress import Progress
from kvrpc.transport import local_url

__all__ = ["FIGURES", "TierBenchOptions", "run_tier_bench"]

#: The figures ``kvrpc bench tier`` can take, in the order it takes them.
FIGURES = ("prefetch", "lookup", "outage")

_GIB = 1 << 30
_LOOKUP_GOAL = 1.1  # lookup p50 with a Redis tier / without, at most
_RSS_GOAL = 1.05  # peak RSS in an outage / (RSS before it + the write budget), at most
# The outage figure's worker: chunks of 256 tokens in 16-token blocks, 16 KiB a token (4 MiB
# a chunk, a 1B model's size), 16 chunks (64 MiB) a store.
_OUTAGE_CHUNK_TOKENS = 256
_OUTAGE_BLOCK = 16
_OUTAGE_TOKEN_BYTES = 16 << 10
_OUTAGE_STORE_CHUNKS = 16
_OUTAGE_MODEL = "kvrpc-bench-outage"
_RECOVERY_S = 60.0  # how long the tier may take to be used again once Redis is back


@dataclass(frozen=True)
class TierBenchOptions:
    """What ``kvrpc bench tier`` measures.

    ``chunks``, ``chunk_mib``, ``part_mib`` and ``rounds`` shape the prefetch figure, and
    ``io_threads`` (when more than 1) is given to the local redis-servers it starts;
    ``lookups`` and ``interleave`` the lookup figure's timed calls and turns; ``outage``
    (``kill`` or ``pause``), ``outage_seconds``, ``pool_gib`` and ``budget_gib`` the outage.
    """

    redis_url: str | None = None
    cluster: bool = False
    figures: tuple[str, ...] = FIGURES
    chunks: int = 64
    chunk_mib: float = 16.0
    rounds: int = 5
    part_mib: float = 4.0
    lookups: int = 2000
    interleave: int = 5
    outage: str = "kill"
    outage_seconds: float = 60.0
    pool_gib: float = 1.0
    budget_gib: float = 0.25
    io_threads: int = 1

    @classmethod
    def from_args(cls, args: Any) -> TierBenchOptions:
        """From ``kvrpc bench tier``'s arguments (``--quick`` for sizes not given)."""
        quick = (
            {
                "chunks": 16,
                "chunk_mib": 2.0,
                "rounds": 3,
                "lookups": 100,
                "interleave": 2,
                "outage_seconds": 5.0,
                "pool_gib": 0.25,
                "budget_gib": 0.0625,
            }
            if args.quick
            else {}
        )
        names = (
            "chunks",
            "chunk_mib",
            "rounds",
            "part_mib",
            "lookups",
            "interleave",
            "outage_seconds",
            "pool_gib",
            "budget_gib",
            "io_threads",
        )
        given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
        return cls(
            redis_url=args.redis_url,
            cluster=args.cluster,
            figures=tuple(args.only) if args.only else FIGURES,
            outage=args.outage,
            **{**quick, **given},
        )


# On a terminal, a status line rewritten in place; piped, nothing (see kvrpc.progress).
_progress = Progress("bench tier")


@_progress.closing
def run_tier_bench(options: TierBenchOptions) -> dict[str, Any]:
    """Take the figures ``options`` asks for; their values by name, in the order taken.

    Raises :class:`KVError` where an operation does not do what a figure needs (a chunk
    that comes back with other bytes, a lookup that misses) rather than report it.
    """
    unknown = set(options.figures) - set(FIGURES)
    if unknown:
        raise KVError(f"unknown figures {sorted(unknown)}; choose among {', '.join(FIGURES)}")
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kvrpc-bench-tier-") as tmp:
        if "prefetch" in options.figures:
            figures.update(_prefetch_figures(options))
        if "lookup" in options.figures:
            figures.update(_lookup_figures(options, tmp))
        if "outage" in options.figures:
            figures.update(_outage_figures(options, tmp))
    return figures


def _local_redis(stack: contextlib.ExitStack, config: list[tuple[str, str]] | None = None) -> Any:
    """A local redis-server with no memory limit, closed with ``stack``."""
    from kvrpc.testing.redis_server import RedisProcess

    return stack.enter_context(RedisProcess([("maxmemory", "0"), *(config or [])]))


def _wait_until(condition: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise KVError(f"waited {timeout:g} s for {what}")
        time.sleep(0.01)


# ---------------------------------------------------------------------- 1. prefetch


def _prefetch_figures(options: TierBenchOptions) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        url = options.redis_url
        if url is None:
            from kvrpc.testing.redis_server import RedisCluster

            config = [("io-threads", str(options.io_threads))] if options.io_threads > 1 else []
            if options.cluster:
                cluster = stack.enter_context(RedisCluster(3, config))
                url, servers = cluster.url, cluster.nodes
            else:
                server = _local_redis(stack, config)
                url, servers = server.url, [server]
            pids = [s.process.pid for s in servers if s.process is not None]
        else:
            pids = []
        _progress(f"prefetch: {options.chunks} chunks of {options.chunk_mib:g} MiB from {url}")
        return asyncio.run(_measure(options, url, pids))


async def _measure(options: TierBenchOptions, url: str, pids: list[int]) -> dict[str, Any]:
    from kvrpc.kv.server.tiers.redistier import RedisSettings, RedisTier

    nbytes = int(options.chunk_mib * (1 << 20))
    # A layout only names the namespace here; its chunks are the bench's own byte count.
    layout = KVLayout(LayoutKind.PAGED, 1, (2, 1, 1, 1, 1), "uint8")
    ns_id = poolkeys.namespace_id("bench-tier", 1, 1, layout)
    suffix = poolkeys.worker_suffix(ns_id, 0)
    ns = Namespace(
        ns_id, "bench-tier", 1, 1, poolkeys.chunk_form(layout), layout, nbytes, [suffix],
        {0: suffix},
    )  # fmt: skip
    settings = RedisSettings(
        url,
        cluster=options.cluster,
        prefix="kvrpc-bench:",
        write_budget=nbytes * options.chunks,
        timeout=60.0,
        part_bytes=int(options.part_mib * (1 << 20)),
        connections=options.chunks,
    )
    tier = RedisTier(settings, chunk_tokens=256)
    runner = asyncio.create_task(tier.run())
    copying = RedisTier(dataclasses.replace(settings, direct_reads=False), chunk_tokens=256)
    baseline = _baseline_client(url, options.cluster, options.chunks)
    try:
        keys = [i.to_bytes(32, "little") + suffix for i in range(options.chunks)]
        sources = [torch.randint(0, 256, (nbytes,), dtype=torch.uint8) for _ in keys]
        written = asyncio.Semaphore(0)
        for key, data in zip(keys, sources, strict=True):
            assert tier.offer(ns, key, data, written.release)
        for _ in keys:
            await written.acquire()
        if tier.stats()["writes"] != len(keys):
            raise RuntimeError(f"the bench could not write its chunks: {tier.stats()}")
        outs = [torch.empty(nbytes, dtype=torch.uint8) for _ in keys]
        prefix = settings.prefix.encode()
        bases = [values.key_base(prefix, ns.model_name, 1, 256, key) for key in keys]
        parts = len(values.part_spans(nbytes, settings.part_bytes))
        names = [values.part_keys(base, parts) for base in bases]
        total = nbytes * len(keys)
        ours: list[float] = []
        busy: list[float] = []  # the store's CPU seconds per second of a kvrpc round
        copied: list[float] = []
        theirs: list[float] = []
        # One untimed round each first: they open their connections there.
        await _kvrpc_round(tier, ns, keys, outs)
        await _kvrpc_round(copying, ns, keys, outs)
        await _baseline_round(baseline, names)
        for _ in range(options.rounds):
            for out in outs:
                out.zero_()  # what a round checks must be what it read
            cpu = _cpu_seconds(pids)
            took = await _timed(_kvrpc_round(tier, ns, keys, outs))
            busy.append((_cpu_seconds(pids) - cpu) / took)
            ours.append(total / took / 1e9)
            _check(outs, sources)
            copied.append(total / await _timed(_kvrpc_round(copying, ns, keys, outs)) / 1e9)
            theirs.append(total / await _timed(_baseline_round(baseline, names)) / 1e9)
        _check(outs, sources)
        if tier.stats()["direct_loads"] != tier.stats()["loads"]:
            raise RuntimeError(f"some chunks were not read directly: {tier.stats()}")
        ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
        return {
            "prefetch_redis": (
                "cluster of 3" if options.cluster and options.redis_url is None else url
            ),
            "prefetch_chunks": len(keys),
            "prefetch_chunk_mib": options.chunk_mib,
            "prefetch_part_mib": options.part_mib,
            "kvrpc_prefetch_gbps": [round(x, 3) for x in ours],
            "redis_server_cpu_per_kvrpc_second": [round(x, 2) for x in busy] if pids else None,
            "redis_io_threads": options.io_threads if pids else None,
            "kvrpc_via_redis_py_gbps": [round(x, 3) for x in copied],
            "redis_py_pipelined_gbps": [round(x, 3) for x in theirs],
            "prefetch_ratio_median": round(statistics.median(ratios), 3),
            "prefetch_ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
            "prefetch_goal": goal(statistics.median(ratios) >= 1.0, "ratio >= 1"),
        }
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await tier.aclose()
        await copying.aclose()
        await baseline.aclose()


def _cpu_seconds(pids: list[int]) -> float:
    """User and system CPU seconds the processes have used (Linux ``/proc``; 0 elsewhere)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
    return total / os.sysconf("SC_CLK_TCK")


def _check(outs: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    for out, data in zip(outs, sources, strict=True):
        if not torch.equal(out, data):
            raise RuntimeError("a chunk came back from Redis with other bytes")


async def _timed(work: Any) -> float:
    started = time.perf_counter()
    await work
    return time.perf_counter() - started


async def _kvrpc_round(
    tier: Any, ns: Namespace, keys: list[bytes], outs: list[torch.Tensor]
) -> None:
    headers = await tier.find(ns, keys)
    loaded = await asyncio.gather(
        *(tier.load(ns, key, h, out) for key, h, out in zip(keys, headers, outs, strict=True))
    )
    if not all(loaded):
        raise RuntimeError("the Redis tier failed to load a chunk it wrote")


async def _baseline_round(client: Any, names: list[list[bytes]]) -> None:
    async def fetch(chunk: list[bytes]) -> list[bytes]:
        pipe = client.pipeline(transaction=False)
        for name in chunk:
            pipe.get(name)
        got: list[bytes] = await pipe.execute()
        return got

    fetched = await asyncio.gather(*(fetch(chunk) for chunk in names))
    if any(part is None for chunk in fetched for part in chunk):
        raise RuntimeError("the baseline found a part missing")


def _baseline_client(url: str, cluster: bool, connections: int) -> Any:
    import redis.asyncio

    if cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(url, max_connections=connections)
    return redis.asyncio.Redis.from_url(url, max_connections=connections)


# ---------------------------------------------------------------------- 2. lookup


def _lookup_figures(options: TierBenchOptions, tmp: str) -> dict[str, Any]:
    """Lookup p50 of a prompt L1 holds, with a Redis tier beside it and without."""
    with contextlib.ExitStack() as stack:
        redis = _local_redis(stack)
        plain_url, tiered_url = local_url(tmp, "plain.sock"), local_url(tmp, "tiered.sock")
        prompt, _ = serve_stored_prompt(stack, plain_url, tmp)
        _, tiered = serve_stored_prompt(stack, tiered_url, tmp, "--redis-url", redis.url)
        # The tier holds the prompt too, so a lookup that asked it would find something.
        _wait_until(
            lambda: _drained(tiered.call(protocols.STATS)), "the prompt's Redis writes", 120.0
        )
        written = tiered.call(protocols.STATS)["redis_writes"]
        schedulers = {
            "without_tier": lookup_scheduler(stack, plain_url),
            "with_redis_tier": lookup_scheduler(stack, tiered_url),
        }
        serial = iter(range(1 << 62))

        def path(scheduler: Any) -> Callable[[], float]:
            return lambda: timed_lookup(scheduler, prompt, f"lookup-{next(serial)}")

        paths = {name: path(scheduler) for name, scheduler in schedulers.items()}
        for run in paths.values():  # warm-up
            for _ in range(min(100, options.lookups)):
                run()
        finds = tiered.call(protocols.STATS)["redis_finds"]
        samples = interleaved(paths, options.lookups, options.interleave)
        finds = tiered.call(protocols.STATS)["redis_finds"] - finds
    figures: dict[str, Any] = {"lookup_prompt_tokens": len(prompt), "lookup_redis_writes": written}
    for name, taken in samples.items():
        figures[f"lookup_{name}_p50_us"] = round(percentile(taken, 0.50) * 1e6, 1)
        figures[f"lookup_{name}_p99_us"] = round(percentile(taken, 0.99) * 1e6, 1)
    # Every chunk is in L1: a lookup that asked Redis anything would be a bug, not a figure.
    figures["lookup_redis_finds"] = finds
    ratio = figures["lookup_with_redis_tier_p50_us"] / figures["lookup_without_tier_p50_us"]
    figures["lookup_p50_ratio"] = round(ratio, 3)
    figures["lookup_goal"] = goal(ratio <= _LOOKUP_GOAL, f"ratio <= {_LOOKUP_GOAL:g}")
    return figures


def _drained(stats: dict[str, int]) -> bool:
    # Bytes, not the queue's length: a write leaves the queue before it is acknowledged.
    return stats["redis_write_queued_bytes"] == 0 and stats["redis_writes"] > 0


# ---------------------------------------------------------------------- 3. outage


def _outage_figures(options: TierBenchOptions, tmp: str) -> dict[str, Any]:
    """Server RSS while Redis is down and stores go on; whether the tier comes back after."""
    if options.outage not in ("kill", "pause"):
        raise KVError(f"--outage is kill or pause, not {options.outage!r}")
    chunk_bytes = _OUTAGE_TOKEN_BYTES * _OUTAGE_CHUNK_TOKENS
    budget = int(options.budget_gib * _GIB)
    url = local_url(tmp, "outage.sock")
    blocks = _OUTAGE_STORE_CHUNKS * (_OUTAGE_CHUNK_TOKENS // _OUTAGE_BLOCK)
    tokens = random.Random(2)
    serial = iter(range(1 << 62))
    with contextlib.ExitStack() as stack:
        redis = _local_redis(stack)
        server = stack.enter_context(
            kv_server_child(
                url, tmp,
                "--chunk-size", str(_OUTAGE_CHUNK_TOKENS),
                "--cpu-buffer-size", f"{options.pool_gib:g}",
                "--redis-url", redis.url,
                "--redis-write-budget", f"{options.budget_gib:g}",
            )
        )  # fmt: skip
        _progress(f"outage: server {server.pid}: {server.ready_line}")
        layer = shared_empty((blocks, _OUTAGE_BLOCK, _OUTAGE_TOKEN_BYTES), torch.uint8)
        stack.callback(release_shared, layer)
        layer.random_(0, 256)
        worker = stack.enter_context(WorkerAdapter(url, _OUTAGE_MODEL, 1, 0, _OUTAGE_BLOCK))
        worker.register_kv_caches({"layer.0": layer})
        client = stack.enter_context(
            SyncClient(url, registry=protocols.kv_registry(), timeout=60.0)
        )

        def store() -> float:
            """One store of a fresh prompt, to its report; its seconds."""
            request_id = f"store-{next(serial)}"
            prompt = tokens.choices(range(32000), k=_OUTAGE_STORE_CHUNKS * _OUTAGE_CHUNK_TOKENS)
            start = time.perf_counter()
            worker.submit_store_request(request_id, LoadStoreOp(range(blocks), prompt))
            wait_finished(worker, request_id, store=True)
            return time.perf_counter() - start

        # Fill L1 once, and a quarter more, with Redis up: the pool's pages are resident.
        fill = int(options.pool_gib * _GIB * 1.25) // (chunk_bytes * _OUTAGE_STORE_CHUNKS) + 1
        _progress(f"outage: {fill} stores of {_OUTAGE_STORE_CHUNKS} chunks with Redis up")
        up = [store() for _ in range(fill)]
        try:
            _wait_until(lambda: _drained(client.call(protocols.STATS)), "Redis writes", 120.0)
        except KVError as error:
            raise KVError(f"{error}; the server's log ends:\n{server.log_tail()}") from None
        before = client.call(protocols.STATS)
        rss_before = proc_status(server.pid, "VmRSS")
        (redis.kill if options.outage == "kill" else redis.pause)()
        _progress(f"outage: Redis {options.outage}ed; storing for {options.outage_seconds:g} s")
        down: list[float] = []
        rss: list[int] = []
        queued: list[int] = []
        ends = time.monotonic() + options.outage_seconds
        while time.monotonic() < ends:
            down.append(store())
            rss.append(proc_status(server.pid, "VmRSS"))
            queued.append(client.call(protocols.STATS)["redis_write_queued_bytes"])
        during = client.call(protocols.STATS)
        (redis.start if options.outage == "kill" else redis.resume)()
        # Fresh stores until one reaches Redis again: the tier is used with no restart.
        recovered = False
        ends = time.monotonic() + _RECOVERY_S
        while not recovered and time.monotonic() < ends:
            store()
            recovered = client.call(protocols.STATS)["redis_writes"] > during["redis_writes"]
        after = client.call(protocols.STATS)
    peak = max(rss)
    bound = (rss_before + budget) * _RSS_GOAL
    return {
        "outage": options.outage,
        "outage_seconds": options.outage_seconds,
        "outage_pool_gib": options.pool_gib,
        "outage_write_budget_bytes": budget,
        "outage_stores_up": len(up),
        "outage_stores_down": len(down),
        "outage_store_p50_ms_up": round(statistics.median(up) * 1e3, 2),
        "outage_store_p50_ms_down": round(statistics.median(down) * 1e3, 2),
        "outage_rss_before_bytes": rss_before,
        "outage_rss_peak_bytes": peak,
        "outage_rss_growth_bytes": peak - rss_before,
        "outage_rss_to_bound": round(peak / (rss_before + budget), 4),
        "outage_redis_trips": during["redis_trips"] - before["redis_trips"],
        "outage_write_skipped": during["redis_write_skipped"] - before["redis_write_skipped"],
        "outage_write_dropped": during["redis_write_dropped"] - before["redis_write_dropped"],
        "outage_queue_peak_bytes": max(queued),
        "outage_tier_used_again": recovered,
        "outage_redis_state_after": after["redis_state"],
        "outage_goal": goal(
            peak <= bound, f"peak RSS <= {_RSS_GOAL:g} x (RSS before + write budget)"
        ),
    }
