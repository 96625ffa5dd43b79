"""Target groups in the Prometheus ``file_sd``/``http_sd`` format, the bounded refresh failure
reasons, and merging the sources' lists."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from agent.config import rules
from agent.config.rules import (
    NAME_RULE,
    RESERVED_LABELS,
    YAMLLimitError,
    is_host,
    is_label_name,
    is_name,
    load_yaml,
)
from probes.base import Target

MAX_LABEL_VALUE = 1024

# Bounded failure reasons (the `reason` label of edgeprobe_sd_refresh_failures_total).
REASONS = (
    "io",
    "parse",
    "invalid",
    "too_large",
    "too_many",
    "timeout",
    "connect",
    "http_status",
    "content_type",
    "nxdomain",
    "no_answer",
    "dns_error",
)


class SDError(Exception):
    """A refresh failure with a bounded reason; the message is for the log only."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DiscoveredTarget:
    target: Target
    probes: tuple[str, ...]
    port: int | None = None  # from "host:port"; for kinds with a `port` option
    source: str = ""


def split_host_port(raw: str) -> tuple[str, int | None]:
    host, port = rules.split_host_port(raw)
    if port == 0:
        raise ValueError("invalid port")
    if not is_host(host):
        raise ValueError("invalid host")
    return host.rstrip("."), port


def parse_groups(
    data: object, source: str, default_probes: tuple[str, ...], max_targets: int
) -> list[DiscoveredTarget]:
    """Validate Prometheus SD target groups. Raises SDError("invalid"/"too_many")."""
    from probes import PROBES

    if not isinstance(data, list):
        raise SDError("invalid", "expected a list of target groups")
    out: list[DiscoveredTarget] = []
    names: set[str] = set()
    for gi, group in enumerate(data):
        where = f"group {gi}"
        if not isinstance(group, dict):
            raise SDError("invalid", f"{where}: expected a mapping")
        unknown = set(group) - {"targets", "labels"}
        if unknown:
            raise SDError(
                "invalid", f"{where}: unknown key(s) " + ", ".join(sorted(map(str, unknown))[:5])
            )
        targets = group.get("targets") or []
        raw_labels = group.get("labels") or {}
        if not isinstance(targets, list) or not isinstance(raw_labels, dict):
            raise SDError("invalid", f"{where}: targets must be a list, labels a mapping")
        labels: dict[str, str] = {}
        edge, probes = "", default_probes
        for k, v in raw_labels.items():
            if not is_label_name(k):
                raise SDError("invalid", f"{where}: invalid label name {str(k)[:60]!r}")
            if isinstance(v, dict | list) or v is None:
                raise SDError("invalid", f"{where}: label {k}: expected a string")
            # YAML scalars like `tier: 1` are strings to Prometheus too.
            val = str(v).lower() if isinstance(v, bool) else str(v)
            if len(val) > MAX_LABEL_VALUE:
                raise SDError("invalid", f"{where}: label {k}: value too long")
            if k == "__edge__":
                edge = val
            elif k == "__probes__":
                probes = tuple(p.strip() for p in val.split(",") if p.strip())
                bad = [p for p in probes if p not in PROBES]
                if bad or not probes:
                    raise SDError(
                        "invalid", f"{where}: __probes__: unknown kind(s) " + ", ".join(bad[:5])
                    )
            elif k.startswith("__"):
                continue
            elif k in RESERVED_LABELS:
                raise SDError("invalid", f"{where}: label name {k!r} is reserved by edgeprobe")
            else:
                labels[k] = val
        if edge and len(targets) != 1:
            raise SDError("invalid", f"{where}: __edge__ needs exactly one target")
        for ti, t in enumerate(targets):
            if not isinstance(t, str):
                raise SDError("invalid", f"{where}: targets[{ti}]: expected a string")
            try:
                host, port = split_host_port(t)
            except ValueError as e:
                raise SDError("invalid", f"{where}: targets[{ti}]: {e}") from None
            name = edge or host
            if not is_name(name):
                raise SDError(
                    "invalid",
                    f"{where}: targets[{ti}]: edge name {name[:70]!r} is "
                    f"not {NAME_RULE} (set __edge__)",
                )
            if name in names:
                raise SDError("invalid", f"{where}: duplicate target name {name!r}")
            names.add(name)
            out.append(
                DiscoveredTarget(
                    Target(name=name, address=host, labels=dict(labels)),
                    probes=probes,
                    port=port,
                    source=source,
                )
            )
            if len(out) > max_targets:
                raise SDError("too_many", f"more than {max_targets} targets")
    return out


def decode_sd_text(text: str, yaml_format: bool) -> object:
    try:
        if yaml_format:
            return load_yaml(text)
        return json.loads(text)
    except YAMLLimitError as e:
        at = f"line {e.line}: " if e.line is not None else ""
        raise SDError("too_large" if e.expands else "parse", f"{at}{e.message}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        at = f"line {mark.line + 1}: " if mark is not None else ""
        raise SDError("parse", f"{at}{e.problem}") from None
    except (yaml.YAMLError, ValueError) as e:
        raise SDError("parse", str(e)[:200]) from None
    except RecursionError:
        raise SDError("parse", "nested too deeply") from None


def merge_targets(
    lists: Iterable[list[DiscoveredTarget]], taken: Mapping[str, Any] | None = None
) -> list[DiscoveredTarget]:
    """Concatenate, skipping names in ``taken`` (e.g. static targets) or already seen."""
    seen: set[str] = set(taken or ())
    out: list[DiscoveredTarget] = []
    for lst in lists:
        for t in lst:
            if t.target.name not in seen:
                seen.add(t.target.name)
                out.append(t)
    return out
