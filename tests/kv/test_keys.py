"""kvrpc.kv.keys: cache keys, key batches, their wire form, and the chunk hashes."""

from __future__ import annotations

import array
import hashlib
import os
import random
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kvrpc
from kvrpc.codec import WIRE_VERSION, MessageKind, decode, encode_response
from kvrpc.errors import EncodeError, KVConfigError, ProtocolError
from kvrpc.kv.keys import (
    HASH_SIZE,
    CacheKey,
    KeyBatch,
    blocks_per_chunk,
    decode_batch,
    decode_key,
    encode_batch,
    encode_key,
    hashes_from_block_hashes,
    hashes_from_tokens,
)


def h(n: int) -> bytes:
    """A distinct, recognisable 32-byte hash."""
    return bytes([n]) * HASH_SIZE


def key(worker_id: int | None = 0, chunk_hash: bytes = h(1), model: str = "m") -> CacheKey:
    return CacheKey(model, 4, worker_id, chunk_hash)


# Independent statements of the hash definitions: plain hashlib and int.to_bytes, none of
# the module's code. A change of the definition in kvrpc must fail these tests.
def reference_token_hashes(tokens: Sequence[int], chunk_size: int) -> list[bytes]:
    previous = hashlib.sha256(b"kvrpc chunk hash v1").digest()
    hashes = []
    for i in range(len(tokens) // chunk_size):
        chunk = tokens[i * chunk_size : (i + 1) * chunk_size]
        data = b"".join(t.to_bytes(4, "little", signed=True) for t in chunk)
        previous = hashlib.sha256(previous + data).digest()
        hashes.append(previous)
    return hashes


def reference_block_hashes(block_hashes: Sequence[bytes | int], per_chunk: int) -> list[bytes]:
    previous = hashlib.sha256(b"kvrpc block hash v1").digest()
    hashes = []
    for raw in block_hashes[per_chunk - 1 :: per_chunk]:
        if isinstance(raw, bytes):
            tagged = b"\x00" + raw
        else:
            tagged = b"\x01" + raw.to_bytes(16, "little", signed=True)
        previous = hashlib.sha256(previous + tagged).digest()
        hashes.append(previous)
    return hashes


def tokens(count: int, seed: int = 0) -> list[int]:
    return [(i * 7919 + seed * 104729) % 150000 for i in range(count)]


# ------------------------------------------------------------------------------- CacheKey


def test_keys_without_worker_id_sort_before_keys_with_one() -> None:
    assert key(None) < key(0)
    assert sorted([key(3), key(0), key(None)]) == [key(None), key(0), key(3)]


def test_keys_with_mixed_worker_ids_sort_without_type_error() -> None:
    keys = [key(w, h(n)) for w in (2, None, 0, 1) for n in (3, 1, 2)]
    ordered = sorted(keys)
    assert [k.worker_id for k in ordered] == [None] * 3 + [0] * 3 + [1] * 3 + [2] * 3
    assert max(keys) == key(2, h(3)) and min(keys) == key(None, h(1))


def test_keys_sort_by_model_then_world_size_then_worker_then_hash() -> None:
    a = CacheKey("a", 8, 7, h(9))
    b_small_world = CacheKey("b", 2, None, h(9))
    b_worker_none = CacheKey("b", 8, None, h(9))
    b_low_hash = CacheKey("b", 8, 0, h(1))
    b_high_hash = CacheKey("b", 8, 0, h(2))
    expected = [a, b_small_world, b_worker_none, b_low_hash, b_high_hash]
    assert sorted(reversed(expected)) == expected
    assert b_low_hash <= b_low_hash and b_high_hash >= b_low_hash and b_high_hash > a


def test_comparing_a_key_with_another_type_raises_type_error() -> None:
    with pytest.raises(TypeError):
        _ = key() < "m"


def test_equal_keys_are_equal_hash_equal_and_collapse_in_a_set() -> None:
    assert key(1, h(5)) == CacheKey("m", 4, 1, bytes(h(5)))
    assert hash(key(1, h(5))) == hash(CacheKey("m", 4, 1, h(5)))
    assert len({key(1), key(1), key(None), key(2)}) == 3
    assert key(None) != key(0)  # None must not collapse onto any worker id


def test_no_worker_id_version_clears_only_the_worker_id() -> None:
    original = CacheKey("llama", 4, 3, h(7))
    scheduler_side = original.no_worker_id_version()
    assert scheduler_side == CacheKey("llama", 4, None, h(7))
    assert scheduler_side.with_worker_id(3) == original
    assert original.worker_id == 3  # frozen: the original is unchanged


def test_with_worker_id_validates_against_world_size() -> None:
    with pytest.raises(ValueError, match="worker_id"):
        key(None).with_worker_id(4)


def test_keys_are_immutable() -> None:
    with pytest.raises(AttributeError):
        key().worker_id = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (("m", 4, 0, b"short"), "chunk_hash must be 32 bytes, got 5 bytes"),
        (("m", 4, 0, h(1) + b"x"), "chunk_hash must be 32 bytes, got 33 bytes"),
        (("m", 4, 0, bytearray(h(1))), "chunk_hash must be 32 bytes, got bytearray"),
        (("m", 0, None, h(1)), "world_size must be an int >= 1, got 0"),
        (("m", True, None, h(1)), "world_size must be an int >= 1, got True"),
        (("m", 4, 4, h(1)), r"worker_id must be None or an int in \[0, world_size=4\), got 4"),
        (("m", 4, -1, h(1)), r"worker_id .* got -1"),
        (("", 4, 0, h(1)), "model_name must be a non-empty str"),
        ((None, 4, 0, h(1)), "model_name must be a non-empty str"),
    ],
)
def test_cache_key_refuses_invalid_fields(fields: tuple[object, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CacheKey(*fields)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- KeyBatch


def test_key_batch_holds_its_keys_in_order() -> None:
    batch = KeyBatch.from_hashes("m", 4, 2, [h(1), h(2), h(3)])
    assert len(batch) == 3
    assert batch.hashes == h(1) + h(2) + h(3)
    assert list(batch) == batch.keys() == [key(2, h(1)), key(2, h(2)), key(2, h(3))]
    assert batch.hash_at(0) == h(1) and batch.hash_at(2) == h(3) and batch.hash_at(-1) == h(3)


def test_key_batch_hash_at_outside_the_batch_raises_index_error() -> None:
    batch = KeyBatch.from_hashes("m", 4, None, [h(1), h(2)])
    for index in (2, -3):
        with pytest.raises(IndexError, match=f"key index {index} out of range for a batch of 2"):
            batch.hash_at(index)


def test_key_batch_from_keys_round_trips_through_keys() -> None:
    keys = [key(1, h(n)) for n in (5, 3, 9)]
    batch = KeyBatch.from_keys(keys)
    assert (batch.model_name, batch.world_size, batch.worker_id) == ("m", 4, 1)
    assert batch.keys() == keys


def test_key_batch_from_keys_refuses_keys_of_different_workers_or_models() -> None:
    with pytest.raises(ValueError, match="key 1 has"):
        KeyBatch.from_keys([key(1), key(2)])
    with pytest.raises(ValueError, match="key 2 has"):
        KeyBatch.from_keys([key(None), key(None), key(None, model="other")])


def test_key_batch_from_no_keys_raises_because_the_model_is_unknown() -> None:
    with pytest.raises(ValueError, match="model is unknown"):
        KeyBatch.from_keys([])


def test_empty_key_batch_from_hashes_is_allowed() -> None:
    batch = KeyBatch.from_hashes("m", 4, None, [])
    assert len(batch) == 0 and batch.keys() == []


def test_key_batch_with_worker_id_keeps_the_hashes() -> None:
    batch = KeyBatch.from_hashes("m", 4, None, [h(1), h(2)])
    for_worker = batch.with_worker_id(3)
    assert for_worker.worker_id == 3 and for_worker.hashes == batch.hashes
    assert for_worker.keys() == [k.with_worker_id(3) for k in batch]
    with pytest.raises(ValueError, match="worker_id"):
        batch.with_worker_id(4)


def test_key_batch_refuses_hashes_that_are_not_whole_32_byte_hashes() -> None:
    with pytest.raises(ValueError, match="got 33 bytes"):
        KeyBatch("m", 4, None, h(1) + b"x")
    with pytest.raises(ValueError, match="hash 1 must be 32 bytes"):
        # 31 + 33 bytes add up to 64: each hash must be checked, not only the total.
        KeyBatch.from_hashes("m", 4, None, [h(1), h(2)[:31], h(3) + b"x"])
    with pytest.raises(ValueError, match="world_size"):
        KeyBatch("m", 0, None, h(1))


def test_equal_key_batches_are_equal_and_hash_equal() -> None:
    one = KeyBatch.from_hashes("m", 4, 0, [h(1), h(2)])
    two = KeyBatch.from_keys([key(0, h(1)), key(0, h(2))])
    assert one == two and hash(one) == hash(two)
    assert one != one.with_worker_id(None)


# ---------------------------------------------------------------------------- wire format


def round_trip(value: object) -> object:
    message = decode(encode_response(7, value))
    assert message.kind is MessageKind.RESPONSE
    return message.payload


def test_keys_and_batches_round_trip_through_the_codec() -> None:
    many = KeyBatch.from_hashes("Llama-3 8B ✓", 8, 7, [h(n) for n in range(100)])  # > 1 KiB
    value = {
        "key": CacheKey("m", 2, None, h(4)),
        "keys": [key(0), key(None), key(3)],
        "pair": (key(1), KeyBatch.from_hashes("m", 4, None, [])),
        "batch": many,
    }
    decoded = round_trip(value)
    assert decoded == value
    assert isinstance(decoded, dict) and type(decoded["key"]) is CacheKey
    assert type(decoded["batch"]) is KeyBatch


def test_key_encoding_is_compact() -> None:
    # 10-byte header + model name + hash: no field names, no msgpack framing inside.
    assert len(encode_key(CacheKey("model", 4, 1, h(1)))) == 10 + 5 + 32
    assert len(encode_batch(KeyBatch.from_hashes("model", 4, 1, [h(1), h(2)]))) == 10 + 5 + 64


def test_encode_and_decode_functions_are_inverse() -> None:
    for k in (CacheKey("x", 1, 0, h(1)), CacheKey("ü" * 300, 2**32 - 1, None, h(2))):
        assert decode_key(encode_key(k)) == k
    batch = KeyBatch.from_hashes("x", 3, 2, [h(1), h(9)])
    assert decode_batch(encode_batch(batch)) == batch


def test_keys_that_do_not_fit_the_wire_raise_encode_error() -> None:
    with pytest.raises(ValueError, match="uint32"):
        encode_key(CacheKey("m", 2**32, 0, h(1)))
    with pytest.raises(EncodeError, match="65535"):
        encode_response(1, CacheKey("m" * 70000, 1, 0, h(1)))


def header(world_size: int, worker: int, name: bytes) -> bytes:
    return (
        world_size.to_bytes(4, "little")
        + worker.to_bytes(4, "little", signed=True)
        + (len(name).to_bytes(2, "little") + name)
    )


MALFORMED_KEYS = {
    "shorter than the header": b"\x01\x00",
    "truncated model name": header(4, 0, b"model")[:-2],
    "hash too short": header(4, 0, b"m") + h(1)[:31],
    "hash too long": header(4, 0, b"m") + h(1) + b"x",
    "name not UTF-8": header(4, 0, b"\xff\xfe") + h(1),
    "empty model name": header(4, 0, b"") + h(1),
    "world size zero": header(0, -1, b"m") + h(1),
    "worker beyond world size": header(4, 4, b"m") + h(1),
    "negative worker other than -1": header(4, -2, b"m") + h(1),
}


@pytest.mark.parametrize("data", MALFORMED_KEYS.values(), ids=MALFORMED_KEYS.keys())
def test_malformed_cache_key_ext_data_raises_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="malformed CacheKey ext data"):
        decode_key(data)


@pytest.mark.parametrize("data", MALFORMED_KEYS.values(), ids=MALFORMED_KEYS.keys())
def test_malformed_cache_key_in_a_message_is_a_protocol_error(data: bytes) -> None:
    frame = msgpack.packb(
        [WIRE_VERSION, int(MessageKind.RESPONSE), 7, "", [msgpack.ExtType(3, data)]]
    )
    with pytest.raises(ProtocolError, match="malformed CacheKey ext data") as caught:
        decode([frame])
    assert caught.value.request_id == 7  # the header got that far: a server can still answer


@pytest.mark.parametrize(
    "data",
    [b"", header(4, 0, b"m") + h(1)[:31], header(4, 9, b"m"), header(4, 0, b"mo")[:-1]],
    ids=["empty", "partial hash", "worker beyond world size", "truncated name"],
)
def test_malformed_key_batch_in_a_message_is_a_protocol_error(data: bytes) -> None:
    frame = msgpack.packb(
        [WIRE_VERSION, int(MessageKind.RESPONSE), 3, "", msgpack.ExtType(4, data)]
    )
    with pytest.raises(ProtocolError, match="malformed KeyBatch ext data"):
        decode([frame])


# ------------------------------------------------------------------------ token-id hashes


def test_token_hashes_match_the_definition() -> None:
    ids = tokens(4 * 16 + 5) + [-(2**31), 2**31 - 1] * 8
    assert hashes_from_tokens(ids, 16) == reference_token_hashes(ids, 16)
    # A pinned value as well, so that changing the definition and the reference together
    # still fails.
    assert hashes_from_tokens([0, 1, -1, 2**31 - 1], 2)[1].hex() == (
        "d91d8b0c95404dd5e371fa55d58726289b9930344c15cb18ddf7551dca00b375"
    )


def test_token_hashes_are_32_bytes_one_per_whole_chunk() -> None:
    hashes = hashes_from_tokens(tokens(1000), 256)
    assert len(hashes) == 3 and all(len(x) == HASH_SIZE for x in hashes)
    assert len(set(hashes)) == 3


def test_partial_trailing_chunk_is_ignored() -> None:
    ids = tokens(512)
    assert hashes_from_tokens([*ids, 1, 2, 3], 256) == hashes_from_tokens(ids, 256)
    assert hashes_from_tokens(ids[:255], 256) == []
    assert hashes_from_tokens([], 256) == []
    # Ids in the ignored tail are not looked at, so not refused either.
    assert hashes_from_tokens([*ids, 2**40], 256) == hashes_from_tokens(ids, 256)


def test_changing_a_token_of_the_first_chunk_changes_every_hash() -> None:
    ids = tokens(4 * 64)
    changed = list(ids)
    changed[10] += 1
    before, after = hashes_from_tokens(ids, 64), hashes_from_tokens(changed, 64)
    assert all(b != a for b, a in zip(before, after, strict=True))


def test_changing_chunk_two_keeps_the_hashes_of_chunks_zero_and_one() -> None:
    ids = tokens(5 * 64)
    changed = list(ids)
    changed[2 * 64 + 63] += 1
    before, after = hashes_from_tokens(ids, 64), hashes_from_tokens(changed, 64)
    assert before[:2] == after[:2]
    assert all(b != a for b, a in zip(before[2:], after[2:], strict=True))


def test_equal_chunks_at_different_positions_hash_differently() -> None:
    hashes = hashes_from_tokens([5] * 64, 16)
    assert len(set(hashes)) == 4


def test_tensor_token_ids_hash_like_the_same_list() -> None:
    ids = [*tokens(3 * 128 + 17), -(2**31), 2**31 - 1]
    expected = hashes_from_tokens(ids, 128)
    as_int64 = torch.tensor(ids, dtype=torch.int64)
    assert hashes_from_tokens(as_int64, 128) == expected
    assert hashes_from_tokens(as_int64.to(torch.int32), 128) == expected
    # A strided view is not contiguous: it must still hash its values, not its storage.
    strided = torch.tensor(ids, dtype=torch.int64).repeat_interleave(2)[::2]
    assert not strided.is_contiguous()
    assert hashes_from_tokens(strided, 128) == expected
    small = [i % 200 for i in ids]
    for dtype in (torch.int8, torch.uint8, torch.int16):
        values = [v if dtype is torch.uint8 else v - 100 for v in small]
        assert hashes_from_tokens(torch.tensor(values, dtype=dtype), 128) == hashes_from_tokens(
            values, 128
        )


def test_token_ids_outside_int32_are_refused() -> None:
    ids = tokens(256)
    for bad in (2**31, -(2**31) - 1):
        with pytest.raises(ValueError, match=f"token id {bad} at index 7 is outside"):
            hashes_from_tokens([*ids[:7], bad, *ids[8:]], 256)
        with pytest.raises(ValueError, match=f"token id {bad} is outside the int32 range"):
            hashes_from_tokens(torch.tensor([*ids[:7], bad, *ids[8:]]), 256)


def test_non_integer_token_ids_are_refused() -> None:
    with pytest.raises(TypeError, match="index 3 is a float"):
        hashes_from_tokens([0, 1, 2, 3.0, 4, 5], 3)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="integer dtype"):
        hashes_from_tokens(torch.zeros(8), 4)
    with pytest.raises(ValueError, match="integer dtype"):
        hashes_from_tokens(torch.zeros(2, dtype=torch.bool), 4)  # checked even with no chunk
    with pytest.raises(ValueError, match=r"must be 1-D, got shape \(2, 4\)"):
        hashes_from_tokens(torch.zeros(2, 4, dtype=torch.int64), 4)


def random_prompt(count: int, seed: int) -> list[int]:
    """``count`` ids over the whole int32 range, the extremes included now and then."""
    rng = random.Random(seed)
    edges = [-(2**31), -1, 0, 1, 2**31 - 1]
    return [
        rng.choice(edges) if rng.random() < 0.05 else rng.randrange(-(2**31), 2**31)
        for _ in range(count)
    ]


# Every form a prompt may come in, made from the same ids: each must hash like the list.
PROMPT_FORMS: dict[str, Callable[[list[int]], Any]] = {
    "tuple": tuple,
    "array i": lambda ids: array.array("i", ids),
    "array q": lambda ids: array.array("q", ids),
    "memoryview": lambda ids: memoryview(array.array("i", ids)),
    "numpy int64": lambda ids: numpy.array(ids, dtype=numpy.int64),
    "numpy int32": lambda ids: numpy.array(ids, dtype=numpy.int32),
    "numpy >i4": lambda ids: numpy.array(ids, dtype=">i4"),
    "numpy strided": lambda ids: numpy.repeat(numpy.array(ids, dtype=numpy.int32), 2)[::2],
    "torch int64": lambda ids: torch.tensor(ids, dtype=torch.int64),
}


@pytest.mark.parametrize("form", PROMPT_FORMS.values(), ids=PROMPT_FORMS.keys())
@pytest.mark.parametrize(
    ("count", "chunk_size"),
    [(0, 256), (255, 256), (256, 256), (32 * 1024 + 100, 256), (3 * 16 + 5, 16), (7, 1)],
)
def test_every_form_of_a_prompt_hashes_as_the_definition_says(
    form: Callable[[list[int]], Any], count: int, chunk_size: int
) -> None:
    ids = random_prompt(count, seed=count + chunk_size)
    expected = reference_token_hashes(ids, chunk_size)
    assert hashes_from_tokens(ids, chunk_size) == expected
    assert hashes_from_tokens(form(ids), chunk_size) == expected
    assert hashes_from_tokens(form(ids), chunk_size, "salt") == hashes_from_tokens(
        ids, chunk_size, "salt"
    )


def test_small_unsigned_and_byte_forms_hash_their_values() -> None:
    ids = [i % 256 for i in tokens(3 * 64 + 1)]
    expected = reference_token_hashes(ids, 64)
    assert hashes_from_tokens(bytes(ids), 64) == expected  # a byte per id, not int32 bytes
    assert hashes_from_tokens(bytearray(ids), 64) == expected
    for dtype in ("uint8", "int16", "uint16", "uint32", "uint64"):
        assert hashes_from_tokens(numpy.array(ids, dtype=dtype), 64) == expected


def test_numpy_and_array_ids_outside_int32_are_refused_as_a_list_is() -> None:
    ids = tokens(256)
    for bad in (2**31, -(2**31) - 1):
        with pytest.raises(ValueError, match=f"token id {bad} at index 7 is outside"):
            hashes_from_tokens(numpy.array([*ids[:7], bad, *ids[8:]], dtype=numpy.int64), 256)
        with pytest.raises(ValueError, match=f"token id {bad} at index 7 is outside"):
            hashes_from_tokens(array.array("q", [*ids[:7], bad, *ids[8:]]), 256)
    with pytest.raises(ValueError, match=f"token id {2**32 - 1} at index 7 is outside"):
        hashes_from_tokens(numpy.array([*ids[:7], 2**32 - 1, *ids[8:]], dtype=numpy.uint32), 256)
    # As for a list, the ignored partial chunk is not looked at.
    tail = numpy.array([*ids, 2**40], dtype=numpy.int64)
    assert hashes_from_tokens(tail, 256) == hashes_from_tokens(ids, 256)


def test_numpy_arrays_of_other_kinds_are_refused_as_a_list_of_them_is() -> None:
    with pytest.raises(TypeError, match="index 0 is a float64, not an int"):
        hashes_from_tokens(numpy.zeros(8), 4)
    with pytest.raises(TypeError):  # each item is a row: not an int
        hashes_from_tokens(numpy.zeros((8, 2), dtype=numpy.int32), 4)


def test_chunk_size_below_one_is_a_config_error() -> None:
    with pytest.raises(KVConfigError, match="chunk_size must be an int >= 1, got 0"):
        hashes_from_tokens([1, 2], 0)


HASH_SCRIPT = """
import sys
from kvrpc.kv.keys import hashes_from_block_hashes, hashes_from_tokens
ids = [(i * 7919) % 150000 for i in range(1000)]
blocks = [i * 2**40 - 5 for i in range(16)] + [bytes([i]) * 32 for i in range(16)]
for digest in hashes_from_tokens(ids, 256) + hashes_from_block_hashes(blocks, 4):
    print(digest.hex())
"""


def test_hashes_are_the_same_in_another_process() -> None:
    # Another interpreter with another PYTHONHASHSEED: the hashes must not depend on hash().
    root = str(Path(kvrpc.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONHASHSEED="12345")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", HASH_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    ids = [(i * 7919) % 150000 for i in range(1000)]
    blocks: list[bytes | int] = [i * 2**40 - 5 for i in range(16)]
    blocks += [bytes([i]) * 32 for i in range(16)]
    here = hashes_from_tokens(ids, 256) + hashes_from_block_hashes(blocks, 4)
    assert here == reference_token_hashes(ids, 256) + reference_block_hashes(blocks, 4)
    assert result.stdout.split() == [digest.hex() for digest in here]


@given(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=40), st.integers(1, 9))
def test_token_hashes_follow_the_definition_for_any_ids(ids: list[int], chunk_size: int) -> None:
    expected = reference_token_hashes(ids, chunk_size)
    assert hashes_from_tokens(ids, chunk_size) == expected
    assert hashes_from_tokens(torch.tensor(ids, dtype=torch.int64), chunk_size) == expected


# ------------------------------------------------------------------------- block hashes


def test_blocks_per_chunk_divides_chunk_size_by_block_size() -> None:
    assert blocks_per_chunk(256, 16) == 16
    assert blocks_per_chunk(256, 256) == 1


def test_blocks_per_chunk_error_names_both_numbers_and_suggests_a_multiple() -> None:
    with pytest.raises(KVConfigError) as caught:
        blocks_per_chunk(250, 16)
    message = str(caught.value)
    assert "chunk_size 250" in message and "block_size 16" in message
    assert "multiple of 16" in message and "240 or 256" in message
    assert isinstance(caught.value, ValueError)
    with pytest.raises(KVConfigError, match=r"for example 16$"):
        blocks_per_chunk(8, 16)


@pytest.mark.parametrize(("chunk_size", "block_size"), [(0, 16), (256, 0), (-256, 16)])
def test_blocks_per_chunk_refuses_sizes_below_one(chunk_size: int, block_size: int) -> None:
    with pytest.raises(KVConfigError, match="must be an int >= 1"):
        blocks_per_chunk(chunk_size, block_size)


def test_block_hashes_match_the_definition() -> None:
    blocks: list[bytes | int] = [h(n) for n in range(8)] + [n - 2**100 for n in range(8)]
    assert hashes_from_block_hashes(blocks, 4) == reference_block_hashes(blocks, 4)


def test_block_hash_striding_takes_the_last_block_of_each_whole_chunk() -> None:
    blocks = [h(n) for n in range(10)]
    hashes = hashes_from_block_hashes(blocks, 4)
    assert len(hashes) == 2  # blocks 8 and 9 are a partial chunk
    for non_last in (0, 1, 2, 4, 5, 6, 8, 9):
        changed = list(blocks)
        changed[non_last] = h(200)
        assert hashes_from_block_hashes(changed, 4) == hashes
    changed = list(blocks)
    changed[7] = h(200)
    assert hashes_from_block_hashes(changed, 4)[0] == hashes[0]
    assert hashes_from_block_hashes(changed, 4)[1] != hashes[1]


def test_changing_the_last_block_of_the_first_chunk_changes_every_chunk_hash() -> None:
    blocks = [h(n) for n in range(12)]
    changed = list(blocks)
    changed[3] = h(200)
    before, after = hashes_from_block_hashes(blocks, 4), hashes_from_block_hashes(changed, 4)
    assert all(b != a for b, a in zip(before, after, strict=True))


def test_int_and_bytes_block_hashes_never_collide() -> None:
    value = 123456789
    same_bytes = value.to_bytes(16, "little", signed=True)
    assert hashes_from_block_hashes([value], 1) != hashes_from_block_hashes([same_bytes], 1)
    assert hashes_from_block_hashes([0], 1) != hashes_from_block_hashes([bytes(16)], 1)
    assert hashes_from_block_hashes([-1], 1) != hashes_from_block_hashes([b"\xff" * 16], 1)


def test_block_hashes_are_32_bytes_whatever_the_input_size() -> None:
    hashes = hashes_from_block_hashes([b"", b"x" * 100, 7, -(2**127)], 1)
    assert [len(x) for x in hashes] == [HASH_SIZE] * 4
    as_bytearray = hashes_from_block_hashes([bytearray(b"ab")], 1)  # type: ignore[list-item]
    assert as_bytearray == hashes_from_block_hashes([b"ab"], 1)


def test_empty_or_partial_block_hash_input_gives_no_hashes() -> None:
    assert hashes_from_block_hashes([], 4) == []
    assert hashes_from_block_hashes([h(1), h(2), h(3)], 4) == []


def test_block_hashes_outside_128_bits_or_of_other_types_are_refused() -> None:
    with pytest.raises(ValueError, match="index 1 does not fit in a signed 128-bit int"):
        hashes_from_block_hashes([1, 2**127], 1)
    with pytest.raises(ValueError, match="128-bit"):
        hashes_from_block_hashes([-(2**127) - 1], 1)
    with pytest.raises(TypeError, match="index 0 must be bytes or an int, got str"):
        hashes_from_block_hashes(["abc"], 1)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="got bool"):
        hashes_from_block_hashes([True], 1)
    with pytest.raises(KVConfigError, match="blocks_per_chunk must be an int >= 1"):
        hashes_from_block_hashes([1], 0)
