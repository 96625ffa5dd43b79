"""DNS probe: one query over UDP to a given server, timed from send to the matching answer.

The reply must match the query's ID, question and the server's address (the socket is
connected); anything else arriving meanwhile is counted as stray (``wrong_id``, ``malformed``)
and the wait goes on, so a spoofed or garbled packet can neither end nor crash a run.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from probes.base import CommonOptions, ProbeContext, ProbeKind, ProbeResult, Target
from probes.net.resolve import Resolver
from probes.net.sockets import (
    NET_REASONS,
    Endpoint,
    ProbeFailed,
    SocketOptions,
    check_ports,
    make_socket,
    resolve,
)

_RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED")

DNS_REASONS: tuple[str, ...] = (
    "dns_timeout",
    "dns_refused",
    "dns_unreachable",
    "dns_error",
    "dns_rcode",
    "dns_answer_mismatch",
    "dns_truncated",
)


@dataclass(frozen=True)
class DnsOptions(SocketOptions):
    query_name: str = ""
    record_type: str = "A"
    server: str = ""  # IP of the server to ask; "" = the target's address
    port: int = 53
    expect_rcode: str = "NOERROR"
    expect_answer: tuple[str, ...] = ()  # every one must be in the answer (any order)
    recursion_desired: bool = True

    port_options = ()  # checked in ``check``, after what to ask

    def check(self) -> list[str]:
        errs: list[str] = []
        if not self.query_name:
            errs.append("query_name: required")
        try:
            dns.rdatatype.from_text(self.record_type)
        except dns.exception.DNSException:
            errs.append(f"record_type: unknown type {self.record_type!r}")
        if self.expect_rcode.upper() not in _RCODES:
            errs.append("expect_rcode: one of " + ", ".join(_RCODES))
        return errs + check_ports(self, "port")


@dataclass
class Answer:
    took: float
    rcode: str
    addresses: list[str]
    truncated: bool


def _rcode_text(code: int) -> str:
    text = dns.rcode.to_text(dns.rcode.Rcode(code)) if code < 4096 else "other"
    return text if text in _RCODES else "other"


async def query(
    ep: Endpoint,
    port: int,
    name: str,
    rdtype: str,
    opts: CommonOptions,
    timeout: float,
    ctx: ProbeContext,
    rd: bool = True,
) -> Answer:
    """Ask ``ep`` once. Raises ProbeFailed(dns_timeout|dns_refused|dns_unreachable|dns_error)."""
    loop = asyncio.get_running_loop()
    q = dns.message.make_query(name, rdtype)
    if not rd:
        q.flags &= ~dns.flags.RD
    wire = q.to_wire()
    sock = make_socket(ep, socket.SOCK_DGRAM, opts)
    try:
        try:
            sock.connect(ep.sockaddr(port))
            t0 = time.perf_counter_ns()
            sock.send(wire)
        except OSError as e:
            raise ProbeFailed(_os_reason(e)) from None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    data = await loop.sock_recv(sock, 65535)
                    took = (time.perf_counter_ns() - t0) / 1e9
                    try:
                        r = dns.message.from_wire(data)
                    except (dns.exception.DNSException, ValueError, IndexError):
                        # Truncated, oversized, garbage: counted, never trusted.
                        ctx.counters.stray("dns", "malformed")
                        continue
                    if not q.is_response(r):
                        ctx.counters.stray("dns", "wrong_id")
                        continue
                    addrs = sorted(
                        {
                            rd_.to_text()
                            for rrset in r.answer
                            for rd_ in rrset
                            if rrset.rdtype == q.question[0].rdtype
                        }
                    )
                    return Answer(took, _rcode_text(r.rcode()), addrs, bool(r.flags & dns.flags.TC))
        except TimeoutError:
            raise ProbeFailed("dns_timeout") from None
        except OSError as e:
            raise ProbeFailed(_os_reason(e)) from None
    finally:
        sock.close()


def _os_reason(e: OSError) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "dns_refused"
    if e.errno in (113, 101, 99):  # EHOSTUNREACH, ENETUNREACH, EADDRNOTAVAIL
        return "dns_unreachable"
    return "dns_error"


def check(ans: Answer, opts: DnsOptions) -> str:
    """'ok' or the bounded reason the answer fails the options' expectations."""
    if ans.rcode != opts.expect_rcode.upper():
        return "dns_rcode"
    if ans.truncated and not ans.addresses:
        return "dns_truncated"
    if opts.expect_answer:
        want = {a.lower().rstrip(".") for a in opts.expect_answer}
        got = {a.lower().rstrip(".") for a in ans.addresses}
        if not want <= got:
            return "dns_answer_mismatch"
    return "ok"


async def run(target: Target, opts: DnsOptions, ctx: ProbeContext) -> ProbeResult:
    t0 = time.perf_counter_ns()
    try:
        ep = await resolve(opts.server or target.address, opts, ctx)
        ans = await query(
            ep,
            opts.port,
            opts.query_name,
            opts.record_type,
            opts,
            opts.timeout,
            ctx,
            opts.recursion_desired,
        )
    except ProbeFailed as e:
        return ProbeResult.failure(e.reason, (time.perf_counter_ns() - t0) / 1e9)
    reason = check(ans, opts)
    return ProbeResult(
        success=reason == "ok",
        reason=reason,
        duration=(time.perf_counter_ns() - t0) / 1e9,
        phases={"resolve": ans.took},
        info={"rcode": ans.rcode},
        gauges={"dns_answer_count": float(len(ans.addresses))},
    )


REASONS: tuple[str, ...] = (*DNS_REASONS, *NET_REASONS)

KIND = ProbeKind(
    name="dns",
    options=DnsOptions,
    run=run,
    phases=("resolve",),
    reasons=REASONS,
    gauges={"dns_answer_count": "Records of the asked type in the last answer."},
    stray_reasons=("malformed", "wrong_id"),
    info_labels=("rcode",),
    needs=(Resolver,),
)
