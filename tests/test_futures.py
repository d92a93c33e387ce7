"""Specification of MessagingFuture: resolved once, waited on from any thread or event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

import pytest
import torch

from kvrpc.errors import CudaUnavailable, RemoteError
from kvrpc.futures import CUDAMessagingFuture, MessagingFuture

# Generous: only reached if the code under test is broken, never part of a passing run's timing.
HANG = 10.0


def resolve_later(action: Any, *args: Any) -> threading.Timer:
    timer = threading.Timer(0.02, action, args=args)
    timer.start()
    return timer


# --------------------------------------------------------------------------------- waiting


def test_pending_future_is_not_done() -> None:
    fut: MessagingFuture[int] = MessagingFuture()
    assert fut.query() is False
    assert fut.done() is False
    assert fut.cancelled() is False
    assert "pending" in repr(fut)


def test_wait_with_timeout_returns_false_while_pending() -> None:
    fut: MessagingFuture[int] = MessagingFuture()
    assert fut.wait(timeout=0.01) is False
    assert fut.query() is False


def test_result_with_timeout_raises_timeout_error_while_pending() -> None:
    fut: MessagingFuture[int] = MessagingFuture()
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.01)
    with pytest.raises(TimeoutError):
        fut.exception(timeout=0.01)


def test_set_result_resolves_every_way_of_asking() -> None:
    fut: MessagingFuture[str] = MessagingFuture()
    fut.set_result("value")
    assert fut.query() is True
    assert fut.done() is True
    assert fut.wait(timeout=0) is True
    assert fut.wait() is True
    assert fut.result() == "value"
    assert fut.result(timeout=0) == "value"
    assert fut.exception() is None
    assert "done" in repr(fut)


def test_result_blocks_until_another_thread_sets_it() -> None:
    fut: MessagingFuture[int] = MessagingFuture()
    timer = resolve_later(fut.set_result, 42)
    try:
        assert fut.result(timeout=HANG) == 42
    finally:
        timer.join()


def test_wait_returns_true_once_another_thread_sets_it() -> None:
    fut: MessagingFuture[int] = MessagingFuture()
    timer = resolve_later(fut.set_result, 1)
    try:
        assert fut.wait(timeout=HANG) is True
    finally:
        timer.join()


def test_set_exception_makes_result_raise_that_exception() -> None:
    fut: MessagingFuture[int] = MessagingFuture()
    error = RemoteError("ValueError", "bad")
    fut.set_exception(error)
    assert fut.query() is True
    with pytest.raises(RemoteError) as info:
        fut.result()
    assert info.value is error
    assert fut.exception() is error


def test_only_the_first_resolution_counts() -> None:
    fut: MessagingFuture[str] = MessagingFuture()
    fut.set_result("first")
    fut.set_result("second")
    fut.set_exception(RuntimeError("late"))
    assert fut.result() == "first"


def test_set_result_after_set_exception_is_ignored() -> None:
    fut: MessagingFuture[str] = MessagingFuture()
    error = ValueError("first")
    fut.set_exception(error)
    fut.set_result("late")
    assert fut.exception() is error


# ------------------------------------------------------------------------------ callbacks


def test_done_callback_runs_once_with_the_future_when_resolved() -> None:
    fut: MessagingFuture[int] = MessagingFuture()
    seen: list[Any] = []
    fut.add_done_callback(seen.append)
    assert seen == []
    fut.set_result(5)
    fut.set_result(6)
    assert seen == [fut]
    assert seen[0].result() == 5


def test_done_callback_added_after_completion_runs_at_once() -> None:
    fut: MessagingFuture[int] = MessagingFuture()
    fut.set_result(5)
    seen: list[int] = []
    fut.add_done_callback(lambda f: seen.append(f.result()))
    assert seen == [5]


def test_done_callbacks_run_in_the_order_added() -> None:
    fut: MessagingFuture[int] = MessagingFuture()
    order: list[str] = []
    fut.add_done_callback(lambda _: order.append("a"))
    fut.add_done_callback(lambda _: order.append("b"))
    fut.set_exception(RuntimeError("x"))
    assert order == ["a", "b"]


def test_done_callback_runs_on_the_resolving_thread() -> None:
    fut: MessagingFuture[int] = MessagingFuture()
    threads: list[int] = []
    fut.add_done_callback(lambda _: threads.append(threading.get_ident()))
    resolver = threading.Thread(target=fut.set_result, args=(1,))
    resolver.start()
    resolver.join()
    assert threads == [resolver.ident]


# -------------------------------------------------------------------------------- asyncio


async def test_awaiting_gives_the_result_set_from_another_thread() -> None:
    fut: MessagingFuture[str] = MessagingFuture()
    timer = resolve_later(fut.set_result, "from a thread")
    try:
        async with asyncio.timeout(HANG):
            assert await fut == "from a thread"
    finally:
        timer.join()


async def test_awaiting_raises_the_exception_set_from_another_thread() -> None:
    fut: MessagingFuture[str] = MessagingFuture()
    error = RemoteError("KeyError", "k")
    timer = resolve_later(fut.set_exception, error)
    try:
        async with asyncio.timeout(HANG):
            with pytest.raises(RemoteError) as info:
                await fut
        assert info.value is error
    finally:
        timer.join()


async def test_awaiting_a_resolved_future_returns_its_result() -> None:
    fut: MessagingFuture[int] = MessagingFuture()
    fut.set_result(3)
    assert await fut == 3
    assert await fut == 3  # awaitable more than once


async def test_two_event_loops_can_await_the_same_future() -> None:
    fut: MessagingFuture[int] = MessagingFuture()
    other_loop_result: list[int] = []

    async def await_in_other_loop() -> None:
        async with asyncio.timeout(HANG):
            other_loop_result.append(await fut)

    other = threading.Thread(target=asyncio.run, args=(await_in_other_loop(),))
    other.start()
    timer = resolve_later(fut.set_result, 9)
    try:
        async with asyncio.timeout(HANG):
            assert await fut == 9
    finally:
        timer.join()
        other.join()
    assert other_loop_result == [9]


# --------------------------------------------------------------------------------- cancel


def test_cancel_of_a_pending_future_wins() -> None:
    fut: MessagingFuture[int] = MessagingFuture()
    seen: list[Any] = []
    fut.add_done_callback(seen.append)
    assert fut.cancel() is True
    assert fut.cancelled() is True
    assert fut.query() is True
    assert seen == [fut]
    with pytest.raises(concurrent.futures.CancelledError):
        fut.result()


def test_result_arriving_after_cancel_is_ignored() -> None:
    fut: MessagingFuture[int] = MessagingFuture()
    fut.cancel()
    fut.set_result(1)
    fut.set_exception(RuntimeError("late"))
    assert fut.cancelled() is True


def test_cancel_after_the_result_arrived_does_nothing() -> None:
    fut: MessagingFuture[int] = MessagingFuture()
    fut.set_result(1)
    assert fut.cancel() is False
    assert fut.cancelled() is False
    assert fut.result() == 1


async def test_awaiting_a_future_cancelled_from_another_thread_raises_cancelled_error() -> None:
    fut: MessagingFuture[int] = MessagingFuture()
    timer = resolve_later(fut.cancel)
    try:
        async with asyncio.timeout(HANG):
            with pytest.raises(asyncio.CancelledError):
                await fut
    finally:
        timer.join()
    assert fut.cancelled() is True


# ------------------------------------------------------------------------------------ CUDA


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_to_cuda_future_raises_cuda_unavailable_without_cuda() -> None:
    fut: MessagingFuture[int] = MessagingFuture()
    with pytest.raises(CudaUnavailable, match="CUDA"):
        fut.to_cuda_future()
    with pytest.raises(CudaUnavailable):
        CUDAMessagingFuture(fut)


# A fake interprocess event and stream, because no GPU is here: wait_on's rule (see
# kvrpc.cuda) is about the order of calls, which a fake can record. The fake event completes
# when the test says so, and the stream notes whether the event had completed when it was
# handed over.


class FakePeerEvent:
    """Stands in for another process's ``torch.cuda.Event``; completes on ``complete()``."""

    def __init__(self, completed: bool = False) -> None:
        self._completed = threading.Event()
        if completed:
            self._completed.set()
        self.queries = 0
        self.handed_to_streams: list[bool] = []

    def complete(self) -> None:
        self._completed.set()

    def query(self) -> bool:
        self.queries += 1
        return self._completed.is_set()

    def wait(self, stream: Any = None) -> None:  # torch's event.wait(stream) orders a stream
        self.handed_to_streams.append(self._completed.is_set())

    def synchronize(self) -> None:
        raise AssertionError("wait_on must poll, not block in synchronize()")


class FakeStream:
    """Stands in for a ``torch.cuda.Stream``: notes each event it is made to wait on."""

    def __init__(self) -> None:
        self.waited_while_completed: list[bool] = []

    def wait_event(self, event: FakePeerEvent) -> None:
        self.waited_while_completed.append(event._completed.is_set())


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Let a CUDAMessagingFuture be made without a GPU, its reply's event a fake one."""
    import kvrpc.cuda
    import kvrpc.futures

    events: dict[Any, FakePeerEvent] = {}
    monkeypatch.setattr(kvrpc.futures, "require_cuda", lambda what: None)
    monkeypatch.setattr(kvrpc.cuda, "_open_event", lambda handle: events[handle])

    def reply_with(event: FakePeerEvent) -> tuple[MessagingFuture[Any], CUDAMessagingFuture[Any]]:
        from kvrpc.cuda import CudaEventHandle

        handle = CudaEventHandle("GPU-fake", bytes([len(events)]) * 64)
        events[handle] = event
        future: MessagingFuture[Any] = MessagingFuture()
        future.set_result(handle)
        return future, future.to_cuda_future()

    return reply_with


def test_wait_on_polls_a_pending_peer_event_on_the_host_and_never_hands_it_to_a_stream(
    fake_cuda: Any,
) -> None:
    event, stream = FakePeerEvent(), FakeStream()
    _, cuda_future = fake_cuda(event)
    returned = threading.Event()
    errors: list[BaseException] = []

    def wait_on() -> None:
        try:
            cuda_future.wait_on(stream)
        except BaseException as exc:
            errors.append(exc)
        returned.set()

    waiter = threading.Thread(target=wait_on, daemon=True)
    waiter.start()
    try:
        # Nothing completes the event until the test does, so wait_on cannot return yet.
        finished_early = returned.wait(0.3)
        assert stream.waited_while_completed == [], "a stream was made to wait on it pending"
        assert event.handed_to_streams == [], "a stream was made to wait on it pending"
        assert not finished_early, "wait_on returned while the peer's event was pending"
        assert event.queries > 0, "the event was not polled"
    finally:
        event.complete()
    assert returned.wait(30), "wait_on did not return once the event completed"
    waiter.join(30)
    assert errors == []
    assert False not in stream.waited_while_completed + event.handed_to_streams


def test_wait_on_with_a_timeout_raises_timeout_error_and_leaves_the_stream_alone(
    fake_cuda: Any,
) -> None:
    event, stream = FakePeerEvent(), FakeStream()
    _, cuda_future = fake_cuda(event)
    with pytest.raises(TimeoutError):
        cuda_future.wait_on(stream, timeout=0.05)
    assert event.queries > 0
    assert stream.waited_while_completed == [] and event.handed_to_streams == []


def test_wait_on_a_completed_event_returns_at_once_without_a_stream_wait(fake_cuda: Any) -> None:
    event, stream = FakePeerEvent(completed=True), FakeStream()
    _, cuda_future = fake_cuda(event)
    cuda_future.wait_on(stream, timeout=0)
    assert stream.waited_while_completed == [] and event.handed_to_streams == []


def test_wait_on_raises_the_calls_error_and_times_out_waiting_for_the_reply(
    fake_cuda: Any,
) -> None:
    future: MessagingFuture[Any] = MessagingFuture()
    cuda_future = future.to_cuda_future()
    with pytest.raises(TimeoutError):
        cuda_future.wait_on(FakeStream(), timeout=0.01)
    future.set_exception(RemoteError("Boom", "it failed"))
    with pytest.raises(RemoteError):
        cuda_future.wait_on(FakeStream(), timeout=1)
