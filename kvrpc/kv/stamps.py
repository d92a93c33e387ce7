"""Which of a copy engine's layer events are recorded: a ring of turn stamps in shared memory.

A layer-wise ``cuda_ipc`` retrieve is answered *before* its layers are enqueued, so that a
worker can start waiting for layer 0 while the server's engine thread still enqueues the
later layers (tens of microseconds a layer, milliseconds for a whole model). The reply
names every layer's interprocess event up front, but an event that is not recorded yet
reads as complete (a never-recorded CUDA event, or one whose last record was an earlier
batch's, says "done"), so the worker must also know when each one has been recorded for
its batch. That is what the stamps say.

The engine hands its layer events out in *turns*: turn ``t`` is event ``t % size`` of its
ring. The stamps are one signed 64-bit word per ring entry, in a file in ``/dev/shm`` the
worker maps read-only in effect (it never writes):

* ``t + 1`` once the engine recorded turn ``t`` (after the layer's copies were enqueued);
* ``-(t + 1)`` when turn ``t`` will never be recorded: its batch failed before that layer,
  and no byte of that layer is known to be written;
* a stamp of an earlier turn (smaller magnitude) while turn ``t`` is still pending.

A stamp of a *later* turn means the entry was handed out again since; then turn ``t`` was
recorded (or failed) long ago, and the event now tracks newer work, which completes after
turn ``t``'s own (the engine's copies run in one stream's order), so waiting for it never
waits for less. The engine writes each word once, after the record it stands for; a
reader polls. Aligned 8-byte words are read and written whole on the hosts CUDA runs on.

:class:`LayerStamps` is the ring (pure, over any memory: the tests give it a ``bytearray``);
:class:`StampedEvent` is what a worker polls for one layer.
"""

from __future__ import annotations

import ctypes
import enum
import threading
from collections.abc import Callable
from typing import Any, Final

import torch

from kvrpc.errors import KVError
from kvrpc.kv.shm import SharedTensorRef, open_shared, release_shared, shared_empty, shared_ref

__all__ = [
    "LayerStamps",
    "StampState",
    "StampedEvent",
    "open_stamps",
]

_WORD: Final = 8


class StampState(enum.Enum):
    """What the stamps say of one turn."""

    PENDING = "pending"
    """Not recorded yet: its event says nothing about this turn."""
    RECORDED = "recorded"
    """Recorded: its event completes once the turn's copies have."""
    FAILED = "failed"
    """Will never be recorded: the batch failed before it."""
    OVERTAKEN = "overtaken"
    """The entry was handed out again since: the event now tracks later work."""


class LayerStamps:
    """A ring of ``size`` turn stamps over ``size * 8`` bytes of memory (see the module).

    ``memory`` is anything ctypes can take an address of, or an integer address with
    ``owner`` keeping that memory alive. Only the engine thread writes (:meth:`mark`,
    :meth:`fail`); any thread of any process mapping the memory reads (:meth:`state`).
    """

    def __init__(self, memory: Any, size: int, *, owner: object = None) -> None:
        if size < 1:
            raise ValueError(f"a stamp ring needs at least one entry, got {size}")
        words = ctypes.c_int64 * size
        self._words = (
            words.from_address(memory) if isinstance(memory, int) else words.from_buffer(memory)
        )
        self._owner = owner if owner is not None else memory  # keeps the memory mapped
        self.size = size
        self.ref: SharedTensorRef | None = None
        """Where another process maps these stamps (set by :meth:`shared`)."""

    @classmethod
    def shared(cls, size: int) -> LayerStamps:
        """A new ring, zeroed, in a ``/dev/shm`` file this process owns (see :attr:`ref`)."""
        tensor = shared_empty((size,), torch.int64)
        stamps = cls(tensor.data_ptr(), size, owner=tensor)
        stamps.ref = shared_ref(tensor)
        return stamps

    def release(self) -> None:
        """Remove the ``/dev/shm`` file of stamps made by :meth:`shared` (mappings stay)."""
        if self.ref is not None and isinstance(self._owner, torch.Tensor):
            release_shared(self._owner)
            self.ref = None

    def mark(self, turn: int) -> None:
        """Turn ``turn`` is recorded."""
        self._words[turn % self.size] = turn + 1

    def fail(self, turn: int) -> None:
        """Turn ``turn`` will never be recorded."""
        self._words[turn % self.size] = -(turn + 1)

    def state(self, turn: int) -> StampState:
        """What the ring says of turn ``turn`` now."""
        stamp = self._words[turn % self.size]
        want = turn + 1
        if stamp == want:
            return StampState.RECORDED
        if stamp == -want:
            return StampState.FAILED
        return StampState.OVERTAKEN if abs(stamp) > want else StampState.PENDING


class StampedEvent:
    """One layer's event as a worker polls it: pending until its turn is stamped recorded.

    ``open_event()`` gives the CUDA event (opened on first need: opening an interprocess
    event takes a while, and a pending turn needs none). :meth:`query` raises
    :class:`~kvrpc.errors.KVError` for a failed turn. With ``stamps`` None (a reply that
    was sent after its events were recorded) the event alone decides.
    """

    def __init__(
        self, open_event: Callable[[], Any], stamps: LayerStamps | None = None, turn: int = 0
    ) -> None:
        self._open_event = open_event
        self._stamps = stamps
        self._turn = turn
        self._event: Any = None

    def recorded(self) -> bool:
        """True once the event is recorded (the layer's copies enqueued) or never will be.

        Never blocks.
        """
        return self._stamps is None or self._stamps.state(self._turn) is not StampState.PENDING

    def query(self) -> bool:
        """True once the layer's copies completed; False while pending; never blocks."""
        if self._stamps is not None:
            state = self._stamps.state(self._turn)
            if state is StampState.PENDING:
                return False
            if state is StampState.FAILED:
                raise KVError("the server's copy of this layer failed before it was enqueued")
            self._stamps = None  # recorded (or overtaken): the event decides from now on
        if self._event is None:
            self._event = self._open_event()
        return bool(self._event.query())


# A worker sees the stamps of one server (of one GPU's engine) again and again: each is
# mapped once. Few servers ever come and go in one worker's life, so a short list is plenty;
# a mapping dropped from it stays alive for as long as a StampedEvent still reads it.
_OPENED_LIMIT: Final = 16
_opened: dict[SharedTensorRef, LayerStamps] = {}
_opened_lock = threading.Lock()


def open_stamps(ref: SharedTensorRef) -> LayerStamps:
    """The stamps a server's reply names, mapped on first use; ``KVError`` if they cannot be."""
    with _opened_lock:
        stamps = _opened.get(ref)
        if stamps is not None:
            return stamps
    if ref.dtype != "int64" or len(ref.shape) != 1:
        raise KVError(f"layer stamps are a 1-D int64 tensor, not {ref.dtype}{list(ref.shape)}")
    tensor = open_shared(ref).tensor
    stamps = LayerStamps(tensor.data_ptr(), ref.shape[0], owner=tensor)
    with _opened_lock:
        if len(_opened) >= _OPENED_LIMIT:
            _opened.pop(next(iter(_opened)))
        return _opened.setdefault(ref, stamps)
