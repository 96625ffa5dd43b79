"""The Prometheus rules and configs, checked by the real tools (promtool, amtool).

`promtool test rules` runs the unit tests in deploy/prometheus/tests/ (every recording rule and
alert: firing and not, window edges, the low-sample guard, ties of the best edge).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "deploy" / "prometheus"
RULES = sorted((PROM / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM / "tests").glob("*.yml"))
ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed (Debian package prometheus)")
needs_amtool = pytest.mark.skipif(shutil.which("amtool") is None,
                                  reason="amtool not installed (prometheus-alertmanager)")


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, check=False)


def load(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def all_rules() -> list[dict[str, Any]]:
    return [r for p in RULES for g in load(p)["groups"] for r in g["rules"]]


def test_rule_files_exist() -> None:
    assert [p.name for p in RULES] == ["edgeprobe-alerts.yml", "edgeprobe-recording.yml"]
    assert len(RULE_TESTS) >= 3


@needs_promtool
def test_promtool_check_rules() -> None:
    r = run("promtool", "check", "rules", "--lint-fatal", *RULES)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_unit_tests() -> None:
    r = run("promtool", "test", "rules", *RULE_TESTS)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("SUCCESS") == len(RULE_TESTS), r.stdout


@needs_promtool
@pytest.mark.parametrize("name", ["prometheus.yml", "central.yml"])
def test_promtool_check_server_config(name: str) -> None:
    # check config also loads and checks the rule files the config names.
    r = run("promtool", "check", "config", "--lint-fatal", name, cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 rule files found" in r.stdout


@needs_promtool
def test_promtool_check_agent_config() -> None:
    r = run("promtool", "check", "config", "--agent", "regional-agent.yml", cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = load(PROM / "regional-agent.yml")
    # Agent mode: no rules, no alerting, only remote write.
    assert "rule_files" not in cfg and "alerting" not in cfg
    assert cfg["remote_write"] and cfg["global"]["external_labels"]["region"]


def test_every_rule_is_a_standard_rule() -> None:
    """Plain rule files (the PrometheusRule is generated from them): known keys only."""
    for path in RULES:
        doc = load(path)
        assert set(doc) == {"groups"}, path
        for g in doc["groups"]:
            assert set(g) <= {"name", "interval", "rules"}, g["name"]
            for r in g["rules"]:
                assert set(r) <= {"record", "alert", "expr", "for", "labels", "annotations"}, r


def test_recording_rule_names_follow_the_convention() -> None:
    for r in all_rules():
        if "record" in r:
            assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", r["record"]), r["record"]


def test_slo_target_is_set_in_one_place() -> None:
    targets = [r for r in all_rules() if r.get("record") == "edgeprobe:connect_budget_slo:target"]
    assert len(targets) == 1 and targets[0]["expr"] == "vector(0.99)"
    text = "".join(p.read_text() for p in RULES)
    # No other literal 0.99 in an expression: every burn rate reads the target series.
    exprs = " ".join(r["expr"] for r in all_rules() if "record" not in r or
                     r["record"] != "edgeprobe:connect_budget_slo:target")
    assert not re.search(r"(?<!histogram_quantile\()0\.99\b", exprs)
    assert text.count("connect_budget_slo:error_budget") >= 5


def test_within_budget_uses_the_0_6_bucket() -> None:
    for r in all_rules():
        if r.get("record", "").startswith("region_edge:edgeprobe_connect_within_budget:"):
            assert 'edgeprobe_connect_duration_seconds_bucket{le="0.6"}' in r["expr"]
            assert "edgeprobe_connect_budget_miss_probability" in r["expr"]


def test_burn_rate_windows_follow_the_sre_workbook() -> None:
    alerts = {r["alert"]: r for r in all_rules() if "alert" in r}
    expect = {"EdgeprobeConnectBudgetBurnFast": ("1h", "5m", "14.4", "page"),
              "EdgeprobeConnectBudgetBurnMedium": ("6h", "30m", "6", "page"),
              "EdgeprobeConnectBudgetBurnSlow": ("3d", "6h", "1", "ticket")}
    for name, (long_w, short_w, factor, severity) in expect.items():
        expr = alerts[name]["expr"]
        assert f"burnrate{long_w} > {factor}\n" in expr, expr
        assert f"burnrate{short_w} > {factor}\n" in expr, expr
        assert "min_events" in expr
        assert alerts[name]["labels"]["severity"] == severity


def test_every_alert_has_a_runbook_style_description() -> None:
    alerts = [r for r in all_rules() if "alert" in r]
    assert {a["alert"] for a in alerts} >= {
        "EdgeprobeConnectBudgetBurnFast", "EdgeprobeConnectBudgetBurnMedium",
        "EdgeprobeConnectBudgetBurnSlow", "EdgeprobeHighLoss", "EdgeprobeHighJitter",
        "EdgeprobeBestEdgeChanged", "EdgeprobeAgentDown", "EdgeprobeAgentAbsent",
        "EdgeprobeProbeFailing", "EdgeprobeTargetNoData"}
    for a in alerts:
        ann = a["annotations"]
        assert ann["summary"] and len(ann["description"]) > 120, a["alert"]
        assert "$labels.region" in ann["description"], a["alert"]
        assert a["labels"]["severity"] in {"page", "ticket", "warning", "info"}
        # Per-edge alerts name the edge and the figure.
        if "edge" in a["expr"] and not re.search("Agent|Reload|NoData", a["alert"]):
            assert "$labels.edge" in ann["description"], a["alert"]
            assert "$value" in ann["description"] or "query" in ann["description"], a["alert"]


@needs_amtool
def test_amtool_check_config() -> None:
    r = run("amtool", "check-config", ALERTMANAGER)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_amtool
@pytest.mark.parametrize(("labels", "receiver"), [
    (["severity=page", "region=id-jakarta"], "edgeprobe-page-apac"),
    (["severity=page", "region=ae-dubai"], "edgeprobe-page-emea"),
    (["severity=page", "region=br-saopaulo"], "edgeprobe-page-americas"),
    (["severity=page", "region=xx-elsewhere"], "edgeprobe-page"),
    (["severity=ticket", "region=ae-dubai"], "edgeprobe-ticket"),
    (["severity=warning", "region=id-jakarta"], "edgeprobe-warning-apac"),
    (["severity=warning", "region=br-saopaulo"], "edgeprobe-warning"),
    (["severity=info", "region=br-saopaulo"], "edgeprobe-info"),
])
def test_alertmanager_routes_by_region_and_severity(labels: list[str], receiver: str) -> None:
    r = run("amtool", "config", "routes", "test", f"--config.file={ALERTMANAGER}",
            "alertname=EdgeprobeTest", *labels)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == receiver
