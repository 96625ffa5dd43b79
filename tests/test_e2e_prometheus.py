"""End to end: agents → regional Prometheus (agent mode) → remote write → central Prometheus
with the rules, all real processes; assertions through the central server's HTTP API.

Two tests share one harness:

* ``test_two_tier_loopback``: one agent per region on loopback (no lab), two regions, one of
  which is configured so that every edge misses the budget (a fixed connect cost above it).
  Proves the pipeline: external labels, remote write, rules, alerts.
* ``test_two_tier_lab``: the WAN lab with three regions, one agent inside each region's
  namespace; budget alerts for exactly the edges the lab made bad, the best edge per region,
  a degradation mid-test that moves the best edge and fires the alerts; then every Grafana
  panel's PromQL against the live central server, and the README figure.

The test-only overlay (``overlay_rules``, ``regional_config``, ``central_config``) starts from
the shipped files in deploy/prometheus/ and changes only timings: 1 s scrape and evaluation
intervals, `for:` clauses capped at 5 s and the best-edge-changed look-back (``offset 10m``)
cut to 20 s, so that minutes of production behaviour fit in one minute. The expressions and
windows themselves are the shipped ones: with a few minutes of history, every rate window
simply covers all of it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DOCS_IMG = ROOT / "docs" / "img"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("prometheus") is None,
                       reason="prometheus not installed (Debian package prometheus)"),
    pytest.mark.skipif(sys.platform != "linux", reason="Linux only"),
]

T = TypeVar("T")
FOR_CAP_SECONDS = 5
BEST_EDGE_LOOKBACK = "20s"


# -- processes ------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class Procs:
    """Processes this test started; stopped by PID (never by name), in reverse order."""

    logdir: Path
    items: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Proc:
        log = self.logdir / f"{name}.log"
        with log.open("wb") as f:
            p = subprocess.Popen(list(argv), stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=dict(env) if env else None)
        proc = Proc(name, p, log)
        self.items.append(proc)
        return proc

    def check_alive(self) -> None:
        for p in self.items:
            if p.popen.poll() is not None:
                raise AssertionError(f"{p.name} exited with {p.popen.returncode}:\n{p.tail()}")

    def stop_all(self, timeout: float = 10.0) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        for p in reversed(self.items):
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in reversed(self.items):
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(timeout=5)
            codes[p.name] = p.popen.returncode
        self.items.clear()
        return codes


def wait_for(what: str, fn: Callable[[], T | None], timeout: float, interval: float = 0.5,
             procs: Procs | None = None) -> T:
    """Poll ``fn`` until it returns a truthy value; bounded in time and count."""
    deadline = time.monotonic() + timeout
    last: Any = None
    for _ in range(int(timeout / interval) + 2):
        if procs is not None:
            procs.check_alive()
        try:
            last = fn()
        except (OSError, ValueError) as e:
            last = e
        if last and not isinstance(last, Exception):
            return last  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")


# -- the central server's HTTP API -----------------------------------------------------------
@dataclass
class PromAPI:
    base: str

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
            raise ValueError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        if body.get("status") != "success":
            raise ValueError(f"{path} {params}: {body}")
        return body["data"]

    def ready(self) -> bool:
        with urllib.request.urlopen(self.base + "/-/ready", timeout=2) as r:
            return bool(r.status == 200)

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self._get("/api/v1/query", {"query": expr})
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        data = self._get("/api/v1/query_range", {"query": expr, "start": f"{start:.3f}",
                                                 "end": f"{end:.3f}", "step": f"{step:g}"})
        result: list[dict[str, Any]] = data["result"]
        return result

    def alerts(self, state: str = "firing") -> list[dict[str, Any]]:
        return [a for a in self._get("/api/v1/alerts")["alerts"] if a["state"] == state]

    def firing(self, name_prefix: str) -> set[tuple[str, str]]:
        return {(a["labels"].get("region", ""), a["labels"].get("edge", ""))
                for a in self.alerts() if a["labels"]["alertname"].startswith(name_prefix)}

    def best_edges(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for s in self.query("region:edgeprobe_best_edge:info"):
            region = s["metric"]["region"]
            assert region not in out, f"two best edges for {region}"
            out[region] = s["metric"]["edge"]
        return out


# -- the test-only overlay --------------------------------------------------------------------
def _seconds(d: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    total = 0.0
    for num, unit in re.findall(r"(\d+)(ms|s|m|h|d)", d):
        total += int(num) * units[unit]
    return total


def overlay_rules(dst: Path) -> Path:
    """The shipped rule files with `for:` capped and the best-edge look-back shortened."""
    dst.mkdir(parents=True, exist_ok=True)
    for src in sorted((PROM_DIR / "rules").glob("*.yml")):
        doc = yaml.safe_load(src.read_text())
        for g in doc["groups"]:
            for r in g["rules"]:
                if "for" in r and _seconds(r["for"]) > FOR_CAP_SECONDS:
                    r["for"] = f"{FOR_CAP_SECONDS}s"
                for key in ("expr",):
                    r[key] = r[key].replace("offset 10m", f"offset {BEST_EDGE_LOOKBACK}")
                if "annotations" in r:
                    r["annotations"] = {k: v.replace("offset 10m", f"offset {BEST_EDGE_LOOKBACK}")
                                        for k, v in r["annotations"].items()}
        (dst / src.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    return dst


def central_config(path: Path, rules_dir: Path, self_port: int) -> Path:
    cfg = yaml.safe_load((PROM_DIR / "central.yml").read_text())
    cfg["global"]["evaluation_interval"] = "1s"
    cfg["global"]["scrape_interval"] = "1s"
    cfg["rule_files"] = [str(rules_dir / "*.yml")]
    cfg.pop("alerting", None)           # no Alertmanager here; /api/v1/alerts shows the state
    cfg["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{self_port}"]}]
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def regional_config(path: Path, region: str, agents: Sequence[str], central_port: int) -> Path:
    cfg = yaml.safe_load((PROM_DIR / "regional-agent.yml").read_text())
    cfg["global"]["scrape_interval"] = "1s"
    cfg["global"]["scrape_timeout"] = "1s"
    cfg["global"]["external_labels"]["region"] = region
    cfg["scrape_configs"][0]["static_configs"] = [{"targets": list(agents)}]
    rw = cfg["remote_write"][0]
    rw["url"] = f"http://127.0.0.1:{central_port}/api/v1/write"
    rw["queue_config"].update({"batch_send_deadline": "500ms", "min_backoff": "100ms",
                               "max_backoff": "1s"})
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@contextlib.contextmanager
def two_tier(procs: Procs, tmp: Path, regions: Mapping[str, Sequence[str]]) -> Iterator[PromAPI]:
    """A central Prometheus with the rules and one agent-mode Prometheus per region, on free
    loopback ports with temporary storage. ``regions``: region → agent host:port list."""
    rules = overlay_rules(tmp / "rules")
    cport = free_port()
    ccfg = central_config(tmp / "central.yml", rules, cport)
    procs.start("prometheus-central", [
        "prometheus", f"--config.file={ccfg}", f"--storage.tsdb.path={tmp / 'central-data'}",
        f"--web.listen-address=127.0.0.1:{cport}", "--web.enable-remote-write-receiver",
        "--storage.tsdb.retention.time=1h", "--log.level=warn"])
    api = PromAPI(f"http://127.0.0.1:{cport}")
    wait_for("central Prometheus ready", api.ready, 30, procs=procs)
    for region, agents in regions.items():
        rport = free_port()
        rcfg = regional_config(tmp / f"regional-{region}.yml", region, agents, cport)
        procs.start(f"prometheus-agent-{region}", [
            "prometheus", "--enable-feature=agent", f"--config.file={rcfg}",
            f"--storage.agent.path={tmp / f'agent-data-{region}'}",
            f"--web.listen-address=127.0.0.1:{rport}", "--log.level=warn"])
    yield api


def agent_config(path: Path, region: str, targets: Mapping[str, str],
                 extra_agent: Mapping[str, Any] | None = None) -> Path:
    cfg: dict[str, Any] = {
        "agent": {"region": region, "labels": {"provider": "lab"}, **(extra_agent or {})},
        # 5 packets a second per edge: 300 in a minute, past the rules' low-sample guards.
        "defaults": {"icmp": {"interval": "1s", "packets": 5, "spacing": "20ms",
                              "timeout": "900ms"}},
        # A short window, so the model follows a degradation within seconds.
        "metrics": {"recent_window": "10s"},
        "targets": [{"name": n, "address": a, "probes": ["icmp"]} for n, a in targets.items()],
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def edgeprobe_argv() -> list[str]:
    return [sys.executable, "-m", "agent"]


def assert_clean_exit(codes: Mapping[str, int | None]) -> None:
    # Prometheus and the agent exit 0 on SIGTERM.
    bad = {n: c for n, c in codes.items() if c not in (0, -signal.SIGTERM)}
    assert not bad, f"unclean exits: {bad}"


# -- Grafana panels ---------------------------------------------------------------------------
def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) for every target of every panel, template variables
    substituted with values that match everything (as Grafana's "All" does)."""
    out: list[tuple[str, str, str]] = []
    for path in sorted((GRAFANA_DIR / "dashboards").glob("*.json")):
        dash = json.loads(path.read_text())
        panels: list[dict[str, Any]] = []
        for p in dash["panels"]:
            panels.append(p)
            panels.extend(p.get("panels", []))
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((path.stem, p["title"], substitute(t["expr"])))
    return out


def substitute(expr: str) -> str:
    subs = {"region": ".*", "edge": ".*", "probe": ".*", "instance": ".*",
            "__rate_interval": "1m", "__interval": "15s", "__range": "5m"}
    for var, value in subs.items():
        expr = expr.replace(f"${{{var}:regex}}", value).replace(f"${{{var}}}", value)
        expr = re.sub(rf"\${var}\b", value, expr)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def check_all_panels(api: PromAPI) -> list[str]:
    """Every panel's PromQL must evaluate without error and return data. Returns failures."""
    failures: list[str] = []
    queries = dashboard_queries()
    assert len(queries) >= 15, "the dashboards hold fewer queries than expected"
    for dash, title, expr in queries:
        try:
            result = api.query(expr)
        except ValueError as e:
            failures.append(f"{dash} / {title}: error {e}")
            continue
        if not result:
            failures.append(f"{dash} / {title}: no data for {expr}")
    return failures


# -- the tests ------------------------------------------------------------------------------
def test_two_tier_loopback(tmp_path: Path) -> None:
    """Pipeline without the lab: two regions on loopback. In lo-bad the agent's model charges a
    fixed 700 ms per connect, so every edge there misses the 600 ms budget; in lo-good none."""
    procs = Procs(tmp_path)
    try:
        agents: dict[str, list[str]] = {}
        for region, extra in (("lo-good", {}), ("lo-bad", {"model": {"fixed": "700ms"}})):
            port = free_port()
            cfg = agent_config(tmp_path / f"agent-{region}.yml", region,
                               {"lo-a": "127.0.0.1", "lo-b": "127.0.0.2"}, extra)
            procs.start(f"edgeprobe-{region}", [*edgeprobe_argv(), "run",
                        f"--config.file={cfg}", f"--web.listen-address=127.0.0.1:{port}"])
            agents[region] = [f"127.0.0.1:{port}"]
        with two_tier(procs, tmp_path, agents) as api:
            # External labels: `up` (which the agent does not label) arrives with its region.
            wait_for("up from both regions", lambda: {
                s["metric"].get("region") for s in api.query('up{job="edgeprobe"} == 1')}
                >= {"lo-good", "lo-bad"}, 30, procs=procs)
            bad = {("lo-bad", "lo-a"), ("lo-bad", "lo-b")}
            wait_for("fast-burn alerts for lo-bad", lambda: api.firing(
                "EdgeprobeConnectBudgetBurnFast") >= bad, 60, procs=procs)
            assert api.firing("EdgeprobeConnectBudgetBurn") <= bad
            best = wait_for("a best edge per region",
                            lambda: (b if len(b := api.best_edges()) == 2 else None), 30)
            assert set(best) == {"lo-good", "lo-bad"}
            ratio = {s["metric"]["edge"]: float(s["value"][1]) for s in api.query(
                'region_edge:edgeprobe_connect_within_budget:ratio_rate5m{region="lo-good"}')}
            assert ratio == {"lo-a": 1.0, "lo-b": 1.0}
            # Per-target series keep the agent's own labels (no exported_region clash).
            assert not api.query('{__name__=~"edgeprobe_.+", exported_region!=""}')
    finally:
        codes = procs.stop_all()
    assert_clean_exit(codes)
