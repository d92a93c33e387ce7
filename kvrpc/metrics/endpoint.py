"""The metrics port of ``kvrpc serve``: ``/metrics``, ``/livez`` and ``/readyz`` together.

:class:`MetricsEndpoint` puts the pieces together on the server's loop: the call observer
on every listener, the loop-lag timer, the collector and the HTTP server. Imports
``prometheus_client`` (the ``kvrpc[metrics]`` extra).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from kvrpc.metrics.calls import CallObserver
from kvrpc.metrics.collector import CONTENT_TYPE_LATEST, KVRPCCollector, exposition, registry_of
from kvrpc.metrics.health import readiness, tier_health
from kvrpc.metrics.http import MetricsHTTPServer, Response
from kvrpc.metrics.looplag import LoopLagTimer

if TYPE_CHECKING:
    from kvrpc.kv.server.service import KVService
    from kvrpc.server import RPCServer

__all__ = ["MetricsEndpoint"]


class MetricsEndpoint:
    """Metrics and health of ``servers`` (and ``service``) on ``http://host:port``.

    Build it before the servers start, so that their handlers are timed from the first
    call; open it (``async with``) once they listen. ``ignored_tiers`` names the tiers
    whose state readiness does not depend on.
    """

    def __init__(
        self,
        servers: Sequence[RPCServer],
        service: KVService | None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ignored_tiers: Collection[str] = (),
    ) -> None:
        self.servers = list(servers)
        self.service = service
        self.ignored_tiers = frozenset(ignored_tiers)
        self.calls = CallObserver()
        for server in self.servers:
            server.instrument(self.calls.wrap)
        self.lag = LoopLagTimer()
        self.collector = KVRPCCollector(self.servers, service, self.calls, self.lag)
        self._registry = registry_of(self.collector)
        self.http = MetricsHTTPServer(
            host,
            port,
            {"/metrics": self.metrics, "/livez": self.livez, "/readyz": self.readyz},
        )

    @property
    def url(self) -> str:
        """Where it listens, ``http://HOST:PORT`` (the bound port once open)."""
        return self.http.url

    async def __aenter__(self) -> MetricsEndpoint:
        await self.http.start()
        self.lag.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.lag.stop()
        await self.http.aclose()

    def metrics(self) -> Response:
        """``/metrics``: the Prometheus text exposition."""
        return Response(200, exposition(self._registry), CONTENT_TYPE_LATEST)

    def livez(self) -> Response:
        """``/livez``: 200 whenever it answers, since it answers from the server's loop."""
        return Response(200, f"live\nloop lag {self.lag.last * 1e3:.1f} ms\n".encode())

    def readyz(self) -> Response:
        """``/readyz``: 200 while every listener serves and every tier counted is up, else 503."""
        listeners = [(server.url, server.serving) for server in self.servers]
        tiers = tier_health(self.service) if self.service is not None else []
        ready, body = readiness(listeners, tiers, self.ignored_tiers)
        return Response(200 if ready else 503, body.encode())
