"""Bounded soak through the WAN lab: the agent for a couple of minutes with reloads every few
seconds, flapping targets (config and inventory), failed reloads, an edge that goes black and
comes back, stray ICMP from the edge side of the lab and on the agent's own host, and hostile
HTTP clients.

The agent runs in the lab's region namespace, in a child Python (``ip netns exec``), so its
probes cross the lab's forwarder with real delay and loss, and the asyncio task count stays
visible from inside: the child runs the agent in-process and prints a JSON report, which this
test checks. Asserts:

* no task leak: the asyncio task count at the end equals the count after warm-up, with the
  same config in place (tolerance: 2 short-lived HTTP handler tasks);
* no fd leak: open descriptors at the end <= after warm-up + 4;
* RSS growth after warm-up <= RSS_BOUND_MIB (stated bound: every per-series structure is
  fixed-size or windowed, so growth is allocator noise, measured at ~1-3 MiB);
* no counter reset: every counter of a series that was never removed is non-decreasing over
  every scrape;
* no false loss: on the edges where the lab's ground truth shows no drop, the agent counted
  at most 0.1 % loss;
* the black edge: its loss is counted while black, it answers again within two scrape steps
  of coming back, and loses nothing after that;
* strays are counted, never as replies.

EDGEPROBE_SOAK_SECONDS sets the length (default 100 s, so the area stays under 3 minutes).
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import random
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import uvloop
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent.app import Agent
from agent.config import load as cfgmod
from agent.server.guard import WebGuard
from agent.server.http import build_app, serve
from probes.net.icmp import IcmpEngines
from tests.helpers import ROOT
from tests.lab_helpers import profile_world

pytestmark = [pytest.mark.slow, pytest.mark.lab]

SOAK_SECONDS = float(os.environ.get("EDGEPROBE_SOAK_SECONDS", "100"))
WARMUP = 15.0
RSS_BOUND_MIB = 16.0
REGION = "soak-lab"
STABLE = [f"stable-{i}" for i in range(1, 7)]
FLAP = [f"flap-{i}" for i in range(1, 5)]
INV = [f"inv-{i}" for i in range(1, 7)]
BLACK = "stable-6"
LOSSY = {n for i, n in enumerate(STABLE + FLAP + INV) if i % 5 == 2}


def _profile() -> str:
    lines = [
        f"region: {REGION}",
        "description: soak test",
        "source: tests/lab/test_soak.py",
        "edges:",
    ]
    for i, n in enumerate(STABLE + FLAP + INV):
        delay = 2 + 3 * (i % 7)
        loss = ", loss: 1%" if n in LOSSY else ""
        lines.append(
            f'  - {{name: {n}, ipv4: 198.18.{40 + i}.1, ipv6: "2001:db8:e:{40 + i:x}::1",'
            f" path: {{delay: {delay}ms, jitter: 0.2ms{loss}}}}}"
        )
    return "\n".join(lines) + "\n"


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def config(addr: dict[str, str], flap_on: bool, poll: str = "200ms", broken: bool = False) -> str:
    targets = [{"name": n, "address": addr[n]} for n in STABLE]
    if flap_on:
        targets += [{"name": n, "address": addr[n]} for n in FLAP]
    doc = {
        "agent": {"region": "soak", "max_targets": 100},
        "defaults": {
            "icmp": {"interval": "250ms", "packets": 3, "spacing": "10ms", "timeout": "150ms"}
        },
        "targets": targets,
        "discovery": {"file_sd": [{"name": "inv", "files": ["inv.json"], "poll_interval": poll}]},
        "probe_endpoint": {
            "enabled": True,
            "allow_names": ["localhost"],
            "allow_special": ["loopback"],
            "burst": 1000,
            "rate": 1000,
        },
    }
    text = yaml.safe_dump(doc)
    return text.replace("region: soak", "region: [soak") if broken else text


def inventory(addr: dict[str, str], step: int) -> str:
    edges = [addr[INV[(step + k) % len(INV)]] for k in range(3)]
    return json.dumps([{"targets": edges, "labels": {"tier": "inv"}}])


def forwarder_set(control: str, edge: str, loss: str) -> None:
    """The lab forwarder's control socket (a path, so reachable from inside the namespace)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(5.0)
        c.connect(control)
        c.sendall(
            json.dumps(
                {"cmd": "set", "region": REGION, "edge": edge, "set": {"loss": loss}}
            ).encode()
            + b"\n"
        )
        assert json.loads(c.makefile().readline())["ok"]


def icmp_reply(ident: int, seq: int) -> bytes:
    h = struct.pack("!BBHHH", 0, 0, 0, ident, seq) + os.urandom(16)
    s = sum(struct.unpack(f"!{len(h) // 2}H", h))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return h[:2] + struct.pack("!H", ~s & 0xFFFF) + h[4:]


def edge_counter(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, edge: str
) -> float:
    return sum(
        v
        for (n, labels), v in samples.items()
        if n == name and dict(labels).get("edge") == edge and dict(labels).get("probe") == "icmp"
    )


async def soak(a: dict[str, Any]) -> dict[str, Any]:
    """The soak itself, run inside the region namespace. Returns the report."""
    tmp_path = Path(a["dir"])
    addr: dict[str, str] = a["addr"]
    cfg_path = tmp_path / "edgeprobe.yml"
    inv_path = tmp_path / "inv.json"
    cfg_path.write_text(config(addr, True))
    inv_path.write_text(inventory(addr, 0))
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    (tmp_path / "web.yml").write_text(yaml.safe_dump({"basic_auth_users": {"prom": hashed}}))
    guard = WebGuard(tmp_path / "web.yml")
    agent = Agent(cfgmod.load(cfg_path), cfg_path, web_guard=guard)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runner = await serve(build_app(agent, middlewares=guard.middlewares()), f"127.0.0.1:{port}")
    await agent.start()
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": aiohttp.encode_basic_auth("prom", "pw")}
    # Strays on the agent's own host, some with the engine's identifier (wrong sequence).
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    raw.setblocking(False)
    rng = random.Random(7)
    seconds = float(a["seconds"])
    black_from, black_to = 0.4 * seconds, 0.55 * seconds
    black_state = "before"
    black: dict[str, float] = {}
    after_back: list[tuple[float, float, float, float]] = []

    last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    resets: list[str] = []
    scrapes = reloads = failed_reloads = strays = 0
    baseline: tuple[int, int, float] | None = None
    applied = (True, "200ms")
    t_start = time.monotonic()
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    try:
        step = 0
        while time.monotonic() - t_start < seconds:
            step += 1
            elapsed = time.monotonic() - t_start
            for _ in range(50):  # ~100 stray replies per second
                with_id = rng.choice(
                    [
                        rng.randrange(1, 65536),
                        *(e.ident for e in agent.resources.need(IcmpEngines).engines.values()),
                    ]
                )
                try:
                    raw.sendto(icmp_reply(with_id, rng.randrange(65536)), ("127.0.0.1", 0))
                    strays += 1
                except BlockingIOError:
                    break
            if black_state == "before" and elapsed >= black_from:
                forwarder_set(a["control"], BLACK, "100%")
                black_state = "black"
                black["lost_at_start"] = edge_counter(last, "edgeprobe_packets_lost_total", BLACK)
            elif black_state == "black" and elapsed >= black_to:
                forwarder_set(a["control"], BLACK, "0%")
                black_state = "back"
                black["lost_while_black"] = (
                    edge_counter(last, "edgeprobe_packets_lost_total", BLACK)
                    - black["lost_at_start"]
                )
                black["back_at"] = elapsed
            if step % 6 == 0:  # a reload every ~3 s
                flap_on = (step // 6) % 2 == 0
                broken = (step // 6) % 5 == 4
                poll = "300ms" if (step // 6) % 7 == 6 else "200ms"
                cfg_path.write_text(config(addr, flap_on, poll, broken))
                async with session.post(base + "/-/reload", headers=auth) as r:
                    ok = r.status == 200
                reloads += 1
                failed_reloads += not ok
                assert ok != broken
                if ok:
                    applied = (flap_on, poll)
            if step % 4 == 0:
                inv_path.write_text(inventory(addr, step // 4))
            if step % 3 == 0:
                async with session.get(
                    base + "/probe", headers=auth, params={"target": "localhost", "module": "icmp"}
                ) as r:
                    assert r.status == 200
                async with session.get(
                    base + "/metrics", headers={"Authorization": "Basic Zm9vOmJhcg=="}
                ) as r:
                    assert r.status == 401
            async with session.get(base + "/metrics", headers=auth) as r:
                assert r.status == 200
                text = await r.text()
            scrapes += 1
            fams = list(text_string_to_metric_families(text))
            cur = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for f in fams
                if f.type == "counter"
                for s in f.samples
                if s.name.endswith("_total")
            }
            for key, v in cur.items():
                labels = dict(key[1])
                stable = labels.get("edge", "") in STABLE or "edge" not in labels
                if stable and key in last and v < last[key]:
                    resets.append(f"{key}: {last[key]} -> {v}")
            last = cur
            if black_state == "back":
                replies = sum(
                    x.value
                    for f in fams
                    if f.name == "edgeprobe_rtt_seconds"
                    for x in f.samples
                    if x.name == "edgeprobe_rtt_seconds_count" and x.labels.get("edge") == BLACK
                )
                after_back.append(
                    (
                        elapsed,
                        replies,
                        edge_counter(last, "edgeprobe_packets_sent_total", BLACK),
                        edge_counter(last, "edgeprobe_packets_lost_total", BLACK),
                    )
                )
            if baseline is None and elapsed >= a["warmup"] and applied == (True, "200ms"):
                # Same config state as at the end: flapping targets on, default poll.
                gc.collect()
                baseline = (len(asyncio.all_tasks()), fds(), rss_mib())
            await asyncio.sleep(0.5)

        # Finish in the baseline's config state, let in-flight work settle, then measure.
        cfg_path.write_text(config(addr, True))
        assert (await agent.reload())[0]
        await asyncio.sleep(1.0)
        gc.collect()
        end = (len(asyncio.all_tasks()), fds(), rss_mib())
    finally:
        await session.close()
        raw.close()
        await agent.stop(1.0)
        await runner.cleanup()

    if len(after_back) > 1:
        # The first scrape that shows a new reply, and the loss over the rest of the soak once
        # the runs in flight when the path returned (150 ms timeout) have ended.
        t0, replies0 = after_back[0][0], after_back[0][1]
        black["first_reply_after"] = (
            next((t for t, r, _, _ in after_back if r > replies0), math.inf) - black["back_at"]
        )
        settled = [x for x in after_back if x[0] >= t0 + 1.0] or after_back[-1:]
        sent = settled[-1][2] - settled[0][2]
        black["loss_after"] = (settled[-1][3] - settled[0][3]) / sent if sent else math.nan
        black["sent_after"] = sent
    stray_total = sum(v for (n, _), v in last.items() if n == "edgeprobe_stray_packets_total")
    return {
        "seconds": round(time.monotonic() - t_start),
        "scrapes": scrapes,
        "reloads": reloads,
        "failed_reloads": failed_reloads,
        "strays_sent_local": strays,
        "strays_counted": stray_total,
        "baseline": baseline,
        "end": end,
        "resets": resets[:5],
        "black": black,
        "lost": {n: edge_counter(last, "edgeprobe_packets_lost_total", n) for n in STABLE},
        "received_stable": {
            n: edge_counter(last, "edgeprobe_packets_sent_total", n)
            - edge_counter(last, "edgeprobe_packets_lost_total", n)
            for n in STABLE
        },
    }


# Stray echo replies from the edge side (built by ``icmp_reply``, random identifiers and
# sequences), from every edge address, to the agent's address, through the lab forwarder.
# Bounded by count and time.
EDGE_STRAYS = r"""
import json, random, socket, sys, time
a = json.loads(sys.argv[1])
rng = random.Random(11)
packets = [bytes.fromhex(h) for h in a["packets"]]
socks = []
for src in a["sources"]:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.bind((src, 0))
    socks.append(s)
end = time.monotonic() + a["seconds"]
sent = 0
while time.monotonic() < end and sent < a["max"]:
    rng.choice(socks).sendto(packets[sent % len(packets)], (a["dst"], 0))
    sent += 1
    time.sleep(0.02)
print(sent)
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with profile_world(
        tmp_path_factory.mktemp("soak-lab"), _profile(), services=False, seed=5
    ) as w:
        yield w


def test_soak(world: Any, tmp_path: Path) -> None:
    st = world.state
    addr = {n: st.edges[n]["ipv4"] for n in STABLE + FLAP + INV}
    rng = random.Random(11)
    arg = {
        "dir": str(tmp_path),
        "addr": addr,
        "seconds": SOAK_SECONDS,
        "warmup": WARMUP,
        "control": st.control,
    }
    strays = subprocess.Popen(
        world.cmd(
            "edge",
            [
                sys.executable,
                "-c",
                EDGE_STRAYS,
                json.dumps(
                    {
                        "sources": [st.edges[n]["ipv4"] for n in STABLE + FLAP],
                        "dst": st.regions[REGION].agent4,
                        "seconds": SOAK_SECONDS,
                        "max": 20_000,
                        "packets": [
                            icmp_reply(rng.randrange(1, 65536), rng.randrange(65536)).hex()
                            for _ in range(256)
                        ],
                    }
                ),
            ],
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        p = world.run(
            REGION,
            [sys.executable, "-m", "tests.lab.test_soak", json.dumps(arg)],
            timeout=SOAK_SECONDS + 120,
            cwd=str(ROOT),
        )
    finally:
        try:
            edge_sent = int(strays.communicate(timeout=SOAK_SECONDS + 30)[0] or 0)
        except subprocess.TimeoutExpired:
            strays.kill()
            raise
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    report["strays_sent_edge"] = edge_sent
    # Ground truth: what the lab dropped between the agent and each stable edge.
    from lab import groundtruth as gt

    agent4 = st.regions[REGION].agent4
    dropped = {n: 0 for n in STABLE}
    by_addr = {st.edges[n]["ipv4"]: n for n in STABLE}
    for r in world.records():
        if r.status in (gt.DROPPED, gt.EXPIRED) and agent4 in (r.src_ip, r.dst_ip):
            n = by_addr.get(r.dst_ip if r.src_ip == agent4 else r.src_ip)
            if n is not None:
                dropped[n] += 1
    report["truth_dropped"] = dropped
    print("soak:", json.dumps(report))
    baseline, end = report["baseline"], report["end"]
    assert baseline is not None, report
    assert report["resets"] == [], report["resets"]
    assert report["failed_reloads"] >= 1 and report["reloads"] >= SOAK_SECONDS / 8
    assert end[0] <= baseline[0] + 2, report
    assert end[1] <= baseline[1] + 4, report
    assert end[2] - baseline[2] <= RSS_BOUND_MIB, report
    assert edge_sent > 0 and report["strays_counted"] > 0, report
    # Every stable edge kept answering through the lab (the black one before and after).
    assert all(v > 0 for v in report["received_stable"].values()), report
    # Where the lab dropped nothing, the agent counts (almost) no loss: reloads, flapping
    # neighbours, strays and a busy loop cost no false loss (kernel timestamps; a late send's
    # timeout runs from when it left). Before those fixes: ~0.4 %. One CI run still counted 1
    # of ~4,800 (cause not found yet), so the bound is 0.1 % of these edges' packets.
    clean = set(STABLE) - LOSSY - {BLACK}
    assert all(dropped[n] == 0 for n in clean), report
    lost = sum(report["lost"][n] for n in clean)
    assert lost <= 0.001 * sum(report["received_stable"][n] for n in clean), report
    black = report["black"]
    # ~15 % of the soak black at 12 packets/s: whole runs lost, and counted.
    assert black["lost_while_black"] >= 12, black
    # Recovery is immediate: the path returns between two scrapes (~0.5 s apart) and a run
    # starts every 0.25 s, so a new reply shows within two scrape steps. After that the edge
    # is as clean as before: no loss at all, over >= 12 packets.
    assert black["first_reply_after"] <= 1.5, black
    assert black["sent_after"] >= 12 and black["loss_after"] == 0, black


if __name__ == "__main__":
    # uvloop: the event loop `edgeprobe run` uses.
    print(json.dumps(uvloop.run(soak(json.loads(sys.argv[1])))))
