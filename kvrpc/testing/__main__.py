"""``python -m kvrpc.testing URL``: serve the conformance protocols; prints ``ready``."""

from __future__ import annotations

import asyncio
import sys

from kvrpc.testing.suite_server import serve_conformance


async def _serve(url: str) -> None:
    async with serve_conformance(url) as server:
        print("ready", flush=True)
        await server.wait_for_stop()


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1]))
