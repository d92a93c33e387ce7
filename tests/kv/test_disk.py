"""DiskTier: chunk files under a byte limit, found again after a restart, failing quietly."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvrpc.errors import KVConfigError, KVError
from kvrpc.kv import integrity
from kvrpc.kv.server.tiers import LowerTier, disk
from kvrpc.kv.server.tiers.disk import DiskTier

N = 4096  # bytes per chunk in these tests

MakeTier = Callable[..., DiskTier]


def key(i: int) -> bytes:
    return i.to_bytes(32, "big") + b"\x00\x01\x00\x02"


def chunk(i: int, n: int = N) -> torch.Tensor:
    generator = torch.Generator().manual_seed(i)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator)


async def loaded(tier: DiskTier, k: bytes, n: int = N) -> torch.Tensor | None:
    out = torch.zeros(n, dtype=torch.uint8)
    return out if await tier.load(k, out) is not None else None


@pytest.fixture
async def make_tier() -> AsyncIterator[MakeTier]:
    made: list[DiskTier] = []

    def make(directory: Path, capacity: int = 1 << 20, **options: Any) -> DiskTier:
        tier = DiskTier(directory, capacity, **options)
        made.append(tier)
        return tier

    yield make
    for tier in made:
        await tier.aclose()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Hold every chunk write in its thread: (entered, release)."""
    entered, release = threading.Event(), threading.Event()
    real = disk._write_file

    def held(directory: str, path: str, data: torch.Tensor, checksum: int | None) -> None:
        entered.set()
        release.wait(10)
        real(directory, path, data, checksum)

    monkeypatch.setattr(disk, "_write_file", held)
    yield entered, release
    release.set()


async def test_disk_tier_is_a_lower_tier(tmp_path: Path, make_tier: MakeTier) -> None:
    assert isinstance(make_tier(tmp_path), LowerTier)


async def test_saved_chunk_loads_back_byte_for_byte(tmp_path: Path, make_tier: MakeTier) -> None:
    tier = make_tier(tmp_path)
    await tier.save(key(1), chunk(1))
    out = await loaded(tier, key(1))
    assert out is not None
    assert torch.equal(out, chunk(1))
    assert tier.stats() == {
        "files": 1,
        "bytes": N,
        "capacity": 1 << 20,
        "saves": 1,
        "loads": 1,
        "save_bytes": N,
        "load_bytes": N,
        "evictions": 0,
        "errors": 0,
        "corrupt": 0,
        "refused": 0,
    }


async def test_each_chunk_is_one_file_named_by_its_key_in_hex(
    tmp_path: Path, make_tier: MakeTier
) -> None:
    tier = make_tier(tmp_path)
    await tier.save(key(1), chunk(1))
    await tier.save(key(2), chunk(2))
    assert sorted(os.listdir(tmp_path)) == sorted([key(1).hex(), key(2).hex()])
    raw = (tmp_path / key(2).hex()).read_bytes()
    assert raw[:N] == bytes(chunk(2).tolist())  # then the trailer with its checksum
    assert raw[N : N + 4] == b"KVRS"
    assert int.from_bytes(raw[-8:], "little") == integrity.checksum(chunk(2))


async def test_load_of_an_absent_key_returns_false_and_leaves_out_alone(
    tmp_path: Path, make_tier: MakeTier
) -> None:
    tier = make_tier(tmp_path)
    await tier.save(key(1), chunk(1))
    out = torch.full((N,), 7, dtype=torch.uint8)
    assert await tier.load(key(2), out) is None
    assert bool((out == 7).all())
    assert not tier.contains(key(2))


async def test_directory_is_created_readable_by_its_owner_only(
    tmp_path: Path, make_tier: MakeTier
) -> None:
    directory = tmp_path / "a" / "kv"
    make_tier(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


async def test_contains_turns_true_only_when_the_save_has_completed(
    tmp_path: Path, make_tier: MakeTier, gate: tuple[threading.Event, threading.Event]
) -> None:
    entered, release = gate
    tier = make_tier(tmp_path)
    saving = asyncio.create_task(tier.save(key(1), chunk(1)))
    assert await asyncio.to_thread(entered.wait, 10)
    assert not tier.contains(key(1))
    await tier.save(key(1), chunk(1))  # the same key while its write is in flight: skipped
    release.set()
    await saving
    assert tier.contains(key(1))
    assert tier.stats()["saves"] == 1


async def test_capacity_evicts_least_recently_used_files_and_loading_refreshes_recency(
    tmp_path: Path, make_tier: MakeTier
) -> None:
    tier = make_tier(tmp_path, capacity=3 * N)
    for i in (1, 2, 3):
        await tier.save(key(i), chunk(i))
    assert await loaded(tier, key(1)) is not None  # now 2 is the least recently used
    await tier.save(key(4), chunk(4))
    assert [tier.contains(key(i)) for i in (1, 2, 3, 4)] == [True, False, True, True]
    assert not (tmp_path / key(2).hex()).exists()
    await tier.save(key(5), chunk(5))
    assert not tier.contains(key(3))
    stats = tier.stats()
    assert (stats["files"], stats["bytes"], stats["evictions"]) == (3, 3 * N, 2)
    assert len(os.listdir(tmp_path)) == 3


async def test_a_chunk_larger_than_the_capacity_is_refused_without_raising(
    tmp_path: Path, make_tier: MakeTier
) -> None:
    tier = make_tier(tmp_path, capacity=N)
    await tier.save(key(1), chunk(1))
    await tier.save(key(2), chunk(2, N + 1))
    assert tier.contains(key(1))
    assert not tier.contains(key(2))
    assert tier.stats()["refused"] == 1
    assert os.listdir(tmp_path) == [key(1).hex()]


async def test_a_new_tier_on_the_same_directory_finds_the_saved_chunks(
    tmp_path: Path, make_tier: MakeTier
) -> None:
    first = make_tier(tmp_path)
    await first.save(key(1), chunk(1))
    await first.save(key(2), chunk(2, 2 * N))
    await first.aclose()
    (tmp_path / "notes.txt").write_text("not a chunk")
    (tmp_path / "ABCD").write_bytes(b"uppercase is not a name this tier writes")

    second = make_tier(tmp_path)
    assert second.contains(key(1))
    assert second.contains(key(2))
    assert (second.stats()["files"], second.stats()["bytes"]) == (2, 3 * N)
    out = await loaded(second, key(2), 2 * N)
    assert out is not None
    assert torch.equal(out, chunk(2, 2 * N))


async def test_a_restart_with_a_smaller_capacity_deletes_the_oldest_files(
    tmp_path: Path, make_tier: MakeTier
) -> None:
    first = make_tier(tmp_path)
    for i in (1, 2, 3):
        await first.save(key(i), chunk(i))
    await first.aclose()
    for age, i in enumerate((2, 3, 1)):  # 2 is the oldest file, 1 the newest
        os.utime(tmp_path / key(i).hex(), ns=(10**18 + age, 10**18 + age))

    second = make_tier(tmp_path, capacity=2 * N)
    assert [second.contains(key(i)) for i in (1, 2, 3)] == [True, False, True]
    assert not (tmp_path / key(2).hex()).exists()
    assert second.stats()["evictions"] == 1


async def test_no_temporary_files_are_left_behind_and_stale_ones_are_removed_at_start(
    tmp_path: Path, make_tier: MakeTier
) -> None:
    (tmp_path / ".kvrpc-crashed.tmp").write_bytes(b"half a chunk")
    tier = make_tier(tmp_path, capacity=2 * N, io_workers=4)
    assert os.listdir(tmp_path) == []
    await asyncio.gather(*(tier.save(key(i), chunk(i)) for i in range(6)))
    await tier.aclose()
    names = os.listdir(tmp_path)
    assert len(names) == tier.stats()["files"] >= 1
    assert all(bytes.fromhex(name) in {key(i) for i in range(6)} for name in names)


async def test_a_failing_save_is_counted_as_an_error_and_does_not_raise(
    tmp_path: Path, make_tier: MakeTier
) -> None:
    tier = make_tier(tmp_path)
    # A directory where the chunk file should go: the rename fails, even for root.
    (tmp_path / key(1).hex()).mkdir()
    await tier.save(key(1), chunk(1))
    assert not tier.contains(key(1))
    assert tier.stats()["errors"] == 1
    assert tier.stats()["saves"] == 0
    assert os.listdir(tmp_path) == [key(1).hex()]  # its temporary file was removed

    await tier.save(key(2), chunk(2))  # the tier keeps working
    assert tier.contains(key(2))


async def test_saves_fail_quietly_when_the_directory_is_gone(
    tmp_path: Path, make_tier: MakeTier
) -> None:
    directory = tmp_path / "kv"
    tier = make_tier(directory)
    directory.rmdir()
    directory.write_bytes(b"")  # writes under a regular file fail even for root
    await tier.save(key(1), chunk(1))
    assert not tier.contains(key(1))
    assert tier.stats()["errors"] == 1


def test_a_directory_that_cannot_be_created_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(KVConfigError, match="directory"):
        DiskTier(tmp_path / "file" / "kv", 1 << 20)


def test_sizes_that_are_not_positive_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(KVConfigError):
        DiskTier(tmp_path, 0)
    with pytest.raises(KVConfigError):
        DiskTier(tmp_path, 1 << 20, io_workers=0)


async def test_a_save_of_a_tensor_that_is_not_1d_uint8_is_counted_as_an_error(
    tmp_path: Path, make_tier: MakeTier
) -> None:
    tier = make_tier(tmp_path)
    await tier.save(key(1), torch.zeros(4, dtype=torch.float32))
    assert not tier.contains(key(1))
    assert tier.stats()["errors"] == 1


async def test_a_load_into_a_tensor_of_another_size_returns_false_and_drops_the_file(
    tmp_path: Path, make_tier: MakeTier
) -> None:
    tier = make_tier(tmp_path)
    await tier.save(key(1), chunk(1))
    assert await loaded(tier, key(1), N + 1) is None
    assert not tier.contains(key(1))
    assert not (tmp_path / key(1).hex()).exists()
    assert tier.stats()["files"] == 0
    assert tier.stats()["bytes"] == 0


async def test_a_file_truncated_behind_the_tiers_back_is_not_loaded_and_is_dropped(
    tmp_path: Path, make_tier: MakeTier
) -> None:
    tier = make_tier(tmp_path)
    await tier.save(key(1), chunk(1))
    os.truncate(tmp_path / key(1).hex(), N // 2)
    assert await loaded(tier, key(1)) is None
    assert not tier.contains(key(1))
    assert tier.stats()["corrupt"] == 1


async def test_a_file_deleted_behind_the_tiers_back_is_not_loaded_and_is_dropped(
    tmp_path: Path, make_tier: MakeTier
) -> None:
    tier = make_tier(tmp_path)
    await tier.save(key(1), chunk(1))
    os.unlink(tmp_path / key(1).hex())
    assert await loaded(tier, key(1)) is None
    assert not tier.contains(key(1))


async def test_load_fills_a_non_contiguous_tensor(tmp_path: Path, make_tier: MakeTier) -> None:
    tier = make_tier(tmp_path)
    await tier.save(key(1), chunk(1))
    backing = torch.zeros(2 * N, dtype=torch.uint8)
    assert await tier.load(key(1), backing[::2])
    assert torch.equal(backing[::2], chunk(1))
    assert bool((backing[1::2] == 0).all())


async def test_load_into_a_tensor_that_is_not_1d_uint8_raises(
    tmp_path: Path, make_tier: MakeTier
) -> None:
    tier = make_tier(tmp_path)
    await tier.save(key(1), chunk(1))
    with pytest.raises(KVError, match="uint8"):
        await tier.load(key(1), torch.zeros(N, dtype=torch.int16))


async def test_a_cancelled_save_returns_only_after_its_thread_is_done_with_the_data(
    tmp_path: Path, make_tier: MakeTier, gate: tuple[threading.Event, threading.Event]
) -> None:
    entered, release = gate
    tier = make_tier(tmp_path)
    saving = asyncio.create_task(tier.save(key(1), chunk(1)))
    assert await asyncio.to_thread(entered.wait, 10)
    saving.cancel()
    await asyncio.sleep(0.05)
    assert not saving.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await saving


async def test_after_aclose_saves_do_nothing_and_loads_return_false(
    tmp_path: Path, make_tier: MakeTier
) -> None:
    tier = make_tier(tmp_path)
    await tier.save(key(1), chunk(1))
    await tier.aclose()
    await tier.aclose()
    await tier.save(key(2), chunk(2))
    assert not tier.contains(key(2))
    assert await loaded(tier, key(1)) is None


# ---------------------------------------------------------------------- end-to-end checksums


async def test_a_load_returns_the_checksum_saved_with_the_chunk(
    tmp_path: Path, make_tier: MakeTier
) -> None:
    tier = make_tier(tmp_path)
    await tier.save(key(1), chunk(1), integrity.checksum(chunk(1)))
    await tier.save(key(2), chunk(2))  # none given: the tier computes it
    for i in (1, 2):
        out = torch.zeros(N, dtype=torch.uint8)
        assert await tier.load(key(i), out) == integrity.checksum(chunk(i))
        assert torch.equal(out, chunk(i))
    size = (tmp_path / key(1).hex()).stat().st_size
    assert size == N + disk.TRAILER_SIZE


@pytest.mark.parametrize("offset", [0, 1, N // 2, N - 1, N + disk.TRAILER_SIZE - 1])
async def test_every_corrupt_byte_planted_in_a_file_is_a_miss_counted_and_deleted(
    tmp_path: Path, make_tier: MakeTier, offset: int
) -> None:
    tier = make_tier(tmp_path)
    for i in (1, 2):
        await tier.save(key(i), chunk(i), integrity.checksum(chunk(i)))
    path = tmp_path / key(1).hex()
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10  # in the chunk's bytes, or in the checksum the trailer holds
    path.write_bytes(bytes(raw))

    assert await loaded(tier, key(1)) is None
    assert not tier.contains(key(1))
    assert not path.exists()
    assert tier.stats()["corrupt"] == 1
    assert tier.stats()["files"] == 1
    out = await loaded(tier, key(2))  # the good one still loads
    assert out is not None
    assert torch.equal(out, chunk(2))


async def test_a_file_with_a_checksum_of_other_bytes_is_a_miss(
    tmp_path: Path, make_tier: MakeTier
) -> None:
    tier = make_tier(tmp_path)
    await tier.save(key(1), chunk(1), integrity.checksum(chunk(2)))  # a wrong one
    assert await loaded(tier, key(1)) is None
    assert tier.stats()["corrupt"] == 1


async def test_a_file_without_this_formats_trailer_is_a_miss_and_deleted(
    tmp_path: Path, make_tier: MakeTier
) -> None:
    # An earlier format (the bytes alone) and a trailer whose magic is not this format's.
    (tmp_path / key(1).hex()).write_bytes(bytes(chunk(1).tolist()))
    wrong = bytes(chunk(2).tolist()) + b"XXXX" + bytes(disk.TRAILER_SIZE - 4)
    (tmp_path / key(2).hex()).write_bytes(wrong)
    tier = make_tier(tmp_path)
    for i in (1, 2):
        assert tier.contains(key(i))
        assert await loaded(tier, key(i)) is None
        assert not (tmp_path / key(i).hex()).exists()
    assert tier.stats()["corrupt"] == 2
