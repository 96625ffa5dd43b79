"""Counters and gauges about the agent itself (scheduler lateness, loop lag, reloads, stray
replies), kept by the runtime and exported by the collector."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.export import catalog as C
from agent.runtime.stats import Histogram


@dataclass
class SelfStats:
    """Agent-wide counters and gauges about the agent itself."""

    stray_counts: dict[tuple[str, str], int] = field(default_factory=dict)
    late_ticks: int = 0
    skipped_ticks: int = 0
    run_exceptions: int = 0
    lateness: Histogram = field(default_factory=lambda: Histogram(C.SCHEDULER_BUCKETS, True))
    loop_lag: Histogram = field(default_factory=lambda: Histogram(C.SCHEDULER_BUCKETS, True))
    reload_ok: float = 1.0
    reload_success_time: float = 0.0
    reloads_total: int = 0
    reload_failures_total: int = 0
    # Facts the shared probe resources report (e.g. icmp_mode), for edgeprobe_build_info.
    info: dict[str, str] = field(default_factory=dict)

    def stray(self, probe: str, reason: str, n: int = 1) -> None:
        key = (probe, reason)
        self.stray_counts[key] = self.stray_counts.get(key, 0) + n
