"""kvrpc: asyncio typed RPC with pluggable transports, and a KV-cache service on top.

The public API is re-exported here; each name lives in the module that owns it.
"""

from kvrpc.client import AsyncClient, SyncClient
from kvrpc.codec import register_ext
from kvrpc.errors import (
    ClientClosed,
    ConnectionLost,
    KvrpcError,
    PayloadValidationError,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    ServerBusy,
    Status,
    TransportError,
    UnknownProtocol,
    register_error,
)
from kvrpc.futures import CUDAMessagingFuture, MessagingFuture
from kvrpc.protocol import HandlerType, ProtocolDefinition, ProtocolRegistry
from kvrpc.server import RPCServer

__all__ = [
    "AsyncClient",
    "CUDAMessagingFuture",
    "ClientClosed",
    "ConnectionLost",
    "HandlerType",
    "KvrpcError",
    "MessagingFuture",
    "PayloadValidationError",
    "ProtocolDefinition",
    "ProtocolError",
    "ProtocolRegistry",
    "RPCServer",
    "RemoteError",
    "RequestTimeout",
    "ServerBusy",
    "Status",
    "SyncClient",
    "TransportError",
    "UnknownProtocol",
    "register_error",
    "register_ext",
]

__version__ = "0.1.0"
