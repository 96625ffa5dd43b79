"""Numbers from what the tools said and what the lab really did.

Exposition text is parsed here with a small line parser: a smokeping_prober scrape at 10,000
targets with fine buckets is hundreds of thousands of lines, and only a few families matter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from agent.runtime.stats import quantile as sorted_quantile

_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Labels = tuple[tuple[str, str], ...]


def parse_prom(text: str, names: Iterable[str]) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples of the wanted metric names (exact sample names, e.g. ``x_bucket``)."""
    wanted = set(names)
    prefixes = tuple(wanted)
    out: dict[str, list[tuple[dict[str, str], float]]] = {n: [] for n in wanted}
    for line in text.splitlines():
        if not line.startswith(prefixes):
            continue
        brace = line.find("{")
        if brace >= 0:
            name = line[:brace]
            end = line.rfind("}")
            labels = dict(_LABEL.findall(line[brace + 1 : end]))
            rest = line[end + 1 :].split()
        else:
            parts = line.split()
            name, labels, rest = parts[0], {}, parts[1:]
        if name in wanted and rest:
            out[name].append((labels, float(rest[0])))
    return out


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of unsorted values; NaN when empty."""
    return sorted_quantile(sorted(xs), q)


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """PromQL's histogram_quantile over (upper bound, cumulative count) pairs: linear
    interpolation inside the bucket, the first bucket starting at 0."""
    bs = sorted(buckets)
    if not bs or bs[-1][1] <= 0:
        return math.nan
    total = bs[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in bs:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return bs[-1][0]


def group_buckets(
    samples: Sequence[tuple[dict[str, str], float]], key: str
) -> dict[str, list[tuple[float, float]]]:
    """``x_bucket`` samples grouped by one label: label value -> [(le, cumulative count)]."""
    out: dict[str, list[tuple[float, float]]] = {}
    for labels, v in samples:
        out.setdefault(labels.get(key, ""), []).append((float(labels["le"]), v))
    return out


def subset_buckets(
    buckets: Sequence[tuple[float, float]], keep: Sequence[float]
) -> list[tuple[float, float]]:
    """The histogram a coarser layout would have produced: cumulative counts are exact at the
    bounds the two layouts share, so keeping only ``keep`` (and +Inf) re-buckets losslessly."""
    ks = {round(k, 12) for k in keep}
    return [(le, c) for le, c in buckets if math.isinf(le) or round(le, 12) in ks]


@dataclass
class Measured:
    """What one tool reported for one workload."""

    per_target_median: dict[str, float] = field(default_factory=dict)  # address -> s
    per_packet: dict[str, dict[int, float]] = field(default_factory=dict)  # address -> idx->s
    # smokeping_prober only: the same run read through its default bucket layout.
    default_bucket_median: dict[str, float] = field(default_factory=dict)
    sent: int = 0
    received: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return 1 - self.received / self.sent if self.sent else math.nan


@dataclass
class Truth:
    """The lab's ground truth for one tool's time window: per target, the true RTT of every
    echo request in send order (None when the lab dropped it one way or the other)."""

    per_target: dict[str, list[float | None]]

    @property
    def sent(self) -> int:
        return sum(len(v) for v in self.per_target.values())

    @property
    def lost(self) -> int:
        return sum(1 for v in self.per_target.values() for r in v if r is None)

    def median(self, addr: str) -> float:
        return quantile([r for r in self.per_target.get(addr, []) if r is not None], 0.5)


def truth_window(exchanges: Iterable[object], start_ns: int, end_ns: int) -> Truth:
    """Ground truth of the echo exchanges whose request reached the lab in [start, end]."""
    per: dict[str, list[float | None]] = {}
    for ex in exchanges:
        req = ex.request  # type: ignore[attr-defined]
        if not start_ns <= req.arrival_ns <= end_ns:
            continue
        rtt = ex.rtt_ns  # type: ignore[attr-defined]
        per.setdefault(ex.edge, []).append(  # type: ignore[attr-defined]
            None if rtt is None else rtt / 1e9
        )
    return Truth(per)


@dataclass(frozen=True)
class ErrorStats:
    n: int
    median_ms: float
    p99_ms: float
    abs_p99_ms: float


def error_stats(errors_s: Sequence[float]) -> ErrorStats:
    ms = [e * 1e3 for e in errors_s]
    return ErrorStats(
        len(ms), quantile(ms, 0.5), quantile(ms, 0.99), quantile([abs(x) for x in ms], 0.99)
    )


def per_target_errors(measured: Mapping[str, float], truth: Truth | None) -> list[float]:
    """measured median - true median per target; without a truth (loopback) the true
    network RTT is zero, so the error is the measured value itself."""
    out: list[float] = []
    for addr, m in measured.items():
        if not math.isfinite(m):
            continue
        t = truth.median(addr) if truth is not None else 0.0
        if math.isfinite(t):
            out.append(m - t)
    return out


def per_packet_errors(
    measured: Mapping[str, Mapping[int, float]], truth: Truth | None
) -> list[float]:
    """Packet i of a target (the tool's own per-target index) against the i-th echo request
    the lab saw to that target in the tool's window."""
    out: list[float] = []
    for addr, pkts in measured.items():
        seq = truth.per_target.get(addr, []) if truth is not None else None
        for i, r in pkts.items():
            if seq is None:
                out.append(r)
            elif i < len(seq) and seq[i] is not None:
                out.append(r - seq[i])  # type: ignore[operator]
    return out
