"""Write the docs site's protocol reference from the protocols kvrpc registers.

The page lists every :class:`~kvrpc.protocol.ProtocolDefinition` of a KV-cache server's
registry (the built-in ``rpc.*`` protocols and every ``kv.*`` one): its name, its payload
types, its response type, its handler type and whether it streams, then the kvrpc types
those signatures name. It is generated, never edited, so it cannot drift from the code.

Used two ways:

* as an mkdocs hook (``hooks:`` in mkdocs.yml): :func:`on_pre_build` writes
  ``docs/reference/protocols.md`` before every build;
* from a shell: ``python tools/gen_protocol_reference.py [OUT]`` writes it (or OUT).
"""

from __future__ import annotations

import inspect
import re
import sys
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kvrpc.kv.protocols import kv_registry
from kvrpc.protocol import ProtocolDefinition

__all__ = ["on_pre_build", "registered_protocols", "render", "type_name", "write"]

#: Where the page goes, relative to the repository root.
OUTPUT = Path("docs/reference/protocols.md")


def registered_protocols() -> list[ProtocolDefinition]:
    """Every protocol a ``kvrpc serve`` registry holds, sorted by name."""
    registry = kv_registry()
    return [registry.get(name) for name in registry.names()]


def type_name(annotation: Any) -> str:
    """A short, readable spelling of a payload or response type (``list[KeyBatch]``)."""
    if annotation is None or annotation is type(None):
        return "None"
    if annotation is Any:
        return "Any"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return "Literal[" + ", ".join(repr(a) for a in args) + "]"
    if origin is typing.Annotated:  # the constraints are checked at decode; the doc says them
        return type_name(args[0])
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{type_name(origin)}[{inner}]"
    if isinstance(annotation, type):
        if annotation.__module__ == "builtins":
            return annotation.__qualname__
        if annotation.__module__.startswith("torch"):
            return f"torch.{annotation.__qualname__}"
        return annotation.__qualname__
    return repr(annotation)


def _named_types(annotation: Any) -> Iterable[type]:
    """The kvrpc classes an annotation names, nested ones included."""
    if isinstance(annotation, type) and annotation.__module__.startswith("kvrpc."):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _named_types(arg)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(rst: str) -> str:
    """A docstring's reST roles and literals as markdown: ``x`` and :class:`~a.B` to `B`."""
    rst = re.sub(r":\w+:`~?(?:[\w.]+\.)?([\w]+)`", r"`\1`", rst)
    return rst.replace("``", "`")


def render(definitions: Iterable[ProtocolDefinition]) -> str:
    """The reference page, as markdown, for ``definitions``."""
    definitions = list(definitions)
    lines = [
        "# Protocol reference",
        "",
        "Generated from the `ProtocolDefinition`s a `kvrpc serve` registers (the built-in",
        "`rpc.*` protocols and every `kv.*` one) by `tools/gen_protocol_reference.py` at each",
        "build of this site: do not edit it by hand. A request's payload is the positional",
        "arguments in the order given; how each type travels is in",
        "[the wire protocol](../wire.md#values). A streamed protocol answers with a stream of",
        "its response type's items, read with `client.stream` (the core's",
        "[streams](../core.md#streams)); every other one answers one request with one reply.",
        "",
        "| protocol | payload | response | handler | streamed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for d in definitions:
        payload = ", ".join(f"`{_cell(type_name(t))}`" for t in d.payload) or "none"
        lines.append(
            f"| [`{d.name}`](#{_anchor(d.name)}) | {payload} | `{_cell(type_name(d.response))}` "
            f"| `{d.handler_type.name}` | {'yes' if d.stream else 'no'} |"
        )
    lines.append("")
    for d in definitions:
        lines += [f"## `{d.name}`", ""]
        if d.doc:
            lines += [d.doc, ""]
        args = [f"{i}. `{type_name(t)}`" for i, t in enumerate(d.payload)]
        lines += ["Payload:", ""] + (args or ["none: call it with no arguments."]) + [""]
        lines += [
            f"{'Items' if d.stream else 'Response'}: `{type_name(d.response)}`. "
            f"Handler: `{d.handler_type.name}`. Streamed: {'yes' if d.stream else 'no'}.",
            "",
        ]
    seen: dict[str, type] = {}
    for d in definitions:
        for annotation in (*d.payload, d.response):
            for cls in _named_types(annotation):
                seen.setdefault(f"{cls.__module__}.{cls.__qualname__}", cls)
    if seen:
        lines += [
            "## Types",
            "",
            "The kvrpc types these protocols name. Pydantic models travel as a map of their",
            "fields; the others are ext types of the codec.",
            "",
            "| type | what it is |",
            "| --- | --- |",
        ]
        for path, cls in sorted(seen.items()):
            summary = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
            lines.append(f"| `{path}` | {_cell(_markdown(summary))} |")
        lines.append("")
    return "\n".join(lines)


def _anchor(name: str) -> str:
    # The toc extension's slug of a "## `kv.lookup`" heading: the dots go, nothing else.
    return name.replace(".", "")


def write(path: Path = OUTPUT) -> bool:
    """Write the page to ``path`` if its content changed; True when it did."""
    text = render(registered_protocols())
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return True


def on_pre_build(config: Any, **_: Any) -> None:
    """Generate the page inside the docs directory before mkdocs reads the files (a hook)."""
    write(Path(config["docs_dir"]) / "reference" / "protocols.md")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT)
