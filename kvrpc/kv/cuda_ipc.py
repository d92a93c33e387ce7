"""CUDA tensors shared between processes by CUDA IPC memory handles.

:class:`CudaIPCWrapper` describes one CUDA tensor (a worker's KV layer) so that another
process on the same host can map the same GPU memory: the IPC handle of the allocation that
holds it, where it starts in that allocation, its shape and dtype, and the GPU's UUID (not
its ordinal: the two processes may see different ``CUDA_VISIBLE_DEVICES``). It travels as
msgpack ext type 6, or as bytes through :meth:`~CudaIPCWrapper.serialize`.

The handle comes from torch's own CUDA IPC support (the same one ``torch.multiprocessing``
uses), so the producer keeps the memory alive while a consumer has it mapped. Each handle is
opened once per process: :meth:`~CudaIPCWrapper.to_tensor` returns the same tensor while
anyone holds it, and the mapping closes when the last reference goes.
"""

from __future__ import annotations

import math
import struct
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Final, cast

import msgpack
import torch

from kvrpc.codec import register_ext
from kvrpc.cuda import device_by_uuid, device_uuid, require_cuda
from kvrpc.errors import KVConfigError
from kvrpc.kv.layout import dtype_from_name, dtype_name

__all__ = ["CudaIPCWrapper"]

_WRAPPER_EXT: Final = 6
_VERSION: Final = 2


@dataclass(frozen=True, slots=True)
class CudaIPCWrapper:
    """A CUDA tensor another process on this host can open: handle, shape, dtype, GPU UUID.

    Build one with :meth:`from_tensor` in the process that owns the tensor; call
    :meth:`to_tensor` in the one that wants it. The tensor must be contiguous; it may be a
    view into a larger allocation (an engine that carves every layer out of one buffer),
    ``tensor_offset`` elements into its storage.
    """

    device_uuid: str
    shape: tuple[int, ...]
    dtype: str
    #: torch's share tuple for the tensor's storage, less its device ordinal (see module doc).
    handle: bytes
    storage_size: int
    storage_offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    #: Where the tensor starts in its storage, in elements of ``dtype``.
    tensor_offset: int = 0

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> CudaIPCWrapper:
        """Describe ``tensor``; :class:`KVConfigError` if it cannot be shared whole."""
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cuda":
            where = tensor.device if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise KVConfigError(f"CudaIPCWrapper shares CUDA tensors; this one is on {where}")
        if not tensor.is_contiguous():
            raise KVConfigError(
                f"CudaIPCWrapper needs a contiguous tensor; this {list(tensor.shape)} one has "
                f"strides {list(tensor.stride())}: share the whole tensor it is a view of"
            )
        require_cuda("CudaIPCWrapper")
        storage: Any = tensor.untyped_storage()
        (_, handle, size, offset, rc_handle, rc_offset, event, sync) = storage._share_cuda_()
        return cls(
            device_uuid(tensor.device),
            tuple(int(n) for n in tensor.shape),
            dtype_name(tensor.dtype),
            bytes(handle),
            int(size),
            int(offset),
            bytes(rc_handle),
            int(rc_offset),
            bytes(event or b""),
            bool(sync),
            int(tensor.storage_offset()),
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the shared tensor."""
        count = 1
        for n in self.shape:
            count *= n
        return count * int(dtype_from_name(self.dtype).itemsize)

    def to_tensor(self) -> torch.Tensor:
        """The shared tensor in this process, on the GPU with this UUID; opened once.

        Raises :class:`~kvrpc.errors.CudaUnavailable` when this process sees no such GPU.
        """
        key = (self.device_uuid, self.handle, self.storage_offset, self.tensor_offset)
        with _cache_lock:
            ref = _opened.get(key)
            cached = ref() if ref is not None else None
            if cached is not None and tuple(cached.shape) == self.shape:
                return cached
        device = device_by_uuid(self.device_uuid)
        storage = cast(Any, torch.UntypedStorage)._new_shared_cuda(
            device.index,
            self.handle,
            self.storage_size,
            self.storage_offset,
            self.ref_counter_handle,
            self.ref_counter_offset,
            self.event_handle or None,
            self.event_sync_required,
        )
        dtype = dtype_from_name(self.dtype)
        if (self.tensor_offset + math.prod(self.shape)) * dtype.itemsize > self.storage_size:
            raise KVConfigError("the wrapper's tensor lies outside the shared CUDA storage")
        tensor: torch.Tensor = cast(Any, torch.empty(0, dtype=dtype, device=device)).set_(
            storage, self.tensor_offset, self.shape
        )
        if tensor.nbytes != self.nbytes:  # pragma: no cover - guards a torch change
            raise KVConfigError("the shared CUDA storage does not match the wrapper's shape")
        with _cache_lock:
            _opened[key] = weakref.ref(tensor)
        return tensor

    def serialize(self) -> bytes:
        """The wrapper as bytes (:meth:`deserialize` reverses it)."""
        return _pack(self)

    @classmethod
    def deserialize(cls, data: bytes) -> CudaIPCWrapper:
        """The wrapper that :meth:`serialize` turned into ``data``; ``ValueError`` if malformed."""
        return _unpack(data)


_opened: dict[tuple[str, bytes, int, int], weakref.ref[torch.Tensor]] = {}
_cache_lock = threading.Lock()
_HEADER = struct.Struct("<B")


def _pack(wrapper: CudaIPCWrapper) -> bytes:
    fields = [
        wrapper.device_uuid,
        list(wrapper.shape),
        wrapper.dtype,
        wrapper.handle,
        wrapper.storage_size,
        wrapper.storage_offset,
        wrapper.ref_counter_handle,
        wrapper.ref_counter_offset,
        wrapper.event_handle,
        wrapper.event_sync_required,
        wrapper.tensor_offset,
    ]
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return _HEADER.pack(_VERSION) + packed


def _unpack(data: bytes) -> CudaIPCWrapper:
    try:
        (version,) = _HEADER.unpack_from(data)
        if version not in (1, _VERSION):
            raise ValueError(f"version {version}, this kvrpc reads versions 1 and {_VERSION}")
        fields = msgpack.unpackb(bytes(data[_HEADER.size :]), raw=False)
        if version == 1:  # before tensor_offset: whole storages only
            fields = [*fields, 0]
        (uuid, shape, dtype, handle, size, offset, rc_handle, rc_offset, event, sync, at) = fields
        if not isinstance(at, int) or at < 0:
            raise ValueError(f"tensor offset must be an int >= 0, got {at!r}")
        dtype_from_name(dtype)
        wrapper = CudaIPCWrapper(
            str(uuid),
            tuple(int(n) for n in shape),
            str(dtype),
            bytes(handle),
            int(size),
            int(offset),
            bytes(rc_handle),
            int(rc_offset),
            bytes(event),
            bool(sync),
            at,
        )
    except (struct.error, ValueError, TypeError, KVConfigError, msgpack.UnpackException) as exc:
        raise ValueError(f"malformed CudaIPCWrapper: {exc}") from exc
    return wrapper


register_ext(_WRAPPER_EXT, CudaIPCWrapper, _pack, _unpack)
