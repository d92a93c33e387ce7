"""The Redis tier's redis-server killed, and paused (SIGSTOP), under a ``kvrpc serve``.

While Redis is out, lookups, stores and retrieves go on from L1: every round of the engines is
answered (none waits on Redis past its ``--redis-timeout``) and every retrieved byte is
intact. The tier is skipped meanwhile, and used again by itself once Redis is back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from kvrpc.kv.server.tiers.breaker import BreakerState
from kvrpc.testing.redis_server import RedisProcess, redis_available
from kvrpc.testing.serve import ServeProcess

from .conftest import scaled, wait_until
from .engines import Engine, server_options
from .test_eviction import run_rounds

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(
        not redis_available(), reason="needs redis-server (tools/ensure-redis-server.sh)"
    ),
]

PROMPTS = 8  # 24 chunks through 16 slots: some lookups go past L1, to Redis


@pytest.fixture
def redis() -> Iterator[RedisProcess]:
    with RedisProcess() as server:
        yield server


@pytest.mark.parametrize("outage", ["killed", "paused"])
def test_a_redis_outage_leaves_l1_serving_and_the_tier_recovers(
    serve: Callable[..., ServeProcess], redis: RedisProcess, outage: str
) -> None:
    server = serve(
        "unix", *server_options(16, 10.0), "--redis-url", redis.url, "--redis-timeout", "0.5"
    )
    engines = [Engine(server.url, "redis"), Engine(server.url, "redis")]
    try:
        run_rounds(engines, 8, PROMPTS)
        up = wait_until(server.stats, lambda s: s["redis_writes"] > 0, "chunks written to Redis")
        assert up["redis_state"] == BreakerState.UP
        for n in range(scaled(1)):
            if outage == "killed":
                redis.kill()
            else:
                redis.pause()
            try:
                started = time.monotonic()
                tallies = run_rounds(engines, 12, PROMPTS)
                took = time.monotonic() - started
                assert all(t[1] == 0 for t in tallies), f"corrupted chunks: {tallies}"
                assert sum(t[0] for t in tallies) > 0, "nothing was retrieved from L1"
                down = wait_until(
                    server.stats,
                    lambda s: s["redis_state"] != BreakerState.UP,
                    "the tier skipped while Redis is out",
                )
                assert down["redis_errors"] + down["redis_timeouts"] >= 1
                print(f"Redis {outage}: 24 rounds in {took:.2f} s")
            finally:
                if outage == "killed":
                    redis.start()
                else:
                    redis.resume()
            wait_until(server.stats, lambda s: s["redis_state"] == BreakerState.UP, "tier back")
            written = server.stats()["redis_writes"]
            run_rounds(engines, 4, 4, first=100 * (n + 1))  # new prompts, written to Redis
            wait_until(server.stats, lambda s, w=written: s["redis_writes"] > w, "writes resume")
    finally:
        for engine in engines:
            engine.close()
