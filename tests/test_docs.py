"""docs/configuration.md documents every key of the three config schemas, with the schema's default.

The doc's key tables (header ``| Key | Default | Meaning |``) under "## Site configs", "## Prior
configs" and "## Adapt config" must list exactly the leaf keys of ``SiteConfig``, ``PriorConfig`` and
``AdaptConfig`` (dotted paths in backticks), and each row's default cell must equal the schema default
written in the doc's canonical format (:func:`canonical`). A key added to a schema without a row in
the doc, a row left behind for a removed key, or a default changed on one side only fails here.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from recon.biasrecon import BiasReconSettings
from recon.data.sites import SiteConfig
from scores.config import PriorConfig

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
ADAPT_SCRIPT = ROOT / "scripts" / "adapt.py"
ADAPT_YAML = ROOT / "configs" / "biasrecon" / "default.yaml"

KEY_TABLE = ("Key", "Default", "Meaning")
MIRROR_TABLE = ("Key", "Default (adapt.py)", "Library default (BiasReconSettings)")
NOT_THERE = "—"


def _load_adapt_script():
    spec = importlib.util.spec_from_file_location("adapt_script_for_docs", ADAPT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


adapt = _load_adapt_script()


def canonical(value: Any) -> str:
    """The doc's format of a default: ``null``, ``true`` / ``false``, ``str()`` of numbers, the bare
    string (``""`` when empty), YAML flow lists ``[a, b]`` (tuples too)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(canonical(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value else '""'
    return str(value)


def schema_leaves(schema: type) -> dict[str, Any]:
    """``{dotted key: default}`` of every leaf of a structured-config dataclass (lists and empty dicts,
    such as a site's ``data.splits``, are leaves)."""
    leaves: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                leaves[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(OmegaConf.structured(schema)), "")
    return leaves


def _cells(line: str) -> list[str]:
    """Cells of a markdown table row (``\\|`` inside a cell is not a separator)."""
    body = line.strip()[1:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", body)]


def _unquote(cell: str) -> str:
    cell = cell.strip()
    if len(cell) >= 2 and cell.startswith("`") and cell.endswith("`"):
        return cell[1:-1]
    return cell


def section(text: str, heading: str) -> str:
    """The text from the ``## heading`` line to the next level-2 heading."""
    match = re.search(rf"^## {re.escape(heading)}\s*$", text, flags=re.MULTILINE)
    assert match, f"docs/configuration.md has no '## {heading}' section"
    rest = text[match.end():]
    end = re.search(r"^## ", rest, flags=re.MULTILINE)
    return rest[: end.start()] if end else rest


def tables(text: str, header: tuple[str, ...]) -> dict[str, list[str]]:
    """``{key: other cells}`` of every table in ``text`` whose header row is ``header``; the key cell
    must be one backticked dotted path, and a key may appear only once."""
    rows: dict[str, list[str]] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("|") and tuple(_cells(line)) == header:
            i += 2  # the header and the |---| line
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = _cells(lines[i])
                assert len(cells) == len(header), f"row with {len(cells)} cells, expected {len(header)}: {lines[i]}"
                key = cells[0]
                assert re.fullmatch(r"`[A-Za-z_][\w.]*`", key), f"key cell {key!r} is not one backticked dotted path"
                assert key[1:-1] not in rows, f"key {key} is documented twice"
                rows[key[1:-1]] = cells[1:]
                i += 1
        else:
            i += 1
    return rows


@functools.cache
def doc_text() -> str:
    assert DOC.is_file(), f"{DOC} is missing"
    return DOC.read_text(encoding="utf-8")


SCHEMAS = {
    "Site configs": SiteConfig,
    "Prior configs": PriorConfig,
    "Adapt config": adapt.AdaptConfig,
}


@pytest.mark.parametrize("heading", list(SCHEMAS))
def test_every_schema_key_is_documented_with_its_default(heading: str) -> None:
    leaves = schema_leaves(SCHEMAS[heading])
    rows = tables(section(doc_text(), heading), KEY_TABLE)
    missing = sorted(set(leaves) - set(rows))
    stale = sorted(set(rows) - set(leaves))
    assert not missing, f"docs/configuration.md, '## {heading}': keys of the schema without a row: {missing}"
    assert not stale, f"docs/configuration.md, '## {heading}': rows for keys the schema does not have: {stale}"
    wrong = {
        key: (_unquote(rows[key][0]), canonical(default))
        for key, default in leaves.items()
        if _unquote(rows[key][0]) != canonical(default)
    }
    assert not wrong, f"docs/configuration.md, '## {heading}': default cells (doc, schema) that differ: {wrong}"


def test_biasrecon_mirror_table_matches_the_library_defaults() -> None:
    """The table comparing adapt.py's ``biasrecon`` section with ``BiasReconSettings`` is right:
    one row per field of either, ``—`` where a side has no such field."""
    section_defaults = dataclasses.asdict(adapt.BiasReconSection())
    library_defaults = dataclasses.asdict(BiasReconSettings())
    rows = tables(section(doc_text(), "Adapt config"), MIRROR_TABLE)
    expected = {f"biasrecon.{name}" for name in {*section_defaults, *library_defaults}}
    assert set(rows) == expected, (
        f"docs/configuration.md: the BiasReconSettings table lists {sorted(set(rows) - expected)} too many and "
        f"misses {sorted(expected - set(rows))}"
    )
    wrong = {}
    for name in sorted({*section_defaults, *library_defaults}):
        cells = tuple(_unquote(c) for c in rows[f"biasrecon.{name}"])
        expected_cells = (
            canonical(section_defaults[name]) if name in section_defaults else NOT_THERE,
            canonical(library_defaults[name]) if name in library_defaults else NOT_THERE,
        )
        if cells != expected_cells:
            wrong[f"biasrecon.{name}"] = (cells, expected_cells)
    assert not wrong, f"docs/configuration.md: BiasReconSettings table rows (doc, code) that differ: {wrong}"


def test_adapt_yaml_holds_the_schema_defaults() -> None:
    """The doc says configs/biasrecon/default.yaml sets exactly the schema defaults."""
    schema = OmegaConf.structured(adapt.AdaptConfig)
    merged = OmegaConf.merge(schema, OmegaConf.load(ADAPT_YAML))
    assert OmegaConf.to_container(merged) == OmegaConf.to_container(schema)


def test_canonical_format() -> None:
    assert [canonical(v) for v in (None, True, 0.002, 2e-4, 4, "", "t1", [128, 128], (0.5, 1e-3))] == [
        "null", "true", "0.002", "0.0002", "4", '""', "t1", "[128, 128]", "[0.5, 0.001]"]
