"""How a worker settles its ``cuda_ipc`` copies: answered at enqueue, finished when the event is.

The server answers ``kv.store_cuda`` and ``kv.retrieve_cuda`` once the copy is enqueued, with
the event its engine records after the copy. The worker's :class:`EventWatcher` polls those
events on one thread and settles each request when its event completes, or fails it past
the timeout. These tests run without a GPU: the events are stand-ins with the one method the
watcher uses (``query()``), completed by the test when it chooses, since a real interprocess
event needs CUDA. The real events are exercised by the ``cuda``-marked tests in
``test_kv_cuda.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import torch

from kvrpc.cuda import CudaEventHandle
from kvrpc.futures import MessagingFuture
from kvrpc.kv.client.completions import Completions
from kvrpc.kv.client.ledger import RequestLedger
from kvrpc.kv.client.progress import RetrieveProgress
from kvrpc.kv.client.watcher import EventWatcher
from kvrpc.kv.outcomes import KeyStatus
from kvrpc.kv.protocols import CudaCopyReply

UUID = "GPU-5f1c2a9e-0b7d-4e3a-9c61-2d8f0e4b7a13"
HANG = 10.0  # only reached when the code under test is broken
SETTLE = 0.05  # seconds a wait that must time out is given


class StandInEvent:
    """An event that completes when the test says so (or whose query fails, if told).

    It counts the watcher's queries, for a test to wait on (:meth:`wait_queried`); with
    ``done_when``, it completes at its first query after that flag is set.
    """

    def __init__(self, fail: bool = False, done_when: threading.Event | None = None) -> None:
        self._done = threading.Event()
        self._fail = fail
        self._done_when = done_when
        self._queried = threading.Condition()
        self.queries = 0

    def complete(self) -> None:
        self._done.set()

    def query(self) -> bool:
        with self._queried:
            self.queries += 1
            self._queried.notify_all()
        if self._fail:
            raise RuntimeError("the event's process is gone")
        if self._done_when is not None and self._done_when.is_set():
            self._done.set()
        return self._done.is_set()

    def wait_queried(self, count: int) -> bool:
        """Wait until the watcher has queried this event ``count`` times in all."""
        with self._queried:
            return self._queried.wait_for(lambda: self.queries >= count, HANG)


class Called:
    """What the watcher called back, in order: ``(name, ok)`` pairs, with a wait for them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []
        self._changed = threading.Condition()

    def back(self, name: str) -> Callable[[bool], None]:
        """A callback noting ``(name, ok)``; the watcher calls it on its own thread."""

        def then(ok: bool) -> None:
            with self._changed:
                self.calls.append((name, ok))
                self._changed.notify_all()

        return then

    def wait(self, *expected: tuple[str, bool]) -> bool:
        """Wait until the calls so far are ``expected``."""
        with self._changed:
            return self._changed.wait_for(lambda: self.calls == list(expected), HANG)


class Events:
    """Stand-in events by handle, what the watcher opens instead of CUDA's."""

    def __init__(self) -> None:
        self.by_handle: dict[CudaEventHandle, StandInEvent] = {}

    def new(self, fail: bool = False) -> tuple[CudaEventHandle, StandInEvent]:
        handle = CudaEventHandle(UUID, len(self.by_handle).to_bytes(64, "little"))
        event = self.by_handle[handle] = StandInEvent(fail)
        return handle, event

    def open(self, handle: CudaEventHandle) -> StandInEvent:
        return self.by_handle[handle]


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def watcher(events: Events) -> Iterator[EventWatcher]:
    watcher = EventWatcher(open_event=events.open)
    yield watcher
    watcher.close(timeout=0)


def answered(reply: CudaCopyReply) -> MessagingFuture[CudaCopyReply]:
    future: MessagingFuture[CudaCopyReply] = MessagingFuture()
    future.set_result(reply)
    return future


# ------------------------------------------------------------------ the watcher


def test_an_event_is_called_back_only_once_it_has_completed(watcher: EventWatcher) -> None:
    event = StandInEvent()
    called = Called()
    watcher.watch_event(event, HANG, called.back("event"))
    assert event.wait_queried(2)  # polled, and found pending, twice
    assert called.calls == []
    event.complete()
    assert called.wait(("event", True))


def test_an_event_still_pending_past_its_timeout_is_called_back_false(
    watcher: EventWatcher,
) -> None:
    called = Called()
    watcher.watch_event(StandInEvent(), 0.02, called.back("event"))
    assert called.wait(("event", False))


def test_events_are_called_back_in_the_order_they_complete_not_the_order_given(
    watcher: EventWatcher,
) -> None:
    first, second = StandInEvent(), StandInEvent()
    called = Called()
    watcher.watch_event(first, HANG, called.back("first"))
    watcher.watch_event(second, HANG, called.back("second"))
    second.complete()
    assert called.wait(("second", True))
    first.complete()
    assert called.wait(("second", True), ("first", True))


def test_an_event_that_cannot_be_polled_fails_alone(watcher: EventWatcher) -> None:
    good = StandInEvent()
    called = Called()
    watcher.watch_event(StandInEvent(fail=True), HANG, called.back("bad"))
    watcher.watch_event(good, HANG, called.back("good"))
    assert called.wait(("bad", False))
    good.complete()
    assert called.wait(("bad", False), ("good", True))


def test_a_callback_that_raises_does_not_stop_the_others(watcher: EventWatcher) -> None:
    first, second = StandInEvent(), StandInEvent()
    called = Called()
    raised = threading.Event()

    def broken(ok: bool) -> None:
        raised.set()
        raise RuntimeError("a bug in a callback")

    watcher.watch_event(first, HANG, broken)
    first.complete()
    assert raised.wait(HANG)  # the watcher's thread is raising, or has raised
    watcher.watch_event(second, HANG, called.back("second"))
    second.complete()
    assert called.wait(("second", True))


def test_close_lets_pending_events_finish_within_its_timeout_then_fails_the_rest(
    events: Events,
) -> None:
    watcher = EventWatcher(open_event=events.open)
    closing = threading.Event()
    finishing, stuck = StandInEvent(done_when=closing), StandInEvent()
    called = Called()
    watcher.watch_event(finishing, HANG, called.back("finishing"))
    watcher.watch_event(stuck, HANG, called.back("stuck"))
    assert finishing.wait_queried(1)  # pending when close begins
    closing.set()  # finishing completes at its next query, which close waits for
    watcher.close(timeout=0.5)
    assert called.calls == [("finishing", True), ("stuck", False)]
    watcher.watch_event(StandInEvent(), HANG, called.back("late"))
    assert called.calls[-1] == ("late", False)  # closed: called back at once, never polled


def test_a_handle_is_opened_on_the_watcher_thread_not_the_callers(events: Events) -> None:
    opened_on: list[str] = []

    def open_event(handle: CudaEventHandle) -> StandInEvent:
        opened_on.append(threading.current_thread().name)
        return events.open(handle)

    watcher = EventWatcher("watcher-under-test", open_event=open_event)
    handle, event = events.new()
    event.complete()
    called = Called()
    watcher.watch(handle, HANG, called.back("event"))
    assert called.wait(("event", True))
    assert opened_on == ["watcher-under-test"]
    watcher.close(timeout=0)


# ------------------------------------------------------------------ a worker's completions


def completions(events: Events, watcher: EventWatcher, timeout: float = HANG) -> Completions:
    ledger = RequestLedger()
    return Completions(ledger, timeout, lambda: None, events=watcher)


def test_a_store_answered_at_enqueue_is_finished_only_once_its_event_completed(
    events: Events, watcher: EventWatcher
) -> None:
    done = completions(events, watcher)
    ledger = done._ledger
    handle, event = events.new()
    ledger.stores_sent(["req"])
    done.store_answered(
        ["req"], answered(CudaCopyReply(statuses=[KeyStatus.OK] * 2, cuda_event=handle))
    )
    # The engine must not reuse the blocks yet: the server's copy may still read them.
    assert not ledger.wait_for_stores(["req"], SETTLE)
    assert ledger.finished({"req"})[0] == set()
    event.complete()
    assert ledger.wait_for_stores(["req"], HANG)
    assert ledger.finished({"req"})[0] == {"req"}
    assert ledger.stats.stored_chunks == 2


def test_a_store_whose_event_never_completes_counts_its_chunks_dropped(
    events: Events, watcher: EventWatcher
) -> None:
    done = completions(events, watcher, timeout=0.02)
    handle, _ = events.new()
    done._ledger.stores_sent(["req"])
    done.store_answered(
        ["req"], answered(CudaCopyReply(statuses=[KeyStatus.OK], cuda_event=handle)), 1
    )
    assert done._ledger.wait_for_stores(["req"], HANG)
    assert done._ledger.stats.stored_chunks == 0
    assert done._ledger.stats.dropped_stores == 1


def test_a_retrieve_answered_at_enqueue_is_finished_only_once_its_event_completed(
    events: Events, watcher: EventWatcher
) -> None:
    done = completions(events, watcher)
    ledger = done._ledger
    handle, event = events.new()
    rows = torch.tensor([[4, 5], [6, 7]])
    progress = RetrieveProgress(1)
    ledger.retrieves_sent(["req"])
    reply = CudaCopyReply(statuses=[KeyStatus.OK] * 2, cuda_event=handle)
    done.retrieve_answered(["req"], ["req", "req"], rows, answered(reply), progress, None)
    assert not progress.wait(SETTLE)
    assert ledger.finished(set())[1] == set()
    event.complete()
    assert progress.wait(HANG)
    assert ledger.finished(set())[1] == {"req"}
    assert ledger.take_load_errors() == set()


def test_a_retrieve_whose_event_never_completes_leaves_its_blocks_as_load_errors(
    events: Events, watcher: EventWatcher
) -> None:
    done = completions(events, watcher, timeout=0.02)
    handle, _ = events.new()
    rows = torch.tensor([[4, 5]])
    progress = RetrieveProgress(1)
    done._ledger.retrieves_sent(["req"])
    reply = CudaCopyReply(statuses=[KeyStatus.OK], cuda_event=handle)
    done.retrieve_answered(["req"], ["req"], rows, answered(reply), progress, None)
    assert progress.wait(HANG) is False  # finished, but not filled
    assert done._ledger.take_load_errors() == {4, 5}


def test_a_cuda_reply_that_copied_nothing_settles_at_once_without_an_event(
    events: Events, watcher: EventWatcher
) -> None:
    done = completions(events, watcher)
    rows = torch.tensor([[4, 5]])
    progress = RetrieveProgress(1)
    done._ledger.retrieves_sent(["req"])
    reply = CudaCopyReply(statuses=[KeyStatus.NOT_IN_CACHE], detail="not in the cache")
    done.retrieve_answered(["req"], ["req"], rows, answered(reply), progress, None)
    assert progress.wait(HANG) is False
    assert done._ledger.take_load_errors() == {4, 5}
    done.shutdown()
