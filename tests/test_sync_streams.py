"""A SyncClient's streams across threads: what one thread does to a stream another reads."""

from __future__ import annotations

import asyncio
import tempfile
import threading

import pytest

from kvrpc.client import SyncClient
from kvrpc.testing.suite_server import TRICKLE, StreamLog, serve_conformance

WAIT = 10.0  # seconds a woken reader may take: a bound on a hang, never a measurement


@pytest.mark.asyncio
async def test_closing_a_stream_wakes_the_thread_blocked_reading_it() -> None:
    log = StreamLog()
    with tempfile.TemporaryDirectory(dir="/tmp") as where:
        url = f"unix://{where}/s.sock"
        async with serve_conformance(url, streams=log):

            def close_under_a_reader() -> tuple[bool, list[int]]:
                with SyncClient(url, timeout=WAIT) as client:
                    stream = client.stream(TRICKLE, 1, timeout=None)  # one item, then nothing
                    assert next(stream) == 0
                    rest: list[int] = []
                    ended = threading.Event()

                    def read() -> None:
                        rest.extend(stream)  # blocks: only the close below ends it
                        ended.set()

                    reader = threading.Thread(target=read)
                    reader.start()
                    stream.close()
                    woke = ended.wait(WAIT)
                    reader.join(WAIT)
                    return woke, rest

            woke, rest = await asyncio.to_thread(close_under_a_reader)
            assert woke and rest == []
            await log.until(lambda: 1 in log.finished)  # and the server stopped it
