"""Child processes that print a ready line once they serve: ``kvrpc serve`` and the peers."""

from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from kvrpc.errors import KVError
from kvrpc.transport import local_url

__all__ = ["ServerChild", "default_url", "kv_server_child", "ready_child"]

_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ServerChild:
    """A running server child: its pid, the ready line it printed, and its log file."""

    pid: int
    ready_line: str
    log_path: str

    def log_tail(self, limit: int = 4000) -> str:
        """The end of the server's log (stderr), to show when something went wrong."""
        with open(self.log_path) as log:
            return log.read()[-limit:]


def default_url(directory: str) -> str:
    """A socket in ``directory``: Unix if that plugin is installed, else ZeroMQ ipc."""
    return local_url(directory, "kv.sock")


@contextlib.contextmanager
def kv_server_child(url: str, log_dir: str, *options: str) -> Iterator[ServerChild]:
    """Run ``kvrpc serve --url URL OPTIONS`` until the block ends (then SIGTERM).

    Waits for its ready line; raises :class:`KVError` with the log's end if none comes within
    a minute. The server's log goes to a file in ``log_dir``.
    """
    # --insecure: a benchmark's zmq+tcp server listens on loopback, without a token.
    argv = [sys.executable, "-m", "kvrpc", "serve", "--url", url, "--insecure", *options]
    with ready_child(argv, "kvrpc ready", log_dir, f"the server at {url}") as started:
        yield started


@contextlib.contextmanager
def ready_child(argv: list[str], ready: str, log_dir: str, what: str) -> Iterator[ServerChild]:
    """Run ``argv`` until the block ends (then SIGTERM, and SIGKILL 10 s later).

    Waits for a first line on its stdout that starts with ``ready``; raises :class:`KVError`
    naming ``what``, with the end of its log (its stderr, kept in ``log_dir``), if another
    line or none comes within a minute.
    """
    log_path = os.path.join(log_dir, f"child-{secrets.token_hex(4)}.log")
    with open(log_path, "w") as log:
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            line = _first_line(child, _START_TIMEOUT_S)
            started = ServerChild(child.pid, line.strip(), log_path)
            if not line.startswith(ready):
                log.flush()
                raise KVError(
                    f"{what} did not start (it printed {line!r}); its log ends "
                    f"with:\n{started.log_tail(2000)}"
                )
            yield started
        finally:
            if child.poll() is None:
                child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            if child.stdout is not None:
                child.stdout.close()


def _first_line(child: subprocess.Popen[str], timeout: float) -> str:
    assert child.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            return f"nothing within {timeout:g} s"
    return child.stdout.readline()
