"""The metric catalog is the one list: docs/metrics.md is generated from it, everything the agent
exports is declared in it, and what a target costs per kind is what the catalog says."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from agent import config as cfgmod
from agent.app import Agent
from agent.export import catalog
from probes import PROBES
from probes.base import HopResult, ProbeResult

ROOT = Path(__file__).resolve().parent.parent


def test_docs_metrics_is_generated_from_the_catalog() -> None:
    want = catalog.markdown(PROBES)
    assert (ROOT / "docs" / "metrics.md").read_text() == want, (
        "docs/metrics.md is stale: python -m agent.export.catalog > docs/metrics.md")


def full_result(kind: str) -> ProbeResult:
    """A result that fills every family the kind can emit."""
    k = PROBES[kind]
    return ProbeResult(
        success=True, rtts=[0.01, None, 0.012] if k.packet_based else [],
        phases={p: 0.01 for p in k.phases},
        gauges={g: 1.0 for g in k.gauges},
        info={key: "x" for key in k.info_labels},
        hops=[HopResult(i, [0.001, None]) for i in range(1, 4)] if k.per_hop else None)


def series_by_kind(text: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if "edge" in s.labels:
                out[s.labels["probe"]] += 1
    return out


def test_every_exported_family_is_in_the_catalog_and_costs_what_it_says() -> None:
    kinds = list(PROBES)
    cfg = cfgmod.loads(
        "agent: {region: r, labels: {agent: a1}}\ntargets:\n"
        f"  - {{name: e1, address: 127.0.0.1, probes: [{', '.join(kinds)}], labels: {{t: x}}}}\n")
    agent = Agent(cfg)
    agent.state.series = agent._views_for(cfg, None, True)
    for job in cfg.jobs:
        agent._record(job, full_result(job.kind))
    text = b"".join(agent.render_metrics()).decode()
    declared = set(catalog.walk_names()) | {
        f"edgeprobe_{g}" for k in PROBES.values() for g in k.gauges}
    exported = {f.name for f in text_string_to_metric_families(text)
                if f.name.startswith("edgeprobe_")}
    assert exported - declared == set()
    counts = {"rtt": len(cfg.metrics.rtt), "duration": len(cfg.metrics.durations),
              **catalog.fixed_bucket_counts()}
    got = series_by_kind(text)
    for kind in kinds:
        assert got[kind] == catalog.series_per_target(PROBES[kind], counts, hops=3), kind


async def test_a_live_icmp_target_costs_what_the_catalog_says(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text("agent: {region: r}\ndefaults: {icmp: {interval: 200ms, packets: 3, "
                    "spacing: 10ms, timeout: 100ms}}\ntargets:\n"
                    "  - {name: e1, address: 127.0.0.1}\n")
    agent = Agent(cfgmod.load(path), path)
    await agent.start()
    try:
        await asyncio.sleep(1.0)
        text = b"".join(agent.render_metrics()).decode()
    finally:
        await agent.stop(1.0)
    counts = {"rtt": len(agent.config.metrics.rtt), "duration": len(agent.config.metrics.durations),
              **catalog.fixed_bucket_counts()}
    want = catalog.series_per_target(PROBES["icmp"], counts)
    assert series_by_kind(text)["icmp"] == want
