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

from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from agent import model
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
        (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)))
    loop_lag: Histogram = field(default_factory=lambda: Histogram(
        (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)))
    reload_ok: float = 1.0
    reload_success_time: float = 0.0
    reloads_total: int = 0
    reload_failures_total: int = 0
    icmp_mode: str = "none"

    def stray(self, probe: str, reason: str, n: int = 1) -> None:
        key = (probe, reason)
        self.stray_counts[key] = self.stray_counts.get(key, 0) + n


@dataclass
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
        names = self.label_names()
        now = time.monotonic()
        fams: dict[str, Metric] = {}

        def fam(name: str, doc: str, typ: str) -> Metric:
            m = fams.get(name)
            if m is None:
                m = fams[name] = Metric(name, doc, typ)
            return m

        for v in self.series.values():
            vals = self._values(v)
            base = dict(zip(names, vals, strict=True))
            s = v.stats
            kind = PROBES.get(v.kind)
            prefix = kind.metric_prefix if kind else "probe"
            if not math.isnan(s.success):
                fam("edgeprobe_probe_success", "Whether the last run of this probe succeeded.",
                    "gauge").add_sample("edgeprobe_probe_success", base, s.success)
            e = fam("edgeprobe_probe_errors", "Probe runs or packets that failed, by bounded "
                    "reason.", "counter")
            for reason, n in s.errors.items():
                e.add_sample("edgeprobe_probe_errors_total", {**base, "reason": reason}, n)
            dur_name = ("edgeprobe_connect_duration_seconds" if prefix == "connect"
                        else "edgeprobe_probe_duration_seconds")
            dur_doc = ("Duration of a full RTC connect (dns, tcp, tls, stun[, turn]); a failed "
                       "connect is observed as +Inf." if prefix == "connect" else
                       "Duration of one probe run.")
            _hist(fam(dur_name, dur_doc, "histogram"), dur_name, base, s.duration)
            if s.phases:
                pname = f"edgeprobe_{prefix}_phase_duration_seconds"
                pf = fam(pname, "Duration of one phase of a probe run.", "histogram")
                for phase, h in s.phases.items():
                    _hist(pf, pname, {**base, "phase": phase}, h)
            for gname, gval in s.gauges.items():
                doc = (kind.gauges.get(gname) if kind else None) or gname
                fam(f"edgeprobe_{gname}", doc, "gauge").add_sample(f"edgeprobe_{gname}", base,
                                                                   gval)
            if s.info:
                fam("edgeprobe_probe_info", "Facts of the last run (TLS version, mapped address "
                    "family...), value 1.", "gauge").add_sample(
                    "edgeprobe_probe_info", {**base, **s.info}, 1.0)
            if s.hops:
                hr = fam("edgeprobe_hop_rtt_seconds", "Median RTT to each hop in the last path "
                         "run (NaN when the hop did not answer).", "gauge")
                hs = fam("edgeprobe_hop_packets_sent", "Packets sent towards each hop.",
                         "counter")
                hl = fam("edgeprobe_hop_packets_lost", "Packets to each hop not answered.",
                         "counter")
                for idx in sorted(s.hops):
                    hop = s.hops[idx]
                    hl_labels = {**base, "hop": str(idx)}
                    hr.add_sample("edgeprobe_hop_rtt_seconds", hl_labels, hop.last_rtt)
                    hs.add_sample("edgeprobe_hop_packets_sent_total", hl_labels, hop.sent)
                    hl.add_sample("edgeprobe_hop_packets_lost_total", hl_labels, hop.lost)
            p = s.packets
            if p is None:
                continue
            _hist(fam("edgeprobe_rtt_seconds", "Round-trip time of answered packets.",
                      "histogram"), "edgeprobe_rtt_seconds", base, p.rtt)
            fam("edgeprobe_packets_sent", "Packets whose fate is known (answered, or timed out).",
                "counter").add_sample("edgeprobe_packets_sent_total", base, p.sent)
            fam("edgeprobe_packets_lost", "Packets not answered within their timeout.",
                "counter").add_sample("edgeprobe_packets_lost_total", base, p.lost)
            fam("edgeprobe_jitter_seconds", "RFC 3550 interarrival jitter estimator (gain 1/16) "
                "over consecutive round-trip times (round-trip based, not one-way).",
                "gauge").add_sample("edgeprobe_jitter_seconds", base, p.jitter)
            _hist(fam("edgeprobe_ipdv_seconds", "|RTT(i) - RTT(i-1)| of consecutive answered "
                      "packets.", "histogram"), "edgeprobe_ipdv_seconds", base, p.ipdv)
            _hist(fam("edgeprobe_loss_burst_length", "Lengths of runs of consecutive lost "
                      "packets (RFC 3357 loss periods).", "histogram"),
                  "edgeprobe_loss_burst_length", base, p.bursts)
            answered, lost = p.window.snapshot(now)
            summ = fam("edgeprobe_rtt_recent_seconds", "RTT quantiles over the sliding window "
                       "(exact, per edge).", "summary")
            for q in QUANTILES:
                summ.add_sample("edgeprobe_rtt_recent_seconds", {**base, "quantile": str(q)},
                                quantile(answered, q))
            summ.add_sample("edgeprobe_rtt_recent_seconds_count", base, len(answered))
            summ.add_sample("edgeprobe_rtt_recent_seconds_sum", base, sum(answered))
            n = len(answered) + lost
            fam("edgeprobe_loss_ratio_upper95", "95 % Wilson upper bound of the loss ratio over "
                "the sliding window (1 with no data).", "gauge").add_sample(
                "edgeprobe_loss_ratio_upper95", base, model.wilson_interval(lost, n)[1])
            fam("edgeprobe_window_packets", "Packets inside the sliding window.",
                "gauge").add_sample("edgeprobe_window_packets", base, n)
            fam("edgeprobe_connect_budget_seconds", "The configured connect budget.",
                "gauge").add_sample("edgeprobe_connect_budget_seconds", base, self.budget)
            pred = model.predict(answered, lost, p.jitter, self.budget, self.round_trips,
                                 self.fixed, self.exchanges)
            if pred is None:
                continue
            fam("edgeprobe_connect_estimate_seconds", "Lossless connect time predicted from "
                "the window's median RTT: n*RTT + fixed.", "gauge").add_sample(
                "edgeprobe_connect_estimate_seconds", base, pred.estimate)
            fam("edgeprobe_connect_budget_miss_probability", "Model probability that a connect "
                "misses the budget: 1-(1-p)^E * Phi((B-fixed-n*mu)/(sigma*sqrt(n))).",
                "gauge").add_sample("edgeprobe_connect_budget_miss_probability", base,
                                    pred.miss_probability)
            fam("edgeprobe_r_factor", "Simplified E-model R factor (not ITU-T G.107 proper).",
                "gauge").add_sample("edgeprobe_r_factor", base, pred.r_factor)
            fam("edgeprobe_mos_estimate", "MOS estimated from the simplified E-model R factor "
                "(G.107 Annex B mapping).", "gauge").add_sample("edgeprobe_mos_estimate", base,
                                                                pred.mos)

        targets = fam("edgeprobe_targets", "Configured probe series, by kind.", "gauge")
        per_kind: dict[str, int] = {}
        for v in self.series.values():
            per_kind[v.kind] = per_kind.get(v.kind, 0) + 1
        for k in sorted(per_kind):
            targets.add_sample("edgeprobe_targets", {"region": self.region, "probe": k},
                               per_kind[k])
        yield from fams.values()
        yield from self._self_metrics()

    def _self_metrics(self) -> Iterator[Metric]:
        ss = self.self_stats
        region = {"region": self.region}
        m = Metric("edgeprobe_stray_packets", "Replies that matched nothing in flight: foreign, "
                   "late, wrong source, malformed, bad checksum or payload.", "counter")
        for (probe, reason), n in sorted(ss.stray_counts.items()):
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
        _hist(h, "edgeprobe_scheduler_lateness_seconds", region, ss.lateness)
        yield h
        h = Metric("edgeprobe_event_loop_lag_seconds", "Event-loop lag: how late a periodic "
                   "timer fired.", "histogram")
        _hist(h, "edgeprobe_event_loop_lag_seconds", region, ss.loop_lag)
        yield h
        for name, doc, val in (
            ("edgeprobe_config_last_reload_successful", "Whether the last config reload "
             "succeeded.", ss.reload_ok),
            ("edgeprobe_config_last_reload_success_timestamp_seconds", "Unix time of the last "
             "successful config load.", ss.reload_success_time),
        ):
            g = Metric(name, doc, "gauge")
            g.add_sample(name, {}, val)
            yield g
        b = Metric("edgeprobe_build_info", "Build and runtime facts, value 1.", "gauge")
        b.add_sample("edgeprobe_build_info", {"version": VERSION,
                                              "python": platform.python_version(),
                                              "icmp_mode": ss.icmp_mode}, 1.0)
        yield b


def _le(bound: float) -> str:
    s: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return s


def _hist(m: Metric, name: str, labels: dict[str, str], h: Histogram) -> None:
    acc = 0
    for bound, c in zip(h.bounds, h.counts, strict=False):
        acc += c
        m.add_sample(name + "_bucket", {**labels, "le": _le(bound)}, acc)
    acc += h.counts[-1]
    m.add_sample(name + "_bucket", {**labels, "le": "+Inf"}, acc)
    m.add_sample(name + "_count", labels, acc)
    m.add_sample(name + "_sum", labels, h.sum)
