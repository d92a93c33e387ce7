"""The metrics endpoint of a real ``kvrpc serve``: counters scraped around real KV traffic.

Each test runs ``kvrpc serve --metrics-port 0`` as a child process on a Unix socket, reads
the endpoint's URL from the ready line, and drives the server with the engine adapters
(inline transfers: CPU tensors, no shared memory). Readiness is watched against a real
redis-server that is killed and started again; every wait polls with a deadline.
"""

from __future__ import annotations

import contextlib
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from kvrpc.kv import LoadStoreOp, PollingSchedulerAdapter, WorkerAdapter
from kvrpc.testing.redis_server import RedisProcess, redis_available
from kvrpc.testing.serve import ServeProcess
from kvrpc.testing.waiting import wait_until

from .conftest import (
    BLOCK,
    CHUNK,
    LAYER_SHAPE,
    LAYERS,
    MODEL,
    SLOT,
    blocks,
    fill_random,
    lookup_tokens,
    prompt,
    retrieve_all,
    store_all,
)

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

DEADLINE = 30.0  # seconds a condition may take before a test gives up

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(url: str) -> tuple[int, str]:
    """``(status, body)`` of a GET, 4xx and 5xx included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(base: str) -> Samples:
    """Every sample of ``/metrics``, by (name, sorted labels)."""
    status, text = get(f"{base}/metrics")
    assert status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def poll(get_value: Callable[[], tuple[bool, str]], what: str) -> str:
    """Call ``get_value`` until it reports True; its last text is returned or shown.

    A child's HTTP endpoint has no event to wait on: it is asked again, every 50 ms (each
    request costs the child a scrape), until it answers so.
    """
    return wait_until(get_value, lambda got: got[0], what, DEADLINE, interval=0.05)[1]


@contextlib.contextmanager
def serving(tmp_path: Path, *options: str) -> Iterator[tuple[ServeProcess, str]]:
    """A ``kvrpc serve`` child with the metrics endpoint on; yields it and the endpoint's URL."""
    server = ServeProcess(
        f"unix://{tmp_path}/kv.sock",
        "--chunk-size", str(CHUNK), "--cpu-buffer-size", "0.001", "--max-workers", "2",
        "--metrics-port", "0", *options,
        log_dir=str(tmp_path),
    )  # fmt: skip
    server.start()
    try:
        assert server.child is not None
        found = re.search(r" metrics=(http://\S+)", server.child.ready_line)
        assert found, f"no metrics URL in the ready line {server.child.ready_line!r}"
        yield server, found.group(1)
    finally:
        server.stop()


@contextlib.contextmanager
def inline_worker(url: str, seed: int) -> Iterator[tuple[WorkerAdapter, list[torch.Tensor]]]:
    worker = WorkerAdapter(url, MODEL, 1, 0, BLOCK, transfer_mode="inline")
    try:
        layers = [torch.empty(LAYER_SHAPE, dtype=torch.float16) for _ in range(LAYERS)]
        fill_random(layers, seed=seed)
        worker.register_kv_caches({f"layer.{i}": t for i, t in enumerate(layers)})
        yield worker, layers
    finally:
        worker.close()


def test_a_store_a_lookup_and_a_retrieve_move_the_scraped_counters_by_their_chunks(
    tmp_path: Path,
) -> None:
    with serving(tmp_path) as (server, base), inline_worker(server.url, seed=1) as pair:
        worker, layers = pair
        tokens = prompt(3, seed=7)
        before = scrape(base)
        store_all([pair], "s", LoadStoreOp(blocks(0, 3), token_ids=tokens))
        stored = scrape(base)
        assert (
            value(stored, "kvrpc_kv_stores_total", outcome="stored")
            == value(before, "kvrpc_kv_stores_total", outcome="stored") + 3
        )
        assert value(stored, "kvrpc_kv_tier_bytes_total", tier="l1", direction="in") == 3 * SLOT
        assert value(stored, "kvrpc_kv_chunks", tier="l1") == 3
        assert value(stored, "kvrpc_kv_instances") == 1
        store_calls = value(stored, "kvrpc_rpc_calls_total", protocol="kv.store", status="OK")
        assert store_calls >= 1
        # Every timed call is in the histogram, whatever its outcome.
        assert value(stored, "kvrpc_rpc_handler_seconds_count", protocol="kv.store") == store_calls

        scheduler = PollingSchedulerAdapter(server.url, MODEL, 1, 0, BLOCK)
        try:
            assert lookup_tokens(scheduler, "r", token_ids=tokens) == 3 * CHUNK
            looked = scrape(base)
            assert value(looked, "kvrpc_kv_lookups_total") == 1
            assert value(looked, "kvrpc_kv_lookup_chunks_total", result="hit") == 3
            assert value(looked, "kvrpc_kv_hit_tokens_total") == 3 * CHUNK
            assert value(looked, "kvrpc_kv_pinned_chunks") == 3  # the session holds them
            lookups = value(looked, "kvrpc_rpc_calls_total", protocol="kv.lookup", status="OK")
            assert lookups == 1

            retrieve_all([pair], "r", LoadStoreOp(blocks(20, 3), token_ids=tokens))
            assert worker.get_block_ids_with_load_errors() == set()
            for layer in layers:
                bits = layer.view(torch.int16)
                assert torch.equal(bits[:, blocks(0, 3)], bits[:, blocks(20, 3)])
            retrieved = scrape(base)
            assert value(retrieved, "kvrpc_kv_retrieves_total", outcome="retrieved") == 3
            out = value(retrieved, "kvrpc_kv_tier_bytes_total", tier="l1", direction="out")
            assert out == 3 * SLOT
            assert value(retrieved, "kvrpc_kv_pinned_chunks") == 0  # released by the retrieve
        finally:
            scheduler.close()
        # The same figures as kv.stats, which counts them where they happen.
        stats = server.stats()
        assert stats["store_bytes"] == 3 * SLOT and stats["retrieve_bytes"] == 3 * SLOT
        final = scrape(base)
        requests = value(final, "kvrpc_rpc_requests_total", listener=server.url)
        assert requests >= store_calls + lookups
        assert value(final, "kvrpc_transport_connections_total", listener=server.url) >= 2


needs_redis = pytest.mark.skipif(not redis_available(), reason="redis-server not installed")


@needs_redis
def test_readyz_fails_naming_redis_while_it_is_down_and_recovers_when_it_returns(
    tmp_path: Path,
) -> None:
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisProcess())
        server, base = stack.enter_context(
            serving(tmp_path, "--redis-url", redis.url, "--redis-timeout", "0.5")
        )
        status, body = get(f"{base}/readyz")
        assert status == 200, body
        assert "tier redis: up" in body
        assert get(f"{base}/livez")[0] == 200
        worker, _ = stack.enter_context(inline_worker(server.url, seed=2))
        redis.kill()
        seeds = iter(range(100, 100_000))

        def down() -> tuple[bool, str]:
            # The tier finds out at its next operation: each poll stores a new chunk, whose
            # write to Redis fails and opens the breaker.
            seed = next(seeds)
            store_all(
                [(worker, [])], f"s{seed}", LoadStoreOp(blocks(0, 1), token_ids=prompt(1, seed))
            )
            status, body = get(f"{base}/readyz")
            return status == 503, body

        body = poll(down, "/readyz to fail while Redis is down")
        assert "not ready" in body and "tier redis: down" in body
        assert get(f"{base}/livez")[0] == 200  # alive all the same: L1 still serves
        assert value(scrape(base), "kvrpc_kv_tier_up", tier="redis") == 0
        redis.start()
        body = poll(lambda: (lambda s, b: (s == 200, b))(*get(f"{base}/readyz")), "/readyz back")
        assert "tier redis: up" in body
        samples = scrape(base)
        assert value(samples, "kvrpc_kv_tier_up", tier="redis") == 1
        assert value(samples, "kvrpc_kv_tier_trips_total", tier="redis") >= 1


@needs_redis
def test_readyz_ignores_a_tier_it_was_told_to_ignore(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisProcess())
        server, base = stack.enter_context(
            serving(
                tmp_path,
                "--redis-url",
                redis.url,
                "--redis-timeout",
                "0.5",
                "--readyz-ignore",
                "redis",
            )
        )
        worker, _ = stack.enter_context(inline_worker(server.url, seed=3))
        redis.kill()
        seeds = iter(range(100, 100_000))

        def skipped() -> tuple[bool, str]:
            seed = next(seeds)
            store_all(
                [(worker, [])], f"s{seed}", LoadStoreOp(blocks(0, 1), token_ids=prompt(1, seed))
            )
            samples = scrape(base)
            return value(samples, "kvrpc_kv_tier_up", tier="redis") == 0, str(samples)

        poll(skipped, "the Redis tier to be skipped")
        status, body = get(f"{base}/readyz")
        assert status == 200, body
        assert "tier redis: down" in body and "ignored for readiness" in body
