"""The decision, pure (no I/O, no clock): order a region's edges and keep its first choice stable.

The statistics come from the recording rules (one place): per edge the Wilson upper bound of
the connect budget-miss ratio (``miss_ucb``), the RTT p95 and an eligibility verdict with a
reason. Here:

* Order: eligible edges by (miss-UCB band, RTT p95, name); then the ineligible ones by the
  same key, edges without data last. A band is ``floor(miss_ucb / ucb_band)``: UCB differences
  inside a band are sampling noise and never outrank RTT.
* Hysteresis of the first choice (the incumbent). A challenger replaces it only when it is
  significantly better (``beats``) without a break for ``hold``. An incumbent that is
  ineligible, has no data (or lacks a score the best eligible edge has) or whose agent is
  down is replaced at once by the best eligible edge; so is one that was chosen while no edge
  was eligible or before its scores existed. Fail fast, recover slowly.

Time is the caller's monotonic clock, passed in as ``now``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from agent.route.settings import PolicySection

NO_DATA = "no_data"
INVALID_DATA = "invalid_data"

# Why the first choice changed (the label of edgeprobe_route_best_edge_changes_total).
CHANGE_REASONS = ("initial", "incumbent_ineligible", "incumbent_no_data", "challenger_better")


@dataclass(frozen=True)
class EdgeObs:
    """What the rules say about one edge now. ``eligible`` None: no (valid) eligibility series."""

    eligible: bool | None
    reason: str
    miss_ucb: float | None = None
    rtt_p95: float | None = None
    connects: float | None = None


@dataclass(frozen=True)
class EdgeEntry:
    """One edge of a region's list. ``since``: when it entered its (eligible, reason) state;
    ``last_seen``: when the rules last had data for it (both on the caller's clock)."""

    edge: str
    eligible: bool
    reason: str
    miss_ucb: float | None
    rtt_p95: float | None
    connects: float | None
    since: float
    last_seen: float


@dataclass(frozen=True)
class RegionState:
    """The ordered list and the state behind it. ``challengers``: edge -> since when it has
    continuously beaten the incumbent."""

    edges: tuple[EdgeEntry, ...]
    incumbent: str
    incumbent_since: float
    challengers: Mapping[str, float] = field(default_factory=dict)

    @property
    def by_name(self) -> dict[str, EdgeEntry]:
        return {e.edge: e for e in self.edges}


@dataclass(frozen=True)
class Change:
    region: str
    old: str | None
    new: str
    reason: str


def band(ucb: float | None, p: PolicySection) -> float:
    if ucb is None or not math.isfinite(ucb):
        return math.inf
    # The last band is closed ([0.95, 1] at the default width): a model that is certain of a
    # miss (1.0) and one that is nearly certain (0.99999) are the same, not a band apart.
    last = math.ceil(1 / p.ucb_band - 1e-9) - 1
    return float(min(last, math.floor(max(0.0, ucb) / p.ucb_band + 1e-9)))


def _rtt(e: EdgeEntry) -> float:
    return e.rtt_p95 if e.rtt_p95 is not None and math.isfinite(e.rtt_p95) else math.inf


def sort_key(e: EdgeEntry, p: PolicySection) -> tuple[int, float, float, str]:
    """Eligible first, then ineligible with data, then no data; each by (band, RTT, name)."""
    tier = 0 if e.eligible else 2 if e.reason == NO_DATA else 1
    return tier, band(e.miss_ucb, p), _rtt(e), e.edge


def beats(c: EdgeEntry, i: EdgeEntry, p: PolicySection) -> bool:
    """Is challenger ``c`` significantly better than incumbent ``i`` (both eligible)?"""
    bc, bi = band(c.miss_ucb, p), band(i.miss_ucb, p)
    if bc + p.ucb_margin_bands <= bi:
        return True
    rc, ri = _rtt(c), _rtt(i)
    return bc <= bi and rc < ri * (1 - p.rtt_margin) and ri - rc >= p.rtt_margin_min


def _incomplete(e: EdgeEntry) -> bool:
    return e.miss_ucb is None or e.rtt_p95 is None


def _entries(
    prev: RegionState | None, obs: Mapping[str, EdgeObs], now: float, p: PolicySection
) -> list[EdgeEntry]:
    old = prev.by_name if prev is not None else {}
    out: list[EdgeEntry] = []
    for name, o in obs.items():
        eligible = bool(o.eligible)
        was = old.get(name)
        since = (
            was.since
            if was is not None and (was.eligible, was.reason) == (eligible, o.reason)
            else now
        )
        out.append(
            EdgeEntry(name, eligible, o.reason, o.miss_ucb, o.rtt_p95, o.connects, since, now)
        )
    gone = [e for n, e in old.items() if n not in obs]
    for e in gone:
        if now - e.last_seen > p.forget_after:
            continue
        out.append(
            e
            if (e.eligible, e.reason) == (False, NO_DATA)
            else replace(e, eligible=False, reason=NO_DATA, since=now)
        )
    if not out and gone:
        # Never drop a region that had edges: keep its first choice.
        assert prev is not None
        e = prev.by_name[prev.incumbent]
        out.append(replace(e, eligible=False, reason=NO_DATA))
    return out


def decide(
    region: str, prev: RegionState | None, obs: Mapping[str, EdgeObs], now: float, p: PolicySection
) -> tuple[RegionState | None, Change | None]:
    """The region's next state from its previous one and the rules' current view. None when
    the region has never had an edge."""
    entries = _entries(prev, obs, now, p)
    if not entries:
        return None, None
    by_name = {e.edge: e for e in entries}
    ranked = sorted((e for e in entries if e.eligible), key=lambda e: sort_key(e, p))
    rest = sorted((e for e in entries if not e.eligible), key=lambda e: sort_key(e, p))
    challengers: dict[str, float] = {}
    change: Change | None = None
    if prev is None or prev.incumbent not in by_name:
        first = (ranked or rest)[0].edge
        reason = "initial" if prev is None else "incumbent_no_data"
        change = Change(region, None if prev is None else prev.incumbent, first, reason)
    else:
        inc = by_name[prev.incumbent]
        first = inc.edge
        # Hysteresis protects an incumbent that won as an eligible edge with its scores. One
        # that is ineligible now, or was ineligible when last decided (nothing was eligible
        # then: the first eligible edges are ranked afresh), or lacks a score now or at the
        # last decision while the best eligible edge has it (young series: the first choice
        # was made before the RTT p95 existed) is replaced at once.
        was = prev.by_name[prev.incumbent]
        complete_rival = bool(ranked) and not _incomplete(ranked[0])
        incomplete = complete_rival and (_incomplete(inc) or _incomplete(was))
        if not inc.eligible or not was.eligible or incomplete:
            if ranked and ranked[0].edge != inc.edge:
                reason = (
                    "incumbent_no_data"
                    if inc.reason == NO_DATA or (inc.eligible and was.eligible)
                    else "incumbent_ineligible"
                )
                first = ranked[0].edge
                change = Change(region, inc.edge, first, reason)
        else:
            for c in ranked:
                if c.edge != inc.edge and beats(c, inc, p):
                    challengers[c.edge] = prev.challengers.get(c.edge, now)
            ready = [
                c for c in ranked if c.edge in challengers and now - challengers[c.edge] >= p.hold
            ]
            if ready:
                first = ready[0].edge
                change = Change(region, inc.edge, first, "challenger_better")
    if change is not None:
        challengers = {}
    since = now if change is not None or prev is None else prev.incumbent_since
    ordered = (by_name[first], *(e for e in (*ranked, *rest) if e.edge != first))
    return RegionState(ordered, first, since, challengers), change
