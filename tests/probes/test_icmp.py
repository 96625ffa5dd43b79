"""ICMP over real sockets: loopback in this namespace, plus fresh network namespaces for the
unprivileged mode, for loss and for unreachable routes. Nothing leaves the machine."""

from __future__ import annotations

import asyncio
import errno
import json
import shutil
import socket
import struct
import subprocess
import sys
from typing import Any

import pytest

from agent.runtime.selfstats import SelfStats
from probes.base import ProbeContext, ProbeResult, Target
from probes.icmp import IcmpOptions, run
from probes.net import errqueue
from probes.net.icmp import IcmpEngine, IcmpEngines, _checksum
from tests.helpers import EDGEPROBE, ROOT, can_netns, in_netns, netns

needs_root = pytest.mark.skipif(not can_netns(), reason="needs root and ip netns")


@needs_root
@pytest.mark.parametrize("addr", ["127.0.0.1", "::1"])
async def test_privileged_loopback_no_loss(addr: str) -> None:
    stats = SelfStats()
    engines = IcmpEngines(mode="privileged", counters=stats)
    try:
        ctx = ProbeContext.with_resources(engines)
        res = await run(
            Target("lo", addr), IcmpOptions(packets=20, spacing=0.005, timeout=0.5), ctx
        )
    finally:
        engines.close()
    assert res.success and res.reason == "ok"
    assert len(res.rtts) == 20 and all(r is not None for r in res.rtts)
    assert all(0 < r < 0.05 for r in res.rtts if r is not None)
    assert len(set(res.packet_ids)) == 20
    assert stats.stray_counts.get(("icmp", "unmatched"), 0) == 0


@needs_root
async def test_callback_form_delivers_results_and_cancel_abandons() -> None:
    from probes.icmp import start
    from probes.net.resolve import Resolver

    engines = IcmpEngines(mode="privileged")
    ctx = ProbeContext.with_resources(engines, Resolver())
    loop = asyncio.get_running_loop()
    results: dict[str, asyncio.Future[object]] = {}
    try:
        for addr in ("127.0.0.1", "127.0.0.2", "::1"):
            fut = results[addr] = loop.create_future()
            h = start(
                Target("lo", addr),
                IcmpOptions(packets=3, spacing=0.005, timeout=0.5),
                ctx,
                fut.set_result,
            )
            assert h is not None
        # A name needs a lookup first: the callback form declines, the async form runs.
        assert start(Target("n", "localhost"), IcmpOptions(), ctx, lambda r: None) is None
        # A literal of the other family is the async form's resolve_empty.
        assert start(Target("f", "::1"), IcmpOptions(ip_family="ipv4"), ctx, lambda r: None) is None
        got = [await asyncio.wait_for(f, 2) for f in results.values()]
        for r in got:
            assert isinstance(r, ProbeResult) and r.success and len(r.rtts) == 3
            assert all(x is not None for x in r.rtts)
        eng = engines.engines[socket.AF_INET]
        abandoned: list[object] = []
        h = start(
            Target("lo", "127.0.0.1"), IcmpOptions(packets=5, spacing=0.05), ctx, abandoned.append
        )
        assert h is not None
        h.cancel()
        await asyncio.sleep(0.3)
        assert abandoned == [] and eng.in_flight == 0
    finally:
        engines.close()


@needs_root
@pytest.mark.parametrize("tool", ["ping", "fping"])
async def test_concurrent_pinger_replies_are_stray_not_counted(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")
    cmd = (
        ["ping", "-q", "-i", "0.002", "-c", "400", "127.0.0.1"]
        if tool == "ping"
        else ["fping", "-q", "-p", "2", "-c", "400", "127.0.0.1"]
    )
    other = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stats = SelfStats()
    engines = IcmpEngines(mode="privileged", counters=stats)
    try:
        await asyncio.sleep(0.1)
        res = await run(
            Target("lo", "127.0.0.1"),
            IcmpOptions(packets=100, spacing=0.005, interval=2.0, timeout=0.5),
            ProbeContext.with_resources(engines),
        )
    finally:
        engines.close()
        other.wait(timeout=10)
    assert len(res.rtts) == 100 and all(r is not None for r in res.rtts)
    # The raw socket saw the other pinger's replies and counted them as foreign strays.
    assert stats.stray_counts.get(("icmp", "foreign"), 0) > 0


def _engine_for_unit() -> tuple[IcmpEngine, SelfStats]:
    stats = SelfStats()
    return IcmpEngine(socket.AF_INET, "privileged", stats), stats


def _reply(
    ident: int, seq: int, payload: bytes, src_ip: str = "127.0.0.1", corrupt: bool = False
) -> bytes:
    hdr = struct.pack("!BBHHH", 0, 0, 0, ident, seq)
    csum = _checksum(hdr + payload)
    if corrupt:
        csum ^= 0x5555
    icmp = struct.pack("!BBHHH", 0, 0, csum, ident, seq) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(icmp),
        0,
        0,
        64,
        1,
        0,
        socket.inet_aton(src_ip),
        socket.inet_aton("127.0.0.1"),
    )
    return ip + icmp


@needs_root
async def test_spoofed_and_malformed_replies_are_stray() -> None:
    eng, stats = _engine_for_unit()
    try:
        loop = asyncio.get_running_loop()
        eng.attach(loop)
        # Freeze a train in flight against an address that never answers in this test: we
        # feed forged replies straight into the receive path.
        done: list[object] = []
        from probes.net.icmp import Train, _Slot

        payload = eng._payload(56)[0]
        r = Train(1, int(1e9), done.append, payload, eng)
        eng._pending[7] = _Slot(r, 0, "127.0.0.9", 0, 0)
        eng._handle(_reply(eng.ident ^ 1, 7, payload), [], "127.0.0.9", 1)
        eng._handle(_reply(eng.ident, 7, payload, corrupt=True), [], "127.0.0.9", 1)
        eng._handle(_reply(eng.ident, 7, payload), [], "127.0.0.8", 1)
        eng._handle(_reply(eng.ident, 7, b"X" * 56), [], "127.0.0.9", 1)
        eng._handle(_reply(eng.ident, 8, payload), [], "127.0.0.9", 1)
        eng._handle(b"\x45\x00", [], "127.0.0.9", 1)
        eng._handle(_reply(eng.ident, 7, payload)[:24], [], "127.0.0.9", 1)
        eng._handle(_reply(eng.ident, 7, payload[:5]), [], "127.0.0.9", 1)
        assert r.rtts == [None] and not done
        assert stats.stray_counts == {
            ("icmp", "foreign"): 1,
            ("icmp", "bad_checksum"): 1,
            ("icmp", "wrong_source"): 1,
            ("icmp", "bad_payload"): 2,
            ("icmp", "unmatched"): 1,
            ("icmp", "malformed"): 2,
        }
        # The genuine reply is accepted once; its duplicate is a stray ("late").
        eng._handle(_reply(eng.ident, 7, payload), [], "127.0.0.9", 10**6)
        eng._handle(_reply(eng.ident, 7, payload), [], "127.0.0.9", 10**6)
        assert r.rtts[0] is not None and done == [r]
        assert stats.stray_counts[("icmp", "late")] == 1
    finally:
        eng.close()


def _probe_json(ns: str, *args: str, user: str | None = None) -> list[dict[str, object]]:
    cmd = [*EDGEPROBE, "probe", "--json", *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    out = subprocess.run(
        in_netns(ns, *cmd),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode in (0, 3), out.stderr
    rows: list[dict[str, object]] = json.loads(out.stdout)
    return rows


@needs_root
def test_unprivileged_mode_as_nobody_in_a_namespace() -> None:
    with netns() as ns:
        subprocess.run(
            in_netns(ns, "sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"), check=True
        )
        rows = _probe_json(
            ns,
            "-c",
            "5",
            "--spacing",
            "10ms",
            "--icmp-mode",
            "unprivileged",
            "127.0.0.1",
            "::1",
            user="65534",
        )
        for row in rows:
            assert row["lost"] == 0 and row["verdict"] == "PASS", row


@needs_root
def test_unprivileged_refused_is_explained() -> None:
    with netns() as ns:
        subprocess.run(in_netns(ns, "sysctl", "-qw", "net.ipv4.ping_group_range=1 0"), check=True)
        out = subprocess.run(
            in_netns(
                ns, *EDGEPROBE, "probe", "-c", "1", "--icmp-mode", "unprivileged", "127.0.0.1"
            ),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert out.returncode == 3
        assert "FAIL (socket_unavailable)" in out.stdout
        assert "ping_group_range is 1 0" in out.stderr


def _tx_stamp_msg(key: int, t_ns: int) -> list[tuple[int, int, bytes]]:
    """What the error queue holds for one transmit stamp: the extended error naming the
    send's key, and the three timestamps (software first)."""
    ee = struct.pack("=IBBBBII", errno.ENOMSG, 4, 0, 0, 0, 0, key)
    ts = struct.pack("=qq", *divmod(t_ns, 10**9)) + bytes(32)
    return [(socket.IPPROTO_IP, errqueue.IP_RECVERR, ee), (socket.SOL_SOCKET, 37, ts)]


@needs_root
async def test_a_missing_or_implausible_transmit_stamp_falls_back_per_packet() -> None:
    """Three requests sent at T (pre-send stamp), answered at T + 2 ms (kernel arrival): the
    first's transmit stamp (T + 40 us) counts; the second's lies before its send call (a key
    count gone wrong) and the third's never came: both are timed from T, counted as
    fallbacks, and no reply is lost. A stamp naming no send in flight changes nothing."""
    from probes.net.icmp import Train, _Slot

    eng, stats = _engine_for_unit()
    try:
        payload = eng._payload(56)[0]
        done: list[object] = []
        r = Train(3, int(1e9), done.append, payload, eng)
        t_real = 1_700_000_000 * 10**9
        for idx in range(3):
            slot = eng._pending[7 + idx] = _Slot(r, idx, "127.0.0.9", 0, t_real)
            slot.key = idx
            eng._by_key[idx] = slot
        eng._tx_stamp(_tx_stamp_msg(0, t_real + 40_000))
        eng._tx_stamp(_tx_stamp_msg(5, t_real + 1_000))
        eng._tx_stamp(_tx_stamp_msg(1, t_real - 1_000))
        arrival = struct.pack("=qq", *divmod(t_real + 2_000_000, 10**9))
        anc = [(socket.SOL_SOCKET, 35, arrival)]
        for seq in (7, 8, 9):
            eng._handle(_reply(eng.ident, seq, payload), anc, "127.0.0.9", 3_000_000)
        assert done == [r]
        assert r.rtts == [pytest.approx(0.00196), pytest.approx(0.002), pytest.approx(0.002)]
        assert (eng.stats.tx_stamps, eng.stats.tx_fallbacks) == (2, 2)
        assert eng._by_key == {} and stats.stray_counts == {}
    finally:
        eng.close()


def drop_echoes_to(ns: str, address: str) -> None:
    """Every echo request to ``address`` inside namespace ``ns`` is dropped."""
    rule = f"-A INPUT -p icmp --icmp-type echo-request -d {address} -j DROP"
    subprocess.run(in_netns(ns, "iptables", *rule.split()), check=True)


@needs_root
def test_loss_and_unreachable_in_a_namespace() -> None:
    with netns() as ns:
        drop_echoes_to(ns, "127.0.0.9")  # pure loss
        rows = _probe_json(
            ns,
            "-c",
            "4",
            "--spacing",
            "10ms",
            "--timeout",
            "200ms",
            "127.0.0.9",
            "198.18.0.1",
            "127.0.0.1",
        )
        by_host = {r["host"]: r for r in rows}
        assert by_host["127.0.0.9"]["lost"] == 4
        assert by_host["127.0.0.9"]["reason"] == "timeout"
        # No route at all in the namespace: refused locally, nothing is sent anywhere.
        assert by_host["198.18.0.1"]["reason"] == "unreachable"
        assert by_host["127.0.0.1"]["lost"] == 0


@needs_root
async def test_a_reply_queued_when_its_deadline_fires_is_not_a_loss() -> None:
    """When the loop is busy, a train's deadline timer can run before the socket's readable
    callback, with the reply already waiting in the kernel. The deadline handler reads the
    queue first and judges the reply by its kernel timestamp. Simulated exactly: the engine's
    reader is detached, so the reply is still queued when the 50 ms deadline fires."""
    from probes.icmp import start

    engines = IcmpEngines(mode="privileged")
    try:
        eng = engines.get(socket.AF_INET)
        assert eng is not None
        loop = asyncio.get_running_loop()
        eng.attach(loop)
        loop.remove_reader(eng.sock.fileno())
        ctx = ProbeContext.with_resources(engines)

        async def ping_read_late(timeout: float) -> ProbeResult | None:
            done: asyncio.Future[ProbeResult | None] = loop.create_future()
            h = start(
                Target("lo", "127.0.0.1"),
                IcmpOptions(packets=1, timeout=timeout),
                ctx,
                done.set_result,
            )
            assert h is not None
            return await asyncio.wait_for(done, 2.0)

        # The kernel stamps arriving packets only once the host's timestamping switch (a
        # static key, flipped by deferred work when the first socket asks) is on; until then a
        # packet is stamped when it is read, here at the deadline. That is the host warming
        # up, not what this test is about: wait (bounded) until a reply read 50 ms late
        # carries its arrival stamp.
        for _ in range(40):
            warm = await ping_read_late(0.2)
            if warm is not None and warm.success and (warm.rtts[0] or 1.0) < 0.02:
                break
            await asyncio.sleep(0.05)
        res = await ping_read_late(0.05)
    finally:
        engines.close()
    assert res is not None and res.success and res.rtts[0] is not None, res
    assert res.rtts[0] < 0.05


@needs_root
async def test_an_engine_closed_under_a_run_abandons_it_without_ending_the_loop() -> None:
    """A reload that changes icmp_mode closes the engines under in-flight runs: the awaiting
    probe gets RunAbandoned (the scheduler records nothing), never a CancelledError that
    would end the scheduler's task for that target."""
    from probes.base import RunAbandoned

    engines = IcmpEngines(mode="privileged")
    ctx = ProbeContext.with_resources(engines)
    # A train of five over 0.8 s: the engine closes after the first packet.
    t = asyncio.ensure_future(
        run(Target("lo", "127.0.0.1"), IcmpOptions(packets=5, spacing=0.2, timeout=1.0), ctx)
    )
    await asyncio.sleep(0.05)
    engines.close()
    with pytest.raises(RunAbandoned):
        await t
    assert not t.cancelled()


LATE_SEND = r"""
import asyncio, json, time, uvloop
from probes.base import ProbeContext, Target
from probes.icmp import IcmpOptions, start
from probes.net.icmp import IcmpEngines
async def main():
    engines = IcmpEngines(mode="privileged")
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    out = {}
    out["start"] = time.monotonic()
    start(Target("e", "127.0.0.9"), IcmpOptions(packets=2, spacing=0.01, timeout=0.3),
          ProbeContext.with_resources(engines), done.set_result)
    # The loop is busy for 150 ms right after the first packet: the second leaves ~140 ms
    # late, at ~0.15 s instead of 0.01 s.
    loop.call_soon(time.sleep, 0.15)
    res = await done
    out["ended_after"] = time.monotonic() - out["start"]
    out["reason"] = res.reason
    engines.close()
    print(json.dumps(out))
uvloop.run(main())
"""


@needs_root
def test_a_train_sent_late_times_out_from_when_it_really_left() -> None:
    """A packet the busy loop sent late gets its whole timeout from its real send time; timed
    from the plan, the train would end at 0.31 s, and a reply to the late packet arriving
    200 ms after it left would count as a loss."""
    with netns() as ns:
        drop_echoes_to(ns, "127.0.0.9")
        p = subprocess.run(
            in_netns(ns, sys.executable, "-c", LATE_SEND),
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["reason"] == "timeout", out
    assert out["ended_after"] >= 0.15 + 0.3 - 0.002, out


TX_STAMPS = r"""
import asyncio, json, socket, sys
from probes.net.icmp import IcmpEngine
async def main():
    targets = json.loads(sys.argv[1])
    size = int(sys.argv[2])
    out = []
    for mode in ("privileged", "unprivileged"):
        for fam, dst, refused in targets:
            eng = IcmpEngine(fam, mode)
            try:
                errors = []
                if refused:
                    errors = (await eng.ping(refused, count=2, spacing=0.001, timeout=0.2)).errors
                res = await eng.ping(dst, count=5, spacing=0.001, timeout=2.0, payload_size=size)
                out.append({"mode": mode, "dst": dst, "rtts": res.rtts, "refused": errors,
                            "stamps": eng.stats.tx_stamps, "fallbacks": eng.stats.tx_fallbacks})
            finally:
                eng.close()
    print(json.dumps(out))
asyncio.run(main())
"""


def _in_ns(ns: str, script: str, *args: str) -> Any:
    """Run ``script`` in ``ns`` from the checkout, with unprivileged ICMP allowed there (both
    modes are exercised); its JSON output."""
    subprocess.run(
        in_netns(ns, "sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"), check=True
    )
    p = subprocess.run(
        in_netns(ns, sys.executable, "-c", script, *args),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _tx_stamps(
    ns: str, targets: list[tuple[int, str, str]], size: int = 56
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = _in_ns(ns, TX_STAMPS, json.dumps(targets), str(size))
    return rows


@needs_root
def test_rtt_runs_from_the_kernels_transmit_stamp_not_the_send_call() -> None:
    """A request held in the sender's own queue is not on the network yet. The agent's
    namespace shapes its veth to 1 Mbit/s (tbf, burst 1600 bytes), so five 1,400-byte echoes
    sent 1 ms apart leave about 11.5 ms after each other: the fifth waits ~45 ms between the
    send call and the device. Timed from the send call (as before), the RTTs grow to ~45 ms;
    from the kernel's transmit stamp they are the veth round trip, well under 5 ms. Both
    modes, both families; the stamps come after the send call returned (read on wake-up)."""
    with netns() as ns, netns("eppeer") as peer:
        ip = ["ip", "-n", ns]
        subprocess.run(
            [*ip, "link", "add", "a0", "type", "veth", "peer", "b0", "netns", peer], check=True
        )
        for n, dev, v4, v6 in (
            (ns, "a0", "198.18.0.1", "2001:db8:e::1"),
            (peer, "b0", "198.18.0.2", "2001:db8:e::2"),
        ):
            subprocess.run(["ip", "-n", n, "addr", "add", f"{v4}/30", "dev", dev], check=True)
            subprocess.run(
                ["ip", "-n", n, "addr", "add", f"{v6}/64", "dev", dev, "nodad"], check=True
            )
            subprocess.run(["ip", "-n", n, "link", "set", dev, "up"], check=True)
        shape = "qdisc add dev a0 root tbf rate 1mbit burst 1600 limit 100000"
        subprocess.run(["tc", "-n", ns, *shape.split()], check=True)
        rows = _tx_stamps(
            ns,
            [(socket.AF_INET, "198.18.0.2", ""), (socket.AF_INET6, "2001:db8:e::2", "")],
            size=1400,
        )
    assert len(rows) == 4
    for row in rows:
        rtts = row["rtts"]
        assert all(r is not None for r in rtts), row
        assert max(rtts) < 0.005, row
        assert row["stamps"] == 5 and row["fallbacks"] == 0, row


@needs_root
def test_a_send_refused_after_the_kernel_counted_it_does_not_shift_the_stamps() -> None:
    """The kernel keys transmit stamps by its count of sends. A send that netfilter drops
    (EPERM) was counted but never stamped; the engine restarts the count, so the stamps of the
    sends after it still find their requests (none falls back to the pre-send time)."""
    with netns() as ns:
        subprocess.run(
            in_netns(ns, "iptables", "-A", "OUTPUT", "-d", "127.0.0.7", "-j", "DROP"), check=True
        )
        rows = _tx_stamps(ns, [(socket.AF_INET, "127.0.0.1", "127.0.0.7")])
    assert len(rows) == 2
    for row in rows:
        assert row["refused"] == ["send_error", "send_error"], row
        assert all(r is not None for r in row["rtts"]), row
        assert row["stamps"] == 5 and row["fallbacks"] == 0, row


ERRORS_AND_ANSWERS = r"""
import asyncio, json
from probes.net.icmp import IcmpEngine
async def main():
    out = {}
    for mode in ("privileged", "unprivileged"):
        eng = IcmpEngine(2, mode)
        try:
            bad, good = await asyncio.gather(
                eng.ping("198.18.9.9", count=100, spacing=0.005, timeout=0.5),
                eng.ping("198.18.0.2", count=100, spacing=0.005, timeout=0.5),
            )
            out[mode] = {"bad": bad.errors, "good": good.errors, "good_rtts": good.rtts}
        finally:
            eng.close()
    print(json.dumps(out))
asyncio.run(main())
"""


@needs_root
def test_an_icmp_error_about_one_target_is_not_another_targets_loss() -> None:
    """With IP_RECVERR the kernel keeps an ICMP error about a request also as the socket's
    pending error, which the next send on the shared socket returns instead of sending, whatever
    that send's target. A router rejects every echo to one destination while another target
    answers on the same engine: the answering target loses nothing (before: 50 of its 100
    packets were marked unreachable and never sent, in the unprivileged mode) and the rejected
    one's packets are all unreachable or timed out, never answered."""
    with netns() as ns, netns("eprouter") as router:
        subprocess.run(
            ["ip", "-n", ns, "link", "add", "a0", "type", "veth", "peer", "b0", "netns", router],
            check=True,
        )
        for n, dev, v4 in ((ns, "a0", "198.18.0.1"), (router, "b0", "198.18.0.2")):
            subprocess.run(["ip", "-n", n, "addr", "add", f"{v4}/30", "dev", dev], check=True)
            subprocess.run(["ip", "-n", n, "link", "set", dev, "up"], check=True)
        # The router has a route onward (a veth pair of its own), so the echo reaches its FORWARD
        # chain, which rejects it: one ICMP error per request, not rate-limited like a
        # routing failure's.
        onward = (
            "link add c0 type veth peer c1",
            "link set c0 up",
            "route add 198.18.9.0/24 dev c0",
        )
        for cmd in onward:
            subprocess.run(["ip", "-n", router, *cmd.split()], check=True)
        subprocess.run(["ip", "-n", ns, "route", "add", "198.18.9.0/24", "via", "198.18.0.2"])
        sysctls = ("net.ipv4.ip_forward=1", "net.ipv4.icmp_ratemask=0")
        subprocess.run(in_netns(router, "sysctl", "-qw", *sysctls), check=True)
        reject = ("-d", "198.18.9.9", "-j", "REJECT", "--reject-with", "icmp-host-unreachable")
        subprocess.run(in_netns(router, "iptables", "-A", "FORWARD", *reject), check=True)
        out = _in_ns(ns, ERRORS_AND_ANSWERS)
    for mode, row in out.items():
        assert all(e is None for e in row["good"]), (mode, row["good"])
        assert all(r is not None for r in row["good_rtts"]), mode
        assert row["bad"].count("unreachable") >= 50, (mode, row["bad"])
        assert set(row["bad"]) <= {"unreachable", "timeout"}, (mode, row["bad"])
