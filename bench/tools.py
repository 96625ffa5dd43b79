"""The three tools under test: how each is configured, started, stopped and read.

All three get the same job: every target once per second, 56-byte payloads, a 900 ms
per-packet timeout where the tool has one. Each tool's own results are read the way a user
would read them: edgeprobe's and smokeping_prober's /metrics, fping's per-packet lines.
"""

from __future__ import annotations

import math
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml

from bench.analysis import (
    Measured,
    group_buckets,
    histogram_quantile,
    parse_prom,
    quantile,
    subset_buckets,
)
from bench.procs import run_in

ROOT = Path(__file__).resolve().parent.parent
SMOKEPING = "prometheus-smokeping-prober"
SMOKEPING_DEFAULT_BUCKETS = (
    5e-05,
    0.0001,
    0.0002,
    0.0004,
    0.0008,
    0.0016,
    0.0032,
    0.0064,
    0.0128,
    0.0256,
    0.0512,
    0.1024,
    0.2048,
    0.4096,
    0.8192,
    1.6384,
    3.2768,
    6.5536,
    13.1072,
    26.2144,
)
TIMEOUT_MS = 900
# Retries while the port is not open yet (an agent with 10,000 targets takes a while to start).
_SCRAPE = """
import sys, time, urllib.error, urllib.request
end = time.monotonic() + float(sys.argv[2])
while True:
    try:
        body = urllib.request.urlopen(sys.argv[1], timeout=300).read()
        break
    except urllib.error.URLError as e:
        if not isinstance(e.reason, ConnectionRefusedError) or time.monotonic() > end:
            raise
        time.sleep(0.2)
sys.stdout.buffer.write(body)
"""


@dataclass(frozen=True)
class Job:
    """One tool's run: where, against what, and where to put its files."""

    ns: str
    addrs: Sequence[str]
    nominal_rtts: Sequence[float]  # seconds; the lab's configured RTTs (0 on loopback)
    workdir: Path
    port: int
    total_seconds: float  # warm-up + measured window


class Tool(Protocol):
    name: str
    stop_signal: int

    def version(self) -> str: ...
    def argv(self, job: Job) -> list[str]: ...
    def at_window_start(self, job: Job) -> None: ...
    def before_stop(self, job: Job) -> None: ...
    def collect(self, job: Job) -> Measured: ...


_WAIT_PORT = """
import socket, sys, time
end = time.monotonic() + float(sys.argv[2])
while True:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close()
        break
    except ConnectionRefusedError:
        if time.monotonic() > end:
            sys.exit("not listening after %s s" % sys.argv[2])
        time.sleep(0.2)
"""
READY_WAIT = 180.0  # smokeping_prober starts its pingers one by one: ~2 min for 10,000


def wait_port(ns: str, port: int, wait: float = READY_WAIT) -> None:
    r = run_in(ns, [sys.executable, "-c", _WAIT_PORT, str(port), str(wait)], timeout=wait + 30)
    if r.returncode != 0:
        last = r.stderr.decode(errors="replace").strip().splitlines()[-1:]
        raise RuntimeError(f"not ready: {' '.join(last)}")


def scrape(ns: str, port: int, dest: Path, wait: float = READY_WAIT) -> str:
    """GET /metrics from inside the namespace (the tools listen on its 127.0.0.1)."""
    r = run_in(
        ns,
        [sys.executable, "-c", _SCRAPE, f"http://127.0.0.1:{port}/metrics", str(wait)],
        timeout=wait + 330,
    )
    if r.returncode != 0:
        last = r.stderr.decode(errors="replace").strip().splitlines()[-1:]
        raise RuntimeError(f"scrape failed: {' '.join(last)}")
    text = r.stdout.decode()
    dest.write_text(text)
    return text


def fine_buckets(nominal: Sequence[float]) -> list[float]:
    """A fair layout for a histogram-only tool: 0.2 ms steps around each known lab RTT
    (20 µs steps near zero on loopback), plus the default bounds so the default layout's
    result can be derived from the same run (see ``subset_buckets``)."""
    out = set(SMOKEPING_DEFAULT_BUCKETS)
    for r in nominal:
        if r <= 0.001:
            out.update(round(0.00002 * i, 6) for i in range(1, 26))
        else:
            lo = max(0.0002, r - 0.006)
            out.update(round(lo + 0.0002 * i, 6) for i in range(80))
    return sorted(out)


class Edgeprobe:
    name: str = "edgeprobe"
    stop_signal: int = signal.SIGTERM

    def __init__(self, start_scrape: bool = True) -> None:
        self.start_scrape = start_scrape

    def version(self) -> str:
        from agent import VERSION

        return VERSION

    def config(self, job: Job) -> dict[str, object]:
        window = max(60, math.ceil(job.total_seconds + 15))
        return {
            "agent": {"region": "bench", "max_targets": max(10000, len(job.addrs))},
            "defaults": {"icmp": {"interval": "1s", "packets": 1, "timeout": f"{TIMEOUT_MS}ms"}},
            # The window covers the whole run, so the exported median is over every packet.
            "metrics": {"recent_window": f"{window}s"},
            "targets": [
                {"name": f"t{i:05d}", "address": a, "probes": ["icmp"]}
                for i, a in enumerate(job.addrs)
            ],
        }

    def argv(self, job: Job) -> list[str]:
        cfg = job.workdir / "edgeprobe.yml"
        cfg.write_text(yaml.safe_dump(self.config(job), sort_keys=False))
        return [
            sys.executable,
            "-m",
            "agent",
            "run",
            f"--config.file={cfg}",
            f"--web.listen-address=127.0.0.1:{job.port}",
            "--log.level=warning",
        ]

    def at_window_start(self, job: Job) -> None:
        # The lateness and lag histograms count from the agent's start; this first reading
        # is subtracted so start-up does not count. Its own stall (ticks that fall due while
        # the collector runs) does count: a real agent is scraped too.
        if self.start_scrape:
            scrape(job.ns, job.port, job.workdir / "edgeprobe.start.metrics")
        else:
            wait_port(job.ns, job.port)

    def before_stop(self, job: Job) -> None:
        scrape(job.ns, job.port, job.workdir / "edgeprobe.metrics")

    def collect(self, job: Job) -> Measured:
        text = (job.workdir / "edgeprobe.metrics").read_text()
        names = {f"t{i:05d}": a for i, a in enumerate(job.addrs)}
        fam = parse_prom(
            text,
            [
                "edgeprobe_rtt_recent_seconds",
                "edgeprobe_packets_sent_total",
                "edgeprobe_packets_lost_total",
                "edgeprobe_scheduler_lateness_seconds_bucket",
                "edgeprobe_event_loop_lag_seconds_bucket",
                "edgeprobe_scheduler_skipped_ticks_total",
                "edgeprobe_scheduler_late_ticks_total",
            ],
        )
        m = Measured()
        for labels, v in fam["edgeprobe_rtt_recent_seconds"]:
            if labels.get("quantile") == "0.5" and labels.get("edge") in names:
                m.per_target_median[names[labels["edge"]]] = v
        m.sent = int(sum(v for _, v in fam["edgeprobe_packets_sent_total"]))
        m.received = m.sent - int(sum(v for _, v in fam["edgeprobe_packets_lost_total"]))
        first = job.workdir / "edgeprobe.start.metrics"
        start = parse_prom(
            first.read_text() if first.exists() else "",
            [f"edgeprobe_{k}_seconds_bucket" for k in ("scheduler_lateness", "event_loop_lag")],
        )
        for key, metric in (
            ("scheduler_lateness", "edgeprobe_scheduler_lateness_seconds_bucket"),
            ("event_loop_lag", "edgeprobe_event_loop_lag_seconds_bucket"),
        ):
            before = {lb["le"]: v for lb, v in start[metric]}
            b = [(float(lb["le"]), v - before.get(lb["le"], 0.0)) for lb, v in fam[metric]]
            m.extra[f"{key}_p50_ms"] = histogram_quantile(0.5, b) * 1e3
            m.extra[f"{key}_p99_ms"] = histogram_quantile(0.99, b) * 1e3
        for key in ("skipped_ticks", "late_ticks"):
            m.extra[key] = sum(v for _, v in fam[f"edgeprobe_scheduler_{key}_total"])
        return m


class Fping:
    name: str = "fping"
    stop_signal: int = signal.SIGINT  # fping prints its per-target summary on SIGINT
    _LINE = re.compile(r"^(\S+)\s+: \[(\d+)\], \d+ bytes, ([0-9.]+) ms")
    _SUMMARY = re.compile(r"^(\S+)\s+: xmt/rcv/%loss = (\d+)/(\d+)/")

    def version(self) -> str:
        r = subprocess.run(["fping", "--version"], capture_output=True, text=True, check=False)
        return (r.stdout or r.stderr).strip().removeprefix("fping: Version ")

    def argv(self, job: Job) -> list[str]:
        tf = job.workdir / "fping.targets"
        tf.write_text("".join(f"{a}\n" for a in job.addrs))
        # -i is the gap between any two sends: half of 1 s / N leaves fping room to catch up.
        gap_ms = max(0.01, min(10.0, 500.0 / max(1, len(job.addrs))))
        return [
            "fping",
            "-l",
            "-p",
            "1000",
            "-t",
            str(TIMEOUT_MS),
            "-i",
            f"{gap_ms:.3f}",
            "-f",
            str(tf),
        ]

    def at_window_start(self, job: Job) -> None:
        return None

    def before_stop(self, job: Job) -> None:
        return None

    def collect(self, job: Job) -> Measured:
        m = Measured()
        with (job.workdir / "fping.stdout").open() as f:
            for line in f:
                mt = self._LINE.match(line)
                if mt:
                    m.per_packet.setdefault(mt.group(1), {})[int(mt.group(2))] = (
                        float(mt.group(3)) / 1e3
                    )
        for addr, pkts in m.per_packet.items():
            m.per_target_median[addr] = quantile(list(pkts.values()), 0.5)
        # Loss as the per-packet lines show it: a missing index is a lost echo. fping 5.1's own
        # SIGINT summary leaves most lost echoes out of xmt (23 sent, 22 answered shows as
        # 22/22/0%); its figure is kept for the report.
        xmt = rcv = 0
        summary_sent: dict[str, int] = {}
        with (job.workdir / "fping.stderr").open() as f:
            for line in f:
                ms = self._SUMMARY.match(line)
                if ms:
                    summary_sent[ms.group(1)] = int(ms.group(2))
                    xmt += int(ms.group(2))
                    rcv += int(ms.group(3))
        for addr, n in summary_sent.items():
            pkts = m.per_packet.get(addr, {})
            m.sent += max(n, max(pkts, default=-1) + 1)
            m.received += len(pkts)
        m.extra["summary_loss"] = 1 - rcv / xmt if xmt else math.nan
        return m


class SmokepingProber:
    name: str = "smokeping_prober"
    stop_signal: int = signal.SIGTERM

    def version(self) -> str:
        r = subprocess.run([SMOKEPING, "--version"], capture_output=True, text=True, check=False)
        out = (r.stdout + r.stderr).split()
        return out[2].rstrip(",") if len(out) > 2 else "unknown"

    def argv(self, job: Job) -> list[str]:
        cfg = job.workdir / "smokeping.yml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "targets": [
                        {
                            "hosts": list(job.addrs),
                            "interval": "1s",
                            "network": "ip4",
                            "protocol": "icmp",
                            "size": 56,
                        }
                    ]
                }
            )
        )
        buckets = ",".join(f"{b:g}" for b in fine_buckets(job.nominal_rtts))
        # Its default ICMP mode (unprivileged ping sockets: the kernel hands each pinger only
        # its own replies); --privileged would give every pinger every reply.
        return [
            SMOKEPING,
            f"--config.file={cfg}",
            f"--web.listen-address=127.0.0.1:{job.port}",
            f"--buckets={buckets}",
            "--log.level=warn",
        ]

    def at_window_start(self, job: Job) -> None:
        # It serves /metrics only once every pinger has started; the window starts then.
        wait_port(job.ns, job.port)

    def before_stop(self, job: Job) -> None:
        scrape(job.ns, job.port, job.workdir / "smokeping.metrics")

    def collect(self, job: Job) -> Measured:
        text = (job.workdir / "smokeping.metrics").read_text()
        fam = parse_prom(
            text,
            [
                "smokeping_requests_total",
                "smokeping_response_duration_seconds_bucket",
                "smokeping_response_duration_seconds_count",
            ],
        )
        m = Measured()
        m.sent = int(sum(v for _, v in fam["smokeping_requests_total"]))
        m.received = int(sum(v for _, v in fam["smokeping_response_duration_seconds_count"]))
        by_host = group_buckets(fam["smokeping_response_duration_seconds_bucket"], "host")
        for host, b in by_host.items():
            m.per_target_median[host] = histogram_quantile(0.5, b)
            m.default_bucket_median[host] = histogram_quantile(
                0.5, subset_buckets(b, SMOKEPING_DEFAULT_BUCKETS)
            )
        return m


def available(tool: Tool) -> bool:
    exe = {"fping": "fping", "smokeping_prober": SMOKEPING}.get(tool.name)
    return exe is None or shutil.which(exe) is not None


TOOLS: tuple[Tool, ...] = (Edgeprobe(), Fping(), SmokepingProber())
