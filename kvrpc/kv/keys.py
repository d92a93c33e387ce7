"""Cache keys and chunk hashes: what names a chunk of KV cache, computed without any IO.

A chunk is ``chunk_size`` consecutive tokens of a prompt. Its key holds the model name, the
world size, the worker id (``None`` for scheduler-side lookups that ask about every rank) and a
32-byte hash of the chunk *and everything before it*, so equal hashes mean equal prefixes. The
hashes are computed where the tokens are, on the client; token ids never cross the wire.

There are two ways to get the hashes, and keys made one way never match keys made the other:

- :func:`hashes_from_tokens` hashes the token ids themselves.
- :func:`hashes_from_block_hashes` reuses an inference engine's own prefix-chained per-block
  hashes, taking the hash of the last block of every chunk.

:class:`CacheKey` and :class:`KeyBatch` travel as msgpack ext types 3 and 4, registered with
:func:`kvrpc.codec.register_ext` when this module is imported.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import operator
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

from kvrpc.codec import register_ext
from kvrpc.errors import KVConfigError

if TYPE_CHECKING:
    import numpy
    import numpy.typing as npt
    import torch

__all__ = [
    "HASH_SIZE",
    "CacheKey",
    "KeyBatch",
    "blocks_per_chunk",
    "check_hashes",
    "decode_batch",
    "decode_key",
    "encode_batch",
    "encode_key",
    "hashes_from_block_hashes",
    "hashes_from_tokens",
    "salted_root",
]

#: Size in bytes of every chunk hash.
HASH_SIZE: Final = 32

_CACHE_KEY_EXT: Final = 3
_KEY_BATCH_EXT: Final = 4

# Wire header of both ext types: world size, worker id (-1 for None), model name length.
_HEADER: Final = struct.Struct("<IiH")
_MAX_WORLD_SIZE: Final = 2**32 - 1
_MAX_WORKER_ID: Final = 2**31 - 1
_MAX_NAME_BYTES: Final = 2**16 - 1

# The value a chain starts from. The two hash schemes start from different roots so that
# their keys stay apart even where the bytes after the previous hash happen to coincide.
_TOKEN_ROOT: Final = hashlib.sha256(b"kvrpc chunk hash v1").digest()
_BLOCK_ROOT: Final = hashlib.sha256(b"kvrpc block hash v1").digest()
# Copying an initialised context is cheaper than creating one; the template is never updated,
# so copies from several threads are safe.
_SHA256: Final = hashlib.sha256()

_INT32_MIN: Final = -(2**31)
_INT32_MAX: Final = 2**31 - 1
_TOKEN_SIZE: Final = 4  # bytes per token id: little-endian int32

# A block hash given as int is hashed as its 16-byte little-endian signed encoding; the tag
# in front of it keeps an int from ever hashing like a bytes value.
_BLOCK_INT_SIZE: Final = 16
_TAG_BYTES: Final = b"\x00"
_TAG_INT: Final = b"\x01"


def _is_int(value: object) -> bool:
    # bool is an int to Python but never a sensible size or id.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_key_fields(model_name: object, world_size: object, worker_id: object) -> None:
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a non-empty str, got {model_name!r}")
    if not _is_int(world_size) or world_size < 1:  # type: ignore[operator]
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if worker_id is not None and (
        not _is_int(worker_id) or not 0 <= worker_id < world_size  # type: ignore[operator]
    ):
        raise ValueError(
            f"worker_id must be None or an int in [0, world_size={world_size}), got {worker_id!r}"
        )


@dataclass(frozen=True, slots=True)
class CacheKey:
    """The name of one chunk of one model's KV cache, for one worker or for all of them.

    Immutable, hashable and totally ordered: keys sort by model name, world size, worker id
    (``None`` before every id) and chunk hash, and comparing two keys never raises. Two keys
    are equal exactly when all four fields are. The constructor raises ``ValueError`` for a
    ``chunk_hash`` that is not 32 bytes, a ``world_size`` below 1, a ``worker_id`` outside
    ``[0, world_size)`` (``None`` is allowed) or an empty ``model_name``.
    """

    model_name: str
    world_size: int
    worker_id: int | None
    chunk_hash: bytes

    def __post_init__(self) -> None:
        _check_key_fields(self.model_name, self.world_size, self.worker_id)
        if not isinstance(self.chunk_hash, bytes) or len(self.chunk_hash) != HASH_SIZE:
            raise ValueError(
                f"chunk_hash must be {HASH_SIZE} bytes, got "
                + (
                    f"{len(self.chunk_hash)} bytes"
                    if isinstance(self.chunk_hash, bytes)
                    else type(self.chunk_hash).__name__
                )
            )

    def _sort_key(self) -> tuple[str, int, int, bytes]:
        # -1 stands for None: valid worker ids are >= 0, so the mapping keeps keys distinct.
        worker = -1 if self.worker_id is None else self.worker_id
        return (self.model_name, self.world_size, worker, self.chunk_hash)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, CacheKey):
            return NotImplemented
        return self._sort_key() < other._sort_key()

    def __le__(self, other: object) -> bool:
        if not isinstance(other, CacheKey):
            return NotImplemented
        return self._sort_key() <= other._sort_key()

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, CacheKey):
            return NotImplemented
        return self._sort_key() > other._sort_key()

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, CacheKey):
            return NotImplemented
        return self._sort_key() >= other._sort_key()

    def no_worker_id_version(self) -> CacheKey:
        """The same key with ``worker_id=None``: the scheduler-side name of this chunk."""
        return CacheKey(self.model_name, self.world_size, None, self.chunk_hash)

    def with_worker_id(self, worker_id: int) -> CacheKey:
        """The same key for worker ``worker_id``; ``ValueError`` if it is not below world_size."""
        return CacheKey(self.model_name, self.world_size, worker_id, self.chunk_hash)


@dataclass(frozen=True, slots=True)
class KeyBatch:
    """Many keys of one model, world size and worker, held as one ``bytes`` of hashes.

    ``hashes`` is the concatenation of the keys' 32-byte chunk hashes, in order; a batch is
    what batched calls carry instead of a list of :class:`CacheKey`. Immutable and hashable;
    two batches are equal when all four fields are. The constructor raises ``ValueError``
    for a ``hashes`` whose length is not a multiple of 32 and for the same bad fields as
    :class:`CacheKey`. An empty batch is allowed.
    """

    model_name: str
    world_size: int
    worker_id: int | None
    hashes: bytes

    def __post_init__(self) -> None:
        _check_key_fields(self.model_name, self.world_size, self.worker_id)
        if not isinstance(self.hashes, bytes):
            raise ValueError(f"hashes must be bytes, got {type(self.hashes).__name__}")
        if len(self.hashes) % HASH_SIZE:
            raise ValueError(
                f"hashes must be a whole number of {HASH_SIZE}-byte hashes, "
                f"got {len(self.hashes)} bytes"
            )

    def __len__(self) -> int:
        return len(self.hashes) // HASH_SIZE

    def __iter__(self) -> Iterator[CacheKey]:
        model_name, world_size, worker_id, hashes = (
            self.model_name,
            self.world_size,
            self.worker_id,
            self.hashes,
        )
        for start in range(0, len(hashes), HASH_SIZE):
            yield CacheKey(model_name, world_size, worker_id, hashes[start : start + HASH_SIZE])

    def hash_at(self, index: int) -> bytes:
        """The chunk hash of key ``index`` (negative counts from the end, as for a list).

        Raises ``IndexError`` outside the batch.
        """
        count = len(self)
        position = index + count if index < 0 else index
        if not 0 <= position < count:
            raise IndexError(f"key index {index} out of range for a batch of {count} keys")
        start = position * HASH_SIZE
        return self.hashes[start : start + HASH_SIZE]

    def keys(self) -> list[CacheKey]:
        """The batch as a list of :class:`CacheKey`, in order."""
        return list(self)

    def with_worker_id(self, worker_id: int | None) -> KeyBatch:
        """The same hashes for worker ``worker_id`` (``None``: the scheduler-side version)."""
        return KeyBatch(self.model_name, self.world_size, worker_id, self.hashes)

    @classmethod
    def from_hashes(
        cls,
        model_name: str,
        world_size: int,
        worker_id: int | None,
        hashes: Sequence[bytes],
    ) -> KeyBatch:
        """A batch of the given chunk hashes, in order; ``ValueError`` unless each is 32 bytes."""
        check_hashes(hashes)
        return cls(model_name, world_size, worker_id, b"".join(hashes))

    @classmethod
    def from_keys(cls, keys: Sequence[CacheKey]) -> KeyBatch:
        """A batch of ``keys``, in order.

        Raises ``ValueError`` when the keys differ in model name, world size or worker id, and
        for an empty sequence, whose model would be unknown (use :meth:`from_hashes` for an
        empty batch).
        """
        if not keys:
            raise ValueError(
                "cannot make a KeyBatch from no keys: the model is unknown; "
                "use KeyBatch.from_hashes(model_name, world_size, worker_id, [])"
            )
        first = keys[0]
        shared = (first.model_name, first.world_size, first.worker_id)
        for index, key in enumerate(keys):
            if (key.model_name, key.world_size, key.worker_id) != shared:
                raise ValueError(
                    f"every key of a KeyBatch must share model name, world size and worker id; "
                    f"key 0 has {shared}, key {index} has "
                    f"{(key.model_name, key.world_size, key.worker_id)}"
                )
        return cls(*shared, b"".join(key.chunk_hash for key in keys))


# ------------------------------------------------------------------------------ wire format


def check_hashes(hashes: Sequence[bytes]) -> None:
    """Raise ``ValueError`` naming the first of ``hashes`` that is not 32 bytes."""
    for index, chunk_hash in enumerate(hashes):
        if not isinstance(chunk_hash, bytes) or len(chunk_hash) != HASH_SIZE:
            raise ValueError(f"hash {index} must be {HASH_SIZE} bytes, got {chunk_hash!r:.80}")


def _encode_header(model_name: str, world_size: int, worker_id: int | None) -> bytes:
    name = model_name.encode("utf-8")
    if len(name) > _MAX_NAME_BYTES:
        raise ValueError(
            f"model name is {len(name)} bytes in UTF-8; at most {_MAX_NAME_BYTES} can travel"
        )
    if world_size > _MAX_WORLD_SIZE:
        raise ValueError(f"world_size {world_size} does not fit the wire's uint32")
    if worker_id is not None and worker_id > _MAX_WORKER_ID:
        raise ValueError(f"worker_id {worker_id} does not fit the wire's int32")
    return _HEADER.pack(world_size, -1 if worker_id is None else worker_id, len(name)) + name


def _decode_header(data: bytes, what: str) -> tuple[str, int, int | None, int]:
    """Model name, world size, worker id, and the offset where the hash bytes start."""
    if len(data) < _HEADER.size:
        raise ValueError(
            f"malformed {what} ext data: {len(data)} bytes, shorter than its "
            f"{_HEADER.size}-byte header"
        )
    world_size, worker, name_size = _HEADER.unpack_from(data)
    end = _HEADER.size + name_size
    if len(data) < end:
        raise ValueError(
            f"malformed {what} ext data: model name of {name_size} bytes, "
            f"but only {len(data) - _HEADER.size} bytes follow the header"
        )
    try:
        model_name = data[_HEADER.size : end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"malformed {what} ext data: model name is not UTF-8: {exc}") from exc
    # Any other negative id is left for the key's own validation to refuse.
    return model_name, world_size, None if worker == -1 else worker, end


def encode_key(key: CacheKey) -> bytes:
    """The ext-type payload of ``key``: header, UTF-8 model name, then the 32-byte hash.

    Raises ``ValueError`` for a key whose fields do not fit the wire (a model name over
    65535 UTF-8 bytes, a world size over 2**32 - 1, a worker id over 2**31 - 1).
    """
    return _encode_header(key.model_name, key.world_size, key.worker_id) + key.chunk_hash


def decode_key(data: bytes) -> CacheKey:
    """The :class:`CacheKey` that :func:`encode_key` turned into ``data``.

    Raises ``ValueError`` saying what is wrong for truncated, oversized or invalid data.
    """
    model_name, world_size, worker_id, start = _decode_header(data, "CacheKey")
    try:
        return CacheKey(model_name, world_size, worker_id, bytes(data[start:]))
    except ValueError as exc:
        raise ValueError(f"malformed CacheKey ext data: {exc}") from exc


def encode_batch(batch: KeyBatch) -> bytes:
    """The ext-type payload of ``batch``: header, UTF-8 model name, then all hashes.

    Raises ``ValueError`` under the same conditions as :func:`encode_key`.
    """
    return _encode_header(batch.model_name, batch.world_size, batch.worker_id) + batch.hashes


def decode_batch(data: bytes) -> KeyBatch:
    """The :class:`KeyBatch` that :func:`encode_batch` turned into ``data``.

    Raises ``ValueError`` saying what is wrong for truncated or invalid data.
    """
    model_name, world_size, worker_id, start = _decode_header(data, "KeyBatch")
    try:
        return KeyBatch(model_name, world_size, worker_id, bytes(data[start:]))
    except ValueError as exc:
        raise ValueError(f"malformed KeyBatch ext data: {exc}") from exc


register_ext(_CACHE_KEY_EXT, CacheKey, encode_key, decode_key)
register_ext(_KEY_BATCH_EXT, KeyBatch, encode_batch, decode_batch)


# ----------------------------------------------------------------------------- chunk hashes


def _check_size(name: str, value: object) -> int:
    if not _is_int(value) or value < 1:  # type: ignore[operator]
        raise KVConfigError(f"{name} must be an int >= 1, got {value!r}")
    return value  # type: ignore[return-value]


def blocks_per_chunk(chunk_size: int, block_size: int) -> int:
    """How many engine blocks of ``block_size`` tokens make one chunk of ``chunk_size`` tokens.

    Raises :class:`~kvrpc.errors.KVConfigError` unless both are ints >= 1 and ``chunk_size``
    is a multiple of ``block_size``.
    """
    _check_size("chunk_size", chunk_size)
    _check_size("block_size", block_size)
    if chunk_size % block_size:
        below = chunk_size - chunk_size % block_size
        above = below + block_size
        suggestion = f"{below} or {above}" if below else f"{above}"
        raise KVConfigError(
            f"chunk_size {chunk_size} is not a multiple of block_size {block_size}; "
            f"set chunk_size to a multiple of {block_size}, for example {suggestion}"
        )
    return chunk_size // block_size


@functools.lru_cache(maxsize=256)
def _int32_struct(count: int) -> struct.Struct:
    # One Struct for the whole prompt: a single pack call is markedly faster than one per
    # chunk. Keyed by token count, so distinct prompt lengths each cost one small entry.
    return struct.Struct(f"<{count}i")


def _pack_token_list(token_ids: Sequence[int], count: int) -> bytes:
    tokens = token_ids if len(token_ids) == count else token_ids[:count]
    try:
        return _int32_struct(count).pack(*tokens)
    except struct.error:
        pass
    # Only on failure: find the culprit so the error can name it.
    for index, item in enumerate(tokens):
        try:
            token = operator.index(item)
        except TypeError:
            raise TypeError(
                f"token id at index {index} is a {type(item).__name__}, not an int"
            ) from None
        if not _INT32_MIN <= token <= _INT32_MAX:
            raise ValueError(
                f"token id {token} at index {index} is outside the int32 range "
                f"[{_INT32_MIN}, {_INT32_MAX}]"
            ) from None
    raise AssertionError("struct refused token ids that all look like int32 values")


_SMALL_INT_DTYPES: Final = ("int8", "uint8", "int16", "uint16", "int32")


def _check_token_tensor(tensor: Any) -> str:
    """The dtype name of a token id tensor, once its shape and dtype are known to be usable."""
    if tensor.ndim != 1:
        raise ValueError(f"a token id tensor must be 1-D, got shape {tuple(tensor.shape)}")
    dtype_name = str(tensor.dtype).removeprefix("torch.")
    if dtype_name != "int64" and dtype_name not in _SMALL_INT_DTYPES:
        raise ValueError(
            f"a token id tensor must have an integer dtype ({', '.join(_SMALL_INT_DTYPES)} or "
            f"int64), got {dtype_name}"
        )
    return dtype_name


def _pack_token_tensor(tensor: Any, dtype_name: str, count: int) -> bytes:
    tokens = tensor[:count]
    if dtype_name == "int64":
        # .to(int32) would wrap out-of-range ids silently; the list path refuses them.
        low, high = (int(v) for v in tokens.aminmax())
        if low < _INT32_MIN or high > _INT32_MAX:
            bad = low if low < _INT32_MIN else high
            raise ValueError(
                f"token id {bad} is outside the int32 range [{_INT32_MIN}, {_INT32_MAX}]"
            )
    flat = tokens.to(device="cpu", dtype=sys.modules["torch"].int32).contiguous()
    if sys.byteorder != "little":
        return _pack_token_list(flat.tolist(), count)
    # torch tensors do not export the buffer protocol and numpy is not a dependency: read
    # the memory by address. `flat` stays referenced until the copy is made.
    return ctypes.string_at(flat.data_ptr(), count * _TOKEN_SIZE)


# Buffer formats whose items are already the hashed form: native int32, on a little-endian host.
_INT32_FORMATS: Final = frozenset({"i", "<i", "=i", "@i"})


def _int32_view(token_ids: object) -> memoryview | None:
    """``token_ids``' own memory when it already is little-endian int32 ids, else None.

    An ``array.array("i")``, a ``memoryview`` of one, or any other 1-D C-contiguous buffer
    of native int32 on a little-endian host: its bytes are exactly what the hash reads, so
    nothing is packed or copied. Every other buffer (bytes, int64 arrays...) is None and
    takes the path of a sequence of ints, item by item, as before.
    """
    if sys.byteorder != "little":
        return None
    try:
        view = memoryview(token_ids)  # type: ignore[arg-type]
    except TypeError:
        return None
    if (
        view.ndim == 1
        and view.c_contiguous
        and view.itemsize == _TOKEN_SIZE
        and view.format in _INT32_FORMATS
    ):
        return view.cast("B")
    view.release()
    return None


def _pack_token_array(array: Any, count: int) -> bytes | memoryview | None:
    """The first ``count`` ids of a 1-D integer numpy array as little-endian int32.

    None for an array of another shape or dtype (it takes the sequence path, whose errors
    name the item). Ids outside int32 are refused as on the sequence path.
    """
    if array.ndim != 1 or array.dtype.kind not in "iu":
        return None
    tokens = array[:count]
    if tokens.dtype.itemsize >= _TOKEN_SIZE and not (
        tokens.dtype.kind == "i" and tokens.dtype.itemsize == _TOKEN_SIZE
    ):
        # astype would wrap an id outside int32 silently; the sequence path refuses it.
        numpy = sys.modules["numpy"]
        outside = numpy.flatnonzero((tokens < _INT32_MIN) | (tokens > _INT32_MAX))
        if outside.size:
            index = int(outside[0])
            raise ValueError(
                f"token id {int(tokens[index])} at index {index} is outside the int32 range "
                f"[{_INT32_MIN}, {_INT32_MAX}]"
            )
    packed = tokens.astype("<i4", copy=False)
    if not packed.flags.c_contiguous:
        packed = packed.copy()
    return memoryview(packed).cast("B")


def hashes_from_tokens(
    token_ids: Sequence[int] | torch.Tensor | npt.NDArray[numpy.integer[Any]],
    chunk_size: int,
    cache_salt: str | None = None,
) -> list[bytes]:
    """The prefix-chained 32-byte hashes of every whole chunk of ``token_ids``.

    ``token_ids`` is a sequence of ints, a 1-D integer ``torch.Tensor`` or numpy array, or
    a buffer of int32 (``array.array("i")``); all give the same hashes for the same ids. A
    list packs at about 7 ns an id; a tensor, an array or an int32 buffer skips that, and
    an int32 buffer is hashed where it lies. Only whole chunks are hashed, so the result has
    ``len(token_ids) // chunk_size`` hashes and a trailing partial chunk is ignored (its ids
    are not even checked).

    Hash ``i`` is ``sha256(previous + chunk_i)`` where ``previous`` is hash ``i - 1`` (for
    the first chunk, ``sha256(b"kvrpc chunk hash v1")``) and ``chunk_i`` is the chunk's token
    ids as little-endian signed int32. The hashes are therefore the same in every process,
    run and host, and hash ``i`` changes whenever any token of chunks ``0..i`` does.

    A non-empty ``cache_salt`` (a tenant's secret, say) starts the chain from
    :func:`salted_root` instead, so the same tokens under another salt (or none) share no
    hash: one tenant's lookups can never hit another's chunks. ``None`` and ``""`` are the
    unsalted chain.

    Raises ``ValueError`` for a token id outside the int32 range or a tensor that is not 1-D
    or not of an integer dtype, ``TypeError`` for a non-int item, and
    :class:`~kvrpc.errors.KVConfigError` for a ``chunk_size`` that is not an int >= 1.
    """
    _check_size("chunk_size", chunk_size)
    data: bytes | memoryview | None = None
    if type(token_ids) is list or type(token_ids) is tuple:  # the common case, first
        chunks = len(token_ids) // chunk_size
        if not chunks:
            return []
        data = _pack_token_list(token_ids, chunks * chunk_size)
    elif (torch_module := sys.modules.get("torch")) is not None and isinstance(
        token_ids, torch_module.Tensor
    ):  # only a process that made a tensor has torch
        dtype_name = _check_token_tensor(token_ids)
        chunks = token_ids.shape[0] // chunk_size
        if not chunks:
            return []
        data = _pack_token_tensor(token_ids, dtype_name, chunks * chunk_size)
    else:
        chunks = len(token_ids) // chunk_size
        if not chunks:
            return []
        count = chunks * chunk_size
        numpy = sys.modules.get("numpy")
        if numpy is not None and isinstance(token_ids, numpy.ndarray):
            data = _pack_token_array(token_ids, count)
        elif (view := _int32_view(token_ids)) is not None:
            data = view[: count * _TOKEN_SIZE]
        if data is None:
            data = _pack_token_list(cast("Sequence[int]", token_ids), count)
    return _chain(memoryview(data), chunks, chunk_size * _TOKEN_SIZE, salted_root(cache_salt))


def _chain(view: memoryview, chunks: int, step: int, previous: bytes) -> list[bytes]:
    """The prefix-chained hashes of ``chunks`` chunks of ``step`` bytes of ``view``."""
    # One context copied from the template per chunk, fed the previous hash and a slice of
    # the packed ids in place: cheaper than concatenating them, or a fresh sha256() each.
    new_context = _SHA256.copy
    hashes: list[bytes] = []
    append = hashes.append
    for start in range(0, chunks * step, step):
        context = new_context()
        context.update(previous)
        context.update(view[start : start + step])
        previous = context.digest()
        append(previous)
    return hashes


def salted_root(cache_salt: str | None) -> bytes:
    """The hash a token chain starts from under ``cache_salt`` (the plain root without one).

    ``sha256(root + b"salt" + utf8(cache_salt))``: a pure function of the salt, the same in
    every process. Raises ``TypeError`` for a salt that is not a str.
    """
    if cache_salt is None or cache_salt == "":
        return _TOKEN_ROOT
    if not isinstance(cache_salt, str):
        raise TypeError(f"cache_salt must be a str, got {type(cache_salt).__name__}")
    return hashlib.sha256(_TOKEN_ROOT + b"salt" + cache_salt.encode()).digest()


def hashes_from_block_hashes(
    block_hashes: Sequence[bytes | int], blocks_per_chunk: int
) -> list[bytes]:
    """Chunk hashes from an engine's own prefix-chained block hashes.

    Chunk ``i`` is represented by the hash of its last block,
    ``block_hashes[(i + 1) * blocks_per_chunk - 1]``; only whole chunks count, so the result
    has ``len(block_hashes) // blocks_per_chunk`` hashes (none for an empty input). Each is
    brought to 32 bytes by chaining again: hash ``i`` is
    ``sha256(previous + tag + raw)``, starting from ``sha256(b"kvrpc block hash v1")``,
    where ``raw`` is the block hash itself for ``bytes``-like values (tag ``0x00``) or its
    16-byte little-endian signed encoding for an ``int`` (tag ``0x01``), so an int and a
    bytes value never give the same hash. Stable across processes and runs.

    Raises ``ValueError`` for an int outside the signed 128-bit range, ``TypeError`` for a
    block hash that is neither bytes-like nor an int, and
    :class:`~kvrpc.errors.KVConfigError` for a ``blocks_per_chunk`` that is not an int >= 1.
    """
    _check_size("blocks_per_chunk", blocks_per_chunk)
    new_context = _SHA256.copy
    hashes: list[bytes] = []
    previous = _BLOCK_ROOT
    sha256 = hashlib.sha256
    for index in range(blocks_per_chunk - 1, len(block_hashes), blocks_per_chunk):
        raw = block_hashes[index]
        if type(raw) is bytes:
            # vLLM's own kind: one hash of the joined 65 bytes costs a third less than a
            # context copied and updated three times, for the same digest.
            previous = sha256(previous + _TAG_BYTES + raw).digest()
            hashes.append(previous)
            continue
        context = new_context()
        context.update(previous)
        if isinstance(raw, bytes | bytearray | memoryview):
            context.update(_TAG_BYTES)
            context.update(raw)
        elif _is_int(raw):
            try:
                encoded = raw.to_bytes(_BLOCK_INT_SIZE, "little", signed=True)
            except OverflowError:
                raise ValueError(
                    f"block hash {raw} at index {index} does not fit in a signed 128-bit int"
                ) from None
            context.update(_TAG_INT)
            context.update(encoded)
        else:
            raise TypeError(
                f"block hash at index {index} must be bytes or an int, got {type(raw).__name__}"
            )
        previous = context.digest()
        hashes.append(previous)
    return hashes
