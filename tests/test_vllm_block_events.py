"""kvrpc's ``kv.events`` as vLLM's block events: the connector's rules, without vLLM.

:class:`BlockEvents` is fed ``KVEvent`` items as the server sends them and told vLLM's names
for chunks as the connector sees their requests; these tests check what it answers, as
plain calls (vLLM's own Scheduler and publisher, with a real server, are in
tests/vllm_scheduler; the feed's threads against real servers in tests/kv).
"""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys
from array import array

import pytest

from kvrpc.integrations.vllm.block_events import (
    MEDIUM_CPU,
    MEDIUM_STORAGE,
    BlockEvents,
    ChunkNames,
    RemovedBlocks,
    StoredBlocks,
    chunk_names,
    expected_ranks,
    tier_medium,
)
from kvrpc.integrations.vllm.settings import ConnectorSettings
from kvrpc.kv.keys import hashes_from_tokens
from kvrpc.kv.protocols import KVEvent

MODEL = "m"
NS = b"namespc1"
CHUNK, BLOCK = 64, 16
PER_CHUNK = CHUNK // BLOCK
_seq = itertools.count(1)


def event(kind: str, hashes: list[bytes] = (), rank: int = 0, **fields: object) -> KVEvent:  # type: ignore[assignment]
    values: dict[str, object] = {
        "kind": kind,
        "seq": next(_seq),
        "tier": "l1",
        "namespace": NS,
        "model_name": MODEL,
        "world_size": 2,
        "worker_id": rank,
        "hashes": list(hashes),
        "chunk_tokens": CHUNK,
    }
    values.update(fields)
    return KVEvent(**values)  # type: ignore[arg-type]


def stored(hashes: list[bytes], rank: int = 0, **fields: object) -> KVEvent:
    return event("stored", hashes, rank, **fields)


def removed(hashes: list[bytes], rank: int = 0, **fields: object) -> KVEvent:
    return event("removed", hashes, rank, reason="evicted", **fields)


def vllm_hashes(tokens: list[int]) -> list[bytes]:
    """Stand-in vLLM block hashes: a chain of its own, unlike kvrpc's."""
    out: list[bytes] = []
    parent = b"vllm"
    for start in range(0, len(tokens) - len(tokens) % BLOCK, BLOCK):
        parent = hashlib.sha256(parent + repr(tokens[start : start + BLOCK]).encode()).digest()
        out.append(parent)
    return out


class Prompt:
    """A prompt's tokens, kvrpc chunk hashes, and vLLM block hashes and names."""

    def __init__(self, chunks: int, seed: int) -> None:
        self.tokens = [seed * 10_000 + i for i in range(chunks * CHUNK)]
        self.chunks = hashes_from_tokens(self.tokens, CHUNK)
        self.blocks = vllm_hashes(self.tokens)
        self.names = chunk_names(
            self.blocks, self.tokens, 0, chunks, chunk_size=CHUNK, block_size=BLOCK
        )

    def name_all(self, events: BlockEvents) -> None:
        for chunk_hash, names in zip(self.chunks, self.names, strict=True):
            events.name(chunk_hash, names)


def table(world_size: int = 2, **options: object) -> BlockEvents:
    return BlockEvents(MODEL, world_size, expected_ranks(world_size, world_size, False), **options)  # type: ignore[arg-type]


def both_ranks(events: BlockEvents, hashes: list[bytes], server: int = 0, **fields: object) -> None:
    events.feed(server, stored(hashes, 0, **fields))
    events.feed(server, stored(hashes, 1, **fields))


# ---------------------------------------------------------------------- names


def test_a_chunks_names_are_its_blocks_vllm_hashes_parent_and_tokens() -> None:
    p = Prompt(3, seed=1)
    second = p.names[1]
    assert second.block_hashes == tuple(p.blocks[4:8])
    assert second.parent_block_hash == p.blocks[3]
    assert list(second.token_ids) == p.tokens[64:128]
    assert second.block_size == BLOCK
    assert p.names[0].parent_block_hash is None
    assert [n.block_hashes for n in p.names] == [tuple(p.blocks[i : i + 4]) for i in (0, 4, 8)]


def test_with_finer_hashes_a_blocks_hash_is_the_last_of_its_own() -> None:
    tokens = list(range(CHUNK * 2))
    fine = [bytes([i]) * 32 for i in range(len(tokens) // 8)]  # vLLM hashed every 8 tokens
    names = chunk_names(fine, tokens, 1, 2, chunk_size=CHUNK, block_size=BLOCK, hashes_per_block=2)
    assert names[0].block_hashes == (fine[9], fine[11], fine[13], fine[15])
    assert names[0].parent_block_hash == fine[7]


def test_names_stop_where_vllm_has_not_hashed_the_blocks_or_tokens_are_missing() -> None:
    p = Prompt(3, seed=2)
    assert len(chunk_names(p.blocks[:10], p.tokens, 0, 3, chunk_size=CHUNK, block_size=BLOCK)) == 2
    assert len(chunk_names(p.blocks, p.tokens[:130], 0, 3, chunk_size=CHUNK, block_size=BLOCK)) == 2
    huge = [*p.tokens[:63], 2**40]  # kvrpc cannot hash it either
    assert chunk_names(p.blocks, huge, 0, 1, chunk_size=CHUNK, block_size=BLOCK) == []


def test_the_ranks_expected_on_each_server_follow_the_writers() -> None:
    assert expected_ranks(1, 1, False) == (0b1,)
    assert expected_ranks(4, 4, False) == (0b1111,)
    assert expected_ranks(4, 2, False, hosts=2) == (0b0011, 0b1100)
    # MLA: one kv rank per stage, stored by the first rank of the stage on each host.
    assert expected_ranks(4, 4, True, hosts=2) == (0b1, 0b1)
    assert expected_ranks(8, 4, True) == (0b11,)


def test_kvrpcs_l1_is_vllms_cpu_medium_and_lower_tiers_are_storage() -> None:
    assert tier_medium("l1") == MEDIUM_CPU == "CPU"
    assert tier_medium("disk") == tier_medium("redis") == MEDIUM_STORAGE == "STORAGE"


# ---------------------------------------------------------------------- stores


def test_a_chunk_is_told_stored_once_every_rank_holds_it_in_vllms_names() -> None:
    p = Prompt(3, seed=3)
    events = table()
    p.name_all(events)
    events.feed(0, stored(p.chunks, rank=0))
    assert events.take() == []  # rank 1 has not stored yet: not loadable
    events.feed(0, stored(p.chunks, rank=1))
    told = events.take()
    # One BlockStored for the three chunks: each continues the previous one's chain.
    assert told == [
        StoredBlocks(
            tuple(p.blocks),
            None,
            tuple(p.tokens),
            BLOCK,
            None,
            None,
            MEDIUM_CPU,
            "kvrpc:l1",
        )
    ]
    events.feed(0, stored(p.chunks, rank=1))  # told again (a duplicate report): no news
    assert events.take() == []


def test_chunks_of_two_prompts_are_told_apart_and_a_later_chunk_names_its_parent() -> None:
    a, b = Prompt(2, seed=4), Prompt(2, seed=5)
    events = table()
    a.name_all(events)
    b.name_all(events)
    both_ranks(events, [a.chunks[0], b.chunks[0], a.chunks[1]])
    told = events.take()
    assert (
        [e.block_hashes for e in told]
        == [  # type: ignore[union-attr]
            tuple(a.blocks[:4]),
            tuple(b.blocks[:4]),
            tuple(a.blocks[4:]),
        ]
    )
    assert isinstance(told[2], StoredBlocks) and told[2].parent_block_hash == a.blocks[3]


def test_events_of_other_models_world_sizes_or_unknown_models_are_not_this_engines() -> None:
    p = Prompt(1, seed=6)
    events = table()
    p.name_all(events)
    for other in ({"model_name": "other"}, {"world_size": 4}, {"model_name": None}):
        both_ranks(events, p.chunks, **other)
    events.feed(0, stored(p.chunks, rank=7))
    assert events.take() == []


def test_a_move_to_disk_is_a_store_on_storage() -> None:
    p = Prompt(1, seed=7)
    events = table()
    p.name_all(events)
    for rank in (0, 1):
        events.feed(0, event("moved", p.chunks, rank, tier="disk", source="l1"))
    (told,) = events.take()
    assert isinstance(told, StoredBlocks)
    assert (told.medium, told.ownership) == (MEDIUM_STORAGE, "kvrpc:disk")


# ---------------------------------------------------------------------- removals


def test_a_chunk_is_told_removed_when_any_rank_loses_it_and_only_once() -> None:
    p = Prompt(2, seed=8)
    events = table()
    p.name_all(events)
    both_ranks(events, p.chunks)
    events.take()
    events.feed(0, removed([p.chunks[1]], rank=1))
    assert events.take() == [RemovedBlocks(tuple(p.blocks[4:]), MEDIUM_CPU, "kvrpc:l1")]
    events.feed(0, removed([p.chunks[1]], rank=0))
    assert events.take() == []
    events.feed(0, removed([p.chunks[0]], rank=0))
    events.feed(0, removed([p.chunks[0]], rank=1))
    assert events.take() == [RemovedBlocks(tuple(p.blocks[:4]), MEDIUM_CPU, "kvrpc:l1")]
    assert len(events) == 2  # the names stay: the prompt may come back


def test_a_removal_of_a_chunk_never_told_is_not_told() -> None:
    p = Prompt(1, seed=9)
    events = table()
    p.name_all(events)
    events.feed(0, stored(p.chunks, rank=0))
    events.feed(0, removed(p.chunks, rank=0))
    assert events.take() == []


def test_a_cleared_tier_withdraws_everything_told_on_it_and_nothing_else() -> None:
    p, q = Prompt(2, seed=10), Prompt(1, seed=11)
    events = table()
    p.name_all(events)
    q.name_all(events)
    both_ranks(events, p.chunks)
    both_ranks(events, q.chunks, tier="disk")
    events.take()
    events.feed(0, event("cleared", [], tier="l1", namespace=b"", model_name=None))
    assert events.take() == [RemovedBlocks(tuple(p.blocks), MEDIUM_CPU, "kvrpc:l1")]
    events.feed(0, removed(q.chunks, tier="disk"))
    assert events.take() == [RemovedBlocks(tuple(q.blocks), MEDIUM_STORAGE, "kvrpc:disk")]


# ---------------------------------------------------------------------- unnamed chunks


def test_a_chunk_never_seen_is_told_by_its_kvrpc_hash_and_renamed_once_seen() -> None:
    p = Prompt(1, seed=12)
    events = table()
    both_ranks(events, p.chunks)
    assert events.take() == [
        StoredBlocks(tuple(p.chunks), None, (), 0, None, None, MEDIUM_CPU, "kvrpc:l1", named=False)
    ]
    p.name_all(events)  # a request looked it up: now it has vLLM's names
    assert events.take() == [
        RemovedBlocks(tuple(p.chunks), MEDIUM_CPU, "kvrpc:l1"),
        StoredBlocks(tuple(p.blocks), None, tuple(p.tokens), BLOCK, None, None, MEDIUM_CPU,
                     "kvrpc:l1"),
    ]  # fmt: skip
    events.feed(0, removed(p.chunks, rank=0))
    assert events.take() == [RemovedBlocks(tuple(p.blocks), MEDIUM_CPU, "kvrpc:l1")]


def test_unnamed_chunks_can_be_left_out_until_they_are_named() -> None:
    p = Prompt(1, seed=13)
    events = table(unnamed=False)
    both_ranks(events, p.chunks)
    assert events.take() == []
    p.name_all(events)
    (told,) = events.take()
    assert isinstance(told, StoredBlocks) and told.block_hashes == tuple(p.blocks)


def test_placeholders_are_never_merged_into_a_chain() -> None:
    p = Prompt(3, seed=14)
    events = table()
    both_ranks(events, p.chunks)
    assert [e.block_hashes for e in events.take()] == [(h,) for h in p.chunks]  # type: ignore[union-attr]


# ---------------------------------------------------------------------- snapshots


def test_a_snapshot_after_lost_events_withdraws_what_went_and_tells_what_came() -> None:
    kept, gone, new = Prompt(1, seed=15), Prompt(1, seed=16), Prompt(1, seed=17)
    events = table()
    for p in (kept, gone, new):
        p.name_all(events)
    both_ranks(events, kept.chunks + gone.chunks)
    events.take()
    events.feed(0, event("gap", [], namespace=b"", model_name=None, first=3, last=9))
    events.resubscribed(0)
    for rank in (0, 1):
        events.feed(0, event("snapshot", kept.chunks + new.chunks, rank))
    assert events.take() == []  # nothing is decided before the snapshot ends
    events.feed(0, event("snapshot_end", [], namespace=b"", model_name=None))
    told = events.take()
    assert len(told) == 2 and set(told) == {  # one event per chunk, in no particular order
        RemovedBlocks(tuple(gone.blocks), MEDIUM_CPU, "kvrpc:l1"),
        StoredBlocks(tuple(new.blocks), None, tuple(new.tokens), BLOCK, None, None, MEDIUM_CPU,
                     "kvrpc:l1"),
    }  # fmt: skip
    events.feed(0, removed(kept.chunks, rank=0))  # kept was still known as told
    assert events.take() == [RemovedBlocks(tuple(kept.blocks), MEDIUM_CPU, "kvrpc:l1")]


def test_a_snapshot_of_an_empty_server_withdraws_everything_it_had() -> None:
    p = Prompt(2, seed=18)
    events = table()
    p.name_all(events)
    both_ranks(events, p.chunks)
    events.take()
    events.resubscribed(0)  # the server restarted: it holds nothing now
    events.feed(0, event("snapshot_end", [], namespace=b"", model_name=None))
    assert events.take() == [RemovedBlocks(tuple(p.blocks), MEDIUM_CPU, "kvrpc:l1")]


# ---------------------------------------------------------------------- several servers


def test_with_a_server_per_host_a_chunk_is_held_once_both_hold_their_ranks() -> None:
    p = Prompt(1, seed=19)
    events = BlockEvents(MODEL, 2, expected_ranks(2, 2, False, hosts=2))
    p.name_all(events)
    events.feed(0, stored(p.chunks, rank=0))
    events.feed(0, stored(p.chunks, rank=1))  # rank 1 is host 1's: not this server's to vouch
    assert events.take() == []
    events.feed(1, stored(p.chunks, rank=1))
    assert len(events.take()) == 1
    events.resubscribed(1)  # host 1's server restarted, empty
    events.feed(1, event("snapshot_end", [], namespace=b"", model_name=None))
    assert events.take() == [RemovedBlocks(tuple(p.blocks), MEDIUM_CPU, "kvrpc:l1")]


# ---------------------------------------------------------------------- bounds


def test_the_table_forgets_the_least_recent_chunk_and_withdraws_it_first() -> None:
    a, b, c = Prompt(1, seed=20), Prompt(1, seed=21), Prompt(1, seed=22)
    events = table(max_chunks=2)
    a.name_all(events)
    b.name_all(events)
    both_ranks(events, a.chunks + b.chunks)
    events.take()
    c.name_all(events)  # a third chunk: a, least recently told of, goes
    assert events.take() == [RemovedBlocks(tuple(a.blocks), MEDIUM_CPU, "kvrpc:l1")]
    assert len(events) == 2 and events.forgotten == 1
    events.feed(0, removed(a.chunks))  # forgotten, and already withdrawn: nothing to tell
    assert events.take() == []


def test_a_bad_table_is_refused() -> None:
    with pytest.raises(ValueError, match="max_chunks"):
        BlockEvents(MODEL, 1, (1,), max_chunks=0)
    with pytest.raises(ValueError, match="rank mask"):
        BlockEvents(MODEL, 1, ())


def test_names_hold_tokens_as_int32() -> None:
    names = Prompt(1, seed=23).names[0]
    assert isinstance(names, ChunkNames)
    assert isinstance(names.token_ids, array) and names.token_ids.itemsize == 4


# ---------------------------------------------------------------------- settings


def test_kv_events_follow_vllm_by_default_and_their_keys_are_checked() -> None:
    default = ConnectorSettings()
    assert (default.kv_events, default.kv_events_chunks, default.kv_events_unnamed) == (
        None,
        16384,
        True,
    )
    on = ConnectorSettings.from_extra_config({"kvrpc.kv_events": True, "kvrpc.kv_events_chunks": 8})
    assert (on.kv_events, on.kv_events_chunks) == (True, 8)
    with pytest.raises(ValueError, match=r"kvrpc\.kv_events_chunks = 0"):
        ConnectorSettings.from_extra_config({"kvrpc.kv_events_chunks": 0})


def test_the_events_modules_do_not_import_vllm() -> None:
    code = (
        "import sys, kvrpc.integrations.vllm.block_events, kvrpc.integrations.vllm.event_feed; "
        "assert 'vllm' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
