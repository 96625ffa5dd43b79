"""The Agent: config → scheduler → probe → stats → collector, and the reload path.

A reload parses and validates the whole new config before touching anything; a failed reload
keeps the running config and state. Series whose identity is unchanged keep their stats, so
counters continue without a gap or reset; removed series disappear; added ones start at zero.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from agent.config import load as cfgmod
from agent.config.decode import ConfigError
from agent.config.model import Config, Job
from agent.discovery.groups import DiscoveredTarget, merge_targets
from agent.discovery.manager import Discovery
from agent.export import catalog as C
from agent.export import protobuf
from agent.export.collector import AgentCollector, CollectorState, SeriesView
from agent.runtime.scheduler import Done, Scheduler, loop_lag_monitor
from agent.runtime.selfstats import SelfStats
from agent.runtime.stats import SeriesShape, new_series
from agent.server.guard import WebGuard
from agent.server.probe.handler import ProbeEndpoint, modules_from_defaults
from agent.server.webconfig import WebConfigError
from probes import PROBES
from probes.base import ProbeContext, ProbeResult, Resources, RunHandle

log = logging.getLogger("edgeprobe.agent")


@dataclass
class Agent:
    config: Config
    config_path: Path | None = None
    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=False)
    )
    self_stats: SelfStats = field(default_factory=SelfStats)
    ready: bool = False
    web_guard: WebGuard | None = None  # reloaded together with the config

    def __post_init__(self) -> None:
        # The config as loaded from the file; self.config adds the discovered targets to it.
        self.file_config = self.config
        self.discovery: Discovery | None = None
        self.discovered: dict[str, list[DiscoveredTarget]] = {}
        self.discovered_dropped = 0
        self._in_reload = False
        self.probe_endpoint: ProbeEndpoint | None = None
        self.state = self._state_for(self.config)
        self.registry.register(AgentCollector(self.state))
        # One of each resource a registered kind needs: /probe may run any kind.
        self.resources = Resources(counters=self.self_stats)
        for kind in PROBES.values():
            for need in kind.needs:
                self.resources.need(need)
        self.resources.configure(self.config.agent, _addresses(self.config))
        self.ctx = ProbeContext(
            resources=self.resources,
            counters=self.self_stats,
            budget=self.config.agent.budget,
            log=logging.getLogger("edgeprobe.probe"),
        )
        self.scheduler = Scheduler(
            _KindRunner(self),
            stats=self.self_stats,
            late_threshold=self.config.agent.late_tick_threshold,
        )
        self._bg: list[asyncio.Task[None]] = []
        self._failing: dict[tuple[str, str], bool] = {}
        self._on_failure = tuple(n for n, k in PROBES.items() if k.run_on_target_failure)
        self._reload_lock = asyncio.Lock()
        features = _FeatureCollector(self)
        self.registry.register(features)
        # Everything but the per-target families, which /metrics renders on its fast path.
        self.aux_registry = CollectorRegistry(auto_describe=False)
        self.aux_registry.register(features)
        self._update_probe_endpoint(self.config, None)
        self.self_stats.reload_ok = 1.0
        self.self_stats.reload_success_time = time.time()

    def render_metrics(self) -> Iterator[bytes]:
        """The text exposition of ``self.registry`` as chunks to write in order, with the
        per-target families rendered directly from state (an order of magnitude faster than
        building Metric objects). The state is read now; the chunks are rendered as they
        are taken, so the whole body is never in memory at once."""
        return itertools.chain(self.state.render_text(), (generate_latest(self.aux_registry),))

    def render_metrics_protobuf(self) -> Iterator[bytes]:
        """``render_metrics`` in the protobuf exposition format, native buckets included."""
        return itertools.chain(
            self.state.render_protobuf(), (protobuf.encode(self.aux_registry.collect()),)
        )

    # ------------------------------------------------------------------ wiring
    def _state_for(self, cfg: Config) -> CollectorState:
        a = cfg.agent
        return CollectorState(
            region=a.region,
            agent_labels=dict(a.labels),
            target_label_keys=cfg.target_label_keys,
            budget=a.budget,
            round_trips=a.model.round_trips,
            fixed=a.model.fixed,
            exchanges=a.model.exchanges,
            full=cfg.metrics.full,
            self_stats=self.self_stats,
        )

    def _new_view(self, job: Job, cfg: Config) -> SeriesView:
        kind = PROBES[job.kind]
        m = cfg.metrics
        stats = new_series(
            kind.packet_based,
            kind.phases,
            kind.all_reasons,
            SeriesShape(m.rtt, m.durations, m.phases, m.recent_window, m.native_histograms, m.full),
        )
        return SeriesView(
            edge=job.target.name, kind=job.kind, labels=dict(job.target.labels), stats=stats
        )

    def _views_for(
        self, cfg: Config, old: dict[tuple[str, str], SeriesView] | None, same_identity: bool
    ) -> dict[tuple[str, str], SeriesView]:
        views = {}
        for job in cfg.jobs:
            prev = old.get(job.key) if old else None
            if prev is not None and same_identity and prev.labels == dict(job.target.labels):
                views[job.key] = prev
            else:
                views[job.key] = self._new_view(job, cfg)
        return views

    def _record(self, job: Job, result: ProbeResult) -> None:
        key = job.key
        view = self.state.series.get(key)
        if view is not None:
            view.stats.record(result, time.monotonic())
        kind = PROBES[job.kind]
        if not kind.run_on_target_failure:
            failing = kind.failed(result)
            was = self._failing.get(key, False)
            if failing != was:
                self._failing[key] = failing
            if failing and not was:
                # A series of this edge just started failing: run the kinds that report on
                # a failure now, while it is happening.
                for name in self._on_failure:
                    self.scheduler.trigger((job.target.name, name))

    # --------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        await self._update_discovery(self.file_config, force=True)
        self.config = self._effective(self.file_config)
        self._apply_state_identity(self.config)
        self.state.series = self._views_for(self.config, None, True)
        self.scheduler.apply(self.config.jobs)
        _freeze_heap()
        self._bg.append(
            asyncio.get_running_loop().create_task(
                loop_lag_monitor(self.self_stats), name="loop-lag"
            )
        )
        # Open what the configured kinds need now, so start-up logs what it got and why.
        self.resources.open(PROBES[k] for k in dict.fromkeys(j.kind for j in self.config.jobs))
        self.self_stats.info = self.resources.info()
        self.ready = True
        log.info(
            "agent started",
            extra={
                "region": self.config.agent.region,
                "series": len(self.config.jobs),
                **self.self_stats.info,
            },
        )

    async def stop(self, grace: float = 3.0) -> None:
        self.ready = False
        if self.discovery is not None:
            await self.discovery.stop()
        await self.scheduler.stop(grace)
        for t in self._bg:
            t.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)
        self._bg.clear()
        self.resources.close()

    async def reload(self, new: Config | None = None) -> tuple[bool, str]:
        """Load (unless given) and apply a new config. Never raises for a bad config."""
        async with self._reload_lock:
            self.self_stats.reloads_total += 1
            if new is None:
                if self.config_path is None:
                    return False, "no config file to reload"
                try:
                    new = await cfgmod.load_isolated(self.config_path)
                except ConfigError as e:
                    self.self_stats.reload_ok = 0.0
                    self.self_stats.reload_failures_total += 1
                    log.error(
                        "config reload failed; keeping the running config", extra={"error": str(e)}
                    )
                    return False, str(e)
            if self.web_guard is not None:
                # Validated (and swapped atomically) before the agent config changes.
                try:
                    self.web_guard.reload()
                except WebConfigError as e:
                    self.self_stats.reload_ok = 0.0
                    self.self_stats.reload_failures_total += 1
                    log.error(
                        "web config reload failed; keeping the running config",
                        extra={"error": str(e)},
                    )
                    return False, str(e)
            self._in_reload = True
            try:
                await self._update_discovery(new)
                self.apply(new)
            finally:
                self._in_reload = False
            self.self_stats.reload_ok = 1.0
            self.self_stats.reload_success_time = time.time()
            log.info("config reloaded", extra={"series": len(new.jobs)})
            return True, ""

    def apply(self, file_config: Config) -> None:
        """Apply a validated file config plus the currently discovered targets."""
        self.file_config = file_config
        new = self._effective(file_config)
        old = self.config
        self._update_probe_endpoint(new, old)
        # Another bucket layout or detail is another series shape: start them afresh
        # (Prometheus reads it as a counter reset).
        same_identity = (
            new.agent.region == old.agent.region
            and new.agent.labels == old.agent.labels
            and new.target_label_keys == old.target_label_keys
            and new.metrics == old.metrics
        )
        views = self._views_for(new, self.state.series, same_identity)
        state = self._state_for(new)
        # Swap the state in place: the registered collector keeps pointing at self.state.
        for f in dataclasses.fields(CollectorState):
            if f.name not in ("series", "self_stats"):
                setattr(self.state, f.name, getattr(state, f.name))
        self.state.series = views
        self.ctx.budget = new.agent.budget
        self.scheduler.late_threshold = new.agent.late_tick_threshold
        self.resources.configure(new.agent, _addresses(new))
        self.config = new
        self.scheduler.apply(new.jobs)
        _freeze_heap()

    # ------------------------------------------------------- optional features
    def _apply_state_identity(self, cfg: Config) -> None:
        state = self._state_for(cfg)
        self.state.region = state.region
        self.state.agent_labels = state.agent_labels
        self.state.target_label_keys = state.target_label_keys

    def _effective(self, cfg: Config) -> Config:
        """``cfg`` plus one job per (discovered target, kind). Names in the file win; the
        total stays within agent.max_targets (discovered jobs beyond it are dropped)."""
        if self.discovery is None or not self.discovered:
            self.discovered_dropped = 0
            return cfg
        defaults = cfg.defaults
        order = [s.state.name for s in self.discovery.sources]
        targets = merge_targets(
            (self.discovered.get(n, []) for n in order),
            taken={j.target.name: None for j in cfg.jobs},
        )
        room = cfg.agent.max_targets - len(cfg.jobs)
        jobs: list[Job] = []
        dropped = 0
        for dt in targets:
            for kind in dt.probes:
                if kind not in PROBES:
                    continue
                if len(jobs) >= room:
                    dropped += 1
                    continue
                opts = defaults.get(kind) or PROBES[kind].options()
                if dt.port is not None and "port" in {f.name for f in dataclasses.fields(opts)}:
                    opts = dataclasses.replace(opts, port=dt.port)
                jobs.append(Job(target=dt.target, kind=kind, options=opts))
        if dropped and dropped != self.discovered_dropped:
            log.warning(
                "discovered targets exceed agent.max_targets; some are not probed",
                extra={"dropped_series": dropped},
            )
        self.discovered_dropped = dropped
        return dataclasses.replace(cfg, jobs=cfg.jobs + tuple(jobs))

    def _on_discovery(self, source: str, targets: list[DiscoveredTarget]) -> None:
        self.discovered[source] = targets
        if self.ready and not self._in_reload:
            self.apply(self.file_config)

    async def _update_discovery(self, cfg: Config, force: bool = False) -> None:
        """(Re)start discovery when its config section changed; keep it running otherwise."""
        new = cfg.discovery
        old = self.discovery.cfg if self.discovery is not None else None
        if not force and new == old:
            return
        if self.discovery is not None:
            await self.discovery.stop()
            self.discovery = None
        self.discovered = {}
        if new is not None and new.sources():
            base = self.config_path.parent if self.config_path is not None else Path(".")
            self.discovery = Discovery(new, self._on_discovery, base_dir=base)
            await self.discovery.start()

    def _update_probe_endpoint(self, new: Config, old: Config | None) -> None:
        cfg = new.probe_endpoint
        if (
            old is not None
            and self.probe_endpoint is not None
            and cfg == old.probe_endpoint
            and new.defaults == old.defaults
        ):
            return  # unchanged: keep the rate-limit state
        if cfg is None or not cfg.enabled:
            self.probe_endpoint = None
            return
        self.probe_endpoint = ProbeEndpoint(
            cfg, PROBES, modules_from_defaults(new.defaults), self.ctx
        )


class _KindRunner:
    """The scheduler's runner: each job through its kind's entry points in ``PROBES``, and
    each result into the agent."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def start(self, job: Job, done: Done) -> RunHandle | None:
        start = PROBES[job.kind].start
        return None if start is None else start(job.target, job.options, self.agent.ctx, done)

    async def run(self, job: Job) -> ProbeResult:
        return await PROBES[job.kind].run(job.target, job.options, self.agent.ctx)

    def self_bounded(self, job: Job) -> bool:
        return PROBES[job.kind].self_bounded

    def record(self, job: Job, result: ProbeResult) -> None:
        self.agent._record(job, result)


def _addresses(cfg: Config) -> set[str]:
    return {j.target.address for j in cfg.jobs}


def _freeze_heap() -> None:
    """Exempt what is alive now (config, series state: it lives as long as the config) from
    the cyclic garbage collector. Otherwise the full collections that the per-probe churn
    triggers every few seconds traverse every series' state, a large share of the CPU with
    thousands of series (see docs/development/performance.md). What an earlier freeze
    exempted is collected first (unfreeze, collect), so that the state of targets a reload
    removed cannot stay behind as frozen cycles; a reload is rare enough to pay for one full
    collection."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class _FeatureCollector:
    """Metrics of the optional features, read from the agent at scrape time (the objects
    behind them are replaced on reload)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterable[Metric]:
        a = self.agent
        if a.discovery is not None:
            yield from a.discovery.collect()
            g = C.metric_family(C.SD_DROPPED)
            g.add_metric([], float(a.discovered_dropped))
            yield g
        if a.probe_endpoint is not None:
            yield from a.probe_endpoint.collect()
        if a.web_guard is not None:
            yield from a.web_guard.collect()
