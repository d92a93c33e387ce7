"""An RPCServer with protocols of its own, called through AsyncClient over inproc://.

Run it from the repository root:

    python examples/async_client.py

Server and client share one event loop here; inproc:// works the same way across threads
(see sync_client.py), and a ZMQ or Unix-socket URL would work across processes once those
transport plugins are installed.

sync_client.py imports the protocol definitions and ``build_server`` from this file: the
definitions are plain module constants, shared by the code that serves them and the code
that calls them.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from pydantic import BaseModel

from kvrpc import (
    AsyncClient,
    HandlerType,
    PayloadValidationError,
    ProtocolDefinition,
    ProtocolRegistry,
    RemoteError,
    RPCServer,
)

URL = "inproc://examples-async"


class WordCount(BaseModel):
    """The response of ``demo.count_words``."""

    words: int
    distinct: int
    most_common: str


# NONBLOCKING + ``async def``: the server runs each call as a task on its event loop, so
# many of them can wait at once without holding a thread.
GREET = ProtocolDefinition("demo.greet", (str, float), str, doc="Greets after a delay.")

# BLOCKING: the handler is plain CPU-bound (or blocking) code; the server runs it in its
# bounded thread pool so the event loop keeps serving other requests meanwhile.
COUNT_WORDS = ProtocolDefinition(
    "demo.count_words", (str,), WordCount, HandlerType.BLOCKING, doc="Counts words of a text."
)

# NONBLOCKING + plain function: runs inline on the loop, the cheapest path. It must not block.
DIVIDE = ProtocolDefinition("demo.divide", (int, int), float, doc="Integer division, as float.")

PROTOCOLS = (GREET, COUNT_WORDS, DIVIDE)


async def greet(name: str, delay: float) -> str:
    await asyncio.sleep(delay)  # stands for waiting on I/O
    return f"hello, {name}"


def count_words(text: str) -> WordCount:
    words = text.lower().split()
    word, _ = Counter(words).most_common(1)[0] if words else ("", 0)
    return WordCount(words=len(words), distinct=len(set(words)), most_common=word)


def divide(a: int, b: int) -> float:
    return a / b  # b == 0 raises ZeroDivisionError, which the client gets as RemoteError


def build_server(url: str) -> RPCServer:
    """A server answering the built-in rpc.* protocols and the three demo.* ones."""
    server = RPCServer(url, max_workers=4)
    server.register(GREET, greet)
    server.register(COUNT_WORDS, count_words)
    server.register(DIVIDE, divide)
    return server


def client_registry() -> ProtocolRegistry:
    """The definitions a client validates against: the built-ins and the demo group."""
    registry = ProtocolRegistry.with_builtins()
    registry.extend(PROTOCOLS)
    return registry


async def main() -> None:
    server = build_server(URL)
    # registry=: calls by name ("demo.count_words") are validated and their responses
    # rebuilt into the declared types (a WordCount, not a dict) on the client side too.
    async with server, AsyncClient(URL, registry=client_registry(), timeout=10.0) as client:
        print("protocols:", ", ".join(await client.call("rpc.list_protocols")))
        print("rpc.ping ->", await client.call("rpc.ping"))

        # call(): send one request and wait for its reply.
        print("demo.greet ->", await client.call(GREET, "async world", 0.01))
        counted = await client.call("demo.count_words", "the cat saw the other cat and the dog")
        print(
            f"demo.count_words -> {type(counted).__name__}: words={counted.words} "
            f"distinct={counted.distinct} most_common={counted.most_common!r}"
        )

        # submit(): send now, collect later. Five greets that each wait 0.2 s finish in about
        # 0.2 s in all, because the server runs them as concurrent tasks.
        started = time.perf_counter()
        futures = [await client.submit(GREET, f"caller {i}", 0.2) for i in range(5)]
        replies = await asyncio.gather(*futures)
        elapsed = time.perf_counter() - started
        print(f"5 submitted demo.greet calls -> {replies[0]!r} ... {replies[-1]!r}")
        print(f"5 calls of 0.2 s each took {elapsed:.2f} s (they ran concurrently)")

        # Submitted futures of different protocols can be in flight together.
        quotient, words = await asyncio.gather(
            await client.submit(DIVIDE, 355, 113),
            await client.submit(COUNT_WORDS, "to be or not to be"),
        )
        print(f"demo.divide(355, 113) -> {quotient:.6f}; 'to be or not to be' -> {words.words}")

        # A payload of the wrong type never leaves the client: strict validation refuses a
        # str where an int is declared instead of coercing it.
        try:
            await client.call(DIVIDE, "355", 113)
        except PayloadValidationError as exc:
            print(f"refused before sending: PayloadValidationError: {exc}")

        # An exception raised inside a handler comes back as RemoteError, naming its type.
        try:
            await client.call(DIVIDE, 1, 0)
        except RemoteError as exc:
            print(f"handler raised on the server: RemoteError({exc.remote_type}): {exc}")

        stats = await client.call("rpc.stats")
        print(
            f"server stats: requests={stats['requests']} responses={stats['responses']} "
            f"handler_errors={stats['handler_errors']}"
        )
    print("server and client closed")


if __name__ == "__main__":
    asyncio.run(main())
