"""STUN probe: a paced train of RFC 8489 Binding requests over UDP, matched by transaction ID.

This is the first packet exchange of ICE, and the one whose loss costs an RTC session the most
(RFC 8489 §6.2.1: RTO >= 500 ms before the retransmit). Each request carries SOFTWARE and
FINGERPRINT, is sent exactly once (§6.2.1: an RTT from a retransmitted transaction is
ambiguous, and here a miss is the loss we measure), and at most 10 are outstanding (§6.2).

Codec: ``aioice.stun`` (Message, parse_message). It is maintained, typed, already a dependency,
and checks the length and FINGERPRINT on parse; we add what a prober needs on top: the magic
cookie check (it does not check it), the transaction ID match, and the method/class check.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from aioice import stun

from probes.base import CommonOptions, ProbeContext, ProbeKind, ProbeResult, Target
from probes.net.resolve import Resolver
from probes.net.sockets import (
    NET_REASONS,
    Endpoint,
    ProbeFailed,
    SocketOptions,
    connected_udp,
    resolve,
)
from probes.net.train import TrainResult, run_train

SOFTWARE = "edgeprobe"
MAX_INFLIGHT = 10  # RFC 8489 §6.2: at most 10 outstanding to one server


@dataclass(frozen=True)
class StunOptions(SocketOptions):
    interval: float = 5.0
    port: int = 3478
    packets: int = 10


def binding_request() -> stun.Message:
    msg = stun.Message(stun.Method.BINDING, stun.Class.REQUEST, attributes={"SOFTWARE": SOFTWARE})
    msg.add_fingerprint()
    return msg


def classify(data: bytes, pending: dict[bytes, int]) -> tuple[int | str, stun.Message | None]:
    """(index in the train, parsed message), or (bounded stray reason, None)."""
    if len(data) < stun.HEADER_LENGTH:
        return "malformed", None
    mtype, _, cookie, txid = struct.unpack_from("!HHI12s", data)
    if mtype & 0xC000:
        return "not_stun", None  # the two top bits of every STUN message are zero
    if cookie != stun.COOKIE:
        return "bad_cookie", None
    if txid not in pending:
        return "unknown_txid", None
    try:
        msg = stun.parse_message(data)
    except ValueError as e:
        return ("bad_fingerprint" if "fingerprint" in str(e) else "malformed"), None
    except (struct.error, IndexError, KeyError):
        return "malformed", None
    if msg.message_method != stun.Method.BINDING:
        return "wrong_method", None
    if msg.message_class == stun.Class.ERROR:
        return "error_response", None
    if msg.message_class != stun.Class.RESPONSE:
        return "wrong_class", None
    return pending[txid], msg


def _family_of(msg: stun.Message) -> str:
    addr = msg.attributes.get("XOR-MAPPED-ADDRESS")
    if not addr:
        return "none"
    return "ipv6" if ":" in str(addr[0]) else "ipv4"


async def binding_train(
    ep: Endpoint,
    port: int,
    opts: CommonOptions,
    count: int,
    spacing: float,
    timeout: float,
    ctx: ProbeContext,
) -> tuple[TrainResult, str]:
    """Send ``count`` Binding requests; (train result, mapped address family)."""
    requests = [binding_request() for _ in range(count)]
    pending = {m.transaction_id: i for i, m in enumerate(requests)}
    mapped = {"family": "none"}

    def match(data: bytes) -> int | str:
        idx, msg = classify(data, pending)
        if msg is not None and mapped["family"] == "none":
            mapped["family"] = _family_of(msg)
        return idx

    sock = connected_udp(ep, port, opts, "stun_unreachable")
    try:
        res = await run_train(
            sock, [bytes(m) for m in requests], spacing, timeout, match, "stun", ctx, MAX_INFLIGHT
        )
    finally:
        sock.close()
    return res, mapped["family"]


async def run(target: Target, opts: StunOptions, ctx: ProbeContext) -> ProbeResult:
    t0 = time.perf_counter_ns()
    try:
        ep = await resolve(target.address, opts, ctx)
        res, family = await binding_train(
            ep, opts.port, opts, opts.packets, opts.spacing, opts.timeout, ctx
        )
    except ProbeFailed as e:
        return ProbeResult.failure(e.reason, (time.perf_counter_ns() - t0) / 1e9)
    return res.probe_result(
        (time.perf_counter_ns() - t0) / 1e9,
        "stun",
        stray_errors=("error_response",),
        info={"mapped_family": family},
    )


REASONS: tuple[str, ...] = (
    "stun_timeout",
    "stun_refused",
    "stun_unreachable",
    "reordered",
    "duplicate",
    "error_response",
    *NET_REASONS,
)

KIND = ProbeKind(
    name="stun",
    options=StunOptions,
    run=run,
    packet_based=True,
    reasons=REASONS,
    stray_reasons=(
        "malformed",
        "not_stun",
        "bad_cookie",
        "unknown_txid",
        "bad_fingerprint",
        "wrong_method",
        "wrong_class",
        "error_response",
        "duplicate",
        "late",
        "unknown",
    ),
    info_labels=("mapped_family",),
    needs=(Resolver,),
)
