"""Plots of the benches' figures, for ``--plot FILE.png``: one function per bench.

Each ``plot_*`` function reads a figures dict as its bench returns it (and as ``--json``
writes it), never changes it, and writes a PNG to ``path``. A panel whose figures are absent
(a bench run with ``--only``, a baseline that had nothing to measure on this transport) is
left out; a panel's title carries the goal's verdict where the bench gave one, so the plot
says what the table says. Raises :class:`ValueError` if the dict holds none of the figures
the plot draws.

matplotlib (the ``plot`` extra) is imported only when a plot is drawn, with its file-only
``Agg`` backend: no display is needed, and the benches run without matplotlib installed.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["RPC_CONTENDERS", "plot_gpu", "plot_kv", "plot_rpc", "plot_soak", "plot_tier"]

#: ``bench rpc``'s contenders: each figure-name prefix and the label its bars get, in order.
RPC_CONTENDERS: dict[str, str] = {
    "": "kvrpc AsyncClient",
    "raw_": "raw asyncio baseline",
    "sync_": "kvrpc SyncClient",
    "sync_direct_": "kvrpc SyncClient, submit_direct",
    "raw_sync_": "raw blocking client",
    "raw_zmq_sync_": "raw blocking pyzmq",
    "lmcache_": "LMCache MQ client",
}

# A panel: its title and what draws it on the axes it is given.
_Panel = tuple[str, Callable[[Any], None]]

_MIB = 1 << 20


def plot_rpc(figures: dict[str, Any], path: str) -> None:
    """``bench rpc``: kvrpc beside each baseline the run measured (:data:`RPC_CONTENDERS`).

    Two panels: the sequential ping's p50 and p99 round trip (us), and pipelined calls/s.
    A contender appears where its ``{prefix}ping_p50_us`` figure is present.
    """
    present = [p for p in RPC_CONTENDERS if f"{p}ping_p50_us" in figures]
    labels = [RPC_CONTENDERS[p] for p in present]
    panels: list[_Panel] = []
    if present:
        latency = {
            "p50": [figures[f"{p}ping_p50_us"] for p in present],
            "p99": [figures[f"{p}ping_p99_us"] for p in present],
        }
        panels.append(
            (
                "sequential rpc.ping round trip",
                _bars(labels, latency, "microseconds", "{:.0f}", rotate=True),
            )
        )
    rated = [p for p in present if f"{p}pipelined_calls_per_s" in figures]
    if rated:
        rate = {"calls/s": [figures[f"{p}pipelined_calls_per_s"] for p in rated]}
        window = figures.get("window")
        title = "pipelined calls" + (f", {window} in flight" if window else "")
        panels.append(
            (
                title,
                _bars([RPC_CONTENDERS[p] for p in rated], rate, "calls/s", "{:,.0f}", rotate=True),
            )
        )
    _draw(path, f"kvrpc bench rpc: {figures.get('url', '')}", panels, columns=2)


def plot_kv(figures: dict[str, Any], path: str) -> None:
    """``bench kv``: the lookup, transfer and memory figures that are present, a panel each.

    Lookup: p50 and p99 (us) of every timed path beside ``rpc.ping``; transfer: store,
    retrieve and the single-threaded memcpy (GB/s); memory: bytes of metadata per chunk.
    """
    panels: list[_Panel] = []
    paths = {
        "ping": "rpc.ping",
        "lookup": "lookup (adapter)",
        "lookup_raw": "kv.lookup (raw)",
        "hashing": "hashing alone",
        "end_session_raw": "end_session",
        "lookup_busy_poll": "lookup, busy poll",
        "lookup_sleep_poll": "lookup, 20 us sleeps",
    }
    timed = [name for name in paths if f"{name}_p50_us" in figures]
    if timed:
        series = {
            "p50": [figures[f"{name}_p50_us"] for name in timed],
            "p99": [figures[f"{name}_p99_us"] for name in timed],
        }
        tokens = figures.get("lookup_prompt_tokens")
        title = "lookup" + (f" of a {tokens:,}-token prompt" if tokens else "")
        panels.append(
            (
                _titled(title, figures, "lookup_goal", "busy_poll_goal"),
                _bars([paths[n] for n in timed], series, "microseconds", "{:.0f}", rotate=True),
            )
        )
    moved = [name for name in ("store", "retrieve", "memcpy") if f"{name}_gb_per_s" in figures]
    if moved:
        rates = {"GB/s": [figures[f"{name}_gb_per_s"] for name in moved]}
        labels = [{"memcpy": "memcpy (1 thread)"}.get(name, name) for name in moved]
        panels.append(
            (_titled("transfer", figures, "transfer_goal"), _bars(labels, rates, "GB/s", "{:.2f}"))
        )
    if "tiny_metadata_bytes_per_chunk" in figures:
        per_chunk = {
            "bytes": [
                figures["tiny_metadata_bytes_per_chunk"],
                figures["tiny_store_growth_bytes_per_chunk"],
            ]
        }
        labels = ["from before registration", "from after registration"]
        chunks = figures.get("tiny_chunks")
        title = "server memory per chunk" + (f", {chunks:,} chunks" if chunks else "")
        panels.append(
            (
                _titled(title, figures, "memory_goal"),
                _bars(labels, per_chunk, "bytes per chunk", "{:.0f}"),
            )
        )
    _draw(path, f"kvrpc bench kv: {figures.get('url', '')}", panels)


def plot_gpu(figures: dict[str, Any], path: str) -> None:
    """``bench gpu``: a panel for each of its figures that is present.

    The transfers against pinned copies of the same bytes (GB/s), the first transfer after
    registration against warm ones (ms), ping and loop lag idle and during stores (us), and
    the copy engine's peak GPU memory against one batch (MiB).
    """
    panels: list[_Panel] = []
    if "store_gb_per_s" in figures:
        kinds = ["store (D2H)", "retrieve (H2D)"]
        ours = [figures["store_gb_per_s"], figures["retrieve_gb_per_s"]]
        pinned = [figures["d2h_gb_per_s"], figures["h2d_gb_per_s"]]
        if "duplex_gb_per_s" in figures:
            kinds.append("both at once")
            ours.append(figures["duplex_gb_per_s"])
            pinned.append(figures["pinned_both_ways_gb_per_s"])
        series = {"kvrpc": ours, "pinned copy": pinned}
        panels.append(
            (
                _titled("transfer rate", figures, "transfer_goal", "duplex_goal"),
                _bars(kinds, series, "GB/s", "{:.1f}"),
            )
        )
    if "first_store_ms" in figures:
        series = {
            "first after registration": [figures["first_store_ms"], figures["first_retrieve_ms"]],
        }
        if "store_ms" in figures:
            series["warm (median)"] = [figures["store_ms"], figures["retrieve_ms"]]
            series["pinned copy"] = [figures["d2h_ms"], figures["h2d_ms"]]
        panels.append(
            (
                _titled("first transfer", figures, "first_transfer_goal", "first_stall_goal"),
                _bars(["store", "retrieve"], series, "milliseconds", "{:.1f}"),
            )
        )
    if "ping_idle_p50_us" in figures:
        series = {
            "idle": [figures["ping_idle_p50_us"], figures["loop_lag_idle_max_us"]],
            "during stores": [figures["ping_storm_p50_us"], figures["loop_lag_storm_max_us"]],
        }
        panels.append(
            (
                _titled("event loop while stores run", figures, "stall_goal"),
                _bars(["ping p50", "loop lag max"], series, "microseconds", "{:.0f}"),
            )
        )
    if "engine_peak_gpu_bytes" in figures:
        memory = {
            "MiB": [
                figures["engine_peak_gpu_bytes"] / _MIB,
                figures.get("engine_staging_bytes", 0) / _MIB,
                figures["batch_bytes"] / _MIB,
            ]
        }
        labels = ["copy engine peak", "staging buffers", "one batch"]
        panels.append(
            (_titled("GPU memory", figures, "memory_goal"), _bars(labels, memory, "MiB", "{:,.0f}"))
        )
    device = figures.get("device", "")
    _draw(path, f"kvrpc bench gpu: {device} {figures.get('layout', '')}".strip(), panels)


def plot_tier(figures: dict[str, Any], path: str) -> None:
    """``bench tier``: a panel for each of its figures that is present.

    Prefetch GB/s per round of each reader, the lookup's p50 and p99 (us) with and without a
    Redis tier, and the server's resident memory in an outage against its bound (MiB).
    """
    panels: list[_Panel] = []
    if "kvrpc_prefetch_gbps" in figures:
        readers = {
            "kvrpc": figures["kvrpc_prefetch_gbps"],
            "kvrpc via redis-py": figures.get("kvrpc_via_redis_py_gbps"),
            "redis-py pipelined": figures.get("redis_py_pipelined_gbps"),
        }
        series = {name: list(rates) for name, rates in readers.items() if rates}
        rounds = [f"round {i + 1}" for i in range(len(figures["kvrpc_prefetch_gbps"]))]
        chunks, mib = figures.get("prefetch_chunks"), figures.get("prefetch_chunk_mib")
        title = "prefetch" + (f", {chunks} chunks of {mib:g} MiB" if chunks and mib else "")
        panels.append(
            (_titled(title, figures, "prefetch_goal"), _bars(rounds, series, "GB/s", "{:.2f}"))
        )
    if "lookup_without_tier_p50_us" in figures:
        names = {"without_tier": "no tier", "with_redis_tier": "with a Redis tier"}
        series = {
            "p50": [figures[f"lookup_{name}_p50_us"] for name in names],
            "p99": [figures[f"lookup_{name}_p99_us"] for name in names],
        }
        panels.append(
            (
                _titled("lookup, L1 holding the prompt", figures, "lookup_goal"),
                _bars(list(names.values()), series, "microseconds", "{:.0f}"),
            )
        )
    if "outage_rss_peak_bytes" in figures:
        before = figures["outage_rss_before_bytes"]
        memory = {
            "MiB": [
                before / _MIB,
                (before + figures["outage_write_budget_bytes"]) / _MIB,
                figures["outage_rss_peak_bytes"] / _MIB,
            ]
        }
        labels = ["before the outage", "before + write budget", "peak while down"]
        seconds = figures.get("outage_seconds")
        how = figures.get("outage", "outage")
        title = f"server RSS, Redis {how}" + (f" for {seconds:g} s" if seconds else "")
        panels.append(
            (_titled(title, figures, "outage_goal"), _bars(labels, memory, "MiB", "{:,.0f}"))
        )
    _draw(path, "kvrpc bench tier", panels)


def plot_soak(figures: dict[str, Any], path: str) -> None:
    """``bench soak``: four panels against the soak's time, a point per interval.

    The server's RSS (MiB), its descriptors, its loop lag and the calls' p99 (us); the goals'
    verdicts in the titles.
    """
    intervals = figures.get("intervals") or []
    if not intervals:
        raise ValueError(f"no figures to plot in {path}: the dict holds no soak intervals")
    at = [row["at_s"] for row in intervals]

    def column(name: str) -> list[float]:
        return [row[name] for row in intervals]

    panels: list[_Panel] = [
        (
            _titled("server RSS", figures, "rss_goal"),
            _lines(at, {"MiB": column("rss_mib")}, "MiB"),
        ),
        (
            _titled("server's open descriptors", figures, "fd_goal"),
            _lines(at, {"descriptors": column("fds")}, "descriptors"),
        ),
        (
            "server event-loop lag",
            _lines(
                at,
                {"p99": column("loop_lag_p99_us"), "max": column("loop_lag_max_us")},
                "microseconds",
            ),
        ),
        (
            _titled("call p99 (lookup; store or retrieve)", figures, "p99_goal"),
            _lines(at, {"p99": column("call_p99_us")}, "microseconds"),
        ),
    ]
    minutes = figures.get("minutes")
    _draw(path, "kvrpc bench soak" + (f", {minutes:g} minutes" if minutes else ""), panels)


# ---------------------------------------------------------------------- drawing


def _lines(
    xs: Sequence[float], series: Mapping[str, Sequence[float]], unit: str
) -> Callable[[Any], None]:
    """A drawer of one line per series against ``xs`` (seconds into a run)."""

    def draw(axes: Any) -> None:
        for name, values in series.items():
            axes.plot(xs, values, marker="o", markersize=3, label=name)
        axes.set_xlabel("seconds")
        axes.set_ylabel(unit)
        axes.set_ylim(bottom=0)
        axes.grid(True, alpha=0.3)
        if len(series) > 1:
            axes.legend(fontsize=8)

    return draw


def _titled(title: str, figures: dict[str, Any], *goals: str) -> str:
    """``title`` with the verdicts of the ``goals`` present, each on a line of its own."""
    verdicts = [str(figures[goal]) for goal in goals if goal in figures]
    return "\n".join([title, *(textwrap.fill(v, 60) for v in verdicts)])


def _bars(
    labels: Sequence[str],
    series: Mapping[str, Sequence[float]],
    unit: str,
    number: str,
    rotate: bool = False,
) -> Callable[[Any], None]:
    """A drawer of grouped bars: one group per label, one bar per series, values on top."""

    def draw(axes: Any) -> None:
        width = 0.8 / len(series)
        for index, (name, values) in enumerate(series.items()):
            offsets = [i + (index - (len(series) - 1) / 2) * width for i in range(len(values))]
            shown = [v if isinstance(v, (int, float)) and math.isfinite(v) else 0 for v in values]
            drawn = axes.bar(offsets, shown, width, label=name)
            axes.bar_label(drawn, [number.format(v) for v in shown], fontsize=7, padding=1)
        axes.set_xticks(
            range(len(labels)),
            labels,
            rotation=30 if rotate else 0,
            ha="right" if rotate else "center",
            fontsize=8,
        )
        axes.set_ylabel(unit)
        axes.margins(y=0.15)  # room for the values above the tallest bar
        axes.grid(True, axis="y", alpha=0.3)
        if len(series) > 1:
            axes.legend(fontsize=8)

    return draw


def _draw(path: str, title: str, panels: list[_Panel], columns: int | None = None) -> None:
    """The panels on one figure, written to ``path`` as a PNG."""
    if not panels:
        raise ValueError(f"no figures to plot in {path}: the dict holds none this plot draws")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = columns or min(2, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(6.5 * columns, 4.6 * rows), squeeze=False)
    cells = [axes for row in grid for axes in row]
    for axes, (name, draw) in zip(cells, panels, strict=False):
        draw(axes)
        axes.set_title(name, fontsize=9)
    for axes in cells[len(panels) :]:
        axes.set_visible(False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110, format="png")
    plt.close(figure)
