"""The documentation: the site builds without a warning, and the configuration reference says
exactly what the config decoder accepts, with the code's defaults.

The accepted keys come from the code's own definitions (the dataclasses agent.config.decode decodes
each section into, and each probe kind's options class), so a key added, removed or re-defaulted
in the code fails here until docs/configuration.md or the kind's page says the same.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import pytest
import yaml

from agent.config import load as agent_config
from agent.config.decode import ConfigError, decode
from agent.config.model import AgentSection, MetricsSection
from agent.discovery.config import DiscoveryConfig
from agent.server.probe.config import ProbeEndpointConfig
from probes import PROBES
from probes.base import COMMON_REASONS, CommonOptions
from tests.helpers import ROOT

DOCS = ROOT / "docs"
REFERENCE = DOCS / "configuration.md"

# Each top-level section the decoder reads into a dataclass, and the key path its fields get.
# "defaults" is a map of kind -> that kind's options class (checked per kind below).
SECTIONS: dict[str, type[Any]] = {
    "agent": AgentSection,
    "metrics": MetricsSection,
    "targets[]": agent_config._RawTarget,
    "discovery": DiscoveryConfig,
    "probe_endpoint": ProbeEndpointConfig,
}

# Pages whose ```yaml blocks are agent configs (fragments get a minimal `agent:` section).
CONFIG_EXAMPLE_PAGES = [
    "configuration.md",
    "probes/*.md",
    "operations/discovery.md",
    "operations/probe-endpoint.md",
]


# -- the code's side --------------------------------------------------------------------------


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def accepted_keys(cls: type[Any], prefix: str) -> Iterator[tuple[str, Any, dataclasses.Field[Any]]]:
    """Every leaf key ``cls`` accepts, as (dotted path, type, field), following nested
    dataclasses (``a.b``) and lists of dataclasses (``a[].b``) the way agent.config.decode does."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = _unwrap_optional(hints[f.name])
        path = f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            yield from accepted_keys(tp, path)
            continue
        if get_origin(tp) in (list, tuple):
            item = get_args(tp)[0] if get_args(tp) else Any
            if dataclasses.is_dataclass(item) and isinstance(item, type):
                yield from accepted_keys(item, f"{path}[]")
                continue
        yield path, hints[f.name], f


def kind_specific_fields(kind: str) -> dict[str, dataclasses.Field[Any]]:
    common = {f.name for f in dataclasses.fields(CommonOptions)}
    return {
        f.name: f
        for f in dataclasses.fields(PROBES[kind].options)
        if f.init and f.name not in common
    }


def field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


# -- the documentation's side -----------------------------------------------------------------


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Markdown tables outside code fences, as (header cells, row cells)."""
    out: list[tuple[list[str], list[list[str]]]] = []
    fenced = False
    block: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("|"):
            block.append(line)
            continue
        if len(block) >= 2:
            cells = [
                [c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]] for row in block
            ]
            out.append((cells[0], cells[2:]))
        block = []
    return out


def table_rows(text: str, first: str) -> list[dict[str, str]]:
    """Rows of every table whose first header cell is ``first``, keyed by header."""
    rows = []
    for header, body in tables(text):
        if header and header[0] == first:
            rows += [dict(zip(header, r, strict=False)) for r in body]
    return rows


def code(cell: str) -> str | None:
    m = re.search(r"`([^`]*)`", cell)
    return m.group(1) if m else None


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def check_default(where: str, cell: str, tp: Any, f: dataclasses.Field[Any]) -> str | None:
    """A problem with the documented default of ``f``, or None."""
    expected = field_default(f)
    if expected is dataclasses.MISSING:
        return (
            None
            if cell.startswith("required")
            else f"{where}: the code requires it; the docs give default {cell!r}"
        )
    literal = code(cell)
    if literal is None:
        return f"{where}: no default in backticks (the code's is {expected!r})"
    try:
        got = decode(tp, yaml.compose(literal), where)
    except ConfigError as e:
        return f"{where}: documented default {literal!r} is not accepted: {e}"
    if not same(got, expected):
        return f"{where}: documented default {literal!r} is {got!r}, the code's is {expected!r}"
    return None


# -- tests ------------------------------------------------------------------------------------


def test_sections_cover_the_top_level() -> None:
    # A new top-level key must get its section here (and in the reference) before it passes.
    assert {s.removesuffix("[]") for s in SECTIONS} | {"defaults"} == set(
        agent_config.TOP_LEVEL_KEYS
    )
    documented = {
        code(r["key"])
        for r in table_rows(REFERENCE.read_text(), "key")
        if "." not in (code(r["key"]) or ".")
    }
    assert documented == set(agent_config.TOP_LEVEL_KEYS)


def test_reference_documents_every_accepted_key_and_nothing_else() -> None:
    rows = {code(r["key"]) or "": r for r in table_rows(REFERENCE.read_text(), "key")}
    rows = {k: r for k, r in rows.items() if "." in k}
    accepted = {
        path: (tp, f)
        for section, cls in SECTIONS.items()
        for path, tp, f in accepted_keys(cls, section)
    }
    assert sorted(set(accepted) - set(rows)) == [], "accepted by the code, not documented"
    assert sorted(set(rows) - set(accepted)) == [], "documented, rejected by the code"
    problems = []
    for path, (tp, f) in accepted.items():
        if path == "targets[].probes":
            continue  # `Any` in the code; its default is checked below
        problem = check_default(path, rows[path].get("default", ""), tp, f)
        if problem:
            problems.append(problem)
    assert problems == []


def test_target_without_probes_gets_the_documented_kinds() -> None:
    row = next(
        r for r in table_rows(REFERENCE.read_text(), "key") if code(r["key"]) == "targets[].probes"
    )
    kinds = yaml.safe_load(code(row["default"]) or "")
    cfg = agent_config.loads("agent: {region: docs}\ntargets: [{name: a, address: 127.0.0.1}]\n")
    assert [j.kind for j in cfg.jobs] == kinds


def test_common_options_and_per_kind_defaults() -> None:
    text = REFERENCE.read_text()
    hints = get_type_hints(CommonOptions)
    common = {f.name: f for f in dataclasses.fields(CommonOptions) if f.init}
    rows = {code(r["option"]) or "": r for r in table_rows(text, "option")}
    assert set(rows) == set(common)
    matrix = {r["kind"]: r for r in table_rows(text, "kind")}
    assert set(matrix) == set(PROBES)
    problems = []
    for name in common:
        per_kind = rows[name]["default"].startswith("per kind")
        for kind, pk in PROBES.items():
            kf = next(x for x in dataclasses.fields(pk.options) if x.name == name)
            if per_kind:
                cell = matrix[kind].get(name)
                if cell is None:
                    problems.append(f"{name}: 'per kind' but no column in the defaults table")
                    break
            else:
                cell = rows[name]["default"]
                assert name not in matrix[kind], f"{name}: both a default and a column"
            problem = check_default(f"defaults.{kind}.{name}", cell, hints[name], kf)
            if problem:
                problems.append(problem)
    assert problems == []


@pytest.mark.parametrize("kind", sorted(PROBES))
def test_kind_page_documents_its_options(kind: str) -> None:
    page = DOCS / "probes" / f"{kind}.md"
    assert page.exists(), f"no page for probe kind {kind}"
    rows = {code(r["option"]) or "": r for r in table_rows(page.read_text(), "option")}
    fields = kind_specific_fields(kind)
    assert sorted(set(fields) - set(rows)) == [], f"{kind}: accepted, not documented"
    assert sorted(set(rows) - set(fields)) == [], f"{kind}: documented, rejected by the code"
    hints = get_type_hints(PROBES[kind].options)
    problems = [
        p
        for name, f in fields.items()
        if (p := check_default(f"{kind}.{name}", rows[name].get("default", ""), hints[name], f))
    ]
    assert problems == []


def test_kind_page_names_its_reasons_and_strays() -> None:
    # The bounded label values an operator sees in edgeprobe_probe_errors_total{reason} and
    # edgeprobe_stray_packets_total{reason}: each on the kind's page or a kind page it links to.
    index = (DOCS / "probes" / "index.md").read_text()
    missing = [f"common: {r}" for r in COMMON_REASONS if f"`{r}`" not in index]
    for kind, pk in PROBES.items():
        page = (DOCS / "probes" / f"{kind}.md").read_text()
        linked = [
            (DOCS / "probes" / m).read_text() for m in re.findall(r"\]\(([a-z]+\.md)\)", page)
        ]
        text = "\n".join([page, *linked])
        missing += [
            f"{kind}: {r}"
            for r in (*pk.reasons, *pk.stray_reasons)
            if r not in COMMON_REASONS and f"`{r}`" not in text
        ]
    assert missing == []


def config_examples() -> Iterator[tuple[str, str]]:
    for pattern in CONFIG_EXAMPLE_PAGES:
        for page in sorted(DOCS.glob(pattern)):
            blocks = re.findall(r"^```yaml\n(.*?)^```", page.read_text(), re.S | re.M)
            for i, block in enumerate(blocks):
                yield f"{page.relative_to(DOCS)}#{i}", block


@pytest.mark.parametrize(
    ("where", "block"), list(config_examples()), ids=[w for w, _ in config_examples()]
)
def test_config_examples_load(where: str, block: str) -> None:
    doc = yaml.safe_load(block)
    if "agent" not in doc:
        block = "agent: {region: docs}\n" + block
    agent_config.loads(block, where)


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    # Not a skip: mkdocs-material is a dev dependency, and a docs check that silently does not
    # run is how warnings pile up.
    assert importlib.util.find_spec("material") is not None, (
        "mkdocs-material is not installed: `pip install -e .[dev]` (make bootstrap)"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(tmp_path / "site"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert not re.search(r"\bWARNING\b", out), out
    assert (tmp_path / "site" / "index.html").exists()


def test_readme_is_short_and_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to missing {target}"
