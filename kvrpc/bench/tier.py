"""``kvrpc bench tier``: how fast the Redis tier prefetches, beside plain redis-py.

The same chunks are written once; then rounds alternate between the two readers, each
fetching every chunk with the same parallelism (all chunks at once, one pipeline each),
after an untimed round each that opens their connections:

- **kvrpc**: :class:`~kvrpc.kv.server.tiers.redistier.RedisTier`, as a prefetch job uses
  it: one round trip for the headers, then each chunk's parts copied into its slot and
  checked against length and CRC;
- **baseline**: redis-py's asyncio client with hiredis, the fastest plain use of it: a
  pipeline of GETs per chunk over the same keys, the bytes left where redis-py put them.

Reported per round as GB/s, with the median ratio. A local redis-server is started in a
temporary directory unless ``--redis-url`` names one.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from kvrpc.kv.layout import KVLayout, LayoutKind
from kvrpc.kv.server import poolkeys
from kvrpc.kv.server.records import Namespace
from kvrpc.kv.server.tiers import values

__all__ = ["TierBenchOptions", "run_tier_bench"]


@dataclass(frozen=True)
class TierBenchOptions:
    """What ``kvrpc bench tier`` measures."""

    redis_url: str | None = None
    cluster: bool = False
    chunks: int = 64
    chunk_mib: float = 16.0
    rounds: int = 5
    part_mib: float = 4.0

    @classmethod
    def from_args(cls, args: Any) -> TierBenchOptions:
        """From ``kvrpc bench tier``'s arguments."""
        quick = {"chunks": 16, "chunk_mib": 2.0, "rounds": 3} if args.quick else {}
        given = {
            name: getattr(args, name)
            for name in ("chunks", "chunk_mib", "rounds", "part_mib")
            if getattr(args, name) is not None
        }
        return cls(redis_url=args.redis_url, cluster=args.cluster, **{**quick, **given})


def run_tier_bench(options: TierBenchOptions) -> dict[str, Any]:
    """Run the bench; its figures."""
    with contextlib.ExitStack() as stack:
        url = options.redis_url
        if url is None:
            from kvrpc.testing.redis_server import RedisCluster, RedisProcess

            if options.cluster:
                url = stack.enter_context(RedisCluster(3)).url
            else:
                url = stack.enter_context(RedisProcess([("maxmemory", "0")])).url
        return asyncio.run(_measure(options, url))


async def _measure(options: TierBenchOptions, url: str) -> dict[str, Any]:
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
        theirs: list[float] = []
        # One untimed round each first: both open their connections there.
        await _kvrpc_round(tier, ns, keys, outs)
        await _baseline_round(baseline, names)
        for _ in range(options.rounds):
            ours.append(total / await _timed(_kvrpc_round(tier, ns, keys, outs)) / 1e9)
            theirs.append(total / await _timed(_baseline_round(baseline, names)) / 1e9)
        for out, data in zip(outs, sources, strict=True):
            if not torch.equal(out, data):
                raise RuntimeError("a chunk came back from Redis with other bytes")
        ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
        return {
            "redis": "cluster of 3" if options.cluster and options.redis_url is None else url,
            "chunks": len(keys),
            "chunk_mib": options.chunk_mib,
            "part_mib": options.part_mib,
            "kvrpc_prefetch_gbps": [round(x, 3) for x in ours],
            "redis_py_pipelined_gbps": [round(x, 3) for x in theirs],
            "ratio_median": round(statistics.median(ratios), 3),
            "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
            "goal_ratio_at_least_1": statistics.median(ratios) >= 1.0,
        }
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await tier.aclose()
        await baseline.aclose()


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
