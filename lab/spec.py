"""Region profiles (``lab/profiles/*.yaml``): decoded strictly into a world specification.

A profile describes one agent region and its candidate edges, each with the path from the
region to the edge (impairment per direction, optional hop list) and scheduled changes.
Edges may appear in several profiles (Singapore is a candidate for Jakarta and for Dubai);
they must then agree on addresses and name, while each (region, edge) pair has its own path.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config.rules import load_yaml
from lab.impair import (
    ImpairError,
    Impairment,
    parse_duration,
    parse_ratio,
    split_directions,
    update_impairment,
)

PROFILE_DIR = Path(__file__).parent / "profiles"
DEFAULT_PROFILES = ("id-jakarta", "br-saopaulo", "ae-dubai")
EDGE_NET4 = ipaddress.ip_network("198.18.0.0/16")  # RFC 2544 benchmarking range
EDGE_NET6 = ipaddress.ip_network("2001:db8:e::/48")  # RFC 3849 documentation range
DNS_SUFFIX = ".lab.test"  # RFC 6761


@dataclass(frozen=True)
class Hop:
    name: str
    delay: float  # one-way delay added by the link up to this router, seconds
    loss: float = 0.0  # loss of every packet crossing this router, both directions
    icmp_loss: float = 0.0  # extra loss of this router's own Time Exceeded replies


@dataclass(frozen=True)
class Edge:
    name: str
    ipv4: str
    ipv6: str
    dns: str
    prefixes: tuple[str, ...] = ()  # extra address ranges that share this edge's path


@dataclass(frozen=True)
class PathSpec:
    edge: str
    tier: str
    up: Impairment
    down: Impairment
    hops: tuple[Hop, ...] = ()
    note: str = ""

    def impair_json(self) -> dict[str, Any]:
        """The forwarder's raw form: durations as seconds, both directions explicit."""

        def one(i: Impairment) -> dict[str, Any]:
            d = i.to_json()
            if d["gilbert"] is None:
                del d["gilbert"]
            return d

        return {"up": one(self.up), "down": one(self.down)}


@dataclass(frozen=True)
class Change:
    at: float
    edge: str
    set: Mapping[str, Any]


@dataclass(frozen=True)
class Profile:
    region: str
    description: str
    source: str
    edges: tuple[Edge, ...]
    paths: tuple[PathSpec, ...]
    schedule: tuple[Change, ...] = ()
    file: str = ""


def _need(d: Mapping[str, Any], k: str, key: str, typ: type | tuple[type, ...]) -> Any:
    if k not in d:
        raise ImpairError(f"{key}.{k}: required")
    v = d[k]
    if not isinstance(v, typ):
        raise ImpairError(f"{key}.{k}: wrong type {type(v).__name__}")
    return v


def _check_keys(d: Mapping[str, Any], allowed: set[str], key: str) -> None:
    bad = set(d) - allowed
    if bad:
        raise ImpairError(f"{key}: unknown field(s) {sorted(bad)}; known: {sorted(allowed)}")


def decode_profile(raw: Any, file: str = "") -> Profile:
    key = file or "profile"
    if not isinstance(raw, Mapping):
        raise ImpairError(f"{key}: expected a map")
    _check_keys(raw, {"region", "description", "source", "edges", "schedule"}, key)
    region = _need(raw, "region", key, str)
    if not region or not all(c.isalnum() or c == "-" for c in region) or len(region) > 20:
        raise ImpairError(f"{key}.region: letters, digits and '-', at most 20 characters")
    edges: list[Edge] = []
    paths: list[PathSpec] = []
    for i, e in enumerate(_need(raw, "edges", key, list)):
        ek = f"{key}.edges[{i}]"
        if not isinstance(e, Mapping):
            raise ImpairError(f"{ek}: expected a map")
        _check_keys(
            e, {"name", "tier", "ipv4", "ipv6", "dns", "prefixes", "path", "hops", "note"}, ek
        )
        name = _need(e, "name", ek, str)
        v4 = ipaddress.ip_address(_need(e, "ipv4", ek, str))
        v6 = ipaddress.ip_address(_need(e, "ipv6", ek, str))
        if v4 not in EDGE_NET4 or v6 not in EDGE_NET6:
            raise ImpairError(f"{ek}: edge addresses must be in {EDGE_NET4} and {EDGE_NET6}")
        dns = e.get("dns", f"{name}{DNS_SUFFIX}")
        if not str(dns).endswith(DNS_SUFFIX):
            raise ImpairError(f"{ek}.dns: must end in {DNS_SUFFIX}")
        pfx = tuple(str(p) for p in e.get("prefixes", []))
        for p in pfx:
            net = ipaddress.ip_network(p)
            inside = (
                net.subnet_of(EDGE_NET4)  # type: ignore[arg-type]
                if net.version == 4
                else net.subnet_of(EDGE_NET6)  # type: ignore[arg-type]
            )
            if not inside:
                raise ImpairError(f"{ek}.prefixes: {p} outside the lab's edge ranges")
        edges.append(Edge(name, str(v4), str(v6), str(dns), pfx))
        up, down = split_directions(e.get("path", {}), f"{ek}.path")
        hops: list[Hop] = []
        for j, h in enumerate(e.get("hops", [])):
            hk = f"{ek}.hops[{j}]"
            if not isinstance(h, Mapping):
                raise ImpairError(f"{hk}: expected a map")
            _check_keys(h, {"name", "delay", "loss", "icmp_loss"}, hk)
            hops.append(
                Hop(
                    name=_need(h, "name", hk, str),
                    delay=parse_duration(h.get("delay", 0), f"{hk}.delay"),
                    loss=parse_ratio(h.get("loss", 0), f"{hk}.loss"),
                    icmp_loss=parse_ratio(h.get("icmp_loss", 0), f"{hk}.icmp_loss"),
                )
            )
        if len(hops) > 30:
            raise ImpairError(f"{ek}.hops: at most 30")
        if hops and sum(h.delay for h in hops) > min(up.delay, down.delay) + 1e-9:
            raise ImpairError(
                f"{ek}.hops: the hops' delays add up to more than the path's one-way delay"
            )
        paths.append(
            PathSpec(name, str(e.get("tier", "")), up, down, tuple(hops), str(e.get("note", "")))
        )
    names = [e.name for e in edges]
    if len(set(names)) != len(names):
        raise ImpairError(f"{key}.edges: duplicate edge names")
    sched: list[Change] = []
    for i, c in enumerate(raw.get("schedule", []) or []):
        ck = f"{key}.schedule[{i}]"
        if not isinstance(c, Mapping):
            raise ImpairError(f"{ck}: expected a map")
        _check_keys(c, {"at", "edge", "set"}, ck)
        edge = _need(c, "edge", ck, str)
        if edge not in names:
            raise ImpairError(f"{ck}.edge: {edge!r} is not an edge of this profile")
        change = _need(c, "set", ck, Mapping)
        split_directions(change, f"{ck}.set")  # validate now, not at t=60 s
        sched.append(
            Change(
                parse_duration(_need(c, "at", ck, (int, float, str)), f"{ck}.at"),
                edge,
                _jsonable(change, f"{ck}.set"),
            )
        )
    return Profile(
        region=region,
        description=str(raw.get("description", "")),
        source=str(raw.get("source", "")),
        edges=tuple(edges),
        paths=tuple(paths),
        schedule=tuple(sched),
        file=file,
    )


def _jsonable(change: Mapping[str, Any], key: str) -> dict[str, Any]:
    """A change with durations turned into seconds, so the forwarder gets plain numbers."""
    out: dict[str, Any] = {}
    for k, v in change.items():
        if k in ("up", "down") and isinstance(v, Mapping):
            out[k] = _jsonable(v, f"{key}.{k}")
        elif k in ("delay", "jitter"):
            out[k] = parse_duration(v, f"{key}.{k}")
        elif k == "loss":
            out[k] = parse_ratio(v, f"{key}.{k}")
        else:
            out[k] = v
    update_impairment(Impairment(), {k: v for k, v in out.items() if k not in ("up", "down")}, key)
    return out


def load_profile(name_or_path: str) -> Profile:
    """A profile by name (``id-jakarta``) from ``lab/profiles``, or by file path."""
    p = Path(name_or_path)
    if not p.suffix:
        p = PROFILE_DIR / f"{name_or_path}.yaml"
    return decode_profile(load_yaml(p.read_text()), str(p))


def merge_edges(profiles: Sequence[Profile]) -> dict[str, Edge]:
    """Every edge of the world by name; the same name must mean the same addresses."""
    out: dict[str, Edge] = {}
    for prof in profiles:
        for e in prof.edges:
            old = out.get(e.name)
            if old is not None and (old.ipv4, old.ipv6, old.dns) != (e.ipv4, e.ipv6, e.dns):
                raise ImpairError(
                    f"{prof.file}: edge {e.name!r} has other addresses than in another profile"
                )
            out.setdefault(e.name, e)
    addrs: dict[str, str] = {}
    for e in out.values():
        for a in (e.ipv4, e.ipv6):
            if addrs.setdefault(a, e.name) != e.name:
                raise ImpairError(f"address {a} is used by edges {addrs[a]!r} and {e.name!r}")
    return out


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


__all__ = [
    "DEFAULT_PROFILES",
    "Change",
    "Edge",
    "Hop",
    "PathSpec",
    "Profile",
    "available_profiles",
    "decode_profile",
    "load_profile",
    "merge_edges",
]
