"""``--plot FILE.png``: each bench's plot function draws a PNG from a figures dict of its shape.

The dicts are shaped as the benches return them (the GPU one as ``kvrpc bench gpu`` reports
on an H100: no GPU here to run it); the functions only read them.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from kvrpc.bench.plots import RPC_CONTENDERS, plot_gpu, plot_kv, plot_rpc, plot_tier

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _contender(prefix: str, p50: float, rate: float) -> dict[str, Any]:
    return {
        f"{prefix}ping_p50_us": p50,
        f"{prefix}ping_p99_us": p50 * 2.5,
        f"{prefix}ping_mean_us": p50 * 1.1,
        f"{prefix}pipelined_calls_per_s": rate,
        f"{prefix}pipelined_p50_us": 64e6 / rate,
        f"{prefix}pipelined_p99_us": 128e6 / rate,
    }


RPC: dict[str, Any] = {
    "url": "unix:///tmp/b.sock",
    "server": "child process 11804",
    "raw_baseline": "RawEchoBaseline at unix:///tmp/b.sock-raw (child process 11808)",
    **_contender("", 74.2, 32287.6),
    **_contender("raw_", 94.7, 325539.5),
    "pipelined_p99_over_p50": 2.44,
    "echo_gb_per_s": 0.93,
    "raw_echo_gb_per_s": 1.01,
    "ping_p50_ratio_to_raw": 0.78,
    "pipelined_ratio_to_raw": 0.099,
    "sync_url": "unix:///tmp/b.sock",
    **_contender("sync_", 209.9, 36377.5),
    **_contender("raw_sync_", 17.7, 220056.9),
    **_contender("raw_zmq_sync_", 89.1, 108975.6),
    "lmcache_version": "0.3.9",
    **_contender("lmcache_", 160.0, 9000.0),
    "sync_ping_p50_ratio_to_raw_sync": 11.9,
}

KV: dict[str, Any] = {
    "url": "unix:///tmp/kvrpc-bench-kv-x/kv.sock",
    "lookup_url": "unix:///tmp/kvrpc-bench-kv-x/kv.sock",
    "lookup_prompt_tokens": 32768,
    "lookup_chunks_matched": 128,
    **{
        f"{name}_{q}_us": value * (1 if q == "p50" else 1.8)
        for name, value in (
            ("ping", 48.0),
            ("lookup", 81.5),
            ("lookup_raw", 60.2),
            ("hashing", 12.9),
            ("lookup_busy_poll", 95.0),
            ("lookup_sleep_poll", 88.0),
            ("end_session_raw", 30.0),
        )
        for q in ("p50", "p99")
    },
    "lookup_samples": 2000,
    "lookup_to_ping_p50_ratio": 1.70,
    "lookup_goal": "met (lookup p50 <= 2x ping)",
    "busy_poll_to_sleep_poll_p50_ratio": 1.08,
    "busy_poll_goal": "met (lookup polled without sleeping <= 1.2x polled with 20 us sleeps)",
    "transfer_bytes": 268435456,
    "store_ms": 61.0,
    "store_gb_per_s": 4.4,
    "retrieve_ms": 55.0,
    "retrieve_gb_per_s": 4.88,
    "memcpy_ms": 40.0,
    "memcpy_gb_per_s": 6.7,
    "transfer_goal": "met (store and retrieve each >= 0.5x single-threaded memcpy)",
    "tiny_chunks": 1000000,
    "tiny_metadata_bytes_per_chunk": 171.3,
    "tiny_store_growth_bytes_per_chunk": 96.4,
    "memory_goal": "met (<= 200 bytes of metadata per chunk)",
}

GPU: dict[str, Any] = {
    "device": "NVIDIA H100 80GB HBM3",
    "layout": "paged [2, 4000, 16, 8, 128] bfloat16 x 32",
    "chunks": 64,
    "batch_bytes": 2147483648,
    "url": "unix:///tmp/kvrpc-bench-gpu-x/kv.sock",
    "register_ms": 412.5,
    "store_ms": 41.2,
    "store_gb_per_s": 52.1,
    "d2h_ms": 40.1,
    "d2h_gb_per_s": 53.5,
    "retrieve_ms": 40.9,
    "retrieve_gb_per_s": 52.5,
    "h2d_ms": 39.8,
    "h2d_gb_per_s": 54.0,
    "store_to_d2h_ratio": 0.974,
    "retrieve_to_h2d_ratio": 0.972,
    "store_to_d2h_ratio_spread": [0.96, 0.98],
    "transfer_goal": "met (store and retrieve each >= 0.9x a pinned copy of the same bytes)",
    "first_store_ms": 48.3,
    "first_store_ratio": 0.83,
    "first_retrieve_ms": 44.0,
    "first_retrieve_ratio": 0.9,
    "first_store_loop_lag_max_us": 310,
    "first_transfer_goal": "met (first store and first retrieve after registration each >= ...)",
    "first_stall_goal": "met (longest loop stall during the first store ... < 1000 us)",
    "duplex_ms": 52.0,
    "duplex_spread_ms": [51.0, 53.5],
    "duplex_gb_per_s": 82.6,
    "pinned_both_ways_ms": 50.2,
    "pinned_both_ways_gb_per_s": 85.6,
    "duplex_to_one_way": 1.53,
    "duplex_goal": "met (a store and a retrieve at once >= 1.5x the one-direction pinned rate)",
    "ping_idle_p50_us": 38.0,
    "ping_storm_p50_us": 55.1,
    "ping_storm_pings": 5120,
    "ping_storm_to_idle": 1.45,
    "loop_lag_idle_p99_us": 20,
    "loop_lag_idle_max_us": 61,
    "loop_lag_storm_max_us": 640,
    "stall_goal": "met (longest loop stall < 1000 us and ping p50 <= 2x idle)",
    "engine_staging_bytes": 536870912,
    "engine_peak_gpu_bytes": 805306368,
    "engine_peak_to_batch": 0.375,
    "memory_goal": "met (copy engine GPU memory <= 2x a batch)",
}

TIER: dict[str, Any] = {
    "prefetch_redis": "redis://127.0.0.1:40123/0",
    "prefetch_chunks": 64,
    "prefetch_chunk_mib": 16.0,
    "prefetch_part_mib": 4.0,
    "kvrpc_prefetch_gbps": [0.92, 0.95, 0.9, 0.93, 0.94],
    "redis_server_cpu_per_kvrpc_second": [0.95, 0.94, 0.96, 0.95, 0.95],
    "redis_io_threads": 1,
    "kvrpc_via_redis_py_gbps": [0.61, 0.6, 0.63, 0.62, 0.6],
    "redis_py_pipelined_gbps": [0.71, 0.7, 0.72, 0.7, 0.69],
    "prefetch_ratio_median": 1.31,
    "prefetch_ratio_range": [1.28, 1.35],
    "prefetch_goal": "met (ratio >= 1)",
    "lookup_prompt_tokens": 32768,
    "lookup_redis_writes": 256,
    "lookup_without_tier_p50_us": 80.1,
    "lookup_without_tier_p99_us": 140.3,
    "lookup_with_redis_tier_p50_us": 83.0,
    "lookup_with_redis_tier_p99_us": 150.2,
    "lookup_redis_finds": 0,
    "lookup_p50_ratio": 1.036,
    "lookup_goal": "met (ratio <= 1.1)",
    "outage": "kill",
    "outage_seconds": 60.0,
    "outage_pool_gib": 1.0,
    "outage_write_budget_bytes": 268435456,
    "outage_rss_before_bytes": 1288490188,
    "outage_rss_peak_bytes": 1395864371,
    "outage_rss_to_bound": 0.897,
    "outage_tier_used_again": True,
    "outage_goal": "met (peak RSS <= 1.05x (RSS before + write budget))",
}

Plot = Callable[[dict[str, Any], str], None]


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 10_000  # panels, bars and labels, not an empty canvas


@pytest.mark.parametrize(
    ("plot", "figures"),
    [(plot_rpc, RPC), (plot_kv, KV), (plot_gpu, GPU), (plot_tier, TIER)],
    ids=["rpc", "kv", "gpu", "tier"],
)
def test_each_bench_plot_writes_a_png_and_leaves_the_figures_as_they_were(
    plot: Plot, figures: dict[str, Any], tmp_path: Path
) -> None:
    before = copy.deepcopy(figures)
    out = tmp_path / "figures.png"
    plot(figures, str(out))
    _assert_png(out)
    assert figures == before


def test_the_rpc_plot_knows_every_prefix_the_rpc_bench_writes() -> None:
    assert set(RPC_CONTENDERS) == {
        *("", "raw_", "sync_", "sync_direct_", "raw_sync_", "raw_zmq_sync_", "lmcache_")
    }


def test_an_inproc_rpc_run_with_no_baseline_still_plots(tmp_path: Path) -> None:
    figures = {"url": "inproc://kvrpc-bench", **_contender("", 20.0, 90000.0)}
    plot_rpc(figures, str(tmp_path / "rpc.png"))
    _assert_png(tmp_path / "rpc.png")


@pytest.mark.parametrize("only", ["lookup", "transfer", "memory"])
def test_a_kv_run_of_one_figure_plots_that_figure(only: str, tmp_path: Path) -> None:
    keys = {
        "lookup": ("ping_", "lookup", "hashing", "end_session"),
        "transfer": ("store_", "retrieve_", "memcpy_", "transfer_"),
        "memory": ("tiny_", "memory_"),
    }[only]
    figures = {k: v for k, v in KV.items() if k == "url" or k.startswith(keys)}
    plot_kv(figures, str(tmp_path / "kv.png"))
    _assert_png(tmp_path / "kv.png")


def test_a_tier_run_of_the_outage_alone_plots_it(tmp_path: Path) -> None:
    figures = {k: v for k, v in TIER.items() if k.startswith("outage")}
    plot_tier(figures, str(tmp_path / "tier.png"))
    _assert_png(tmp_path / "tier.png")


@pytest.mark.parametrize("plot", [plot_rpc, plot_kv, plot_gpu, plot_tier])
def test_figures_of_another_bench_are_refused_and_no_file_is_written(
    plot: Plot, tmp_path: Path
) -> None:
    out = tmp_path / "none.png"
    with pytest.raises(ValueError, match="no figures to plot"):
        plot({"url": "unix:///tmp/x.sock", "e2e_goal": "met"}, str(out))
    assert not out.exists()


def _kvrpc(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvrpc", *argv], capture_output=True, text=True, timeout=180
    )


def test_bench_rpc_plot_flag_draws_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "rpc.png"
    done = _kvrpc(
        "bench", "rpc", "--url", "inproc://plot-bench", "--calls", "100", "--pipelined", "200",
        "--payload-mib", "1", "--rounds", "1", "--interleave", "1", "--plot", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"plot written to {out}" in done.stdout
    _assert_png(out)


def test_bench_kv_plot_flag_draws_the_figures_it_took(tmp_path: Path) -> None:
    out = tmp_path / "kv.png"
    done = _kvrpc(
        "bench", "kv", "--quick", "--only", "memory", "--tiny-chunks", "2000", "--plot", str(out)
    )
    assert done.returncode == 0, done.stderr
    _assert_png(out)
