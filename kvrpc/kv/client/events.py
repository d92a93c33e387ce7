"""The CUDA events a ``cuda_ipc`` worker records for the server to wait on, and host waits.

A worker tells the server "the blocks are ready once this event completes" by recording an
interprocess event after the engine's work and sending its handle; the server polls it (the
rule in :mod:`kvrpc.cuda`: a stream never waits on another process's pending event).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, cast

import torch

from kvrpc.cuda import CudaEventHandle, new_ipc_event

__all__ = ["EventRing", "Ready", "wait_for"]


@dataclass(frozen=True, eq=False)
class Ready:
    """An interprocess event of this worker and its handle, for one submit at a time."""

    event: Any
    handle: CudaEventHandle


class EventRing:
    """The interprocess events a cuda_ipc worker tells the server to wait for.

    An event goes back to the ring when its call's reply arrives: by then the server has
    seen it complete, so recording it again cannot change what that call waited for.
    ``made`` events are made at once (more as needed): their handles go with the
    registration, so that the server opens them then, not in the worker's first copies.
    """

    def __init__(self, device: torch.device, made: int = 0) -> None:
        self.device = device
        self._free: list[Ready] = [Ready(*new_ipc_event(device)) for _ in range(made)]
        self._lock = threading.Lock()
        self._side: Any = None

    def handles(self) -> list[CudaEventHandle]:
        """The handles of the events the ring holds now, next to be taken last."""
        with self._lock:
            return [ready.handle for ready in self._free]

    def record_after(self, after: Any) -> Ready:
        """Take an event and record it after ``after`` (an event), or on the current stream."""
        cuda = cast(Any, torch.cuda)
        with self._lock:
            ready = self._free.pop() if self._free else None
            if after is not None and self._side is None:
                self._side = cuda.Stream(self.device)
        if ready is None:
            ready = Ready(*new_ipc_event(self.device))
        if after is None:
            ready.event.record(cuda.current_stream(self.device))
        else:
            # Recorded on a side stream that waits for the engine's event, so the engine's
            # own streams are left as they were. That event is this process's own, which a
            # stream may wait on: the rule in kvrpc.cuda is about other processes' events.
            self._side.wait_event(after)
            ready.event.record(self._side)
        return ready

    def give_back(self, ready: Ready) -> None:
        """Return an event whose call has been answered."""
        with self._lock:
            self._free.append(ready)


def wait_for(event: Any) -> None:
    """Block until the engine's ``event`` (None: nothing to wait for) has completed.

    For the shm and inline modes, where this process or the server reads the CPU blocks once
    the submit returns; on CPU the engine passes None.
    """
    # A GPU event means "the KV is written once this fires"; it is the engine's own.
    if event is not None:
        event.synchronize()
