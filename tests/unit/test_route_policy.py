"""The route policy (agent/route/policy.py), pure: ordering, hysteresis, no_data handling.

The property tests simulate what the recording rules feed the policy: one connect per edge
every 10 s (the lab's connect cadence), each missing the budget with a fixed probability; the
miss UCB is the Wilson upper bound (z = 1.645, the rules' z_rank) of the misses among the
last 360 connects (the rules' 1-hour window); the RTT p95 is the 95th percentile of the
window's RTT samples, drawn around a fixed mean with jitter. The policy runs every 15 s (the
default query interval).
"""

from __future__ import annotations

import bisect
import math
import random
from collections import deque
from dataclasses import dataclass, field, replace

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.route.policy import (
    NO_DATA,
    EdgeObs,
    RegionState,
    band,
    beats,
    decide,
)
from agent.route.settings import PolicySection
from agent.runtime.model import wilson_interval

P = PolicySection()
Z = 1.645
WINDOW = 360  # connects in the rules' 1-hour window at one per 10 s
CONNECT_EVERY = 10.0
QUERY_EVERY = 15.0
DAY = 86400.0


def obs(
    ucb: float | None = 0.01,
    rtt: float | None = 0.01,
    eligible: bool | None = True,
    reason: str = "ok",
) -> EdgeObs:
    return EdgeObs(
        eligible, reason if eligible or reason != "ok" else "over_budget", ucb, rtt, 180.0
    )


# -- ordering and the basic transitions -------------------------------------------------------
def test_initial_order_band_then_rtt_then_name() -> None:
    st_, ch = decide(
        "r",
        None,
        {
            "slow": obs(0.01, 0.050),
            "fast": obs(0.01, 0.005),
            "fast2": obs(0.01, 0.005),
            "lossy": obs(0.2, 0.001),
            "bad": obs(0.001, 0.001, eligible=False, reason="over_budget"),
            "gone": obs(None, None, eligible=None, reason=NO_DATA),
        },
        0.0,
        P,
    )
    assert st_ is not None and ch is not None and ch.reason == "initial"
    # The lossy edge is 4 bands worse: RTT does not outrank that. Ineligible last, no data last.
    assert [e.edge for e in st_.edges] == ["fast", "fast2", "slow", "lossy", "bad", "gone"]
    assert st_.incumbent == "fast"


def test_band_is_floor_of_ucb_over_width() -> None:
    assert band(0.0, P) == 0 and band(0.049, P) == 0 and band(0.05, P) == 1
    assert band(None, P) == math.inf and band(math.nan, P) == math.inf
    # Seen in the lab: the model's 1.0 and the Wilson bound's 0.9999983 are one band.
    assert band(1.0, P) == band(0.9999982835484489, P) == 19
    assert band(1.0, PolicySection(ucb_band=0.3)) == band(0.95, PolicySection(ucb_band=0.3)) == 3


def test_challenger_needs_margin_and_hold() -> None:
    s0, _ = decide("r", None, {"a": obs(0.01, 0.010)}, 0.0, P)
    # b is 10 % faster: not significant, never replaces a.
    s1, ch = decide("r", s0, {"a": obs(0.01, 0.010), "b": obs(0.01, 0.009)}, 15.0, P)
    assert s1 is not None and ch is None and s1.incumbent == "a" and not s1.challengers
    assert [e.edge for e in s1.edges] == ["a", "b"]  # the incumbent stays first
    # c is 50 % faster: a challenger from now, the incumbent until the hold has passed.
    s = s1
    t = 30.0
    for _ in range(100):
        s, ch = decide("r", s, {"a": obs(0.01, 0.010), "c": obs(0.01, 0.005)}, t, P)
        assert s is not None
        if ch is not None:
            break
        assert s.incumbent == "a" and s.challengers == {"c": 30.0}
        t += 15.0
    assert ch is not None and ch.reason == "challenger_better" and ch.new == "c"
    assert t - 30.0 >= P.hold and t - 30.0 < P.hold + 15.0


def test_challenger_interrupted_restarts_its_hold() -> None:
    s, _ = decide("r", None, {"a": obs(0.01, 0.010)}, 0.0, P)
    s, _ = decide("r", s, {"a": obs(0.01, 0.010), "c": obs(0.01, 0.005)}, 10.0, P)
    s, _ = decide("r", s, {"a": obs(0.01, 0.010), "c": obs(0.01, 0.0095)}, 200.0, P)
    assert s is not None and not s.challengers
    s, ch = decide("r", s, {"a": obs(0.01, 0.010), "c": obs(0.01, 0.005)}, 250.0, P)
    s, ch = decide("r", s, {"a": obs(0.01, 0.010), "c": obs(0.01, 0.005)}, 10.0 + P.hold, P)
    assert ch is None and s is not None and s.incumbent == "a"


def test_quality_margin_beats_rtt() -> None:
    i = decide("r", None, {"a": obs(0.12, 0.005)}, 0, P)[0]
    assert i is not None
    a = i.edges[0]
    b = replace(a, edge="b", miss_ucb=0.01, rtt_p95=0.050)
    c = replace(a, edge="c", miss_ucb=0.06, rtt_p95=0.050)
    assert beats(b, a, P)  # band 0 vs band 2: two bands better, RTT does not matter
    assert not beats(c, a, P)  # band 1 vs 2: one band is not significant, and it is slower


def test_ineligible_incumbent_replaced_at_once() -> None:
    s, _ = decide("r", None, {"a": obs(0.01, 0.005), "b": obs(0.01, 0.050)}, 0.0, P)
    assert s is not None and s.incumbent == "a"
    for reason in ("over_budget", "agent_down", "too_few_samples"):
        s2, ch = decide(
            "r",
            s,
            {"a": obs(0.01, 0.005, eligible=False, reason=reason), "b": obs(0.01, 0.050)},
            15.0,
            P,
        )
        assert ch is not None and ch.reason == "incumbent_ineligible" and ch.new == "b"
        assert s2 is not None and [e.edge for e in s2.edges] == ["b", "a"]
        assert s2.edges[1].reason == reason and not s2.edges[1].eligible


def test_incumbent_without_data_replaced_at_once_and_kept_listed() -> None:
    s, _ = decide("r", None, {"a": obs(0.01, 0.005), "b": obs(0.01, 0.050)}, 0.0, P)
    s, ch = decide("r", s, {"b": obs(0.01, 0.050)}, 15.0, P)
    assert ch is not None and ch.reason == "incumbent_no_data" and ch.new == "b"
    assert s is not None and [(e.edge, e.eligible, e.reason) for e in s.edges] == [
        ("b", True, "ok"),
        ("a", False, NO_DATA),
    ]
    assert s.by_name["a"].last_seen == 0.0 and s.by_name["a"].since == 15.0


def test_recovered_incumbent_comes_back_only_after_hold() -> None:
    s, _ = decide("r", None, {"a": obs(0.01, 0.005), "b": obs(0.01, 0.050)}, 0.0, P)
    s, _ = decide(
        "r", s, {"a": obs(0.01, 0.005, False, "over_budget"), "b": obs(0.01, 0.050)}, 15.0, P
    )
    assert s is not None and s.incumbent == "b"
    t = 30.0
    changed_at = None
    for _ in range(100):
        s, ch = decide("r", s, {"a": obs(0.01, 0.005), "b": obs(0.01, 0.050)}, t, P)
        if ch is not None:
            changed_at = t
            assert ch.new == "a" and ch.reason == "challenger_better"
            break
        t += 15.0
    assert changed_at is not None and P.hold <= changed_at - 30.0 < P.hold + 15.0


def test_region_never_dropped_and_nothing_eligible_keeps_incumbent() -> None:
    s, _ = decide("r", None, {"a": obs(0.01, 0.005), "b": obs(0.01, 0.050)}, 0.0, P)
    # Every edge gone: the region keeps its last edges, ineligible, no_data, same order.
    s, ch = decide("r", s, {}, 15.0, P)
    assert ch is None and s is not None and s.incumbent == "a"
    assert [(e.edge, e.eligible, e.reason) for e in s.edges] == [
        ("a", False, NO_DATA),
        ("b", False, NO_DATA),
    ]
    # Past forget_after the region still keeps one edge: the last seen.
    s, ch = decide("r", s, {}, P.forget_after + 100.0, P)
    assert s is not None and [e.edge for e in s.edges] == ["a"]
    # No eligible edge at all: the incumbent stays first (nothing to replace it with).
    s2, ch = decide(
        "r",
        None,
        {
            "a": obs(eligible=False, reason="over_budget"),
            "b": obs(eligible=False, reason="too_few_samples"),
        },
        0.0,
        P,
    )
    assert s2 is not None and s2.incumbent in ("a", "b")
    s3, ch = decide(
        "r",
        s2,
        {
            "a": obs(eligible=False, reason="over_budget"),
            "b": obs(eligible=False, reason="over_budget"),
        },
        15.0,
        P,
    )
    assert ch is None and s3 is not None and s3.incumbent == s2.incumbent


def test_never_a_region_without_edges() -> None:
    s, ch = decide("r", None, {}, 0.0, P)
    assert s is None and ch is None


# -- simulation of the rules' inputs ----------------------------------------------------------
@dataclass
class SimEdge:
    """One edge as the rules see it over a sliding window of connects."""

    rtt: float  # mean RTT (s)
    miss: float  # probability that a connect misses the budget
    jitter: float  # RTT standard deviation as a fraction of the mean
    misses: deque[bool] = field(default_factory=deque)
    rtts: deque[float] = field(default_factory=deque)
    sorted_rtts: list[float] = field(default_factory=list)

    def connect(self, rng: random.Random) -> None:
        miss = rng.random() < self.miss
        r = max(1e-4, rng.gauss(self.rtt, self.rtt * self.jitter))
        self.misses.append(miss)
        self.rtts.append(r)
        bisect.insort(self.sorted_rtts, r)
        if len(self.misses) > WINDOW:
            self.misses.popleft()
            old = self.rtts.popleft()
            del self.sorted_rtts[bisect.bisect_left(self.sorted_rtts, old)]

    def obs(self) -> EdgeObs:
        n = len(self.misses)
        ucb = wilson_interval(sum(self.misses), n, Z)[1]
        p95 = self.sorted_rtts[min(n - 1, math.ceil(0.95 * n) - 1)]
        return EdgeObs(True, "ok", ucb, p95, float(n))


def simulate(
    edges: dict[str, SimEdge],
    seconds: float,
    seed: int,
    step_at: float | None = None,
    step: dict[str, SimEdge] | None = None,
    policy: PolicySection = P,
) -> tuple[list[tuple[float, str, str]], str]:
    """Run the connects and the policy for ``seconds`` after a full window of warm-up;
    return the first-choice changes after the initial one (time, new, reason) and the
    initial choice. ``step``: replacement parameters applied at ``step_at``."""
    rng = random.Random(seed)
    for _ in range(WINDOW):
        for e in edges.values():
            e.connect(rng)
    state: RegionState | None = None
    changes: list[tuple[float, str, str]] = []
    t, next_connect = 0.0, 0.0
    first = ""
    for _ in range(int(seconds / QUERY_EVERY) + 1):
        if step_at is not None and step and t >= step_at:
            for name, new in step.items():
                e = edges[name]
                e.rtt, e.miss, e.jitter = new.rtt, new.miss, new.jitter
            step = None
        while next_connect <= t:
            for e in edges.values():
                e.connect(rng)
            next_connect += CONNECT_EVERY
        state, ch = decide("r", state, {n: e.obs() for n, e in edges.items()}, t, policy)
        if ch is not None:
            if ch.reason == "initial":
                first = ch.new
            else:
                changes.append((t, ch.new, ch.reason))
        t += QUERY_EVERY
    return changes, first


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    fast_rtt=st.floats(0.002, 0.040),
    ratio=st.floats(1.3, 20.0),
    fast_miss=st.floats(0.0, 0.005),
    slow_miss=st.floats(0.0, 0.005),
    jitter=st.floats(0.0, 0.3),
    seed=st.integers(0, 2**32 - 1),
)
def test_stationary_noise_no_switch_in_a_day(
    fast_rtt: float, ratio: float, fast_miss: float, slow_miss: float, jitter: float, seed: int
) -> None:
    """Both edges far inside the budget with up to 0.5 % random misses, RTT jitter up to 30 %:
    over a simulated day the first choice never changes (goal: 0 false switches a day), and
    it is the faster edge."""
    edges = {
        "fast": SimEdge(fast_rtt, fast_miss, jitter),
        "slow": SimEdge(fast_rtt * ratio, slow_miss, jitter),
    }
    changes, first = simulate(edges, DAY, seed)
    assert changes == [], changes
    assert first == "fast"


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    rtt=st.floats(0.002, 0.040),
    delta=st.floats(0.0, 0.15),
    miss=st.floats(0.0, 0.005),
    jitter=st.floats(0.0, 0.3),
    seed=st.integers(0, 2**32 - 1),
)
def test_stationary_near_tie_no_switch_in_a_day(
    rtt: float, delta: float, miss: float, jitter: float, seed: int
) -> None:
    """Two edges within 15 % of each other (a tie for routing purposes), both with rare
    misses: whichever is chosen first stays chosen all day."""
    edges = {"a": SimEdge(rtt, miss, jitter), "b": SimEdge(rtt * (1 + delta), miss, jitter)}
    changes, _ = simulate(edges, DAY, seed)
    assert changes == [], changes


def rtt_step_bound(policy: PolicySection = P) -> float:
    """Documented bound (docs/routing.md) for an RTT step that keeps the edge eligible: the
    window's p95 moves once 5 % of the window is degraded, then the hold, then two queries:
    with jittery RTTs the new p95 may clear the margin only a sample or two later (a seeded
    case took 510 s against 505 s with one query)."""
    return 0.05 * WINDOW * CONNECT_EVERY + CONNECT_EVERY + policy.hold + 2 * QUERY_EVERY


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    fast_rtt=st.floats(0.002, 0.030),
    ratio=st.floats(1.5, 5.0),
    factor=st.floats(3.0, 20.0),
    jitter=st.floats(0.0, 0.1),
    seed=st.integers(0, 2**32 - 1),
)
def test_rtt_step_switches_within_bound(
    fast_rtt: float, ratio: float, factor: float, jitter: float, seed: int
) -> None:
    """The best edge's RTT steps up (still eligible) to well above the other's: the first
    choice moves within the documented bound, once."""
    slow_rtt = fast_rtt * ratio
    edges = {"fast": SimEdge(fast_rtt, 0.0, jitter), "slow": SimEdge(slow_rtt, 0.0, jitter)}
    step_at = 3600.0
    bad = SimEdge(slow_rtt * factor / ratio * ratio, 0.0, jitter)
    bad.rtt = max(slow_rtt * 1.6, fast_rtt * factor)
    changes, first = simulate(edges, 2 * 3600.0, seed, step_at, {"fast": bad})
    assert first == "fast"
    assert len(changes) == 1, changes
    t, new, reason = changes[0]
    assert new == "slow" and reason == "challenger_better"
    assert step_at < t <= step_at + rtt_step_bound(), (t - step_at, rtt_step_bound())


def test_breach_switches_at_the_next_query() -> None:
    """A breach is the rules' verdict (eligibility); the policy acts on the very next
    decision, without a hold."""
    edges = {"fast": SimEdge(0.005, 0.0, 0.1), "slow": SimEdge(0.030, 0.0, 0.1)}
    rng = random.Random(1)
    for _ in range(WINDOW):
        for e in edges.values():
            e.connect(rng)
    s, _ = decide("r", None, {n: e.obs() for n, e in edges.items()}, 0.0, P)
    assert s is not None and s.incumbent == "fast"
    o = {n: e.obs() for n, e in edges.items()}
    o["fast"] = replace(o["fast"], eligible=False, reason="over_budget")
    s, ch = decide("r", s, o, QUERY_EVERY, P)
    assert ch is not None and ch.new == "slow" and ch.reason == "incumbent_ineligible"


def count_false_switches(days: int, seed: int, policy: PolicySection = P) -> int:
    """The closing figure: first-choice changes over ``days`` simulated days of the issue's
    case (two edges far inside the budget; the faster, 2.9 ms, loses 0.5 % of its connects at
    random; the slower is at 33.8 ms)."""
    total = 0
    for d in range(days):
        edges = {"dxb-1": SimEdge(0.0029, 0.005, 0.2), "bom-1": SimEdge(0.0338, 0.0, 0.2)}
        changes, first = simulate(edges, DAY, seed + d, policy=policy)
        assert first == "dxb-1" or policy != P
        total += len(changes)
    return total


def test_issue_case_zero_false_switches_per_day() -> None:
    assert count_false_switches(3, 12) == 0


def test_without_hysteresis_the_same_data_switches() -> None:
    """The counter-check: the same simulation with a 0 s hold and no margins (the old
    ranking's behaviour) does switch, so the zero above is the policy's doing."""
    loose = PolicySection(
        ucb_band=0.005, ucb_margin_bands=1, rtt_margin=0.0, rtt_margin_min=0.0, hold=0.0
    )
    assert count_false_switches(1, 12, loose) > 0


def test_chosen_while_nothing_eligible_gives_way_at_once() -> None:
    """The first query saw no eligibility series yet (rules younger than the data): the
    first choice then was arbitrary, and the first eligible ranking replaces it at once."""
    young = {
        "bom-1": obs(0.0, None, eligible=None, reason=NO_DATA),
        "dxb-1": obs(0.0, None, eligible=None, reason=NO_DATA),
    }
    s, ch = decide("ae-dubai", None, young, 0.0, P)
    assert s is not None and s.incumbent == "bom-1"  # by name: nothing to go by
    s, ch = decide("ae-dubai", s, {"bom-1": obs(0.0, 0.035), "dxb-1": obs(0.0, 0.003)}, 15.0, P)
    assert ch is not None and ch.new == "dxb-1" and ch.reason == "incumbent_ineligible"
    # From now on dxb-1 is a real incumbent: bom-1 does not come back without the hold.
    s, ch = decide("ae-dubai", s, {"bom-1": obs(0.0, 0.001), "dxb-1": obs(0.0, 0.003)}, 30.0, P)
    assert ch is None and s is not None and s.incumbent == "dxb-1"


def test_incumbent_without_a_score_gives_way_at_once() -> None:
    """A young series: the first decision had no RTT p95 for the better edge."""
    s, ch = decide("r", None, {"a": obs(0.0, None), "b": obs(0.0, 0.035)}, 0.0, P)
    assert s is not None and s.incumbent == "b"
    s, ch = decide("r", s, {"a": obs(0.0, 0.003), "b": obs(0.0, 0.035)}, 15.0, P)
    assert ch is None  # b has its scores: a is an ordinary challenger
    s2, ch = decide("r", None, {"a": obs(0.0, 0.003), "b": obs(0.0, None)}, 0.0, P)
    assert s2 is not None and s2.incumbent == "a"
    s3, _ = decide("r", None, {"b": obs(0.0, None)}, 0.0, P)
    s3, ch = decide("r", s3, {"a": obs(0.0, 0.003), "b": obs(0.0, None)}, 15.0, P)
    assert ch is not None and ch.new == "a" and ch.reason == "incumbent_no_data"


def test_chosen_before_any_rtt_gives_way_at_once() -> None:
    """Seen in make run: the first query had every edge eligible but no RTT p95 yet, so the
    first choice went by name (bom-1); the next query has the RTTs and dxb-1 is far better:
    the name-based choice is not an incumbent to protect."""
    s, _ = decide("ae-dubai", None, {"bom-1": obs(0.0, None), "dxb-1": obs(0.0, None)}, 0.0, P)
    assert s is not None and s.incumbent == "bom-1"
    s, ch = decide("ae-dubai", s, {"bom-1": obs(0.0, 0.034), "dxb-1": obs(0.0, 0.0028)}, 5.0, P)
    assert ch is not None and ch.new == "dxb-1" and ch.reason == "incumbent_no_data"
    # Edges that never have an RTT (connect-only) keep their hysteresis among themselves.
    s, _ = decide("r", None, {"a": obs(0.01, None), "b": obs(0.01, None)}, 0.0, P)
    s, ch = decide("r", s, {"a": obs(0.12, None), "b": obs(0.01, None)}, 15.0, P)
    assert ch is None and s is not None and s.incumbent == "a" and s.challengers == {"b": 15.0}
