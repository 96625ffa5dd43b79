"""TCP connect probe: the time from the first SYN to the completed three-way handshake.

The connect time of a fresh TCP connection is 1 RTT plus the server's SYN-ACK latency on a
lossless path; a lost SYN costs the initial RTO of 1 s (RFC 6298 §2.1), which is exactly what an
RTC client's signalling connect suffers too, so no retry is hidden inside a run.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass

from probes.base import CommonOptions, ProbeContext, ProbeKind, ProbeResult, Target
from probes.net.resolve import Resolver
from probes.net.sockets import (
    NET_REASONS,
    Endpoint,
    ProbeFailed,
    SocketOptions,
    make_socket,
    os_error_reason,
    os_reasons,
    resolve,
)


@dataclass(frozen=True)
class TcpOptions(SocketOptions):
    port: int = 443


async def connect(
    ep: Endpoint, port: int, opts: CommonOptions, timeout: float
) -> tuple[socket.socket, float]:
    """A connected non-blocking socket and the connect time in seconds.

    Raises ProbeFailed with ``tcp_refused|tcp_unreachable|tcp_timeout|...``.
    """
    loop = asyncio.get_running_loop()
    sock = make_socket(ep, socket.SOCK_STREAM, opts)
    # Nagle would delay the small TLS/HTTP writes that follow by up to an RTT.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.perf_counter_ns()
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, ep.sockaddr(port))
    except TimeoutError:
        sock.close()
        raise ProbeFailed("tcp_timeout") from None
    except OSError as e:
        sock.close()
        raise ProbeFailed(os_error_reason(e, "tcp")) from None
    except BaseException:
        sock.close()
        raise
    return sock, (time.perf_counter_ns() - t0) / 1e9


async def run(target: Target, opts: TcpOptions, ctx: ProbeContext) -> ProbeResult:
    t0 = time.perf_counter_ns()
    try:
        ep = await resolve(target.address, opts, ctx)
        sock, took = await connect(ep, opts.port, opts, opts.timeout)
    except ProbeFailed as e:
        return ProbeResult.failure(e.reason, (time.perf_counter_ns() - t0) / 1e9)
    sock.close()
    return ProbeResult(
        success=True,
        duration=(time.perf_counter_ns() - t0) / 1e9,
        phases={"connect": took},
        info={"ip_family": "ipv6" if ep.family == socket.AF_INET6 else "ipv4"},
    )


REASONS: tuple[str, ...] = (*os_reasons("tcp"), *NET_REASONS)

KIND = ProbeKind(
    name="tcp",
    options=TcpOptions,
    run=run,
    phases=("connect",),
    reasons=REASONS,
    info_labels=("ip_family",),
    needs=(Resolver,),
)
