"""Observability of a running server: Prometheus metrics, health endpoints, the stats table.

Nothing here imports ``prometheus_client`` at import time: only
:mod:`kvrpc.metrics.collector` needs it (the ``kvrpc[metrics]`` extra), and it is imported
when ``kvrpc serve --metrics-port`` starts the endpoint. The rest (call timing, the HTTP
request parser, readiness, the table) is plain Python, tested without sockets.
"""

from kvrpc.metrics.calls import LATENCY_BOUNDS, CallObserver, ProtocolCalls
from kvrpc.metrics.health import readiness
from kvrpc.metrics.http import BadRequest, Request, parse_request_head
from kvrpc.metrics.table import render_stats

__all__ = [
    "LATENCY_BOUNDS",
    "BadRequest",
    "CallObserver",
    "ProtocolCalls",
    "Request",
    "parse_request_head",
    "readiness",
    "render_stats",
]
