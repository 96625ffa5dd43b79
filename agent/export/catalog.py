"""Every metric the agent exports, declared once: name, type, help, labels, buckets and which
probe kinds emit it.

The collector, ``/probe`` and the self-metrics take their families from here, docs/metrics.md is
generated from here (``python -m agent.export.catalog``), and the series a target costs per kind
is computed from here and checked against a live agent by the tests.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from probes.base import ProbeKind

MetricType = Literal["counter", "gauge", "histogram", "summary"]
# series: per target and kind; agent: the agent itself; discovery and probe_endpoint: the
# optional features, on the agent's /metrics; web: the web server's (its --web.config.file),
# on /metrics of the agent and of route; probe: the response of one /probe request, with
# blackbox_exporter's names so its dashboards and relabelling work unchanged.
Scope = Literal["series", "agent", "discovery", "probe_endpoint", "web", "probe"]
# Histogram bucket sets: configured ones (metrics.rtt_buckets, metrics.duration_buckets) or fixed.
Buckets = Literal["", "rtt", "duration", "phase", "ipdv", "burst", "scheduler"]

# The labels every per-series family carries before its own; agent static labels and target
# labels follow them.
SERIES_LABELS: tuple[str, ...] = ("region", "edge", "probe")
QUANTILES: tuple[float, ...] = (0.5, 0.95, 0.99)
# Bucket bounds in seconds (burst lengths in packets), a row per decade.
# fmt: off
IPDV_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005,
    0.001, 0.002, 0.003, 0.005, 0.0075,
    0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5,
    1.0,
)
BURST_BUCKETS: tuple[float, ...] = (1, 2, 3, 4, 5, 7, 10, 15, 20, 30, 50, 100)
SCHEDULER_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0,
)
# fmt: on

# Which series of a kind export a family: (kind, full detail) -> bool.
When = Callable[[ProbeKind[Any], bool], bool]


def _every(kind: ProbeKind[Any], full: bool) -> bool:
    return True


@dataclass(frozen=True)
class Family:
    """One metric family. ``name`` is the family name as prometheus_client spells it: a
    counter's samples add ``_total``."""

    name: str
    type: MetricType
    help: str
    scope: Scope = "series"
    labels: tuple[str, ...] = ()  # beyond the scope's own labels
    buckets: Buckets = ""
    when: When = _every  # series scope: which kinds, at which detail

    @property
    def sample_name(self) -> str:
        return self.name + "_total" if self.type == "counter" else self.name


def _packet(kind: ProbeKind[Any], full: bool) -> bool:
    return kind.packet_based


def _packet_full(kind: ProbeKind[Any], full: bool) -> bool:
    return kind.packet_based and full


def _connect(kind: ProbeKind[Any], full: bool) -> bool:
    return kind.metric_prefix == "connect"


def _run_duration(kind: ProbeKind[Any], full: bool) -> bool:
    # A packet kind's run lasts what its options say (packets, spacing, timeout): its RTTs are
    # the measurement. The run count is edgeprobe_probe_runs_total.
    return kind.metric_prefix != "connect" and (full or not kind.packet_based)


def _probe_phases(kind: ProbeKind[Any], full: bool) -> bool:
    return bool(kind.phases) and kind.metric_prefix != "connect"


def _connect_phases(kind: ProbeKind[Any], full: bool) -> bool:
    return bool(kind.phases) and kind.metric_prefix == "connect"


def _info(kind: ProbeKind[Any], full: bool) -> bool:
    return bool(kind.info_labels)


def _hops(kind: ProbeKind[Any], full: bool) -> bool:
    return kind.per_hop


# ---------------------------------------------------------------------------- per series
PROBE_SUCCESS = Family(
    "edgeprobe_probe_success", "gauge", "Whether the last run of this probe succeeded."
)
PROBE_RUNS = Family("edgeprobe_probe_runs", "counter", "Probe runs that finished.")
PROBE_ERRORS = Family(
    "edgeprobe_probe_errors",
    "counter",
    "Probe runs or packets that failed, by bounded reason (a reason's series "
    "appears with its first error unless metrics.detail is full).",
    labels=("reason",),
)
CONNECT_DURATION = Family(
    "edgeprobe_connect_duration_seconds",
    "histogram",
    "Duration of a full RTC connect; a failed connect is observed as +Inf.",
    buckets="duration",
    when=_connect,
)
PROBE_DURATION = Family(
    "edgeprobe_probe_duration_seconds",
    "histogram",
    "Duration of one probe run.",
    buckets="duration",
    when=_run_duration,
)
PROBE_PHASES = Family(
    "edgeprobe_probe_phase_duration_seconds",
    "histogram",
    "Duration of one phase of a probe run.",
    labels=("phase",),
    buckets="phase",
    when=_probe_phases,
)
CONNECT_PHASES = Family(
    "edgeprobe_connect_phase_duration_seconds",
    "histogram",
    "Duration of one phase of a connect.",
    labels=("phase",),
    buckets="phase",
    when=_connect_phases,
)
PROBE_INFO = Family(
    "edgeprobe_probe_info",
    "gauge",
    "Facts of the last run (TLS version, mapped address family...), value 1.",
    labels=("<the kind's facts>",),
    when=_info,
)
HOP_RTT = Family(
    "edgeprobe_hop_rtt_seconds",
    "gauge",
    "Median RTT to each hop in the last path run (NaN when the hop did not answer).",
    labels=("hop",),
    when=_hops,
)
HOP_SENT = Family(
    "edgeprobe_hop_packets_sent",
    "counter",
    "Packets sent towards each hop.",
    labels=("hop",),
    when=_hops,
)
HOP_LOST = Family(
    "edgeprobe_hop_packets_lost",
    "counter",
    "Packets to each hop not answered.",
    labels=("hop",),
    when=_hops,
)
RTT = Family(
    "edgeprobe_rtt_seconds",
    "histogram",
    "Round-trip time of answered packets.",
    buckets="rtt",
    when=_packet,
)
PACKETS_SENT = Family(
    "edgeprobe_packets_sent",
    "counter",
    "Packets whose fate is known (answered, or timed out).",
    when=_packet,
)
PACKETS_LOST = Family(
    "edgeprobe_packets_lost", "counter", "Packets not answered within their timeout.", when=_packet
)
LOSS_PERIODS = Family(
    "edgeprobe_loss_periods",
    "counter",
    "Runs of consecutive lost packets begun (RFC 3357 loss periods); "
    "lost / loss_periods is the mean burst length.",
    when=_packet,
)
JITTER = Family(
    "edgeprobe_jitter_seconds",
    "gauge",
    "RFC 3550 interarrival jitter estimator (gain 1/16) over consecutive round-trip "
    "times (round-trip based, not one-way).",
    when=_packet,
)
# Quantiles over the sliding window; _count and _sum as a summary defines them (cumulative,
# like client_golang's: the window's would go down as packets leave it). The text page leaves
# them out (a summary MAY omit them): there they would repeat edgeprobe_rtt_seconds_count and
# _sum value for value, ~170 bytes a target. A protobuf Summary message has fields for them,
# which the protobuf exposition fills.
RTT_RECENT = Family(
    "edgeprobe_rtt_recent_seconds",
    "summary",
    "RTT quantiles over the sliding window (exact, per edge); _count and _sum "
    "(protobuf only) are edgeprobe_rtt_seconds' cumulative ones.",
    when=_packet,
)
CONNECT_ESTIMATE = Family(
    "edgeprobe_connect_estimate_seconds",
    "gauge",
    "Lossless connect time predicted from the window's median RTT: n*RTT + fixed.",
    when=_packet,
)
MISS_PROBABILITY = Family(
    "edgeprobe_connect_budget_miss_probability",
    "gauge",
    "Model probability that a connect misses the budget: "
    "1-(1-p)^E * Phi((B-fixed-n*mu)/(sigma*sqrt(n))).",
    when=_packet,
)
IPDV = Family(
    "edgeprobe_ipdv_seconds",
    "histogram",
    "|RTT(i) - RTT(i-1)| of consecutive answered packets.",
    buckets="ipdv",
    when=_packet_full,
)
LOSS_BURSTS = Family(
    "edgeprobe_loss_burst_length",
    "histogram",
    "Lengths of runs of consecutive lost packets (RFC 3357 loss periods).",
    buckets="burst",
    when=_packet_full,
)
LOSS_UPPER95 = Family(
    "edgeprobe_loss_ratio_upper95",
    "gauge",
    "95 % Wilson upper bound of the loss ratio over the sliding window (1 with no data).",
    when=_packet_full,
)
WINDOW_PACKETS = Family(
    "edgeprobe_window_packets", "gauge", "Packets inside the sliding window.", when=_packet_full
)
R_FACTOR = Family(
    "edgeprobe_r_factor",
    "gauge",
    "Simplified E-model R factor (not ITU-T G.107 proper).",
    when=_packet_full,
)
MOS = Family(
    "edgeprobe_mos_estimate",
    "gauge",
    "MOS estimated from the simplified E-model R factor (G.107 Annex B mapping).",
    when=_packet_full,
)

# ---------------------------------------------------------------------------- the agent
TARGETS = Family(
    "edgeprobe_targets",
    "gauge",
    "Configured probe series, by kind.",
    scope="agent",
    labels=("probe",),
)
BUDGET = Family(
    "edgeprobe_connect_budget_seconds", "gauge", "The configured connect budget.", scope="agent"
)
STRAY = Family(
    "edgeprobe_stray_packets",
    "counter",
    "Replies that matched nothing in flight: foreign, late, wrong source, malformed, "
    "bad checksum or payload.",
    scope="agent",
    labels=("probe", "reason"),
)
LATE_TICKS = Family(
    "edgeprobe_scheduler_late_ticks",
    "counter",
    "Runs that started later than the late-tick threshold.",
    scope="agent",
)
SKIPPED_TICKS = Family(
    "edgeprobe_scheduler_skipped_ticks",
    "counter",
    "Ticks skipped because the previous run or the event loop overran them (never queued).",
    scope="agent",
)
EXCEPTIONS = Family(
    "edgeprobe_probe_exceptions",
    "counter",
    "Probe runs that raised (a bug; logged).",
    scope="agent",
)
LATENESS = Family(
    "edgeprobe_scheduler_lateness_seconds",
    "histogram",
    "How late runs started, against their scheduled tick.",
    scope="agent",
    buckets="scheduler",
)
LOOP_LAG = Family(
    "edgeprobe_event_loop_lag_seconds",
    "histogram",
    "Event-loop lag: how late a periodic timer fired.",
    scope="agent",
    buckets="scheduler",
)
RELOAD_OK = Family(
    "edgeprobe_config_last_reload_successful",
    "gauge",
    "Whether the last config reload succeeded.",
    scope="agent",
)
RELOAD_TIME = Family(
    "edgeprobe_config_last_reload_success_timestamp_seconds",
    "gauge",
    "Unix time of the last successful config load.",
    scope="agent",
)
BUILD_INFO = Family(
    "edgeprobe_build_info",
    "gauge",
    "Build and runtime facts, value 1.",
    scope="agent",
    labels=("version", "python", "icmp_mode"),
)

SERIES: tuple[Family, ...] = (
    PROBE_SUCCESS,
    PROBE_RUNS,
    PROBE_ERRORS,
    CONNECT_DURATION,
    PROBE_DURATION,
    PROBE_PHASES,
    CONNECT_PHASES,
    PROBE_INFO,
    HOP_RTT,
    HOP_SENT,
    HOP_LOST,
    RTT,
    PACKETS_SENT,
    PACKETS_LOST,
    LOSS_PERIODS,
    JITTER,
    RTT_RECENT,
    CONNECT_ESTIMATE,
    MISS_PROBABILITY,
    IPDV,
    LOSS_BURSTS,
    LOSS_UPPER95,
    WINDOW_PACKETS,
    R_FACTOR,
    MOS,
)
# ---------------------------------------------------------------------------- optional features
SD_OK = Family(
    "edgeprobe_sd_last_refresh_successful",
    "gauge",
    "Whether the last refresh of a target source succeeded.",
    scope="discovery",
    labels=("source",),
)
SD_TARGETS = Family(
    "edgeprobe_sd_targets",
    "gauge",
    "Targets a source currently provides.",
    scope="discovery",
    labels=("source",),
)
SD_SUCCESS_TIME = Family(
    "edgeprobe_sd_last_refresh_success_timestamp_seconds",
    "gauge",
    "Unix time of the last successful refresh.",
    scope="discovery",
    labels=("source",),
)
SD_FAILURES = Family(
    "edgeprobe_sd_refresh_failures",
    "counter",
    "Failed refreshes of a target source by reason.",
    scope="discovery",
    labels=("source", "reason"),
)
SD_DROPPED = Family(
    "edgeprobe_sd_dropped_series",
    "gauge",
    "Discovered probe series not run: over agent.max_targets.",
    scope="discovery",
)
PE_REQUESTS = Family(
    "edgeprobe_probe_endpoint_requests",
    "counter",
    "Requests to /probe by outcome (ok or the refusal reason).",
    scope="probe_endpoint",
    labels=("outcome",),
)
WEB_AUTH_SHED = Family(
    "edgeprobe_web_basic_auth_shed",
    "counter",
    "Basic-auth logins answered 503 (Retry-After) because every bcrypt worker was busy and "
    "the queue was full.",
    scope="web",
)


# ---------------------------------------------------------------------------- a /probe response
def _response(name: str, doc: str, *labels: str) -> Family:
    """A family of a /probe response: a gauge, as blackbox_exporter's are."""
    return Family(name, "gauge", doc, scope="probe", labels=labels)


P_SUCCESS = _response("probe_success", "Whether the probe succeeded.")
P_DURATION = _response("probe_duration_seconds", "Seconds the probe took.")
P_DNS = _response("probe_dns_lookup_time_seconds", "Seconds the name resolution took.")
P_IP_PROTOCOL = _response("probe_ip_protocol", "IP protocol version of the probed address.")
P_IP_HASH = _response("probe_ip_addr_hash", "CRC32 of the probed address (changes on flips).")
P_SENT = _response("probe_packets_sent", "Packets sent.")
P_RECEIVED = _response("probe_packets_received", "Packets answered.")
P_RTT = _response("probe_rtt_seconds", "Round-trip times of this run (min, mean, max).", "stat")
P_PHASES = _response("probe_phase_duration_seconds", "Seconds per phase.", "phase")
P_FAILED = _response("probe_failed_due_to", "1 for the reason the probe failed.", "reason")
P_ERRORS = _response("probe_errors", "Per-packet errors of this run.", "reason")
P_INFO = _response("edgeprobe_probe_info", "Facts about the probed endpoint.", "<the kind's facts>")

AGENT: tuple[Family, ...] = (
    TARGETS,
    BUDGET,
    STRAY,
    LATE_TICKS,
    SKIPPED_TICKS,
    EXCEPTIONS,
    LATENESS,
    LOOP_LAG,
    RELOAD_OK,
    RELOAD_TIME,
    BUILD_INFO,
)
FEATURES: tuple[Family, ...] = (
    SD_OK,
    SD_TARGETS,
    SD_SUCCESS_TIME,
    SD_FAILURES,
    SD_DROPPED,
    PE_REQUESTS,
    WEB_AUTH_SHED,
)
PROBE_RESPONSE: tuple[Family, ...] = (
    P_SUCCESS,
    P_DURATION,
    P_DNS,
    P_IP_PROTOCOL,
    P_IP_HASH,
    P_SENT,
    P_RECEIVED,
    P_RTT,
    P_PHASES,
    P_FAILED,
    P_ERRORS,
    P_INFO,
)


def metric_family(spec: Family) -> GaugeMetricFamily | CounterMetricFamily:
    """An empty family of ``spec`` with its labels, for a collector to fill at scrape time."""
    if spec.type == "counter":
        return CounterMetricFamily(spec.name, spec.help, labels=list(spec.labels))
    return GaugeMetricFamily(spec.name, spec.help, labels=list(spec.labels))


def kind_gauge(kind: ProbeKind[Any], name: str) -> Family:
    """A gauge a kind declares itself (``ProbeKind.gauges``): the one extension point."""
    return Family(
        f"edgeprobe_{name}", "gauge", kind.gauges[name], when=lambda k, full: name in k.gauges
    )


def for_kind(kind: ProbeKind[Any], full: bool) -> list[Family]:
    """The per-series families a kind's series export at a detail."""
    return [f for f in SERIES if f.when(kind, full)] + [kind_gauge(kind, g) for g in kind.gauges]


# The most series one target may cost per kind (lean detail, lean buckets), in the text format
# and where the server keeps native histograms (a histogram is one series there). A test holds
# the catalog to these and counts a live agent's series against what the catalog computes.
BUDGETS: dict[str, tuple[int, int]] = {
    "icmp": (30, 15),
    "udp": (30, 15),
    "stun": (32, 16),
    "tcp": (25, 10),
    "tls": (30, 10),
    "http": (40, 15),
    "dns": (25, 10),
    "turn": (30, 10),
    "path": (25, 10),
    "connect": (40, 15),
    "webrtc": (40, 15),
    "relay": (45, 20),
}


def series_per_target(
    kind: ProbeKind[Any],
    bucket_counts: Mapping[str, int],
    full: bool = False,
    native: bool = False,
    hops: int = 0,
) -> int:
    """Series one target of ``kind`` costs before its first error: with ``bucket_counts``
    classic bounds per bucket set, ``native`` where the server keeps only the native histogram
    (one series each), ``hops`` hops for the per-hop families. Agent and target labels add
    none; each error reason adds one from its first error (all of them up front when full)."""
    n = 0
    for f in for_kind(kind, full):
        per = 1
        if f.type == "histogram" and not native:
            per = bucket_counts[f.buckets] + 3  # +Inf, _count, _sum
        elif f.type == "summary":
            per = len(QUANTILES) + (2 if native else 0)  # _count, _sum: protobuf only
        if "reason" in f.labels:
            per *= len(kind.all_reasons) if full else 0
        if "phase" in f.labels:
            per *= len(kind.phases)
        if "hop" in f.labels:
            per *= hops
        n += per
    return n


def fixed_bucket_counts() -> dict[str, int]:
    return {
        "ipdv": len(IPDV_BUCKETS),
        "burst": len(BURST_BUCKETS),
        "scheduler": len(SCHEDULER_BUCKETS),
    }


def bucket_counts(rtt: int, durations: int, phases: int) -> dict[str, int]:
    return {**fixed_bucket_counts(), "rtt": rtt, "duration": durations, "phase": phases}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(probes: Mapping[str, ProbeKind[Any]]) -> str:
    """docs/metrics.md."""
    from agent.config.model import MetricsSection

    lean, dense = MetricsSection(), MetricsSection(classic_buckets="dense")
    lean_n = bucket_counts(len(lean.rtt), len(lean.durations), len(lean.phases))
    dense_n = bucket_counts(len(dense.rtt), len(dense.durations), len(dense.phases))
    out = [
        "# Metrics",
        "",
        "<!-- Generated by `python -m agent.export.catalog > docs/metrics.md` from",
        "     agent/export/catalog.py; tests/agent/test_metric_catalog.py fails when they",
        "     differ. -->",
        "",
        "Every family the agent exports. Per-series families carry "
        f"`{', '.join(SERIES_LABELS)}`, then the agent's static labels and the target labels "
        "of the config; agent families carry `region`. Counters are listed without `_total`. "
        "Histograms carry native buckets too (`metrics.native_histograms`), sent to scrapers "
        "that ask for the protobuf format.",
        "",
        "## Per target and probe kind",
        "",
        "*full only*: exported with `metrics.detail: full`.",
        "",
        "| family | type | labels | buckets | emitted by | help |",
        "|---|---|---|---|---|---|",
    ]
    for f in SERIES:
        kinds = [k.name for k in probes.values() if f.when(k, True)]
        by = "every kind" if len(kinds) == len(probes) else ", ".join(kinds)
        if not any(f.when(k, False) for k in probes.values()):
            by += " (*full only*)"
        out.append(
            f"| `{f.sample_name}` | {f.type} | {', '.join(f.labels) or '-'} | "
            f"{f.buckets or '-'} | {by} | {_cell(f.help)} |"
        )
    # A gauge several kinds declare (connect_over_budget) is one family: one row.
    gauges: dict[str, tuple[Family, list[str]]] = {}
    for kind in probes.values():
        for g in kind.gauges:
            f = kind_gauge(kind, g)
            gauges.setdefault(f.name, (f, []))[1].append(kind.name)
    for f, kinds in gauges.values():
        out.append(f"| `{f.name}` | gauge | - | - | {', '.join(kinds)} | {_cell(f.help)} |")
    for title, fams in (
        ("The agent itself", AGENT),
        ("Optional features (discovery, /probe) and the web server", FEATURES),
        ("A /probe response (blackbox_exporter's names, on the response only)", PROBE_RESPONSE),
    ):
        out += ["", f"## {title}", "", "| family | type | labels | help |", "|---|---|---|---|"]
        for f in fams:
            out.append(
                f"| `{f.sample_name}` | {f.type} | {', '.join(f.labels) or '-'} | {_cell(f.help)} |"
            )
    out += [
        "",
        "## Series per target",
        "",
        "What one target costs per kind before its first error (each error reason adds one "
        "series from its first error). *lean* is the default: classic bounds "
        f"RTT {lean_n['rtt']}, durations {lean_n['duration']}, phases {lean_n['phase']}; "
        "*native* counts a histogram as one series, as a Prometheus server with native "
        "histograms keeps it; *dense* is `metrics.classic_buckets: dense` (RTT "
        f"{dense_n['rtt']}, durations {dense_n['duration']}); *full* adds "
        "`metrics.detail: full`. `path` adds 3 per hop. The budget is what a test holds the "
        "lean figures to.",
        "",
        "| kind | lean (text) | lean (native) | budget (text / native) | dense | dense, full |",
        "|---|---|---|---|---|---|",
    ]
    for kind in probes.values():
        text = series_per_target(kind, lean_n)
        native = series_per_target(kind, lean_n, native=True)
        budget = BUDGETS.get(kind.name)
        b = f"{budget[0]} / {budget[1]}" if budget else "-"
        out.append(
            f"| {kind.name} | {text} | {native} | {b} | "
            f"{series_per_target(kind, dense_n)} | "
            f"{series_per_target(kind, dense_n, full=True)} |"
        )
    return "\n".join(out) + "\n"


def walk_names() -> Iterator[str]:
    """Every family name the catalog declares."""
    for f in (*SERIES, *AGENT, *FEATURES, *PROBE_RESPONSE):
        yield f.name


def _main() -> None:
    from probes import PROBES

    sys.stdout.write(markdown(PROBES))


if __name__ == "__main__":
    _main()
