"""The Prometheus collector: kvrpc's own counters, read at scrape time.

Nothing is counted twice: the collector reads the figures the server already keeps
(``rpc.stats``'s :class:`~kvrpc.server.ServerStats`, the transports' counters, the KV
state's counters and the tiers' ``stats()``), plus the call observer's histograms and the
loop-lag timer. A scrape runs on the server's loop thread, the thread that owns all of
them, so it reads them without locks; its cost grows with the number of protocols and
listeners, never with chunks or clients.

This module imports ``prometheus_client`` (the ``kvrpc[metrics]`` extra); nothing in
kvrpc imports it unless ``kvrpc serve --metrics-port`` asks for the endpoint.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kvrpc._memory import max_rss_bytes
from kvrpc.metrics.calls import LATENCY_BOUNDS, CallObserver, status_name
from kvrpc.metrics.looplag import LAG_BOUNDS, LoopLagTimer
from kvrpc.metrics.names import METRICS

if TYPE_CHECKING:
    from kvrpc.kv.server.service import KVService
    from kvrpc.server import RPCServer

__all__ = ["CONTENT_TYPE_LATEST", "KVRPCCollector", "exposition", "registry_of"]

# ServerStats fields that count refusals, by the reason label they get.
_REFUSALS = ("oversized", "malformed", "unknown_protocol", "invalid_payload", "busy", "unexpected")
# Transport counters with a metric of their own; the rest go to kvrpc_transport_events_total.
_NAMED_TRANSPORT = ("connections", "disconnects", "malformed", "dropped")
_TIER_ERRORS = {
    "disk": ("errors", "corrupt", "refused"),
    "redis": ("errors", "timeouts", "write_errors", "corrupt"),
}


class _Families:
    """The families of :data:`METRICS`, filled as the scrape reads the figures."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}
        for metric in METRICS:
            family: Metric
            if metric.kind == "counter":
                family = CounterMetricFamily(metric.name, metric.help, labels=metric.labels)
            elif metric.kind == "gauge":
                family = GaugeMetricFamily(metric.name, metric.help, labels=metric.labels)
            else:
                family = HistogramMetricFamily(metric.name, metric.help, labels=metric.labels)
            self.families[metric.name] = family

    def add(self, name: str, value: float, *labels: str) -> None:
        family = self.families[name]
        assert isinstance(family, CounterMetricFamily | GaugeMetricFamily)
        family.add_metric(list(labels), value)

    def histogram(
        self,
        name: str,
        bounds: Sequence[float],
        buckets: Sequence[int],
        total: float,
        *labels: str,
    ) -> None:
        family = self.families[name]
        assert isinstance(family, HistogramMetricFamily)
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip([*bounds, float("inf")], buckets, strict=True):
            running += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
        family.add_metric(list(labels), cumulative, total)


class KVRPCCollector(Collector):
    """Reads ``servers``, ``service``, ``calls`` and ``lag`` whenever it is collected.

    Collect it on the loop that serves them (the metrics endpoint does).
    """

    def __init__(
        self,
        servers: Sequence[RPCServer],
        service: KVService | None,
        calls: CallObserver | None = None,
        lag: LoopLagTimer | None = None,
    ) -> None:
        self.servers = list(servers)
        self.service = service
        self.calls = calls
        self.lag = lag

    def describe(self) -> Iterator[Metric]:
        """The families, without samples (so a registry need not collect to register)."""
        return iter(_Families().families.values())

    def collect(self) -> Iterator[Metric]:
        """Every family of :data:`~kvrpc.metrics.names.METRICS`, with today's figures."""
        out = _Families()
        self._rpc(out)
        if self.service is not None:
            self._kv(out, self.service)
        if self.lag is not None:
            lag = self.lag
            out.histogram("kvrpc_event_loop_lag_seconds", LAG_BOUNDS, lag.buckets, lag.seconds)
            out.add("kvrpc_event_loop_lag_worst_seconds", lag.worst)
        return iter(out.families.values())

    def _rpc(self, out: _Families) -> None:
        for server in self.servers:
            url = server.url
            stats = server.stats
            out.add("kvrpc_rpc_requests_total", stats.requests, url)
            out.add("kvrpc_rpc_responses_total", stats.responses, url)
            out.add("kvrpc_rpc_error_replies_total", stats.error_replies, url)
            for reason in _REFUSALS:
                out.add("kvrpc_rpc_refused_total", getattr(stats, reason), url, reason)
            out.add("kvrpc_rpc_dropped_total", stats.dropped, url)
            out.add("kvrpc_rpc_in_flight", stats.in_flight, url)
            transport = server.transport_stats()
            for name in _NAMED_TRANSPORT:
                out.add(f"kvrpc_transport_{name}_total", transport.get(name, 0), url)
            opened = transport.get("connections", 0) - transport.get("disconnects", 0)
            out.add("kvrpc_transport_open_connections", max(0, opened), url)
            for name, value in sorted(transport.items()):
                if name not in _NAMED_TRANSPORT:
                    out.add("kvrpc_transport_events_total", value, url, name)
        out.add("kvrpc_process_max_rss_bytes", max_rss_bytes())
        if self.calls is not None:
            for protocol, record in self.calls.snapshot():
                out.add("kvrpc_rpc_calls_total", record.ok, protocol, "OK")
                for code, count in sorted(record.errors.items()):
                    out.add("kvrpc_rpc_calls_total", count, protocol, status_name(code))
                out.histogram(
                    "kvrpc_rpc_handler_seconds",
                    LATENCY_BOUNDS,
                    record.buckets,
                    record.seconds,
                    protocol,
                )

    def _kv(self, out: _Families, service: KVService) -> None:
        from kvrpc.metrics.health import tier_health

        kv = service.state.stats(service.cpu_buffer_bytes)
        out.add("kvrpc_kv_lookups_total", kv["lookups"])
        out.add("kvrpc_kv_lookup_chunks_total", kv["hits"], "hit")
        out.add("kvrpc_kv_lookup_chunks_total", kv["misses"], "miss")
        out.add("kvrpc_kv_hit_tokens_total", kv["hits"] * kv["chunk_size"])
        out.add("kvrpc_kv_stores_total", kv["stores"], "stored")
        out.add("kvrpc_kv_stores_total", kv["store_duplicates"], "duplicate")
        out.add("kvrpc_kv_stores_total", kv["store_refused"], "refused")
        out.add("kvrpc_kv_retrieves_total", kv["retrieves"], "retrieved")
        out.add("kvrpc_kv_retrieves_total", kv["retrieve_misses"], "missed")
        out.add("kvrpc_kv_tier_bytes_total", kv["store_bytes"], "l1", "in")
        out.add("kvrpc_kv_tier_bytes_total", kv["retrieve_bytes"], "l1", "out")
        out.add("kvrpc_kv_tier_chunks_total", kv["stores"], "l1", "in")
        out.add("kvrpc_kv_tier_chunks_total", kv["retrieves"], "l1", "out")
        out.add("kvrpc_kv_evictions_total", kv["evictions"], "l1")
        out.add("kvrpc_kv_chunks", kv["chunks"], "l1")
        out.add("kvrpc_kv_used_bytes", kv["bytes_used"], "l1")
        out.add("kvrpc_kv_capacity_bytes", service.cpu_buffer_bytes, "l1")
        out.add("kvrpc_kv_pinned_chunks", kv["pinned_chunks"])
        out.add("kvrpc_kv_sessions", kv["sessions"])
        out.add("kvrpc_kv_clients", kv["clients"])
        out.add("kvrpc_kv_instances", kv["instances"])
        out.add("kvrpc_kv_clients_expired_total", kv["clients_expired"])
        out.add("kvrpc_kv_client_limits_total", kv["client_limits"])
        out.add("kvrpc_kv_not_owner_total", kv["not_owner"])
        out.add("kvrpc_kv_prefetch_jobs_total", kv["prefetch_jobs"])
        out.add("kvrpc_kv_prefetch_jobs_open", kv["prefetch_jobs_open"])
        out.add("kvrpc_kv_prefetched_chunks_total", kv["prefetched"])
        for tier in tier_health(service):
            out.add("kvrpc_kv_tier_up", 1 if tier.up else 0, tier.name)
        if service.lower_tier is not None:
            disk = service.lower_tier.stats()
            out.add("kvrpc_kv_tier_bytes_total", disk.get("save_bytes", 0), "disk", "in")
            out.add("kvrpc_kv_tier_bytes_total", disk.get("load_bytes", 0), "disk", "out")
            out.add("kvrpc_kv_tier_chunks_total", disk.get("saves", 0), "disk", "in")
            out.add("kvrpc_kv_tier_chunks_total", disk.get("loads", 0), "disk", "out")
            out.add("kvrpc_kv_evictions_total", disk.get("evictions", 0), "disk")
            out.add("kvrpc_kv_chunks", disk.get("files", 0), "disk")
            out.add("kvrpc_kv_used_bytes", disk.get("bytes", 0), "disk")
            out.add("kvrpc_kv_capacity_bytes", disk.get("capacity", 0), "disk")
            out.add("kvrpc_kv_tier_state", 0, "disk")
            for kind in _TIER_ERRORS["disk"]:
                out.add("kvrpc_kv_tier_errors_total", disk.get(kind, 0), "disk", kind)
        if service.remote_tier is not None:
            redis = service.remote_tier.stats()
            out.add("kvrpc_kv_tier_bytes_total", redis.get("write_bytes", 0), "redis", "in")
            out.add("kvrpc_kv_tier_bytes_total", redis.get("load_bytes", 0), "redis", "out")
            out.add("kvrpc_kv_tier_chunks_total", redis.get("writes", 0), "redis", "in")
            out.add("kvrpc_kv_tier_chunks_total", redis.get("loads", 0), "redis", "out")
            out.add("kvrpc_kv_used_bytes", redis.get("used_bytes", 0), "redis")
            out.add("kvrpc_kv_capacity_bytes", redis.get("capacity", 0), "redis")
            out.add("kvrpc_kv_tier_state", redis.get("state", 0), "redis")
            out.add("kvrpc_kv_tier_trips_total", redis.get("trips", 0), "redis")
            out.add("kvrpc_kv_tier_probes_total", redis.get("probes", 0), "redis")
            for kind in _TIER_ERRORS["redis"]:
                out.add("kvrpc_kv_tier_errors_total", redis.get(kind, 0), "redis", kind)
            out.add(
                "kvrpc_kv_tier_writes_lost_total", redis.get("write_dropped", 0), "redis", "dropped"
            )
            out.add(
                "kvrpc_kv_tier_writes_lost_total", redis.get("write_skipped", 0), "redis", "skipped"
            )
            out.add("kvrpc_kv_tier_write_queue_bytes", redis.get("write_queued_bytes", 0), "redis")
            out.add("kvrpc_kv_tier_write_budget_bytes", redis.get("write_budget", 0), "redis")
            out.add("kvrpc_kv_tier_find_chunks_total", redis.get("hits", 0), "redis", "hit")
            out.add("kvrpc_kv_tier_find_chunks_total", redis.get("misses", 0), "redis", "miss")
        gpu = service.gpu.stats()
        out.add("kvrpc_kv_copy_engine_busy_seconds_total", gpu.get("cuda_busy_us", 0) / 1e6)
        out.add("kvrpc_kv_copy_engine_batches_total", gpu.get("cuda_batches", 0))
        out.add("kvrpc_kv_copy_engine_bytes_total", gpu.get("cuda_bytes_moved", 0))


def registry_of(collector: KVRPCCollector) -> CollectorRegistry:
    """A registry holding ``collector`` alone: not the global one, which other code may fill."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition format (``CONTENT_TYPE_LATEST``) of what ``registry`` holds."""
    return generate_latest(registry)
