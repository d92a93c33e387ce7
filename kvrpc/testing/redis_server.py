"""Real redis-servers for tests and benchmarks: one node, or a Redis Cluster, on loopback.

Each server runs in a temporary directory of its own, on a free loopback port, with no
persistence, and is stopped (SIGKILL if it must) when its owner closes it. Nothing here
fakes Redis: the processes are Debian's (or any) ``redis-server`` and ``redis-cli`` found
on the ``PATH``; :func:`redis_available` says whether they are there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["RedisCluster", "RedisProcess", "redis_available"]

_START_WAIT = 10.0  # seconds a starting server may take to answer PING


def redis_available() -> bool:
    """True if ``redis-server`` and ``redis-cli`` are on the PATH."""
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def _free_port() -> int:
    """A free loopback port whose cluster bus port (the port + 10000) is a port too."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port + 10000 <= 65535:
            return port


class RedisProcess:
    """One ``redis-server`` on ``127.0.0.1:port``; :meth:`kill`, :meth:`pause`, restart.

    ``config`` adds ``--name value`` pairs (``maxmemory``, ``cluster-enabled``...). The
    port stays the same across :meth:`restart`, so clients find it where they left it.
    """

    def __init__(self, config: Sequence[tuple[str, str]] = (), *, port: int | None = None) -> None:
        self.port = port if port is not None else _free_port()
        self.config = list(config)
        self.directory = Path(tempfile.mkdtemp(prefix="kvrpc-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers PING (raises if it does not)."""
        args = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.directory), "--save", "", "--appendonly", "no",
            "--protected-mode", "no", "--loglevel", "warning",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        for name, value in self.config:
            args += [f"--{name}", value]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_WAIT
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not start: {log}")
            time.sleep(0.01)

    def cli(self, *args: str, timeout: float = 10.0) -> str:
        """Run ``redis-cli -p PORT args...``; its output (raises on a non-zero exit)."""
        done = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args],
            capture_output=True,
            timeout=timeout,
            check=True,
        )
        return done.stdout.decode(errors="replace").strip()

    def ping(self) -> bool:
        """True if the server answers PING within a second."""
        try:
            return self.cli("ping", timeout=1.0) == "PONG"
        except (subprocess.SubprocessError, OSError):
            return False

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets open but answers nothing."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the server and reap it; its data is gone."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)
            process.kill()
        process.wait(timeout=10)

    def restart(self) -> None:
        """Kill it, then start an empty one on the same port."""
        self.kill()
        self.start()

    def close(self) -> None:
        """Kill the server and delete its directory."""
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RedisCluster:
    """A Redis Cluster of ``nodes`` masters on loopback, made with ``redis-cli --cluster``.

    ``config`` adds ``--name value`` pairs to every node's command line.
    """

    def __init__(self, nodes: int = 3, config: Sequence[tuple[str, str]] = ()) -> None:
        config = [("cluster-enabled", "yes"), ("cluster-node-timeout", "2000"), *config]
        self.nodes: list[RedisProcess] = []
        try:
            for _ in range(nodes):
                node = RedisProcess([*config, ("cluster-config-file", "nodes.conf")])
                self.nodes.append(node)
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            self.nodes[0].cli("--cluster", "create", *addresses, "--cluster-yes", timeout=60)
            # Every node, not the first only: a node that has not yet heard the new slot map
            # answers CLUSTERDOWN to the writes that reach it.
            deadline = time.monotonic() + _START_WAIT * 3
            while not all("cluster_state:ok" in n.cli("cluster", "info") for n in self.nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        """The URL of its first node (a cluster client finds the others from it)."""
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def close(self) -> None:
        """Kill every node and delete their directories."""
        for node in self.nodes:
            node.close()

    def __enter__(self) -> RedisCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


if os.name != "posix":  # pragma: no cover - signals and loopback servers need a POSIX host
    raise ImportError("kvrpc.testing.redis_server needs a POSIX host")
