"""``dns_sd``: targets from DNS SRV records, per name; a failed name keeps its last good list."""

from __future__ import annotations

import asyncio

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from agent.discovery.config import DnsSDConfig, split_server
from agent.discovery.groups import DiscoveredTarget, SDError
from agent.discovery.source import Source, outcome
from probes.base import Target


class DnsSD(Source):
    kind = "dns_sd"

    def __init__(self, cfg: DnsSDConfig) -> None:
        super().__init__(cfg.name, cfg.refresh_interval)
        self.cfg = cfg
        if cfg.server:
            host, port = split_server(cfg.server)
            self.resolver = dns.asyncresolver.Resolver(configure=False)
            self.resolver.nameservers = [host]
            self.resolver.port = port
        else:
            self.resolver = dns.asyncresolver.Resolver()
        self._last_good: dict[str, list[DiscoveredTarget]] = {}

    async def _query(self, name: str) -> list[DiscoveredTarget]:
        try:
            ans = await self.resolver.resolve(name, "SRV", lifetime=self.cfg.timeout, search=False)
        except dns.resolver.NXDOMAIN:
            raise SDError("nxdomain", f"{name}: no such name") from None
        except dns.resolver.NoAnswer:
            raise SDError("no_answer", f"{name}: no SRV records") from None
        except dns.exception.Timeout:
            raise SDError("timeout", f"{name}: no answer within {self.cfg.timeout:g}s") from None
        except (dns.exception.DNSException, OSError) as e:
            raise SDError("dns_error", f"{name}: {type(e).__name__}") from None
        out: list[DiscoveredTarget] = []
        for rr in sorted(ans, key=lambda r: (r.priority, -r.weight, str(r.target), r.port)):
            if rr.rdtype != dns.rdatatype.SRV:
                continue
            host = rr.target.to_text(omit_final_dot=True)
            if host in ("", "."):
                continue  # RFC 2782: "." means the service is decidedly not available
            out.append(
                DiscoveredTarget(
                    Target(name=host, address=host, labels={}),
                    probes=self.cfg.probes,
                    port=int(rr.port),
                    source=self.cfg.name,
                )
            )
        return out

    async def refresh(self) -> list[DiscoveredTarget]:
        errors: list[SDError] = []
        results = await asyncio.gather(
            *(self._query(n) for n in self.cfg.names), return_exceptions=True
        )
        for n, res in zip(self.cfg.names, results, strict=True):
            if isinstance(res, SDError):
                errors.append(res)
            elif isinstance(res, BaseException):
                raise res
            else:
                self._last_good[n] = res
        merged: list[DiscoveredTarget] = []
        seen: set[str] = set()
        for n in self.cfg.names:
            for t in self._last_good.get(n, []):
                # The same host under two names or ports: first (by priority) wins.
                if t.target.name not in seen:
                    seen.add(t.target.name)
                    merged.append(t)
        return outcome(merged, errors, self.cfg.max_targets)
