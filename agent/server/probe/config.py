"""The ``probe_endpoint`` config section and the address categories it allows or refuses
(loopback, private, metadata, documentation ..., and IPv6 forms that embed them)."""

from __future__ import annotations

import ipaddress
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from agent.config.decode import Duration, Problem
from agent.config.rules import is_host

log = logging.getLogger("edgeprobe.probe_endpoint")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Most specific first: the first matching range names the category.
SPECIAL_RANGES: tuple[tuple[str, str], ...] = (
    ("metadata", "169.254.169.254/32"),  # AWS, GCP, Azure, OpenStack, ...
    ("metadata", "169.254.170.2/32"),  # AWS ECS task metadata
    ("metadata", "100.100.100.200/32"),  # Alibaba Cloud
    ("metadata", "fd00:ec2::254/128"),  # AWS IMDS over IPv6
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
    ("private", "fec0::/10"),  # deprecated site-local
    ("private", "64:ff9b:1::/48"),  # local-use NAT64
    ("cgnat", "100.64.0.0/10"),
    ("multicast", "224.0.0.0/4"),
    ("multicast", "ff00::/8"),
    ("documentation", "192.0.2.0/24"),
    ("documentation", "198.51.100.0/24"),
    ("documentation", "203.0.113.0/24"),
    ("documentation", "2001:db8::/32"),
    ("documentation", "3fff::/20"),
    ("reserved", "192.0.0.0/24"),  # IETF protocol assignments
    ("reserved", "198.18.0.0/15"),  # benchmarking
    ("reserved", "240.0.0.0/4"),  # includes 255.255.255.255
    ("reserved", "100::/64"),  # discard-only
    ("reserved", "2001::/23"),  # IETF protocol assignments, incl. Teredo
    ("reserved", "::/96"),  # IPv4-compatible (deprecated)
)
CATEGORIES: tuple[str, ...] = tuple(dict.fromkeys(c for c, _ in SPECIAL_RANGES))
_RANGES: tuple[tuple[str, IPNetwork], ...] = tuple(
    (c, ipaddress.ip_network(n)) for c, n in SPECIAL_RANGES
)
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
    """The ``probe_endpoint`` config section (decoded strictly by agent.config.decode)."""

    enabled: bool = False
    allow_names: tuple[str, ...] = ()  # "edge-sg-1.example.net", "*.example.net"
    allow_cidrs: tuple[str, ...] = ()  # "198.51.100.0/24", "2001:db8::/32"
    allow_special: tuple[str, ...] = ()  # categories from CATEGORIES
    allow_wide_cidrs: bool = False  # opt-in for CIDRs wider than WIDE_PREFIX
    rate: float = 1.0  # requests per second per client
    burst: int = 5
    max_clients: int = 4096  # bucket table size (memory bound)
    max_concurrent: int = 16  # probes in flight, all clients together
    timeout: Duration = Duration(10.0)  # upper bound for one request
    timeout_offset: Duration = Duration(0.5)  # kept free of the scrape timeout (blackbox)
    resolve_timeout: Duration = Duration(5.0)  # one name lookup (within the request's)

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
                errs.append(
                    Problem(
                        "allow_special", f"unknown category {c!r}; one of " + ", ".join(CATEGORIES)
                    )
                )
        for n in self.allow_names:
            bare = n[2:] if n.startswith("*.") else n
            if not bare or "*" in bare or not is_host_name(bare):
                errs.append(Problem("allow_names", f"invalid name pattern {n!r}"))
        for c in self.allow_cidrs:
            try:
                net = ipaddress.ip_network(c, strict=True)
            except ValueError as e:
                errs.append(Problem("allow_cidrs", str(e)))
                continue
            if net.prefixlen < WIDE_PREFIX[net.version] and not self.allow_wide_cidrs:
                errs.append(
                    Problem(
                        "allow_cidrs",
                        f"{c} is wider than /{WIDE_PREFIX[4]} (IPv4) "
                        f"or /{WIDE_PREFIX[6]} (IPv6); set allow_wide_cidrs: true "
                        "to allow it",
                    )
                )
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
            errs.append(
                Problem("allow_names", "an enabled /probe needs allow_names or allow_cidrs")
            )
        return errs


def is_host_name(name: str) -> bool:
    """A DNS name (:func:`agent.config.rules.is_host`), not an IPv6 literal."""
    return is_host(name) and ":" not in name
