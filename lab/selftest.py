"""The forwarder measuring itself: release precision and the packet rate it sustains.

A paced UDP sender in a region namespace sends to an edge address with no listener (the
edge kernel answers each datagram with an ICMP port unreachable, so the forwarder carries
two packets per datagram). The ground truth then says how late each release was, and how
many packets the forwarder read versus what was offered.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass
from typing import Any

from lab import groundtruth as gt
from lab.topology import World

# Runs inside the region namespace: paced sends in 1 ms batches, bounded in count and time.
_SENDER = textwrap.dedent("""
    import socket, sys, time
    dst, pps, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setblocking(False)
    n_total = int(pps * secs)
    t0 = time.monotonic_ns()
    sent = 0
    while sent < n_total and time.monotonic_ns() - t0 < (secs + 2) * 1e9:
        due = int((time.monotonic_ns() - t0) * pps / 1e9) + 1
        while sent < min(due, n_total):
            try:
                s.sendto(b"x" * 32, (dst, 9999))
            except (BlockingIOError, OSError):
                pass
            sent += 1
        time.sleep(0.001)
    print(sent)
""")


@dataclass
class RateResult:
    offered_pps: float
    sent: int
    read: int  # packets the forwarder read (both directions)
    delivered: int
    late_p50_us: float
    late_p99_us: float
    late_max_us: float
    cpu_s: float
    capacity_pps: float  # packets read per CPU second of the forwarder (busy-poll
    # time included, so a lower bound at low rates)
    realtime: bool  # the forwarder ran in SCHED_FIFO at the end

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measure(world: World, region: str, address: str, pps: int, seconds: float) -> RateResult:
    """Offer ``pps`` datagrams/s for ``seconds`` from ``region`` to ``address``."""
    before = world.stats()
    n0 = len(world.records())
    r = world.run(
        region, [_python(), "-c", _SENDER, address, str(pps), str(seconds)], timeout=seconds + 10
    )
    sent = int(r.stdout.strip() or 0)
    import time

    time.sleep(0.3)  # let the last replies through the forwarder
    after = world.stats()
    recs = world.records()[n0:]
    prec = gt.precision(recs)
    read = after["stats"]["read"] - before["stats"]["read"]
    cpu = after["cpu_s"] - before["cpu_s"]
    return RateResult(
        offered_pps=pps,
        sent=sent,
        read=read,
        delivered=sum(1 for x in recs if x.status == gt.DELIVERED),
        late_p50_us=prec.p50_us,
        late_p99_us=prec.p99_us,
        late_max_us=prec.max_us,
        cpu_s=cpu,
        capacity_pps=read / cpu if cpu > 0 else 0.0,
        realtime=bool(after.get("realtime")),
    )


def _python() -> str:
    import sys

    return sys.executable


def main(rates: list[int], seconds: float = 2.0) -> list[RateResult]:
    """``python -m lab selftest``: a throw-away one-region world with a zero-delay path."""
    from lab.spec import decode_profile

    prof = decode_profile(
        {
            "region": "selftest",
            "source": "synthetic",
            "edges": [
                {
                    "name": "sink",
                    "ipv4": "198.18.250.1",
                    "ipv6": "2001:db8:e:fa::1",
                    "path": {"delay": "1ms"},
                }
            ],
        }
    )
    out: list[RateResult] = []
    with World.up(profiles=[prof], services=False) as w:
        for pps in rates:
            res = measure(w, "selftest", "198.18.250.1", pps, seconds)
            print(json.dumps(res.to_json()), flush=True)
            out.append(res)
    return out
