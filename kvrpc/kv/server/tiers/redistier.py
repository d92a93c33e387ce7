"""A remote tier on Redis (or Valkey), one node or a Redis Cluster, shared by many servers.

Every server of a fleet writes the chunks it stores behind L1 and reads, on a lookup that
L1 and disk miss, the chunks any of them wrote: a fresh server on a new host is warm from
its first lookup. Keys and values are :mod:`~kvrpc.kv.server.tiers.values`'s.

It never holds anything up:

- **Writes** are offered, never awaited: a chunk goes into a queue bounded by
  ``write_budget`` bytes while its L1 slot stays pinned (so the queue copies nothing and the
  server's memory does not grow). Past the budget, or while the tier is skipped, the write
  is dropped and counted. ``writers`` tasks send the queue, parts first and header last.
- **Reads** come in two steps of one round trip each: the headers of a batch (which chunks
  the store has, and what their bytes must be), then each chunk's parts, received straight
  into its slot (:mod:`~kvrpc.kv.server.tiers.direct`: the kernel writes the value into
  the slot, no client buffer in between; redis-py's copy for ``rediss://``, or with
  ``direct_reads`` off) and checked against the header's lengths and the chunk's checksum
  (:mod:`kvrpc.kv.integrity`, recomputed) off the loop. A header, a length or a checksum
  that does not match is a miss, counted in ``corrupt``, and deleted.
- **Deadlines and a breaker.** Every operation has ``timeout`` seconds, the wait for one of
  the ``connections`` included. A connection error
  or a timeout opens the :class:`~kvrpc.kv.server.tiers.breaker.Breaker`: lookups stop
  asking and writes are dropped (counted as skipped) until a PING probe, sent with backoff
  by :meth:`RedisTier.run`, works again. An error reply (``OOM`` from a full store, say)
  is counted but is no reason to stop reading; a key of another type is a bad key, deleted.
- **Usage.** While the tier is up, :meth:`RedisTier.run` reads the store's ``INFO memory``
  every few seconds, for ``kv.stats``.

Used from the server's event loop only; redis-py's asyncio client does its socket work
there without blocking, and the byte copies and checksums run in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvrpc.errors import KVConfigError
from kvrpc.kv import integrity
from kvrpc.kv.server.observer import L1, REDIS, ChunkObserver
from kvrpc.kv.server.records import Namespace
from kvrpc.kv.server.tiers import values
from kvrpc.kv.server.tiers.breaker import Breaker
from kvrpc.kv.server.tiers.direct import Address, DirectReader, direct_address
from kvrpc.kv.server.tiers.memory import memory_of
from kvrpc.kv.server.tiers.resp import Reply, ReplyKind
from kvrpc.kv.server.tiers.values import Header

__all__ = ["RedisSettings", "RedisTier"]

logger = logging.getLogger("kvrpc.kv")

_KNOWN_KEYS = 1 << 16  # pool keys remembered as held by the store, so they are not rewritten
_USAGE_EVERY = 5.0  # seconds between INFO memory reads while the tier is up
_REDIRECTS = ("MOVED ", "ASK ")  # a cluster's replies for a key that another node serves


class _Got(enum.Enum):
    """How reading a chunk's parts ended."""

    OK = 1  # every part there, of the right length and type (the checksum comes next)
    GONE = 2  # a part is missing (expired or evicted)
    BAD = 3  # a part of another length or type, or a checksum that does not match


@dataclass(frozen=True)
class RedisSettings:
    """Where the store is and how the tier uses it (``kvrpc serve --redis-*``).

    ``url`` is ``redis://``, ``rediss://`` (TLS) or ``unix://``; ``cluster`` treats it as one
    node of a Redis Cluster. Keys start with ``prefix``; ``ttl`` (seconds) makes them expire.
    ``write_budget`` bounds the bytes of queued writes; ``timeout`` bounds every operation.
    ``part_bytes`` splits larger chunks into parts (spread over a cluster's nodes).
    ``connections`` bounds the parallel operations. ``direct_reads`` receives parts
    straight into the slots over the tier's own connections (``redis://`` and ``unix://``;
    a ``rediss://`` tier always reads through redis-py).
    """

    url: str
    cluster: bool = False
    prefix: str = "kvrpc:"
    ttl: float | None = None
    write_budget: int = 256 << 20
    timeout: float = 1.0
    part_bytes: int = 4 << 20
    writers: int = 4
    connections: int = 16
    direct_reads: bool = True

    def __post_init__(self) -> None:
        for name in ("write_budget", "part_bytes", "writers", "connections"):
            if getattr(self, name) < 1:
                raise KVConfigError(f"the Redis tier's {name} must be at least 1")
        if self.timeout <= 0 or (self.ttl is not None and self.ttl <= 0):
            raise KVConfigError("the Redis tier's timeout and ttl must be positive seconds")


@dataclass(eq=False)
class _Write:
    base: bytes
    key: bytes
    namespace_id: bytes
    data: torch.Tensor
    done: Callable[[], None]
    checksum: int | None


class RedisTier:
    """The Redis tier (see the module doc); :meth:`run` must run while it is used."""

    def __init__(self, settings: RedisSettings, *, chunk_tokens: int, client: Any = None) -> None:
        self.settings = settings
        self.chunk_tokens = chunk_tokens
        self._prefix = settings.prefix.encode()
        self._client = client if client is not None else _connect(settings)
        address = direct_address(settings.url) if settings.direct_reads else None
        self._direct = None if address is None else DirectReader(address)
        self.breaker = Breaker()
        self._queue: deque[_Write] = deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._limit = asyncio.Semaphore(settings.connections)
        self._known: OrderedDict[bytes, None] = OrderedDict()
        self._closed = False
        self._observer: ChunkObserver | None = None
        self._logged_refusals: set[str] = set()
        self._usage = {"used_bytes": 0, "capacity": 0}
        self._usage_at = -_USAGE_EVERY
        self._counts = dict.fromkeys(
            (
                "writes", "write_bytes", "write_dropped", "write_skipped", "write_errors",
                "finds", "hits", "misses", "loads", "direct_loads", "load_bytes", "corrupt",
                "errors", "timeouts", "probes",
            ),
            0,
        )  # fmt: skip

    # ------------------------------------------------------------------ the breaker

    def available(self) -> bool:
        """True unless the tier is skipped (it failed; a probe will say when it is back)."""
        return self.breaker.allows() and not self._closed

    def _failed(self, what: str, error: BaseException) -> None:
        was_up = self.breaker.allows()
        self.breaker.failed(time.monotonic())
        self._counts["timeouts" if isinstance(error, TimeoutError) else "errors"] += 1
        if was_up:
            logger.warning(
                "redis tier: %s failed (%s); skipping the tier, probing again in %.2f s",
                what,
                _describe(error),
                self.breaker.backoff,
            )

    def _refused(self, what: str, error: BaseException, *, counter: str | None = "errors") -> None:
        # An error reply (OOM, a wrong type, a refused command) says the store is up: the
        # operation misses, but the tier stays in use. Logged once per kind of reply.
        if counter is not None:
            self._counts[counter] += 1
        kind = type(error).__name__
        if kind not in self._logged_refusals:
            self._logged_refusals.add(kind)
            logger.warning("redis tier: %s was refused: %s", what, _describe(error))

    # ------------------------------------------------------------------ events

    def observe(self, observer: ChunkObserver) -> None:
        """Report every later write this server made to ``observer``, as a move from L1.

        Only writes: the store drops chunks on its own (a TTL, its memory limit) and other
        servers write and delete in it, unseen here.
        """
        self._observer = observer

    # ------------------------------------------------------------------ writes

    def offer(
        self,
        ns: Namespace,
        key: bytes,
        data: torch.Tensor,
        done: Callable[[], None],
        checksum: int | None = None,
    ) -> bool:
        """Queue ``data`` (the 1-D uint8 bytes of ``key``'s chunk) for writing; never waits.

        ``checksum`` is the chunk's (:mod:`kvrpc.kv.integrity`), written in its header; None
        has the writer compute it from ``data``. True if queued: ``done`` is then called once
        the tier no longer reads ``data``. False (``done`` not called) if the store is known
        to hold the chunk, the tier is skipped, or the queue has no room in its byte budget;
        the last two are counted.
        """
        if key in self._known:
            self._known.move_to_end(key)
            return False
        if not self.available():
            self._counts["write_skipped"] += 1
            return False
        nbytes = data.numel()
        if self._queued_bytes + nbytes > self.settings.write_budget:
            self._counts["write_dropped"] += 1
            return False
        base = self._base(ns, key)
        self._queue.append(_Write(base, key, ns.id, data, done, checksum))
        self._queued_bytes += nbytes
        self._wake.set()
        return True

    async def _writer(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            write = self._queue.popleft()
            try:
                if self.available():
                    await self._write(write)
                else:
                    self._counts["write_skipped"] += 1
            finally:
                self._queued_bytes -= write.data.numel()
                write.done()

    async def _write(self, write: _Write) -> None:
        view = memory_of(write.data)
        spans = values.part_spans(len(view), self.settings.part_bytes)
        checksum = write.checksum
        if checksum is None:  # stored without one: the chunk's bytes are still in its slot
            checksum = await asyncio.to_thread(integrity.checksum, write.data)
        header = values.pack_header(
            write.namespace_id, len(view), self.settings.part_bytes, checksum
        )
        ttl = self._ttl_ms()
        parts = values.part_keys(write.base, len(spans))
        try:
            async with asyncio.timeout(self.settings.timeout), self._limit:
                # Parts first, the header once they are all acknowledged: a reader that finds
                # the header finds every part (on a cluster, the parts live on other nodes).
                pipe = self._client.pipeline(transaction=False)
                for name, (start, end) in zip(parts, spans, strict=True):
                    pipe.set(name, view[start:end], px=ttl)
                await pipe.execute()
                await self._client.set(values.header_key(write.base), header, px=ttl)
        except _outages() as error:
            self._failed("a write", error)
            return
        except _redis_errors().RedisError as error:
            self._counts["write_errors"] += 1
            self._refused("a write", error, counter=None)
            return
        self._counts["writes"] += 1
        self._counts["write_bytes"] += len(view)
        self._remember(write.key)
        observer = self._observer
        if observer is not None and observer.watching:
            observer.stored(REDIS, (write.key,), source=L1)

    # ------------------------------------------------------------------ reads

    async def find(self, ns: Namespace, keys: Sequence[bytes]) -> list[Header | None]:
        """The headers of these chunks, in one round trip; None for each chunk it lacks.

        All None if the tier is skipped or does not answer in time. A header that is not
        this format, names another namespace, or another length than ``ns``'s chunks is
        counted as corrupt, deleted, and None.
        """
        if not keys or not self.available():
            return [None] * len(keys)
        bases = [self._base(ns, key) for key in keys]
        try:
            async with asyncio.timeout(self.settings.timeout), self._limit:
                pipe = self._client.pipeline(transaction=False)
                for base in bases:
                    pipe.get(values.header_key(base))
                raw = _replies(await pipe.execute(raise_on_error=False))
        except _outages() as error:
            self._failed("a lookup", error)
            return [None] * len(keys)
        except _redis_errors().RedisError as error:
            self._refused("a lookup", error)
            return [None] * len(keys)
        self.breaker.succeeded()
        self._counts["finds"] += 1
        found: list[Header | None] = []
        bad: list[bytes] = []
        for key, base, value in zip(keys, bases, raw, strict=True):
            # A key of another type (WRONGTYPE) is as bad as a header of another format.
            header = None if isinstance(value, BaseException) else values.unpack_header(value)
            if value is not None and (
                header is None or header.namespace_id != ns.id or header.nbytes != ns.chunk_nbytes
            ):
                bad.append(base)
                header = None
            found.append(header)
            if header is not None:
                self._remember(key)
        self._counts["hits"] += sum(h is not None for h in found)
        self._counts["misses"] += sum(h is None for h in found)
        if bad:
            await self._discard(bad, [1] * len(bad))
        return found

    async def load(self, ns: Namespace, key: bytes, header: Header, out: torch.Tensor) -> bool:
        """Copy the chunk :meth:`find` gave ``header`` for into ``out``; False if it cannot.

        False when a part is gone (expired or evicted since), the bytes do not add up to
        the header's lengths or checksum (counted as corrupt and deleted), or the store fails or
        is too slow. After False, ``out``'s contents are unspecified.
        """
        if not self.available():
            return False
        base = self._base(ns, key)
        view = memory_of(out)
        if len(view) != header.nbytes:
            raise ValueError(f"a {len(view)}-byte slot for a {header.nbytes}-byte chunk")
        names = values.part_keys(base, header.parts)
        parts: list[bytes] = []
        try:
            async with asyncio.timeout(self.settings.timeout), self._limit:
                got = None
                if self._direct is not None:
                    got = await self._read_direct(self._direct, names, header, view)
                direct = got is not None
                if got is None:  # no direct reads, or a cluster moved a slot: via redis-py
                    got, parts = await self._read_client(names)
        except _outages() as error:
            self._failed("a load", error)
            return False
        except _redis_errors().RedisError as error:
            self._refused("a load", error)
            return False
        if got is _Got.OK:
            # Checked outside the deadline and the connection limit: the copy and the
            # checksum are this host's CPU work, never a sign that the store is slow.
            check = (
                functools.partial(_checksum_matches, out, header)
                if direct
                else functools.partial(_fill, out, view, parts, header)
            )
            if not await asyncio.to_thread(check):
                got = _Got.BAD
        if got is _Got.GONE:
            self._forget(key)  # expired or evicted part by part: the header goes too
            await self._discard([base], [header.parts], count=False)
            return False
        if got is _Got.BAD:
            self._counts["corrupt"] += 1
            logger.warning("redis tier: a chunk's bytes do not match its header; deleting it")
            self._forget(key)
            await self._discard([base], [header.parts], count=False)
            return False
        self._counts["loads"] += 1
        self._counts["direct_loads"] += direct
        self._counts["load_bytes"] += header.nbytes
        return True

    async def _read_direct(
        self, reader: DirectReader, names: list[bytes], header: Header, view: memoryview
    ) -> _Got | None:
        """The parts, received into ``view`` (OK: their checksum is still to be checked).

        None: read them through redis-py instead.
        """
        targets = [view[start:end] for start, end in header.spans()]
        if not self.settings.cluster:
            replies: list[Reply] | None = await reader.get_into(names, targets)
        else:
            replies = await self._read_nodes(reader, names, targets)
        if replies is None:
            return None
        if any(r.kind is ReplyKind.ERROR and r.text.startswith(_REDIRECTS) for r in replies):
            return None  # a slot moved: redis-py follows it and learns the new map
        if any(r.kind is ReplyKind.NIL for r in replies):
            return _Got.GONE
        if any(r.kind is not ReplyKind.VALUE for r in replies):
            return _Got.BAD  # another length, or a key of another type
        return _Got.OK

    async def _read_nodes(
        self, reader: DirectReader, names: list[bytes], targets: list[memoryview]
    ) -> list[Reply] | None:
        """A cluster's parts, one pipeline per node that holds some; None if unmapped."""
        by_node: dict[Address, list[int]] = {}
        try:
            for i, name in enumerate(names):
                node = self._client.get_node_from_key(name)
                by_node.setdefault(reader.default.at(node.host, node.port), []).append(i)
        except Exception:  # the client has no slot map yet (or lost it): redis-py reads
            return None
        replies: list[Reply | None] = [None] * len(names)

        async def one(address: Address, indices: list[int]) -> None:
            got = await reader.get_into(
                [names[i] for i in indices], [targets[i] for i in indices], address
            )
            for i, reply in zip(indices, got, strict=True):
                replies[i] = reply

        async with asyncio.TaskGroup() as group:
            for address, indices in by_node.items():
                group.create_task(one(address, indices))
        return [reply for reply in replies if reply is not None]

    async def _read_client(self, names: list[bytes]) -> tuple[_Got, list[bytes]]:
        """The parts through redis-py (OK: still to be copied into the slot and checked)."""
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.get(name)
        parts = _replies(await pipe.execute(raise_on_error=False))
        if any(part is None for part in parts):
            return _Got.GONE, []
        if any(isinstance(part, BaseException) for part in parts):
            return _Got.BAD, []
        return _Got.OK, parts

    async def _discard(self, bases: list[bytes], parts: list[int], *, count: bool = True) -> None:
        if count:
            self._counts["corrupt"] += len(bases)
            logger.warning("redis tier: %d chunk header(s) of another format; deleting", len(bases))
        names = [values.header_key(b) for b in bases]
        for base, n in zip(bases, parts, strict=True):
            names += values.part_keys(base, n)
        with contextlib.suppress(TimeoutError, OSError, _redis_errors().RedisError):
            async with asyncio.timeout(self.settings.timeout):
                pipe = self._client.pipeline(transaction=False)
                for name in names:  # one DEL per key: a cluster's keys live on several nodes
                    pipe.delete(name)
                await pipe.execute()

    # ------------------------------------------------------------------ background, report

    async def run(self) -> None:
        """The writers and the probe, until cancelled; start it beside the server."""
        async with asyncio.TaskGroup() as group:
            for _ in range(self.settings.writers):
                group.create_task(self._writer())
            group.create_task(self._prober())

    async def _prober(self) -> None:
        breaker = self.breaker
        while True:
            await asyncio.sleep(breaker.wait(time.monotonic()))
            if breaker.allows() and time.monotonic() - self._usage_at >= _USAGE_EVERY:
                await self._read_usage()
            if not breaker.probe_due(time.monotonic()):
                continue
            self._counts["probes"] += 1
            try:
                async with asyncio.timeout(self.settings.timeout):
                    await self._client.ping()
            except (TimeoutError, OSError, _redis_errors().RedisError) as error:
                breaker.failed(time.monotonic())
                logger.debug("redis tier: probe failed (%s)", _describe(error))
                continue
            breaker.succeeded()
            logger.warning("redis tier: the store answers again; using it")

    async def _read_usage(self) -> None:
        # The store's memory, as its INFO says: used by everything in it, not only this
        # tier's keys (counting those would need a SCAN). A cluster's is its primaries' sum.
        self._usage_at = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.timeout):
                if self.settings.cluster:
                    replies = list(
                        (await self._client.info("memory", target_nodes="primaries")).values()
                    )
                else:
                    replies = [await self._client.info("memory")]
        except (*_outages(), _redis_errors().RedisError) as error:
            # The operations' own deadlines trip the breaker; a missed figure only waits.
            logger.debug("redis tier: INFO memory failed (%s)", _describe(error))
            return
        limits = [int(reply.get("maxmemory", 0)) for reply in replies]
        self._usage = {
            "used_bytes": sum(int(reply.get("used_memory", 0)) for reply in replies),
            "capacity": 0 if 0 in limits else sum(limits),  # 0: a node without maxmemory
        }

    def stats(self) -> dict[str, int]:
        """Counters, the write queue and the breaker's state (0 up, 1 skipped, 2 probing).

        ``hits``/``misses`` count chunks :meth:`find` asked for; ``write_dropped`` writes
        past the budget, ``write_skipped`` writes while skipped; ``trips`` times it opened.
        ``used_bytes`` and ``capacity`` (0: unbounded) are the store's memory as last read.
        """
        return {
            **self._counts,
            **self._usage,
            "state": int(self.breaker.state),
            "trips": self.breaker.trips,
            "write_budget": self.settings.write_budget,
            "write_queued_bytes": self._queued_bytes,
            "write_queued": len(self._queue),
        }

    async def aclose(self) -> None:
        """Drop the queued writes (their slots are released) and close the connections."""
        if self._closed:
            return
        self._closed = True
        while self._queue:
            write = self._queue.popleft()
            self._queued_bytes -= write.data.numel()
            self._counts["write_dropped"] += 1
            write.done()
        if self._direct is not None:
            self._direct.close()
        with contextlib.suppress(Exception):
            await self._client.aclose()

    # ------------------------------------------------------------------ internals

    def _base(self, ns: Namespace, key: bytes) -> bytes:
        return values.key_base(self._prefix, ns.model_name, ns.world_size, self.chunk_tokens, key)

    def _ttl_ms(self) -> int | None:
        ttl = self.settings.ttl
        return None if ttl is None else max(1, int(ttl * 1000))

    def _remember(self, key: bytes) -> None:
        self._known[key] = None
        self._known.move_to_end(key)
        if len(self._known) > _KNOWN_KEYS:
            self._known.popitem(last=False)

    def _forget(self, key: bytes) -> None:
        self._known.pop(key, None)


def _fill(out: torch.Tensor, view: memoryview, parts: list[bytes], header: Header) -> bool:
    """Copy ``parts`` into their spans of ``view`` (``out``'s memory); True if they check."""
    spans = header.spans()
    if any(len(part) != end - start for part, (start, end) in zip(parts, spans, strict=True)):
        return False
    for part, (start, end) in zip(parts, spans, strict=True):
        view[start:end] = part
    return _checksum_matches(out, header)


def _checksum_matches(out: torch.Tensor, header: Header) -> bool:
    """True if the chunk's bytes in ``out`` have the checksum its header names."""
    return integrity.checksum(out) == header.checksum


def _replies(replies: list[Any]) -> list[Any]:
    """A pipeline's replies (``raise_on_error=False``), raising the first outage among them.

    Other error replies stay in the list, for the caller to treat as a bad key.
    """
    for reply in replies:
        if isinstance(reply, _outages()):
            raise reply
    return replies


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _redis_errors() -> Any:
    import redis.exceptions

    return redis.exceptions


def _outages() -> tuple[type[BaseException], ...]:
    """The errors that mean the store is down or too slow (and so trip the breaker).

    Every other ``RedisError`` is a reply from a store that is up, and only misses.
    """
    errors = _redis_errors()
    return (
        TimeoutError,
        OSError,
        errors.ConnectionError,
        errors.TimeoutError,
        errors.ClusterError,
        errors.RedisClusterException,
    )


def _connect(settings: RedisSettings) -> Any:
    """A redis-py asyncio client for ``settings``; an install hint if redis-py is missing."""
    try:
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
    except ImportError as error:
        raise KVConfigError("the Redis tier needs redis-py: pip install 'kvrpc[redis]'") from error
    # The tier's own deadline and breaker decide what a failure costs; the client's retries
    # would only stretch a failing operation past its deadline.
    options: dict[str, Any] = {
        "socket_timeout": settings.timeout,
        "socket_connect_timeout": settings.timeout,
        "retry": Retry(NoBackoff(), 0),
        "max_connections": settings.connections + settings.writers,
    }
    try:
        if settings.cluster:
            from redis.asyncio.cluster import RedisCluster

            return RedisCluster.from_url(settings.url, **options)
        return redis.asyncio.Redis.from_url(settings.url, **options)
    except ValueError as error:
        raise KVConfigError(f"--redis-url {settings.url!r}: {error}") from error
