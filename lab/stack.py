"""The monitoring stack on top of the agents, as in production: one Prometheus in agent mode
per region (scrapes that region's agents, remote-writes) and a central Prometheus with the
rules from deploy/prometheus/rules/, optionally an Alertmanager that sends nowhere.

Two users:

* ``python -m lab.stack`` (what ``scripts/run.sh``, i.e. ``make run``, runs): brings up the lab
  world, one agent per region, the two Prometheus tiers and Alertmanager, prints what to look
  at, reports the best edges and alerts as they change, and on SIGINT/SIGTERM stops
  everything it started (by PID) and removes its state. Without root it runs the loopback
  agent and a single Prometheus instead.
* tests/e2e/test_two_tier.py and tests/e2e/test_main_job.py: the ``start_*`` functions here,
  with the process supervisor (``lab.procs``: ``Procs``, ``wait_for``), the servers' clients
  (``lab.prom``: ``PromAPI``, ``RouteAPI``) and the config renderers (``lab.promconfig``).

Configs are the shipped ones in deploy/ rendered per region; only addresses, ports, storage
and (see ``Timing``) intervals change.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from lab.procs import Procs, free_port, port_or_free, wait_for, wait_http_ok
from lab.prom import PromAPI, RouteAPI
from lab.promconfig import (
    DEMO,
    NATIVE_HISTOGRAMS,
    PRODUCTION,
    PROM_DIR,
    ROOT,
    Timing,
    alertmanager_config,
    central_config,
    regional_config,
    route_config,
    single_config,
)

LOOPBACK_CONFIG = ROOT / "examples" / "loopback.yaml"
CENTRAL_PORT = 9090
ROUTE_PORT = 9799
ALERTMANAGER_PORT = 9093
AGENT_PORT = 9798


def start_central(
    procs: Procs,
    workdir: Path,
    rules_dir: Path,
    timing: Timing,
    port: int | None = None,
    alertmanager: str | None = None,
    name: str = "prometheus-central",
    route: str | None = None,
) -> PromAPI:
    """A central Prometheus (remote-write receiver, rules; scraping the route service at
    ``route`` if given) on 127.0.0.1, storage under ``workdir``; returns once it is ready."""
    port = port or free_port()
    cfg = central_config(
        workdir / "central.yml", rules_dir, f"127.0.0.1:{port}", timing, alertmanager, route
    )
    api = launch_prometheus(
        procs,
        name,
        cfg,
        port,
        f"--storage.tsdb.path={workdir / 'central-data'}",
        "--web.enable-remote-write-receiver",
        NATIVE_HISTOGRAMS,
        "--storage.tsdb.retention.time=1h",
    )
    wait_for("central Prometheus ready", api.ready, 30, procs=procs)
    return api


def start_regional(
    procs: Procs,
    workdir: Path,
    region: str,
    agents: Sequence[str],
    central: PromAPI,
    timing: Timing,
) -> int:
    """One agent-mode Prometheus for ``region``; returns its (loopback) port."""
    rport = free_port()
    rcfg = regional_config(
        workdir / f"regional-{region}.yml", region, agents, f"{central.base}/api/v1/write", timing
    )
    launch_prometheus(
        procs,
        f"prometheus-agent-{region}",
        rcfg,
        rport,
        "--enable-feature=agent",
        NATIVE_HISTOGRAMS,
        f"--storage.agent.path={workdir / f'agent-data-{region}'}",
        "--storage.remote.flush-deadline=5s",
    )
    return rport


def launch_prometheus(procs: Procs, name: str, config: Path, port: int, *flags: str) -> PromAPI:
    """Start Debian's ``prometheus`` with ``config`` on 127.0.0.1:``port`` and the other
    ``flags`` (storage, features); returns at once, before it is ready."""
    procs.start(
        name,
        [
            "prometheus",
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            *flags,
        ],
    )
    return PromAPI(f"http://127.0.0.1:{port}")


@contextlib.contextmanager
def two_tier(
    procs: Procs,
    workdir: Path,
    regions: Mapping[str, Sequence[str]],
    rules_dir: Path,
    timing: Timing,
) -> Iterator[tuple[PromAPI, RouteAPI]]:
    """A central Prometheus with the rules, one agent-mode Prometheus per region and the route
    service (scraped by the central one), on free loopback ports with storage under
    ``workdir``. ``regions``: region → agent host:port."""
    route_port = free_port()
    api = start_central(procs, workdir, rules_dir, timing, route=f"127.0.0.1:{route_port}")
    for region, agents in regions.items():
        start_regional(procs, workdir, region, agents, api, timing)
    yield api, start_route(procs, workdir, api, timing, route_port)


def start_route(
    procs: Procs,
    workdir: Path,
    prometheus: PromAPI,
    timing: Timing,
    port: int | None = None,
    name: str = "edgeprobe-route",
    **policy: Any,
) -> RouteAPI:
    """``edgeprobe route`` on 127.0.0.1 against ``prometheus``; returns once it is healthy
    (its map may still be empty: /v1/map answers 503 until the first decision)."""
    port = port or free_port()
    cfg = route_config(workdir / "route.yml", prometheus, workdir, timing, **policy)
    api = launch_route(procs, cfg, port, name)
    wait_http_ok("edgeprobe route healthy", api.base + "/-/healthy", procs, interval=0.2)
    return api


def launch_route(
    procs: Procs, config: Path, port: int, name: str, flags: Sequence[str] = ()
) -> RouteAPI:
    """Start ``edgeprobe route`` with ``config`` and the command-line ``flags`` on
    127.0.0.1:``port``; returns at once, before it answers."""
    procs.start(
        name,
        [
            sys.executable,
            "-m",
            "agent",
            "route",
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{port}",
            *flags,
        ],
        cwd=ROOT,
    )
    return RouteAPI(f"http://127.0.0.1:{port}")


def alertmanager_binary() -> str | None:
    return shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


@dataclass(frozen=True)
class MapView:
    """What the main job prints of a map: per region the (edge, eligible, reason) list."""

    regions: tuple[tuple[str, tuple[tuple[str, bool, str], ...]], ...] = ()
    stale: bool = False

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> MapView:
        return cls(
            tuple(
                (r, tuple((e["edge"], e["eligible"], e["reason"]) for e in v["edges"]))
                for r, v in sorted(doc["regions"].items())
            ),
            bool(doc["stale"]),
        )

    @property
    def best(self) -> dict[str, str]:
        return {r: edges[0][0] for r, edges in self.regions if edges}


def render_map(doc: Mapping[str, Any], was: Mapping[str, str]) -> list[str]:
    """One line per region: the ordered edges with eligibility (reason) and RTT p95."""
    lines = []
    for region, r in sorted(doc["regions"].items()):
        parts = []
        for e in r["edges"]:
            rtt = e["score"].get("rtt_p95_ms")
            parts.append(
                f"{e['edge']} {'ok' if e['eligible'] else e['reason'].upper()}"
                + (f" {rtt:g} ms" if rtt is not None else "")
            )
        prev = was.get(region)
        note = f"   (was {prev})" if prev is not None and prev != r["best"] else ""
        lines.append(f"  {region:12} " + "  >  ".join(parts) + note)
    return lines


# -- the main job -----------------------------------------------------------------------------
class Stopped(Exception):
    """SIGINT or SIGTERM arrived."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Supervisor:
    """What ``make run`` runs, one world at a time; everything it starts lives under
    ``run_dir`` (``run/`` by default) and is removed on exit, except ``run_dir/logs``."""

    def __init__(
        self,
        run_dir: Path,
        timing: Timing,
        central_port: int,
        alertmanager: bool,
        out: Callable[[str], None],
    ) -> None:
        self.run_dir = run_dir.resolve()
        self.timing = timing
        self.want_central_port = central_port
        self.want_alertmanager = alertmanager
        self.say = out
        self.logs = self.run_dir / "logs"
        self.prom_dir = self.run_dir / "prometheus"
        self.lab_dir = self.run_dir / "lab"
        self.procs = Procs(self.logs, supervised=True)
        self.world: Any = None
        self.central: PromAPI | None = None
        self.route: RouteAPI | None = None
        self.t0 = time.monotonic()

    # -- bring-up ---------------------------------------------------------------------------
    def _prepare(self) -> None:
        # A world left by a killed run (or `python -m lab up`) in our state dir: take it down.
        if (self.lab_dir / "state.json").exists():
            from lab.topology import World

            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                World.attach(self.lab_dir).down()
        for d in (self.prom_dir, self.lab_dir, self.logs):
            shutil.rmtree(d, ignore_errors=True)
        for d in (self.prom_dir, self.logs):
            d.mkdir(parents=True)

    def _alertmanager(self) -> str | None:
        binary = alertmanager_binary()
        if not self.want_alertmanager or binary is None:
            return None
        port = port_or_free(ALERTMANAGER_PORT)
        cfg = alertmanager_config(self.prom_dir / "alertmanager.yml")
        self.procs.start(
            "alertmanager",
            [
                binary,
                f"--config.file={cfg}",
                f"--storage.path={self.prom_dir / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                # No gossip port: one instance, nothing listening beyond its web port.
                "--cluster.listen-address=",
                "--log.level=warn",
            ],
        )
        wait_http_ok("Alertmanager ready", f"http://127.0.0.1:{port}/-/ready", self.procs)
        return f"127.0.0.1:{port}"

    def _start_agent(self, name: str, config: Path, listen: str, netns: str | None = None) -> str:
        argv = [
            sys.executable,
            "-m",
            "agent",
            "run",
            f"--config.file={config}",
            f"--web.listen-address={listen}",
        ]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.procs.start(name, argv, cwd=ROOT)
        return f"http://{listen}"

    def run_lab(self) -> None:
        from lab.agentconf import agent_config, dump
        from lab.topology import World

        self.say("make run: bringing up the lab (3 regions, edges, edge services)...")
        self.world = World.up(state_dir=self.lab_dir)
        st = self.world.state
        agents: dict[str, str] = {}
        (self.lab_dir / "agents").mkdir(exist_ok=True)
        for region, info in st.regions.items():
            cfg = self.lab_dir / "agents" / f"{region}.yaml"
            cfg.write_text(dump(agent_config(st, region)))
            agents[region] = f"{info.mgmt_addr}:{AGENT_PORT}"
            self._start_agent(f"agent-{region}", cfg, agents[region], netns=info.ns)
        for region, addr in agents.items():
            wait_http_ok(f"agent {region} ready", f"http://{addr}/-/ready", self.procs)
        am = self._alertmanager()
        port = port_or_free(self.want_central_port)
        route_port = port_or_free(ROUTE_PORT)
        self.central = start_central(
            self.procs,
            self.prom_dir,
            PROM_DIR / "rules",
            self.timing,
            port=port,
            alertmanager=am,
            route=f"127.0.0.1:{route_port}",
        )
        regional = {
            r: start_regional(self.procs, self.prom_dir, r, [a], self.central, self.timing)
            for r, a in agents.items()
        }
        for r, p in regional.items():
            wait_http_ok(
                f"regional Prometheus {r} ready", f"http://127.0.0.1:{p}/-/ready", self.procs
            )
        self.route = start_route(self.procs, self.prom_dir, self.central, self.timing, route_port)
        self.say(self._lab_help(st.run_id, agents, regional, am))
        self.watch(len(agents))

    def run_loopback(self, why: str) -> None:
        self.say(f"make run: {why}")
        self.say("make run: falling back to the loopback world (examples/loopback.yaml)")
        port = port_or_free(AGENT_PORT)
        agent = f"127.0.0.1:{port}"
        self._start_agent("agent-loopback", LOOPBACK_CONFIG, agent)
        wait_http_ok("agent ready", f"http://{agent}/-/ready", self.procs)
        lines = [
            "",
            f"Agent: http://{agent}/metrics   (log {self._rel(self.logs)}/agent-loopback.log)",
        ]
        if shutil.which("prometheus") is None:
            lines.append(
                "Prometheus: not installed (Debian package prometheus), so only the agent runs."
            )
            self.say("\n".join([*lines, "Ctrl-C stops it."]))
            self.watch(0)
            return
        am = self._alertmanager()
        port = port_or_free(self.want_central_port)
        route_port = port_or_free(ROUTE_PORT)
        cfg = single_config(
            self.prom_dir / "prometheus.yml",
            PROM_DIR / "rules",
            [agent],
            self.timing,
            am,
            route=f"127.0.0.1:{route_port}",
        )
        self.central = launch_prometheus(
            self.procs,
            "prometheus",
            cfg,
            port,
            NATIVE_HISTOGRAMS,
            f"--storage.tsdb.path={self.prom_dir / 'data'}",
        )
        wait_for("Prometheus ready", self.central.ready, 30, procs=self.procs)
        self.route = start_route(self.procs, self.prom_dir, self.central, self.timing, route_port)
        lines += [
            f"Prometheus (single server, deploy/prometheus/prometheus.yml, with the rules)"
            f": {self.central.base}",
            *self._prom_help(am),
        ]
        self.say("\n".join([*lines, "Ctrl-C stops everything."]))
        self.watch(1)

    # -- what to look at --------------------------------------------------------------------
    def _rel(self, p: Path) -> str:
        with contextlib.suppress(ValueError):
            return str(p.relative_to(Path.cwd()))
        return str(p)

    def _graph(self, expr: str) -> str:
        assert self.central is not None
        return f"{self.central.base}/graph?" + urllib.parse.urlencode(
            {"g0.expr": expr, "g0.tab": "1"}
        )

    def _prom_help(self, am: str | None) -> list[str]:
        assert self.central is not None
        t = self.timing
        timing = (
            f"Demo timing: scrape and evaluate every {t.scrape_interval} (production 15s: "
            "--production-intervals)"
            if t != PRODUCTION
            else "Timing: scrape and evaluate every 15s, as shipped"
        )
        out = (
            [f"  (127.0.0.1:{self.want_central_port} was taken, so it listens on a free port)"]
            if self.central.base != f"http://127.0.0.1:{self.want_central_port}"
            else []
        )
        out += [
            f"  {timing}; rules as shipped:",
            "  best edges in ~30 s, the fast-burn pages after ~5 min, the other alerts after "
            "6-35 min.",
        ]
        if self.route is not None:
            hold = t.route_hold or "5m"
            out += [
                f"Routing map (edgeprobe route, docs/routing.md): {self.route.base}/v1/map",
                f"  a degraded first choice is replaced at once; a better (or restored) edge "
                f"takes over after a {hold} hold",
            ]
        if am:
            out.append(
                f"Alertmanager (deploy/alertmanager routing; its receivers send nowhere): "
                f"http://{am}"
            )
        out += [
            "",
            "What to look at:",
            "  best edge per region:",
            f"    {self._graph('region:edgeprobe_best_edge:info')}",
            "  fraction of connects within the 600 ms budget, per region and edge (5m):",
            f"    {self._graph('region_edge:edgeprobe_connect_within_budget:ratio_rate5m')}",
            f"  alerts: {self.central.base}/alerts",
            f"  from a shell: curl -s {self.central.base}/api/v1/query "
            "--data-urlencode 'query=region:edgeprobe_best_edge:info'",
        ]
        return out

    def _lab_help(
        self, run_id: str, agents: Mapping[str, str], regional: Mapping[str, int], am: str | None
    ) -> str:
        assert self.central is not None
        state = self._rel(self.lab_dir)
        lines = ["", f"Lab {run_id} is up. Agents (one per region, in its namespace):"]
        lines += [f"  {r:12} http://{a}/metrics" for r, a in agents.items()]
        lines += [
            "Regional Prometheus (agent mode: scrapes its region's agent, remote-writes):",
            "  " + "  ".join(f"{r} 127.0.0.1:{p}" for r, p in regional.items()),
        ]
        lines += [
            f"Central Prometheus: {self.central.base}   (rules from deploy/prometheus/rules/)"
        ]
        lines += self._prom_help(am)
        lines += [
            "The lab:",
            f"  .venv/bin/python -m lab truth --state {state}       what the lab really did",
            f"  .venv/bin/python -m lab set --state {state} id-jakarta cgk-1 "
            '\'{"delay": "150ms"}\'',
            "      degrade Jakarta's nearest edge now and watch the best edge move (fra-1 "
            "degrades by itself at t=60 s)",
            f"  .venv/bin/python -m lab exec --state {state} id-jakarta -- "
            ".venv/bin/edgeprobe probe -c 20 198.18.4.1",
            f"Logs: {self._rel(self.logs)}/. Ctrl-C stops everything.",
            "",
        ]
        return "\n".join(lines)

    def watch(self, regions: int) -> None:
        """Until a signal: check the children, and report the routing map and the firing
        alerts whenever they change (never the same line twice)."""
        shown_map: MapView = MapView()
        shown_alerts: set[tuple[str, str, str]] = set()
        while True:
            self.procs.check_alive()
            if self.route is not None:
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    shown_map = self._report_map(shown_map, regions)
            if self.central is not None:
                with contextlib.suppress(OSError, ValueError, AssertionError, KeyError):
                    shown_alerts = self._report_alerts(shown_alerts)
            time.sleep(2)

    def _stamp(self) -> str:
        return f"[+{time.monotonic() - self.t0:4.0f}s]"

    def _report_map(self, shown: MapView, regions: int) -> MapView:
        """Print the map when its decision (per region: the order, eligibility and reasons)
        or its staleness changes; scores alone do not reprint it."""
        assert self.route is not None
        doc = self.route.map()
        if doc is None:
            return shown
        view = MapView.of(doc)
        if view == shown or len(view.regions) < regions:
            return shown
        if view.regions == shown.regions:
            what = (
                (
                    "STALE (edgeprobe route cannot query Prometheus; it keeps serving the "
                    "last good map)"
                )
                if view.stale
                else "fresh again"
            )
            self.say(f"{self._stamp()} routing map is {what}")
            return view
        self.say(
            f"{self._stamp()} routing map (edgeprobe route): best edge per region, then "
            f"the fallbacks{' [STALE]' if view.stale else ''}"
        )
        for line in render_map(doc, shown.best):
            self.say(line)
        return view

    def _report_alerts(self, shown: set[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
        assert self.central is not None
        now = {
            (a["labels"]["alertname"], a["labels"].get("region", ""), a["labels"].get("edge", ""))
            for a in self.central.alerts()
        }
        for name, region, edge in sorted(now - shown):
            self.say(f"{self._stamp()} firing: {name} {region}{'/' + edge if edge else ''}")
        for name, region, edge in sorted(shown - now):
            self.say(f"{self._stamp()} resolved: {name} {region}{'/' + edge if edge else ''}")
        return now

    # -- teardown -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop everything, each step bounded; remove the state but keep the logs."""
        self.procs.stop_tiers(
            [["prometheus-agent-"], ["edgeprobe-route"], ["prometheus", "alertmanager"], ["agent-"]]
        )
        from lab.topology import iter_states, teardown

        if self.world is not None:
            self.world.down()
        # A world whose World.up was interrupted before it returned is still ours.
        for st in iter_states():
            if st.owner_pid == os.getpid():
                teardown(st)
        if self.lab_dir.is_dir():
            for log in self.lab_dir.glob("*.log"):
                with contextlib.suppress(OSError):
                    shutil.copy(log, self.logs / f"lab-{log.name}")
        shutil.rmtree(self.lab_dir, ignore_errors=True)
        shutil.rmtree(self.prom_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m lab.stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--run-dir",
        default=os.environ.get("EDGEPROBE_RUN_DIR", "run"),
        help="state directory (default run/; removed on exit except logs/)",
    )
    ap.add_argument(
        "--lab",
        choices=("auto", "off"),
        default="off" if os.environ.get("EDGEPROBE_LAB") == "0" else "auto",
    )
    ap.add_argument(
        "--prometheus-port",
        type=int,
        default=CENTRAL_PORT,
        help="central Prometheus port on 127.0.0.1 (a free one if taken)",
    )
    ap.add_argument(
        "--production-intervals",
        action="store_true",
        help="scrape and evaluate every 15s as shipped (default: 5s for the demo)",
    )
    ap.add_argument("--no-alertmanager", action="store_true")
    a = ap.parse_args(argv)

    def out(line: str) -> None:
        print(line, flush=True)

    sup = Supervisor(
        Path(a.run_dir),
        PRODUCTION if a.production_intervals else DEMO,
        a.prometheus_port,
        not a.no_alertmanager,
        out,
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise Stopped(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        sup._prepare()
        why = "EDGEPROBE_LAB=0" if a.lab == "off" else ""
        if not why:
            from lab.topology import lab_available

            ok, reason = lab_available()
            why = "" if ok else f"the lab is not available here ({reason})"
        if why:
            sup.run_loopback(why)
        else:
            sup.run_lab()
    except Stopped as s:
        code = 128 + s.signum
    except AssertionError as e:  # a child died or never became ready
        print(f"make run: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        # Further signals must not interrupt the teardown; every step of it is bounded.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        out("\nmake run: stopping Prometheus, the agents and the lab")
        sup.stop()
        out(f"make run: stopped; logs in {sup._rel(sup.logs)}/")
    return code


if __name__ == "__main__":
    sys.exit(main())
