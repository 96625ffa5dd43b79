"""Clients of the servers the stack runs: a Prometheus server's HTTP API and ``edgeprobe
route``'s map."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lab.procs import http_ok


@dataclass
class PromAPI:
    base: str

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
            raise ValueError(
                f"{path} {params}: {body.get('errorType')}: {body.get('error')}"
            ) from None
        if body.get("status") != "success":
            raise ValueError(f"{path} {params}: {body}")
        return body["data"]

    def ready(self) -> bool:
        return http_ok(self.base + "/-/ready")

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query, now or at the Unix time ``at``."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = self._get("/api/v1/query", params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        data = self._get(
            "/api/v1/query_range",
            {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"},
        )
        result: list[dict[str, Any]] = data["result"]
        return result

    def alerts(self, state: str = "firing") -> list[dict[str, Any]]:
        return [a for a in self._get("/api/v1/alerts")["alerts"] if a["state"] == state]

    def firing(self, name_prefix: str) -> set[tuple[str, str]]:
        return {
            (a["labels"].get("region", ""), a["labels"].get("edge", ""))
            for a in self.alerts()
            if a["labels"]["alertname"].startswith(name_prefix)
        }

    def best_edges(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for s in self.query("region:edgeprobe_best_edge:info"):
            region = s["metric"]["region"]
            assert region not in out, f"two best edges for {region}"
            out[region] = s["metric"]["edge"]
        return out


# -- edgeprobe route ------------------------------------------------------------------------------
@dataclass
class RouteAPI:
    """The route service's HTTP API (docs/routing.md)."""

    base: str

    def map(self) -> dict[str, Any] | None:
        """The map, or None while there is none (503) or the service does not answer."""
        try:
            with urllib.request.urlopen(self.base + "/v1/map", timeout=5) as r:
                doc: dict[str, Any] = json.load(r)
                return doc
        except (OSError, ValueError):
            return None

    def best(self) -> dict[str, str]:
        doc = self.map() or {}
        return {r: v["best"] for r, v in doc.get("regions", {}).items()}
