"""``kvrpc bench metrics`` at tiny sizes: every figure is taken, against two real servers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")


def test_bench_metrics_takes_the_scrape_and_ping_cost_figures(tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    argv = ["--chunks", "200", "--clients", "4", "--scrapes", "5", "--pings", "20"]
    done = subprocess.run(
        [sys.executable, "-m", "kvrpc", "bench", "metrics", *argv, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert "scrape_p50_ms" in done.stdout  # the table on stdout
    figures = json.loads(out.read_text())

    # The state the figures were taken in: both servers held the chunks and the clients.
    assert (figures["chunks"], figures["clients"], figures["scrapes"]) == (200, 4, 5)
    assert figures["metrics_endpoint"].startswith("http://127.0.0.1:")
    assert figures["url"] != figures["plain_url"]

    # Scrape: real bodies with samples, timed.
    assert figures["scrape_bytes"] > 0
    assert figures["scrape_samples"] > 0
    assert 0 < figures["scrape_p50_ms"] <= figures["scrape_p99_ms"] <= figures["scrape_max_ms"]

    # Ping cost: both servers timed; the ratio and the cost are one figure two ways.
    assert figures["pings"] == 20
    for name in ("with_metrics", "without_metrics"):
        assert 0 < figures[f"ping_{name}_p50_us"] <= figures[f"ping_{name}_p99_us"], name
    assert figures["ping_p50_ratio_with_metrics"] > 0
    assert figures["metrics_ping_cost_percent"] == pytest.approx(
        (figures["ping_p50_ratio_with_metrics"] - 1) * 100, abs=0.02
    )
    for verdict in ("scrape_goal", "ping_cost_goal"):
        assert figures[verdict].startswith(("met", "MISSED")), verdict
