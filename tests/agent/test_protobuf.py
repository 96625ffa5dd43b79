"""The protobuf exposition format and native histograms: the committed module is what the .proto
generates, the bucket maths matches Prometheus' definition, and a real Prometheus (Debian's 2.42,
`--enable-feature=native-histograms`) asks for the format, scrapes it and answers
`histogram_quantile` and `histogram_fraction` within 2 % of the exact values."""

from __future__ import annotations

import asyncio
import math
import random
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

from agent.export import metrics_pb2 as pb
from agent.export.native import NativeBuckets, bucket_key
from agent.export.protobuf import CONTENT_TYPE, accepts_protobuf, encode
from lab.procs import free_port
from tests.helpers import ROOT, prometheus, query, serve_app

PROTO = ROOT / "agent" / "export" / "metrics.proto"


def test_committed_module_is_what_the_proto_generates(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    out = tmp_path / "out"
    (out / "agent" / "export").mkdir(parents=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            str(PROTO.relative_to(ROOT)),
        ],
        check=True,
        cwd=ROOT,
    )
    for name in ("metrics_pb2.py", "metrics_pb2.pyi"):
        assert (out / "agent" / "export" / name).read_text() == (PROTO.parent / name).read_text(), (
            f"{name} is stale: run `make proto` and commit it"
        )


@given(st.floats(min_value=1e-9, max_value=1e6, allow_nan=False), st.integers(-4, 8))
def test_bucket_key_matches_the_definition(value: float, schema: int) -> None:
    # Bucket i holds (2**((i-1)/2**s), 2**(i/2**s)]; checked in log space away from the bounds,
    # where float rounding cannot decide.
    key = bucket_key(value, schema)
    exact = math.log2(value) * 2.0**schema
    if abs(exact - round(exact)) > 1e-6:
        assert key == math.ceil(exact)


def test_bucket_key_on_the_bounds() -> None:
    # A power of two closes bucket power * 2**schema (schema >= 0) or, coarser, the bucket whose
    # range ends at or above it: ceil(power / 2**-schema).
    for schema in (-2, 0, 3, 6):
        for power in (-10, -1, 0, 1, 7):
            want = power * 2**schema if schema >= 0 else -((-power) >> -schema)
            assert bucket_key(2.0**power, schema) == want
    assert bucket_key(1.0, 6) == 0
    assert bucket_key(2.0, 6) == 64
    assert bucket_key(0.5, 6) == -64


def test_coarsening_keeps_counts() -> None:
    h = NativeBuckets(max_buckets=10)
    values = [1.001**i for i in range(5000)]
    for v in values:
        h.observe(v)
    assert len(h.counts) <= 10
    assert sum(h.counts.values()) == len(values)
    for v in values[::97]:
        assert bucket_key(v, h.schema) in h.counts


def test_spans_and_deltas() -> None:
    h = NativeBuckets(schema=0)
    for v in (1.0, 1.5, 1.5, 8.0, 0.0):
        h.observe(v)
    s = h.sample(count=5, total=12.0)
    # Keys 0, 1, 1 then 3: spans (0,2) and a gap of one to (1,1); deltas against the previous.
    assert [(x.offset, x.length) for x in s.pos_spans or ()] == [(0, 2), (1, 1)]
    assert list(s.pos_deltas or ()) == [1, 1, -1]
    assert s.zero_count == 1
    empty = NativeBuckets().sample(count=0, total=0.0)
    assert [(x.offset, x.length) for x in empty.pos_spans or ()] == [(0, 0)]


def test_accept_negotiation() -> None:
    prom = (
        "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;"
        "encoding=delimited;q=0.7,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
    )
    assert accepts_protobuf(prom)
    assert not accepts_protobuf("text/plain;version=0.0.4;q=1,*/*;q=0.1")
    assert not accepts_protobuf("*/*")
    assert not accepts_protobuf(prom.replace("delimited", "text"))


def _decode(body: bytes) -> list[pb.MetricFamily]:
    out = []
    pos = 0
    while pos < len(body):
        n = shift = 0
        while True:
            b = body[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        out.append(pb.MetricFamily.FromString(body[pos : pos + n]))
        pos += n
    return out


def rtt_family(paths: dict[str, list[float]], bounds: tuple[float, ...]) -> Metric:
    fam = Metric("edgeprobe_rtt_seconds", "Round-trip time.", "histogram")
    for edge, values in paths.items():
        h = NativeBuckets()
        for v in values:
            h.observe(v)
        labels = {"edge": edge}
        nh = h.sample(count=len(values), total=sum(values))
        fam.samples.append(Sample("edgeprobe_rtt_seconds", labels, 0.0, None, None, nh))
        for b in bounds:
            fam.add_sample(
                "edgeprobe_rtt_seconds_bucket",
                {**labels, "le": repr(b)},
                float(sum(v <= b for v in values)),
            )
        fam.add_sample("edgeprobe_rtt_seconds_bucket", {**labels, "le": "+Inf"}, len(values))
        fam.add_sample("edgeprobe_rtt_seconds_count", labels, len(values))
        fam.add_sample("edgeprobe_rtt_seconds_sum", labels, sum(values))
    return fam


def test_round_trip_of_every_type() -> None:
    c = CounterMetricFamily("edgeprobe_packets_sent", "Packets sent.", labels=["edge"])
    c.add_metric(["a"], 7)
    g = GaugeMetricFamily("edgeprobe_up", "Up.", labels=["edge"])
    g.add_metric(['a\n"b'], 1)
    fams = _decode(encode([c, g, rtt_family({"a": [0.01, 0.02, 0.7]}, (0.05, 0.6))]))
    assert [f.name for f in fams] == [
        "edgeprobe_packets_sent_total",
        "edgeprobe_up",
        "edgeprobe_rtt_seconds",
    ]
    assert fams[0].metric[0].counter.value == 7
    assert fams[1].metric[0].label[0].value == 'a\n"b'  # no escaping needed in protobuf
    h = fams[2].metric[0].histogram
    assert h.sample_count == 3 and [b.cumulative_count for b in h.bucket] == [2, 2]
    assert h.schema == 6 and sum(h.positive_delta) >= 0 and len(h.positive_span) >= 1


TRUTH: dict[str, list[float]] = {}


def paths() -> dict[str, list[float]]:
    """Seeded RTT samples: a near, a far and a jittery lossy path's survivors."""
    if not TRUTH:
        rnd = random.Random(14)
        TRUTH["near"] = [0.002 * math.exp(rnd.gauss(0, 0.15)) for _ in range(5000)]
        TRUTH["far"] = [0.180 + rnd.expovariate(1 / 0.004) for _ in range(5000)]
        TRUTH["lossy"] = [0.060 * math.exp(rnd.gauss(0, 0.4)) for _ in range(3000)]
    return TRUTH


def exact_quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


@pytest.fixture
async def exporter() -> AsyncIterator[tuple[int, list[str]]]:
    accepts: list[str] = []
    body = encode([rtt_family(paths(), (0.001, 0.01, 0.1, 0.6, 1.0))])

    async def metrics(request: web.Request) -> web.Response:
        accept = request.headers.get("Accept", "")
        accepts.append(accept)
        if accepts_protobuf(accept):
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
        return web.Response(status=406)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner, port = await serve_app(app)
    yield port, accepts
    await runner.cleanup()


def scraping(port: int) -> str:
    """A prometheus.yml that scrapes 127.0.0.1:``port`` every second."""
    return f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: agent
    static_configs: [{{targets: ['127.0.0.1:{port}']}}]
"""


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus")
async def test_prometheus_scrapes_native_histograms(
    exporter: tuple[int, list[str]], tmp_path: Path
) -> None:
    port, accepts = exporter
    with prometheus(tmp_path, scraping(port)) as prom:
        base = prom.url
        async with aiohttp.ClientSession() as s:
            medians: list[dict[str, Any]] = []
            for _ in range(60):  # bounded: 30 s
                await asyncio.sleep(0.5)
                try:
                    medians = await query(s, base, "histogram_quantile(0.5, edgeprobe_rtt_seconds)")
                except aiohttp.ClientError:
                    continue
                if len(medians) == 3:
                    break
            assert len(medians) == 3, f"no native histograms scraped; Accept seen: {accepts[:1]}"
            assert accepts and accepts_protobuf(accepts[-1])
            for series in medians:
                edge = series["metric"]["edge"]
                got = float(series["value"][1])
                want = exact_quantile(paths()[edge], 0.5)
                print(
                    f"native median {edge}: {got * 1e3:.3f} ms vs exact {want * 1e3:.3f} ms "
                    f"({(got / want - 1) * 100:+.2f} %)"
                )
                assert abs(got / want - 1) < 0.02, (edge, got, want)
            within = await query(s, base, "histogram_fraction(0, 0.1, edgeprobe_rtt_seconds)")
            for series in within:
                edge = series["metric"]["edge"]
                want = sum(v <= 0.1 for v in paths()[edge]) / len(paths()[edge])
                assert abs(float(series["value"][1]) - want) < 0.02, (edge, series, want)


AGENT_CONFIG = """
agent: {region: id-jakarta}
defaults:
  icmp: {interval: 200ms, packets: 3, spacing: 10ms, timeout: 150ms}
targets:
  - {name: edge-1, address: 127.0.0.1}
  - {name: edge-2, address: 127.0.0.1}
"""


@pytest.mark.skipif(
    shutil.which("prometheus") is None or not shutil.which("ip"), reason="needs Debian's prometheus"
)
async def test_agent_serves_native_histograms_to_prometheus(tmp_path: Path) -> None:
    """A live agent probing loopback: Prometheus asks for protobuf and gets native RTT buckets,
    whose median agrees with the agent's exact window median within 2 %; a text scraper still
    gets the text format."""
    from agent.app import Agent
    from agent.config import load as cfgmod
    from agent.server.http import build_app, serve

    path = tmp_path / "edgeprobe.yml"
    path.write_text(AGENT_CONFIG)
    agent = Agent(cfgmod.load(path), path)
    port = free_port()
    runner = await serve(build_app(agent), f"127.0.0.1:{port}")
    await agent.start()
    try:
        with prometheus(tmp_path, scraping(port)) as prom:
            base = prom.url
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                    assert r.headers["Content-Type"].startswith("text/plain")
                    assert "edgeprobe_rtt_seconds_bucket" in await r.text()
                async with s.get(
                    f"http://127.0.0.1:{port}/metrics", headers={"Accept": CONTENT_TYPE}
                ) as r:
                    assert r.headers["Content-Type"] == CONTENT_TYPE
                    names = {f.name for f in _decode(await r.read())}
                assert {
                    "edgeprobe_rtt_seconds",
                    "edgeprobe_packets_sent_total",
                    "edgeprobe_scheduler_lateness_seconds",
                } <= names
                await asyncio.sleep(6)  # ~90 packets per edge, all inside the 60 s window
                both: list[dict[str, Any]] = []
                for _ in range(40):  # bounded: 20 s
                    both = await query(
                        s,
                        base,
                        """
                      histogram_quantile(0.5, edgeprobe_rtt_seconds)
                      / on (edge) edgeprobe_rtt_recent_seconds{quantile="0.5"}""",
                    )
                    if len(both) == 2:
                        break
                    await asyncio.sleep(0.5)
                assert len(both) == 2, both
                for series in both:
                    ratio = float(series["value"][1])
                    print(f"native/exact median {series['metric']['edge']}: {ratio:.4f}")
                    assert abs(ratio - 1) < 0.02, series
                within = await query(s, base, "histogram_fraction(0, 0.6, edgeprobe_rtt_seconds)")
                assert [float(x["value"][1]) for x in within] == [1.0, 1.0]
                # What one target costs the server: the catalog's native figure, counted in the
                # TSDB.
                from agent.export import catalog
                from probes import PROBES

                m = agent.config.metrics
                want = catalog.series_per_target(
                    PROBES["icmp"],
                    catalog.bucket_counts(len(m.rtt), len(m.durations), len(m.phases)),
                    native=True,
                )
                stored = await query(
                    s, base, 'count by (edge) ({__name__=~"edgeprobe_.+", probe="icmp", edge!=""})'
                )
                assert sorted(int(x["value"][1]) for x in stored) == [want, want]
    finally:
        await agent.stop(1.0)
        await runner.cleanup()


def test_the_window_summary_carries_the_cumulative_count_and_sum() -> None:
    """A summary's _count and _sum are counters: the window summary's Summary message has the
    RTT histogram's cumulative count and sum (the window's own would go down as packets leave
    it), and its quantiles are the window's."""
    import time

    from bench.export import filled_agent

    agent = filled_agent(2)
    # A minute of results has left the window; two newer packets are all it holds.
    for v in agent.state.series.values():
        assert v.stats.packets is not None
        v.stats.packets.window.prune(time.monotonic() + 3600)
        v.stats.packets.window.add(time.monotonic(), [0.02, 0.03])
    fams = {f.name: f for f in _decode(b"".join(agent.render_metrics_protobuf()))}
    recent, rtt = fams["edgeprobe_rtt_recent_seconds"], fams["edgeprobe_rtt_seconds"]
    assert recent.type == pb.SUMMARY and len(recent.metric) == len(rtt.metric) == 2
    for r, h in zip(recent.metric, rtt.metric, strict=True):
        assert list(r.label) == list(h.label)
        assert r.summary.sample_count == h.histogram.sample_count > 0
        assert r.summary.sample_sum == h.histogram.sample_sum
        assert [q.quantile for q in r.summary.quantile] == [0.5, 0.95, 0.99]
        assert r.summary.quantile[0].value == pytest.approx(0.025)  # the window's median
