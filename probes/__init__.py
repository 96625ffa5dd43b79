"""Probe kinds. Adding a kind means one file in this package and one line in ``PROBES``."""

from __future__ import annotations

from typing import Any

from probes import connect, dns, http, icmp, path, relay, stun, tcp, tls, turn, udp, webrtc
from probes.base import ProbeKind

PROBES: dict[str, ProbeKind[Any]] = {
    "icmp": icmp.KIND,
    "tcp": tcp.KIND,
    "tls": tls.KIND,
    "http": http.KIND,
    "dns": dns.KIND,
    "udp": udp.KIND,
    "stun": stun.KIND,
    "turn": turn.KIND,
    "path": path.KIND,
    "connect": connect.KIND,
    "webrtc": webrtc.KIND,
    "relay": relay.KIND,
}

__all__ = ["PROBES"]
