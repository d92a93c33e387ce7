"""``kvrpc bench soak``: a server under a mixed load for minutes, watched for leaks and drift.

One ``kvrpc serve --loop-probe`` child, and ``clients`` client processes that each, until the
soak ends, open a session (a :class:`~kvrpc.kv.WorkerAdapter` registering a small KV cache in
shared memory, and a :class:`~kvrpc.kv.PollingSchedulerAdapter`), run ``session_calls``
lookups of prompts drawn from ``prompts`` (a hit is retrieved, a miss stored), then close
both adapters, release the memory, and connect again. L1 holds about half the prompts, so
chunks are evicted throughout.

Every ``interval`` seconds the bench samples the server: its resident memory (``VmRSS`` in
``/proc/PID/status``), its open descriptors (``/proc/PID/fd``), its event loop's lag over
the interval (``kv.stats``, which the probe resets on each read), and the p99 of the clients'
calls timed during the interval (a lookup; a store or retrieve, to the worker seeing it
finished). It reports each interval and the growth between the first interval and the last:

* **RSS growth**, percent. Goal (issue 27): under 5% over a 10-minute soak.
* **descriptor growth**: the server's descriptors once idle after the soak (every client
  gone) less those before it. Goal: 0.
* **p99 drift**, the last interval's call p99 over the first's. Goal: under 2x.

The clock starts once every client has finished a session (the load on, the pool made);
the first interval is the baseline of the RSS and p99 figures. A soak shorter than 10
minutes still prints the verdicts, marked as too short to judge the goals by. Nothing is
asserted: the command exits 0 once the figures are taken, 1 when a client or the server
failed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvrpc.bench._child import default_url, kv_server_child
from kvrpc.bench.kv import goal
from kvrpc.bench.rpc import percentile
from kvrpc.client import SyncClient
from kvrpc.errors import KVError
from kvrpc.kv import protocols
from kvrpc.progress import Progress

__all__ = ["SoakOptions", "Sample", "growth_figures", "run_soak_bench", "soak_table"]

_RSS_GOAL_PCT = 5.0
_FD_GOAL = 0
_DRIFT_GOAL = 2.0
_GOAL_MINUTES = 10.0  # the goals are stated for a soak this long

# The clients' KV cache and the server's chunks: 2 layers of 64 blocks of 16 tokens, 8 heads
# of 32 float16 values; chunks of 32 tokens (2 blocks, 32 KiB).
_BLOCK = 16
_CHUNK = 32
_NUM_BLOCKS = 64
_LAYERS = 2
_LAYER_SHAPE = (2, _NUM_BLOCKS, _BLOCK, 8, 32)
_CHUNK_BYTES = _LAYERS * 2 * (_CHUNK // _BLOCK) * _BLOCK * 8 * 32 * 2
_PROMPT_CHUNKS = 4
_WAIT_S = 60.0  # a call or a sample taking longer than this fails the soak

_progress = Progress("bench soak")


@dataclass(frozen=True)
class SoakOptions:
    """The soak's workload; see the module docstring. ``minutes`` may be a fraction."""

    minutes: float = 10.0
    clients: int = 3
    interval: float | None = None  # seconds between samples (None: 30, at most a fifth)
    prompts: int = 32
    session_calls: int = 50

    @classmethod
    def from_args(cls, args: Any) -> SoakOptions:
        """The options of a parsed ``kvrpc bench soak`` command line."""
        return cls(args.minutes, args.clients, args.interval, args.prompts, args.session_calls)

    @property
    def seconds_between_samples(self) -> float:
        """The sampling interval: given, or 30 s, at most a fifth of the soak."""
        if self.interval is not None:
            return self.interval
        return min(30.0, self.minutes * 60 / 5)


@dataclass(frozen=True)
class Sample:
    """One interval's figures: when (seconds into the soak), the server's state, the calls."""

    at_s: float
    rss_bytes: int
    fds: int
    loop_lag_p99_us: int
    loop_lag_max_us: int
    calls: int
    call_p99_us: float
    errors: int

    def row(self) -> dict[str, Any]:
        """The sample as the JSON row it is reported as."""
        return {
            "at_s": round(self.at_s, 1),
            "rss_mib": round(self.rss_bytes / (1 << 20), 1),
            "fds": self.fds,
            "loop_lag_p99_us": self.loop_lag_p99_us,
            "loop_lag_max_us": self.loop_lag_max_us,
            "calls": self.calls,
            "call_p99_us": round(self.call_p99_us, 1),
            "errors": self.errors,
        }


def growth_figures(samples: Sequence[Sample], minutes: float, fds: int) -> dict[str, Any]:
    """The growth between the first sample and the last, with each goal's verdict.

    ``fds`` is the descriptor growth: the server's open descriptors once idle after the soak,
    less those before it (under load the count moves with the clients connected at that
    instant, which says nothing about a leak). Pure: no I/O. Raises :class:`ValueError`
    with fewer than two samples (nothing to compare).
    """
    if len(samples) < 2:
        raise ValueError(f"growth needs two samples at least, not {len(samples)}")
    first, last = samples[0], samples[-1]
    rss_pct = (last.rss_bytes - first.rss_bytes) / first.rss_bytes * 100
    drift = last.call_p99_us / first.call_p99_us if first.call_p99_us > 0 else float("inf")
    short = minutes < _GOAL_MINUTES
    note = f"; a {minutes:g}-minute soak is too short to judge by" if short else ""
    return {
        "rss_growth_pct": round(rss_pct, 2),
        "fd_growth": fds,
        "p99_drift": round(drift, 3),
        "rss_goal": goal(
            rss_pct < _RSS_GOAL_PCT, f"{rss_pct:.2f}% vs < {_RSS_GOAL_PCT:g}% in 10 min{note}"
        ),
        "fd_goal": goal(fds <= _FD_GOAL, f"{fds:+d} descriptors vs {_FD_GOAL}{note}"),
        "p99_goal": goal(drift < _DRIFT_GOAL, f"{drift:.2f}x vs < {_DRIFT_GOAL:g}x{note}"),
    }


def soak_table(figures: dict[str, Any]) -> str:
    """The intervals as a table, then the growth figures and the goals' verdicts."""
    columns = (
        "at_s", "rss_mib", "fds", "loop_lag_p99_us", "loop_lag_max_us", "calls", "call_p99_us",
        "errors",
    )  # fmt: skip
    rows = [[str(row[c]) for c in columns] for row in figures["intervals"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    rest = {k: v for k, v in figures.items() if k != "intervals"}
    width = max(len(k) for k in rest)
    lines += [f"{key:<{width}}  {value}" for key, value in rest.items()]
    return "\n".join(lines)


@_progress.closing
def run_soak_bench(options: SoakOptions) -> dict[str, Any]:
    """Run the soak; its figures (``intervals``, growth and verdicts). See the module docs.

    Raises :class:`KVError` when the server dies or a client fails.
    """
    interval = options.seconds_between_samples
    slots = max(1, options.prompts * _PROMPT_CHUNKS // 2)  # about half the prompts fit
    with tempfile.TemporaryDirectory(prefix="kvrpc-soak-") as tmp, contextlib.ExitStack() as stack:
        url = default_url(tmp)
        server_options = (
            "--chunk-size", str(_CHUNK),
            "--cpu-buffer-size", repr(slots * _CHUNK_BYTES / (1 << 30)),
            "--client-timeout", "10",
            "--loop-probe",
        )  # fmt: skip
        child = stack.enter_context(kv_server_child(url, tmp, *server_options))
        stats = stack.enter_context(SyncClient(url, registry=protocols.kv_registry(), timeout=30))
        context = multiprocessing.get_context("spawn")
        timings: Any = context.Queue()
        stop = context.Event()
        processes = [
            context.Process(
                target=_client_main,
                args=(url, i, options.prompts, options.session_calls, timings, stop),
                daemon=True,
            )
            for i in range(options.clients)
        ]
        stats.call(protocols.STATS)  # this client's connections open before the count
        fds_before = _fds(child.pid)
        for process in processes:
            process.start()
        try:
            _warm_up(timings, options.clients)
            samples = _sample(child.pid, stats, timings, options, interval, processes)
        finally:
            stop.set()
            for process in processes:
                process.join(_WAIT_S)
                if process.is_alive():
                    process.kill()
        # Every client said goodbye (or, killed, expires): the server is idle again.
        final = _idle(stats)
        fds_after = _fds(child.pid)
    figures: dict[str, Any] = {
        "minutes": options.minutes,
        "clients": options.clients,
        "interval_s": interval,
        "intervals": [s.row() for s in samples],
        "lookups": final["lookups"],
        "stores": final["stores"],
        "retrieves": final["retrieves"],
        "evictions": final["evictions"],
    }
    figures.update(growth_figures(samples, options.minutes, fds_after - fds_before))
    return figures


def _warm_up(timings: Any, clients: int) -> None:
    """Wait until every client has finished a session: the load is on, the pool made."""
    warm: set[int] = set()
    deadline = time.monotonic() + _WAIT_S * 2
    while len(warm) < clients:
        try:
            batch = timings.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise KVError(f"{clients - len(warm)} soak clients never finished a session") from None
        if isinstance(batch, str):
            raise KVError(f"a soak client failed: {batch}")
        warm.add(batch[0])


def _idle(stats: SyncClient) -> dict[str, int]:
    """``kv.stats`` once the server holds no client any more."""
    deadline = time.monotonic() + _WAIT_S
    while (report := stats.call(protocols.STATS))["clients"] and time.monotonic() < deadline:
        time.sleep(0.1)
    if report["clients"]:
        raise KVError(f"the server still holds {report['clients']} clients after the soak")
    final: dict[str, int] = report
    return final


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _sample(
    pid: int,
    stats: SyncClient,
    timings: Any,
    options: SoakOptions,
    interval: float,
    processes: list[Any],
) -> list[Sample]:
    """Sample the server every ``interval`` s until the soak ends; the first is the baseline."""
    started = time.monotonic()
    end = started + options.minutes * 60
    stats.call(protocols.STATS)  # the probe's lag so far is the start-up's: dropped
    samples: list[Sample] = []
    next_at = started + interval
    latencies: list[float] = []
    errors = 0
    while True:
        wait = next_at - time.monotonic()
        while wait > 0:
            try:
                batch = timings.get(timeout=min(wait, 0.5))
            except queue.Empty:
                pass
            else:
                if isinstance(batch, str):
                    raise KVError(f"a soak client failed: {batch}")
                latencies += batch[1]
                errors += batch[2]
            wait = next_at - time.monotonic()
        for process in processes:
            if not process.is_alive():
                raise KVError(f"soak client {process.pid} exited ({process.exitcode})")
        report = stats.call(protocols.STATS)
        samples.append(
            Sample(
                time.monotonic() - started,
                _rss_bytes(pid),
                _fds(pid),
                report.get("loop_lag_p99_us", 0),
                report.get("loop_lag_max_us", 0),
                len(latencies),
                percentile(latencies, 0.99) * 1e6 if latencies else 0.0,
                errors,
            )
        )
        _progress(
            f"{samples[-1].at_s:.0f}/{options.minutes * 60:.0f} s, "
            f"rss {samples[-1].rss_bytes >> 20} MiB, {samples[-1].fds} fds"
        )
        latencies, errors = [], 0
        next_at += interval
        if next_at > end + interval / 2:
            break
    return samples


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise KVError(f"no VmRSS in /proc/{pid}/status")


def _client_main(
    url: str, index: int, prompts: int, session_calls: int, timings: Any, stop: Any
) -> None:
    """A soak client: sessions of ``session_calls`` lookups until ``stop``; timings queued."""
    try:
        _client_sessions(url, index, prompts, session_calls, timings, stop)
    except BaseException as exc:  # the parent reports it; a traceback here would be lost
        timings.put(f"client {index}: {type(exc).__name__}: {exc}")


def _client_sessions(
    url: str, index: int, prompts: int, session_calls: int, timings: Any, stop: Any
) -> None:
    import random

    import torch

    from kvrpc.kv import (
        LoadStoreOp,
        PollingSchedulerAdapter,
        WorkerAdapter,
        release_shared,
        shared_empty,
    )

    chooser = random.Random(index)
    model = "soak"
    request = 0
    while not stop.is_set():
        layers = [shared_empty(_LAYER_SHAPE, torch.float16) for _ in range(_LAYERS)]
        worker = WorkerAdapter(url, model, 1, 0, _BLOCK, keepalive_interval=1.0)
        scheduler = PollingSchedulerAdapter(
            url, model, 1, 0, _BLOCK, lookup_timeout=_WAIT_S, keepalive_interval=1.0
        )
        try:
            worker.register_kv_caches({f"layer{i}": t for i, t in enumerate(layers)})
            latencies: list[float] = []
            errors = 0
            for _ in range(session_calls):
                if stop.is_set():
                    break
                request += 1
                request_id = f"c{index}-{request}"
                seed = chooser.randrange(prompts)
                tokens = [seed * 100_000 + i for i in range(_PROMPT_CHUNKS * _CHUNK + 5)]
                began = time.perf_counter()
                scheduler.maybe_submit_lookup_request(request_id, token_ids=tokens)
                hit = scheduler.check_lookup_result(request_id)
                latencies.append(time.perf_counter() - began)
                blocks = list(range(len(tokens) // _BLOCK + 1))
                began = time.perf_counter()
                if hit:
                    op = LoadStoreOp(blocks, token_ids=tokens, end=hit)
                    worker.submit_retrieve_request(request_id, op)
                    errors += _finish(worker, request_id, stores=False)
                else:
                    worker.submit_store_request(request_id, LoadStoreOp(blocks, token_ids=tokens))
                    errors += _finish(worker, request_id, stores=True)
                latencies.append(time.perf_counter() - began)
                scheduler.end_session(request_id)
            timings.put((index, latencies, errors))
        finally:
            scheduler.close()
            worker.shutdown()
            for layer in layers:
                release_shared(layer)


def _finish(worker: Any, request_id: str, *, stores: bool) -> int:
    """Wait for the worker to see ``request_id`` finished; 1 if it ended in load errors."""
    deadline = time.monotonic() + _WAIT_S
    finished: set[str] = set()
    while request_id not in finished:
        if time.monotonic() > deadline:
            raise KVError(f"{request_id} did not finish within {_WAIT_S} s")
        done = worker.get_finished({request_id} if stores else set())
        finished |= done[0] if stores else done[1]
        if request_id not in finished:
            time.sleep(0.0005)
    return 1 if not stores and worker.get_block_ids_with_load_errors() else 0
