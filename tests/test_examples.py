"""Every example runs to completion and prints results that only real replies produce."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Each example, with lines of its output that prove the calls went through the server and
# came back: computed values, model fields, and the errors the example provokes on purpose.
EXPECTED = {
    "examples/async_client.py": [
        "rpc.ping -> pong",
        "demo.greet -> hello, async world",
        "demo.count_words -> WordCount: words=9 distinct=6 most_common='the'",
        "5 submitted demo.greet calls -> 'hello, caller 0' ... 'hello, caller 4'",
        "demo.divide(355, 113) -> 3.141593; 'to be or not to be' -> 6",
        "refused before sending: PayloadValidationError: demo.divide: argument 0:",
        "RemoteError(ZeroDivisionError): ZeroDivisionError: division by zero",
        "server and client closed",
    ],
    "examples/sync_client.py": [
        "rpc.ping from the main thread -> pong",
        "demo.divide(22, 7) -> 3.1429",
        "done callback ran: True",
        "awaited from a fresh event loop -> hello, asyncio",
        "'hello, future 0', 'hello, future 1', 'hello, future 2', 'hello, future 3'",
        "worker: hello, thread 0: 8 words, most common 'a'",
        "worker: hello, thread 3: 6 words, most common 'all'",
        "demo.divide(1, 0) failed: RemoteError: ZeroDivisionError: division by zero",
        "result() raised RemoteError with remote_type=ZeroDivisionError",
        "'timeouts': 0",
        "server thread stopped",
    ],
    "examples/prefix_router.py": [
        "following 3 servers' kv.events",
        "route('system prompt + question', 69 tokens) -> server 1, 64 tokens cached; "
        "kv.lookup on each: [16, 64, 0]; agrees: True",
        "route('first chunk only', 36 tokens) -> server 0, 16 tokens cached; "
        "kv.lookup on each: [16, 16, 0]; agrees: True",
        "route('the other prompt', 48 tokens) -> server 2, 48 tokens cached; "
        "kv.lookup on each: [0, 0, 48]; agrees: True",
        "route('nothing cached', 32 tokens) -> any server, 0 tokens cached",
        "server 1 cleared (4 chunks)",
        "route('system prompt + question', 69 tokens) -> server 0, 16 tokens cached; "
        "kv.lookup on each: [16, 0, 0]; agrees: True",
        "router and servers closed",
    ],
    "examples/extension/run.py": [
        "calc protocols served: calc.add, calc.norm, calc.scale, calc.stats",
        "calc.add(1.5, 2.25) -> 3.75",
        "calc.scale(Vec2(3, 4), 2.5) -> Vec2(x=7.5, y=10.0)",
        "calc.norm(Vec2(3, 4)) -> 5.0",
        "calc.stats -> Summary(count=8, mean=5.0, stdev=2.1381, min=2.0, max=9.0)",
        "calc.norm of (1,1), (2,2), (3,3) -> 1.4142, 2.8284, 4.2426",
        "refused before sending: calc.norm: argument 0: Input should be an instance of Vec2",
        "calc.scale refused: NotFinite (status 1001): calc.scale needs a finite factor, not inf",
        "calc.stats([]) failed on the server: ValueError: calc.stats needs at least one value",
    ],
}


@pytest.mark.parametrize("script", sorted(EXPECTED), ids=lambda s: Path(s).stem)
def test_example_runs_and_prints_real_replies(script: str) -> None:
    done = subprocess.run(
        [sys.executable, script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    missing = [line for line in EXPECTED[script] if line not in done.stdout]
    assert not missing, f"{script} did not print {missing}; it printed:\n{done.stdout}"
    # An example must not pass while printing tracebacks (from loop callbacks, for instance).
    assert "Traceback" not in done.stderr, done.stderr


def _complete_programs(doc: str) -> list[str]:
    """The ```python blocks of ``doc`` that are whole programs (they start their own loop)."""
    import re

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), re.S)
    return [block for block in blocks if "asyncio.run(main())" in block]


@pytest.mark.parametrize(("doc", "expected"), [("README.md", "42"), ("docs/core.md", "pong")])
def test_documented_programs_run_as_written(doc: str, expected: str) -> None:
    programs = _complete_programs(doc)
    assert programs, f"{doc} has no complete program to run"
    for program in programs:
        done = subprocess.run(
            [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
    assert expected in done.stdout
