"""The agent's HTTP server: /metrics, /-/healthy, /-/ready, /-/reload, /probe."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agent.export import protobuf

if TYPE_CHECKING:
    from agent.app import Agent

log = logging.getLogger("edgeprobe.web")

INDEX = """<html><head><title>edgeprobe</title></head><body><h1>edgeprobe</h1>
<p><a href="/metrics">Metrics</a> &middot; <a href="/-/healthy">Health</a> &middot;
<a href="/-/ready">Ready</a></p></body></html>"""


def parse_listen(addr: str) -> tuple[str, int]:
    """':9798' → ('0.0.0.0', 9798); '[::1]:9798' → ('::1', 9798)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid listen address {addr!r}; expected HOST:PORT or :PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def build_app(agent: Agent, middlewares: Sequence[Any] = (),
              routes: Iterable[web.RouteDef] = ()) -> web.Application:
    """The web application. ``middlewares`` (e.g. basic auth) and extra ``routes`` (e.g. /probe)
    are the extension point for optional features."""
    app = web.Application(middlewares=list(middlewares))

    async def index(_: web.Request) -> web.Response:
        return web.Response(text=INDEX, content_type="text/html")

    async def metrics(request: web.Request) -> web.StreamResponse:
        # Rendered on the event loop in slices of a few ms, yielding to the probes' timers
        # between them, and streamed as it is rendered (never the whole body in memory).
        # Not in a thread: every socket call of the probes releases the GIL, and a render
        # thread then kept it for a switch interval each time, which starved the probes at
        # 10,000 targets (the convoy effect). The protobuf format for scrapers that ask for it
        # (it alone carries native histograms), the text format 0.0.4 for everyone else.
        if protobuf.accepts_protobuf(request.headers.get("Accept", "")):
            chunks, ctype = agent.render_metrics_protobuf(), protobuf.CONTENT_TYPE
        else:
            chunks, ctype = agent.render_metrics(), CONTENT_TYPE_LATEST
        first = b""
        for first in chunks:    # reading the state: no bytes yet, so errors can still be a 500
            if first:
                break
            await asyncio.sleep(0)
        resp = web.StreamResponse(headers={"Content-Type": ctype})
        # The length is not known before the last chunk is rendered: chunked encoding.
        await resp.prepare(request)
        await resp.write(first)
        for c in chunks:
            await resp.write(c)
            await asyncio.sleep(0)
        await resp.write_eof()
        return resp

    async def healthy(_: web.Request) -> web.Response:
        return web.Response(text="Healthy.\n")

    async def ready(_: web.Request) -> web.Response:
        if agent.ready:
            return web.Response(text="Ready.\n")
        return web.Response(status=503, text="Not ready.\n")

    async def reload(_: web.Request) -> web.Response:
        ok, err = await agent.reload()
        if ok:
            return web.Response(text="Reloaded.\n")
        return web.Response(status=500, text=f"Reload failed, running config kept: {err}\n")

    app.router.add_get("/", index)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    app.router.add_post("/-/reload", reload)

    async def probe(request: web.Request) -> web.Response:
        # Looked up per request: a reload may enable, disable or reconfigure /probe.
        ep = agent.probe_endpoint
        if ep is None:
            return web.Response(status=404, text="/probe is disabled (probe_endpoint.enabled)\n")
        return await ep.handle(request)

    app.router.add_get("/probe", probe)
    app.router.add_put("/-/reload", reload)
    app.add_routes(list(routes))
    return app


async def serve(app: web.Application, listen: str,
                ssl_context: ssl.SSLContext | None = None) -> web.AppRunner:
    host, port = parse_listen(listen)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True)
    await site.start()
    log.info("listening", extra={"address": f"{host}:{port}", "tls": ssl_context is not None})
    return runner
