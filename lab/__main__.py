"""``python -m lab up|down|exec|truth|set|status|cleanup``: the lab as a command-line tool."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from agent.config.decode import ConfigError
from lab import groundtruth as gt
from lab.spec import DEFAULT_PROFILES, available_profiles
from lab.topology import LabError, World, cleanup_stale, iter_states

DEFAULT_STATE = "run/lab"


def _fmt(x: float) -> str:
    return "-" if isinstance(x, float) and math.isnan(x) else f"{x:.2f}"


def cmd_up(a: argparse.Namespace) -> int:
    state = Path(a.state)
    if (state / "state.json").exists():
        print(
            f"lab: a world is already described in {state}/state.json; "
            f"run `python -m lab down --state {state}` first",
            file=sys.stderr,
        )
        return 1
    world = World.up(
        profiles=a.profile or list(DEFAULT_PROFILES),
        state_dir=state,
        services=None if a.services == "auto" else a.services == "on",
        seed=a.seed,
        detach=True,
    )
    st = world.state
    if a.json:
        print(json.dumps(st.to_json(), indent=2))
        return 0
    print(f"lab {st.run_id} up: state {state}/state.json, ground truth {st.truth}")
    for r in st.regions.values():
        print(
            f"  {r.name:12} ns {r.ns}  agent {r.agent4} / {r.agent6}  "
            f"mgmt {r.mgmt_addr} (root side {r.mgmt_host})"
        )
        for edge, p in st.paths[r.name].items():
            e = st.edges[edge]
            print(
                f"      {edge:6} {p['tier']:8} {e['ipv4']:12} {e['dns']:18} "
                f"one-way {p['up']['delay'] * 1e3:.1f} ms"
            )
    print(
        f"  edge ns {st.edge_ns}; services: {'on' if st.services else 'off'}"
        + (f", DNS {', '.join(st.dns_servers)}, CA {st.ca}" if st.services else "")
    )
    return 0


def cmd_down(a: argparse.Namespace) -> int:
    state = Path(a.state)
    try:
        world = World.attach(state)
    except FileNotFoundError:
        print(f"lab: no world in {state}", file=sys.stderr)
        return 1
    world.down()
    (state / "state.json").unlink(missing_ok=True)
    print(f"lab {world.state.run_id} down")
    return 0


def cmd_exec(a: argparse.Namespace) -> int:
    world = World.attach(a.state)
    argv = a.argv[1:] if a.argv and a.argv[0] == "--" else a.argv
    if not argv:
        print("lab exec: give a command after --", file=sys.stderr)
        return 2
    full = world.cmd(a.region, argv)
    os.execvp(full[0], full)


def cmd_set(a: argparse.Namespace) -> int:
    world = World.attach(a.state)
    change = json.loads(a.change)
    world.set_path(a.region, a.edge, **change)
    return 0


def cmd_truth(a: argparse.Namespace) -> int:
    world = World.attach(a.state)
    recs = world.records()
    meta = world.meta()
    prec = gt.precision(recs)
    rows = list(gt.iter_summary(recs, meta))
    if a.json:
        print(
            json.dumps(
                {"precision": prec.to_json(), "echo": rows, "forwarder": world.stats()},
                indent=2,
                default=str,
            )
        )
        return 0
    print(
        f"records {len(recs)}; release lateness p50 {_fmt(prec.p50_us)} us, "
        f"p99 {_fmt(prec.p99_us)} us, max {_fmt(prec.max_us)} us; "
        f"peak {prec.peak_pps:.0f} packets/s"
    )
    print(
        f"{'region':12} {'edge':14} {'address':16} {'sent':>6} {'lost':>5} {'loss%':>6} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'burst':>5}"
    )
    for r in rows:
        print(
            f"{r['region']:12} {r['edge']:14} {r['address']:16} {r['sent']:6d} {r['lost']:5d} "
            f"{100 * r['loss_ratio']:6.2f} {_fmt(r['rtt_p50_ms']):>8} "
            f"{_fmt(r['rtt_p95_ms']):>8} {r['max_burst']:5d}"
        )
    return 0


def cmd_agent_config(a: argparse.Namespace) -> int:
    from lab.agentconf import agent_config, dump

    world = World.attach(a.state)
    regions = [a.region] if a.region else list(world.state.regions)
    for r in regions:
        text = dump(agent_config(world.state, r, interval=a.interval))
        if a.out:
            out = Path(a.out) / f"{r}.yaml"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
            print(out)
        else:
            print(text)
    return 0


def cmd_selftest(a: argparse.Namespace) -> int:
    from lab.selftest import main as selftest

    res = selftest([int(x) for x in a.rates.split(",")], a.seconds)
    print(
        f"{'offered/s':>10} {'sent':>7} {'read':>7} {'late p50 us':>12} {'p99 us':>9} "
        f"{'max us':>9} {'read/cpu-s':>11}"
    )
    for r in res:
        print(
            f"{r.offered_pps:10.0f} {r.sent:7d} {r.read:7d} {r.late_p50_us:12.1f} "
            f"{r.late_p99_us:9.1f} {r.late_max_us:9.1f} {r.capacity_pps:11.0f}"
        )
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    for st in iter_states():
        print(
            f"{st.run_id} state {st.state_dir} regions {','.join(st.regions)} "
            f"forwarder {st.forwarder_pid}"
        )
    return 0


def cmd_cleanup(a: argparse.Namespace) -> int:
    for rid in cleanup_stale():
        print(f"removed stale lab {rid}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="bring a world up (root)")
    up.add_argument(
        "--profile",
        action="append",
        help=f"region profile name or YAML path (repeatable; default all: "
        f"{', '.join(available_profiles())})",
    )
    up.add_argument("--services", choices=("auto", "on", "off"), default="auto")
    up.add_argument("--seed", type=int, default=1)
    up.add_argument("--json", action="store_true", help="print the state as JSON")
    for name, fn in (
        ("down", cmd_down),
        ("truth", cmd_truth),
        ("status", cmd_status),
        ("cleanup", cmd_cleanup),
    ):
        p = sub.add_parser(name)
        p.set_defaults(fn=fn)
        if name == "truth":
            p.add_argument("--json", action="store_true")
        if name in ("down", "truth"):
            p.add_argument("--state", default=DEFAULT_STATE)
    up.add_argument("--state", default=DEFAULT_STATE)
    up.set_defaults(fn=cmd_up)
    ex = sub.add_parser("exec", help="run a command in a region's namespace ('edge' too)")
    ex.add_argument("region")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    ex.add_argument("--state", default=DEFAULT_STATE)
    ex.set_defaults(fn=cmd_exec)
    st = sub.add_parser("set", help="change a path now: set REGION EDGE '{\"delay\": 0.1}'")
    st.add_argument("region")
    st.add_argument("edge")
    st.add_argument("change")
    st.add_argument("--state", default=DEFAULT_STATE)
    st.set_defaults(fn=cmd_set)
    ac = sub.add_parser("agent-config", help="agent configs for the world's regions")
    ac.add_argument("region", nargs="?", default="")
    ac.add_argument("--out", default="", help="directory to write REGION.yaml files into")
    ac.add_argument("--interval", default="1s")
    ac.add_argument("--state", default=DEFAULT_STATE)
    ac.set_defaults(fn=cmd_agent_config)
    sf = sub.add_parser("selftest", help="measure the forwarder's precision and packet rate")
    sf.add_argument("--rates", default="1000,2000,5000,10000", help="datagrams/s, comma list")
    sf.add_argument("--seconds", type=float, default=2.0)
    sf.set_defaults(fn=cmd_selftest)
    a = ap.parse_args(argv)
    try:
        return int(a.fn(a))
    except (LabError, ConfigError) as e:
        # A bad profile is the operator's input: one line naming file, line and key.
        print(f"lab: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
