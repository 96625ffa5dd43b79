"""The forwarder's ground truth: what it really did to every packet, and summaries of it.

The file is a flat sequence of fixed-size little-endian records (``RECORD``), written in
batches to tmpfs. Times are CLOCK_MONOTONIC nanoseconds, the same clock as
``time.monotonic_ns()`` in any process on this machine (network namespaces share it), so an
agent's own timestamps can be compared with them directly.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from agent.runtime.stats import quantile as sorted_quantile
from lab import packet

RECORD = struct.Struct("<BBBBBBH16s16sHHqqq")

UP, DOWN = 0, 1  # agent -> edge, edge -> agent
DELIVERED, DROPPED, EXPIRED, GENERATED, UNROUTABLE = 0, 1, 2, 3, 4
STATUS_NAMES = ("delivered", "dropped", "expired", "generated", "unroutable")


class Record(NamedTuple):
    direction: int  # UP or DOWN
    status: int  # DELIVERED, DROPPED (random/bursty/hop loss), EXPIRED (TTL ran out
    # at a hop), GENERATED (a hop's ICMP Time Exceeded), UNROUTABLE
    proto: int  # IP protocol number
    icmp_type: int  # 255 when not ICMP
    version: int  # 4 or 6
    hop: int  # 1-based hop where dropped/expired/generated; 0 = end-to-end path
    region: int  # region index (see the meta file)
    src: bytes  # 4 or 16 bytes (IPv4 zero-padded to 16 in the file)
    dst: bytes
    a: int  # ICMP identifier, or source port
    b: int  # ICMP sequence number, or destination port
    arrival_ns: int  # read from the TUN device
    intended_ns: int  # when the impairment said it should leave (0 when dropped)
    actual_ns: int  # when it was written to the other TUN device (0 when not sent)

    @property
    def delivered(self) -> bool:
        return self.status in (DELIVERED, GENERATED)

    @property
    def delay_ns(self) -> int:
        """The one-way delay the forwarder really imposed (actual release - arrival)."""
        return self.actual_ns - self.arrival_ns

    @property
    def src_ip(self) -> str:
        return ip_str(self.src)

    @property
    def dst_ip(self) -> str:
        return ip_str(self.dst)


def ip_str(raw: bytes) -> str:
    import ipaddress

    return str(ipaddress.ip_address(raw))


def ip_bytes(addr: str) -> bytes:
    import ipaddress

    return ipaddress.ip_address(addr).packed


class Writer:
    """Appends records to the truth file in batches: a write to tmpfs is a memcpy, but one
    per packet would still cost a syscall in the forwarder's hot loop."""

    def __init__(self, path: str | os.PathLike[str], batch: int = 512) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._buf = bytearray()
        self._pending = 0
        self._batch = batch
        self.records = 0

    def add(
        self,
        direction: int,
        status: int,
        info: packet.Info,
        hop: int,
        region: int,
        arrival_ns: int,
        intended_ns: int,
        actual_ns: int,
    ) -> None:
        self._buf += RECORD.pack(
            direction,
            status,
            info.proto,
            info.icmp_type,
            info.version,
            hop,
            region,
            info.src,
            info.dst,
            info.a,
            info.b,
            arrival_ns,
            intended_ns,
            actual_ns,
        )
        self._pending += 1
        self.records += 1
        if self._pending >= self._batch:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            os.write(self._fd, self._buf)
            self._buf.clear()
            self._pending = 0

    def close(self) -> None:
        self.flush()
        os.close(self._fd)


def read(path: str | os.PathLike[str]) -> list[Record]:
    """All complete records in a truth file (a partial trailing record is ignored)."""
    data = Path(path).read_bytes()
    n = len(data) // RECORD.size
    out: list[Record] = []
    for fields in RECORD.iter_unpack(data[: n * RECORD.size]):
        f = list(fields)
        ver = f[4]
        if ver == 4:
            f[7], f[8] = f[7][:4], f[8][:4]
        out.append(Record(*f))
    return out


@dataclass(frozen=True)
class Meta:
    """The truth file's companion: region names by index and edge names by address."""

    regions: list[str]
    edges: dict[str, str]  # address -> edge name
    t0_ns: int  # forwarder start, CLOCK_MONOTONIC

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Meta:
        d = json.loads(Path(path).read_text())
        return cls(regions=list(d["regions"]), edges=dict(d["edges"]), t0_ns=int(d["t0_ns"]))


@dataclass
class Exchange:
    """One ICMP echo exchange as the forwarder saw it."""

    region: int
    edge: str  # edge address (the echo's destination)
    icmp_id: int
    seq: int
    request: Record
    reply: Record | None = None

    @property
    def lost(self) -> bool:
        return self.reply is None or not self.reply.delivered

    @property
    def rtt_ns(self) -> int | None:
        """True round trip through the lab (None if lost): from the request entering it to the
        reply leaving it, so the two delays plus the edge's turnaround (the request's write
        into the edge's TUN device, the edge kernel's echo, the reply's way back into it)."""
        if self.lost or not self.request.delivered or self.reply is None:
            return None
        return self.reply.actual_ns - self.request.arrival_ns


def echo_exchanges(
    records: Iterable[Record], region: int | None = None, icmp_id: int | None = None
) -> list[Exchange]:
    """ICMP echo exchanges in request-arrival order, each with its reply if one came back.

    Keyed by (region, icmp id, seq); a later request with the same key (sequence wrap)
    starts a new exchange, and a reply belongs to the latest request with its key.
    """
    out: list[Exchange] = []
    open_: dict[tuple[int, int, int], Exchange] = {}
    for r in sorted(records, key=lambda r: r.arrival_ns):
        if region is not None and r.region != region:
            continue
        if icmp_id is not None and r.a != icmp_id:
            continue
        if (
            r.direction == UP
            and r.icmp_type in (packet.ICMP4_ECHO_REQUEST, packet.ICMP6_ECHO_REQUEST)
            and r.proto in (packet.PROTO_ICMP, packet.PROTO_ICMP6)
        ):
            ex = Exchange(r.region, r.dst_ip, r.a, r.b, r)
            open_[(r.region, r.a, r.b)] = ex
            out.append(ex)
        elif (
            r.direction == DOWN
            and r.icmp_type in (packet.ICMP4_ECHO_REPLY, packet.ICMP6_ECHO_REPLY)
            and r.proto in (packet.PROTO_ICMP, packet.PROTO_ICMP6)
        ):
            ex2 = open_.get((r.region, r.a, r.b))
            if ex2 is not None and ex2.reply is None and ex2.edge == r.src_ip:
                ex2.reply = r
    return out


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default, type 7) of unsorted values: the agent's
    own estimator, so the lab and the agent compute quantiles alike."""
    return sorted_quantile(sorted(xs), q)


def burst_lengths(lost: Iterable[bool]) -> list[int]:
    """Lengths of runs of consecutive losses (RFC 3357 loss periods)."""
    out: list[int] = []
    run = 0
    for x in lost:
        if x:
            run += 1
        elif run:
            out.append(run)
            run = 0
    if run:
        out.append(run)
    return out


def drop_ratio(
    records: Iterable[Record],
    direction: int | None = None,
    region: int | None = None,
    address: str | None = None,
) -> tuple[int, int]:
    """(dropped, total) packets, optionally for one direction, region and edge address."""
    dropped = total = 0
    for r in records:
        if r.status == UNROUTABLE or r.status == GENERATED:
            continue
        if direction is not None and r.direction != direction:
            continue
        if region is not None and r.region != region:
            continue
        if address is not None and address not in (r.src_ip, r.dst_ip):
            continue
        total += 1
        dropped += r.status in (DROPPED, EXPIRED)
    return dropped, total


@dataclass(frozen=True)
class Precision:
    """How late the forwarder really released packets: actual - intended release."""

    n: int
    p50_us: float
    p99_us: float
    max_us: float
    peak_pps: float  # most packets read in any 1 s window
    mean_pps: float

    def to_json(self) -> dict[str, Any]:
        return vars(self).copy()


def precision(records: Sequence[Record]) -> Precision:
    late = [(r.actual_ns - r.intended_ns) / 1e3 for r in records if r.actual_ns and r.intended_ns]
    arrivals = sorted(r.arrival_ns for r in records)
    peak = 0
    j = 0
    for i, t in enumerate(arrivals):
        while arrivals[j] < t - 1_000_000_000:
            j += 1
        peak = max(peak, i - j + 1)
    span = (arrivals[-1] - arrivals[0]) / 1e9 if len(arrivals) > 1 else 0.0
    return Precision(
        n=len(late),
        p50_us=quantile(late, 0.5),
        p99_us=quantile(late, 0.99),
        max_us=max(late) if late else math.nan,
        peak_pps=float(peak),
        mean_pps=len(arrivals) / span if span > 0 else 0.0,
    )


def iter_summary(records: Sequence[Record], meta: Meta) -> Iterator[dict[str, Any]]:
    """Per (region, edge) ICMP echo summary: the `python -m lab truth` table."""
    by: dict[tuple[int, str], list[Exchange]] = {}
    for ex in echo_exchanges(records):
        by.setdefault((ex.region, ex.edge), []).append(ex)
    for (reg, addr), exs in sorted(by.items()):
        rtts = [x.rtt_ns / 1e6 for x in exs if x.rtt_ns is not None]
        lost = [x.lost for x in exs]
        bursts = burst_lengths(lost)
        yield {
            "region": meta.regions[reg] if reg < len(meta.regions) else str(reg),
            "edge": meta.edges.get(addr, addr),
            "address": addr,
            "sent": len(exs),
            "lost": sum(lost),
            "loss_ratio": sum(lost) / len(exs) if exs else 0.0,
            "rtt_p50_ms": quantile(rtts, 0.5),
            "rtt_p95_ms": quantile(rtts, 0.95),
            "max_burst": max(bursts, default=0),
        }
