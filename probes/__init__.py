"""Probe kinds. Adding a kind means one file in this package and one line in ``PROBES``."""

from __future__ import annotations

from typing import Any

from probes import icmp
from probes.base import ProbeKind

PROBES: dict[str, ProbeKind[Any]] = {
    "icmp": icmp.KIND,
}

__all__ = ["PROBES"]
