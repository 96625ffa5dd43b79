"""TLS probe: TCP connect, then the TLS handshake timed on its own.

The handshake phase starts when the TCP connect completes, so ``tls`` is the extra cost of TLS
(1 RTT for TLS 1.3, 2 for TLS 1.2, plus server crypto). Certificate problems map to bounded
reasons from the OpenSSL verify code, never to the error text.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Literal

from probes.base import SOCKET_EXHAUSTED, ProbeContext, ProbeKind, ProbeResult, Target
from probes.net.resolve import Resolver
from probes.net.sockets import (
    NET_REASONS,
    ProbeFailed,
    SocketOptions,
    exhausted,
    os_reasons,
    resolve,
)
from probes.tcp import connect

TlsVersion = Literal["TLS1.2", "TLS1.3"]

# OpenSSL X509_V_ERR_* codes worth their own reason.
_EXPIRED = {9, 10}  # CERT_NOT_YET_VALID, CERT_HAS_EXPIRED
_HOSTNAME = {62, 64}  # HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH
_VERSIONS = {"TLSv1.2": "TLS1.2", "TLSv1.3": "TLS1.3", "TLSv1.1": "TLS1.1", "TLSv1": "TLS1.0"}

TLS_REASONS: tuple[str, ...] = (
    "tls_timeout",
    "tls_cert_expired",
    "tls_cert_hostname",
    "tls_cert_untrusted",
    "tls_handshake_failed",
    "tls_reset",
)
# What a TCP connect, then a TLS handshake with a context built from the options, can report.
HANDSHAKE_REASONS: tuple[str, ...] = (*os_reasons("tcp"), *TLS_REASONS, "tls_config")


@dataclass(frozen=True)
class TlsOptions(SocketOptions):
    port: int = 443
    server_name: str = ""  # SNI and the name verified; "" = the target's address
    ca_file: str = ""  # PEM bundle to trust instead of the system store
    insecure_skip_verify: bool = False
    min_version: TlsVersion = "TLS1.2"
    alpn: tuple[str, ...] = ()


def make_context(
    ca_file: str, insecure: bool, min_version: str, alpn: tuple[str, ...] = ()
) -> ssl.SSLContext:
    """A client context trusting ``ca_file`` (or the system store). Raises
    ProbeFailed(tls_config), or ProbeFailed(socket_exhausted) when the trust store cannot
    be read for want of file descriptors."""
    try:
        ctx = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as e:
        raise ProbeFailed(SOCKET_EXHAUSTED if exhausted(e) else "tls_config") from None
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if min_version == "TLS1.3" else ssl.TLSVersion.TLSv1_2
    )
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def _ssl_reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        code = getattr(e, "verify_code", 0)
        if code in _EXPIRED:
            return "tls_cert_expired"
        if code in _HOSTNAME:
            return "tls_cert_hostname"
        return "tls_cert_untrusted"
    if isinstance(e, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "tls_reset"
    return "tls_handshake_failed"


def _not_after(obj: ssl.SSLObject) -> float | None:
    """The leaf certificate's notAfter as Unix seconds (a fact, not a measurement)."""
    cert = obj.getpeercert()
    if cert and "notAfter" in cert:
        return float(ssl.cert_time_to_seconds(str(cert["notAfter"])))
    der = obj.getpeercert(binary_form=True)
    if not der:
        return None
    try:  # unverified handshakes give no parsed cert; cryptography parses DER if installed
        from cryptography import x509
    except ImportError:
        return None
    return x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()


async def handshake(
    sock: socket.socket, sslctx: ssl.SSLContext, server_name: str, timeout: float
) -> tuple[asyncio.Transport, float, dict[str, str], float | None]:
    """Run TLS over the connected ``sock``: (transport, seconds, info, cert notAfter)."""
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter_ns()
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(
                asyncio.Protocol,
                sock=sock,
                ssl=sslctx,
                server_hostname=server_name,
                ssl_handshake_timeout=timeout + 1.0,
            )
    except TimeoutError:
        sock.close()
        raise ProbeFailed("tls_timeout") from None
    except (ssl.SSLError, OSError, EOFError) as e:
        sock.close()
        raise ProbeFailed(_ssl_reason(e)) from None
    took = (time.perf_counter_ns() - t0) / 1e9
    obj = transport.get_extra_info("ssl_object")
    info: dict[str, str] = {}
    not_after = None
    if isinstance(obj, ssl.SSLObject):
        info["tls_version"] = _VERSIONS.get(obj.version() or "", "other")
        info["alpn"] = obj.selected_alpn_protocol() or ""
        not_after = _not_after(obj)
    return transport, took, info, not_after


async def run(target: Target, opts: TlsOptions, ctx: ProbeContext) -> ProbeResult:
    t0 = time.perf_counter_ns()
    try:
        sslctx = make_context(opts.ca_file, opts.insecure_skip_verify, opts.min_version, opts.alpn)
        ep = await resolve(target.address, opts, ctx)
        sock, tcp_took = await connect(ep, opts.port, opts, opts.timeout)
        transport, tls_took, info, not_after = await handshake(
            sock, sslctx, opts.server_name or target.address.strip("[]"), opts.timeout
        )
    except ProbeFailed as e:
        return ProbeResult.failure(e.reason, (time.perf_counter_ns() - t0) / 1e9)
    transport.abort()
    gauges = {} if not_after is None else {"tls_cert_not_after_seconds": not_after}
    return ProbeResult(
        success=True,
        duration=(time.perf_counter_ns() - t0) / 1e9,
        phases={"connect": tcp_took, "tls": tls_took},
        info=info,
        gauges=gauges,
    )


REASONS: tuple[str, ...] = (*HANDSHAKE_REASONS, *NET_REASONS)

KIND = ProbeKind(
    name="tls",
    options=TlsOptions,
    run=run,
    phases=("connect", "tls"),
    reasons=REASONS,
    gauges={
        "tls_cert_not_after_seconds": "Expiry (notAfter) of the leaf certificate, as Unix seconds."
    },
    info_labels=("tls_version", "alpn"),
    needs=(Resolver,),
)
