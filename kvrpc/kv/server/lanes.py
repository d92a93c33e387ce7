"""The copy engine's per-direction lanes and its rings of interprocess events.

Records the engine thread owns; see :mod:`kvrpc.kv.server.copy_engine` for how a lane's two
streams and staging ring pipeline a batch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvrpc.cuda import CudaEventHandle, new_ipc_event
from kvrpc.kv.layout import KVLayout
from kvrpc.kv.server.copy_plan import GroupViews
from kvrpc.kv.stamps import LayerStamps

__all__ = ["IpcEventRing", "Lane", "LayerAnnouncement"]


@dataclass(eq=False)
class Lane:
    """One direction's streams and staging ring (see the module docstring).

    ``kernels`` runs the gathers (store) or scatters (retrieve), ``dma`` the host copies.
    """

    kernels: Any = None
    dma: Any = None
    staging: list[torch.Tensor] = field(default_factory=list)
    scratch: torch.Tensor | None = None
    free: list[Any] = field(default_factory=list)
    """Per staging buffer: the event after which its last reader is done (None: free)."""
    next_buffer: int = 0
    views: dict[tuple[int, int, int, KVLayout], GroupViews] = field(default_factory=dict)
    loaded: list[Any] = field(default_factory=list)
    """Per staging buffer, a plain event re-recorded each use: its DMA is done (layer-wise)."""
    freed: list[Any] = field(default_factory=list)
    """Per staging buffer, likewise: its scatter is done (layer-wise)."""


class IpcEventRing:
    """Interprocess events handed out in turn, each made on first use, reused after ``size``.

    Turn ``t`` is event ``t % size``. Taken by the engine thread, and (:meth:`take`, for a
    layer-wise retrieve answered before it is enqueued) by the event loop's. A worker may
    look at an event a while after the reply that named it; the ring is long enough that it
    has not been recorded again by then (were it, the worker would only wait for more,
    never for less).
    """

    def __init__(self, device: torch.device, size: int) -> None:
        self.device = device
        self.size = size
        self._events: list[tuple[Any, CudaEventHandle]] = []
        self._turn = 0
        self._lock = threading.Lock()

    def next(self) -> tuple[Any, CudaEventHandle]:
        """The next event and its handle."""
        return self.take(1)[1][0]

    def take(self, count: int) -> tuple[int, list[tuple[Any, CudaEventHandle]]]:
        """The next ``count`` turns at once: the first one's number, and their events.

        Raises ``ValueError`` for more than half the ring: a batch's own turns must never
        share an event, and a worker must have time to look at them.
        """
        if not 0 < count <= max(1, self.size // 2):
            raise ValueError(
                f"a batch takes 1 to {max(1, self.size // 2)} events of this ring, not {count}"
            )
        with self._lock:
            first = self._turn
            self._turn += count
            taken = []
            for turn in range(first, first + count):
                index = turn % self.size
                if index == len(self._events):  # only before fill(): made on first use
                    self._events.append(new_ipc_event(self.device))
                taken.append(self._events[index])
        return first, taken

    def fill(self) -> int:
        """Make every event the ring will hand out, now; returns how many were made.

        Making an interprocess event (``cudaEventCreate`` and ``cudaIpcGetEventHandle``)
        holds the GIL; the engine's warm-up fills its rings so that no copy pays it. The
        GIL is let go every few events, so that the event loop's thread is not kept out.
        """
        made = 0
        while True:
            with self._lock:
                if len(self._events) >= self.size:
                    return made
                self._events.append(new_ipc_event(self.device))
            made += 1
            if made % 16 == 0:
                time.sleep(0)


@dataclass(eq=False)
class LayerAnnouncement:
    """A layer-wise retrieve's events, taken before it is enqueued, and how far it got.

    ``handles[l]`` completes once layer ``l`` of every chunk is in its blocks; the engine
    stamps turn ``first_turn + l`` (:mod:`kvrpc.kv.stamps`) once it recorded
    ``events[l]``, or fails the turns it will never record.
    """

    first_turn: int
    events: list[Any]
    handles: list[CudaEventHandle]
    stamps: LayerStamps
    recorded: int = 0
    """Layers recorded (and stamped) so far."""

    def record(self, stream: Any) -> None:
        """Record the next layer's event on ``stream``, then stamp it."""
        self.events[self.recorded].record(stream)
        self.stamps.mark(self.first_turn + self.recorded)
        self.recorded += 1

    def fail_rest(self) -> None:
        """Stamp every layer not recorded yet as failed: it never will be."""
        for layer in range(self.recorded, len(self.events)):
            self.stamps.fail(self.first_turn + layer)
        self.recorded = len(self.events)
