"""Run the workloads: each tool, one after another, on the same lab world (or loopback ns).

A workload is N edge addresses probed once per second for a fixed time. Through the lab, half
the addresses sit behind a "near" path and half behind a "far" one, each with known delay,
jitter and loss per direction; the lab's ground truth gives every echo's true RTT. The
largest workload probes 127.0.0.0/8 in a namespace of its own instead: a user-space
forwarder at 10,000 packets/s each way would use up the 2-core machine by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from bench import analysis, procs
from bench.tools import TOOLS, Job, Tool, available

SETTLE = 2.0  # seconds between the window-start scrape and the window
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class LabPath:
    name: str
    prefix: str
    delay: float  # one way, seconds
    jitter: float  # one way, standard deviation of a normal distribution, seconds
    loss: float  # per direction

    @property
    def rtt(self) -> float:
        return 2 * self.delay

    @property
    def echo_loss(self) -> float:
        return 1 - (1 - self.loss) ** 2


# 20 ms and 180 ms RTT: an edge in the next country and one on another continent.
LAB_PATHS = (
    LabPath("near", "198.18.128.0/18", 0.010, 0.0005, 0.005),
    LabPath("far", "198.18.192.0/18", 0.090, 0.002, 0.01),
)
LOOPBACK_BASE = ipaddress.ip_address("127.16.0.1")


@dataclass(frozen=True)
class Workload:
    name: str
    targets: int
    via_lab: bool
    duration: float  # measured window, seconds
    warmup: float  # before the window: imports, socket set-up, staggered starts


FULL = (
    Workload("lab-100", 100, True, 30, 6),
    Workload("lab-1000", 1000, True, 30, 6),
    Workload("loopback-10000", 10000, False, 30, 10),
)
QUICK = (Workload("lab-20", 20, True, 8, 3), Workload("loopback-50", 50, False, 8, 3))


def lab_addresses(n: int) -> list[str]:
    """Half the targets behind each lab path (the first half near, the rest far)."""
    out: list[str] = []
    for k, p in enumerate(LAB_PATHS):
        share = n // len(LAB_PATHS) + (1 if k < n % len(LAB_PATHS) else 0)
        base = ipaddress.ip_network(p.prefix).network_address + 1
        out += [str(base + i) for i in range(share)]
    return out


def lab_profile() -> Any:
    from lab.spec import decode_profile

    def path(p: LabPath) -> dict[str, Any]:
        # reorder: every target's packets are independent; an order-preserving path shared
        # by 1,000 targets would queue unrelated packets behind each other.
        return {
            "delay": f"{p.delay * 1e3:g}ms",
            "jitter": f"{p.jitter * 1e3:g}ms",
            "jitter_dist": "normal",
            "loss": p.loss,
            "reorder": True,
        }

    return decode_profile(
        {
            "region": "bench",
            "description": "edgeprobe benchmark",
            "source": "bench/run.py",
            "edges": [
                {
                    "name": f"bench-{p.name}",
                    "tier": p.name,
                    "ipv4": f"198.18.{100 + i}.1",
                    "ipv6": f"2001:db8:e:{100 + i}::1",
                    "prefixes": [p.prefix],
                    "path": path(p),
                }
                for i, p in enumerate(LAB_PATHS)
            ],
        },
        "bench",
    )


@contextlib.contextmanager
def environment(w: Workload) -> Iterator[tuple[str, Any]]:
    """(namespace, lab world or None) for a workload; always torn down."""
    if w.via_lab:
        from lab import World

        with World.up(profiles=[lab_profile()], services=False) as world:
            yield world.ns("bench"), world
    else:
        with procs.LoopbackNs(w.name.split("-")[-1]) as ns:
            yield ns.name, None


def addresses(w: Workload) -> list[str]:
    if w.via_lab:
        return lab_addresses(w.targets)
    return [str(LOOPBACK_BASE + i) for i in range(w.targets)]


@dataclass
class Raw:
    """One tool run before analysis."""

    tool: str
    start_ns: int = 0
    window_ns: tuple[int, int] = (0, 0)
    truth_end_ns: int = 0
    cpu_s: float = math.nan
    cpu_total_s: float = math.nan
    probes: int = 0
    replies: int = 0
    peak_rss: int = 0
    ready_s: float = 0.0  # waiting for the port / the window-start scrape
    end_scrape_s: float = 0.0
    error: str = ""
    measured: analysis.Measured | None = None


def run_tool(tool: Tool, w: Workload, ns: str, work: Path, nominal: Sequence[float]) -> Raw:
    job = Job(
        ns=ns,
        addrs=addresses(w),
        nominal_rtts=nominal,
        workdir=work,
        port=19798,
        total_seconds=w.warmup + w.duration,
    )
    raw = Raw(tool.name)
    work.mkdir(parents=True, exist_ok=True)
    child = procs.Child(
        ns,
        tool.argv(job),
        work / f"{tool.name.split('_')[0]}.stdout",
        work / f"{tool.name.split('_')[0]}.stderr",
        tool.stop_signal,
    )
    try:
        with child:
            raw.start_ns = time.monotonic_ns()
            time.sleep(w.warmup)
            if not child.alive():
                raise RuntimeError(f"exited early: {_tail(child.err_path)}")
            t = time.monotonic()
            tool.at_window_start(job)
            raw.ready_s = time.monotonic() - t
            time.sleep(SETTLE)
            s0 = procs.sample(child.pid)
            time.sleep(w.duration)
            if not child.alive():
                raise RuntimeError(f"exited early: {_tail(child.err_path)}")
            s1 = procs.sample(child.pid)
            raw.peak_rss = procs.peak_rss_bytes(child.pid)
            raw.window_ns = (s0.at_ns, s1.at_ns)
            raw.cpu_s, raw.cpu_total_s = s1.cpu_s - s0.cpu_s, s1.cpu_s
            raw.probes = s1.out_echos - s0.out_echos
            raw.replies = s1.in_echo_reps - s0.in_echo_reps
            tool.before_stop(job)  # the scrape: after the CPU sample, not in it
            raw.truth_end_ns = time.monotonic_ns()
            raw.end_scrape_s = (raw.truth_end_ns - s1.at_ns) / 1e9
            child.stop()
        raw.measured = tool.collect(job)
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
        raw.error = f"{type(e).__name__}: {e}"[:500]
        if isinstance(e, FileNotFoundError) and "/proc/" in str(e):
            # The tool died between two reads of its /proc files: its own words say why.
            raw.error = f"RuntimeError: exited early: {_tail(child.err_path)}"[:500]
    return raw


def _tail(p: Path) -> str:
    try:
        return p.read_text(errors="replace")[-400:]
    except OSError:
        return ""


def _fin(x: float) -> float | None:
    return x if isinstance(x, float | int) and math.isfinite(x) else None


def _error_ms(e: analysis.ErrorStats) -> dict[str, float | None]:
    return {
        "median_ms": _fin(e.median_ms),
        "p99_ms": _fin(e.p99_ms),
        "abs_p99_ms": _fin(e.abs_p99_ms),
    }


def analyse(raw: Raw, w: Workload, truth: analysis.Truth | None) -> dict[str, Any]:
    window_s = (raw.window_ns[1] - raw.window_ns[0]) / 1e9
    out: dict[str, Any] = {
        "tool": raw.tool,
        "workload": w.name,
        "targets": w.targets,
        "via_lab": w.via_lab,
        "ok": not raw.error,
        "error": raw.error,
        "window_s": round(window_s, 3),
        "cpu_s": _fin(raw.cpu_s),
        "cpu_total_s": _fin(raw.cpu_total_s),
        "probes": raw.probes,
        "probes_nominal": round(w.targets * window_s),
        "cpu_per_1k_probes": _fin(raw.cpu_s / raw.probes * 1000) if raw.probes else None,
        "cpu_cores": _fin(raw.cpu_s / window_s) if window_s > 0 else None,
        "peak_rss_mb": round(raw.peak_rss / 2**20, 1) if raw.peak_rss else None,
        "start_s": round(w.warmup + raw.ready_s, 2),
        "scrape_s": round(raw.end_scrape_s, 3) if raw.end_scrape_s else None,
    }
    m = raw.measured
    if m is None:
        return out
    e = analysis.error_stats(analysis.per_target_errors(m.per_target_median, truth))
    out["rtt_error"] = {"basis": "per-target median", "n_targets": e.n, **_error_ms(e)}
    if m.per_packet:
        pp = analysis.error_stats(analysis.per_packet_errors(m.per_packet, truth))
        out["rtt_error_per_packet"] = {"n_packets": pp.n, **_error_ms(pp)}
    if m.default_bucket_median:
        d = analysis.error_stats(analysis.per_target_errors(m.default_bucket_median, truth))
        out["rtt_error_default_buckets"] = _error_ms(d)
    true_loss = truth.lost / truth.sent if truth is not None and truth.sent else 0.0
    out["loss"] = {
        "measured": _fin(m.loss),
        "true": _fin(true_loss),
        "error": _fin(m.loss - true_loss),
        "sent_reported": m.sent,
        "truth_sent": truth.sent if truth is not None else None,
    }
    if "summary_loss" in m.extra:
        out["loss"]["fping_summary"] = _fin(m.extra["summary_loss"])
    elif m.extra:
        out["agent"] = {k: _fin(float(v)) for k, v in m.extra.items()}
    return out


def run_workload(w: Workload, tools: Sequence[Tool], work: Path, log: Any) -> dict[str, Any]:
    nominal = [p.rtt for p in LAB_PATHS] if w.via_lab else [0.0]
    raws: list[Raw] = []
    info: dict[str, Any] = {"workload": asdict(w), "lab": None}
    with environment(w) as (ns, world):
        for tool in tools:
            log(f"  {w.name}: {tool.name} ({w.warmup:g}+{w.duration:g} s)")
            raws.append(run_tool(tool, w, ns, work / w.name / tool.name, nominal))
            if raws[-1].error:
                log(f"    error: {raws[-1].error}")
            time.sleep(1.5)  # late replies of this tool settle before the next starts
        exchanges: list[Any] = []
        if world is not None:
            from lab import groundtruth as gt

            exchanges = gt.echo_exchanges(world.records(), region=0)
            st = world.stats()
            info["lab"] = {
                "paths": [
                    asdict(p) | {"rtt_ms": p.rtt * 1e3, "echo_loss": p.echo_loss} for p in LAB_PATHS
                ],
                "forwarder_release_late_p50_us": st.get("late_p50_us"),
                "forwarder_release_late_p99_us": st.get("late_p99_us"),
                "forwarder_packets": st.get("stats", {}).get("read"),
            }
    runs = []
    for raw in raws:
        truth = (
            analysis.truth_window(exchanges, raw.start_ns, raw.truth_end_ns)
            if w.via_lab and not raw.error
            else None
        )
        runs.append(analyse(raw, w, truth))
    info["runs"] = runs
    return info


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_gb": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "virtualised": Path("/sys/hypervisor").exists()
        or "hypervisor" in Path("/proc/cpuinfo").read_text(errors="replace"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument(
        "--quick", action="store_true", help="small workloads (CI smoke test, ~1 minute)"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"directory for latest.json/.md/.png (default {DEFAULT_OUT})",
    )
    ap.add_argument(
        "--tool",
        action="append",
        choices=[t.name for t in TOOLS],
        help="only these tools (repeatable)",
    )
    ap.add_argument("--workload", action="append", help="only these workloads (by name)")
    ap.add_argument("--duration", type=float, help="override the measured window, seconds")
    ap.add_argument(
        "--no-start-scrape",
        action="store_true",
        help="edgeprobe: no scrape before the window (lateness then counts from "
        "start-up; shows the prober without a scrape's stall)",
    )
    ap.add_argument("--keep", type=Path, help="keep the tools' raw outputs in this directory")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces)", file=sys.stderr)
        return 2
    from lab import lab_available

    lab_ok, why = lab_available()
    loads = [w for w in (QUICK if a.quick else FULL) if not a.workload or w.name in a.workload]
    if a.duration:
        loads = [Workload(w.name, w.targets, w.via_lab, a.duration, w.warmup) for w in loads]
    if not lab_ok:
        print(f"bench: lab unavailable ({why}); loopback workloads only", file=sys.stderr)
        loads = [w for w in loads if not w.via_lab]
    if a.no_start_scrape:
        from bench.tools import Edgeprobe

        all_tools: tuple[Tool, ...] = tuple(
            Edgeprobe(start_scrape=False) if t.name == "edgeprobe" else t for t in TOOLS
        )
    else:
        all_tools = TOOLS
    tools = [t for t in all_tools if (not a.tool or t.name in a.tool) and available(t)]
    missing = [t.name for t in TOOLS if not available(t)]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def on_term(_s: int, _f: FrameType | None) -> None:
        raise KeyboardInterrupt  # run the finally blocks: processes and namespaces go

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="edgeprobe-bench-")) if a.keep is None else a.keep
    try:
        results = [run_workload(w, tools, work, log) for w in loads]
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    from bench import export, report

    log("bench: export cost")
    ex = export.measure((100, 1000), 1000) if a.quick else export.measure()
    doc = {
        "schema": 1,
        "quick": a.quick,
        "edgeprobe_start_scrape": not a.no_start_scrape,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "elapsed_s": round(time.monotonic() - t0, 1),
        # Other work on the machine skews every figure; the load says how much there was.
        "machine": machine()
        | {
            "loadavg_1m_start": round(load_start[0], 2),
            "loadavg_1m_end": round(os.getloadavg()[0], 2),
        },
        "versions": {t.name: t.version() for t in tools},
        "tools_missing": missing,
        "method": report.METHOD,
        "workloads": results,
        "export": ex,
    }
    doc["targets"] = report.check_targets(doc)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "latest.json").write_text(json.dumps(doc, indent=1) + "\n")
    (a.out / "latest.md").write_text(report.markdown(doc))
    report.chart(doc, a.out / "latest.png")
    log(f"bench: done in {doc['elapsed_s']} s; results in {a.out}")
    return 0
