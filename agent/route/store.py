"""The routing map: a versioned JSON document, its ETag, and its persistence.

The document changes only when the decision or a (rounded) score changes, so its ETag is stable
between queries that change nothing and a client's ``If-None-Match`` gets a 304. Freshness is
not in the body but in headers (``X-Edgeprobe-Map-Age``) and in ``stale``.

Persistence: the state file (``{"saved_at": ..., "map": ...}``) is replaced atomically (write a
temporary file in the same directory, fsync it, rename it over the old one, fsync the
directory), so a crash leaves the old or the new map, never a torn one. It is read at start,
and its map is served (stale) before the first query completes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.route.policy import EdgeEntry, RegionState

SCHEMA = "edgeprobe.route.map/v1"
MAX_STATE_BYTES = 16 << 20


def _sig(v: float | None, digits: int = 2) -> float | None:
    """``v`` rounded to ``digits`` significant digits (None for missing or non-finite)."""
    if v is None or not math.isfinite(v):
        return None
    if v == 0:
        return 0.0
    return round(v, digits - 1 - math.floor(math.log10(abs(v))))


def _iso(t: float) -> str:
    return datetime.fromtimestamp(round(t), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(s: Any) -> float:
    if not isinstance(s, str):
        raise ValueError("expected a timestamp")
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


@dataclass(frozen=True)
class Clock:
    """Monotonic time (what the policy runs on) -> wall time (what the map shows). The offset
    is fixed once per process, so a timestamp renders the same every time."""

    offset: float = field(default_factory=lambda: time.time() - time.monotonic())

    def wall(self, mono: float) -> float:
        return self.offset + mono

    def mono(self, wall: float) -> float:
        return wall - self.offset


def _edge_doc(e: EdgeEntry, clock: Clock) -> dict[str, Any]:
    d: dict[str, Any] = {
        "edge": e.edge,
        "eligible": e.eligible,
        "reason": e.reason,
        "score": {
            "miss_ucb": None if e.miss_ucb is None else round(e.miss_ucb, 3),
            "rtt_p95_ms": _sig(None if e.rtt_p95 is None else e.rtt_p95 * 1000),
            "connects": _sig(e.connects),
        },
        "since": _iso(clock.wall(e.since)),
    }
    if not e.eligible and e.reason == "no_data":
        d["last_seen"] = _iso(clock.wall(e.last_seen))
    return d


def render(states: Mapping[str, RegionState], clock: Clock) -> dict[str, Any]:
    """The map's regions: per region the first choice and the ordered list."""
    return {
        region: {
            "best": st.incumbent,
            "best_since": _iso(clock.wall(st.incumbent_since)),
            "edges": [_edge_doc(e, clock) for e in st.edges],
        }
        for region, st in sorted(states.items())
    }


def parse_regions(regions: Any, clock: Clock, seen: float | None = None) -> dict[str, RegionState]:
    """Rebuild the policy state from a map's regions (a persisted map). ``seen``: when the
    edges with data were last seen (the save); their ``since`` if None. Raises ValueError."""
    if not isinstance(regions, dict):
        raise ValueError("regions: expected an object")
    out: dict[str, RegionState] = {}
    for region, r in regions.items():
        if not isinstance(r, dict) or not isinstance(r.get("edges"), list) or not r["edges"]:
            raise ValueError(f"regions.{region}: expected an object with edges")
        entries = []
        for e in r["edges"]:
            if (
                not isinstance(e, dict)
                or not isinstance(e.get("edge"), str)
                or not isinstance(e.get("eligible"), bool)
                or not isinstance(e.get("reason"), str)
            ):
                raise ValueError(f"regions.{region}.edges: bad entry")
            sc = e.get("score") or {}
            since = clock.mono(_parse_iso(e["since"]))
            last = (
                clock.mono(_parse_iso(e["last_seen"]))
                if "last_seen" in e
                else since
                if seen is None
                else max(since, seen)
            )

            def num(k: str, sc: Any = sc) -> float | None:
                v = sc.get(k) if isinstance(sc, dict) else None
                return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

            rtt = num("rtt_p95_ms")
            entries.append(
                EdgeEntry(
                    e["edge"],
                    e["eligible"],
                    e["reason"],
                    num("miss_ucb"),
                    None if rtt is None else rtt / 1000,
                    num("connects"),
                    since,
                    last,
                )
            )
        best = r.get("best")
        if best not in {x.edge for x in entries}:
            raise ValueError(f"regions.{region}.best: not one of its edges")
        out[str(region)] = RegionState(
            tuple(entries), str(best), clock.mono(_parse_iso(r.get("best_since")))
        )
    return out


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file in the same directory, fsync, rename, fsync
    the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@dataclass
class MapStore:
    """The map being served. ``refreshed``: monotonic time of the last successful query (or of
    the persisted map's save); None before any map exists."""

    clock: Clock = field(default_factory=Clock)
    states: dict[str, RegionState] = field(default_factory=dict)
    generation: int = 0
    stale: bool = True
    refreshed: float | None = None
    body: bytes = b""
    etag: str = ""
    doc: dict[str, Any] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return bool(self.states)

    def age(self, now: float) -> float | None:
        return None if self.refreshed is None else max(0.0, now - self.refreshed)

    def update(self, states: Mapping[str, RegionState], stale: bool) -> bool:
        """Set the map; True when the document changed (new generation and ETag)."""
        regions = render(states, self.clock)
        if self.doc and self.doc["regions"] == regions and self.doc["stale"] == stale:
            self.states = dict(states)
            return False
        if not regions:
            return False  # never replace a map by an empty one
        self.states = dict(states)
        self.stale = stale
        self.generation += 1
        self.doc = {
            "schema": SCHEMA,
            "generation": self.generation,
            "stale": stale,
            "regions": regions,
        }
        self.body = json.dumps(self.doc, indent=1, sort_keys=False).encode() + b"\n"
        self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:32] + '"'
        return True

    def set_stale(self, stale: bool) -> bool:
        if not self.states or stale == self.stale:
            return False
        return self.update(self.states, stale)

    def region_body(self, region: str) -> tuple[bytes, str] | None:
        r = self.doc.get("regions", {}).get(region)
        if r is None:
            return None
        body = (
            json.dumps(
                {
                    "schema": SCHEMA,
                    "generation": self.generation,
                    "stale": self.stale,
                    "region": region,
                    **r,
                },
                indent=1,
            ).encode()
            + b"\n"
        )
        return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        saved_at = self.clock.wall(self.refreshed) if self.refreshed is not None else time.time()
        data = json.dumps({"saved_at": saved_at, "map": self.doc}, indent=1).encode() + b"\n"
        atomic_write(path, data)

    def load(self, path: Path, now: float) -> None:
        """Serve the persisted map, stale, aged from its save. Raises OSError or ValueError
        (the caller logs it and starts without a map)."""
        with path.open("rb") as f:
            raw = f.read(MAX_STATE_BYTES + 1)
        if len(raw) > MAX_STATE_BYTES:
            raise ValueError("state file too large")
        saved = json.loads(raw)
        if not isinstance(saved, dict) or not isinstance(saved.get("map"), dict):
            raise ValueError("not a persisted map")
        doc = saved["map"]
        if doc.get("schema") != SCHEMA:
            raise ValueError(f"schema {doc.get('schema')!r}, expected {SCHEMA!r}")
        saved_at = saved.get("saved_at")
        # Across a restart only the wall clock spans the gap: the one place it sets an age.
        self.refreshed = (
            now - max(0.0, time.time() - float(saved_at))
            if isinstance(saved_at, int | float) and math.isfinite(saved_at)
            else now
        )
        states = parse_regions(doc.get("regions"), self.clock, self.refreshed)
        if not states:
            raise ValueError("the persisted map has no regions")
        gen = doc.get("generation")
        # The same generation as before the restart (update() counts it up again).
        self.generation = gen - 1 if isinstance(gen, int) and gen > 0 else 0
        self.update(states, stale=True)
