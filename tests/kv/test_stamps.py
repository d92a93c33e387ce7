"""Layer stamps: how a worker tells a recorded layer event from one not recorded yet.

A layer-wise retrieve is answered before the server's engine thread has enqueued (and so
recorded) its layers' events; an unrecorded CUDA event reads as complete. These are the
rules of the stamp ring and of what a worker polls, on plain memory and on a real
``/dev/shm`` file mapped twice (once by another process), with stand-in events: no GPU.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest
import torch

from kvrpc.cuda import CudaEventHandle
from kvrpc.errors import KVError
from kvrpc.kv.client.progress import RetrieveProgress
from kvrpc.kv.server import lanes
from kvrpc.kv.server.lanes import IpcEventRing, LayerAnnouncement
from kvrpc.kv.shm import SharedTensorRef
from kvrpc.kv.stamps import LayerStamps, StampedEvent, StampState, open_stamps


class _Event:
    """A stand-in CUDA event: complete once the test says so; counts its records."""

    def __init__(self, complete: bool = False) -> None:
        self.complete = complete
        self.records: list[Any] = []

    def query(self) -> bool:
        return self.complete

    def record(self, stream: Any) -> None:
        self.records.append(stream)


def _ring(size: int = 8) -> LayerStamps:
    return LayerStamps(bytearray(8 * size), size)


# ------------------------------------------------------------------ the ring's rules


def test_a_turn_is_pending_until_marked_then_recorded() -> None:
    stamps = _ring()
    assert stamps.state(0) is StampState.PENDING
    stamps.mark(0)
    assert stamps.state(0) is StampState.RECORDED
    assert stamps.state(1) is StampState.PENDING


def test_a_failed_turn_reads_failed_and_not_recorded() -> None:
    stamps = _ring()
    stamps.fail(3)
    assert stamps.state(3) is StampState.FAILED


def test_an_earlier_turns_stamp_in_the_entry_leaves_a_later_turn_pending() -> None:
    # Turn 10 shares entry 2 with turn 2: turn 2's stamp says nothing of turn 10.
    stamps = _ring(8)
    stamps.mark(2)
    assert stamps.state(10) is StampState.PENDING
    stamps.fail(2)
    assert stamps.state(10) is StampState.PENDING


def test_a_later_turn_in_the_entry_overtakes_an_earlier_one() -> None:
    stamps = _ring(8)
    stamps.mark(10)
    assert stamps.state(2) is StampState.OVERTAKEN
    stamps.fail(18)
    assert stamps.state(10) is StampState.OVERTAKEN


def test_a_ring_needs_an_entry() -> None:
    with pytest.raises(ValueError, match="at least one entry"):
        LayerStamps(bytearray(8), 0)


# ------------------------------------------------------------------ what a worker polls


def test_a_pending_turn_is_not_done_even_if_its_event_reads_complete() -> None:
    # The event still holds an earlier batch's completed record: the stamp must decide.
    stamps = _ring()
    opened: list[_Event] = []

    def open_event() -> _Event:
        opened.append(_Event(complete=True))
        return opened[-1]

    gate = StampedEvent(open_event, stamps, 5)
    assert gate.query() is False
    assert opened == []  # not opened while pending: opening an IPC event is slow
    stamps.mark(5)
    assert gate.query() is True
    assert len(opened) == 1


def test_a_recorded_turn_is_done_once_its_event_completes() -> None:
    stamps = _ring()
    event = _Event()
    gate = StampedEvent(lambda: event, stamps, 1)
    stamps.mark(1)
    assert gate.query() is False
    event.complete = True
    assert gate.query() is True


def test_a_failed_turn_raises_so_the_layer_counts_as_not_written() -> None:
    stamps = _ring()
    gate = StampedEvent(lambda: _Event(complete=True), stamps, 4)
    stamps.fail(4)
    with pytest.raises(KVError, match="failed"):
        gate.query()


def test_an_overtaken_turn_waits_for_the_event_of_the_later_work() -> None:
    stamps = _ring(4)
    event = _Event()
    gate = StampedEvent(lambda: event, stamps, 1)
    stamps.mark(5)  # entry 1 handed out again
    assert gate.query() is False
    event.complete = True
    assert gate.query() is True


def test_without_stamps_the_event_alone_decides() -> None:
    event = _Event(complete=True)
    assert StampedEvent(lambda: event).query() is True


def test_a_layer_wait_returns_once_the_layer_is_stamped_and_its_event_completed() -> None:
    stamps = _ring()
    events = [_Event(complete=True) for _ in range(3)]  # stale completes: must not count
    progress = RetrieveProgress(3)
    gates = [StampedEvent(lambda e=e: e, stamps, 10 + i) for i, e in enumerate(events)]
    progress._answer(gates, whole=True)
    assert progress.wait_layer(0, timeout=0) is False  # nothing stamped yet
    marked = threading.Event()

    def engine() -> None:  # the engine thread records layer 0 while the worker waits
        stamps.mark(10)
        marked.set()

    thread = threading.Thread(target=engine)
    thread.start()
    assert progress.wait_layer(0, timeout=30) is True
    thread.join()
    assert marked.is_set()
    assert progress.wait_layer(1, timeout=0) is False


def test_a_layer_wait_fails_at_once_when_its_turn_failed() -> None:
    stamps = _ring()
    progress = RetrieveProgress(2)
    progress._answer([StampedEvent(_Event, stamps, t) for t in (0, 1)], whole=True)
    stamps.mark(0)
    stamps.fail(1)
    assert progress.wait_layer(1, timeout=30) is False


# ------------------------------------------------------------------ the engine's side


def test_an_announcement_stamps_each_layer_after_recording_it_and_fails_the_rest() -> None:
    stamps = _ring(16)
    events = [_Event() for _ in range(4)]
    handles = [CudaEventHandle("GPU-fake", bytes([i]) * 64) for i in range(4)]
    announced = LayerAnnouncement(6, events, handles, stamps)
    announced.record("stream")
    announced.record("stream")
    assert [len(e.records) for e in events] == [1, 1, 0, 0]
    assert [stamps.state(t) for t in range(6, 10)] == [
        StampState.RECORDED,
        StampState.RECORDED,
        StampState.PENDING,
        StampState.PENDING,
    ]
    announced.fail_rest()
    assert [stamps.state(t) for t in (8, 9)] == [StampState.FAILED, StampState.FAILED]
    assert [stamps.state(t) for t in (6, 7)] == [StampState.RECORDED, StampState.RECORDED]


def test_an_event_ring_takes_consecutive_turns_for_a_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[int] = []

    def fake_event(device: Any) -> tuple[Any, CudaEventHandle]:
        made.append(len(made))
        return made[-1], CudaEventHandle("GPU-fake", made[-1].to_bytes(64, "little"))

    monkeypatch.setattr(lanes, "new_ipc_event", fake_event)
    ring = IpcEventRing(torch.device("cuda", 0), 8)
    first, taken = ring.take(3)
    assert first == 0 and [event for event, _ in taken] == [0, 1, 2]
    first, taken = ring.take(4)
    assert first == 3 and [event for event, _ in taken] == [3, 4, 5, 6]
    assert ring.next()[0] == 7
    first, taken = ring.take(2)  # wraps: turns 8 and 9 are entries 0 and 1 again
    assert first == 8 and [event for event, _ in taken] == [0, 1]
    with pytest.raises(ValueError, match="1 to 4 events"):
        ring.take(5)  # a batch may never hand out one event twice


# ------------------------------------------------------------------ across processes


def test_stamps_in_shared_memory_are_seen_by_another_mapping_and_another_process() -> None:
    stamps = LayerStamps.shared(16)
    try:
        assert isinstance(stamps.ref, SharedTensorRef)
        seen = open_stamps(stamps.ref)
        assert seen is open_stamps(stamps.ref)  # mapped once
        assert seen.state(3) is StampState.PENDING
        stamps.mark(3)
        stamps.fail(4)
        assert seen.state(3) is StampState.RECORDED
        assert seen.state(4) is StampState.FAILED
        ref = stamps.ref
        child = textwrap.dedent(
            f"""
            from kvrpc.kv.shm import SharedTensorRef
            from kvrpc.kv.stamps import open_stamps
            stamps = open_stamps(SharedTensorRef({ref.name!r}, {ref.offset}, {ref.shape!r},
                                                 {ref.dtype!r}))
            print(stamps.state(3).value, stamps.state(4).value, stamps.state(5).value)
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", child], capture_output=True, text=True, timeout=120, check=True
        )
        assert out.stdout.split() == ["recorded", "failed", "pending"]
    finally:
        stamps.release()


def test_stamps_that_are_not_int64_words_are_refused() -> None:
    stamps = LayerStamps.shared(4)
    try:
        assert stamps.ref is not None
        wrong = SharedTensorRef(stamps.ref.name, 0, (2,), "int32")
        with pytest.raises(KVError, match="1-D int64"):
            open_stamps(wrong)
    finally:
        stamps.release()
