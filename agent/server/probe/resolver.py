"""``/probe``'s own name resolution: the hosts file, then DNS over asyncio sockets (dnspython), so
that a request's deadline really cancels a lookup and a flood of slow names holds no thread the
agent's own lookups wait for."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from agent.server.probe.policy import _ip
from probes.base import CommonOptions

log = logging.getLogger("edgeprobe.probe_endpoint")


class Resolver(Protocol):
    async def __call__(self, host: str, family: int) -> list[str]:
        """Addresses of ``host`` (family AF_INET, AF_INET6 or AF_UNSPEC), may raise OSError."""


_FileKey = tuple[int, int, int]
_MAX_HOSTS_BYTES = 1 << 20


def _file_key(path: Path) -> _FileKey | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def parse_hosts(text: str) -> dict[str, list[str]]:
    """An /etc/hosts text as name (lower case, no final dot) -> addresses, in file order."""
    table: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        addr = _ip(fields[0]) if len(fields) >= 2 else None
        if addr is None:
            continue
        for name in fields[1:]:
            addrs = table.setdefault(name.lower().rstrip("."), [])
            if str(addr) not in addrs:
                addrs.append(str(addr))
    return table


class DnsResolver:
    """/probe's resolver: /etc/hosts, then DNS over asyncio sockets (dnspython).

    The agent's own resolver (probes.net.resolve) calls getaddrinfo in the event loop's default
    thread pool. A getaddrinfo call cannot be cancelled: a /probe flood of names that a slow
    DNS server answers late filled that pool with lookups that outlived their requests, and
    the agent's own names queued behind them until their lookups timed out. Here a lookup is a
    coroutine on its own socket: the request's deadline (or ``timeout``) cancels it and closes
    the socket, and at most ``limit`` lookups are in flight; past that a lookup fails at once.

    Like glibc with ``hosts: files dns``, minus search domains: an allowlisted name is looked
    up as written, never with a suffix appended. Both files are read again when they change.
    ``port`` is the DNS servers' port (53; tests use another).
    """

    def __init__(
        self,
        limit: int,
        timeout: float,
        hosts: Path = Path("/etc/hosts"),
        resolv_conf: Path = Path("/etc/resolv.conf"),
        port: int = 53,
    ) -> None:
        self.limit = limit
        self.timeout = timeout
        self.hosts_path = hosts
        self.resolv_conf = resolv_conf
        self.port = port
        self.in_flight = 0
        self._hosts: tuple[_FileKey | None, dict[str, list[str]]] = (None, {})
        self._dns: tuple[_FileKey | None, dns.asyncresolver.Resolver | None] = (None, None)

    async def __call__(self, host: str, family: int) -> list[str]:
        if self.in_flight >= self.limit:
            raise OSError("too many /probe lookups in flight")
        self.in_flight += 1
        try:
            async with asyncio.timeout(self.timeout):
                return await self._resolve(host, family)
        finally:
            self.in_flight -= 1

    async def _resolve(self, host: str, family: int) -> list[str]:
        want: tuple[int, ...] = (
            (4,) if family == socket.AF_INET else (6,) if family == socket.AF_INET6 else (4, 6)
        )
        known = self._hosts_table().get(host.lower().rstrip("."), [])
        # IPv4 first, as the agent's own resolver prefers it for ip_family "auto".
        found = [a for v in want for a in known if ipaddress.ip_address(a).version == v]
        if found:
            return found
        res = self._dns_resolver()
        if res is None:
            raise OSError("no DNS server configured")
        rdtypes = [{4: dns.rdatatype.A, 6: dns.rdatatype.AAAA}[v] for v in want]
        answers = await asyncio.gather(
            *(self._query(res, host, t) for t in rdtypes), return_exceptions=True
        )
        out: list[str] = []
        for a in answers:
            if isinstance(a, list):
                out += a
            elif not isinstance(a, (dns.exception.DNSException, OSError, UnicodeError, ValueError)):
                raise a
        if not out:
            raise OSError("name did not resolve")
        return out

    async def _query(
        self, res: dns.asyncresolver.Resolver, host: str, rdtype: dns.rdatatype.RdataType
    ) -> list[str]:
        ans = await res.resolve(
            host, rdtype, search=False, raise_on_no_answer=False, lifetime=self.timeout
        )
        if ans.rrset is None:
            return []
        return [r.address for r in ans.rrset if r.rdtype == rdtype]

    def _hosts_table(self) -> dict[str, list[str]]:
        key = _file_key(self.hosts_path)
        if key != self._hosts[0]:
            try:
                with self.hosts_path.open("rb") as f:
                    text = f.read(_MAX_HOSTS_BYTES).decode("utf-8", "replace")
            except OSError:
                text = ""
            self._hosts = (key, parse_hosts(text))
        return self._hosts[1]

    def _dns_resolver(self) -> dns.asyncresolver.Resolver | None:
        key = _file_key(self.resolv_conf)
        if key != self._dns[0]:
            res: dns.asyncresolver.Resolver | None
            try:
                res = dns.asyncresolver.Resolver(filename=os.fspath(self.resolv_conf))
                res.port = self.port
            except (dns.exception.DNSException, OSError, ValueError):
                log.warning(
                    "/probe: no usable DNS configuration, names resolve only from the hosts file",
                    extra={"file": os.fspath(self.resolv_conf)},
                )
                res = None
            self._dns = (key, res)
        return self._dns[1]


# module name -> (probe kind name, options), or None for an unknown module.
ModuleLookup = Callable[[str], "tuple[str, CommonOptions] | None"]
