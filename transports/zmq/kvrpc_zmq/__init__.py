"""ZeroMQ transport for kvrpc: ``zmq+tcp://host:port`` and ``zmq+ipc:///path``.

Installed as the distribution ``kvrpc-zmq``; kvrpc finds it through the ``kvrpc.transports``
entry points, so nothing imports this package by name.
"""

from kvrpc_zmq.transport import ZmqClientTransport, ZmqPlugin, ZmqServerTransport

__all__ = ["ZmqClientTransport", "ZmqPlugin", "ZmqServerTransport"]
