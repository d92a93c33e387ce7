"""The ``kvrpc`` command: ``serve``, ``demo``, ``ping``, ``stats``, ``events`` and ``bench``.

Exit status: 0 done, 1 a failure (the server unreachable, a benchmark that could not take a
figure, an extra not installed), 2 bad usage (a flag's value, or two flags that disagree),
130 interrupted. A benchmark exits 0 once its figures are taken, goals met or MISSED: it
reports, and a goal's verdict is one of its figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from kvrpc.errors import KvrpcError
from kvrpc.metrics import command as metrics_command
from kvrpc.sizes import format_size, parse_size

__all__ = ["main"]

GIB = 1 << 30

_DESCRIPTION = (
    "kvrpc: typed RPC over pluggable transports, and a KV-cache service for LLM inference "
    "engines. 'kvrpc serve' runs the cache, 'kvrpc demo' shows it at work, 'kvrpc ping' and "
    "'kvrpc stats' ask a running server, 'kvrpc events' watches its cache, 'kvrpc bench' "
    "measures."
)
_SIZES_EPILOG = (
    "A default in [brackets] is the full run's; --quick picks a smaller one where the flag is "
    "not given. Exit status: 0 once the figures are taken, goals met or MISSED; 1 if a figure "
    "could not be taken; 2 for bad usage."
)
_EPILOG = (
    "exit status: 0 done, 1 failed, 2 bad usage, 130 interrupted. "
    "Run 'kvrpc COMMAND --help' for a command's flags."
)


class _Failed(Exception):
    """A failure the command explains in full (what is wrong, what to do): exit status 1."""


class _Parser(argparse.ArgumentParser):
    """Every (sub)command's parser: help that shows each flag's default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to a flag's help where there is a default worth showing.

    Not for a default of None or False (no value, a switch off), nor where the help already
    names its default (``[2000]`` for a bench size that ``--quick`` changes, or "default:").
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
            or not action.option_strings
            or "default" in text
            or "[" in text
        ):
            return action.help
        return f"{text} (default: %(default)s)"


class _VersionAction(argparse.Action):
    """``--version``: the installed distribution's version, read only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kw: Any):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("kvrpc")
        except PackageNotFoundError:  # run from a source tree that was never installed
            found = "unknown (not installed)"
        print(f"kvrpc {found}")  # on stdout, as argparse's own version action prints
        parser.exit()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kvrpc`` command line; returns the exit status (see the module docstring).

    Bad usage exits through :class:`SystemExit` with status 2, as argparse does.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    # Only a server's log is worth reading by default; the other commands print their results.
    quiet = logging.INFO if args.command == "serve" else logging.WARNING
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else quiet,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        # Rules between flags and what a command needs installed, checked before it starts
        # (argparse checks one flag at a time). Bad usage exits here with status 2.
        args.check(args)
        result: int = args.run(args)
    except KvrpcError as exc:
        print(f"kvrpc {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except _Failed as exc:
        print(f"kvrpc {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvrpc", description=_DESCRIPTION, epilog=_EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    parser.add_argument("--version", action=_VersionAction, help="print kvrpc's version")
    parser.set_defaults(check=_no_check, url_option=None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run a KV-cache server until SIGINT/SIGTERM")
    serve.add_argument(
        "--url",
        help="URL to bind (default: unix://$XDG_RUNTIME_DIR/kvrpc/kvrpc.sock, or "
        "/tmp/kvrpc-<uid>/kvrpc.sock: a socket only this user can reach)",
    )
    serve.add_argument(
        "--also-url",
        action="append",
        default=[],
        metavar="URL",
        help="serve the same cache on this URL too (repeatable): the host's workers on a local "
        "socket, schedulers of other hosts on zmq+tcp://",
    )
    serve.add_argument(
        "--cpu-buffer-size",
        type=_gib,
        default=1.0,
        metavar="SIZE",
        help="L1 pool size: GiB, or with a unit (8GiB, 512MiB, 8GB); filled as chunks are "
        "stored, so size it to the memory the host can spare beside the engine (default: 1)",
    )
    serve.add_argument("--chunk-size", type=_positive_int, default=256, help="tokens per chunk")
    serve.add_argument(
        "--max-workers", type=_positive_int, default=4, help="copy threads and BLOCKING threads"
    )
    serve.add_argument(
        "--inbox-burst",
        type=_positive_int,
        default=64,
        help="requests of one read handled at once; the rest are queued and taken one client "
        "at a time, this many per loop turn (default: 64)",
    )
    serve.add_argument(
        "--inbox-burst-bytes",
        type=_byte_count,
        metavar="SIZE",
        help="bytes of requests one read (and one loop turn of the queue) handles at most, "
        "beside --inbox-burst's count; a larger request is handled alone: bytes, or with a "
        "unit (256KiB, 1MiB) (default: kvrpc.config's, 256KiB)",
    )
    serve.add_argument(
        "--stream-idle-timeout",
        type=_positive_float,
        default=60.0,
        help="seconds a stream (kv.events) waits for a consumer that reads nothing before it "
        "ends with StreamIdle (default: 60)",
    )
    serve.add_argument(
        "--client-timeout",
        type=_positive_float,
        default=8.0,
        help="seconds of silence after which a client's caches, pins and jobs are released",
    )
    serve.add_argument("--disk-dir", help="directory of a disk tier below L1 (default: none)")
    serve.add_argument(
        "--cuda-group-mib",
        type=_positive_int,
        default=256,
        help="MiB of each of a GPU copy engine's two staging buffers",
    )
    _store_copies_option(
        serve,
        (
            "how a GPU store moves blocks into L1: 'kernels' gathers them on the GPU into a "
            "staging buffer, then copies it; 'dma' copies them straight from the blocks with "
            "pitched DMA, running no kernel beside the engine's own (a fragmented block "
            "table goes through the kernels; kv.stats cuda_dma_store_fallbacks counts it). "
            "Default: kernels"
        ),
    )
    serve.add_argument(
        "--verify-retrieves",
        action="store_true",
        help=(
            "debug mode: after every retrieve, read the chunks back out of the worker's "
            "blocks and check them against their checksums; a chunk that fails is answered "
            "as CHECKSUM_MISMATCH (kv.stats retrieve_corrupt) instead of as retrieved. "
            "Costs about a second copy of every retrieved byte; GPU retrieves are answered "
            "once their copy completed"
        ),
    )
    serve.add_argument(
        "--no-checksums",
        dest="checksums",
        action="store_false",
        help=(
            "store chunks without computing their end-to-end checksum (the disk and Redis "
            "tiers still compute one as they write); for measuring its cost"
        ),
    )
    serve.add_argument(
        "--loop-probe",
        action="store_true",
        help="sample the event loop's lag every millisecond; kv.stats reports it (benchmarks)",
    )
    serve.add_argument(
        "--disk-size",
        type=_gib,
        default=16.0,
        metavar="SIZE",
        help="disk tier size: GiB, or with a unit (default: 16)",
    )
    redis = serve.add_argument_group(
        "Redis tier", "a store shared by the servers of several hosts (needs kvrpc[redis])"
    )
    redis.add_argument(
        "--redis-url",
        type=_redis_url,
        help="redis://HOST:PORT/DB or rediss:// (TLS) of a Redis tier below L1",
    )
    redis.add_argument(
        "--redis-cluster", action="store_true", help="the URL is a node of a Redis Cluster"
    )
    redis.add_argument("--redis-prefix", default="kvrpc:", help="what every key starts with")
    redis.add_argument(
        "--redis-ttl", type=_positive_float, help="seconds before a chunk expires (default: never)"
    )
    redis.add_argument(
        "--redis-write-budget",
        type=_gib,
        default=0.25,
        metavar="SIZE",
        help="writes queued for Redis (GiB, or with a unit); past it writes are dropped and "
        "counted (default: 0.25)",
    )
    redis.add_argument(
        "--redis-timeout",
        type=_positive_float,
        default=1.0,
        help="seconds any Redis operation may take before the tier is skipped and probed",
    )
    auth = serve.add_argument_group(
        "authentication", "a shared secret every client must prove it holds (docs/operating.md)"
    )
    auth.add_argument(
        "--auth-token-file",
        metavar="PATH",
        help="require the token in PATH (mode 0600, this user's, at least 16 bytes) of every "
        "client, on every URL, before any request is decoded",
    )
    auth.add_argument(
        "--curve-secret-file",
        metavar="PATH",
        help="encrypt the zmq+tcp:// URLs with ZMQ CURVE, with the secret key in PATH (mode "
        "0600; make a keypair with 'kvrpc keygen-curve DIR'): only clients given the public key "
        "connect",
    )
    auth.add_argument(
        "--insecure",
        action="store_true",
        help="serve zmq+tcp:// without --auth-token-file or --curve-secret-file: anyone who "
        "reaches the port can read, write and clear the cache",
    )
    caps = serve.add_argument_group(
        "per-client caps",
        "what one client (one adapter) may hold; past a cap its call is refused with "
        "CLIENT_LIMIT and nothing else changes (docs/operating.md)",
    )
    caps.add_argument(
        "--max-registrations-per-client",
        type=_positive_int,
        default=16,
        metavar="N",
        help="KV caches one client may have registered (default: 16)",
    )
    caps.add_argument(
        "--max-sessions-per-client",
        type=_positive_int,
        default=65536,
        metavar="N",
        help="requests one client may have looked up and not ended (default: 65536)",
    )
    caps.add_argument(
        "--max-pins-per-client",
        type=_positive_int,
        default=1 << 20,
        metavar="N",
        help="chunk pins over one client's sessions (default: 1048576)",
    )
    caps.add_argument(
        "--max-prefetch-jobs-per-client",
        type=_positive_int,
        default=4096,
        metavar="N",
        help="prefetch jobs one client may have whose count it has not taken (default: 4096)",
    )
    caps.add_argument(
        "--max-inflight-per-client",
        type=_gib,
        default=4.0,
        metavar="SIZE",
        help="bytes of one client's stores and retrieves being copied: GiB, or with a unit; "
        "a larger call still runs alone (default: 4)",
    )
    metrics_command.add_serve_arguments(serve)
    serve.set_defaults(run=_run_serve)

    demo = commands.add_parser(
        "demo", help="a KV server, a scheduler and two workers: a prompt served twice"
    )
    demo.add_argument(
        "which",
        nargs="?",
        choices=("kv", "rpc"),
        default="kv",
        help="kv (default): the KV-cache service; rpc: typed calls over inproc://",
    )
    demo.add_argument("--url", help="transport for the kv demo (default: a temporary socket)")
    demo.set_defaults(run=_run_demo)

    ping = commands.add_parser("ping", help="call rpc.ping on a server")
    ping.add_argument("url", nargs="?", help="the server (default: where 'kvrpc serve' listens)")
    _url_option(ping)
    ping.add_argument("--count", type=_positive_int, default=3, help="pings to send")
    ping.add_argument(
        "--timeout", type=_positive_float, default=5.0, help="seconds to connect, and per ping"
    )
    ping.add_argument(
        "--auth-token-file", metavar="PATH", help="the server's token file, if it requires one"
    )
    ping.add_argument(
        "--curve-server-key-file",
        metavar="PATH",
        help="the server's CURVE public key file, for a zmq+tcp server with --curve-secret-file",
    )
    ping.set_defaults(run=_run_ping)

    keygen = commands.add_parser(
        "keygen-curve",
        help="write a ZMQ CURVE keypair for 'kvrpc serve --curve-secret-file'",
        description="Writes DIR/NAME.key (the public key, for clients) and DIR/NAME.key_secret "
        "(the server's), both mode 0600, in zmq's Z85 text form; never replaces a file.",
    )
    keygen.add_argument("directory", metavar="DIR", help="where to write the two files")
    keygen.add_argument(
        "--name", type=_key_name, default="server", help="the files' name (default: server)"
    )
    keygen.set_defaults(run=_run_keygen_curve)

    stats = commands.add_parser(
        "stats", help="print a server's counters as a table (--json for scripts)"
    )
    stats.add_argument("url", nargs="?", help="the server (default: where 'kvrpc serve' listens)")
    _url_option(stats)
    stats.add_argument(
        "--timeout",
        type=_positive_float,
        default=5.0,
        help="seconds to connect, and per call",
    )
    stats.add_argument(
        "--auth-token-file", metavar="PATH", help="the server's token file, if it requires one"
    )
    metrics_command.add_stats_arguments(stats)
    stats.set_defaults(run=_run_stats)

    events = commands.add_parser(
        "events",
        help="print a KV server's kv.events: what its cache stores, evicts and moves "
        "(--json for scripts)",
        description="Subscribes to the server's kv.events stream and prints a line per event "
        "until Ctrl-C (exit status 0), --count events, or the server going away (status 1).",
    )
    events.add_argument("url", nargs="?", help="the server (default: where 'kvrpc serve' listens)")
    _url_option(events)
    events.add_argument(
        "--json",
        action="store_true",
        help="a JSON object per line (namespace and hashes as hex), for scripts",
    )
    events.add_argument(
        "--snapshot",
        action="store_true",
        help="first every chunk held now (kind snapshot, then one snapshot_end), then the live "
        "events, with no gap between the two",
    )
    events.add_argument(
        "--buffer",
        type=_event_buffer,
        metavar="N",
        help="live events the server keeps for this subscriber while it does not read; past it "
        "the oldest are dropped and a gap event says which (default: the server's, 1024)",
    )
    events.add_argument(
        "--namespace",
        type=_namespace_hex,
        metavar="HEX",
        help="only the chunk events of this namespace id (16 hex digits, as --json prints it)",
    )
    events.add_argument(
        "--count", type=_positive_int, metavar="N", help="exit after printing N events"
    )
    events.add_argument(
        "--timeout", type=_positive_float, default=5.0, help="seconds to connect and subscribe"
    )
    events.add_argument(
        "--auth-token-file", metavar="PATH", help="the server's token file, if it requires one"
    )
    events.add_argument(
        "--curve-server-key-file",
        metavar="PATH",
        help="the server's CURVE public key file, for a zmq+tcp server with --curve-secret-file",
    )
    events.set_defaults(run=_run_events)

    bench = commands.add_parser(
        "bench",
        help="benchmarks",
        description="Benchmarks: each prints its figures (and --json FILE writes them).",
        epilog="exit status: 0 once the figures are taken, whether each goal is met or MISSED "
        "(a goal's verdict is one of the figures); 1 if a figure could not be taken; "
        "2 for bad usage.",
    )
    benches = bench.add_subparsers(dest="bench", required=True)
    rpc = benches.add_parser("rpc", help="round trip, pipelined throughput and bandwidth")
    rpc.add_argument("--url", default="inproc://kvrpc-bench", help="transport to measure")
    rpc.add_argument("--calls", type=_positive_int, default=5000, help="sequential pings measured")
    rpc.add_argument(
        "--pipelined", type=_positive_int, default=20000, help="calls in the pipelined run"
    )
    rpc.add_argument(
        "--window", type=_positive_int, default=64, help="calls in flight when pipelined"
    )
    rpc.add_argument(
        "--payload-mib", type=_positive_int, default=64, help="echo payload for bandwidth, MiB"
    )
    rpc.add_argument(
        "--rounds", type=_positive_int, default=5, help="echo round trips for bandwidth"
    )
    rpc.add_argument(
        "--interleave",
        type=_positive_int,
        default=5,
        help="turns kvrpc and the baseline take; --calls and --pipelined are shared among them",
    )
    rpc.add_argument(
        "--sync",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure SyncClient against blocking raw clients (not for inproc URLs)",
    )
    rpc.add_argument(
        "--vs",
        choices=("lmcache",),
        help="also measure this peer system in the same run (lmcache: LMCache's MP RPC, "
        "which must be importable)",
    )
    rpc.add_argument(
        "--inbox-burst",
        type=_positive_int,
        help="the server's --inbox-burst, for the servers this bench starts (default: its own)",
    )
    rpc.add_argument(
        "--inbox-burst-bytes",
        type=_byte_count,
        metavar="SIZE",
        help="the server's --inbox-burst-bytes, for the servers this bench starts "
        "(default: its own)",
    )
    rpc.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    _plot_option(rpc, "bars of kvrpc and each baseline: ping p50/p99, pipelined calls/s")
    rpc.set_defaults(run=_run_bench_rpc, check=_checks(rpc, _check_bench_rpc))
    kv = benches.add_parser(
        "kv",
        help="KV service: lookup vs ping, store/retrieve vs memcpy, memory per chunk",
        epilog=_SIZES_EPILOG,
    )
    kv.add_argument("--url", help="where the servers listen (default: a temporary socket)")
    kv.add_argument(
        "--only",
        action="append",
        choices=("lookup", "transfer", "memory"),
        help="take only this figure (repeat for several; default: all three)",
    )
    kv.add_argument(
        "--quick",
        action="store_true",
        help="small versions of every figure: a check that the bench runs, too small to "
        "judge the goals by (their verdicts are printed, marked as such)",
    )
    kv.add_argument("--lookups", type=_positive_int, help="timed lookups (and pings) [2000]")
    kv.add_argument("--interleave", type=_positive_int, help="turns the lookup paths take [5]")
    kv.add_argument("--rounds", type=_positive_int, help="timed store/retrieve rounds [5]")
    kv.add_argument("--layers", type=_positive_int, help="layers of the transfer's KV [32]")
    kv.add_argument("--heads", type=_positive_int, default=2, help="KV heads per layer")
    kv.add_argument("--head-dim", type=_positive_int, default=64, help="head dimension")
    kv.add_argument("--chunks", type=_positive_int, help="chunks per store and retrieve [64]")
    kv.add_argument(
        "--tiny-chunks", type=_positive_int, help="chunks stored for the memory figure [1000000]"
    )
    kv.add_argument(
        "--tiny-batch", type=_positive_int, default=8192, help="keys per store message (memory)"
    )
    kv.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    _plot_option(kv, "a panel per figure taken: lookup vs ping, GB/s vs memcpy, bytes a chunk")
    gpu = benches.add_parser(
        "gpu",
        help="GPU path: cuda_ipc store/retrieve vs pinned copies, loop stall, GPU memory",
        epilog=_SIZES_EPILOG,
    )
    gpu.add_argument("--url", help="where the server listens (default: a temporary socket)")
    gpu.add_argument("--quick", action="store_true", help="a small workload")
    gpu.add_argument("--layers", type=_positive_int, help="layers of the KV cache [32]")
    gpu.add_argument("--blocks", type=_positive_int, help="blocks per layer [4000]")
    gpu.add_argument("--heads", type=_positive_int, default=8, help="KV heads per layer")
    gpu.add_argument("--head-dim", type=_positive_int, default=128, help="head dimension")
    gpu.add_argument("--chunks", type=_positive_int, help="chunks (256 tokens) per batch [64]")
    gpu.add_argument("--rounds", type=_positive_int, help="timed rounds [5]")
    gpu.add_argument(
        "--group-mib", type=_positive_int, default=256, help="the server's --cuda-group-mib"
    )
    _store_copies_option(
        gpu, "the server's --store-copies; the store-paths figure runs the other beside it"
    )
    gpu.add_argument(
        "--block-runs",
        type=_positive_int,
        default=1,
        help="block ids drawn as random runs of this many consecutive blocks [1: each at random]",
    )
    gpu.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    _plot_option(gpu, "transfers vs pinned copies, first transfer, loop stall, GPU memory")
    gpu.set_defaults(run=_run_bench_gpu, check=_checks(gpu, _check_bench_plot))
    e2e = benches.add_parser(
        "e2e",
        help="time to first token on a real model (random weights): miss vs hit (L1/Redis)",
        epilog=_SIZES_EPILOG,
    )
    e2e.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: a smoke run, a tiny 2-layer model on 256- and 512-token prompts, two rounds",
    )
    e2e.add_argument(
        "--quick",
        action="store_true",
        help="1k and 4k prompts, two rounds (with --device cpu: 256 and 512, as always there)",
    )
    e2e.add_argument(
        "--lengths",
        type=_token_count,
        nargs="+",
        help="cached prefixes in tokens, multiples of 256 [1024 4096 16384 32768]",
    )
    e2e.add_argument("--layers", type=_positive_int, help="layers of the model [32]")
    e2e.add_argument("--rounds", type=_positive_int, help="timed rounds per length [5]")
    e2e.add_argument(
        "--tier",
        choices=("l1", "redis"),
        default="l1",
        help="serve hits from L1, or from a local redis-server (L1 emptied before each) [l1]",
    )
    _store_copies_option(
        e2e, "the server's --store-copies: how it stores blocks (the decode figure's stores)"
    )
    e2e.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="the decode figure's steps replay a CUDA graph (idle and beside stores alike)",
    )
    _plot_option(e2e, "draw TTFT against prompt length")
    e2e.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    e2e.set_defaults(run=_run_bench_e2e, check=_checks(e2e, _check_bench_e2e))
    kv.set_defaults(run=_run_bench_kv, check=_checks(kv, _check_bench_plot))
    slow = benches.add_parser(
        "slow-reader", help="ping latency beside a client that never reads, against idle"
    )
    slow.add_argument("--url", required=True, help="where the server listens (a socket URL)")
    slow.add_argument("--seconds", type=_positive_float, default=3.0, help="per phase")
    slow.add_argument("--rounds", type=_positive_int, default=3, help="idle/flooded pairs")
    slow.add_argument(
        "--inbox-burst", type=_positive_int, help="the server's --inbox-burst (default: its own)"
    )
    slow.add_argument(
        "--inbox-burst-bytes",
        type=_byte_count,
        metavar="SIZE",
        help="the server's --inbox-burst-bytes (default: its own)",
    )
    slow.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    slow.set_defaults(run=_run_bench_slow_reader)
    stream = benches.add_parser(
        "stream",
        help="streamed items/s against pipelined calls/s; kv.events latency, losses, memory",
    )
    stream.add_argument(
        "--url", required=True, help="where the servers listen (a socket URL; more use it +1...)"
    )
    stream.add_argument(
        "--items", type=_positive_int, default=200_000, help="items of each streamed round"
    )
    stream.add_argument(
        "--calls", type=_positive_int, default=40_000, help="pipelined pings of each round"
    )
    stream.add_argument("--window", type=_positive_int, default=1024, help="the stream's window")
    stream.add_argument("--rounds", type=_positive_int, default=5, help="turns each takes")
    stream.add_argument(
        "--stores", type=_positive_int, default=5000, help="stores timed to their events"
    )
    stream.add_argument(
        "--events", type=_positive_int, default=100_000, help="events the memory figure makes"
    )
    stream.add_argument(
        "--buffer", type=_positive_int, default=1024, help="the stalled subscriber's buffer"
    )
    stream.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    stream.set_defaults(run=_run_bench_stream)
    metrics = benches.add_parser(
        "metrics",
        help="the metrics endpoint: /metrics scrape time, and its cost on the ping p50 "
        "(kvrpc[metrics])",
    )
    metrics.add_argument(
        "--url", help="where the metered server listens (default: a temporary socket)"
    )
    metrics.add_argument(
        "--chunks", type=_positive_int, default=10_000, help="tiny chunks each server holds"
    )
    metrics.add_argument(
        "--clients", type=_positive_int, default=64, help="clients kept connected to each server"
    )
    metrics.add_argument(
        "--scrapes", type=_positive_int, default=200, help="timed GETs of /metrics"
    )
    metrics.add_argument("--pings", type=_positive_int, default=2000, help="timed pings per server")
    metrics.add_argument(
        "--interleave", type=_positive_int, default=5, help="turns the two servers' pings take"
    )
    metrics.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    metrics.set_defaults(run=_run_bench_metrics, check=_checks(metrics, _check_bench_metrics))
    soak = benches.add_parser(
        "soak",
        help="a server under mixed load for minutes: RSS, descriptors, loop lag, p99 drift",
    )
    soak.add_argument(
        "--minutes", type=_positive_float, default=10.0, help="how long (fractions too) [10]"
    )
    soak.add_argument(
        "--clients", type=_positive_int, default=3, help="client processes connecting in turn"
    )
    soak.add_argument(
        "--interval",
        type=_positive_float,
        help="seconds between samples [30, at most a fifth of the soak]",
    )
    soak.add_argument("--prompts", type=_positive_int, default=32, help="distinct prompts")
    soak.add_argument(
        "--session-calls", type=_positive_int, default=50, help="lookups per client session"
    )
    soak.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    _plot_option(soak, "RSS, descriptors, loop lag and call p99 per interval")
    soak.set_defaults(run=_run_bench_soak, check=_checks(soak, _check_bench_soak))
    imports = benches.add_parser("import", help="time 'import kvrpc' in fresh interpreters")
    tier = benches.add_parser(
        "tier",
        help="the Redis tier: prefetch rate, lookup cost, RSS in an outage (kvrpc[redis])",
        epilog=_SIZES_EPILOG,
    )
    tier.add_argument("--redis-url", help="a Redis to use (default: start a local redis-server)")
    tier.add_argument("--cluster", action="store_true", help="a 3-node local Redis Cluster")
    tier.add_argument(
        "--only",
        nargs="+",
        choices=("prefetch", "lookup", "outage"),
        metavar="FIGURE",
        help="prefetch, lookup, outage [all three]",
    )
    tier.add_argument("--quick", action="store_true", help="small sizes, a 5 s outage")
    tier.add_argument("--chunks", type=_positive_int, help="chunks fetched per round [64]")
    tier.add_argument("--chunk-mib", type=_positive_float, help="MiB per chunk [16]")
    tier.add_argument("--part-mib", type=_positive_float, help="MiB per Redis value [4]")
    tier.add_argument("--rounds", type=_positive_int, help="rounds per reader, interleaved [5]")
    tier.add_argument(
        "--redis-io-threads",
        dest="io_threads",
        type=_positive_int,
        help="io-threads of the local redis-servers the prefetch figure starts [1]",
    )
    tier.add_argument("--lookups", type=_positive_int, help="timed lookups per server [2000]")
    tier.add_argument("--interleave", type=_positive_int, help="turns the lookups take [5]")
    tier.add_argument(
        "--outage", choices=("kill", "pause"), default="kill", help="how Redis goes down"
    )
    tier.add_argument(
        "--outage-seconds", type=_positive_float, help="seconds of stores while down [60]"
    )
    tier.add_argument("--pool-gib", type=_positive_float, help="the outage server's L1 [1]")
    tier.add_argument("--budget-gib", type=_positive_float, help="its --redis-write-budget [0.25]")
    tier.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    _plot_option(tier, "prefetch GB/s per round, lookup with and without Redis, outage RSS")
    tier.set_defaults(run=_run_bench_tier, check=_checks(tier, _check_bench_tier))

    imports.add_argument(
        "--runs", type=_positive_int, default=15, help="fresh interpreters, each timed once"
    )
    imports.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    imports.set_defaults(run=_run_bench_import)
    return parser


# ------------------------------------------------------------------------------ checks


def _no_check(args: argparse.Namespace) -> None:
    """A command whose flags argparse checks alone."""


def _checks(
    parser: argparse.ArgumentParser, check: Callable[[argparse.ArgumentParser, Any], None]
) -> Callable[[argparse.Namespace], None]:
    """``check`` bound to its subcommand's parser, whose ``error`` prints that usage line."""
    return lambda args: check(parser, args)


def _check_bench_rpc(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    # The sequential and pipelined calls are shared among the interleaved turns: a turn
    # with none would have no latency to report, after every other round had run.
    for flag, value in (("--calls", args.calls), ("--pipelined", args.pipelined)):
        if value < args.interleave:
            parser.error(
                f"argument {flag}: {value} calls cannot be shared among --interleave "
                f"{args.interleave} turns; give {flag} at least {args.interleave}, or a "
                "smaller --interleave"
            )


def _check_bench_e2e(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    # Checked here, not after minutes of prefills; the imports are needed anyway.
    _require_extra("transformers", "transformers", "kvrpc bench e2e")
    if args.cuda_graphs and args.device != "cuda":
        parser.error("--cuda-graphs needs --device cuda: CUDA graphs are captured on a GPU")
    _check_bench_plot(parser, args)


def _check_bench_tier(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _require_extra("redis", "redis", "kvrpc bench tier")
    _check_bench_plot(parser, args)


def _check_bench_metrics(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _require_extra("prometheus_client", "metrics", "kvrpc bench metrics")
    if args.pings < args.interleave:
        parser.error(
            f"argument --pings: {args.pings} pings cannot be shared among --interleave "
            f"{args.interleave} turns; give --pings at least {args.interleave}"
        )


def _check_bench_soak(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    # Growth is the last interval against the first: a soak needs two of them.
    interval = args.interval if args.interval is not None else min(30.0, args.minutes * 12)
    if args.minutes * 60 < 2 * interval:
        parser.error(
            f"argument --interval: {interval:g} s leaves fewer than two samples in "
            f"--minutes {args.minutes:g}; give an interval of at most {args.minutes * 30:g} s"
        )
    if not os.path.isdir("/proc/self/fd"):
        raise _Failed("kvrpc bench soak reads the server's /proc entries, which this OS lacks")
    _check_bench_plot(parser, args)


def _check_bench_plot(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _require_plot(args)


def _require_plot(args: argparse.Namespace) -> None:
    """``--plot`` needs matplotlib: said before the bench runs, not once its figures are in."""
    if args.plot:
        _require_extra("matplotlib", "plot", f"kvrpc bench {args.bench} --plot")


def _require_extra(module: str, extra: str, what: str) -> None:
    """Raise :class:`_Failed` naming the pip command where ``module`` cannot be imported."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise _Failed(
            f"{what} needs {module}, which is not installed ({exc}); install it with: "
            f"pip install 'kvrpc[{extra}]'"
        ) from None


# ------------------------------------------------------------------------------ serve


def _socket_path(url: str) -> str | None:
    """The filesystem path of a unix:// or zmq+ipc:// URL; None for any other scheme."""
    from kvrpc.transport import parse_url

    parsed = parse_url(url)
    return parsed.path if parsed.scheme in ("unix", "zmq+ipc") and parsed.path else None


def _make_socket_dirs(urls: Sequence[str]) -> None:
    """Create a socket URL's missing directory, mode 0700 (only this user may connect).

    ``/run/kvrpc`` and the like do not exist on a fresh host; a command pasted from the docs
    should work there. An existing directory is left as it is.
    """
    for url in urls:
        path = _socket_path(url)
        parent = os.path.dirname(path) if path else ""
        if not parent or os.path.isdir(parent):
            continue
        try:
            os.makedirs(parent, mode=0o700)
        except FileExistsError:
            continue  # made meanwhile by another server, or a file: binding will say which
        except OSError as exc:
            raise _Failed(
                f"cannot create {parent} for {url}: {exc.strerror}. Create it yourself "
                f"(for example: sudo install -d -m 0700 -o $USER {parent}) or give --url a "
                "socket in a directory of your own"
            ) from None
        print(f"kvrpc serve: created {parent} (mode 0700) for {url}", file=sys.stderr)


def _memory_bytes() -> int | None:
    """The machine's memory in bytes (``MemTotal``), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return None


def _serve_warnings(args: argparse.Namespace, urls: Sequence[str]) -> list[str]:
    """What ``kvrpc serve`` should tell its user before starting (it starts anyway)."""
    from kvrpc.transport import parse_url

    warnings = []
    memory = _memory_bytes()
    pool = int(args.cpu_buffer_size * GIB)
    if memory is not None and pool > memory:
        # The pool fills as chunks are stored, so the server starts, and fails only later.
        warnings.append(
            f"--cpu-buffer-size {format_size(pool)} is more than this machine's memory "
            f"({format_size(memory)}); the server starts, but may be killed for memory once "
            "the cache fills: give it what the host can spare beside the engine"
        )
    for url in urls:
        if parse_url(url).scheme == "inproc":
            warnings.append(
                f"{url} is reachable only from inside this process, so no client can "
                "connect to this server: use unix:// (local processes) or zmq+tcp:// (other "
                "hosts)"
            )
    return warnings


def _tcp_urls(urls: Sequence[str]) -> list[str]:
    from kvrpc.transport import parse_url

    return [url for url in urls if parse_url(url).scheme == "zmq+tcp"]


def _check_auth(args: argparse.Namespace, urls: Sequence[str]) -> str | None:
    """Why ``serve`` must not start as asked (a bad token file, TCP with no auth), or None."""
    tcp = _tcp_urls(urls)
    if args.curve_secret_file is not None:
        from kvrpc.curve import server_curve_keys
        from kvrpc.token_file import TokenFileError

        if not tcp:
            return (
                "--curve-secret-file encrypts zmq+tcp:// URLs only, and none is served "
                f"({', '.join(urls)}); local sockets are guarded by their file modes"
            )
        try:
            server_curve_keys(args.curve_secret_file)
        except TokenFileError as exc:
            return str(exc)
    if args.auth_token_file is not None:
        from kvrpc.token_file import TokenFileError, read_token_file

        try:
            read_token_file(args.auth_token_file)
        except TokenFileError as exc:
            return str(exc)
        return None
    if tcp and not args.insecure and args.curve_secret_file is None:
        return (
            f"{tcp[0]} would let anyone who reaches the port read, write and clear the cache: "
            "give --auth-token-file PATH (see docs/operating.md, Authentication), or "
            "--insecure to serve it unauthenticated anyway"
        )
    return None


def _run_serve(args: argparse.Namespace) -> int:
    from kvrpc.kv.server.serving import KVServerSettings, serve_kv

    problem = metrics_command.check_serve_arguments(args)
    if problem is not None:
        print(f"kvrpc serve: {problem}", file=sys.stderr)
        return 2
    insecure = metrics_command.insecure_warning(args)
    if insecure is not None:
        print(f"kvrpc serve: warning: {insecure}", file=sys.stderr, flush=True)
    from kvrpc.transport import parse_url

    url = _server_url(args)
    urls = [url, *args.also_url]
    problem = _check_auth(args, urls)
    if problem is not None:
        print(f"kvrpc serve: {problem}", file=sys.stderr)
        return 2
    if (
        args.insecure
        and args.auth_token_file is None
        and args.curve_secret_file is None
        and _tcp_urls(urls)
    ):
        print(
            f"kvrpc serve: warning: --insecure: {', '.join(_tcp_urls(urls))} is "
            "unauthenticated; anyone who reaches the port can read, write and clear the cache",
            file=sys.stderr,
            flush=True,
        )
    for warning in _serve_warnings(args, urls):
        print(f"kvrpc serve: warning: {warning}", file=sys.stderr, flush=True)
    if args.redis_url:
        _require_extra("redis", "redis", "kvrpc serve --redis-url")
    _make_socket_dirs([url, *args.also_url])
    # Only a local socket says who its peers are; say so where anyone may connect.
    exposed = any(
        parse_url(each).scheme not in ("unix", "zmq+ipc", "inproc")
        for each in [url, *args.also_url]
    )
    settings = KVServerSettings(
        url=url,
        also_urls=tuple(args.also_url),
        cpu_buffer_size=args.cpu_buffer_size,
        chunk_size=args.chunk_size,
        max_workers=args.max_workers,
        inbox_burst=args.inbox_burst,
        inbox_burst_bytes=args.inbox_burst_bytes,
        stream_idle_timeout=args.stream_idle_timeout,
        client_timeout=args.client_timeout,
        disk_dir=args.disk_dir,
        disk_size=args.disk_size,
        redis_url=args.redis_url,
        redis_cluster=args.redis_cluster,
        redis_prefix=args.redis_prefix,
        redis_ttl=args.redis_ttl,
        redis_write_budget=args.redis_write_budget,
        redis_timeout=args.redis_timeout,
        loop_probe=args.loop_probe,
        cuda_group_mib=args.cuda_group_mib,
        store_copies=args.store_copies,
        verify_retrieves=args.verify_retrieves,
        checksums=args.checksums,
        auth_token_file=args.auth_token_file,
        curve_secret_file=args.curve_secret_file,
        max_registrations_per_client=args.max_registrations_per_client,
        max_sessions_per_client=args.max_sessions_per_client,
        max_pins_per_client=args.max_pins_per_client,
        max_prefetch_jobs_per_client=args.max_prefetch_jobs_per_client,
        max_inflight_per_client=args.max_inflight_per_client,
        **metrics_command.serve_settings(args),
    )
    metrics_url: list[str] = []  # filled before ready() runs, if the endpoint is on

    def ready(server: Any, service: Any) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.stop)
        print(
            f"kvrpc ready {' '.join([url, *args.also_url])} chunk_size={args.chunk_size} "
            f"cpu_buffer_size={args.cpu_buffer_size:g}GiB max_workers={args.max_workers}"
            + (f" disk={args.disk_dir}:{args.disk_size:g}GiB" if args.disk_dir else "")
            + (f" redis={_redacted(args.redis_url)}" if args.redis_url else "")
            + (f" metrics={metrics_url[0]}" if metrics_url else "")
            + (" auth=token" if args.auth_token_file else "")
            + (" curve=zmq+tcp" if args.curve_secret_file else "")
            + (
                " unauthenticated: any process that reaches this address can read, write and "
                "clear the cache; shm and cuda_ipc workers are refused here"
                if exposed and not args.auth_token_file and not args.curve_secret_file
                else " no token: any client given the CURVE public key can read, write and "
                "clear the cache; shm and cuda_ipc workers are refused here"
                if exposed and not args.auth_token_file
                else ""
            ),
            flush=True,
        )

    asyncio.run(serve_kv(settings, on_ready=ready, on_metrics=metrics_url.append))
    return 0


# ------------------------------------------------------------------------------ demo


def _run_demo(args: argparse.Namespace) -> int:
    if args.which == "rpc":
        return _run_rpc_demo()
    from kvrpc.demo import run_demo

    run_demo(args.url)
    return 0


def _run_rpc_demo() -> int:
    from kvrpc.client import AsyncClient
    from kvrpc.protocol import HandlerType, ProtocolDefinition
    from kvrpc.server import RPCServer

    add = ProtocolDefinition("demo.add", (int, int), int)
    digest = ProtocolDefinition("demo.sha256", (bytes,), str, HandlerType.BLOCKING)
    url = "inproc://kvrpc-demo"

    async def demo() -> None:
        server = RPCServer(url)
        server.register(add, lambda a, b: a + b)
        server.register(digest, lambda data: hashlib.sha256(data).hexdigest())
        async with server, AsyncClient(url, registry=server.registry) as client:
            names = await client.call("rpc.list_protocols")
            print(f"server on {url}; protocols: {', '.join(names)}")
            print(f"rpc.ping -> {await client.call('rpc.ping')}")
            print(f"demo.add(2, 40) -> {await client.call(add, 2, 40)}")
            blob = bytes(range(256)) * 4096  # 1 MiB, travels as its own frame
            remote = await client.call(digest, blob)
            matches = remote == hashlib.sha256(blob).hexdigest()
            print(
                f"demo.sha256(1 MiB) on a worker thread -> {remote[:16]}... "
                f"(matches local: {matches})"
            )
            futures = [await client.submit(add, i, i) for i in range(100)]
            total = sum(await asyncio.gather(*futures))
            print(f"100 pipelined demo.add calls -> sum {total}")
            # The demo is also the README's smoke test: a wrong answer must fail it.
            if not matches or total != 9900:
                raise KvrpcError("demo got a wrong answer from the server")
            try:
                await client.call("demo.add", 1, "2")
            except KvrpcError as exc:
                print(f"bad payload refused before sending: {type(exc).__name__}: {exc}")
            stats = await client.call("rpc.stats")
            print(f"server stats: requests={stats['requests']} responses={stats['responses']}")

    asyncio.run(demo())
    return 0


# ------------------------------------------------------------------------------ ping / stats


def _url_option(parser: argparse.ArgumentParser) -> None:
    """``--url`` beside the positional URL, as ``serve`` and ``bench`` spell it."""
    parser.add_argument("--url", dest="url_option", metavar="URL", help="the same as URL")
    parser.set_defaults(check=_checks(parser, _check_one_url))


def _check_one_url(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.url and args.url_option and args.url != args.url_option:
        parser.error(f"argument --url: give the server once, not {args.url} and --url too")


def _server_url(args: argparse.Namespace) -> str:
    from kvrpc.transport import default_url

    url: str = args.url or args.url_option or default_url()
    return url


def _run_ping(args: argparse.Namespace) -> int:
    import time

    from kvrpc.client import SyncClient

    url = _server_url(args)
    with SyncClient(
        url,
        timeout=args.timeout,
        connect_timeout=args.timeout,
        auth_token_file=args.auth_token_file,
        curve_server_key_file=args.curve_server_key_file,
    ) as client:
        for _ in range(args.count):
            start = time.perf_counter()
            answer = client.call("rpc.ping")
            print(f"{answer} from {url} in {(time.perf_counter() - start) * 1e6:.0f} us")
    return 0


def _run_keygen_curve(args: argparse.Namespace) -> int:
    from kvrpc.curve import write_keypair

    try:
        public, secret = write_keypair(args.directory, args.name)
    except FileExistsError as exc:
        raise _Failed(f"{exc.filename} exists already; keygen-curve never replaces a key") from None
    except OSError as exc:
        raise _Failed(f"cannot write the keys in {args.directory}: {exc.strerror}") from None
    print(f"public key (give it to clients): {public}")
    print(f"secret key (kvrpc serve --curve-secret-file): {secret}")
    return 0


def _run_stats(args: argparse.Namespace) -> int:
    return metrics_command.run_stats(
        _server_url(args), args.timeout, args.watch, args.json, args.auth_token_file
    )


def _run_events(args: argparse.Namespace) -> int:
    from kvrpc.kv.events_command import run_events

    return run_events(
        _server_url(args),
        snapshot=args.snapshot,
        buffer=args.buffer,
        namespace=args.namespace,
        count=args.count,
        json_lines=args.json,
        timeout=args.timeout,
        auth_token_file=args.auth_token_file,
        curve_server_key_file=args.curve_server_key_file,
    )


# ------------------------------------------------------------------------------ bench


def _run_bench_rpc(args: argparse.Namespace) -> int:
    from kvrpc.bench.lmcache_peer import require_lmcache
    from kvrpc.bench.rpc import run_rpc_bench, serve_options
    from kvrpc.bench.sync import SyncOptions, run_sync_bench
    from kvrpc.transport import parse_url

    if args.vs == "lmcache":
        require_lmcache()  # before any figure is taken, not after a minute of them
    _require_plot(args)  # --plot hook (issue 28): matplotlib is there before the figures
    figures = asyncio.run(run_rpc_bench(args))
    if (args.sync or args.vs) and parse_url(args.url).scheme != "inproc":
        figures |= run_sync_bench(
            SyncOptions(
                args.url,
                calls=args.calls,
                pipelined=args.pipelined,
                window=args.window,
                rounds=args.interleave,
                vs_lmcache=args.vs == "lmcache",
                serve_options=serve_options(args),
            )
        )
    return _report(figures, args.json, plot=_plotter("rpc", args.plot))  # --plot hook


def _run_bench_kv(args: argparse.Namespace) -> int:
    from kvrpc.bench.kv import KVBenchOptions, run_kv_bench

    figures = run_kv_bench(KVBenchOptions.from_args(args))
    return _report(figures, args.json, plot=_plotter("kv", args.plot))


def _run_bench_gpu(args: argparse.Namespace) -> int:
    from kvrpc.bench.gpu import GPUBenchOptions, run_gpu_bench

    figures = run_gpu_bench(GPUBenchOptions.from_args(args))
    return _report(figures, args.json, plot=_plotter("gpu", args.plot))


def _run_bench_e2e(args: argparse.Namespace) -> int:
    from kvrpc.bench.e2e import E2EBenchOptions, run_e2e_bench, ttft_table

    figures = run_e2e_bench(E2EBenchOptions.from_args(args))
    # A row per prompt length, where the generic table would print each as a long dict.
    rest = {key: value for key, value in figures.items() if not key.startswith("ttft_")}
    return _report(figures, args.json, text=f"{_table(rest)}\n\n{ttft_table(figures)}")


def _run_bench_slow_reader(args: argparse.Namespace) -> int:
    from kvrpc.bench.peers import run_slow_reader_bench

    figures = asyncio.run(
        run_slow_reader_bench(
            args.url, args.seconds, args.rounds, args.inbox_burst, args.inbox_burst_bytes
        )
    )
    return _report(figures, args.json)


def _run_bench_stream(args: argparse.Namespace) -> int:
    from kvrpc.bench.stream import StreamBenchOptions, run_stream_bench

    return _report(run_stream_bench(StreamBenchOptions.from_args(args)), args.json)


def _run_bench_tier(args: argparse.Namespace) -> int:
    from kvrpc.bench.tier import TierBenchOptions, run_tier_bench

    figures = run_tier_bench(TierBenchOptions.from_args(args))
    return _report(figures, args.json, plot=_plotter("tier", args.plot))


def _run_bench_metrics(args: argparse.Namespace) -> int:
    from kvrpc.bench.metrics import MetricsBenchOptions, run_metrics_bench

    return _report(run_metrics_bench(MetricsBenchOptions.from_args(args)), args.json)


def _run_bench_soak(args: argparse.Namespace) -> int:
    from kvrpc.bench.soak import SoakOptions, run_soak_bench, soak_table

    figures = run_soak_bench(SoakOptions.from_args(args))
    return _report(figures, args.json, soak_table(figures), plot=_plotter("soak", args.plot))


def _run_bench_import(args: argparse.Namespace) -> int:
    from kvrpc.bench.rpc import measure_import

    return _report(measure_import(args.runs), args.json)


def _redacted(url: str) -> str:
    """``url`` without its password, for what the server prints."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in userinfo else url


# Argument types. argparse names the flag in its message ("argument --count: ...") and exits
# with status 2; each message says what the flag accepts. A ValueError would be reported as
# "invalid <function name> value", so every refusal is an ArgumentTypeError.


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of at least 1, not {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _event_buffer(text: str) -> int:
    """A ``kv.events`` buffer: 1 to the most a server keeps for one subscriber."""
    from kvrpc.kv.protocols import EVENTS_MAX_BUFFER  # only when given: it imports torch

    value = _positive_int(text)
    if value > EVENTS_MAX_BUFFER:
        raise argparse.ArgumentTypeError(f"must be at most {EVENTS_MAX_BUFFER}, not {value}")
    return value


def _namespace_hex(text: str) -> bytes:
    """A namespace id: 8 bytes written as 16 hex digits (what ``kvrpc events --json`` prints)."""
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != 8:
        raise argparse.ArgumentTypeError(
            f"expected a namespace id of 16 hex digits (8 bytes), not {text!r}"
        )
    return value


def _key_name(text: str) -> str:
    """A key file's base name: not empty, no directory part."""
    if not text or "/" in text or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file name (no '/', not empty)")
    return text


def _positive_float(text: str) -> float:
    """A finite number above 0 (seconds, mostly): ``inf`` would never fire as a timeout."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number above 0, not {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number above 0, not {text!r}")
    return value


def _byte_count(text: str) -> int:
    """A whole number of bytes above 0: a bare number is bytes, or give a unit (256KiB)."""
    try:
        nbytes = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if nbytes == 0:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, not {text!r}")
    return nbytes


def _gib(text: str) -> float:
    """A size above 0 in GiB: a bare number is GiB, or give a unit (8GiB, 512MiB, 8GB)."""
    try:
        nbytes = parse_size(text, "GiB")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if nbytes == 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text!r}")
    return nbytes / GIB


def _plot_path(text: str) -> str:
    """A PNG to write once the figures are in: its directory must exist now, not after them."""
    directory = os.path.dirname(os.path.abspath(text))
    if not text or os.path.isdir(text) or not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(
            f"expected a file to write in an existing directory, not {text!r}; create "
            f"{directory} first, or name a PNG in this directory"
        )
    return text


def _token_count(text: str) -> int:
    """A prompt length for ``bench e2e``: whole chunks of 256 tokens, or no hit is whole."""
    value = _positive_int(text)
    if value % 256:
        raise argparse.ArgumentTypeError(
            f"must be a multiple of 256 (the bench's chunk size), not {value}; "
            f"try {max(256, value // 256 * 256)}"
        )
    return value


def _redis_url(text: str) -> str:
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise argparse.ArgumentTypeError(
            f"expected redis://HOST:PORT/DB, rediss://HOST:PORT/DB (TLS) or unix:///PATH, "
            f"not {_redacted(text)!r}"
        )
    return text


def _report(
    figures: dict[str, Any],
    json_path: str | None,
    text: str | None = None,
    plot: Callable[[dict[str, Any]], str] | None = None,
) -> int:
    """Print ``text`` (default: the figures' table), write ``json_path``, draw ``plot``.

    ``plot`` draws the figures and returns the file it wrote. The exit status is 0.
    """
    print(_table(figures) if text is None else text)
    if json_path:
        with open(json_path, "w") as out:
            json.dump(figures, out, indent=2)
        print(f"figures written to {json_path}")
    if plot is not None:
        print(f"plot written to {plot(figures)}")
    return 0


def _plotter(bench: str, path: str | None) -> Callable[[dict[str, Any]], str] | None:
    """``bench``'s plot function of :mod:`kvrpc.bench.plots`, bound to ``path`` (or None)."""
    if path is None:
        return None
    plot_path: str = path

    def draw(figures: dict[str, Any]) -> str:
        from kvrpc.bench import plots

        getattr(plots, f"plot_{bench}")(figures, plot_path)
        return plot_path

    return draw


def _store_copies_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--store-copies {kernels,dma}``: StoreCopies's values (the CLI must not import torch)."""
    parser.add_argument(
        "--store-copies", choices=("kernels", "dma"), default="kernels", help=help_text
    )


def _plot_option(parser: argparse.ArgumentParser, what: str) -> None:
    """A bench's ``--plot PNG``: ``what`` the plot shows (it needs kvrpc[plot])."""
    parser.add_argument(
        "--plot", type=_plot_path, metavar="PNG", help=f"also draw {what} (needs matplotlib)"
    )


def _number(value: float) -> str:
    # Ratios and small figures need their significant digits; large ones need grouping.
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, dict) and set(value) == {"median", "min", "max"}:
        # A spread over rounds: the median first, the range beside it.
        return (
            f"{_number(value['median'])} (min {_number(value['min'])}, max {_number(value['max'])})"
        )
    return str(value)


def _table(figures: dict[str, Any]) -> str:
    rows = [(key, _cell(value)) for key, value in figures.items()]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
