"""``kvrpc bench kv``: the KV-cache service against its goals, each beside a baseline of the run.

Three figures, each taken against its own ``kvrpc serve`` child process (a server's pool takes
its slot size from the first layout registered with it, and the figures use different layouts):

* **lookup**: a scheduler's lookup of a 32k-token prompt (128 chunks of 256 tokens, hashed
  from a Python list of token ids) that the server holds for both ranks of a world of 2, through
  :class:`~kvrpc.kv.PollingSchedulerAdapter`, against ``rpc.ping`` on the same server through a
  :class:`~kvrpc.client.SyncClient`, the two taking turns. Beside it the hashing alone and a raw
  ``kv.lookup`` of the already hashed :class:`~kvrpc.kv.KeyBatch` and the ``kv.end_session``
  after it, to show where the time goes. Each adapter lookup is followed by the adapter's
  ``end_session``, which does not wait: the server handles it just before the next lookup,
  as it would in an engine. Goal: lookup p50 at most 2x ping p50. The same lookup keyed by
  the engine's own block hashes (``block_hashes=``, as the vLLM connector sends with
  ``kvrpc.chunk_keys = "block_hashes"``; 2,048 made-up 32-byte hashes, which vLLM computes
  anyway) is timed beside it, with its own hashing alone, against the same goal. Beside
  them, the same lookup through the non-blocking :class:`~kvrpc.kv.SchedulerAdapter`, its
  ``check_lookup_result`` polled in a loop without sleeping (as a busy scheduler thread
  polls) and with a 20 us sleep between checks. Goal: the busy poll's p50 at most 1.2x the
  sleeping one's.
* **transfer**: a batched store of ``chunks`` chunks from a worker's shared-memory KV cache into
  the server, and a batched retrieve of them into other blocks, through
  :class:`~kvrpc.kv.WorkerAdapter`, against a single-threaded ``torch`` copy of the same number
  of bytes in this process. Goal: each at least half the copy's GB/s. Beside them, in the
  same rounds, the store on a ``--no-checksums`` server and the retrieve on a
  ``--verify-retrieves`` one (``store_checksum_overhead``, ``retrieve_verify_overhead``).
* **memory**: the server's resident memory beyond the pool's own pages per stored chunk, with
  many tiny (16-byte) chunks stored by raw ``kv.store`` calls into a pool of exactly that many
  slots. Resident memory is read from ``/proc/<pid>/status`` (``VmRSS``) before the cache is
  registered, after, and once every chunk is stored; the pool's buffer fills its pages only as
  slots are written, so ``slots used x slot bytes`` is subtracted. The figure counts from
  before the registration, which allocates the pool's per-slot tables (index, LRU links,
  pins), so they are included; the growth from after it is reported beside. Goal: at most 200
  bytes a chunk.

No figure is asserted: the command reports them, the ratios and whether each goal was met,
and exits 0 once they are taken, goals met or MISSED (1 only when a figure could not be
taken). ``--quick`` runs every figure at small sizes, to check that the bench works: its
figures are not comparable to the goals (a 2-layer transfer is mostly per-call overhead), so
the report says so first and its verdicts are marked as such.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import random
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvrpc.bench._child import default_url, kv_server_child
from kvrpc.bench.rpc import percentile
from kvrpc.client import SyncClient
from kvrpc.errors import KVError
from kvrpc.kv import protocols
from kvrpc.kv.client import (
    LoadStoreOp,
    PollingSchedulerAdapter,
    SchedulerAdapter,
    WorkerAdapter,
)
from kvrpc.kv.keys import HASH_SIZE, KeyBatch, hashes_from_block_hashes, hashes_from_tokens
from kvrpc.kv.layout import KVLayout
from kvrpc.kv.protocols import KVCacheRegistration
from kvrpc.kv.shm import release_shared, shared_empty, shared_ref
from kvrpc.progress import Progress
from kvrpc.protocol import PING
from kvrpc.transport import parse_url

__all__ = [
    "FIGURES",
    "QUICK_NOTE",
    "TINY_CHUNK_TOKENS",
    "KVBenchOptions",
    "figure_url",
    "goal",
    "interleaved",
    "lookup_scheduler",
    "polled_lookup",
    "proc_status",
    "run_kv_bench",
    "register_tiny",
    "serve_stored_prompt",
    "store_tiny",
    "timed_lookup",
    "tiny_layer",
    "wait_finished",
]

#: The figures ``kvrpc bench kv`` can take, in the order it takes them.
FIGURES = ("lookup", "transfer", "memory")

_MODEL = "kvrpc-bench"
_GIB = 1 << 30
_BLOCK_SIZE = 16
_CHUNK_SIZE = 256
_PROMPT_CHUNKS = 128  # a 32k-token prompt
_PROMPT_BLOCKS = _PROMPT_CHUNKS * _CHUNK_SIZE // _BLOCK_SIZE
_LOOKUP_WORLD_SIZE = 2
# Goals: lookup p50 / ping p50 at most; store and retrieve GB/s / memcpy GB/s at least;
# server bytes per stored chunk, beyond the pool's pages, at most.
_LOOKUP_GOAL = 2.0
_BUSY_POLL_GOAL = 1.2
#: The sleep between a polling scheduler's checks in the "with a sleep" figure.
_POLL_PAUSE_S = 20e-6
_TRANSFER_GOAL = 0.5
_METADATA_GOAL = 200.0
# How long a waiting loop sleeps between polls of the adapter: short next to a transfer.
_POLL_S = 0.0002


@dataclass(frozen=True)
class KVBenchOptions:
    """What ``kvrpc bench kv`` measures, and how much of it.

    ``url`` is where the servers listen (None: a Unix socket in a temporary directory, or
    ``zmq+ipc`` without the unix plugin); each figure's server gets its own address derived
    from it (the port plus 0, 1, 2, or the path with a suffix). ``lookups`` is the number of
    timed calls of each kind in the lookup figure, ``interleave`` the turns they are cut
    into; ``rounds`` the timed store / retrieve / copy rounds; ``layers``, ``heads``,
    ``head_dim`` and ``chunks`` the transfer figure's KV layout and batch; ``tiny_chunks``
    the chunks stored in the memory figure, ``tiny_batch`` the keys per store message.
    """

    url: str | None = None
    figures: tuple[str, ...] = FIGURES
    lookups: int = 2000
    interleave: int = 5
    rounds: int = 5
    layers: int = 32
    heads: int = 2
    head_dim: int = 64
    chunks: int = 64
    tiny_chunks: int = 1_000_000
    tiny_batch: int = 8192
    quick: bool = False
    """Whether ``--quick`` chose the sizes: the report then warns that they are too small."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> KVBenchOptions:
        """The options of a parsed ``kvrpc bench kv`` command line.

        ``--quick`` gives small defaults to every size not set on the command line (the
        lookup keeps its 128-chunk prompt); explicit values always win.
        """
        quick = bool(args.quick)

        def pick(value: int | None, full: int, small: int) -> int:
            return value if value is not None else (small if quick else full)

        return cls(
            url=args.url,
            figures=tuple(args.only) if args.only else FIGURES,
            lookups=pick(args.lookups, 2000, 60),
            interleave=pick(args.interleave, 5, 2),
            rounds=pick(args.rounds, 5, 2),
            layers=pick(args.layers, 32, 2),
            heads=args.heads,
            head_dim=args.head_dim,
            chunks=pick(args.chunks, 64, 8),
            tiny_chunks=pick(args.tiny_chunks, 1_000_000, 16384),
            tiny_batch=args.tiny_batch,
            quick=quick,
        )


#: The first line of a ``--quick`` report, and the prefix of its verdicts.
QUICK_NOTE = (
    "--quick: small sizes that check the bench runs; the figures are not comparable to the "
    "goals, so a MISSED goal here says nothing about the service"
)


# On a terminal, a status line rewritten in place; piped, nothing (see kvrpc.progress).
_progress = Progress("bench kv")


@_progress.closing
def run_kv_bench(options: KVBenchOptions) -> dict[str, Any]:
    """Take the figures ``options`` asks for; returns them by name, in the order taken.

    Progress shows on stderr where it is a terminal (:mod:`kvrpc.progress`). Raises
    :class:`~kvrpc.errors.KVError` when a server does not start or an operation does not do
    what the figure needs (a lookup that misses, a store refused, retrieved bytes that
    differ), rather than reporting a figure of the wrong thing.
    """
    unknown = set(options.figures) - set(FIGURES)
    if unknown:
        raise KVError(f"unknown figures {sorted(unknown)}; choose among {', '.join(FIGURES)}")
    figures: dict[str, Any] = {"note": QUICK_NOTE} if options.quick else {}
    with tempfile.TemporaryDirectory(prefix="kvrpc-bench-kv-") as tmp:
        url = options.url or default_url(tmp)
        if parse_url(url).scheme == "inproc":
            raise KVError(
                "kvrpc bench kv runs its servers in child processes, which inproc:// cannot "
                "reach; use unix:// or zmq+ipc://"
            )
        figures["url"] = url
        takers: dict[str, Callable[[KVBenchOptions, str, str], dict[str, Any]]] = {
            "lookup": _lookup_figures,
            "transfer": _transfer_figures,
            "memory": _memory_figures,
        }
        for index, name in enumerate(FIGURES):
            if name in options.figures:
                figures.update(takers[name](options, figure_url(url, index), tmp))
    if options.quick:
        for key, value in figures.items():
            if key.endswith("_goal"):
                figures[key] = f"{value}, at --quick sizes"
    return figures


# ---------------------------------------------------------------------- servers


def figure_url(url: str, index: int) -> str:
    """Figure ``index``'s server address: never the address of another figure's server."""
    parsed = parse_url(url)
    if parsed.port is not None:
        return url.replace(f":{parsed.port}", f":{parsed.port + index}", 1)
    if index == 0:
        return url
    return f"{parsed.scheme}://{parsed.netloc}{parsed.path}-{index}"


@contextlib.contextmanager
def _kv_server(url: str, log_dir: str, *options: str) -> Iterator[int]:
    """A ``kvrpc serve`` child at ``url``, ready; yields its pid."""
    with kv_server_child(url, log_dir, *options) as child:
        _progress(f"server {child.pid}: {child.ready_line}")
        yield child.pid


def _client(url: str) -> SyncClient:
    return SyncClient(url, registry=protocols.kv_registry(), timeout=300.0)


def proc_status(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` in bytes (0 where absent).

    ``VmRSS`` is the resident memory now; ``VmHWM`` its peak since the process's exec. Not
    ``getrusage``'s maximum, which for a child also counts the parent's memory at the fork.
    """
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def wait_finished(
    adapter: WorkerAdapter, request_id: str, store: bool, poll: float = _POLL_S
) -> None:
    """Poll ``get_finished`` until ``request_id``'s store (or retrieve) is reported.

    Raises :class:`KVError` after 300 s.
    """
    deadline = time.monotonic() + 300.0
    while True:
        stores, retrieves = adapter.get_finished({request_id} if store else set())
        if request_id in (stores if store else retrieves):
            return
        if time.monotonic() > deadline:
            raise KVError(f"{request_id!r} was not reported finished within 300 s")
        time.sleep(poll)


def timed(fn: Callable[[], object], cuda: bool = True) -> float:
    """Seconds ``fn()`` takes, with the GPU idle before and finished after (``cuda``)."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def goal(met: bool, text: str) -> str:
    """A figure's verdict: ``met (text)`` or ``MISSED (text)``."""
    return f"{'met' if met else 'MISSED'} ({text})"


# ---------------------------------------------------------------------- 1. lookup


def serve_stored_prompt(
    stack: contextlib.ExitStack,
    url: str,
    tmp: str,
    *server_options: str,
    engine_hashes: Sequence[bytes] | None = None,
) -> tuple[list[int], SyncClient]:
    """A ``kvrpc serve`` at ``url`` holding the 32k-token lookup prompt for both ranks.

    The server (with ``server_options`` beside its chunk size and a small pool) and a client
    of it close with ``stack``; returns the prompt's token ids and the client. With
    ``engine_hashes`` (an engine's block hashes of the prompt) it is stored a second time,
    keyed by those. Raises :class:`KVError` if the stores did not leave every chunk on the
    server.
    """
    per_chunk = _CHUNK_SIZE // _BLOCK_SIZE
    num_blocks = _PROMPT_CHUNKS * per_chunk
    prompt = random.Random(1).choices(range(32000), k=_PROMPT_CHUNKS * _CHUNK_SIZE)
    options = ("--chunk-size", str(_CHUNK_SIZE), "--cpu-buffer-size", "0.01", *server_options)
    stack.enter_context(_kv_server(url, tmp, *options))
    # The smallest KV cache that holds the prompt: the lookup never touches its bytes.
    for rank in range(_LOOKUP_WORLD_SIZE):
        layer = shared_empty((num_blocks, _BLOCK_SIZE, 1), torch.uint8)
        stack.callback(release_shared, layer)
        worker = stack.enter_context(
            WorkerAdapter(url, _MODEL, _LOOKUP_WORLD_SIZE, rank, _BLOCK_SIZE)
        )
        worker.register_kv_caches({"layer.0": layer})
        worker.submit_store_request("prompt", LoadStoreOp(range(num_blocks), prompt))
        wait_finished(worker, "prompt", store=True)
        if engine_hashes is not None:
            op = LoadStoreOp(range(num_blocks), block_hashes=engine_hashes)
            worker.submit_store_request("prompt-by-blocks", op)
            wait_finished(worker, "prompt-by-blocks", store=True)
    client = stack.enter_context(_client(url))
    stored = client.call(protocols.STATS)["chunks"]
    expected = _LOOKUP_WORLD_SIZE * _PROMPT_CHUNKS * (1 if engine_hashes is None else 2)
    if stored != expected:
        raise KVError(f"the prompt's stores left {stored} chunks on the server, not {expected}")
    return prompt, client


def lookup_scheduler(stack: contextlib.ExitStack, url: str) -> PollingSchedulerAdapter:
    """The scheduler adapter the lookup figures time, for :func:`serve_stored_prompt`'s server."""
    scheduler = PollingSchedulerAdapter(
        url, _MODEL, _LOOKUP_WORLD_SIZE, 0, _BLOCK_SIZE, poll_interval=1.0
    )
    stack.enter_context(scheduler)
    return scheduler


def timed_lookup(
    scheduler: PollingSchedulerAdapter,
    prompt: list[int],
    request_id: str,
    engine_hashes: Sequence[bytes] | None = None,
) -> float:
    """Seconds one adapter lookup of ``prompt`` takes to its answer (its end_session untimed).

    The adapter hashes the prompt's tokens, or keys its chunks by ``engine_hashes`` where
    given (the engine's own block hashes of it). Raises :class:`KVError` unless it matched
    the whole prompt.
    """
    start = time.perf_counter()
    if engine_hashes is None:
        scheduler.maybe_submit_lookup_request(request_id, token_ids=prompt)
    else:
        scheduler.maybe_submit_lookup_request(request_id, block_hashes=engine_hashes)
    tokens = scheduler.check_lookup_result(request_id)
    elapsed = time.perf_counter() - start
    scheduler.end_session(request_id)
    if tokens != len(prompt):
        raise KVError(f"a lookup matched {tokens} tokens, not {len(prompt)}")
    return elapsed


def _lookup_figures(options: KVBenchOptions, url: str, tmp: str) -> dict[str, Any]:
    """Adapter lookup p50 of a fully cached 32k-token prompt vs ``rpc.ping`` p50."""
    with contextlib.ExitStack() as stack:
        # What vLLM's scheduler holds for the prompt anyway: a 32-byte hash per block.
        engine_hashes = [hashlib.sha256(b"block %d" % i).digest() for i in range(_PROMPT_BLOCKS)]
        prompt, client = serve_stored_prompt(stack, url, tmp, engine_hashes=engine_hashes)
        hashes = hashes_from_tokens(prompt, _CHUNK_SIZE)
        keys = KeyBatch(_MODEL, _LOOKUP_WORLD_SIZE, None, b"".join(hashes))
        figures: dict[str, Any] = {
            "lookup_url": url,
            "lookup_prompt_tokens": len(prompt),
            **_check_pins(client, keys),
        }
        scheduler = lookup_scheduler(stack, url)
        me = secrets.token_bytes(16)
        serial = iter(range(1 << 62))

        def ping() -> None:
            client.call(PING)

        def adapter_lookup() -> float:
            return timed_lookup(scheduler, prompt, f"lookup-{next(serial)}")

        def lookup_by_block_hashes() -> float:
            return timed_lookup(scheduler, prompt, f"by-blocks-{next(serial)}", engine_hashes)

        end_sessions: list[float] = []

        def raw_lookup() -> float:
            request_id = f"raw-{next(serial)}"
            start = time.perf_counter()
            matched = client.call(protocols.LOOKUP, me, request_id, keys, None)
            elapsed = time.perf_counter() - start
            client.call(protocols.END_SESSION, me, _MODEL, _LOOKUP_WORLD_SIZE, request_id)
            end_sessions.append(time.perf_counter() - start - elapsed)
            if matched != _PROMPT_CHUNKS:
                raise KVError(f"a raw lookup matched {matched} chunks, not {_PROMPT_CHUNKS}")
            return elapsed

        def hashing() -> None:
            hashes_from_tokens(prompt, _CHUNK_SIZE)

        def hashing_block_hashes() -> None:
            hashes_from_block_hashes(engine_hashes, _CHUNK_SIZE // _BLOCK_SIZE)

        # The non-blocking adapter an engine's scheduler uses, polled as vLLM's scheduler
        # polls it: in a loop without sleeping, and with a 20 us sleep between checks.
        plain = SchedulerAdapter(url, _MODEL, _LOOKUP_WORLD_SIZE, 0, _BLOCK_SIZE)
        stack.enter_context(plain)

        def polled(pause: float | None) -> Callable[[], float]:
            def lookup() -> float:
                return polled_lookup(plain, prompt, f"polled-{next(serial)}", pause)

            return lookup

        paths: dict[str, Callable[[], Any]] = {
            "ping": ping,
            "lookup": adapter_lookup,
            "lookup_raw": raw_lookup,
            "hashing": hashing,
            "lookup_by_block_hashes": lookup_by_block_hashes,
            "hashing_block_hashes": hashing_block_hashes,
            "lookup_busy_poll": polled(None),
            "lookup_sleep_poll": polled(_POLL_PAUSE_S),
        }
        _progress(f"lookup: warming up against {url}")
        for path in paths.values():
            for _ in range(min(100, options.lookups)):
                path()
        samples = interleaved(paths, options.lookups, options.interleave)
        # Only the timed rounds' end_session calls, not the warm-up's.
        samples["end_session_raw"] = end_sessions[-len(samples["lookup_raw"]) :]
    for name, taken in samples.items():
        figures[f"{name}_p50_us"] = percentile(taken, 0.50) * 1e6
        figures[f"{name}_p99_us"] = percentile(taken, 0.99) * 1e6
    figures["lookup_samples"] = len(samples["lookup"])
    ratio = figures["lookup_p50_us"] / figures["ping_p50_us"]
    figures["lookup_to_ping_p50_ratio"] = ratio
    figures["lookup_raw_to_ping_p50_ratio"] = figures["lookup_raw_p50_us"] / figures["ping_p50_us"]
    figures["lookup_goal"] = goal(ratio <= _LOOKUP_GOAL, f"lookup p50 <= {_LOOKUP_GOAL:g}x ping")
    by_blocks = figures["lookup_by_block_hashes_p50_us"] / figures["ping_p50_us"]
    figures["lookup_by_block_hashes_to_ping_p50_ratio"] = by_blocks
    figures["lookup_by_block_hashes_goal"] = goal(
        by_blocks <= _LOOKUP_GOAL,
        f"lookup keyed by the engine's block hashes p50 <= {_LOOKUP_GOAL:g}x ping",
    )
    busy = figures["lookup_busy_poll_p50_us"] / figures["lookup_sleep_poll_p50_us"]
    figures["busy_poll_to_sleep_poll_p50_ratio"] = busy
    figures["busy_poll_goal"] = goal(
        busy <= _BUSY_POLL_GOAL,
        f"lookup polled without sleeping <= {_BUSY_POLL_GOAL:g}x polled with 20 us sleeps",
    )
    return figures


def polled_lookup(
    scheduler: SchedulerAdapter, prompt: list[int], request_id: str, pause: float | None
) -> float:
    """Seconds one lookup takes to its answer when ``check_lookup_result`` is polled.

    ``pause`` is the sleep between checks; None polls in a loop without sleeping, as a busy
    scheduler thread does. Raises :class:`KVError` unless it matched the whole prompt.
    """
    start = time.perf_counter()
    scheduler.maybe_submit_lookup_request(request_id, token_ids=prompt)
    while (tokens := scheduler.check_lookup_result(request_id)) is None:
        if pause is not None:
            time.sleep(pause)
    elapsed = time.perf_counter() - start
    scheduler.end_session(request_id)
    if tokens != len(prompt):
        raise KVError(f"a polled lookup matched {tokens} tokens, not {len(prompt)}")
    return elapsed


def _check_pins(client: SyncClient, keys: KeyBatch) -> dict[str, int]:
    """One raw lookup: it matches the whole prompt, pins every rank's chunks, and lets go."""
    me = secrets.token_bytes(16)
    matched = client.call(protocols.LOOKUP, me, "pin-check", keys, None)
    pinned = client.call(protocols.STATS)["pinned_chunks"]
    released = client.call(protocols.END_SESSION, me, _MODEL, _LOOKUP_WORLD_SIZE, "pin-check")
    left = client.call(protocols.STATS)["pinned_chunks"]
    expected = _PROMPT_CHUNKS * _LOOKUP_WORLD_SIZE
    if matched != _PROMPT_CHUNKS or pinned != expected or released != expected or left:
        raise KVError(
            f"a lookup of the stored prompt matched {matched} chunks and pinned {pinned}, "
            f"end_session released {released} and left {left}; expected "
            f"{_PROMPT_CHUNKS}, {expected}, {expected} and 0"
        )
    return {
        "lookup_chunks_matched": matched,
        "lookup_pins_taken": pinned,
        "lookup_pins_released": released,
    }


def interleaved(
    paths: dict[str, Callable[[], Any]], calls: int, rounds: int, what: str = "lookup"
) -> dict[str, list[float]]:
    """Seconds per call of each path, the paths taking turns for ``rounds`` rounds.

    A path that returns a float reports its own time (to leave out untimed work after it);
    otherwise the whole call is timed. Progress names each round ``what`` round.
    """
    rounds = max(1, min(rounds, calls))
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for turn in range(rounds):
        _progress(f"{what} round {turn + 1}/{rounds}: {calls // rounds} calls of each kind")
        for name, path in paths.items():
            out = samples[name]
            for _ in range(calls // rounds):
                start = time.perf_counter()
                own = path()
                out.append(own if isinstance(own, float) else time.perf_counter() - start)
    return samples


# ---------------------------------------------------------------------- 2. transfer


def _transfer_figures(options: KVBenchOptions, url: str, tmp: str) -> dict[str, Any]:
    """Batched store and retrieve GB/s on the shm path vs a single-threaded torch copy."""
    per_chunk = _CHUNK_SIZE // _BLOCK_SIZE
    moved_blocks = options.chunks * per_chunk
    num_blocks = 2 * moved_blocks
    shape = (2, num_blocks, _BLOCK_SIZE, options.heads, options.head_dim)
    layers = [shared_empty(shape, torch.float16) for _ in range(options.layers)]
    layout = KVLayout.from_tensors(layers)
    chunk_nbytes = layout.chunk_nbytes(per_chunk)
    nbytes = options.chunks * chunk_nbytes
    generator = torch.Generator().manual_seed(2)
    for layer in layers:  # random bytes: retrieved blocks differ from what was there
        layer.view(torch.uint8).random_(generator=generator)
    order = torch.randperm(num_blocks, generator=generator).tolist()
    store_ids, retrieve_ids = order[:moved_blocks], order[moved_blocks:]
    tokens = random.Random(2).choices(range(32000), k=options.chunks * _CHUNK_SIZE)
    # Room for the batch and a little more: stores never evict, slots get reused after clear.
    buffer_gib = math.ceil(nbytes * 1.25 / (1 << 20)) / 1024
    server_options = ("--chunk-size", str(_CHUNK_SIZE), "--cpu-buffer-size", f"{buffer_gib!r}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.ExitStack() as stack:
            for layer in layers:
                stack.callback(release_shared, layer)
            stack.enter_context(_kv_server(url, tmp, *server_options))
            client = stack.enter_context(_client(url))
            worker = stack.enter_context(WorkerAdapter(url, _MODEL, 1, 0, _BLOCK_SIZE))
            worker.register_kv_caches({f"layer.{i}": t for i, t in enumerate(layers)})
            store_op = LoadStoreOp(store_ids, tokens)
            retrieve_op = LoadStoreOp(retrieve_ids, tokens)
            src = torch.empty(nbytes, dtype=torch.uint8).random_(generator=generator)
            dst = torch.empty_like(src)
            serial = iter(range(1 << 62))

            def store(worker: WorkerAdapter = worker, client: SyncClient = client) -> float:
                request_id = f"store-{next(serial)}"
                start = time.perf_counter()
                worker.submit_store_request(request_id, store_op)
                wait_finished(worker, request_id, store=True)
                elapsed = time.perf_counter() - start
                stats = client.call(protocols.STATS)
                if stats["chunks"] != options.chunks:
                    raise KVError(
                        f"a store of {options.chunks} chunks left {stats['chunks']} on the "
                        f"server ({stats['store_refused']} refused, "
                        f"{stats['store_duplicates']} already there)"
                    )
                return elapsed

            def retrieve(worker: WorkerAdapter = worker, client: SyncClient = client) -> float:
                request_id = f"retrieve-{next(serial)}"
                start = time.perf_counter()
                worker.submit_retrieve_request(request_id, retrieve_op)
                wait_finished(worker, request_id, store=False)
                elapsed = time.perf_counter() - start
                failed = worker.get_block_ids_with_load_errors()
                if failed:
                    raise KVError(f"a retrieve could not fill {len(failed)} blocks")
                client.call(protocols.CLEAR)  # the next store finds the chunks absent
                return elapsed

            def memcpy() -> float:
                start = time.perf_counter()
                dst.copy_(src)
                return time.perf_counter() - start

            _progress(
                f"transfer: {options.chunks} chunks of {chunk_nbytes >> 10} KiB "
                f"({layout.describe()}), {nbytes / 1e6:.0f} MB a batch"
            )
            # The first round touches the pool's pages and the copy's buffers: not timed.
            store()
            verified = _retrieve_and_compare(
                layers, store_ids, retrieve_ids, retrieve, layout.block_dim
            )
            memcpy()
            # Beside it, the same store on a server that computes no checksums, and the same
            # retrieve on one that verifies every retrieve, each registered with too.
            others = {}
            for name, flag, index in (
                ("unsummed", "--no-checksums", 1),
                ("verified", "--verify-retrieves", 2),
            ):
                other_url = figure_url(url, index)
                stack.enter_context(_kv_server(other_url, tmp, *server_options, flag))
                other_client = stack.enter_context(_client(other_url))
                other = stack.enter_context(WorkerAdapter(other_url, _MODEL, 1, 0, _BLOCK_SIZE))
                other.register_kv_caches({f"layer.{i}": t for i, t in enumerate(layers)})
                others[name] = (other, other_client)
                store(*others[name])  # the first round of each: not timed
                retrieve(*others[name])
            taken: dict[str, list[float]] = {
                "store": [],
                "unsummed_store": [],
                "retrieve": [],
                "verifying_retrieve": [],
                "memcpy": [],
            }
            for turn in range(options.rounds):
                _progress(f"transfer round {turn + 1}/{options.rounds}: store, retrieve, copy")
                taken["store"].append(store())
                taken["unsummed_store"].append(store(*others["unsummed"]))
                others["unsummed"][1].call(protocols.CLEAR)
                taken["retrieve"].append(retrieve())
                store(*others["verified"])
                taken["verifying_retrieve"].append(retrieve(*others["verified"]))
                taken["memcpy"].append(memcpy())
    finally:
        torch.set_num_threads(threads)
    figures: dict[str, Any] = {
        "transfer_url": url,
        "transfer_layout": layout.describe(),
        "transfer_chunks": options.chunks,
        "transfer_bytes": nbytes,
        "transfer_rounds": options.rounds,
        "retrieve_verified": verified,
    }
    for name, seconds in taken.items():
        median = statistics.median(seconds)
        figures[f"{name}_ms"] = median * 1e3
        figures[f"{name}_gb_per_s"] = nbytes / median / 1e9
    # What the checksums cost a store (computed in the copy threads), and what
    # --verify-retrieves costs a retrieve, each against the same call without, same run.
    figures["store_checksum_overhead"] = figures["store_ms"] / figures["unsummed_store_ms"] - 1
    figures["retrieve_verify_overhead"] = (
        figures["verifying_retrieve_ms"] / figures["retrieve_ms"] - 1
    )
    store_ratio = figures["store_gb_per_s"] / figures["memcpy_gb_per_s"]
    retrieve_ratio = figures["retrieve_gb_per_s"] / figures["memcpy_gb_per_s"]
    figures["store_to_memcpy_ratio"] = store_ratio
    figures["retrieve_to_memcpy_ratio"] = retrieve_ratio
    figures["transfer_goal"] = goal(
        min(store_ratio, retrieve_ratio) >= _TRANSFER_GOAL,
        f"store and retrieve each >= {_TRANSFER_GOAL:g}x single-threaded memcpy",
    )
    return figures


def _retrieve_and_compare(
    layers: list[torch.Tensor],
    store_ids: list[int],
    retrieve_ids: list[int],
    retrieve: Callable[[], float],
    block_dim: int,
) -> bool:
    """Retrieve once and check every retrieved block equals the block it was stored from."""
    stored = torch.tensor(store_ids)
    into = torch.tensor(retrieve_ids)
    as_bytes = [layer.view(torch.uint8) for layer in layers]
    before = all(
        torch.equal(t.index_select(block_dim, stored), t.index_select(block_dim, into))
        for t in as_bytes
    )
    retrieve()
    after = all(
        torch.equal(t.index_select(block_dim, stored), t.index_select(block_dim, into))
        for t in as_bytes
    )
    if before or not after:
        raise KVError("the retrieved blocks do not hold the bytes that were stored")
    return True


# ---------------------------------------------------------------------- 3. memory


#: Tokens per tiny chunk: one block of 16 one-byte tokens, one layer (the server's chunk size).
TINY_CHUNK_TOKENS = _BLOCK_SIZE


def tiny_layer(batch: int) -> tuple[torch.Tensor, KVLayout, int]:
    """A shared-memory KV layer of ``batch`` tiny chunks, its layout and a chunk's bytes.

    A tiny chunk is the smallest the service takes: one block of 16 one-byte tokens in one
    layer, for a server run with ``--chunk-size`` :data:`TINY_CHUNK_TOKENS`. The caller
    releases the layer (:func:`~kvrpc.kv.shm.release_shared`).
    """
    layer = shared_empty((batch, _BLOCK_SIZE, 1), torch.uint8)
    layout = KVLayout.from_tensors([layer])
    return layer, layout, layout.chunk_nbytes(1)


def register_tiny(client: SyncClient, me: bytes, layer: torch.Tensor, layout: KVLayout) -> Any:
    """Register :func:`tiny_layer`'s ``layer`` for client id ``me``; returns the instance."""
    registration = KVCacheRegistration(
        model_name=_MODEL,
        world_size=1,
        worker_id=0,
        block_size=_BLOCK_SIZE,
        mode="shm",
        layout=layout,
        tensors=[shared_ref(layer)],
    )
    return client.call(protocols.REGISTER_KV_CACHE, me, registration)


def store_tiny(
    client: SyncClient, me: bytes, instance: Any, count: int, batch: int, what: str
) -> int:
    """Store ``count`` tiny chunks of fresh random keys, ``batch`` a raw ``kv.store`` call.

    ``instance`` is :func:`register_tiny`'s, for a layer of at least ``batch`` chunks; the
    stores read its first rows. Progress names ``what``. Returns the chunks refused.
    """
    rows = torch.arange(batch, dtype=torch.int64).view(batch, 1)
    stored, refused, reported = 0, 0, 0.0
    while stored < count:
        n = min(batch, count - stored)
        keys = KeyBatch(_MODEL, 1, 0, os.urandom(HASH_SIZE * n))
        reply = client.call(protocols.STORE, me, instance, keys, rows[:n].clone(), [])
        refused += len(reply.failed())
        stored += n
        if stored / count >= reported + 0.1:
            reported = stored / count
            _progress(f"{what}: {stored:,} of {count:,} chunks stored")
    return refused


def _memory_figures(options: KVBenchOptions, url: str, tmp: str) -> dict[str, Any]:
    """Server resident memory per stored chunk, beyond the pool pages the chunks fill."""
    count, batch = options.tiny_chunks, min(options.tiny_batch, options.tiny_chunks)
    layer, layout, slot = tiny_layer(batch)
    # Exactly `count` slots: the server floors GiB * 2**30 to bytes, then to slots, so half a
    # slot more keeps float rounding from costing one.
    buffer_gib = (count * slot + slot / 2) / _GIB
    server_options = (
        "--chunk-size",
        str(_BLOCK_SIZE),
        "--cpu-buffer-size",
        f"{buffer_gib!r}",
        "--client-timeout",
        "600",
    )
    try:
        with _kv_server(url, tmp, *server_options) as pid, _client(url) as client:
            me = secrets.token_bytes(16)
            client.call(protocols.STATS)
            rss_start = proc_status(pid, "VmRSS")
            instance = register_tiny(client, me, layer, layout)
            capacity = client.call(protocols.STATS)["bytes_free"]
            if capacity != count * slot:
                raise KVError(f"the pool holds {capacity // slot} chunks, not {count}")
            rss_registered = proc_status(pid, "VmRSS")
            _progress(f"memory: storing {count:,} chunks of {slot} bytes, {batch} a message")
            start = time.perf_counter()
            refused = store_tiny(client, me, instance, count, batch, "memory")
            elapsed = time.perf_counter() - start
            rss_after = proc_status(pid, "VmRSS")
            peak = proc_status(pid, "VmHWM")
            stats = client.call(protocols.STATS)
    finally:
        release_shared(layer)
    if refused or stats["chunks"] != count or stats["evictions"]:
        raise KVError(
            f"of {count} tiny chunks {refused} were refused; the server holds {stats['chunks']} "
            f"after {stats['evictions']} evictions"
        )
    touched = stats["bytes_used"]  # every used slot's bytes were written once
    per_chunk = (rss_after - rss_start - touched) / count
    figures: dict[str, Any] = {
        "memory_url": url,
        "tiny_layout": layout.describe(),
        "tiny_chunks": count,
        "tiny_chunk_bytes": slot,
        "tiny_store_chunks_per_s": count / elapsed,
        "tiny_rss_start_bytes": rss_start,
        "tiny_rss_registered_bytes": rss_registered,
        "tiny_rss_after_bytes": rss_after,
        "tiny_pool_bytes_touched": touched,
        "tiny_rss_peak_bytes": peak,
        "tiny_metadata_bytes_per_chunk": per_chunk,
        "tiny_store_growth_bytes_per_chunk": (rss_after - rss_registered - touched) / count,
    }
    figures["memory_goal"] = goal(
        per_chunk <= _METADATA_GOAL, f"<= {_METADATA_GOAL:g} bytes of metadata per chunk"
    )
    return figures
