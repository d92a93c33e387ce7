"""``kvrpc serve`` in a child process, for tests that need a real server they can kill."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from typing import Any

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

    def __init__(
        self,
        url: str,
        *options: str,
        log_dir: str | None = None,
        auth_token_file: str | None = None,
    ) -> None:
        self.url = url
        auth = () if auth_token_file is None else ("--auth-token-file", auth_token_file)
        self.options = (*options, *auth)
        #: The token file the server requires (given to :meth:`client_options` too), or None.
        self.auth_token_file = auth_token_file
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

    @property
    def pid(self) -> int:
        """The running server's process id."""
        assert self.child is not None, "the server is not running"
        return self.child.pid

    def client_options(self) -> dict[str, Any]:
        """What a client needs beside the URL: the token file, where the server has one."""
        return {} if self.auth_token_file is None else {"auth_token_file": self.auth_token_file}

    def kill(self) -> None:
        """SIGKILL: the server dies with whatever it was doing."""
        os.kill(self.pid, signal.SIGKILL)
        self.stop()

    def pause(self) -> None:
        """SIGSTOP: the server answers nothing, its sockets stay open, until :meth:`resume`."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM, if it still runs (resumed first, if paused), and wait for it to exit."""
        running, self._running = self._running, None
        if running is not None:
            assert self.child is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child.pid, signal.SIGCONT)  # a stopped process never exits
            running.close()

    def stats(self) -> dict[str, int]:
        """The server's ``kv.stats``."""
        registry = protocols.kv_registry()
        with SyncClient(self.url, registry=registry, timeout=5, **self.client_options()) as client:
            stats: dict[str, int] = client.call(protocols.STATS)
        return stats
