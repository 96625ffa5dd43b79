"""Helpers shared by the socket-level probe kinds: resolution, family, source address, DSCP.

Every kind builds its own sockets through :func:`make_socket` so that ``ip_family``,
``source_address`` and ``dscp`` mean the same thing everywhere, and maps socket errors to the
same bounded reasons through :func:`os_error_reason`.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass
from typing import ClassVar

from probes.base import SOCKET_EXHAUSTED, CommonOptions, Failed, ProbeContext
from probes.net.resolve import ResolvedAddress, ResolveError, Resolver, literal

# Reasons the helpers below can produce; kinds include them in their declared vocabulary.
RESOLVE_REASONS: tuple[str, ...] = ("resolve_failed", "resolve_empty")


class ProbeFailed(Failed):
    """Internal control flow: the run ends with this bounded reason."""


@dataclass(frozen=True)
class Endpoint:
    family: int
    address: str

    def sockaddr(self, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
        if self.family == socket.AF_INET6:
            return (self.address, port, 0, 0)
        return (self.address, port)


async def resolve(host: str, opts: CommonOptions, ctx: ProbeContext) -> Endpoint:
    """The address to probe. IP literals skip resolution; names use the shared resolver."""
    lit = literal(host)
    try:
        if lit is not None:
            res: ResolvedAddress = await Resolver().resolve(host, opts.ip_family)
        elif (shared := ctx.resources.get(Resolver)) is not None:
            res = await shared.resolve(host, opts.ip_family)
        else:
            # One-shot use (CLI, tests) without a shared cache: a private resolver, no caching.
            res = await Resolver(ttl=0.0).resolve(host, opts.ip_family)
    except ResolveError as e:
        raise ProbeFailed(e.reason) from None
    return Endpoint(res.family, res.address)


def check_ports(opts: CommonOptions, *keys: str) -> list[str]:
    """Validation shared by the kinds that take ports: each must be a real port number."""
    return [f"{k}: must be between 1 and 65535" for k in keys if not 1 <= getattr(opts, k) <= 65535]


def check_source(opts: CommonOptions) -> list[str]:
    """Validation shared by all kinds: the source address must be an IP literal."""
    if not opts.source_address:
        return []
    try:
        ip = ipaddress.ip_address(opts.source_address)
    except ValueError:
        return [f"source_address: not an IP address: {opts.source_address!r}"]
    want = {"ipv4": 4, "ipv6": 6}.get(opts.ip_family, ip.version)
    if ip.version != want:
        return ["source_address: does not match ip_family"]
    return []


@dataclass(frozen=True)
class SocketOptions(CommonOptions):
    """Options of a kind that opens its own sockets with :func:`make_socket`: every option named
    in ``port_options`` must be a port number, and ``source_address`` an IP literal of the
    probed family. A kind adds the checks of its own options in ``check``."""

    port_options: ClassVar[tuple[str, ...]] = ("port",)

    def validate(self) -> list[str]:
        return (
            super().validate()
            + check_ports(self, *self.port_options)
            + self.check()
            + check_source(self)
        )

    def check(self) -> list[str]:
        """Problems with the options the kind adds, each as 'key: message'."""
        return []


def set_tos(sock: socket.socket, family: int, tos: int) -> None:
    """DSCP marking: IP_TOS for IPv4, IPV6_TCLASS for IPv6 (same byte layout)."""
    if not tos:
        return
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, tos)
    else:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)


_EXHAUSTED_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def exhausted(e: BaseException | None) -> bool:
    """Whether ``e``, or an error it was raised from (libraries wrap ``socket()``'s error in
    their own), says the process or the host is out of descriptors or socket memory."""
    for _ in range(4):  # a wrapper of a wrapper at most; never an unbounded walk
        if e is None:
            return False
        if isinstance(e, OSError) and e.errno in _EXHAUSTED_ERRNOS:
            return True
        e = e.__cause__ or e.__context__
    return False


def out_of_sockets() -> bool:
    """Whether a socket cannot be had right now, for a library that skips what it cannot
    open instead of raising (aioice's candidate gathering)."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
    except OSError as e:
        return exhausted(e)
    return False


def make_socket(ep: Endpoint, kind: int, opts: CommonOptions) -> socket.socket:
    """A non-blocking socket of ``ep``'s family, DSCP-marked and bound to the source address.
    Raises ProbeFailed(socket_exhausted) when there are no descriptors or buffers for it."""
    try:
        sock = socket.socket(ep.family, kind)
    except OSError as e:
        if exhausted(e):
            raise ProbeFailed(SOCKET_EXHAUSTED) from None
        raise
    try:
        sock.setblocking(False)
        set_tos(sock, ep.family, opts.tos)
        if opts.source_address:
            src = ipaddress.ip_address(opts.source_address)
            if (src.version == 6) != (ep.family == socket.AF_INET6):
                raise ProbeFailed("source_family_mismatch")
            sock.bind((opts.source_address, 0))
    except ProbeFailed:
        sock.close()
        raise
    except OSError:
        sock.close()
        raise ProbeFailed("source_bind_failed") from None
    return sock


def connected_udp(ep: Endpoint, port: int, opts: CommonOptions, unreachable: str) -> socket.socket:
    """A :func:`make_socket` UDP socket connected to ``ep``'s ``port``: the kernel then drops
    datagrams from elsewhere and reports the port's ICMP errors on it. Raises
    ProbeFailed(``unreachable``), with the socket closed, when the kernel cannot connect it."""
    sock = make_socket(ep, socket.SOCK_DGRAM, opts)
    try:
        sock.connect(ep.sockaddr(port))
    except OSError:
        sock.close()
        raise ProbeFailed(unreachable) from None
    return sock


SOCKET_REASONS: tuple[str, ...] = ("source_bind_failed", "source_family_mismatch")
# What a kind that resolves with ``resolve`` and opens sockets with ``make_socket`` can report.
NET_REASONS: tuple[str, ...] = (*RESOLVE_REASONS, *SOCKET_REASONS)


def os_error_reason(e: OSError, prefix: str) -> str:
    """Map a connect/send error to ``<prefix>_refused|_unreachable|_timeout|_error``."""
    if isinstance(e, ConnectionRefusedError) or e.errno == errno.ECONNREFUSED:
        return f"{prefix}_refused"
    if e.errno in (
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EADDRNOTAVAIL,
        errno.ENETDOWN,
        errno.EHOSTDOWN,
    ):
        return f"{prefix}_unreachable"
    if isinstance(e, TimeoutError) or e.errno == errno.ETIMEDOUT:
        return f"{prefix}_timeout"
    if isinstance(e, ConnectionResetError):
        return f"{prefix}_reset"
    return f"{prefix}_error"


def os_reasons(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}_{s}" for s in ("refused", "unreachable", "timeout", "reset", "error"))


def check_secret(password: str, password_file: str) -> list[str]:
    """The rule for a secret given inline (``password``) or as a file (``password_file``)."""
    if password and password_file:
        return ["password: set either password or password_file, not both"]
    return []


def read_secret(password: str, password_file: str) -> str:
    """The secret from the option or the file (first line). Never logged."""
    if password_file:
        with open(password_file, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    return password
