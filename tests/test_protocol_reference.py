"""The generated protocol reference lists every protocol kvrpc defines, with its signature."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import kvrpc.kv.protocols
import kvrpc.protocol
from kvrpc.protocol import HandlerType, ProtocolDefinition

ROOT = Path(__file__).resolve().parent.parent


def generator() -> ModuleType:
    path = ROOT / "tools" / "gen_protocol_reference.py"
    spec = importlib.util.spec_from_file_location("gen_protocol_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def defined_protocols() -> dict[str, ProtocolDefinition]:
    """Every ProtocolDefinition constant of the modules that define kvrpc's protocols.

    Found by scanning the modules, not through the registry the generator reads, so a
    definition left out of the registry is caught too.
    """
    found = {}
    for module in (kvrpc.protocol, kvrpc.kv.protocols):
        for value in vars(module).values():
            if isinstance(value, ProtocolDefinition):
                found[value.name] = value
    return found


def table_rows(page: str) -> dict[str, list[str]]:
    rows = {}
    for line in page.splitlines():
        match = re.match(r"\| \[`([a-z_.]+)`\]\(#[a-z_]+\) \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split(" | ")]
    return rows


def test_the_reference_lists_every_defined_protocol_once() -> None:
    page = generator().render(generator().registered_protocols())
    rows = table_rows(page)
    defined = defined_protocols()
    assert {"rpc.ping", "kv.lookup", "kv.store_cuda"} <= set(defined)
    assert sorted(rows) == sorted(defined)
    for name in defined:
        assert page.count(f"\n## `{name}`\n") == 1


def test_each_row_gives_payload_response_handler_and_streaming() -> None:
    gen = generator()
    rows = table_rows(gen.render(gen.registered_protocols()))
    assert rows["rpc.ping"] == ["none", "`str`", "`NONBLOCKING`", "no"]
    assert rows["rpc.echo"] == ["`Any`", "`Any`", "`NONBLOCKING`", "no"]
    assert rows["kv.lookup"] == [
        "`bytes`, `str`, `KeyBatch`, `str \\| None`",
        "`int \\| str`",
        "`NONBLOCKING`",
        "no",
    ]
    assert rows["kv.events"] == ["`EventsRequest`", "`KVEvent`", "`NONBLOCKING`", "yes"]
    for name, definition in defined_protocols().items():
        assert rows[name][2] == f"`{definition.handler_type.name}`"
        assert rows[name][3] == ("yes" if definition.stream else "no")


def test_a_protocol_of_another_group_shows_up_with_its_handler_type() -> None:
    gen = generator()
    extra = ProtocolDefinition("calc.stats", (list[float],), dict[str, float], HandlerType.BLOCKING)
    rows = table_rows(gen.render([*gen.registered_protocols(), extra]))
    assert rows["calc.stats"] == ["`list[float]`", "`dict[str, float]`", "`BLOCKING`", "no"]


def test_writing_the_page_twice_changes_nothing_the_second_time(tmp_path: Path) -> None:
    gen = generator()
    out = tmp_path / "reference" / "protocols.md"
    assert gen.write(out) is True
    assert gen.write(out) is False
    assert "`rpc.ping`" in out.read_text(encoding="utf-8")
