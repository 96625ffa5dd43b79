"""Relay probe: a paced media-like UDP stream through a TURN relay, echoed on the edge.

What a relayed call experiences, where ICMP to the edge says nothing about the relay:

1. An authenticated TURN Allocate (``probes.turn``; phases ``challenge`` and ``allocate``).
2. A ChannelBind (RFC 8656 §11) of channel 0x4000 to the reflector, a UDP echo on the edge
   (``peer_address``, default the relayed address's IP; ``peer_port``, default 7), which also
   installs the permission (phase ``bind``).
3. The stream: ``packets`` ChannelData messages of ``payload_size`` bytes, ``spacing`` apart
   (default 250 × 200 bytes at 50 packets/s, 5 s: an audio-like flow), each echoed by the
   reflector back through the relay. Each packet carries a per-run nonce and its sequence
   number and is sent once, so the existing packet families get a loss (RFC 7680), loss bursts
   (RFC 3357), the RFC 3550 jitter estimator over round trips, IPDV and RTT of the relayed
   path, client → TURN → reflector → TURN → client.
4. The allocation is released (Refresh, LIFETIME 0) on every outcome.

The password comes from ``password`` or ``password_file`` (as for ``turn``) and is never
logged, exported or put in a reason.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from aioice import stun

from probes.base import ProbeContext, ProbeKind, ProbeResult, Target
from probes.net.resolve import Resolver
from probes.net.sockets import NET_REASONS, ProbeFailed, check_ports
from probes.net.train import Stamp, check_max_inflight, run_train
from probes.turn import TURN_REASONS, TurnOptions, open_target

CHANNEL = 0x4000  # the first channel number (RFC 8656 §12)
_CHANNEL_HEADER = struct.Struct("!HH")  # channel number, length
_MAGIC = b"EPRL"


@dataclass(frozen=True)
class RelayOptions(TurnOptions):
    interval: float = 30.0
    timeout: float = 1.0  # per TURN exchange, and per stream packet
    packets: int = 250
    spacing: float = 0.02  # 50 packets/s
    payload_size: int = 200
    peer_address: str = ""  # the reflector; "" = the relayed address's IP
    peer_port: int = 7
    max_inflight: int = 1000

    def run_time(self) -> float:
        # Challenge, Allocate, ChannelBind and the release, then the stream.
        return 4 * self.timeout + super().run_time()

    def validate(self) -> list[str]:
        errs = super().validate() + check_ports(self, "peer_port")
        errs += Stamp.check_size(self.payload_size)
        if self.payload_size > 1200:
            errs.append(
                "payload_size: must be <= 1200 (a media packet, under the path MTU "
                "with the ChannelData and IP headers)"
            )
        return errs + check_max_inflight(self.max_inflight)


async def run(target: Target, opts: RelayOptions, ctx: ProbeContext) -> ProbeResult:
    t0 = time.perf_counter_ns()
    stamp = Stamp(_MAGIC)
    payloads = stamp.payloads(opts.packets, opts.payload_size)
    frames = [_CHANNEL_HEADER.pack(CHANNEL, len(p)) + p for p in payloads]

    def match(data: bytes) -> int | str:
        if len(data) < _CHANNEL_HEADER.size + Stamp.HEADER.size:
            return "malformed"  # also the server's STUN messages (a Refresh answer...)
        channel, length = _CHANNEL_HEADER.unpack_from(data)
        if channel != CHANNEL or length != opts.payload_size:
            return "foreign"
        seq = stamp.match(data, _CHANNEL_HEADER.size)
        if isinstance(seq, int) and (seq >= len(frames) or data[: len(frames[seq])] != frames[seq]):
            return "corrupt"
        return seq

    phases: dict[str, float] = {}
    try:
        a = await open_target(target, opts, ctx)
    except ProbeFailed as e:
        return ProbeResult.failure(e.reason, (time.perf_counter_ns() - t0) / 1e9)
    phases = {"challenge": a.allocation.challenge, "allocate": a.allocation.allocate}
    try:
        peer = opts.peer_address or (a.relayed[0] if a.relayed else "")
        if not peer:
            raise ProbeFailed("relay_no_address")
        t = time.perf_counter_ns()
        resp = await a.request(
            stun.Method.CHANNEL_BIND,
            {"CHANNEL-NUMBER": CHANNEL, "XOR-PEER-ADDRESS": (peer, opts.peer_port)},
        )
        if resp.message_class != stun.Class.RESPONSE:
            raise ProbeFailed("relay_bind_failed")
        phases["bind"] = (time.perf_counter_ns() - t) / 1e9
        res = await run_train(
            a.sock, frames, opts.spacing, opts.timeout, match, "relay", ctx, opts.max_inflight
        )
    except ProbeFailed as e:
        return ProbeResult.failure(
            e.reason,
            (time.perf_counter_ns() - t0) / 1e9,
            phases=phases,
            info={"relayed_family": a.allocation.relayed_family},
        )
    finally:
        await a.release()
    # The kind declares no relay_refused: a stream nothing answered is relay_timeout.
    return res.probe_result(
        (time.perf_counter_ns() - t0) / 1e9,
        "relay",
        count_refused=False,
        phases=phases,
        info={"relayed_family": a.allocation.relayed_family},
    )


REASONS: tuple[str, ...] = (
    *TURN_REASONS,
    "relay_no_address",
    "relay_bind_failed",
    "relay_timeout",
    "reordered",
    "duplicate",
    *NET_REASONS,
)

KIND = ProbeKind(
    name="relay",
    options=RelayOptions,
    run=run,
    packet_based=True,
    phases=("challenge", "allocate", "bind"),
    reasons=REASONS,
    stray_reasons=(
        "malformed",
        "foreign",
        "corrupt",
        "duplicate",
        "late",
        "unknown",
        "bad_cookie",
        "unknown_txid",
    ),
    info_labels=("relayed_family",),
    needs=(Resolver,),
)
