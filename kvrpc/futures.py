"""Thread-safe futures for call results, awaitable from any asyncio event loop.

:class:`MessagingFuture` is what :class:`~kvrpc.client.SyncClient` hands out: the client's
receive loop resolves it on the loop thread, any other thread may wait on it, and any event
loop may ``await`` it. :class:`CUDAMessagingFuture` also waits for the CUDA work the reply
describes, through the interprocess event the reply carries; without CUDA it raises
:class:`~kvrpc.errors.CudaUnavailable`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import threading
import time
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

from kvrpc.cuda import CudaEventHandle, poll_event, require_cuda
from kvrpc.errors import WrongThread

__all__ = ["CUDAMessagingFuture", "MessagingFuture"]

T = TypeVar("T")


class MessagingFuture(Generic[T]):
    """The eventual result of a call, safe to use from any thread.

    The messaging system calls :meth:`set_result` / :meth:`set_exception` once; callers use
    :meth:`query`, :meth:`wait`, :meth:`result`, done callbacks, or ``await fut``.
    """

    __slots__ = ("_future", "_resolver")

    def __init__(self, resolver: threading.Thread | None = None) -> None:
        # concurrent.futures.Future already has the locking and the waiting we need.
        self._future: concurrent.futures.Future[T] = concurrent.futures.Future()
        # The thread that will resolve it, where known: blocking on it there never ends.
        self._resolver = resolver

    def _check_may_block(self) -> None:
        resolver = self._resolver
        if (
            resolver is not None
            and resolver is threading.current_thread()
            and not self._future.done()
        ):
            raise WrongThread(
                f"waiting for this future on {resolver.name!r}, the thread that resolves it, "
                "would never end; wait from another thread, or use add_done_callback"
            )

    # ------------------------------------------------------------------ consumer side

    def query(self) -> bool:
        """True once the result or the error has arrived; never blocks."""
        return self._future.done()

    def done(self) -> bool:
        """Same as :meth:`query` (for code written against ``concurrent.futures``)."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done or ``timeout`` seconds pass; True if done.

        Raises :class:`~kvrpc.errors.WrongThread` on the thread that resolves it.
        """
        self._check_may_block()
        concurrent.futures.wait((self._future,), timeout=timeout)
        return self._future.done()

    def result(self, timeout: float | None = None) -> T:
        """The result, blocking up to ``timeout`` seconds.

        Raises ``TimeoutError`` if it is not done by then, and the call's error (for example a
        :class:`~kvrpc.errors.RemoteError`) if the call failed; raises
        :class:`~kvrpc.errors.WrongThread`, rather than blocking forever, on the thread that
        resolves it (in a done-callback of a ``SyncClient`` future, say).
        """
        self._check_may_block()
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The call's error, or None if it succeeded; blocks like :meth:`result`."""
        self._check_may_block()
        return self._future.exception(timeout)

    def add_done_callback(self, fn: Callable[[MessagingFuture[T]], object]) -> None:
        """Call ``fn(self)`` once done: at once if already done, else on the resolving thread."""
        self._future.add_done_callback(lambda _: fn(self))

    def cancel(self) -> bool:
        """Stop waiting for the result; True if it was not done yet."""
        return self._future.cancel()

    def cancelled(self) -> bool:
        """True if :meth:`cancel` won before the result arrived."""
        return self._future.cancelled()

    def __await__(self) -> Generator[Any, None, T]:
        return asyncio.wrap_future(self._future).__await__()

    # ------------------------------------------------------------------ producer side

    def set_result(self, value: T) -> None:
        """Resolve with ``value``; ignored if the future was already resolved or cancelled."""
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self._future.set_result(value)

    def set_exception(self, exc: BaseException) -> None:
        """Fail with ``exc``; ignored if the future was already resolved or cancelled."""
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self._future.set_exception(exc)

    def to_cuda_future(self, device: Any = None) -> CUDAMessagingFuture[T]:
        """A :class:`CUDAMessagingFuture` over this future, for results that carry a CUDA event.

        Raises :class:`~kvrpc.errors.CudaUnavailable` in a process without CUDA.
        """
        return CUDAMessagingFuture(self, device)

    def __repr__(self) -> str:
        state = "pending" if not self._future.done() else "done"
        return f"<MessagingFuture {state}>"


def _event_of(value: object) -> CudaEventHandle | None:
    """The CUDA event a result carries: the result itself, or its ``cuda_event`` field."""
    if isinstance(value, CudaEventHandle):
        return value
    event = getattr(value, "cuda_event", None)
    return event if isinstance(event, CudaEventHandle) else None


class CUDAMessagingFuture(Generic[T]):
    """A future whose result is ready only once the producer's CUDA work has completed.

    The reply carries a serialized interprocess event (a :class:`~kvrpc.cuda.CudaEventHandle`,
    either as the whole result or as its ``cuda_event`` field) that the producer recorded
    after the work the result describes. :meth:`query` is true only once the reply arrived
    and that event completed; :meth:`wait` and :meth:`result` also wait for the event;
    :meth:`wait_on` returns once work queued on a stream afterwards runs after the
    producer's, polling the event on the host (never making a stream wait on it pending).
    A reply without an event (an error, or a result with nothing on the GPU) needs only the
    reply. Constructing one in a process without CUDA raises :class:`CudaUnavailable`.
    """

    __slots__ = ("_inner", "device")

    def __init__(self, inner: MessagingFuture[T], device: Any = None) -> None:
        require_cuda("a CUDAMessagingFuture")
        self._inner = inner
        self.device = device

    def _event(self) -> Any:
        """The opened event of the reply, or None (no reply yet, an error, or no event)."""
        if not self._inner.query() or self._inner.exception(0) is not None:
            return None
        handle = _event_of(self._inner.result(0))
        return None if handle is None else handle.open()

    def query(self) -> bool:
        """True once the reply arrived and its CUDA event (if any) completed; never blocks."""
        if not self._inner.query():
            return False
        event = self._event()
        return event is None or bool(event.query())

    done = query

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`query` is true or ``timeout`` seconds pass; True if it is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._inner.wait(timeout):
            return False
        event = self._event()
        if event is None:
            return True
        if deadline is None:
            event.synchronize()
            return True
        # A bounded wait polls: CUDA has no event wait with a timeout.
        return poll_event(event, max(0.0, deadline - time.monotonic()))

    def result(self, timeout: float | None = None) -> T:
        """The reply's result once its CUDA work completed; ``TimeoutError`` past ``timeout``."""
        if not self.wait(timeout):
            raise TimeoutError(f"no completed result within {timeout} s")
        return self._inner.result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The call's error, or None; waits for the reply only."""
        return self._inner.exception(timeout)

    def wait_on(self, stream: Any = None, timeout: float | None = None) -> None:
        """Block until the producer's CUDA work completed: work queued from then on follows it.

        Polls the producer's event on the host (:func:`~kvrpc.cuda.poll_event`), and never
        makes a stream wait on it while it is pending: a stream waiting on a dead producer's
        pending event never runs again (see :mod:`kvrpc.cuda`). Once it has completed, no
        stream needs to wait: whatever is queued on ``stream``, or any other, from then on
        runs after the producer's work. Nor is a wait on the completed event queued, as the
        producer may record that event again meanwhile, which would make it a wait on a
        pending event after all. So nothing is queued on ``stream``; it is kept for callers
        that name one.

        Raises the call's error if it failed, and ``TimeoutError`` if the reply and the
        event's completion take more than ``timeout`` seconds in all (None: no limit).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._inner.wait(timeout):
            raise TimeoutError(f"no reply within {timeout} s")
        self._inner.result(0)  # raises the call's error
        event = self._event()
        if event is None:
            return
        left = math.inf if deadline is None else max(0.0, deadline - time.monotonic())
        if not poll_event(event, left):
            raise TimeoutError(f"the producer's CUDA work did not complete within {timeout} s")

    def add_done_callback(self, fn: Callable[[MessagingFuture[T]], object]) -> None:
        """Call ``fn`` with the inner future once the reply arrives (not the CUDA work)."""
        self._inner.add_done_callback(fn)

    def __repr__(self) -> str:
        return f"<CUDAMessagingFuture {'done' if self.query() else 'pending'}>"
