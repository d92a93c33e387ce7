"""The loop-lag probe: how late a loop runs callbacks, and the garbage collections meanwhile."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable
from typing import cast

from kvrpc.loopwatch import LoopLagProbe

WAIT = 10.0  # seconds: only a failing test waits this long
STALL = 0.02  # seconds the loop is kept busy


class HandedOver:
    """The running loop, as the probe's thread sees it, setting ``handed`` at each hand-over."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.handed = threading.Event()

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: object) -> object:
        handle = self.loop.call_soon_threadsafe(callback, *args)
        self.handed.set()
        return handle


async def test_a_loop_kept_busy_shows_the_stall_in_its_lag_samples() -> None:
    watched = HandedOver(asyncio.get_running_loop())
    probe = LoopLagProbe(cast(asyncio.AbstractEventLoop, watched)).start()
    try:
        probe.take()  # start a new sample
        watched.handed.clear()
        # The loop is kept busy from the moment a probe callback waits in its queue, for the
        # stall the sample must show (the one wait on the clock: the stall under test).
        assert watched.handed.wait(WAIT)
        time.sleep(STALL)  # noqa: ASYNC251 (on purpose: the loop is busy, its callbacks wait)
        await asyncio.sleep(0)  # the probe's callbacks, queued first, run before this returns
        figures = probe.take()
    finally:
        probe.stop()
    assert figures["loop_lag_samples"] > 0
    assert figures["loop_lag_max_us"] >= STALL * 1e6


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
