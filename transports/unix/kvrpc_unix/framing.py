"""Sans-IO framing of kvrpc messages on a byte stream: no sockets, no event loop.

One message on the wire::

    !I   frame count N, 1 <= N <= 1024
    !Q   length of frame 0 ... N x, big-endian
    the N frames' bytes, back to back

The sender computes only the prefix (:func:`encode_prefix`) and hands ``[prefix, *frames]`` to
one vectored write, so frames are never joined. The receiver is a :class:`FrameReader`, a
state machine in the shape of asyncio's ``BufferedProtocol``: it says where the next bytes
should land (:meth:`FrameReader.get_buffer`), is told how many did
(:meth:`FrameReader.buffer_updated`), and collects complete messages in
:attr:`FrameReader.messages`.
"""

from __future__ import annotations

import mmap
import struct
from collections import deque
from collections.abc import Sequence
from typing import Final

from kvrpc.codec import Buffer
from kvrpc.errors import TransportError
from kvrpc.transport import Oversized

__all__ = [
    "DIRECT_THRESHOLD",
    "MAX_FRAMES",
    "MMAP_THRESHOLD",
    "OVERSIZED_HEAD",
    "RECV_BUFFER_SIZE",
    "FrameReader",
    "FramingError",
    "encode_prefix",
    "frame_prefix",
]

#: The most frames one message may have (and the fewest is one).
MAX_FRAMES: Final = 1024

#: Size of the reusable buffer small frames are received into and copied out of.
RECV_BUFFER_SIZE: Final = 256 * 1024

#: A frame at least this large that has not fully arrived gets a buffer of its own, and the
#: rest of it is received straight into that buffer (one copy in user space, not two).
DIRECT_THRESHOLD: Final = 64 * 1024

#: A frame at least this large is received into an anonymous ``mmap``: the kernel commits its
#: pages only as data arrives, so a peer that announces a huge frame and then stalls costs
#: address space, not resident memory.
MMAP_THRESHOLD: Final = 1024 * 1024

_COUNT: Final = struct.Struct("!I")
_COUNT_SIZE: Final = _COUNT.size
_ONE_FRAME_PREFIX: Final = struct.Struct("!IQ")
_ONE_FRAME_PREFIX_SIZE: Final = _ONE_FRAME_PREFIX.size
_LENGTH_SIZE: Final = 8

# Compiled prefix and length-table layouts per frame count; most messages have 1 to 3 frames,
# and compiling a format string per message would cost more than the packing itself.
_PREFIXES: dict[int, struct.Struct] = {}
_LENGTH_TABLES: dict[int, struct.Struct] = {}

# Receive phases of a FrameReader.
_WANT_COUNT: Final = 0
_WANT_LENGTHS: Final = 1
_WANT_BODY: Final = 2
_SKIP_BODY: Final = 3  # an oversized message's body, read and thrown away

#: How many bytes of an oversized message's header frame are kept (what ``peek`` reads).
OVERSIZED_HEAD: Final = 32


class FramingError(TransportError):
    """The byte stream does not follow the framing; the connection that sent it is unusable.

    Raised by :class:`FrameReader` for a frame count outside 1..1024 or a message larger than
    the reader's ``max_message_size``, and by :func:`encode_prefix` for a frame list that
    cannot be framed. A transport closes the offending connection.
    """


def _prefix_struct(count: int) -> struct.Struct:
    layout = _PREFIXES.get(count)
    if layout is None:
        layout = _PREFIXES[count] = struct.Struct(f"!I{count}Q")
    return layout


def _length_table(count: int) -> struct.Struct:
    layout = _LENGTH_TABLES.get(count)
    if layout is None:
        layout = _LENGTH_TABLES[count] = struct.Struct(f"!{count}Q")
    return layout


def frame_prefix(frames: Sequence[Buffer]) -> tuple[bytes, int]:
    """The prefix for ``frames`` and the size in bytes of the whole message on the wire.

    The total (prefix included) lets a writer tell a complete write from a partial one
    without measuring the frames again. Raises :class:`FramingError` for 0 or more than
    :data:`MAX_FRAMES` frames.
    """
    count = len(frames)
    if count == 1:  # most messages: a header and no out-of-band buffers
        frame = frames[0]
        size = frame.nbytes if type(frame) is memoryview else len(frame)
        return _ONE_FRAME_PREFIX.pack(1, size), _ONE_FRAME_PREFIX_SIZE + size
    if not 1 <= count <= MAX_FRAMES:
        raise FramingError(
            f"a message has 1 to {MAX_FRAMES} frames, this one has {count}; "
            "send fewer, larger buffers"
        )
    # len() of a memoryview counts items of its first dimension, not bytes.
    lengths = [f.nbytes if type(f) is memoryview else len(f) for f in frames]
    prefix = _prefix_struct(count).pack(count, *lengths)
    return prefix, len(prefix) + sum(lengths)


def encode_prefix(frames: Sequence[Buffer]) -> bytes:
    """The count-and-lengths prefix of one message; the frames themselves are not copied.

    Send ``[prefix, *frames]`` with one vectored write. Raises :class:`FramingError` for 0 or
    more than :data:`MAX_FRAMES` frames.
    """
    return frame_prefix(frames)[0]


class FrameReader:
    """Receives framed messages from a byte stream, copying each payload byte once.

    Drive it like asyncio's ``BufferedProtocol``: receive into :meth:`get_buffer` (never
    empty), report the byte count to :meth:`buffer_updated`, then take complete messages,
    oldest first, from :attr:`messages`. Frames come out as ``bytes`` when they arrived
    within the shared receive buffer, as a ``bytearray`` when they were received into a
    buffer of their own (at least :data:`DIRECT_THRESHOLD` bytes), and as a ``memoryview``
    of an anonymous ``mmap`` from :data:`MMAP_THRESHOLD` bytes. Every frame is owned by the
    receiver: the reader keeps no reference to a delivered frame.

    A message over ``max_message_size`` bytes is read and thrown away without being held:
    an :class:`~kvrpc.transport.Oversized` takes its place in :attr:`messages`, keeping the
    first bytes of its header frame, so the receiver can still answer it. One announcing
    more than ``discard_limit`` bytes (default four times ``max_message_size``, at least
    64 MiB) is not worth reading through: :meth:`buffer_updated` raises :class:`FramingError`
    for it, as for a frame count outside 1..:data:`MAX_FRAMES`, as soon as the count or the
    lengths arrive; the reader is then unusable. Not thread-safe.
    """

    def __init__(
        self,
        max_message_size: int,
        *,
        buffer_size: int = RECV_BUFFER_SIZE,
        discard_limit: int | None = None,
    ) -> None:
        # The shared buffer must hold a full length table and any incomplete small frame
        # with room to spare, or get_buffer could run dry.
        floor = DIRECT_THRESHOLD + _COUNT_SIZE + MAX_FRAMES * _LENGTH_SIZE
        if buffer_size < 2 * floor:
            raise ValueError(f"buffer_size must be at least {2 * floor} bytes")
        self.max_message_size = max_message_size
        self.discard_limit = (
            discard_limit if discard_limit is not None else max(4 * max_message_size, 64 << 20)
        )
        #: Complete messages, oldest first; the caller pops them.
        self.messages: deque[list[Buffer]] = deque()
        # Anonymous mmap, not bytearray: the kernel commits pages as bytes land, so an idle
        # or misbehaving connection holds a page or two instead of the whole buffer (a
        # bytearray is zero-filled, hence resident, at once: 10,000 short-lived bad
        # connections took the server to ~1 GB).
        self._view = memoryview(mmap.mmap(-1, buffer_size))
        self._start = 0  # first byte of the shared buffer not yet parsed
        self._end = 0  # end of the bytes received into the shared buffer
        self._phase = _WANT_COUNT
        self._count = 0
        self._lengths: tuple[int, ...] = ()
        self._frames: list[Buffer] = []
        # A large frame being received into its own buffer: where bytes land, what is
        # delivered once it is full, and how much of it has arrived.
        self._direct: memoryview | None = None
        self._direct_frame: Buffer = b""
        self._direct_filled = 0
        # An oversized message being skipped: bytes still to throw away, the announced size,
        # and the head of its header frame kept so far (and how much of it to keep).
        self._skip_left = 0
        self._skip_size = 0
        self._skip_head = bytearray()
        self._skip_head_want = 0

    @property
    def in_message(self) -> bool:
        """True while part, but not all, of a message has arrived.

        A stream that ends while this is true ended in the middle of a message.
        """
        return self._phase != _WANT_COUNT or self._end > self._start or self._direct is not None

    def get_buffer(self) -> memoryview:
        """Where the next received bytes should be written; never empty.

        Valid until the next :meth:`buffer_updated`; write at most ``len()`` bytes into it.
        """
        direct = self._direct
        if direct is not None:
            return direct[self._direct_filled :]
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """Account for ``nbytes`` bytes written at the start of the last :meth:`get_buffer`.

        Parses everything that is complete into :attr:`messages`; raises
        :class:`FramingError` if the stream breaks the framing.
        """
        direct = self._direct
        if direct is None:
            self._end += nbytes
            self._parse()
            return
        self._direct_filled += nbytes
        if self._direct_filled < direct.nbytes:
            return
        self._frames.append(self._direct_frame)
        self._direct = None
        self._direct_frame = b""
        # The next frame, or the next message, starts in the (empty) shared buffer.
        self._parse()

    def feed(self, data: Buffer) -> None:
        """Receive ``data`` as if it had arrived from the stream (for tests and adapters)."""
        source = memoryview(data).cast("B")
        while source:
            target = self.get_buffer()
            size = min(len(target), len(source))
            target[:size] = source[:size]
            self.buffer_updated(size)
            source = source[size:]

    def _parse(self) -> None:
        view = self._view
        start = self._start
        end = self._end
        phase = self._phase
        if phase == _WANT_COUNT:
            # Fast path for the common case of whole one-frame messages; anything else (and
            # every check on the count) is left to the general loop below.
            messages = self.messages
            limit = self.max_message_size
            while end - start >= _ONE_FRAME_PREFIX_SIZE:
                count, size = _ONE_FRAME_PREFIX.unpack_from(view, start)
                body = start + _ONE_FRAME_PREFIX_SIZE
                if count != 1 or size > limit or end - body < size:
                    break
                messages.append([bytes(view[body : body + size])])
                start = body + size
        count = self._count
        lengths = self._lengths
        frames = self._frames
        try:
            while True:
                if phase == _WANT_COUNT:
                    if end - start < _COUNT_SIZE:
                        break
                    (count,) = _COUNT.unpack_from(view, start)
                    start += _COUNT_SIZE
                    if not 1 <= count <= MAX_FRAMES:
                        raise FramingError(
                            f"message announces {count} frames; a message has 1 to "
                            f"{MAX_FRAMES} (is the peer speaking the kvrpc unix framing?)"
                        )
                    phase = _WANT_LENGTHS
                if phase == _WANT_LENGTHS:
                    if end - start < count * _LENGTH_SIZE:
                        break
                    lengths = _length_table(count).unpack_from(view, start)
                    start += count * _LENGTH_SIZE
                    total = sum(lengths)
                    frames = []
                    phase = _WANT_BODY
                    if total > self.max_message_size:
                        if total > self.discard_limit:
                            raise FramingError(
                                f"message announces {total} bytes, far over the "
                                f"max_message_size of {self.max_message_size}"
                            )
                        self._skip_left = self._skip_size = total
                        self._skip_head = bytearray()
                        self._skip_head_want = min(lengths[0], OVERSIZED_HEAD)
                        phase = _SKIP_BODY
                if phase == _SKIP_BODY:
                    taken = min(end - start, self._skip_left)
                    wanted = self._skip_head_want - len(self._skip_head)
                    if wanted > 0:
                        self._skip_head += view[start : start + min(taken, wanted)]
                    start += taken
                    self._skip_left -= taken
                    if self._skip_left:
                        break
                    self.messages.append(Oversized(bytes(self._skip_head), self._skip_size))
                    self._skip_head = bytearray()
                    phase = _WANT_COUNT
                    continue
                while len(frames) < count:
                    size = lengths[len(frames)]
                    available = end - start
                    if available >= size:
                        frames.append(bytes(view[start : start + size]))
                        start += size
                        continue
                    if size >= DIRECT_THRESHOLD:
                        self._receive_directly(size, view[start:end])
                        start = end = 0
                    break
                if len(frames) < count:
                    break
                self.messages.append(frames)
                frames = []
                phase = _WANT_COUNT
        finally:
            self._phase = phase
            self._count = count
            self._lengths = lengths
            self._frames = frames
            self._start, self._end = self._compact(start, end)

    def _receive_directly(self, size: int, head: memoryview) -> None:
        """Give the frame now starting its own buffer, seeded with the bytes already here."""
        if size >= MMAP_THRESHOLD:
            target = memoryview(mmap.mmap(-1, size))
            self._direct_frame = target
        else:
            block = bytearray(size)
            target = memoryview(block)
            self._direct_frame = block
        target[: len(head)] = head
        self._direct = target
        self._direct_filled = len(head)

    def _compact(self, start: int, end: int) -> tuple[int, int]:
        if start == end:
            return 0, 0
        if len(self._view) - end >= DIRECT_THRESHOLD:
            return start, end
        # What is left is an incomplete header or small frame (under DIRECT_THRESHOLD
        # bytes), so moving it to the front leaves room for the rest of it.
        kept = end - start
        self._view[:kept] = self._view[start:end]
        return 0, kept
