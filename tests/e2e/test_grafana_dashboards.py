"""The Grafana dashboards and provisioning, checked without Grafana (it cannot be installed here).

* The JSON is what ``deploy/grafana/generate.py`` renders (regenerating changes nothing).
* Schema: each dashboard is decoded with the models of Grafana's own foundation SDK
  (``grafana-foundation-sdk``, generated from Grafana's dashboard schema) and re-encoded; every
  field we wrote must survive, so none is outside the schema, and panel options must decode
  into the panel plugin's own options type. Skipped, with the reason, where the package is
  missing.
* Structure: ids, grid, datasources, variables, descriptions.
* PromQL: every panel's expression parses (``promtool check rules`` on a throw-away rule file)
  and names only metrics the agent exports or the rules record. The end-to-end test
  (tests/e2e/test_two_tier.py) runs every one against a live central Prometheus.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import DASHBOARDS, ROOT, shipped_rules, substitute

GRAFANA = ROOT / "deploy" / "grafana"


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def test_three_dashboards() -> None:
    assert [p.name for p in DASHBOARDS] == [
        "edgeprobe-agent.json",
        "edgeprobe-edge.json",
        "edgeprobe-overview.json",
    ]


def test_generated_json_is_committed() -> None:
    spec = importlib.util.spec_from_file_location("grafana_generate", GRAFANA / "generate.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rendered: dict[str, str] = mod.render()
    assert sorted(rendered) == [p.name for p in DASHBOARDS]
    for path in DASHBOARDS:
        assert path.read_text() == rendered[path.name], (
            f"{path.name} differs from generate.py's output: run "
            "python deploy/grafana/generate.py and commit"
        )


def test_provisioning() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "edgeprobe.yml").read_text())
    assert ds["apiVersion"] == 1
    [source] = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http")
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "edgeprobe.yml").read_text())
    assert prov["apiVersion"] == 1
    [provider] = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_structure(path: Path) -> None:
    dash = load(path)
    assert dash["uid"] == path.stem and dash["title"].startswith("edgeprobe / ")
    var_names = {v["name"] for v in dash["templating"]["list"]}
    assert "datasource" in var_names
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels(dash):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert p["description"], f"{p['title']}: no description"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            used = set(re.findall(r"\$\{?(\w+)", t["expr"]))
            assert used <= var_names | {"__rate_interval", "__interval", "__range"}, (
                p["title"],
                used - var_names,
            )
    links = {ln["url"] for ln in dash["links"]}
    assert links <= {"/d/edgeprobe-overview", "/d/edgeprobe-edge", "/d/edgeprobe-agent"}


def test_required_panels() -> None:
    titles = {path.stem: {p["title"] for p in panels(load(path))} for path in DASHBOARDS}
    assert {
        "Best edge per region",
        "Connects within budget: region x edge (1h)",
        "Edges meeting the budget SLO",
        "Route candidates: eligibility and reason",
        "Route candidates: miss upper bound (1h)",
        "Route decision over time",
    } <= titles["edgeprobe-overview"]
    assert {
        "RTT distribution",
        "RTT p50 / p95 / p99 (5m)",
        "Loss (round trip)",
        "Jitter (RFC 3550, round trip)",
        "Connect phases (stacked)",
        "Mean loss burst (packets)",
        "Route eligibility: miss-ratio bounds",
    } <= titles["edgeprobe-edge"]
    assert {
        "Agents up",
        "Event loop lag p99",
        "Scheduler: late and skipped ticks",
        "Stray packets",
        "Last config reload",
    } <= titles["edgeprobe-agent"]
    heat = next(
        p
        for p in panels(load(GRAFANA / "dashboards" / "edgeprobe-edge.json"))
        if p["title"] == "RTT distribution"
    )
    assert heat["type"] == "heatmap" and heat["targets"][0]["format"] == "heatmap"
    assert "edgeprobe_rtt_seconds_bucket" in heat["targets"][0]["expr"]


def all_exprs() -> list[tuple[str, str]]:
    return [
        (f"{path.stem} / {p['title']}", substitute(t["expr"]))
        for path in DASHBOARDS
        for p in panels(load(path))
        for t in p["targets"]
    ]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_every_expr_parses(tmp_path: Path) -> None:
    # promtool has no offline "check expression"; a rule file of the expressions is the same.
    rules = {
        "groups": [
            {
                "name": "dashboards",
                "rules": [
                    {"record": f"dashboard:expr_{i}:check", "expr": e}
                    for i, (_, e) in enumerate(all_exprs())
                ],
            }
        ]
    }
    f = tmp_path / "dashboard-exprs.yml"
    f.write_text(yaml.safe_dump(rules))
    r = subprocess.run(
        ["promtool", "check", "rules", "--lint=none", str(f)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_exprs_use_known_series() -> None:
    # The metrics reference is the list of what the agent exports.
    reference = (ROOT / "docs" / "metrics.md").read_text()
    exported = set(re.findall(r"`(edgeprobe_[a-z0-9_]+)", reference))
    recorded = {r["record"] for r in shipped_rules() if "record" in r}
    known = exported | recorded | {"up", "ALERTS"}
    for where, expr in all_exprs():
        stripped = re.sub(r'"[^"]*"', '""', expr)  # label values are not names
        for name in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{|\[|\)|$)", stripped):
            if name.startswith("edgeprobe") or ":" in name or name in {"up", "ALERTS"}:
                base = re.sub(r"_(bucket|count|sum)$", "", name)
                assert name in known or base in known, f"{where}: unknown series {name}"


@pytest.mark.skipif(
    importlib.util.find_spec("grafana_foundation_sdk") is None,
    reason="grafana-foundation-sdk not installed: no dashboard schema to check "
    "against (the structural checks above still ran)",
)
@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_schema_round_trip(path: Path) -> None:
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    original = load(path)
    model = Dashboard.from_json(original)
    again = json.loads(json.dumps(model, cls=JSONEncoder))

    def leaves(x: Any, at: str = "") -> set[str]:
        # Empty objects and lists hold no field to lose (the SDK fills in its defaults).
        if isinstance(x, dict):
            return set().union(*(leaves(v, f"{at}/{k}") for k, v in x.items()))
        if isinstance(x, list):
            return set().union(*(leaves(v, f"{at}[{i}]") for i, v in enumerate(x)))
        return {at}

    lost = leaves(original) - leaves(again)
    assert not lost, f"fields outside the dashboard schema: {sorted(lost)}"
    for p in model.panels or []:
        opts = getattr(p, "options", None)
        # A known panel type decodes its options into its plugin's class, not a plain dict.
        assert opts is None or not isinstance(opts, dict) or not opts, (
            getattr(p, "title", ""),
            type(opts),
        )


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
