"""Per-path impairment: what the forwarder does to one direction of one (region, edge) path.

An :class:`Impairment` is plain data, decoded strictly by :mod:`agent.config.decode` from
profile YAML or a control command. A :class:`DirState` is the live state of one direction: its
RNG, its Gilbert-Elliott state and the last release time (for order-preserving jitter).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import yaml

from agent.config import decode
from agent.config.decode import Duration

JitterDist = Literal["none", "uniform", "normal", "exponential", "pareto"]


class Ratio(float):
    """A ratio 0..1, decoded from a number or a percentage like '2%'."""

    @classmethod
    def from_config(cls, value: object) -> Ratio:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError("expected a ratio 0..1 or a percentage like '2%'")
        if isinstance(value, str):
            s = value.strip()
            try:
                v = float(s[:-1]) / 100 if s.endswith("%") else float(s)
            except ValueError:
                raise ValueError(f"expected a ratio 0..1 or '2%', got {value!r}") from None
        else:
            v = float(value)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"must be between 0 and 1 (or 0% and 100%), got {value!r}")
        return cls(v)


@dataclass(frozen=True)
class Gilbert:
    """Gilbert-Elliott bursty loss (RFC 3357 terms; ITU-T G.1020 App. I).

    ``p`` = P(good -> bad), ``r`` = P(bad -> good) per packet. With ``loss_bad`` 1 and
    ``loss_good`` 0 the mean loss is p/(p+r) and the mean burst length 1/r.
    """

    p: Ratio
    r: Ratio
    loss_bad: Ratio = Ratio(1.0)
    loss_good: Ratio = Ratio(0.0)

    @property
    def mean_loss(self) -> float:
        pi_bad = self.p / (self.p + self.r) if self.p + self.r > 0 else 0.0
        return pi_bad * self.loss_bad + (1 - pi_bad) * self.loss_good


@dataclass(frozen=True)
class Impairment:
    """One direction of a path. Durations in seconds, ratios 0..1."""

    delay: Duration = Duration(0.0)  # base one-way delay
    jitter: Duration = Duration(0.0)  # scale of the jitter distribution
    jitter_dist: JitterDist = "normal"
    reorder: bool = False  # False: releases keep arrival order on this path
    loss: Ratio = Ratio(0.0)  # independent random loss
    gilbert: Gilbert | None = None  # bursty loss, on top of ``loss``

    def nominal_loss(self) -> float:
        g = self.gilbert.mean_loss if self.gilbert else 0.0
        return 1 - (1 - self.loss) * (1 - g)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (no float subclasses), e.g. for the forwarder's spec."""
        d = _plain(self)
        d["gilbert"] = None if self.gilbert is None else _plain(self.gilbert)
        return d


def _plain(obj: Impairment | Gilbert) -> dict[str, Any]:
    return {
        f.name: float(v) if isinstance(v := getattr(obj, f.name), float) else v for f in fields(obj)
    }


# The keys of a path spec that are not impairment fields: one direction's overrides.
_DIRECTIONS = ("up", "down")


def _split(node: yaml.Node, key: str) -> tuple[yaml.MappingNode, dict[str, yaml.Node]]:
    """A path spec's fields common to both directions (as a mapping node) and its ``up:`` and
    ``down:`` parts."""
    items = decode.mapping_items(node, key) if not decode.is_null(node) else {}
    common = [kv for name, kv in items.items() if name not in _DIRECTIONS]
    start, end = node.start_mark, node.end_mark
    sides = {name: items[name][1] for name in _DIRECTIONS if name in items}
    return yaml.MappingNode("tag:yaml.org,2002:map", common, start, end), sides


def split_directions(
    raw: Mapping[str, Any] | yaml.Node,
    key: str,
    base: tuple[Impairment, Impairment] = (Impairment(), Impairment()),
) -> tuple[Impairment, Impairment]:
    """Decode a path spec onto ``base``: common fields apply to both directions, ``up:`` and
    ``down:`` override; fields not given keep ``base``'s values. Raises ConfigError.

    ``up`` is agent -> edge, ``down`` edge -> agent.
    """
    node = raw if isinstance(raw, yaml.Node) else decode.node_of(dict(raw))
    common, sides = _split(node, key)
    out: list[Impairment] = []
    for name, b in zip(_DIRECTIONS, base, strict=True):
        imp = decode.decode_dataclass(Impairment, common, key, base=decode.fields_as_dict(b))
        if name in sides:
            imp = decode.decode_dataclass(
                Impairment, sides[name], f"{key}.{name}", base=decode.fields_as_dict(imp)
            )
        out.append(imp)
    return out[0], out[1]


def change_json(node: yaml.Node, key: str) -> dict[str, Any]:
    """A partial path spec (a scheduled change), checked now and reduced to the keys it sets
    with plain numbers: what the forwarder's control command takes."""

    def given(part: yaml.Node, where: str) -> dict[str, Any]:
        values = decode.decode_dataclass(Impairment, part, where).to_json()
        names = decode.mapping_items(part, where) if isinstance(part, yaml.MappingNode) else {}
        return {n: values[n] for n in names}

    common, sides = _split(node, key)
    out = given(common, key)
    for name, part in sides.items():
        out[name] = given(part, f"{key}.{name}")
    return out


class DirState:
    """Live state of one direction of one path. Not thread-safe; the forwarder is one thread."""

    __slots__ = ("bad", "imp", "last_release_ns", "rng")

    def __init__(self, imp: Impairment, seed: int) -> None:
        self.imp = imp
        self.rng = random.Random(seed)
        self.bad = False
        self.last_release_ns = 0

    def lost(self) -> bool:
        """Decide the fate of the next packet. Advances the Gilbert chain once per packet."""
        imp = self.imp
        rng = self.rng
        drop = imp.loss > 0 and rng.random() < imp.loss
        g = imp.gilbert
        if g is not None:
            # Transition first, then lose with the new state's probability (netem's order).
            if self.bad:
                if rng.random() < g.r:
                    self.bad = False
            elif rng.random() < g.p:
                self.bad = True
            p = g.loss_bad if self.bad else g.loss_good
            if p > 0 and rng.random() < p:
                drop = True
        return drop

    def delay_ns(self) -> int:
        """One sample of the one-way delay, never negative."""
        imp = self.imp
        d: float = imp.delay
        j = imp.jitter
        if j > 0:
            dist = imp.jitter_dist
            rng = self.rng
            if dist == "normal":
                d += rng.gauss(0.0, j)
            elif dist == "uniform":
                d += rng.uniform(-j, j)
            elif dist == "exponential":
                d += rng.expovariate(1.0 / j)
            elif dist == "pareto":
                # Shape 3: a heavy right tail with a finite variance; scaled so the mean
                # added delay equals ``jitter`` (mean of paretovariate(a) is a/(a-1)).
                d += (rng.paretovariate(3.0) - 1.0) * 2.0 * j
        return max(0, int(d * 1e9))

    def release_ns(self, arrival_ns: int) -> int:
        t = arrival_ns + self.delay_ns()
        if not self.imp.reorder and t < self.last_release_ns:
            # Order-preserving jitter: a packet cannot overtake the one before it.
            t = self.last_release_ns
        self.last_release_ns = t
        return t
