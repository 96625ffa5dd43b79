"""ICMP echo probe (placeholder until the shared-socket engine lands)."""

from __future__ import annotations

from dataclasses import dataclass

from probes.base import CommonOptions, ProbeContext, ProbeKind, ProbeResult, Target


class IcmpEngines:
    pass


@dataclass(frozen=True)
class IcmpOptions(CommonOptions):
    packets: int = 5


async def run(target: Target, opts: IcmpOptions, ctx: ProbeContext) -> ProbeResult:
    return ProbeResult.failure("exception")


KIND = ProbeKind(name="icmp", options=IcmpOptions, run=run, packet_based=True)
