"""``kvrpc stats``'s table: a server's ``rpc.stats`` and ``kv.stats`` for a person to read.

:func:`render_stats` is pure: a report in, text out. Keys are grouped by what they describe
(RPC, transport, L1, each tier, CUDA, the event loop) and shown in the order the server
reports them; a key this module has never heard of still shows, in its group, so a new
counter is never hidden. Given the previous report and the seconds between the two, counters
also show their rate per second (``--watch``).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["render_stats"]

Report = Mapping[str, Mapping[str, int]]

# Figures that are levels, not counts since start: they get no rate.
_GAUGES = frozenset(
    {
        "in_flight", "max_rss_bytes", "chunks", "bytes_used", "bytes_free", "slot_bytes",
        "pinned_chunks", "sessions", "clients", "instances", "prefetch_jobs_open",
        "chunk_size", "tier_files", "tier_bytes", "tier_capacity", "redis_used_bytes",
        "redis_capacity", "redis_state", "redis_write_budget", "redis_write_queued_bytes",
        "redis_write_queued", "cuda_staging_bytes", "cuda_last_batch_gpu_us",
        "cuda_last_handler_us", "cuda_peak_allocated_bytes",
    }
)  # fmt: skip
_REDIS_STATES = {0: "up", 1: "skipped (down)", 2: "probing"}
# (title, source, key prefix); a kv key goes to the first group whose prefix it has.
_KV_GROUPS = (
    ("Disk tier", "tier_"),
    ("Redis tier", "redis_"),
    ("CUDA copy engines", "cuda_"),
    ("Event loop (since the last read)", "loop_"),
    ("Event loop (since the last read)", "gc_"),
)
_LABEL_WIDTH = 30
_VALUE_WIDTH = 16


def render_stats(
    report: Report,
    *,
    title: str = "",
    previous: Report | None = None,
    interval: float | None = None,
) -> str:
    """The table of ``report`` (``{"rpc": rpc.stats, "kv": kv.stats}``, ``kv`` optional).

    With ``previous`` (an earlier report of the same server) and ``interval`` (seconds
    between the two), counters show their rate per second beside their total.
    """
    rates = previous is not None and interval is not None and interval > 0
    groups: dict[str, list[tuple[str, str, str]]] = {}

    def row(group: str, source: str, key: str, label: str) -> None:
        value = report[source][key]
        rate = ""
        if rates and key not in _GAUGES and not key.startswith(("loop_", "gc_")):
            assert previous is not None and interval is not None
            before = previous.get(source, {}).get(key)
            if before is not None:
                rate = _per_second(key, (value - before) / interval)
        groups.setdefault(group, []).append((label, _value(key, value), rate))

    rpc = report.get("rpc", {})
    for key in rpc:
        if key.startswith("transport_"):
            row("Transport", "rpc", key, _label(key.removeprefix("transport_")))
        else:
            row("RPC", "rpc", key, _label(key))
    kv = report.get("kv", {})
    for key in kv:
        for title_of, prefix in _KV_GROUPS:
            if key.startswith(prefix):
                label = key.removeprefix(prefix) if prefix in ("tier_", "redis_", "cuda_") else key
                row(title_of, "kv", key, _label(label))
                break
        else:
            row("KV cache (L1)", "kv", key, _label(key))
    if kv:
        _derived(kv, groups)
    lines = [title] if title else []
    header = f"{'':<{_LABEL_WIDTH}}{'total':>{_VALUE_WIDTH}}" + (f"{'per s':>12}" if rates else "")
    lines.append(header.rstrip())
    for group, rows in groups.items():
        lines.append(group)
        for label, value, rate in rows:
            line = f"  {label:<{_LABEL_WIDTH - 2}}{value:>{_VALUE_WIDTH}}"
            lines.append((line + (f"{rate:>12}" if rates else "")).rstrip())
    return "\n".join(lines)


def _derived(kv: Mapping[str, int], groups: dict[str, list[tuple[str, str, str]]]) -> None:
    """Rows an operator would otherwise work out: the hit rate and how full L1 is."""
    looked_up = kv.get("hits", 0) + kv.get("misses", 0)
    rows = groups.setdefault("KV cache (L1)", [])
    if looked_up:
        rows.insert(0, ("hit rate (chunks)", f"{kv.get('hits', 0) / looked_up:.1%}", ""))
    held = kv.get("bytes_used", 0) + kv.get("bytes_free", 0)
    if held:
        rows.insert(0, ("L1 full", f"{kv.get('bytes_used', 0) / held:.1%}", ""))


def _label(key: str) -> str:
    # The value says its unit ("12 us", "1.0 KiB"); the label need not.
    return key.removesuffix("_us").removesuffix("_bytes").replace("_", " ")


def _value(key: str, value: int) -> str:
    if key == "redis_state":
        return _REDIS_STATES.get(value, str(value))
    if _is_bytes(key):
        return _size(value)
    if key.endswith("_us"):
        return f"{value:,} us"
    return f"{value:,}"


def _per_second(key: str, rate: float) -> str:
    if _is_bytes(key):
        return f"{_size(rate)}/s"
    return f"{rate:,.1f}"


def _is_bytes(key: str) -> bool:
    return "bytes" in key or key.endswith(("capacity", "budget"))


def _size(value: float) -> str:
    """Bytes in the largest binary unit that keeps a number of at least 1."""
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(amount) < 1024 or unit == "TiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    raise AssertionError("unreachable")
