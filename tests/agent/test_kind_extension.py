"""Adding a probe kind is one module plus one line in ``PROBES``: two toy kinds, registered
here and nowhere in the package, go through the whole agent (config decoding with their own
options, the scheduler, their shared resource, series stats, the failure hook and /metrics
over HTTP) without a change to the agent."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.app import Agent
from agent.config import load as cfgmod
from agent.config.decode import ConfigError
from agent.server.http import build_app, serve
from lab.procs import free_port
from probes import PROBES
from probes.base import (
    CommonOptions,
    Counters,
    ProbeContext,
    ProbeKind,
    ProbeResult,
    Target,
)


class Tally:
    """A toy shared resource: one per agent, counting the runs of each (kind, target)."""

    def __init__(self) -> None:
        self.runs: dict[tuple[str, str], int] = {}
        self.region = ""
        self.targets: set[str] = set()
        self.opened = 0
        self.closed = False

    @classmethod
    def create(cls, counters: Counters) -> Self:
        return cls()

    def configure(self, settings: Any, targets: Collection[str]) -> None:
        self.region = settings.region
        self.targets = set(targets)

    def open(self) -> None:
        self.opened += 1

    def info(self) -> Mapping[str, str]:
        return {}

    def close(self) -> None:
        self.closed = True

    def count(self, kind: str, target: Target) -> None:
        key = (kind, target.name)
        self.runs[key] = self.runs.get(key, 0) + 1


@dataclass(frozen=True)
class ToyOptions(CommonOptions):
    word: str = "hello"

    def validate(self) -> list[str]:
        errs = super().validate()
        if not self.word:
            errs.append("word: must not be empty")
        return errs


async def toy_run(target: Target, opts: ToyOptions, ctx: ProbeContext) -> ProbeResult:
    tally = ctx.resources.get(Tally)
    assert tally is not None
    tally.count("toy", target)
    gauges = {"toy_word_length": float(len(opts.word))}
    if opts.word == "fail":
        return ProbeResult.failure("toy_refused", 0.001, gauges=gauges)
    return ProbeResult(success=True, duration=0.001, gauges=gauges)


async def watch_run(target: Target, opts: CommonOptions, ctx: ProbeContext) -> ProbeResult:
    tally = ctx.resources.get(Tally)
    assert tally is not None
    tally.count("toywatch", target)
    return ProbeResult(success=True, duration=0.001)


TOY = ProbeKind(
    name="toy",
    options=ToyOptions,
    run=toy_run,
    reasons=("toy_refused",),
    gauges={"toy_word_length": "Letters in the toy kind's word."},
    needs=(Tally,),
)
# Runs on a long interval, and once more whenever another series of its target starts failing.
WATCH = ProbeKind(
    name="toywatch",
    options=CommonOptions,
    run=watch_run,
    needs=(Tally,),
    run_on_target_failure=True,
)

CONFIG = """
agent: {region: toy-land}
defaults:
  toy: {interval: 100ms, timeout: 50ms}
  toywatch: {interval: 1h, timeout: 50ms}
targets:
  - {name: good, address: 127.0.0.1, probes: {toy: {word: hello}, toywatch: {}}}
  - {name: bad, address: 127.0.0.2, probes: {toy: {word: fail}, toywatch: {}}}
"""


@pytest.fixture
def toy_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    # The one line a new kind adds to probes/__init__.py.
    monkeypatch.setitem(PROBES, "toy", TOY)
    monkeypatch.setitem(PROBES, "toywatch", WATCH)


def test_config_decodes_the_toy_options(toy_kinds: None) -> None:
    cfg = cfgmod.loads(CONFIG)
    opts = {(j.target.name, j.kind): j.options for j in cfg.jobs}
    assert opts[("bad", "toy")] == ToyOptions(interval=0.1, timeout=0.05, word="fail")
    assert opts[("good", "toywatch")].interval == 3600
    with pytest.raises(ConfigError, match=r"targets\[0\]\.probes\.toy\.wrod: unknown key"):
        cfgmod.loads(
            "agent: {region: r}\ntargets:\n"
            "  - {name: t, address: 127.0.0.1, probes: {toy: {wrod: x}}}\n"
        )
    with pytest.raises(ConfigError, match="word: must not be empty"):
        cfgmod.loads(
            "agent: {region: r}\ntargets:\n"
            "  - {name: t, address: 127.0.0.1, probes: {toy: {word: ''}}}\n"
        )


async def test_a_toy_kind_runs_through_the_whole_agent(toy_kinds: None, tmp_path: Path) -> None:
    path = tmp_path / "edgeprobe.yml"
    path.write_text(CONFIG)
    agent = Agent(cfgmod.load(path), path)
    tally = agent.resources.get(Tally)
    assert tally is not None and tally.region == "toy-land"
    assert tally.targets == {"127.0.0.1", "127.0.0.2"}
    port = free_port()
    runner = await serve(build_app(agent), f"127.0.0.1:{port}")
    await agent.start()
    try:
        assert tally.opened == 1  # once, though two configured kinds need it
        for _ in range(100):  # at most 5 s
            if min(tally.runs.get(("toy", "good"), 0), tally.runs.get(("toy", "bad"), 0)) >= 5:
                break
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
            assert r.status == 200
            text = await r.text()
    finally:
        await agent.stop(1.0)
        await runner.cleanup()
    assert tally.closed

    # The scheduler ran both series of the toy kind at its rate, with their own options.
    assert tally.runs[("toy", "good")] >= 5 and tally.runs[("toy", "bad")] >= 5
    # The failure hook: "bad" started failing once, so its watcher ran once, out of band;
    # "good" never failed, and an hourly tick does not come within the test.
    assert tally.runs.get(("toywatch", "bad")) == 1
    assert ("toywatch", "good") not in tally.runs

    m = {
        (smp.name, tuple(sorted(smp.labels.items()))): smp.value
        for fam in text_string_to_metric_families(text)
        for smp in fam.samples
    }

    def get(name: str, **labels: str) -> float:
        want = set(labels.items())
        hits = [v for (n, lbl), v in m.items() if n == name and want <= set(lbl)]
        assert len(hits) == 1, (name, labels, hits)
        return hits[0]

    assert get("edgeprobe_probe_success", edge="good", probe="toy") == 1
    assert get("edgeprobe_probe_success", edge="bad", probe="toy") == 0
    assert get("edgeprobe_probe_errors_total", edge="bad", probe="toy", reason="toy_refused") >= 5
    assert get("edgeprobe_toy_word_length", edge="good", probe="toy") == 5
    assert get("edgeprobe_toy_word_length", edge="bad", probe="toy") == 4
    assert get("edgeprobe_probe_success", edge="bad", probe="toywatch") == 1
