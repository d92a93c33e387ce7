"""A bounded fuzzer for a running kvrpc server: junk from many hostile peers at once.

Two kinds of input, from one seeded generator so that a failing run can be repeated:

* **messages** (:func:`junk_message`): frame lists a kvrpc client transport delivers as they
  are, built to reach every check of the codec and the server: random bytes, random msgpack
  values, tuples and containers nested far too deep, huge declared lengths, every ext code
  with random data, buffer references to frames that are missing or used twice, extra
  frames, wrong kinds, versions and ids, truncations and bit flips of good requests, and
  requests for the server's real protocols with random payloads;
* **wire bytes** (:func:`junk_bytes`): what no client transport would send, over a plain
  socket (random bytes, and the transport's own malformed prefixes given by the caller).

:func:`fuzz_server` drives ``peers`` threads, each a client that sends messages, reads its
replies or not, and every few hundred messages drops its connection without a goodbye and
makes a new one; meanwhile a well-behaved client pings the server. It reports what it sent,
how the pings went, and the server process's memory and descriptors, so a caller can check
that the server never died, kept answering, and stayed bounded. Pure standard library plus
msgpack and kvrpc's own client side: no pytest needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack

from kvrpc.client import SyncClient
from kvrpc.codec import WIRE_VERSION, encode_request
from kvrpc.errors import KvrpcError
from kvrpc.progress import Progress
from kvrpc.transport import ClientInbox, TransportOptions, connect_client

__all__ = ["FuzzReport", "fuzz_server", "junk_bytes", "junk_message", "process_usage"]

_NAMES = ("rpc.ping", "rpc.echo", "rpc.stats", "rpc.list_protocols", "no.such", "", "x" * 300)


def _value(rng: random.Random, depth: int = 0) -> Any:
    """A random msgpack-able value: scalars, containers, ext values, sometimes nested."""
    pick = rng.randrange(14 if depth < 4 else 8)
    if pick == 0:
        return None
    if pick == 1:
        return rng.random() < 0.5
    if pick == 2:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 2**64 - 1, rng.randrange(-1000, 1000)])
    if pick == 3:
        return rng.choice([0.0, -1.5, float("inf"), float("nan"), rng.random()])
    if pick == 4:
        return "".join(rng.choice("abc.é\0\U0001f600") for _ in range(rng.randrange(20)))
    if pick == 5:
        return rng.randbytes(rng.choice([0, 1, 16, 1023, 1024, 4096]))
    if pick == 6:  # an ext value of any code, with anything in it
        return msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.randrange(40)))
    if pick == 7:  # a buffer reference (ext 0) to any frame, as bytes or as a view
        return msgpack.ExtType(0, struct.pack("<IB", rng.randrange(6), rng.randrange(3)))
    if pick == 8:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    if pick == 9:
        # Keys of any hashable kind: msgpack allows them, kvrpc's maps take them too.
        keys = (_value(rng, 4) for _ in range(rng.randrange(4)))
        return {key: _value(rng, depth + 1) for key in keys if not isinstance(key, list)}
    if pick == 10:  # a tuple (ext 2) holding values
        items = [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
        return msgpack.ExtType(2, msgpack.packb(items, default=_keep_ext))
    if pick == 11:  # a tensor reference (ext 1) with odd metadata
        meta = [rng.randrange(4), rng.choice(["float32", "int8", "nope", 3]), [rng.randrange(9)]]
        return msgpack.ExtType(1, msgpack.packb(meta))
    if pick == 12:
        return _nested_tuples(rng.choice([2, 31, 32, 33, 200, 2000]))
    return _nested_lists(rng.choice([10, 1000, 1100, 5000]))


def _keep_ext(obj: Any) -> Any:
    if isinstance(obj, msgpack.ExtType):
        return obj
    raise TypeError(f"cannot pack {type(obj).__name__}")


@functools.cache  # built once per depth: the deep ones take thousands of packb calls
def _nested_tuples(levels: int) -> msgpack.ExtType:
    inner = msgpack.packb([1])
    for _ in range(levels - 1):
        inner = msgpack.packb([msgpack.ExtType(2, inner)])
    return msgpack.ExtType(2, inner)


def _nested_lists(levels: int) -> msgpack.ExtType:
    # Raw bytes: msgpack itself would refuse to pack a value this deep.
    return msgpack.ExtType(2, b"\x91" * levels + b"\x90")


def _pack(value: Any) -> bytes:
    try:
        packed: bytes = msgpack.packb(value, default=_keep_ext, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        packed = msgpack.packb(None)
    return packed


def junk_message(rng: random.Random, names: Sequence[str] = ()) -> list[bytes]:
    """One hostile message: a list of frames, most of them malformed in some way."""
    names = [*names, *_NAMES]
    request_id = rng.choice([0, 1, rng.randrange(2**32), 2**64 - 1])
    name = rng.choice(names)
    pick = rng.randrange(12)
    if pick == 0:  # random bytes
        return [rng.randbytes(rng.randrange(200))]
    if pick == 1:  # a request for a real protocol with random arguments
        args = [_value(rng) for _ in range(rng.randrange(4))]
        return [_pack([WIRE_VERSION, 0, request_id, name, args])]
    if pick == 2:  # huge declared lengths: array32, map32, bin32, str32 claiming 4 G entries
        marker = rng.choice([b"\xdd", b"\xdf", b"\xc6", b"\xdb", b"\xc9"])
        start = b"".join(_pack(f) for f in (WIRE_VERSION, 0, request_id, name))
        return [b"\x95" + start + marker + b"\xff" * 4]
    if pick == 3:  # nesting far too deep, of tuples or of plain containers
        nested = _nested_tuples(rng.choice([33, 200, 5000])) if rng.random() < 0.5 else None
        payload = [nested if nested is not None else _nested_lists(rng.choice([1100, 50000]))]
        return [_pack([WIRE_VERSION, 0, request_id, "rpc.echo", payload])]
    if pick == 4:  # buffer references against a random number of frames
        refs = [msgpack.ExtType(0, struct.pack("<IB", rng.randrange(5), 0)) for _ in range(3)]
        extra = [rng.randbytes(rng.randrange(2000)) for _ in range(rng.randrange(5))]
        return [_pack([WIRE_VERSION, 0, request_id, name, refs]), *extra]
    if pick == 5:  # a good request with frames nobody refers to
        good = [bytes(f) for f in encode_request(request_id % 2**63, "rpc.echo", ("x",))]
        return [*good, *(rng.randbytes(rng.randrange(100)) for _ in range(rng.randrange(1, 4)))]
    if pick == 6:  # wrong version, kind or id types, wrong field counts
        fields = [
            rng.choice([WIRE_VERSION, 0, 2, "1", None]),
            rng.choice([0, 1, 2, 3, -1, "0"]),
            rng.choice([request_id, -5, "id", 1.5]),
            rng.choice([name, 7, None]),
            [_value(rng)],
        ]
        return [_pack(fields[: rng.randrange(1, 7)])]
    if pick == 7:  # responses and errors sent to the server
        return [_pack([WIRE_VERSION, rng.choice([1, 2]), request_id, "", [_value(rng)]])]
    if pick == 8:  # a good request cut short
        whole = _pack([WIRE_VERSION, 0, request_id, name, [_value(rng)]])
        return [whole[: rng.randrange(len(whole))]]
    if pick == 9:  # a good request with a few bits flipped
        flipped = bytearray(_pack([WIRE_VERSION, 0, request_id, name, [_value(rng)]]))
        for _ in range(rng.randrange(1, 4)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        return [bytes(flipped)]
    if pick == 10:  # empty frames
        return [b""] * rng.randrange(1, 4)
    return [_pack(_value(rng))]  # anything at all as a header


def junk_bytes(rng: random.Random, prefixes: Sequence[bytes] = ()) -> bytes:
    """Bytes for a plain socket: random, or one of ``prefixes`` followed by random bytes."""
    tail = rng.randbytes(rng.choice([0, 1, 7, 300, 5000]))
    if prefixes and rng.random() < 0.7:
        return rng.choice(list(prefixes)) + tail
    return tail or b"\0"


@dataclass
class FuzzReport:
    """What one run sent and saw; ``ok`` says whether the server came through it."""

    inputs: int = 0  #: messages and wire inputs sent
    messages: int = 0
    wire_inputs: int = 0
    reconnects: int = 0  #: connections dropped without a goodbye and made anew
    stuck_sends: int = 0  #: sends the server did not take within the send timeout
    peer_errors: list[str] = field(default_factory=list)  #: peers that failed themselves
    pings: int = 0
    ping_failures: list[str] = field(default_factory=list)
    slowest_ping_s: float = 0.0
    ping_p50_s: float = 0.0
    ping_p99_s: float = 0.0
    seconds: float = 0.0
    rss_half_bytes: int = 0  #: the server's RSS when half the inputs were sent
    rss_end_bytes: int = 0
    fds_start: int = 0
    fds_end: int = 0
    server_alive: bool = True

    def as_dict(self) -> dict[str, Any]:
        """The report as plain values (for printing as JSON)."""
        return asdict(self)


def process_usage(pid: int) -> tuple[int, int]:
    """``(rss_bytes, open_descriptors)`` of a process, from ``/proc`` (Linux)."""
    rss = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


# On a terminal, how many inputs are sent so far; piped or under pytest, nothing.
_progress = Progress("fuzz")


@_progress.closing
def fuzz_server(
    url: str,
    *,
    inputs: int,
    pid: int,
    peers: int = 8,
    seed: int = 0,
    names: Sequence[str] = (),
    raw_connect: Callable[[str], socket.socket] | None = None,
    wire_prefixes: Sequence[bytes] = (),
    wire_share: float = 0.05,
    send_timeout: float = 2.0,
    ping_timeout: float = 2.0,
) -> FuzzReport:
    """Send ``inputs`` hostile inputs to the server at ``url`` (process ``pid``) from ``peers``.

    ``names`` are protocol names worth calling with random payloads; ``raw_connect`` opens a
    plain socket to ``url`` for the ``wire_share`` of inputs that are wire bytes (none without
    it). Returns when every input is sent, with the server's usage and the pings' record.
    """
    report = FuzzReport()
    lock = threading.Lock()
    started = time.monotonic()
    report.fds_start = process_usage(pid)[1]
    half_done = threading.Event()
    # The pinger is a process of its own: in this one it would wait for the peers' threads
    # (the GIL), and measure them rather than the server.
    pinger = subprocess.Popen(
        [sys.executable, "-m", "kvrpc.testing.fuzz", "ping", url, str(ping_timeout)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    shares = [inputs // peers + (1 if i < inputs % peers else 0) for i in range(peers)]

    def count(consumed: int, messages: int, wire: int, stuck: int) -> None:
        with lock:
            report.inputs += consumed
            report.messages += messages
            report.wire_inputs += wire
            report.reconnects += 1
            report.stuck_sends += stuck
            _progress(
                f"{report.inputs:,} of {inputs:,} inputs sent, {report.reconnects:,} reconnects"
            )
            if report.inputs >= inputs // 2 and not half_done.is_set():
                report.rss_half_bytes = process_usage(pid)[0]
                half_done.set()

    plan = _Plan(url, names, raw_connect, wire_prefixes, wire_share, send_timeout)
    threads = [
        threading.Thread(
            target=_peer,
            args=(plan, share, seed * 1000 + index, count, report.peer_errors.append),
            daemon=True,
        )
        for index, share in enumerate(shares)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _settle(pid, report.fds_start + 1)  # + 1: the pinger's connection
    pings, _ = pinger.communicate("stop\n", timeout=60)
    record = json.loads(pings)
    report.pings, report.ping_failures = record["pings"], record["failures"]
    report.slowest_ping_s = record["slowest_s"]
    report.ping_p50_s, report.ping_p99_s = record["p50_s"], record["p99_s"]
    report.seconds = time.monotonic() - started
    try:
        report.rss_end_bytes, report.fds_end = process_usage(pid)
        os.kill(pid, 0)
    except OSError:
        report.server_alive = False
    return report


def _settle(pid: int, fds: int, timeout: float = 10.0) -> None:
    """Wait (a little) until the server has closed the connections the peers dropped."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(OSError):
        while process_usage(pid)[1] > fds and time.monotonic() < deadline:
            time.sleep(0.05)


def _ping_main(url: str, timeout: float) -> None:
    """Ping ``url`` every 50 ms until stdin has a line; print how it went as JSON."""
    stop = threading.Event()

    def wait_for_stop() -> None:
        sys.stdin.readline()
        stop.set()

    threading.Thread(target=wait_for_stop, daemon=True).start()
    failures: list[str] = []
    times: list[float] = []
    with SyncClient(url, timeout=timeout) as client:
        while not stop.wait(0.05):
            started = time.perf_counter()
            try:
                client.call("rpc.ping")
            except KvrpcError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            times.append(time.perf_counter() - started)
    times.sort()
    p99 = times[int(len(times) * 0.99)] if times else 0.0
    record = {"pings": len(times), "failures": failures, "slowest_s": max(times, default=0.0)}
    print(json.dumps({**record, "p50_s": times[len(times) // 2] if times else 0.0, "p99_s": p99}))


@dataclass(frozen=True)
class _Plan:
    """What every peer of one run shares."""

    url: str
    names: Sequence[str]
    raw_connect: Callable[[str], socket.socket] | None
    wire_prefixes: Sequence[bytes]
    wire_share: float
    send_timeout: float


def _peer(
    plan: _Plan,
    share: int,
    seed: int,
    count: Callable[[int, int, int, int], None],
    failed: Callable[[str], None],
) -> None:
    try:
        asyncio.run(_peer_main(plan, share, random.Random(seed), count))
    except Exception as exc:  # a peer's own failure is reported, not lost with its thread
        failed(f"{type(exc).__name__}: {exc}")


async def _peer_main(
    plan: _Plan, share: int, rng: random.Random, count: Callable[[int, int, int, int], None]
) -> None:
    done = 0
    while done < share:
        # One connection: some read their replies, some never do; all end without a goodbye.
        transport = connect_client(plan.url, TransportOptions(reconnect_timeout=plan.send_timeout))
        # Not read from, the inbox pauses the transport: the server sees a peer that reads nothing.
        inbox = ClientInbox(limit=64)
        inbox.bind(transport)
        reading: asyncio.Task[None] | None = None
        messages = wire = stuck = 0
        try:
            async with asyncio.timeout(10):
                await transport.connect(inbox)
            if rng.random() < 0.5:
                reading = asyncio.create_task(_read_all(inbox))
            # Up to a few thousand messages, enough to fill this peer's queue in a server that
            # lags (zmq's RCVHWM), then a hang-up with them unread.
            for _ in range(min(share - done, rng.choice((20, 200, 500, 3000)))):
                if plan.raw_connect is not None and rng.random() < plan.wire_share:
                    data = junk_bytes(rng, plan.wire_prefixes)
                    await asyncio.to_thread(_send_raw, plan.raw_connect, plan.url, data)
                    wire += 1
                    continue
                try:
                    async with asyncio.timeout(plan.send_timeout):
                        await transport.send(junk_message(rng, plan.names))
                except TimeoutError:
                    stuck += 1  # the server stopped reading us (we never read): move on
                    break
                except KvrpcError:
                    break  # the server dropped this connection: make another
                finally:
                    messages += 1
        except (KvrpcError, TimeoutError, OSError):
            pass
        finally:
            if reading is not None:
                reading.cancel()
                with contextlib.suppress(BaseException):
                    await reading
            await transport.close()
        consumed = max(messages + wire, 1)  # a connection that failed at once uses one up
        done += consumed
        count(consumed, messages, wire, stuck)


async def _read_all(inbox: ClientInbox) -> None:
    with contextlib.suppress(KvrpcError):
        while True:
            await inbox.recv()


def _send_raw(raw_connect: Callable[[str], socket.socket], url: str, data: bytes) -> None:
    try:
        sock = raw_connect(url)
    except OSError:
        return
    try:
        sock.settimeout(1.0)
        sock.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            # An abortive close where the socket supports it (TCP: a reset, not a FIN).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["ping"]:
        _ping_main(sys.argv[2], float(sys.argv[3]))
