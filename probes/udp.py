"""UDP echo probe: a paced train of sequence-numbered datagrams to an echo service.

Each datagram carries a per-run random nonce and its sequence number, so a reply is matched to
exactly one packet; duplicates, late and foreign replies are counted as strays, never as
answers, and replies that come back out of order are counted as ``reordered``.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass

from probes.base import CommonOptions, ProbeContext, ProbeKind, ProbeResult, Target
from probes.net.resolve import Resolver
from probes.net.sockets import (
    RESOLVE_REASONS,
    SOCKET_REASONS,
    ProbeFailed,
    check_ports,
    check_source,
    make_socket,
    resolve,
)
from probes.net.train import run_train

_MAGIC = b"EPRB"
_HEADER = struct.Struct("!4s8sI")  # magic, run nonce, sequence number
MIN_PAYLOAD = _HEADER.size


@dataclass(frozen=True)
class UdpOptions(CommonOptions):
    interval: float = 5.0
    port: int = 7
    packets: int = 10
    max_inflight: int = 10

    def validate(self) -> list[str]:
        errs = super().validate()
        errs += check_ports(self, "port")
        if self.payload_size < MIN_PAYLOAD:
            errs.append(f"payload_size: must be >= {MIN_PAYLOAD} (magic, nonce, sequence)")
        if not 1 <= self.max_inflight <= 1000:
            errs.append("max_inflight: must be between 1 and 1000")
        return errs + check_source(self)


async def run(target: Target, opts: UdpOptions, ctx: ProbeContext) -> ProbeResult:
    t0 = time.perf_counter_ns()
    nonce = os.urandom(8)
    pad = b"\0" * max(opts.payload_size - MIN_PAYLOAD, 0)
    packets = [_HEADER.pack(_MAGIC, nonce, i) + pad for i in range(opts.packets)]

    def match(data: bytes) -> int | str:
        if len(data) < MIN_PAYLOAD:
            return "malformed"
        magic, n, seq = _HEADER.unpack_from(data)
        if magic != _MAGIC or n != nonce:
            return "foreign"
        if seq >= len(packets) or data != packets[seq]:
            return "corrupt"
        return int(seq)

    try:
        ep = await resolve(target.address, opts, ctx)
        sock = make_socket(ep, socket.SOCK_DGRAM, opts)
    except ProbeFailed as e:
        return ProbeResult.failure(e.reason, (time.perf_counter_ns() - t0) / 1e9)
    try:
        try:
            sock.connect(ep.sockaddr(opts.port))
        except OSError:
            return ProbeResult.failure("udp_unreachable", (time.perf_counter_ns() - t0) / 1e9)
        res = await run_train(
            sock, packets, opts.spacing, opts.timeout, match, "udp", ctx, opts.max_inflight
        )
    finally:
        sock.close()
    errors = {
        k: v
        for k, v in (
            ("udp_refused", res.refused),
            ("reordered", res.reordered),
            ("duplicate", res.duplicates),
        )
        if v
    }
    answered = sum(r is not None for r in res.rtts)
    reason = "ok" if answered else ("udp_refused" if res.refused else "udp_timeout")
    return ProbeResult(
        success=answered > 0,
        reason=reason,
        duration=(time.perf_counter_ns() - t0) / 1e9,
        rtts=res.rtts,
        packet_ids=list(range(opts.packets)),
        errors=errors,
    )


REASONS: tuple[str, ...] = (
    "udp_timeout",
    "udp_refused",
    "udp_unreachable",
    "reordered",
    "duplicate",
    *RESOLVE_REASONS,
    *SOCKET_REASONS,
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
