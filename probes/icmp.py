"""ICMP echo probe: ``packets`` echo requests ``spacing`` apart to each target, over the
agent's shared ICMP sockets (``probes.net.icmp``, which says how replies are matched and timed).

A run is started from a timer callback (``start``) when the address is known without a lookup,
else awaited (``run``); both report the same result.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from probes.base import (
    CommonOptions,
    ProbeContext,
    ProbeKind,
    ProbeResult,
    RunHandle,
    Target,
)
from probes.net.icmp import STRAY_REASONS, IcmpEngines, Train
from probes.net.resolve import ResolveError, Resolver, literal
from probes.net.sockets import ProbeFailed

REASONS = ("timeout", "unreachable", "ttl_exceeded", "send_error", "socket_unavailable", "overload")


@dataclass(frozen=True)
class IcmpOptions(CommonOptions):
    # 5 packets 20 ms apart each second; a 900 ms timeout lets the run end inside its interval.
    packets: int = 5
    timeout: float = 0.9
    ttl: int = 64

    def validate(self) -> list[str]:
        errs = super().validate()
        if not 1 <= self.ttl <= 255:
            errs.append("ttl: must be between 1 and 255")
        return errs


async def resolve_target(
    target: Target, opts: CommonOptions, ctx: ProbeContext
) -> tuple[str, int] | str:
    """(address, family), or a bounded failure reason."""
    resolver = ctx.resources.get(Resolver) or Resolver()
    try:
        r = await resolver.resolve(target.address, opts.ip_family)
    except ResolveError as e:
        return e.reason
    return r.address, r.family


async def run(target: Target, opts: IcmpOptions, ctx: ProbeContext) -> ProbeResult:
    t0 = time.monotonic()
    resolved = await resolve_target(target, opts, ctx)
    if isinstance(resolved, str):
        return ProbeResult.failure(resolved, time.monotonic() - t0)
    address, family = resolved
    engines = ctx.resources.get(IcmpEngines)
    try:
        engine = engines.get(family) if engines is not None else None
    except ProbeFailed as e:
        return ProbeResult.failure(e.reason, time.monotonic() - t0)
    if engine is None:
        return ProbeResult.failure("socket_unavailable", time.monotonic() - t0)
    out = await engine.ping(
        address, opts.packets, opts.spacing, opts.timeout, opts.payload_size, opts.tos, opts.ttl
    )
    return _result(out.rtts, out.ids, out.errors, time.monotonic() - t0)


def start(
    target: Target, opts: IcmpOptions, ctx: ProbeContext, done: Callable[[ProbeResult | None], None]
) -> RunHandle | None:
    """The callback form of ``run``: send now, deliver the result to ``done`` (None if the
    engine closed under the run). None when this run needs ``run`` instead: a name to look
    up, or an error that ``run`` reports."""
    engines = ctx.resources.get(IcmpEngines)
    if engines is None:
        return None
    resolved = literal(target.address)
    if resolved is None:
        resolver = ctx.resources.get(Resolver)
        resolved = resolver.cached(target.address, opts.ip_family) if resolver else None
        if resolved is None:
            return None
    elif opts.ip_family != "auto" and (opts.ip_family == "ipv6") != (
        resolved.family == socket.AF_INET6
    ):
        return None
    try:
        engine = engines.get(resolved.family)
    except ProbeFailed:
        return None  # run tries again and reports it
    if engine is None:
        return None
    t0 = time.monotonic()

    def finished(r: Train) -> None:
        done(None if r.abandoned else _result(r.rtts, r.ids, r.errors, time.monotonic() - t0))

    # resolved.address is already canonical: the engine need not parse it again.
    return engine.start_canonical(
        resolved.address,
        opts.packets,
        opts.spacing,
        opts.timeout,
        opts.payload_size,
        opts.tos,
        opts.ttl,
        finished,
    )


def _result(
    rtts: list[float | None], ids: list[int], errs: list[str | None], duration: float
) -> ProbeResult:
    errors: dict[str, int] = {}
    answered = 0
    for r, e in zip(rtts, errs, strict=True):
        if r is not None:
            answered += 1
        if e is not None:
            errors[e] = errors.get(e, 0) + 1
    reason = "ok"
    if not answered:
        reason = max(errors, key=lambda k: errors[k]) if errors else "timeout"
    errors.pop("timeout", None)  # plain loss is counted by packets_lost_total, not as an error
    return ProbeResult(
        success=answered > 0,
        reason=reason,
        duration=duration,
        rtts=rtts,
        packet_ids=ids,
        errors=errors,
    )


KIND = ProbeKind(
    name="icmp",
    options=IcmpOptions,
    run=run,
    packet_based=True,
    reasons=REASONS,
    stray_reasons=STRAY_REASONS,
    self_bounded=True,
    start=start,
    needs=(IcmpEngines, Resolver),
)
