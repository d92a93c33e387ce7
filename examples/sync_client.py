"""The server of async_client.py on a background thread, used through SyncClient.

Run it from the repository root:

    python examples/sync_client.py

This is the shape of a program that is not written with asyncio (a web worker, a training
loop, an inference engine's connector): the server gets an event loop of its own on a
thread, and SyncClient, which runs its own loop thread, is called from ordinary threads.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

# The directory of a script run as `python examples/sync_client.py` is on sys.path, so the
# protocol definitions and the server of the async example import from there.
from async_client import COUNT_WORDS, DIVIDE, GREET, build_server, client_registry

from kvrpc import MessagingFuture, RemoteError, RPCServer, SyncClient

URL = "inproc://examples-sync"


class ServerThread:
    """Runs an RPCServer on a thread with its own event loop until :meth:`stop`."""

    def __init__(self, server: RPCServer) -> None:
        self.server = server
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvrpc-server")

    def start(self) -> None:
        """Start the thread and return once the server is bound (or raise why it is not)."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def stop(self) -> None:
        """Stop the server gracefully and wait for its thread to end."""
        # stop() is safe to call from any thread; going through call_soon_threadsafe, as
        # here, is the general way to run something on another thread's event loop.
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.server.stop)
        self._thread.join()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()  # never leave start() waiting, whatever happened

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        async with self.server:
            self._ready.set()  # bound: clients can connect from now on
            await self.server.wait_for_stop()


TEXTS = [
    "a rose is a rose is a rose",
    "the quick brown fox jumps over the lazy dog",
    "it was the best of times it was the worst of times",
    "all that glitters is not gold",
]


def worker(client: SyncClient, index: int) -> str:
    """What each pool thread does: blocking calls on the one shared client."""
    counted = client.call(COUNT_WORDS, TEXTS[index])
    greeting = client.call(GREET, f"thread {index}", 0.05)
    return f"{greeting}: {counted.words} words, most common {counted.most_common!r}"


async def await_reply(future: MessagingFuture[str]) -> str:
    return await future


def main() -> None:
    server_thread = ServerThread(build_server(URL))
    server_thread.start()
    try:
        # SyncClient connects in its constructor; one client is shared by every thread.
        with SyncClient(URL, registry=client_registry(), timeout=10.0) as client:
            print("rpc.ping from the main thread ->", client.call("rpc.ping"))

            # submit() returns a MessagingFuture at once; result() blocks for the reply.
            future: MessagingFuture[float] = client.submit(DIVIDE, 22, 7)
            # Done callbacks run on the thread that resolves the future (the client's loop
            # thread), or at once if it is already done: keep them short.
            called_back = threading.Event()
            future.add_done_callback(lambda f: called_back.set())
            print(f"demo.divide(22, 7) -> {future.result(timeout=10):.4f}")
            print(f"done callback ran: {called_back.wait(timeout=10)}")

            # A MessagingFuture can also be awaited, from any event loop.
            greeting = asyncio.run(await_reply(client.submit(GREET, "asyncio", 0.0)))
            print("awaited from a fresh event loop ->", greeting)

            # Many submitted calls in flight; the greets wait 0.3 s each on the server.
            started = time.perf_counter()
            futures = [client.submit(GREET, f"future {i}", 0.3) for i in range(4)]
            replies = [f.result(timeout=10) for f in futures]
            elapsed = time.perf_counter() - started
            print(f"4 submitted demo.greet calls -> {replies}")
            print(f"4 calls of 0.3 s each took {elapsed:.2f} s (they ran concurrently)")

            # The same client used from several threads at once.
            with ThreadPoolExecutor(max_workers=len(TEXTS)) as pool:
                for line in pool.map(worker, [client] * len(TEXTS), range(len(TEXTS))):
                    print("worker:", line)

            # A failed call: the future holds the exception, and result() raises it.
            failing = client.submit(DIVIDE, 1, 0)
            error = failing.exception(timeout=10)
            print(f"demo.divide(1, 0) failed: {type(error).__name__}: {error}")
            try:
                failing.result()
            except RemoteError as exc:
                print(f"result() raised RemoteError with remote_type={exc.remote_type}")

            stats = client.call("rpc.stats")
            print(f"server stats: requests={stats['requests']} in_flight={stats['in_flight']}")
            print(f"client stats: {client.stats.as_dict()}")
    finally:
        server_thread.stop()
    print("server thread stopped")


if __name__ == "__main__":
    main()
