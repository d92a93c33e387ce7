"""Who may hand the server memory to map: the rule for shm and cuda_ipc registrations.

Mapping a worker's memory means the server reads and writes it with the server's own rights.
So the server maps only memory whose owner it has identified as the peer asking: a Unix-socket
peer is known by its kernel credentials (``SO_PEERCRED``), and an shm file must belong to that
uid and carry that process's pid in its name (``kvrpc-<pid>-...``). Over TCP nothing about the
peer is known, so these modes are refused there. Pure decisions, no I/O: the file checks live
in :func:`kvrpc.kv.shm.open_shared`.
"""

from __future__ import annotations

import os

from kvrpc.errors import KVError
from kvrpc.kv.shm import MemoryOwner
from kvrpc.server import PeerInfo

__all__ = ["MemoryOwner", "memory_owner"]

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
