"""The ``kv.events`` handler: a hub subscription as an async generator of wire events.

The generator subscribes, then yields what the subscription holds, a few events at a time,
and between batches waits on an :class:`asyncio.Event` that the subscription's
:attr:`~kvrpc.kv.server.events.Subscription.wakeup` sets: no polling. The RPC core pulls
items as the consumer's credits allow; while it does not pull, the subscription's bounded
buffer fills and the hub turns what falls out into a gap event, so a slow consumer costs
the server at most its buffer plus one batch. Cancelling or closing the generator (the
consumer left, the connection dropped) runs its ``finally``, which unsubscribes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from kvrpc.kv.protocols import EventsRequest, KVEvent
from kvrpc.kv.server.events import Event, EventHub

__all__ = ["kv_events", "wire_event"]


async def kv_events(
    hub: EventHub, request: EventsRequest, *, batch: int = 32
) -> AsyncIterator[KVEvent]:
    """The stream of one ``kv.events`` subscriber: its snapshot if asked, then live events.

    Takes up to ``batch`` events from the subscription at a time: the most it holds
    beyond the subscription's buffer. Ends when the hub closes (the server is shutting
    down). The subscription is taken when the first item is pulled, which raises
    :class:`~kvrpc.errors.KVError` if the hub refuses it (too many subscribers, or
    closing).
    """
    sub = hub.subscribe(request.buffer, snapshot=request.snapshot, namespace=request.namespace)
    ready = asyncio.Event()
    sub.wakeup = ready.set
    try:
        while True:
            events = sub.take(batch)
            if not events:
                if sub.closed:
                    return
                # take() and clear() run in one step of the loop: no publish slips between
                # them, so a wakeup for anything published later is never lost.
                ready.clear()
                await ready.wait()
                continue
            for event in events:
                yield wire_event(event)
    finally:
        sub.close()


def wire_event(event: Event) -> KVEvent:
    """``event`` as the wire's :class:`~kvrpc.kv.protocols.KVEvent`.

    Built without validation: every field comes from the hub, which makes only valid
    ones, and a stream of many small items must not pay pydantic's checks per item.
    """
    return KVEvent.model_construct(
        kind=event.kind.value,
        seq=event.seq,
        tier=event.tier,
        namespace=event.namespace,
        model_name=event.model_name,
        world_size=event.world_size,
        worker_id=event.worker_id,
        hashes=list(event.hashes),
        chunk_tokens=event.chunk_tokens,
        source=event.source,
        reason=event.reason,
        first=event.first,
        last=event.last,
    )
