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
import logging
import math
import socket
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agent.export import catalog as C
from agent.server.probe.config import IPAddress, ProbeEndpointConfig
from agent.server.probe.policy import Refused, TargetPolicy, _ip, credential_fields, parse_target
from agent.server.probe.resolver import DnsResolver, ModuleLookup, Resolver
from agent.server.ratelimit import ClientLimiter
from probes.base import CommonOptions, ProbeContext, ProbeKind, ProbeResult, Target

log = logging.getLogger("edgeprobe.probe_endpoint")


@dataclass
class ProbeEndpointStats:
    """Counts for the agent's own /metrics (bounded labels: outcome only)."""

    requests: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "ok",
                "invalid",
                "unknown_module",
                "credentials",
                "allowlist",
                "special",
                "rate_limited",
                "busy",
            ),
            0,
        )
    )


class ProbeEndpoint:
    def __init__(
        self,
        cfg: ProbeEndpointConfig,
        probes: Mapping[str, ProbeKind[Any]],
        modules: ModuleLookup,
        ctx: ProbeContext,
        *,
        resolver: Resolver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.probes = probes
        self.modules = modules
        self.ctx = ctx
        self.resolver: Resolver = (
            resolver
            if resolver is not None
            else DnsResolver(cfg.max_concurrent, float(cfg.resolve_timeout))
        )
        self.policy = TargetPolicy(cfg)
        self.limiter = ClientLimiter(cfg.rate, cfg.burst, cfg.max_clients, clock)
        self.in_flight = 0
        self.stats = ProbeEndpointStats()
        if cfg.wide_networks:
            log.warning(
                "/probe allows wide address ranges (allow_wide_cidrs): any host in "
                "them may be probed through this agent",
                extra={"cidrs": ",".join(str(n) for n in cfg.wide_networks)},
            )

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        """Register the endpoint on the agent's registry for request counts by outcome."""
        c = C.metric_family(C.PE_REQUESTS)
        for outcome, n in self.stats.requests.items():
            c.add_metric([outcome], n)
        yield c

    async def handle(self, request: web.Request) -> web.Response:
        try:
            return await self._handle(request)
        except Refused as r:
            self.stats.requests[r.why] += 1
            log.debug("probe refused", extra={"why": r.why, "remote": request.remote or ""})
            headers = (
                {"Retry-After": str(max(1, math.ceil(1 / self.cfg.rate)))}
                if r.status == 429
                else None
            )
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
                raise Refused(
                    400, "invalid X-Prometheus-Scrape-Timeout-Seconds", "invalid"
                ) from None
            if not (math.isfinite(scrape) and scrape > 0):
                raise Refused(400, "invalid X-Prometheus-Scrape-Timeout-Seconds", "invalid")
            # Leave the offset for the response to travel back; never go below half the
            # scrape timeout, or a short scrape timeout would leave no time to probe at all.
            limit = min(limit, max(scrape - self.cfg.timeout_offset, scrape / 2))
        return limit

    async def _run(
        self,
        kind: ProbeKind[Any],
        opts: CommonOptions,
        raw_target: str,
        host: str,
        literal: IPAddress | None,
        port: int | None,
        path: str | None,
        deadline: float,
    ) -> web.Response:
        start = time.perf_counter()
        registry = CollectorRegistry(auto_describe=True)
        g_success, g_duration, g_dns, g_proto, g_hash = (
            _gauge(registry, f)
            for f in (C.P_SUCCESS, C.P_DURATION, C.P_DNS, C.P_IP_PROTOCOL, C.P_IP_HASH)
        )

        family = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}.get(
            opts.ip_family, socket.AF_UNSPEC
        )
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
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


def _fit(opts: CommonOptions, deadline: float, port: int | None, path: str | None) -> CommonOptions:
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


def _gauge(registry: CollectorRegistry, spec: C.Family, labels: Sequence[str] = ()) -> Gauge:
    """A gauge of the response, named and described by the catalog."""
    return Gauge(spec.name, spec.help, list(labels or spec.labels), registry=registry)


def _export_result(registry: CollectorRegistry, kind: ProbeKind[Any], r: ProbeResult) -> None:
    if kind.packet_based or r.rtts:
        answered = [x for x in r.rtts if x is not None]
        _gauge(registry, C.P_SENT).set(len(r.rtts))
        _gauge(registry, C.P_RECEIVED).set(len(answered))
        rtt = _gauge(registry, C.P_RTT)
        if answered:
            mean = sum(answered) / len(answered)
            rtt.labels("min").set(min(answered))
            rtt.labels("mean").set(mean)
            rtt.labels("max").set(max(answered))
    if r.phases or kind.phases:
        ph = _gauge(registry, C.P_PHASES)
        for name in dict.fromkeys((*kind.phases, *r.phases)):
            ph.labels(name).set(r.phases.get(name, 0.0))
    fail = _gauge(registry, C.P_FAILED)
    for reason in kind.all_reasons:
        fail.labels(reason).set(1 if (not r.success and r.reason == reason) else 0)
    if r.errors:
        errs = _gauge(registry, C.P_ERRORS)
        for reason, n in r.errors.items():
            if reason in kind.all_reasons or reason in ("stray", "malformed"):
                errs.labels(reason).set(n)
    for name, value in r.gauges.items():
        if name in kind.gauges:
            _gauge(registry, C.kind_gauge(kind, name)).set(value)
    if r.info:
        keys = sorted(r.info)
        _gauge(registry, C.P_INFO, keys).labels(*(r.info[k] for k in keys)).set(1)


def mount(app: web.Application, endpoint: Callable[[], ProbeEndpoint | None]) -> None:
    """Route ``GET /probe`` to ``endpoint()``, looked up per request (a reload may enable,
    disable or reconfigure it); 404 while it is None."""

    async def probe(request: web.Request) -> web.Response:
        ep = endpoint()
        if ep is None:
            return web.Response(status=404, text="/probe is disabled (probe_endpoint.enabled)\n")
        return await ep.handle(request)

    app.router.add_get("/probe", probe)


def add_probe_route(
    app: web.Application,
    cfg: ProbeEndpointConfig,
    probes: Mapping[str, ProbeKind[Any]],
    modules: ModuleLookup,
    ctx: ProbeContext,
    **kw: Any,
) -> ProbeEndpoint | None:
    """Mount ``GET /probe`` with a fixed endpoint when ``cfg.enabled``; returns the endpoint
    (for its stats)."""
    if not cfg.enabled:
        return None
    errs = cfg.validate()
    if errs:
        raise ValueError("; ".join(map(str, errs)))
    ep = ProbeEndpoint(cfg, probes, modules, ctx, **kw)
    mount(app, lambda: ep)
    return ep


def modules_from_defaults(
    defaults: Mapping[str, CommonOptions],
    extra: Mapping[str, tuple[str, CommonOptions]] | None = None,
) -> ModuleLookup:
    """A lookup where each probe kind is a module of its own name (``module=icmp``) with the
    agent's defaults, plus named modules (``module=tcp_443``)."""
    table: dict[str, tuple[str, CommonOptions]] = {k: (k, v) for k, v in defaults.items()}
    table.update(extra or {})
    return table.get
