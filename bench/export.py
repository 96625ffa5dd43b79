"""What exporting costs: series per target, /metrics size and render time in the text and the
protobuf formats, and the time an agent with many targets takes to be ready.

The render figures come from an agent built in this process with N ICMP targets whose state was
filled by recorded results (nothing is probed: render cost depends on the state, not on where it
came from); the start-up figure from a real ``edgeprobe run`` started in a network namespace of its
own with only loopback. Every measurement is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.app import Agent
from agent.config import load as cfgmod
from agent.config.model import MetricsSection
from agent.export import catalog
from probes import PROBES
from probes.base import ProbeResult

ROOT = Path(__file__).resolve().parent.parent
REPEAT = 3
READY_TIMEOUT = 120.0


def config_text(n: int) -> str:
    """N ICMP targets on distinct loopback addresses (127.16.0.0/12: never a packet out)."""
    lines = [
        "agent: {region: bench, max_targets: 100000}",
        "defaults: {icmp: {interval: 1s, packets: 1, timeout: 900ms}}",
        "targets:",
    ]
    for i in range(n):
        lines.append(
            f"  - {{name: e{i}, address: 127.{16 + (i >> 16) % 16}.{(i >> 8) & 255}."
            f"{(i & 255) or 1}}}"
        )
    return "\n".join(lines) + "\n"


def filled_agent(n: int, observations: int = 60, seed: int = 14) -> Agent:
    """An agent with N targets whose histograms, counters and windows hold ``observations``
    RTTs each (a minute at one probe a second), spread like a real path's and in whole
    nanoseconds as the ICMP engine records them (``rtt_ns / 1e9``: a value's text is as long
    as a real one's)."""
    cfg = cfgmod.loads(config_text(n))
    agent = Agent(cfg)
    agent.state.series = agent._views_for(cfg, None, True)
    rnd = random.Random(seed)
    for job in cfg.jobs:
        base = rnd.uniform(0.005, 0.25)
        rtts: list[float | None] = [
            None if rnd.random() < 0.01 else round(base * math.exp(rnd.gauss(0, 0.05)) * 1e9) / 1e9
            for _ in range(observations)
        ]
        agent._record(job, ProbeResult(success=True, rtts=rtts))
    return agent


def _time(fn: Any) -> tuple[float, int]:
    """(median wall seconds, bytes) over REPEAT runs."""
    times, size = [], 0
    for _ in range(REPEAT):
        t = time.perf_counter()
        size = sum(len(c) for c in fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times), size


def render_cost(n: int) -> dict[str, Any]:
    agent = filled_agent(n)
    text_s, text_b = _time(agent.render_metrics)
    proto_s, proto_b = _time(agent.render_metrics_protobuf)
    text = b"".join(agent.render_metrics()).decode()
    lines = sum(1 for ln in text.splitlines() if ln and not ln.startswith("#"))
    return {
        "targets": n,
        "series": lines,
        "text_bytes": text_b,
        "text_s": round(text_s, 4),
        "protobuf_bytes": proto_b,
        "protobuf_s": round(proto_s, 4),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def startup(n: int) -> dict[str, Any]:
    """Seconds from spawning ``edgeprobe run`` with N targets to its first 200 on /-/ready,
    in a network namespace of its own (``unshare -n``, loopback up)."""
    with tempfile.TemporaryDirectory(prefix="edgeprobe-bench-export-") as d:
        path = Path(d) / "agent.yml"
        path.write_text(config_text(n))
        port = 9798
        probe = (
            f"import time,urllib.request\n"
            f"t=time.monotonic()\n"
            f"while time.monotonic()-t<{READY_TIMEOUT}:\n"
            f"  try:\n"
            f"    urllib.request.urlopen('http://127.0.0.1:{port}/-/ready',timeout=1)\n"
            f"    print(time.monotonic()-t); break\n"
            f"  except Exception: time.sleep(0.05)\n"
        )
        script = (
            f"ip link set lo up && "
            f"({sys.executable} -m agent run --config.file {path} "
            f"--web.listen-address 127.0.0.1:{port} --log.level warning & "
            f'pid=$!; {sys.executable} -c "$PROBE"; kill $pid; wait $pid)'
        )
        env = {**os.environ, "PROBE": probe, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            ["unshare", "-n", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=READY_TIMEOUT + 30,
            env=env,
            cwd=ROOT,
        )
        first = out.stdout.strip().splitlines()
        return {
            "targets": n,
            "ready_s": round(float(first[0]), 2) if first else None,
            "config_bytes": path.stat().st_size,
        }


def series_per_target() -> dict[str, dict[str, int]]:
    m = MetricsSection()
    counts = catalog.bucket_counts(len(m.rtt), len(m.durations), len(m.phases))
    return {
        name: {
            "text": catalog.series_per_target(k, counts),
            "native": catalog.series_per_target(k, counts, native=True),
        }
        for name, k in PROBES.items()
    }


def measure(sizes: Sequence[int] = (1000, 10000), start_at: int = 10000) -> dict[str, Any]:
    return {
        "series_per_target": series_per_target(),
        "render": [render_cost(n) for n in sizes],
        "startup": startup(start_at) if start_at else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.export", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="100 and 1,000 targets")
    a = ap.parse_args(argv)
    doc = measure((100, 1000), 1000) if a.quick else measure()
    json.dump(doc, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
