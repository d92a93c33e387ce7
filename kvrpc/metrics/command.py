"""The command-line side of metrics: ``kvrpc serve``'s metrics flags and ``kvrpc stats``.

Kept here, beside what they drive, so that :mod:`kvrpc.cli` only wires them in.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import time
from typing import Any

from kvrpc.metrics.health import TIER_NAMES

__all__ = [
    "add_serve_arguments",
    "add_stats_arguments",
    "check_serve_arguments",
    "run_stats",
    "serve_settings",
]

#: Seconds between two tables of ``kvrpc stats --watch`` without a value.
WATCH_DEFAULT = 2.0


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """``--metrics-port``, ``--metrics-host``, ``--metrics-insecure``, ``--readyz-ignore``."""
    group = serve.add_argument_group(
        "metrics and health",
        "Prometheus /metrics, /livez and /readyz on one HTTP port (needs kvrpc[metrics])",
    )
    group.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve /metrics, /livez and /readyz on this port (0: a free one, printed in the "
        "ready line as metrics=URL; default: no endpoint)",
    )
    group.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address of the metrics port; anything but loopback needs --metrics-insecure",
    )
    group.add_argument(
        "--metrics-insecure",
        action="store_true",
        help="allow a --metrics-host other than loopback: the endpoint has no authentication "
        "yet, so anyone who reaches it reads the server's figures",
    )
    group.add_argument(
        "--readyz-ignore",
        action="append",
        default=[],
        choices=TIER_NAMES,
        metavar="TIER",
        help="a tier (disk, redis) whose state /readyz does not depend on (repeatable): a "
        "Redis shared by every server would otherwise take them all out of service at once",
    )


def check_serve_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the metrics flags (a message naming the flag), or None."""
    if args.metrics_port is None:
        if args.metrics_insecure or args.readyz_ignore:
            return "--metrics-insecure and --readyz-ignore need --metrics-port"
        return None
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return (
            "--metrics-port needs prometheus_client, which is not installed; install it with: "
            "pip install 'kvrpc[metrics]'"
        )
    if not is_loopback(args.metrics_host) and not args.metrics_insecure:
        return (
            f"--metrics-host {args.metrics_host} is not a loopback address, and the metrics "
            "port has no authentication yet: add --metrics-insecure to serve it there anyway "
            "(then restrict who can reach it, with a firewall or a network policy)"
        )
    return None


def insecure_warning(args: argparse.Namespace) -> str | None:
    """The warning to print when the metrics port is served beyond loopback, or None."""
    if args.metrics_port is None or is_loopback(args.metrics_host):
        return None
    return (
        f"the metrics port on {args.metrics_host} is unauthenticated: anyone who reaches it "
        "reads the server's figures and health"
    )


def serve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~kvrpc.kv.server.serving.KVServerSettings` fields these flags set."""
    return {
        "metrics_port": args.metrics_port,
        "metrics_host": args.metrics_host,
        "readyz_ignore": tuple(dict.fromkeys(args.readyz_ignore)),
    }


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def add_stats_arguments(stats: argparse.ArgumentParser) -> None:
    """``--watch [SECONDS]`` and ``--json``."""
    stats.add_argument(
        "--watch",
        type=_positive_seconds,
        nargs="?",
        const=WATCH_DEFAULT,
        metavar="SECONDS",
        help=f"refresh every SECONDS ({WATCH_DEFAULT:g} if none given) until Ctrl-C; counters "
        "show their rate per second",
    )
    stats.add_argument(
        "--json",
        action="store_true",
        help="print JSON for scripts instead of the table (with --watch: one line per refresh)",
    )


def run_stats(
    url: str,
    timeout: float,
    watch: float | None,
    as_json: bool,
    auth_token_file: str | None = None,
) -> int:
    """Print ``url``'s counters once, or every ``watch`` seconds until Ctrl-C; returns 0.

    ``auth_token_file`` is the server's token file where it requires one.
    """
    from kvrpc.client import SyncClient
    from kvrpc.metrics.table import render_stats

    with SyncClient(
        url, timeout=timeout, connect_timeout=timeout, auth_token_file=auth_token_file
    ) as client:
        has_kv = "kv.stats" in client.call("rpc.list_protocols")

        def ask() -> dict[str, dict[str, int]]:
            report = {"rpc": client.call("rpc.stats")}
            if has_kv:
                report["kv"] = client.call("kv.stats")
            return report

        if watch is None:
            report = ask()
            if as_json:
                print(json.dumps(report, indent=2, sort_keys=True))
            else:
                print(render_stats(report, title=f"kvrpc stats {url}"))
            return 0
        previous: dict[str, dict[str, int]] | None = None
        taken = 0.0
        clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
        try:
            while True:
                report, now = ask(), time.monotonic()
                if as_json:
                    print(json.dumps(report, sort_keys=True), flush=True)
                else:
                    title = f"kvrpc stats {url}  {time.strftime('%H:%M:%S')}  (Ctrl-C stops)"
                    table = render_stats(
                        report, title=title, previous=previous, interval=now - taken
                    )
                    print(f"{clear}{table}\n", flush=True)
                previous, taken = report, now
                time.sleep(watch)
        except KeyboardInterrupt:
            return 0


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port is a number 0-65535, not {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number 0-65535, not {value}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seconds are a number, not {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be above 0 seconds and finite, not {text}")
    return value
