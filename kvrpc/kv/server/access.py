"""Who a peer is: the rule for shm and cuda_ipc registrations, and the process behind a client id.

Mapping a worker's memory means the server reads and writes it with the server's own rights.
So the server maps only memory whose owner it has identified as the peer asking: a Unix-socket
peer is known by its kernel credentials (``SO_PEERCRED``), and an shm file must belong to that
uid and carry that process's pid in its name (``kvrpc-<pid>-...``). Over TCP nothing about the
peer is known, so these modes are refused there. Pure decisions, no I/O: the file checks live
in :func:`kvrpc.kv.shm.open_shared`.

The same credentials bind a client id to the process that uses it (:func:`caller_of`, and
:meth:`~kvrpc.kv.server.state.KVState.check_caller`): on a Unix socket, another process that
learned a client id still cannot act as that client.
"""

from __future__ import annotations

import os

from kvrpc.errors import KVError
from kvrpc.kv.server.records import Principal
from kvrpc.kv.shm import MemoryOwner
from kvrpc.server import PeerInfo, current_peer

__all__ = ["MemoryOwner", "caller_of", "current_caller", "memory_owner"]

#: Transports whose peers are this process (inproc) or, by the socket file's mode 0600, this
#: server's own user (zmq+ipc; root can connect too, and can read the files anyway). Their
#: peers' pids are not known, so shm names are not checked against one.
_SAME_USER_SCHEMES = frozenset({"inproc", "zmq+ipc"})


def memory_owner(mode: str, peer: PeerInfo, server_uid: int | None = None) -> MemoryOwner | None:
    """The owner a ``mode`` registration from ``peer`` must prove, or None for ``inline``.

    Raises :class:`KVError` for a mode that maps memory, from a peer the server cannot
    identify (TCP, or a transport that reports no credentials).
    """
    if mode == "inline":
        return None
    if peer.credentials is not None:
        return MemoryOwner(peer.credentials.uid, peer.credentials.pid)
    if peer.scheme in _SAME_USER_SCHEMES:
        uid = os.geteuid() if server_uid is None else server_uid
        return MemoryOwner(uid, os.getpid() if peer.scheme == "inproc" else None)
    raise KVError(
        f"the {mode} transfer mode lets the server map the worker's memory, which it does only "
        f"for a local peer it can identify; over {peer.scheme}:// it cannot. Run the server "
        "on the workers' host and connect through unix:// (the default URL of 'kvrpc serve'), "
        "or use the inline transfer mode"
    )


def caller_of(peer: PeerInfo) -> Principal | None:
    """The process ``peer`` is, as the kernel reports it: (uid, pid); None where unknown.

    Known for a Unix-socket peer (``SO_PEERCRED``), and unknown over TCP, zmq+ipc and inproc,
    or for a Unix peer whose connection closed before its request ran.
    """
    credentials = peer.credentials
    return None if credentials is None else (credentials.uid, credentials.pid)


def current_caller() -> Principal | None:
    """:func:`caller_of` the peer whose request is being handled; None outside a handler.

    Outside a handler (the service's methods called directly, as tests do) there is no peer,
    and the client id alone names the client.
    """
    try:
        peer = current_peer()
    except RuntimeError:
        return None
    return caller_of(peer)
