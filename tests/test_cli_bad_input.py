"""Every ``kvrpc`` subcommand fed bad values: exit status 2, the flag named, no traceback.

The walk runs ``kvrpc.cli.main`` in this process (argparse's errors are ``SystemExit(2)`` and
the message goes to stderr), so it needs no server and takes well under a second; one real
process per command family checks that ``python -m kvrpc`` answers the same way.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from kvrpc import cli

# For each argument type of kvrpc.cli, values it must refuse.
_BAD_VALUES = {
    cli._positive_int: ["0", "-3", "1.5", "x", ""],
    cli._positive_float: ["0", "-1", "inf", "nan", "x"],
    cli._gib: ["0", "-1", "inf", "nan", "8XB", "GiB"],
    cli._byte_count: ["0", "0.5", "-1", "inf", "8XB", "KiB"],
    cli._token_count: ["0", "300", "x"],
    cli._redis_url: ["localhost:6379", "http://x"],
    cli._plot_path: ["/no/such/directory/plot.png", "", "/tmp"],
    cli._key_name: ["", "a/b", "..", "."],
    cli._event_buffer: ["0", "65537", "x"],
    cli._namespace_hex: ["", "0011", "zz" * 8, "00" * 9],
}


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every runnable (sub)command of ``parser``: its words and its parser."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands:
        return [(path, parser)]
    found = []
    for name, sub in subcommands[0].choices.items():
        found.extend(_commands(sub, (*path, name)))
    return found


def _required(parser: argparse.ArgumentParser) -> list[str]:
    # A valid value for each required flag, so that the bad one is what gets refused.
    return [
        word
        for action in parser._actions
        if action.required and action.option_strings
        for word in (action.option_strings[-1], "unix:///tmp/kvrpc-bad-input.sock")
    ]


def _cases() -> list[tuple[list[str], str]]:
    cases = []
    for words, parser in _commands(cli._parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or action.nargs == 0:
                continue
            values = list(_BAD_VALUES.get(action.type, []))  # type: ignore[call-overload]
            if action.choices:
                values.append("no-such-choice")
            if action.option_strings:
                flag = action.option_strings[-1]
                given = [[flag, value] for value in values]
            else:  # a positional: argparse names it by its dest
                flag = action.dest
                given = [[value] for value in values]
            cases.extend(([*words, *_required(parser), *bad], flag) for bad in given)
    return cases


CASES = _cases()


def test_the_walk_covers_every_subcommand() -> None:
    for words, _ in _commands(cli._parser()):
        assert any(argv[: len(words)] == list(words) for argv, _ in CASES), words
    assert len(CASES) > 100


@pytest.mark.parametrize(("argv", "flag"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_a_bad_value_exits_2_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "flag", "says"),
    [
        (["bench", "rpc", "--calls", "3"], "--calls", "--interleave 5"),
        (["bench", "rpc", "--pipelined", "2", "--interleave", "3"], "--pipelined", "at least 3"),
        (["ping", "unix:///a.sock", "--url", "unix:///b.sock"], "--url", "give the server once"),
        (["stats", "unix:///a.sock", "--url", "unix:///b.sock"], "--url", "give the server once"),
        (["events", "unix:///a.sock", "--url", "unix:///b.sock"], "--url", "give the server once"),
    ],
)
def test_flags_that_disagree_exit_2_before_anything_runs(
    argv: list[str], flag: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and says in err


def test_bench_e2e_without_transformers_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an install without it sees
    assert cli.main(["bench", "e2e", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'kvrpc[transformers]'" in err
    assert "Traceback" not in err


def test_bench_tier_without_redis_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    assert cli.main(["bench", "tier", "--quick"]) == 1
    assert "pip install 'kvrpc[redis]'" in capsys.readouterr().err


def test_help_shows_defaults_and_the_top_help_has_no_rest_markup(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "``" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["ping", "--help"])
    ping = " ".join(capsys.readouterr().out.split())
    assert "--count COUNT pings to send (default: 3)" in ping
    assert "(default: 5.0)" in ping
    with pytest.raises(SystemExit):
        cli.main(["stats", "--help"])
    assert "--timeout TIMEOUT seconds to connect" in " ".join(capsys.readouterr().out.split())


def test_version_comes_from_the_installed_distribution(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"kvrpc {version('kvrpc')}\n"


def test_a_buffer_beyond_the_machines_memory_warns_and_inproc_warns() -> None:
    memory = cli._memory_bytes()
    assert memory is not None and memory > 0
    huge = argparse.Namespace(cpu_buffer_size=2 * memory / cli.GIB)
    warnings = cli._serve_warnings(huge, ["unix:///tmp/x.sock"])
    assert len(warnings) == 1 and "--cpu-buffer-size" in warnings[0]
    small = argparse.Namespace(cpu_buffer_size=0.001)
    assert cli._serve_warnings(small, ["unix:///tmp/x.sock"]) == []
    (inproc,) = cli._serve_warnings(small, ["unix:///tmp/x.sock", "inproc://x"])
    assert "inproc://x" in inproc and "no client can connect" in inproc


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--cpu-buffer-size", "inf"],
        ["ping", "--count", "0"],
        ["stats", "--timeout", "0"],
        ["events", "--namespace", "not-hex"],
        ["bench", "rpc", "--payload-mib", "0"],
        ["demo", "nope"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_the_real_command_exits_2_without_a_traceback(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvrpc", *argv], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "error: argument" in done.stderr
    assert "Traceback" not in done.stderr
