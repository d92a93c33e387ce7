"""A disk tier that fills up and whose files are damaged behind its back.

The tier holds fewer chunks than are stored (``--disk-size``), so it is always full and evicts;
then every file in it is truncated, or removed. The server goes on serving: a damaged file is
a miss, counted (``tier_errors``) and dropped, never bytes handed to an engine, and the prompt
is stored again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from kvrpc.testing.serve import ServeProcess

from .conftest import scaled, wait_until
from .engines import SLOT, Engine, server_options
from .test_eviction import CHUNKS, PROMPTS, run_rounds

pytestmark = pytest.mark.faults

L1_SLOTS = 8
DISK_CHUNKS = 12


@pytest.mark.parametrize("damage", ["truncated", "removed"])
def test_a_full_disk_tier_with_damaged_files_serves_on_and_counts_each_bad_read_as_a_miss(
    serve: Callable[..., ServeProcess], tmp_path: Path, damage: str
) -> None:
    disk = tmp_path / "disk"
    server = serve(
        "unix",
        *server_options(L1_SLOTS, 10.0),
        "--disk-dir", str(disk),
        "--disk-size", repr(DISK_CHUNKS * SLOT / 2**30),
    )  # fmt: skip
    engines = [Engine(server.url, "disk"), Engine(server.url, "disk")]
    try:
        for round_ in range(scaled(1)):
            for seed in range(PROMPTS):  # distinct prompts, all stored: the tier fills up
                result = engines[seed % 2].round(
                    f"fill{round_}-{seed}", 1000 * round_ + seed, CHUNKS
                )
                assert result[0] == "stored" or result[2] == 0
            stats = wait_until(
                server.stats,
                lambda s: s["tier_saves"] + s["tier_refused"] + s["tier_errors"] >= s["stores"],
                "every stored chunk written through to disk",
            )
            assert stats["tier_evictions"] > 0, "the tier never filled up"
            assert stats["tier_bytes"] <= stats["tier_capacity"]
            files = [f for f in disk.rglob("*") if f.is_file()]
            assert files
            for f in files:
                if damage == "truncated":
                    os.truncate(f, f.stat().st_size // 2)
                else:
                    f.unlink()
            # A truncated file fails its checksum (counted as corrupt); a removed one fails
            # the read itself (counted as an error): either is a damaged read, and a miss.
            errors = stats["tier_errors"] + stats["tier_corrupt"]
            tallies = run_rounds(engines, PROMPTS, PROMPTS)  # every engine asks for them again
            tallies += [
                tuple(r[1:])
                for seed in range(PROMPTS)
                if (r := engines[0].round(f"again{round_}-{seed}", 1000 * round_ + seed, CHUNKS))[0]
                == "retrieved"
            ]
            assert all(t[1] == 0 for t in tallies), f"corrupted chunks: {tallies}"
            stats = server.stats()
            assert stats["tier_errors"] + stats["tier_corrupt"] > errors, "no damaged read counted"
            assert stats["tier_loads"] + stats["hits"] > 0
            # Write-through saves of the last stores pin their slots until written.
            wait_until(server.stats, lambda s: s["pinned_chunks"] == 0, "every pin released")
    finally:
        for engine in engines:
            engine.close()
