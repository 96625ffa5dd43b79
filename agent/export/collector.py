"""The custom collector: metric families built from the stats store at scrape time.

It is registered on the agent's own CollectorRegistry (never the global one). Every family is
built from state that already exists, so a scrape never blocks on a probe.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from agent import VERSION
from agent.export import catalog as C
from agent.export import metrics_pb2 as pb
from agent.export import protobuf
from agent.export.catalog import Family
from agent.runtime import model
from agent.runtime.selfstats import SelfStats
from agent.runtime.stats import Histogram, SeriesStats, quantile
from probes import PROBES


@dataclass(slots=True)
class SeriesView:
    """What the collector needs to know about one scheduled series."""

    edge: str
    kind: str
    labels: dict[str, str]
    stats: SeriesStats


class AgentCollector(Collector):
    def __init__(self, state: CollectorState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        return self.state.collect()


def _esc(v: str) -> str:
    if "\\" in v or '"' in v or "\n" in v:
        v = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return v


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if v != v:
        return "NaN"
    if v in (math.inf, -math.inf):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


_Extra = tuple[str, str] | None  # a (name, value) label beyond the series' own


class _Summary(NamedTuple):
    """A summary's samples for one label set: its quantiles and its cumulative _count and
    _sum, which only the protobuf Summary carries (see catalog.RTT_RECENT)."""

    quantiles: list[tuple[float, float]]  # (quantile, value)
    sample_count: int
    sample_sum: float


class _Labels:
    """A label set as a dict (for Metric objects), pre-rendered text (for the fast path) and,
    when asked for, serialized label pairs (for the protobuf sink)."""

    __slots__ = ("d", "p", "s")

    def __init__(self, d: dict[str, str]) -> None:
        self.d = d
        self.s = ",".join(f'{k}="{_esc(v)}"' for k, v in d.items())
        self.p: bytes | None = None

    def pb(self) -> bytes:
        if self.p is None:
            self.p = protobuf.label_bytes(self.d)
        return self.p

    def extra(self, k: str, v: str) -> tuple[dict[str, str], str]:
        return {**self.d, k: v}, f'{self.s},{k}="{_esc(v)}"' if self.s else f'{k}="{_esc(v)}"'


class _Sink:
    """Receives families and samples. Two implementations share one walk over the state: the
    text renderer that /metrics serves (fast: label sets are rendered once per series, not per
    sample) and Metric objects for the CollectorRegistry."""

    def family(self, spec: Family) -> Family:
        """Declare ``spec``'s family (once; later calls are cheap) and hand it back."""
        raise NotImplementedError

    def sample(self, spec: Family, labels: _Labels, value: float, extra: _Extra = None) -> None:
        """One sample of a counter or gauge; ``extra``: a label beyond the series' own."""
        raise NotImplementedError

    def hist(self, spec: Family, labels: _Labels, h: Histogram, extra: _Extra = None) -> None:
        raise NotImplementedError

    def summary(self, spec: Family, labels: _Labels, s: _Summary) -> None:
        raise NotImplementedError


class _MetricSink(_Sink):
    """Metric objects: for the CollectorRegistry (classic buckets only: prometheus_client's
    text writer knows no native histograms) or, with ``native``, for the protobuf writer."""

    def __init__(self, native: bool = False) -> None:
        self.fams: dict[str, Metric] = {}
        self.native = native

    def family(self, spec: Family) -> Family:
        if spec.name not in self.fams:
            self.fams[spec.name] = _metric(spec)
        return spec

    def sample(self, spec: Family, labels: _Labels, value: float, extra: _Extra = None) -> None:
        d = labels.extra(*extra)[0] if extra else labels.d
        self.fams[spec.name].add_sample(spec.sample_name, d, value)

    def hist(self, spec: Family, labels: _Labels, h: Histogram, extra: _Extra = None) -> None:
        d = labels.extra(*extra)[0] if extra else labels.d
        _add_hist(self.fams[spec.name], spec.name, d, h, self.native)

    def summary(self, spec: Family, labels: _Labels, s: _Summary) -> None:
        m, name = self.fams[spec.name], spec.sample_name
        for q, v in s.quantiles:
            m.add_sample(name, labels.extra("quantile", str(q))[0], v)


class _ProtoSink(_Sink):
    """MetricFamily messages built straight from the walk, native buckets included: each
    series' label pairs are serialized once and merged into its samples' messages."""

    def __init__(self) -> None:
        self.fams: dict[str, pb.MetricFamily] = {}

    def family(self, spec: Family) -> Family:
        if spec.name not in self.fams:
            self.fams[spec.name] = protobuf.family(spec.sample_name, spec.help, spec.type)
        return spec

    def _metric(self, spec: Family, labels: _Labels, extra: _Extra) -> pb.Metric:
        m: pb.Metric = self.fams[spec.name].metric.add()
        m.MergeFromString(labels.pb())
        if extra is not None:
            m.label.add(name=extra[0], value=extra[1])
        return m

    def sample(self, spec: Family, labels: _Labels, value: float, extra: _Extra = None) -> None:
        m = self._metric(spec, labels, extra)
        if spec.type == "counter":
            m.counter.value = value
        else:
            m.gauge.value = value

    def summary(self, spec: Family, labels: _Labels, s: _Summary) -> None:
        m = self._metric(spec, labels, None)
        for q, v in s.quantiles:
            m.summary.quantile.add(quantile=q, value=v)
        m.summary.sample_count = s.sample_count
        m.summary.sample_sum = s.sample_sum

    def hist(self, spec: Family, labels: _Labels, h: Histogram, extra: _Extra = None) -> None:
        native = h.native.sample(sum(h.counts), h.sum) if h.native is not None else None
        protobuf.fill_histogram(
            self._metric(spec, labels, extra).histogram, h.bounds, h.counts, h.sum, native
        )


class _TextSink(_Sink):
    """Collects the walk per family without rendering it yet (label sets, values and
    histogram references), then renders family by family into small chunks as they are
    asked for, so a scrape never holds its whole body (224 MB and 2.5 M lines at 10,000
    targets). Items are kept in columns, not a tuple each: hundreds of thousands of young
    tuples made the garbage collector's full passes stall the event loop for ~100 ms."""

    LINES_PER_CHUNK = 1000
    SAMPLE, HIST, LINE = 0, 1, 2

    def __init__(self) -> None:
        # family -> columns: kind, sample name (or pre-rendered line), rendered label set,
        # value (or histogram), extra label. Strings, not _Labels: no container per series
        # stays behind for the collector to traverse.
        self.fams: dict[
            str,
            tuple[list[int], list[str], list[str | None], list[Any], list[tuple[str, str] | None]],
        ] = {}
        self.heads: dict[str, str] = {}
        self._extras: dict[tuple[str, str], tuple[str, str]] = {}

    def family(self, spec: Family) -> Family:
        if spec.name not in self.fams:
            self.head(spec.name, spec.help, spec.type)
        return spec

    def head(self, name: str, doc: str, typ: str) -> None:
        if name not in self.fams:
            doc = doc.replace("\\", "\\\\").replace("\n", "\\n")
            # As prometheus_client writes them: a counter's HELP/TYPE name carries _total.
            hname = name + "_total" if typ == "counter" else name
            self.heads[name] = f"# HELP {hname} {doc}\n# TYPE {hname} {typ}\n"
            self.fams[name] = ([], [], [], [], [])

    def _add(
        self,
        fam: str,
        kind: int,
        name: str,
        labels: _Labels | None,
        value: Any,
        extra: _Extra,
    ) -> None:
        cols = self.fams[fam]
        cols[0].append(kind)
        cols[1].append(name)
        cols[2].append(None if labels is None else labels.s)
        cols[3].append(value)
        # The same few (name, value) pairs recur in every series: keep one of each.
        cols[4].append(None if extra is None else self._extras.setdefault(extra, extra))

    def sample(self, spec: Family, labels: _Labels, value: float, extra: _Extra = None) -> None:
        self._add(spec.name, self.SAMPLE, spec.sample_name, labels, value, extra)

    def hist(self, spec: Family, labels: _Labels, h: Histogram, extra: _Extra = None) -> None:
        self._add(spec.name, self.HIST, spec.name, labels, h, extra)

    def summary(self, spec: Family, labels: _Labels, s: _Summary) -> None:
        fam, name = spec.name, spec.sample_name
        for q, v in s.quantiles:
            self._add(fam, self.SAMPLE, name, labels, v, ("quantile", str(q)))

    def line(self, fam: str, text: str) -> None:
        self._add(fam, self.LINE, text, None, None, None)

    def chunks(self) -> Iterator[bytes]:
        """The text, family by family, as chunks of about LINES_PER_CHUNK lines."""
        les_of: dict[tuple[float, ...], list[str]] = {}
        n = self.LINES_PER_CHUNK
        for fam, cols in self.fams.items():
            out = [self.heads[fam]]
            for kind, name, labels, value, extra in zip(*cols, strict=True):
                if labels is None:
                    out.append(name)
                    continue
                if extra:
                    pair = f'{extra[0]}="{_esc(extra[1])}"'
                    ls = f"{labels},{pair}" if labels else pair
                else:
                    ls = labels
                if kind == self.SAMPLE:
                    out.append(
                        f"{name}{{{ls}}} {_fmt(value)}\n" if ls else f"{name} {_fmt(value)}\n"
                    )
                else:
                    h: Histogram = value
                    les = les_of.get(h.bounds)
                    if les is None:
                        les = les_of[h.bounds] = [f'le="{_le(b)}"' for b in h.bounds] + [
                            'le="+Inf"'
                        ]
                    head = f"{fam}_bucket{{{ls}," if ls else f"{fam}_bucket{{"
                    acc = 0
                    for le, c in zip(les, h.counts, strict=True):
                        acc += c
                        out.append(f"{head}{le}}} {acc}\n")
                    tail = f"{{{ls}}}" if ls else ""
                    out.append(f"{fam}_count{tail} {acc}\n{fam}_sum{tail} {_fmt(h.sum)}\n")
                if len(out) >= n:
                    yield "".join(out).encode()
                    out = []
            if out:
                yield "".join(out).encode()


@dataclass
class CollectorState:
    region: str
    agent_labels: dict[str, str]
    target_label_keys: tuple[str, ...]
    budget: float
    round_trips: float
    fixed: float
    exchanges: int
    full: bool = False  # metrics.detail: full
    series: dict[tuple[str, str], SeriesView] = field(default_factory=dict)
    self_stats: SelfStats = field(default_factory=SelfStats)

    def label_names(self) -> list[str]:
        return ["region", "edge", "probe", *sorted(self.agent_labels), *self.target_label_keys]

    def _values(self, v: SeriesView) -> list[str]:
        return [
            self.region,
            v.edge,
            v.kind,
            *(self.agent_labels[k] for k in sorted(self.agent_labels)),
            *(v.labels.get(k, "") for k in self.target_label_keys),
        ]

    def collect(self) -> Iterator[Metric]:
        sink = _MetricSink()
        for _ in self._walk(sink):
            pass
        yield from sink.fams.values()
        yield from self._self_metrics()

    def render_text(self) -> Iterator[bytes]:
        """The Prometheus text format (0.0.4) of everything ``collect`` yields, as chunks to
        write in order: the same families, faster, for /metrics. Rendered in slices as it
        is iterated: empty chunks while the state is read (a slice per WALK_SLICE series),
        then the text in chunks of ~1,000 lines."""
        sink = _TextSink()
        for _ in self._walk(sink):
            yield b""
        for m in self._self_metrics():
            sink.head(m.name, m.documentation, m.type)
            for smp in m.samples:
                sink.line(
                    m.name,
                    f"{smp.name}{{{_Labels(smp.labels).s}}} {_fmt(smp.value)}\n"
                    if smp.labels
                    else f"{smp.name} {_fmt(smp.value)}\n",
                )
        yield from sink.chunks()

    def render_protobuf(self) -> Iterator[bytes]:
        """The protobuf exposition (delimited MetricFamily messages) of the same families, with
        native buckets on every histogram that keeps them; in slices like ``render_text``."""
        sink = _ProtoSink()
        for _ in self._walk(sink):
            yield b""
        for fam in sink.fams.values():
            if len(fam.metric):
                yield protobuf.frame(fam)
        yield protobuf.encode(self._self_metrics(native=True))

    WALK_SLICE = 8

    def _walk(self, sink: _Sink) -> Iterator[None]:
        """Feed every family to ``sink``, yielding every WALK_SLICE series (a caller on the
        event loop lets the probes run in between)."""
        names = self.label_names()
        now = time.monotonic()
        fam = sink.family
        smp = sink.sample
        # Which families each kind exports at this detail: the catalog decides, once a walk.
        exports: dict[str, frozenset[str]] = {}
        for i, v in enumerate(list(self.series.values())):
            if i and i % self.WALK_SLICE == 0:
                yield
            base = _Labels(dict(zip(names, self._values(v), strict=True)))
            s = v.stats
            kind = PROBES.get(v.kind)
            if kind is None:
                continue
            has = exports.get(v.kind)
            if has is None:
                has = exports[v.kind] = frozenset(f.name for f in C.for_kind(kind, self.full))
            if not math.isnan(s.success):
                smp(fam(C.PROBE_SUCCESS), base, s.success)
            smp(fam(C.PROBE_RUNS), base, s.runs)
            errors = fam(C.PROBE_ERRORS)
            for reason, n in list(s.errors.items()):
                smp(errors, base, n, ("reason", reason))
            for spec in (C.CONNECT_DURATION, C.PROBE_DURATION):
                if spec.name in has:
                    sink.hist(fam(spec), base, s.duration)
            if s.phases:
                phases = fam(C.CONNECT_PHASES if C.CONNECT_PHASES.name in has else C.PROBE_PHASES)
                for phase, h in list(s.phases.items()):
                    sink.hist(phases, base, h, ("phase", phase))
            for gname, gval in list(s.gauges.items()):
                spec = (
                    C.kind_gauge(kind, gname)
                    if gname in kind.gauges
                    else Family(f"edgeprobe_{gname}", "gauge", gname)
                )
                smp(fam(spec), base, gval)
            if s.info:
                smp(fam(C.PROBE_INFO), _Labels({**base.d, **s.info}), 1.0)
            if s.hops:
                rtt, sent, lost = fam(C.HOP_RTT), fam(C.HOP_SENT), fam(C.HOP_LOST)
                for idx in sorted(s.hops):
                    hop = s.hops[idx]
                    hx = ("hop", str(idx))
                    smp(rtt, base, hop.last_rtt, hx)
                    smp(sent, base, hop.sent, hx)
                    smp(lost, base, hop.lost, hx)
            p = s.packets
            if p is None:
                continue
            sink.hist(fam(C.RTT), base, p.rtt)
            smp(fam(C.PACKETS_SENT), base, p.sent)
            smp(fam(C.PACKETS_LOST), base, p.lost)
            smp(fam(C.LOSS_PERIODS), base, p.loss_periods)
            smp(fam(C.JITTER), base, p.jitter)
            if p.ipdv is not None and C.IPDV.name in has:
                sink.hist(fam(C.IPDV), base, p.ipdv)
            if p.bursts is not None and C.LOSS_BURSTS.name in has:
                sink.hist(fam(C.LOSS_BURSTS), base, p.bursts)
            answered, lost_n = p.window.snapshot(now)
            qs = [(q, quantile(answered, q)) for q in C.QUANTILES]
            recent = _Summary(qs, sum(p.rtt.counts), p.rtt.sum)
            sink.summary(fam(C.RTT_RECENT), base, recent)
            n = len(answered) + lost_n
            if self.full:
                smp(fam(C.LOSS_UPPER95), base, model.wilson_interval(lost_n, n)[1])
                smp(fam(C.WINDOW_PACKETS), base, n)
            pred = model.predict(
                answered,
                lost_n,
                p.jitter,
                self.budget,
                self.round_trips,
                self.fixed,
                self.exchanges,
            )
            if pred is None:
                continue
            smp(fam(C.CONNECT_ESTIMATE), base, pred.estimate)
            smp(fam(C.MISS_PROBABILITY), base, pred.miss_probability)
            if self.full:
                smp(fam(C.R_FACTOR), base, pred.r_factor)
                smp(fam(C.MOS), base, pred.mos)

        targets = fam(C.TARGETS)
        per_kind: dict[str, int] = {}
        for v in list(self.series.values()):
            per_kind[v.kind] = per_kind.get(v.kind, 0) + 1
        for k in sorted(per_kind):
            smp(targets, _Labels({"region": self.region, "probe": k}), per_kind[k])
        smp(fam(C.BUDGET), _Labels({"region": self.region}), self.budget)

    def _self_metrics(self, native: bool = False) -> Iterator[Metric]:
        ss = self.self_stats
        region = {"region": self.region}
        m = _metric(C.STRAY)
        counts = {
            (k, r): 0
            for k in {v.kind for v in list(self.series.values())}
            if k in PROBES
            for r in PROBES[k].stray_reasons
        }
        counts.update(ss.stray_counts)
        for (probe, reason), n in sorted(counts.items()):
            m.add_sample(C.STRAY.sample_name, {**region, "probe": probe, "reason": reason}, n)
        yield m
        for spec, val in (
            (C.LATE_TICKS, ss.late_ticks),
            (C.SKIPPED_TICKS, ss.skipped_ticks),
            (C.EXCEPTIONS, ss.run_exceptions),
        ):
            c = _metric(spec)
            c.add_sample(spec.sample_name, region, val)
            yield c
        for spec, hist in ((C.LATENESS, ss.lateness), (C.LOOP_LAG, ss.loop_lag)):
            h = _metric(spec)
            _add_hist(h, spec.name, region, hist, native)
            yield h
        for spec, gval in ((C.RELOAD_OK, ss.reload_ok), (C.RELOAD_TIME, ss.reload_success_time)):
            g = _metric(spec)
            g.add_sample(spec.name, region, gval)
            yield g
        b = _metric(C.BUILD_INFO)
        facts = {"version": VERSION, "python": platform.python_version()}
        b.add_sample(
            C.BUILD_INFO.name,
            {**region, **{k: facts.get(k) or ss.info.get(k, "none") for k in C.BUILD_INFO.labels}},
            1.0,
        )
        yield b


def _metric(spec: Family) -> Metric:
    return Metric(spec.name, spec.help, spec.type)


def _le(bound: float) -> str:
    s: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return s


def _add_hist(
    m: Metric, name: str, labels: dict[str, str], h: Histogram, native: bool = False
) -> None:
    if native and h.native is not None:
        m.samples.append(
            Sample(name, labels, 0.0, None, None, h.native.sample(count=sum(h.counts), total=h.sum))
        )
    acc = 0
    for bound, c in zip(h.bounds, h.counts, strict=False):
        acc += c
        m.add_sample(name + "_bucket", {**labels, "le": _le(bound)}, acc)
    acc += h.counts[-1]
    m.add_sample(name + "_bucket", {**labels, "le": "+Inf"}, acc)
    m.add_sample(name + "_count", labels, acc)
    m.add_sample(name + "_sum", labels, h.sum)
