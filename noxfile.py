"""Developer sessions: `nox -s lint typecheck tests`, and `nox -s bench` for figures."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

# torch==2.13.0 through the constraints file: on the project's machines that is the CPU build
# on local disk; a looser pin would download a multi-gigabyte CUDA build.
CONSTRAINTS = ("-c", "constraints.txt")
LINTED = ("kvrpc", "tests", "examples", "noxfile.py")


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", *LINTED)
    session.run("ruff", "format", "--check", *LINTED)


@nox.session
def typecheck(session: nox.Session) -> None:
    # torch is not needed to type-check: kvrpc imports it lazily and mypy treats it as Any.
    session.install("mypy>=1.11", "msgpack>=1.0.5", "anyio>=4.3", "pydantic>=2.10")
    session.run("mypy", "--strict", "kvrpc")


@nox.session
def tests(session: nox.Session) -> None:
    session.install(*CONSTRAINTS, "-e", ".[dev]")
    # -rs prints why each skipped test was skipped (GPU tests on machines without one).
    session.run("pytest", "-rs", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    session.install(*CONSTRAINTS, "-e", ".")
    session.run("kvrpc", "bench", "import")
    session.run("kvrpc", "bench", "rpc", "--url", "inproc://nox-bench", *session.posargs)
