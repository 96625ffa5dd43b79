"""The central Prometheus' HTTP API (instant queries), and what ``edgeprobe route`` asks it.

Every series is keyed by (region, edge). A sample that cannot be used is dropped and counted by
a bounded reason: ``nan``, ``inf``, ``missing_label`` (no region or edge), ``duplicate`` (two
series for one (region, edge): all of them are dropped, the value is ambiguous),
``out_of_range`` and ``bad_value``. Keys whose sample was dropped are reported, so that the
caller can mark the edge ``invalid_data`` instead of silently treating it as absent.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

# The window of the route candidates in the recording rules (group edgeprobe-route-candidates
# in deploy/prometheus/rules/edgeprobe-recording.yml); tests/e2e/test_route_service.py checks that
# every name below is recorded by a rule there.
WINDOW = "1h"
CONNECTS = f"region_edge:edgeprobe_route_connects:increase{WINDOW}"
MISS_UCB = f"region_edge:edgeprobe_route_miss_ucb:ratio{WINDOW}"
RTT_P95 = f"region_edge:edgeprobe_route_rtt_seconds:p95_{WINDOW}"
ELIGIBLE = "region_edge:edgeprobe_route_eligible:info"
SERIES = (ELIGIBLE, MISS_UCB, RTT_P95, CONNECTS)

DROP_REASONS = ("nan", "inf", "missing_label", "duplicate", "out_of_range", "bad_value")
ERROR_REASONS = ("timeout", "connection", "http_status", "bad_response", "query_error", "empty")
MAX_RESPONSE_BYTES = 64 << 20

Key = tuple[str, str]


class QueryError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        assert reason in ERROR_REASONS
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class Vector:
    """An instant vector keyed by (region, edge): value and the series' other labels."""

    values: dict[Key, tuple[float, dict[str, str]]] = field(default_factory=dict)
    dropped: Counter[str] = field(default_factory=Counter)
    invalid: set[Key] = field(default_factory=set)


def parse_vector(data: Any, lo: float = -math.inf, hi: float = math.inf) -> Vector:
    """``data`` of a successful /api/v1/query answer -> Vector. Values outside [lo, hi] are
    dropped as out_of_range."""
    if (
        not isinstance(data, dict)
        or data.get("resultType") != "vector"
        or not isinstance(data.get("result"), list)
    ):
        raise QueryError("bad_response", "expected an instant vector")
    out = Vector()
    seen: Counter[Key] = Counter()
    for s in data["result"]:
        metric = s.get("metric") if isinstance(s, dict) else None
        value = s.get("value") if isinstance(s, dict) else None
        if not isinstance(metric, dict):
            out.dropped["bad_value"] += 1
            continue
        region, edge = metric.get("region"), metric.get("edge")
        if not isinstance(region, str) or not isinstance(edge, str) or not region or not edge:
            out.dropped["missing_label"] += 1
            continue
        key = (region, edge)
        seen[key] += 1
        try:
            v = float(value[1])  # type: ignore[index]
        except (TypeError, ValueError, IndexError):
            out.dropped["bad_value"] += 1
            out.invalid.add(key)
            continue
        if math.isnan(v):
            out.dropped["nan"] += 1
            out.invalid.add(key)
        elif math.isinf(v):
            out.dropped["inf"] += 1
            out.invalid.add(key)
        elif not lo <= v <= hi:
            out.dropped["out_of_range"] += 1
            out.invalid.add(key)
        else:
            labels = {k: str(x) for k, x in metric.items() if k not in ("region", "edge")}
            out.values[key] = (v, labels)
    for key, n in seen.items():
        if n > 1:
            out.dropped["duplicate"] += n
            out.values.pop(key, None)
            out.invalid.add(key)
    return out


class PromClient:
    """Instant queries against one Prometheus, each bounded by ``timeout``."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, timeout: float) -> None:
        self.session = session
        self.url = base_url.rstrip("/") + "/api/v1/query"
        self.timeout = timeout

    async def query(self, expr: str, lo: float = -math.inf, hi: float = math.inf) -> Vector:
        try:
            async with asyncio.timeout(self.timeout):
                async with self.session.post(
                    self.url, data={"query": expr}, allow_redirects=False
                ) as r:
                    if r.content_length is not None and r.content_length > MAX_RESPONSE_BYTES:
                        raise QueryError("bad_response", "response too large")
                    raw = await r.content.read(MAX_RESPONSE_BYTES + 1)
                    status = r.status
        except TimeoutError:
            raise QueryError("timeout", f"no answer within {self.timeout:g}s") from None
        except aiohttp.ClientError as e:
            raise QueryError("connection", type(e).__name__) from None
        except OSError as e:
            raise QueryError("connection", e.strerror or type(e).__name__) from None
        if len(raw) > MAX_RESPONSE_BYTES:
            raise QueryError("bad_response", "response too large")
        try:
            body = json.loads(raw)
        except ValueError:
            raise QueryError(
                "http_status" if status != 200 else "bad_response", f"HTTP {status}, not JSON"
            ) from None
        if not isinstance(body, dict):
            raise QueryError("bad_response", "not a JSON object")
        if body.get("status") != "success":
            reason = "query_error" if status in (200, 400, 422) else "http_status"
            raise QueryError(reason, f"HTTP {status}: {body.get('errorType')}")
        return parse_vector(body.get("data"), lo, hi)
