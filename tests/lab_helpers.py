"""What tests of the lab share: ``requires_lab``, reference implementations of jitter, IPDV and
the Wilson bound, and what the budget model expects of a lab path. The ``lab_world`` fixture is
in ``tests/lab/conftest.py``."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from lab.topology import lab_available

LAB_OK, LAB_WHY = lab_available()
requires_lab = pytest.mark.skipif(not LAB_OK, reason=f"lab unavailable: {LAB_WHY}")


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
