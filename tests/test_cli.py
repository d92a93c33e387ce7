"""The `kvrpc` command line, run as a user runs it: a real process per command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

KVRPC = [sys.executable, "-m", "kvrpc"]


def kvrpc(
    *args: str, timeout: float = 120, progress: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run ``kvrpc ARGS``; ``progress`` forces the progress lines a pipe would not get."""
    env = {**os.environ, "KVRPC_PROGRESS": "1"} if progress else None
    return subprocess.run([*KVRPC, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_demo_serves_a_prompt_twice_across_processes_miss_then_hit() -> None:
    done = kvrpc("demo")
    assert done.returncode == 0, done.stderr
    # Nothing on stderr: no torch "Failed to initialize NumPy" warning (numpy is a dependency).
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    first = next(line for line in lines if line.startswith("request-1: lookup"))
    second = next(line for line in lines if line.startswith("request-2: lookup"))
    assert "-> miss: 0 of 1034" in first
    assert "-> hit: 1024 of 1034" in second
    assert done.stdout.count("byte-identical to what was stored: True") == 2
    assert "hits=4 misses=4 stores=8 retrieves=8" in done.stdout


def test_rpc_demo_makes_real_calls_and_reports_them() -> None:
    done = kvrpc("demo", "rpc")
    assert done.returncode == 0, done.stderr
    assert "rpc.ping -> pong" in done.stdout
    assert "demo.add(2, 40) -> 42" in done.stdout
    assert "(matches local: True)" in done.stdout
    assert "100 pipelined demo.add calls -> sum 9900" in done.stdout
    assert "PayloadValidationError" in done.stdout


def test_bench_rpc_prints_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "rpc.json"
    done = kvrpc(
        "bench", "rpc", "--url", "inproc://cli-bench", "--calls", "200", "--pipelined", "500",
        "--rounds", "2", "--payload-mib", "1", "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "ping_p50_us" in done.stdout
    # Piped, as here, a bench shows no progress (kvrpc.progress); the next test forces it.
    assert "[bench" not in done.stderr
    figures = json.loads(out.read_text())
    assert 0 < figures["ping_p50_us"] <= figures["ping_p99_us"]
    assert figures["pipelined_calls_per_s"] > 0
    assert figures["echo_gb_per_s"] > 0


def test_bench_rpc_over_a_socket_measures_the_sync_client_beside_blocking_raw_clients(
    tmp_path: Path,
) -> None:
    out = tmp_path / "rpc.json"
    done = kvrpc(
        "bench", "rpc", "--url", f"unix://{tmp_path}/b.sock", "--calls", "200",
        "--pipelined", "500", "--rounds", "1", "--payload-mib", "1", "--interleave", "2",
        "--json", str(out), progress=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "[bench rpc] sync round" in done.stderr  # KVRPC_PROGRESS=1: plain lines, piped
    figures = json.loads(out.read_text())
    # kvrpc's two clients, the transport's own raw clients and plain pyzmq, all in one run.
    for prefix in ("", "raw_", "sync_", "sync_direct_", "raw_sync_", "raw_zmq_sync_"):
        assert 0 < figures[f"{prefix}ping_p50_us"] <= figures[f"{prefix}ping_p99_us"], prefix
        assert figures[f"{prefix}pipelined_calls_per_s"] > 0, prefix
    assert figures["sync_ping_p50_ratio_to_raw_sync"] == pytest.approx(
        figures["sync_ping_p50_us"] / figures["raw_sync_ping_p50_us"]
    )
    assert figures["sync_direct_pipelined_ratio_to_raw_sync"] == pytest.approx(
        figures["sync_direct_pipelined_calls_per_s"] / figures["raw_sync_pipelined_calls_per_s"]
    )
    assert figures["pipelined_p99_over_p50"] >= 1
    assert "lmcache_ping_p50_us" not in figures  # only with --vs lmcache


def test_bench_rpc_vs_lmcache_says_what_is_missing_when_lmcache_is_not_importable() -> None:
    pytest.importorskip("kvrpc_unix")
    try:
        import lmcache  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("lmcache is importable here: the figure itself runs on the GPU host")
    done = kvrpc("bench", "rpc", "--url", "unix:///tmp/kvrpc-no-lmcache.sock", "--vs", "lmcache")
    assert done.returncode == 1
    assert "--vs lmcache needs LMCache importable" in done.stderr
    assert "Traceback" not in done.stderr


def test_bench_import_reports_that_kvrpc_imports_neither_torch_nor_pydantic(
    tmp_path: Path,
) -> None:
    out = tmp_path / "import.json"
    done = kvrpc("bench", "import", "--runs", "2", "--json", str(out))
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert figures["heavy_modules_imported"] == "none"
    assert figures["import_kvrpc_median_ms"] > 0


# Run the CLI as a user without the plugins installed would: their entry points hidden.
_WITHOUT_PLUGINS = (
    "import importlib.metadata, sys; importlib.metadata.entry_points = lambda **_: (); "
    "from kvrpc.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.parametrize(
    ("command", "package"),
    [
        (("serve", "--url", "zmq+tcp://127.0.0.1:5555", "--insecure"), "kvrpc-zmq"),
        (("ping", "unix:///tmp/kvrpc-cli-test.sock", "--timeout", "2"), "kvrpc-unix"),
    ],
    ids=["serve-zmq", "ping-unix"],
)
def test_a_scheme_without_its_plugin_fails_naming_the_package(
    command: tuple[str, ...], package: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_PLUGINS, *command],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert package in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("scheme", ["zmq+ipc", "unix"])
def test_serve_then_ping_and_stats_from_other_processes(scheme: str, tmp_path: Path) -> None:
    # In a directory that does not exist yet, as /run/kvrpc on a fresh host: serve makes it,
    # private to this user, and leaves no socket file behind once stopped.
    socket_dir = tmp_path / "run" / "kvrpc"
    url = f"{scheme}://{socket_dir}/cli.sock"
    with subprocess.Popen(
        [*KVRPC, "serve", "--url", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as server:
        _ping_and_stats_then_stop(server, url)
    assert socket_dir.stat().st_mode & 0o777 == 0o700
    assert list(socket_dir.iterdir()) == []


def _ping_and_stats_then_stop(server: subprocess.Popen[str], url: str) -> None:
    try:
        assert server.stdout is not None
        assert server.stdout.readline().startswith(f"kvrpc ready {url}")
        pinged = kvrpc("ping", url, "--count", "2", timeout=60)
        assert pinged.returncode == 0, pinged.stderr
        assert pinged.stdout.count("pong") == 2
        stats = kvrpc("stats", url, "--json", timeout=60)
        assert stats.returncode == 0, stats.stderr
        report = json.loads(stats.stdout)
        table = kvrpc("stats", url, timeout=60)
        assert table.returncode == 0, table.stderr
        assert table.stdout.startswith(f"kvrpc stats {url}\n")
        assert "KV cache (L1)" in table.stdout and "transport_" not in table.stdout
        assert report["rpc"]["transport_connections"] >= 2
        assert report["kv"]["chunk_size"] == 256 and report["kv"]["chunks"] == 0
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0


@pytest.mark.parametrize(
    "flags", [("--chunk-size", "0"), ("--cpu-buffer-size", "-1"), ("--max-workers", "x")]
)
def test_serve_refuses_bad_sizes_before_starting(flags: tuple[str, str]) -> None:
    done = kvrpc("serve", "--url", "inproc://cli-bad", *flags, timeout=60)
    assert done.returncode == 2
    assert flags[0] in done.stderr
    assert "Traceback" not in done.stderr


def test_a_bad_url_fails_with_a_message_not_a_traceback() -> None:
    done = kvrpc("ping", "no-scheme-here", timeout=60)
    assert done.returncode == 1
    assert "no-scheme-here" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_prints_a_ready_line_and_stops_cleanly_on_a_signal(sig: signal.Signals) -> None:
    child = subprocess.Popen(
        [
            *KVRPC,
            "serve",
            "--url",
            "inproc://cli-serve",
            "--chunk-size",
            "128",
            "--cpu-buffer-size",
            "0.5",
            "--max-workers",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        ready = child.stdout.readline().strip()
        assert ready == (
            "kvrpc ready inproc://cli-serve chunk_size=128 cpu_buffer_size=0.5GiB max_workers=2"
        )
        child.send_signal(sig)
        assert child.wait(timeout=30) == 0
        # inproc:// serves no other process, and the server says so before it starts.
        assert (
            "inproc://cli-serve is reachable only from inside this process"
            in (child.communicate()[1])
        )
    finally:
        child.kill()
        child.communicate()


def test_bench_gpu_without_a_gpu_says_so_and_fails() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the bench would run (see tests/test_kv_cuda.py)")
    done = kvrpc("bench", "gpu", "--quick")
    assert done.returncode != 0
    assert "needs a CUDA GPU" in done.stderr + done.stdout
