"""Replies to a pipeline of Redis ``GET`` commands, parsed straight into the caller's memory. Pure.

redis-py (and hiredis under it) reads a value into its own buffer, makes a ``bytes`` of it,
and the tier then copies that into a pool slot: three passes over every byte. Here each
reply's bulk string is received by the kernel directly into the slot's bytes: a
:class:`BulkReplies` says which memory the next ``recv_into`` should fill
(:meth:`~BulkReplies.buffer`) and is told how much it got (:meth:`~BulkReplies.received`).
Only reply lines, the two bytes after each value, and the first bytes of a value that
arrive with its line pass through a small scratch buffer.

No I/O, no asyncio: :mod:`~kvrpc.kv.server.tiers.direct` does the sockets. The protocol is
RESP2 as Redis 2.0 and later speak it to a client that never sent ``HELLO 3``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BulkReplies", "Reply", "ReplyKind", "RespProtocolError", "command"]

_SCRATCH = 64 << 10  # bytes: reply lines, and a value's first bytes that came with its line
_MAX_LINE = 4 << 10  # a reply line longer than this is not Redis talking


class RespProtocolError(ConnectionError):
    """The peer sent something that is not a RESP2 reply: the connection is unusable."""


class ReplyKind(enum.Enum):
    """What came back for one command of the pipeline."""

    VALUE = "value"  #: a bulk string of the target's length, now in the target
    NIL = "nil"  #: no such key
    WRONG_LENGTH = "wrong length"  #: a bulk string of another length (discarded)
    ERROR = "error"  #: an error reply (``-WRONGTYPE ...``, ``-MOVED ...``); ``text`` has it
    SIMPLE = "simple"  #: a status or an integer reply (``+OK``, ``:1``); ``text`` has it


@dataclass(frozen=True, slots=True)
class Reply:
    """One command's reply: its kind and, for errors and simple replies, its line."""

    kind: ReplyKind
    text: str = ""


def command(*words: bytes) -> bytes:
    """One command as a RESP array of bulk strings, ready to send."""
    out = [b"*%d\r\n" % len(words)]
    for word in words:
        out.append(b"$%d\r\n%s\r\n" % (len(word), word))
    return b"".join(out)


class _State(enum.Enum):
    LINE = 1  # reading a reply line into scratch
    BODY = 2  # receiving a value into its target
    SKIP = 3  # discarding a value of the wrong length
    DONE = 4


class BulkReplies:
    """The replies to ``len(targets)`` commands, sent in order on one connection.

    ``targets[i]`` is where reply ``i``'s value goes if it is a bulk string of exactly
    ``len(targets[i])`` bytes; a zero-length target takes the reply's kind and text only
    (``AUTH``, ``SELECT``). Feed it with :meth:`buffer` and :meth:`received` until
    :attr:`done`; then :attr:`replies` holds one :class:`Reply` per target.
    """

    def __init__(self, targets: Sequence[memoryview]) -> None:
        self._targets = list(targets)
        self.replies: list[Reply] = []
        self._scratch = bytearray(_SCRATCH)
        self._view = memoryview(self._scratch)
        self._start = 0  # unparsed scratch bytes are [_start, _end)
        self._end = 0
        self._crlf = 0  # bytes of the CRLF after a value still to come
        self._left = 0  # bytes of the value (BODY: into the target; SKIP: discarded) to come
        self._state = _State.LINE
        self._advance()

    @property
    def done(self) -> bool:
        """True once every reply has been parsed."""
        return self._state is _State.DONE

    def buffer(self) -> memoryview:
        """The memory the next receive should fill (never empty while not :attr:`done`)."""
        if self._state is _State.BODY:
            target = self._targets[len(self.replies)]
            return target[len(target) - self._left :]
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._scratch) - self._end < _MAX_LINE:  # room for a whole line at the end
            kept = self._end - self._start
            self._scratch[:kept] = self._scratch[self._start : self._end]
            self._start, self._end = 0, kept
        end = len(self._scratch)
        if self._state is _State.SKIP:
            end = min(end, self._end + self._left + 2)  # never read past the value's CRLF
        return self._view[self._end : end]

    def received(self, n: int) -> None:
        """``n`` bytes were written at the start of the last :meth:`buffer`."""
        if n <= 0:
            raise ValueError(f"received {n} bytes; a receive fills at least one")
        if self._state is _State.BODY:
            self._left -= n
            if self._left == 0:
                self._value_end(ReplyKind.VALUE)
            return  # the CRLF after it, and what follows, arrive in scratch
        self._end += n
        self._advance()

    # ------------------------------------------------------------------ parsing

    def _advance(self) -> None:
        """Parse what scratch holds, until it needs more bytes or the replies are done."""
        while self._state is not _State.DONE:
            if self._state is _State.SKIP:
                taken = min(self._left, self._end - self._start)
                self._start += taken
                self._left -= taken
                if self._left:
                    return
                self._value_end(ReplyKind.WRONG_LENGTH)
            if self._crlf and not self._take_crlf():
                return
            if len(self.replies) == len(self._targets):
                if self._start != self._end:
                    raise RespProtocolError("the peer sent more replies than commands")
                self._state = _State.DONE
                return
            line = self._line()
            if line is None:
                return
            self._reply_line(line)
            if self._state is _State.BODY:
                return  # scratch is empty: the rest of the value goes straight to its target

    def _take_crlf(self) -> bool:
        while self._crlf and self._start < self._end:
            want = b"\r" if self._crlf == 2 else b"\n"
            if self._scratch[self._start] != want[0]:
                raise RespProtocolError("a value was not followed by CRLF")
            self._start += 1
            self._crlf -= 1
        return self._crlf == 0

    def _line(self) -> bytes | None:
        at = self._scratch.find(b"\r\n", self._start, self._end)
        if at < 0:
            if self._end - self._start > _MAX_LINE:
                raise RespProtocolError("a reply line is longer than any Redis sends")
            return None
        line = bytes(self._scratch[self._start : at])
        self._start = at + 2
        return line

    def _reply_line(self, line: bytes) -> None:
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            try:
                length = int(rest)
            except ValueError:
                raise RespProtocolError(f"a bad bulk length {rest[:40]!r}") from None
            if length < -1:
                raise RespProtocolError(f"a bad bulk length {length}")
            if length == -1:
                self.replies.append(Reply(ReplyKind.NIL))
            else:
                self._value(length)
        elif kind == b"-":
            self.replies.append(Reply(ReplyKind.ERROR, rest.decode(errors="replace")))
        elif kind in (b"+", b":"):
            self.replies.append(Reply(ReplyKind.SIMPLE, rest.decode(errors="replace")))
        else:  # arrays, RESP3 types: no GET, AUTH or SELECT answers them
            raise RespProtocolError(f"an unexpected reply {line[:40]!r}")

    def _value(self, length: int) -> None:
        target = self._targets[len(self.replies)]
        if length != len(target):
            self._left = length
            self._state = _State.SKIP
            return
        # The first bytes may have arrived with the line: move them, then receive the rest
        # straight into the target.
        taken = min(length, self._end - self._start)
        target[:taken] = self._view[self._start : self._start + taken]
        self._start += taken
        self._left = length - taken
        if self._left:
            self._state = _State.BODY
        else:
            self._value_end(ReplyKind.VALUE)

    def _value_end(self, kind: ReplyKind) -> None:
        self.replies.append(Reply(kind))
        self._crlf = 2
        self._state = _State.LINE
