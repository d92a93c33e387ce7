"""Four engine processes storing and retrieving one model's prompts through a small L1.

The prompts hold far more chunks than L1 has slots, so chunks are evicted all the time, while
other processes look them up, pin and retrieve them. Every retrieved byte is checked: a chunk
may be missed, never corrupted.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import pytest

from kvrpc.testing.serve import ServeProcess

from .conftest import scaled
from .engines import Engine, server_options

pytestmark = pytest.mark.faults

ENGINES = 4
PROMPTS = 16
CHUNKS = 3  # per prompt: 48 chunks through 12 slots
SLOTS = 12


def run_rounds(
    engines: list[Engine], rounds: int, prompts: int, first: int = 0
) -> list[tuple[int, int, int]]:
    """Each engine runs ``rounds`` of prompts ``first..first+prompts-1`` picked at random, all
    at once; per engine, the retrieved chunks (good, corrupt, missed)."""
    tallies = [[0, 0, 0] for _ in engines]
    failures: list[BaseException] = []

    def run(index: int) -> None:
        chooser = random.Random(index)
        try:
            for n in range(rounds):
                result = engines[index].round(
                    f"e{index}-{n}", first + chooser.randrange(prompts), CHUNKS
                )
                if result[0] == "retrieved":
                    for i in range(3):
                        tallies[index][i] += result[1 + i]
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(engines))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return [(good, corrupt, missed) for good, corrupt, missed in tallies]


def test_four_engines_under_eviction_never_get_a_corrupted_chunk(
    serve: Callable[..., ServeProcess],
) -> None:
    server = serve("unix", *server_options(SLOTS, 10.0))
    engines = [Engine(server.url, "shared") for _ in range(ENGINES)]
    try:
        tallies = run_rounds(engines, scaled(40), PROMPTS)
    finally:
        for engine in engines:
            engine.close()
    good = sum(t[0] for t in tallies)
    assert [t[1] for t in tallies] == [0] * ENGINES, f"corrupted chunks: {tallies}"
    assert good > 0, "no retrieve hit: the campaign checked nothing"
    stats = server.stats()
    print(f"under eviction: {good} chunks intact, {sum(t[2] for t in tallies)} missed, 0 corrupt")
    assert stats["evictions"] > 0, "nothing was evicted: the campaign had no pressure"
    assert stats["pinned_chunks"] == 0 and stats["sessions"] == 0
