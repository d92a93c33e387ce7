"""``kvrpc bench kv --quick``: every figure is taken, against real servers, and written out."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvrpc.bench.e2e import _goals, length_label, ttft_table
from kvrpc.bench.gpu import block_order, first_transfer_figures
from kvrpc.bench.kv import QUICK_NOTE
from kvrpc.cli import _cell
from kvrpc.testing.redis_server import redis_available


def test_quick_kv_bench_takes_all_three_figures_and_writes_them_as_json(tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    done = subprocess.run(
        [sys.executable, "-m", "kvrpc", "bench", "kv", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KVRPC_PROGRESS": "1"},  # piped: progress only where forced
    )
    assert done.returncode == 0, done.stderr
    assert "[bench kv]" in done.stderr  # progress shows while it runs
    assert "lookup_to_ping_p50_ratio" in done.stdout  # and the table on stdout
    figures = json.loads(out.read_text())

    # Lookup: the whole 32k-token prompt is a hit on both ranks, pinned and then released.
    assert figures["lookup_prompt_tokens"] == 32768
    assert figures["lookup_chunks_matched"] == 128
    assert figures["lookup_pins_taken"] == figures["lookup_pins_released"] == 256
    for name in (
        "ping",
        "lookup",
        "lookup_raw",
        "hashing",
        "lookup_by_block_hashes",
        "hashing_block_hashes",
        "end_session_raw",
    ):
        assert 0 < figures[f"{name}_p50_us"] <= figures[f"{name}_p99_us"], name
    assert figures["lookup_to_ping_p50_ratio"] > 0

    # Transfer: the retrieved blocks were checked byte for byte; every rate is a real rate.
    assert figures["retrieve_verified"] is True
    # --quick: 2 layers, chunks of 256 tokens x 2 heads x 64 dims, K and V, float16.
    assert figures["transfer_bytes"] == figures["transfer_chunks"] * 2 * 256 * 2 * 64 * 2 * 2
    for name in ("store", "retrieve", "memcpy", "unsummed_store", "verifying_retrieve"):
        assert figures[f"{name}_gb_per_s"] > 0, name
    # The checksums' cost beside the calls without (a figure, not a goal: any sign).
    assert isinstance(figures["store_checksum_overhead"], float)
    assert isinstance(figures["retrieve_verify_overhead"], float)
    assert figures["store_to_memcpy_ratio"] > 0
    assert figures["retrieve_to_memcpy_ratio"] > 0

    # Memory: every tiny chunk was stored, and the server grew while holding them.
    assert figures["tiny_chunks"] == 16384
    assert figures["tiny_pool_bytes_touched"] == 16384 * figures["tiny_chunk_bytes"]
    assert figures["tiny_rss_after_bytes"] > figures["tiny_rss_start_bytes"] > 0
    assert isinstance(figures["tiny_metadata_bytes_per_chunk"], float)

    # --quick says first that its figures are not comparable to the goals, and marks each
    # verdict; the exit status stays 0 (checked above) whatever the verdicts.
    assert figures["note"] == QUICK_NOTE
    assert done.stdout.splitlines()[0].startswith("note")
    assert "not comparable to the goals" in done.stdout
    for goal in ("lookup_goal", "transfer_goal", "memory_goal"):
        assert figures[goal].startswith(("met", "MISSED")), goal
        assert figures[goal].endswith(", at --quick sizes"), goal


def test_kv_bench_refuses_an_inproc_url_it_cannot_serve_from_a_child_process() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvrpc", "bench", "kv", "--quick", "--url", "inproc://kv"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "inproc://" in done.stderr


def test_e2e_bench_on_the_cpu_times_misses_and_hits_and_draws_the_plot(tmp_path: Path) -> None:
    # A smoke run of the command (a tiny model, float32): the figures' shape and the checks
    # the bench makes on itself (a stored prefix is a hit, a fresh prompt a miss), not speed.
    out, plot = tmp_path / "e2e.json", tmp_path / "e2e.png"
    command = ["bench", "e2e", "--device", "cpu", "--rounds", "1", "--lengths", "256", "512"]
    done = subprocess.run(
        [sys.executable, "-m", "kvrpc", *command, "--json", str(out), "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    for length in (256, 512):
        row = figures[f"ttft_{length}"]
        for name in ("miss", "hit", "hit_layerwise", "suffix_only", "transformers"):
            assert row[name]["min"] <= row[name]["median"] <= row[name]["max"]
            assert row[name]["min"] > 0
        assert row["kv_bytes"] == length * 2 * 2 * 2 * 16 * 4  # layers, K and V, heads, dim, fp32
    # The decode figure, structurally: how many steps fell inside the stores' span is up to
    # the host's scheduling (none at all on a loaded one), so only its presence is asserted;
    # the stores themselves each moved the whole prefix.
    assert isinstance(figures["decode_steps_during_stores"], int)
    assert figures["decode_stores"] > 0
    assert figures["decode_store_bytes_each"] == figures["ttft_512"]["kv_bytes"]
    assert {"median", "min", "max"} <= set(figures["decode_during_store_step_ms"])
    assert figures["goal_decode"].startswith(("met", "MISSED", "not measured"))
    # Eager steps (no --cuda-graphs), over a 1k prompt's context buffer with room for 1k
    # steps more: no step of the figure outgrew it.
    assert figures["decode_cuda_graphs"] is False
    assert figures["decode_context_capacity_tokens"] == 2048
    assert figures["prompt_lengths"] == "256 512"  # what ran, named as it ran
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The rows print as a table, one line per length, not as dicts.
    assert "{" not in done.stdout
    table = done.stdout[done.stdout.index("time to first token") :].splitlines()
    assert table[1].split()[:3] == ["prompt", "miss", "hit"]
    assert [line.split()[0] for line in table[2:4]] == ["256", "512"]


def test_e2e_bench_without_a_decode_step_inside_the_stores_says_not_measured() -> None:
    # A loaded host may run no decode step wholly inside the stores' span: the figure is then
    # NaN, printed as a spread (not as a dict), and the goal is not judged on nothing.
    during = dict.fromkeys(("median", "min", "max"), math.nan)
    assert _cell(during) == "nan (min nan, max nan)"
    goals = _goals({"tier": "l1", "decode_during_store_to_idle": math.nan})
    assert goals["goal_decode"].startswith("not measured")
    assert _goals({"tier": "l1", "decode_during_store_to_idle": 0.9})["goal_decode"].startswith(
        "met"
    )


def test_e2e_bench_judges_a_decode_with_cuda_graphs_by_the_tighter_goal() -> None:
    eager = _goals({"tier": "l1", "decode_during_store_to_idle": 1.04})["goal_decode"]
    assert eager.startswith("met") and "<= 1.05" in eager
    graphed = {"tier": "l1", "decode_during_store_to_idle": 1.04, "decode_cuda_graphs": True}
    verdict = _goals(graphed)["goal_decode"]
    assert verdict.startswith("MISSED") and "with CUDA graphs" in verdict and "<= 1.02" in verdict


def test_e2e_bench_refuses_cuda_graphs_on_the_cpu_before_it_starts() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvrpc", "bench", "e2e", "--device", "cpu", "--cuda-graphs"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--cuda-graphs needs --device cuda" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(not redis_available(), reason="needs redis-server and redis-cli")
def test_e2e_bench_with_the_redis_tier_serves_every_hit_from_redis(tmp_path: Path) -> None:
    # A smoke run against a real redis-server: each hit finds L1 empty and loads its whole
    # prefix from Redis (the bench checks that itself and fails otherwise; the counters here
    # say it again), and the figures name the tier and where a Redis hit starts to pay.
    out, plot = tmp_path / "e2e.json", tmp_path / "e2e.png"
    command = ["bench", "e2e", "--device", "cpu", "--tier", "redis", "--lengths", "256", "512"]
    files = ["--json", str(out), "--plot", str(plot)]
    done = subprocess.run(
        [sys.executable, "-m", "kvrpc", *command, "--rounds", "1", *files],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["tier"] == "redis"
    hits_per_length = 2 + 2 * 1  # two untimed (whole, layer-wise), then one of each a round
    for length in (256, 512):
        row = figures[f"ttft_{length}"]
        assert row["hit_cached_tokens"] == length  # the whole prefix, none recomputed
        assert row["redis_chunks_loaded_per_hit"] == length // 256
        for name in ("miss", "hit", "hit_layerwise", "suffix_only"):
            assert 0 < row[name]["min"] <= row[name]["median"] <= row[name]["max"]
        assert row["miss_to_hit"] > 0
    # Every chunk of both prefixes was written once, none dropped; each hit loaded its own.
    assert figures["redis_writes"] == 256 // 256 + 512 // 256
    assert figures["redis_write_dropped"] == 0
    assert figures["redis_loads"] == hits_per_length * (1 + 2)
    assert figures["redis_hits"] >= figures["redis_loads"]
    assert figures["redis_load_bytes"] == figures["redis_loads"] * figures["ttft_256"]["kv_bytes"]
    assert figures["redis_hit_beats_recompute_from_tokens"] in (None, 256, 512)
    assert "goal_whole" not in figures  # the L1 goals are not claimed for Redis hits
    assert figures["decode_steps_during_stores"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_bench_reports_the_first_transfer_against_the_warm_pinned_copies() -> None:
    # (seconds, the kv.stats taken just after): the loop-lag figures cover that copy alone.
    store = (
        0.100,
        {
            "cuda_last_batch_gpu_us": 90_000,
            "cuda_last_handler_us": 95_000,
            "loop_lag_max_us": 4_200,
            "loop_lag_samples": 97,
            "gc_pause_max_us": 3_900,
        },
    )
    retrieve = (
        0.050,
        {
            "cuda_last_batch_gpu_us": 41_000,
            "cuda_last_handler_us": 44_000,
            "loop_lag_max_us": 300,
            "loop_lag_samples": 49,
        },
    )
    figures = first_transfer_figures(store, retrieve, d2h_seconds=0.040, h2d_seconds=0.045)

    assert figures["first_store_ms"] == 100.0
    assert figures["first_store_ratio"] == 0.4  # 40 ms of pinned copy in 100 ms
    assert figures["first_retrieve_ratio"] == 0.9
    assert figures["first_store_engine_gpu_ms"] == 90.0
    assert figures["first_retrieve_handler_ms"] == 44.0
    assert figures["first_store_loop_lag_max_us"] == 4200
    assert figures["first_retrieve_loop_lag_samples"] == 49
    assert figures["first_store_gc_pause_max_us"] == 3900
    assert figures["first_retrieve_gc_pause_max_us"] == 0  # no collection during it
    assert figures["first_transfer_goal"].startswith("MISSED")  # 0.4 < 0.9
    assert figures["first_stall_goal"].startswith("MISSED")  # 4.2 ms >= 1 ms

    quick = (0.042, {**store[1], "loop_lag_max_us": 800})  # 0.95 of the pinned copy
    figures = first_transfer_figures(quick, retrieve, d2h_seconds=0.040, h2d_seconds=0.045)
    assert figures["first_transfer_goal"].startswith("met")
    assert figures["first_stall_goal"].startswith("met")


def test_prompt_lengths_are_labelled_in_k_only_when_whole_thousands() -> None:
    labels = [length_label(n) for n in (256, 512, 1024, 1536, 4096, 32768)]
    assert labels == ["256", "512", "1k", "1536", "4k", "32k"]


def test_ttft_table_has_a_row_per_length_and_a_dash_for_a_figure_not_taken() -> None:
    def spread(ms: float) -> dict[str, float]:
        return {"median": ms, "min": ms, "max": ms}

    row = {
        **{name: spread(2.0) for name in ("miss", "hit_layerwise", "suffix_only")},
        "hit": spread(1.0),
        "transformers": spread(3.0),
        "transfer_bound_ms": float("nan"),  # a CPU run: no pinned rate
        "miss_to_hit": 2.0,
        "miss_to_hit_layerwise": 1.0,
        "hit_to_bound": float("nan"),
        "kv_bytes": 1,
    }
    figures = {"rounds": 3, "ttft_4096": row, "ttft_512": row, "device": "cpu"}
    lines = ttft_table(figures).splitlines()
    assert lines[0] == "time to first token, ms (medians of 3 rounds)"
    assert [line.split()[0] for line in lines[1:]] == ["prompt", "512", "4k"]
    assert lines[2].split()[1:] == [
        "2.00",
        "1.00",
        "2.00",
        "2.00",
        "3.00",
        "-",
        "2.00",
        "1.00",
        "-",
    ]


@pytest.mark.parametrize(("blocks", "run"), [(64, 1), (64, 16), (70, 16), (5, 8)])
def test_bench_gpu_block_order_is_every_block_once_in_random_runs_of_consecutive_ids(
    blocks: int, run: int
) -> None:
    order = block_order(blocks, run, seed=6)
    assert sorted(order) == list(range(blocks))
    # Run k (blocks k * run onward) sits in one stretch of the order, ascending.
    where = {block: index for index, block in enumerate(order)}
    for start in range(0, blocks, run):
        members = range(start, min(blocks, start + run))
        first = where[start]
        assert [where[b] for b in members] == list(range(first, first + len(members)))
    starts = [b for b in order if b % run == 0]
    if blocks // run > 2:
        assert starts != sorted(starts)  # the runs themselves come in random order
