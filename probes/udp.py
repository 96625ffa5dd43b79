"""UDP echo probe: a paced train of sequence-numbered datagrams to an echo service.

Each datagram carries a per-run random nonce and its sequence number, so a reply is matched to
exactly one packet; duplicates, late and foreign replies are counted as strays, never as
answers, and replies that come back out of order are counted as ``reordered``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from probes.base import ProbeContext, ProbeKind, ProbeResult, Target
from probes.net.resolve import Resolver
from probes.net.sockets import NET_REASONS, ProbeFailed, SocketOptions, connected_udp, resolve
from probes.net.train import Stamp, check_max_inflight, run_train

_MAGIC = b"EPRB"


@dataclass(frozen=True)
class UdpOptions(SocketOptions):
    interval: float = 5.0
    port: int = 7
    packets: int = 10
    max_inflight: int = 10

    def check(self) -> list[str]:
        return Stamp.check_size(self.payload_size) + check_max_inflight(self.max_inflight)


async def run(target: Target, opts: UdpOptions, ctx: ProbeContext) -> ProbeResult:
    t0 = time.perf_counter_ns()
    stamp = Stamp(_MAGIC)
    packets = stamp.payloads(opts.packets, opts.payload_size)

    def match(data: bytes) -> int | str:
        seq = stamp.match(data)
        if isinstance(seq, int) and (seq >= len(packets) or data != packets[seq]):
            return "corrupt"
        return seq

    try:
        ep = await resolve(target.address, opts, ctx)
        sock = connected_udp(ep, opts.port, opts, "udp_unreachable")
    except ProbeFailed as e:
        return ProbeResult.failure(e.reason, (time.perf_counter_ns() - t0) / 1e9)
    try:
        res = await run_train(
            sock, packets, opts.spacing, opts.timeout, match, "udp", ctx, opts.max_inflight
        )
    finally:
        sock.close()
    return res.probe_result((time.perf_counter_ns() - t0) / 1e9, "udp")


REASONS: tuple[str, ...] = (
    "udp_timeout",
    "udp_refused",
    "udp_unreachable",
    "reordered",
    "duplicate",
    *NET_REASONS,
)

KIND = ProbeKind(
    name="udp",
    options=UdpOptions,
    run=run,
    packet_based=True,
    reasons=REASONS,
    stray_reasons=("malformed", "foreign", "corrupt", "duplicate", "late", "unknown"),
    needs=(Resolver,),
)
