"""pytest helpers for tests that go through the lab.

``from lab_helpers import lab_world, requires_lab`` in a test module; set ``LAB_PROFILES`` /
``LAB_SERVICES`` module globals to choose the world. The fixture is module-scoped (a world
takes ~0.3 s without services, ~1.5 s with) and always tears down, also after a failure.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import pytest

from lab.spec import DEFAULT_PROFILES
from lab.topology import World, lab_available

_OK, _WHY = lab_available()
requires_lab = pytest.mark.skipif(not _OK, reason=f"lab unavailable: {_WHY}")


@pytest.fixture(scope="module")
def lab_world(request: pytest.FixtureRequest) -> Iterator[World]:
    if not _OK:
        pytest.skip(f"lab unavailable: {_WHY}")
    profiles = getattr(request.module, "LAB_PROFILES", DEFAULT_PROFILES)
    services = getattr(request.module, "LAB_SERVICES", False)
    with World.up(profiles=profiles, services=services) as world:
        yield world


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
