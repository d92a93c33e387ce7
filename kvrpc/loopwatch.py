"""How long an event loop takes to run a callback handed to it from another thread.

:class:`LoopLagProbe` hands the loop a callback every ``interval`` seconds from a thread of
its own and records how late each one ran. That delay is what any message arriving at that
moment waits before the loop can look at it: time the loop spends in other callbacks, and
time its thread spends waiting for the GIL while other threads (a copy engine enqueuing GPU
work, say) hold it. ``kvrpc serve --loop-probe`` turns it on and ``kv.stats`` reports it.
"""

from __future__ import annotations

import asyncio
import threading
import time

__all__ = ["LoopLagProbe"]


class LoopLagProbe:
    """Samples ``loop``'s responsiveness every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = 0.001) -> None:
        self.loop = loop
        self.interval = interval
        self._lags: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvrpc-loop-probe", daemon=True)

    def start(self) -> LoopLagProbe:
        """Start sampling; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (waits for the thread)."""
        self._stop.set()
        self._thread.join()

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
        """Samples since the last call: their count, p50, p99 and maximum in microseconds."""
        with self._lock:
            lags, self._lags = sorted(self._lags), []
        if not lags:
            return {
                "loop_lag_samples": 0,
                "loop_lag_p50_us": 0,
                "loop_lag_p99_us": 0,
                "loop_lag_max_us": 0,
            }
        return {
            "loop_lag_samples": len(lags),
            "loop_lag_p50_us": round(lags[len(lags) // 2] * 1e6),
            "loop_lag_p99_us": round(lags[min(len(lags) - 1, len(lags) * 99 // 100)] * 1e6),
            "loop_lag_max_us": round(lags[-1] * 1e6),
        }
