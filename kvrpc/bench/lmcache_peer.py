"""LMCache's multi-process RPC, as it ships, for ``kvrpc bench rpc --vs lmcache``.

The system kvrpc replaces, measured in the same run and on the same host: LMCache's
``MessageQueueServer`` (ZeroMQ ROUTER, one main-loop thread) answering its ``noop`` operation
with a SYNC handler, the cheapest handler kind it has, and its ``MessageQueueClient`` (DEALER,
a shared polling thread, ``MessagingFuture`` results), called from a plain thread as its
scheduler and workers call it. Nothing of LMCache is changed or wrapped beyond the calls a user
makes. It needs ``lmcache`` importable (tested with 0.5.6, the version the goals name);
:func:`lmcache_version` says whether it is.

Run ``python -m kvrpc.bench.lmcache_peer ipc:///path`` to serve: it prints ``ready`` once
bound and serves until SIGTERM.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from kvrpc.errors import KvrpcError

__all__ = ["LMCacheSyncPath", "lmcache_version", "require_lmcache", "serve"]


def lmcache_version() -> str | None:
    """The installed LMCache's version if its multi-process messaging imports, else None."""
    try:
        import lmcache
        from lmcache.v1.multiprocess.transport.zmq_impl import mq  # noqa: F401
    except Exception:  # any failure to import means there is no peer to measure
        return None
    return str(getattr(lmcache, "__version__", "unknown"))


def require_lmcache() -> str:
    """The installed LMCache's version; raises :class:`KvrpcError` saying what to install."""
    version = lmcache_version()
    if version is None:
        raise KvrpcError(
            "--vs lmcache needs LMCache importable in this interpreter "
            "(pip install lmcache==0.5.6, on a machine where its CUDA build loads)"
        )
    return version


class LMCacheSyncPath:
    """A ``MessageQueueClient`` of the peer server, used the way LMCache's adapters use it."""

    def __init__(self, endpoint: str) -> None:
        import zmq
        from lmcache.v1.multiprocess.transport.zmq_impl.mq import MessageQueueClient

        self._context = zmq.Context()
        self._client = MessageQueueClient(endpoint, self._context)

    def call(self) -> None:
        """One ``noop``, waited for (LMCache's client has no other way to call)."""
        self._client.submit_request("noop", []).result()

    def send(self) -> Any:
        """Submit one ``noop``; the handle is LMCache's ``MessagingFuture``."""
        return self._client.submit_request("noop", [])

    def wait(self, handle: Any) -> None:
        """Block until that ``noop`` is answered."""
        handle.result()

    def close(self) -> None:
        """Close the client and its ZeroMQ context."""
        self._client.close()
        self._context.term()


def serve(endpoint: str) -> None:
    """Answer LMCache's ``noop`` at ``endpoint`` with a SYNC handler until SIGTERM."""
    import zmq
    from lmcache.v1.multiprocess.request_handler import HandlerType
    from lmcache.v1.multiprocess.transport.zmq_impl.mq import MessageQueueServer

    def noop() -> str:
        return "noop"

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    context = zmq.Context()
    server = MessageQueueServer(endpoint, context)
    server.add_handler("noop", HandlerType.SYNC, noop)
    server.start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.close()
    context.term()


if __name__ == "__main__":
    serve(sys.argv[1])
