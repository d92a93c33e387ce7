"""POSIX shared memory for CPU KV tensors, so a server on the same host copies them directly.

A worker allocates its KV tensors with :func:`shared_empty`: each one is a file in
``/dev/shm`` mapped into the worker. :func:`shared_ref` names a tensor (or any contiguous view
inside one) as a :class:`SharedTensorRef`, a plain value that travels in the register message;
the server maps the same memory with :func:`open_shared` and reads and writes the worker's KV
cache in place.

Lifetime: a file made by :func:`shared_empty` lives until the process that made it exits
normally, or until :func:`release_shared` is called for it. It is *not* removed when the
tensor is garbage collected, so a server that was given its name can still open it while the
worker runs; the memory is given back to the system once the file is removed and every process
has dropped its mapping. A worker killed by a signal leaves its files behind; their names,
``kvrpc-<pid>-<hex>``, say which process made them, and a server that mapped them removes
them (:func:`remove_if_orphaned`) once it drops that worker and finds the process gone,
where it knew the worker's pid (over ``unix://``).

Files are created with mode 0600: only processes of the same user (or root) can open them.
A server maps a file only for the process that made it: given a :class:`MemoryOwner`,
:func:`open_shared` refuses a file of another uid, another pid's name, or one that is not a
plain file (a symlink planted in the world-writable ``/dev/shm``, say).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import math
import mmap
import os
import secrets
import stat
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import msgpack
import torch

from kvrpc.codec import register_ext
from kvrpc.errors import KVConfigError, KVError, NotSharedMemory
from kvrpc.kv.layout import dtype_from_name, dtype_name

__all__ = [
    "MemoryOwner",
    "SharedMapping",
    "SharedTensorRef",
    "open_shared",
    "release_shared",
    "remove_if_orphaned",
    "shared_empty",
    "shared_ref",
]

_SHM_DIR = "/dev/shm"
_PREFIX = "kvrpc-"


@dataclass(frozen=True, slots=True)
class MemoryOwner:
    """Whose shm files may be mapped: their owner's uid, and the pid in their names.

    ``pid`` is None where the peer's pid is unknown; the name is then not checked.
    """

    uid: int
    pid: int | None


@dataclass(frozen=True)
class _Allocation:
    name: str
    nbytes: int
    mapping: weakref.ref[mmap.mmap]


# Allocations made here and still mapped, by base address. An entry goes when its mapping is
# freed, so a later allocation at the same address (a plain torch.empty, say) is never taken
# for shared memory. Reentrant: a weakref callback may run inside a locked section.
_lock = threading.RLock()
_allocations: dict[int, _Allocation] = {}
# Files to remove at exit: name -> the pid that made it. A forked child inherits this table
# and the atexit hook, and must not remove its parent's files when it exits.
_owned: dict[str, int] = {}
_atexit_registered = False


def shared_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A new CPU tensor of ``shape`` and ``dtype`` in POSIX shared memory, filled with zeros.

    Give it, or any contiguous view inside it, to :func:`shared_ref` to share it. The memory is
    reserved up front, so a full ``/dev/shm`` fails here with ``KVError`` instead of crashing
    the process (SIGBUS) on first write. A shape with no elements raises ``KVConfigError``.
    The backing file lives until this process exits or :func:`release_shared` is called.
    """
    if not all(type(n) is int and n >= 0 for n in shape):
        raise KVConfigError(f"a shape is a sequence of non-negative ints, got {shape!r}")
    if not isinstance(dtype, torch.dtype):
        raise KVConfigError(f"dtype must be a torch.dtype, got {dtype!r}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        raise KVConfigError(
            f"cannot share an empty tensor (shape {list(shape)}); shared memory needs at least "
            "one element"
        )
    pid = os.getpid()
    name = f"{_PREFIX}{pid}-{secrets.token_hex(8)}"
    path = os.path.join(_SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    with _lock:
        _owned[name] = pid
        _register_atexit()
    try:
        os.posix_fallocate(fd, 0, nbytes)
        mapping = mmap.mmap(fd, nbytes)
    except BaseException as exc:
        with _lock:
            _owned.pop(name, None)
        os.unlink(path)
        if not isinstance(exc, OSError):
            raise
        if exc.errno == errno.ENOSPC:
            raise KVError(
                f"{_SHM_DIR} has no room for {nbytes} more bytes; make it larger (in Docker: "
                "--shm-size) or allocate a smaller KV cache"
            ) from exc
        raise
    finally:
        os.close(fd)
    # frombuffer keeps the mmap object alive for as long as any view of the tensor lives;
    # the mmap unmaps itself when freed.
    flat = torch.frombuffer(mapping, dtype=torch.uint8)
    base = flat.data_ptr()
    allocation = _Allocation(name, nbytes, weakref.ref(mapping, lambda _: _forget(base, name)))
    with _lock:
        _allocations[base] = allocation
    return flat.view(dtype).view(tuple(shape))


def release_shared(tensor: torch.Tensor) -> None:
    """Remove the shared-memory file behind ``tensor`` now, rather than at exit.

    ``tensor`` is one that :func:`shared_empty` returned, or a view inside it. This process
    can go on using the tensor; other processes that already mapped it keep their mappings,
    but none can open it any more. Raises ``NotSharedMemory`` when the tensor is not from
    :func:`shared_empty` in this process, or was released already.
    """
    allocation = _allocation_of(tensor)
    with _lock:
        _allocations.pop(_base_of(tensor), None)
        _owned.pop(allocation.name, None)
    _unlink(allocation.name)


@dataclass(frozen=True)
class SharedTensorRef:
    """Where another process finds a shared tensor: ``offset`` bytes into ``/dev/shm/<name>``.

    ``shape`` and ``dtype`` (a torch dtype name such as ``"float16"``) say how to read the
    bytes there. Checked when made: a ref with a name outside ``/dev/shm``'s ``kvrpc-`` files,
    a negative or misaligned offset, an empty shape or an unknown dtype raises ``KVError``.
    """

    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        _check_name(self.name)
        if type(self.offset) is not int or self.offset < 0:
            raise KVError(f"a shared tensor's offset is a non-negative int, got {self.offset!r}")
        if type(self.shape) is not tuple or not all(type(n) is int and n > 0 for n in self.shape):
            raise KVError(
                f"a shared tensor's shape is a tuple of positive ints, got {self.shape!r}"
            )
        itemsize = dtype_from_name(self.dtype).itemsize
        if self.offset % itemsize:
            raise KVError(
                f"offset {self.offset} of a {self.dtype} tensor is not a multiple of its "
                f"{itemsize}-byte elements"
            )

    @property
    def nbytes(self) -> int:
        """How many bytes the tensor takes."""
        return int(math.prod(self.shape) * dtype_from_name(self.dtype).itemsize)

    def to_wire(self) -> dict[str, Any]:
        """The ref as a dict of plain msgpack-able values, for :meth:`from_wire`."""
        return {
            "name": self.name,
            "offset": self.offset,
            "shape": list(self.shape),
            "dtype": self.dtype,
        }

    @classmethod
    def from_wire(cls, data: Any) -> SharedTensorRef:
        """The ref that :meth:`to_wire` gave; anything malformed raises ``KVError``."""
        if not isinstance(data, dict) or set(data) != {"name", "offset", "shape", "dtype"}:
            raise KVError(
                "a shared tensor ref on the wire is a dict with exactly the keys name, offset, "
                f"shape and dtype; got {data!r}"
            )
        shape = data["shape"]
        if not isinstance(shape, list | tuple):
            raise KVError(f"a shared tensor's shape must be a list of ints, got {shape!r}")
        return cls(data["name"], data["offset"], tuple(shape), data["dtype"])


def shared_ref(tensor: torch.Tensor) -> SharedTensorRef:
    """The :class:`SharedTensorRef` naming ``tensor`` for another process on this host.

    ``tensor`` must be a contiguous CPU tensor lying inside memory that :func:`shared_empty`
    allocated in this process (the tensor it returned, or any contiguous view inside it);
    otherwise ``NotSharedMemory`` says what is wrong.
    """
    allocation = _allocation_of(tensor)
    offset = tensor.data_ptr() - _base_of(tensor)
    return SharedTensorRef(
        allocation.name, offset, tuple(int(n) for n in tensor.shape), dtype_name(tensor.dtype)
    )


class SharedMapping:
    """Another process's shared tensor, mapped into this one by :func:`open_shared`.

    ``tensor`` reads and writes the same memory as the tensor the ref was made from. Call
    :meth:`close` (or use ``with``) when done. Closing never invalidates tensors already taken
    from ``tensor``: the memory stays mapped until the last of them is freed, and is unmapped
    then. That is deliberate: ``torch.frombuffer`` keeps the ``mmap`` object alive but holds
    no buffer export on it, so ``mmap.close()`` would succeed and unmap memory that live
    tensors still point into, and the next access would crash the process.
    """

    def __init__(
        self,
        ref: SharedTensorRef,
        tensor: torch.Tensor,
        identity: tuple[int, int] | None = None,
        maker: int | None = None,
    ) -> None:
        self._ref = ref
        self._tensor: torch.Tensor | None = tensor
        #: The mapped file's (device, inode), so that only that file is ever removed.
        self.identity = identity
        #: The pid of the process that made the file, where :func:`open_shared` checked it
        #: against the registering peer's; None where no pid was known.
        self.maker = maker

    @property
    def ref(self) -> SharedTensorRef:
        """The ref this mapping was opened from."""
        return self._ref

    @property
    def tensor(self) -> torch.Tensor:
        """The shared tensor, shaped and typed as the ref says; ``KVError`` after close."""
        if self._tensor is None:
            raise KVError(f"the mapping of {self._ref.name} is closed")
        return self._tensor

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._tensor is None

    def close(self) -> None:
        """Drop this mapping's reference to the memory; idempotent, never fails."""
        self._tensor = None

    def __enter__(self) -> SharedMapping:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._tensor is None else "open"
        return f"<SharedMapping {self._ref.name} +{self._ref.offset} {state}>"


def open_shared(ref: SharedTensorRef, owner: MemoryOwner | None = None) -> SharedMapping:
    """Map the tensor that ``ref`` names, made by :func:`shared_empty` in another process.

    Raises ``KVError`` when the file is gone (its worker exited, or released it), belongs to
    another user, is too small for the ref, is not a plain file, or (given ``owner``) was not
    made by that uid and pid.
    """
    path = os.path.join(_SHM_DIR, ref.name)
    try:
        # O_NOFOLLOW: anyone may create names in /dev/shm, a symlink to any file included.
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise KVError(
            f"shared memory {ref.name!r} does not exist: the worker that registered it may have "
            "exited or released it; register the KV cache again"
        ) from None
    except PermissionError:
        raise KVError(
            f"shared memory {ref.name!r} belongs to another user; run the server as the user "
            "that runs the workers"
        ) from None
    except OSError as exc:
        raise KVError(f"shared memory {ref.name!r} cannot be opened: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        _check_owner(ref.name, info, owner)
        size = info.st_size
        end = ref.offset + ref.nbytes
        if end > size:
            raise KVError(
                f"shared memory {ref.name!r} holds {size} bytes, too few for a "
                f"{ref.dtype}{list(ref.shape)} tensor at offset {ref.offset} (needs {end})"
            )
        # Map only the pages the tensor spans: registering per-layer views of one big
        # allocation must not map the whole allocation once per layer.
        start = ref.offset - ref.offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(fd, end - start, offset=start)
    finally:
        os.close(fd)
    flat = torch.frombuffer(mapping, dtype=torch.uint8, offset=ref.offset - start, count=ref.nbytes)
    identity = (info.st_dev, info.st_ino)
    maker = None if owner is None else owner.pid
    tensor = flat.view(dtype_from_name(ref.dtype)).view(ref.shape)
    return SharedMapping(ref, tensor, identity, maker)


def remove_if_orphaned(mapping: SharedMapping) -> bool:
    """Remove the file behind ``mapping`` if the process that made it is gone; True if removed.

    For a server dropping a worker that will not come back to remove its own files (killed
    by a signal). Only a mapping whose maker's pid was checked when it was opened (a peer
    known by its credentials, as over ``unix://``) qualifies: a pid merely read from a name
    might be another pid namespace's. The file is removed only while its name still names
    the very file mapped (same device and inode, a plain file of this user), and only once
    that process has exited: a live process keeps its files. Never raises; the memory
    itself is freed once every mapping of it is dropped.
    """
    if mapping.identity is None or mapping.maker is None or _process_alive(mapping.maker):
        return False
    name = mapping.ref.name
    path = os.path.join(_SHM_DIR, name)
    try:
        info = os.lstat(path)
        if (
            not stat.S_ISREG(info.st_mode)
            or (info.st_dev, info.st_ino) != mapping.identity
            or info.st_uid != os.geteuid()
        ):
            return False
        os.unlink(path)
    except OSError:  # gone already (the worker's own exit, another server), or not ours
        return False
    return True


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs: an exited process not yet reaped by its parent (a zombie) does not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as proc:
            # "pid (comm) state ...": comm may hold spaces and parentheses; state follows the last.
            return proc.read().rpartition(b")")[2].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here: ask the kernel the portable way
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _check_owner(name: str, info: os.stat_result, owner: MemoryOwner | None) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise KVError(f"shared memory {name!r} is not a plain file; refusing to map it")
    if owner is None:
        return
    if info.st_uid != owner.uid:
        raise KVError(
            f"shared memory {name!r} belongs to uid {info.st_uid}, not to the registering "
            f"process's uid {owner.uid}: a worker may register only memory it allocated"
        )
    made_by = name.removeprefix(_PREFIX).split("-", 1)[0]
    if owner.pid is not None and made_by != str(owner.pid):
        raise KVError(
            f"shared memory {name!r} was made by process {made_by}, not by the registering "
            f"process {owner.pid}: a worker may register only memory it allocated"
        )


def _check_name(name: object) -> None:
    if (
        not isinstance(name, str)
        or not name.startswith(_PREFIX)
        or "/" in name
        or ".." in name
        or "\0" in name
    ):
        raise KVError(
            f"{name!r} is not a kvrpc shared-memory name: those are file names in {_SHM_DIR} "
            f"starting with {_PREFIX!r} (made by kvrpc.kv.shared_empty)"
        )


def _base_of(tensor: torch.Tensor) -> int:
    return int(tensor.untyped_storage().data_ptr())


def _allocation_of(tensor: torch.Tensor) -> _Allocation:
    """The live allocation ``tensor`` lies in; ``NotSharedMemory`` saying why not otherwise."""
    if not isinstance(tensor, torch.Tensor):
        raise NotSharedMemory(
            f"expected a torch.Tensor allocated with kvrpc.kv.shared_empty, got "
            f"{type(tensor).__name__}"
        )
    if tensor.device.type != "cpu":
        raise NotSharedMemory(
            f"the tensor is on {tensor.device}, not the CPU; the shm transfer mode shares CPU "
            "tensors allocated with kvrpc.kv.shared_empty"
        )
    if not tensor.is_contiguous():
        raise NotSharedMemory(
            f"the tensor is not contiguous (shape {list(tensor.shape)}, strides "
            f"{list(tensor.stride())}); share the tensor kvrpc.kv.shared_empty returned or a "
            "contiguous view inside it"
        )
    with _lock:
        allocation = _allocations.get(_base_of(tensor))
    if allocation is None or allocation.mapping() is None:
        raise NotSharedMemory(
            "the tensor is not in shared memory: it was not allocated by "
            "kvrpc.kv.shared_empty in this process (or was released with release_shared); "
            "allocate the KV cache with kvrpc.kv.shared_empty"
        )
    return allocation


def _forget(base: int, name: str) -> None:
    with _lock:
        allocation = _allocations.get(base)
        if allocation is not None and allocation.name == name:
            del _allocations[base]


def _unlink(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(_SHM_DIR, name))


def _register_atexit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_unlink_owned)
        _atexit_registered = True


def _unlink_owned() -> None:
    pid = os.getpid()
    with _lock:
        names = [name for name, owner in _owned.items() if owner == pid]
        for name in names:
            del _owned[name]
    for name in names:
        _unlink(name)


# A ref travels as its own ext type: checked while the payload decodes, as a layout is.
_REF_EXT: Final = 8


def _pack_ref(ref: SharedTensorRef) -> bytes:
    packed: bytes = msgpack.packb(ref.to_wire(), use_bin_type=True)
    return packed


def _unpack_ref(data: bytes) -> SharedTensorRef:
    try:
        return SharedTensorRef.from_wire(msgpack.unpackb(data, raw=False))
    except (KVError, ValueError, msgpack.UnpackException) as exc:
        raise ValueError(f"malformed SharedTensorRef: {exc}") from exc


register_ext(_REF_EXT, SharedTensorRef, _pack_ref, _unpack_ref)
