"""The connector's counters as vLLM's own Prometheus metrics: :class:`KvrpcPromMetrics`.

vLLM's ``PrometheusStatLogger`` asks the connector class for them once
(``KvrpcConnector.build_prom_metrics``), then hands every ``SchedulerStats.kv_connector_stats``
payload it logs to :meth:`KvrpcPromMetrics.observe`. A payload is the dict of
:class:`~kvrpc.integrations.vllm.connector.KvrpcConnectorStats`: the counts of one interval,
both roles' and every worker's summed, so each is added to its counter as it comes.

The metrics are served on vLLM's own ``/metrics``, beside ``vllm:prefix_cache_hits`` and the
others, with the labels vLLM gives every metric of an engine (``model_name``, ``engine``) and
no others: no request ids, no server URLs. This module imports vLLM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics

if TYPE_CHECKING:
    from vllm.config import VllmConfig

__all__ = ["METRICS", "KvrpcPromMetrics"]

#: Each counter of the connector's stats -> (the Prometheus counter, its help text). Counters
#: are exposed with ``_total`` appended, as prometheus_client does to every counter.
METRICS: dict[str, tuple[str, str]] = {
    "lookups": ("vllm:kvrpc_lookups", "Prompts looked up in the kvrpc server."),
    "lookup_tokens": ("vllm:kvrpc_lookup_tokens", "Prompt tokens of the prompts looked up."),
    "hit_tokens": (
        "vllm:kvrpc_hit_tokens",
        "Tokens the kvrpc server held for the prompts looked up (loaded, not computed).",
    ),
    "lookup_failures": (
        "vllm:kvrpc_lookup_failures",
        "Lookups that failed or timed out (kvrpc.lookup_timeout), computed as misses.",
    ),
    "stored_chunks": ("vllm:kvrpc_stored_chunks", "Chunks stored, every rank counted."),
    "stored_bytes": ("vllm:kvrpc_stored_bytes", "Bytes of KV stored, every rank counted."),
    "dropped_stores": (
        "vllm:kvrpc_dropped_stores",
        "Chunks not stored: the server gone, full, or refusing them.",
    ),
    "retrieved_chunks": (
        "vllm:kvrpc_retrieved_chunks",
        "Chunks loaded into vLLM's KV blocks, every rank counted.",
    ),
    "retrieved_bytes": (
        "vllm:kvrpc_retrieved_bytes",
        "Bytes of KV loaded into vLLM's KV blocks, every rank counted.",
    ),
    "failed_retrieves": (
        "vllm:kvrpc_failed_retrieves",
        "Chunks whose blocks became load errors (vLLM recomputed them).",
    ),
}


class KvrpcPromMetrics(KVConnectorPromMetrics):  # type: ignore[misc]
    """One counter per connector stat (see :data:`METRICS`), one child per engine."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        # The counter class is vLLM's choice (prometheus_client's, or Ray's wrapper under
        # Ray), so it is the one the base class took from metric_types, never imported here.
        self.counters: dict[str, dict[int, Any]] = {}
        for key, (name, documentation) in METRICS.items():
            counter = self._counter_cls(
                name=name, documentation=documentation, labelnames=labelnames
            )
            self.counters[key] = {
                engine: counter.labels(*values) for engine, values in per_engine_labelvalues.items()
            }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        """Add one payload's counts to engine ``engine_idx``'s counters.

        Keys it does not know (a newer worker's) are left out, and so is anything not a
        positive number: a counter only grows, and an exception here would stop vLLM's stat
        logging for every metric, not only these.
        """
        for key, value in transfer_stats_data.items():
            children = self.counters.get(key)
            if children is not None and isinstance(value, int | float) and value > 0:
                children[engine_idx].inc(value)
