r"""Progress of a long command (a bench, a fuzz run): a status line on a terminal, else quiet.

On a terminal, :class:`Progress` keeps one status line on its stream and rewrites it in
place (``\r``, then erase to the end of the line); :meth:`Progress.close` erases it, so
that what the command prints next starts on a clean line. Where the stream is not a
terminal (piped to a file, captured by a test, read by CI) it prints nothing, unless
``KVRPC_PROGRESS=1`` asks for progress anyway: then each update is a plain line, which a
log keeps. ``KVRPC_PROGRESS=0`` silences it on a terminal too.

The decision is :func:`wants_progress`, a pure function of the stream and the environment.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Callable, Mapping
from functools import wraps
from typing import ParamSpec, TextIO, TypeVar

__all__ = ["ENV", "Progress", "wants_progress"]

_P = ParamSpec("_P")
_T = TypeVar("_T")

#: The environment variable that overrides the terminal test: ``1`` (or ``yes``, ``on``,
#: ``true``) shows progress wherever the stream goes, ``0`` (``no``, ``off``, ``false``)
#: never shows it; unset, empty or anything else leaves it to :func:`wants_progress`'s test.
ENV = "KVRPC_PROGRESS"

_ON = frozenset({"1", "yes", "on", "true"})
_OFF = frozenset({"0", "no", "off", "false"})

# The streams on which a status line is drawn now (held, not by id: a freed stream's id is
# reused), and their reporters' lock. Several reporters may share a stream (a bench's
# helpers come from another bench's module): whichever closes must erase any one's line.
_drawn: list[TextIO] = []
_lock = threading.Lock()


def wants_progress(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether to show progress on ``stream``: as ``KVRPC_PROGRESS`` says, else if a terminal.

    ``environ`` defaults to :data:`os.environ`. A stream without ``isatty``, or whose
    ``isatty`` fails (a closed file), is not a terminal.
    """
    setting = (os.environ if environ is None else environ).get(ENV, "").strip().lower()
    if setting in _ON:
        return True
    if setting in _OFF:
        return False
    return _is_terminal(stream)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _is_drawn(stream: TextIO) -> bool:
    return any(each is stream for each in _drawn)


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return shutil.get_terminal_size().columns


class Progress:
    """A reporter of one command's progress, each update prefixed with ``[label]``.

    Calling it with a text shows that text as the current status: rewritten in place on a
    terminal, a plain line where ``KVRPC_PROGRESS=1`` forces progress elsewhere, nothing
    otherwise. As a context manager it closes on leaving the block. ``stream`` is read at
    each call (default: :data:`sys.stderr` as it is then), so a stream replaced after
    construction is honoured. Safe to call from several threads.
    """

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self._stream = stream

    @property
    def stream(self) -> TextIO:
        """Where the updates go: the stream given, or the current :data:`sys.stderr`."""
        return self._stream if self._stream is not None else sys.stderr

    def __call__(self, text: str) -> None:
        """Show ``text`` as the current status (see the class docstring for where)."""
        stream = self.stream
        if not wants_progress(stream):
            return
        line = f"[{self.label}] {text}"
        with _lock:
            if _is_terminal(stream):
                # One line, cut to the terminal's width: a wrapped line could not be
                # rewritten by a carriage return.
                width = _columns(stream) - 1
                stream.write(f"\r\x1b[K{line[:width]}")
                if not _is_drawn(stream):
                    _drawn.append(stream)
            else:
                stream.write(f"{line}\n")
            stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def closing(self, fn: Callable[_P, _T]) -> Callable[_P, _T]:
        """Decorate a long command's function: its status line is erased once it ends.

        Erased when it returns or raises, so that what its caller prints starts cleanly.
        """

        @wraps(fn)
        def run(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            with self:
                return fn(*args, **kwargs)

        return run

    def close(self) -> None:
        """Erase the status line, if one is drawn on this stream; no-op otherwise."""
        stream = self.stream
        with _lock:
            if _is_drawn(stream):
                _drawn[:] = [each for each in _drawn if each is not stream]
                stream.write("\r\x1b[K")
                stream.flush()
