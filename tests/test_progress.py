"""Progress of long commands: a status line on a terminal, nothing when piped, lines if forced."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from kvrpc.progress import ENV, Progress, wants_progress


class _Terminal(io.StringIO):
    """A stream that says it is a terminal, and keeps what was written."""

    def isatty(self) -> bool:
        return True


class _Closed(io.StringIO):
    def isatty(self) -> bool:
        raise ValueError("I/O operation on closed file")


def test_progress_is_wanted_on_a_terminal_and_not_on_a_pipe() -> None:
    assert wants_progress(_Terminal(), environ={}) is True
    assert wants_progress(io.StringIO(), environ={}) is False


def test_a_stream_whose_isatty_fails_is_not_a_terminal() -> None:
    assert wants_progress(_Closed(), environ={}) is False


@pytest.mark.parametrize("value", ["1", "yes", "on", "TRUE", " 1 "])
def test_the_environment_forces_progress_on_a_pipe(value: str) -> None:
    assert wants_progress(io.StringIO(), environ={ENV: value}) is True


@pytest.mark.parametrize("value", ["0", "no", "off", "false"])
def test_the_environment_silences_progress_on_a_terminal(value: str) -> None:
    assert wants_progress(_Terminal(), environ={ENV: value}) is False


@pytest.mark.parametrize("value", ["", "maybe"])
def test_an_empty_or_unknown_setting_leaves_it_to_the_terminal_test(value: str) -> None:
    assert wants_progress(_Terminal(), environ={ENV: value}) is True
    assert wants_progress(io.StringIO(), environ={ENV: value}) is False


def test_the_default_environment_is_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV, "1")
    assert wants_progress(io.StringIO()) is True
    monkeypatch.setenv(ENV, "0")
    assert wants_progress(_Terminal()) is False


def test_on_a_terminal_one_status_line_is_rewritten_and_erased_at_the_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    terminal = _Terminal()
    with Progress("bench x", terminal) as progress:
        progress("round 1/2")
        progress("round 2/2")
    written = terminal.getvalue()
    assert "\n" not in written  # never a new line: the same line, rewritten
    assert written == "\r\x1b[K[bench x] round 1/2\r\x1b[K[bench x] round 2/2\r\x1b[K"


def test_a_status_line_is_cut_to_the_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("COLUMNS", "20")  # the fallback width: a StringIO has no descriptor
    terminal = _Terminal()
    Progress("bench x", terminal)("a status far longer than twenty columns")
    assert terminal.getvalue() == "\r\x1b[K" + "[bench x] a status far longer"[:19]


def test_piped_progress_prints_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    pipe = io.StringIO()
    with Progress("bench x", pipe) as progress:
        progress("round 1/2")
    assert pipe.getvalue() == ""


def test_forced_progress_on_a_pipe_prints_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "1")
    pipe = io.StringIO()
    with Progress("bench x", pipe) as progress:
        progress("round 1/2")
        progress("round 2/2")
    assert pipe.getvalue() == "[bench x] round 1/2\n[bench x] round 2/2\n"


def test_closing_erases_a_line_another_reporter_drew_on_the_same_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    terminal = _Terminal()
    Progress("helper", terminal)("serving")  # a helper from another bench's module
    Progress("bench x", terminal).close()
    assert terminal.getvalue().endswith("\r\x1b[K")
    Progress("helper", terminal).close()  # nothing drawn now: nothing more written
    assert terminal.getvalue().count("\r\x1b[K") == 2


def test_a_decorated_command_erases_its_line_when_it_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    terminal = _Terminal()
    progress = Progress("bench x", terminal)

    @progress.closing
    def command() -> None:
        progress("working")
        raise RuntimeError("failed")

    with pytest.raises(RuntimeError):
        command()
    assert terminal.getvalue().endswith("working\r\x1b[K")


def _bench_memory(extra_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != ENV} | extra_env
    argv = ["bench", "kv", "--quick", "--only", "memory", "--tiny-chunks", "2000"]
    return subprocess.run(
        [sys.executable, "-m", "kvrpc", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_a_piped_bench_prints_no_progress_and_a_forced_one_prints_lines() -> None:
    piped = _bench_memory({})
    assert piped.returncode == 0, piped.stderr
    assert "tiny_metadata_bytes_per_chunk" in piped.stdout
    assert "[bench" not in piped.stderr
    assert "\r" not in piped.stderr

    forced = _bench_memory({ENV: "1"})
    assert forced.returncode == 0, forced.stderr
    lines = [line for line in forced.stderr.splitlines() if line.startswith("[bench kv] ")]
    assert any("memory: storing 2,000 chunks" in line for line in lines), forced.stderr
    assert "\r" not in forced.stderr  # plain lines, not a status line, where not a terminal
