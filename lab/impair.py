"""Per-path impairment: what the forwarder does to one direction of one (region, edge) path.

An :class:`Impairment` is plain data (decoded strictly from profile YAML or a control
command). A :class:`DirState` is the live state of one direction: its RNG, its
Gilbert-Elliott state and the last release time (for order-preserving jitter).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from agent.config import decode

JitterDist = Literal["none", "uniform", "normal", "exponential", "pareto"]
JITTER_DISTS: tuple[str, ...] = ("none", "uniform", "normal", "exponential", "pareto")


class ImpairError(ValueError):
    """A bad impairment or profile value; the message starts with the key path."""


def parse_duration(value: Any, key: str) -> float:
    """:func:`agent.config.decode.parse_duration` (``"12ms"``, ``"1.5s"``, ``"250us"``,
    ``"1m30s"`` or a bare number of seconds) as an ImpairError."""
    try:
        return decode.parse_duration(value)
    except ValueError as e:
        raise ImpairError(f"{key}: {e}") from None


def parse_ratio(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ImpairError(f"{key}: expected a ratio 0..1 or a percentage like '2%'")
    if isinstance(value, str):
        s = value.strip()
        try:
            v = float(s[:-1]) / 100 if s.endswith("%") else float(s)
        except ValueError:
            raise ImpairError(f"{key}: expected a ratio 0..1 or '2%', got {value!r}") from None
    else:
        v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ImpairError(f"{key}: must be between 0 and 1 (or 0% and 100%), got {value!r}")
    return v


@dataclass(frozen=True)
class Gilbert:
    """Gilbert-Elliott bursty loss (RFC 3357 terms; ITU-T G.1020 App. I).

    ``p`` = P(good -> bad), ``r`` = P(bad -> good) per packet. With ``loss_bad`` 1 and
    ``loss_good`` 0 the mean loss is p/(p+r) and the mean burst length 1/r.
    """

    p: float
    r: float
    loss_bad: float = 1.0
    loss_good: float = 0.0

    @property
    def mean_loss(self) -> float:
        pi_bad = self.p / (self.p + self.r) if self.p + self.r > 0 else 0.0
        return pi_bad * self.loss_bad + (1 - pi_bad) * self.loss_good


@dataclass(frozen=True)
class Impairment:
    """One direction of a path. Durations in seconds, ratios 0..1."""

    delay: float = 0.0  # base one-way delay
    jitter: float = 0.0  # scale of the jitter distribution
    jitter_dist: JitterDist = "normal"
    reorder: bool = False  # False: releases keep arrival order on this path
    loss: float = 0.0  # independent random loss
    gilbert: Gilbert | None = None  # bursty loss, on top of ``loss``

    def nominal_loss(self) -> float:
        g = self.gilbert.mean_loss if self.gilbert else 0.0
        return 1 - (1 - self.loss) * (1 - g)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        d["gilbert"] = None if self.gilbert is None else vars(self.gilbert).copy()
        return d


_IMPAIR_KEYS = {"delay", "jitter", "jitter_dist", "reorder", "loss", "gilbert"}


def update_impairment(base: Impairment, raw: Mapping[str, Any], key: str) -> Impairment:
    """``base`` with the fields given in ``raw`` replaced (strict: unknown keys fail)."""
    unknown = set(raw) - _IMPAIR_KEYS
    if unknown:
        raise ImpairError(
            f"{key}: unknown field(s) {sorted(unknown)}; known: {sorted(_IMPAIR_KEYS)}"
        )
    kw: dict[str, Any] = {}
    if "delay" in raw:
        kw["delay"] = parse_duration(raw["delay"], f"{key}.delay")
    if "jitter" in raw:
        kw["jitter"] = parse_duration(raw["jitter"], f"{key}.jitter")
    if "jitter_dist" in raw:
        if raw["jitter_dist"] not in JITTER_DISTS:
            raise ImpairError(f"{key}.jitter_dist: one of {list(JITTER_DISTS)}")
        kw["jitter_dist"] = raw["jitter_dist"]
    if "reorder" in raw:
        if not isinstance(raw["reorder"], bool):
            raise ImpairError(f"{key}.reorder: expected true or false")
        kw["reorder"] = raw["reorder"]
    if "loss" in raw:
        kw["loss"] = parse_ratio(raw["loss"], f"{key}.loss")
    if "gilbert" in raw:
        g = raw["gilbert"]
        if g is None:
            kw["gilbert"] = None
        elif isinstance(g, Mapping):
            gk = f"{key}.gilbert"
            bad = set(g) - {"p", "r", "loss_bad", "loss_good"}
            if bad or "p" not in g or "r" not in g:
                raise ImpairError(f"{gk}: needs p and r, optional loss_bad, loss_good")
            kw["gilbert"] = Gilbert(
                p=parse_ratio(g["p"], f"{gk}.p"),
                r=parse_ratio(g["r"], f"{gk}.r"),
                loss_bad=parse_ratio(g.get("loss_bad", 1.0), f"{gk}.loss_bad"),
                loss_good=parse_ratio(g.get("loss_good", 0.0), f"{gk}.loss_good"),
            )
        else:
            raise ImpairError(f"{key}.gilbert: expected a map with p and r")
    return replace(base, **kw)


def split_directions(
    raw: Mapping[str, Any],
    key: str,
    base: tuple[Impairment, Impairment] = (Impairment(), Impairment()),
    extra_keys: frozenset[str] = frozenset(),
) -> tuple[Impairment, Impairment]:
    """Decode a path spec: common fields apply to both directions, ``up:``/``down:`` override.

    ``up`` is agent -> edge, ``down`` edge -> agent.
    """
    common = {k: v for k, v in raw.items() if k not in {"up", "down"} | extra_keys}
    up = update_impairment(base[0], common, key)
    down = update_impairment(base[1], common, key)
    for name in ("up", "down"):
        if name in raw:
            sub = raw[name]
            if not isinstance(sub, Mapping):
                raise ImpairError(f"{key}.{name}: expected a map")
            if name == "up":
                up = update_impairment(up, sub, f"{key}.up")
            else:
                down = update_impairment(down, sub, f"{key}.down")
    return up, down


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
        d = imp.delay
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
