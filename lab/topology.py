"""Bring a lab world up and down: namespaces, TUN devices, the forwarder, edge services.

Layout of one world (``rid`` is a random 6-hex run id, so parallel worlds never clash)::

    root ns ── veth epRIDm<i> (198.19.192.0/18, a /30 each) ── region ns epRID-<region>
                                                                  │ TUN epRIDr<i>
                                        user-space forwarder (this package) ── TUN epRIDe
                                                                  │
                                                       edge ns epRID-edge (all edges)

Address plan (RFC 2544 benchmarking range and RFC 3849 documentation prefix only):
edges 198.18.0.0/16 and 2001:db8:e::/48 (answered as local routes in the edge ns), agents
198.19.<i+1>.2 and 2001:db8:a:<i+1>::2, hops 198.19.64.0/18 and 2001:db8:f::/48, management
/30s in 198.19.192.0/18. The root namespace gets only the management /30s; a region
namespace has no default route, only the lab ranges through its TUN device.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from lab import groundtruth as gt
from lab.spec import DEFAULT_PROFILES, Profile, load_profile, merge_edges

REGISTRY = Path("/run/edgeprobe-lab")
SHM = Path("/dev/shm")
NETNS_ETC = Path("/etc/netns")
MGMT_NET = ipaddress.ip_network("198.19.192.0/18")
HOP_NET4 = ipaddress.ip_network("198.19.64.0/18")
DNS4, DNS6 = "198.18.0.53", "2001:db8:e::53"
PORTS = {"tcp": 9000, "tls": 8443, "http": 80, "https": 443, "udp_echo": 7, "dns": 53, "turn": 3478}
TURN_USERS = {"edgeprobe": "lab-secret"}
_NS_RE = re.compile(r"^ep([0-9a-f]{6})-")


class LabError(RuntimeError):
    pass


def lab_available() -> tuple[bool, str]:
    """Whether a world can be built here, and why not."""
    if sys.platform != "linux":
        return False, "the lab needs Linux"
    if os.geteuid() != 0:
        return False, "the lab needs root (network namespaces, TUN devices)"
    if not os.path.exists("/dev/net/tun"):
        return False, "no /dev/net/tun"
    if shutil.which("ip") is None:
        return False, "no iproute2 'ip' command"
    probe = f"epchk{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return False, f"cannot create a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True, ""


def _ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    argv = ["ip"] + (["-n", ns] if ns else []) + list(args)
    r = subprocess.run(argv, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r.stdout


def _batch(cmds: Sequence[str], ns: str | None = None) -> None:
    """Many ``ip`` commands in one process (``ip -batch``): bring-up stays well under 1 s."""
    argv = ["ip"] + (["-n", ns] if ns else []) + ["-batch", "-"]
    r = subprocess.run(argv, input="\n".join(cmds) + "\n", capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"ip -batch ({ns or 'root'}): {r.stderr.strip()}")


def _sysctl(ns: str, kv: Mapping[str, str]) -> None:
    args = [f"{k}={v}" for k, v in kv.items()]
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", *args], capture_output=True)


def _pid_start(pid: int) -> int:
    """The process start time (clock ticks since boot), to tell a PID from its reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return -1


def _alive(pid: int, start: int) -> bool:
    return pid > 0 and _pid_start(pid) == start


def _stop(pid: int, start: int, group: bool, timeout: float = 5.0) -> None:
    """SIGTERM (then SIGKILL) one process we started, identified by PID and start time."""
    if not _alive(pid, start):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid, start):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)
    if _alive(pid, start):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


@dataclass
class RegionInfo:
    name: str
    index: int
    ns: str
    tun: str
    agent4: str
    agent6: str
    mgmt_if: str  # root-side veth
    mgmt_host: str  # root-side address (where Prometheus scrapes from)
    mgmt_addr: str  # region-side address: listen here for /metrics
    hops: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # edge -> hops


@dataclass
class WorldState:
    """What ``python -m lab up`` writes to ``state.json``; everything a test or script needs."""

    run_id: str
    state_dir: str
    edge_ns: str
    edge_tun: str
    regions: dict[str, RegionInfo]
    edges: dict[str, dict[str, str]]  # name -> {ipv4, ipv6, dns}
    paths: dict[str, dict[str, dict[str, Any]]]  # region -> edge -> {tier, note, up, down}
    truth: str
    truth_meta: str
    control: str
    dns_servers: list[str]
    ports: dict[str, int]
    turn_users: dict[str, str]
    ca: str = ""
    services: bool = False
    forwarder_pid: int = 0
    forwarder_start: int = 0
    services_pid: int = 0
    services_start: int = 0
    owner_pid: int = 0
    owner_start: int = 0
    namespaces: list[str] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> WorldState:
        d = dict(d)
        d["regions"] = {k: RegionInfo(**v) for k, v in d["regions"].items()}
        return cls(**d)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        tmp.replace(path)


def _services_available() -> bool:
    return (Path(__file__).parent / "services.py").exists()


def _registry_path(rid: str) -> Path:
    return REGISTRY / f"{rid}.json"


def cleanup_stale() -> list[str]:
    """Tear down worlds whose owner is gone (a crashed test run). Returns their run ids."""
    done: list[str] = []
    if REGISTRY.is_dir():
        for p in REGISTRY.glob("*.json"):
            try:
                st = WorldState.from_json(json.loads(p.read_text()))
            except (OSError, ValueError, TypeError, KeyError):
                continue
            owner_alive = _alive(st.owner_pid, st.owner_start) if st.owner_pid else False
            fwd_alive = _alive(st.forwarder_pid, st.forwarder_start)
            if owner_alive or (not st.owner_pid and fwd_alive):
                continue
            teardown(st)
            done.append(st.run_id)
    # Namespaces of ours with no registry entry: a run that died between the two.
    known = {p.stem for p in REGISTRY.glob("*.json")} if REGISTRY.is_dir() else set()
    for line in _ip("netns", "list", check=False).splitlines():
        name = line.split()[0] if line.strip() else ""
        m = _NS_RE.match(name)
        if m and m.group(1) not in known:
            _ip("netns", "del", name, check=False)
            done.append(m.group(1))
    return sorted(set(done))


def teardown(st: WorldState) -> None:
    """Stop the world's processes and delete its namespaces, links and files. Idempotent."""
    if st.services_pid:
        _stop(st.services_pid, st.services_start, group=True)
    if st.forwarder_pid:
        _stop(st.forwarder_pid, st.forwarder_start, group=False)
    for ns in st.namespaces:
        _ip("netns", "del", ns, check=False)
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
    # Deleting a region namespace deletes its veth peer too; this catches a half-made one.
    for r in st.regions.values():
        _ip("link", "del", r.mgmt_if, check=False)
    shutil.rmtree(SHM / f"edgeprobe-lab-{st.run_id}", ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        _registry_path(st.run_id).unlink()


def _alloc_mgmt(n: int) -> list[ipaddress.IPv4Network]:
    """n free /30s in the management range, seen from the root namespace's addresses."""
    used: set[ipaddress.IPv4Network] = set()
    for line in _ip("-4", "-o", "addr", "show").splitlines():
        m = re.search(r"inet (\S+)", line)
        if m:
            iface = ipaddress.ip_interface(m.group(1))
            if iface.ip in MGMT_NET:
                used.add(ipaddress.IPv4Network(f"{iface.ip}/30", strict=False))
    out: list[ipaddress.IPv4Network] = []
    for sub in MGMT_NET.subnets(new_prefix=30):
        if isinstance(sub, ipaddress.IPv4Network) and sub not in used:
            out.append(sub)
            if len(out) == n:
                return out
    raise LabError("no free management /30 left in 198.19.192.0/18")


def hop_address(region: int, edge: int, hop: int) -> tuple[str, str]:
    v4 = HOP_NET4.network_address + region * 1024 + edge * 32 + hop + 1
    v6 = ipaddress.ip_address(f"2001:db8:f:{region:x}:{edge:x}::{hop + 1:x}")
    return str(v4), str(v6)


class World:
    """A running lab world. ``with World.up(...) as w:`` always tears down on exit."""

    def __init__(self, state: WorldState, owned: bool) -> None:
        self.state = state
        self._owned = owned
        self._procs: list[subprocess.Popen[bytes]] = []

    # -- bring-up -------------------------------------------------------------------------
    @classmethod
    def up(
        cls,
        profiles: Sequence[str | Profile] = DEFAULT_PROFILES,
        state_dir: str | os.PathLike[str] | None = None,
        services: bool | None = None,
        seed: int = 1,
        detach: bool = False,
        spin_us: int = 300,
        extra_paths: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    ) -> World:
        """Build a world. ``services=None`` starts the edge services if ``lab/services.py``
        exists. ``detach=True`` (the CLI) lets processes outlive this Python process.
        ``extra_paths``: region -> extra raw forwarder path specs (benchmarks: prefixes)."""
        ok, why = lab_available()
        if not ok:
            raise LabError(why)
        cleanup_stale()
        profs = [p if isinstance(p, Profile) else load_profile(p) for p in profiles]
        if len({p.region for p in profs}) != len(profs):
            raise LabError("a region appears twice")
        edges = merge_edges(profs)
        rid = os.urandom(3).hex()
        # Absolute: dnsmasq and coturn chdir to / and would lose a relative pid/log path.
        sdir = (Path(state_dir) if state_dir else Path(f"/tmp/edgeprobe-lab-{rid}")).resolve()
        sdir.mkdir(parents=True, exist_ok=True)
        shm = SHM / f"edgeprobe-lab-{rid}"
        shm.mkdir(mode=0o755)
        if services is None:
            services = _services_available()
        regions: dict[str, RegionInfo] = {}
        for i, p in enumerate(profs):
            regions[p.region] = RegionInfo(
                name=p.region,
                index=i,
                ns=f"ep{rid}-{p.region}",
                tun=f"ep{rid}r{i}",
                agent4=f"198.19.{i + 1}.2",
                agent6=f"2001:db8:a:{i + 1:x}::2",
                mgmt_if=f"ep{rid}m{i}",
                mgmt_host="",
                mgmt_addr="",
            )
        st = WorldState(
            run_id=rid,
            state_dir=str(sdir),
            edge_ns=f"ep{rid}-edge",
            edge_tun=f"ep{rid}e",
            regions=regions,
            edges={n: {"ipv4": e.ipv4, "ipv6": e.ipv6, "dns": e.dns} for n, e in edges.items()},
            paths={
                p.region: {
                    x.edge: {"tier": x.tier, "note": x.note, **x.impair_json()} for x in p.paths
                }
                for p in profs
            },
            truth=str(shm / "truth.bin"),
            truth_meta=str(shm / "truth.json"),
            control=str(sdir / "forwarder.sock"),
            dns_servers=[DNS4, DNS6],
            ports=dict(PORTS),
            turn_users=dict(TURN_USERS),
            services=bool(services),
            # The builder owns the world while building it, so a concurrent cleanup_stale()
            # never mistakes a half-built detached world for a dead one.
            owner_pid=os.getpid(),
            owner_start=_pid_start(os.getpid()),
            namespaces=[f"ep{rid}-edge"] + [r.ns for r in regions.values()],
            profiles=[p.file or p.region for p in profs],
        )
        REGISTRY.mkdir(parents=True, exist_ok=True)
        st.save(_registry_path(rid))
        world = cls(st, owned=not detach)
        try:
            world._build(profs, edges, seed, detach, spin_us, extra_paths or {})
        except BaseException:
            world.down()
            raise
        if detach:
            st.owner_pid = st.owner_start = 0
            st.save(sdir / "state.json")
            st.save(_registry_path(rid))
        return world

    def _build(
        self,
        profs: Sequence[Profile],
        edges: Mapping[str, Any],
        seed: int,
        detach: bool,
        spin_us: int,
        extra_paths: Mapping[str, Sequence[Mapping[str, Any]]],
    ) -> None:
        st = self.state
        sdir = Path(st.state_dir)
        for ns in st.namespaces:
            _ip("netns", "add", ns)
        for ns in st.namespaces:
            _batch(["link set lo up"], ns=ns)
            # No ICMP error rate limit: the path probe's traceroute needs one error per probe.
            _sysctl(
                ns,
                {
                    "net.ipv4.icmp_ratelimit": "0",
                    "net.ipv6.icmp.ratelimit": "0",
                    "net.ipv4.icmp_msgs_per_sec": "1000000",
                    "net.ipv4.icmp_msgs_burst": "1000000",
                    "net.ipv4.conf.all.rp_filter": "0",
                    "net.ipv4.conf.default.rp_filter": "0",
                    "net.ipv4.ping_group_range": "0 2147483647",
                },
            )
        # Management veths, allocated under a lock so parallel worlds pick different /30s.
        REGISTRY.mkdir(parents=True, exist_ok=True)
        with open(REGISTRY / ".lock", "w") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            nets = _alloc_mgmt(len(st.regions))
            cmds = []
            for r, net in zip(st.regions.values(), nets, strict=True):
                host, addr = net.network_address + 1, net.network_address + 2
                r.mgmt_host, r.mgmt_addr = str(host), str(addr)
                cmds += [
                    f"link add {r.mgmt_if} type veth peer name mgmt0 netns {r.ns}",
                    f"addr add {host}/30 dev {r.mgmt_if}",
                    f"link set {r.mgmt_if} up",
                ]
            _batch(cmds)
        for r in st.regions.values():
            _batch([f"addr add {r.mgmt_addr}/30 dev mgmt0", "link set mgmt0 up"], ns=r.ns)
        # Edge namespace: every edge address is local. Whole ranges via local routes (the
        # benchmark uses thousands of addresses); the profile's addresses and the DNS server
        # also explicitly, so servers can bind them.
        cmds = [
            "route add local 198.18.0.0/16 dev lo",
            "route add local 2001:db8:e::/48 dev lo",
            f"addr add {DNS4}/32 dev lo",
            f"addr add {DNS6}/128 dev lo",
        ]
        for e in edges.values():
            cmds += [f"addr add {e.ipv4}/32 dev lo", f"addr add {e.ipv6}/128 dev lo"]
        _batch(cmds, ns=st.edge_ns)
        # Forwarder config.
        fwd_regions = []
        edge_names: dict[str, str] = {}
        for e in edges.values():
            edge_names[e.ipv4] = e.name
            edge_names[e.ipv6] = e.name
        for p in profs:
            r = st.regions[p.region]
            paths = []
            for ei, x in enumerate(p.paths):
                e = edges[x.edge]
                hops = []
                for hi, h in enumerate(x.hops):
                    a4, a6 = hop_address(r.index, ei, hi)
                    hops.append(
                        {
                            "name": h.name,
                            "addr4": a4,
                            "addr6": a6,
                            "delay": h.delay,
                            "loss": h.loss,
                            "icmp_loss": h.icmp_loss,
                        }
                    )
                    edge_names[a4] = f"{x.edge}/{h.name}"
                    edge_names[a6] = f"{x.edge}/{h.name}"
                if hops:
                    r.hops[x.edge] = hops
                paths.append(
                    {
                        "edge": x.edge,
                        "addresses": [e.ipv4, e.ipv6],
                        "prefixes": list(e.prefixes),
                        "impair": x.impair_json(),
                        "hops": hops,
                    }
                )
            paths += [dict(x) for x in extra_paths.get(p.region, [])]
            fwd_regions.append(
                {
                    "name": p.region,
                    "index": r.index,
                    "tun": r.tun,
                    "ns": r.ns,
                    "agents": [r.agent4, r.agent6],
                    "paths": paths,
                }
            )
        schedule = [
            {"at": c.at, "region": p.region, "edge": c.edge, "set": dict(c.set)}
            for p in profs
            for c in p.schedule
        ]
        cfg = {
            "run_id": st.run_id,
            "seed": seed,
            "truth": st.truth,
            "truth_meta": st.truth_meta,
            "control": st.control,
            "edge_tun": st.edge_tun,
            "edge_ns": st.edge_ns,
            "regions": fwd_regions,
            "schedule": schedule,
            "edge_names": edge_names,
            "spin_us": spin_us,
            "die_with_parent": not detach,
        }
        cfg_path = sdir / "forwarder.json"
        cfg_path.write_text(json.dumps(cfg, indent=1))
        argv = [sys.executable, "-m", "lab.forwarder", str(cfg_path), f"edgeprobe-lab-{st.run_id}"]
        proc = self._spawn("forwarder", argv, new_session=detach)
        st.forwarder_pid, st.forwarder_start = proc.pid, _pid_start(proc.pid)
        st.save(_registry_path(st.run_id))
        self._wait_ready(proc, "forwarder", "forwarder", 15.0)
        # The TUN devices are now in their namespaces: address and route them.
        _batch(
            [
                f"link set {st.edge_tun} addrgenmode none",
                f"link set {st.edge_tun} up",
                f"route add 198.19.0.0/18 dev {st.edge_tun}",
                f"route add 2001:db8:a::/48 dev {st.edge_tun}",
            ],
            ns=st.edge_ns,
        )
        for r in st.regions.values():
            _batch(
                [
                    f"link set {r.tun} addrgenmode none",
                    f"link set {r.tun} up",
                    f"addr add {r.agent4}/32 dev {r.tun}",
                    f"addr add {r.agent6}/128 dev {r.tun} nodad",
                    f"route add 198.18.0.0/16 dev {r.tun} src {r.agent4}",
                    f"route add {HOP_NET4} dev {r.tun} src {r.agent4}",
                    f"route add 2001:db8:e::/48 dev {r.tun} src {r.agent6}",
                    f"route add 2001:db8:f::/48 dev {r.tun} src {r.agent6}",
                ],
                ns=r.ns,
            )
        if st.services:
            self._start_services(edges, detach)
            # `ip netns exec` bind-mounts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf,
            # so name lookups inside a region go to the lab's dnsmasq and nowhere else.
            for r in st.regions.values():
                d = NETNS_ETC / r.ns
                d.mkdir(parents=True, exist_ok=True)
                (d / "resolv.conf").write_text(
                    "".join(f"nameserver {a}\n" for a in st.dns_servers)
                    + "options timeout:1 attempts:2\n"
                )
        st.save(sdir / "state.json")
        st.save(_registry_path(st.run_id))

    def _spawn(self, name: str, argv: Sequence[str], new_session: bool) -> subprocess.Popen[bytes]:
        """Start a child of the world from the repository root, its stdout (where it says
        READY) in ``name``.out and its stderr in ``name``.log of the state directory."""
        sdir = Path(self.state.state_dir)
        # Files, never pipes: a detached child must not die of SIGPIPE after
        # `python -m lab up` has exited.
        with open(sdir / f"{name}.out", "wb") as out, open(sdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=log,
                start_new_session=new_session,
                cwd=str(Path(__file__).resolve().parent.parent),
            )
        self._procs.append(proc)
        return proc

    def _wait_ready(
        self, proc: subprocess.Popen[bytes], name: str, what: str, timeout: float
    ) -> None:
        """Wait for the READY of ``_spawn``'s child ``name``."""
        sdir = Path(self.state.state_dir)
        out, log = sdir / f"{name}.out", sdir / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if b"READY" in out.read_bytes():
                    return
            if proc.poll() is not None:
                break
            time.sleep(0.01)
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise LabError(f"{what} did not become ready (exit {proc.poll()}): {tail}")

    def _start_services(self, edges: Mapping[str, Any], detach: bool) -> None:
        st = self.state
        sdir = Path(st.state_dir)
        addrs: list[str] = []
        for e in edges.values():
            addrs += [e.ipv4, e.ipv6]

        def hp(port: int) -> list[str]:
            return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addrs]

        records = {e.dns: [e.ipv4, e.ipv6] for e in edges.values()}
        cfg = {
            "state_dir": str(sdir / "services"),
            "tcp": hp(PORTS["tcp"]),
            "tls": hp(PORTS["tls"]),
            "http": hp(PORTS["http"]),
            "https": hp(PORTS["https"]),
            "udp_echo": hp(PORTS["udp_echo"]),
            "dns": {"listen": [DNS4, DNS6], "port": PORTS["dns"], "records": records},
            "turn": {
                "listen": addrs,
                "port": PORTS["turn"],
                "realm": "lab.test",
                "users": dict(TURN_USERS),
            },
        }
        (sdir / "services").mkdir(exist_ok=True)
        cfg_path = sdir / "services.json"
        cfg_path.write_text(json.dumps(cfg, indent=1))
        argv = [sys.executable, "-m", "lab.services", "--config", str(cfg_path)]
        proc = self._spawn("services", ["ip", "netns", "exec", st.edge_ns, *argv], new_session=True)
        st.services_pid, st.services_start = proc.pid, _pid_start(proc.pid)
        st.save(_registry_path(st.run_id))
        self._wait_ready(proc, "services", "edge services", 30.0)
        st.ca = str(sdir / "services" / "ca.pem")

    # -- use ------------------------------------------------------------------------------
    @classmethod
    def attach(cls, state_dir: str | os.PathLike[str]) -> World:
        """A world brought up by ``python -m lab up`` (for ``down``, ``exec``, ``truth``)."""
        p = Path(state_dir) / "state.json"
        return cls(WorldState.from_json(json.loads(p.read_text())), owned=False)

    def ns(self, region: str) -> str:
        if region in ("edge", self.state.edge_ns):
            return self.state.edge_ns
        try:
            return self.state.regions[region].ns
        except KeyError:
            raise LabError(
                f"unknown region {region!r}; one of {sorted(self.state.regions)} or 'edge'"
            ) from None

    def cmd(self, region: str, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside a region's (or the edge) namespace."""
        return ["ip", "netns", "exec", self.ns(region), *argv]

    def run(
        self, region: str, argv: Sequence[str], timeout: float = 60.0, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.cmd(region, argv), capture_output=True, text=True, timeout=timeout, **kw
        )

    def control(self, req: Mapping[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.state.control)
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        resp: dict[str, Any] = json.loads(buf)
        if not resp.get("ok"):
            raise LabError(f"forwarder: {resp.get('error')}")
        return resp

    def set_path(self, region: str, edge: str, **change: Any) -> None:
        """Change a path's impairment now, e.g. ``set_path("id-jakarta", "sin-1",
        delay="150ms", loss="5%")`` or with ``up={...}`` / ``down={...}``."""
        self.control({"cmd": "set", "region": region, "edge": edge, "set": change})

    def stats(self) -> dict[str, Any]:
        return self.control({"cmd": "stats"})

    def records(self) -> list[gt.Record]:
        """Every ground-truth record so far (asks the forwarder to flush first)."""
        self.control({"cmd": "flush"})
        return gt.read(self.state.truth)

    def meta(self) -> gt.Meta:
        return gt.Meta.load(self.state.truth_meta)

    def region_index(self, region: str) -> int:
        return self.state.regions[region].index

    # -- teardown -------------------------------------------------------------------------
    def down(self) -> None:
        teardown(self.state)
        for p in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=1)
        self._procs.clear()

    def __enter__(self) -> World:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()


def leftovers(run_id: str, state_dir: str = "") -> list[str]:
    """Namespaces, links and processes of a run that still exist (tests assert none)."""
    tags = [f"edgeprobe-lab-{run_id}".encode()] + ([state_dir.encode()] if state_dir else [])
    out = [
        f"netns {n}"
        for n in _ip("netns", "list", check=False).split()
        if n.startswith(f"ep{run_id}")
    ]
    out += [
        f"link {line.split(':')[1].strip()}"
        for line in _ip("-o", "link", "show", check=False).splitlines()
        if f"ep{run_id}" in line
    ]
    out += [f"file {p}" for p in NETNS_ETC.glob(f"ep{run_id}-*")] if NETNS_ETC.is_dir() else []
    out += [f"file {p}" for p in SHM.glob(f"edgeprobe-lab-{run_id}")]
    out += [f"file {p}" for p in REGISTRY.glob(f"{run_id}.json")] if REGISTRY.is_dir() else []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (d / "cmdline").read_bytes()
                if any(t in cmdline for t in tags):
                    out.append(f"process {d.name}")
    return out


def iter_states() -> Iterator[WorldState]:
    if REGISTRY.is_dir():
        for p in sorted(REGISTRY.glob("*.json")):
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                yield WorldState.from_json(json.loads(p.read_text()))
