"""Where local sockets live: the user's private runtime directory, and claiming a path."""

from __future__ import annotations

import contextlib

from kvrpc.errors import TransportError, TransportNotFound
from kvrpc.transport.registry import get_plugin

__all__ = ["claim_socket_path", "default_url", "local_url", "runtime_dir"]


def claim_socket_path(path: str) -> None:
    """Make ``path`` ready for a server to bind a Unix-domain socket there.

    A socket file left by a server that died is removed; a file that is not a socket, or a
    socket a live server still accepts on, raises :class:`TransportError` saying which, so
    one server never silently steals another's address. For plugin authors.
    """
    import os
    import socket
    import stat

    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            raise TransportError(f"cannot bind {path}: directory {parent} does not exist") from None
        return
    if not stat.S_ISSOCK(mode):
        raise TransportError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        # Nobody accepts there: the file is a leftover of a server that died.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as exc:
        raise TransportError(f"cannot check the socket at {path}: {exc}") from exc
    finally:
        probe.close()
    raise TransportError(f"a server is already listening on {path}; stop it or choose another path")


def runtime_dir() -> str:
    """The calling user's private directory for kvrpc's sockets (mode 0700), made if missing.

    ``$XDG_RUNTIME_DIR/kvrpc`` where that variable names a directory of this user (the
    per-user runtime directory a login session has), else ``/tmp/kvrpc-<uid>``. An existing
    one must be a real directory of this user that no one else may enter: anyone can make
    ``/tmp/kvrpc-<uid>`` first, and would then see every socket made in it, so otherwise
    :class:`TransportError` says what is wrong with it.
    """
    import os
    import stat

    uid = os.geteuid()
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    try:
        usable_base = bool(base) and os.stat(base).st_uid == uid
    except OSError:
        usable_base = False
    path = os.path.join(base, "kvrpc") if usable_base else f"/tmp/kvrpc-{uid}"
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o077:
        raise TransportError(
            f"{path} is not a private directory of this user (uid {uid}, mode 0700); it may "
            "have been made by someone else to catch kvrpc's sockets: remove it, or give "
            "--url a socket path in a directory of your own"
        )
    return path


def local_url(directory: str, name: str = "kvrpc.sock") -> str:
    """A socket URL in ``directory``: ``unix://`` when that plugin is installed, else zmq+ipc."""
    import os

    path = os.path.join(directory, name)
    try:
        get_plugin("unix")
    except TransportNotFound:
        return f"zmq+ipc://{path}"
    return f"unix://{path}"


def default_url() -> str:
    """Where ``kvrpc serve`` listens and the adapters connect when no URL is given.

    A Unix socket in :func:`runtime_dir`: only this user's processes can connect, and the
    server knows which process each peer is. TCP is used only when a URL asks for it.
    """
    return local_url(runtime_dir())
