"""The agent end to end in-process: real ICMP on loopback, /metrics scraped through aiohttp,
parsed with prometheus_client's parser and checked by a real `promtool check metrics`; reload
keeps series continuous."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.app import Agent
from agent.config import load as cfgmod
from agent.runtime.scheduler import stagger
from agent.server.http import build_app, serve
from lab.procs import free_port

pytestmark = pytest.mark.skipif(not shutil.which("ip"), reason="linux only")

CONFIG = """
agent: {{region: id-jakarta, labels: {{agent: a1}}}}
defaults:
  icmp: {{interval: {interval}, packets: 3, spacing: 10ms, timeout: 300ms}}
targets:
{targets}
"""


def write(path: Path, names: list[str], interval: str = "500ms", extra: str = "") -> None:
    targets = "\n".join(
        f"  - {{name: {n}, address: 127.0.0.1, labels: {{tier: near}}}}" for n in names
    )
    path.write_text(CONFIG.format(interval=interval, targets=targets) + extra)


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200
        text = await r.text()
    out = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            out[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    return out


def value(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, edge: str) -> float:
    for (n, labels), v in m.items():
        if n == name and ("edge", edge) in labels:
            return v
    raise KeyError((name, edge))


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Agent, str, Path]]:
    path = tmp_path / "edgeprobe.yml"
    write(path, ["edge-1", "edge-6"])
    agent = Agent(cfgmod.load(path), path)
    port = free_port()
    runner = await serve(build_app(agent), f"127.0.0.1:{port}")
    await agent.start()
    try:
        yield agent, f"http://127.0.0.1:{port}", path
    finally:
        await agent.stop(1.0)
        await runner.cleanup()


async def test_label_sets_exist_before_the_first_result(tmp_path: Path) -> None:
    # edge-8's first run is 97 % into a 10 s interval: the scrape comes long before it.
    # With metrics.detail: full, every error reason's series exists up front too.
    assert stagger(("edge-8", "icmp")) > 0.9
    path = tmp_path / "c.yml"
    write(path, ["edge-8"], interval="10s", extra="metrics: {detail: full}\n")
    agent = Agent(cfgmod.load(path), path)
    port = free_port()
    runner = await serve(build_app(agent), f"127.0.0.1:{port}")
    await agent.start()
    try:
        m = await scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        await agent.stop(0.5)
        await runner.cleanup()
    assert value(m, "edgeprobe_packets_sent_total", "edge-8") == 0
    assert value(m, "edgeprobe_packets_lost_total", "edge-8") == 0
    assert value(m, "edgeprobe_rtt_seconds_count", "edge-8") == 0
    errors = {dict(lbl)["reason"] for (n, lbl) in m if n == "edgeprobe_probe_errors_total"}
    assert {"timeout", "unreachable", "resolve_failed", "deadline", "exception"} <= errors
    strays = {
        dict(lbl)["reason"]: v
        for (n, lbl), v in m.items()
        if n == "edgeprobe_stray_packets_total" and dict(lbl)["probe"] == "icmp"
    }
    assert {"foreign", "late", "wrong_source", "bad_checksum", "malformed"} <= strays.keys()
    les = {dict(lbl)["le"] for (n, lbl) in m if n == "edgeprobe_rtt_seconds_bucket"}
    assert "0.6" in les and "+Inf" in les


async def test_metrics_parse_and_pass_promtool(running: tuple[Agent, str, Path]) -> None:
    _agent, url, _ = running
    await asyncio.sleep(1.2)
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "edgeprobe_rtt_seconds",
        "edgeprobe_rtt_recent_seconds",
        "edgeprobe_packets_sent",
        "edgeprobe_packets_lost",
        "edgeprobe_jitter_seconds",
        "edgeprobe_loss_periods",
        "edgeprobe_probe_runs",
        "edgeprobe_probe_success",
        "edgeprobe_event_loop_lag_seconds",
        "edgeprobe_scheduler_late_ticks",
        "edgeprobe_stray_packets",
        "edgeprobe_build_info",
        "edgeprobe_connect_budget_miss_probability",
        "edgeprobe_config_last_reload_successful",
    ):
        assert name in families, name
    # metrics.detail: full only.
    for name in (
        "edgeprobe_ipdv_seconds",
        "edgeprobe_loss_burst_length",
        "edgeprobe_loss_ratio_upper95",
        "edgeprobe_mos_estimate",
    ):
        assert name not in families, name
    sent = [s for s in families["edgeprobe_packets_sent"].samples if s.labels["edge"] == "edge-1"]
    assert sent[0].value >= 3
    assert sent[0].labels == {
        "region": "id-jakarta",
        "edge": "edge-1",
        "probe": "icmp",
        "agent": "a1",
        "tier": "near",
    }
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed")
    res = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == "" and res.stderr.strip() == "", res.stdout + res.stderr
    async with aiohttp.ClientSession() as s:
        for path, body in (("/-/healthy", "Healthy.\n"), ("/-/ready", "Ready.\n")):
            async with s.get(url + path) as r:
                assert (r.status, await r.text()) == (200, body)
        async with s.get(url + "/") as r:
            assert r.status == 200 and r.content_type == "text/html"
            assert "<h1>edgeprobe</h1>" in await r.text()


async def test_reload_keeps_series_continuous(running: tuple[Agent, str, Path]) -> None:
    agent, url, path = running
    await asyncio.sleep(1.2)
    before = await scrape(url + "/metrics")
    sent_before = value(before, "edgeprobe_packets_sent_total", "edge-1")
    assert sent_before > 0
    write(path, ["edge-1", "edge-10"])
    async with aiohttp.ClientSession() as s, s.post(url + "/-/reload") as r:
        assert r.status == 200
    after = await scrape(url + "/metrics")
    assert value(after, "edgeprobe_packets_sent_total", "edge-1") >= sent_before
    assert value(after, "edgeprobe_packets_sent_total", "edge-10") == 0
    with pytest.raises(KeyError):
        value(after, "edgeprobe_packets_sent_total", "edge-6")
    assert after[("edgeprobe_config_last_reload_successful", (("region", "id-jakarta"),))] == 1

    path.write_text("agent: {region: id-jakarta}\ntargets: [{name: x}]\n")
    async with aiohttp.ClientSession() as s, s.post(url + "/-/reload") as r:
        assert r.status == 500
        # No web config, so no authenticated caller: the details are in the log only.
        assert await r.text() == "Reload failed, running config kept; see the agent's log\n"
    failed = await scrape(url + "/metrics")
    assert failed[("edgeprobe_config_last_reload_successful", (("region", "id-jakarta"),))] == 0
    assert value(failed, "edgeprobe_packets_sent_total", "edge-1") >= sent_before
    assert {j.target.name for j in agent.config.jobs} == {"edge-1", "edge-10"}


async def test_budget_failure_triggers_a_path_run_once(tmp_path: Path) -> None:
    from probes.base import ProbeResult

    cfg = cfgmod.loads(
        "agent: {region: r}\ntargets:\n  - {name: e, address: 127.0.0.1, probes: [icmp, path]}\n"
    )
    agent = Agent(cfg)
    calls: list[tuple[str, str]] = []
    agent.scheduler.trigger = lambda key: calls.append(key) or True  # type: ignore[method-assign]
    icmp_job = cfg.jobs[0]
    agent._record(icmp_job, ProbeResult(success=True))
    agent._record(icmp_job, ProbeResult.failure("timeout"))
    agent._record(icmp_job, ProbeResult.failure("timeout"))  # still failing: no new trigger
    agent._record(icmp_job, ProbeResult(success=True))
    agent._record(icmp_job, ProbeResult.failure("timeout"))
    assert calls == [("e", "path"), ("e", "path")]


def test_fast_text_path_equals_the_registry() -> None:
    """/metrics renders per-target families straight from state; it must say exactly what the
    CollectorRegistry (prometheus_client's own generate_latest) says."""
    from prometheus_client import generate_latest

    from probes.base import HopResult, ProbeResult

    cfg = cfgmod.loads(
        'agent: {region: r, labels: {agent: "a\\"1"}}\ntargets:\n'
        "  - {name: e1, address: 127.0.0.1, probes: [icmp, path, connect], labels: {t: x}}\n"
        "  - {name: e2, address: 127.0.0.1, probes: [tls]}\n"
    )
    agent = Agent(cfg)
    agent.state.series = agent._views_for(cfg, None, True)
    for job in cfg.jobs:
        agent._record(
            job,
            ProbeResult(
                success=True,
                rtts=[0.01, None, 0.012],
                phases={"tcp": 0.01, "tls": 0.02},
                gauges={"path_hops": 7.0} if job.kind == "path" else {},
                info={"tls_version": "TLSv1.3"} if job.kind == "tls" else {},
                hops=[HopResult(1, [0.001, None])] if job.kind == "path" else None,
            ),
        )
    fast = b"".join(agent.render_metrics()).decode()
    slow = generate_latest(agent.registry).decode()

    def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }

    a, b = samples(fast), samples(slow)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a)  # NaN == NaN
    types_fast = {f.name: f.type for f in text_string_to_metric_families(fast)}
    types_slow = {f.name: f.type for f in text_string_to_metric_families(slow)}
    assert types_fast == types_slow
    assert 'agent="a\\"1"' in fast
