"""The query loop: every ``prometheus.interval`` ask the four candidate series, decide per
region, publish the map, persist it. A failed or partial cycle changes no decision: the last
good map stays served, marked stale, and its age grows."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from agent.route import policy, promapi
from agent.route.policy import NO_DATA, EdgeObs, RegionState
from agent.route.promapi import PromClient, QueryError, Vector
from agent.route.settings import RouteConfig
from agent.route.store import MapStore, atomic_write

log = logging.getLogger("edgeprobe.route")

_REASON_OK = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


def _reason(labels: dict[str, str]) -> str:
    """The rules' reason label, kept only when it looks like one of theirs (a bounded set
    of snake_case words); anything else is invalid_data."""
    r = labels.get("reason", "")
    return r if 0 < len(r) <= 40 and set(r) <= _REASON_OK else policy.INVALID_DATA


def observations(
    elig: Vector, ucb: Vector, rtt: Vector, connects: Vector
) -> dict[str, dict[str, EdgeObs]]:
    """region -> edge -> what the rules say. An edge is known when any of the four series
    names it; without a valid eligibility sample it is ineligible (no_data or invalid_data)."""
    keys = (
        set(elig.values) | elig.invalid | set(ucb.values) | set(rtt.values) | set(connects.values)
    )
    out: dict[str, dict[str, EdgeObs]] = {}
    for key in sorted(keys):
        region, edge = key

        def val(v: Vector, key: tuple[str, str] = key) -> float | None:
            x = v.values.get(key)
            return x[0] if x is not None else None

        e = elig.values.get(key)
        if e is not None:
            eligible: bool | None = e[0] >= 1
            reason = _reason(e[1])
            if eligible and reason != "ok":
                reason = "ok"
        elif key in elig.invalid:
            eligible, reason = None, policy.INVALID_DATA
        else:
            eligible, reason = None, NO_DATA
        out.setdefault(region, {})[edge] = EdgeObs(
            eligible, reason, val(ucb), val(rtt), val(connects)
        )
    return out


def _by_reason(name: str, doc: str, reasons: Iterable[str], registry: CollectorRegistry) -> Counter:
    """A counter by bounded reason, every reason's series created at 0 up front."""
    c = Counter(name, doc, ["reason"], registry=registry)
    for reason in reasons:
        c.labels(reason)
    return c


class RouteService:
    def __init__(self, cfg: RouteConfig, store: MapStore | None = None) -> None:
        self.cfg = cfg
        self.store = store or MapStore()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decisions = Counter(
            "edgeprobe_route_decisions",
            "Query cycles that produced a decision (the map was recomputed from fresh data)",
            registry=r,
        )
        self.changes = _by_reason(
            "edgeprobe_route_best_edge_changes",
            "Changes of a region's first choice, by reason",
            policy.CHANGE_REASONS,
            r,
        )
        self.query_errors = _by_reason(
            "edgeprobe_route_query_errors",
            "Failed query cycles, by reason (the map was kept and marked stale)",
            promapi.ERROR_REASONS,
            r,
        )
        self.dropped = _by_reason(
            "edgeprobe_route_query_dropped_series",
            "Series of a query result that were dropped, by reason",
            promapi.DROP_REASONS,
            r,
        )
        self.persist_errors = Counter(
            "edgeprobe_route_persist_errors",
            "Failed writes of the state or output file",
            registry=r,
        )
        self.duration = Histogram(
            "edgeprobe_route_query_duration_seconds",
            "Duration of a query cycle (the four instant queries, in parallel)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        r.register(_MapCollector(self))
        self.last_error = ""
        self._session: aiohttp.ClientSession | None = None

    # -- start-up ---------------------------------------------------------------------------
    def load_state(self) -> None:
        path = Path(self.cfg.map.state_file)
        if not path.exists():
            log.info(
                "no persisted map; serving nothing until the first query",
                extra={"state_file": str(path)},
            )
            return
        try:
            self.store.load(path, time.monotonic())
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.error(
                "persisted map unreadable; starting without it",
                extra={"state_file": str(path), "error": str(e)},
            )
            return
        log.info(
            "serving the persisted map until the first query completes",
            extra={"regions": len(self.store.states), "generation": self.store.generation},
        )

    # -- one cycle --------------------------------------------------------------------------
    async def run_once(self, client: PromClient) -> bool:
        t0 = time.monotonic()
        try:
            got = await asyncio.gather(
                client.query(promapi.ELIGIBLE, 0, 1),
                client.query(promapi.MISS_UCB, 0, 1),
                client.query(promapi.RTT_P95, 0, math.inf),
                client.query(promapi.CONNECTS, 0, math.inf),
                return_exceptions=True,
            )
            # One failed query fails the cycle: a decision on part of the data is not made.
            for g in got:
                if isinstance(g, BaseException):
                    raise g
            elig, ucb, rtt, conn = (g for g in got if isinstance(g, Vector))
            for v in (elig, ucb, rtt, conn):
                for reason, n in v.dropped.items():
                    self.dropped.labels(reason).inc(n)
            if not elig.values and not elig.invalid and self.store.states:
                # Every edge gone at once is Prometheus (a fresh server, rules not loaded),
                # not the edges: keep the decision rather than mark every edge no_data.
                raise QueryError("empty", f"{promapi.ELIGIBLE} returned no series")
        except QueryError as e:
            self.duration.observe(time.monotonic() - t0)
            self.query_errors.labels(e.reason).inc()
            if str(e) != self.last_error:
                log.warning(
                    "query failed; serving the last good map, stale", extra={"error": str(e)}
                )
            self.last_error = str(e)
            if self.store.set_stale(True):
                self._write_output()
            return False
        now = time.monotonic()
        self.duration.observe(now - t0)
        if self.last_error:
            log.info("queries succeed again")
        self.last_error = ""
        obs = observations(elig, ucb, rtt, conn)
        states: dict[str, RegionState] = {}
        p = self.cfg.policy
        for region in sorted(set(obs) | set(self.store.states)):
            st, change = policy.decide(
                region, self.store.states.get(region), obs.get(region, {}), now, p
            )
            if st is None:
                continue
            states[region] = st
            if change is not None:
                self.changes.labels(change.reason).inc()
                log.info(
                    "first choice changed",
                    extra={
                        "region": region,
                        "old": change.old or "",
                        "new": change.new,
                        "reason": change.reason,
                    },
                )
        self.decisions.inc()
        self.store.refreshed = now
        if states and self.store.update(states, stale=False):
            self._write_output()
        self._save()
        return True

    def _save(self) -> None:
        if not self.store.ready:
            return
        try:
            self.store.save(Path(self.cfg.map.state_file))
        except OSError as e:
            self.persist_errors.inc()
            log.error("cannot persist the map", extra={"error": str(e)})

    def _write_output(self) -> None:
        out = self.cfg.map.output_file
        if not out or not self.store.ready:
            return
        try:
            atomic_write(Path(out), self.store.body)
        except OSError as e:
            self.persist_errors.inc()
            log.error("cannot write the output file", extra={"error": str(e)})

    async def run(self, stop: asyncio.Event) -> None:
        """Query every interval until ``stop``; one ClientSession for the service's life."""
        pc = self.cfg.prometheus
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=pc.timeout)) as s:
            client = PromClient(s, pc.url, pc.timeout)
            next_at = time.monotonic()
            while not stop.is_set():
                try:
                    await self.run_once(client)
                except Exception:  # a bug must not stop the map from being served
                    log.exception("query cycle failed unexpectedly")
                    self.query_errors.labels("bad_response").inc()
                    self.store.set_stale(True)
                next_at += pc.interval
                now = time.monotonic()
                if next_at < now:  # a slow cycle: skip the missed ticks, keep cadence
                    next_at = now + pc.interval - (now - next_at) % pc.interval
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), next_at - now)


class _MapCollector:
    """Gauges read from the map at scrape time."""

    def __init__(self, svc: RouteService) -> None:
        self.svc = svc

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        store = self.svc.store
        best = GaugeMetricFamily(
            "edgeprobe_route_best_edge",
            "1 for each region's first choice in the served map",
            labels=["region", "edge"],
        )
        elig = GaugeMetricFamily(
            "edgeprobe_route_eligible_edges",
            "Eligible edges per region in the served map",
            labels=["region"],
        )
        for region, st in sorted(store.states.items()):
            best.add_metric([region, st.incumbent], 1.0)
            elig.add_metric([region], float(sum(e.eligible for e in st.edges)))
        yield best
        yield elig
        g = GaugeMetricFamily(
            "edgeprobe_route_map_stale",
            "1 when the served map is stale "
            "(the last query cycle failed, or not yet run since start)",
        )
        g.add_metric([], float(store.stale) if store.ready else 1.0)
        yield g
        age = store.age(time.monotonic())
        g = GaugeMetricFamily(
            "edgeprobe_route_map_age_seconds",
            "Seconds since the served "
            "map's data was last refreshed by a successful query (NaN: no "
            "map)",
        )
        g.add_metric([], math.nan if age is None else age)
        yield g
        g = GaugeMetricFamily(
            "edgeprobe_route_map_generation",
            "Generation of the served map (counts content changes)",
        )
        g.add_metric([], float(store.generation))
        yield g
