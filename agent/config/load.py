"""The agent's config file: shape, defaults, strict decoding and validation.

Loading never changes running state; the caller swaps configs only after ``load`` succeeded.
A running agent loads with ``load_isolated``: the decoding runs in a child process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.config.decode import (
    ConfigError,
    compose,
    decode,
    decode_dataclass,
    fields_as_dict,
    is_null,
    line_of,
    mapping_items,
    read_config,
)
from agent.config.model import (
    DEFAULT_MAX_TARGETS,
    AgentSection,
    Config,
    Job,
    MetricsSection,
    check_labels,
)
from agent.config.rules import NAME_RULE, is_name
from agent.discovery.config import DiscoveryConfig
from agent.server.probe.config import ProbeEndpointConfig
from probes import PROBES
from probes.base import CommonOptions, Target

MAX_CONFIG_BYTES = 4 * 1024 * 1024
# Longer than decoding the largest config the limits allow takes on a slow, busy machine; only
# a decoder that hangs reaches it.
DECODE_TIMEOUT = 300.0
# Jobs unpickled per slice on the event loop (~1 ms each).
_JOBS_PER_CHUNK = 500
# Where the child imports the agent from: where this process did.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Lower CPU priority first: importing the probes is itself a second of CPU.
_WORKER = """\
import contextlib, os, sys
with contextlib.suppress(OSError):
    os.nice(10)
from agent.config.load import _decode_worker
sys.exit(_decode_worker(sys.argv[1]))
"""

log = logging.getLogger("edgeprobe.config")


@dataclass(frozen=True)
class _RawTarget:
    name: str
    address: str
    probes: Any = None  # list of kinds, or {kind: {option: value}}
    labels: dict[str, str] = field(default_factory=dict)


TOP_LEVEL_KEYS = ("agent", "defaults", "metrics", "targets", "discovery", "probe_endpoint")


def loads(text: str, source: str = "<config>") -> Config:
    """Decode and validate a config document. Raises ConfigError naming the key and line."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise ConfigError(source, f"config larger than {MAX_CONFIG_BYTES} bytes")
    _precount_series(text)
    root = compose(text, source)
    if root is None:
        raise ConfigError("agent", "required key is missing (the config is empty)")
    top = mapping_items(root, "")
    for key, (knode, _) in top.items():
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(
                key, f"unknown key (known keys: {', '.join(TOP_LEVEL_KEYS)})", line_of(knode)
            )
    if "agent" not in top:
        raise ConfigError("agent", "required key is missing", line_of(root))
    agent = decode_dataclass(AgentSection, top["agent"][1], "agent")
    metrics = (
        decode_dataclass(MetricsSection, top["metrics"][1], "metrics")
        if "metrics" in top
        else MetricsSection()
    )

    defaults: dict[str, CommonOptions] = {k: kind.options() for k, kind in PROBES.items()}
    if "defaults" in top:
        for kname, (knode, vnode) in mapping_items(top["defaults"][1], "defaults").items():
            if kname not in PROBES:
                raise ConfigError(
                    f"defaults.{kname}",
                    f"unknown probe kind (known: {', '.join(sorted(PROBES))})",
                    line_of(knode),
                )
            defaults[kname] = decode_dataclass(PROBES[kname].options, vnode, f"defaults.{kname}")

    jobs: list[Job] = []
    targets_node = top.get("targets", (None, None))[1]
    if targets_node is not None and not is_null(targets_node):
        if not isinstance(targets_node, yaml.SequenceNode):
            raise ConfigError("targets", "expected a list", line_of(targets_node))
        # Counted on the node tree, before any target is decoded: a config far over the limit
        # is rejected at the cost of its parse, not of building every target.
        count = sum(_series_count(t) for t in targets_node.value)
        if count > agent.max_targets:
            raise ConfigError(
                "targets",
                f"{count} probe series exceed agent.max_targets ({agent.max_targets})",
                line_of(targets_node),
            )
        names: dict[str, int | None] = {}
        for i, tnode in enumerate(targets_node.value):
            jobs += _decode_target(tnode, f"targets[{i}]", defaults, names)
    return Config(
        agent=agent,
        metrics=metrics,
        jobs=tuple(jobs),
        source=source,
        defaults=defaults,
        discovery=(
            decode_dataclass(DiscoveryConfig, top["discovery"][1], "discovery")
            if "discovery" in top
            else None
        ),
        probe_endpoint=(
            decode_dataclass(ProbeEndpointConfig, top["probe_endpoint"][1], "probe_endpoint")
            if "probe_endpoint" in top
            else None
        ),
    )


def _precount_series(text: str) -> None:
    """Reject a config with more probe series than agent.max_targets from libyaml's event
    stream, before the document is composed (composing costs ~15x this scan).

    The count is a lower bound (an alias counts as no series), so this never rejects a config
    that ``loads`` would accept; the exact count on the node tree follows. Any doubt (no
    libyaml, a syntax error, a max_targets that is not a plain integer) skips the check."""
    loader_cls = getattr(yaml, "CSafeLoader", None)
    if loader_cls is None:
        return
    max_targets = DEFAULT_MAX_TARGETS
    total = 0
    exact = True
    targets_line: int | None = None
    frames: list[_Frame] = []
    loader = loader_cls(text)
    try:
        while loader.check_event():
            ev = loader.get_event()
            if isinstance(ev, yaml.CollectionEndEvent):
                f = frames.pop()
                if (
                    f.path is not None
                    and len(f.path) == 3
                    and f.path[0] == "targets"
                    and f.path[2] == "probes"
                ):
                    total += (f.items // 2 if f.is_map else f.items) - 1
                continue
            if not isinstance(ev, yaml.NodeEvent):
                continue
            path = _event_path(frames, ev)
            alias = isinstance(ev, yaml.AliasEvent)
            if path == ("agent",) and alias:
                return
            if path == ("agent", "max_targets"):
                if not isinstance(ev, yaml.ScalarEvent) or ev.style or ev.tag:
                    return
                try:
                    max_targets = int(ev.value.replace("_", ""), 0)
                except ValueError:
                    return
            elif path == ("targets",) and ev.start_mark is not None:
                targets_line = ev.start_mark.line + 1
            elif path is not None and len(path) == 2 and path[0] == "targets":
                total += 0 if alias else 1
                exact = exact and not alias
            elif (
                path is not None
                and len(path) == 3
                and path[0] == "targets"
                and path[2] == "probes"
                and alias
            ):
                total -= 1
                exact = False
            if isinstance(ev, yaml.CollectionStartEvent):
                frames.append(_Frame(path, isinstance(ev, yaml.MappingStartEvent)))
    except yaml.YAMLError:
        return
    finally:
        loader.dispose()
    if 1 <= max_targets <= 1_000_000 and total > max_targets:
        raise ConfigError(
            "targets",
            f"{'' if exact else 'at least '}{total} probe series "
            f"exceed agent.max_targets ({max_targets})",
            targets_line,
        )


@dataclass(slots=True)
class _Frame:
    """An open collection in the event stream."""

    path: tuple[Any, ...] | None  # key path from the root; None inside a mapping key
    is_map: bool
    items: int = 0  # nodes seen (a mapping's keys and values both count)
    key: Any = None  # a mapping's current key when it is a plain scalar


def _event_path(frames: list[_Frame], ev: yaml.NodeEvent) -> tuple[Any, ...] | None:
    """The key path of the node that ``ev`` starts; None for a mapping key and below one."""
    if not frames:
        return ()
    f = frames[-1]
    f.items += 1
    if f.path is None:
        return None
    if not f.is_map:
        return (*f.path, f.items - 1)
    if f.items % 2:
        f.key = ev.value if isinstance(ev, yaml.ScalarEvent) else None
        return None
    return None if f.key is None else (*f.path, f.key)


def _series_count(node: yaml.Node) -> int:
    """The probe series a target entry will make (one per kind; icmp alone without probes).
    Exact for every entry that decodes: duplicate kinds are errors."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if (
                isinstance(k, yaml.ScalarNode)
                and k.value == "probes"
                and isinstance(v, yaml.SequenceNode | yaml.MappingNode)
            ):
                return len(v.value)
    return 1


def _decode_target(
    node: yaml.Node, path: str, defaults: dict[str, CommonOptions], names: dict[str, int | None]
) -> list[Job]:
    items = mapping_items(node, path)
    raw = decode_dataclass(_RawTarget, node, path)
    if not is_name(raw.name):
        raise ConfigError(f"{path}.name", f"must be {NAME_RULE}", line_of(items["name"][1]))
    if raw.name in names:
        raise ConfigError(
            f"{path}.name",
            f"duplicate target name {raw.name!r} (first at line {names[raw.name]})",
            line_of(items["name"][1]),
        )
    names[raw.name] = line_of(items["name"][1])
    if not raw.address.strip() or len(raw.address) > 253 or any(c.isspace() for c in raw.address):
        raise ConfigError(
            f"{path}.address", "must be an IP address or a hostname", line_of(items["address"][1])
        )
    for problem in check_labels(raw.labels, "labels"):
        raise ConfigError(f"{path}.{problem.key}", problem.message, line_of(items["labels"][1]))
    target = Target(name=raw.name, address=raw.address.strip(), labels=dict(raw.labels))
    pnode = items["probes"][1] if "probes" in items else None
    kinds: list[tuple[str, yaml.Node | None, yaml.Node]] = []
    if pnode is None or is_null(pnode):
        kinds = [("icmp", None, node)]
    elif isinstance(pnode, yaml.SequenceNode):
        for j, k in enumerate(pnode.value):
            val = decode(str, k, f"{path}.probes[{j}]")
            kinds.append((val, None, k))
    elif isinstance(pnode, yaml.MappingNode):
        for kname, (knode, vnode) in mapping_items(pnode, f"{path}.probes").items():
            kinds.append((kname, vnode, knode))
    else:
        raise ConfigError(
            f"{path}.probes",
            "expected a list of probe kinds or a mapping of kind to options",
            line_of(pnode),
        )
    jobs = []
    seen: set[str] = set()
    for kname, opts_node, where in kinds:
        sub = f"{path}.probes.{kname}"
        if kname not in PROBES:
            raise ConfigError(
                sub, f"unknown probe kind (known: {', '.join(sorted(PROBES))})", line_of(where)
            )
        if kname in seen:
            raise ConfigError(sub, "probe kind listed twice", line_of(where))
        seen.add(kname)
        base = defaults[kname]
        if opts_node is None:
            opts = base
        else:
            opts = decode_dataclass(
                PROBES[kname].options, opts_node, sub, base=fields_as_dict(base)
            )
        jobs.append(Job(target=target, kind=kname, options=opts))
    return jobs


def load(path: str | Path) -> Config:
    return loads(read_config(path, MAX_CONFIG_BYTES), str(path))


async def load_isolated(path: str | Path, timeout: float = DECODE_TIMEOUT) -> Config:
    """``load`` for a running agent: the same checks and errors, decoded in a child process.

    Parsing and decoding is pure-Python CPU (seconds for a large file): on the event loop it
    would stall every probe, and in a thread it would hold the GIL the loop needs. Here the
    loop only reads the result and unpickles it in slices of ``_JOBS_PER_CHUNK`` jobs; the
    child runs at a lower CPU priority than the agent."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")))),
    }
    # Not the loop's subprocess support: uvloop forks, which copies the page tables of the
    # whole agent on the loop (20-40 ms at 300 MB); Popen uses vfork (<1 ms). -P: the
    # working directory is not on the child's import path.
    proc = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-P", "-c", _WORKER, str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        # The thread waits in read(2): it holds no GIL the loop needs.
        out, err = await asyncio.to_thread(proc.communicate, None, timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        await asyncio.to_thread(proc.communicate)
        raise ConfigError(str(path), f"decoding took longer than {timeout:g}s") from None
    except asyncio.CancelledError:
        proc.kill()  # the thread still in communicate() reaps it
        raise
    if proc.returncode != 0 or not out:
        # A bug or a resource limit, not a config problem: the traceback is for the log.
        log.error(
            "the config decoder process failed",
            extra={"exit_status": proc.returncode, "stderr": err[-4000:].decode(errors="replace")},
        )
        raise ConfigError(
            str(path),
            f"the config decoder process failed (exit status {proc.returncode}); see the log",
        )
    outcome, payload = pickle.loads(out)
    if outcome == "error":
        raise ConfigError(*payload)
    header, chunks = payload
    jobs: list[Job] = []
    for chunk in chunks:
        await asyncio.sleep(0)
        jobs += pickle.loads(chunk)
    cfg: Config = pickle.loads(header)
    return dataclasses.replace(cfg, jobs=tuple(jobs))


def _decode_worker(path: str) -> int:
    """The child of ``load_isolated``: writes its outcome, pickled, to stdout."""
    # Should decoding exhaust the memory the agent shares with it (a container's limit), the
    # kernel kills this process, not the agent.
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    result: tuple[str, Any]
    try:
        cfg = load(path)
    except ConfigError as e:
        result = ("error", (e.path, e.message, e.line))
    else:
        jobs = cfg.jobs
        result = (
            "ok",
            (
                pickle.dumps(dataclasses.replace(cfg, jobs=())),
                [
                    pickle.dumps(jobs[i : i + _JOBS_PER_CHUNK])
                    for i in range(0, len(jobs), _JOBS_PER_CHUNK)
                ],
            ),
        )
    sys.stdout.buffer.write(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.buffer.flush()
    return 0
