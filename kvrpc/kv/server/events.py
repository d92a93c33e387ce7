"""The KV server's event hub: numbered events about what the cache holds, to subscribers.

Sans-IO, like :mod:`~kvrpc.kv.server.state`: no asyncio, no clock, no sockets. Changes go in
(:meth:`EventHub.publish`, called synchronously with the change it tells of), each event gets
the next sequence number, and every subscription drains its own events with
:meth:`Subscription.take`. The shell that streams them (:mod:`~kvrpc.kv.server.event_stream`)
waits through the :attr:`Subscription.wakeup` hook instead of polling.

The rules a subscriber can rely on:

* **Order.** Live events come in publishing order; their ``seq`` increases (by one without
  a namespace filter; a filter skips the numbers of other namespaces' events).
* **Snapshot, then live, exactly.** ``subscribe(snapshot=True)`` first yields
  :attr:`EventKind.SNAPSHOT` events for every chunk held when it subscribed, all with
  ``seq`` = :attr:`Subscription.snapshot_seq` (the last number published before), then one
  :attr:`EventKind.SNAPSHOT_END`, then the live events, every one numbered above
  ``snapshot_seq``: a chunk is told of by the snapshot or by a live event, never both, and
  none is missed, however long the subscriber takes to pull the snapshot.
* **Bounded, and losses told.** A subscription keeps at most ``buffer`` live events. Past
  that the oldest one is dropped, and the subscriber's next events start with one
  :attr:`EventKind.GAP` naming the lost range ``[first, last]``; it can re-subscribe with a
  snapshot. Dropping the oldest (not the newest) tells of the loss first, before stale
  events the subscriber would have to discard anyway, and keeps the freshest facts, which
  is what a router wants from an index it must rebuild.
* **Memory.** Per subscription: ``buffer`` events, one gap (two ints), and its snapshot's
  cursor. The snapshot source copies the *keys* held when the subscription is taken (8
  bytes a chunk, bounded by what the tiers hold); the events are made from them only as
  the subscriber pulls, ``max_hashes`` at a time. The hub takes at most
  ``max_subscribers`` subscriptions. With no subscriber, :meth:`EventHub.publish` returns
  after one check, and the state's callers check :attr:`EventHub.watching` before they
  even gather keys.

Used from one thread, the server's event loop; nothing is locked.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from kvrpc.errors import KVError
from kvrpc.kv.protocols import EVENTS_DEFAULT_BUFFER, EVENTS_MAX_BUFFER

__all__ = [
    "DEFAULT_BUFFER",
    "MAX_BUFFER",
    "ChunkGroup",
    "Event",
    "EventHub",
    "EventKind",
    "SnapshotSource",
    "Subscription",
]

#: Live events a subscription keeps by default, and at most (``kv.events``' bounds).
DEFAULT_BUFFER: Final = EVENTS_DEFAULT_BUFFER
MAX_BUFFER: Final = EVENTS_MAX_BUFFER


class EventKind(enum.Enum):
    """What an :class:`Event` tells."""

    STORED = "stored"
    """New chunks are held on ``tier`` (a store committed into L1)."""
    REMOVED = "removed"
    """Chunks are no longer held on ``tier``; ``reason`` says why (evicted, deleted, cleared)."""
    MOVED = "moved"
    """Chunks were copied from tier ``source`` to ``tier`` (a write-down, a prefetch load).

    Both hold them now: an eviction from ``source`` is an event of its own.
    """
    CLEARED = "cleared"
    """``tier`` holds no chunk at all now."""
    SNAPSHOT = "snapshot"
    """Chunks held on ``tier`` when the subscription was taken (``seq``: its snapshot_seq)."""
    SNAPSHOT_END = "snapshot_end"
    """The snapshot is complete; live events, numbered above ``seq``, follow."""
    GAP = "gap"
    """The events numbered ``first`` to ``last`` were lost (the buffer overflowed)."""


@dataclass(frozen=True, slots=True)
class ChunkGroup:
    """Chunks of one rank of one namespace: what a chunk event is about.

    ``namespace`` is the 8-byte namespace id of the pool keys
    (:func:`~kvrpc.kv.server.poolkeys.namespace_id`), ``model_name`` and ``world_size`` its
    model (None when the server has not seen that namespace registered since it started: a
    disk tier's chunks from an earlier run), ``worker_id`` the rank, ``hashes`` the 32-byte
    chunk hashes.
    """

    namespace: bytes
    worker_id: int | None
    hashes: tuple[bytes, ...]
    model_name: str | None = None
    world_size: int | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """One numbered fact about what the cache holds (see :class:`EventKind` per kind).

    Chunk events (stored, removed, moved, snapshot) carry the chunks' namespace, model,
    rank and hashes, and ``chunk_tokens``, the tokens of each chunk. The server knows no
    chunk's position in its prompt (only the client had the tokens): the hashes are
    prefix-chained, so a consumer that hashes a prompt
    (:func:`~kvrpc.kv.keys.hashes_from_tokens`) finds hash ``i`` to cover tokens
    ``[i * chunk_tokens, (i + 1) * chunk_tokens)``. ``first`` and ``last`` are set only on
    a gap, whose ``seq`` is its ``last``: the next event is numbered above it.
    """

    kind: EventKind
    seq: int
    tier: str = ""
    namespace: bytes = b""
    model_name: str | None = None
    world_size: int | None = None
    worker_id: int | None = None
    hashes: tuple[bytes, ...] = ()
    chunk_tokens: int = 0
    source: str | None = None
    reason: str | None = None
    first: int | None = None
    last: int | None = None


SnapshotSource = Callable[[bytes | None], Iterator[tuple[str, ChunkGroup]]]
"""``source(namespace)``: the chunks held now, as ``(tier, group)`` (only ``namespace``'s,
unless None).

Called synchronously by :meth:`EventHub.subscribe`, between two publishes: what it
iterates must be a copy taken then, unaffected by later changes, since the subscriber
pulls it later while the cache changes.
"""


class Subscription:
    """One subscriber's events: its snapshot, then its bounded buffer of live ones.

    Made by :meth:`EventHub.subscribe`. ``wakeup`` is set by the shell: called (on the
    loop, from inside a publish; it must not raise) when the subscription goes from
    nothing to take to something to take, and once when it is closed.
    """

    def __init__(
        self,
        hub: EventHub,
        buffer: int,
        namespace: bytes | None,
        seq: int,
        snapshot: Iterator[tuple[str, ChunkGroup]] | None,
    ) -> None:
        self.buffer = buffer
        """The most live events it keeps."""
        self.namespace = namespace
        """Only this namespace's chunk events (None: every namespace)."""
        self.snapshot_seq = seq
        """The last sequence number published before it was taken; live ones are above."""
        self.wakeup: Callable[[], None] | None = None
        self.lost = 0
        """Live events dropped so far (each told of by a gap)."""
        self._hub = hub
        self._live: deque[Event] = deque()
        self._lost_first = -1  # the pending gap's range; -1: none
        self._lost_last = -1
        self._snapshot = snapshot
        self._parts: deque[Event] = deque()  # a large snapshot group, cut into events
        self._end_pending = snapshot is not None
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once unsubscribed (or the hub closed): it takes nothing more."""
        return self._closed

    @property
    def pending(self) -> bool:
        """True if :meth:`take` would return something now."""
        return not self._closed and bool(self._end_pending or self._live or self._lost_first >= 0)

    def __len__(self) -> int:
        """Live events buffered now (at most :attr:`buffer`)."""
        return len(self._live)

    def take(self, max_items: int = 256) -> list[Event]:
        """Up to ``max_items`` events, in order: snapshot first, then a gap, then live ones."""
        if max_items < 1:
            raise ValueError(f"take needs max_items >= 1, not {max_items}")
        out: list[Event] = []
        if self._closed:
            return out
        if self._end_pending:
            self._take_snapshot(out, max_items)
            if len(out) >= max_items:
                return out
        if self._lost_first >= 0:
            first, last = self._lost_first, self._lost_last
            self._lost_first = self._lost_last = -1
            out.append(Event(EventKind.GAP, last, first=first, last=last))
        live = self._live
        while live and len(out) < max_items:
            out.append(live.popleft())
        return out

    def close(self) -> None:
        """Unsubscribe: drop what is buffered; idempotent."""
        self._hub.unsubscribe(self)

    def _take_snapshot(self, out: list[Event], max_items: int) -> None:
        parts = self._parts
        while len(out) < max_items:
            if parts:
                out.append(parts.popleft())
                continue
            held = None if self._snapshot is None else next(self._snapshot, None)
            if held is None:
                self._snapshot = None
                self._end_pending = False
                out.append(Event(EventKind.SNAPSHOT_END, self.snapshot_seq))
                return
            tier, group = held
            parts.extend(self._hub._events(EventKind.SNAPSHOT, tier, group, self.snapshot_seq))

    def _deliver(self, event: Event) -> None:
        if event.namespace and self.namespace is not None and event.namespace != self.namespace:
            return
        live = self._live
        if len(live) >= self.buffer:
            dropped = live.popleft()
            if self._lost_first < 0:
                self._lost_first = dropped.seq
            self._lost_last = dropped.seq
            self.lost += 1
            live.append(event)
            return  # it was not empty: no wakeup due
        was_pending = self.pending
        live.append(event)
        if not was_pending and self.wakeup is not None:
            self.wakeup()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._live.clear()
        self._parts.clear()
        self._snapshot = None
        self._end_pending = False
        self._lost_first = self._lost_last = -1
        if self.wakeup is not None:
            self.wakeup()


class EventHub:
    """Numbers the cache's events and hands them to every subscription (see the module doc).

    ``chunk_tokens`` is the server's tokens per chunk, carried by chunk events; ``snapshot``
    lists what is held, for subscriptions that ask for a snapshot (none: empty snapshots);
    a chunk event carries at most ``max_hashes`` hashes (a larger group becomes several
    events, each numbered); at most ``max_subscribers`` subscriptions are open at once.
    """

    def __init__(
        self,
        *,
        chunk_tokens: int,
        snapshot: SnapshotSource | None = None,
        max_subscribers: int = 64,
        max_hashes: int = 256,
    ) -> None:
        if max_hashes < 1 or max_subscribers < 1:
            raise ValueError("an event hub needs max_hashes and max_subscribers of at least 1")
        self.chunk_tokens = chunk_tokens
        self.max_subscribers = max_subscribers
        self.max_hashes = max_hashes
        self._source = snapshot
        self._seq = 0
        # A tuple, rebuilt on (un)subscribe: a publish iterates it while a wakeup may
        # unsubscribe, and iterating a tuple is the cheapest loop there is.
        self._subs: tuple[Subscription, ...] = ()
        self._closed = False

    @property
    def seq(self) -> int:
        """The last sequence number given (0 before the first event)."""
        return self._seq

    @property
    def watching(self) -> bool:
        """True while some subscription is open: only then is anything published."""
        return bool(self._subs)

    @property
    def subscriptions(self) -> int:
        """How many subscriptions are open."""
        return len(self._subs)

    def subscribe(
        self,
        buffer: int = DEFAULT_BUFFER,
        *,
        snapshot: bool = False,
        namespace: bytes | None = None,
    ) -> Subscription:
        """A new subscription keeping up to ``buffer`` live events (1 to :data:`MAX_BUFFER`).

        With ``snapshot``, it first yields what is held now (see the module doc). With
        ``namespace``, only that namespace's chunk events (and the events of no namespace:
        cleared, gaps, the snapshot's end). Raises :class:`~kvrpc.errors.KVError` past
        ``max_subscribers``, for a bad ``buffer``, or once the hub is closed.
        """
        if self._closed:
            raise KVError("the KV server is closing: it takes no new event subscriptions")
        if not 1 <= buffer <= MAX_BUFFER:
            raise KVError(f"an event buffer holds 1 to {MAX_BUFFER} events, not {buffer}")
        if len(self._subs) >= self.max_subscribers:
            raise KVError(
                f"this server already streams events to {len(self._subs)} subscribers, its "
                "limit: close one, or subscribe to another server"
            )
        held = None
        if snapshot:
            held = iter(()) if self._source is None else self._source(namespace)
        sub = Subscription(self, buffer, namespace, self._seq, held)
        self._subs = (*self._subs, sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Close ``sub`` and stop delivering to it; idempotent."""
        if sub in self._subs:
            self._subs = tuple(s for s in self._subs if s is not sub)
        sub._close()

    def close(self) -> None:
        """Close every subscription (each gets its wakeup) and refuse new ones."""
        self._closed = True
        subs, self._subs = self._subs, ()
        for sub in subs:
            sub._close()

    def publish(
        self,
        kind: EventKind,
        tier: str,
        group: ChunkGroup | None = None,
        *,
        source: str | None = None,
        reason: str | None = None,
    ) -> None:
        """Number an event (several, for a group over ``max_hashes``) and deliver it.

        Does nothing (numbers nothing) while nobody is subscribed.
        """
        subs = self._subs
        if not subs:
            return
        if group is None:
            self._seq += 1
            events = [Event(kind, self._seq, tier)]
        else:
            events = self._events(kind, tier, group, None, source, reason)
        for event in events:
            for sub in subs:
                sub._deliver(event)

    def _events(
        self,
        kind: EventKind,
        tier: str,
        group: ChunkGroup,
        seq: int | None,
        source: str | None = None,
        reason: str | None = None,
    ) -> list[Event]:
        """``group`` as events of at most ``max_hashes`` each; numbered unless ``seq``."""
        hashes, step = group.hashes, self.max_hashes
        events: list[Event] = []
        for start in range(0, max(1, len(hashes)), step):
            if seq is None:
                self._seq += 1
            events.append(
                Event(
                    kind,
                    self._seq if seq is None else seq,
                    tier,
                    group.namespace,
                    group.model_name,
                    group.world_size,
                    group.worker_id,
                    hashes[start : start + step],
                    self.chunk_tokens,
                    source,
                    reason,
                )
            )
        return events
