"""Path probe (MTR-style): per-hop RTT and loss with UDP datagrams of rising TTL.

Each probe is one UDP datagram from its own socket with ``IP_RECVERR``/``IPV6_RECVERR`` set:
the kernel queues the ICMP Time Exceeded (from a router) or Port Unreachable (from the
destination) on that socket's error queue together with the offender's address, so no raw
socket, no capability and no parsing of quoted headers is needed, and a reply can only belong to
the socket's own probe. ``packets`` rounds are sent, each round TTL 1..``max_hops``, ``spacing``
apart; hops after the first one where the destination answered are dropped.

Bounded by design: at most ``max_hops`` series per target, labelled by hop index, never by
address. The ordered hop addresses are hashed into ``path_route_hash`` (an integer below 2**48,
exact as a float), so a route change is a metric change, and ``path_hops`` is the hop count.
The scheduler runs this kind on a slow interval, and once more when another series of the same
edge starts failing (``run_on_target_failure``), so the hops are seen while it is bad.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from probes.base import HopResult, ProbeContext, ProbeKind, ProbeResult, Target
from probes.net import errqueue
from probes.net.resolve import Resolver
from probes.net.sockets import (
    NET_REASONS,
    Endpoint,
    ProbeFailed,
    SocketOptions,
    make_socket,
    resolve,
)
from probes.net.train import wait_answered

_IP_RECVTTL, _IP_TTL = 12, 2  # <linux/in.h>; Python does not export IP_RECVTTL
_IPV6_RECVHOPLIMIT = getattr(socket, "IPV6_RECVHOPLIMIT", 51)
_IPV6_HOPLIMIT = getattr(socket, "IPV6_HOPLIMIT", 52)
MAX_HOPS_LIMIT = 32


@dataclass(frozen=True)
class PathOptions(SocketOptions):
    interval: float = 60.0
    timeout: float = 2.0
    packets: int = 3  # rounds: probes per hop
    spacing: float = 0.01  # between probes (all hops of all rounds)
    max_hops: int = 16
    port: int = 33434  # first destination port (traceroute's), +1 per probe
    method: Literal["udp"] = "udp"

    def run_time(self) -> float:
        return self.packets * self.max_hops * self.spacing + self.timeout

    port_options = ()  # a range from ``port`` up, checked in ``check``

    def check(self) -> list[str]:
        errs: list[str] = []
        if not 1 <= self.max_hops <= MAX_HOPS_LIMIT:
            errs.append(f"max_hops: must be between 1 and {MAX_HOPS_LIMIT}")
        if self.packets > 10:
            errs.append("packets: must be <= 10 for the path probe")
        if not 1 <= self.port <= 65535 - MAX_HOPS_LIMIT * 10:
            errs.append("port: out of range")
        return errs


@dataclass
class _Probe:
    ttl: int
    sock: socket.socket
    sent_ns: int = 0
    rtt: float | None = None
    address: str = ""
    reached: bool = False
    reply_ttl: int = 0  # TTL / hop limit the ICMP answer arrived with


def _read_errqueue(p: _Probe) -> bool:
    """Drain the probe's error queue; True once its ICMP answer was recorded."""
    got = False
    for _ in range(8):
        try:
            _, anc, _, _ = p.sock.recvmsg(512, 1024, errqueue.MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            return got
        except OSError:
            return got
        now = time.perf_counter_ns()
        for level, ctype, data in anc:
            if (level, ctype) in (
                (socket.IPPROTO_IP, _IP_TTL),
                (socket.IPPROTO_IPV6, _IPV6_HOPLIMIT),
            ) and len(data) >= 4:
                p.reply_ttl = int.from_bytes(data[:4], sys.byteorder)
                continue
            err = errqueue.parse(level, ctype, data)
            if err is None or p.rtt is not None:
                continue
            p.rtt = (now - p.sent_ns) / 1e9
            p.address = err.offender
            p.reached = not err.time_exceeded and err.errno in (
                errno.ECONNREFUSED,
                errno.EHOSTUNREACH,
                errno.ENETUNREACH,
                errno.EACCES,
                errno.EPERM,
            )
            got = True
    return got


def _distance(reply_ttl: int) -> int:
    initial = next(i for i in (64, 128, 255) if reply_ttl <= i)
    return initial - reply_ttl + 1


def route_hash(addresses: list[str]) -> int:
    """A float-exact (< 2**48) hash of the ordered addresses of the hops that answered.

    Silent hops ('') are left out: a hop that happens to lose all its probes in one run (or
    never answers, like many routers) must not look like a route change.
    """
    digest = hashlib.sha256("|".join(a for a in addresses if a).encode()).digest()
    return int.from_bytes(digest[:6], "big")


async def trace(
    ep: Endpoint, opts: PathOptions, ctx: ProbeContext
) -> tuple[list[HopResult], int, bool]:
    """(hops 1..n, hop count, destination reached)."""
    loop = asyncio.get_running_loop()
    v6 = ep.family == socket.AF_INET6
    probes: list[_Probe] = []
    done = asyncio.Event()
    try:
        start = time.perf_counter_ns()
        k = 0
        for _ in range(opts.packets):
            for ttl in range(1, opts.max_hops + 1):
                due = start + int(k * opts.spacing * 1e9)
                delay = (due - time.perf_counter_ns()) / 1e9
                if delay > 0:
                    await asyncio.sleep(delay)
                sock = make_socket(ep, socket.SOCK_DGRAM, opts)
                p = _Probe(ttl, sock)
                probes.append(p)
                # RECVTTL/RECVHOPLIMIT: the answer's remaining TTL tells the destination's
                # distance even when the probes with exactly that TTL were all lost.
                errqueue.enable(sock, v6)
                if v6:
                    sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVHOPLIMIT, 1)
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
                else:
                    sock.setsockopt(socket.IPPROTO_IP, _IP_RECVTTL, 1)
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)

                def on_ready(p: _Probe = p) -> None:
                    if _read_errqueue(p) or p.rtt is not None:
                        loop.remove_reader(p.sock.fileno())
                        done.set()
                    else:
                        # A datagram (a UDP service answered): the destination is reached.
                        try:
                            p.sock.recv(2048)
                            p.rtt = (time.perf_counter_ns() - p.sent_ns) / 1e9
                            p.address, p.reached = ep.address, True
                        except OSError:
                            pass
                        loop.remove_reader(p.sock.fileno())

                loop.add_reader(sock.fileno(), on_ready)
                p.sent_ns = time.perf_counter_ns()
                # A local send error (no route) gets no answer: a loss at this hop.
                with contextlib.suppress(OSError):
                    sock.sendto(
                        b"edgeprobe-path" + bytes(18),
                        ep.sockaddr(opts.port + k % (MAX_HOPS_LIMIT * 10)),
                    )
                k += 1
        await wait_answered(
            done,
            lambda: all(p.rtt is not None for p in probes),
            max(p.sent_ns for p in probes) + int(opts.timeout * 1e9),
        )
    finally:
        for p in probes:
            loop.remove_reader(p.sock.fileno())
            p.sock.close()
    reached_ttls = [p.ttl for p in probes if p.reached]
    hop_count = (
        min(reached_ttls)
        if reached_ttls
        else max((p.ttl for p in probes if p.rtt is not None), default=0)
    )
    if reached_ttls:
        # The lowest TTL that reached the edge is only an upper bound when probes are lost;
        # the answer's TTL (initial 64/128/255 minus the return path) gives the distance.
        # Never below a hop that answered Time Exceeded.
        routers = max((p.ttl for p in probes if p.rtt is not None and not p.reached), default=0)
        est = [_distance(p.reply_ttl) for p in probes if p.reached and p.reply_ttl]
        if est:
            hop_count = min(hop_count, max(min(est), routers + 1))
    last = hop_count if reached_ttls else opts.max_hops
    hops: list[HopResult] = []
    for ttl in range(1, last + 1):
        mine = [p for p in probes if p.ttl == ttl]
        seen = Counter(p.address for p in mine if p.address)
        hops.append(
            HopResult(ttl, [p.rtt for p in mine], seen.most_common(1)[0][0] if seen else "")
        )
    return hops, hop_count, bool(reached_ttls)


async def run(target: Target, opts: PathOptions, ctx: ProbeContext) -> ProbeResult:
    t0 = time.perf_counter_ns()
    try:
        ep = await resolve(target.address, opts, ctx)
        hops, count, reached = await trace(ep, opts, ctx)
    except ProbeFailed as e:
        return ProbeResult.failure(e.reason, (time.perf_counter_ns() - t0) / 1e9)
    return ProbeResult(
        success=reached,
        reason="ok" if reached else "path_incomplete",
        duration=(time.perf_counter_ns() - t0) / 1e9,
        hops=hops,
        gauges={
            "path_hops": float(count),
            "path_route_hash": float(route_hash([h.address for h in hops])),
        },
    )


REASONS: tuple[str, ...] = ("path_incomplete", *NET_REASONS)

KIND = ProbeKind(
    name="path",
    options=PathOptions,
    run=run,
    reasons=REASONS,
    per_hop=True,
    needs=(Resolver,),
    run_on_target_failure=True,
    gauges={
        "path_hops": "Hops to the edge in the last path run (TTL that reached it).",
        "path_route_hash": "Hash of the ordered hop addresses; a change is a route change.",
    },
)
