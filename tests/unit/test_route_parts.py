"""edgeprobe route, the parts without a network: config decoding, query-result parsing, the map
store's ETag, persistence and round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from agent.config.decode import ConfigError
from agent.route import settings
from agent.route.policy import EdgeObs, decide
from agent.route.promapi import QueryError, parse_vector
from agent.route.service import observations
from agent.route.store import SCHEMA, Clock, MapStore, atomic_write
from tests.helpers import ROOT

P = settings.PolicySection()


# -- config -----------------------------------------------------------------------------------
def test_defaults_and_a_full_config() -> None:
    assert settings.loads("") == settings.RouteConfig()
    cfg = settings.loads(
        "prometheus:\n  url: http://127.0.0.1:9090\n  interval: 5s\n"
        "policy:\n  hold: 2m\n  rtt_margin: 0.3\n"
        "map:\n  state_file: /tmp/x.json\n"
    )
    assert cfg.prometheus.interval == 5.0 and cfg.policy.hold == 120.0
    assert cfg.policy.rtt_margin == 0.3 and cfg.map.state_file == "/tmp/x.json"
    assert cfg.policy.ucb_band == 0.05  # untouched keys keep their defaults


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("prometheus:\n  urll: http://x\n", "prometheus.urll", 2),
        ("policy:\n  hold: soon\n", "policy.hold", 2),
        ("policy:\n  rtt_margin: 1.5\n", "policy.rtt_margin", 2),
        ("policy:\n  ucb_margin_bands: 0\n", "policy.ucb_margin_bands", 2),
        ("map:\n  state_file: ''\n", "map.state_file", 2),
        ("prometheus:\n  url: ftp://x\n", "prometheus.url", 2),
        ("\n\nmapp: {}\n", "mapp", 3),
    ],
)
def test_bad_config_names_key_and_line(text: str, key: str, line: int) -> None:
    with pytest.raises(ConfigError) as e:
        settings.loads(text)
    assert e.value.path == key and e.value.line == line, str(e.value)


# -- query results ------------------------------------------------------------------------------
def _vec(*series: tuple[dict[str, str], str]) -> dict[str, object]:
    return {"resultType": "vector", "result": [{"metric": m, "value": [1.0, v]} for m, v in series]}


def test_parse_vector_drops_and_counts() -> None:
    v = parse_vector(
        _vec(
            ({"region": "r", "edge": "ok"}, "0.01"),
            ({"region": "r", "edge": "nan"}, "NaN"),
            ({"region": "r", "edge": "inf"}, "+Inf"),
            ({"region": "r", "edge": "neg"}, "-Inf"),
            ({"region": "r"}, "0.5"),
            ({"edge": "x"}, "0.5"),
            ({"region": "r", "edge": "dup", "replica": "a"}, "0.1"),
            ({"region": "r", "edge": "dup", "replica": "b"}, "0.2"),
            ({"region": "r", "edge": "big"}, "1.5"),
            ({"region": "r", "edge": "junk"}, "zero"),
        ),
        0,
        1,
    )
    assert set(v.values) == {("r", "ok")}
    assert v.dropped == {
        "nan": 1,
        "inf": 2,
        "missing_label": 2,
        "duplicate": 2,
        "out_of_range": 1,
        "bad_value": 1,
    }
    assert v.invalid == {("r", e) for e in ("nan", "inf", "neg", "dup", "big", "junk")}
    with pytest.raises(QueryError):
        parse_vector({"resultType": "matrix", "result": []})


def test_observations_eligibility_is_the_authority() -> None:
    elig = parse_vector(
        _vec(
            ({"region": "r", "edge": "a", "reason": "ok"}, "1"),
            ({"region": "r", "edge": "b", "reason": "over_budget"}, "0"),
            ({"region": "r", "edge": "c", "reason": "ok"}, "NaN"),
            ({"region": "r", "edge": "e", "reason": "x y"}, "0"),
        ),
        0,
        1,
    )
    ucb = parse_vector(_vec(({"region": "r", "edge": "d"}, "0.01")), 0, 1)
    empty = parse_vector(_vec())
    o = observations(elig, ucb, empty, empty)["r"]
    assert (o["a"].eligible, o["a"].reason) == (True, "ok")
    assert (o["b"].eligible, o["b"].reason) == (False, "over_budget")
    assert (o["c"].eligible, o["c"].reason) == (None, "invalid_data")
    assert (o["d"].eligible, o["d"].reason) == (None, "no_data")  # no eligibility series
    assert o["e"].reason == "invalid_data"  # not a reason word


# -- the store --------------------------------------------------------------------------------
def _states(now: float) -> dict[str, object]:
    out = {}
    for region, edges in (("r1", {"a": 0.005, "b": 0.05}), ("r2", {"c": 0.01})):
        st, _ = decide(
            region,
            None,
            {e: EdgeObs(True, "ok", 0.0123, rtt, 181.3) for e, rtt in edges.items()},
            now,
            P,
        )
        out[region] = st
    return out


def test_etag_stable_when_nothing_changes(tmp_path: Path) -> None:
    store = MapStore(clock=Clock(offset=1.7e9))
    assert not store.ready
    assert store.update(_states(10.0), stale=False)  # type: ignore[arg-type]
    etag, gen = store.etag, store.generation
    assert not store.update(_states(10.0), stale=False)  # type: ignore[arg-type]
    assert (store.etag, store.generation) == (etag, gen)
    assert store.set_stale(True) and store.etag != etag and store.generation == gen + 1
    doc = json.loads(store.body)
    assert doc["schema"] == SCHEMA and doc["stale"] is True
    e = doc["regions"]["r1"]["edges"][0]
    assert e == {
        "edge": "a",
        "eligible": True,
        "reason": "ok",
        "score": {"miss_ucb": 0.012, "rtt_p95_ms": 5.0, "connects": 180.0},
        "since": "2023-11-14T22:13:30Z",
    }
    assert not store.update({}, stale=False)  # never an empty map


def test_persist_and_reload_round_trip(tmp_path: Path) -> None:
    clock = Clock(offset=1.7e9)
    store = MapStore(clock=clock)
    store.update(_states(10.0), stale=False)  # type: ignore[arg-type]
    store.refreshed = 10.0
    path = tmp_path / "state" / "map.json"
    store.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["map.json"]  # no temp file left
    again = MapStore(clock=clock)
    again.load(path, now=20.0)
    assert again.ready and again.stale
    assert again.doc["regions"] == store.doc["regions"]
    assert again.generation == store.generation
    assert {r: s.incumbent for r, s in again.states.items()} == {"r1": "a", "r2": "c"}


def test_reloaded_edges_were_seen_at_the_save(tmp_path: Path) -> None:
    """An edge in its state for longer than forget_after was still seen at the save: after a
    restart, missing from the first query, it is listed no_data, not forgotten."""
    import time

    clock = Clock()
    now = time.monotonic()
    store = MapStore(clock=clock)
    store.update(_states(now - 2 * P.forget_after), stale=False)  # type: ignore[arg-type]
    store.refreshed = now - 5
    store.save(tmp_path / "map.json")
    again = MapStore(clock=clock)
    again.load(tmp_path / "map.json", now=now)
    st = again.states["r1"]
    assert all(abs(e.last_seen - (now - 5)) < 2 for e in st.edges)
    st2, _ = decide("r1", st, {"a": EdgeObs(True, "ok", 0.01, 0.005, 180.0)}, now + 15, P)
    assert st2 is not None and [(e.edge, e.reason) for e in st2.edges] == [
        ("a", "ok"),
        ("b", "no_data"),
    ]


def test_load_rejects_garbage(tmp_path: Path) -> None:
    p = tmp_path / "map.json"
    for text in (
        "{",
        "[]",
        '{"map": {"schema": "other"}}',
        json.dumps({"map": {"schema": SCHEMA, "regions": {"r": {"edges": []}}}}),
    ):
        p.write_text(text)
        with pytest.raises(ValueError):
            MapStore().load(p, 0.0)


def test_atomic_write_replaces(tmp_path: Path) -> None:
    p = tmp_path / "out.json"
    atomic_write(p, b"one")
    ino = p.stat().st_ino
    atomic_write(p, b"two")
    assert p.read_bytes() == b"two" and p.stat().st_ino != ino  # renamed over, not rewritten
    assert math.isclose(p.stat().st_mode & 0o777, 0o644)


def test_docs_config_block_is_the_defaults() -> None:
    """docs/routing.md's "Config file" block states every key with the code's default."""
    import re

    text = (ROOT / "docs" / "routing.md").read_text()
    block = re.search(r"## Config file\n.*?```yaml\n(.*?)```", text, re.S)
    assert block, "docs/routing.md lost its config block"
    assert settings.loads(block.group(1)) == settings.RouteConfig()
    import dataclasses

    for section in dataclasses.fields(settings.RouteConfig):
        for f in dataclasses.fields(
            section.type if isinstance(section.type, type) else getattr(settings, str(section.type))
        ):
            assert re.search(rf"^  {f.name}:", block.group(1), re.M), (section.name, f.name)
