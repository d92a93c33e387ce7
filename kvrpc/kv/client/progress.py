"""How far one submitted retrieve has got, layer by layer: :class:`RetrieveProgress`."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

from kvrpc.kv.client.watcher import Pollable
from kvrpc.kv.stamps import StampedEvent

__all__ = ["RetrieveProgress"]

logger = logging.getLogger("kvrpc.kv")

#: Seconds between polls of a layer-wise retrieve's next layer event.
_LAYER_POLL_S = 20e-6


class RetrieveProgress:
    """How far one submitted retrieve has got, layer by layer.

    Returned by :meth:`WorkerAdapter.batched_submit_retrieve_requests`. A layer-wise
    ``cuda_ipc`` retrieve (``layerwise=True``) completes layer by layer, and
    :meth:`wait_layer` returns as soon as layer ``l`` of every chunk is in its blocks, which
    is what an engine's per-layer hook (vLLM's ``wait_for_layer_load``) needs. Otherwise
    every layer completes at once, with the whole retrieve. Either way ``False`` means the
    retrieve did not fill every block it was asked to (the blocks are load errors, see
    :meth:`WorkerAdapter.get_block_ids_with_load_errors`) or the wait timed out.
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self._finished = threading.Event()
        self._ok = False
        self._answered = threading.Event()
        self._layer_events: list[Pollable] = []
        self._partial = False
        # Who reports a failed retrieve's blocks: the adapter as it settles, or a caller that
        # gave up on it first (give_up). Held across the settling, so it is one or the other.
        self._report_lock = threading.Lock()
        self._given_up = False

    def wait_layer(self, layer: int, timeout: float | None = None) -> bool:
        """Block until layer ``layer`` is written (True) or the retrieve failed (False).

        Also False once ``timeout`` seconds pass. Polls the server's event every 20 us (the
        host waits, never a stream: see :mod:`kvrpc.cuda`).
        """
        if not 0 <= layer < max(1, self.num_layers):
            raise ValueError(f"layer {layer} is not in 0..{self.num_layers - 1}")
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._answered.wait(timeout):
            return False
        if self._partial:
            return False
        if self._finished.is_set() or not self._layer_events:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            return self._finished.wait(left) and self._ok
        gate = self._layer_events[layer]
        while True:
            try:  # the event is opened on first use (one seen before is open already)
                if gate.query():
                    return True
            except Exception as exc:
                logger.warning("cannot poll the server's event for layer %d: %s", layer, exc)
                return False
            if self._finished.is_set():  # failed meanwhile (the completion timed out)
                return self._ok
            if deadline is not None and time.monotonic() >= deadline:
                return False
            # No back-off: a layer arrives every millisecond or so, and the caller has
            # nothing to do until it does.
            time.sleep(_LAYER_POLL_S)

    def layer_enqueued(self, layer: int) -> bool:
        """True once the server has enqueued layer ``layer``'s copy (or given up on it).

        Never blocks. A layer-wise retrieve is answered before its layers are enqueued;
        this says how far the server's engine has got, which is what an engine's first
        layer waits for beyond the copy itself. Any other retrieve: True once answered.
        """
        if not self._answered.is_set():
            return False
        if not self._layer_events or self._finished.is_set():
            return True
        gate = self._layer_events[layer]
        return not isinstance(gate, StampedEvent) or gate.recorded()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the whole retrieve is settled; True if it filled every block."""
        return self._finished.wait(timeout) and self._ok

    def done(self) -> bool:
        """True once the retrieve is settled (filled or failed); never blocks."""
        return self._finished.is_set()

    def give_up(self) -> bool:
        """Stop waiting for it: True if the caller must report all its blocks as load errors.

        True while it has not settled: it then settles without the adapter reporting any of
        its blocks, so the caller reports them all, once. False once it has settled: the
        adapter has recorded exactly the blocks it did not fill, if any.
        """
        with self._report_lock:
            if self._finished.is_set():
                return False
            self._given_up = True
            return True

    @contextlib.contextmanager
    def _settling(self) -> Iterator[bool]:
        """Held while the adapter settles it; yields whether the adapter records its errors."""
        with self._report_lock:
            yield not self._given_up

    def _answer(self, layer_events: list[Pollable], whole: bool) -> None:
        self._layer_events = layer_events
        self._partial = not whole
        self._answered.set()

    def _finish(self, ok: bool) -> None:
        self._ok = ok
        self._finished.set()
        self._answered.set()
