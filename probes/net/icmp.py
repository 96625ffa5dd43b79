"""ICMP echo engine: one shared socket per address family (the ``icmp`` kind drives it).

Why not icmplib's ``async_ping``: it opens a socket per ping (with raw sockets every socket then
sees every reply: O(N^2) at scale), times with the wall clock after the event loop wakes (loop lag
becomes fake RTT), and forgets which sequence numbers were lost. We use icmplib for what it does
well (creating the socket with privileged/unprivileged semantics, building echo packets) and do
the rest here:

* one socket per family serves every target; replies are demultiplexed by (identifier, sequence);
  the identifier is random per agent run so two agents behind one SNAT don't collide;
* both ends are the kernel's: the send time is its transmit stamp (SO_TIMESTAMPING, read from
  the error queue, keyed per send), the receive time its arrival stamp (SO_TIMESTAMPNS), so
  neither the send call nor event-loop lag inflates RTT; where no transmit stamp comes (a device
  that does not stamp, a full queue), the time read just before the send call stands in;
* a reply that matches nothing in flight, comes from the wrong source, fails its checksum or its
  payload token, or arrives after its timeout, is counted as stray and never as a reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import logging
import math
import os
import secrets
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from icmplib import ICMPv4Socket, ICMPv6Socket
from icmplib.exceptions import ICMPLibError

from probes.base import SOCKET_EXHAUSTED, Counters, NullCounters, RunAbandoned
from probes.net import errqueue
from probes.net.resolve import literal
from probes.net.sockets import ProbeFailed, exhausted

log = logging.getLogger("edgeprobe.icmp")

# Linux constants Python's socket module does not export.
SO_TIMESTAMPNS = 35
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
SO_TIMESTAMPING = 37
SCM_TIMESTAMPING = SO_TIMESTAMPING
# SOF_TIMESTAMPING_*: the driver's software transmit stamp, reported, keyed by a per-socket count
# of sends (OPT_ID) and without a copy of the packet (OPT_TSONLY); OPT_RX_FILTER (Linux 6.8)
# keeps the reports off received packets, which carry SO_TIMESTAMPNS already.
TX_STAMPING = (1 << 1) | (1 << 4) | (1 << 7) | (1 << 11)
TS_OPT_ID = 1 << 7
TS_OPT_RX_FILTER = 1 << 17
# Replies without a transmit stamp after which an engine that never got one stops asking.
TX_STAMP_TRIAL = 100
SOL_RAW = 255
ICMP_FILTER = 1
ICMP6_FILTER = 1

_TS = struct.Struct("@qq")  # struct timespec on 64-bit Linux
_IDSEQ = struct.Struct("!HH")
_HDR = struct.Struct("!BBHHH")

Mode = Literal["privileged", "unprivileged"]
# Why a reply is not counted as one (edgeprobe_stray_packets_total{probe="icmp",reason}).
STRAY_REASONS = (
    "foreign",
    "late",
    "unmatched",
    "wrong_source",
    "bad_checksum",
    "bad_payload",
    "malformed",
)
TOKEN_LEN = 8
SEQ_SPACE = 1 << 16
# Seconds a finished run's sequence numbers are remembered, to tell "late" from "unknown".
EXPIRED_MEMORY = 4096
# Train deadlines closer together than this share one timer wake-up (seconds).
DEADLINE_SLOT = 0.001
# At most this many queue entries are handled per deadline wake-up (bounded loop stalls).
DEADLINE_BATCH = 500


@dataclass
class PingOutcome:
    """Per-packet outcome of one train, in send order."""

    rtts: list[float | None]
    ids: list[int]
    errors: list[str | None]
    responders: list[str | None]
    error_rtts: list[float | None]  # RTT of the ICMP error (e.g. TTL exceeded) per packet

    @property
    def error_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.errors:
            if e is not None:
                out[e] = out.get(e, 0) + 1
        return out


class Train:
    """One train in flight. ``on_done`` is called once when every packet is settled or the
    train's deadline passed (``abandoned`` when the engine closed under it); never after
    ``cancel``."""

    __slots__ = (
        "abandoned",
        "engine",
        "error_rtts",
        "errors",
        "finished",
        "ids",
        "left",
        "number",
        "on_done",
        "payload",
        "responders",
        "rtts",
        "timeout_ns",
        "timers",
    )

    def __init__(
        self,
        n: int,
        timeout_ns: int,
        on_done: Callable[[Train], None],
        payload: bytes = b"",
        engine: IcmpEngine | None = None,
    ) -> None:
        self.payload = payload
        self.rtts: list[float | None] = [None] * n
        self.errors: list[str | None] = [None] * n
        self.responders: list[str | None] = [None] * n
        self.error_rtts: list[float | None] = [None] * n
        self.ids = [0] * n
        self.left = n
        self.timeout_ns = timeout_ns
        self.on_done = on_done
        self.engine = engine
        self.finished = False
        self.abandoned = False
        self.number = 0  # in the engine's deadline queue
        self.timers: list[asyncio.TimerHandle] | None = None

    def settle(self, idx: int) -> None:
        self.left -= 1
        if self.left == 0 and self.engine is not None:
            self.engine._finish(self)
        elif self.left == 0 and not self.finished:
            self.finished = True
            self.on_done(self)

    def cancel(self) -> None:
        """Abandon the train: nothing is settled and ``on_done`` is not called."""
        if self.engine is not None:
            self.engine._abandon(self)
        else:
            self.finished = True


class _Slot:
    __slots__ = ("dest", "idx", "key", "run", "t_mono", "t_real", "t_tx")

    def __init__(self, run: Train, idx: int, dest: str, t_mono: int, t_real: int) -> None:
        self.run = run
        self.idx = idx
        self.dest = dest
        self.t_mono = t_mono
        self.t_real = t_real  # CLOCK_REALTIME just before the send call
        self.t_tx = 0  # the kernel's transmit stamp (CLOCK_REALTIME); 0 until it is read
        self.key = -1  # the send's transmit-stamp key; -1 without one


@dataclass
class EngineStats:
    clock_fallbacks: int = 0  # kernel timestamp unusable (missing, or wall clock stepped)
    received: int = 0
    tx_stamps: int = 0  # kernel transmit stamps read
    tx_fallbacks: int = 0  # RTTs timed from the pre-send stamp for want of a transmit stamp


def _open(family: int, mode: Mode) -> socket.socket:
    """Create the socket through icmplib so its privilege semantics and errors apply."""
    cls = ICMPv4Socket if family == socket.AF_INET else ICMPv6Socket
    icmp_sock = cls(privileged=(mode == "privileged"))
    sock: socket.socket = icmp_sock.sock
    # Detach so icmplib's __del__ does not close our fd.
    icmp_sock._sock = None
    return sock


class IcmpEngine:
    """One ICMP socket for one address family, shared by every target of that family."""

    def __init__(self, family: int, mode: Mode, counters: Counters | None = None) -> None:
        self.family = family
        self.mode: Mode = mode
        self.counters = counters or NullCounters()
        self.stats = EngineStats()
        self.sock = _open(family, mode)
        self.sock.setblocking(False)
        self.v6 = family == socket.AF_INET6
        if mode == "unprivileged":
            # The kernel sets the identifier to the socket's port; a random port gives a random id.
            for _ in range(32):
                with contextlib.suppress(OSError):
                    self.sock.bind(("::" if self.v6 else "0.0.0.0", secrets.randbelow(65000) + 1))
                    break
            else:
                self.sock.bind(("::" if self.v6 else "0.0.0.0", 0))
            self.ident = int(self.sock.getsockname()[1])
        else:
            self.ident = secrets.randbelow(0xFFFF) + 1
            self._install_filter()
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        errqueue.enable(self.sock, self.v6)
        # The kernel's next transmit-stamp key (its count of sends); None: no transmit stamps.
        self._tx_key: int | None = None
        self._tx_flags = 0
        # Sends whose transmit stamp has not been read yet, by key.
        self._by_key: dict[int, _Slot] = {}
        self._draining = False
        self._enable_tx_stamps()
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.token = secrets.token_bytes(TOKEN_LEN)
        self._echo_type = 128 if self.v6 else 8
        self._reply_type = 129 if self.v6 else 0
        self._pending: dict[int, _Slot] = {}
        # OrderedDict: evicting the oldest entry of a plain dict scans the deleted slots at its
        # front every time (quadratic in the number of targets).
        self._expired: OrderedDict[int, int] = OrderedDict()
        self._seq = secrets.randbelow(SEQ_SPACE)
        # size -> (payload, its one's-complement sum for the IPv4 checksum)
        self._payloads: dict[int, tuple[bytes, int]] = {}
        self._cmsgs: dict[tuple[int, int | None], list[tuple[int, int, bytes]]] = {}
        # Deadlines of the trains in flight, earliest first, served by one timer, because a
        # timer per train costs CPU per probe. (deadline, number) of each train; the
        # unfinished ones by number. A finished train leaves only its small tuple behind:
        # referencing every answered train until its deadline would carry them into the old
        # generation, which each full garbage collection then walks while the loop stalls.
        self._deadlines: list[tuple[float, int]] = []
        self._unfinished: dict[int, Train] = {}
        self._deadline_n = 0
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._deadline_at = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None

    def _install_filter(self) -> None:
        # Raw sockets see every ICMP message on the host; let the kernel drop what we never use.
        try:
            if self.v6:
                keep = (1, 3, 129)  # unreachable, time exceeded, echo reply
                words = [0xFFFFFFFF] * 8
                for t in keep:
                    words[t >> 5] &= ~(1 << (t & 31))
                self.sock.setsockopt(
                    socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("=8I", *words)
                )
            else:
                keep_mask = (1 << 0) | (1 << 3) | (1 << 11)
                self.sock.setsockopt(
                    SOL_RAW, ICMP_FILTER, struct.pack("=I", ~keep_mask & 0xFFFFFFFF)
                )
        except OSError as e:  # pragma: no cover - filter is an optimisation only
            log.debug("icmp filter not installed: %s", e)

    def _enable_tx_stamps(self) -> None:
        for flags in (TX_STAMPING | TS_OPT_RX_FILTER, TX_STAMPING):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, flags)
            except OSError:
                continue
            self._tx_flags = flags
            self._tx_key = 0
            return
        log.debug("icmp: no kernel transmit timestamps; send times are read before the send")

    def _restart_keys(self) -> None:
        """Restart the kernel's key count at 0: a failed send may or may not have used a key
        (the kernel counts a send once it builds the packet), so ours is no longer known.
        Setting OPT_ID afresh restarts it; sends in flight keep their pre-send stamps."""
        self._by_key.clear()
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, self._tx_flags & ~TS_OPT_ID)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, self._tx_flags)
        except OSError:
            self._tx_key = None
            return
        self._tx_key = 0

    def _stop_tx_stamps(self) -> None:
        log.info(
            "icmp: the kernel gave no transmit timestamp for %d replies (the device does not "
            "stamp?); send times are read before the send",
            TX_STAMP_TRIAL,
        )
        self._tx_key = None
        self._by_key.clear()
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, 0)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self.sock.fileno(), self._on_readable)

    def close(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.sock.fileno())
            self._loop = None
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        runs = {id(r): r for r in self._unfinished.values()}
        runs.update((id(s.run), s.run) for s in self._pending.values())
        self._deadlines.clear()
        self._unfinished.clear()
        self._pending.clear()
        self._by_key.clear()
        for r in runs.values():
            if not r.finished:
                # The owner learns that the train was abandoned; nothing of it is settled.
                r.finished = r.abandoned = True
                self._cancel_timers(r)
                with contextlib.suppress(Exception):
                    r.on_done(r)
        self.sock.close()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # ---------------------------------------------------------------- sending
    def _payload(self, size: int) -> tuple[bytes, int]:
        p = self._payloads.get(size)
        if p is None:
            pattern = (self.token + bytes(range(0x20, 0x7F))) * (size // 100 + 1)
            data = pattern[:size]
            padded = data + b"\x00" if size % 2 else data
            p = self._payloads[size] = (
                data,
                sum(struct.unpack(f"!{size // 2 + size % 2}H", padded)),
            )
        return p

    def _packet(self, seq: int, payload: bytes, psum: int) -> bytes:
        if self.v6:
            # The kernel fills in the ICMPv6 checksum (pseudo-header).
            return _HDR.pack(self._echo_type, 0, 0, self.ident, seq) + payload
        # RFC 1071 over the header and the payload, with the payload's sum precomputed.
        s = (self._echo_type << 8) + self.ident + seq + psum
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        return _HDR.pack(self._echo_type, 0, ~s & 0xFFFF, self.ident, seq) + payload

    def _next_seq(self) -> int | None:
        for _ in range(SEQ_SPACE):
            self._seq = (self._seq + 1) & 0xFFFF
            if self._seq not in self._pending:
                return self._seq
        return None

    def _ancillary(self, tos: int, ttl: int | None) -> list[tuple[int, int, bytes]]:
        key = (tos, ttl)
        cmsgs = self._cmsgs.get(key)
        if cmsgs is None:
            cmsgs = []
            if tos:
                cmsgs.append(
                    (socket.IPPROTO_IPV6, socket.IPV6_TCLASS, struct.pack("=i", tos))
                    if self.v6
                    else (socket.IPPROTO_IP, socket.IP_TOS, bytes([tos]))
                )
            if ttl is not None and ttl != 64:
                cmsgs.append(
                    (socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT, struct.pack("=i", ttl))
                    if self.v6
                    else (socket.IPPROTO_IP, socket.IP_TTL, struct.pack("=i", ttl))
                )
            self._cmsgs[key] = cmsgs
        return cmsgs

    def _send(
        self, run: Train, idx: int, dest: str, psum: int, cmsgs: list[tuple[int, int, bytes]]
    ) -> None:
        if run.finished:
            return  # the run was abandoned (cancelled) before this packet's turn
        seq = self._next_seq()
        if seq is None:
            run.errors[idx] = "overload"
            run.settle(idx)
            return
        pkt = self._packet(seq, run.payload, psum)
        addr = (dest, 0)
        # With IP_RECVERR the kernel also leaves an ICMP error about an earlier packet, of any
        # target, as the socket's pending error, and the next send returns (and clears) it
        # instead of sending. The error's owner learns of it from the error queue; this packet
        # was not sent, so it gets one more try: only an error that comes twice is its own.
        for attempt in (0, 1):
            t_real = time.clock_gettime_ns(time.CLOCK_REALTIME)
            t_mono = time.monotonic_ns()
            try:
                if cmsgs:
                    self.sock.sendmsg([pkt], cmsgs, 0, addr)
                else:
                    self.sock.sendto(pkt, addr)
                break
            except OSError as e:
                if self._tx_key is not None:
                    self._restart_keys()
                if attempt == 0:
                    continue
                run.errors[idx] = (
                    "unreachable"
                    if e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL)
                    else "send_error"
                )
                run.settle(idx)
                return
        slot = self._pending[seq] = _Slot(run, idx, dest, t_mono, t_real)
        run.ids[idx] = seq
        key = self._tx_key
        if key is not None:
            slot.key = key
            self._tx_key = (key + 1) & 0xFFFFFFFF
            self._by_key[key] = slot
            # A device without a queue stamps the packet inside the send call: reading it now
            # keeps the error queue empty (no wake-up for it). One read, not a drain: whatever
            # else is queued wakes the reader.
            self._read_errqueue(1)

    def start_canonical(
        self,
        dest: str,
        count: int,
        spacing: float,
        timeout: float,
        payload_size: int,
        tos: int,
        ttl: int | None,
        on_done: Callable[[Train], None],
    ) -> Train:
        """Send the first of ``count`` echo requests now and the rest ``spacing`` seconds
        apart; ``on_done(run)`` is called (from the event loop, possibly before this returns)
        once every packet has its reply, error or timeout. ``run.cancel()`` abandons it.

        ``dest`` must be in canonical form (as ``literal`` gives it), since replies name that
        form: the callback form of the kind has it at hand, and parsing it again per run costs
        CPU."""
        loop = self._loop
        if loop is None:
            loop = asyncio.get_running_loop()
            self.attach(loop)
        payload, psum = self._payload(payload_size)
        run = Train(count, int(timeout * 1e9), on_done, payload, self)
        cmsgs = self._ancillary(tos, ttl)
        t0 = loop.time()
        self._send(run, 0, dest, psum, cmsgs)
        if count > 1:
            run.timers = [
                loop.call_at(t0 + i * spacing, self._send, run, i, dest, psum, cmsgs)
                for i in range(1, count)
            ]
        if not run.finished:
            self._add_deadline(run, t0 + (count - 1) * spacing + timeout)
        return run

    async def ping(
        self,
        dest: str,
        count: int = 1,
        spacing: float = 0.02,
        timeout: float = 1.0,
        payload_size: int = 56,
        tos: int = 0,
        ttl: int | None = None,
    ) -> PingOutcome:
        """Send ``count`` echo requests ``spacing`` seconds apart and wait for each one's
        reply or its timeout. Cancelling abandons the train without settling anything."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def finished(run: Train) -> None:
            if done.done():
                return
            if run.abandoned:
                # Not a cancellation of the awaiting task: that would end a scheduler loop.
                done.set_exception(RunAbandoned())
            else:
                done.set_result(None)

        lit = literal(dest)
        dest = lit.address if lit is not None else dest  # replies name the canonical form
        run = self.start_canonical(dest, count, spacing, timeout, payload_size, tos, ttl, finished)
        try:
            await done
        finally:
            run.cancel()
        return PingOutcome(run.rtts, run.ids, run.errors, run.responders, run.error_rtts)

    def _add_deadline(self, run: Train, when: float) -> None:
        self._deadline_n += 1
        run.number = self._deadline_n
        self._unfinished[run.number] = run
        heap = self._deadlines
        heapq.heappush(heap, (when, run.number))
        # Drop a few answered trains from the front as we go, so the queue stays about as
        # long as what is really unanswered (flushing them all at one deadline stalls the
        # loop at scale).
        for _ in range(2):
            if heap[0][1] in self._unfinished:
                break
            heapq.heappop(heap)
        if when < self._deadline_at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._deadline_at = when
        assert self._loop is not None
        self._deadline_timer = self._loop.call_at(when, self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline_timer = None
        self._deadline_at = math.inf
        if self._loop is None:
            return
        now = self._loop.time()
        heap = self._deadlines
        drained = False
        # Most trains are answered long before their deadline: drop those from the front too,
        # so the timer is next armed for a train that may really time out.
        unfinished = self._unfinished
        budget = DEADLINE_BATCH
        while heap and (heap[0][1] not in unfinished or heap[0][0] <= now):
            budget -= 1
            if budget < 0:
                self._arm(now)  # more next loop iteration: the probes' timers go first
                return
            run = unfinished.get(heapq.heappop(heap)[1])
            if run is not None and not run.finished:
                if not drained:
                    # A reply or error already queued in the kernel is not a timeout: when the
                    # loop was busy, this timer can run before the socket's readable callback.
                    # (Replies are judged by their kernel timestamps, so this is exact.)
                    self._on_readable()
                    self._drain_errqueue()
                    drained = True
                    if run.finished:
                        continue
                later = self._sent_late(run)
                if later:
                    # A packet left later than planned (the loop was busy at its turn): its
                    # own timeout runs from when it really left, not from the plan.
                    unfinished.pop(run.number, None)
                    self._add_deadline(run, max(later, now + DEADLINE_SLOT))
                    continue
                self._finish(run)
        if heap:
            # Deadlines closer together than DEADLINE_SLOT share one wake-up; a train ends
            # at most that much after its deadline (its packets' fate is unaffected: a late
            # reply is judged by its kernel timestamp against the timeout).
            self._arm(max(heap[0][0], now + DEADLINE_SLOT))

    def _sent_late(self, run: Train) -> float:
        """The loop time at which the train's last unanswered packet times out, when that is
        still ahead (it was sent late); else 0."""
        last = 0
        pending = self._pending
        for seq in run.ids:
            slot = pending.get(seq)
            if slot is not None and slot.run is run and slot.t_mono > last:
                last = slot.t_mono
        if not last:
            return 0.0
        ends = last + run.timeout_ns
        # Loop time and time.monotonic() share CLOCK_MONOTONIC (uvloop in whole ms).
        lead = ends - time.monotonic_ns()
        return self._loop.time() + lead / 1e9 if lead > 0 and self._loop is not None else 0.0

    def _finish(self, run: Train) -> None:
        if run.finished:
            return
        run.finished = True
        self._unfinished.pop(run.number, None)
        self._cancel_timers(run)
        if run.left:
            self._expire(run)
        run.on_done(run)

    def _abandon(self, run: Train) -> None:
        if run.finished:
            return
        run.finished = run.abandoned = True
        self._unfinished.pop(run.number, None)
        self._cancel_timers(run)
        self._expire(run)

    @staticmethod
    def _cancel_timers(run: Train) -> None:
        if run.timers is not None:
            for h in run.timers:
                h.cancel()
            run.timers = None

    def _expire(self, run: Train) -> None:
        now = time.monotonic_ns()
        expired = self._expired
        for idx, seq in enumerate(run.ids):
            slot = self._pending.get(seq)
            if slot is not None and slot.run is run:
                del self._pending[seq]
                if slot.key >= 0:
                    self._by_key.pop(slot.key, None)
                expired[seq] = now
                if run.rtts[idx] is None and run.errors[idx] is None:
                    run.errors[idx] = "timeout"
        while len(expired) > EXPIRED_MEMORY:
            expired.popitem(last=False)

    def _remember(self, seq: int, now: int) -> None:
        self._expired[seq] = now
        if len(self._expired) > EXPIRED_MEMORY:
            self._expired.popitem(last=False)

    # -------------------------------------------------------------- receiving
    def _on_readable(self) -> None:
        recv = self.sock.recvmsg
        for i in range(10000):  # bounded so one flood cannot starve the loop
            try:
                data, anc, _flags, addr = recv(2048, 64)
            except (BlockingIOError, InterruptedError):
                if i == 0:
                    # Woken with nothing to read: the error queue holds something (a transmit
                    # stamp not read after its send, or an ICMP error); it wakes us until read.
                    self._drain_errqueue()
                break
            except OSError:
                # A pending ICMP error is reported on the next recv; read the error queue.
                self._drain_errqueue()
                continue
            rx_mono = time.monotonic_ns()
            self.stats.received += 1
            self._handle(data, anc, str(addr[0]), rx_mono)
        # No unconditional error-queue read here (a failing system call per wake-up): a
        # queued ICMP error sets the socket error, which the recv above reports. Trains that
        # reach their deadline read the queue once more (_on_deadline).

    def _handle(
        self, data: bytes, anc: list[tuple[int, int, bytes]], src: str, rx_mono: int
    ) -> None:
        if self.v6 or self.mode == "unprivileged":
            icmp = data
        else:
            if len(data) < 20:
                self.counters.stray("icmp", "malformed")
                return
            ihl = (data[0] & 0x0F) * 4
            icmp = data[ihl:]
        if len(icmp) < 8:
            self.counters.stray("icmp", "malformed")
            return
        itype = icmp[0]
        if itype == self._reply_type:
            ident, seq = _IDSEQ.unpack_from(icmp, 4)
            if ident != self.ident:
                self.counters.stray("icmp", "foreign")
                return
            if not self.v6 and self.mode == "privileged" and _checksum(icmp) != 0:
                self.counters.stray("icmp", "bad_checksum")
                return
            slot = self._pending.get(seq)
            if slot is None:
                self.counters.stray("icmp", "late" if seq in self._expired else "unmatched")
                return
            if src != slot.dest:
                self.counters.stray("icmp", "wrong_source")
                return
            run = slot.run
            # An echo reply carries our payload back byte for byte; anything else (another
            # token, truncated, corrupted) is not the answer to this request.
            if icmp[8:] != run.payload:
                self.counters.stray("icmp", "bad_payload")
                return
            rtt_ns = self._rtt_ns(slot, anc, rx_mono)
            del self._pending[seq]
            if rtt_ns > run.timeout_ns:
                # Arrived, but after its own timeout: lost by definition (RFC 7680).
                self.counters.stray("icmp", "late")
                run.errors[slot.idx] = "timeout"
            else:
                run.rtts[slot.idx] = rtt_ns / 1e9
                run.responders[slot.idx] = src
            self._remember(seq, rx_mono)
            run.settle(slot.idx)
            return
        if itype in ((1, 3) if self.v6 else (3, 11)):
            # Raw sockets get ICMP errors quoting our request: original header + 8 bytes.
            inner = icmp[8:]
            if not self.v6:
                if len(inner) < 20:
                    self.counters.stray("icmp", "malformed")
                    return
                inner = inner[(inner[0] & 0x0F) * 4 :]
            else:
                inner = inner[40:]
            if len(inner) < 8 or inner[0] != self._echo_type:
                return  # an error about someone else's traffic
            ident, seq = _IDSEQ.unpack_from(inner, 4)
            if ident != self.ident:
                return
            reason = "ttl_exceeded" if itype in (3 if self.v6 else 11,) else "unreachable"
            self._settle_error(seq, reason, src, rx_mono, anc)
            return
        # echo requests (our own, on loopback) and anything else: not ours to count

    def _settle_error(
        self, seq: int, reason: str, src: str, rx_mono: int, anc: list[tuple[int, int, bytes]]
    ) -> None:
        slot = self._pending.pop(seq, None)
        if slot is None:
            self.counters.stray("icmp", "late" if seq in self._expired else "unmatched")
            return
        run = slot.run
        run.errors[slot.idx] = reason
        run.responders[slot.idx] = src
        # An error still tells how far the packet got and when: the path probe's hop RTT.
        run.error_rtts[slot.idx] = self._rtt_ns(slot, anc, rx_mono) / 1e9
        self._remember(seq, rx_mono)
        run.settle(slot.idx)

    def _drain_errqueue(self, limit: int = 1000) -> None:
        # Unprivileged sockets receive ICMP errors only through the error queue (IP_RECVERR);
        # every socket receives its transmit stamps there.
        if self._draining:
            return  # called again while settling one of the messages read below
        self._draining = True
        try:
            self._read_errqueue(limit)
        finally:
            self._draining = False

    def _read_errqueue(self, limit: int) -> None:
        for _ in range(limit):
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(512, 512, errqueue.MSG_ERRQUEUE)
            except OSError:  # empty (BlockingIOError) or failing: nothing more to read now
                return
            if not data:
                self._tx_stamp(anc)  # OPT_TSONLY: a transmit stamp comes without the packet
                continue
            rx_mono = time.monotonic_ns()
            err: errqueue.IcmpError | None = None
            for level, ctype, cdata in anc:
                err = errqueue.parse(level, ctype, cdata) or err
            if err is None or len(data) < 8:
                continue
            _t, _c, _cs, ident, seq = _HDR.unpack_from(data)
            if ident != self.ident and self.mode == "privileged":
                continue
            self._settle_error(
                seq,
                "ttl_exceeded" if err.time_exceeded else "unreachable",
                err.offender,
                rx_mono,
                anc,
            )

    def _tx_stamp(self, anc: list[tuple[int, int, bytes]]) -> None:
        key: int | None = None
        stamp = 0
        for level, ctype, cdata in anc:
            if level == socket.SOL_SOCKET:
                # SCM_TIMESTAMPING, and SCM_TIMESTAMPNS (the same stamp: SO_TIMESTAMPNS is on)
                if ctype == SCM_TIMESTAMPING and len(cdata) >= 16:
                    sec, nsec = _TS.unpack_from(cdata)  # the first of three: the software one
                    stamp = sec * 1_000_000_000 + nsec
            elif key is None:
                key = errqueue.tx_key(level, ctype, cdata)
        if key is None or not stamp:
            return
        slot = self._by_key.pop(key, None)
        if slot is not None:
            slot.t_tx = stamp
            self.stats.tx_stamps += 1

    def _sent_ns(self, slot: _Slot) -> int:
        """The kernel's transmit stamp of the slot's request (CLOCK_REALTIME), 0 without one."""
        if not slot.t_tx and slot.key >= 0:
            if slot.key in self._by_key:
                self._drain_errqueue()  # queued behind a device queue, or not read yet
                self._by_key.pop(slot.key, None)
            if not slot.t_tx:
                self.stats.tx_fallbacks += 1
                if (
                    not self.stats.tx_stamps
                    and self.stats.tx_fallbacks >= TX_STAMP_TRIAL
                    and self._tx_key is not None
                ):
                    self._stop_tx_stamps()
        return slot.t_tx

    def _rtt_ns(self, slot: _Slot, anc: list[tuple[int, int, bytes]], rx_mono: int) -> int:
        user = rx_mono - slot.t_mono
        for level, ctype, cdata in anc:
            if level == socket.SOL_SOCKET and ctype == SCM_TIMESTAMPNS and len(cdata) >= 16:
                sec, nsec = _TS.unpack_from(cdata)
                rx: int = sec * 1_000_000_000 + nsec
                kern = rx - slot.t_real
                # The kernel stamped the packet before we read it, so a kernel RTT above the
                # user-space one (plus slew allowance) means the wall clock stepped meanwhile.
                if 0 <= kern <= user + 100_000:
                    tx = slot.t_tx or self._sent_ns(slot)
                    # The transmit stamp falls between the pre-send stamp and the arrival;
                    # one outside (a key count gone wrong) is not this request's.
                    if slot.t_real <= tx <= rx:
                        return rx - tx
                    if tx:
                        self.stats.tx_fallbacks += 1
                    return kern
                break
        self.stats.clock_fallbacks += 1
        if slot.key >= 0 and not slot.t_tx:
            self._by_key.pop(slot.key, None)
        return user


def _checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum (returns 0 when verifying a packet that carries one)."""
    if len(data) % 2:
        data += b"\x00"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@dataclass
class IcmpEngines:
    """The agent's ICMP sockets, created on first use, one per family (a shared resource:
    see ``probes.base.Resource``)."""

    mode: Literal["auto", "privileged", "unprivileged"] = "auto"
    counters: Counters = field(default_factory=NullCounters)
    engines: dict[int, IcmpEngine] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)

    @classmethod
    def create(cls, counters: Counters) -> Self:
        return cls(counters=counters)

    def configure(self, settings: Any, targets: Collection[str]) -> None:
        """Take ``settings.icmp_mode``; a new mode closes the sockets (runs in flight are
        abandoned) and the next run opens them in that mode."""
        mode = settings.icmp_mode
        if mode != self.mode:
            self.close()
            self.mode = mode
            self.failures.clear()

    def open(self) -> None:
        """Open both families' sockets, so start-up logs which mode each got and why."""
        for fam in (socket.AF_INET, socket.AF_INET6):
            try:
                self.get(fam)
            except ProbeFailed:
                log.warning(
                    "icmp %s socket: out of file descriptors or socket memory; "
                    "the next run tries again",
                    "ipv6" if fam == socket.AF_INET6 else "ipv4",
                )

    def info(self) -> Mapping[str, str]:
        return {"icmp_mode": self.describe()}

    def get(self, family: int) -> IcmpEngine | None:
        """The engine of ``family``; None when no mode can open its socket (remembered, and
        logged once). Raises ProbeFailed(socket_exhausted), remembering nothing, when the
        descriptors or the socket memory ran out: that passes, a mode's privileges do not."""
        eng = self.engines.get(family)
        if eng is not None or family in self.failures:
            return eng
        tried: list[str] = []
        order: list[Mode] = ["unprivileged", "privileged"] if self.mode == "auto" else [self.mode]
        for m in order:
            try:
                eng = IcmpEngine(family, m, self.counters)
            except (ICMPLibError, OSError) as e:
                if exhausted(e):
                    raise ProbeFailed(SOCKET_EXHAUSTED) from None
                tried.append(f"{m}: {_why(e, m)}")
                continue
            fam = "ipv6" if family == socket.AF_INET6 else "ipv4"
            if tried:
                log.info("icmp %s socket: %s mode (%s)", fam, m, "; ".join(tried))
            else:
                log.info("icmp %s socket: %s mode", fam, m)
            self.engines[family] = eng
            return eng
        self.failures[family] = "; ".join(tried)
        log.error(
            "icmp %s socket unavailable: %s",
            "ipv6" if family == socket.AF_INET6 else "ipv4",
            self.failures[family],
        )
        return None

    def describe(self) -> str:
        modes = {e.mode for e in self.engines.values()}
        return ",".join(sorted(modes)) or "none"

    def close(self) -> None:
        for e in self.engines.values():
            e.close()
        self.engines.clear()


def _why(e: Exception, mode: Mode) -> str:
    if mode == "unprivileged":
        try:
            with open("/proc/sys/net/ipv4/ping_group_range") as f:
                rng = f.read().split()
        except OSError:
            rng = []
        return (
            f"net.ipv4.ping_group_range is {' '.join(rng) or 'unknown'}, which excludes "
            f"group {os.getgid()}"
        )
    return "raw sockets need CAP_NET_RAW" if "ermission" in str(e) else str(e)
