"""Rules, alerts and dashboards read every histogram in both forms: native first, classic as the
``or`` fallback (a Prometheus with native histograms keeps only the native series of a histogram
that carries native buckets; any other server keeps only ``_bucket``/``_count``/``_sum``).

* Statically: every read of a histogram family of the catalog in the rule files, the generated
  PrometheusRule and the dashboards has both forms, the native one first.
* Live: one real Prometheus 2.42 with ``--enable-feature=native-histograms`` and the shipped
  rules scrapes two exporters fed the same observations, one in the protobuf format with native
  buckets (region ``rn``: stored native only) and one in the text format (region ``rc``:
  classic only, the agent's lean layout). Every recording rule and dashboard query that reads a
  histogram returns data for both regions; the quantiles agree with the exact ones (native
  within 2 %, classic within its bucket), the within-budget fraction is exact in both; the
  no-data alert finds the silent edge in both. promtool's unit tests keep covering the classic
  path in detail (they cannot feed native histograms).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import math
import re
import shutil
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample

from agent.config.model import LEAN_DURATION_BUCKETS, LEAN_RTT_BUCKETS
from agent.export import catalog
from agent.export.native import NativeBuckets
from agent.export.protobuf import CONTENT_TYPE, accepts_protobuf, encode
from tests.helpers import (
    DASHBOARDS,
    ROOT,
    RULE_FILES,
    prometheus,
    query,
    serve_app,
    shipped_rules,
    substitute,
)

PROMETHEUSRULE = ROOT / "deploy" / "kubernetes" / "cluster" / "prometheusrule.yaml"
HISTOGRAMS = frozenset(f.name for f in (*catalog.SERIES, *catalog.AGENT) if f.type == "histogram")


# -- static: both forms, native first ---------------------------------------------------------
@dataclass(frozen=True)
class Reads:
    native: tuple[int, ...]  # offsets of reads of the histogram itself
    classic: tuple[int, ...]  # offsets of reads of its _bucket/_count/_sum series


def strip(expr: str) -> str:
    """``expr`` without comments and label values (neither holds a read)."""
    return re.sub(r'"[^"]*"', '""', re.sub(r"#[^\n]*", "", expr))


def histogram_reads(expr: str) -> dict[str, Reads]:
    """Per histogram family read by ``expr``: where (in ``strip(expr)``) it is read in each
    form. A read is a series name followed by a selector or a range."""
    text = strip(expr)
    native: dict[str, list[int]] = {}
    classic: dict[str, list[int]] = {}
    for m in re.finditer(r"\b(edgeprobe_[a-z0-9_]+)\s*(?=[{\[])", text):
        name = m.group(1)
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        if name in HISTOGRAMS:
            native.setdefault(name, []).append(m.start())
        elif base != name and base in HISTOGRAMS:
            classic.setdefault(base, []).append(m.start())
    return {
        h: Reads(tuple(native.get(h, ())), tuple(classic.get(h, ())))
        for h in native.keys() | classic.keys()
    }


def form_problems(expr: str) -> list[str]:
    text = strip(expr)
    out = []
    for h, r in sorted(histogram_reads(expr).items()):
        if not r.native:
            out.append(f"{h}: classic form only")
        elif not r.classic:
            out.append(f"{h}: native form only")
        elif max(r.native) > min(r.classic):
            out.append(f"{h}: the classic form comes before the native one")
        elif not re.search(r"\bor\b", text[max(r.native) : min(r.classic)]):
            out.append(f"{h}: no `or` between the native form and the classic fallback")
    return out


def rule_exprs() -> list[tuple[str, str]]:
    out = []
    for path in RULE_FILES:
        for g in yaml.safe_load(path.read_text())["groups"]:
            for r in g["rules"]:
                out.append((f"{path.name}: {r.get('record') or r.get('alert')}", r["expr"]))
    doc = yaml.safe_load(PROMETHEUSRULE.read_text())
    for g in doc["spec"]["groups"]:
        for r in g["rules"]:
            out.append((f"PrometheusRule: {r.get('record') or r.get('alert')}", r["expr"]))
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        for v in dash["templating"]["list"]:
            q = v.get("query")
            if isinstance(q, dict) and q.get("query"):
                out.append((f"{path.stem}: variable {v['name']}", q["query"]))
        panels = [*dash["panels"], *(c for p in dash["panels"] for c in p.get("panels", []))]
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"{path.stem}: {p['title']}", t["expr"]))
    return out


def test_the_checker_tells_the_forms_apart() -> None:
    classic = "histogram_quantile(0.5, sum by (le) (rate(edgeprobe_rtt_seconds_bucket[5m])))"
    native = "histogram_quantile(0.5, sum(rate(edgeprobe_rtt_seconds[5m])))"
    assert form_problems(classic) == ["edgeprobe_rtt_seconds: classic form only"]
    assert form_problems(native) == ["edgeprobe_rtt_seconds: native form only"]
    assert form_problems(f"{classic} or {native}") == [
        "edgeprobe_rtt_seconds: the classic form comes before the native one"
    ]
    assert form_problems(f"{native} and {classic}") == [
        "edgeprobe_rtt_seconds: no `or` between the native form and the classic fallback"
    ]
    assert form_problems(f"{native}\nor\n{classic}") == []
    # Label values and comments are not reads; gauges and summaries are not histograms.
    assert (
        form_problems(
            '# edgeprobe_rtt_seconds_bucket{le="0.6"}\nup{job="edgeprobe_rtt_seconds_count[5m]"}'
        )
        == []
    )
    assert not histogram_reads("edgeprobe_rtt_recent_seconds_count[5m]")


def test_every_histogram_read_in_rules_and_alerts_has_both_forms() -> None:
    exprs = rule_exprs()
    reading = [(w, e) for w, e in exprs if histogram_reads(e)]
    # The RTT quantiles, the SLI and its events, the route's connects and RTT, the no-data alert
    # (each twice: rule files and PrometheusRule).
    assert len(reading) >= 2 * 15, [w for w, _ in reading]
    problems = [f"{w}: {p}" for w, e in reading for p in form_problems(e)]
    assert not problems, "\n".join(problems)


def test_every_histogram_read_in_dashboards_has_both_forms() -> None:
    exprs = dashboard_exprs()
    reading = {w.split(": ", 1)[1] for w, e in exprs if histogram_reads(e)}
    assert {
        "RTT distribution",
        "Connect phases (stacked)",
        "Event loop lag p99",
        "Scheduler: late and skipped ticks",
    } <= reading
    problems = [f"{w}: {p}" for w, e in exprs for p in form_problems(e)]
    assert not problems, "\n".join(problems)


# -- live: one native-histogram Prometheus, a native and a classic exporter -------------------
NATIVE_REGION, CLASSIC_REGION = "rn", "rc"
# What each scrape adds (so every rate is steady): RTTs around 40 ms, connects of which 2 in 10
# miss the budget (one of them failed: +Inf), phases, scheduler lateness and loop lag.
RTTS = tuple(0.030 + 0.0005 * i for i in range(40))
CONNECTS = (0.21, 0.25, 0.28, 0.31, 0.35, 0.42, 0.47, 0.55, 0.9, math.inf)
PHASES = {"dns": (0.004, 0.006), "tcp": (0.04, 0.05), "tls": (0.09, 0.1)}
LATENESS = (0.0002, 0.0004, 0.003)


def exact_quantile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def histogram(
    name: str,
    series: Iterable[tuple[dict[str, str], Sequence[float]]],
    bounds: Sequence[float],
    native: bool,
) -> Metric:
    """A histogram family as the agent exports it: classic buckets (+Inf, count, sum), and in
    the native exporter the native buckets beside them."""
    fam = Metric(name, "test histogram", "histogram")
    for labels, values in series:
        finite = sum(v for v in values if v < math.inf)
        if native:
            nb = NativeBuckets()
            for v in values:
                nb.observe(v)
            fam.samples.append(
                Sample(name, labels, 0.0, None, None, nb.sample(count=len(values), total=finite))
            )
        for b in bounds:
            fam.add_sample(
                f"{name}_bucket", {**labels, "le": repr(b)}, float(sum(v <= b for v in values))
            )
        fam.add_sample(f"{name}_bucket", {**labels, "le": "+Inf"}, float(len(values)))
        fam.add_sample(f"{name}_count", labels, float(len(values)))
        fam.add_sample(f"{name}_sum", labels, finite)
    return fam


def families(region: str, scrapes: int, native: bool) -> list[Metric]:
    """The exporter's families after ``scrapes`` scrapes: each added the observations above.
    Edge ``a`` answers; edge ``dark`` sends packets and never gets an answer."""

    def per(lbl: dict[str, str], base: Sequence[float]) -> tuple[dict[str, str], list[float]]:
        return lbl, list(base) * scrapes

    a_icmp = {"region": region, "edge": "a", "probe": "icmp"}
    dark = {"region": region, "edge": "dark", "probe": "icmp"}
    a_connect = {"region": region, "edge": "a", "probe": "connect"}
    sent = Metric("edgeprobe_packets_sent", "test counter", "counter")
    sent.add_sample("edgeprobe_packets_sent_total", dark, 5.0 * scrapes)
    return [
        histogram(
            "edgeprobe_rtt_seconds", [per(a_icmp, RTTS), per(dark, ())], LEAN_RTT_BUCKETS, native
        ),
        sent,
        # The webrtc probe's connects too (same distribution): the measured-vs-model rules.
        histogram(
            "edgeprobe_connect_duration_seconds",
            [per(a_connect, CONNECTS), per({**a_connect, "probe": "webrtc"}, CONNECTS)],
            LEAN_DURATION_BUCKETS,
            native,
        ),
        # Lean: no classic buckets on phase histograms.
        histogram(
            "edgeprobe_connect_phase_duration_seconds",
            [per({**a_connect, "phase": p}, v) for p, v in PHASES.items()],
            (),
            native,
        ),
        histogram(
            "edgeprobe_scheduler_lateness_seconds",
            [per({"region": region}, LATENESS)],
            catalog.SCHEDULER_BUCKETS,
            native,
        ),
        histogram(
            "edgeprobe_event_loop_lag_seconds",
            [per({"region": region}, LATENESS)],
            catalog.SCHEDULER_BUCKETS,
            native,
        ),
    ]


class _Fixed(Collector):
    def __init__(self, fams: list[Metric]) -> None:
        self.fams = fams

    def collect(self) -> Iterable[Metric]:
        return self.fams


@pytest.fixture
async def exporters() -> AsyncIterator[dict[str, tuple[int, list[str]]]]:
    """region -> (port, Accept headers seen). The native exporter answers protobuf when asked;
    the classic one always answers in the text format (as the agent does for text scrapers)."""
    runners = []
    out: dict[str, tuple[int, list[str]]] = {}
    for region, native in ((NATIVE_REGION, True), (CLASSIC_REGION, False)):
        seen: list[str] = []

        async def metrics(
            request: web.Request,
            region: str = region,
            native: bool = native,
            seen: list[str] = seen,
        ) -> web.Response:
            accept = request.headers.get("Accept", "")
            seen.append(accept)
            fams = families(region, len(seen), native)
            if native and accepts_protobuf(accept):
                return web.Response(body=encode(fams), headers={"Content-Type": CONTENT_TYPE})
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Fixed(fams))
            return web.Response(
                body=generate_latest(registry),
                headers={"Content-Type": "text/plain; version=0.0.4"},
            )

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner, port = await serve_app(app)
        runners.append(runner)
        out[region] = (port, seen)
    yield out
    for runner in runners:
        await runner.cleanup()


def by_region(result: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for srs in result:
        out.setdefault(srs["metric"].get("region", ""), []).append(srs)
    return out


def value(srs: dict[str, Any]) -> float:
    return float(srs["value"][1])


def classic_bucket(bounds: Sequence[float], v: float) -> tuple[float, float]:
    i = bisect.bisect_left(bounds, v)
    return (bounds[i - 1] if i else 0.0), (bounds[i] if i < len(bounds) else math.inf)


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus")
async def test_rules_and_dashboards_in_both_modes(
    exporters: dict[str, tuple[int, list[str]]], tmp_path: Path
) -> None:
    config = yaml.safe_dump(
        {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in RULE_FILES],
            "scrape_configs": [
                {
                    "job_name": "edgeprobe",
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{port}" for port, _ in exporters.values()]}
                    ],
                }
            ],
        }
    )
    recorded = {r["record"]: r["expr"] for r in shipped_rules() if "record" in r}
    reading = sorted(n for n, e in recorded.items() if histogram_reads(e))
    alerts = {r["alert"]: r["expr"] for r in shipped_rules() if "alert" in r}
    # The alerts that read a histogram, each with its scenario below.
    assert {a for a, e in alerts.items() if histogram_reads(e)} == {"EdgeprobeTargetNoData"}

    regions = {NATIVE_REGION, CLASSIC_REGION}
    with prometheus(tmp_path, config) as prom:
        base = prom.url
        async with aiohttp.ClientSession() as s:
            missing: list[str] = reading
            for _ in range(80):  # bounded: 40 s
                await asyncio.sleep(0.5)
                try:
                    missing = [
                        n
                        for n in reading
                        if set(by_region(await query(s, base, f"{n} >= 0"))) != regions
                    ]
                except aiohttp.ClientError:
                    continue
                if not missing:
                    break
            assert prom.proc.poll() is None, prom.text()
            assert not missing, f"no data for both regions: {missing}"
            # The two paths are what they claim: only native series in rn, only classic in rc.
            assert accepts_protobuf(exporters[NATIVE_REGION][1][-1])
            stored = by_region(await query(s, base, '{__name__=~"edgeprobe_rtt_seconds.*"}'))
            assert {srs["metric"]["__name__"] for srs in stored[NATIVE_REGION]} == {
                "edgeprobe_rtt_seconds"
            }
            assert "histogram" in stored[NATIVE_REGION][0]
            assert "edgeprobe_rtt_seconds" not in {
                srs["metric"]["__name__"] for srs in stored[CLASSIC_REGION]
            }

            # Quantiles against the exact ones: native within 2 %, classic within its bucket.
            for name, q in (
                ("region_edge:edgeprobe_rtt_seconds:p50_5m", 0.5),
                ("region_edge:edgeprobe_rtt_seconds:p95_5m", 0.95),
                ("region_edge:edgeprobe_rtt_seconds:p99_5m", 0.99),
                ("region_edge:edgeprobe_route_rtt_seconds:p95_1h", 0.95),
            ):
                got = {r: value(v[0]) for r, v in by_region(await query(s, base, name)).items()}
                want = exact_quantile(RTTS, q)
                print(
                    f"{name}: exact {want * 1e3:.2f} ms, native {got[NATIVE_REGION] * 1e3:.2f}"
                    f" ms, classic {got[CLASSIC_REGION] * 1e3:.2f} ms"
                )
                assert abs(got[NATIVE_REGION] / want - 1) < 0.02, (name, got, want)
                lo, hi = classic_bucket(LEAN_RTT_BUCKETS, want)
                assert lo <= got[CLASSIC_REGION] <= hi, (name, got, want, lo, hi)
            # The SLI: 8 of 10 connects within 0.6 s, in both forms (no connect near 0.6).
            for w in ("5m", "30m", "1h", "6h", "3d"):
                got = {
                    r: value(v[0])
                    for r, v in by_region(
                        await query(
                            s, base, f"region_edge:edgeprobe_connect_within_budget:ratio_rate{w}"
                        )
                    ).items()
                }
                assert got == pytest.approx({NATIVE_REGION: 0.8, CLASSIC_REGION: 0.8}, abs=1e-9), (
                    w,
                    got,
                )
            # Connect counts: from the histogram in both forms, not from a fallback.
            for name in (
                "region_edge:edgeprobe_connect_sli_events:increase5m",
                "region_edge:edgeprobe_route_connects:increase1h",
            ):
                got = {
                    r: value(v[0])
                    for r, v in by_region(await query(s, base, f'{name}{{edge="a"}}')).items()
                }
                assert set(got) == regions and min(got.values()) >= len(CONNECTS), (name, got)
            # The no-data alert: the silent edge, in both forms, and nothing else.
            nodata = {
                (srs["metric"]["region"], srs["metric"]["edge"])
                for srs in await query(s, base, alerts["EdgeprobeTargetNoData"])
            }
            assert nodata == {(NATIVE_REGION, "dark"), (CLASSIC_REGION, "dark")}

            # Every dashboard query that reads a histogram returns data for each region alone.
            empty = []
            for where, expr in dashboard_exprs():
                if not histogram_reads(expr):
                    continue
                for region in sorted(regions):
                    e = substitute(expr, region=region)
                    if not await query(s, base, e):
                        empty.append(f"{where} [{region}]: {e}")
            assert not empty, "\n".join(empty)
            phases = await query(
                s,
                base,
                substitute(
                    next(e for w, e in dashboard_exprs() if w.endswith("Connect phases (stacked)")),
                    region=NATIVE_REGION,
                ),
            )
            got = {srs["metric"]["phase"]: value(srs) for srs in phases}
            assert got == pytest.approx({p: sum(v) / len(v) for p, v in PHASES.items()})
