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

import yaml

from agent.config.decode import (
    ConfigError,
    Duration,
    Problem,
    compose,
    decode_dataclass,
    line_of,
    mapping_items,
    node_of,
)
from lab.impair import Impairment, Ratio, change_json, split_directions

PROFILE_DIR = Path(__file__).parent / "profiles"
DEFAULT_PROFILES = ("id-jakarta", "br-saopaulo", "ae-dubai")
EDGE_NET4 = ipaddress.ip_network("198.18.0.0/16")  # RFC 2544 benchmarking range
EDGE_NET6 = ipaddress.ip_network("2001:db8:e::/48")  # RFC 3849 documentation range
DNS_SUFFIX = ".lab.test"  # RFC 6761
MAX_HOPS = 30


@dataclass(frozen=True)
class Hop:
    name: str
    delay: Duration = Duration(0.0)  # one-way delay added by the link up to this router
    loss: Ratio = Ratio(0.0)  # loss of every packet crossing this router, both directions
    icmp_loss: Ratio = Ratio(0.0)  # extra loss of this router's own Time Exceeded replies


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
    set: Mapping[str, Any]  # the keys of a path spec it sets, as the forwarder takes them


@dataclass(frozen=True)
class Profile:
    region: str
    description: str
    source: str
    edges: tuple[Edge, ...]
    paths: tuple[PathSpec, ...]
    schedule: tuple[Change, ...] = ()
    file: str = ""


# What a profile file says; decode_profile turns it into a Profile.


@dataclass(frozen=True)
class _EdgeEntry:
    name: str
    ipv4: str
    ipv6: str
    dns: str = ""  # default: the name under DNS_SUFFIX
    prefixes: tuple[str, ...] = ()
    tier: str = ""
    note: str = ""
    path: Any = None  # a path spec (lab.impair.split_directions), decoded with the hops
    hops: tuple[Hop, ...] = ()

    def validate(self) -> list[Problem]:
        errs: list[Problem] = []
        for key, net in (("ipv4", EDGE_NET4), ("ipv6", EDGE_NET6)):
            try:
                inside = ipaddress.ip_address(getattr(self, key)) in net
            except ValueError:
                inside = False
            if not inside:
                errs.append(Problem(key, f"edge addresses must be in {EDGE_NET4} and {EDGE_NET6}"))
        if self.dns and not self.dns.endswith(DNS_SUFFIX):
            errs.append(Problem("dns", f"must end in {DNS_SUFFIX}"))
        for i, p in enumerate(self.prefixes):
            try:
                net = ipaddress.ip_network(p)
                ok = net.subnet_of(EDGE_NET4 if net.version == 4 else EDGE_NET6)  # type: ignore[arg-type]
            except ValueError:
                ok = False
            if not ok:
                errs.append(Problem(f"prefixes[{i}]", f"{p} outside the lab's edge ranges"))
        if len(self.hops) > MAX_HOPS:
            errs.append(Problem("hops", f"at most {MAX_HOPS}"))
        return errs


@dataclass(frozen=True)
class _ChangeEntry:
    at: Duration
    edge: str
    set: Any  # a partial path spec (lab.impair.change_json)


@dataclass(frozen=True)
class _ProfileFile:
    region: str
    edges: tuple[_EdgeEntry, ...]
    description: str = ""
    source: str = ""
    schedule: tuple[_ChangeEntry, ...] = ()

    def validate(self) -> list[Problem]:
        errs: list[Problem] = []
        r = self.region
        if not r or not all(c.isalnum() or c == "-" for c in r) or len(r) > 20:
            errs.append(Problem("region", "letters, digits and '-', at most 20 characters"))
        names = [e.name for e in self.edges]
        errs += [
            Problem(f"edges[{i}].name", f"edge name {n!r} used twice")
            for i, n in enumerate(names)
            if n in names[:i]
        ]
        errs += [
            Problem(f"schedule[{i}].edge", f"{c.edge!r} is not an edge of this profile")
            for i, c in enumerate(self.schedule)
            if c.edge not in names
        ]
        return errs


def decode_profile(raw: Mapping[str, Any] | yaml.Node, file: str = "") -> Profile:
    """A profile from its YAML node (errors name the key and line) or from plain data.
    Raises ConfigError."""
    node = raw if isinstance(raw, yaml.Node) else node_of(dict(raw))
    try:
        spec = decode_dataclass(_ProfileFile, node)
        edges_node = mapping_items(node, "")["edges"][1]
        edges: list[Edge] = []
        paths: list[PathSpec] = []
        for i, e in enumerate(spec.edges):
            ek = f"edges[{i}]"
            edges.append(Edge(e.name, e.ipv4, e.ipv6, e.dns or f"{e.name}{DNS_SUFFIX}", e.prefixes))
            path = e.path if e.path is not None else node_of({})
            up, down = split_directions(path, f"{ek}.path")
            if e.hops and sum(h.delay for h in e.hops) > min(up.delay, down.delay) + 1e-9:
                hops_node = mapping_items(edges_node.value[i], ek)["hops"][0]
                raise ConfigError(
                    f"{ek}.hops",
                    "the hops' delays add up to more than the path's one-way delay",
                    line_of(hops_node),
                )
            paths.append(PathSpec(e.name, e.tier, up, down, e.hops, e.note))
        schedule = tuple(
            Change(c.at, c.edge, change_json(c.set, f"schedule[{i}].set"))
            for i, c in enumerate(spec.schedule)
        )
    except ConfigError as e:
        raise e.in_file(file) if file else e from None
    return Profile(
        region=spec.region,
        description=spec.description,
        source=spec.source,
        edges=tuple(edges),
        paths=tuple(paths),
        schedule=schedule,
        file=file,
    )


def load_profile(name_or_path: str) -> Profile:
    """A profile by name (``id-jakarta``) from ``lab/profiles``, or by file path."""
    p = Path(name_or_path)
    if not p.suffix:
        p = PROFILE_DIR / f"{name_or_path}.yaml"
    root = compose(p.read_text(), str(p))
    if root is None:
        raise ConfigError("region", "required key is missing (the profile is empty)", source=str(p))
    return decode_profile(root, str(p))


def merge_edges(profiles: Sequence[Profile]) -> dict[str, Edge]:
    """Every edge of the world by name; the same name must mean the same addresses."""
    out: dict[str, Edge] = {}
    for prof in profiles:
        for e in prof.edges:
            old = out.get(e.name)
            if old is not None and (old.ipv4, old.ipv6, old.dns) != (e.ipv4, e.ipv6, e.dns):
                raise ConfigError(
                    "edges", f"edge {e.name!r} has other addresses than in another profile"
                ).in_file(prof.file)
            out.setdefault(e.name, e)
    addrs: dict[str, str] = {}
    for e in out.values():
        for a in (e.ipv4, e.ipv6):
            if addrs.setdefault(a, e.name) != e.name:
                raise ConfigError(
                    "edges", f"address {a} is used by edges {addrs[a]!r} and {e.name!r}"
                )
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
