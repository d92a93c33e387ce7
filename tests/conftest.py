"""Shared fixtures: real servers on unique in-process addresses, always torn down."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest

from kvrpc import RPCServer

_names = itertools.count()


@pytest.fixture
def url() -> str:
    """A fresh inproc:// address per test, so tests never see each other's servers."""
    return f"inproc://test-{next(_names)}"


@pytest.fixture
async def server(url: str) -> AsyncIterator[RPCServer]:
    """A running server with only the built-in protocols; tests register their own."""
    async with RPCServer(url, shutdown_grace=1.0) as running:
        yield running


@pytest.fixture
def sock_dir() -> Iterator[str]:
    """A fresh directory for socket files, under /tmp: AF_UNIX paths are capped near 108 bytes."""
    path = tempfile.mkdtemp(prefix="kvrpc-test-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)
