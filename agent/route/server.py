"""The HTTP side: ``GET /v1/map``, ``GET /v1/regions/{region}``, ``/metrics``, ``/-/healthy``,
``/-/ready``; the same conventions (and ``--web.config.file`` guard) as the agent's server."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agent.route.service import RouteService
from agent.server.http import add_status_routes

INDEX = """<html><head><title>edgeprobe route</title></head><body><h1>edgeprobe route</h1>
<p><a href="/v1/map">Map</a> &middot; <a href="/metrics">Metrics</a> &middot;
<a href="/-/healthy">Health</a> &middot; <a href="/-/ready">Ready</a></p></body></html>"""
AGE_HEADER = "X-Edgeprobe-Map-Age"
STALE_HEADER = "X-Edgeprobe-Map-Stale"


def _etag_matches(header: str, etag: str) -> bool:
    """RFC 9110 If-None-Match: weak comparison, a list, or '*'."""
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


def build_app(svc: RouteService, middlewares: Sequence[Any] = ()) -> web.Application:
    app = web.Application(middlewares=list(middlewares))
    store = svc.store
    max_age = max(1, math.floor(svc.cfg.prometheus.interval))

    def headers(etag: str) -> dict[str, str]:
        age = store.age(time.monotonic())
        return {
            "ETag": etag,
            "Cache-Control": f"max-age={max_age}",
            AGE_HEADER: "" if age is None else str(math.floor(age)),
            STALE_HEADER: "true" if store.stale else "false",
        }

    def answer(request: web.Request, body: bytes, etag: str) -> web.Response:
        h = headers(etag)
        inm = request.headers.get("If-None-Match")
        if inm is not None and _etag_matches(inm, etag):
            return web.Response(status=304, headers=h)
        return web.Response(body=body, content_type="application/json", headers=h)

    def not_ready() -> web.Response:
        # Never an empty map: no map yet is a 503 the client retries, not {} to route by.
        return web.Response(
            status=503,
            text="No routing map yet: no persisted map and no successful query.\n",
            headers={"Retry-After": str(max_age)},
        )

    async def full_map(request: web.Request) -> web.Response:
        if not store.ready:
            return not_ready()
        return answer(request, store.body, store.etag)

    async def one_region(request: web.Request) -> web.Response:
        if not store.ready:
            return not_ready()
        got = store.region_body(request.match_info["region"])
        if got is None:
            return web.Response(status=404, text="unknown region\n")
        return answer(request, *got)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(svc.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    add_status_routes(app, INDEX, lambda: store.ready, "Not ready: no routing map yet.\n")
    app.router.add_get("/v1/map", full_map)
    app.router.add_get("/v1/regions/{region}", one_region)
    app.router.add_get("/metrics", metrics)
    return app
