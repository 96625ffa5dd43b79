"""Per-series measurement state. Probes produce results; this turns them into cumulative
histograms and counters (smokeping_prober style: ratios are left to PromQL), plus the sliding
window that exact quantiles and the budget model read at scrape time.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from agent.export.catalog import BURST_BUCKETS, IPDV_BUCKETS
from agent.export.native import NativeBuckets
from probes.base import ProbeResult

# RFC 3550 §6.4.1: J += (|D| - J) / 16.
JITTER_GAIN = 1.0 / 16.0


class Histogram:
    """Cumulative histogram with fixed upper bounds (+Inf implied) and, where asked for, the
    same observations in native (exponential) buckets for the protobuf exposition."""

    __slots__ = ("bounds", "counts", "native", "sum")

    def __init__(self, bounds: Sequence[float], native: bool = False) -> None:
        self.bounds = tuple(bounds)
        self.counts = array("q", [0] * (len(self.bounds) + 1))
        self.sum = 0.0
        self.native = NativeBuckets() if native else None

    def observe(self, v: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le is inclusive).
        self.counts[bisect_left(self.bounds, v)] += 1
        if math.isfinite(v):
            self.sum += v
        if self.native is not None:
            self.native.observe(v)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[int]:
        out, acc = [], 0
        for c in self.counts:
            acc += c
            out.append(acc)
        return out


class Window:
    """RTT samples of the last ``seconds`` (NaN = lost packet), as a compact ring buffer.

    Memory is 16 bytes per sample; capacity grows to what the window really holds."""

    __slots__ = ("seconds", "times", "values")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.times = array("d")
        self.values = array("d")

    def add(self, now: float, rtts: Iterable[float | None]) -> None:
        for r in rtts:
            self.times.append(now)
            self.values.append(math.nan if r is None else r)
        self.prune(now)

    def prune(self, now: float) -> None:
        cutoff = now - self.seconds
        t = self.times
        if t and t[0] < cutoff:
            i = bisect_left(t, cutoff)
            del self.times[:i]
            del self.values[:i]

    def snapshot(self, now: float) -> tuple[list[float], int]:
        """(sorted answered RTTs, lost count) inside the window."""
        self.prune(now)
        answered = sorted(v for v in self.values if v == v)
        return answered, len(self.values) - len(answered)


def next_jitter(jitter: float, delta: float) -> float:
    """One step of the RFC 3550 interarrival jitter estimator, ``delta`` = |D|."""
    return jitter + (delta - jitter) * JITTER_GAIN


def jitter_of(rtts: Iterable[float | None]) -> float:
    """The estimator over a train's round trips in send order (a lost packet is skipped)."""
    jitter, prev = 0.0, None
    for r in rtts:
        if r is None:
            continue
        if prev is not None:
            jitter = next_jitter(jitter, abs(r - prev))
        prev = r
    return jitter


def quantile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (the 'type 7' estimator) of pre-sorted values."""
    if not sorted_vals:
        return math.nan
    pos = (len(sorted_vals) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


@dataclass(slots=True)
class PacketStats:
    """RTT, loss, jitter and burst state of a packet-train series."""

    rtt: Histogram
    window: Window
    # The IPDV and loss-burst-length distributions, kept with metrics.detail: full only.
    ipdv: Histogram | None = None
    bursts: Histogram | None = None
    sent: int = 0
    lost: int = 0
    loss_periods: int = 0  # RFC 3357 loss periods begun: lost / loss_periods is the mean burst
    jitter: float = 0.0
    last_rtt: float | None = None
    burst: int = 0  # length of the loss run in progress

    def add(self, rtts: Sequence[float | None], now: float) -> None:
        for r in rtts:
            self.sent += 1
            if r is None:
                self.lost += 1
                if not self.burst:
                    self.loss_periods += 1
                self.burst += 1
                continue
            if self.burst:
                if self.bursts is not None:
                    self.bursts.observe(self.burst)
                self.burst = 0
            self.rtt.observe(r)
            if self.last_rtt is not None:
                d = abs(r - self.last_rtt)
                self.jitter = next_jitter(self.jitter, d)
                if self.ipdv is not None:
                    self.ipdv.observe(d)
            self.last_rtt = r
        self.window.add(now, rtts)


@dataclass(slots=True)
class HopStats:
    sent: int = 0
    lost: int = 0
    last_rtt: float = math.nan


@dataclass(slots=True)
class SeriesStats:
    """Everything measured for one (target, probe kind)."""

    duration: Histogram
    packets: PacketStats | None = None
    phases: dict[str, Histogram] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)
    hops: dict[int, HopStats] = field(default_factory=dict)
    success: float = math.nan
    runs: int = 0
    phase_bounds: tuple[float, ...] = ()

    def record(self, result: ProbeResult, now: float) -> None:
        self.runs += 1
        self.success = 1.0 if result.success else 0.0
        self.duration.observe(result.duration)
        if result.reason != "ok":
            self.errors[result.reason] = self.errors.get(result.reason, 0) + 1
        for reason, n in result.errors.items():
            if reason != result.reason or result.success:
                self.errors[reason] = self.errors.get(reason, 0) + n
        if self.packets is not None and result.rtts:
            self.packets.add(result.rtts, now)
        for phase, secs in result.phases.items():
            h = self.phases.get(phase)
            if h is None:
                h = self.phases[phase] = Histogram(
                    self.phase_bounds, self.duration.native is not None
                )
            h.observe(secs)
        self.gauges.update(result.gauges)
        if result.info:
            self.info = dict(result.info)
        if result.hops is not None:
            seen = set()
            for hop in result.hops:
                seen.add(hop.index)
                hs = self.hops.setdefault(hop.index, HopStats())
                answered = [r for r in hop.rtts if r is not None]
                hs.sent += len(hop.rtts)
                hs.lost += len(hop.rtts) - len(answered)
                hs.last_rtt = quantile(sorted(answered), 0.5) if answered else math.nan
            for idx in list(self.hops):
                if idx not in seen:
                    # A hop beyond the current path length: keep its counters (they must not
                    # go backwards) but clear the RTT gauge.
                    self.hops[idx].last_rtt = math.nan


@dataclass(frozen=True)
class SeriesShape:
    """What a new series keeps: bucket bounds, native buckets, and the full detail."""

    rtt: tuple[float, ...]
    durations: tuple[float, ...]
    phases: tuple[float, ...]
    window_seconds: float
    native: bool = False
    full: bool = False


def new_series(
    packet_based: bool, phases: Iterable[str], reasons: Iterable[str], shape: SeriesShape
) -> SeriesStats:
    """A series with its label sets pre-created, so it is exported before the first result
    (error reasons too with the full detail; otherwise each appears with its first error)."""
    native = shape.native
    s = SeriesStats(duration=Histogram(shape.durations, native), phase_bounds=shape.phases)
    if packet_based:
        s.packets = PacketStats(
            rtt=Histogram(shape.rtt, native), window=Window(shape.window_seconds)
        )
        if shape.full:
            s.packets.ipdv = Histogram(IPDV_BUCKETS)
            s.packets.bursts = Histogram(BURST_BUCKETS)
    for p in phases:
        s.phases[p] = Histogram(shape.phases, native)
    if shape.full:
        for r in reasons:
            s.errors[r] = 0
    return s
