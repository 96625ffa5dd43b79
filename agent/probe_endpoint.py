"""``GET /probe?target=…&module=…``: blackbox_exporter's multi-target pattern, without the SSRF.

blackbox_exporter's ``/probe`` lets anyone who reaches it make the exporter connect anywhere
(CVE-2020-16248). Here a request is refused unless:

1. the target's name matches ``allow_names`` (exact or ``*.suffix``), or its IP literal is
   inside ``allow_cidrs``;
2. the name is resolved **once**, by this module, and **every** address it returns passes the
   special-range check below; the probe then runs against that exact address (an IP literal),
   so a DNS rebind between the check and the probe cannot switch it;
3. no address is loopback, link-local, a cloud metadata address, private (RFC 1918, ULA),
   CGNAT, multicast, documentation, reserved, or an IPv6 form that embeds one of those
   (``::ffff:127.0.0.1``, NAT64, 6to4), unless its category is in ``allow_special`` or an
   ``allow_cidrs`` entry inside that category's range covers it (allowing ``10.1.0.0/16``
   allows those private addresses; allowing ``0.0.0.0/0`` allows no special address);
4. the client is within its token bucket (per client address, bounded memory) and the number
   of probes in flight is below ``max_concurrent``;
5. the module carries no credential (an auth header, a password, a password file, ...): the
   client picks host, port and path, so a credential would go wherever it points.

An ``allow_cidrs`` entry wider than /16 (IPv4) or /48 (IPv6) is refused unless
``allow_wide_cidrs`` is set, and logs a warning when it is.

Names are resolved by ``DnsResolver``, not by the agent's resolver (probes.net.resolve): its
lookups are coroutines that the request's deadline really cancels, so a flood of slow names
cannot hold threads the agent's own lookups wait for.

Every refusal is an HTTP error with a short, fixed message: the client learns nothing about
internal DNS. A probe outcome (including an unresolvable name) is a 200 with
``probe_success 0``, from a fresh ``CollectorRegistry`` per request, as blackbox does.

Mount with one call: ``add_probe_route(app, config, PROBES, module_lookup, ctx)``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import math
import os
import re
import socket
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agent.config.decode import Duration, Problem
from probes.base import CommonOptions, ProbeContext, ProbeKind, ProbeResult, Target

log = logging.getLogger("edgeprobe.probe_endpoint")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Most specific first: the first matching range names the category.
SPECIAL_RANGES: tuple[tuple[str, str], ...] = (
    ("metadata", "169.254.169.254/32"),      # AWS, GCP, Azure, OpenStack, ...
    ("metadata", "169.254.170.2/32"),        # AWS ECS task metadata
    ("metadata", "100.100.100.200/32"),      # Alibaba Cloud
    ("metadata", "fd00:ec2::254/128"),       # AWS IMDS over IPv6
    ("unspecified", "0.0.0.0/8"),
    ("unspecified", "::/128"),
    ("loopback", "127.0.0.0/8"),
    ("loopback", "::1/128"),
    ("link_local", "169.254.0.0/16"),
    ("link_local", "fe80::/10"),
    ("private", "10.0.0.0/8"),
    ("private", "172.16.0.0/12"),
    ("private", "192.168.0.0/16"),
    ("private", "fc00::/7"),
    ("private", "fec0::/10"),                # deprecated site-local
    ("private", "64:ff9b:1::/48"),           # local-use NAT64
    ("cgnat", "100.64.0.0/10"),
    ("multicast", "224.0.0.0/4"),
    ("multicast", "ff00::/8"),
    ("documentation", "192.0.2.0/24"),
    ("documentation", "198.51.100.0/24"),
    ("documentation", "203.0.113.0/24"),
    ("documentation", "2001:db8::/32"),
    ("documentation", "3fff::/20"),
    ("reserved", "192.0.0.0/24"),            # IETF protocol assignments
    ("reserved", "198.18.0.0/15"),           # benchmarking
    ("reserved", "240.0.0.0/4"),             # includes 255.255.255.255
    ("reserved", "100::/64"),                # discard-only
    ("reserved", "2001::/23"),               # IETF protocol assignments, incl. Teredo
    ("reserved", "::/96"),                   # IPv4-compatible (deprecated)
)
CATEGORIES: tuple[str, ...] = tuple(dict.fromkeys(c for c, _ in SPECIAL_RANGES))
_RANGES: tuple[tuple[str, IPNetwork], ...] = tuple(
    (c, ipaddress.ip_network(n)) for c, n in SPECIAL_RANGES)
# An allowlist entry shorter than this (per IP version) needs allow_wide_cidrs: a /16 is
# already 65,536 addresses, far more than any edge fleet's own ranges.
WIDE_PREFIX: Mapping[int, int] = {4: 16, 6: 48}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_6TO4 = ipaddress.ip_network("2002::/16")


def embedded_ipv4(addr: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries and a kernel or NAT would deliver to."""
    if not isinstance(addr, ipaddress.IPv6Address):
        return None
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.sixtofour is not None:
        return addr.sixtofour
    return None


def special_category(addr: IPAddress) -> tuple[str, IPNetwork] | None:
    """The special category and range of ``addr`` (or of the IPv4 address it embeds)."""
    v4 = embedded_ipv4(addr)
    for a in (addr, v4) if v4 is not None else (addr,):
        for cat, net in _RANGES:
            if a.version == net.version and a in net:
                return cat, net
    return None


@dataclass(frozen=True)
class ProbeEndpointConfig:
    """The ``probe_endpoint`` config section (decoded strictly by agent.decode)."""

    enabled: bool = False
    allow_names: tuple[str, ...] = ()              # "edge-sg-1.example.net", "*.example.net"
    allow_cidrs: tuple[str, ...] = ()              # "198.51.100.0/24", "2001:db8::/32"
    allow_special: tuple[str, ...] = ()            # categories from CATEGORIES
    allow_wide_cidrs: bool = False                 # opt-in for CIDRs wider than WIDE_PREFIX
    rate: float = 1.0                              # requests per second per client
    burst: int = 5
    max_clients: int = 4096                        # bucket table size (memory bound)
    max_concurrent: int = 16                       # probes in flight, all clients together
    timeout: Duration = Duration(10.0)             # upper bound for one request
    timeout_offset: Duration = Duration(0.5)       # kept free of the scrape timeout (blackbox)
    resolve_timeout: Duration = Duration(5.0)      # one name lookup (within the request's)

    @cached_property
    def networks(self) -> tuple[IPNetwork, ...]:
        return tuple(ipaddress.ip_network(c, strict=True) for c in self.allow_cidrs)

    @cached_property
    def wide_networks(self) -> tuple[IPNetwork, ...]:
        return tuple(n for n in self.networks if n.prefixlen < WIDE_PREFIX[n.version])

    def validate(self) -> list[Problem]:
        errs: list[Problem] = []
        for c in self.allow_special:
            if c not in CATEGORIES:
                errs.append(Problem("allow_special", f"unknown category {c!r}; one of "
                                    + ", ".join(CATEGORIES)))
        for n in self.allow_names:
            bare = n[2:] if n.startswith("*.") else n
            if not bare or "*" in bare or not _valid_hostname(bare):
                errs.append(Problem("allow_names", f"invalid name pattern {n!r}"))
        for c in self.allow_cidrs:
            try:
                net = ipaddress.ip_network(c, strict=True)
            except ValueError as e:
                errs.append(Problem("allow_cidrs", str(e)))
                continue
            if net.prefixlen < WIDE_PREFIX[net.version] and not self.allow_wide_cidrs:
                errs.append(Problem("allow_cidrs", f"{c} is wider than /{WIDE_PREFIX[4]} (IPv4) "
                                    f"or /{WIDE_PREFIX[6]} (IPv6); set allow_wide_cidrs: true "
                                    "to allow it"))
        if not (self.rate > 0 and math.isfinite(self.rate)):
            errs.append(Problem("rate", "must be > 0"))
        if not 1 <= self.burst <= 10_000:
            errs.append(Problem("burst", "must be between 1 and 10000"))
        if not 1 <= self.max_clients <= 1_000_000:
            errs.append(Problem("max_clients", "must be between 1 and 1000000"))
        if not 1 <= self.max_concurrent <= 10_000:
            errs.append(Problem("max_concurrent", "must be between 1 and 10000"))
        if not 0 < self.timeout <= 300:
            errs.append(Problem("timeout", "must be > 0 and <= 300s"))
        if not 0 <= self.timeout_offset < self.timeout:
            errs.append(Problem("timeout_offset", "must be >= 0 and below timeout"))
        if not 0 < self.resolve_timeout <= 300:
            errs.append(Problem("resolve_timeout", "must be > 0 and <= 300s"))
        if self.enabled and not (self.allow_names or self.allow_cidrs):
            errs.append(Problem("allow_names",
                                "an enabled /probe needs allow_names or allow_cidrs"))
        return errs


def _valid_hostname(name: str) -> bool:
    if len(name) > 253:
        return False
    labels = name.rstrip(".").split(".")
    return all(0 < len(lb) <= 63 and not lb.startswith("-") and not lb.endswith("-")
               and all(c.isascii() and (c.isalnum() or c in "-_") for c in lb)
               for lb in labels)


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

    def __init__(self, limit: int, timeout: float, hosts: Path = Path("/etc/hosts"),
                 resolv_conf: Path = Path("/etc/resolv.conf"), port: int = 53) -> None:
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
        want: tuple[int, ...] = (4,) if family == socket.AF_INET else \
            (6,) if family == socket.AF_INET6 else (4, 6)
        known = self._hosts_table().get(host.lower().rstrip("."), [])
        # IPv4 first, as the agent's own resolver prefers it for ip_family "auto".
        found = [a for v in want for a in known if ipaddress.ip_address(a).version == v]
        if found:
            return found
        res = self._dns_resolver()
        if res is None:
            raise OSError("no DNS server configured")
        rdtypes = [{4: dns.rdatatype.A, 6: dns.rdatatype.AAAA}[v] for v in want]
        answers = await asyncio.gather(*(self._query(res, host, t) for t in rdtypes),
                                       return_exceptions=True)
        out: list[str] = []
        for a in answers:
            if isinstance(a, list):
                out += a
            elif not isinstance(a, (dns.exception.DNSException, OSError, UnicodeError,
                                    ValueError)):
                raise a
        if not out:
            raise OSError("name did not resolve")
        return out

    async def _query(self, res: dns.asyncresolver.Resolver, host: str,
                     rdtype: dns.rdatatype.RdataType) -> list[str]:
        ans = await res.resolve(host, rdtype, search=False, raise_on_no_answer=False,
                                lifetime=self.timeout)
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
                log.warning("/probe: no usable DNS configuration, names resolve only from "
                            "the hosts file", extra={"file": os.fspath(self.resolv_conf)})
                res = None
            self._dns = (key, res)
        return self._dns[1]


# module name -> (probe kind name, options), or None for an unknown module.
ModuleLookup = Callable[[str], "tuple[str, CommonOptions] | None"]

# Request headers that carry no secret. Any other header counts as a credential: a token can
# hide under any name (X-Api-Key, X-Edge-Pass, ...), so the list says what is safe, not what
# is not.
HARMLESS_HEADERS = frozenset({
    "accept", "accept-charset", "accept-encoding", "accept-language", "cache-control",
    "connection", "content-type", "dnt", "host", "origin", "pragma", "referer", "user-agent",
    "x-requested-with"})
# Option fields that hold a credential when set (passwords, password files, TURN usernames,
# tokens, client certificates and keys). Matched by name, so a new field named like one is
# covered without being listed here.
_CREDENTIAL_FIELD = re.compile(
    r"pass|secret|token|bearer|credential|auth|username|cookie|(^|_)cert($|_)|(^|_)key($|_)")


def credential_fields(opts: CommonOptions) -> list[str]:
    """The option fields of a module that carry a credential; /probe refuses such a module,
    because the client chooses host, port and path, and the credential would go there."""
    out: list[str] = []
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        if f.name == "headers":
            lines = value.keys() if isinstance(value, Mapping) else value
            names = {str(h).split(":", 1)[0].strip().lower() for h in lines}
            if names - HARMLESS_HEADERS:
                out.append(f.name)
        elif _CREDENTIAL_FIELD.search(f.name) and value:
            out.append(f.name)
    return out


class Refused(Exception):
    def __init__(self, status: int, message: str, why: str) -> None:
        super().__init__(message)
        self.status, self.message, self.why = status, message, why


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class ClientLimiter:
    """One token bucket per client address, in an LRU table of at most ``max_clients``.

    Eviction forgets a client's debt, so a client that rotates through more than
    ``max_clients`` source addresses can exceed its rate; ``max_concurrent`` still bounds the
    work the agent does for all of them together."""

    rate: float
    burst: int
    max_clients: int
    clock: Callable[[], float] = time.monotonic
    _buckets: OrderedDict[str, _Bucket] = field(default_factory=OrderedDict)

    def allow(self, client: str) -> bool:
        now = self.clock()
        b = self._buckets.get(client)
        if b is None:
            b = self._buckets[client] = _Bucket(float(self.burst), now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(client)
            b.tokens = min(float(self.burst), b.tokens + (now - b.at) * self.rate)
            b.at = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return True
        return False

    def __len__(self) -> int:
        return len(self._buckets)


def parse_target(raw: str) -> tuple[str, int | None, str | None]:
    """``host``, ``host:port``, ``[v6]:port``, a bare IPv6 literal or a URL ->
    (host, port or None, URL path or None)."""
    raw = raw.strip()
    if not raw or len(raw) > 2048 or any(ord(c) < 0x21 or ord(c) == 0x7F for c in raw):
        raise Refused(400, "invalid target", "invalid")
    path: str | None = None
    if "://" in raw:
        try:
            u = urlsplit(raw)
            host, port = u.hostname or "", u.port
        except ValueError:
            raise Refused(400, "invalid target", "invalid") from None
        if u.username is not None or u.password is not None:
            raise Refused(400, "invalid target: credentials in URL", "invalid")
        path = u.path or "/"
        if u.query:
            path += "?" + u.query
    else:
        try:
            ipaddress.IPv6Address(raw)
            return raw, None, None
        except ValueError:
            pass
        try:
            u = urlsplit("//" + raw)
            host, port = u.hostname or "", u.port
        except ValueError:
            raise Refused(400, "invalid target", "invalid") from None
        if u.path or u.query or u.fragment or u.username is not None:
            raise Refused(400, "invalid target", "invalid")
    if not host:
        raise Refused(400, "invalid target", "invalid")
    return host, port, path


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0] if "%" in host else host)
    except ValueError:
        return None


class TargetPolicy:
    """The allowlist and the special-range rules; pure, so each refusal is unit-testable."""

    def __init__(self, cfg: ProbeEndpointConfig) -> None:
        self.cfg = cfg

    def name_allowed(self, host: str) -> bool:
        h = host.lower().rstrip(".")
        for pat in self.cfg.allow_names:
            p = pat.lower().rstrip(".")
            if p.startswith("*."):
                if h.endswith(p[1:]) and len(h) > len(p) - 1:
                    return True
            elif h == p:
                return True
        return False

    def check_address(self, addr: IPAddress, literal: bool) -> None:
        """Raise Refused unless ``addr`` may be probed. ``literal``: the client gave an IP."""
        in_cidrs = [n for n in self.cfg.networks if n.version == addr.version and addr in n]
        if literal and not in_cidrs:
            raise Refused(403, "target refused: not in the allowlist", "allowlist")
        special = special_category(addr)
        if special is None:
            return
        cat, rng = special
        if cat in self.cfg.allow_special:
            return
        # A CIDR the operator wrote inside the special range is an explicit allowance of it.
        v4 = embedded_ipv4(addr)
        probe_addr: IPAddress = v4 if v4 is not None and rng.version == 4 else addr
        if any(n.version == rng.version and n.subnet_of(rng)  # type: ignore[arg-type]
               and probe_addr in n for n in self.cfg.networks):
            return
        raise Refused(403, f"target refused: {cat.replace('_', '-')} address", "special")


@dataclass
class ProbeEndpointStats:
    """Counts for the agent's own /metrics (bounded labels: outcome only)."""

    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("ok", "invalid", "unknown_module", "credentials", "allowlist", "special",
         "rate_limited", "busy"), 0))


class ProbeEndpoint:
    def __init__(self, cfg: ProbeEndpointConfig, probes: Mapping[str, ProbeKind[Any]],
                 modules: ModuleLookup, ctx: ProbeContext, *,
                 resolver: Resolver | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.probes = probes
        self.modules = modules
        self.ctx = ctx
        self.resolver: Resolver = resolver if resolver is not None else DnsResolver(
            cfg.max_concurrent, float(cfg.resolve_timeout))
        self.policy = TargetPolicy(cfg)
        self.limiter = ClientLimiter(cfg.rate, cfg.burst, cfg.max_clients, clock)
        self.in_flight = 0
        self.stats = ProbeEndpointStats()
        if cfg.wide_networks:
            log.warning("/probe allows wide address ranges (allow_wide_cidrs): any host in "
                        "them may be probed through this agent",
                        extra={"cidrs": ",".join(str(n) for n in cfg.wide_networks)})

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        """Register the endpoint on the agent's registry for request counts by outcome."""
        c = CounterMetricFamily("edgeprobe_probe_endpoint_requests",
                                "Requests to /probe by outcome (ok or the refusal reason)",
                                labels=["outcome"])
        for outcome, n in self.stats.requests.items():
            c.add_metric([outcome], n)
        yield c

    async def handle(self, request: web.Request) -> web.Response:
        try:
            return await self._handle(request)
        except Refused as r:
            self.stats.requests[r.why] += 1
            log.debug("probe refused", extra={"why": r.why, "remote": request.remote or ""})
            headers = {"Retry-After": str(max(1, math.ceil(1 / self.cfg.rate)))} \
                if r.status == 429 else None
            return web.Response(status=r.status, text=r.message + "\n", headers=headers)

    async def _handle(self, request: web.Request) -> web.Response:
        # Rate limit first: even an invalid request costs the client a token.
        if not self.limiter.allow(request.remote or "unknown"):
            raise Refused(429, "rate limited", "rate_limited")
        q = request.query
        raw_target = q.get("target", "")
        module_name = q.get("module", "")
        if not raw_target:
            raise Refused(400, "target parameter is missing", "invalid")
        if not module_name:
            raise Refused(400, "module parameter is missing", "invalid")
        found = self.modules(module_name)
        if found is None or found[0] not in self.probes:
            raise Refused(400, "unknown module", "unknown_module")
        kind_name, opts = found
        if credential_fields(opts):
            raise Refused(403, "module refused: it carries credentials", "credentials")
        kind = self.probes[kind_name]
        deadline = self._deadline(request.headers.get("X-Prometheus-Scrape-Timeout-Seconds"))

        host, port, path = parse_target(raw_target)
        literal = _ip(host)
        if literal is None and not self.policy.name_allowed(host):
            raise Refused(403, "target refused: not in the allowlist", "allowlist")
        if self.in_flight >= self.cfg.max_concurrent:
            raise Refused(503, "too many probes in flight", "busy")
        self.in_flight += 1
        try:
            return await self._run(kind, opts, raw_target, host, literal, port, path, deadline)
        finally:
            self.in_flight -= 1

    def _deadline(self, header: str | None) -> float:
        limit = float(self.cfg.timeout)
        if header is not None:
            try:
                scrape = float(header)
            except ValueError:
                raise Refused(400, "invalid X-Prometheus-Scrape-Timeout-Seconds",
                              "invalid") from None
            if not (math.isfinite(scrape) and scrape > 0):
                raise Refused(400, "invalid X-Prometheus-Scrape-Timeout-Seconds", "invalid")
            # Leave the offset for the response to travel back; never go below half the
            # scrape timeout, or a short scrape timeout would leave no time to probe at all.
            limit = min(limit, max(scrape - self.cfg.timeout_offset, scrape / 2))
        return limit

    async def _run(self, kind: ProbeKind[Any], opts: CommonOptions, raw_target: str,
                   host: str, literal: IPAddress | None, port: int | None, path: str | None,
                   deadline: float) -> web.Response:
        start = time.perf_counter()
        registry = CollectorRegistry(auto_describe=True)
        g_success = Gauge("probe_success", "Whether the probe succeeded", registry=registry)
        g_duration = Gauge("probe_duration_seconds", "Seconds the probe took",
                           registry=registry)
        g_dns = Gauge("probe_dns_lookup_time_seconds", "Seconds the name resolution took",
                      registry=registry)
        g_proto = Gauge("probe_ip_protocol", "IP protocol version of the probed address",
                        registry=registry)
        g_hash = Gauge("probe_ip_addr_hash", "CRC32 of the probed address (changes on flips)",
                       registry=registry)

        family = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}.get(opts.ip_family,
                                                                        socket.AF_UNSPEC)
        result: ProbeResult
        addr: IPAddress | None = None
        if literal is not None:
            self.policy.check_address(literal, literal=True)
            addr = literal
        else:
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(deadline):
                    addrs = await self.resolver(host, family)
            except (OSError, TimeoutError, UnicodeError):
                addrs = []
            g_dns.set(time.perf_counter() - t0)
            parsed = [a for a in (_ip(x) for x in addrs) if a is not None]
            # Every address is checked, not just the one we would pick: a rebinding name
            # answering [public, 127.0.0.1] is refused as a whole.
            for a in parsed:
                self.policy.check_address(a, literal=False)
            if parsed:
                addr = parsed[0]
        if addr is None:
            result = ProbeResult.failure("resolve_failed")
        else:
            g_proto.set(addr.version)
            g_hash.set(zlib.crc32(addr.packed))
            run_opts = _fit(opts, deadline, port, path)
            target = Target(name=host, address=str(addr))
            remaining = max(0.001, deadline - (time.perf_counter() - start))
            try:
                async with asyncio.timeout(remaining):
                    result = await kind.run(target, run_opts, self.ctx)
            except TimeoutError:
                result = ProbeResult.failure("deadline")
            except Exception:
                log.exception("probe raised", extra={"probe": kind.name})
                result = ProbeResult.failure("exception")
        g_success.set(1 if result.success else 0)
        g_duration.set(time.perf_counter() - start)
        _export_result(registry, kind, result)
        self.stats.requests["ok"] += 1
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})


def _fit(opts: CommonOptions, deadline: float, port: int | None, path: str | None
         ) -> CommonOptions:
    """The module's options with the target's port/path, and a timeout that fits the deadline."""
    names = {f.name for f in dataclasses.fields(opts)}
    changes: dict[str, Any] = {}
    if port is not None and "port" in names:
        changes["port"] = port
    if path is not None and "path" in names:
        changes["path"] = path
    fixed = max(0, opts.packets - 1) * opts.spacing
    if opts.run_time() > deadline and deadline - fixed > 0.01:
        changes["timeout"] = deadline - fixed
    return dataclasses.replace(opts, **changes) if changes else opts


def _export_result(registry: CollectorRegistry, kind: ProbeKind[Any], r: ProbeResult) -> None:
    if kind.packet_based or r.rtts:
        answered = [x for x in r.rtts if x is not None]
        Gauge("probe_packets_sent", "Packets sent", registry=registry).set(len(r.rtts))
        Gauge("probe_packets_received", "Packets answered", registry=registry).set(
            len(answered))
        rtt = Gauge("probe_rtt_seconds", "Round-trip times of this run", ["stat"],
                    registry=registry)
        if answered:
            mean = sum(answered) / len(answered)
            rtt.labels("min").set(min(answered))
            rtt.labels("mean").set(mean)
            rtt.labels("max").set(max(answered))
    if r.phases or kind.phases:
        ph = Gauge("probe_phase_duration_seconds", "Seconds per phase", ["phase"],
                   registry=registry)
        for name in dict.fromkeys((*kind.phases, *r.phases)):
            ph.labels(name).set(r.phases.get(name, 0.0))
    fail = Gauge("probe_failed_due_to", "1 for the reason the probe failed", ["reason"],
                 registry=registry)
    for reason in kind.all_reasons:
        fail.labels(reason).set(1 if (not r.success and r.reason == reason) else 0)
    if r.errors:
        errs = Gauge("probe_errors", "Per-packet errors of this run", ["reason"],
                     registry=registry)
        for reason, n in r.errors.items():
            if reason in kind.all_reasons or reason in ("stray", "malformed"):
                errs.labels(reason).set(n)
    for name, value in r.gauges.items():
        if name in kind.gauges:
            Gauge(f"edgeprobe_{name}", kind.gauges[name], registry=registry).set(value)
    if r.info:
        keys = sorted(r.info)
        Gauge("edgeprobe_probe_info", "Facts about the probed endpoint", keys,
              registry=registry).labels(*(r.info[k] for k in keys)).set(1)


def add_probe_route(app: web.Application, cfg: ProbeEndpointConfig,
                    probes: Mapping[str, ProbeKind[Any]], modules: ModuleLookup,
                    ctx: ProbeContext, **kw: Any) -> ProbeEndpoint | None:
    """Mount ``GET /probe`` when ``cfg.enabled``; returns the endpoint (for its stats)."""
    if not cfg.enabled:
        return None
    errs = cfg.validate()
    if errs:
        raise ValueError("; ".join(map(str, errs)))
    ep = ProbeEndpoint(cfg, probes, modules, ctx, **kw)
    app.router.add_get("/probe", ep.handle)
    return ep


def modules_from_defaults(defaults: Mapping[str, CommonOptions],
                          extra: Mapping[str, tuple[str, CommonOptions]] | None = None
                          ) -> ModuleLookup:
    """A lookup where each probe kind is a module of its own name (``module=icmp``) with the
    agent's defaults, plus named modules (``module=tcp_443``)."""
    table: dict[str, tuple[str, CommonOptions]] = {k: (k, v) for k, v in defaults.items()}
    table.update(extra or {})
    return table.get


