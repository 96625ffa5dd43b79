"""The agent's config: sections with their defaults and validation, the scheduled jobs, and the
config as a whole (decoded by :mod:`agent.config.load`)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from agent.config.decode import Duration, Problem
from agent.config.rules import NAME_RULE, RESERVED_LABELS, is_label_name, is_name
from probes.base import CommonOptions, Target

if TYPE_CHECKING:
    from agent.discovery.config import DiscoveryConfig
    from agent.server.probe.config import ProbeEndpointConfig

DEFAULT_MAX_TARGETS = 10000

# Classic buckets. With native histograms (the protobuf format), the native buckets give the
# quantiles; the classic ones only need to answer "within the budget" (exactly 0.6 is a bound)
# and give a coarse shape to servers without native histograms, where histogram_quantile lands
# within one bucket. Lean: 14 bounds (17 series per histogram). A row per decade of seconds.
# fmt: off
LEAN_RTT_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005,
    0.01, 0.02, 0.035, 0.05, 0.075,
    0.1, 0.15, 0.25, 0.4, 0.6,
    1.0,
)
LEAN_DURATION_BUCKETS: tuple[float, ...] = (
    0.025, 0.05,
    0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75,
    1.0, 2.0, 5.0,
)
# fmt: on


# Dense: 0.5 ms … 5 s. Between 5 ms and 1 s, where edge RTTs live, boundaries are 3.9 % apart:
# even when every sample of a narrow distribution sits at one end of a bucket, histogram_quantile's
# linear interpolation lands at most half a bucket (<2 %) from the true quantile, for servers that
# cannot take native histograms. Cost: 158 series per histogram. Cached: every series' histogram
# shares the one tuple (a tuple of fresh floats per series was 44 MB at 10,000 targets).
@functools.cache
def dense_rtt_buckets() -> tuple[float, ...]:
    out: list[float] = [0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004]
    b = 0.005
    while b < 1.0:
        out.append(float(f"{b:.4g}"))
        b *= 1.039
    out += [1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 0.6]
    return tuple(sorted(set(out)))


# Dense connect/phase durations: coarser than RTT, dense around the budget.
# fmt: off
DENSE_DURATION_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 0.9,
    1.0, 1.25, 1.5, 2.0, 3.0, 5.0,
    10.0,
)
# fmt: on


@dataclass(frozen=True)
class ModelConfig:
    """The connect-time model (see agent/runtime/model.py). Defaults: a cold connect (DNS, TCP,
    TLS 1.3, STUN, DTLS 1.2, half an RTT to first media) has ~7.5 round trips on its critical
    path and ~100 ms of fixed processing; E = 4 critical-path exchanges whose loss costs a
    retransmit timer larger than the slack."""

    round_trips: float = 7.5
    fixed: Duration = Duration(0.1)
    exchanges: int = 4

    def validate(self) -> list[Problem]:
        errs: list[Problem] = []
        if not 0 < self.round_trips <= 50:
            errs.append(Problem("round_trips", "must be in (0, 50]"))
        if not 1 <= self.exchanges <= 50:
            errs.append(Problem("exchanges", "must be in [1, 50]"))
        return errs


@dataclass(frozen=True)
class AgentSection:
    region: str
    labels: dict[str, str] = field(default_factory=dict)
    budget: Duration = Duration(0.6)
    max_targets: int = DEFAULT_MAX_TARGETS
    icmp_mode: Literal["auto", "privileged", "unprivileged"] = "auto"
    resolve_interval: Duration = Duration(60.0)
    late_tick_threshold: Duration = Duration(0.005)
    model: ModelConfig = field(default_factory=ModelConfig)

    def validate(self) -> list[Problem]:
        errs: list[Problem] = []
        if not is_name(self.region):
            errs.append(Problem("region", f"must be {NAME_RULE}"))
        errs += check_labels(self.labels, "labels")
        if not 0 < self.budget <= 60:
            errs.append(Problem("budget", "must be in (0s, 60s]"))
        if not 1 <= self.max_targets <= 1_000_000:
            errs.append(Problem("max_targets", "must be in [1, 1000000]"))
        if self.resolve_interval < 1:
            errs.append(Problem("resolve_interval", "must be >= 1s"))
        return errs


@dataclass(frozen=True)
class MetricsSection:
    rtt_buckets: tuple[float, ...] = ()
    duration_buckets: tuple[float, ...] = ()
    # lean: few classic buckets, the native ones carry the resolution; dense: classic buckets
    # fine enough for 2 % quantiles, for Prometheus servers without native histograms.
    classic_buckets: Literal["lean", "dense"] = "lean"
    # lean: what the rules, alerts and dashboards use; full: also the IPDV and loss-burst
    # histograms, the window's loss bound and size, the E-model's R factor and MOS, and every
    # error reason's series before its first error.
    detail: Literal["lean", "full"] = "lean"
    recent_window: Duration = Duration(60.0)
    # Native (exponential) buckets beside the classic ones on the RTT, duration and phase
    # histograms, sent to scrapers that ask for the protobuf format (Prometheus with native
    # histograms enabled); the text format carries the classic buckets only.
    native_histograms: bool = True

    def validate(self) -> list[Problem]:
        errs: list[Problem] = []
        for key, b in (
            ("rtt_buckets", self.rtt_buckets),
            ("duration_buckets", self.duration_buckets),
        ):
            if b and (list(b) != sorted(set(b)) or b[0] <= 0):
                errs.append(Problem(key, "must be strictly increasing positive numbers"))
            if len(b) > 200:
                errs.append(Problem(key, "at most 200 buckets"))
        if not 5 <= self.recent_window <= 3600:
            errs.append(Problem("recent_window", "must be between 5s and 1h"))
        return errs

    @property
    def rtt(self) -> tuple[float, ...]:
        if self.rtt_buckets:
            return self.rtt_buckets
        return dense_rtt_buckets() if self.classic_buckets == "dense" else LEAN_RTT_BUCKETS

    @property
    def durations(self) -> tuple[float, ...]:
        if self.duration_buckets:
            return self.duration_buckets
        return DENSE_DURATION_BUCKETS if self.classic_buckets == "dense" else LEAN_DURATION_BUCKETS

    @property
    def phases(self) -> tuple[float, ...]:
        """Phase histograms: no classic buckets when lean (count and sum give the mean; the
        native buckets the distribution): five phases of a connect would cost 85 series."""
        if self.duration_buckets or self.classic_buckets == "dense":
            return self.durations
        return ()

    @property
    def full(self) -> bool:
        return self.detail == "full"


@dataclass(frozen=True)
class Job:
    """One scheduled series: a target probed by one kind with its resolved options."""

    target: Target
    kind: str
    options: CommonOptions

    @property
    def key(self) -> tuple[str, str]:
        return (self.target.name, self.kind)


@dataclass(frozen=True)
class Config:
    agent: AgentSection
    metrics: MetricsSection
    jobs: tuple[Job, ...]
    source: str = "<config>"
    # Options per kind for targets that do not come from this file (discovery, /probe).
    defaults: Mapping[str, CommonOptions] = field(default_factory=dict)
    discovery: DiscoveryConfig | None = None
    probe_endpoint: ProbeEndpointConfig | None = None

    @property
    def target_label_keys(self) -> tuple[str, ...]:
        keys: dict[str, None] = {}
        for j in self.jobs:
            keys.update(dict.fromkeys(j.target.labels))
        return tuple(sorted(keys))


def check_labels(labels: dict[str, str], key: str) -> list[Problem]:
    errs: list[Problem] = []
    for k in labels:
        if not is_label_name(k) or k.startswith("__"):
            errs.append(Problem(key, f"invalid label name {k!r}"))
        elif k in RESERVED_LABELS:
            errs.append(Problem(key, f"label name {k!r} is reserved by edgeprobe"))
    return errs
