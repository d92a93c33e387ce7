"""``kvrpc serve`` in a child process, for tests that need a real server they can kill."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile

from kvrpc.bench._child import ServerChild, kv_server_child
from kvrpc.client import SyncClient
from kvrpc.kv import protocols

__all__ = ["ServeProcess"]


class ServeProcess:
    """A ``kvrpc serve --url URL [options]`` child: started, killed, restarted, asked.

    Each start is one :func:`kvrpc.bench._child.kv_server_child` (which waits for the ready
    line and keeps the server's log in ``log_dir``), held open until :meth:`kill` or
    :meth:`stop`.
    """

    def __init__(self, url: str, *options: str, log_dir: str | None = None) -> None:
        self.url = url
        self.options = options
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="kvrpc-serve-")
        self.child: ServerChild | None = None
        self._running: contextlib.ExitStack | None = None

    def start(self) -> None:
        """Start the server and wait for its ready line, which must name this URL."""
        running = contextlib.ExitStack()
        self.child = running.enter_context(kv_server_child(self.url, self.log_dir, *self.options))
        self._running = running
        if not self.child.ready_line.startswith(f"kvrpc ready {self.url}"):
            self.stop()
            raise RuntimeError(f"kvrpc serve is not ready at {self.url}: {self.child.ready_line!r}")

    def kill(self) -> None:
        """SIGKILL: the server dies with whatever it was doing."""
        assert self.child is not None
        os.kill(self.child.pid, signal.SIGKILL)
        self.stop()

    def stop(self) -> None:
        """SIGTERM, if it still runs, and wait for it to exit."""
        running, self._running = self._running, None
        if running is not None:
            running.close()

    def stats(self) -> dict[str, int]:
        """The server's ``kv.stats``."""
        with SyncClient(self.url, registry=protocols.kv_registry(), timeout=5) as client:
            stats: dict[str, int] = client.call(protocols.STATS)
        return stats
