"""Hostile ICMP against the agent's shared ICMP socket, and an edge that goes black and returns.

Runs in a network namespace this test creates (its own loopback, its own
``icmp_echo_ignore_all``), so crafted packets never leave it: the kernel there does not answer
echoes, and this test plays the edge with a raw socket (IP_HDRINCL, so it can also forge the
source address)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None,
        reason="needs root and iproute2 for a network namespace",
    ),
]

SCRIPT = textwrap.dedent(r"""
    import asyncio, json, socket, struct, sys, time
    from agent.runtime.selfstats import SelfStats
    from probes.base import ProbeContext, Target
    from probes.icmp import IcmpOptions, run
    from probes.net.icmp import EXPIRED_MEMORY, IcmpEngines

    def csum(b):
        if len(b) % 2:
            b += b"\0"
        s = sum(struct.unpack(f"!{len(b) // 2}H", b))
        s = (s >> 16) + (s & 0xFFFF)
        s += s >> 16
        return ~s & 0xFFFF

    def icmp(typ, ident, seq, payload, good_sum=True):
        h = struct.pack("!BBHHH", typ, 0, 0, ident, seq) + payload
        c = csum(h) if good_sum else (csum(h) ^ 0x5A5A)
        return h[:2] + struct.pack("!H", c) + h[4:]

    def ip(src, dst, body):
        h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0, 64, 1, 0,
                        socket.inet_aton(src), socket.inet_aton(dst))
        h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
        return h + body

    def set_black(on):
        with open("/proc/sys/net/ipv4/icmp_echo_ignore_all", "w") as f:
            f.write("1" if on else "0")

    async def main():
        set_black(True)
        stats = SelfStats()
        engines = IcmpEngines(mode="privileged", counters=stats)
        eng = engines.get(socket.AF_INET)
        ctx = ProbeContext.with_resources(engines, counters=stats)
        sniff = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        sniff.settimeout(2.0)
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        loop = asyncio.get_running_loop()
        opts = IcmpOptions(packets=1, timeout=2.0, interval=3.0)

        async def request():
            # The echo request the engine sent, as the edge sees it.
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                data = await loop.run_in_executor(None, sniff.recv, 4096)
                body = data[(data[0] & 0x0F) * 4:]
                if body[0] == 8 and struct.unpack_from("!H", body, 4)[0] == eng.ident:
                    return body
            raise SystemExit("no echo request seen")

        out = {}
        task = asyncio.create_task(run(Target("t", "127.0.0.1"), opts, ctx))
        req = await request()
        _, _, _, ident, seq = struct.unpack_from("!BBHHH", req)
        payload = req[8:]
        bad_token = bytes([payload[0] ^ 0xFF]) + payload[1:]
        hostile = [
            ("foreign", ip("127.0.0.1", "127.0.0.1", icmp(0, ident ^ 0xFFFF, seq, payload))),
            ("unmatched", ip("127.0.0.1", "127.0.0.1", icmp(0, ident, seq ^ 0x100, payload))),
            ("bad_checksum", ip("127.0.0.1", "127.0.0.1", icmp(0, ident, seq, payload, False))),
            ("wrong_source", ip("127.0.0.2", "127.0.0.1", icmp(0, ident, seq, payload))),
            ("bad_payload", ip("127.0.0.1", "127.0.0.1", icmp(0, ident, seq, bad_token))),
            # Shorter than an ICMP header: the kernel's ICMP_FILTER drops it before the
            # socket, so it must simply never count.
            ("dropped", ip("127.0.0.1", "127.0.0.1", icmp(0, ident, seq, b"")[:4])),
        ]
        if "--truncated" in sys.argv:
            # The reply with its payload cut short (token incomplete).
            hostile = [("truncated", ip("127.0.0.1", "127.0.0.1",
                                        icmp(0, ident, seq, payload[:4])))]
        for _, pkt in hostile:
            raw.sendto(pkt, ("127.0.0.1", 0))
        await asyncio.sleep(0.2)
        out["pending_after_hostile"] = len(eng._pending)
        good = ip("127.0.0.1", "127.0.0.1", icmp(0, ident, seq, payload))
        raw.sendto(good, ("127.0.0.1", 0))
        raw.sendto(good, ("127.0.0.1", 0))        # duplicated
        res = await task
        await asyncio.sleep(0.2)
        out["rtts"] = res.rtts
        out["success"] = res.success
        out["stray"] = {r: n for (p, r), n in stats.stray_counts.items()}
        if "--truncated" in sys.argv:
            print(json.dumps(out))
            return

        # A flood of replies for sequence numbers nobody sent: counted, bounded, no crash.
        t0 = time.monotonic()
        for i in range(20000):
            raw.sendto(ip("127.0.0.1", "127.0.0.1", icmp(0, ident, i & 0xFFFF, payload)),
                       ("127.0.0.1", 0))
            if i % 500 == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(0.5)
        out["flood_seconds"] = time.monotonic() - t0
        out["stray_after_flood"] = sum(stats.stray_counts.values())
        out["expired_len"] = len(eng._expired)
        out["expired_cap"] = EXPIRED_MEMORY
        out["pending_len"] = len(eng._pending)

        # The edge goes black, then returns: loss is counted, recovery is the next run.
        set_black(False)
        opts = IcmpOptions(packets=3, spacing=0.05, timeout=0.3, interval=1.0)
        phases = []
        for black in (False, True, True, True, False):
            set_black(black)
            r = await run(Target("t", "127.0.0.1"), opts, ctx)
            phases.append([x is not None for x in r.rtts])
        out["blackout"] = phases
        engines.close()
        print(json.dumps(out))

    asyncio.run(main())
""")


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"ep-hostile-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, timeout=10)


def run_in(netns: str, tmp_path: Path, *args: str) -> dict[str, Any]:
    script = tmp_path / "hostile.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def test_hostile_icmp_and_blackout(netns: str, tmp_path: Path) -> None:
    out = run_in(netns, tmp_path)

    # Not one hostile packet settled the probe: it was still waiting for its reply.
    assert out["pending_after_hostile"] == 1
    # Exactly one valid reply counted; each hostile packet counted under its own reason.
    assert out["success"] is True and len(out["rtts"]) == 1 and out["rtts"][0] is not None
    assert out["stray"] == {
        "foreign": 1,
        "unmatched": 1,
        "bad_checksum": 1,
        "wrong_source": 1,
        "bad_payload": 1,
        "late": 1,
    }, out["stray"]
    # The flood: every packet counted (the socket buffer is 4 MiB: none dropped at this size),
    # state bounded, nothing in flight left behind.
    assert out["stray_after_flood"] >= 6 + 20000 * 0.99
    assert out["expired_len"] <= out["expired_cap"] and out["pending_len"] == 0
    # Blackout: answered, lost x3 runs, answered again on the very next run.
    assert out["blackout"] == [[True] * 3, [False] * 3, [False] * 3, [False] * 3, [True] * 3]


def test_truncated_reply_is_not_a_reply(netns: str, tmp_path: Path) -> None:
    out = run_in(netns, tmp_path, "--truncated")
    assert out["pending_after_hostile"] == 1
    assert out["stray"].get("bad_payload", 0) + out["stray"].get("malformed", 0) == 1
