"""Run a KV-cache server: an :class:`~kvrpc.server.RPCServer` with a :class:`KVService`."""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvrpc.kv.protocols import kv_registry
from kvrpc.kv.server.caps import ClientCaps
from kvrpc.kv.server.service import KVService
from kvrpc.server import RPCServer
from kvrpc.transport import default_url

if TYPE_CHECKING:
    from kvrpc.config import ServerSettings

__all__ = ["KVServerSettings", "serve_kv"]

logger = logging.getLogger("kvrpc.kv")

GB = 1 << 30


@dataclass(frozen=True)
class KVServerSettings:
    """What ``kvrpc serve`` takes: where to listen and how big things are.

    ``cpu_buffer_size`` is in GiB (the L1 pool, allocated as it fills); ``max_workers`` is
    both the server's BLOCKING pool and the copy threads; a client silent for
    ``client_timeout`` seconds loses what it registered, pinned and started. ``disk_dir``
    turns on a disk tier of ``disk_size`` GiB below L1: every stored chunk is written
    through to it, and lookups prefetch from it what L1 has evicted. ``redis_url`` turns on
    a Redis tier (``redis_cluster``: a Redis Cluster) shared by many servers: stores are
    queued for it within ``redis_write_budget`` GiB, lookups ask it what L1 and disk miss;
    see :class:`~kvrpc.kv.server.tiers.redistier.RedisSettings`. ``loop_probe`` samples
    the event loop's responsiveness every millisecond, for ``kv.stats`` (benchmarks).
    ``cuda_group_mib`` is the size of each of a GPU copy engine's two staging buffers;
    ``store_copies`` how its stores move blocks: ``"kernels"`` (gather kernels, then DMA) or
    ``"dma"`` (DMA straight from the blocks, no kernel; see
    :class:`~kvrpc.kv.server.copy_engine.StoreCopies`).
    ``verify_retrieves`` checks every retrieve's bytes in the blocks against the chunk's
    checksum (a debug mode); ``checksums`` off stores chunks without computing theirs
    (the tiers then compute it as they write; for measuring what it costs).
    ``metrics_port`` turns on the metrics and health endpoint (:mod:`kvrpc.metrics`, the
    ``kvrpc[metrics]`` extra) on ``metrics_host``. ``auth_token_file`` makes every URL
    require the shared-secret handshake of :mod:`kvrpc.auth` (see ``docs/operating.md``).
    ``curve_secret_file`` makes every ``zmq+tcp`` URL a CURVE server (:mod:`kvrpc.curve`);
    the other URLs are guarded as before.
    The ``max_*_per_client`` fields are the per-client caps of
    :class:`~kvrpc.kv.server.caps.ClientCaps` (``max_inflight_per_client`` in GiB).
    """

    url: str | None = None  #: None: :func:`kvrpc.transport.default_url`
    #: More URLs serving the same cache: workers on a local socket, schedulers over TCP.
    also_urls: tuple[str, ...] = ()
    cpu_buffer_size: float = 1.0
    chunk_size: int = 256
    max_workers: int = 4
    #: Requests of one read the RPC server handles at once (see ``ServerConfig.inbox_burst``).
    inbox_burst: int = 64
    #: Bytes of requests one read handles at most (``ServerConfig.inbox_burst_bytes``);
    #: None: that field's default, which is written there alone.
    inbox_burst_bytes: int | None = None
    #: Seconds a stream (``kv.events``) waits for credit from a consumer that reads nothing.
    stream_idle_timeout: float = 60.0
    client_timeout: float = 8.0
    disk_dir: str | None = None
    disk_size: float = 16.0
    redis_url: str | None = None
    redis_cluster: bool = False
    redis_prefix: str = "kvrpc:"
    redis_ttl: float | None = None
    redis_write_budget: float = 0.25
    redis_timeout: float = 1.0
    loop_probe: bool = False
    cuda_group_mib: int = 256
    store_copies: str = "kernels"
    verify_retrieves: bool = False
    checksums: bool = True
    #: Serve /metrics, /livez and /readyz on this port (0: any free one); None: no endpoint.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    auth_token_file: str | None = None
    curve_secret_file: str | None = None
    #: Tiers (``disk``, ``redis``) whose state /readyz does not depend on.
    readyz_ignore: tuple[str, ...] = ()
    max_registrations_per_client: int = ClientCaps.registrations
    max_sessions_per_client: int = ClientCaps.sessions
    max_pins_per_client: int = ClientCaps.pins
    max_prefetch_jobs_per_client: int = ClientCaps.prefetch_jobs
    max_inflight_per_client: float = ClientCaps.inflight_bytes / GB

    @property
    def client_caps(self) -> ClientCaps:
        """What each client may hold; raises :class:`~kvrpc.errors.KVConfigError` if unusable."""
        return ClientCaps(
            registrations=self.max_registrations_per_client,
            sessions=self.max_sessions_per_client,
            pins=self.max_pins_per_client,
            prefetch_jobs=self.max_prefetch_jobs_per_client,
            inflight_bytes=max(1, int(self.max_inflight_per_client * GB)),
        )

    @property
    def cpu_buffer_bytes(self) -> int:
        """The L1 pool's byte limit."""
        return int(self.cpu_buffer_size * GB)


async def serve_kv(
    settings: KVServerSettings,
    *,
    on_ready: Callable[[RPCServer, KVService], None] | None = None,
    on_metrics: Callable[[str], None] | None = None,
) -> None:
    """Serve the ``kv.*`` and ``rpc.*`` protocols until the server's ``stop()`` is called.

    ``on_ready`` runs once the transport is bound (install signal handlers there);
    ``on_metrics`` before it, with the metrics endpoint's ``http://HOST:PORT``, if one runs.
    """
    tier = None
    if settings.disk_dir is not None:
        from kvrpc.kv.server.tiers.disk import DiskTier

        tier = DiskTier(settings.disk_dir, int(settings.disk_size * GB))
    remote = None
    if settings.redis_url is not None:
        from kvrpc.kv.server.tiers.redistier import RedisSettings, RedisTier

        redis_settings = RedisSettings(
            settings.redis_url,
            cluster=settings.redis_cluster,
            prefix=settings.redis_prefix,
            ttl=settings.redis_ttl,
            write_budget=int(settings.redis_write_budget * GB),
            timeout=settings.redis_timeout,
        )
        remote = RedisTier(redis_settings, chunk_tokens=settings.chunk_size)
    service = KVService(
        chunk_size=settings.chunk_size,
        cpu_buffer_bytes=settings.cpu_buffer_bytes,
        copy_workers=settings.max_workers,
        client_timeout=settings.client_timeout,
        lower_tier=tier,
        remote_tier=remote,
        loop_probe=settings.loop_probe,
        cuda_group_bytes=settings.cuda_group_mib << 20,
        checksums=settings.checksums,
        verify_retrieves=settings.verify_retrieves,
        caps=settings.client_caps,
        store_copies=settings.store_copies,
    )
    # A thread holding the GIL in Python (a copy engine enqueuing launches) keeps the event
    # loop waiting until the interpreter asks it to switch, every 5 ms by default. This
    # process is the server's own, so it asks every 0.25 ms instead.
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.00025))
    url = settings.url if settings.url is not None else default_url()

    shared: ServerSettings = {
        "max_workers": settings.max_workers,
        "inbox_burst": settings.inbox_burst,
        "stream_idle_timeout": settings.stream_idle_timeout,
        "auth_token_file": settings.auth_token_file,
    }
    if settings.inbox_burst_bytes is not None:  # else ServerConfig's default, written there
        shared["inbox_burst_bytes"] = settings.inbox_burst_bytes

    def rpc_server(where: str) -> RPCServer:
        # CURVE is a zmq+tcp option; a unix socket beside it keeps its file-mode guard.
        curve = settings.curve_secret_file if where.startswith("zmq+tcp://") else None
        each: ServerSettings = {**shared, "curve_secret_file": curve}
        return RPCServer(where, registry=kv_registry(), **each)

    server = rpc_server(url)
    service.register(server)
    # One service behind every URL: a host's workers register on a local socket (the only
    # kind that may map their memory) while a scheduler on another host asks over TCP.
    also = [rpc_server(extra) for extra in settings.also_urls]
    for extra_server in also:
        service.register(extra_server)
    metrics = None
    if settings.metrics_port is not None:
        from kvrpc.metrics.endpoint import MetricsEndpoint

        # Built before the servers start, so that their handlers are timed from the first call.
        metrics = MetricsEndpoint(
            [server, *also],
            service,
            host=settings.metrics_host,
            port=settings.metrics_port,
            ignored_tiers=settings.readyz_ignore,
        )
    # Before listening: a first registration would otherwise pay CUDA's start-up, stalling
    # the loop for every client (see GpuCopies.start_cuda).
    started = time.perf_counter()
    gpus = await service.gpu.start_cuda()
    if gpus:
        took_ms = (time.perf_counter() - started) * 1e3
        logger.info("CUDA started on %d GPU(s) in %.0f ms", gpus, took_ms)
    async with service, server, contextlib.AsyncExitStack() as stack:
        for extra_server in also:
            await stack.enter_async_context(extra_server)
        if metrics is not None:
            await stack.enter_async_context(metrics)
            logger.info("metrics and health on %s (/metrics, /livez, /readyz)", metrics.url)
            if on_metrics is not None:
                on_metrics(metrics.url)
        logger.info(
            "ready: kv server on %s: chunks of %d tokens, CPU buffer %.2f GiB, %d workers",
            ", ".join([url, *settings.also_urls]),
            settings.chunk_size,
            settings.cpu_buffer_size,
            settings.max_workers,
        )
        if on_ready is not None:
            on_ready(server, service)
        # What start-up made (torch's modules above all: ~170k objects) lives as long as the
        # process. A full collection scanned all of it, a 70 ms stall of the loop whenever a
        # burst of short-lived garbage (junk from a bad peer, say) triggered one; frozen,
        # the collector only looks at what came after.
        gc.collect()
        gc.freeze()
        await server.wait_for_stop()
