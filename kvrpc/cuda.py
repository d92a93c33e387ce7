"""CUDA interprocess events and device identity: the CUDA pieces the RPC core needs.

Two processes on one host may number their GPUs differently (``CUDA_VISIBLE_DEVICES``), so
a device travels as its UUID and each process maps it back to its own ordinal
(:func:`device_by_uuid`). A CUDA event made with ``interprocess=True`` travels as a
:class:`CudaEventHandle` (the UUID and the 64-byte handle, msgpack ext type 5); the receiver
opens it once and keeps it (:meth:`CudaEventHandle.open`).

Everything that needs a GPU raises :class:`~kvrpc.errors.CudaUnavailable` in a process
without one; building, comparing and (de)serializing handles works anywhere, so CPU-only
code and tests can carry them.

A rule every user of these events must keep: never make a stream wait on another process's
event before :meth:`torch.cuda.Event.query` says it completed. A stream waiting on an
interprocess event whose recording process died with the work pending waits forever
(measured on an H100: the wait never completed, and every later synchronize hung), so a
dead peer would wedge the waiting process's stream.
"""

from __future__ import annotations

import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

from kvrpc.codec import register_ext
from kvrpc.errors import CudaUnavailable

if TYPE_CHECKING:
    import torch

__all__ = [
    "CudaEventHandle",
    "device_by_uuid",
    "device_uuid",
    "new_ipc_event",
    "poll_event",
    "require_cuda",
]

_EVENT_EXT: Final = 5
#: Size of a ``cudaIpcEventHandle_t``.
IPC_HANDLE_SIZE: Final = 64
#: Opened events kept per process; the least recently used past this are closed.
_OPEN_EVENTS_KEPT: Final = 4096


def require_cuda(what: str) -> None:
    """Raise :class:`CudaUnavailable` naming ``what`` unless torch sees a GPU."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        raise CudaUnavailable(f"{what} needs torch, which is not installed") from None
    if not torch.cuda.is_available():
        raise CudaUnavailable(
            f"{what} needs a CUDA build of torch and a visible GPU; this process has none "
            f"(torch {torch.__version__})"
        )


def device_uuid(device: torch.device | int | str | None = None) -> str:
    """The UUID of ``device`` (default: the current one), the same in every process."""
    import torch

    require_cuda("a device UUID")
    index = torch.device(device if device is not None else "cuda").index
    if index is None:
        index = torch.cuda.current_device()
    return str(torch.cuda.get_device_properties(index).uuid)


_uuid_to_index: dict[str, int] = {}
_uuid_lock = threading.Lock()


def device_by_uuid(uuid: str) -> torch.device:
    """The ``torch.device`` that names the GPU with ``uuid`` in this process.

    Raises :class:`CudaUnavailable` when no visible GPU has it (a different host, or a
    ``CUDA_VISIBLE_DEVICES`` that hides it).
    """
    import torch

    require_cuda("opening a CUDA handle")
    with _uuid_lock:
        if not _uuid_to_index:
            for index in range(torch.cuda.device_count()):
                _uuid_to_index[str(torch.cuda.get_device_properties(index).uuid)] = index
        found = _uuid_to_index.get(uuid)
    if found is None:
        raise CudaUnavailable(
            f"no GPU with UUID {uuid} is visible to this process (it sees "
            f"{sorted(_uuid_to_index) or 'none'}); both processes must run on the same host "
            "and see that GPU (check CUDA_VISIBLE_DEVICES)"
        )
    return torch.device("cuda", found)


@dataclass(frozen=True, slots=True)
class CudaEventHandle:
    """A serialized CUDA interprocess event: the GPU's UUID and the event's IPC handle.

    Made by :func:`new_ipc_event` in the producer; :meth:`open` gives the consumer the
    event. Immutable and hashable; travels as msgpack ext type 5.
    """

    device_uuid: str
    handle: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.handle, bytes) or len(self.handle) != IPC_HANDLE_SIZE:
            raise ValueError(f"a CUDA IPC event handle is {IPC_HANDLE_SIZE} bytes")
        if not isinstance(self.device_uuid, str) or not self.device_uuid:
            raise ValueError("a CUDA event handle needs the device's UUID")

    def open(self) -> Any:
        """The handle's ``torch.cuda.Event`` in this process, opened once and kept (thread-safe)."""
        return _open_event(self)

    def serialize(self) -> bytes:
        """The handle as bytes (:meth:`deserialize` reverses it)."""
        uuid = self.device_uuid.encode()
        return _EVENT_HEADER.pack(len(uuid)) + uuid + self.handle

    @classmethod
    def deserialize(cls, data: bytes) -> CudaEventHandle:
        """The handle that :meth:`serialize` turned into ``data``; ``ValueError`` if malformed."""
        try:
            (size,) = _EVENT_HEADER.unpack_from(data)
            start = _EVENT_HEADER.size
            uuid = bytes(data[start : start + size]).decode()
            handle = bytes(data[start + size :])
        except (struct.error, UnicodeDecodeError) as exc:
            raise ValueError(f"malformed CUDA event handle: {exc}") from exc
        return cls(uuid, handle)


_EVENT_HEADER = struct.Struct("<B")

_open_events: OrderedDict[CudaEventHandle, Any] = OrderedDict()
_open_events_lock = threading.Lock()


def _open_event(handle: CudaEventHandle) -> Any:
    import torch

    with _open_events_lock:
        event = _open_events.get(handle)
        if event is not None:
            _open_events.move_to_end(handle)
            return event
    device = device_by_uuid(handle.device_uuid)
    opened = cast(Any, torch.cuda).Event.from_ipc_handle(device, handle.handle)
    with _open_events_lock:
        event = _open_events.setdefault(handle, opened)
        while len(_open_events) > _OPEN_EVENTS_KEPT:
            _open_events.popitem(last=False)
    return event


def opened_event(handle: CudaEventHandle) -> Any | None:
    """The handle's event if this process has opened it already, else None; never opens.

    Opening an interprocess event can take milliseconds: a caller on an event loop opens
    an unknown handle in a thread of its own and the known ones here.
    """
    with _open_events_lock:
        return _open_events.get(handle)


def forget_events(handles: list[CudaEventHandle]) -> None:
    """Close this process's copies of ``handles`` (their producer has gone)."""
    with _open_events_lock:
        for handle in handles:
            _open_events.pop(handle, None)


def new_ipc_event(
    device: torch.device | int | str | None = None,
) -> tuple[torch.cuda.Event, CudaEventHandle]:
    """A new interprocess event on ``device`` and the handle that other processes open."""
    import torch

    require_cuda("a CUDA interprocess event")
    with torch.cuda.device(device if device is not None else torch.cuda.current_device()):
        event = cast(Any, torch.cuda).Event(interprocess=True)
        handle = CudaEventHandle(device_uuid(device), bytes(event.ipc_handle()))
    return event, handle


def poll_event(event: Any, timeout: float, give_up: Callable[[], bool] | None = None) -> bool:
    """Poll ``event`` until it completes (True), ``timeout`` seconds pass or ``give_up()``.

    False on the timeout or on ``give_up()``. The way to wait for another process's event
    (see the rule above): CUDA has no event wait with a timeout, and a wait on a dead peer's
    pending event never returns. The pause between polls doubles from 10 us to 1 ms.
    """
    deadline = time.monotonic() + timeout
    pause = 10e-6
    while not event.query():
        if (give_up is not None and give_up()) or time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(2 * pause, 1e-3)
    return True


register_ext(_EVENT_EXT, CudaEventHandle, CudaEventHandle.serialize, CudaEventHandle.deserialize)
