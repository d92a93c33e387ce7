"""End-to-end integrity on live servers: checksums through L1 and the disk, and
``--verify-retrieves``.

The tiers' own checks (a corrupt file or Redis value, byte by byte) are in ``test_disk.py``
and ``test_redis_tier.py``; the checksum function's properties in ``test_integrity.py``.
Here a whole server: what a store puts in L1, what a corrupt file on disk does to a lookup,
and what a retrieve answers when L1's copy of a chunk has gone bad in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvrpc.kv import LoadStoreOp, WorkerAdapter, hashes_from_tokens, integrity
from kvrpc.kv.layout import KVLayout, gather_chunks
from kvrpc.kv.outcomes import KeyStatus
from kvrpc.kv.server.tiers import disk

from .conftest import (
    BLOCK,
    CHUNK,
    MODEL,
    OK,
    SLOT,
    Keep,
    KVServer,
    RawClient,
    RawWorker,
    blocks,
    chunk_hashes,
    prompt,
    retrieve_all,
    rows,
    same_blocks,
    store_all,
    wait_until,
)

MISMATCH = KeyStatus.CHECKSUM_MISMATCH


def slot_of(kv_server: KVServer, worker: RawWorker, chunk_hash: bytes) -> int | None:
    """The L1 slot holding the worker's chunk ``chunk_hash`` (None: not there)."""
    service = kv_server.service
    suffix = service.state.instances[worker.instance].suffix
    assert service.pool is not None
    return service.pool.lookup(chunk_hash + suffix)


def blocks_checksum(layers: list[torch.Tensor], first_block: int) -> int:
    """The checksum of the chunk whose blocks start at ``first_block``, read from ``layers``."""
    layout = KVLayout.from_tensors(layers)
    out = torch.empty(SLOT, dtype=torch.uint8)
    gather_chunks(layers, layout, rows(first_block, 1), [out])
    return integrity.checksum(out)


def corrupt_in_l1(kv_server: KVServer, slot: int) -> None:
    """Flip a bit of a stored chunk in the pool's memory, behind the server's back.

    Safe from the test's thread: no copy touches the slot while the test holds no request
    open (the server only reads it during a retrieve).
    """
    pool = kv_server.service.pool
    assert pool is not None
    pool.slot_view(slot)[SLOT // 3] ^= 0x20


def test_a_stored_chunk_carries_the_checksum_of_its_blocks_in_l1(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    kv_server = start_server()
    raw = opened(RawClient(kv_server.url, world_size=1))
    worker = raw.register(0, kv_cache())
    hashes = chunk_hashes(3, seed=1)
    assert worker.store(hashes, 0) == [OK] * 3
    pool = kv_server.service.pool
    assert pool is not None
    for n, chunk_hash in enumerate(hashes):
        slot = slot_of(kv_server, worker, chunk_hash)
        assert slot is not None
        expected = blocks_checksum(worker.layers, n * 2)
        assert pool.checksum(slot) == expected
        assert integrity.checksum(pool.slot_view(slot)[:SLOT]) == expected


def test_without_checksums_a_chunk_has_none_in_l1_and_the_disk_tier_makes_its_own(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    tmp_path: Path,
) -> None:
    kv_server = start_server(checksums=False, disk_dir=tmp_path)
    raw = opened(RawClient(kv_server.url, world_size=1))
    worker = raw.register(0, kv_cache())
    [chunk_hash] = chunk_hashes(1, seed=2)
    assert worker.store([chunk_hash], 0) == [OK]
    kv_server.wait_stats("the chunk on disk", tier_saves=1, pinned_chunks=0)
    slot = slot_of(kv_server, worker, chunk_hash)
    assert slot is not None and kv_server.service.pool is not None
    assert kv_server.service.pool.checksum(slot) is None
    [name] = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    trailer = name.read_bytes()[-8:]
    assert int.from_bytes(trailer, "little") == blocks_checksum(worker.layers, 0)


def evicted_to_disk(
    kv_server: KVServer, worker: RawWorker, seed: int
) -> tuple[list[bytes], list[bytes]]:
    """Store two chunks, then four others that push them out of a 4-slot L1 onto disk."""
    first, others = chunk_hashes(2, seed), chunk_hashes(4, seed + 1)
    assert worker.store(first, 0) == [OK, OK]
    kv_server.wait_stats("the first chunks on disk", tier_saves=2, pinned_chunks=0)
    assert worker.store(others, 8) == [OK] * 4
    kv_server.wait_stats("the others on disk", tier_saves=6, pinned_chunks=0)
    assert kv_server.stats()["evictions"] == 2
    return first, others


def chunk_file(tmp_path: Path, kv_server: KVServer, worker: RawWorker, h: bytes) -> Path:
    suffix = kv_server.service.state.instances[worker.instance].suffix
    return tmp_path / (h + suffix).hex()


@pytest.mark.parametrize("which", ["first", "second", "both"])
def test_corrupt_chunks_planted_on_disk_are_misses_counted_and_deleted_never_served(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    tmp_path: Path,
    which: str,
) -> None:
    kv_server = start_server(slots=4, disk_dir=tmp_path)
    raw = opened(RawClient(kv_server.url, world_size=1))
    worker = raw.register(0, kv_cache())
    first, _ = evicted_to_disk(kv_server, worker, seed=10)
    bad = {"first": [0], "second": [1], "both": [0, 1]}[which]
    for n in bad:
        path = chunk_file(tmp_path, kv_server, worker, first[n])
        raw_bytes = bytearray(path.read_bytes())
        raw_bytes[100 + n] ^= 0x01
        path.write_bytes(bytes(raw_bytes))

    job = raw.lookup("r", first)
    assert isinstance(job, str)
    count = wait_until(lambda: raw.query(job), lambda got: got is not None, "the prefetch")
    assert count == (1 if which == "second" else 0)  # the leading chunks that loaded good
    stats = kv_server.stats()
    assert stats["tier_corrupt"] == len(bad)
    assert stats["prefetched"] == 2 - len(bad)
    for n in bad:
        assert not chunk_file(tmp_path, kv_server, worker, first[n]).exists()
    statuses = worker.retrieve("r", first, 40)
    for n in range(2):  # a bad chunk is missed, a good one retrieved byte for byte
        assert statuses[n] == (KeyStatus.NOT_IN_CACHE if n in bad else OK)
    good = [n for n in range(2) if n not in bad]
    for n in good:
        assert same_blocks(worker.layers, blocks(2 * n, 1), blocks(40 + 2 * n, 1))


def test_a_chunk_loaded_back_from_disk_keeps_the_checksum_it_was_verified_against(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
    tmp_path: Path,
) -> None:
    kv_server = start_server(slots=4, disk_dir=tmp_path, verify_retrieves=True)
    raw = opened(RawClient(kv_server.url, world_size=1))
    worker = raw.register(0, kv_cache())
    first, _ = evicted_to_disk(kv_server, worker, seed=20)
    job = raw.lookup("r", first)
    assert isinstance(job, str)
    assert wait_until(lambda: raw.query(job), lambda got: got is not None, "the prefetch") == 2
    pool = kv_server.service.pool
    assert pool is not None
    for n, chunk_hash in enumerate(first):
        slot = slot_of(kv_server, worker, chunk_hash)
        assert slot is not None
        assert pool.checksum(slot) == blocks_checksum(worker.layers, 2 * n)
    assert worker.retrieve("r", first, 40) == [OK, OK]  # verified in the blocks too
    assert kv_server.stats()["retrieve_corrupt"] == 0


def test_verify_retrieves_fails_a_chunk_corrupted_in_l1_and_drops_it(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    kv_server = start_server(verify_retrieves=True)
    raw = opened(RawClient(kv_server.url, world_size=1))
    worker = raw.register(0, kv_cache())
    hashes = chunk_hashes(3, seed=30)
    assert worker.store(hashes, 0) == [OK] * 3
    slot = slot_of(kv_server, worker, hashes[1])
    assert slot is not None
    corrupt_in_l1(kv_server, slot)

    assert raw.lookup_count("r", hashes) == 3
    assert worker.retrieve("r", hashes, 20) == [OK, MISMATCH, OK]
    stats = kv_server.stats()
    assert (stats["retrieve_corrupt"], stats["retrieves"]) == (1, 2)
    assert same_blocks(worker.layers, blocks(0, 1), blocks(20, 1))
    assert same_blocks(worker.layers, blocks(4, 1), blocks(24, 1))
    # L1's copy was the bad one: it is gone, so no later lookup or retrieve meets it.
    assert slot_of(kv_server, worker, hashes[1]) is None
    assert raw.probe(hashes) == 1
    assert stats["pinned_chunks"] == 0  # the session's pins went with the retrieve


def test_without_verify_retrieves_the_same_corruption_reaches_the_blocks(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    # What --verify-retrieves is for: L1's bytes are handed over as they are.
    kv_server = start_server()
    raw = opened(RawClient(kv_server.url, world_size=1))
    worker = raw.register(0, kv_cache())
    hashes = chunk_hashes(2, seed=31)
    assert worker.store(hashes, 0) == [OK, OK]
    slot = slot_of(kv_server, worker, hashes[1])
    assert slot is not None
    corrupt_in_l1(kv_server, slot)
    assert worker.retrieve("r", hashes, 20) == [OK, OK]
    assert same_blocks(worker.layers, blocks(0, 1), blocks(20, 1))
    assert not same_blocks(worker.layers, blocks(2, 1), blocks(22, 1))
    assert kv_server.stats()["retrieve_corrupt"] == 0


def test_verify_retrieves_checks_inline_retrieves_and_the_adapter_reports_the_blocks(
    start_server: Callable[..., KVServer],
    kv_cache: Callable[..., list[torch.Tensor]],
    opened: Keep,
) -> None:
    kv_server = start_server(verify_retrieves=True)
    layers = kv_cache()
    worker = opened(WorkerAdapter(kv_server.url, MODEL, 1, 0, BLOCK, transfer_mode="inline"))
    worker.register_kv_caches({f"layer.{i}": t for i, t in enumerate(layers)})
    tokens = prompt(3, seed=32)
    store_all([(worker, layers)], "s", LoadStoreOp(blocks(0, 3), token_ids=tokens))
    service = kv_server.service
    [instance] = service.state.instances.values()
    keys = [h + instance.suffix for h in hashes_from_tokens(tokens, CHUNK)]
    assert service.pool is not None
    slot = service.pool.lookup(keys[2])
    assert slot is not None
    corrupt_in_l1(kv_server, slot)

    retrieve_all([(worker, layers)], "r", LoadStoreOp(blocks(20, 3), token_ids=tokens))
    assert worker.get_block_ids_with_load_errors() == set(blocks(24, 1))
    assert kv_server.stats()["retrieve_corrupt"] == 1
    assert same_blocks(layers, blocks(0, 2), blocks(20, 2))


def test_disk_tier_counts_corrupt_files_in_kv_stats(tmp_path: Path) -> None:
    # The name kv.stats reports: the tier's counter with its prefix.
    tier = disk.DiskTier(tmp_path, 1 << 20)
    assert "corrupt" in tier.stats()
