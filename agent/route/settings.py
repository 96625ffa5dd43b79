"""The ``edgeprobe route`` config file: strict keys, every threshold with a documented default.

Decoded with the agent's strict decoder (agent/config/decode.py): an unknown key, a wrong type or an
out-of-range value is a ConfigError naming the key and its line.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from agent.config.decode import ConfigError, Duration, compose, decode_dataclass, read_config

MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class PrometheusSection:
    """Where the candidates come from: the central Prometheus' HTTP API."""

    url: str = "http://localhost:9090"
    # One instant query must answer within this, or the cycle fails and the map goes stale.
    timeout: Duration = Duration(10.0)
    # How often the four queries run; also the map's Cache-Control max-age.
    interval: Duration = Duration(15.0)

    def validate(self) -> list[str]:
        out = []
        u = urllib.parse.urlsplit(self.url)
        if u.scheme not in ("http", "https") or not u.netloc:
            out.append(f"url: must be an http:// or https:// URL, got {self.url!r}")
        if not 0.1 <= self.timeout <= 300:
            out.append("timeout: must be between 100ms and 5m")
        if not 1 <= self.interval <= 3600:
            out.append("interval: must be between 1s and 1h")
        return out


@dataclass(frozen=True)
class PolicySection:
    """The hysteresis of the first choice (docs/routing.md, "The policy")."""

    # Width of a miss-UCB band: edges are ordered by floor(miss_ucb / ucb_band) first, so UCB
    # differences inside a band (sampling noise) never outrank RTT.
    ucb_band: float = 0.05
    # A challenger beats the incumbent on quality only when it is this many bands lower.
    ucb_margin_bands: int = 2
    # ... or, in the same or a lower band, when its RTT p95 is lower by this fraction of the
    # incumbent's and by at least rtt_margin_min.
    rtt_margin: float = 0.2
    rtt_margin_min: Duration = Duration(0.002)
    # How long a challenger must stay significantly better before it replaces the incumbent.
    # An ineligible incumbent is replaced at once, without a hold.
    hold: Duration = Duration(300.0)
    # An edge whose series vanished stays in its region's list (ineligible, no_data) this long;
    # the last edges of a region are never forgotten.
    forget_after: Duration = Duration(86400.0)

    def validate(self) -> list[str]:
        out = []
        if not 0 < self.ucb_band <= 1:
            out.append("ucb_band: must be in (0, 1]")
        if not 1 <= self.ucb_margin_bands <= 100:
            out.append("ucb_margin_bands: must be between 1 and 100")
        if not 0 <= self.rtt_margin < 1:
            out.append("rtt_margin: must be in [0, 1)")
        if self.rtt_margin_min > 10:
            out.append("rtt_margin_min: must be at most 10s")
        if self.hold > 86400:
            out.append("hold: must be at most 24h")
        if self.forget_after < 60:
            out.append("forget_after: must be at least 1m")
        return out


@dataclass(frozen=True)
class MapSection:
    """Where the map lives on disk."""

    # The last good map, read at start and served before the first query completes.
    state_file: str = "/var/lib/edgeprobe-route/map.json"
    # The routing-layer output: the same document, atomically replaced, for a sidecar or a
    # signalling service on the same volume. Empty: not written.
    output_file: str = ""

    def validate(self) -> list[str]:
        out = []
        if not self.state_file.strip():
            out.append("state_file: must be a path")
        return out


@dataclass(frozen=True)
class RouteConfig:
    prometheus: PrometheusSection = field(default_factory=PrometheusSection)
    policy: PolicySection = field(default_factory=PolicySection)
    map: MapSection = field(default_factory=MapSection)


def loads(text: str, source: str = "<config>") -> RouteConfig:
    """Decode a config document; an empty one means every default. Raises ConfigError."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise ConfigError(source, f"config larger than {MAX_CONFIG_BYTES} bytes")
    root = compose(text, source)
    if root is None:
        return RouteConfig()
    return decode_dataclass(RouteConfig, root)


def load(path: str | Path) -> RouteConfig:
    return loads(read_config(path, MAX_CONFIG_BYTES), str(path))
