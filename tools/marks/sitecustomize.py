"""Timing marks across the processes of a bench run, for finding where a request's time goes.

Put this folder first on ``PYTHONPATH`` and set ``KVRPC_MARKS_DIR`` to an existing folder;
every Python process started so (a bench, the ``kvrpc serve`` children it starts) then
appends ``<perf_counter> <pid> <name>`` lines to ``<dir>/<pid>.txt``. ``perf_counter`` is
``CLOCK_MONOTONIC`` on Linux, one clock for every process of the host, so marks of a worker
and of its server line up. :mod:`summarize` prints them per layer-wise retrieve.

The marks wrap methods once their modules are imported (never importing anything
themselves), each executor job's start, each executor submit, the interpreter's garbage
collections, and a probe thread that notes any gap over 0.8 ms in its own 0.1 ms sleeps (a
process starved of the GIL or of a CPU). Diagnosis only: nothing of kvrpc imports this.
"""

from __future__ import annotations

import builtins
import concurrent.futures.thread as _pool
import gc
import inspect
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

_DIR = os.environ.get("KVRPC_MARKS_DIR")

# (module, class, method, mark on entry, mark on return)
_WRAPPED = (
    ("kvrpc.kv.server.service", "KVService", "retrieve_cuda_layers", "s_enter", "s_return"),
    ("kvrpc.kv.server.service", "KVService", "_begin_cuda_retrieve", None, "s_begun"),
    ("kvrpc.kv.server.gpu_copies", "GpuCopies", "_worker_ready", None, "s_ready"),
    ("kvrpc.kv.server.copy_engine", "CopyEngine", "submit_retrieve_layers", None, "s_submitted"),
    ("kvrpc.kv.server.copy_engine", "CopyEngine", "_enqueue_layers", "e_enter", "e_leave"),
    ("kvrpc.kv.server.copy_engine", "CopyEngine", "_groups", None, "e_groups"),
    ("kvrpc.kv.server.lanes", "LayerAnnouncement", "record", None, "e_record"),
    (
        "kvrpc.kv.client.worker",
        "WorkerAdapter",
        "submit_retrieve_request",
        "c_submit",
        "c_submitted",
    ),
    ("kvrpc.kv.client.progress", "RetrieveProgress", "_answer", None, "c_answered"),
    ("kvrpc_unix.transport", "UnixClientTransport", "try_send", None, "c_sent"),
    ("kvrpc_unix.transport", "UnixServerTransport", "send", None, "s_sent"),
)


def _install(directory: str) -> None:
    # A raw descriptor, one write a line: no buffer lock for a daemon thread to hold when
    # the interpreter shuts down.
    out = os.open(
        os.path.join(directory, f"{os.getpid()}.txt"), os.O_WRONLY | os.O_APPEND | os.O_CREAT
    )
    pid = os.getpid()

    def mark(name: str) -> None:
        os.write(out, f"{time.perf_counter():.7f} {pid} {name}\n".encode())

    def wrapper(original: Callable[..., Any], enter: str | None, leave: str | None) -> Any:
        if inspect.iscoroutinefunction(original):

            async def marked_async(*args: Any, **kwargs: Any) -> Any:
                if enter:
                    mark(enter)
                result = await original(*args, **kwargs)
                if leave:
                    mark(leave)
                return result

            return marked_async

        def marked(*args: Any, **kwargs: Any) -> Any:
            if enter:
                mark(enter)
            result = original(*args, **kwargs)
            if leave:
                mark(leave)
            return result

        return marked

    pending = set(range(len(_WRAPPED)))
    real_import = builtins.__import__

    def wrap_loaded() -> None:
        for index in list(pending):
            module, cls, method, enter, leave = _WRAPPED[index]
            owner = getattr(sys.modules.get(module), cls, None)
            if owner is not None:
                setattr(owner, method, wrapper(getattr(owner, method), enter, leave))
                pending.discard(index)

    def importing(*args: Any, **kwargs: Any) -> Any:
        module = real_import(*args, **kwargs)
        wrap_loaded()
        if not pending:
            builtins.__import__ = real_import
        return module

    builtins.__import__ = importing

    run, submit = _pool._WorkItem.run, _pool.ThreadPoolExecutor.submit

    def run_marked(self: Any) -> Any:
        fn = getattr(self.fn, "__name__", None) or getattr(self.fn, "func", self.fn)
        mark(f"x_{getattr(fn, '__name__', fn)}")
        return run(self)

    def submit_marked(self: Any, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        mark(f"xs_{getattr(fn, '__name__', '?')}")
        return submit(self, fn, *args, **kwargs)

    _pool._WorkItem.run = run_marked  # type: ignore[method-assign]
    _pool.ThreadPoolExecutor.submit = submit_marked  # type: ignore[method-assign]
    gc.callbacks.append(lambda phase, info: mark(f"gc_{phase}{info.get('generation')}"))

    def probe() -> None:
        last = time.perf_counter()
        while True:
            time.sleep(0.0001)
            now = time.perf_counter()
            if now - last > 0.0008:
                mark(f"probe_gap_{(now - last) * 1e3:.2f}ms")
            last = now

    threading.Thread(target=probe, name="marks-probe", daemon=True).start()


if _DIR:
    _install(_DIR)
