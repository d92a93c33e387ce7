"""The copy engine's per-direction lanes and its rings of interprocess events.

Records the engine thread owns; see :mod:`kvrpc.kv.server.copy_engine` for how a lane's two
streams and staging ring pipeline a batch.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvrpc.cuda import CudaEventHandle, new_ipc_event
from kvrpc.kv.layout import KVLayout
from kvrpc.kv.server.copy_plan import GroupViews

__all__ = ["IpcEventRing", "Lane"]


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

    Only the engine thread takes them. A worker may look at an event a while after the
    reply that named it; the ring is long enough that it has not been recorded again by
    then (were it, the worker would only wait for more, never for less).
    """

    def __init__(self, device: torch.device, size: int) -> None:
        self.device = device
        self.size = size
        self._events: list[tuple[Any, CudaEventHandle]] = []
        self._turn = itertools.count()

    def next(self) -> tuple[Any, CudaEventHandle]:
        """The next event and its handle."""
        index = next(self._turn) % self.size
        if index == len(self._events):
            self._events.append(new_ipc_event(self.device))
        return self._events[index]

    def fill(self) -> int:
        """Make every event the ring will hand out, now; returns how many were made.

        Making an interprocess event (``cudaEventCreate`` and ``cudaIpcGetEventHandle``)
        holds the GIL; the engine's warm-up fills its rings so that no copy pays it. The
        GIL is let go every few events, so that the event loop's thread is not kept out.
        """
        made = 0
        while len(self._events) < self.size:
            self._events.append(new_ipc_event(self.device))
            made += 1
            if made % 16 == 0:
                time.sleep(0)
        return made
