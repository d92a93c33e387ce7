"""``kvrpc serve`` in a child process, for tests that need a real server they can kill."""

from __future__ import annotations

import signal
import subprocess
import sys

from kvrpc.client import SyncClient
from kvrpc.kv import protocols

__all__ = ["ServeProcess"]


class ServeProcess:
    """A ``kvrpc serve --url URL [options]`` child: started, killed, restarted, asked."""

    def __init__(self, url: str, *options: str) -> None:
        self.url = url
        self.options = options
        self.child: subprocess.Popen[str] | None = None

    def start(self) -> None:
        """Start the server and wait for its ready line."""
        command = [sys.executable, "-m", "kvrpc", "serve", "--url", self.url, *self.options]
        self.child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.child.stdout is not None
        ready = self.child.stdout.readline()
        if not ready.startswith(f"kvrpc ready {self.url}"):
            self.child.kill()
            raise RuntimeError(f"kvrpc serve did not start: {ready!r}")

    def kill(self) -> None:
        """SIGKILL: the server dies with whatever it was doing."""
        assert self.child is not None
        self.child.send_signal(signal.SIGKILL)
        self.child.wait(10)

    def stop(self) -> None:
        """SIGTERM, if it still runs, and wait for a clean exit."""
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
            self.child.wait(15)

    def stats(self) -> dict[str, int]:
        """The server's ``kv.stats``."""
        with SyncClient(self.url, registry=protocols.kv_registry(), timeout=5) as client:
            stats: dict[str, int] = client.call(protocols.STATS)
        return stats
