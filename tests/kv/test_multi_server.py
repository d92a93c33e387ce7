"""One engine, servers on several hosts: each worker its host's server, the scheduler all.

Two live servers stand for two hosts (over each transport, the harness in ``conftest.py``):
rank 0 of a world of two talks to server A, rank 1 to server B, by the rule of
:mod:`kvrpc.kv.client.hosts`, and one scheduler is given both URLs. A lookup's answer is the
fewest chunks either server holds; the pins beyond it are released, and a server that
fails or does not answer in time counts as 0. Then the rule itself, the connector's
``kvrpc.url`` list, and which MLA ranks store when a stage spans hosts, as plain calls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvrpc.errors import KVConfigError, KVError
from kvrpc.integrations.vllm.plan import kv_ranks
from kvrpc.integrations.vllm.settings import ConnectorSettings
from kvrpc.kv import LoadStoreOp, PollingSchedulerAdapter, SchedulerAdapter, WorkerAdapter
from kvrpc.kv.client.hosts import host_of_rank, server_for_rank, server_urls

from .conftest import (
    BLOCK,
    CHUNK,
    MODEL,
    WORLD,
    Keep,
    KVServer,
    blocks,
    lookup_tokens,
    prompt,
    retrieve_all,
    same_blocks,
    store_all,
    wait_until,
)

Workers = list[tuple[WorkerAdapter, list[torch.Tensor]]]


def open_ranks(
    urls: list[str],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    **options: Any,
) -> Workers:
    """A registered worker per rank, each given every URL: it picks its host's."""
    workers = []
    for rank in range(WORLD):
        worker = opened(
            WorkerAdapter(urls, MODEL, WORLD, rank, BLOCK, engine_id="engine", **options)
        )
        layers = kv_cache()
        worker.register_kv_caches({f"layer.{i}": t for i, t in enumerate(layers)})
        workers.append((worker, layers))
    return workers


def two_hosts(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    a_settings: dict[str, Any] | None = None,
    **options: Any,
) -> tuple[KVServer, KVServer, Workers]:
    """Servers A and B (A started with ``a_settings``), rank 0 registered on A, rank 1 on B."""
    a, b = start_server(**(a_settings or {})), start_server()
    workers = open_ranks([a.url, b.url], kv_cache, opened, **options)
    assert (a.stats()["instances"], b.stats()["instances"]) == (1, 1)
    return a, b, workers


def test_each_worker_registers_with_its_hosts_server(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    a, b, ((rank0, _), (rank1, _)) = two_hosts(start_server, kv_cache, opened)
    tokens = prompt(1, seed=1)
    store_all([(rank0, [])], "s", LoadStoreOp(blocks(0, 1), token_ids=tokens))
    assert (a.stats()["chunks"], b.stats()["chunks"]) == (1, 0)
    store_all([(rank1, [])], "s", LoadStoreOp(blocks(0, 1), token_ids=tokens))
    assert (a.stats()["chunks"], b.stats()["chunks"]) == (1, 1)


def test_a_lookup_matches_the_fewest_chunks_any_server_holds_and_releases_the_rest(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    a, b, workers = two_hosts(start_server, kv_cache, opened)
    (rank0, layers0), (rank1, layers1) = workers
    tokens = prompt(3, seed=2)
    store_all([(rank0, layers0)], "s", LoadStoreOp(blocks(0, 3), token_ids=tokens))
    store_all([(rank1, layers1)], "s", LoadStoreOp(blocks(0, 2), token_ids=tokens, end=2 * CHUNK))
    scheduler = opened(SchedulerAdapter([a.url, b.url], MODEL, WORLD, 0, BLOCK, engine_id="engine"))
    assert scheduler.server_urls == [a.url, b.url]

    assert lookup_tokens(scheduler, "r", token_ids=tokens) == 2 * CHUNK
    # A matched 3 and pinned them; its pin on the third goes once the answer is known.
    a.wait_stats("A's pins beyond the fewest released", pinned_chunks=2, sessions=1)
    assert (b.stats()["pinned_chunks"], b.stats()["sessions"]) == (2, 1)

    retrieve_all(workers, "r", LoadStoreOp(blocks(20, 2), token_ids=tokens, end=2 * CHUNK))
    for worker, layers in workers:
        assert worker.get_block_ids_with_load_errors() == set()
        assert same_blocks(layers, blocks(0, 2), blocks(20, 2))
    assert (a.stats()["pinned_chunks"], b.stats()["pinned_chunks"]) == (0, 0)
    scheduler.end_session("r")
    a.wait_stats("A's session to end", sessions=0)
    b.wait_stats("B's session to end", sessions=0)


def test_early_frees_and_end_session_reach_every_server(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    a, b, workers = two_hosts(start_server, kv_cache, opened)
    tokens = prompt(3, seed=3)
    store_all(workers, "s", LoadStoreOp(blocks(0, 3), token_ids=tokens))
    scheduler = opened(SchedulerAdapter([a.url, b.url], MODEL, WORLD, 0, BLOCK))
    assert lookup_tokens(scheduler, "r", token_ids=tokens) == 3 * CHUNK

    scheduler.free_lookup_locks("r", 0, CHUNK)
    a.wait_stats("A's first chunk freed", pinned_chunks=2)
    b.wait_stats("B's first chunk freed", pinned_chunks=2)
    scheduler.end_session("r")
    a.wait_stats("A's session to end", sessions=0, pinned_chunks=0)
    b.wait_stats("B's session to end", sessions=0, pinned_chunks=0)


def test_a_server_that_does_not_answer_in_time_counts_zero_and_the_others_pins_go(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b, workers = two_hosts(start_server, kv_cache, opened)
    tokens = prompt(2, seed=4)
    store_all(workers, "s", LoadStoreOp(blocks(0, 2), token_ids=tokens))
    scheduler = opened(SchedulerAdapter([a.url, b.url], MODEL, WORLD, 0, BLOCK, lookup_timeout=0.2))

    b.stall()
    try:
        with caplog.at_level(logging.WARNING, logger="kvrpc.kv"):
            assert lookup_tokens(scheduler, "r", token_ids=tokens) == 0
        a.wait_stats("A's pins released", pinned_chunks=0)
    finally:
        b.resume()
    assert "1 of 2 servers did not answer within 0.2 s" in caplog.text
    # B's lookup arrives late; the end_session sent after it releases what it pinned.
    b.wait_stats("B's late session to end", sessions=0, pinned_chunks=0)
    assert b.stats()["lookups"] == 1
    # The answer stays what it was.
    assert scheduler.check_lookup_result("r") == 0


def test_a_stopped_server_counts_zero_within_the_lookup_timeout(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    # Short call timeouts: closing the adapters of a stopped server waits for them.
    a, b, workers = two_hosts(start_server, kv_cache, opened, timeout=0.5)
    tokens = prompt(2, seed=5)
    store_all(workers, "s", LoadStoreOp(blocks(0, 2), token_ids=tokens))
    scheduler = opened(
        PollingSchedulerAdapter(
            [a.url, b.url], MODEL, WORLD, 0, BLOCK, lookup_timeout=0.5, timeout=0.5
        )
    )
    assert lookup_tokens(scheduler, "before", token_ids=tokens) == 2 * CHUNK
    scheduler.end_session("before")
    a.wait_stats("the first session to end", sessions=0, pinned_chunks=0)

    b.stop()
    scheduler.maybe_submit_lookup_request("after", token_ids=tokens)
    assert scheduler.check_lookup_result("after") == 0
    a.wait_stats("A's pins released", pinned_chunks=0)


def test_a_miss_on_one_server_answers_without_waiting_for_the_others(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    a, b, ((rank0, layers0), _) = two_hosts(start_server, kv_cache, opened)
    tokens = prompt(2, seed=6)
    store_all([(rank0, layers0)], "s", LoadStoreOp(blocks(0, 2), token_ids=tokens))
    # A holds the prompt and B none of it: B's 0 settles the answer, however long A takes.
    scheduler = opened(
        SchedulerAdapter([a.url, b.url], MODEL, WORLD, 0, BLOCK, lookup_timeout=3600.0)
    )
    a.stall()
    try:
        assert lookup_tokens(scheduler, "r", token_ids=tokens) == 0
    finally:
        a.resume()
    a.wait_stats("A's late session to end", sessions=0, pinned_chunks=0)


def test_a_prefetch_job_on_one_server_is_polled_there_and_counts_toward_the_fewest(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    tmp_path: Path,
) -> None:
    a, b, workers = two_hosts(start_server, kv_cache, opened, {"slots": 4, "disk_dir": tmp_path})
    (rank0, layers0), (rank1, layers1) = workers
    first, second = prompt(2, seed=7), prompt(4, seed=8)
    store_all([(rank0, layers0)], "s1", LoadStoreOp(blocks(0, 2), token_ids=first))
    a.wait_stats("first on A's disk", tier_saves=2, pinned_chunks=0)
    store_all([(rank0, layers0)], "s2", LoadStoreOp(blocks(4, 4), token_ids=second))
    a.wait_stats("second on A's disk", tier_saves=6, pinned_chunks=0)
    store_all([(rank1, layers1)], "s1", LoadStoreOp(blocks(0, 2), token_ids=first))
    scheduler = opened(PollingSchedulerAdapter([a.url, b.url], MODEL, WORLD, 0, BLOCK))

    scheduler.maybe_submit_lookup_request("r", token_ids=first)
    assert scheduler.check_lookup_result("r") == 2 * CHUNK
    assert (a.stats()["prefetch_jobs"], b.stats()["prefetch_jobs"]) == (1, 0)
    retrieve_all(workers, "r", LoadStoreOp(blocks(40, 2), token_ids=first))
    for worker, layers in workers:
        assert worker.get_block_ids_with_load_errors() == set()
        assert same_blocks(layers, blocks(0, 2), blocks(40, 2))


def test_a_scheduler_needs_every_server_at_start(
    start_server: Callable[..., KVServer], tmp_path: Path
) -> None:
    a = start_server()
    missing = f"unix://{tmp_path}/nobody.sock"
    with pytest.raises(KVError, match=r"cannot reach .*nobody\.sock"):
        SchedulerAdapter([a.url, missing], MODEL, WORLD, 0, BLOCK, connect_timeout=0.5)
    wait_until(lambda: a.stats()["clients"], lambda n: n == 0, "the first link to close")


# ------------------------------------------------------------------ the rule, as plain calls


def test_ranks_are_split_over_the_hosts_in_contiguous_blocks() -> None:
    urls = ["zmq+tcp://host-a:5555", "zmq+tcp://host-b:5555"]
    assert [server_for_rank(urls, rank, 8) for rank in range(8)] == [urls[0]] * 4 + [urls[1]] * 4
    assert [host_of_rank(rank, 6, 3) for rank in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [host_of_rank(rank, 4, 1) for rank in range(4)] == [0, 0, 0, 0]
    assert server_for_rank(["only"], 0, 1) == "only"


@pytest.mark.parametrize(
    ("rank", "world_size", "hosts", "says"),
    [(2, 2, 1, "rank 2 is not in 0..1"), (-1, 2, 1, "not in"), (0, 2, 3, "3 hosts for 2 ranks")],
)
def test_a_rank_outside_the_world_or_more_hosts_than_ranks_is_refused(
    rank: int, world_size: int, hosts: int, says: str
) -> None:
    with pytest.raises(ValueError, match=says):
        host_of_rank(rank, world_size, hosts)


def test_server_urls_are_one_or_a_list_without_repeats() -> None:
    assert server_urls("unix:///a.sock") == ["unix:///a.sock"]
    assert server_urls(("a", "b")) == ["a", "b"]
    with pytest.raises(ValueError, match="at least one"):
        server_urls([])
    with pytest.raises(ValueError, match="more than once: a"):
        server_urls(["a", "b", "a"])


def test_the_connector_takes_one_url_or_a_list_and_names_a_bad_entry() -> None:
    one = ConnectorSettings.from_extra_config({"kvrpc.url": "unix:///run/kv.sock"})
    assert one.urls == ["unix:///run/kv.sock"]
    hosts = ["zmq+tcp://10.0.0.1:5555", "zmq+tcp://10.0.0.2:5555"]
    assert ConnectorSettings.from_extra_config({"kvrpc.url": hosts}).urls == hosts
    assert ConnectorSettings.from_extra_config({}).urls is None
    for bad, says in [
        ([], "at least one"),
        (["zmq+tcp://10.0.0.1:5555", "10.0.0.2:5555"], "not a transport URL"),
        ([hosts[0], hosts[0]], "more than once"),
        ([5555], "valid string"),
    ]:
        with pytest.raises(KVConfigError, match=f"kvrpc.url .*{says}"):
            ConnectorSettings.from_extra_config({"kvrpc.url": bad})


def test_an_mla_stage_spanning_hosts_is_stored_by_its_first_rank_on_each_host() -> None:
    # 16 ranks of one stage on two hosts: ranks 0 and 8 store, every rank is kv rank 0.
    writers = [rank for rank in range(16) if kv_ranks(16, rank, 16, True, hosts=2).writer]
    assert writers == [0, 8]
    assert {kv_ranks(16, rank, 16, True, hosts=2).rank for rank in range(16)} == {0}
    # Two stages of 4 on two hosts: each stage is on one host, stored by its first rank.
    assert [r for r in range(8) if kv_ranks(8, r, 4, True, hosts=2).writer] == [0, 4]
    # On one host, as before: only each stage's first rank; without MLA, every rank.
    assert [r for r in range(16) if kv_ranks(16, r, 16, True).writer] == [0]
    assert all(kv_ranks(4, r, 4, False, hosts=2).writer for r in range(4))


# ------------------------------------------------------------------ one server, two URLs


def test_one_server_serves_the_same_cache_on_a_local_socket_and_over_tcp(
    tmp_path: Path, kv_cache: Callable[..., list[torch.Tensor]]
) -> None:
    """Workers register (shared memory) on the local socket; a scheduler asks over TCP."""
    import socket

    from .conftest import start_kv_server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tcp = f"zmq+tcp://127.0.0.1:{port}"
    server = start_kv_server(f"unix://{tmp_path}/kv.sock", also_urls=(tcp,))
    worker = WorkerAdapter(server.url, MODEL, 1, 0, BLOCK)
    scheduler = PollingSchedulerAdapter(tcp, MODEL, 1, 0, BLOCK)
    try:
        layers = kv_cache()
        worker.register_kv_caches({f"layer.{i}": t for i, t in enumerate(layers)})
        tokens = prompt(2, seed=5)
        store_all([(worker, layers)], "s", LoadStoreOp(blocks(0, 2), token_ids=tokens))
        scheduler.maybe_submit_lookup_request("r", token_ids=tokens)
        assert scheduler.check_lookup_result("r") == 2 * CHUNK
        assert server.stats()["pinned_chunks"] == 2  # the scheduler's session, over TCP
        scheduler.end_session("r")
        server.wait_stats("the session over TCP ended", pinned_chunks=0)
    finally:
        scheduler.close()
        worker.close()
        server.stop()


def test_the_connector_takes_a_workers_local_url_beside_the_schedulers_list() -> None:
    settings = ConnectorSettings.from_extra_config(
        {
            "kvrpc.url": ["zmq+tcp://10.0.0.1:5555", "zmq+tcp://10.0.0.2:5555"],
            "kvrpc.worker_url": "unix:///run/kvrpc/kv.sock",
        }
    )
    assert settings.worker_url == "unix:///run/kvrpc/kv.sock"
    with pytest.raises(KVConfigError, match="worker_url"):
        ConnectorSettings.from_extra_config({"kvrpc.worker_url": "nonsense"})
