"""The ``kv.events`` handler as an async generator, driven directly, without RPC.

What the RPC core will rely on: items in order, a wait that a publish ends (no polling), a
consumer that stops pulling costing the server a bounded buffer and a gap, and a
generator whose ``finally`` unsubscribes however it ends. Its items and its request also
cross the real codec and strict validation, as the core's stream will send them.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator

import pytest

from kvrpc.codec import decode, encode_request, encode_response
from kvrpc.errors import KVError, PayloadValidationError
from kvrpc.kv.protocols import EventsRequest, KVEvent
from kvrpc.kv.server.event_stream import kv_events, wire_event
from kvrpc.kv.server.events import ChunkGroup, EventHub, EventKind
from kvrpc.protocol import ProtocolDefinition

NS = b"ns-one!!"


def h(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


def store(hub: EventHub, i: int, ns: bytes = NS) -> None:
    hub.publish(EventKind.STORED, "l1", ChunkGroup(ns, 0, (h(i),), "model", 1))


async def subscribed(hub: EventHub) -> None:
    """Let the consumer's task take its first step: it subscribes, finds nothing, waits.

    One turn of the loop, not a clock: the task was scheduled before this yields.
    """
    await asyncio.sleep(0)
    assert hub.subscriptions == 1


async def test_events_come_out_in_order_and_a_publish_wakes_a_waiting_consumer() -> None:
    hub = EventHub(chunk_tokens=8)
    stream = kv_events(hub, EventsRequest())
    first = asyncio.ensure_future(anext(stream))
    await subscribed(hub)
    assert not first.done()  # nothing published yet: it waits
    store(hub, 1)
    store(hub, 2)
    assert (await first).seq == 1
    second = await anext(stream)
    assert (second.kind, second.seq, second.hashes) == ("stored", 2, [h(2)])
    await stream.aclose()


async def test_a_snapshot_comes_first_then_its_end_then_live_events() -> None:
    def source(namespace: bytes | None) -> Iterator[tuple[str, ChunkGroup]]:
        return iter([("disk", ChunkGroup(NS, 0, (h(0),)))])

    hub = EventHub(chunk_tokens=8, snapshot=source)
    stream = kv_events(hub, EventsRequest(snapshot=True))
    snap = await anext(stream)
    store(hub, 1)
    end, live = await anext(stream), await anext(stream)
    assert [(e.kind, e.seq) for e in (snap, end, live)] == [
        ("snapshot", 0),
        ("snapshot_end", 0),
        ("stored", 1),
    ]
    assert (snap.tier, snap.hashes) == ("disk", [h(0)])
    await stream.aclose()


async def test_a_consumer_that_stops_pulling_gets_one_gap_and_the_latest_events() -> None:
    hub = EventHub(chunk_tokens=8)
    stream = kv_events(hub, EventsRequest(buffer=4), batch=2)
    pulling = asyncio.ensure_future(anext(stream))
    await subscribed(hub)
    store(hub, 1)
    assert (await pulling).seq == 1
    for i in range(2, 22):  # the consumer pulls nothing meanwhile
        store(hub, i)
    rest = [await anext(stream) for _ in range(5)]
    assert [(e.kind, e.first, e.last) for e in rest[:1]] == [("gap", 2, 17)]
    assert [e.seq for e in rest[1:]] == [18, 19, 20, 21]
    store(hub, 22)
    assert (await anext(stream)).seq == 22
    await stream.aclose()


async def test_aclose_runs_the_finally_and_unsubscribes() -> None:
    hub = EventHub(chunk_tokens=8)
    stream = kv_events(hub, EventsRequest())
    store(hub, 1)  # nobody yet: not numbered
    pulling = asyncio.ensure_future(anext(stream))
    await subscribed(hub)
    store(hub, 2)
    await pulling
    assert hub.subscriptions == 1
    await stream.aclose()
    assert hub.subscriptions == 0 and not hub.watching


async def test_cancelling_a_waiting_consumer_unsubscribes() -> None:
    hub = EventHub(chunk_tokens=8)
    stream = kv_events(hub, EventsRequest())

    async def consume(items: AsyncIterator[KVEvent]) -> None:
        async for _ in items:
            pass

    task = asyncio.ensure_future(consume(stream))
    await subscribed(hub)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert hub.subscriptions == 0


async def test_the_stream_ends_when_the_hub_closes() -> None:
    hub = EventHub(chunk_tokens=8)
    stream = kv_events(hub, EventsRequest())
    pulling = asyncio.ensure_future(anext(stream))
    await subscribed(hub)
    hub.close()
    with pytest.raises(StopAsyncIteration):
        await pulling


async def test_a_refused_subscription_raises_on_the_first_pull() -> None:
    hub = EventHub(chunk_tokens=8, max_subscribers=1)
    hub.subscribe()
    with pytest.raises(KVError, match="limit"):
        await anext(kv_events(hub, EventsRequest()))


# ------------------------------------------------------------------ on the wire

_STREAM = ProtocolDefinition("test.events", (EventsRequest,), KVEvent, doc="For these tests.")


def test_wire_events_cross_the_codec_and_strict_validation_unchanged() -> None:
    hub = EventHub(chunk_tokens=8)
    sub = hub.subscribe(buffer=1)
    store(hub, 1)
    store(hub, 2)
    hub.publish(EventKind.REMOVED, "disk", ChunkGroup(NS, 3, (h(3),)), reason="evicted")
    for event in sub.take(10):  # a gap, then the removal
        sent = wire_event(event)
        got = _STREAM.validate_response(decode(encode_response(7, sent)).payload)
        assert got == sent
    assert (got.kind, got.worker_id, got.reason, got.model_name) == ("removed", 3, "evicted", None)


def test_an_events_request_is_checked_at_the_door() -> None:
    sent = EventsRequest(snapshot=True, buffer=16, namespace=NS)
    (got,) = _STREAM.validate_payload(decode(encode_request(1, _STREAM.name, [sent])).payload)
    assert got == sent and EventsRequest().buffer == 1024
    for bad in ({"buffer": 0}, {"buffer": 1 << 17}, {"namespace": b"abc"}, {"other": 1}):
        with pytest.raises(PayloadValidationError):
            _STREAM.validate_payload([bad])
