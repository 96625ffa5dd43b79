"""CPU per ``webrtc`` connect and per second of ``relay`` stream: ``python -m bench.rtc``.

A bounded measurement, separate from the target-count workloads of ``python -m bench``: in a
network namespace of its own (``unshare -n``, one veth pair, because aioice gathers no loopback
candidates) it starts the lab's edge services (the WHIP answerer, coturn, the UDP echo), runs
``--connects`` webrtc connects one after another and ``--streams`` relay streams of the kind's
default shape (250 × 200 bytes at 50/s), and reports the CPU time (user + system, from
``getrusage`` and ``/proc/<pid>/stat``) of the probe's process and of the servers, per connect
and per second of stream. No path delay: the figures are the endpoints' cost, not the wait.
Needs root (the namespace).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ADDR = "10.98.0.1"
NETNS_SETUP = (
    f"ip link set lo up && ip link add b0 type veth peer name b1 && "
    f"ip addr add {ADDR}/24 dev b0 && ip link set b0 up && ip link set b1 up"
)


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _pid_cpu(pid: int) -> float:
    """User + system seconds of ``pid`` (and its reaped children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


async def _measure(state: Path, connects: int, streams: int, services_pid: int) -> dict[str, Any]:
    from probes import PROBES
    from probes.base import ProbeContext, Target

    turn_pid = int((state / "services" / "turnserver.pid").read_text().strip())
    ctx = ProbeContext()
    w, rl = PROBES["webrtc"], PROBES["relay"]
    wopts = w.options(scheme="http", port=8080, timeout=5.0)
    ropts = rl.options(username="bench", password="bench-secret")
    target = Target("bench", ADDR)
    for _ in range(2):  # warm-up: imports and first-use state
        await w.run(target, wopts, ctx)
    c0, s0, t0 = _self_cpu(), _pid_cpu(services_pid), time.perf_counter()
    ok = 0
    for _ in range(connects):
        ok += (await w.run(target, wopts, ctx)).success
    c1, s1, t1 = _self_cpu(), _pid_cpu(services_pid), time.perf_counter()
    r_ok = 0
    tu0 = _pid_cpu(turn_pid)
    stream_s = 0.0
    for _ in range(streams):
        res = await rl.run(target, ropts, ctx)
        r_ok += res.success
        stream_s += (ropts.packets - 1) * ropts.spacing
    c2, s2, tu1 = _self_cpu(), _pid_cpu(services_pid), _pid_cpu(turn_pid)
    return {
        "connects": connects,
        "connects_ok": ok,
        "connect_wall_ms": (t1 - t0) / connects * 1000,
        "cpu_ms_per_connect_probe": (c1 - c0) / connects * 1000,
        "cpu_ms_per_connect_answerer": (s1 - s0) / connects * 1000,
        "streams": streams,
        "streams_ok": r_ok,
        "stream_seconds": stream_s,
        "packets_per_second": 1 / ropts.spacing,
        "payload_bytes": ropts.payload_size,
        "cpu_ms_per_stream_second_probe": (c2 - c1) / stream_s * 1000,
        "cpu_ms_per_stream_second_turn": (tu1 - tu0) / stream_s * 1000,
        "cpu_ms_per_stream_second_reflector": (s2 - s1) / stream_s * 1000,
    }


def inner(connects: int, streams: int) -> dict[str, Any]:
    from lab.services import ServicesProcess

    with tempfile.TemporaryDirectory(prefix="edgeprobe-bench-rtc-") as d:
        state = Path(d)
        cfg = {
            "state_dir": str(state / "services"),
            "http": [f"{ADDR}:8080"],
            "udp_echo": [f"{ADDR}:7"],
            "turn": {"listen": [ADDR], "port": 3478, "users": {"bench": "bench-secret"}},
        }
        with ServicesProcess(cfg) as sp:
            assert sp.proc is not None
            return asyncio.run(_measure(state, connects, streams, sp.proc.pid))


def markdown(r: dict[str, Any]) -> str:
    return (
        "\n".join(
            [
                "| measurement | probe | server side |",
                "|---|---:|---:|",
                f"| CPU per webrtc connect ({r['connects_ok']}/{r['connects']} ok, "
                f"{r['connect_wall_ms']:.0f} ms each) | {r['cpu_ms_per_connect_probe']:.1f} ms | "
                f"{r['cpu_ms_per_connect_answerer']:.1f} ms (aiortc answerer) |",
                f"| CPU per second of relay stream ({r['packets_per_second']:.0f} packets/s of "
                f"{r['payload_bytes']} bytes, {r['streams_ok']}/{r['streams']} ok) | "
                f"{r['cpu_ms_per_stream_second_probe']:.2f} ms | "
                f"{r['cpu_ms_per_stream_second_turn']:.2f} ms (coturn) + "
                f"{r['cpu_ms_per_stream_second_reflector']:.2f} ms (reflector) |",
            ]
        )
        + "\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rtc", description=__doc__)
    ap.add_argument("--connects", type=int, default=30, help="webrtc connects (default 30)")
    ap.add_argument("--streams", type=int, default=2, help="relay streams of 5 s (default 2)")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = ap.parse_args(list(argv) if argv is not None else None)
    if not 1 <= a.connects <= 1000 or not 1 <= a.streams <= 20:
        ap.error("--connects must be 1..1000 and --streams 1..20")
    if a.inner:
        print(json.dumps(inner(a.connects, a.streams)))
        return 0
    root = str(Path(__file__).resolve().parent.parent)
    p = subprocess.run(
        [
            "unshare",
            "-n",
            "sh",
            "-c",
            NETNS_SETUP + ' && exec "$@"',
            "sh",
            sys.executable,
            "-m",
            "bench.rtc",
            "--inner",
            "--connects",
            str(a.connects),
            "--streams",
            str(a.streams),
        ],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=600,
        check=False,
        env={**os.environ, "PYTHONPATH": root},
    )
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-3000:])
        return 1
    r = json.loads(p.stdout.strip().splitlines()[-1])
    sys.stdout.write(json.dumps(r, indent=1) + "\n" if a.json else markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
