"""The loop-lag probe: how late a loop runs callbacks, and the garbage collections meanwhile."""

from __future__ import annotations

import asyncio
import gc
import time

from kvrpc.loopwatch import LoopLagProbe


async def test_a_loop_kept_busy_shows_the_stall_in_its_lag_samples() -> None:
    probe = LoopLagProbe(asyncio.get_running_loop()).start()
    try:
        await asyncio.sleep(0.02)
        probe.take()  # start a new sample
        await asyncio.sleep(0.005)  # let a probe callback get queued
        time.sleep(0.05)  # noqa: ASYNC251 (on purpose: the loop is busy, its callbacks wait)
        await asyncio.sleep(0.01)
        figures = probe.take()
    finally:
        probe.stop()
    assert figures["loop_lag_samples"] > 0
    assert figures["loop_lag_max_us"] >= 20_000


async def test_a_full_collection_is_counted_and_timed_then_the_count_starts_again() -> None:
    probe = LoopLagProbe(asyncio.get_running_loop()).start()
    try:
        probe.take()
        gc.collect()
        figures = probe.take()
        after = probe.take()
    finally:
        probe.stop()
    assert figures["gc_collections"] >= 1
    assert figures["gc_full_collections"] >= 1
    assert figures["gc_pause_max_us"] > 0
    assert after["gc_full_collections"] == 0  # each take covers what came since the last


async def test_a_stopped_probe_no_longer_hears_collections() -> None:
    probe = LoopLagProbe(asyncio.get_running_loop()).start()
    probe.stop()
    before = len(gc.callbacks)
    gc.collect()
    assert probe.take()["gc_collections"] == 0
    assert len(gc.callbacks) == before
