"""The docs name only modules, attributes and files that exist.

Every dotted ``kvrpc.x.y`` / ``kvrpc_zmq.x`` / ``kvrpc_unix.x`` name in README.md and
docs/*.md must resolve to a module, or to a name a module defines, and every path like
``kvrpc/kv/server/state.py`` (or under tests/, tools/, examples/, transports/) must be a file
of the repository. Names are resolved from the source, without importing it, so the check
needs neither vLLM nor a GPU, and a module that fails to import is still found.

The few dotted names that are not Python names are accepted for what they are: the vLLM
connector's ``kvrpc.*`` settings keys (checked against the settings model's fields), the
transports' entry-point group, and a socket file's name.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

PACKAGES = {
    "kvrpc": ROOT / "kvrpc",
    "kvrpc_zmq": ROOT / "transports" / "zmq" / "kvrpc_zmq",
    "kvrpc_unix": ROOT / "transports" / "unix" / "kvrpc_unix",
}
DOTTED = re.compile(r"(?<![\w./-])(kvrpc|kvrpc_zmq|kvrpc_unix)((?:\.[A-Za-z_]\w*)+)")
PATH = re.compile(r"(?<![\w./-])((?:kvrpc|transports|tests|tools|examples)/[\w./-]*\w\.py)\b")

#: Dotted names that are not Python names: a socket file, the entry-point groups.
NOT_PYTHON = {"kvrpc.sock", "kvrpc.transports", "kvrpc.baselines"}


def _source(path: Path) -> ast.Module:
    return _parse(str(path))


@functools.cache
def _parse(path: str) -> ast.Module:
    return ast.parse(Path(path).read_text(encoding="utf-8"))


def _defined(body: list[ast.stmt]) -> set[str]:
    """Names bound at the top of a module or class body (defs, assignments, imports)."""
    names: set[str] = set()
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
                # What a module's __getattr__ provides lazily is listed in its __all__.
                names.update(
                    n.value
                    for n in ast.walk(node.value)
                    if isinstance(n, ast.Constant) and isinstance(n.value, str)
                )
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.If | ast.Try):  # `if TYPE_CHECKING:`, try/except imports
            names |= _defined(node.body)
            names |= _defined(getattr(node, "orelse", []))
    return names


def _class(body: list[ast.stmt], name: str) -> ast.ClassDef | None:
    for node in body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    return None


def resolve(dotted: str) -> str | None:
    """None if ``dotted`` names something that exists, else why not."""
    root, *parts = dotted.split(".")
    where = PACKAGES[root]
    module = where / "__init__.py"
    while parts:
        part = parts[0]
        if where.is_dir() and (where / f"{part}.py").is_file():
            where = module = where / f"{part}.py"
        elif where.is_dir() and (where / part / "__init__.py").is_file():
            where = where / part
            module = where / "__init__.py"
        else:
            break
        parts.pop(0)
    if not parts:
        return None
    body = _source(module).body
    if parts[0] not in _defined(body):
        return f"{module.relative_to(ROOT)} defines no {parts[0]!r}"
    cls = _class(body, parts[0])
    if len(parts) > 1 and cls is not None and parts[1] not in _defined(cls.body):
        return f"class {parts[0]} in {module.relative_to(ROOT)} has no {parts[1]!r}"
    return None


def connector_setting_keys() -> set[str]:
    """``kvrpc.<field>`` for every field of the vLLM connector's settings model."""
    settings = ROOT / "kvrpc" / "integrations" / "vllm" / "settings.py"
    model = _class(_source(settings).body, "ConnectorSettings")
    assert model is not None, "kvrpc/integrations/vllm/settings.py lost ConnectorSettings"
    return {f"kvrpc.{name}" for name in _defined(model.body) if not name.startswith("_")}


def names_in(page: Path) -> set[str]:
    return {m.group(1) + m.group(2) for m in DOTTED.finditer(page.read_text(encoding="utf-8"))}


def paths_in(page: Path) -> set[str]:
    return {m.group(1) for m in PATH.finditer(page.read_text(encoding="utf-8"))}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_dotted_kvrpc_name_in_the_page_exists(page: Path) -> None:
    settings = connector_setting_keys()
    wrong = {}
    for name in sorted(names_in(page)):
        if name in NOT_PYTHON or name in settings:
            continue
        why = resolve(name)
        if why is not None:
            wrong[name] = why
    assert not wrong, f"{page.relative_to(ROOT)} names what does not exist: {wrong}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_source_path_in_the_page_is_a_file(page: Path) -> None:
    missing = sorted(p for p in paths_in(page) if not (ROOT / p).is_file())
    assert not missing, f"{page.relative_to(ROOT)} names files that do not exist: {missing}"


def test_the_checker_refuses_names_and_paths_that_do_not_exist(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "`kvrpc.codec.WIRE_VERSION`, `kvrpc.errors.Status.DEADLINE_PASSED`, "
        "`kvrpc.bench.NoSuchBaseline`, `kvrpc.errors.Status.NO_SUCH_CODE`, "
        "`kvrpc_unix.framing.FrameReader`, `kvrpc.kv.server.transfers`, "
        "see kvrpc/kv/server/state.py and kvrpc/kv/server/transfers.py."
    )
    found = names_in(page)
    assert resolve("kvrpc.codec.WIRE_VERSION") is None
    assert resolve("kvrpc.errors.Status.DEADLINE_PASSED") is None
    assert resolve("kvrpc_unix.framing.FrameReader") is None
    assert resolve("kvrpc.bench.NoSuchBaseline") is not None
    assert resolve("kvrpc.errors.Status.NO_SUCH_CODE") is not None
    assert resolve("kvrpc.kv.server.transfers") is not None
    assert "kvrpc.kv.server.transfers" in found
    assert paths_in(page) == {"kvrpc/kv/server/state.py", "kvrpc/kv/server/transfers.py"}
    assert "kvrpc.url" in connector_setting_keys()


def test_core_md_lists_every_asyncclient_option() -> None:
    """docs/core.md's AsyncClient block names every keyword ``AsyncClient`` takes.

    Those are the keyword-only arguments of ``AsyncClient.__init__`` and the fields of
    ``kvrpc.config.ClientSettings``, which its ``**settings`` are typed by.
    """
    client = _class(_source(ROOT / "kvrpc" / "client.py").body, "AsyncClient")
    assert client is not None
    init = next(n for n in client.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    settings = _class(_source(ROOT / "kvrpc" / "config.py").body, "ClientSettings")
    assert settings is not None
    fields = [
        n.target.id
        for n in settings.body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    ]
    options = {a.arg for a in init.args.kwonlyargs} | set(fields)
    assert "reconnect_timeout" in options
    core = (ROOT / "docs" / "core.md").read_text(encoding="utf-8")
    block = core.split("client = AsyncClient(", 1)[1].split("\n)\n", 1)[0]
    listed = re.findall(r"^\s+(\w+)=", block, flags=re.MULTILINE)
    assert set(listed) == options, "docs/core.md's AsyncClient option list differs from the code"
    assert len(listed) == len(options), "docs/core.md lists an AsyncClient option twice"
