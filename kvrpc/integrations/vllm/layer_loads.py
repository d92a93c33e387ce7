"""The worker side's synchronous loads: what vLLM's forward waits for, layer by layer.

With ``kvrpc.layerwise`` the connector submits a step's retrieves in ``start_load_kv``,
before the forward, and each attention layer calls ``wait_for_layer_load`` before it reads
its KV. :class:`LayerLoads` keeps the step's retrieves (their
:class:`~kvrpc.kv.client.progress.RetrieveProgress`) and decides, at each wait and at the end of
the forward, which blocks vLLM must be told are load errors. It imports nothing of vLLM and
does no I/O of its own (it only waits on the progress objects it is given), so its rules
are tested with stand-ins for them.

The rules:

- A wait for layer ``l`` waits (up to the timeout) until layer ``l`` of every pending
  retrieve is in its blocks.
- A retrieve that failed is dropped; the adapter has recorded the blocks it did not fill.
  One still running when the wait times out is dropped too, and all the blocks it writes
  are load errors: the forward goes on without them. The wait gives up on it
  (``give_up``), so that the adapter, settling it later, reports none of them again: each
  failed block is reported once per load, by whichever of the two comes first.
- A retrieve that has completed whole is dropped at once: no later layer waits for it.
- A layer name that was not registered (it maps to no layer index) waits for the whole of
  every pending retrieve, which is safe whatever that layer reads.
- At the end of the step (:meth:`LayerLoads.settle`) the retrieves still pending are
  waited for, so that their outcome is reported in the step whose forward read them (vLLM's
  rule for synchronous loads). One that the forward did not wait for on every layer is a
  load error whole: some layer may have read its blocks before they were written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["LayerLoads", "LayerProgress"]

logger = logging.getLogger("kvrpc.vllm")


class LayerProgress(Protocol):
    """What :class:`LayerLoads` needs of a retrieve, as ``RetrieveProgress`` provides it."""

    def wait_layer(self, layer: int, timeout: float | None = None) -> bool:
        """True once layer ``layer`` is in; False if the retrieve failed or timed out."""
        ...

    def wait(self, timeout: float | None = None) -> bool:
        """True once the whole retrieve settled and filled every block."""
        ...

    def give_up(self) -> bool:
        """True if it had not settled: the caller reports all its blocks, the adapter none."""
        ...


@dataclass(eq=False)
class _Pending:
    progress: LayerProgress
    blocks: frozenset[int]
    waited: set[int] = field(default_factory=set)


class LayerLoads:
    """One step's synchronous retrieves and how far the forward has waited for them.

    ``layer_names`` are the KV layers in the order they were registered with the server
    (a retrieve's layer ``i`` is ``layer_names[i]``); ``timeout`` is the seconds one wait may
    take. Every method returns the blocks that became load errors and that the adapter does
    not report itself; the caller hands them to vLLM with the adapter's own. Not
    thread-safe: vLLM calls it from the thread that runs the forward.
    """

    def __init__(self, layer_names: Sequence[str] = (), timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._index: dict[str, int] = {}
        self.num_layers = 0
        self.set_layers(layer_names)
        self._pending: list[_Pending] = []
        self._warned: set[str] = set()

    def set_layers(self, layer_names: Sequence[str]) -> None:
        """Learn the registered layers' names, in registration order."""
        self._index = {name: index for index, name in enumerate(layer_names)}
        self.num_layers = len(layer_names)

    def __len__(self) -> int:
        """How many retrieves are pending."""
        return len(self._pending)

    def add(self, progress: LayerProgress, blocks: Iterable[int]) -> None:
        """Keep a retrieve just submitted; ``blocks`` are all the blocks it writes."""
        self._pending.append(_Pending(progress, frozenset(blocks)))

    def wait_for_layer(self, layer_name: str) -> set[int]:
        """Wait until layer ``layer_name`` of every pending retrieve is in its blocks."""
        if not self._pending:
            return set()
        index = self._index.get(layer_name)
        if index is None:
            self._warn_once(
                f"unknown:{layer_name}",
                "vLLM waits for layer %r, which kvrpc did not register; waiting for whole "
                "loads there",
                layer_name,
            )
            return self._wait_whole()
        deadline = time.monotonic() + self.timeout
        failed: set[int] = set()
        kept: list[_Pending] = []
        for pending in self._pending:
            progress = pending.progress
            if not progress.wait_layer(index, _left(deadline)):
                failed |= _not_reported(pending)
            elif not progress.wait(0):  # True only once the whole retrieve is in
                pending.waited.add(index)
                kept.append(pending)
        self._pending = kept
        return failed

    def settle(self) -> set[int]:
        """The forward is over: wait for what is still pending, then forget every retrieve."""
        if not self._pending:
            return set()
        deadline = time.monotonic() + self.timeout
        failed: set[int] = set()
        for pending in self._pending:
            if not pending.progress.wait(_left(deadline)) and pending.progress.give_up():
                failed |= pending.blocks  # still running: the adapter reports none of it
            elif len(pending.waited) < self.num_layers:
                # Filled or failed: either way a layer may have read its blocks too early
                # (the adapter's own errors for it are reported in this step too).
                self._warn_once(
                    "unwaited",
                    "the forward did not wait for every KV layer of a load (layers %s only); "
                    "its blocks are reported as load errors and recomputed",
                    sorted(pending.waited),
                )
                failed |= pending.blocks
        self._pending = []
        return failed

    def abandon(self) -> set[int]:
        """Forget every pending retrieve without waiting; all their blocks are load errors.

        Except those of a retrieve that has settled: the adapter reports its own errors.
        """
        failed: set[int] = set()
        for pending in self._pending:
            failed |= _not_reported(pending)
        self._pending = []
        return failed

    def _wait_whole(self) -> set[int]:
        deadline = time.monotonic() + self.timeout
        failed: set[int] = set()
        for pending in self._pending:
            if not pending.progress.wait(_left(deadline)):
                failed |= _not_reported(pending)
        self._pending = []
        return failed

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _not_reported(pending: _Pending) -> set[int]:
    """The blocks of a retrieve given up on that the adapter will not report itself.

    A settled retrieve's failed blocks are the adapter's to report (exactly those it did not
    fill); one still running (the wait timed out) is given up on: the forward goes on
    without it, so all of its blocks are the caller's to report, and the adapter, settling
    it later, reports none of them. ``give_up`` decides which, under the lock the adapter
    settles under, so a retrieve settling just as the wait times out is reported once.
    """
    return set(pending.blocks) if pending.progress.give_up() else set()
