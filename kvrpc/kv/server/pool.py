"""The L1 store of the KV-cache server: fixed-size chunk slots in one host buffer, LRU eviction.

:class:`ChunkPool` is sans-IO bookkeeping around one ``uint8`` tensor cut into ``num_slots``
slots of ``slot_nbytes`` bytes. It decides which slot holds which key; it never copies chunk
bytes itself. The server copies bytes into a slot between :meth:`ChunkPool.reserve` and
:meth:`ChunkPool.commit`, and out of a slot while it holds a pin, on executor threads; the
pool guarantees that a reserved or pinned slot is never given to another key in that time.

A slot is in one of three states:

* free: on the free stack, holding nothing;
* filling: reserved for a key whose bytes are being copied in; invisible to
  :meth:`~ChunkPool.lookup` and never evicted;
* ready: holds a key's bytes; evictable in least-recently-used order while its pin count is 0.

Thread-safety: none. Every method must be called from one thread, the server's event-loop
thread; the executor threads only touch the bytes of :meth:`~ChunkPool.slot_view` tensors.

Host memory: without pinning the buffer comes from ``torch.empty``, whose pages the OS provides
only when first written, so an unused pool costs address space but not resident memory. Pinned
(``pin_memory``), the same buffer is page-locked with ``cudaHostRegister`` at construction,
which makes every page resident at once (about 0.3 s per GiB) and keeps it so until the pool is
dropped. It is not allocated with ``torch.empty(..., pin_memory=True)``, whose caching
allocator rounds the size up to a power of two (a 40 GB pool would pin 64 GB) and keeps the
memory after use.

Memory: the only Python object per stored chunk is its key. Everything else lives in flat
arrays allocated once, at construction: slot -> key (a list), the LRU links, pin counts, states,
the free stack, the chunks' checksums, a fill count per slot, and key -> slot as an
open-addressing hash table of slot numbers. That is about 135 bytes of metadata per chunk with
42-byte keys (the key object takes 80 of them), the same at every pool size; a dict from key
to slot would add a boxed int and a dict entry per chunk and reach 205 bytes at some sizes.
Every operation except :meth:`~ChunkPool.clear` and :meth:`~ChunkPool.keys` is O(1)
(expected, for the hash table, which is at most half full).
"""

from __future__ import annotations

import enum
import weakref
from array import array
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import torch

from kvrpc.errors import CudaUnavailable, KVConfigError

__all__ = ["ChunkPool", "EvictHook", "Reserve"]

EvictHook = Callable[[bytes, int], None]
"""``on_evict(key, slot)``: called just before a ready slot is taken from ``key`` for reuse.

:meth:`ChunkPool.reserve` calls it when it evicts a ready slot, before the slot changes hands:
it may copy the slot's bytes out synchronously (to a lower tier, say). While it runs the pool
is unchanged and the key still ready; it must not call the pool's mutating methods. If it
raises, the exception propagates out of :meth:`~ChunkPool.reserve` and nothing is evicted or
reserved.
"""

# Slot states, one signed byte per slot.
_FREE = 0
_FILLING = 1
_READY = 2
_NAMES = {_FREE: "free", _FILLING: "filling", _READY: "ready"}

# cudaHostRegisterPortable: the pages count as pinned for every CUDA context (every GPU the server
# copies to), not only the current one.
_CUDA_HOST_REGISTER_PORTABLE = 1

# Slot numbers live in C ints (array "i") and hash-table positions, up to twice as many, in
# unsigned ones (array "I").
_MAX_SLOTS = 2**30


class Reserve(enum.Enum):
    """Why :meth:`ChunkPool.reserve` gave no slot.

    Not an ``int`` subclass, so ``isinstance(result, Reserve)`` tells a refusal from a slot.
    """

    EXISTS = "exists"
    """The key is already stored and ready; nothing to fill."""
    FILLING = "filling"
    """Another fill of the same key is in progress."""
    FULL = "full"
    """No free slot, and every used slot is pinned or filling: nothing can be evicted."""


class ChunkPool:
    """Fixed-size chunk slots in one host buffer, keyed by opaque ``bytes``, with LRU eviction.

    Keys must be ``bytes`` (compared by value); the pool keeps a reference to the key object
    it was given for as long as the chunk is stored.

    ``num_slots = capacity_bytes // slot_nbytes``; the byte limit is hard: the buffer is
    ``num_slots * slot_nbytes`` bytes and never grows. ``pin_memory`` (needs CUDA) page-locks
    it at construction (see the module doc).

    ``on_evict`` (also settable later as the attribute of that name) is an :data:`EvictHook`.
    Not thread-safe: use it from the server's event-loop thread only (see the module doc).
    Methods that take a slot raise ``ValueError`` when the slot is out of range or in the wrong
    state for the call; those are programming errors of the caller, not conditions to handle.
    """

    def __init__(
        self,
        capacity_bytes: int,
        slot_nbytes: int,
        *,
        pin_memory: bool = False,
        on_evict: EvictHook | None = None,
    ) -> None:
        num_slots = _slot_count(capacity_bytes, slot_nbytes)
        if pin_memory and not torch.cuda.is_available():
            raise CudaUnavailable(
                "ChunkPool: pin_memory=True needs a CUDA build of torch and a GPU; "
                "leave pin_memory off on CPU-only hosts"
            )
        self._num_slots = num_slots
        self._slot_nbytes = slot_nbytes
        self._buffer = _host_buffer(self, num_slots * slot_nbytes, pin_memory)
        self.on_evict: EvictHook | None = on_evict

        # slot -> key, None when free: the only per-chunk Python object is the key itself.
        self._keys: list[bytes | None] = [None] * num_slots
        # key -> slot for filling and ready slots: an open-addressing hash table of slot numbers
        # (-1 empty), linear probing, at most half full, allocated once. A dict would add a boxed
        # int and an entry per key (~75 bytes), and each of its resizes stalls the event loop
        # (~80 ms at 1.4 million keys).
        table_size = 8
        while table_size < 2 * num_slots:
            table_size *= 2
        self._table = array("i", [-1]) * table_size
        self._mask = table_size - 1
        # slot -> where its key's probe sequence starts, so that forgetting a key neither hashes
        # nor dereferences the keys of the entries it moves.
        self._home = array("I", [0]) * num_slots
        self._state = array("b", [_FREE]) * num_slots
        self._pins = array("i", [0]) * num_slots
        # Each ready chunk's end-to-end checksum (kvrpc.kv.integrity), and whether it has one:
        # 9 bytes a slot, beside the rest of the flat tables.
        self._sums = array("Q", [0]) * num_slots
        self._summed = array("b", [0]) * num_slots
        # How many times each slot was reserved (mod 2**32): a checksum computed after a
        # chunk was committed is added only if the slot has not been filled again since.
        self._fills = array("I", [0]) * num_slots
        # Doubly linked LRU list of ready, unpinned slots through index `num_slots`, the
        # sentinel: _next[sentinel] is the least recently used slot, _prev[sentinel] the most.
        self._next = array("i", [num_slots]) * (num_slots + 1)
        self._prev = array("i", [num_slots]) * (num_slots + 1)
        # Free slots as a stack of fixed size; the top is _free[_free_count - 1]. Reversed so
        # that a fresh pool hands out slot 0 first.
        self._free = array("i", range(num_slots - 1, -1, -1))
        self._free_count = num_slots
        self._filling = 0
        self._pinned = 0
        self._evictions = 0

    # ------------------------------------------------------------------ sizes and counters

    @property
    def num_slots(self) -> int:
        """How many slots the pool has; fixed at construction."""
        return self._num_slots

    @property
    def slot_nbytes(self) -> int:
        """Bytes per slot (one chunk); fixed at construction."""
        return self._slot_nbytes

    @property
    def capacity_bytes(self) -> int:
        """``num_slots * slot_nbytes``: the size of the buffer, at most the capacity asked for."""
        return self._num_slots * self._slot_nbytes

    @property
    def buffer(self) -> Any:
        """The whole 1-D ``uint8`` tensor the slots are cut from (for registering it once)."""
        return self._buffer

    @property
    def used_slots(self) -> int:
        """Slots that are filling or ready."""
        return self._num_slots - self._free_count

    @property
    def ready_slots(self) -> int:
        """Slots holding a committed chunk: the number of chunks :meth:`lookup` can find."""
        return self._num_slots - self._free_count - self._filling

    @property
    def free_slots(self) -> int:
        """Slots holding nothing; :meth:`reserve` takes these before it evicts."""
        return self._free_count

    @property
    def pinned_slots(self) -> int:
        """Ready slots with a pin count above 0."""
        return self._pinned

    @property
    def evictions(self) -> int:
        """How many ready chunks :meth:`reserve` has evicted since construction."""
        return self._evictions

    @property
    def bytes_used(self) -> int:
        """``used_slots * slot_nbytes``."""
        return (self._num_slots - self._free_count) * self._slot_nbytes

    @property
    def bytes_free(self) -> int:
        """``free_slots * slot_nbytes``; ``bytes_used + bytes_free == capacity_bytes``."""
        return self._free_count * self._slot_nbytes

    def keys(self) -> Iterator[bytes]:
        """The keys of ready chunks, in no particular order; do not change the pool meanwhile."""
        state = self._state
        return (
            key for slot, key in enumerate(self._keys) if key is not None and state[slot] == _READY
        )

    # ------------------------------------------------------------------ finding chunks

    def slot_view(self, slot: int) -> Any:
        """Slot ``slot`` of the buffer as a 1-D ``uint8`` tensor view of ``slot_nbytes`` (no copy).

        The view stays valid as long as the pool; its bytes belong to the slot's key only while
        the caller holds the slot reserved or pinned.
        """
        self._check_slot(slot)
        start = slot * self._slot_nbytes
        return self._buffer[start : start + self._slot_nbytes]

    def lookup(self, key: bytes) -> int | None:
        """The slot holding ``key``'s ready chunk, or None (absent, or still being filled).

        Does not change the LRU order: call :meth:`touch` (or :meth:`pin`) for a real use.
        """
        keys = self._keys
        table = self._table
        mask = self._mask
        i = hash(key) & mask
        slot = table[i]
        while slot >= 0:
            if keys[slot] == key:
                return slot if self._state[slot] == _READY else None
            i = (i + 1) & mask
            slot = table[i]
        return None

    def lookup_run(self, hashes: Iterable[bytes], suffix: bytes) -> list[int]:
        """The slots of ``hash + suffix`` for ``hashes`` in order, up to the first not ready.

        :meth:`lookup` for each key in turn, stopping at the first that finds nothing: a
        scheduler's lookup scans each rank's run of chunks this way (hundreds of keys), so the
        probe is written out here rather than paid as a method call per key. Does not change
        the LRU order.
        """
        keys = self._keys
        table = self._table
        mask = self._mask
        state = self._state
        slots: list[int] = []
        append = slots.append
        for chunk_hash in hashes:
            key = chunk_hash + suffix
            i = hash(key) & mask
            slot = table[i]
            while slot >= 0 and keys[slot] != key:
                i = (i + 1) & mask
                slot = table[i]
            if slot < 0 or state[slot] != _READY:
                break
            append(slot)
        return slots

    def touch(self, slot: int) -> None:
        """Mark a ready slot as the most recently used, the last to be evicted.

        A pinned slot stays out of the LRU order; it becomes the most recently used when its
        last pin goes.
        """
        self._check_state(slot, _READY, "touch")
        if self._pins[slot] == 0:
            self._unlink(slot)
            self._link_mru(slot)

    # ------------------------------------------------------------------ filling chunks

    def reserve(self, key: bytes) -> int | Reserve:
        """A slot to fill with ``key``'s bytes, or why there is none.

        Takes a free slot if there is one, else evicts the least recently used ready,
        unpinned slot (counting an eviction and calling ``on_evict`` first). The returned slot
        is filling: invisible to :meth:`lookup`, never evicted, and reserved for the caller
        until it calls :meth:`commit` or :meth:`abort`. Returns :attr:`Reserve.EXISTS` if
        ``key`` is ready, :attr:`Reserve.FILLING` if it is being filled, and
        :attr:`Reserve.FULL` if every used slot is pinned or filling.
        """
        keys = self._keys
        table = self._table
        mask = self._mask
        home = hash(key) & mask
        i = home
        held = table[i]
        while held >= 0:
            if keys[held] == key:
                return Reserve.EXISTS if self._state[held] == _READY else Reserve.FILLING
            i = (i + 1) & mask
            held = table[i]
        if self._free_count:
            self._free_count -= 1
            slot = self._free[self._free_count]
        else:
            slot = self._next[self._num_slots]
            if slot == self._num_slots:
                return Reserve.FULL
            old_key = keys[slot]
            assert old_key is not None
            hook = self.on_evict
            if hook is not None:
                hook(old_key, slot)
                # A hook that broke the rule and changed the pool leaves nothing safe to do.
                assert self._next[self._num_slots] == slot, "on_evict must not change the pool"
            self._unlink(slot)
            # Forgetting the old key may shift entries back into the probe sequence of `key`,
            # so the empty place found above is no longer known to be the first one.
            self._forget(slot)
            i = home
            while table[i] >= 0:
                i = (i + 1) & mask
            self._evictions += 1
        table[i] = slot
        self._home[slot] = home
        self._state[slot] = _FILLING
        self._fills[slot] = (self._fills[slot] + 1) & 0xFFFFFFFF
        keys[slot] = key
        self._filling += 1
        return slot

    def commit(self, slot: int, checksum: int | None = None) -> None:
        """The fill of ``slot`` completed: its key becomes ready and the most recently used.

        ``checksum`` is the chunk's end-to-end checksum (:mod:`kvrpc.kv.integrity`), kept
        with it until the slot is freed; None when it was stored without one.
        """
        self._check_state(slot, _FILLING, "commit")
        if checksum is None:
            self._summed[slot] = 0
        else:
            self._sums[slot] = checksum
            self._summed[slot] = 1
        self._state[slot] = _READY
        self._filling -= 1
        self._link_mru(slot)

    def abort(self, slot: int) -> None:
        """The fill of ``slot`` failed: the slot becomes free and its key is forgotten."""
        self._check_state(slot, _FILLING, "abort")
        self._filling -= 1
        self._free_slot(slot)

    # ------------------------------------------------------------------ pins

    def pin(self, slot: int) -> None:
        """Add a pin to a ready slot; a slot with pins is never evicted nor removed."""
        self._check_state(slot, _READY, "pin")
        if self._pins[slot] == 0:
            self._unlink(slot)
            self._pinned += 1
        self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        """Take one pin off; the last one puts the slot back as the most recently used.

        Raises ``ValueError`` if the slot has no pin.
        """
        self._check_slot(slot)
        pins = self._pins[slot]
        if pins <= 0:
            raise ValueError(f"ChunkPool.unpin: slot {slot} is not pinned")
        self._pins[slot] = pins - 1
        if pins == 1:
            self._pinned -= 1
            self._link_mru(slot)

    def pin_many(self, slots: Iterable[int]) -> None:
        """:meth:`pin` for each slot in turn: the same checks, without a call per slot.

        A scheduler's lookup pins every matched chunk of every rank (hundreds); this is its
        hot path. On a bad slot it raises with the slots before it pinned.
        """
        num_slots, state, pins = self._num_slots, self._state, self._pins
        prev, nxt = self._prev, self._next
        newly = 0  # counted here and added once: an attribute write per slot costs more
        try:
            for slot in slots:
                if not 0 <= slot < num_slots or state[slot] != _READY:
                    self._check_state(slot, _READY, "pin_many")
                count = pins[slot]
                if not count:
                    before = prev[slot]
                    after = nxt[slot]
                    nxt[before] = after
                    prev[after] = before
                    newly += 1
                pins[slot] = count + 1
        finally:
            self._pinned += newly

    def unpin_many(self, slots: Iterable[int]) -> None:
        """:meth:`unpin` for each slot in turn; raises on a slot with no pin.

        Slots whose last pin goes become the most recently used in the order given, as
        with :meth:`unpin` one by one; the slots before a bad one stay unpinned.
        """
        num_slots, pins = self._num_slots, self._pins
        prev, nxt = self._prev, self._next
        # The released slots are chained after the most recently used one as they come, and
        # the chain is closed onto the sentinel once, at the end: two writes a slot, not four.
        last = prev[num_slots]
        released = 0
        try:
            for slot in slots:
                if not 0 <= slot < num_slots:
                    self._check_slot(slot)
                count = pins[slot]
                if count <= 0:
                    raise ValueError(f"ChunkPool.unpin_many: slot {slot} is not pinned")
                pins[slot] = count - 1
                if count == 1:
                    prev[slot] = last
                    nxt[last] = slot
                    last = slot
                    released += 1
        finally:
            nxt[last] = num_slots
            prev[num_slots] = last
            self._pinned -= released

    def fill(self, slot: int) -> int:
        """Which fill of ``slot`` this is: a number that changes whenever it is reserved.

        Read it while the fill is in progress (or once it is committed) and pass it to
        :meth:`add_checksum`, which then knows whether the slot still holds that fill.
        """
        self._check_slot(slot)
        return self._fills[slot]

    def add_checksum(self, slot: int, fill: int, checksum: int) -> bool:
        """Give a chunk committed without a checksum the one computed since; True if taken.

        Taken only while ``slot`` is ready, still holds fill ``fill`` (:meth:`fill`) and has
        no checksum: a slot freed, evicted or filled again since keeps what it has.
        """
        self._check_slot(slot)
        if self._state[slot] != _READY or self._fills[slot] != fill or self._summed[slot]:
            return False
        self._sums[slot] = checksum
        self._summed[slot] = 1
        return True

    def checksum(self, slot: int) -> int | None:
        """The checksum committed with a ready slot's chunk; None if it has none."""
        self._check_state(slot, _READY, "checksum")
        return self._sums[slot] if self._summed[slot] else None

    def pins(self, slot: int) -> int:
        """The pin count of ``slot`` (0 for free and filling slots)."""
        self._check_slot(slot)
        return self._pins[slot]

    # ------------------------------------------------------------------ dropping chunks

    def remove(self, key: bytes) -> bool:
        """Free ``key``'s slot if it is ready and unpinned; False if pinned, filling or absent."""
        slot = self.lookup(key)
        if slot is None or self._pins[slot]:
            return False
        self._unlink(slot)
        self._free_slot(slot)
        return True

    def clear(self, freed_keys: list[bytes] | None = None) -> int:
        """Free every ready, unpinned slot and return how many; pinned and filling ones stay.

        The keys of the freed chunks are appended to ``freed_keys`` if given (for the
        server's events), in least recently used order.
        """
        sentinel = self._num_slots
        nxt = self._next
        freed = 0
        slot = nxt[sentinel]
        while slot != sentinel:
            following = nxt[slot]
            if freed_keys is not None:
                key = self._keys[slot]
                assert key is not None  # a slot in the LRU list is ready
                freed_keys.append(key)
            self._free_slot(slot)
            slot = following
            freed += 1
        nxt[sentinel] = sentinel
        self._prev[sentinel] = sentinel
        return freed

    # ------------------------------------------------------------------ internals

    def _free_slot(self, slot: int) -> None:
        # The caller has taken the slot out of the LRU list (or it never was in it).
        self._forget(slot)
        self._keys[slot] = None
        self._state[slot] = _FREE
        self._free[self._free_count] = slot
        self._free_count += 1

    def _forget(self, slot: int) -> None:
        # Take `slot` out of the hash table, then close the gap by moving later entries of the
        # probe run back (backward-shift deletion), so that no tombstones pile up and every
        # probe still ends at the first empty place.
        table = self._table
        home = self._home
        mask = self._mask
        hole = home[slot]
        while table[hole] != slot:
            hole = (hole + 1) & mask
        j = hole
        while True:
            j = (j + 1) & mask
            moved = table[j]
            if moved < 0:
                break
            # The entry at j may fill the hole if the hole lies on its probe path [home, j).
            if (j - home[moved]) & mask >= (j - hole) & mask:
                table[hole] = moved
                hole = j
        table[hole] = -1

    def _unlink(self, slot: int) -> None:
        prev = self._prev
        nxt = self._next
        before = prev[slot]
        after = nxt[slot]
        nxt[before] = after
        prev[after] = before

    def _link_mru(self, slot: int) -> None:
        sentinel = self._num_slots
        prev = self._prev
        last = prev[sentinel]
        prev[slot] = last
        self._next[slot] = sentinel
        self._next[last] = slot
        prev[sentinel] = slot

    def _check_slot(self, slot: int) -> None:
        # Arrays accept negative indices, so a bad slot would silently hit another slot.
        if not 0 <= slot < self._num_slots:
            raise ValueError(f"ChunkPool: slot {slot!r} is not in range(0, {self._num_slots})")

    def _check_state(self, slot: int, expected: int, method: str) -> None:
        self._check_slot(slot)
        state = self._state[slot]
        if state != expected:
            raise ValueError(
                f"ChunkPool.{method}: slot {slot} is {_NAMES[state]}, not {_NAMES[expected]}"
            )


def _slot_count(capacity_bytes: int, slot_nbytes: int) -> int:
    """``capacity_bytes // slot_nbytes``, refused unless it is 1 to ``_MAX_SLOTS`` slots."""
    if slot_nbytes <= 0:
        raise KVConfigError(f"ChunkPool: slot_nbytes={slot_nbytes!r} must be positive")
    if capacity_bytes < 0:
        raise KVConfigError(f"ChunkPool: capacity_bytes={capacity_bytes!r} is negative")
    num_slots = capacity_bytes // slot_nbytes
    if num_slots == 0:
        raise KVConfigError(
            f"ChunkPool: the capacity of {capacity_bytes} bytes is smaller than one chunk "
            f"of {slot_nbytes} bytes; raise --cpu-buffer-size to at least {slot_nbytes} "
            "bytes (or use a smaller chunk size)"
        )
    if num_slots > _MAX_SLOTS:
        raise KVConfigError(
            f"ChunkPool: {capacity_bytes} bytes in chunks of {slot_nbytes} bytes makes "
            f"{num_slots} slots, more than the {_MAX_SLOTS} a pool can index; use a larger "
            "chunk size or a smaller --cpu-buffer-size"
        )
    return num_slots


def _host_buffer(owner: object, nbytes: int, pin_memory: bool) -> Any:
    """A 1-D uint8 host tensor of ``nbytes``, page-locked while ``owner`` lives if asked."""
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if pin_memory:
        _pin_host_memory(buffer)
        # The finalizer holds the buffer, so the pages are unregistered before they can be
        # freed; at interpreter exit the process's end releases them anyway.
        weakref.finalize(owner, _unpin_host_memory, buffer).atexit = False
    return buffer


def _pin_host_memory(buffer: Any) -> None:
    nbytes = buffer.numel()
    cudart = cast(Any, torch.cuda).cudart()
    try:
        torch.cuda.check_error(
            cudart.cudaHostRegister(buffer.data_ptr(), nbytes, _CUDA_HOST_REGISTER_PORTABLE)
        )
    except RuntimeError as exc:
        raise KVConfigError(
            f"ChunkPool: could not pin {nbytes} bytes of host memory ({exc}); lower "
            "--cpu-buffer-size, or raise the locked-memory limit (ulimit -l) of the server"
        ) from exc


def _unpin_host_memory(buffer: Any) -> None:
    cast(Any, torch.cuda).cudart().cudaHostUnregister(buffer.data_ptr())
