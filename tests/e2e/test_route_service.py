"""edgeprobe route as a process, against a real Prometheus (Debian's binary) on 127.0.0.1.

The Prometheus scrapes a small exporter that this test serves on loopback: it publishes the
route candidates (the series the recording rules record in production) with values the test
sets, including NaN, +Inf, series without an edge label and duplicate series. So every query
result the service handles comes from the real engine's HTTP API.

Also: the interface check (every series the service queries is recorded by a rule of the
shipped rule files) and the docs/routing.md client example, run against the service.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.route import promapi
from lab.procs import Procs, free_port, wait_for
from lab.prom import PromAPI
from lab.stack import launch_prometheus, launch_route
from tests.helpers import ROOT

RULES = ROOT / "deploy" / "prometheus" / "rules"
DOCS = ROOT / "docs" / "routing.md"

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="prometheus not installed (Debian package)"
)
pytestmark = [pytest.mark.skipif(sys.platform != "linux", reason="Linux only")]
HOLD = 4.0


# -- the candidates exporter ------------------------------------------------------------------
@dataclass
class Candidates:
    """What the exporter serves: (region, edge) -> (eligible, reason, ucb, rtt, connects),
    plus raw extra lines (for malformed series)."""

    edges: dict[tuple[str, str], tuple[str, str, str, str, str]] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(
        self,
        region: str,
        edge: str,
        eligible: bool = True,
        reason: str = "ok",
        ucb: str = "0.01",
        rtt: str = "0.005",
        connects: str = "180",
    ) -> None:
        with self.lock:
            self.edges[(region, edge)] = ("1" if eligible else "0", reason, ucb, rtt, connects)

    def remove(self, region: str, edge: str) -> None:
        with self.lock:
            self.edges.pop((region, edge), None)

    def text(self) -> str:
        lines = []
        with self.lock:
            for (region, edge), (el, reason, ucb, rtt, conn) in sorted(self.edges.items()):
                lab = f'region="{region}",edge="{edge}"'
                lines += [
                    f'{promapi.ELIGIBLE}{{{lab},reason="{reason}"}} {el}',
                    f"{promapi.MISS_UCB}{{{lab}}} {ucb}",
                    f"{promapi.RTT_P95}{{{lab}}} {rtt}",
                    f"{promapi.CONNECTS}{{{lab}}} {conn}",
                ]
            lines += self.extra
        return "\n".join(lines) + "\n"


@pytest.fixture
def candidates() -> Iterator[tuple[Candidates, str]]:
    c = Candidates()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = c.text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield c, f"127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


# -- processes ---------------------------------------------------------------------------------
@dataclass
class Stack:
    tmp: Path
    procs: Procs
    exporter: str
    prom_port: int = 0
    route_port: int = 0
    prom: PromAPI | None = None

    def start_prometheus(self) -> PromAPI:
        self.prom_port = self.prom_port or free_port()
        cfg = self.tmp / "prometheus.yml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "global": {
                        "scrape_interval": "1s",
                        "scrape_timeout": "1s",
                        "evaluation_interval": "1s",
                    },
                    "scrape_configs": [
                        {
                            "job_name": "candidates",
                            "honor_labels": True,
                            "static_configs": [{"targets": [self.exporter]}],
                        }
                    ],
                }
            )
        )
        self.prom = launch_prometheus(
            self.procs,
            "prometheus",
            cfg,
            self.prom_port,
            f"--storage.tsdb.path={self.tmp / 'data'}",
        )
        wait_for("Prometheus ready", self.prom.ready, 30, procs=self.procs)
        return self.prom

    def config(self, **policy: Any) -> Path:
        path = self.tmp / "route.yml"
        path.write_text(
            yaml.safe_dump(
                {
                    "prometheus": {
                        "url": f"http://127.0.0.1:{self.prom_port}",
                        "interval": "1s",
                        "timeout": "2s",
                    },
                    "policy": {"hold": f"{HOLD}s", **policy},
                    "map": {
                        "state_file": str(self.tmp / "state" / "map.json"),
                        "output_file": str(self.tmp / "out" / "map.json"),
                    },
                }
            )
        )
        return path

    def start_route(self, name: str = "route") -> str:
        self.route_port = self.route_port or free_port()
        base = launch_route(self.procs, self.config(), self.route_port, name).base
        wait_for(
            "route healthy",
            lambda: _get(base + "/-/healthy")[0] == 200,
            20,
            interval=0.1,
            procs=self.procs,
        )
        return base

    def stop(self, name: str, sig: signal.Signals = signal.SIGTERM) -> int | None:
        p = next(p for p in self.procs.items if p.name == name)
        p.popen.send_signal(sig)
        code = p.popen.wait(timeout=15)
        self.procs.items.remove(p)
        return code


def _get(url: str, headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
    except OSError:
        return 0, {}, b""


def get_map(base: str) -> dict[str, Any] | None:
    code, _, body = _get(base + "/v1/map")
    return json.loads(body) if code == 200 else None


def wait_best(stack: Stack, base: str, region: str, edge: str, timeout: float) -> None:
    """Wait until the route's map names ``edge`` best in ``region``."""
    wait_for(
        f"{edge} first in {region}",
        lambda: (d := get_map(base)) is not None and d["regions"][region]["best"] == edge,
        timeout,
        interval=0.2,
        procs=stack.procs,
    )


def order(doc: Mapping[str, Any], region: str) -> list[tuple[str, bool, str]]:
    return [(e["edge"], e["eligible"], e["reason"]) for e in doc["regions"][region]["edges"]]


def metric(base: str, name: str, labels: str = "") -> float:
    _, _, body = _get(base + "/metrics")
    pat = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    m = re.search(r"^" + pat + r"$", body.decode(), re.M)
    return float(m.group(1)) if m else float("nan")


@pytest.fixture
def stack(tmp_path: Path, candidates: tuple[Candidates, str]) -> Iterator[Stack]:
    procs = Procs(tmp_path)
    try:
        yield Stack(tmp_path, procs, candidates[1])
    finally:
        procs.stop_all()


# -- the tests ---------------------------------------------------------------------------------
@needs_prometheus
def test_map_etag_and_metrics(stack: Stack, candidates: tuple[Candidates, str]) -> None:
    c, _ = candidates
    c.set("r1", "fast", rtt="0.005")
    c.set("r1", "slow", rtt="0.050")
    c.set("r1", "bad", eligible=False, reason="over_budget", rtt="0.001")
    c.set("r2", "only", rtt="0.020")
    stack.start_prometheus()
    base = stack.start_route()
    doc = wait_for(
        "a map with both regions",
        lambda: (
            d
            if (d := get_map(base)) and set(d["regions"]) == {"r1", "r2"} and not d["stale"]
            else None
        ),
        30,
        procs=stack.procs,
    )
    assert order(doc, "r1") == [
        ("fast", True, "ok"),
        ("slow", True, "ok"),
        ("bad", False, "over_budget"),
    ]
    assert doc["regions"]["r1"]["best"] == "fast"
    assert doc["regions"]["r1"]["edges"][0]["score"] == {
        "miss_ucb": 0.01,
        "rtt_p95_ms": 5.0,
        "connects": 180.0,
    }
    code, h, _ = _get(base + "/v1/map")
    assert code == 200 and h["Cache-Control"] == "max-age=1"
    assert h["X-Edgeprobe-Map-Stale"] == "false" and int(h["X-Edgeprobe-Map-Age"]) <= 3
    etag = h["ETag"]
    # Nothing changes: the same ETag query after query, and If-None-Match gets a 304.
    time.sleep(2.5)
    code, h2, body = _get(base + "/v1/map", {"If-None-Match": etag})
    assert code == 304 and body == b"" and h2["ETag"] == etag
    code, _, _ = _get(base + "/v1/map", {"If-None-Match": '"other", W/' + etag})
    assert code == 304
    code, h, body = _get(base + "/v1/regions/r2")
    assert code == 200 and json.loads(body)["edges"][0]["edge"] == "only"
    assert _get(base + "/v1/regions/r2", {"If-None-Match": h["ETag"]})[0] == 304
    assert _get(base + "/v1/regions/nowhere")[0] == 404
    # A change (the slow edge's RTT) is a new ETag.
    c.set("r1", "slow", rtt="0.060")
    wait_for(
        "a new ETag",
        lambda: _get(base + "/v1/map", {"If-None-Match": etag})[0] == 200,
        10,
        procs=stack.procs,
    )
    # Its own metrics, and the routing-layer output file (the same document).
    assert metric(base, "edgeprobe_route_best_edge", 'edge="fast",region="r1"') == 1
    assert metric(base, "edgeprobe_route_best_edge", 'edge="only",region="r2"') == 1
    assert metric(base, "edgeprobe_route_map_stale") == 0
    assert metric(base, "edgeprobe_route_decisions_total") >= 2
    assert metric(base, "edgeprobe_route_best_edge_changes_total", 'reason="initial"') == 2
    assert metric(base, "edgeprobe_route_query_duration_seconds_count") >= 2
    assert _get(base + "/-/ready")[0] == 200
    out = stack.tmp / "out" / "map.json"
    assert json.loads(out.read_text())["regions"] == get_map(base)["regions"]  # type: ignore


@needs_prometheus
def test_malformed_results_are_dropped_and_counted(
    stack: Stack, candidates: tuple[Candidates, str]
) -> None:
    c, _ = candidates
    c.set("r", "good", rtt="0.010")
    c.set("r", "fastest", rtt="0.001")
    c.set("r", "infrtt", rtt="+Inf")
    c.extra = [
        # NaN eligibility: the edge is known (its other series are fine) but not trusted.
        f'{promapi.ELIGIBLE}{{region="r",edge="nanelig2",reason="ok"}} NaN',
        f'{promapi.MISS_UCB}{{region="r",edge="nanelig2"}} 0.01',
        # No edge label.
        f'{promapi.ELIGIBLE}{{region="r",reason="ok"}} 1',
        # Two eligibility series for one edge (two rule sets, or a relabelling gone wrong).
        f'{promapi.ELIGIBLE}{{region="r",edge="dup",reason="ok",replica="a"}} 1',
        f'{promapi.ELIGIBLE}{{region="r",edge="dup",reason="ok",replica="b"}} 1',
    ]
    stack.start_prometheus()
    base = stack.start_route()
    doc = wait_for("a map", lambda: get_map(base), 30, procs=stack.procs)
    got = {e: (el, r) for e, el, r in order(doc, "r")}
    assert got["good"] == (True, "ok") and got["fastest"] == (True, "ok")
    # +Inf RTT is dropped: the edge stays eligible but ranks as if it had no RTT.
    assert got["infrtt"] == (True, "ok")
    assert [e for e, _, _ in order(doc, "r")][:3] == ["fastest", "good", "infrtt"]
    assert got["nanelig2"] == (False, "invalid_data") and got["dup"] == (False, "invalid_data")
    for reason in ("nan", "inf", "missing_label", "duplicate"):
        assert (
            metric(base, "edgeprobe_route_query_dropped_series_total", f'reason="{reason}"') >= 1
        ), reason


@needs_prometheus
def test_prometheus_down_stale_then_restart_from_persisted(
    stack: Stack, candidates: tuple[Candidates, str]
) -> None:
    c, _ = candidates
    c.set("r", "a", rtt="0.005")
    c.set("r", "b", rtt="0.050")
    stack.start_prometheus()
    base = stack.start_route()
    fresh = wait_for(
        "a fresh map",
        lambda: d if (d := get_map(base)) and not d["stale"] else None,
        30,
        procs=stack.procs,
    )
    # Prometheus dies: the map stays served, marked stale, its age growing.
    stack.stop("prometheus", signal.SIGKILL)
    stale = wait_for(
        "the map marked stale",
        lambda: d if (d := get_map(base)) and d["stale"] else None,
        10,
        procs=stack.procs,
    )
    assert stale["regions"] == fresh["regions"]
    time.sleep(2.2)
    code, h, _ = _get(base + "/v1/map")
    assert code == 200 and h["X-Edgeprobe-Map-Stale"] == "true"
    assert int(h["X-Edgeprobe-Map-Age"]) >= 2
    assert metric(base, "edgeprobe_route_map_stale") == 1
    assert metric(base, "edgeprobe_route_map_age_seconds") >= 2
    assert metric(base, "edgeprobe_route_query_errors_total", 'reason="connection"') >= 1
    assert _get(base + "/-/ready")[0] == 200
    # The route service restarts while Prometheus is still down: the persisted map is served
    # at once, the same regions, before any query could complete.
    assert stack.stop("route") == 0
    base = stack.start_route("route-2")
    code, h, body = _get(base + "/v1/map")
    assert code == 200 and h["X-Edgeprobe-Map-Stale"] == "true"
    assert json.loads(body)["regions"] == fresh["regions"]
    assert _get(base + "/-/ready")[0] == 200
    # Prometheus back (same storage): fresh again, same decision.
    stack.start_prometheus()
    back = wait_for(
        "fresh again",
        lambda: d if (d := get_map(base)) and not d["stale"] else None,
        30,
        procs=stack.procs,
    )
    assert back["regions"]["r"]["best"] == "a"


@needs_prometheus
def test_prometheus_slow_is_a_timeout(stack: Stack, candidates: tuple[Candidates, str]) -> None:
    """A Prometheus that accepts connections and never answers (stopped): each cycle times out
    after prometheus.timeout, the map stays served, stale; fresh again when it answers."""
    c, _ = candidates
    c.set("r", "a")
    stack.start_prometheus()
    base = stack.start_route()
    wait_for("a fresh map", lambda: (d := get_map(base)) and not d["stale"], 30, procs=stack.procs)
    prom = next(p for p in stack.procs.items if p.name == "prometheus")
    prom.popen.send_signal(signal.SIGSTOP)
    try:
        wait_for(
            "stale after a timeout",
            lambda: (d := get_map(base)) and d["stale"],
            15,
            procs=stack.procs,
        )
        assert metric(base, "edgeprobe_route_query_errors_total", 'reason="timeout"') >= 1
    finally:
        prom.popen.send_signal(signal.SIGCONT)
    wait_for("fresh again", lambda: (d := get_map(base)) and not d["stale"], 30, procs=stack.procs)


@needs_prometheus
def test_fail_fast_recover_after_hold(stack: Stack, candidates: tuple[Candidates, str]) -> None:
    c, _ = candidates
    c.set("r", "a", rtt="0.005")
    c.set("r", "b", rtt="0.050")
    stack.start_prometheus()
    base = stack.start_route()
    wait_best(stack, base, "r", "a", 30)
    c.set("r", "a", eligible=False, reason="over_budget", rtt="0.300")
    t0 = time.monotonic()
    wait_best(stack, base, "r", "b", 15)
    switched = time.monotonic() - t0
    c.set("r", "a", rtt="0.005")
    t1 = time.monotonic()
    # "a" becomes eligible within a scrape and a query; it must not come back before the hold.
    wait_for(
        "a eligible again",
        lambda: ("a", True, "ok") in order(get_map(base) or {"regions": {"r": {"edges": []}}}, "r"),
        15,
        interval=0.2,
        procs=stack.procs,
    )
    assert get_map(base)["regions"]["r"]["best"] == "b"  # type: ignore[index]
    wait_best(stack, base, "r", "a", 30)
    back = time.monotonic() - t1
    assert back >= HOLD, (switched, back)
    assert (
        metric(base, "edgeprobe_route_best_edge_changes_total", 'reason="incumbent_ineligible"')
        == 1
    )
    assert (
        metric(base, "edgeprobe_route_best_edge_changes_total", 'reason="challenger_better"') == 1
    )
    # A region whose edges all vanish keeps its edges, ineligible, no_data.
    c.remove("r", "a")
    c.remove("r", "b")
    c.set("other", "x")
    wait_for(
        "r's edges no_data",
        lambda: (
            (d := get_map(base))
            and order(d, "r") == [("a", False, "no_data"), ("b", False, "no_data")]
        ),
        15,
        procs=stack.procs,
    )


def test_bad_config_exits_non_zero(tmp_path: Path) -> None:
    cfg = tmp_path / "route.yml"
    cfg.write_text("prometheus:\n  url: http://127.0.0.1:1\npolicy:\n  hodl: 5m\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "route",
            f"--config.file={cfg}",
            "--web.listen-address=127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert r.returncode == 1
    assert "policy.hodl: unknown key" in r.stderr and "(line 4)" in r.stderr, r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "agent", "route", f"--config.file={tmp_path / 'missing.yml'}"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert r.returncode == 1 and "cannot read config file" in r.stderr
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_user: {}\n")
    cfg.write_text("")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "route",
            f"--config.file={cfg}",
            f"--web.config.file={web}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert r.returncode == 1 and "web config error" in r.stderr


def test_no_map_yet_is_503_not_empty(tmp_path: Path) -> None:
    """No persisted map and no Prometheus: never an empty map, a 503 with Retry-After."""
    port = free_port()
    cfg = tmp_path / "route.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "prometheus": {"url": f"http://127.0.0.1:{free_port()}", "interval": "1s"},
                "map": {"state_file": str(tmp_path / "map.json")},
            }
        )
    )
    procs = Procs(tmp_path)
    try:
        base = launch_route(procs, cfg, port, "route").base
        wait_for(
            "healthy", lambda: _get(base + "/-/healthy")[0] == 200, 20, interval=0.1, procs=procs
        )
        code, h, _ = _get(base + "/v1/map")
        assert code == 503 and h["Retry-After"] == "1"
        code, _, body = _get(base + "/-/ready")
        assert (code, body) == (503, b"Not ready: no routing map yet.\n")
        code, _, body = _get(base + "/-/healthy")
        assert (code, body) == (200, b"Healthy.\n")
        code, h, body = _get(base + "/")
        assert code == 200 and h["Content-Type"].startswith("text/html")
        assert b"<h1>edgeprobe route</h1>" in body
    finally:
        procs.stop_all()


def test_route_queries_only_recorded_series() -> None:
    """The interface with the rules: every series the service queries is recorded by a rule
    of the shipped rule files (group edgeprobe-route-candidates)."""
    recorded: dict[str, str] = {}
    for f in RULES.glob("*.yml"):
        for g in yaml.safe_load(f.read_text())["groups"]:
            for r in g["rules"]:
                if "record" in r:
                    recorded[r["record"]] = g["name"]
    if "edgeprobe-route-candidates" not in recorded.values():
        pytest.skip("the rules' edgeprobe-route-candidates group is not on this branch yet")
    missing = [s for s in promapi.SERIES if s not in recorded]
    assert not missing, f"queried but not recorded: {missing}"


# -- the docs' client example ------------------------------------------------------------------
def docs_client_example() -> str:
    text = DOCS.read_text()
    m = re.search(r"<!-- client-example -->\n```python\n(.*?)```", text, re.S)
    assert m, "docs/routing.md lost its client example"
    return m.group(1)


@needs_prometheus
def test_docs_client_example(stack: Stack, candidates: tuple[Candidates, str]) -> None:
    c, _ = candidates
    c.set("id-jakarta", "cgk-1", eligible=False, reason="over_budget", rtt="0.300")
    c.set("id-jakarta", "sin-1", rtt="0.012")
    c.set("id-jakarta", "hkg-1", rtt="0.040")
    stack.start_prometheus()
    base = stack.start_route()
    wait_for("a map", lambda: get_map(base), 30, procs=stack.procs)
    script = stack.tmp / "client.py"
    script.write_text(docs_client_example())
    r = subprocess.run(
        [sys.executable, str(script), base, "id-jakarta"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    # First fetch 200 and the first eligible edge; the second a 304 from the cached ETag.
    assert lines[0] == "fetched map (200); id-jakarta -> sin-1 (fallbacks: hkg-1, cgk-1)", lines
    assert lines[1] == "not modified (304); id-jakarta -> sin-1 (fallbacks: hkg-1, cgk-1)", lines


def test_web_config_basic_auth(tmp_path: Path) -> None:
    """--web.config.file guards the route's API as it guards the agent's (same WebGuard)."""
    import base64

    import bcrypt

    web = tmp_path / "web.yml"
    web.write_text(
        yaml.safe_dump(
            {
                "basic_auth_users": {
                    "signalling": bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
                }
            }
        )
    )
    cfg = tmp_path / "route.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "prometheus": {"url": f"http://127.0.0.1:{free_port()}", "interval": "1s"},
                "map": {"state_file": str(tmp_path / "map.json")},
            }
        )
    )
    port = free_port()
    procs = Procs(tmp_path)
    try:
        base = launch_route(procs, cfg, port, "route", [f"--web.config.file={web}"]).base
        auth = {"Authorization": "Basic " + base64.b64encode(b"signalling:s3cret").decode()}
        wait_for(
            "healthy",
            lambda: _get(base + "/-/healthy", auth)[0] == 200,
            20,
            interval=0.1,
            procs=procs,
        )
        assert _get(base + "/v1/map")[0] == 401
        assert _get(base + "/metrics")[0] == 401
        assert _get(base + "/v1/map", auth)[0] == 503  # authorized; no map yet
        assert _get(base + "/metrics", auth)[0] == 200
        # SIGHUP reloads the web config (and does not kill the process).
        web.write_text(
            yaml.safe_dump(
                {
                    "basic_auth_users": {
                        "signalling": bcrypt.hashpw(b"n3w", bcrypt.gensalt(rounds=4)).decode()
                    }
                }
            )
        )
        procs.items[0].popen.send_signal(signal.SIGHUP)
        new = {"Authorization": "Basic " + base64.b64encode(b"signalling:n3w").decode()}
        wait_for(
            "the new password",
            lambda: _get(base + "/metrics", new)[0] == 200,
            10,
            interval=0.1,
            procs=procs,
        )
        assert _get(base + "/metrics", auth)[0] == 401
    finally:
        procs.stop_all()
