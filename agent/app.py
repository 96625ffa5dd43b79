"""The Agent: config → scheduler → probe → stats → collector, and the reload path.

A reload parses and validates the whole new config before touching anything; a failed reload
keeps the running config and state. Series whose identity is unchanged keep their stats, so
counters continue without a gap or reset; removed series disappear; added ones start at zero.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from agent import config as cfgmod
from agent.collector import AgentCollector, CollectorState, SelfStats, SeriesView
from agent.config import Config, Job
from agent.decode import ConfigError
from agent.scheduler import Scheduler, loop_lag_monitor
from agent.stats import new_series
from probes import PROBES
from probes.base import ProbeContext, ProbeResult
from probes.icmp import IcmpEngines
from probes.resolve import Resolver

log = logging.getLogger("edgeprobe.agent")


@dataclass
class Agent:
    config: Config
    config_path: Path | None = None
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(
        auto_describe=False))
    self_stats: SelfStats = field(default_factory=SelfStats)
    ready: bool = False

    def __post_init__(self) -> None:
        self.state = self._state_for(self.config)
        self.registry.register(AgentCollector(self.state))
        self.icmp = IcmpEngines(mode=self.config.agent.icmp_mode, counters=self.self_stats)
        self.resolver = Resolver(ttl=self.config.agent.resolve_interval)
        self.ctx = ProbeContext(icmp=self.icmp, resolver=self.resolver,
                                counters=self.self_stats, budget=self.config.agent.budget,
                                log=logging.getLogger("edgeprobe.probe"))
        self.scheduler = Scheduler(call=self._call, record=self._record, stats=self.self_stats,
                                   late_threshold=self.config.agent.late_tick_threshold)
        self._bg: list[asyncio.Task[None]] = []
        self._reload_lock = asyncio.Lock()
        self.self_stats.reload_ok = 1.0
        self.self_stats.reload_success_time = time.time()

    # ------------------------------------------------------------------ wiring
    def _state_for(self, cfg: Config) -> CollectorState:
        a = cfg.agent
        return CollectorState(region=a.region, agent_labels=dict(a.labels),
                              target_label_keys=cfg.target_label_keys, budget=a.budget,
                              round_trips=a.model.round_trips, fixed=a.model.fixed,
                              exchanges=a.model.exchanges, self_stats=self.self_stats)

    def _new_view(self, job: Job, cfg: Config) -> SeriesView:
        kind = PROBES[job.kind]
        stats = new_series(kind.packet_based, kind.phases, kind.all_reasons,
                           cfg.metrics.rtt, cfg.metrics.durations, cfg.metrics.recent_window)
        return SeriesView(edge=job.target.name, kind=job.kind, labels=dict(job.target.labels),
                          stats=stats)

    def _views_for(self, cfg: Config, old: dict[tuple[str, str], SeriesView] | None,
                   same_identity: bool) -> dict[tuple[str, str], SeriesView]:
        views = {}
        for job in cfg.jobs:
            prev = old.get(job.key) if old else None
            if prev is not None and same_identity and prev.labels == dict(job.target.labels):
                views[job.key] = prev
            else:
                views[job.key] = self._new_view(job, cfg)
        return views

    async def _call(self, job: Job) -> ProbeResult:
        kind = PROBES[job.kind]
        return await kind.run(job.target, job.options, self.ctx)

    def _record(self, job: Job, result: ProbeResult) -> None:
        view = self.state.series.get(job.key)
        if view is not None:
            view.stats.record(result, time.monotonic())

    # --------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self.state.series = self._views_for(self.config, None, True)
        self.scheduler.apply(self.config.jobs)
        self._bg.append(asyncio.get_running_loop().create_task(
            loop_lag_monitor(self.self_stats), name="loop-lag"))
        # Open the ICMP sockets now, so start-up logs which mode we got and why.
        if any(j.kind in ("icmp", "path") for j in self.config.jobs):
            import socket
            for fam in (socket.AF_INET, socket.AF_INET6):
                self.icmp.get(fam)
        self.self_stats.icmp_mode = self.icmp.describe()
        self.ready = True
        log.info("agent started", extra={"region": self.config.agent.region,
                                         "series": len(self.config.jobs),
                                         "icmp_mode": self.self_stats.icmp_mode})

    async def stop(self, grace: float = 3.0) -> None:
        self.ready = False
        await self.scheduler.stop(grace)
        for t in self._bg:
            t.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)
        self._bg.clear()
        self.icmp.close()

    async def reload(self, new: Config | None = None) -> tuple[bool, str]:
        """Load (unless given) and apply a new config. Never raises for a bad config."""
        async with self._reload_lock:
            self.self_stats.reloads_total += 1
            if new is None:
                if self.config_path is None:
                    return False, "no config file to reload"
                try:
                    new = cfgmod.load(self.config_path)
                except ConfigError as e:
                    self.self_stats.reload_ok = 0.0
                    self.self_stats.reload_failures_total += 1
                    log.error("config reload failed; keeping the running config",
                              extra={"error": str(e)})
                    return False, str(e)
            self.apply(new)
            self.self_stats.reload_ok = 1.0
            self.self_stats.reload_success_time = time.time()
            log.info("config reloaded", extra={"series": len(new.jobs)})
            return True, ""

    def apply(self, new: Config) -> None:
        old = self.config
        same_identity = (new.agent.region == old.agent.region
                         and new.agent.labels == old.agent.labels
                         and new.target_label_keys == old.target_label_keys)
        views = self._views_for(new, self.state.series, same_identity)
        state = self._state_for(new)
        # Swap the state in place: the registered collector keeps pointing at self.state.
        self.state.region = state.region
        self.state.agent_labels = state.agent_labels
        self.state.target_label_keys = state.target_label_keys
        self.state.budget = state.budget
        self.state.round_trips = state.round_trips
        self.state.fixed = state.fixed
        self.state.exchanges = state.exchanges
        self.state.series = views
        self.ctx.budget = new.agent.budget
        self.scheduler.late_threshold = new.agent.late_tick_threshold
        if new.agent.icmp_mode != old.agent.icmp_mode:
            self.icmp.close()
            self.icmp.mode = new.agent.icmp_mode
            self.icmp.failures.clear()
        self.resolver.ttl = new.agent.resolve_interval
        self.resolver.forget({j.target.address for j in new.jobs})
        self.config = new
        self.scheduler.apply(new.jobs)
