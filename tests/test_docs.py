"""docs/configuration.md documents every key of the three config schemas, with the schema's default.

The doc's key tables (header ``| Key | Default | Meaning |``) under "## Site configs", "## Prior
configs" and "## Adapt config" must list exactly the leaf keys of ``SiteConfig``, ``PriorConfig`` and
``AdaptConfig`` (dotted paths in backticks), and each row's default cell must equal the schema default
written in the doc's canonical format (:func:`canonical`). A key added to a schema without a row in
the doc, a row left behind for a removed key, or a default changed on one side only fails here. The
``biasrecon`` section's defaults are ``BiasReconSettings``'s (one schema), and the table of what the
shipped adapt YAML changes lists exactly the keys where it differs from the schema.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from recon.biasrecon import BiasReconSettings
from recon.config import DEFAULT_CONFIG, PRESETS, AdaptConfig
from recon.data.sites import SiteConfig
from scores.config import PriorConfig

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
ADAPT_YAML = ROOT / "configs" / "biasrecon" / "default.yaml"

KEY_TABLE = ("Key", "Default", "Meaning")
YAML_TABLE = ("Key", "default.yaml", "Schema default")
PRESET_TABLE = ("Key", "fast", "Schema default")


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


def config_leaves(node: dict, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of every leaf of a nested config container (lists and empty dicts are leaves)."""
    leaves: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            leaves.update(config_leaves(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def schema_leaves(schema: type) -> dict[str, Any]:
    """``{dotted key: default}`` of every leaf of a structured-config dataclass (lists and empty dicts,
    such as a site's ``data.splits``, are leaves)."""
    return config_leaves(OmegaConf.to_container(OmegaConf.structured(schema)))


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
    "Adapt config": AdaptConfig,
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


def test_biasrecon_section_is_the_library_settings_with_their_defaults() -> None:
    """One schema: the config's ``biasrecon`` section has exactly the fields and defaults of ``BiasReconSettings``."""
    section = schema_leaves(AdaptConfig)
    library = dataclasses.asdict(BiasReconSettings())
    assert {k[len("biasrecon."):]: v for k, v in section.items() if k.startswith("biasrecon.")} == \
        {k: list(v) if isinstance(v, tuple) else v for k, v in library.items()}


def test_the_shipped_yaml_changes_exactly_the_keys_the_doc_lists() -> None:
    """default.yaml differs from the schema only where the doc's 'What default.yaml changes' table says."""
    assert DEFAULT_CONFIG.resolve() == ADAPT_YAML.resolve()  # the library finds the shipped file
    schema = schema_leaves(AdaptConfig)
    yaml_leaves = config_leaves(OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(AdaptConfig),
                                                                       OmegaConf.load(ADAPT_YAML))))
    changed = {k: (canonical(yaml_leaves[k]), canonical(v)) for k, v in schema.items() if yaml_leaves[k] != v}
    rows = tables(section(doc_text(), "Adapt config"), YAML_TABLE)
    documented = {k: tuple(_unquote(c) for c in cells) for k, cells in rows.items()}
    assert documented == changed, f"doc table {documented} vs the YAML's changes {changed}"


def test_the_presets_table_lists_exactly_the_fast_presets_keys() -> None:
    """The doc's 'Presets' table (``| Key | fast | Schema default |``) lists exactly what ``preset=fast`` sets."""
    schema = schema_leaves(AdaptConfig)
    fast = config_leaves(PRESETS["fast"])
    rows = tables(section(doc_text(), "Adapt config"), PRESET_TABLE)
    documented = {k: tuple(_unquote(c) for c in cells) for k, cells in rows.items()}
    assert documented == {k: (canonical(v), canonical(schema[k])) for k, v in fast.items()}


def test_canonical_format() -> None:
    assert [canonical(v) for v in (None, True, 0.002, 2e-4, 4, "", "t1", [128, 128], (0.5, 1e-3))] == [
        "null", "true", "0.002", "0.0002", "4", '""', "t1", "[128, 128]", "[0.5, 0.001]"]
