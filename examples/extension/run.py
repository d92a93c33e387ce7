"""Install the kvrpc_calc extension on a server and call it.

Run it from the repository root:

    python examples/extension/run.py

Python puts the directory of the script it runs on sys.path, so ``import kvrpc_calc`` finds
the module next to this file; an installed extension would be imported the same way.
"""

from __future__ import annotations

import asyncio
import math

import kvrpc_calc
from kvrpc_calc import ADD, NORM, SCALE, STATS, NotFinite, Summary, Vec2

from kvrpc import AsyncClient, PayloadValidationError, RemoteError, RPCServer

URL = "inproc://examples-extension"


async def main() -> None:
    server = RPCServer(URL)
    kvrpc_calc.install(server)
    # The client gets the calc definitions too, so calls by name are validated and
    # calc.stats comes back as a Summary instead of a plain dict.
    async with server, AsyncClient(URL, registry=kvrpc_calc.registry()) as client:
        names = await client.call("rpc.list_protocols")
        print("calc protocols served:", ", ".join(n for n in names if n.startswith("calc.")))

        print("calc.add(1.5, 2.25) ->", await client.call(ADD, 1.5, 2.25))

        # Vec2 crosses the wire as ext type 80 in both directions.
        scaled = await client.call(SCALE, Vec2(3.0, 4.0), 2.5)
        print(f"calc.scale(Vec2(3, 4), 2.5) -> {scaled!r}")
        print("calc.norm(Vec2(3, 4)) ->", await client.call("calc.norm", Vec2(3.0, 4.0)))

        summary = await client.call(STATS, [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])
        assert isinstance(summary, Summary)
        print(
            f"calc.stats -> Summary(count={summary.count}, mean={summary.mean}, "
            f"stdev={summary.stdev:.4f}, min={summary.minimum}, max={summary.maximum})"
        )

        # Several calls in flight at once.
        futures = [await client.submit(NORM, Vec2(float(i), float(i))) for i in range(1, 4)]
        norms = await asyncio.gather(*futures)
        print("calc.norm of (1,1), (2,2), (3,3) ->", ", ".join(f"{n:.4f}" for n in norms))

        # A tuple where a Vec2 is declared: refused on the client, nothing is sent.
        try:
            await client.call(NORM, (3.0, 4.0))
        except PayloadValidationError as exc:
            print(f"refused before sending: {exc}")

        # The extension's own error, by its status code, comes back as itself.
        try:
            await client.call(SCALE, Vec2(1.0, 1.0), math.inf)
        except NotFinite as exc:
            print(f"calc.scale refused: NotFinite (status {exc.status}): {exc}")

        # The handler's own ValueError comes back as RemoteError.
        try:
            await client.call(STATS, [])
        except RemoteError as exc:
            print(f"calc.stats([]) failed on the server: {exc.remote_type}: {exc.remote_message}")


if __name__ == "__main__":
    asyncio.run(main())
