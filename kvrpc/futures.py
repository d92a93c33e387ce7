"""Thread-safe futures for call results, awaitable from any asyncio event loop.

:class:`MessagingFuture` is what :class:`~kvrpc.client.SyncClient` hands out: the client's
receive loop resolves it on the loop thread, any other thread may wait on it, and any event
loop may ``await`` it. :class:`CUDAMessagingFuture` adds a CUDA event to wait on; its CUDA
body arrives with the GPU transfer path, and without CUDA it raises :class:`CudaUnavailable`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

from kvrpc.errors import CudaUnavailable

__all__ = ["CUDAMessagingFuture", "MessagingFuture"]

T = TypeVar("T")


class MessagingFuture(Generic[T]):
    """The eventual result of a call, safe to use from any thread.

    The messaging system calls :meth:`set_result` / :meth:`set_exception` once; callers use
    :meth:`query`, :meth:`wait`, :meth:`result`, done callbacks, or ``await fut``.
    """

    __slots__ = ("_future",)

    def __init__(self) -> None:
        # concurrent.futures.Future already has the locking and the waiting we need.
        self._future: concurrent.futures.Future[T] = concurrent.futures.Future()

    # ------------------------------------------------------------------ consumer side

    def query(self) -> bool:
        """True once the result or the error has arrived; never blocks."""
        return self._future.done()

    def done(self) -> bool:
        """Same as :meth:`query` (for code written against ``concurrent.futures``)."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done or ``timeout`` seconds pass; True if done."""
        concurrent.futures.wait((self._future,), timeout=timeout)
        return self._future.done()

    def result(self, timeout: float | None = None) -> T:
        """The result, blocking up to ``timeout`` seconds.

        Raises ``TimeoutError`` if it is not done by then, and the call's error (for example a
        :class:`~kvrpc.errors.RemoteError`) if the call failed.
        """
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The call's error, or None if it succeeded; blocks like :meth:`result`."""
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


def _require_cuda() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        raise CudaUnavailable("CUDA futures need torch, which is not installed") from None
    if not torch.cuda.is_available():
        raise CudaUnavailable(
            "CUDA futures need a CUDA build of torch and a visible GPU; this process has none "
            f"(torch {torch.__version__}). Use MessagingFuture.result() on CPU-only hosts."
        )


class CUDAMessagingFuture(Generic[T]):
    """A future whose result also waits on a CUDA interprocess event from the producer.

    Constructing one in a process without CUDA raises :class:`CudaUnavailable`. The CUDA
    waiting (``query`` true only once the event completed, ``wait_on(stream)``) is built by
    the GPU transfer path; until then only the CPU-side future is usable.
    """

    __slots__ = ("_inner", "device")

    def __init__(self, inner: MessagingFuture[T], device: Any = None) -> None:
        _require_cuda()
        self._inner = inner
        self.device = device

    def query(self) -> bool:
        """True once the reply arrived (the CUDA event check lands with the GPU path)."""
        return self._inner.query()

    def result(self, timeout: float | None = None) -> T:
        """The reply's result, blocking up to ``timeout`` seconds."""
        return self._inner.result(timeout)
