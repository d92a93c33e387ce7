"""How long an event loop takes to run a callback handed to it from another thread.

:class:`LoopLagProbe` hands the loop a callback every ``interval`` seconds from a thread of
its own and records how late each one ran. That delay is what any message arriving at that
moment waits before the loop can look at it: time the loop spends in other callbacks, and
time its thread spends waiting for the GIL while other threads (a copy engine enqueuing GPU
work, say) hold it. It also times the interpreter's garbage collections meanwhile, since a
collection stops every thread of the process: a long lag with a collection as long beside
it was the collector's. ``kvrpc serve --loop-probe`` turns it on and ``kv.stats`` reports it.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any

__all__ = ["LoopLagProbe"]


class LoopLagProbe:
    """Samples ``loop``'s responsiveness every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = 0.001) -> None:
        self.loop = loop
        self.interval = interval
        self._lags: list[float] = []
        self._collections = 0
        self._full_collections = 0
        self._longest_collection = 0.0
        self._collecting_since = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvrpc-loop-probe", daemon=True)

    def start(self) -> LoopLagProbe:
        """Start sampling; returns self."""
        gc.callbacks.append(self._on_collection)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (waits for the thread)."""
        self._stop.set()
        self._thread.join()
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        # Runs in whichever thread the collection stopped, with every other thread waiting.
        if phase == "start":
            self._collecting_since = time.perf_counter()
            return
        took = time.perf_counter() - self._collecting_since
        with self._lock:
            self._collections += 1
            if info.get("generation") == 2:
                self._full_collections += 1
            self._longest_collection = max(self._longest_collection, took)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.loop.call_soon_threadsafe(self._record, time.perf_counter())
            except RuntimeError:  # the loop closed
                return

    def _record(self, sent: float) -> None:
        lag = time.perf_counter() - sent
        with self._lock:
            self._lags.append(lag)

    def take(self) -> dict[str, int]:
        """What happened since the last call: lag samples and garbage collections.

        The samples' count, p50, p99 and maximum in microseconds; the collections' count,
        how many were full ones, and the longest in microseconds.
        """
        with self._lock:
            lags, self._lags = sorted(self._lags), []
            collections = {
                "gc_collections": self._collections,
                "gc_full_collections": self._full_collections,
                "gc_pause_max_us": round(self._longest_collection * 1e6),
            }
            self._collections = self._full_collections = 0
            self._longest_collection = 0.0
        if not lags:
            return {
                "loop_lag_samples": 0,
                "loop_lag_p50_us": 0,
                "loop_lag_p99_us": 0,
                "loop_lag_max_us": 0,
                **collections,
            }
        return {
            "loop_lag_samples": len(lags),
            "loop_lag_p50_us": round(lags[len(lags) // 2] * 1e6),
            "loop_lag_p99_us": round(lags[min(len(lags) - 1, len(lags) * 99 // 100)] * 1e6),
            "loop_lag_max_us": round(lags[-1] * 1e6),
            **collections,
        }
