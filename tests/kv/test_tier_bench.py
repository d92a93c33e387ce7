"""``kvrpc bench tier --quick``: its three figures are taken against real redis-servers.

The figures' values are not asserted (a bench reports them); what is asserted is that each
figure measured what it names: the prefetch's bytes came back whole (the bench raises
otherwise), the lookups found everything in L1 and never asked Redis, and the outage really
took Redis down, skipped the tier while the stores went on, and saw it used again after.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvrpc.testing.redis_server import redis_available

pytestmark = pytest.mark.skipif(
    not redis_available(), reason="needs redis-server (tools/ensure-redis-server.sh)"
)


def bench_tier(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "tier.json"
    done = subprocess.run(
        [sys.executable, "-m", "kvrpc", "bench", "tier", "--quick", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    figures: dict[str, Any] = json.loads(out.read_text())
    return figures


def test_quick_tier_bench_takes_its_three_figures(tmp_path: Path) -> None:
    figures = bench_tier(tmp_path, "--outage-seconds", "2")

    assert figures["prefetch_chunks"] == 16
    assert len(figures["kvrpc_prefetch_gbps"]) == len(figures["redis_py_pipelined_gbps"]) == 3
    assert min(figures["kvrpc_prefetch_gbps"] + figures["redis_py_pipelined_gbps"]) > 0

    # Both ranks' 128 chunks reached Redis, and no lookup of them asked it anything.
    assert figures["lookup_redis_writes"] == 256
    assert figures["lookup_redis_finds"] == 0
    for name in ("without_tier", "with_redis_tier"):
        assert 0 < figures[f"lookup_{name}_p50_us"] <= figures[f"lookup_{name}_p99_us"]

    # Killed: the breaker opened, stores went on with their writes skipped, and the tier
    # wrote to the restarted Redis with no restart of the server.
    assert figures["outage"] == "kill"
    assert figures["outage_redis_trips"] >= 1
    assert figures["outage_stores_down"] >= 1
    assert figures["outage_write_skipped"] > 0
    assert figures["outage_tier_used_again"] is True
    assert figures["outage_redis_state_after"] == 0
    assert figures["outage_rss_peak_bytes"] >= figures["outage_rss_before_bytes"] > 0
    for name in ("prefetch_goal", "lookup_goal", "outage_goal"):
        assert figures[name].startswith(("met", "MISSED")), name


def test_a_paused_redis_fills_the_write_queue_no_further_than_its_budget(tmp_path: Path) -> None:
    figures = bench_tier(tmp_path, "--only", "outage", "--outage", "pause")

    assert "prefetch_chunks" not in figures and "lookup_p50_ratio" not in figures
    assert figures["outage"] == "pause"
    # A paused Redis answers nothing: writes wait for their timeout, then the tier is skipped.
    assert figures["outage_redis_trips"] >= 1
    assert figures["outage_write_skipped"] + figures["outage_write_dropped"] > 0
    assert 0 <= figures["outage_queue_peak_bytes"] <= figures["outage_write_budget_bytes"]
    assert figures["outage_tier_used_again"] is True
