"""Name resolution with a cache that is refreshed periodically, never on the probe's hot path.

A name that stops resolving keeps its last good address for a grace period (one more refresh
interval), because one failed lookup should not blank an edge's series; after that it is a
counted ``resolve_failed``. IP literals never touch the resolver.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Self

from probes.base import Counters, Failed, IpFamily


class ResolveError(Failed):
    """A name did not resolve. ``reason`` is bounded: resolve_failed or resolve_empty."""


@dataclass(frozen=True)
class ResolvedAddress:
    address: str
    family: int  # socket.AF_INET or socket.AF_INET6


@functools.lru_cache(maxsize=65536)
def literal(host: str) -> ResolvedAddress | None:
    """The address, in canonical form, if ``host`` is an IP literal (brackets and zone ids
    tolerated). Cached: every probe run of a literal target asks, and parsing is not free."""
    h = host.strip("[]")
    addr, pct, zone = h.partition("%")
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    return ResolvedAddress(
        str(ip) + pct + zone, socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    )


def _pick(infos: list[tuple[int, str]], family: IpFamily) -> ResolvedAddress | None:
    want = {
        "ipv4": (socket.AF_INET,),
        "ipv6": (socket.AF_INET6,),
        "auto": (socket.AF_INET, socket.AF_INET6),
    }[family]
    for fam in want:
        for f, addr in infos:
            if f == fam:
                return ResolvedAddress(addr, f)
    return None


@dataclass
class _Entry:
    infos: list[tuple[int, str]]
    fetched: float  # monotonic seconds of the last successful lookup
    failed_since: float | None = None


class Resolver:
    """Caches getaddrinfo answers per name for ``ttl`` seconds (a shared resource: see
    ``probes.base.Resource``)."""

    def __init__(self, ttl: float = 60.0, lookup_timeout: float = 5.0) -> None:
        self.ttl = ttl
        self.lookup_timeout = lookup_timeout
        self._cache: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Future[list[tuple[int, str]]]] = {}
        self.lookups = 0
        self.failures = 0

    @classmethod
    def create(cls, counters: Counters) -> Self:
        return cls()

    def configure(self, settings: Any, targets: Collection[str]) -> None:
        """Refresh every ``settings.resolve_interval``; forget the names not in ``targets``."""
        self.ttl = settings.resolve_interval
        self.forget(set(targets))

    def open(self) -> None:
        return None

    def info(self) -> Mapping[str, str]:
        return {}

    def close(self) -> None:
        return None

    async def _lookup(self, host: str) -> list[tuple[int, str]]:
        loop = asyncio.get_running_loop()
        self.lookups += 1
        async with asyncio.timeout(self.lookup_timeout):
            res = await loop.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
        out: list[tuple[int, str]] = []
        for fam, _, _, _, sa in res:
            if fam in (socket.AF_INET, socket.AF_INET6) and (fam, str(sa[0])) not in out:
                out.append((fam, str(sa[0])))
        return out

    async def _refresh(self, host: str) -> list[tuple[int, str]]:
        # Coalesce concurrent lookups of one name (many kinds probe the same edge).
        fut = self._inflight.get(host)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[host] = fut
        try:
            infos = await self._lookup(host)
            fut.set_result(infos)
            return infos
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved; waiters get it via shield
            raise
        finally:
            del self._inflight[host]

    async def resolve(self, host: str, family: IpFamily = "auto") -> ResolvedAddress:
        lit = literal(host)
        if lit is not None:
            if (family == "ipv4" and lit.family != socket.AF_INET) or (
                family == "ipv6" and lit.family != socket.AF_INET6
            ):
                raise ResolveError("resolve_empty")
            return lit
        now = time.monotonic()
        entry = self._cache.get(host)
        if entry is None or now - entry.fetched >= self.ttl:
            try:
                infos = await self._refresh(host)
            except (OSError, TimeoutError, UnicodeError, ValueError):
                self.failures += 1
                if entry is not None and now - entry.fetched < 2 * self.ttl:
                    entry.failed_since = entry.failed_since or now
                    infos = entry.infos
                else:
                    self._cache.pop(host, None)
                    raise ResolveError("resolve_failed") from None
            else:
                entry = _Entry(infos, now)
                self._cache[host] = entry
        picked = _pick(entry.infos, family)
        if picked is None:
            raise ResolveError("resolve_empty")
        return picked

    def cached(self, host: str, family: IpFamily = "auto") -> ResolvedAddress | None:
        """What ``resolve`` would return without a lookup or an error, else None."""
        lit = literal(host)
        if lit is not None:
            ok = family == "auto" or (family == "ipv6") == (lit.family == socket.AF_INET6)
            return lit if ok else None
        entry = self._cache.get(host)
        if entry is None or time.monotonic() - entry.fetched >= self.ttl:
            return None
        return _pick(entry.infos, family)

    def forget(self, keep: set[str]) -> None:
        """Drop cache entries for names no longer configured (bounded memory across reloads)."""
        for host in list(self._cache):
            if host not in keep:
                del self._cache[host]
