"""``kvrpc events``: a server's ``kv.events`` stream, printed a line per event.

:func:`describe` (a line for people) and :func:`as_json` (an object for scripts, bytes as
hex) are pure; :func:`run_events` subscribes and prints until the stream ends, ``count``
events were printed, or Ctrl-C. :mod:`kvrpc.cli` only declares the flags and calls it.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from kvrpc.kv.protocols import KVEvent

__all__ = ["as_json", "describe", "run_events"]

#: Hex digits of a chunk hash shown in a line: enough to tell chunks apart by eye.
HASH_PREFIX = 12

_CHUNK_KINDS = frozenset({"stored", "removed", "moved", "snapshot"})


def describe(event: KVEvent) -> str:
    """One line telling ``event`` to a person: its number, kind, tier, whose chunks, why.

    A chunk event names the model and world size (or, when the server does not know them,
    the namespace id), the rank, how many hashes and the first one's hex prefix; a gap
    says which numbers were lost and how to see what is held now.
    """
    seq = f"{event.seq:>8}"
    if event.kind == "gap":
        return (
            f"{seq} gap          events {event.first} to {event.last} were lost: this "
            "subscriber fell behind its buffer (subscribe again with --snapshot to see what "
            "is held now)"
        )
    if event.kind == "snapshot_end":
        return f"{seq} snapshot_end the snapshot is complete; live events follow"
    if event.kind == "cleared":
        return f"{seq} cleared      {event.tier:<5} holds no chunk now"
    if event.model_name is not None:
        whose = f"{event.model_name} ws={event.world_size}"
    else:  # chunks of a namespace not registered since the server started (disk, say)
        whose = f"namespace {event.namespace.hex()}"
    count = len(event.hashes)
    line = (
        f"{seq} {event.kind:<12} {event.tier:<5} {whose} rank {event.worker_id}: "
        f"{count} {'chunk' if count == 1 else 'chunks'} of {event.chunk_tokens} tokens"
    )
    if event.hashes:
        line += f", first {event.hashes[0].hex()[:HASH_PREFIX]}"
    if event.source is not None:
        line += f" (from {event.source})"
    if event.reason is not None:
        line += f" ({event.reason})"
    return line


def as_json(event: KVEvent) -> dict[str, Any]:
    """``event``'s fields as a JSON-ready dict: the namespace and the hashes as hex strings."""
    fields = event.model_dump()
    fields["namespace"] = event.namespace.hex()
    fields["hashes"] = [h.hex() for h in event.hashes]
    return fields


def run_events(
    url: str,
    *,
    snapshot: bool = False,
    buffer: int | None = None,
    namespace: bytes | None = None,
    count: int | None = None,
    json_lines: bool = False,
    timeout: float = 5.0,
    auth_token_file: str | None = None,
    curve_server_key_file: str | None = None,
) -> int:
    """Print ``url``'s events until the stream ends, after ``count`` events, or Ctrl-C.

    Returns the exit status: 0 after ``count`` events, on Ctrl-C, or when the reader of
    stdout goes away (``| head``); 1, with the reason on stderr, when the server refuses
    the subscription, serves no ``kv.events``, closes the stream (it is shutting down) or
    the connection breaks. ``timeout`` bounds connecting and the first calls, never the
    wait for the next event.
    """
    from kvrpc.client import SyncClient
    from kvrpc.errors import ConnectionLost, ServerBusy
    from kvrpc.kv.protocols import EVENTS, EventsRequest, kv_registry
    from kvrpc.protocol import LIST_PROTOCOLS

    asked: dict[str, Any] = {"snapshot": snapshot, "namespace": namespace}
    if buffer is not None:
        asked["buffer"] = buffer
    request = EventsRequest(**asked)
    printed = 0
    try:
        with SyncClient(
            url,
            registry=kv_registry(),
            timeout=timeout,
            connect_timeout=timeout,
            auth_token_file=auth_token_file,
            curve_server_key_file=curve_server_key_file,
        ) as client:
            if EVENTS.name not in client.call(LIST_PROTOCOLS):
                return _failed(
                    f"{url} serves no {EVENTS.name}: it is not a KV server, or one older "
                    "than the events stream"
                )
            try:
                # timeout=None: a quiet cache sends nothing for as long as it likes.
                with client.stream(EVENTS, request, timeout=None) as events:
                    for event in events:
                        line = json.dumps(as_json(event)) if json_lines else describe(event)
                        print(line, flush=True)
                        printed += 1
                        if count is not None and printed >= count:
                            return 0
            except ConnectionLost as exc:
                return _failed(
                    f"lost the connection to {url} after {_events(printed)} ({exc}): the "
                    "server stopped or crashed"
                )
            except ServerBusy:  # a server shutting down ends its streams so
                pass
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how a watcher stops, as 'kvrpc stats --watch' does
    except BrokenPipeError:
        # The reader left (``kvrpc events URL | head``): nothing more to print, and
        # stdout must not raise again when the interpreter flushes it on exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return _failed(
        f"{url} ended the event stream after {_events(printed)}: the server is shutting down"
    )


def _events(n: int) -> str:
    return f"{n} event" if n == 1 else f"{n} events"


def _failed(why: str) -> int:
    print(f"kvrpc events: {why}", file=sys.stderr)
    return 1
