"""Print the marks of :mod:`sitecustomize`, one line per layer-wise retrieve.

``python tools/marks/summarize.py DIR [N]``: the last N (default 8) retrieves, each from
its worker's submit (``c_submit``), every mark of any process in milliseconds after it, up
to ``e_leave`` (the engine's enqueue of the last layer); ``e_record`` marks are numbered by
layer.
"""

from __future__ import annotations

import pathlib
import sys


def main(directory: str, count: int = 8) -> None:
    """Read every ``*.txt`` of ``directory`` and print the last ``count`` retrieves."""
    rows = []
    for path in pathlib.Path(directory).glob("*.txt"):
        for line in path.read_text().splitlines():
            stamp, pid, name = line.split()
            rows.append((float(stamp), pid, name))
    rows.sort()
    retrieves: list[list[tuple[str, float]]] = []
    current: list[tuple[str, float]] | None = None
    layer = 0
    for stamp, _, name in rows:
        if name == "c_submit":
            current, layer = [(name, stamp)], 0
            retrieves.append(current)
        elif current is not None and current[-1][0] != "e_leave":
            if name == "e_record":
                name, layer = f"e_layer{layer}", layer + 1
            current.append((name, stamp))
    for marks in retrieves[-count:]:
        start = marks[0][1]
        print(" ".join(f"{name}={(stamp - start) * 1e3:.2f}" for name, stamp in marks))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8)
