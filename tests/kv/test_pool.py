"""ChunkPool: the L1 slots of the KV-cache server, their LRU order, pins and fills."""

from __future__ import annotations

import gc
import random
from collections import OrderedDict

import pytest
import torch

from kvrpc.errors import CudaUnavailable, KVConfigError
from kvrpc.kv.server.pool import ChunkPool, Reserve

SLOT = 8


def key(i: int) -> bytes:
    return i.to_bytes(32, "big") + b"ns01"


def stored(pool: ChunkPool, *indices: int) -> list[int]:
    """Reserve and commit key(i) for each i, returning the slots."""
    slots = []
    for i in indices:
        slot = pool.reserve(key(i))
        assert isinstance(slot, int)
        pool.commit(slot)
        slots.append(slot)
    return slots


def evicted_by_filling(pool: ChunkPool, first_new: int, count: int) -> list[bytes]:
    """Store `count` new keys and return, in order, the keys whose slots were evicted."""
    evicted: list[bytes] = []
    pool.on_evict = lambda k, _slot: evicted.append(k)
    stored(pool, *range(first_new, first_new + count))
    pool.on_evict = None
    return evicted


# ---------------------------------------------------------------- construction


def test_pool_has_capacity_floor_divided_by_slot_size_slots() -> None:
    pool = ChunkPool(10 * SLOT + SLOT - 1, SLOT)
    assert pool.num_slots == 10
    assert pool.slot_nbytes == SLOT
    assert pool.capacity_bytes == 10 * SLOT
    assert (pool.free_slots, pool.used_slots, pool.bytes_used, pool.bytes_free) == (
        10,
        0,
        0,
        10 * SLOT,
    )
    assert pool.buffer.dtype == torch.uint8
    assert pool.buffer.numel() == 10 * SLOT


def test_capacity_smaller_than_one_chunk_is_a_config_error_naming_the_option() -> None:
    with pytest.raises(KVConfigError, match=r"smaller than one chunk of 4096 bytes.*--cpu-buffer"):
        ChunkPool(4095, 4096)


def test_nonpositive_slot_size_is_a_config_error() -> None:
    with pytest.raises(KVConfigError, match="slot_nbytes=0"):
        ChunkPool(1024, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinned memory works with CUDA")
def test_pin_memory_without_cuda_says_cuda_is_needed() -> None:
    with pytest.raises(CudaUnavailable, match="pin_memory=True needs a CUDA"):
        ChunkPool(1024, SLOT, pin_memory=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_pool_pins_exactly_its_buffer_until_it_is_dropped() -> None:
    stats_before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    pool = ChunkPool(3 * 2**20 + 5, 2**20, pin_memory=True)
    buffer = pool.buffer
    assert buffer.numel() == 3 * 2**20
    assert buffer.is_pinned() and pool.slot_view(2).is_pinned()
    # Not from torch's caching host allocator, which would round up to 4 MiB and keep it.
    assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) == stats_before
    pool.slot_view(1).fill_(9)
    on_gpu = pool.slot_view(1).to("cuda", non_blocking=True)
    pool.slot_view(2).copy_(on_gpu, non_blocking=True)
    torch.cuda.synchronize()
    assert pool.slot_view(2).tolist() == [9] * 2**20
    del pool
    gc.collect()
    assert not buffer.is_pinned()


def test_slot_views_are_disjoint_uint8_views_of_the_buffer() -> None:
    pool = ChunkPool(4 * SLOT, SLOT)
    for slot in range(4):
        pool.slot_view(slot).fill_(slot + 1)
    view = pool.slot_view(2)
    assert view.dtype == torch.uint8 and view.shape == (SLOT,)
    assert view.data_ptr() == pool.buffer.data_ptr() + 2 * SLOT
    assert pool.buffer.tolist() == [s + 1 for s in range(4) for _ in range(SLOT)]


def test_slot_outside_the_pool_is_refused_not_wrapped_around() -> None:
    pool = ChunkPool(4 * SLOT, SLOT)
    for bad in (-1, 4):
        with pytest.raises(ValueError, match="not in range"):
            pool.slot_view(bad)
        with pytest.raises(ValueError, match="not in range"):
            pool.unpin(bad)


# ---------------------------------------------------------------- LRU order


def test_lru_evicts_least_recently_used_unpinned_slot() -> None:
    pool = ChunkPool(3 * SLOT, SLOT)
    slots = stored(pool, 0, 1, 2)
    assert evicted_by_filling(pool, 10, 2) == [key(0), key(1)]
    assert pool.lookup(key(0)) is None and pool.lookup(key(1)) is None
    assert pool.lookup(key(2)) == slots[2]
    assert pool.evictions == 2


def test_a_fresh_pool_fills_free_slots_before_evicting() -> None:
    pool = ChunkPool(3 * SLOT, SLOT)
    assert sorted(stored(pool, 0, 1, 2)) == [0, 1, 2]
    assert pool.evictions == 0


def test_touch_makes_a_slot_the_most_recently_used() -> None:
    pool = ChunkPool(3 * SLOT, SLOT)
    slots = stored(pool, 0, 1, 2)
    pool.touch(slots[0])
    assert evicted_by_filling(pool, 10, 3) == [key(1), key(2), key(0)]


def test_lookup_does_not_change_the_lru_order() -> None:
    pool = ChunkPool(3 * SLOT, SLOT)
    slots = stored(pool, 0, 1, 2)
    assert pool.lookup(key(0)) == slots[0]
    assert evicted_by_filling(pool, 10, 1) == [key(0)]


def test_evicted_slot_is_reused_for_the_new_key() -> None:
    pool = ChunkPool(2 * SLOT, SLOT)
    slots = stored(pool, 0, 1)
    assert stored(pool, 10) == [slots[0]]
    assert pool.lookup(key(10)) == slots[0]


# ---------------------------------------------------------------- pins


def test_pinned_slots_are_never_evicted() -> None:
    pool = ChunkPool(3 * SLOT, SLOT)
    slots = stored(pool, 0, 1, 2)
    pool.pin(slots[0])
    assert evicted_by_filling(pool, 10, 4) == [key(1), key(2), key(10), key(11)]
    assert pool.lookup(key(0)) == slots[0]
    assert pool.pinned_slots == 1


def test_reserve_is_full_when_every_slot_is_pinned() -> None:
    pool = ChunkPool(2 * SLOT, SLOT)
    for slot in stored(pool, 0, 1):
        pool.pin(slot)
    assert pool.reserve(key(5)) is Reserve.FULL
    assert pool.evictions == 0
    assert pool.lookup(key(5)) is None
    assert pool.reserve(key(5)) is Reserve.FULL  # a refusal leaves no trace of the key


def test_unpin_to_zero_returns_slot_to_lru_at_most_recently_used_end() -> None:
    pool = ChunkPool(3 * SLOT, SLOT)
    slots = stored(pool, 0, 1, 2)
    pool.pin(slots[0])
    pool.unpin(slots[0])
    assert pool.pinned_slots == 0
    assert evicted_by_filling(pool, 10, 3) == [key(1), key(2), key(0)]


def test_pins_are_counted_and_the_slot_stays_pinned_until_the_last_unpin() -> None:
    pool = ChunkPool(2 * SLOT, SLOT)
    slots = stored(pool, 0, 1)
    pool.pin(slots[0])
    pool.pin(slots[0])
    pool.unpin(slots[0])
    assert pool.pins(slots[0]) == 1 and pool.pinned_slots == 1
    assert evicted_by_filling(pool, 10, 2) == [key(1), key(10)]
    pool.unpin(slots[0])
    assert pool.pinned_slots == 0
    assert evicted_by_filling(pool, 20, 1) == [key(11)]


def test_pin_many_and_unpin_many_match_pin_and_unpin_one_by_one() -> None:
    one_by_one, batched = ChunkPool(6 * SLOT, SLOT), ChunkPool(6 * SLOT, SLOT)
    for pool in (one_by_one, batched):
        stored(pool, 0, 1, 2, 3, 4, 5)
    picks = [4, 1, 4, 0]  # a slot twice: two pins
    for slot in picks:
        one_by_one.pin(slot)
    batched.pin_many(picks)
    assert [batched.pins(s) for s in range(6)] == [one_by_one.pins(s) for s in range(6)]
    assert batched.pinned_slots == one_by_one.pinned_slots == 3
    for slot in [0, 4, 1, 4]:
        one_by_one.unpin(slot)
    batched.unpin_many([0, 4, 1, 4])
    assert batched.pinned_slots == 0
    # The same LRU order afterwards: the same keys are evicted, in the same order.
    assert evicted_by_filling(batched, 10, 6) == evicted_by_filling(one_by_one, 10, 6)


def test_pin_many_refuses_a_slot_that_is_not_ready_and_unpin_many_one_not_pinned() -> None:
    pool = ChunkPool(4 * SLOT, SLOT)
    (ready,) = stored(pool, 0)
    filling = pool.reserve(key(1))
    assert isinstance(filling, int)
    with pytest.raises(ValueError, match="filling"):
        pool.pin_many([ready, filling])
    with pytest.raises(ValueError, match="not in range"):
        pool.pin_many([-1])
    with pytest.raises(ValueError, match="not pinned"):
        pool.unpin_many([ready, ready])


def test_a_batch_that_fails_midway_keeps_what_it_did_before_and_the_counts_agree() -> None:
    pool = ChunkPool(6 * SLOT, SLOT)
    slots = stored(pool, 0, 1, 2, 3)
    with pytest.raises(ValueError, match="not in range"):
        pool.pin_many([slots[0], slots[1], 99, slots[2]])
    assert [pool.pins(s) for s in slots] == [1, 1, 0, 0]
    assert pool.pinned_slots == 2
    with pytest.raises(ValueError, match="not pinned"):
        pool.unpin_many([slots[1], slots[3]])
    assert [pool.pins(s) for s in slots] == [1, 0, 0, 0]
    assert pool.pinned_slots == 1
    # slots[1] came back as the most recently used: the other unpinned ones go first, then
    # it, and the pinned slots[0] never does.
    assert evicted_by_filling(pool, 10, 5) == [key(2), key(3), key(1)]
    assert pool.lookup(key(0)) == slots[0]


def test_unpin_many_into_an_empty_lru_links_the_slots_in_the_order_given() -> None:
    pool = ChunkPool(3 * SLOT, SLOT)
    slots = stored(pool, 0, 1, 2)
    pool.pin_many(slots)  # the LRU is empty now
    pool.unpin_many([slots[2], slots[0], slots[1]])
    assert evicted_by_filling(pool, 10, 3) == [key(2), key(0), key(1)]


def test_lookup_run_finds_the_leading_ready_keys_as_lookup_does() -> None:
    pool = ChunkPool(16 * SLOT, SLOT)
    slots = stored(pool, *range(8))
    hashes = [key(i)[:32] for i in range(10)]
    suffix = key(0)[32:]
    assert pool.lookup_run(hashes[:8], suffix) == slots
    assert pool.lookup_run(iter(hashes), suffix) == slots  # stops at the absent key(8)
    assert pool.lookup_run([], suffix) == []
    assert pool.lookup_run(hashes, b"other") == []
    assert pool.reserve(key(3)) is Reserve.EXISTS
    pool.remove(key(3))
    assert pool.lookup_run(hashes, suffix) == slots[:3]
    refill = pool.reserve(key(3))
    assert isinstance(refill, int)
    assert pool.lookup_run(hashes, suffix) == slots[:3]  # a filling key ends the run too
    pool.commit(refill)
    assert pool.lookup_run(hashes[:8], suffix) == [*slots[:3], refill, *slots[4:]]


def test_lookup_run_agrees_with_lookup_in_a_crowded_table() -> None:
    # Many keys in a small table: long probe runs, and keys removed from their middle.
    rng = random.Random(5)
    pool = ChunkPool(64 * SLOT, SLOT)
    stored(pool, *range(64))
    for i in rng.sample(range(64), 20):
        pool.remove(key(i))
    stored(pool, *range(100, 110))
    order = [key(i)[:32] for i in rng.sample([*range(64), *range(100, 110)], 74)]
    suffix = key(0)[32:]
    expected: list[int] = []
    for chunk_hash in order:
        slot = pool.lookup(chunk_hash + suffix)
        if slot is None:
            break
        expected.append(slot)
    assert pool.lookup_run(order, suffix) == expected
    present = [h for h in order if pool.lookup(h + suffix) is not None]
    assert pool.lookup_run(present, suffix) == [pool.lookup(h + suffix) for h in present]


def test_touch_of_a_pinned_slot_keeps_it_out_of_the_lru() -> None:
    pool = ChunkPool(2 * SLOT, SLOT)
    slots = stored(pool, 0, 1)
    pool.pin(slots[0])
    pool.touch(slots[0])
    assert evicted_by_filling(pool, 10, 2) == [key(1), key(10)]


def test_unpin_below_zero_is_a_programming_error() -> None:
    pool = ChunkPool(2 * SLOT, SLOT)
    (slot,) = stored(pool, 0)
    with pytest.raises(ValueError, match="not pinned"):
        pool.unpin(slot)
    pool.pin(slot)
    pool.unpin(slot)
    with pytest.raises(ValueError, match="not pinned"):
        pool.unpin(slot)
    assert pool.pins(slot) == 0


def test_only_ready_slots_can_be_pinned_or_touched() -> None:
    pool = ChunkPool(2 * SLOT, SLOT)
    filling = pool.reserve(key(0))
    assert isinstance(filling, int)
    for method in (pool.pin, pool.touch):
        with pytest.raises(ValueError, match="is filling, not ready"):
            method(filling)
        with pytest.raises(ValueError, match="is free, not ready"):
            method(1 - filling)


# ---------------------------------------------------------------- fills


def test_filling_slot_is_invisible_to_lookup_until_commit() -> None:
    pool = ChunkPool(2 * SLOT, SLOT)
    slot = pool.reserve(key(0))
    assert isinstance(slot, int)
    assert pool.lookup(key(0)) is None
    assert list(pool.keys()) == []
    pool.commit(slot)
    assert pool.lookup(key(0)) == slot
    assert list(pool.keys()) == [key(0)]


def test_filling_slots_are_not_evicted() -> None:
    pool = ChunkPool(2 * SLOT, SLOT)
    filling = pool.reserve(key(0))
    assert isinstance(filling, int)
    stored(pool, 1)
    assert evicted_by_filling(pool, 10, 2) == [key(1), key(10)]
    assert pool.reserve(key(20)) != filling
    assert pool.reserve(key(21)) is Reserve.FULL


def test_reserve_of_a_ready_key_returns_exists() -> None:
    pool = ChunkPool(2 * SLOT, SLOT)
    stored(pool, 0)
    assert pool.reserve(key(0)) is Reserve.EXISTS
    assert pool.used_slots == 1


def test_reserve_of_a_key_being_filled_returns_filling() -> None:
    pool = ChunkPool(2 * SLOT, SLOT)
    pool.reserve(key(0))
    assert pool.reserve(key(0)) is Reserve.FILLING
    assert pool.used_slots == 1


def test_abort_frees_the_slot_and_forgets_the_key() -> None:
    pool = ChunkPool(1 * SLOT, SLOT)
    slot = pool.reserve(key(0))
    assert isinstance(slot, int)
    pool.abort(slot)
    assert (pool.used_slots, pool.free_slots, pool.bytes_used) == (0, 1, 0)
    assert pool.lookup(key(0)) is None
    assert pool.reserve(key(0)) == slot  # can be filled again, from a free slot
    assert pool.evictions == 0


def test_commit_and_abort_need_a_filling_slot() -> None:
    pool = ChunkPool(2 * SLOT, SLOT)
    (ready,) = stored(pool, 0)
    for method in (pool.commit, pool.abort):
        with pytest.raises(ValueError, match="is ready, not filling"):
            method(ready)
        with pytest.raises(ValueError, match="is free, not filling"):
            method(1 - ready)


# ---------------------------------------------------------------- on_evict


def test_on_evict_sees_the_evicted_key_and_its_bytes_before_the_slot_is_reused() -> None:
    pool = ChunkPool(2 * SLOT, SLOT)
    slots = stored(pool, 0, 1)
    pool.slot_view(slots[0]).fill_(7)
    seen: list[tuple[bytes, int, list[int], int | None]] = []

    def copy_out(evicted: bytes, slot: int) -> None:
        seen.append((evicted, slot, pool.slot_view(slot).tolist(), pool.lookup(evicted)))

    pool.on_evict = copy_out
    new = pool.reserve(key(10))
    assert seen == [(key(0), slots[0], [7] * SLOT, slots[0])]
    assert new == slots[0]
    assert pool.lookup(key(0)) is None


def test_on_evict_hook_may_be_given_to_the_constructor() -> None:
    evicted: list[bytes] = []
    pool = ChunkPool(1 * SLOT, SLOT, on_evict=lambda k, _s: evicted.append(k))
    stored(pool, 0, 1)
    assert evicted == [key(0)]


def test_on_evict_error_propagates_and_leaves_the_pool_unchanged() -> None:
    pool = ChunkPool(1 * SLOT, SLOT)
    (slot,) = stored(pool, 0)

    def fail(_key: bytes, _slot: int) -> None:
        raise OSError("lower tier full")

    pool.on_evict = fail
    with pytest.raises(OSError, match="lower tier full"):
        pool.reserve(key(1))
    assert pool.lookup(key(0)) == slot
    assert pool.lookup(key(1)) is None
    assert (pool.evictions, pool.used_slots) == (0, 1)
    pool.on_evict = None
    assert pool.reserve(key(1)) == slot


# ---------------------------------------------------------------- remove and clear


def test_remove_frees_a_ready_unpinned_key_only() -> None:
    pool = ChunkPool(4 * SLOT, SLOT)
    _, pinned = stored(pool, 0, 1)
    pool.pin(pinned)
    pool.reserve(key(2))
    assert pool.remove(key(0)) is True
    assert pool.remove(key(1)) is False
    assert pool.remove(key(2)) is False
    assert pool.remove(key(3)) is False
    assert pool.lookup(key(0)) is None and pool.lookup(key(1)) == pinned
    assert (pool.used_slots, pool.free_slots) == (2, 2)
    stored(pool, 4, 5)
    assert (pool.free_slots, pool.evictions) == (0, 0)


def test_clear_frees_ready_unpinned_slots_and_keeps_pinned_and_filling() -> None:
    pool = ChunkPool(5 * SLOT, SLOT)
    slots = stored(pool, 0, 1, 2)
    pool.pin(slots[1])
    filling = pool.reserve(key(3))
    assert isinstance(filling, int)
    assert pool.clear() == 2
    assert set(pool.keys()) == {key(1)}
    assert pool.reserve(key(3)) is Reserve.FILLING
    assert (pool.used_slots, pool.free_slots, pool.pinned_slots) == (2, 3, 1)
    pool.unpin(slots[1])
    pool.commit(filling)
    assert evicted_by_filling(pool, 10, 4) == [key(1)]  # 3 free slots first, then the LRU


# ---------------------------------------------------------------- model check


class ReferencePool:
    """The pool's contract, written the obvious way: an OrderedDict as the LRU list."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.lru: OrderedDict[bytes, None] = OrderedDict()  # ready, unpinned; LRU first
        self.pins: dict[bytes, int] = {}  # ready and pinned
        self.filling: set[bytes] = set()
        self.evictions = 0

    def used(self) -> int:
        return len(self.lru) + len(self.pins) + len(self.filling)

    def reserve(self, k: bytes) -> tuple[Reserve | None, bytes | None]:
        """What reserve returns (None for a slot) and which key it evicts."""
        if k in self.lru or k in self.pins:
            return Reserve.EXISTS, None
        if k in self.filling:
            return Reserve.FILLING, None
        victim = None
        if self.used() == self.num_slots:
            if not self.lru:
                return Reserve.FULL, None
            victim, _ = self.lru.popitem(last=False)
            self.evictions += 1
        self.filling.add(k)
        return None, victim

    def commit(self, k: bytes) -> None:
        self.filling.remove(k)
        self.lru[k] = None

    def abort(self, k: bytes) -> None:
        self.filling.remove(k)

    def touch(self, k: bytes) -> None:
        if k in self.lru:
            self.lru.move_to_end(k)

    def pin(self, k: bytes) -> None:
        self.lru.pop(k, None)
        self.pins[k] = self.pins.get(k, 0) + 1

    def unpin(self, k: bytes) -> None:
        self.pins[k] -= 1
        if self.pins[k] == 0:
            del self.pins[k]
            self.lru[k] = None

    def remove(self, k: bytes) -> bool:
        return self.lru.pop(k, 0) is None

    def clear(self) -> int:
        freed = len(self.lru)
        self.lru.clear()
        return freed


@pytest.mark.parametrize("seed", range(8))
def test_counters_and_outcomes_match_a_reference_model_over_random_operations(seed: int) -> None:
    rng = random.Random(seed)
    num_slots = rng.randint(1, 6)
    pool = ChunkPool(num_slots * SLOT + rng.randrange(SLOT), SLOT)
    model = ReferencePool(num_slots)
    evicted: list[tuple[bytes, int]] = []
    pool.on_evict = lambda k, s: evicted.append((k, s))
    slot_of: dict[bytes, int] = {}  # every filling or ready key, as the pool placed it
    universe = [key(i) for i in range(3 * num_slots)]

    def ready() -> list[bytes]:
        return [*model.lru, *model.pins]

    for _ in range(600):
        op = rng.choice(["reserve"] * 4 + ["commit"] * 3 + ["abort", "pin", "unpin", "touch"])
        op = op if rng.random() > 0.01 else "clear"
        op = op if rng.random() > 0.05 else "remove"
        if op == "reserve":
            k = rng.choice(universe)
            expected, victim = model.reserve(k)
            got = pool.reserve(k)
            if expected is None:
                assert isinstance(got, int)
                if victim is None:
                    assert evicted == []
                    assert got not in slot_of.values()
                else:
                    assert evicted == [(victim, slot_of.pop(victim))]
                    assert got == evicted[0][1]
                slot_of[k] = got
            else:
                assert got is expected and evicted == []
            evicted.clear()
        elif op in ("commit", "abort") and model.filling:
            k = rng.choice(sorted(model.filling))
            if op == "commit":
                model.commit(k)
                pool.commit(slot_of[k])
            else:
                model.abort(k)
                pool.abort(slot_of.pop(k))
        elif op in ("pin", "touch") and ready():
            k = rng.choice(sorted(ready()))
            if op == "pin":
                model.pin(k)
                pool.pin(slot_of[k])
            else:
                model.touch(k)
                pool.touch(slot_of[k])
        elif op == "unpin" and model.pins:
            k = rng.choice(sorted(model.pins))
            model.unpin(k)
            pool.unpin(slot_of[k])
        elif op == "remove":
            k = rng.choice(universe)
            removed = model.remove(k)
            assert pool.remove(k) is removed
            if removed:
                del slot_of[k]
        elif op == "clear":
            gone = list(model.lru)
            assert pool.clear() == model.clear()
            for k in gone:
                del slot_of[k]

        for k in universe:
            found = pool.lookup(k)
            assert found == (slot_of[k] if k in model.lru or k in model.pins else None)
        assert set(pool.keys()) == set(ready())
        assert pool.used_slots == model.used() == len(slot_of)
        assert pool.ready_slots == len(ready())
        assert pool.free_slots == num_slots - model.used()
        assert pool.pinned_slots == len(model.pins)
        assert pool.evictions == model.evictions
        assert pool.bytes_used == model.used() * SLOT
        assert pool.bytes_used + pool.bytes_free == pool.capacity_bytes
        for k, n in model.pins.items():
            assert pool.pins(slot_of[k]) == n


# ---------------------------------------------------------------- checksums added later


def test_a_checksum_added_after_the_commit_is_kept_while_the_slot_holds_that_fill() -> None:
    pool = ChunkPool(4 * SLOT, SLOT)
    slot = pool.reserve(key(1))
    assert isinstance(slot, int)
    fill = pool.fill(slot)
    pool.commit(slot)  # committed without one
    assert pool.checksum(slot) is None
    assert pool.add_checksum(slot, fill, 0xABC) is True
    assert pool.checksum(slot) == 0xABC
    assert pool.add_checksum(slot, fill, 0xDEF) is False  # one it has is never replaced
    assert pool.checksum(slot) == 0xABC


def test_a_checksum_is_never_added_to_a_slot_filled_again_freed_or_still_filling() -> None:
    pool = ChunkPool(SLOT, SLOT)  # one slot: every new key takes it again
    (slot,) = stored(pool, 1)
    first = pool.fill(slot)
    (again,) = stored(pool, 2)  # evicts key 1, same slot, another fill
    assert again == slot and pool.fill(slot) != first
    assert pool.add_checksum(slot, first, 7) is False
    assert pool.checksum(slot) is None
    pool.clear()
    assert pool.add_checksum(slot, pool.fill(slot), 7) is False  # free
    filling = pool.reserve(key(3))
    assert filling == slot
    assert pool.add_checksum(slot, pool.fill(slot), 7) is False  # not committed yet
    pool.commit(slot)
    assert pool.add_checksum(slot, pool.fill(slot), 7) is True
