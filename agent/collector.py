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
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from agent import model
from agent.export import protobuf
from agent.stats import Histogram, SeriesStats, quantile
from probes import PROBES

VERSION = "0.1.0"
QUANTILES = (0.5, 0.95, 0.99)


@dataclass
class SelfStats:
    """Agent-wide counters and gauges about the agent itself."""

    stray_counts: dict[tuple[str, str], int] = field(default_factory=dict)
    late_ticks: int = 0
    skipped_ticks: int = 0
    run_exceptions: int = 0
    lateness: Histogram = field(default_factory=lambda: Histogram(
        (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        native=True))
    loop_lag: Histogram = field(default_factory=lambda: Histogram(
        (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        native=True))
    reload_ok: float = 1.0
    reload_success_time: float = 0.0
    reloads_total: int = 0
    reload_failures_total: int = 0
    icmp_mode: str = "none"

    def stray(self, probe: str, reason: str, n: int = 1) -> None:
        key = (probe, reason)
        self.stray_counts[key] = self.stray_counts.get(key, 0) + n


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


class _Labels:
    """A label set as a dict (for Metric objects) and pre-rendered text (for the fast path)."""

    __slots__ = ("d", "s")

    def __init__(self, d: dict[str, str]) -> None:
        self.d = d
        self.s = ",".join(f'{k}="{_esc(v)}"' for k, v in d.items())

    def extra(self, k: str, v: str) -> tuple[dict[str, str], str]:
        return {**self.d, k: v}, f'{self.s},{k}="{_esc(v)}"' if self.s else f'{k}="{_esc(v)}"'


class _Sink:
    """Receives families and samples. Two implementations share one walk over the state: the
    text renderer that /metrics serves (fast: label sets are rendered once per series, not per
    sample) and Metric objects for the CollectorRegistry."""

    def family(self, name: str, doc: str, typ: str) -> None:
        raise NotImplementedError

    def sample(self, fam: str, name: str, labels: _Labels, value: float,
               extra: tuple[str, str] | None = None) -> None:
        raise NotImplementedError

    def hist(self, fam: str, labels: _Labels, h: Histogram,
             extra: tuple[str, str] | None = None) -> None:
        raise NotImplementedError


class _MetricSink(_Sink):
    """Metric objects: for the CollectorRegistry (classic buckets only: prometheus_client's
    text writer knows no native histograms) or, with ``native``, for the protobuf writer."""

    def __init__(self, native: bool = False) -> None:
        self.fams: dict[str, Metric] = {}
        self.native = native

    def family(self, name: str, doc: str, typ: str) -> None:
        if name not in self.fams:
            self.fams[name] = Metric(name, doc, typ)

    def sample(self, fam: str, name: str, labels: _Labels, value: float,
               extra: tuple[str, str] | None = None) -> None:
        d = labels.extra(*extra)[0] if extra else labels.d
        self.fams[fam].add_sample(name, d, value)

    def hist(self, fam: str, labels: _Labels, h: Histogram,
             extra: tuple[str, str] | None = None) -> None:
        _add_hist(self.fams[fam], fam, labels.extra(*extra)[0] if extra else labels.d, h,
                  self.native)


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
        self.fams: dict[str, tuple[list[int], list[str], list[str | None], list[Any],
                                   list[tuple[str, str] | None]]] = {}
        self.heads: dict[str, str] = {}
        self._extras: dict[tuple[str, str], tuple[str, str]] = {}

    def family(self, name: str, doc: str, typ: str) -> None:
        if name not in self.fams:
            doc = doc.replace("\\", "\\\\").replace("\n", "\\n")
            # As prometheus_client writes them: a counter's HELP/TYPE name carries _total.
            hname = name + "_total" if typ == "counter" else name
            self.heads[name] = f"# HELP {hname} {doc}\n# TYPE {hname} {typ}\n"
            self.fams[name] = ([], [], [], [], [])

    def _add(self, fam: str, kind: int, name: str, labels: _Labels | None, value: Any,
             extra: tuple[str, str] | None) -> None:
        cols = self.fams[fam]
        cols[0].append(kind)
        cols[1].append(name)
        cols[2].append(None if labels is None else labels.s)
        cols[3].append(value)
        # The same few (name, value) pairs recur in every series: keep one of each.
        cols[4].append(None if extra is None else self._extras.setdefault(extra, extra))

    def sample(self, fam: str, name: str, labels: _Labels, value: float,
               extra: tuple[str, str] | None = None) -> None:
        self._add(fam, self.SAMPLE, name, labels, value, extra)

    def hist(self, fam: str, labels: _Labels, h: Histogram,
             extra: tuple[str, str] | None = None) -> None:
        self._add(fam, self.HIST, fam, labels, h, extra)

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
                    out.append(f"{name}{{{ls}}} {_fmt(value)}\n" if ls else
                               f"{name} {_fmt(value)}\n")
                else:
                    h: Histogram = value
                    les = les_of.get(h.bounds)
                    if les is None:
                        les = les_of[h.bounds] = [f'le="{_le(b)}"' for b in h.bounds] + [
                            'le="+Inf"']
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
    series: dict[tuple[str, str], SeriesView] = field(default_factory=dict)
    self_stats: SelfStats = field(default_factory=SelfStats)

    def label_names(self) -> list[str]:
        return ["region", "edge", "probe", *sorted(self.agent_labels), *self.target_label_keys]

    def _values(self, v: SeriesView) -> list[str]:
        return [self.region, v.edge, v.kind, *(self.agent_labels[k] for k in
                sorted(self.agent_labels)), *(v.labels.get(k, "") for k in
                self.target_label_keys)]

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
            sink.family(m.name, m.documentation, m.type)
            for smp in m.samples:
                sink.line(m.name, f"{smp.name}{{{_Labels(smp.labels).s}}} {_fmt(smp.value)}\n"
                          if smp.labels else f"{smp.name} {_fmt(smp.value)}\n")
        yield from sink.chunks()

    def render_protobuf(self) -> Iterator[bytes]:
        """The protobuf exposition (delimited MetricFamily messages) of the same families, with
        native buckets on every histogram that keeps them; in slices like ``render_text``."""
        sink = _MetricSink(native=True)
        for _ in self._walk(sink):
            yield b""
        for fam in sink.fams.values():
            yield protobuf.encode((fam,))
        yield protobuf.encode(self._self_metrics(native=True))

    WALK_SLICE = 8

    def _walk(self, sink: _Sink) -> Iterator[None]:
        """Feed every family to ``sink``, yielding every WALK_SLICE series (a caller on the
        event loop lets the probes run in between)."""
        names = self.label_names()
        now = time.monotonic()
        fam = sink.family
        smp = sink.sample
        for i, v in enumerate(list(self.series.values())):
            if i and i % self.WALK_SLICE == 0:
                yield
            base = _Labels(dict(zip(names, self._values(v), strict=True)))
            s = v.stats
            kind = PROBES.get(v.kind)
            prefix = kind.metric_prefix if kind else "probe"
            if not math.isnan(s.success):
                fam("edgeprobe_probe_success", "Whether the last run of this probe succeeded.",
                    "gauge")
                smp("edgeprobe_probe_success", "edgeprobe_probe_success", base, s.success)
            fam("edgeprobe_probe_errors", "Probe runs or packets that failed, by bounded "
                "reason.", "counter")
            for reason, n in list(s.errors.items()):
                smp("edgeprobe_probe_errors", "edgeprobe_probe_errors_total", base, n,
                    ("reason", reason))
            if prefix == "connect":
                dur = "edgeprobe_connect_duration_seconds"
                fam(dur, "Duration of a full RTC connect (dns, tcp, tls, stun[, turn]); a "
                    "failed connect is observed as +Inf.", "histogram")
            else:
                dur = "edgeprobe_probe_duration_seconds"
                fam(dur, "Duration of one probe run.", "histogram")
            sink.hist(dur, base, s.duration)
            if s.phases:
                pname = f"edgeprobe_{prefix}_phase_duration_seconds"
                fam(pname, "Duration of one phase of a probe run.", "histogram")
                for phase, h in list(s.phases.items()):
                    sink.hist(pname, base, h, ("phase", phase))
            for gname, gval in list(s.gauges.items()):
                doc = (kind.gauges.get(gname) if kind else None) or gname
                fam(f"edgeprobe_{gname}", doc, "gauge")
                smp(f"edgeprobe_{gname}", f"edgeprobe_{gname}", base, gval)
            if s.info:
                fam("edgeprobe_probe_info", "Facts of the last run (TLS version, mapped address "
                    "family...), value 1.", "gauge")
                smp("edgeprobe_probe_info", "edgeprobe_probe_info",
                    _Labels({**base.d, **s.info}), 1.0)
            if s.hops:
                fam("edgeprobe_hop_rtt_seconds", "Median RTT to each hop in the last path run "
                    "(NaN when the hop did not answer).", "gauge")
                fam("edgeprobe_hop_packets_sent", "Packets sent towards each hop.", "counter")
                fam("edgeprobe_hop_packets_lost", "Packets to each hop not answered.", "counter")
                for idx in sorted(s.hops):
                    hop = s.hops[idx]
                    hx = ("hop", str(idx))
                    smp("edgeprobe_hop_rtt_seconds", "edgeprobe_hop_rtt_seconds", base,
                        hop.last_rtt, hx)
                    smp("edgeprobe_hop_packets_sent", "edgeprobe_hop_packets_sent_total", base,
                        hop.sent, hx)
                    smp("edgeprobe_hop_packets_lost", "edgeprobe_hop_packets_lost_total", base,
                        hop.lost, hx)
            p = s.packets
            if p is None:
                continue
            fam("edgeprobe_rtt_seconds", "Round-trip time of answered packets.", "histogram")
            sink.hist("edgeprobe_rtt_seconds", base, p.rtt)
            fam("edgeprobe_packets_sent", "Packets whose fate is known (answered, or timed "
                "out).", "counter")
            smp("edgeprobe_packets_sent", "edgeprobe_packets_sent_total", base, p.sent)
            fam("edgeprobe_packets_lost", "Packets not answered within their timeout.",
                "counter")
            smp("edgeprobe_packets_lost", "edgeprobe_packets_lost_total", base, p.lost)
            fam("edgeprobe_jitter_seconds", "RFC 3550 interarrival jitter estimator (gain 1/16) "
                "over consecutive round-trip times (round-trip based, not one-way).", "gauge")
            smp("edgeprobe_jitter_seconds", "edgeprobe_jitter_seconds", base, p.jitter)
            fam("edgeprobe_ipdv_seconds", "|RTT(i) - RTT(i-1)| of consecutive answered "
                "packets.", "histogram")
            sink.hist("edgeprobe_ipdv_seconds", base, p.ipdv)
            fam("edgeprobe_loss_burst_length", "Lengths of runs of consecutive lost packets "
                "(RFC 3357 loss periods).", "histogram")
            sink.hist("edgeprobe_loss_burst_length", base, p.bursts)
            answered, lost = p.window.snapshot(now)
            fam("edgeprobe_rtt_recent_seconds", "RTT quantiles over the sliding window (exact, "
                "per edge).", "summary")
            for q in QUANTILES:
                smp("edgeprobe_rtt_recent_seconds", "edgeprobe_rtt_recent_seconds", base,
                    quantile(answered, q), ("quantile", str(q)))
            smp("edgeprobe_rtt_recent_seconds", "edgeprobe_rtt_recent_seconds_count", base,
                len(answered))
            smp("edgeprobe_rtt_recent_seconds", "edgeprobe_rtt_recent_seconds_sum", base,
                float(sum(answered)))
            n = len(answered) + lost
            fam("edgeprobe_loss_ratio_upper95", "95 % Wilson upper bound of the loss ratio over "
                "the sliding window (1 with no data).", "gauge")
            smp("edgeprobe_loss_ratio_upper95", "edgeprobe_loss_ratio_upper95", base,
                model.wilson_interval(lost, n)[1])
            fam("edgeprobe_window_packets", "Packets inside the sliding window.", "gauge")
            smp("edgeprobe_window_packets", "edgeprobe_window_packets", base, n)
            fam("edgeprobe_connect_budget_seconds", "The configured connect budget.", "gauge")
            smp("edgeprobe_connect_budget_seconds", "edgeprobe_connect_budget_seconds", base,
                self.budget)
            pred = model.predict(answered, lost, p.jitter, self.budget, self.round_trips,
                                 self.fixed, self.exchanges)
            if pred is None:
                continue
            fam("edgeprobe_connect_estimate_seconds", "Lossless connect time predicted from "
                "the window's median RTT: n*RTT + fixed.", "gauge")
            smp("edgeprobe_connect_estimate_seconds", "edgeprobe_connect_estimate_seconds",
                base, pred.estimate)
            fam("edgeprobe_connect_budget_miss_probability", "Model probability that a connect "
                "misses the budget: 1-(1-p)^E * Phi((B-fixed-n*mu)/(sigma*sqrt(n))).", "gauge")
            smp("edgeprobe_connect_budget_miss_probability",
                "edgeprobe_connect_budget_miss_probability", base, pred.miss_probability)
            fam("edgeprobe_r_factor", "Simplified E-model R factor (not ITU-T G.107 proper).",
                "gauge")
            smp("edgeprobe_r_factor", "edgeprobe_r_factor", base, pred.r_factor)
            fam("edgeprobe_mos_estimate", "MOS estimated from the simplified E-model R factor "
                "(G.107 Annex B mapping).", "gauge")
            smp("edgeprobe_mos_estimate", "edgeprobe_mos_estimate", base, pred.mos)

        fam("edgeprobe_targets", "Configured probe series, by kind.", "gauge")
        per_kind: dict[str, int] = {}
        for v in list(self.series.values()):
            per_kind[v.kind] = per_kind.get(v.kind, 0) + 1
        for k in sorted(per_kind):
            smp("edgeprobe_targets", "edgeprobe_targets", _Labels({"region": self.region,
                                                                    "probe": k}), per_kind[k])

    def _self_metrics(self, native: bool = False) -> Iterator[Metric]:
        ss = self.self_stats
        region = {"region": self.region}
        m = Metric("edgeprobe_stray_packets", "Replies that matched nothing in flight: foreign, "
                   "late, wrong source, malformed, bad checksum or payload.", "counter")
        counts = {(k, r): 0 for k in {v.kind for v in list(self.series.values())}
                  if k in PROBES for r in PROBES[k].stray_reasons}
        counts.update(ss.stray_counts)
        for (probe, reason), n in sorted(counts.items()):
            m.add_sample("edgeprobe_stray_packets_total", {**region, "probe": probe,
                                                           "reason": reason}, n)
        yield m
        counters: tuple[tuple[str, str, float], ...] = (
            ("edgeprobe_scheduler_late_ticks", "Runs that started later than the late-tick "
             "threshold.", ss.late_ticks),
            ("edgeprobe_scheduler_skipped_ticks", "Ticks skipped because the previous run or "
             "the event loop overran them (never queued).", ss.skipped_ticks),
            ("edgeprobe_probe_exceptions", "Probe runs that raised (a bug; logged).",
             ss.run_exceptions),
        )
        for name, doc, val in counters:
            c = Metric(name, doc, "counter")
            c.add_sample(name + "_total", region, val)
            yield c
        h = Metric("edgeprobe_scheduler_lateness_seconds", "How late runs started, against "
                   "their scheduled tick.", "histogram")
        _add_hist(h, "edgeprobe_scheduler_lateness_seconds", region, ss.lateness, native)
        yield h
        h = Metric("edgeprobe_event_loop_lag_seconds", "Event-loop lag: how late a periodic "
                   "timer fired.", "histogram")
        _add_hist(h, "edgeprobe_event_loop_lag_seconds", region, ss.loop_lag, native)
        yield h
        for name, doc, val in (
            ("edgeprobe_config_last_reload_successful", "Whether the last config reload "
             "succeeded.", ss.reload_ok),
            ("edgeprobe_config_last_reload_success_timestamp_seconds", "Unix time of the last "
             "successful config load.", ss.reload_success_time),
        ):
            g = Metric(name, doc, "gauge")
            g.add_sample(name, region, val)
            yield g
        b = Metric("edgeprobe_build_info", "Build and runtime facts, value 1.", "gauge")
        b.add_sample("edgeprobe_build_info", {**region, "version": VERSION,
                                              "python": platform.python_version(),
                                              "icmp_mode": ss.icmp_mode}, 1.0)
        yield b


def _le(bound: float) -> str:
    s: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return s


def _add_hist(m: Metric, name: str, labels: dict[str, str], h: Histogram,
              native: bool = False) -> None:
    if native and h.native is not None:
        m.samples.append(Sample(name, labels, 0.0, None, None,
                                h.native.sample(count=sum(h.counts), total=h.sum)))
    acc = 0
    for bound, c in zip(h.bounds, h.counts, strict=False):
        acc += c
        m.add_sample(name + "_bucket", {**labels, "le": _le(bound)}, acc)
    acc += h.counts[-1]
    m.add_sample(name + "_bucket", {**labels, "le": "+Inf"}, acc)
    m.add_sample(name + "_count", labels, acc)
    m.add_sample(name + "_sum", labels, h.sum)
