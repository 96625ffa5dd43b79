"""The lab itself, as root: topology, isolation, hops, runtime and scheduled changes, teardown.

Traffic is generated with iputils `ping` inside the lab's own namespaces only.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from lab import World
from lab import groundtruth as gt
from lab.spec import decode_profile, load_profile
from lab.topology import leftovers
from tests.lab_helpers import requires_lab

pytestmark = [pytest.mark.lab, requires_lab]
LAB_PROFILES = ["id-jakarta", "ae-dubai"]


def _rtts(out: str) -> list[float]:
    return [float(x) / 1e3 for x in re.findall(r"time=([0-9.]+) ms", out)]


def test_edges_answer_on_both_families(lab_world: World) -> None:
    w = lab_world
    for addr in ("198.18.2.1", "2001:db8:e:2::1"):
        r = w.run("id-jakarta", ["ping", "-n", "-q", "-c", "20", "-i", "0.02", "-W", "1", addr])
        assert " 0% packet loss" in r.stdout, r.stdout + r.stderr
    # sin-1 from Jakarta is 9 ms each way; from Dubai 44 ms each way (paths are per pair).
    r1 = w.run("id-jakarta", ["ping", "-n", "-c", "5", "-i", "0.05", "198.18.2.1"])
    r2 = w.run("ae-dubai", ["ping", "-n", "-c", "5", "-i", "0.05", "198.18.2.1"])
    assert 0.016 < sorted(_rtts(r1.stdout))[2] < 0.022
    assert 0.084 < sorted(_rtts(r2.stdout))[2] < 0.100


def test_isolation(lab_world: World) -> None:
    """Nothing routes to a real address: the region has only the lab ranges, the root
    namespace only the management /30s of this world."""
    w = lab_world
    routes = w.run("id-jakarta", ["ip", "-o", "route", "show"]).stdout
    routes += w.run("id-jakarta", ["ip", "-o", "-6", "route", "show"]).stdout
    assert "default" not in routes
    for line in routes.splitlines():
        dst = line.split()[0]
        assert dst.startswith(("198.18.", "198.19.", "2001:db8:", "fe80:")), line
    rid = w.state.run_id
    root = subprocess.run(["ip", "-o", "route", "show"], capture_output=True, text=True).stdout
    ours = [line for line in root.splitlines() if f"ep{rid}" in line]
    assert ours and all(
        line.startswith("198.19.192.") or line.startswith("198.19.19") for line in ours
    ), ours
    assert not any(line.startswith("198.18.") for line in root.splitlines())
    # A real-looking address is unreachable from a region (no packet leaves).
    r = w.run("id-jakarta", ["ping", "-n", "-c", "1", "-W", "1", "192.0.2.1"])
    assert r.returncode != 0 and "Network is unreachable" in r.stderr + r.stdout


def test_traceroute_sees_every_hop(lab_world: World) -> None:
    w = lab_world
    hops = w.state.regions["id-jakarta"].hops["fra-1"]
    assert len(hops) == 8
    for ttl, hop in enumerate(hops, start=1):
        r = w.run(
            "id-jakarta",
            ["ping", "-n", "-c", "3", "-i", "0.05", "-W", "1", "-t", str(ttl), "198.18.4.1"],
        )
        if ttl < 5:  # before the bad hop (2 % loss) a Time Exceeded always comes back
            assert f"From {hop['addr4']} icmp_seq=1 Time to live exceeded" in r.stdout, r.stdout
    r = w.run("id-jakarta", ["ping", "-n", "-c", "1", "-W", "2", "-t", "9", "198.18.4.1"])
    assert "bytes from 198.18.4.1" in r.stdout or "100% packet loss" in r.stdout
    expired = [x for x in w.records() if x.status == gt.EXPIRED and x.dst_ip == "198.18.4.1"]
    assert {x.hop for x in expired} >= {1, 2, 3, 4}


def test_runtime_change(lab_world: World) -> None:
    w = lab_world
    w.set_path("ae-dubai", "dxb-1", delay="40ms")
    try:
        r = w.run("ae-dubai", ["ping", "-n", "-c", "5", "-i", "0.05", "198.18.8.1"])
        assert 0.079 < sorted(_rtts(r.stdout))[2] < 0.090, r.stdout
    finally:
        w.set_path("ae-dubai", "dxb-1", delay="1ms")
    r = w.run("ae-dubai", ["ping", "-n", "-c", "5", "-i", "0.05", "198.18.8.1"])
    assert sorted(_rtts(r.stdout))[2] < 0.005


def test_scheduled_change_and_teardown_after_failure() -> None:
    """A profile change at t=2.5 s shows up in the ground truth and in ping within two probe
    intervals; and a failing test body still leaves no namespace, link or process behind."""
    base = load_profile("ae-dubai")
    prof = decode_profile(
        {
            "region": "xx-sched",
            "source": "test",
            "edges": [
                {
                    "name": "dxb-1",
                    "ipv4": "198.18.8.1",
                    "ipv6": "2001:db8:e:8::1",
                    "path": {"delay": "2ms"},
                }
            ],
            "schedule": [{"at": "2.5s", "edge": "dxb-1", "set": {"delay": "20ms"}}],
        }
    )
    assert base.region == "ae-dubai"
    rid = ""
    with (
        pytest.raises(RuntimeError, match="deliberate"),
        World.up(profiles=[prof], services=False) as w,
    ):
        rid = w.state.run_id
        t0 = w.meta().t0_ns
        interval = 0.1
        r = w.run("xx-sched", ["ping", "-n", "-c", "40", "-i", str(interval), "198.18.8.1"])
        ex = [e for e in gt.echo_exchanges(w.records()) if e.rtt_ns is not None]
        change = t0 + 2_500_000_000
        after = [e for e in ex if e.request.arrival_ns >= change + 2 * interval * 1e9]
        before = [e for e in ex if e.request.arrival_ns < change]
        assert before and after
        # 4 ms before, 44 ms after; the thresholds leave room for a loaded machine.
        assert all(e.rtt_ns is not None and e.rtt_ns < 10e6 for e in before)
        assert all(e.rtt_ns is not None and e.rtt_ns > 39e6 for e in after)
        rtts = _rtts(r.stdout)
        assert min(rtts) < 0.010 and max(rtts) > 0.039
        raise RuntimeError("deliberate failure inside the world")
    assert rid and leftovers(rid) == []


def test_forwarder_precision_and_rate(lab_world: World) -> None:
    """The forwarder's release lateness at a rate the tests use (1000 datagrams/s, each
    answered by an ICMP error: 2000 packets/s). Aim: p99 < 0.2 ms. Measured here in SCHED_FIFO
    under a load average of ~3 from other suites: p99 40-80 µs. The assertion keeps 2.5x
    margin for CI machines; without a real-time class (a container without CAP_SYS_NICE)
    the VM's scheduling noise allows only a loose bound."""
    from lab.selftest import measure

    res = measure(lab_world, "ae-dubai", "198.18.8.1", pps=1000, seconds=1.5)
    print("forwarder self-measurement:", res.to_json())
    assert res.read >= 0.95 * 2 * res.sent  # every datagram and its ICMP error
    assert res.late_p50_us < 100
    assert res.late_p99_us < (500 if res.realtime else 5000)


def test_the_truth_counts_from_when_a_packet_entered_the_lab(lab_world: World) -> None:
    """Every packet's arrival is the kernel's stamp of its entry into a TUN device, not the
    forwarder's later read: so the ground truth (and each packet's delay) includes the wait in
    the TUN queue and the forwarder's wake-up (~50-100 µs a round trip, which was 3-6 % of a
    2 ms metro path). An exchange's true RTT runs from the request's arrival to the reply's
    release, so it includes the edge's turnaround too."""
    w = lab_world
    before = w.stats()["stats"]
    r = w.run("ae-dubai", ["ping", "-n", "-q", "-c", "20", "-i", "0.02", "-W", "1", "198.18.8.1"])
    assert " 0% packet loss" in r.stdout, r.stdout + r.stderr
    after = w.stats()["stats"]
    assert after["read"] - before["read"] >= 40
    assert after["unstamped"] == before["unstamped"]
    ridx = w.meta().regions.index("ae-dubai")
    ex = [
        e
        for e in gt.echo_exchanges(w.records(), region=ridx)
        if e.edge == "198.18.8.1" and e.rtt_ns is not None
    ]
    assert len(ex) >= 20
    for e in ex:
        assert e.reply is not None
        assert e.rtt_ns == e.reply.actual_ns - e.request.arrival_ns
        assert e.rtt_ns >= e.request.delay_ns + e.reply.delay_ns


def test_a_killed_owner_leaves_nothing_after_cleanup() -> None:
    """A test process killed with SIGKILL cannot tear down; the forwarder dies with it
    (PR_SET_PDEATHSIG) and the next cleanup removes the namespaces, links and processes."""
    import sys

    from lab.topology import cleanup_stale

    code = (
        "import os, signal, sys; from lab import World; "
        "w = World.up(profiles=['ae-dubai'], services=False); "
        "print(w.state.run_id, flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    rid = r.stdout.strip()
    assert len(rid) == 6, r.stderr
    assert any(x.startswith("netns") for x in leftovers(rid))
    assert rid in cleanup_stale()
    deadline = time.monotonic() + 5
    while leftovers(rid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(rid) == []


def test_prefix_paths_for_many_addresses() -> None:
    """A benchmark's thousands of edges: one path for a whole prefix, any address in it
    answers (local route in the edge namespace), and unknown lab addresses take the
    region's default (unimpaired) path."""
    prof = decode_profile(
        {
            "region": "xx-bulk",
            "source": "test",
            "edges": [
                {
                    "name": "bulk",
                    "ipv4": "198.18.128.1",
                    "ipv6": "2001:db8:e:80::1",
                    "prefixes": ["198.18.128.0/20", "2001:db8:e:80::/64"],
                    "path": {"delay": "15ms"},
                }
            ],
        }
    )
    with World.up(profiles=[prof], services=False) as w:
        for addr in ("198.18.131.77", "2001:db8:e:80::abcd"):
            r = w.run("xx-bulk", ["ping", "-n", "-c", "3", "-i", "0.05", addr])
            assert 0.029 < sorted(_rtts(r.stdout))[1] < 0.040, r.stdout
        r = w.run("xx-bulk", ["ping", "-n", "-c", "3", "-i", "0.05", "198.18.200.9"])
        assert sorted(_rtts(r.stdout))[1] < 0.010, r.stdout
