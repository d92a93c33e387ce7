"""``kvrpc bench soak``: the growth figures' rules, and a short soak run end to end.

The short run checks the shape of what the bench reports (its table, its JSON, the goals'
verdict lines, its plot), never its speed: speed is the bench's to measure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvrpc.bench.soak import Sample, growth_figures


def _sample(rss_mib: float, p99_us: float) -> Sample:
    return Sample(1.0, int(rss_mib * (1 << 20)), 20, 100, 200, 1000, p99_us, 0)


def test_growth_compares_the_last_interval_with_the_first_and_judges_each_goal() -> None:
    figures = growth_figures([_sample(100, 1000), _sample(150, 900), _sample(104, 2500)], 10, 0)
    assert figures["rss_growth_pct"] == 4.0
    assert figures["p99_drift"] == 2.5
    assert figures["fd_growth"] == 0
    assert figures["rss_goal"].startswith("met (4.00% vs < 5%")
    assert figures["fd_goal"].startswith("met (")
    assert figures["p99_goal"].startswith("MISSED (2.50x vs < 2x")
    assert "too short" not in figures["rss_goal"]


def test_a_leak_misses_its_goals_and_a_short_soak_says_it_is_too_short_to_judge() -> None:
    figures = growth_figures([_sample(100, 1000), _sample(106, 1000)], 0.5, 3)
    assert figures["rss_goal"].startswith("MISSED (6.00%")
    assert figures["fd_goal"].startswith("MISSED (+3 descriptors")
    assert figures["p99_goal"].startswith("met (1.00x")
    assert all("too short to judge" in figures[g] for g in ("rss_goal", "fd_goal", "p99_goal"))


def test_growth_needs_two_samples() -> None:
    with pytest.raises(ValueError, match="two samples"):
        growth_figures([_sample(100, 1000)], 10, 0)


def test_an_interval_leaving_fewer_than_two_samples_is_bad_usage() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvrpc", "bench", "soak", "--minutes", "0.1", "--interval", "4"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--interval" in done.stderr and "Traceback" not in done.stderr


def test_a_short_soak_prints_its_intervals_and_verdicts_and_writes_json_and_a_plot(
    tmp_path: Path,
) -> None:
    pytest.importorskip("matplotlib")
    out, plot = tmp_path / "soak.json", tmp_path / "soak.png"
    done = subprocess.run(
        [
            sys.executable, "-m", "kvrpc", "bench", "soak", "--minutes", "0.2",
            "--clients", "2", "--json", str(out), "--plot", str(plot),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == [
        "at_s", "rss_mib", "fds", "loop_lag_p99_us", "loop_lag_max_us", "calls",
        "call_p99_us", "errors",
    ]  # fmt: skip
    figures = json.loads(out.read_text())
    rows = figures["intervals"]
    assert len(rows) >= 2
    assert all(row["rss_mib"] > 0 and row["fds"] > 0 and row["calls"] > 0 for row in rows)
    assert sum(row["errors"] for row in rows) == 0
    assert figures["lookups"] > 0 and figures["stores"] > 0
    for name in ("rss_goal", "fd_goal", "p99_goal"):
        assert figures[name].startswith(("met (", "MISSED (")), figures[name]
        assert any(line.startswith(name) and "too short" in line for line in lines)
    assert isinstance(figures["fd_growth"], int) and isinstance(figures["p99_drift"], float)
    assert plot.read_bytes().startswith(b"\x89PNG")
