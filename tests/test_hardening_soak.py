"""Bounded soak: the agent for a couple of minutes with reloads every few seconds, flapping
targets (config and inventory), failed reloads, stray ICMP and hostile HTTP clients.

Runs in-process on loopback (the asyncio task count is only visible from inside). Asserts:

* no task leak: the asyncio task count at the end equals the count after warm-up, with the
  same config in place (tolerance: 2 short-lived HTTP handler tasks);
* no fd leak: open descriptors at the end <= after warm-up + 4;
* RSS growth after warm-up <= RSS_BOUND_MIB (stated bound: every per-series structure is
  fixed-size or windowed, so growth is allocator noise, measured at ~1-3 MiB);
* no counter reset: every counter of a series that was never removed is non-decreasing over
  every scrape.

EDGEPROBE_SOAK_SECONDS sets the length (default 100 s, so the area stays under 3 minutes).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import socket
import struct
import time
from pathlib import Path

import aiohttp
import bcrypt
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent import config as cfgmod
from agent.app import Agent
from agent.web import build_app, serve
from agent.webconfig import WebGuard

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="stray ICMP needs a raw socket")]

SOAK_SECONDS = float(os.environ.get("EDGEPROBE_SOAK_SECONDS", "100"))
WARMUP = 15.0
RSS_BOUND_MIB = 16.0
STABLE = [f"stable-{i}" for i in range(1, 7)]
FLAP = [f"flap-{i}" for i in range(1, 5)]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def config(flap_on: bool, poll: str = "200ms", broken: bool = False) -> str:
    targets = [{"name": n, "address": f"127.0.0.{i + 1}"} for i, n in enumerate(STABLE)]
    if flap_on:
        targets += [{"name": n, "address": f"127.0.2.{i + 1}"} for i, n in enumerate(FLAP)]
    doc = {"agent": {"region": "soak", "max_targets": 100},
           "defaults": {"icmp": {"interval": "250ms", "packets": 3, "spacing": "10ms",
                                 "timeout": "150ms"}},
           "targets": targets,
           "discovery": {"file_sd": [{"name": "inv", "files": ["inv.json"],
                                      "poll_interval": poll}]},
           "probe_endpoint": {"enabled": True, "allow_names": ["localhost"],
                              "allow_special": ["loopback"], "burst": 1000, "rate": 1000}}
    text = yaml.safe_dump(doc)
    return text.replace("region: soak", "region: [soak") if broken else text


def inventory(step: int) -> str:
    edges = [f"127.0.3.{1 + (step + k) % 6}" for k in range(3)]
    return json.dumps([{"targets": edges, "labels": {"tier": "inv"}}])


def icmp_reply(ident: int, seq: int) -> bytes:
    h = struct.pack("!BBHHH", 0, 0, 0, ident, seq) + os.urandom(16)
    s = sum(struct.unpack(f"!{len(h) // 2}H", h))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return h[:2] + struct.pack("!H", ~s & 0xFFFF) + h[4:]


async def test_soak(tmp_path: Path) -> None:
    cfg_path = tmp_path / "edgeprobe.yml"
    inv_path = tmp_path / "inv.json"
    cfg_path.write_text(config(True))
    inv_path.write_text(inventory(0))
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
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    raw.setblocking(False)
    rng = random.Random(7)

    last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    resets: list[str] = []
    scrapes = reloads = failed_reloads = strays = 0
    baseline: tuple[int, int, float] | None = None
    applied = (True, "200ms")
    t_start = time.monotonic()
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    try:
        step = 0
        while time.monotonic() - t_start < SOAK_SECONDS:
            step += 1
            elapsed = time.monotonic() - t_start
            for _ in range(100):                       # ~200 stray replies per second
                with_id = rng.choice([rng.randrange(1, 65536), *(
                    e.ident for e in agent.icmp.engines.values())])
                try:
                    raw.sendto(icmp_reply(with_id, rng.randrange(65536)), ("127.0.0.1", 0))
                    strays += 1
                except BlockingIOError:
                    break
            if step % 6 == 0:                          # a reload every ~3 s
                flap_on = (step // 6) % 2 == 0
                broken = (step // 6) % 5 == 4
                poll = "300ms" if (step // 6) % 7 == 6 else "200ms"
                cfg_path.write_text(config(flap_on, poll, broken))
                async with session.post(base + "/-/reload", headers=auth) as r:
                    ok = r.status == 200
                reloads += 1
                failed_reloads += not ok
                assert ok != broken
                if ok:
                    applied = (flap_on, poll)
            if step % 4 == 0:
                inv_path.write_text(inventory(step // 4))
            if step % 3 == 0:
                async with session.get(base + "/probe", headers=auth,
                                       params={"target": "localhost", "module": "icmp"}) as r:
                    assert r.status == 200
                async with session.get(base + "/metrics",
                                       headers={"Authorization": "Basic Zm9vOmJhcg=="}) as r:
                    assert r.status == 401
            async with session.get(base + "/metrics", headers=auth) as r:
                assert r.status == 200
                text = await r.text()
            scrapes += 1
            cur = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) if f.type == "counter"
                   for s in f.samples if s.name.endswith("_total")}
            for key, v in cur.items():
                labels = dict(key[1])
                stable = labels.get("edge", "") in STABLE or "edge" not in labels
                if stable and key in last and v < last[key]:
                    resets.append(f"{key}: {last[key]} -> {v}")
            last = cur
            if baseline is None and elapsed >= WARMUP and applied == (True, "200ms"):
                # Same config state as at the end: flapping targets on, default poll.
                gc.collect()
                baseline = (len(asyncio.all_tasks()), fds(), rss_mib())
            await asyncio.sleep(0.5)

        # Finish in the baseline's config state, let in-flight work settle, then measure.
        cfg_path.write_text(config(True))
        assert (await agent.reload())[0]
        await asyncio.sleep(1.0)
        gc.collect()
        end = (len(asyncio.all_tasks()), fds(), rss_mib())
    finally:
        await session.close()
        raw.close()
        await agent.stop(1.0)
        await runner.cleanup()

    assert baseline is not None
    report = {"seconds": round(time.monotonic() - t_start), "scrapes": scrapes,
              "reloads": reloads, "failed_reloads": failed_reloads, "strays_sent": strays,
              "tasks": [baseline[0], end[0]], "fds": [baseline[1], end[1]],
              "rss_mib": [round(baseline[2], 1), round(end[2], 1)]}
    print("soak:", json.dumps(report))
    assert resets == [], resets[:5]
    assert failed_reloads >= 1 and reloads >= SOAK_SECONDS / 8
    assert end[0] <= baseline[0] + 2, report
    assert end[1] <= baseline[1] + 4, report
    assert end[2] - baseline[2] <= RSS_BOUND_MIB, report
    stray_total = sum(v for (n, _), v in last.items() if n == "edgeprobe_stray_packets_total")
    assert stray_total > 0
