"""A lower tier on a local disk: one file per chunk, LRU eviction under a byte limit.

A file holds the chunk's bytes, then a 16-byte trailer: ``KVRS``, a format version, and the
chunk's end-to-end checksum (:mod:`kvrpc.kv.integrity`). A load recomputes the checksum of
what it read and compares: a file that fails (or whose trailer is not this format, or whose
size is wrong) is a miss, counted in ``corrupt``, and deleted, so wrong bytes never go up.

Files are named by the key in hex and written atomically (a temporary file in the same
directory, flushed to stable storage, then renamed over the real name), so a crash never
leaves part of a chunk under a chunk's name. A new :class:`DiskTier` on the same directory
finds the chunks an earlier one left there.

Threading model: every method is called from one thread, the server's event loop, and only
that thread reads or changes the index (key -> file size, in LRU order) and the counters.
The tier's own executor threads touch only files and the tensors handed to them, and the
loop updates the index after the awaited thread call returns. So nothing is locked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import functools
import logging
import os
import re
import struct
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from kvrpc.errors import KVConfigError, KVError
from kvrpc.kv import integrity
from kvrpc.kv.server.observer import DELETED, DISK, EVICTED, L1, ChunkObserver
from kvrpc.kv.server.tiers.memory import memory_of

__all__ = ["TRAILER_SIZE", "DiskTier"]

logger = logging.getLogger("kvrpc.kv")

T = TypeVar("T")

# key.hex() gives lowercase pairs; any other name is not a chunk this tier wrote.
_CHUNK_NAME = re.compile(r"(?:[0-9a-f]{2})+")
_TEMP_PREFIX = ".kvrpc-"
_TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(re.escape(_TEMP_PREFIX) + r".*" + re.escape(_TEMP_SUFFIX), re.DOTALL)
# magic, format version, reserved, checksum: after the chunk's bytes.
_TRAILER = struct.Struct("<4sHHQ")
_TRAILER_MAGIC = b"KVRS"
_TRAILER_VERSION = 1
#: Bytes a chunk file holds beyond the chunk's own.
TRAILER_SIZE = _TRAILER.size


@dataclass(eq=False)
class _File:
    """One indexed chunk file; ``size`` counts the chunk's bytes (the trailer's are extra).

    Compared by identity: a reader that finds the index holding another ``_File`` for its key
    knows that the file it read was evicted (and maybe written again) meanwhile.
    """

    size: int


class _Read(enum.Enum):
    OK = "ok"
    MISSING = "missing"
    WRONG_SIZE = "wrong size"
    CORRUPT = "corrupt (its bytes do not match its checksum, or its trailer is not this format)"


class DiskTier:
    """A :class:`~kvrpc.kv.server.tiers.LowerTier` keeping chunks as files under ``directory``.

    ``directory`` is created (mode 0700) if missing; give each server its own, since two
    tiers on one directory would evict each other's files behind their indexes.
    ``capacity_bytes`` bounds the bytes of chunk files this tier keeps there: saving past it
    first deletes the least recently saved or loaded files. ``io_workers`` is the number of
    threads that read, write and delete files.

    The constructor scans ``directory`` (blocking IO; build the tier before serving): every
    regular file whose name is a key in hex is indexed with its size, oldest modification
    first in LRU order, and the oldest are deleted if they exceed ``capacity_bytes``;
    temporary files left by a crash are deleted. Raises :class:`~kvrpc.errors.KVConfigError`
    if a size is not positive or the directory cannot be created or read.

    Use it from one event-loop thread only (see the module doc).
    """

    def __init__(
        self, directory: str | os.PathLike[str], capacity_bytes: int, *, io_workers: int = 2
    ) -> None:
        if capacity_bytes < 1:
            raise KVConfigError(f"the disk tier needs at least 1 byte, not {capacity_bytes}")
        if io_workers < 1:
            raise KVConfigError(f"the disk tier needs at least 1 IO thread, not {io_workers}")
        self.directory = Path(directory)
        """Where the chunk files are."""
        self.capacity_bytes = capacity_bytes
        """The most bytes of chunk files the tier keeps (reserved writes included)."""
        self._index: OrderedDict[bytes, _File] = OrderedDict()
        self._bytes = 0
        # Bytes of writes in flight: counted against the capacity before their files exist.
        self._reserved = 0
        # Keys whose file is being written or deleted by a thread right now.
        self._busy: set[bytes] = set()
        self._saves = 0
        self._loads = 0
        self._save_bytes = 0
        self._load_bytes = 0
        self._evictions = 0
        self._errors = 0
        self._corrupt = 0
        self._refused = 0
        self._closed = False
        self._observer: ChunkObserver | None = None
        self._scan()
        self._executor = concurrent.futures.ThreadPoolExecutor(io_workers, "kvrpc-kv-disk")

    # ------------------------------------------------------------------ events

    def observe(self, observer: ChunkObserver) -> None:
        """Report every later save, eviction and bad file dropped to ``observer``.

        A save is reported as a move from L1: a lower tier sits behind the pool and saves
        what a store committed there (:mod:`~kvrpc.kv.server.tiering`).
        """
        self._observer = observer

    def held_keys(self) -> list[bytes]:
        """The keys of the chunk files kept now (a copy), least recently used first."""
        return list(self._index)

    def _listener(self) -> ChunkObserver | None:
        """The observer, while it has someone listening (else nothing is gathered)."""
        observer = self._observer
        return observer if observer is not None and observer.watching else None

    # ------------------------------------------------------------------ LowerTier

    def contains(self, key: bytes) -> bool:
        """True once a save of ``key`` has completed, until it is evicted or found bad.

        An in-memory lookup; a save still in flight does not count.
        """
        return key in self._index

    async def save(self, key: bytes, data: torch.Tensor, checksum: int | None = None) -> None:
        """Write ``data`` (1-D ``uint8``, CPU) to ``key``'s file; never raises (but cancels).

        ``checksum`` is the chunk's end-to-end checksum, written after the bytes; None has
        the tier's thread compute it from ``data``.

        Does nothing if ``key`` is already kept (that counts as a use for LRU order) or being
        written, after :meth:`aclose`, or if ``data`` cannot fit in ``capacity_bytes`` next to
        the writes in flight (counted as ``refused``). Failures (disk full, permissions, a
        tensor that is not 1-D ``uint8`` on the CPU) are logged and counted as ``errors``, and
        the chunk is then simply not kept. ``contains(key)`` turns True when this returns
        after a successful write.

        The thread reads ``data``'s memory directly: keep it alive and unchanged until this
        returns. Even when cancelled, this returns only once no thread reads ``data`` any more.
        """
        if self._closed or key in self._busy:
            return
        if key in self._index:
            self._index.move_to_end(key)
            return
        problem = _tensor_problem(data)
        if problem is not None:
            self._errors += 1
            logger.error("disk tier: cannot save a chunk from a %s", problem)
            return
        size = data.numel()
        victims = self._make_room(size)
        if victims is None:
            self._refused += 1
            return
        self._busy.add(key)
        self._busy.update(victims)
        self._reserved += size
        try:
            unlinked, written = await self._in_thread(
                functools.partial(
                    _evict_then_write,
                    [self._path(victim) for victim in victims],
                    str(self.directory),
                    self._path(key),
                    data,
                    checksum,
                )
            )
        except Exception:
            self._errors += 1
            logger.exception("disk tier: saving a chunk failed")
            return
        finally:
            self._reserved -= size
            self._busy.discard(key)
            self._busy.difference_update(victims)
        for error in unlinked:
            self._errors += 1
            logger.warning("disk tier: could not delete an evicted chunk file: %s", error)
        if written is not None:
            self._errors += 1
            logger.warning("disk tier: could not write a chunk file: %s", written)
            return
        self._index[key] = _File(size)
        self._bytes += size
        self._saves += 1
        self._save_bytes += size
        observer = self._listener()
        if observer is not None:
            observer.stored(DISK, (key,), source=L1)

    async def load(self, key: bytes, out: torch.Tensor) -> int | None:
        """Read ``key``'s file into ``out`` (1-D ``uint8``, CPU); its checksum, or None.

        The checksum returned is the one the file's bytes were verified against (compare
        with ``is None``: 0 is a checksum). None when the tier does not hold ``key``, after
        :meth:`aclose`, when the file could not be read, or when it is bad: a size other
        than ``out.numel()`` plus the trailer, a trailer not of this format, or bytes that do
        not match its checksum; a bad file is dropped from the index, deleted and counted
        as ``corrupt``. A successful load counts as a use for LRU order. After None,
        ``out``'s contents are unspecified.

        Raises :class:`~kvrpc.errors.KVError` if ``out`` is not 1-D ``uint8`` on the CPU. The
        thread writes straight into ``out``'s memory: keep it alive and unread by others
        until this returns. Even when cancelled, this returns only once no thread writes
        ``out`` any more.
        """
        problem = _tensor_problem(out)
        if problem is not None:
            raise KVError(
                f"the disk tier can only load into a 1-D uint8 CPU tensor, not a {problem}"
            )
        entry = self._index.get(key)
        if self._closed or entry is None:
            return None
        if entry.size != out.numel():
            logger.warning(
                "disk tier: a chunk file holds %d bytes but %d were asked for; deleting it",
                entry.size,
                out.numel(),
            )
            await self._discard(key, entry, delete=True, counter="corrupt")
            return None
        self._index.move_to_end(key)
        try:
            result, checksum = await self._in_thread(
                functools.partial(_read_into, self._path(key), out)
            )
        except OSError as error:
            self._errors += 1
            logger.warning("disk tier: could not read a chunk file: %s", error)
            return None
        if result is _Read.OK:
            self._loads += 1
            self._load_bytes += out.numel()
            return checksum
        if self._index.get(key) is entry:
            logger.warning("disk tier: a chunk file was %s; dropping it", result.value)
            missing = result is _Read.MISSING
            await self._discard(
                key, entry, delete=not missing, counter="errors" if missing else "corrupt"
            )
        # Otherwise the file was evicted (or evicted and written again) while we read it.
        return None

    def stats(self) -> dict[str, int]:
        """Counters: files and bytes kept now (of ``capacity``); saves, loads, errors so far.

        ``saves`` and ``loads`` count successful ones (``save_bytes`` and ``load_bytes``
        their bytes); ``corrupt`` counts files found bad on a load (deleted, a miss);
        ``refused`` counts saves skipped
        because the chunk could not fit in ``capacity_bytes`` beside the writes in flight.
        """
        return {
            "files": len(self._index),
            "bytes": self._bytes,
            "capacity": self.capacity_bytes,
            "saves": self._saves,
            "loads": self._loads,
            "save_bytes": self._save_bytes,
            "load_bytes": self._load_bytes,
            "evictions": self._evictions,
            "errors": self._errors,
            "corrupt": self._corrupt,
            "refused": self._refused,
        }

    async def aclose(self) -> None:
        """Let pending reads, writes and deletions finish, then stop the threads; idempotent.

        Later saves do nothing and later loads return False.
        """
        if self._closed:
            return
        self._closed = True
        # The wait is for file IO, so it runs off the loop.
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    # ------------------------------------------------------------------ internals

    def _path(self, key: bytes) -> str:
        return os.path.join(self.directory, key.hex())

    def _make_room(self, size: int) -> list[bytes] | None:
        """Take LRU files out of the index until ``size`` more bytes fit; None if they can't.

        The caller deletes the returned keys' files (they are out of the index already).
        """
        if self._reserved + size > self.capacity_bytes:
            return None
        victims: list[bytes] = []
        while self._bytes + self._reserved + size > self.capacity_bytes:
            key, entry = self._index.popitem(last=False)
            self._bytes -= entry.size
            self._evictions += 1
            victims.append(key)
        observer = self._listener()
        if victims and observer is not None:  # out of the index now: no load finds them
            observer.removed(DISK, victims, EVICTED)
        return victims

    async def _discard(self, key: bytes, entry: _File, *, delete: bool, counter: str) -> None:
        del self._index[key]
        self._bytes -= entry.size
        observer = self._listener()
        if observer is not None:
            observer.removed(DISK, (key,), DELETED)
        if counter == "corrupt":
            self._corrupt += 1
        else:
            self._errors += 1
        if not delete or self._closed:
            return
        self._busy.add(key)
        try:
            errors = await self._in_thread(functools.partial(_unlink_all, [self._path(key)]))
        finally:
            self._busy.discard(key)
        for error in errors:
            self._errors += 1
            logger.warning("disk tier: could not delete a bad chunk file: %s", error)

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        """``fn()`` in the tier's threads, outlasting cancellation while ``fn`` runs.

        ``fn`` may be using the caller's tensor: if this is cancelled once ``fn`` has started,
        it waits for ``fn`` to finish before it lets the cancellation through, so the caller
        may reuse the tensor as soon as this exits, however it exits.
        """
        work = self._executor.submit(fn)
        done = asyncio.wrap_future(work)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            if not work.cancel():
                await _outlast(done)
            raise

    def _scan(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            found: list[tuple[int, bytes, int]] = []
            with os.scandir(self.directory) as entries:
                for item in entries:
                    if _TEMP_NAME.fullmatch(item.name):
                        # Left by a crash mid-write; no live tier owns it (one per directory).
                        with contextlib.suppress(OSError):
                            os.unlink(item.path)
                    elif _CHUNK_NAME.fullmatch(item.name) and item.is_file(follow_symlinks=False):
                        info = item.stat(follow_symlinks=False)
                        # A file too short for a trailer is indexed as empty: its first
                        # load finds it the wrong size and deletes it.
                        size = max(0, info.st_size - TRAILER_SIZE)
                        found.append((info.st_mtime_ns, bytes.fromhex(item.name), size))
        except OSError as error:
            raise KVConfigError(
                f"cannot use {str(self.directory)!r} as the disk tier's directory: {error}; "
                "give a directory this process may create, read and write"
            ) from error
        found.sort()
        for _, key, size in found:
            self._index[key] = _File(size)
            self._bytes += size
        while self._bytes > self.capacity_bytes:
            key, entry = self._index.popitem(last=False)
            self._bytes -= entry.size
            self._evictions += 1
            try:
                os.unlink(self._path(key))
            except FileNotFoundError:
                pass
            except OSError as error:
                self._errors += 1
                logger.warning("disk tier: could not delete an old chunk file: %s", error)
        if found:
            logger.info(
                "disk tier: found %d chunks (%d bytes) in %s",
                len(self._index),
                self._bytes,
                self.directory,
            )


# ---------------------------------------------------------------------- file work (threads)


def _tensor_problem(tensor: torch.Tensor) -> str | None:
    if tensor.dtype != torch.uint8 or tensor.dim() != 1 or tensor.device.type != "cpu":
        return f"{tensor.dtype} {list(tensor.shape)} tensor on {tensor.device}"
    return None


def _unlink_all(paths: list[str]) -> list[OSError]:
    """Delete ``paths``; returns the errors (a file already gone is not one)."""
    errors: list[OSError] = []
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as error:
            errors.append(error)
    return errors


def _evict_then_write(
    victims: list[str], directory: str, path: str, data: torch.Tensor, checksum: int | None
) -> tuple[list[OSError], OSError | None]:
    """Delete ``victims``, then write ``data`` and its trailer to ``path`` atomically.

    Returns the deletion errors and the write's error, if any.
    """
    unlinked = _unlink_all(victims)
    try:
        _write_file(directory, path, data, checksum)
    except OSError as error:
        return unlinked, error
    return unlinked, None


def _write_file(directory: str, path: str, data: torch.Tensor, checksum: int | None) -> None:
    source = data if data.is_contiguous() else data.contiguous()
    if checksum is None:
        checksum = integrity.checksum(source)
    trailer = _TRAILER.pack(_TRAILER_MAGIC, _TRAILER_VERSION, 0, checksum)
    fd, temp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX, dir=directory)
    try:
        with open(fd, "wb", buffering=0) as file:
            view = memory_of(source)
            written = 0
            while written < len(view):
                written += file.write(view[written:])
            rest = memoryview(trailer)
            while rest:
                rest = rest[file.write(rest) :]
            # Without this a power loss could leave the new name on a file whose bytes never
            # reached the disk.
            os.fsync(fd)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _read_into(path: str, out: torch.Tensor) -> tuple[_Read, int]:
    """Read a chunk file into ``out`` and check it: how it went, and its checksum."""
    size = out.numel()
    target = out if out.is_contiguous() else torch.empty(size, dtype=torch.uint8)
    try:
        with open(path, "rb", buffering=0) as file:
            if os.fstat(file.fileno()).st_size != size + TRAILER_SIZE:
                return _Read.WRONG_SIZE, 0
            view = memory_of(target)
            got = 0
            while got < size:
                n = file.readinto(view[got:])
                if not n:
                    return _Read.WRONG_SIZE, 0  # it shrank since the fstat
                got += n
            raw = file.read(TRAILER_SIZE)
    except FileNotFoundError:
        return _Read.MISSING, 0
    if len(raw) != TRAILER_SIZE:
        return _Read.WRONG_SIZE, 0
    magic, version, _, checksum = _TRAILER.unpack(raw)
    if magic != _TRAILER_MAGIC or version != _TRAILER_VERSION:
        return _Read.CORRUPT, 0
    if integrity.checksum(target) != checksum:
        return _Read.CORRUPT, 0
    if target is not out:
        out.copy_(target)
    return _Read.OK, checksum


async def _outlast(done: asyncio.Future[T]) -> None:
    """Wait until ``done`` completes, swallowing the cancellations that arrive meanwhile."""
    while not done.done():
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.shield(done)
    if not done.cancelled():
        done.exception()  # the caller is being cancelled; the thread's result goes unused
