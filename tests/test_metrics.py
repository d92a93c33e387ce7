"""The metrics package without a network: request parsing, readiness, the stats table, the
call observer on a real server over inproc://, and that ``import kvrpc`` stays light."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kvrpc import RPCServer
from kvrpc.client import AsyncClient
from kvrpc.errors import KVError, Status
from kvrpc.metrics import (
    LATENCY_BOUNDS,
    BadRequest,
    CallObserver,
    parse_request_head,
    readiness,
    render_stats,
)
from kvrpc.metrics.health import TierHealth
from kvrpc.metrics.http import Request, Response, render_response, route
from kvrpc.metrics.looplag import LAG_BOUNDS, LoopLagTimer
from kvrpc.protocol import HandlerType, ProtocolDefinition

# ------------------------------------------------------------------ HTTP request heads


def test_a_get_request_head_gives_its_method_path_and_query() -> None:
    head = b"GET /metrics?name%5B%5D=x HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n"
    assert parse_request_head(head) == Request("GET", "/metrics", "name%5B%5D=x", "HTTP/1.1")


def test_empty_lines_before_the_request_line_are_ignored_and_the_path_is_decoded() -> None:
    assert parse_request_head(b"\r\nHEAD /ready%7A HTTP/1.0\r\n\r\n").path == "/readyz"


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /metrics\r\n\r\n", 400),  # no version
        (b"GET  /metrics HTTP/1.1\r\n\r\n", 400),  # two spaces: an empty part
        (b"get /metrics HTTP/1.1\r\n\r\n", 400),  # methods are upper case
        (b"GET metrics HTTP/1.1\r\n\r\n", 400),  # not a path
        (b"GET http://x/metrics HTTP/1.1\r\n\r\n", 400),  # absolute form is not served
        (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
        (b"GET /metrics SPDY/3\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\n folded: x\r\n\r\n", 400),
        (b"GET /m\xe9trics HTTP/1.1\r\n\r\n", 400),
        (b"\r\n\r\n", 400),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 431),
    ],
)
def test_a_malformed_request_head_is_refused_with_its_status(head: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_request_head(head)
    assert refused.value.status == status


def test_routes_answer_known_paths_refuse_other_methods_and_name_the_paths_on_404() -> None:
    routes = {"/livez": lambda: Response(200, b"live\n")}
    assert route(Request("GET", "/livez", "", "HTTP/1.1"), routes) == (
        Response(200, b"live\n"),
        False,
    )
    assert route(Request("HEAD", "/livez", "", "HTTP/1.1"), routes)[1] is True
    assert route(Request("POST", "/livez", "", "HTTP/1.1"), routes)[0].status == 405
    missing = route(Request("GET", "/", "", "HTTP/1.1"), routes)[0]
    assert missing.status == 404 and b"/livez" in missing.body


def test_a_response_carries_its_length_and_closes_and_a_head_reply_has_no_body() -> None:
    wire = render_response(Response(503, b"not ready\n"))
    head, body = wire.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Content-Length: 10" in head and b"Connection: close" in head
    assert body == b"not ready\n"
    assert render_response(Response(200, b"x"), head_only=True).endswith(b"\r\n\r\n")


# ------------------------------------------------------------------ readiness


def test_ready_when_every_listener_serves_and_every_tier_is_up() -> None:
    ready, body = readiness([("unix:///a", True)], [TierHealth("redis", True)])
    assert ready and body.startswith("ready\n") and "tier redis: up" in body


def test_not_ready_names_the_listener_or_tier_that_is_not() -> None:
    ready, body = readiness([("unix:///a", False)], [])
    assert not ready and "listener unix:///a: not serving" in body
    ready, body = readiness([("unix:///a", True)], [TierHealth("redis", False, "skipped")])
    assert not ready and body.startswith("not ready\n") and "tier redis: down (skipped)" in body
    assert readiness([], [])[0] is False


def test_an_ignored_tier_that_is_down_leaves_the_server_ready_and_says_so() -> None:
    tiers = [TierHealth("disk", True), TierHealth("redis", False, "skipped")]
    ready, body = readiness([("unix:///a", True)], tiers, ignored={"redis"})
    assert ready and "tier redis: down (skipped), ignored for readiness" in body
    assert readiness([("unix:///a", True)], tiers, ignored={"disk"})[0] is False


# ------------------------------------------------------------------ the stats table

REPORT = {
    "rpc": {"requests": 10, "in_flight": 1, "transport_connections": 2, "max_rss_bytes": 3 << 20},
    "kv": {
        "hits": 3, "misses": 1, "bytes_used": 1024, "bytes_free": 3072, "tier_files": 4,
        "redis_state": 1, "redis_write_bytes": 4096, "cuda_last_batch_gpu_us": 12,
        "loop_lag_p99_us": 40, "a_new_counter": 5,
    },
}  # fmt: skip


def table_rows(text: str) -> dict[str, list[str]]:
    """Each indented row of the table: its label, then its value columns."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("  "):
            label, *values = [part for part in line.strip().split("  ") if part]
            rows[label.strip()] = [v.strip() for v in values]
    return rows


def test_the_table_groups_keys_with_units_and_derived_rates_and_hides_none() -> None:
    text = render_stats(REPORT, title="kvrpc stats unix:///x")
    lines = text.splitlines()
    assert lines[0] == "kvrpc stats unix:///x"
    groups = [line for line in lines[1:] if line and not line.startswith(" ")]
    assert groups[:3] == ["RPC", "Transport", "KV cache (L1)"]
    rows = table_rows(text)
    assert rows["requests"] == ["10"]
    assert rows["max rss"] == ["3.0 MiB"]
    assert rows["hit rate (chunks)"] == ["75.0%"]
    assert rows["L1 full"] == ["25.0%"]
    assert rows["files"] == ["4"]  # the disk tier's, under its own group
    assert rows["state"] == ["skipped (down)"]
    assert rows["last batch gpu"] == ["12 us"]
    assert rows["a new counter"] == ["5"]  # unknown keys still show


def test_with_a_previous_report_counters_show_rates_and_levels_do_not() -> None:
    previous = {
        "rpc": {**REPORT["rpc"], "requests": 4, "in_flight": 0},
        "kv": {**REPORT["kv"], "redis_write_bytes": 0, "hits": 1},
    }
    rows = table_rows(render_stats(REPORT, previous=previous, interval=2.0))
    assert rows["requests"] == ["10", "3.0"]
    assert rows["hits"] == ["3", "1.0"]
    assert rows["write"] == ["4.0 KiB", "2.0 KiB/s"]
    assert rows["in flight"] == ["1"]  # a level: no rate
    assert rows["loop lag p99"] == ["40 us"]  # reset by every read: no rate


# ------------------------------------------------------------------ the call observer

SLOW = ProtocolDefinition("test.slow", (int,), int, HandlerType.BLOCKING)
FAILS = ProtocolDefinition("test.fails", (), int)
LATER = ProtocolDefinition("test.later", (), int)


async def test_an_instrumented_server_counts_calls_by_protocol_status_and_latency() -> None:
    observer = CallObserver()
    server = RPCServer("inproc://metrics-observer")
    threads: set[int] = set()

    def slow(x: int) -> int:
        threads.add(threading.get_ident())
        return x + 1

    def fails() -> int:
        raise KVError("refused on purpose")

    async def later() -> int:
        await asyncio.sleep(0)
        return 7

    server.register(SLOW, slow)
    server.instrument(observer.wrap)
    server.register(FAILS, fails)  # registered after instrument(): wrapped all the same
    server.register(LATER, later)
    async with server, AsyncClient(server.url, registry=server.registry) as client:
        for _ in range(3):
            assert await client.call("rpc.ping") == "pong"
        assert await asyncio.gather(*(client.call(SLOW, i) for i in range(8))) == list(range(1, 9))
        with pytest.raises(KVError):
            await client.call(FAILS)
        assert await client.call(LATER) == 7
        with pytest.raises(RuntimeError):
            server.instrument(observer.wrap)
    calls = dict(observer.snapshot())
    assert calls["rpc.ping"].ok == 3 and calls["rpc.ping"].calls == 3
    assert calls["test.slow"].ok == 8  # summed over the pool threads' own records
    assert threads  # ran in threads, not on the loop
    assert calls["test.fails"].ok == 0 and calls["test.fails"].errors == {int(Status.KV): 1}
    assert calls["test.later"].ok == 1
    assert calls["rpc.echo"].calls == 0
    assert len(calls["rpc.ping"].buckets) == len(LATENCY_BOUNDS) + 1


async def test_a_plain_handler_that_returns_an_awaitable_is_timed_until_it_completes() -> None:
    observer = CallObserver()
    gate = asyncio.Event()

    async def wait_for_gate() -> int:
        await gate.wait()
        return 1

    wrapped = observer.wrap(LATER, lambda: wait_for_gate())
    pending = wrapped()
    (_, record), *_ = [item for item in observer.snapshot() if item[0] == "test.later"]
    assert record.calls == 0  # not done yet
    task = asyncio.ensure_future(pending)
    await asyncio.sleep(0)
    gate.set()
    assert await task == 1
    assert dict(observer.snapshot())["test.later"].ok == 1


def test_the_loop_lag_timer_buckets_samples_by_their_upper_bound() -> None:
    lag = LoopLagTimer()
    for sample in (0.0, LAG_BOUNDS[0], LAG_BOUNDS[0] * 1.01, 100.0, -1.0):
        lag.record(sample)
    assert lag.buckets[0] == 3  # 0, exactly the first bound, and a negative sample as 0
    assert lag.buckets[1] == 1
    assert lag.buckets[-1] == 1
    assert lag.worst == 100.0 and lag.samples == 5


# ------------------------------------------------------------------ the collector


async def test_the_exposition_of_a_plain_rpc_server_lists_its_calls_and_transport() -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from kvrpc.metrics.collector import KVRPCCollector, exposition, registry_of
    from kvrpc.metrics.names import METRICS

    observer = CallObserver()
    server = RPCServer("inproc://metrics-exposition")
    server.instrument(observer.wrap)
    async with server, AsyncClient(server.url) as client:
        for _ in range(2):
            await client.call("rpc.ping")
        text = exposition(registry_of(KVRPCCollector([server], None, observer))).decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    # Every family of the table is exposed, with or without samples, so dashboards never
    # lose a series name.
    assert {m.name.removesuffix("_total") for m in METRICS} <= set(families)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families.values()
        for s in family.samples
    }
    assert samples[("kvrpc_rpc_calls_total", (("protocol", "rpc.ping"), ("status", "OK")))] == 2
    assert samples[("kvrpc_rpc_handler_seconds_count", (("protocol", "rpc.ping"),))] == 2
    inf = (("le", "+Inf"), ("protocol", "rpc.ping"))
    assert samples[("kvrpc_rpc_handler_seconds_bucket", inf)] == 2
    listener = (("listener", server.url),)
    assert samples[("kvrpc_rpc_requests_total", listener)] == 2
    assert samples[("kvrpc_transport_connections_total", listener)] == 1


# ------------------------------------------------------------------ imports and flags


def test_import_kvrpc_and_its_cli_never_import_prometheus_client() -> None:
    code = (
        "import sys, kvrpc, kvrpc.cli, kvrpc.metrics, kvrpc.kv.server.serving\n"
        "assert 'prometheus_client' not in sys.modules, 'prometheus_client imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def run_cli(*argv: str, hide_prometheus: bool = False) -> subprocess.CompletedProcess[str]:
    prefix = "import sys; sys.modules['prometheus_client'] = None; " if hide_prometheus else ""
    code = f"{prefix}from kvrpc.cli import main; sys.exit(main({list(argv)!r}))"
    if not prefix:
        code = "import sys; " + code
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_metrics_without_prometheus_client_exit_2_with_the_install_hint() -> None:
    done = run_cli("serve", "--url", "unix:///nonexistent/kv.sock", "--metrics-port", "0",
                   hide_prometheus=True)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "pip install 'kvrpc[metrics]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_metrics_host_beyond_loopback_needs_metrics_insecure() -> None:
    pytest.importorskip("prometheus_client")
    done = run_cli("serve", "--url", "unix:///nonexistent/kv.sock", "--metrics-port", "0",
                   "--metrics-host", "0.0.0.0")  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--metrics-insecure" in done.stderr and "Traceback" not in done.stderr


def test_the_operating_page_lists_every_exported_metric() -> None:
    from kvrpc.metrics.names import METRICS

    page = (Path(__file__).parent.parent / "docs" / "operating.md").read_text()
    missing = [m.name for m in METRICS if f"`{m.name}`" not in page]
    assert missing == []
