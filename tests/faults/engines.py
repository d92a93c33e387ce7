"""Engine processes for the fault campaigns: a worker and a scheduler of one model each.

Each is a ``spawn``ed process driven over a pipe. A chunk's bytes depend only on its prompt and
its index in it (:func:`chunk_bytes`), so a process retrieving a chunk another one stored
checks every byte it got: a chunk is good, corrupt (wrong bytes, never allowed), or missed
(reported as a load error, which is allowed).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
from typing import Any

import torch

BLOCK = 4
CHUNK = 8
BPC = CHUNK // BLOCK
NUM_BLOCKS = 64
LAYERS = 2
LAYER_SHAPE = (2, NUM_BLOCKS, BLOCK, 1, 8)
SLOT = LAYERS * 2 * BPC * BLOCK * 8 * 2  # bytes of one chunk, float16
RETRIEVE_AT = NUM_BLOCKS // 2  # retrieves land in the upper half of the KV cache
WAIT = 30.0


def prompt(seed: int, chunks: int) -> list[int]:
    """Tokens of ``chunks`` whole chunks (and 3 more), sharing no prefix with another seed's."""
    return [seed * 100_000 + i for i in range(chunks * CHUNK + 3)]


def chunk_bytes(seed: int, index: int) -> torch.Tensor:
    """Chunk ``index`` of prompt ``seed``: per layer, its K/V blocks, as the cache holds them."""
    generator = torch.Generator().manual_seed(seed * 1000 + index)
    return torch.randn((LAYERS, 2, BPC, *LAYER_SHAPE[2:]), generator=generator).half()


def server_options(slots: int, client_timeout: float, *more: str) -> tuple[str, ...]:
    """``kvrpc serve`` options for these engines: their chunk size and an L1 of ``slots``."""
    return (
        "--chunk-size", str(CHUNK),
        "--cpu-buffer-size", repr(slots * SLOT / 2**30),
        "--client-timeout", str(client_timeout),
        *more,
    )  # fmt: skip


def _engine_main(
    url: str, model: str, role: str, pipe: multiprocessing.connection.Connection
) -> None:
    """Serve the test's commands until it sends None (or kills this process)."""
    from kvrpc.kv import LoadStoreOp, PollingSchedulerAdapter, WorkerAdapter, shared_empty

    scheduler = PollingSchedulerAdapter(
        url, model, 1, 0, BLOCK, lookup_timeout=WAIT, keepalive_interval=0.2
    )
    worker = None
    layers: list[torch.Tensor] = []
    if role == "engine":
        layers = [shared_empty(LAYER_SHAPE, torch.float16) for _ in range(LAYERS)]
        worker = WorkerAdapter(url, model, 1, 0, BLOCK, keepalive_interval=0.2)
        worker.register_kv_caches({f"layer{i}": t for i, t in enumerate(layers)})
    pipe.send(os.getpid())

    def lookup(request_id: str, tokens: list[int]) -> int:
        scheduler.maybe_submit_lookup_request(request_id, token_ids=tokens)
        return scheduler.check_lookup_result(request_id)

    def wait(request_id: str, stores: bool) -> None:
        assert worker is not None
        finished: set[str] = set()
        while request_id not in finished:
            done = worker.get_finished({request_id} if stores else set())
            finished |= done[0] if stores else done[1]

    while (command := pipe.recv()) is not None:
        what, request_id, seed, chunks = command
        tokens = prompt(seed, chunks)
        if what == "hold":  # a lookup whose pins stay until this process ends the session
            pipe.send(lookup(request_id, tokens))
            continue
        assert worker is not None
        hit = lookup(request_id, tokens) // CHUNK
        if hit == 0:
            ids = list(range(chunks * BPC + 1))
            for c in range(chunks):
                data = chunk_bytes(seed, c)
                for i, layer in enumerate(layers):
                    layer[:, c * BPC : (c + 1) * BPC] = data[i]
            worker.submit_store_request(request_id, LoadStoreOp(ids, token_ids=tokens))
            pipe.send("submitted")
            wait(request_id, stores=True)
            scheduler.end_session(request_id)
            pipe.send(("stored", chunks))
            continue
        ids = list(range(RETRIEVE_AT, RETRIEVE_AT + chunks * BPC + 1))
        for layer in layers:  # a retrieve that writes nothing cannot pass
            layer[:, RETRIEVE_AT:] = 0
        op = LoadStoreOp(ids, token_ids=tokens, end=hit * CHUNK)
        worker.submit_retrieve_request(request_id, op)
        pipe.send("submitted")
        wait(request_id, stores=False)
        errors = worker.get_block_ids_with_load_errors()
        good = corrupt = missed = 0
        for c in range(hit):
            blocks = ids[c * BPC : (c + 1) * BPC]
            if errors & set(blocks):
                missed += 1
                continue
            got = torch.stack([layer[:, blocks[0] : blocks[-1] + 1] for layer in layers])
            if torch.equal(got.view(torch.int16), chunk_bytes(seed, c).view(torch.int16)):
                good += 1
            else:
                corrupt += 1
        scheduler.end_session(request_id)
        pipe.send(("retrieved", good, corrupt, missed))
    scheduler.close()
    if worker is not None:
        worker.shutdown()


class Engine:
    """The test's handle on one engine process (``role`` "engine") or scheduler ("scheduler")."""

    def __init__(self, url: str, model: str, role: str = "engine") -> None:
        context = multiprocessing.get_context("spawn")
        self.pipe, theirs = context.Pipe()
        self.process: Any = context.Process(
            target=_engine_main, args=(url, model, role, theirs), daemon=True
        )
        self.process.start()
        self.pid: int = self.answer()

    def answer(self) -> Any:
        """The process's next message; fails the test if none comes within WAIT."""
        if not self.pipe.poll(WAIT):
            raise AssertionError(f"engine process {self.process.pid} did not answer in {WAIT} s")
        return self.pipe.recv()

    def round(self, request_id: str, seed: int, chunks: int) -> tuple[Any, ...]:
        """Look prompt ``seed`` up: store it on a miss, retrieve and check it on a hit."""
        self.pipe.send(("round", request_id, seed, chunks))
        assert self.answer() == "submitted"
        result: tuple[Any, ...] = self.answer()
        return result

    def hold(self, request_id: str, seed: int, chunks: int) -> int:
        """Look prompt ``seed`` up and keep the pins; the tokens hit."""
        self.pipe.send(("hold", request_id, seed, chunks))
        hit: int = self.answer()
        return hit

    def kill(self) -> None:
        """SIGKILL, and reap the process."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(WAIT)

    def close(self) -> None:
        if self.process.is_alive():
            self.pipe.send(None)
            self.process.join(WAIT)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(WAIT)
