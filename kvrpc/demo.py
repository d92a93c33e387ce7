"""``kvrpc demo``: a KV server, a scheduler and two worker processes serving a prompt twice.

The first time the server holds nothing (a miss): the workers "compute" the prompt's KV (a
deterministic fill standing in for the model) and store it. The second time the scheduler's
lookup matches the prompt's whole chunks (a hit) and the workers retrieve them into other
blocks, checking every byte against what they stored.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch

from kvrpc.bench._child import default_url, kv_server_child
from kvrpc.errors import KvrpcError

__all__ = ["run_demo"]

MODEL = "demo-model"
WORLD_SIZE = 2
BLOCK_SIZE = 16
CHUNK_SIZE = 256
NUM_BLOCKS = 160
LAYERS = 4
LAYER_SHAPE = (2, NUM_BLOCKS, BLOCK_SIZE, 2, 64)  # [K/V, blocks, tokens, heads, head dim]
PROMPT_TOKENS = 4 * CHUNK_SIZE + 10  # four whole chunks and a partial one


def run_demo(url: str | None = None) -> None:
    """Run the demo, printing what happens; raises :class:`KvrpcError` if it goes wrong."""
    with tempfile.TemporaryDirectory(prefix="kvrpc-demo-") as tmp:
        url = url or default_url(tmp)
        with kv_server_child(url, tmp, "--cpu-buffer-size", "0.25") as server:
            print(f"server: {server.ready_line}")
            try:
                with _workers(url) as workers:
                    _serve_prompt_twice(url, workers)
            except BaseException:
                print(f"server log:\n{server.log_tail()}", file=sys.stderr)
                raise


@contextlib.contextmanager
def _workers(url: str) -> Iterator[list[multiprocessing.connection.Connection]]:
    context = multiprocessing.get_context("spawn")
    pipes, processes = [], []
    try:
        for rank in range(WORLD_SIZE):
            ours, theirs = context.Pipe()
            process = context.Process(target=_worker, args=(url, rank, theirs), daemon=True)
            process.start()
            pipes.append(ours)
            processes.append(process)
        for rank, pipe in enumerate(pipes):
            print(f"worker {rank}: {_answer(pipe)}")
        yield pipes
    finally:
        for pipe in pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()


def _answer(pipe: multiprocessing.connection.Connection, timeout: float = 60.0) -> Any:
    if not pipe.poll(timeout):
        raise KvrpcError(f"a demo worker did not answer within {timeout:g} s")
    answer = pipe.recv()
    if isinstance(answer, BaseException):
        raise KvrpcError(f"a demo worker failed: {answer!r}")
    return answer


def _serve_prompt_twice(url: str, workers: list[multiprocessing.connection.Connection]) -> None:
    from kvrpc.client import SyncClient
    from kvrpc.kv import PollingSchedulerAdapter, protocols

    prompt = random.Random(7).choices(range(32000), k=PROMPT_TOKENS)
    blocks_needed = -(-PROMPT_TOKENS // BLOCK_SIZE)
    with PollingSchedulerAdapter(url, MODEL, WORLD_SIZE, 0, BLOCK_SIZE) as scheduler:
        for turn, first_block in ((1, 0), (2, 80)):
            request_id = f"request-{turn}"
            block_ids = list(range(first_block, first_block + blocks_needed))
            started = time.perf_counter()
            scheduler.maybe_submit_lookup_request(request_id, token_ids=prompt)
            matched = scheduler.check_lookup_result(request_id)
            lookup_us = (time.perf_counter() - started) * 1e6
            verdict = "hit" if matched else "miss"
            print(
                f"{request_id}: lookup -> {verdict}: {matched} of {PROMPT_TOKENS} prompt "
                f"tokens cached ({lookup_us:.0f} us)"
            )
            if matched:
                op = ("retrieve", request_id, prompt, block_ids, matched)
            else:
                op = ("store", request_id, prompt, block_ids, 0)
            for pipe in workers:
                pipe.send(op)
            reports = [_answer(pipe) for pipe in workers]
            for rank, report in enumerate(reports):
                print(f"  worker {rank}: {report['text']}")
            scheduler.end_session(request_id)
            if turn == 1 and matched:
                raise KvrpcError("the first lookup matched tokens on an empty server")
            if turn == 2 and (matched != 4 * CHUNK_SIZE or not all(r["ok"] for r in reports)):
                raise KvrpcError("the second lookup did not hit, or the retrieved bytes differ")
    with SyncClient(url, registry=protocols.kv_registry(), timeout=5) as client:
        stats = client.call(protocols.STATS)
    shown = ("hits", "misses", "stores", "retrieves", "chunks", "bytes_used", "evictions")
    print("server kv.stats: " + " ".join(f"{name}={stats[name]}" for name in shown))


# ---------------------------------------------------------------------- worker processes


def _fill(layers: list[torch.Tensor], prompt: list[int], block_ids: list[int], rank: int) -> None:
    """Stand-in for the model: KV values that depend on the tokens, the rank and the layer."""
    generator = torch.Generator().manual_seed(sum(prompt) * 31 + len(prompt) * 7 + rank)
    ids = torch.tensor(block_ids)
    for layer in layers:
        values = torch.randn((2, len(block_ids), *layer.shape[2:]), generator=generator)
        layer[:, ids] = values.to(layer.dtype)


def _worker(url: str, rank: int, pipe: multiprocessing.connection.Connection) -> None:
    try:
        from kvrpc.kv import WorkerAdapter, shared_empty

        layers = [shared_empty(LAYER_SHAPE, torch.float16) for _ in range(LAYERS)]
        adapter = WorkerAdapter(url, MODEL, WORLD_SIZE, rank, BLOCK_SIZE)
        adapter.register_kv_caches({f"layer.{i}": t for i, t in enumerate(layers)})
        nbytes = sum(t.numel() * t.element_size() for t in layers)
        pipe.send(f"pid {os.getpid()}, {LAYERS} layers, {nbytes >> 20} MiB of KV in shared memory")
    except BaseException as exc:
        pipe.send(exc)
        return
    with adapter:
        while (command := pipe.recv()) is not None:
            try:
                pipe.send(_work(adapter, layers, rank, *command))
            except BaseException as exc:
                pipe.send(exc)


def _work(
    adapter: Any,
    layers: list[torch.Tensor],
    rank: int,
    what: str,
    request_id: str,
    prompt: list[int],
    block_ids: list[int],
    matched: int,
) -> dict[str, Any]:
    from kvrpc.kv import KVLayout, LoadStoreOp

    chunk_blocks = CHUNK_SIZE // BLOCK_SIZE
    whole_chunks = len(prompt) // CHUNK_SIZE
    per_chunk_bytes = KVLayout.from_tensors(layers).chunk_nbytes(chunk_blocks)
    started = time.perf_counter()
    if what == "store":
        _fill(layers, prompt, block_ids, rank)
        adapter.submit_store_request(request_id, LoadStoreOp(block_ids, token_ids=prompt))
        stores: set[str] = set()
        while request_id not in stores:
            stores |= adapter.get_finished({request_id})[0]
            time.sleep(0.001)
        ms = (time.perf_counter() - started) * 1e3
        moved = whole_chunks * per_chunk_bytes
        return {
            "ok": True,
            "text": (
                f"computed the KV, stored {whole_chunks} chunks ({moved >> 10} KiB) in {ms:.1f} ms"
            ),
        }
    op = LoadStoreOp(block_ids, token_ids=prompt, end=matched)
    adapter.submit_retrieve_request(request_id, op)
    retrieves: set[str] = set()
    while request_id not in retrieves:
        retrieves |= adapter.get_finished(set())[1]
        time.sleep(0.001)
    ms = (time.perf_counter() - started) * 1e3
    chunks = matched // CHUNK_SIZE
    got = [layer[:, block_ids[: chunks * chunk_blocks]].clone() for layer in layers]
    expected = [torch.empty_like(layer) for layer in layers]
    _fill(expected, prompt, block_ids, rank)
    ok = not adapter.get_block_ids_with_load_errors() and all(
        torch.equal(g, e[:, block_ids[: chunks * chunk_blocks]])
        for g, e in zip(got, expected, strict=True)
    )
    moved = chunks * per_chunk_bytes
    return {
        "ok": ok,
        "text": (
            f"retrieved {chunks} chunks ({moved >> 10} KiB) into blocks {block_ids[0]}.. in "
            f"{ms:.1f} ms; byte-identical to what was stored: {ok}"
        ),
    }
