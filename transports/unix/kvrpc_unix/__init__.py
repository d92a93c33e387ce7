"""The ``unix:///absolute/path`` transport for kvrpc: framed messages over Unix sockets."""

from kvrpc_unix.framing import FrameReader, FramingError, encode_prefix, frame_prefix
from kvrpc_unix.transport import (
    UnixClientTransport,
    UnixPlugin,
    UnixServerTransport,
    socket_path,
)

__all__ = [
    "FrameReader",
    "FramingError",
    "UnixClientTransport",
    "UnixPlugin",
    "UnixServerTransport",
    "encode_prefix",
    "frame_prefix",
    "socket_path",
]
