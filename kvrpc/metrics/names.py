"""Every metric the endpoint exports: its name, type, labels and meaning, in one table.

The collector builds its families from this table and docs/operating.md lists the same
names (a test checks that they agree). Labels are bounded sets: listener URLs (the
server's own flags), protocol names, status codes, tiers, directions, fixed reasons;
never request ids or client ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["METRICS", "Metric"]


@dataclass(frozen=True)
class Metric:
    """One exported metric family."""

    name: str  #: as exposed (counters end in ``_total``)
    kind: Literal["counter", "gauge", "histogram"]
    labels: tuple[str, ...]
    help: str


def _m(name: str, kind: Literal["counter", "gauge", "histogram"], labels: str, text: str) -> Metric:
    return Metric(name, kind, tuple(labels.split()), text)


METRICS: tuple[Metric, ...] = (
    # ------------------------------------------------------------------ RPC
    _m("kvrpc_rpc_requests_total", "counter", "listener", "Requests decoded."),
    _m("kvrpc_rpc_responses_total", "counter", "listener", "Successful replies sent."),
    _m("kvrpc_rpc_error_replies_total", "counter", "listener", "Error replies sent, any reason."),
    _m(
        "kvrpc_rpc_refused_total", "counter", "listener reason",
        "Messages refused before a handler ran: oversized, malformed, unknown_protocol, "
        "invalid_payload, busy, unexpected.",
    ),
    _m(
        "kvrpc_rpc_dropped_total", "counter", "listener",
        "Messages dropped with no reply at all (no request id could be read).",
    ),
    _m("kvrpc_rpc_in_flight", "gauge", "listener", "Requests running in tasks or threads now."),
    _m(
        "kvrpc_rpc_calls_total", "counter", "protocol status",
        "Handler calls by outcome: OK, or the name of the error's status code.",
    ),
    _m(
        "kvrpc_rpc_handler_seconds", "histogram", "protocol",
        "Time in the handler, from its start to its result (awaited work included).",
    ),
    _m("kvrpc_process_max_rss_bytes", "gauge", "", "Peak resident memory of the server process."),
    # ------------------------------------------------------------------ transports
    _m("kvrpc_transport_connections_total", "counter", "listener", "Connections accepted."),
    _m("kvrpc_transport_disconnects_total", "counter", "listener", "Connections ended."),
    _m("kvrpc_transport_open_connections", "gauge", "listener", "Connections open now."),
    _m(
        "kvrpc_transport_malformed_total", "counter", "listener",
        "Connections closed for input that is not the transport's framing.",
    ),
    _m(
        "kvrpc_transport_dropped_total", "counter", "listener",
        "Replies or peers dropped because a client stopped reading.",
    ),
    _m(
        "kvrpc_transport_events_total", "counter", "listener event",
        "The transport's other counters (backlogged, stalled, skipped, handshake failures...).",
    ),
    # ------------------------------------------------------------------ KV service
    _m("kvrpc_kv_lookups_total", "counter", "", "kv.lookup calls."),
    _m(
        "kvrpc_kv_lookup_chunks_total", "counter", "result",
        "Chunks looked up, by result: hit (on every rank, pinned) or miss.",
    ),
    _m("kvrpc_kv_hit_tokens_total", "counter", "", "Tokens of the chunks lookups hit."),
    _m(
        "kvrpc_kv_stores_total", "counter", "outcome",
        "Chunks offered to L1 by stores: stored, duplicate (already there), refused (no room).",
    ),
    _m(
        "kvrpc_kv_retrieves_total", "counter", "outcome",
        "Chunks asked for by retrieves: retrieved, or missed (not in L1).",
    ),
    _m(
        "kvrpc_kv_tier_bytes_total", "counter", "tier direction",
        "Bytes moved into (in) and out of (out) each tier: l1, disk, redis.",
    ),
    _m(
        "kvrpc_kv_tier_chunks_total", "counter", "tier direction",
        "Chunks moved into (in) and out of (out) each tier.",
    ),
    _m("kvrpc_kv_evictions_total", "counter", "tier", "Chunks evicted to make room (l1, disk)."),
    _m("kvrpc_kv_chunks", "gauge", "tier", "Chunks held now (l1, disk)."),
    _m("kvrpc_kv_used_bytes", "gauge", "tier", "Bytes held now (redis: the store's used_memory)."),
    _m("kvrpc_kv_capacity_bytes", "gauge", "tier", "Each tier's size limit (0: unbounded)."),
    _m("kvrpc_kv_pinned_chunks", "gauge", "", "L1 chunks pinned by open sessions or copies."),
    _m("kvrpc_kv_sessions", "gauge", "", "Open lookup sessions."),
    _m("kvrpc_kv_clients", "gauge", "", "Clients (schedulers and workers) known now."),
    _m("kvrpc_kv_instances", "gauge", "", "Registered KV caches (one per worker)."),
    _m(
        "kvrpc_kv_clients_expired_total", "counter", "",
        "Clients dropped after --client-timeout of silence.",
    ),
    _m(
        "kvrpc_kv_client_limits_total", "counter", "",
        "Calls refused for a per-client cap (--max-...-per-client).",
    ),
    _m(
        "kvrpc_kv_not_owner_total", "counter", "",
        "Calls refused for naming another client's session or client id.",
    ),
    _m("kvrpc_kv_prefetch_jobs_total", "counter", "", "Prefetch jobs started by lookups."),
    _m("kvrpc_kv_prefetch_jobs_open", "gauge", "", "Prefetch jobs running or unanswered."),
    _m("kvrpc_kv_prefetched_chunks_total", "counter", "", "Chunks loaded into L1 by prefetches."),
    _m("kvrpc_kv_tier_up", "gauge", "tier", "1 while a configured tier is usable, else 0."),
    _m(
        "kvrpc_kv_tier_state", "gauge", "tier",
        "A remote tier's breaker: 0 up, 1 skipped after a failure, 2 probing.",
    ),
    _m("kvrpc_kv_tier_trips_total", "counter", "tier", "Times a remote tier's breaker opened."),
    _m("kvrpc_kv_tier_probes_total", "counter", "tier", "Probes of a skipped remote tier."),
    _m(
        "kvrpc_kv_tier_errors_total", "counter", "tier kind",
        "Tier failures: disk errors/refused; redis errors, timeouts, write_errors, corrupt.",
    ),
    _m(
        "kvrpc_kv_tier_writes_lost_total", "counter", "tier reason",
        "Writes a remote tier never made: dropped (past the write budget), skipped (tier down).",
    ),
    _m("kvrpc_kv_tier_write_queue_bytes", "gauge", "tier", "Bytes queued for a remote tier."),
    _m("kvrpc_kv_tier_write_budget_bytes", "gauge", "tier", "The write queue's byte budget."),
    _m(
        "kvrpc_kv_tier_find_chunks_total", "counter", "tier result",
        "Chunks a lookup asked a remote tier about, by result: hit or miss.",
    ),
    _m(
        "kvrpc_kv_copy_engine_busy_seconds_total", "counter", "",
        "GPU time of the copy engines' batches (cuda_ipc stores and retrieves).",
    ),
    _m("kvrpc_kv_copy_engine_batches_total", "counter", "", "Batches the GPU copy engines ran."),
    _m("kvrpc_kv_copy_engine_bytes_total", "counter", "", "Bytes the GPU copy engines moved."),
    # ------------------------------------------------------------------ event loop
    _m(
        "kvrpc_event_loop_lag_seconds", "histogram", "",
        "How late a timer on the server's loop fired (sampled twice a second).",
    ),
    _m("kvrpc_event_loop_lag_worst_seconds", "gauge", "", "The largest loop lag sampled."),
)  # fmt: skip
