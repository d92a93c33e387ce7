"""RPCServer: dispatch, handler types, limits, shutdown, and every kind of bad input."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import msgpack
import pytest
from pydantic import BaseModel

from kvrpc import (
    AsyncClient,
    HandlerType,
    ProtocolDefinition,
    RemoteError,
    RPCServer,
    ServerBusy,
    UnknownProtocol,
    codec,
)
from kvrpc.codec import MessageKind
from kvrpc.errors import (
    ConnectionLost,
    DeadlinePassed,
    DuplicateProtocol,
    KVConfigError,
    KvrpcError,
    MessageTooLarge,
    PayloadValidationError,
    ProtocolError,
    Status,
    UnknownJob,
    VersionMismatch,
    register_error,
)
from kvrpc.testing.raw import RawClient
from kvrpc.testing.waiting import until

ADD = ProtocolDefinition("calc.add", (int, int), int)
SLEEP = ProtocolDefinition("calc.sleep", (float,), str, HandlerType.BLOCKING)
ASLEEP = ProtocolDefinition("calc.asleep", (float,), str)
FAIL = ProtocolDefinition("calc.fail", (str,), None)


class Point(BaseModel):
    x: int
    y: int


SHIFT = ProtocolDefinition("geo.shift", (Point, int), Point)


def install_calc(server: RPCServer) -> None:
    server.register(ADD, lambda a, b: a + b)

    def sleep(seconds: float) -> str:
        time.sleep(seconds)
        return threading.current_thread().name

    async def asleep(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "awake"

    def fail(message: str) -> None:
        raise ValueError(message)

    server.register(SLEEP, sleep)
    server.register(ASLEEP, asleep)
    server.register(FAIL, fail)


HELD = ProtocolDefinition("calc.held", (float,), str, HandlerType.BLOCKING)

WAIT = 5.0  # seconds: only a failing test waits this long


class Gate:
    """A handler that runs until the test releases it, and says when it has started.

    Tests wait on these events rather than on wall-clock sleeps: ``started`` (an asyncio
    event, for :meth:`awaiting`) or :meth:`started_in_thread` (for :meth:`blocking`).
    """

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self._started_in_thread = threading.Event()
        self._released_in_thread = threading.Event()
        self._released = asyncio.Event()

    async def awaiting(self, _seconds: float) -> str:
        self.started.set()
        await self._released.wait()
        return "awake"

    def blocking(self, _seconds: float) -> str:
        self._started_in_thread.set()
        assert self._released_in_thread.wait(WAIT), "the test never released the handler"
        return threading.current_thread().name

    async def started_in_thread(self) -> None:
        assert await asyncio.to_thread(self._started_in_thread.wait, WAIT)

    def release(self) -> None:
        self._released.set()
        self._released_in_thread.set()


async def raw_peer(url: str) -> RawClient:
    """A bare client transport, to send frames no well-behaved client would."""
    return await RawClient(url).connect()


async def ask(peer: RawClient, frames: list[bytes]) -> codec.Message:
    await peer.send(frames)
    return codec.decode(await peer.recv(5))


async def still_serving(url: str) -> None:
    async with AsyncClient(url, timeout=5) as client:
        assert await client.call("rpc.ping") == "pong"


# ----------------------------------------------------------------------------- dispatch


async def test_plain_async_and_blocking_handlers_all_answer(server: RPCServer, url: str) -> None:
    install_calc(server)
    async with AsyncClient(url, registry=server.registry) as client:
        assert await client.call(ADD, 2, 3) == 5
        assert await client.call(ASLEEP, 0.0) == "awake"
        assert (await client.call(SLEEP, 0.0)).startswith("kvrpc-blocking")


async def test_pydantic_models_arrive_as_models_at_both_ends(server: RPCServer, url: str) -> None:
    seen: list[object] = []

    def shift(point: Point, by: int) -> Point:
        seen.append(point)
        return Point(x=point.x + by, y=point.y + by)

    server.register(SHIFT, shift)
    async with AsyncClient(url, registry=server.registry) as client:
        moved = await client.call(SHIFT, Point(x=1, y=2), 10)
    assert moved == Point(x=11, y=12)
    assert isinstance(seen[0], Point)


async def test_handler_exception_becomes_remote_error_with_type_name(
    server: RPCServer, url: str
) -> None:
    install_calc(server)
    async with AsyncClient(url, registry=server.registry) as client:
        with pytest.raises(RemoteError) as caught:
            await client.call(FAIL, "boom")
    assert caught.value.remote_type == "ValueError"
    assert "boom" in str(caught.value)
    assert server.stats.handler_errors == 1


class GeoOutOfBounds(KvrpcError):
    """An extension's error, registered with a code of its own."""


register_error(1300, GeoOutOfBounds)
RAISE = ProtocolDefinition("test.raise", (str,), None)
RAISABLE: dict[str, type[KvrpcError]] = {
    cls.__name__: cls
    for cls in (GeoOutOfBounds, DeadlinePassed, UnknownJob, ServerBusy, KVConfigError)
}


@pytest.mark.parametrize("name", list(RAISABLE))
async def test_an_error_with_a_status_code_crosses_the_wire_as_its_own_class(
    server: RPCServer, url: str, name: str
) -> None:
    def raise_it(which: str) -> None:
        raise RAISABLE[which](f"{which} raised on purpose")

    server.register(RAISE, raise_it)
    async with AsyncClient(url, registry=server.registry) as client:
        with pytest.raises(RAISABLE[name], match=f"^{name} raised on purpose$") as caught:
            await client.call(RAISE, name)
    assert type(caught.value) is RAISABLE[name]
    assert caught.value.status == RAISABLE[name]("").status != Status.UNKNOWN


async def test_blocking_handler_does_not_delay_ping(server: RPCServer, url: str) -> None:
    held = Gate()
    server.register(SLEEP, held.blocking)
    async with AsyncClient(url, registry=server.registry) as client:
        slow = await client.submit(SLEEP, 0.0)
        await held.started_in_thread()  # the handler now holds a thread of the pool
        # Answered while the blocking handler still runs: the loop was never waiting for it.
        assert await client.call("rpc.ping", timeout=WAIT) == "pong"
        assert not slow.done(), "the ping must have been answered while the handler ran"
        held.release()
        assert (await slow).startswith("kvrpc-blocking")


async def test_blocking_pool_is_bounded_by_max_workers(url: str) -> None:
    running, peak = 0, 0
    lock = threading.Lock()
    two_running, release = threading.Event(), threading.Event()

    def work(_seconds: float) -> str:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            if running == 2:
                two_running.set()
        # Held until the pool is full: a pool of more than two would run more at once.
        assert release.wait(WAIT), "the test never released the handler"
        with lock:
            running -= 1
        return "done"

    async with RPCServer(url, max_workers=2) as server:
        server.register(SLEEP, work)
        async with AsyncClient(url, registry=server.registry) as client:
            futures = [await client.submit(SLEEP, 0.0) for _ in range(6)]
            assert await asyncio.to_thread(two_running.wait, WAIT)
            release.set()
            assert await asyncio.gather(*futures) == ["done"] * 6
    assert peak == 2


async def test_builtins_list_protocols_and_stats(server: RPCServer, url: str) -> None:
    install_calc(server)
    async with AsyncClient(url) as client:
        names = await client.call("rpc.list_protocols")
        assert {"rpc.ping", "rpc.echo", "rpc.stats", "calc.add"} <= set(names)
        assert await client.call("rpc.echo", [1, (2, b"3")]) == [1, (2, b"3")]
        stats = await client.call("rpc.stats")
    assert stats["requests"] == 3
    assert stats["responses"] == 2  # the stats reply itself is counted after it is sent


# ----------------------------------------------------------------------------- registration


def test_registering_twice_or_async_blocking_is_refused(url: str) -> None:
    server = RPCServer(url)
    server.register(ADD, lambda a, b: a + b)
    with pytest.raises(DuplicateProtocol):
        server.register(ADD, lambda a, b: a - b)
    with pytest.raises(UnknownProtocol):
        server.register("calc.nothing", lambda: None)

    async def handler(seconds: float) -> str:
        return "x"

    with pytest.raises(TypeError, match="BLOCKING"):
        server.register(SLEEP, handler)
    with pytest.raises(DuplicateProtocol, match="differently"):
        server.register(ProtocolDefinition("calc.add", (int,), int), lambda a: a)


def test_decorator_registers_the_handler(url: str) -> None:
    server = RPCServer(url)

    @server.handler(ADD)
    def add(a: int, b: int) -> int:
        return a + b

    assert add(1, 2) == 3
    assert "calc.add" in server.registry


# ----------------------------------------------------------------------------- bad input


async def test_random_bytes_are_dropped_counted_and_serving_goes_on(
    server: RPCServer, url: str
) -> None:
    peer = await raw_peer(url)
    for _ in range(20):
        await peer.send([os.urandom(64)])
    await peer.send([b""])
    await still_serving(url)
    assert server.stats.malformed + server.stats.dropped >= 21
    assert server.stats.dropped >= 1
    await peer.close()


async def test_truncated_header_without_request_id_is_dropped(server: RPCServer, url: str) -> None:
    whole = codec.encode_request(7, "rpc.ping", [])[0]
    peer = await raw_peer(url)
    await peer.send([whole[:3]])  # array marker, version, kind: no request id yet
    await still_serving(url)
    assert server.stats.dropped == 1
    await peer.close()


async def test_corrupt_payload_after_readable_request_id_gets_error_reply(
    server: RPCServer, url: str
) -> None:
    whole = codec.encode_request(41, "rpc.echo", ["x" * 50])[0]
    peer = await raw_peer(url)
    reply = await ask(peer, [whole[:-10]])  # payload cut short
    assert reply.kind is MessageKind.ERROR
    assert reply.request_id == 41
    assert reply.payload[:2] == (Status.PROTOCOL, "ProtocolError")
    await peer.close()


@pytest.mark.parametrize("version", [1, 99], ids=["the-old-wire", "a-newer-wire"])
async def test_wrong_wire_version_is_answered_with_version_mismatch(
    server: RPCServer, url: str, version: int
) -> None:
    # Version 1 is the wire before status codes: its error payload was [name, message].
    header = msgpack.packb([version, 0, 5, "rpc.ping", []])
    peer = await raw_peer(url)
    reply = await ask(peer, [header])
    assert (reply.kind, reply.request_id) == (MessageKind.ERROR, 5)
    assert reply.payload[:2] == (Status.VERSION_MISMATCH, VersionMismatch.__name__)
    assert str(version) in reply.payload[2]
    # The reply is in this side's version (`ask` decoded it), so an old peer's decoder
    # refuses it in turn: its call fails with VersionMismatch rather than misreading it.
    await peer.close()


async def test_unexpected_buffer_frames_get_error_reply(server: RPCServer, url: str) -> None:
    frames = codec.encode_request(9, "rpc.ping", [])
    peer = await raw_peer(url)
    reply = await ask(peer, [*frames, b"stray frame"])
    assert reply.request_id == 9
    assert reply.payload[:2] == (Status.PROTOCOL, "ProtocolError")
    await peer.close()


async def test_wrong_arity_and_type_get_validation_errors(server: RPCServer, url: str) -> None:
    install_calc(server)
    # validate=False: send what a buggy or hostile client would; the server must catch it.
    async with AsyncClient(url, validate=False) as client:
        with pytest.raises(PayloadValidationError, match="takes 2 argument"):
            await client.call("calc.add", 1)
        with pytest.raises(PayloadValidationError, match="argument 1"):
            await client.call("calc.add", 1, "2")
        with pytest.raises(PayloadValidationError):
            await client.call("calc.add", 1, 2.0)  # strict: no float -> int coercion
        assert await client.call("calc.add", 1, 2) == 3
    assert server.stats.invalid_payload == 3


async def test_unknown_protocol_gets_unknown_protocol_error(server: RPCServer, url: str) -> None:
    async with AsyncClient(url) as client:
        with pytest.raises(UnknownProtocol, match=r"nope\.nothing"):
            await client.call("nope.nothing")
    assert server.stats.unknown_protocol == 1


async def test_oversized_message_gets_error_reply_and_no_decode(url: str) -> None:
    async with RPCServer(url, max_message_size=64 * 1024) as server:
        async with AsyncClient(url) as client:
            with pytest.raises(MessageTooLarge, match="65536"):
                await client.call("rpc.echo", b"x" * (128 * 1024))
            assert await client.call("rpc.echo", b"y" * 1000) == b"y" * 1000
        assert server.stats.oversized == 1


async def test_response_sent_to_server_is_dropped_and_counted(server: RPCServer, url: str) -> None:
    peer = await raw_peer(url)
    await peer.send(codec.encode_response(123456, "unsolicited"))
    await peer.send(codec.encode_error(654321, 1, "ValueError", "nobody asked"))
    await still_serving(url)
    assert server.stats.unexpected == 2
    assert server.stats.dropped == 2
    await peer.close()


async def test_bad_input_does_not_disturb_calls_in_flight(server: RPCServer, url: str) -> None:
    install_calc(server)
    held = Gate()
    server.register(HELD, held.blocking)
    peer = await raw_peer(url)
    async with AsyncClient(url, registry=server.registry) as client:
        slow = [await client.submit(HELD, 0.0) for _ in range(3)]
        quick = [await client.submit(ADD, i, 1) for i in range(50)]
        for junk in ([os.urandom(200)], [b"\x95\x01\x00"], [codec.encode_response(1, None)[0]]):
            await peer.send(junk)
        assert await asyncio.gather(*quick) == [i + 1 for i in range(50)]
        assert not any(future.done() for future in slow)  # in flight all along
        held.release()
        assert len(await asyncio.gather(*slow)) == 3
    await peer.close()


# ----------------------------------------------------------------------------- limits


async def test_too_many_in_flight_from_one_peer_get_server_busy(url: str) -> None:
    async with RPCServer(url, max_in_flight_per_peer=2) as server:
        held = Gate()
        server.register(ASLEEP, held.awaiting)
        async with AsyncClient(url, registry=server.registry) as client:
            futures = [await client.submit(ASLEEP, 0.0) for _ in range(5)]
            # The first two hold their slots until released; the other three are refused.
            refused = await asyncio.gather(*futures[2:], return_exceptions=True)
            assert all(isinstance(r, ServerBusy) for r in refused), refused
            held.release()
            results = await asyncio.gather(*futures, return_exceptions=True)
            # Another client has its own allowance.
            async with AsyncClient(url, registry=server.registry) as other:
                assert await other.call(ASLEEP, 0.0) == "awake"
        busy = [r for r in results if isinstance(r, ServerBusy)]
        assert results[:2] == ["awake", "awake"]
        assert len(busy) == 3
        assert server.stats.busy == 3
        assert server.stats.in_flight == 0


# ----------------------------------------------------------------------------- shutdown


async def test_graceful_shutdown_finishes_running_requests(url: str) -> None:
    server = RPCServer(url, shutdown_grace=5.0)
    install_calc(server)
    held = Gate()
    server.register(HELD, held.blocking)
    async with server, AsyncClient(url, registry=server.registry, timeout=5) as client:
        running = await client.submit(HELD, 0.0)
        await held.started_in_thread()
        shutdown = asyncio.create_task(server.__aexit__(None, None, None))
        # The drain begins in the shutdown's first step: a flag, with no event to wait on.
        await until(lambda: not server.serving, "the drain to begin")
        # While draining, new work is refused rather than started.
        with pytest.raises(ServerBusy, match="shutting down"):
            await client.call(ADD, 1, 1)
        assert not shutdown.done(), "shutdown must wait for the running request"
        held.release()
        assert (await running).startswith("kvrpc-blocking")
        await shutdown
        with pytest.raises(ConnectionLost):
            await client.call("rpc.ping")


async def test_shutdown_cancels_work_past_the_grace_period(url: str) -> None:
    server = RPCServer(url, shutdown_grace=0.1)
    hung = Gate()
    server.register(ASLEEP, hung.awaiting)
    async with server, AsyncClient(url, registry=server.registry, timeout=5) as client:
        never = await client.submit(ASLEEP, 30.0)
        await hung.started.wait()  # running, and never released
        start = time.perf_counter()
        await server.__aexit__(None, None, None)
        assert time.perf_counter() - start < 2
        with pytest.raises(ConnectionLost):
            await never


async def test_serve_returns_after_stop(url: str) -> None:
    server = RPCServer(url)
    serving = asyncio.create_task(server.serve())
    await until(lambda: server.serving, "serve() to have started")  # the flag is under test
    async with AsyncClient(url, connect_timeout=5) as client:
        assert await client.call("rpc.ping") == "pong"
    server.stop()
    await asyncio.wait_for(serving, 5)


async def test_decode_errors_are_protocol_errors() -> None:
    # The server relies on this: anything malformed is a ProtocolError, never another type.
    with pytest.raises(ProtocolError):
        codec.decode([b"\xc1"])


def test_register_rejects_a_definition_whose_types_cannot_be_validated() -> None:
    server = RPCServer("inproc://never-started")
    broken = ProtocolDefinition("calc.broken", ("NoSuchType",), int)
    with pytest.raises(TypeError, match=r"calc\.broken"):
        server.register(broken, lambda value: 0)
    assert "calc.broken" not in server.registry


async def test_tensor_and_memoryview_payloads_are_declared_by_their_type(
    server: RPCServer, url: str
) -> None:
    torch = pytest.importorskip("torch")
    total = ProtocolDefinition("buf.total", (torch.Tensor, memoryview), float)
    server.register(total, lambda tensor, view: float(tensor.sum()) + len(view))
    async with AsyncClient(url) as client:
        assert await client.call(total, torch.ones(2048), memoryview(b"x" * 4096)) == 6144.0
        with pytest.raises(PayloadValidationError):
            await client.call(total, [1.0, 2.0], memoryview(b""))


def test_a_refused_registration_leaves_the_registry_unchanged() -> None:
    server = RPCServer("inproc://never-started")
    blocking = ProtocolDefinition("calc.slow", (), None, HandlerType.BLOCKING)

    async def not_allowed() -> None: ...

    with pytest.raises(TypeError, match="BLOCKING"):
        server.register(blocking, not_allowed)
    assert "calc.slow" not in server.registry
    server.register(blocking, lambda: None)  # the name is still free for a valid handler
    assert "calc.slow" in server.registry


# ----------------------------------------------------------------------------- peers leaving


@pytest.mark.parametrize("scheme", ["inproc", "unix"])
async def test_a_client_that_hangs_up_has_its_running_results_dropped_unsent(
    scheme: str, url: str, sock_dir: str
) -> None:
    if scheme == "unix":
        url = f"unix://{sock_dir}/s.sock"
    server = RPCServer(url, shutdown_grace=1.0)
    held = Gate()
    server.register(ASLEEP, held.awaiting)
    async with server:
        async with AsyncClient(url, registry=server.registry, timeout=WAIT) as client:
            await client.submit(ASLEEP, 0.0)
            await held.started.wait()
        # Counters, with no event to wait on: the transport reports the hang-up.
        await until(lambda: server.transport_stats()["disconnects"] >= 1, "the hang-up", WAIT)
        responses = server.stats.responses
        assert server.stats.in_flight == 1  # the run goes on: it still holds the loop
        held.release()
        await until(lambda: server.stats.in_flight == 0, "the run to end", WAIT)
        assert server.stats.abandoned == 1
        assert server.stats.responses == responses  # nothing was encoded for a gone peer
        await still_serving(url)
