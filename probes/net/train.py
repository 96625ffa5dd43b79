"""A paced train of request/response datagrams over one connected UDP socket.

Shared by the ``udp`` echo, ``stun`` and ``relay`` kinds. Each packet is sent once (no
retransmission: a miss is a loss, RFC 7680), ``spacing`` apart, with at most ``max_inflight``
unanswered packets outstanding (RFC 8489 §6.2 allows 10 to one server). A packet is lost when
no matching reply arrived within ``timeout`` of its own send time; a reply after that is
``late``. Receive times are taken when the datagram is read, with the monotonic clock.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from probes.base import ProbeContext, ProbeResult

# match(data) -> the packet's index in the train, or a bounded stray reason.
Matcher = Callable[[bytes], "int | str"]


@dataclass
class TrainResult:
    rtts: list[float | None]
    refused: int = 0  # ICMP port unreachable seen on the socket
    duplicates: int = 0
    reordered: int = 0
    strays: dict[str, int] = field(default_factory=dict)

    def probe_result(
        self,
        duration: float,
        prefix: str,
        *,
        count_refused: bool = True,
        stray_errors: tuple[str, ...] = (),
        **fields: Any,
    ) -> ProbeResult:
        """The run's result: a success when any packet was answered; otherwise
        ``<prefix>_refused`` when the port was unreachable (if ``count_refused``), else
        ``<prefix>_timeout``. ``errors`` counts the refusals, reordered and duplicate replies,
        and the strays named in ``stray_errors``; ``fields`` go to the result as they are."""
        refused = self.refused if count_refused else 0
        counts = [("reordered", self.reordered), ("duplicate", self.duplicates)]
        if count_refused:
            counts.insert(0, (f"{prefix}_refused", refused))
        counts += [(k, self.strays.get(k, 0)) for k in stray_errors]
        answered = sum(r is not None for r in self.rtts)
        return ProbeResult(
            success=answered > 0,
            reason="ok" if answered else (f"{prefix}_refused" if refused else f"{prefix}_timeout"),
            duration=duration,
            rtts=self.rtts,
            packet_ids=list(range(len(self.rtts))),
            errors={k: v for k, v in counts if v},
            **fields,
        )


@dataclass(frozen=True)
class Stamp:
    """What the packets of one run carry so that a reply matches exactly one of them: a magic
    naming the kind, a random nonce per run, and the packet's sequence number."""

    magic: bytes  # 4 bytes
    nonce: bytes = field(default_factory=lambda: os.urandom(8))

    HEADER: ClassVar[struct.Struct] = struct.Struct("!4s8sI")  # magic, run nonce, sequence number

    @classmethod
    def check_size(cls, payload_size: int) -> list[str]:
        """The payload must hold the header."""
        if payload_size < cls.HEADER.size:
            return [f"payload_size: must be >= {cls.HEADER.size} (magic, nonce, sequence)"]
        return []

    def payloads(self, count: int, size: int) -> list[bytes]:
        """``count`` payloads of ``size`` bytes (at least the header), zero-padded."""
        pad = b"\0" * max(size - self.HEADER.size, 0)
        return [self.HEADER.pack(self.magic, self.nonce, i) + pad for i in range(count)]

    def match(self, data: bytes, offset: int = 0) -> int | str:
        """The sequence number in the payload at ``offset``, or the bounded stray reason
        ``malformed`` (too short) or ``foreign`` (another kind's or another run's)."""
        if len(data) < offset + self.HEADER.size:
            return "malformed"
        magic, nonce, seq = self.HEADER.unpack_from(data, offset)
        if magic != self.magic or nonce != self.nonce:
            return "foreign"
        return int(seq)


def check_max_inflight(max_inflight: int) -> list[str]:
    """The rule for a kind that lets its options bound the packets outstanding."""
    if not 1 <= max_inflight <= 1000:
        return ["max_inflight: must be between 1 and 1000"]
    return []


async def run_train(
    sock: socket.socket,
    packets: list[bytes],
    spacing: float,
    timeout: float,
    match: Matcher,
    kind: str,
    ctx: ProbeContext,
    max_inflight: int = 10,
) -> TrainResult:
    loop = asyncio.get_running_loop()
    n = len(packets)
    sent_ns: list[int | None] = [None] * n
    rtts: list[float | None] = [None] * n
    res = TrainResult(rtts)
    highest = -1  # highest index answered so far (reordering)
    changed = asyncio.Event()
    timeout_ns = int(timeout * 1e9)

    def stray(reason: str) -> None:
        res.strays[reason] = res.strays.get(reason, 0) + 1
        ctx.counters.stray(kind, reason)

    def readable() -> None:
        nonlocal highest
        for _ in range(256):  # bounded per wake-up; the loop calls again
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                res.refused += 1
                changed.set()
                continue
            except OSError:
                return
            now = time.perf_counter_ns()
            m = match(data)
            if isinstance(m, str):
                stray(m)
                continue
            if not 0 <= m < n or sent_ns[m] is None:
                stray("unknown")
                continue
            sent = sent_ns[m]
            assert sent is not None
            if rtts[m] is not None:
                res.duplicates += 1
                stray("duplicate")
                continue
            if now - sent > timeout_ns:
                stray("late")
                continue
            rtts[m] = (now - sent) / 1e9
            if m < highest:
                res.reordered += 1
            highest = max(highest, m)
            changed.set()

    def inflight(now: int) -> int:
        return sum(
            1
            for i in range(n)
            if sent_ns[i] is not None and rtts[i] is None and now - (sent_ns[i] or 0) <= timeout_ns
        )

    loop.add_reader(sock.fileno(), readable)
    try:
        start = time.perf_counter_ns()
        for i, pkt in enumerate(packets):
            due = start + int(i * spacing * 1e9)
            while True:
                now = time.perf_counter_ns()
                if now >= due and inflight(now) < max_inflight:
                    break
                changed.clear()
                wait = max(due - now, 0) / 1e9 if now < due else 0.005
                try:
                    async with asyncio.timeout(wait):
                        await changed.wait()
                except TimeoutError:
                    pass
            sent_ns[i] = time.perf_counter_ns()
            try:
                sock.send(pkt)
            except ConnectionRefusedError:
                res.refused += 1
            except OSError:
                pass  # counted as a loss, like a drop on the wire
        last = max(s for s in sent_ns if s is not None)
        await wait_answered(changed, lambda: all(r is not None for r in rtts), last + timeout_ns)
    finally:
        loop.remove_reader(sock.fileno())
    return res


async def wait_answered(changed: asyncio.Event, answered: Callable[[], bool], end_ns: int) -> None:
    """Wait until ``answered()`` holds or ``time.perf_counter_ns()`` reaches ``end_ns`` (the
    last packet's timeout), checking each time the reader sets ``changed``."""
    while not answered():
        now = time.perf_counter_ns()
        if now >= end_ns:
            return
        changed.clear()
        try:
            async with asyncio.timeout((end_ns - now) / 1e9):
                await changed.wait()
        except TimeoutError:
            return
