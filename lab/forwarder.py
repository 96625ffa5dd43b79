"""The user-space forwarder between the region TUN devices and the edge TUN device.

One process, one thread, one loop: read packets, decide each one's fate and release time,
write it out when due, record what really happened. Run by the topology as
``python -m lab.forwarder CONFIG.json``; it creates its TUN devices, moves them into their
namespaces, prints ``READY`` and then serves until SIGTERM/SIGINT.

Timing (measured on this kind of VM, see docs/lab.md): a wake-up from select/epoll is
~50 µs late at p50 and ~190 µs at p99, so the loop sleeps until ``spin_us`` before the next
release and busy-polls the rest, within a CPU cap. Timer slack is set to 1 ns. No SCHED_FIFO:
a busy real-time task gets throttled for ~50 ms every second.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import heapq
import ipaddress
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from lab import groundtruth as gt
from lab import packet
from lab.impair import DirState, split_directions

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
PR_SET_TIMERSLACK = 29
PR_SET_PDEATHSIG = 1
READ_BATCH = 64
CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = 35
SO_ATTACH_FILTER = 26
PACKET_OUTGOING = 4
_TS = struct.Struct("qq")
# A packet's stamp waits this long at most for the TUN read that takes it (a copy whose packet
# the TUN queue dropped would otherwise stay).
TAP_MAX_PENDING = 4096


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def _outgoing_only() -> bytes:
    """A classic BPF program for SO_ATTACH_FILTER: keep PACKET_OUTGOING copies (what the
    namespace sends into the TUN device), drop the rest (what the forwarder writes into it)."""
    ld_pkttype = struct.pack("HBBI", 0x30, 0, 0, 0xFFFFF000 + 4)  # ldb [SKF_AD_PKTTYPE]
    jeq = struct.pack("HBBI", 0x15, 0, 1, PACKET_OUTGOING)
    accept = struct.pack("HBBI", 0x06, 0, 0, 0xFFFF)
    drop = struct.pack("HBBI", 0x06, 0, 0, 0)
    return ld_pkttype + jeq + accept + drop


class KernelStamps:
    """When each packet entered a TUN device, as the kernel stamped it (SO_TIMESTAMPNS on a
    packet socket that sees the namespace's outgoing copies), in CLOCK_MONOTONIC ns.

    The forwarder reads a TUN device after select() wakes it: ~50 µs later at p50 on this
    kind of VM, more under load, and later still for the packets behind others in one batch.
    A stamp taken at read time would leave that wait out of the ground truth and add it to
    the path's delay. The copy is queued before the TUN device queues the packet itself, so
    every packet readable from the TUN device has its copy waiting here."""

    def __init__(self, ns: str, ifname: str) -> None:
        self._prog = ctypes.create_string_buffer(_outgoing_only())
        with inside(ns):
            self.sock = self._open(ifname)
        self.pending: dict[bytes, deque[int]] = {}
        self.n_pending = 0

    def _open(self, ifname: str) -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        try:
            fprog = struct.pack("HxxxxxxQ", 4, ctypes.addressof(self._prog))
            s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            s.bind((ifname, ETH_P_ALL))
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        return s

    def drain(self) -> None:
        """Take every waiting copy's stamp (the wall-clock stamp converted to monotonic with
        the offset of this instant: the conversion spans microseconds)."""
        offset = time.clock_gettime_ns(time.CLOCK_REALTIME) - time.monotonic_ns()
        for _ in range(4 * READ_BATCH):
            try:
                pkt, anc, _flags, _addr = self.sock.recvmsg(65535, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # Reported once after the device went down or up (it was down when bound).
                if e.errno == errno.ENETDOWN:
                    continue
                raise
            for level, ctype, cdata in anc:
                if level == socket.SOL_SOCKET and ctype == SO_TIMESTAMPNS and len(cdata) >= 16:
                    sec, nsec = _TS.unpack_from(cdata)
                    if self.n_pending >= TAP_MAX_PENDING:
                        self.pending.clear()
                        self.n_pending = 0
                    self.pending.setdefault(pkt, deque()).append(
                        sec * 1_000_000_000 + nsec - offset
                    )
                    self.n_pending += 1

    def take(self, pkt: bytes, read_ns: int) -> int:
        """When ``pkt``, just read from the TUN device at ``read_ns``, entered it; ``read_ns``
        when no plausible stamp is there (the bound: a queued packet is read within a second)."""
        q = self.pending.get(pkt)
        if q is None:
            self.drain()
            q = self.pending.get(pkt)
            if q is None:
                return read_ns
        t = q.popleft()
        self.n_pending -= 1
        if not q:
            del self.pending[pkt]
        return t if read_ns - 1_000_000_000 < t <= read_ns else read_ns

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run this thread inside the named network namespace (a socket opened meanwhile stays in
    it); back in its own namespace after."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        there = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(there, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {ns}")
            try:
                yield
            finally:
                if libc.setns(own, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back")
        finally:
            os.close(there)
    finally:
        os.close(own)


def _prctl(option: int, arg: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0)
    except (OSError, AttributeError):
        pass


@dataclass
class Hop:
    name: str
    addr4: bytes
    addr6: bytes
    delay_ns: int
    loss: float
    icmp_loss: float


@dataclass
class Path:
    edge: str
    up: DirState
    down: DirState
    hops: list[Hop] = field(default_factory=list)

    def hop_delay_ns(self, k: int) -> int:
        return sum(h.delay_ns for h in self.hops[:k])


@dataclass
class Region:
    index: int
    name: str
    fd: int
    paths: dict[str, Path]  # edge name -> path
    by_addr: dict[bytes, Path]
    prefixes: list[tuple[int, int, int, Path]]  # (version, network int, mask int, path)
    default: Path


def _seed(base: int, *parts: str) -> int:
    import zlib

    return (base * 1_000_003 + zlib.crc32("/".join(parts).encode())) & 0xFFFFFFFF


def build_path(spec: Mapping[str, Any], region: str, seed: int) -> Path:
    key = f"{region}.{spec.get('edge', 'default')}"
    up, down = split_directions(spec.get("impair", {}), key)
    hops = [
        Hop(
            name=h["name"],
            addr4=ipaddress.ip_address(h["addr4"]).packed,
            addr6=ipaddress.ip_address(h["addr6"]).packed,
            delay_ns=int(h.get("delay", 0.0) * 1e9),
            loss=float(h.get("loss", 0.0)),
            icmp_loss=float(h.get("icmp_loss", 0.0)),
        )
        for h in spec.get("hops", [])
    ]
    return Path(
        edge=spec.get("edge", ""),
        up=DirState(up, _seed(seed, key, "up")),
        down=DirState(down, _seed(seed, key, "down")),
        hops=hops,
    )


class Forwarder:
    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg = cfg
        self.seed = int(cfg.get("seed", 1))
        self.spin_ns = int(cfg.get("spin_us", 300) * 1000)
        self.spin_cap = float(cfg.get("spin_cap", 0.25))
        self.running = True
        self.regions: list[Region] = []
        self.by_agent: dict[bytes, Region] = {}
        self.edge_fd = -1
        self.heap: list[tuple[int, int, int, bytes, tuple[Any, ...]]] = []
        self.counter = 0
        self.late_us: deque[float] = deque(maxlen=200_000)
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "read",
                "delivered",
                "dropped",
                "expired",
                "generated",
                "unroutable",
                "malformed",
                "write_errors",
                "rt_demotions",
                "unstamped",
            ),
            0,
        )
        self.spin_ns_total = 0
        self.truth = gt.Writer(cfg["truth"])
        self.t0_ns = 0
        self.schedule: list[tuple[int, str, str, dict[str, Any]]] = []
        self.hop_rng = random.Random(self.seed)
        self.ctl: socket.socket | None = None
        self.realtime = bool(cfg.get("realtime", True))
        self.rt_cpu_max = float(cfg.get("rt_cpu_max", 0.75))
        self.fifo = False
        # TUN fd -> the kernel's stamps of the packets entering that device.
        self.stamps: dict[int, KernelStamps] = {}

    # -- set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        _prctl(PR_SET_TIMERSLACK, 1)
        # On 2 vCPUs shared with agents, edge servers and tests, the forwarder must win the
        # CPU the moment a release is due. SCHED_FIFO does that (measured under load average
        # ~3: release lateness p99 10-26 µs with FIFO, 4-21 ms with nice -15 alone), but a
        # real-time task that stays busy is throttled for ~50 ms every second. So FIFO is used
        # only while the forwarder's own CPU use stays under ``rt_cpu_max`` per second (the
        # busy-poll cap keeps it there at the rates tests use); above that it drops to
        # SCHED_OTHER at nice -15 until the load falls again (see ``_adjust_class``).
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, int(cfg.get("nice", -15)))
        self._set_fifo(bool(cfg.get("realtime", True)))
        if cfg.get("die_with_parent"):
            _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        moves: list[tuple[str, str, int]] = []
        self.edge_fd = open_tun(cfg["edge_tun"])
        moves.append((cfg["edge_tun"], cfg["edge_ns"], self.edge_fd))
        for r in cfg["regions"]:
            fd = open_tun(r["tun"])
            moves.append((r["tun"], r["ns"], fd))
            paths = {p["edge"]: build_path(p, r["name"], self.seed) for p in r["paths"]}
            by_addr: dict[bytes, Path] = {}
            prefixes: list[tuple[int, int, int, Path]] = []
            for p in r["paths"]:
                for a in p.get("addresses", []):
                    by_addr[ipaddress.ip_address(a).packed] = paths[p["edge"]]
                for pfx in p.get("prefixes", []):
                    net = ipaddress.ip_network(pfx)
                    prefixes.append(
                        (net.version, int(net.network_address), int(net.netmask), paths[p["edge"]])
                    )
            default = build_path({"edge": "", "impair": r.get("default", {})}, r["name"], self.seed)
            reg = Region(r["index"], r["name"], fd, paths, by_addr, prefixes, default)
            self.regions.append(reg)
            for a in r["agents"]:
                self.by_agent[ipaddress.ip_address(a).packed] = reg
        for name, ns, _ in moves:
            subprocess.run(["ip", "link", "set", "dev", name, "netns", ns], check=True)
        if cfg.get("kernel_stamps", True):
            for name, ns, fd in moves:
                try:
                    self.stamps[fd] = KernelStamps(ns, name)
                except OSError as e:
                    # Read-time stamps then: the ground truth misses the TUN queue wait.
                    print(f"forwarder: no kernel stamps on {name}: {e}", file=sys.stderr)
        for ch in cfg.get("schedule", []):
            self.schedule.append(
                (int(float(ch["at"]) * 1e9), ch["region"], ch["edge"], dict(ch["set"]))
            )
        self.schedule.sort(key=lambda c: c[0])
        if cfg.get("control"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cfg["control"])
            s.bind(cfg["control"])
            s.listen(8)
            s.setblocking(False)
            self.ctl = s
        self.t0_ns = time.monotonic_ns()

    def _set_fifo(self, on: bool) -> None:
        try:
            if on:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
            else:
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            self.fifo = on
        except (OSError, AttributeError):
            self.fifo = False

    def _adjust_class(self, cpu_share: float) -> None:
        """Leave the real-time class before the kernel's RT throttling (95 %) could bite."""
        if self.fifo and cpu_share > self.rt_cpu_max:
            self._set_fifo(False)
            self.stats["rt_demotions"] += 1
        elif not self.fifo and self.realtime and cpu_share < self.rt_cpu_max / 2:
            self._set_fifo(True)

    # -- per packet -----------------------------------------------------------------------
    def _lookup(self, reg: Region, addr: bytes) -> Path:
        p = reg.by_addr.get(addr)
        if p is not None:
            return p
        if reg.prefixes:
            v = 4 if len(addr) == 4 else 6
            x = int.from_bytes(addr, "big")
            for ver, net, mask, path in reg.prefixes:
                if ver == v and x & mask == net:
                    if len(reg.by_addr) < 100_000:
                        reg.by_addr[addr] = path
                    return path
        return reg.default

    def _push(self, t: int, fd: int, pkt: bytes, rec: tuple[Any, ...]) -> None:
        self.counter += 1
        heapq.heappush(self.heap, (t, self.counter, fd, pkt, rec))

    def _hop_survives(self, hops: list[Hop], k: int) -> int:
        """0 if a packet crosses hops 1..k, else the 1-based hop that dropped it."""
        rng = self.hop_rng
        for i in range(k):
            if hops[i].loss > 0 and rng.random() < hops[i].loss:
                return i + 1
        return 0

    def handle(self, pkt: bytes, from_fd: int, reg_in: Region | None, now: int) -> None:
        info = packet.parse(pkt)
        st = self.stats
        if info is None:
            st["malformed"] += 1
            return
        if reg_in is not None:
            direction, reg, addr = gt.UP, reg_in, info.dst
        else:
            direction = gt.DOWN
            found = self.by_agent.get(info.dst)
            if found is None:
                st["unroutable"] += 1
                self.truth.add(direction, gt.UNROUTABLE, info, 0, 0xFFFF, now, 0, 0)
                return
            reg, addr = found, info.src
        path = self._lookup(reg, addr)
        hops = path.hops
        n = len(hops)
        if direction == gt.UP and n and info.ttl <= n:
            k = max(info.ttl, 1)
            dropped_at = self._hop_survives(hops, k)
            if dropped_at:
                st["dropped"] += 1
                self.truth.add(direction, gt.DROPPED, info, dropped_at, reg.index, now, 0, 0)
                return
            st["expired"] += 1
            t_hop = now + path.hop_delay_ns(k)
            self.truth.add(direction, gt.EXPIRED, info, k, reg.index, now, t_hop, 0)
            hop = hops[k - 1]
            if hop.icmp_loss > 0 and self.hop_rng.random() < hop.icmp_loss:
                return
            back = self._hop_survives(hops, k - 1)
            te = packet.time_exceeded(
                pkt, hop.addr4 if info.version == 4 else hop.addr6, ttl=64 - (k - 1)
            )
            te_info = packet.parse(te)
            assert te_info is not None
            if back:
                st["dropped"] += 1
                self.truth.add(gt.DOWN, gt.DROPPED, te_info, back, reg.index, t_hop, 0, 0)
                return
            t = t_hop + path.hop_delay_ns(k)
            self._push(t, reg.fd, te, (gt.DOWN, gt.GENERATED, te_info, k, reg.index, now, t))
            return
        d = path.up if direction == gt.UP else path.down
        if n:
            dropped_at = self._hop_survives(hops, n)
            if dropped_at:
                st["dropped"] += 1
                self.truth.add(direction, gt.DROPPED, info, dropped_at, reg.index, now, 0, 0)
                return
        if d.lost():
            st["dropped"] += 1
            self.truth.add(direction, gt.DROPPED, info, 0, reg.index, now, 0, 0)
            return
        if n:
            if info.ttl <= n:
                st["dropped"] += 1
                self.truth.add(direction, gt.DROPPED, info, n, reg.index, now, 0, 0)
                return
            b = bytearray(pkt)
            packet.age(b, n)
            pkt = bytes(b)
        t = d.release_ns(now)
        out_fd = self.edge_fd if direction == gt.UP else reg.fd
        self._push(t, out_fd, pkt, (direction, gt.DELIVERED, info, 0, reg.index, now, t))

    def release_due(self) -> int:
        """Write out every packet whose time has come; returns the next due time or 0."""
        heap = self.heap
        st = self.stats
        while heap:
            t = heap[0][0]
            now = time.monotonic_ns()
            if t > now:
                return t
            _, _, fd, pkt, rec = heapq.heappop(heap)
            try:
                os.write(fd, pkt)
            except OSError:
                st["write_errors"] += 1
                continue
            direction, status, info, hop, region, arrival, intended = rec
            st["generated" if status == gt.GENERATED else "delivered"] += 1
            self.truth.add(direction, status, info, hop, region, arrival, intended, now)
            self.late_us.append((now - intended) / 1e3)
        return 0

    # -- control --------------------------------------------------------------------------
    def apply_change(self, region: str, edge: str, raw: Mapping[str, Any]) -> None:
        reg = next((r for r in self.regions if r.name == region), None)
        if reg is None:
            raise KeyError(f"unknown region {region!r}")
        path = reg.default if edge in ("", "*default*") else reg.paths.get(edge)
        if path is None:
            raise KeyError(f"unknown edge {edge!r} in region {region!r}")
        up, down = split_directions(raw, f"{region}.{edge}", (path.up.imp, path.down.imp))
        path.up.imp, path.down.imp = up, down

    def snapshot(self) -> dict[str, Any]:
        late = sorted(self.late_us)
        up = (time.monotonic_ns() - self.t0_ns) / 1e9

        def q(x: float) -> float:
            return late[min(len(late) - 1, int(x * len(late)))] if late else 0.0

        cpu = time.process_time()
        return {
            "uptime_s": up,
            "stats": dict(self.stats),
            "queued": len(self.heap),
            "late_p50_us": q(0.5),
            "late_p99_us": q(0.99),
            "late_n": len(late),
            "cpu_s": cpu,
            "spin_s": self.spin_ns_total / 1e9,
            "realtime": self.fifo,
            "records": self.truth.records,
            "pps_capacity": self.stats["read"] / cpu if cpu > 0 else 0.0,
            "paths": {
                r.name: {
                    e: {"up": p.up.imp.to_json(), "down": p.down.imp.to_json()}
                    for e, p in r.paths.items()
                }
                for r in self.regions
            },
        }

    def serve_control(self) -> None:
        assert self.ctl is not None
        try:
            conn, _ = self.ctl.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(2.0)
            buf = b""
            try:
                while not buf.endswith(b"\n") and len(buf) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                req = json.loads(buf or b"{}")
                cmd = req.get("cmd")
                if cmd == "set":
                    self.apply_change(req["region"], req["edge"], req.get("set", {}))
                    resp: dict[str, Any] = {"ok": True}
                elif cmd == "flush":
                    self.truth.flush()
                    resp = {"ok": True, "records": self.truth.records}
                elif cmd == "stats":
                    self.truth.flush()
                    resp = {"ok": True, **self.snapshot()}
                else:
                    resp = {"ok": False, "error": f"unknown cmd {cmd!r}"}
            except (ValueError, KeyError, TypeError) as e:
                resp = {"ok": False, "error": str(e)}
            except OSError:
                return
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(resp).encode() + b"\n")

    # -- loop -----------------------------------------------------------------------------
    def run(self) -> None:
        fds = [self.edge_fd] + [r.fd for r in self.regions]
        by_fd: dict[int, Region | None] = {self.edge_fd: None}
        by_fd.update({r.fd: r for r in self.regions})
        rlist: list[Any] = list(fds) + ([self.ctl] if self.ctl is not None else [])
        ctl_fd = self.ctl.fileno() if self.ctl is not None else -1
        last_flush = time.monotonic_ns()
        window_start = last_flush
        spin_in_window = 0
        cpu_at_window = time.process_time()
        st = self.stats
        while self.running:
            next_due = self.release_due()
            now = time.monotonic_ns()
            while self.schedule and now - self.t0_ns >= self.schedule[0][0]:
                _, reg, edge, raw = self.schedule.pop(0)
                try:
                    self.apply_change(reg, edge, raw)
                except (KeyError, ValueError) as e:
                    print(f"forwarder: schedule: {e}", file=sys.stderr, flush=True)
            if now - window_start > 1_000_000_000:
                cpu = time.process_time()
                self._adjust_class((cpu - cpu_at_window) / ((now - window_start) / 1e9))
                window_start, spin_in_window, cpu_at_window = now, 0, cpu
            spin = self.spin_ns if spin_in_window < self.spin_cap * 1e9 else 0
            if next_due:
                wait = next_due - now
                timeout = max(0.0, (wait - spin) / 1e9) if wait > spin else 0.0
            else:
                timeout = 0.05
            if self.schedule:
                timeout = min(timeout, max(0.0, (self.t0_ns + self.schedule[0][0] - now) / 1e9))
            ready, _, _ = select.select(rlist, [], [], timeout)
            after = time.monotonic_ns()
            if timeout == 0.0 and not ready:
                spin_in_window += after - now
                self.spin_ns_total += after - now
            for f in ready:
                fd = f if isinstance(f, int) else f.fileno()
                if fd == ctl_fd:
                    self.serve_control()
                    continue
                src_reg = by_fd[fd]
                stamps = self.stamps.get(fd)
                if stamps is not None:
                    stamps.drain()
                for _ in range(READ_BATCH):
                    try:
                        pkt = os.read(fd, 65535)
                    except BlockingIOError:
                        break
                    except OSError as e:
                        if e.errno == errno.EINTR:
                            continue
                        raise
                    st["read"] += 1
                    read_ns = time.monotonic_ns()
                    arrival = read_ns if stamps is None else stamps.take(pkt, read_ns)
                    if arrival == read_ns:
                        st["unstamped"] += 1
                    # Arrival is when the packet entered the lab: its delay counts from there.
                    self.handle(pkt, fd, src_reg, arrival)
            if after - last_flush > 100_000_000:
                self.truth.flush()
                last_flush = after
        self.truth.close()
        for k in self.stamps.values():
            k.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # The optional second argument is a tag (the run id) so a process listing names the run.
    if len(args) not in (1, 2):
        print("usage: python -m lab.forwarder CONFIG.json [TAG]", file=sys.stderr)
        return 2
    with open(args[0]) as f:
        cfg = json.load(f)
    fwd = Forwarder(cfg)

    def stop(_sig: int, _frm: object) -> None:
        fwd.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    fwd.setup()
    meta = {
        "regions": [r.name for r in sorted(fwd.regions, key=lambda r: r.index)],
        "edges": cfg.get("edge_names", {}),
        "t0_ns": fwd.t0_ns,
        "record": gt.RECORD.format,
    }
    with open(cfg["truth_meta"], "w") as f:
        json.dump(meta, f)
    print("READY", flush=True)
    # The hot loop makes no reference cycles; a collector pass over the heap of pending
    # packets would only add release lateness.
    gc.freeze()
    gc.disable()
    fwd.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
