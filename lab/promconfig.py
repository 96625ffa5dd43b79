"""Configs rendered from deploy/ for the stack's servers: the shipped Prometheus configs per tier
and region (only addresses, ports, storage and, see ``Timing``, intervals change), the
Alertmanager config that sends nowhere, and ``edgeprobe route``'s config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lab.prom import PromAPI

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "deploy" / "prometheus"
AM_FILE = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
# Every Prometheus here runs as deploy/ ships them: native histograms on (scraped in the
# protobuf format, remote-written with send_native_histograms, stored native by the central one).
NATIVE_HISTOGRAMS = "--enable-feature=native-histograms"


@dataclass(frozen=True)
class Timing:
    """Scrape and rule-evaluation intervals; ``None`` keeps the shipped value. Rule windows
    and ``for:`` clauses are in the rule files and never change here."""

    scrape_interval: str | None = None
    scrape_timeout: str | None = None
    evaluation_interval: str | None = None
    remote_write_queue: Mapping[str, str] = field(default_factory=dict)
    # edgeprobe route's query interval and hold time (docs/routing.md); None: its defaults.
    route_interval: str | None = None
    route_hold: str | None = None


PRODUCTION = Timing()
# The main job: 5 s instead of 15 s, so the first best edges show within a minute; a 1-minute
# hold instead of 5, so a restored edge wins its region back while one watches.
DEMO = Timing(scrape_interval="5s", evaluation_interval="5s", route_interval="5s", route_hold="1m")
ROUTE_JOB = "edgeprobe-route"


def _apply_timing(cfg: dict[str, Any], timing: Timing) -> None:
    g = cfg.setdefault("global", {})
    for key in ("scrape_interval", "scrape_timeout", "evaluation_interval"):
        value = getattr(timing, key)
        if value is not None:
            g[key] = value


def _alerting(cfg: dict[str, Any], alertmanager: str | None) -> None:
    if alertmanager is None:
        cfg.pop("alerting", None)  # /api/v1/alerts and /alerts still show the state
    else:
        cfg["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [alertmanager]}]


def _scrape_route(cfg: dict[str, Any], route: str | None) -> None:
    """Point the route job (``edgeprobe-route``) at ``route``: the central Prometheus scrapes
    the route service, whose decision region:edgeprobe_best_edge:info records."""
    jobs = [j for j in cfg["scrape_configs"] if j.get("job_name") != ROUTE_JOB]
    if route is not None:
        jobs.append({"job_name": ROUTE_JOB, "static_configs": [{"targets": [route]}]})
    cfg["scrape_configs"] = jobs


def central_config(
    path: Path,
    rules_dir: Path,
    self_addr: str,
    timing: Timing,
    alertmanager: str | None = None,
    route: str | None = None,
) -> Path:
    """deploy/prometheus/central.yml with the rules of ``rules_dir``, this address and the
    route service at ``route`` (host:port)."""
    cfg = yaml.safe_load((PROM_DIR / "central.yml").read_text())
    _apply_timing(cfg, timing)
    cfg["rule_files"] = [str(rules_dir / "*.yml")]
    _alerting(cfg, alertmanager)
    cfg["scrape_configs"][0]["static_configs"] = [{"targets": [self_addr]}]
    _scrape_route(cfg, route)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def regional_config(
    path: Path, region: str, agents: Sequence[str], write_url: str, timing: Timing
) -> Path:
    """deploy/prometheus/regional-agent.yml for one region: its agents, its external label,
    the central server's remote-write URL."""
    cfg = yaml.safe_load((PROM_DIR / "regional-agent.yml").read_text())
    _apply_timing(cfg, timing)
    cfg["global"].pop("evaluation_interval", None)  # agent mode evaluates nothing
    cfg["global"]["external_labels"]["region"] = region
    cfg["scrape_configs"][0]["static_configs"] = [{"targets": list(agents)}]
    rw = cfg["remote_write"][0]
    rw["url"] = write_url
    rw["queue_config"].update(timing.remote_write_queue)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def single_config(
    path: Path,
    rules_dir: Path,
    agents: Sequence[str],
    timing: Timing,
    alertmanager: str | None = None,
    route: str | None = None,
) -> Path:
    """deploy/prometheus/prometheus.yml (one server scrapes the agents and holds the rules)."""
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    _apply_timing(cfg, timing)
    cfg["rule_files"] = [str(rules_dir / "*.yml")]
    _alerting(cfg, alertmanager)
    cfg["scrape_configs"][0]["static_configs"] = [{"targets": list(agents)}]
    _scrape_route(cfg, route)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def alertmanager_config(path: Path) -> Path:
    """deploy/alertmanager/alertmanager.yml with its routing, grouping and inhibition, and
    every receiver stripped of its integrations: alerts show in the UI and go nowhere (the
    shipped webhooks point at placeholder hosts)."""
    cfg = yaml.safe_load(AM_FILE.read_text())
    cfg["receivers"] = [{"name": r["name"]} for r in cfg["receivers"]]
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def route_config(
    path: Path, prometheus: PromAPI, workdir: Path, timing: Timing, **policy: Any
) -> Path:
    """The route service's config: this Prometheus, state under ``workdir``, the timing's
    query interval and hold, and any other ``policy`` settings."""
    cfg: dict[str, Any] = {
        "prometheus": {"url": prometheus.base},
        "policy": dict(policy),
        "map": {
            "state_file": str(workdir / "route-state" / "map.json"),
            "output_file": str(workdir / "route-out" / "map.json"),
        },
    }
    if timing.route_interval is not None:
        cfg["prometheus"]["interval"] = timing.route_interval
    if timing.route_hold is not None:
        cfg["policy"].setdefault("hold", timing.route_hold)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
