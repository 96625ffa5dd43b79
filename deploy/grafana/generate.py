"""Render the edgeprobe Grafana dashboards (dashboards/*.json) from this one description.

Run ``python deploy/grafana/generate.py`` after a change and commit the JSON; a test checks that
regenerating gives the committed files byte for byte. Python rather than hand-written JSON so
the three dashboards share one datasource, one set of variables and one colour scale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39
SEL = 'region=~"$region", edge=~"$edge"'


def quantile(q: float, metric: str, sel: str, by: str) -> str:
    """histogram_quantile of a histogram, native form first and the classic one as the `or`
    fallback (a Prometheus with native histograms keeps only the native series; others only
    the classic ones; docs/operations/alerts.md)."""
    return (
        f"histogram_quantile({q}, sum by ({by}) (rate({metric}{{{sel}}}[$__rate_interval])))"
        f" or histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{sel}}}"
        "[$__rate_interval])))"
    )


def mean(metric: str, sel: str, by: str) -> str:
    """The mean observation of a histogram over the rate interval, native form first."""
    native = f"sum by ({by}) (rate({metric}{{{sel}}}[$__rate_interval]))"
    return (
        f"histogram_sum({native}) / histogram_count({native}) or "
        f"sum by ({by}) (rate({metric}_sum{{{sel}}}[$__rate_interval])) / "
        f"sum by ({by}) (rate({metric}_count{{{sel}}}[$__rate_interval]))"
    )


def target(
    expr: str, legend: str = "", ref: str = "A", instant: bool = False, fmt: str = "time_series"
) -> dict[str, Any]:
    t: dict[str, Any] = {
        "datasource": DS,
        "expr": expr,
        "refId": ref,
        "format": fmt,
        "legendFormat": legend or "__auto",
    }
    if instant:
        t["instant"] = True
        t["range"] = False
    return t


def panel(
    pid: int,
    title: str,
    kind: str,
    grid: tuple[int, int, int, int],
    targets: list[dict[str, Any]],
    description: str,
    unit: str = "",
    **extra: Any,
) -> dict[str, Any]:
    x, y, w, h = grid
    p: dict[str, Any] = {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit} if unit else {}, "overrides": []},
        "options": {},
    }
    for k, v in extra.items():
        if k == "defaults":
            p["fieldConfig"]["defaults"].update(v)
        else:
            p[k] = v
    return p


def table(
    pid: int,
    title: str,
    grid: tuple[int, int, int, int],
    expr: str,
    description: str,
    **extra: Any,
) -> dict[str, Any]:
    """A table panel of one instant query: a row per series."""
    targets = [target(expr, instant=True, fmt="table")]
    return panel(pid, title, "table", grid, targets, description, **extra)


def by_edge(rule: str, sel: str, what: str = "", ref: str = "A") -> dict[str, Any]:
    """A series the rules record per region and edge (``region_edge:rule``), one line each,
    its legend ``what`` region / edge."""
    legend = "{{region}} / {{edge}}"
    return target(f"region_edge:{rule}{{{sel}}}", f"{what} {legend}" if what else legend, ref=ref)


def fixed_colour(colour: str) -> dict[str, Any]:
    return {"color": {"mode": "fixed", "fixedColor": colour}}


def thresholds(*steps: tuple[str, float | None]) -> dict[str, Any]:
    """Absolute thresholds: (colour, from value) pairs, the first from None."""
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in steps]}


def yes_no(no: str, yes: str) -> list[dict[str, Any]]:
    """Value mappings of a 0/1 series: 0 shows ``no`` in red, 1 ``yes`` in green."""
    return [
        {
            "type": "value",
            "options": {"0": {"text": no, "color": "red"}, "1": {"text": yes, "color": "green"}},
        }
    ]


def organize(
    *hide: str, order: tuple[str, ...] = (), rename: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """A table's "organize" transformation: hide fields, put ``order`` first, rename."""
    options: dict[str, Any] = {"excludeByName": dict.fromkeys(hide, True)}
    if order:
        options["indexByName"] = {f: i for i, f in enumerate(order)}
    if rename:
        options["renameByName"] = rename
    return [{"id": "organize", "options": options}]


# Compliance colours: red under 95 %, orange under the 99 % SLO, green at or above it.
COMPLIANCE = thresholds(("red", None), ("orange", 0.95), ("green", 0.99))


def variable(name: str, query: str, label: str, multi: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-var"},
        "refresh": 2,
        "includeAll": True,
        "allValue": ".*",
        "multi": multi,
        "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
    }


DATASOURCE_VAR = {
    "name": "datasource",
    "label": "Prometheus",
    "type": "datasource",
    "query": "prometheus",
    "current": {},
    "options": [],
    "refresh": 1,
    "hide": 0,
}
REGION_VAR = variable(
    "region",
    "label_values(region_edge:edgeprobe_connect_within_budget:ratio_rate5m, region)",
    "region",
)
EDGE_VAR = variable(
    "edge",
    "label_values(region_edge:edgeprobe_connect_within_budget:ratio_rate5m"
    '{region=~"$region"}, edge)',
    "edge",
)
INSTANCE_VAR = variable(
    "instance",
    'label_values(up{job=~".*edgeprobe.*", job!~".*edgeprobe-route.*", '
    'region=~"$region"}, instance)',
    "agent",
)


def dashboard(
    uid: str,
    title: str,
    description: str,
    variables: list[dict[str, Any]],
    panels: list[dict[str, Any]],
    links: list[str],
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["edgeprobe"],
        "timezone": "utc",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "templating": {"list": [DATASOURCE_VAR, *variables]},
        "annotations": {
            "list": [
                {
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "links": [
            {
                "type": "link",
                "title": t,
                "url": f"/d/{u}",
                "keepTime": True,
                "includeVars": True,
                "asDropdown": False,
                "icon": "dashboard",
                "tags": [],
                "targetBlank": False,
                "tooltip": "",
            }
            for t, u in ((t, LINKS[t]) for t in links)
        ],
        "panels": panels,
    }


LINKS = {
    "edgeprobe / overview": "edgeprobe-overview",
    "edgeprobe / edge detail": "edgeprobe-edge",
    "edgeprobe / agent health": "edgeprobe-agent",
}


def overview() -> dict[str, Any]:
    r = 'region=~"$region"'
    panels = [
        panel(
            1,
            "Edges meeting the budget SLO",
            "stat",
            (0, 0, 8, 6),
            [
                target(
                    f"count by (region) (region_edge:edgeprobe_connect_within_budget:ratio_rate1h"
                    f"{{{r}}} >= on () group_left () edgeprobe:connect_budget_slo:target)",
                    "{{region}}",
                    instant=True,
                )
            ],
            "Per region, how many edges had at least the SLO target (default 99 %) of connects "
            "within the 600 ms budget over the last hour.",
            defaults=fixed_colour("green"),
        ),
        panel(
            2,
            "Edges missing the budget SLO",
            "stat",
            (8, 0, 8, 6),
            [
                target(
                    f"count by (region) (region_edge:edgeprobe_connect_within_budget:ratio_rate1h"
                    f"{{{r}}} < on () group_left () edgeprobe:connect_budget_slo:target)",
                    "{{region}}",
                    instant=True,
                )
            ],
            "Per region, how many edges fell short of the SLO target over the last hour.",
            defaults=fixed_colour("red"),
        ),
        table(
            3,
            "Best edge per region",
            (16, 0, 8, 6),
            f"region:edgeprobe_best_edge:info{{{r}}}",
            "edgeprobe route's first choice per region (region:edgeprobe_best_edge:info, "
            "relayed from its scrape): the edge signalling services send clients to. It "
            "changes when the incumbent turns ineligible, or a challenger stays significantly "
            "better for the hold time. Empty: the route service is not scraped.",
            transformations=organize("Time", "Value", "__name__", order=("region", "edge")),
        ),
        table(
            4,
            "Connects within budget: region x edge (1h)",
            (0, 6, 24, 8),
            f"region_edge:edgeprobe_connect_within_budget:ratio_rate1h{{{r}}}",
            "Fraction of connects within 600 ms over the last hour, one row per region and one "
            "column per edge, coloured against the SLO: green at or above 99 %, orange above "
            "95 %, red below. Measured by the connect probe where an edge has one, else the "
            "model's 1 - miss probability.",
            unit="percentunit",
            defaults={
                "decimals": 2,
                "thresholds": COMPLIANCE,
                "custom": {"cellOptions": {"type": "color-background"}},
            },
            transformations=[
                {
                    "id": "groupingToMatrix",
                    "options": {"rowField": "region", "columnField": "edge", "valueField": "Value"},
                }
            ],
        ),
        panel(
            5,
            "Connects within budget (5m)",
            "timeseries",
            (0, 14, 12, 9),
            [
                by_edge("edgeprobe_connect_within_budget:ratio_rate5m", r),
                target("edgeprobe:connect_budget_slo:target", "SLO target", ref="B"),
            ],
            "The SLI over 5 minutes per edge, with the SLO target.",
            unit="percentunit",
            defaults={"min": 0, "max": 1},
        ),
        panel(
            6,
            "Error-budget burn rate (1h)",
            "timeseries",
            (12, 14, 12, 9),
            [by_edge("edgeprobe_connect_budget:burnrate1h", r)],
            "How many times faster than the SLO allows each edge spends its error budget. "
            "Pages at 14.4 (1h and 5m), 6 (6h and 30m); tickets at 1 (3d and 6h).",
            defaults={
                "thresholds": thresholds(("green", None), ("orange", 1), ("red", 14.4)),
                "custom": {
                    "thresholdsStyle": {"mode": "line"},
                    "scaleDistribution": {"type": "log", "log": 10},
                },
            },
        ),
        table(
            7,
            "Firing edgeprobe alerts",
            (0, 23, 24, 7),
            f'ALERTS{{alertname=~"Edgeprobe.*", alertstate="firing", {r}}}',
            "Alerts the rules fire now; docs/operations/alerts.md says what each means and "
            "what to do.",
            transformations=organize("Time", "Value", "__name__", "alertstate"),
        ),
        table(
            8,
            "Route candidates: eligibility and reason",
            (0, 30, 12, 9),
            f"region_edge:edgeprobe_route_eligible:info{{{r}}}",
            "Per region and edge, whether edgeprobe route may choose the edge (1) and why not "
            "(0): over_budget (the 5m or 1h lower bound of its miss ratio proves a breach), "
            "agent_down, no_data, too_few_samples. docs/routing-policy.md.",
            defaults={
                "mappings": yes_no("no", "eligible"),
                "custom": {"cellOptions": {"type": "color-text"}},
            },
            transformations=organize(
                "Time",
                "__name__",
                order=("region", "edge", "Value", "reason"),
                rename={"Value": "eligible"},
            ),
        ),
        panel(
            9,
            "Route candidates: miss upper bound (1h)",
            "timeseries",
            (12, 30, 12, 9),
            [
                by_edge("edgeprobe_route_miss_ucb:ratio1h", r),
                target("edgeprobe:connect_budget_slo:error_budget", "error budget", ref="B"),
            ],
            "The Wilson upper bound of each edge's connect budget-miss ratio over 1h (the "
            "model's miss probability where connects are too few): edgeprobe route ranks "
            "eligible edges by its band, then by RTT p95.",
            unit="percentunit",
            defaults={"min": 0},
        ),
        panel(
            10,
            "Route decision over time",
            "state-timeline",
            (0, 39, 24, 7),
            [target(f"region:edgeprobe_best_edge:info{{{r}}}", "{{region}}: {{edge}}")],
            "One lane per region and edge: filled while edgeprobe route sends the region's "
            "clients to that edge first. A change of lane is a switch.",
            options={"showValue": "never", "mergeValues": True, "rowHeight": 0.8},
            defaults=fixed_colour("green"),
        ),
    ]
    return dashboard(
        "edgeprobe-overview",
        "edgeprobe / overview",
        "Which edges meet the 600 ms connect budget, per region, which ones "
        "edgeprobe route may choose, and its choice per region.",
        [REGION_VAR],
        panels,
        ["edgeprobe / edge detail", "edgeprobe / agent health"],
    )


def edge_detail() -> dict[str, Any]:
    panels = [
        panel(
            1,
            "RTT distribution",
            "heatmap",
            (0, 0, 24, 9),
            [
                # Native first: a native histogram is one series, drawn as one heatmap where
                # Grafana supports native histograms; classic buckets, one series per `le`, where
                # the server keeps those.
                target(
                    f"sum(rate(edgeprobe_rtt_seconds{{{SEL}}}[$__rate_interval])) or "
                    f"sum by (le) (rate(edgeprobe_rtt_seconds_bucket{{{SEL}}}"
                    "[$__rate_interval]))",
                    "{{le}}",
                    fmt="heatmap",
                )
            ],
            "Packet RTTs from the histogram (edgeprobe_rtt_seconds), all probes of the "
            "selected edges: native buckets (1.09 % wide) where Prometheus keeps native "
            "histograms, else the classic ones. Bimodal bands mean two paths.",
            unit="s",
            options={
                "calculate": False,
                "yAxis": {"unit": "s"},
                "color": {"mode": "scheme", "scheme": "Spectral", "steps": 64},
            },
        ),
        panel(
            2,
            "RTT p50 / p95 / p99 (5m)",
            "timeseries",
            (0, 9, 12, 8),
            [
                by_edge("edgeprobe_rtt_seconds:p50_5m", SEL, "p50"),
                by_edge("edgeprobe_rtt_seconds:p95_5m", SEL, "p95", ref="B"),
                by_edge("edgeprobe_rtt_seconds:p99_5m", SEL, "p99", ref="C"),
            ],
            "Quantiles of the RTT histogram over 5 minutes: within ~1 % of the true value "
            "from native histograms, within one classic bucket otherwise (2 % with "
            "metrics.classic_buckets: dense).",
            unit="s",
        ),
        panel(
            3,
            "Loss (round trip)",
            "timeseries",
            (12, 9, 12, 8),
            [by_edge("edgeprobe_packets_lost:ratio_rate5m", SEL, "loss")],
            "Round-trip loss from the sent/lost counters over 5 minutes.",
            unit="percentunit",
        ),
        panel(
            4,
            "Jitter (RFC 3550, round trip)",
            "timeseries",
            (0, 17, 8, 8),
            [by_edge("edgeprobe_jitter_seconds:max_avg5m", SEL)],
            "RFC 3550 interarrival-jitter estimator over consecutive RTTs, averaged over 5m; "
            "the worst probe of the edge.",
            unit="s",
        ),
        panel(
            5,
            "Connect phases (stacked)",
            "timeseries",
            (8, 17, 8, 8),
            [target(mean("edgeprobe_connect_phase_duration_seconds", SEL, "phase"), "{{phase}}")],
            "Mean time of each step of the connect probe (DNS, TCP, TLS, STUN, TURN), stacked: "
            "the top is the whole connect against the 600 ms budget.",
            unit="s",
            defaults={
                "custom": {
                    "stacking": {"mode": "normal", "group": "A"},
                    "fillOpacity": 60,
                    "thresholdsStyle": {"mode": "line"},
                },
                "thresholds": thresholds(("green", None), ("red", 0.6)),
            },
        ),
        panel(
            6,
            "Mean loss burst (packets)",
            "timeseries",
            (16, 17, 8, 8),
            [
                target(
                    f"sum by (region, edge) (rate(edgeprobe_packets_lost_total{{{SEL}}}"
                    "[$__rate_interval])) / sum by (region, edge) (rate("
                    f"edgeprobe_loss_periods_total{{{SEL}}}[$__rate_interval]))",
                    "{{region}} / {{edge}}",
                )
            ],
            "Lost packets per loss period (RFC 3357): 1 is scattered loss, which codecs "
            "conceal; longer bursts are what a call hears. Empty where nothing was lost.",
        ),
        panel(
            7,
            "Connect budget: model miss probability",
            "timeseries",
            (0, 25, 12, 8),
            [
                by_edge("edgeprobe_connect_budget_miss_probability:max_avg5m", SEL),
                target(
                    f"max by (region, edge) (edgeprobe_connect_estimate_seconds{{{SEL}}})",
                    "estimate (s) {{region}} / {{edge}}",
                    ref="B",
                ),
            ],
            "The model's probability that a connect over this path misses 600 ms, and its "
            "lossless connect estimate n x RTT + fixed.",
            unit="percentunit",
        ),
        panel(
            8,
            "Connects within budget (5m)",
            "timeseries",
            (12, 25, 12, 8),
            [by_edge("edgeprobe_connect_within_budget:ratio_rate5m", SEL)],
            "The SLI: measured by the connect probe where present, else the model.",
            unit="percentunit",
            defaults={"min": 0, "max": 1},
        ),
        panel(
            9,
            "Route eligibility: miss-ratio bounds",
            "timeseries",
            (0, 33, 24, 8),
            [
                by_edge("edgeprobe_route_miss_lcb:ratio5m", SEL, "lower bound 5m"),
                by_edge("edgeprobe_route_miss_lcb:ratio1h", SEL, "lower bound 1h", ref="B"),
                by_edge("edgeprobe_route_miss_ucb:ratio1h", SEL, "upper bound 1h", ref="C"),
                target(
                    "edgeprobe:route_policy:fast_burn * on () "
                    "edgeprobe:connect_budget_slo:error_budget",
                    "5m line (fast path)",
                    ref="D",
                ),
                target(
                    "edgeprobe:route_policy:slow_burn * on () "
                    "edgeprobe:connect_budget_slo:error_budget",
                    "1h line (slow path)",
                    ref="E",
                ),
            ],
            "Why edgeprobe route may or may not choose the edge: it is over_budget while the "
            "Wilson lower bound of its connect miss ratio is above a line (5m: a hard breach, "
            "1h: a sustained one). The 1h upper bound ranks eligible edges. Model-only edges "
            "have the 5m figure only. docs/routing-policy.md.",
            unit="percentunit",
            defaults={"min": 0},
        ),
        panel(
            10,
            "WebRTC connect: measured vs model (30m)",
            "timeseries",
            (0, 41, 12, 8),
            [
                by_edge("edgeprobe_webrtc_connect_seconds:p50_30m", SEL, "measured p50"),
                by_edge("edgeprobe_connect_estimate_seconds:max_avg30m", SEL, "model", ref="B"),
            ],
            "The median of real WebRTC connects (the webrtc probe: WHIP, ICE, DTLS, first "
            "media) next to the budget model's lossless estimate n x RTT + fixed. Where they "
            "part, set agent.model to the connect your clients make.",
            unit="s",
        ),
        panel(
            11,
            "WebRTC budget misses: measured vs model (30m)",
            "timeseries",
            (12, 41, 12, 8),
            [
                by_edge("edgeprobe_webrtc_connect_miss:ratio30m", SEL, "measured"),
                by_edge(
                    "edgeprobe_connect_budget_miss_probability:max_avg30m", SEL, "model", ref="B"
                ),
            ],
            "The share of webrtc connects over 600 ms next to the model's miss probability.",
            unit="percentunit",
            defaults={"min": 0},
        ),
    ]
    return dashboard(
        "edgeprobe-edge",
        "edgeprobe / edge detail",
        "RTT, loss, jitter, connect phases and MOS for one or more edges.",
        [REGION_VAR, EDGE_VAR],
        panels,
        ["edgeprobe / overview", "edgeprobe / agent health"],
    )


def agent_health() -> dict[str, Any]:
    r = 'region=~"$region", instance=~"$instance"'
    panels = [
        panel(
            1,
            "Agents up",
            "stat",
            (0, 0, 8, 6),
            [
                target(
                    f'up{{job=~".*edgeprobe.*", job!~".*edgeprobe-route.*", {r}}}',
                    "{{region}} {{instance}}",
                    instant=True,
                )
            ],
            "1 when Prometheus scraped the agent successfully.",
            defaults={"mappings": yes_no("down", "up")},
        ),
        panel(
            2,
            "Configured probe series",
            "stat",
            (8, 0, 8, 6),
            [
                target(
                    f"sum by (region, probe) (edgeprobe_targets{{{r}}})",
                    "{{region}} {{probe}}",
                    instant=True,
                )
            ],
            "Target x probe-kind series each agent runs.",
        ),
        panel(
            3,
            "Last config reload",
            "stat",
            (16, 0, 8, 6),
            [
                target(
                    f"edgeprobe_config_last_reload_successful{{{r}}}",
                    "{{region}} {{instance}}",
                    instant=True,
                ),
                target(
                    f"changes(edgeprobe_config_last_reload_success_timestamp_seconds{{{r}}}[1h])",
                    "reloads in 1h {{region}} {{instance}}",
                    ref="B",
                    instant=True,
                ),
            ],
            "Whether the last reload succeeded (1) and how many reloads succeeded in the last "
            "hour.",
        ),
        panel(
            4,
            "Event loop lag p99",
            "timeseries",
            (0, 6, 12, 8),
            [
                target(
                    quantile(0.99, "edgeprobe_event_loop_lag_seconds", r, "region, instance"),
                    "{{region}} {{instance}}",
                )
            ],
            "How late the agent's event loop runs callbacks. Lag shows up in every RTT it "
            "measures in user space; above a few ms the host is overloaded.",
            unit="s",
        ),
        panel(
            5,
            "Scheduler: late and skipped ticks",
            "timeseries",
            (12, 6, 12, 8),
            [
                target(
                    "sum by (region, instance) (rate(edgeprobe_scheduler_late_ticks_total"
                    f"{{{r}}}[$__rate_interval]))",
                    "late {{region}} {{instance}}",
                ),
                target(
                    "sum by (region, instance) (rate(edgeprobe_scheduler_skipped_ticks_total"
                    f"{{{r}}}[$__rate_interval]))",
                    "skipped {{region}} {{instance}}",
                    ref="B",
                ),
                target(
                    quantile(0.99, "edgeprobe_scheduler_lateness_seconds", r, "region, instance"),
                    "lateness p99 {{region}} {{instance}}",
                    ref="C",
                ),
            ],
            "Ticks per second that woke up late or were skipped because the previous run "
            "had not finished; and the p99 wake-up lateness.",
            unit="short",
        ),
        panel(
            6,
            "Stray packets",
            "timeseries",
            (0, 14, 12, 8),
            [
                # `or 0 x build_info`: the counter has no series until the first stray packet.
                target(
                    "sum by (region, instance, reason) (rate(edgeprobe_stray_packets_total"
                    f"{{{r}}}[$__rate_interval])) or sum by (region, instance) "
                    f"(0 * edgeprobe_build_info{{{r}}})",
                    "{{region}} {{instance}} {{reason}}",
                )
            ],
            "Replies that matched no probe in flight (late, duplicated, malformed, or another "
            "process's). A steady rate means a timeout shorter than the path's RTT.",
            unit="pps",
        ),
        panel(
            7,
            "Probe errors by reason",
            "timeseries",
            (12, 14, 12, 8),
            [
                target(
                    "sum by (region, probe, reason) (rate(edgeprobe_probe_errors_total"
                    f"{{{r}}}[$__rate_interval]))",
                    "{{region}} {{probe}} {{reason}}",
                )
            ],
            "Failed runs and per-packet errors by bounded reason.",
            unit="ops",
        ),
        table(
            8,
            "Build",
            (0, 22, 24, 5),
            f"edgeprobe_build_info{{{r}}}",
            "Agent version, Python version and ICMP socket mode.",
            transformations=organize("Time", "Value", "__name__"),
        ),
    ]
    return dashboard(
        "edgeprobe-agent",
        "edgeprobe / agent health",
        "The agents themselves: up, event loop lag, late ticks, stray packets, reloads.",
        [REGION_VAR, INSTANCE_VAR],
        panels,
        ["edgeprobe / overview", "edgeprobe / edge detail"],
    )


def render() -> dict[str, str]:
    return {
        f"{d['uid']}.json": json.dumps(d, indent=2, sort_keys=False) + "\n"
        for d in (overview(), edge_detail(), agent_health())
    }


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
