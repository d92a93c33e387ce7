"""CUDA graphs of the copy engine's group launches: captured once, replayed per group.

A group's gather or scatter is two launches a layer, about a millisecond of Python for 32
layers. A graph per (KV cache, staging buffer, group size, direction) replays them in one
launch. Used from the engine thread only.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch

from kvrpc.kv.layout import KVLayout
from kvrpc.kv.server.copy_plan import GroupViews, gather_views, scatter_views, yield_gil

__all__ = ["GraphCache"]

logger = logging.getLogger("kvrpc.kv")

# torch.cuda's classes are untyped.
_cuda = cast(Any, torch.cuda)


class GraphCache:
    """The captured graphs of one engine, and whether capture works on this host at all."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, int, int, bool], tuple[Any, torch.Tensor]] = {}
        #: Set once a capture failed: from then on every group runs eagerly.
        self.broken = False

    def __len__(self) -> int:
        return len(self._entries)

    def captured(self) -> list[tuple[int, int, int, bool]]:
        """The cached graphs' keys: (id of the layers list, staging buffer, group size, scatter)."""
        return list(self._entries)

    def clear(self) -> None:
        """Forget every graph (the staging buffers they captured were replaced)."""
        self._entries.clear()

    def drop(self, layers: list[torch.Tensor]) -> None:
        """Forget the graphs of ``layers``: they hold its addresses, which are going."""
        for key in [key for key in self._entries if key[0] == id(layers)]:
            del self._entries[key]

    def run_group(
        self,
        layers: list[torch.Tensor],
        views_of_layers: list[torch.Tensor],
        views: GroupViews,
        layout: KVLayout,
        ids: torch.Tensor,
        b: int,
        count: int,
        scatter: bool,
    ) -> None:
        """Gather (or scatter) one group on the current stream, as one CUDA graph replay.

        Two launches a layer cost about a millisecond of Python for 32 layers, and the
        first group's DMA waits for them. A graph captured once per (KV cache, staging
        buffer, group size, direction) replays them in one launch; its block ids are copied
        into the graph's own ids tensor first. Where capture fails, the group runs eagerly.
        """
        dim = layout.block_dim
        entry = self.get(layers, views_of_layers, views, dim, ids, b, count, scatter)
        if entry is None:
            run = scatter_views if scatter else gather_views
            run(views_of_layers, views, dim, ids, pause=yield_gil)
            return
        graph, static_ids = entry
        static_ids.copy_(ids, non_blocking=True)
        graph.replay()

    def get(
        self,
        layers: list[torch.Tensor],
        views_of_layers: list[torch.Tensor],
        views: GroupViews,
        dim: int,
        ids: torch.Tensor,
        b: int,
        count: int,
        scatter: bool,
    ) -> tuple[Any, torch.Tensor] | None:
        """The group's graph and its ids tensor, captured on first use; None: run eagerly."""
        if self.broken:
            return None
        key = (id(layers), b, count, scatter)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._capture(views_of_layers, views, dim, ids, scatter)
            if entry is not None:
                self._entries[key] = entry
        return entry

    def _capture(
        self,
        views_of_layers: list[torch.Tensor],
        views: GroupViews,
        dim: int,
        ids: torch.Tensor,
        scatter: bool,
    ) -> tuple[Any, torch.Tensor] | None:
        static_ids = torch.empty_like(ids)
        graph = _cuda.CUDAGraph()
        try:
            # Captured on the lane's own stream (the current one here). Not through
            # torch.cuda.graph(), which first synchronizes the device and runs a full GC
            # pass; thread-local mode keeps the waiter threads' CUDA calls legal meanwhile.
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                if scatter:
                    scatter_views(views_of_layers, views, dim, static_ids)
                else:
                    gather_views(views_of_layers, views, dim, static_ids)
            finally:
                graph.capture_end()
        except Exception:
            logger.warning("CUDA graph capture failed; the copy engine runs eagerly", exc_info=True)
            self.broken = True
            return None
        return graph, static_ids
