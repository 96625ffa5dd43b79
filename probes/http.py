"""HTTP(S) probe: one request on a fresh connection, with its phases traced.

Phases (seconds): ``resolve`` (name lookup, absent for IP literals), ``connect`` (TCP
handshake), ``tls`` (handshake, HTTPS only), ``ttfb`` (request headers sent → response headers
received) and ``transfer`` (response headers → last body byte). They come from aiohttp's
``TraceConfig``; the TCP/TLS split comes from the socket aiohttp connects (our
``socket_factory`` stamps the moment the kernel reports the connect done), because aiohttp
traces TCP and TLS as one "connection create" step.

Every run uses a new session with ``force_close`` and no DNS cache, so each run pays a full
resolve, connect and handshake, as a new RTC client does.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from probes.base import SOCKET_EXHAUSTED, ProbeContext, ProbeKind, ProbeResult, Target
from probes.net.resolve import Resolver
from probes.net.sockets import (
    RESOLVE_REASONS,
    ProbeFailed,
    SocketOptions,
    exhausted,
    os_error_reason,
    resolve,
    set_tos,
)
from probes.tls import HANDSHAKE_REASONS, _ssl_reason, make_context

HTTP_REASONS: tuple[str, ...] = (
    "http_timeout",
    "http_status",
    "http_body_mismatch",
    "http_body_too_large",
    "http_malformed",
    "http_reset",
    "http_error",
)


@dataclass(frozen=True)
class HttpOptions(SocketOptions):
    timeout: float = 5.0
    interval: float = 15.0
    scheme: Literal["http", "https"] = "https"
    port: int = 0  # 0 = 80 or 443 by scheme
    path: str = "/"
    method: Literal["GET", "HEAD"] = "GET"
    server_name: str = ""  # Host header and SNI; "" = the target's address
    expect_status: tuple[int, ...] = ()  # empty = any 2xx
    expect_body: str = ""  # substring the body must contain
    max_body_bytes: int = 1 << 20
    ca_file: str = ""
    insecure_skip_verify: bool = False
    headers: tuple[str, ...] = field(default=())  # "Name: value" lines

    port_options = ()  # 0 is the scheme's port

    def check(self) -> list[str]:
        errs: list[str] = []
        if not 0 <= self.port <= 65535:
            errs.append("port: must be between 0 and 65535")
        if not self.path.startswith("/"):
            errs.append("path: must start with /")
        if any(not 100 <= s <= 599 for s in self.expect_status):
            errs.append("expect_status: codes must be between 100 and 599")
        if not 0 < self.max_body_bytes <= 64 << 20:
            errs.append("max_body_bytes: must be between 1 and 64 MiB")
        if any(":" not in h for h in self.headers):
            errs.append("headers: each must be 'Name: value'")
        return errs


class _Stamps(SimpleNamespace):
    pass


class _TimedSocket(socket.socket):
    """Notes when the TCP connect completes, whichever way the event loop checks it."""

    connected_ns: int = 0

    def connect(self, address: Any) -> None:
        super().connect(address)
        self.connected_ns = self.connected_ns or time.perf_counter_ns()

    def getsockopt(self, *args: Any) -> Any:
        value = super().getsockopt(*args)
        if args[:2] == (socket.SOL_SOCKET, socket.SO_ERROR) and value == 0:
            self.connected_ns = self.connected_ns or time.perf_counter_ns()
        return value


class _Resolver(AbstractResolver):
    """Resolves through the probe's resolver (shared cache, ip_family), timed by the trace."""

    def __init__(self, opts: HttpOptions, ctx: ProbeContext, address: str) -> None:
        self.opts, self.ctx, self.address = opts, ctx, address

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        # The URL's host is the server name; the address probed is the target's.
        ep = await resolve(self.address, self.opts, self.ctx)
        return [
            {
                "hostname": host,
                "host": ep.address,
                "port": port,
                "family": ep.family,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


def _trace(st: _Stamps) -> aiohttp.TraceConfig:
    tc = aiohttp.TraceConfig()

    def stamp(name: str) -> Any:
        async def on(_s: Any, _c: Any, _p: Any) -> None:
            setattr(st, name, time.perf_counter_ns())

        return on

    tc.on_dns_resolvehost_start.append(stamp("dns_start"))
    tc.on_dns_resolvehost_end.append(stamp("dns_end"))
    tc.on_connection_create_start.append(stamp("conn_start"))
    tc.on_connection_create_end.append(stamp("conn_end"))
    tc.on_request_headers_sent.append(stamp("sent"))
    tc.on_request_end.append(stamp("headers"))
    return tc


async def run(target: Target, opts: HttpOptions, ctx: ProbeContext) -> ProbeResult:
    t0 = time.perf_counter_ns()
    st = _Stamps()
    socks: list[_TimedSocket] = []
    tos = opts.tos

    def factory(ai: Any) -> socket.socket:
        s = _TimedSocket(ai[0], ai[1], ai[2])
        set_tos(s, ai[0], tos)
        socks.append(s)
        return s

    name = opts.server_name or target.address.strip("[]")
    host = f"[{name}]" if ":" in name else name
    port = opts.port or (443 if opts.scheme == "https" else 80)
    url = f"{opts.scheme}://{host}:{port}{opts.path}"
    sslctx: ssl.SSLContext | bool = False
    if opts.scheme == "https":
        try:
            sslctx = make_context(opts.ca_file, opts.insecure_skip_verify, "TLS1.2")
        except ProbeFailed as e:
            return ProbeResult.failure(e.reason)
    family = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}.get(opts.ip_family, socket.AF_UNSPEC)
    connector = aiohttp.TCPConnector(
        force_close=True,
        use_dns_cache=False,
        ttl_dns_cache=None,
        limit=1,
        family=family,
        resolver=_Resolver(opts, ctx, target.address),
        socket_factory=factory,
        local_addr=(opts.source_address, 0) if opts.source_address else None,
        ssl=sslctx,
    )
    headers = {k.strip(): v.strip() for k, v in (h.split(":", 1) for h in opts.headers)}
    status = 0
    body = b""
    reason = "ok"
    try:
        async with (
            aiohttp.ClientSession(
                connector=connector,
                trace_configs=[_trace(st)],
                auto_decompress=True,
                timeout=aiohttp.ClientTimeout(total=opts.timeout),
            ) as session,
            session.request(opts.method, url, headers=headers, allow_redirects=False) as resp,
        ):
            status = resp.status
            while len(body) <= opts.max_body_bytes:
                chunk = await resp.content.read(opts.max_body_bytes + 1 - len(body))
                if not chunk:
                    break
                body += chunk
            st.body_end = time.perf_counter_ns()
    except ProbeFailed as e:
        reason = e.reason
    except aiohttp.ClientConnectorCertificateError as e:
        reason = _ssl_reason(e.certificate_error)
    except aiohttp.ClientConnectorSSLError:
        reason = "tls_handshake_failed"
    except aiohttp.ClientConnectorError as e:
        reason = SOCKET_EXHAUSTED if exhausted(e.os_error) else os_error_reason(e.os_error, "tcp")
        if isinstance(e.os_error, ProbeFailed):
            reason = e.os_error.reason
    except TimeoutError:
        reason = _timeout_reason(st, socks, opts.scheme == "https")
    except (aiohttp.ServerDisconnectedError, ConnectionResetError):
        reason = "http_reset"
    except (aiohttp.ClientResponseError, aiohttp.ClientPayloadError):
        reason = "http_malformed"
    except (aiohttp.ClientError, OSError, ssl.SSLError) as e:
        reason = _ssl_reason(e) if isinstance(e, ssl.SSLError) else "http_error"
    duration = (time.perf_counter_ns() - t0) / 1e9
    phases = _phases(st, socks, opts.scheme == "https")
    if reason != "ok":
        return ProbeResult.failure(reason, duration, phases=phases)
    if len(body) > opts.max_body_bytes:
        reason = "http_body_too_large"
    elif (status not in opts.expect_status) if opts.expect_status else not 200 <= status < 300:
        reason = "http_status"
    elif opts.expect_body and opts.expect_body.encode() not in body:
        reason = "http_body_mismatch"
    return ProbeResult(
        success=reason == "ok",
        reason=reason,
        duration=duration,
        phases=phases,
        gauges={"http_status_code": float(status), "http_content_length": float(len(body))},
    )


def _connected(socks: list[_TimedSocket]) -> int:
    return max((s.connected_ns for s in socks), default=0)


def _timeout_reason(st: _Stamps, socks: list[_TimedSocket], tls: bool) -> str:
    if hasattr(st, "dns_start") and not hasattr(st, "dns_end"):
        return "resolve_failed"
    if not hasattr(st, "conn_end"):
        if not _connected(socks):
            return "tcp_timeout"
        return "tls_timeout" if tls else "http_timeout"
    return "http_timeout"


def _phases(st: _Stamps, socks: list[_TimedSocket], tls: bool) -> dict[str, float]:
    def span(a: int | None, b: int | None) -> float | None:
        return (b - a) / 1e9 if a and b and b >= a else None

    g = st.__dict__.get
    out: dict[str, float | None] = {"resolve": span(g("dns_start"), g("dns_end"))}
    conn = _connected(socks) or None
    if tls and conn:
        out["connect"] = span(g("dns_end") or g("conn_start"), conn)
        out["tls"] = span(conn, g("conn_end"))
    else:
        out["connect"] = span(g("dns_end") or g("conn_start"), g("conn_end"))
    out["ttfb"] = span(g("sent"), g("headers"))
    out["transfer"] = span(g("headers"), g("body_end"))
    return {k: v for k, v in out.items() if v is not None}


REASONS: tuple[str, ...] = (*HANDSHAKE_REASONS, *HTTP_REASONS, *RESOLVE_REASONS)

KIND = ProbeKind(
    name="http",
    options=HttpOptions,
    run=run,
    phases=("resolve", "connect", "tls", "ttfb", "transfer"),
    reasons=REASONS,
    gauges={
        "http_status_code": "Status code of the last response.",
        "http_content_length": "Body bytes read in the last response.",
    },
    needs=(Resolver,),
)
