"""Connect probe: the steps an RTC client takes to reach an edge, timed against the budget.

Sequence (each step starts when the previous one ended, as in a real client):

1. ``dns``: resolve the edge's name (skipped for IP literals). With ``dns_server`` set, one
   query to that server; otherwise an uncached system lookup, so the cost is real every run.
2. ``tcp`` then ``tls``: connect and handshake to the signalling port.
3. ``stun``: the first ICE binding request over UDP (one packet, no retransmission).
4. ``turn`` (when ``turn: true``): an authenticated TURN Allocate (401/nonce round included).

``duration`` is the wall time from the start of step 1 to the end of the last step. A step that
fails or times out fails the whole connect with a bounded reason (``tcp_timeout``,
``stun_timeout``...), and ``duration`` is then ``float("inf")``: a connect that did not happen
is over any budget, and the collector observes it in the ``+Inf`` bucket only, so
``rate(edgeprobe_connect_duration_seconds_bucket{le="0.6"}) / rate(..._count)`` is exactly
the fraction of connects within the 600 ms budget.

Each phase timeout (``timeout``) defaults to 2 s so that a phase that lost its first packet and
recovered after a 1 s retransmit (TCP SYN, RFC 6298) is still measured, and reported over
budget, instead of being cut short.
"""

from __future__ import annotations

import math
import socket
import time
from dataclasses import dataclass
from typing import Literal

from probes import dns as dnsprobe
from probes.base import CommonOptions, ProbeContext, ProbeKind, ProbeResult, Target, secret_field
from probes.net.resolve import Resolver, literal
from probes.net.sockets import (
    RESOLVE_REASONS,
    SOCKET_REASONS,
    Endpoint,
    ProbeFailed,
    SocketOptions,
    check_secret,
    os_reasons,
    resolve,
)
from probes.stun import binding_train
from probes.tcp import connect as tcp_connect
from probes.tls import TLS_REASONS, handshake, make_context
from probes.turn import TURN_REASONS, open_allocation, read_password

PHASES: tuple[str, ...] = ("dns", "tcp", "tls", "stun", "turn")


@dataclass(frozen=True)
class ConnectOptions(SocketOptions):
    interval: float = 15.0
    timeout: float = 2.0  # per phase
    signalling_port: int = 443
    server_name: str = ""  # SNI / verified name; "" = the target's address
    ca_file: str = ""
    insecure_skip_verify: bool = False
    min_tls_version: Literal["TLS1.2", "TLS1.3"] = "TLS1.2"
    dns_server: str = ""  # IP literal; "" = system resolver (uncached)
    dns_port: int = 53
    stun_port: int = 3478
    turn: bool = False
    turn_port: int = 0  # 0 = stun_port
    username: str = ""
    password: str = secret_field()
    password_file: str = secret_field()

    port_options = ("signalling_port", "dns_port", "stun_port")  # turn_port may be 0

    def run_time(self) -> float:
        return self.timeout * (len(PHASES) if self.turn else len(PHASES) - 1)

    def check(self) -> list[str]:
        errs: list[str] = []
        if not 0 <= self.turn_port <= 65535:
            errs.append("turn_port: must be between 0 and 65535")
        if self.dns_server and literal(self.dns_server) is None:
            errs.append("dns_server: must be an IP address")
        if self.turn and not self.username:
            errs.append("username: required when turn is true")
        return errs + check_secret(self.password, self.password_file)


async def _dns_phase(target: Target, opts: ConnectOptions, ctx: ProbeContext) -> Endpoint:
    lit = literal(target.address)
    if lit is not None:
        return await resolve(target.address, opts, ctx)
    if not opts.dns_server:
        # Uncached on purpose: the shared resolver's cache would hide what a client pays.
        try:
            res = await Resolver(ttl=0.0, lookup_timeout=opts.timeout).resolve(
                target.address, opts.ip_family
            )
        except Exception as e:  # ResolveError carries the bounded reason
            raise ProbeFailed(getattr(e, "reason", "resolve_failed")) from None
        return Endpoint(res.family, res.address)
    server = await resolve(
        opts.dns_server, CommonOptions(source_address=opts.source_address, dscp=opts.dscp), ctx
    )
    rdtype = "AAAA" if opts.ip_family == "ipv6" else "A"
    ans = await dnsprobe.query(
        server, opts.dns_port, target.address, rdtype, opts, opts.timeout, ctx
    )
    if ans.rcode != "NOERROR":
        raise ProbeFailed("dns_rcode")
    if not ans.addresses:
        raise ProbeFailed("resolve_empty")
    addr = ans.addresses[0]
    return Endpoint(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)


async def run(target: Target, opts: ConnectOptions, ctx: ProbeContext) -> ProbeResult:
    t0 = time.perf_counter_ns()
    phases: dict[str, float] = {}

    def lap(name: str, since: int) -> int:
        now = time.perf_counter_ns()
        phases[name] = (now - since) / 1e9
        return now

    try:
        password = read_password(opts.password, opts.password_file) if opts.turn else ""
        sslctx = make_context(opts.ca_file, opts.insecure_skip_verify, opts.min_tls_version)
        t = time.perf_counter_ns()
        ep = await _dns_phase(target, opts, ctx)
        if literal(target.address) is None:
            t = lap("dns", t)
        sock, _ = await tcp_connect(ep, opts.signalling_port, opts, opts.timeout)
        t = lap("tcp", t)
        transport, _, info, _ = await handshake(
            sock, sslctx, opts.server_name or target.address.strip("[]"), opts.timeout
        )
        t = lap("tls", t)
        transport.abort()
        res, family = await binding_train(ep, opts.stun_port, opts, 1, 0.0, opts.timeout, ctx)
        if res.rtts[0] is None:
            raise ProbeFailed("stun_refused" if res.refused else "stun_timeout")
        t = lap("stun", t)
        info["mapped_family"] = family
        if opts.turn:
            turn_port = opts.turn_port or opts.stun_port
            a = await open_allocation(
                ep, turn_port, opts, opts.username, password, opts.timeout, ctx
            )
            await a.release()
            t = lap("turn", t)
    except ProbeFailed as e:
        # Phases that completed are still reported: they say where the time went.
        return ProbeResult.failure(
            e.reason, math.inf, phases=phases, gauges={"connect_over_budget": 1.0}
        )
    duration = (time.perf_counter_ns() - t0) / 1e9
    over = duration > ctx.budget
    return ProbeResult(
        success=True,
        duration=duration,
        phases=phases,
        info=info,
        gauges={"connect_over_budget": float(over)},
    )


REASONS: tuple[str, ...] = (
    *RESOLVE_REASONS,
    "dns_timeout",
    "dns_refused",
    "dns_unreachable",
    "dns_error",
    "dns_rcode",
    *os_reasons("tcp"),
    *TLS_REASONS,
    "stun_timeout",
    "stun_refused",
    "stun_unreachable",
    *TURN_REASONS,
    "tls_config",
    *SOCKET_REASONS,
)

KIND = ProbeKind(
    name="connect",
    options=ConnectOptions,
    run=run,
    phases=PHASES,
    reasons=REASONS,
    metric_prefix="connect",
    info_labels=("tls_version", "alpn", "mapped_family"),
    gauges={
        "connect_over_budget": "1 if the last successful connect took longer than the "
        "budget (failed connects count as over budget)."
    },
    needs=(Resolver,),
    failure_gauges=("connect_over_budget",),
)
