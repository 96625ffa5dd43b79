"""The results as a Markdown table, a PNG chart, and the targets checked as ratios (the targets
are listed in docs/development/performance.md)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

METHOD = {
    "rate": "every target once per second (edgeprobe interval 1s packets 1; fping -l -p 1000; "
    "smokeping_prober interval 1s), 56-byte payloads, 900 ms timeout where the tool "
    "has one",
    "cpu": "utime+stime(+cutime+cstime) from /proc/PID/stat over the measured window (after "
    "the warm-up; the closing scrape is outside it), divided by the ICMP echo requests "
    "the tool's namespace really sent in that window (OutEchos in /proc/PID/net/snmp)",
    "rss": "VmHWM from /proc/PID/status at the end of the window",
    "rtt_error": "per target: the tool's median RTT minus the lab's true median over the same "
    "echoes (edgeprobe: exact window median from edgeprobe_rtt_recent_seconds; "
    "smokeping_prober: histogram_quantile(0.5) over fine buckets; fping: median of "
    "its per-packet lines); then the median and p99 over targets. fping also per "
    "packet, matched to the lab's record of the same echo. On loopback the true "
    "RTT is taken as 0, so the error is the measured RTT itself",
    "loss_error": "pooled reported loss minus the lab's true loss in the same window",
    "truth": "lab ground truth = the user-space forwarder's release time minus its read time, "
    "both directions; kernel and TUN time outside it is part of every tool's error",
}


def _runs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for w in doc["workloads"] for r in w["runs"]]


def _get(r: dict[str, Any] | None, *path: str) -> Any:
    x: Any = r
    for p in path:
        if not isinstance(x, dict):
            return None
        x = x.get(p)
    return x


def _find(doc: dict[str, Any], tool: str, workload: str) -> dict[str, Any] | None:
    for r in _runs(doc):
        if r["tool"] == tool and r["workload"] == workload and r["ok"]:
            return r
    return None


def check_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets (docs/development/performance.md), as measured in this run (each: value,
    limit, met or None)."""
    lab = [w["workload"]["name"] for w in doc["workloads"] if w["workload"]["via_lab"]]
    loop = [w["workload"]["name"] for w in doc["workloads"] if not w["workload"]["via_lab"]]
    out: list[dict[str, Any]] = []

    def add(name: str, value: Any, limit: Any, ok: bool | None, where: str) -> None:
        out.append({"target": name, "workload": where, "value": value, "limit": limit, "met": ok})

    if lab:
        wl = lab[-1]  # the largest lab workload (1,000 targets in the full run)
        ep, fp, sp = (_find(doc, t, wl) for t in ("edgeprobe", "fping", "smokeping_prober"))
        med = _get(ep, "rtt_error", "median_ms")
        p99 = _get(ep, "rtt_error", "abs_p99_ms")
        add("RTT error median <= 0.1 ms", med, 0.1, None if med is None else abs(med) <= 0.1, wl)
        add("RTT error p99 <= 1 ms", p99, 1.0, None if p99 is None else p99 <= 1.0, wl)
        fp99 = _get(fp, "rtt_error", "abs_p99_ms")
        add(
            "RTT error p99 no worse than fping's",
            p99,
            fp99,
            None if p99 is None or fp99 is None else p99 <= fp99,
            wl,
        )
        c, fc, sc = (_get(r, "cpu_per_1k_probes") for r in (ep, fp, sp))
        add(
            "CPU per 1,000 probes within 2x fping's",
            c,
            None if fc is None else 2 * fc,
            None if c is None or fc is None else c <= 2 * fc,
            wl,
        )
        add(
            "CPU per 1,000 probes 10x below smokeping_prober's",
            c,
            None if sc is None else sc / 10,
            None if c is None or sc is None else c <= sc / 10,
            wl,
        )
    if loop:
        wl = loop[-1]
        ep = _find(doc, "edgeprobe", wl)
        cores, late, rss = (
            _get(ep, "cpu_cores"),
            _get(ep, "agent", "scheduler_lateness_p99_ms"),
            _get(ep, "peak_rss_mb"),
        )
        add(
            "fits one core (CPU seconds per second < 1)",
            cores,
            1.0,
            None if cores is None else cores < 1.0,
            wl,
        )
        add("scheduler lateness p99 < 5 ms", late, 5.0, None if late is None else late < 5.0, wl)
        add("peak RSS < 150 MB", rss, 150.0, None if rss is None else rss < 150.0, wl)
    ex = doc.get("export") or {}
    for r in ex.get("render", []):
        n, where = r["targets"], f"export-{r['targets']}"
        if n == 1000:
            add(
                "/metrics (text) render <= 100 ms",
                1e3 * r["text_s"],
                100.0,
                r["text_s"] <= 0.1,
                where,
            )
        if n == 10000:
            mb, pmb = r["text_bytes"] / 1e6, r["protobuf_bytes"] / 1e6
            add("/metrics (text) <= 25 MB", mb, 25.0, mb <= 25.0, where)
            add("/metrics (text) render <= 1 s", r["text_s"], 1.0, r["text_s"] <= 1.0, where)
            add("/metrics (protobuf) <= 10 MB", pmb, 10.0, pmb <= 10.0, where)
    st = ex.get("startup")
    if st and st.get("targets") == 10000:
        rs = st.get("ready_s")
        add(
            "ready in <= 3 s with 10,000 targets",
            rs,
            3.0,
            None if rs is None else rs <= 3.0,
            f"export-{st['targets']}",
        )
    return out


def _f(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        f"Benchmark results ({'quick' if doc['quick'] else 'full'} run, {doc['generated']}, "
        f"{doc['elapsed_s']} s).",
        "",
        f"Machine: {m['cpus']} × {m['cpu'] or 'unknown CPU'}, {m['memory_gb']} GB, Linux "
        f"{m['kernel']}, Python {m['python']}"
        f"{', virtual machine' if m.get('virtualised') else ''}; load average "
        f"{m.get('loadavg_1m_start')} at the start, {m.get('loadavg_1m_end')} at the end. "
        f"Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + ".",
        "",
        "| workload | via | tool | CPU s / 1k probes | CPU cores | peak RSS MB "
        "| RTT err median ms | RTT err p99 ms (abs) | loss measured / true | "
        "sched. lateness p50 / p99 ms | loop lag p50 / p99 ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in doc["workloads"]:
        for r in w["runs"]:
            via = "lab" if r["via_lab"] else "loopback"
            if not r["ok"]:
                lines.append(
                    f"| {r['workload']} | {via} | {r['tool']} | failed: "
                    f"{r['error'][:80]} | | | | | | | |"
                )
                continue
            loss = r.get("loss", {})
            ag = r.get("agent") or {}
            lat = (
                (
                    f"{_f(ag.get('scheduler_lateness_p50_ms'), 2)} / "
                    f"{_f(ag.get('scheduler_lateness_p99_ms'), 2)}"
                )
                if ag
                else "–"
            )
            lag = (
                (
                    f"{_f(ag.get('event_loop_lag_p50_ms'), 2)} / "
                    f"{_f(ag.get('event_loop_lag_p99_ms'), 2)}"
                )
                if ag
                else "–"
            )
            ml, tl = loss.get("measured"), loss.get("true")
            lines.append(
                f"| {r['workload']} | {via} | {r['tool']} | {_f(r['cpu_per_1k_probes'])} | "
                f"{_f(r['cpu_cores'], 2)} | {_f(r['peak_rss_mb'], 1)} | "
                f"{_f(_get(r, 'rtt_error', 'median_ms'))} | "
                f"{_f(_get(r, 'rtt_error', 'p99_ms'))} ({_f(_get(r, 'rtt_error', 'abs_p99_ms'))})"
                f" | {_f(None if ml is None else 100 * ml, 2)} % / "
                f"{_f(None if tl is None else 100 * tl, 2)} % | {lat} | {lag} |"
            )
    ex = doc.get("export")
    if ex:
        lines += [
            "",
            "Export cost (an agent's state filled by recorded results, rendered in this "
            "process; start-up from a real `edgeprobe run` in a namespace of its own):",
            "",
            "| targets | series | text MB | text render s | protobuf MB | protobuf render s |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in ex["render"]:
            lines.append(
                f"| {r['targets']} | {r['series']} | {_f(r['text_bytes'] / 1e6, 2)} | "
                f"{_f(r['text_s'])} | {_f(r['protobuf_bytes'] / 1e6, 2)} | "
                f"{_f(r['protobuf_s'])} |"
            )
        st = ex.get("startup") or {}
        if st:
            lines += [
                "",
                f"Ready (first 200 on /-/ready) with {st['targets']} targets: "
                f"{_f(st.get('ready_s'), 2)} s.",
            ]
        spt = ex.get("series_per_target", {})
        if spt:
            lines += [
                "",
                "Series per target (default config; text / native-histogram server): "
                + ", ".join(f"{k} {v['text']} / {v['native']}" for k, v in spt.items())
                + ".",
            ]
    lines += ["", "Extra accuracy views:", ""]
    for r in _runs(doc):
        pp = r.get("rtt_error_per_packet")
        if pp:
            lines.append(
                f"- {r['workload']} fping per packet ({pp['n_packets']} echoes): "
                f"median {_f(pp['median_ms'])} ms, p99 {_f(pp['p99_ms'])} ms."
            )
        db = r.get("rtt_error_default_buckets")
        if db:
            lines.append(
                f"- {r['workload']} smokeping_prober with its default buckets (same "
                f"run, re-bucketed): median {_f(db['median_ms'])} ms, |p99| "
                f"{_f(db['abs_p99_ms'])} ms."
            )
    lab = [w for w in doc["workloads"] if w["lab"]]
    if lab:
        lp = lab[0]["lab"]
        lines += [
            "",
            "Lab paths (per direction): "
            + "; ".join(
                f"{p['name']} {p['prefix']}: delay {p['delay'] * 1e3:g} ms, jitter σ "
                f"{p['jitter'] * 1e3:g} ms, loss {100 * p['loss']:g} % (RTT {p['rtt_ms']:g} ms, "
                f"echo loss {100 * p['echo_loss']:.2f} %)"
                for p in lp["paths"]
            )
            + ".",
        ]
        for w in lab:
            x = w["lab"]
            lines.append(
                f"Forwarder release lateness in {w['workload']['name']}: p50 "
                f"{_f(x['forwarder_release_late_p50_us'], 0)} µs, p99 "
                f"{_f(x['forwarder_release_late_p99_us'], 0)} µs."
            )
    lines += [
        "",
        "Through the lab: "
        + (", ".join(w["workload"]["name"] for w in lab) or "none")
        + "; directly on 127.0.0.0/8 in a namespace of its own: "
        + (", ".join(w["workload"]["name"] for w in doc["workloads"] if not w["lab"]) or "none")
        + ".",
        "",
        "Targets (docs/development/performance.md):",
        "",
    ]
    for t in doc["targets"]:
        met = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
        lines.append(
            f"- {t['target']} ({t['workload']}): {_f(t['value'])} vs {_f(t['limit'])}: {met}"
        )
    return "\n".join(lines) + "\n"


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {
        "edgeprobe": ("tab:blue", "o"),
        "fping": ("tab:green", "s"),
        "smokeping_prober": ("tab:red", "^"),
    }
    for tool, (color, marker) in styles.items():
        rs = sorted(
            (r for r in _runs(doc) if r["tool"] == tool and r["ok"]), key=lambda r: r["targets"]
        )
        xs = [r["targets"] for r in rs]
        cpu = [r["cpu_per_1k_probes"] or math.nan for r in rs]
        # Absolute p99 on a log axis; a floor keeps an exact zero drawable.
        err = [max(_get(r, "rtt_error", "abs_p99_ms") or math.nan, 1e-3) for r in rs]
        for ax, ys in ((ax1, cpu), (ax2, err)):
            ax.plot(xs, ys, color=color, marker=marker, label=tool)
            for r, y in zip(rs, ys, strict=True):
                if not r["via_lab"] and math.isfinite(y):
                    ax.plot(
                        [r["targets"]],
                        [y],
                        marker=marker,
                        color="white",
                        markeredgecolor=color,
                        markersize=9,
                        zorder=3,
                    )
    ax1.set_title("CPU seconds per 1,000 probes")
    ax2.set_title("p99 |RTT error| of per-target medians (ms)")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        if any(y > 0 for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)):
            ax.set_yscale("log")
        ax.set_xlabel("targets (1 probe/s each; hollow = loopback, no lab)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    m = doc["machine"]
    fig.suptitle(
        f"edgeprobe bench, {m['cpus']} × {m['cpu'] or 'CPU'}, {doc['generated']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
