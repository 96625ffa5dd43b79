"""What tests of the lab share: ``requires_lab``, a world built from a profile of the test's own,
probe runs inside a region, reference implementations of jitter, IPDV and the Wilson bound, and
what the budget model expects of a lab path. The ``lab_world`` fixture is in
``tests/lab/conftest.py``."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from lab.topology import World, lab_available
from tests.helpers import ROOT

LAB_OK, LAB_WHY = lab_available()
requires_lab = pytest.mark.skipif(not LAB_OK, reason=f"lab unavailable: {LAB_WHY}")


def skip_without_lab() -> None:
    """Skips the calling test or fixture when this machine cannot build a lab."""
    if not LAB_OK:
        pytest.skip(f"lab unavailable: {LAB_WHY}")


@contextlib.contextmanager
def profile_world(tmp: Path, profile: str, *, services: bool, seed: int) -> Iterator[World]:
    """A world of the one region ``profile`` (a profile's YAML text) describes, its state under
    ``tmp``; always torn down."""
    skip_without_lab()
    prof = tmp / "profile.yaml"
    prof.write_text(profile)
    with World.up([str(prof)], state_dir=tmp / "state", services=services, seed=seed) as w:
        yield w


# Runs ``runs`` probes of one kind (``concurrency`` at a time) in a region's namespace; prints
# their results as JSON, each with the CLOCK_MONOTONIC window it ran in (to select its ground
# truth).
PROBE_RUNNER = r"""
import asyncio, dataclasses, json, sys, time
from probes import PROBES
from probes.base import ProbeContext, Target
a = json.loads(sys.argv[1])
k = PROBES[a["kind"]]
opts = k.options(**{n: tuple(v) if isinstance(v, list) else v for n, v in a["opts"].items()})
assert not opts.validate(), opts.validate()
async def main():
    sem = asyncio.Semaphore(a.get("concurrency", 1))
    async def one():
        async with sem:
            t0 = time.monotonic_ns()
            r = dataclasses.asdict(await k.run(Target("e", a["address"]), opts,
                                               ProbeContext(budget=0.6)))
            r["window"] = [t0, time.monotonic_ns()]
            return r
    return await asyncio.gather(*(one() for _ in range(a.get("runs", 1))))
print(json.dumps(asyncio.run(main())))
"""


def run_probes(
    w: World,
    kind: str,
    edge: str,
    opts: dict[str, Any],
    runs: int = 1,
    concurrency: int = 1,
    family: str = "ipv4",
) -> list[dict[str, Any]]:
    """``runs`` results of ``kind`` against ``edge`` from the world's one region."""
    (region,) = w.state.regions
    arg = json.dumps(
        {
            "kind": kind,
            "address": w.state.edges[edge][family],
            "opts": opts,
            "runs": runs,
            "concurrency": concurrency,
        }
    )
    p = w.run(region, [sys.executable, "-c", PROBE_RUNNER, arg], timeout=300, cwd=str(ROOT))
    assert p.returncode == 0, p.stderr[-3000:]
    out: list[dict[str, Any]] = json.loads(p.stdout)
    return out


def wilson(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z / d * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, c - h), min(1.0, c + h)


def rfc3550_jitter(rtts: Sequence[float | None]) -> float:
    """RFC 3550 §6.4.1 estimator over |RTT(i) - RTT(i-1)| of consecutive answered probes."""
    j = 0.0
    prev: float | None = None
    for r in rtts:
        if r is None:
            continue
        if prev is not None:
            j += (abs(r - prev) - j) / 16
        prev = r
    return j


def ipdv(rtts: Sequence[float | None]) -> list[float]:
    """|RTT(i) - RTT(i-1)| for consecutive sequence numbers that were both answered."""
    return [abs(b - a) for a, b in itertools.pairwise(rtts) if a is not None and b is not None]


def expected_miss(path: Mapping[str, Any]) -> tuple[float, float]:
    """(model miss probability, RTT) for a lab path, from its configured impairment, with the
    agent's own model and default parameters (cold connect: 7.5 round trips, 100 ms fixed,
    4 exchanges, 600 ms budget)."""
    from agent.config.model import ModelConfig
    from agent.runtime.model import miss_probability

    up, down = path["up"], path["down"]
    rtt = float(up["delay"] + down["delay"])
    sd = math.hypot(up.get("jitter", 0.0), down.get("jitter", 0.0))

    def loss(d: Mapping[str, Any]) -> float:
        g = d.get("gilbert")
        burst = float(g["p"] / (g["p"] + g["r"]) * g.get("loss_bad", 1.0)) if g else 0.0
        return 1 - (1 - float(d.get("loss", 0.0))) * (1 - burst)

    p_rt = 1 - (1 - loss(up)) * (1 - loss(down))
    m = ModelConfig()
    return miss_probability(p_rt, rtt, sd, 0.6, m.round_trips, float(m.fixed), m.exchanges), rtt


def classify(
    paths: Mapping[str, Mapping[str, Any]],
) -> tuple[set[tuple[str, str]], set[tuple[str, str]], dict[str, str]]:
    """(bad, good, best per region). Bad: the model misses more than 50 % of connects, far over
    the fast-burn line (14.4 % at a 99 % SLO). Good: under 0.5 %, half the error budget, where
    no burn-rate alert can fire. Between the two an edge is marginal and not asserted either
    way. Best: among the good edges the lowest configured RTT."""
    bad: set[tuple[str, str]] = set()
    good: set[tuple[str, str]] = set()
    best: dict[str, str] = {}
    for region, edges in paths.items():
        rtts: dict[str, float] = {}
        for edge, path in edges.items():
            miss, rtt = expected_miss(path)
            if miss > 0.5:
                bad.add((region, edge))
            elif miss < 0.005:
                good.add((region, edge))
                rtts[edge] = rtt
        ranked = sorted(rtts, key=rtts.__getitem__)
        # Only assert a best edge that is clearly best: 2 ms of RTT apart at least, far above
        # the ~4 % bucket resolution of the p95 at these RTTs.
        if len(ranked) == 1 or (ranked and rtts[ranked[1]] - rtts[ranked[0]] > 0.002):
            best[region] = ranked[0]
    return bad, good, best
