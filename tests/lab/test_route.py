"""edgeprobe route end to end in the lab: real agents (the `make run` configs: ICMP every 1 s,
the connect probe every 10 s against the lab's edge services), regional agent-mode Prometheus
servers, the central Prometheus with the shipped rules at the shipped 15 s scrape and
evaluation intervals, and the route service at its default 15 s query interval.

1. The map names the lab's best edge in every region.
2. Degrading the best edge of id-jakarta (150 ms each way: every connect misses the budget)
   moves the region's first choice within the documented time; the time is measured (from
   the lab's change to the first map that shows it).
3. Restoring it brings it back only after the hold time (the full run: EDGEPROBE_SLOW_LAB=1).
4. Killing the central Prometheus leaves the map served, marked stale, with its age.
5. Restarting the route service serves the same map at once.

What is shortened, and why (the rest is shipped):

* The hold: 60 s instead of 5 min (``HOLD``), so that step 3 fits in minutes.
* Phase 1 (steps 1-2): ``edgeprobe:route_policy:slow_burn`` off. The test's "last hour" holds
  only minutes of history, which makes the 1-hour slow path trip after two or three misses,
  much sooner than in production; off, the change is caught by the 5-minute fast path alone,
  as it is with an hour of history, so the measured time is the production one.
* Phase 2 (step 3): before the restore, the rule files are swapped for a copy whose 1-hour
  route windows are 5 minutes (Prometheus reloads them on SIGHUP): with the shipped 1-hour
  windows a 2-minute degradation keeps its edge's RTT p95 and miss bound up for most of an
  hour ("recover slowly"), too long for a test.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab import stack
from lab.procs import Procs, free_port, http_ok, wait_for
from lab.prom import PromAPI, RouteAPI
from lab.promconfig import Timing
from lab.topology import World
from tests.helpers import ROOT
from tests.lab_helpers import classify, skip_without_lab

RULES = ROOT / "deploy" / "prometheus" / "rules"
REGIONS = ("id-jakarta", "br-saopaulo", "ae-dubai")
VICTIM_REGION = "id-jakarta"
HOLD = 60.0
# The full run (EDGEPROBE_SLOW_LAB=1, ~15 min) fills the fast path's 5-minute window before the
# degradation, as in production, and measures the restore (step 3). The default run, in `make
# test`, waits 3 minutes (the measured switch can only be sooner, and the 2-minute bound is an
# upper bound) and leaves step 3 to tests/e2e/test_route_service.py, which shows the hold against a
# real Prometheus; it takes ~6 minutes instead of ~15.
SLOW = os.environ.get("EDGEPROBE_SLOW_LAB") == "1"
STEADY_S = 300.0 if SLOW else 180.0
PRODUCTION_ROUTE = Timing(route_hold=f"{HOLD:g}s")  # 15 s everywhere, as shipped
ROUTE_GROUP = "edgeprobe-route-candidates"

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.e2e]


def write_rules(dst: Path, slow_burn_off: bool, short_windows: bool) -> None:
    """The shipped rule files, with the route group changed as described above."""
    dst.mkdir(parents=True, exist_ok=True)
    for src in sorted(RULES.glob("*.yml")):
        doc = yaml.safe_load(src.read_text())
        for g in doc["groups"]:
            if g["name"] != ROUTE_GROUP:
                continue
            for r in g["rules"]:
                if slow_burn_off and r.get("record") == "edgeprobe:route_policy:slow_burn":
                    r["expr"] = "vector(1e6)"
                if short_windows and "record" in r:
                    r["expr"] = (
                        r["expr"].replace("[1h]", "[5m]").replace("ratio_rate1h", "ratio_rate5m")
                    )
        (dst / src.name).write_text(yaml.safe_dump(doc, sort_keys=False))


def first(route: RouteAPI, region: str) -> str | None:
    return route.best().get(region)


def entry(route: RouteAPI, region: str, edge: str) -> dict[str, Any] | None:
    doc = route.map() or {}
    return next(
        (e for e in doc.get("regions", {}).get(region, {}).get("edges", []) if e["edge"] == edge),
        None,
    )


def test_route_in_the_lab(tmp_path: Path) -> None:
    skip_without_lab()
    from lab.agentconf import agent_config, dump

    if not RULES.joinpath("edgeprobe-recording.yml").read_text().count(ROUTE_GROUP):
        pytest.skip("the rules' edgeprobe-route-candidates group is not on this branch yet")
    figures: dict[str, float] = {}
    procs = Procs(tmp_path)
    with World.up(profiles=list(REGIONS), state_dir=tmp_path / "lab") as world:
        try:
            st = world.state
            _, _, best = classify(st.paths)
            assert set(best) == set(REGIONS), best
            agents: dict[str, str] = {}
            for region in REGIONS:
                info = st.regions[region]
                cfg = tmp_path / f"agent-{region}.yaml"
                cfg.write_text(dump(agent_config(st, region)))
                port = free_port()
                procs.start(
                    f"agent-{region}",
                    world.cmd(
                        region,
                        [
                            str(ROOT / ".venv" / "bin" / "python"),
                            "-m",
                            "agent",
                            "run",
                            f"--config.file={cfg}",
                            f"--web.listen-address={info.mgmt_addr}:{port}",
                        ],
                    ),
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                    cwd=ROOT,
                )
                agents[region] = f"{info.mgmt_addr}:{port}"
            rules = tmp_path / "rules"
            write_rules(rules, slow_burn_off=True, short_windows=False)
            route_port = free_port()
            central_port = free_port()
            central = stack.start_central(
                procs,
                tmp_path,
                rules,
                PRODUCTION_ROUTE,
                port=central_port,
                route=f"127.0.0.1:{route_port}",
            )
            for region, a in agents.items():
                stack.start_regional(procs, tmp_path, region, [a], central, PRODUCTION_ROUTE)
            route = stack.start_route(procs, tmp_path, central, PRODUCTION_ROUTE, route_port)
            t_up = time.monotonic()

            # 1. The lab's best edge first in every region. Then let the 5-minute window of
            # the fast path fill, so that the degradation meets a steady state.
            wait_for(
                "the lab's best edges in the map",
                lambda: route.best() == best,
                300,
                interval=2,
                procs=procs,
            )
            t_map = time.monotonic()
            # The route's scrape (15 s, as shipped) and the relaying rule's evaluation (15 s).
            wait_for(
                "Prometheus' best edge = the map's",
                lambda: central.best_edges() == best,
                60,
                interval=1,
                procs=procs,
            )
            figures["map_to_prometheus_s"] = time.monotonic() - t_map
            time.sleep(max(0.0, STEADY_S - (time.monotonic() - t_up)))
            assert route.best() == best, "the first choice changed on stationary data"

            # 2. Degrade: the first choice moves within the documented time (2 minutes).
            victim = best[VICTIM_REGION]
            orig = st.paths[VICTIM_REGION][victim]
            world.set_path(VICTIM_REGION, victim, delay="150ms")
            t0 = time.monotonic()
            wait_for(
                f"{VICTIM_REGION} first choice to leave {victim}",
                lambda: first(route, VICTIM_REGION) not in (victim, None),
                240,
                interval=1,
                procs=procs,
            )
            figures["degrade_to_map_s"] = time.monotonic() - t0
            new = first(route, VICTIM_REGION)
            e = entry(route, VICTIM_REGION, victim)
            assert e is not None and not e["eligible"] and e["reason"] == "over_budget", e
            assert {r: b for r, b in route.best().items() if r != VICTIM_REGION} == {
                r: b for r, b in best.items() if r != VICTIM_REGION
            }
            wait_for(
                "Prometheus' best edge follows",
                lambda: central.best_edges().get(VICTIM_REGION) == new,
                60,
                interval=1,
                procs=procs,
            )
            figures["degrade_to_prometheus_s"] = time.monotonic() - t0
            assert figures["degrade_to_map_s"] <= 120, figures

            central_proc = next(p for p in procs.items if p.name == "prometheus-central")
            if SLOW:
                restore(world, rules, central_proc, route, victim, orig, new, figures, procs)

            # 4. Central Prometheus killed: the map stays served, stale, aging.
            fresh = route.map()
            assert fresh is not None and not fresh["stale"]
            central_proc.popen.send_signal(signal.SIGKILL)
            central_proc.popen.wait(timeout=10)
            procs.items.remove(central_proc)
            stale = wait_for(
                "the map marked stale",
                lambda: d if (d := route.map()) and d["stale"] else None,
                60,
                interval=1,
            )
            assert stale["regions"] == fresh["regions"]
            assert http_ok(route.base + "/-/ready")

            # 5. Restart the route (Prometheus still down): the same map, at once.
            rp = next(p for p in procs.items if p.name == "edgeprobe-route")
            rp.popen.send_signal(signal.SIGTERM)
            assert rp.popen.wait(timeout=15) == 0
            procs.items.remove(rp)
            t2 = time.monotonic()
            route2 = stack.start_route(
                procs,
                tmp_path,
                PromAPI(central.base),
                PRODUCTION_ROUTE,
                route_port,
                name="edgeprobe-route-2",
            )
            again = route2.map()
            figures["restart_to_map_s"] = time.monotonic() - t2
            assert again is not None and again["stale"] and again["regions"] == fresh["regions"]
        finally:
            procs.stop_all()
            print("route lab figures:", {k: round(v, 1) for k, v in figures.items()})


def restore(
    world: Any,
    rules: Path,
    central_proc: Any,
    route: RouteAPI,
    victim: str,
    orig: dict[str, Any],
    new: str | None,
    figures: dict[str, float],
    procs: Procs,
) -> None:
    """Step 3 (the full run only)."""
    # 3. Restore (with the route windows shortened, see the docstring): back only
    # after the hold, counted from when the map shows it eligible again.
    write_rules(rules, slow_burn_off=True, short_windows=True)
    central_proc.popen.send_signal(signal.SIGHUP)
    world.set_path(
        VICTIM_REGION,
        victim,
        up={"delay": orig["up"]["delay"]},
        down={"delay": orig["down"]["delay"]},
    )
    t1 = time.monotonic()
    wait_for(
        f"{victim} eligible again",
        lambda: (e := entry(route, VICTIM_REGION, victim)) is not None and e["eligible"],
        600,
        interval=1,
        procs=procs,
    )
    t_eligible = time.monotonic()
    assert first(route, VICTIM_REGION) == new
    wait_for(
        f"{victim} first again",
        lambda: first(route, VICTIM_REGION) == victim,
        600,
        interval=1,
        procs=procs,
    )
    figures["eligible_to_back_s"] = time.monotonic() - t_eligible
    figures["restore_to_back_s"] = time.monotonic() - t1
    # The route acts on its own 15 s cycle; the polls above add up to a second.
    assert figures["eligible_to_back_s"] >= HOLD - 2, figures
