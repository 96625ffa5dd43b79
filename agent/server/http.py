"""The agent's HTTP server: /metrics, /-/healthy, /-/ready, /-/reload, /probe."""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import resource
import socket
import ssl
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agent.config.rules import split_host_port
from agent.export import protobuf
from agent.server.probe import handler as probe_handler

if TYPE_CHECKING:
    from agent.app import Agent

log = logging.getLogger("edgeprobe.web")

INDEX = """<html><head><title>edgeprobe</title></head><body><h1>edgeprobe</h1>
<p><a href="/metrics">Metrics</a> &middot; <a href="/-/healthy">Health</a> &middot;
<a href="/-/ready">Ready</a></p></body></html>"""


def parse_listen(addr: str) -> tuple[str, int]:
    """':9798' → ('0.0.0.0', 9798); '[::1]:9798' → ('::1', 9798)."""
    try:
        host, port = split_host_port(addr)
    except ValueError:
        port = None
    if port is None:
        raise ValueError(f"invalid listen address {addr!r}; expected HOST:PORT or :PORT")
    return host or "0.0.0.0", port


def add_status_routes(
    app: web.Application, index: str, ready: Callable[[], bool], not_ready: str = "Not ready.\n"
) -> None:
    """The pages every edgeprobe server has: ``/`` (the ``index`` page), ``/-/healthy`` (200
    while the process answers) and ``/-/ready`` (200 when ``ready()``, else 503 with
    ``not_ready``)."""

    async def index_page(_: web.Request) -> web.Response:
        return web.Response(text=index, content_type="text/html")

    async def healthy(_: web.Request) -> web.Response:
        return web.Response(text="Healthy.\n")

    async def readiness(_: web.Request) -> web.Response:
        if ready():
            return web.Response(text="Ready.\n")
        return web.Response(status=503, text=not_ready)

    app.router.add_get("/", index_page)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", readiness)


def build_app(
    agent: Agent, middlewares: Sequence[Any] = (), routes: Iterable[web.RouteDef] = ()
) -> web.Application:
    """The web application. ``middlewares`` (e.g. basic auth) and extra ``routes`` (e.g. /probe)
    are the extension point for optional features."""
    app = web.Application(middlewares=list(middlewares))

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
        for first in chunks:  # reading the state: no bytes yet, so errors can still be a 500
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

    async def reload(request: web.Request) -> web.Response:
        # The error (key and line, never a secret value) is for callers who proved who they
        # are: with basic_auth_users set, the guard's middleware (installed with the agent's
        # guard, see cli) lets no one else reach this handler. Read before the reload, which
        # may change the guard's config.
        guard = agent.web_guard
        authenticated = (
            guard is not None
            and bool(guard.config.basic_auth_users)
            and "Authorization" in request.headers
        )
        ok, err = await agent.reload()
        if ok:
            return web.Response(text="Reloaded.\n")
        detail = f": {err}" if authenticated else "; see the agent's log"
        return web.Response(status=500, text=f"Reload failed, running config kept{detail}\n")

    add_status_routes(app, INDEX, lambda: agent.ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/-/reload", reload)

    probe_handler.mount(app, lambda: agent.probe_endpoint)
    app.router.add_put("/-/reload", reload)
    app.add_routes(list(routes))
    return app


@dataclass(frozen=True)
class WebLimits:
    """What HTTP clients may hold: ``--web.read-header-timeout``, ``--web.idle-timeout`` and
    ``--web.max-connections``. aiohttp has no header timeout of its own and keeps a
    connection that never completes a header until its keep-alive timeout (an hour in 3.14,
    never in older versions), so a few slowloris clients could hold sockets indefinitely."""

    read_header_timeout: float = 10.0  # from accept (TLS handshake included) or first byte
    idle_timeout: float = 75.0  # between requests on a keep-alive connection
    max_connections: int = 512

    def problems(self) -> list[str]:
        errs = []
        if not 0 < self.read_header_timeout <= 3600:
            errs.append("--web.read-header-timeout must be between 0 and 1h")
        if not 0 < self.idle_timeout <= 3600:
            errs.append("--web.idle-timeout must be between 0 and 1h")
        if not 1 <= self.max_connections <= 1_000_000:
            errs.append("--web.max-connections must be between 1 and 1000000")
        return errs


# File descriptors kept for the probes on top of those open when the server starts and of
# what each series needs: the ICMP sockets, the resolver's threads, discovery's HTTP clients,
# the socket an over-the-cap connection holds between its accept and its close.
FD_RESERVE_MARGIN = 32
# Sockets one run of a kind holds at once (a run never overlaps the next one of its series):
# path sends every TTL of every round from a socket of its own; connect holds its signalling
# TCP/TLS socket, a STUN and a TURN socket; ICMP shares the engines' sockets (the margin).
_RUN_FDS = {"icmp": 0, "connect": 3}
_PROBE_REQUEST_FDS = 3  # a /probe request in flight: its module's run, at most connect's
_ACCEPT_BATCH = 16  # accepts per wake-up, so the probes' callbacks are not held up
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def run_fds(kind: str, options: object) -> int:
    if kind == "path":
        return int(getattr(options, "packets", 1)) * int(getattr(options, "max_hops", 1))
    return _RUN_FDS.get(kind, 1)


class ProbeFdReserve:
    """The file descriptors the probes of ``agent`` may hold at once. Called at each accept;
    recomputed only when the config (or the discovered targets) changed."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.config: object = None
        self.fds = 0

    def __call__(self) -> int:
        cfg = self.agent.config
        if cfg is not self.config:
            self.config = cfg
            self.fds = sum(run_fds(j.kind, j.options) for j in cfg.jobs)
        ep = self.agent.probe_endpoint
        return self.fds + (_PROBE_REQUEST_FDS * ep.cfg.max_concurrent if ep is not None else 0)


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 16


class _ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger. A malformed request is the client's fault and is expected on
    any open port: one line at debug, not a traceback at ERROR for each one."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            self.logger.debug(
                "malformed HTTP request", extra={"status": exc.code, "error": type(exc).__name__}
            )
            return
        self.logger.log(level, msg, *args, **kwargs)


class _Conn(asyncio.Protocol):
    """One accepted connection: aiohttp's handler inside, plus the deadlines aiohttp lacks.
    The connection is reading a header ("header": until accept + read_header_timeout, or the
    first byte after an idle spell + read_header_timeout; more bytes do not extend it),
    handling a request ("busy": no deadline, the handlers bound themselves) or idle between
    requests ("idle": idle_timeout)."""

    def __init__(self, site: _GuardedSite, handler: web.RequestHandler, accepted: float) -> None:
        self.site = site
        self.handler = handler
        self.state = "header"
        self.deadline = accepted + site.limits.read_header_timeout
        self.transport: asyncio.BaseTransport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.released = False

    # ------------------------------------------------------------ the protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.site.conns[self.handler] = self
        self.handler.connection_made(transport)
        self._wait("header", self.deadline)

    def data_received(self, data: bytes) -> None:
        if self.state == "idle":
            self._wait("header", self.site.loop.time() + self.site.limits.read_header_timeout)
        self.handler.data_received(data)

    def eof_received(self) -> None:
        self.handler.eof_received()  # falsy: the transport closes itself

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._forget()
        self.site.conns.pop(self.handler, None)
        self.handler.connection_lost(exc)
        self.release()

    # ------------------------------------------------------------------ states
    def busy(self) -> None:
        self._forget()
        self.state = "busy"

    def idle(self) -> None:
        if self.state == "busy" and self.transport is not None and not self.transport.is_closing():
            self._wait("idle", self.site.loop.time() + self.site.limits.idle_timeout)

    def abort(self) -> None:
        """Close now: an abort frees the socket at once (a TLS close would wait for the
        peer's close_notify, which a hostile peer never sends)."""
        self._forget()
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.site.released(self)

    def _wait(self, state: str, deadline: float) -> None:
        self._forget()
        self.state = state
        self.site.waiting[self] = None  # the oldest waiting connection is evicted first
        self.timer = self.site.loop.call_at(deadline, self._expire)

    def _forget(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.site.waiting.pop(self, None)

    def _expire(self) -> None:
        self.timer = None
        log.debug("closing a web connection", extra={"reason": f"{self.state} timeout"})
        self.abort()


class _GuardedSite(web.BaseSite):
    """A TCP site with its own accept loop: it caps the open connections at
    ``max_connections`` and at RLIMIT_NOFILE minus the file descriptors the probes need, so
    that web clients can never make a probe fail with EMFILE. At the cap, a new connection
    evicts the connection that has waited longest for a request (idle or slowloris); if all
    are handling a request, the new connection is closed at accept."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        limits: WebLimits,
        reserve: Callable[[], int],
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self.host, self.port = host, port
        self.limits = limits
        self.reserve = reserve
        self.loop = asyncio.get_running_loop()
        self.listeners: list[socket.socket] = []
        self.conns: dict[web.RequestHandler, _Conn] = {}
        self.waiting: MutableMapping[_Conn, None] = collections.OrderedDict()
        self.closing: set[_Conn] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.open = 0  # accepted sockets not closed yet (handshaking, live, closing)
        self.base_fds = 0
        self.paused = False
        self.resume_timer: asyncio.TimerHandle | None = None
        self.last_full_log = -1e9

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self.host}:{self.port}"

    def limit(self) -> int:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        cap = self.limits.max_connections
        if soft != resource.RLIM_INFINITY:
            cap = min(cap, soft - self.base_fds - self.reserve())
        return max(1, cap)

    async def start(self) -> None:
        await super().start()
        infos = await self.loop.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        try:
            for fam, typ, proto, _, addr in dict.fromkeys(infos):
                s = socket.socket(fam, typ, proto)
                self.listeners.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if fam == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(addr)
                s.listen(self._backlog)
                s.setblocking(False)
        except OSError:
            self._close_listeners()
            raise
        self.base_fds = _open_fds() + FD_RESERVE_MARGIN
        self._resume()

    async def stop(self) -> None:
        self._close_listeners()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await super().stop()

    def busy(self, handler: web.RequestHandler) -> None:
        conn = self.conns.get(handler)
        if conn is not None:
            conn.busy()

    def idle(self, handler: web.RequestHandler) -> None:
        conn = self.conns.get(handler)
        if conn is not None:
            conn.idle()

    def released(self, conn: _Conn) -> None:
        self.open -= 1
        self.closing.discard(conn)
        if self.paused and self.listeners and self.open < self.limit():
            self._resume()

    # ------------------------------------------------------------ accepting
    def _on_readable(self, listener: socket.socket) -> None:
        for _ in range(_ACCEPT_BATCH):
            full = self.open >= self.limit()
            if full and self._evict():
                self._pause(1.0)  # until the evicted connection's socket is closed
                return
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _OUT_OF_FDS:
                    log.warning(
                        "cannot accept web connections: out of file descriptors",
                        extra={"open_connections": self.open},
                    )
                    self._pause(0.5)
                    return
                continue  # the client gave up before the accept (ECONNABORTED)
            if full:
                # Every connection is handling a request: none can be evicted.
                sock.close()
                self._log_full("closed at accept")
                continue
            self.open += 1
            task = self.loop.create_task(self._connect(sock))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _evict(self) -> bool:
        """Start closing the longest-waiting connection, unless closings already under way
        will make room. False if no connection can be evicted."""
        if len(self.closing) > self.open - self.limit():
            return True
        if not self.waiting:
            return False
        conn = next(iter(self.waiting))
        self.closing.add(conn)
        conn.abort()
        self._log_full("evicting the longest-waiting connection")
        return True

    def _log_full(self, action: str) -> None:
        now = self.loop.time()
        if now - self.last_full_log >= 60:
            self.last_full_log = now
            log.warning(
                "web connection limit reached",
                extra={
                    "limit": self.limit(),
                    "action": action,
                    "hint": "--web.max-connections, RLIMIT_NOFILE (ulimit -n)",
                },
            )

    async def _connect(self, sock: socket.socket) -> None:
        server = self._runner.server
        assert server is not None
        conn = _Conn(self, server(), self.loop.time())
        try:
            if self._ssl_context is None:
                await self.loop.connect_accepted_socket(lambda: conn, sock)
            else:
                await self.loop.connect_accepted_socket(
                    lambda: conn,
                    sock,
                    ssl=self._ssl_context,
                    ssl_handshake_timeout=self.limits.read_header_timeout,
                )
        except BaseException as e:
            # The loop closed (or never took) the socket; closing a socket it detached is
            # a no-op.
            sock.close()
            conn.release()
            if isinstance(e, asyncio.CancelledError):
                raise
            if not isinstance(e, Exception):
                raise
            log.debug(
                "web connection failed before its first request", extra={"error": type(e).__name__}
            )

    def _pause(self, retry: float) -> None:
        if not self.paused:
            self.paused = True
            for s in self.listeners:
                self.loop.remove_reader(s.fileno())
        if self.resume_timer is None:
            self.resume_timer = self.loop.call_later(retry, self._resume)

    def _resume(self) -> None:
        if self.resume_timer is not None:
            self.resume_timer.cancel()
            self.resume_timer = None
        self.paused = False
        for s in self.listeners:
            self.loop.add_reader(s.fileno(), self._on_readable, s)

    def _close_listeners(self) -> None:
        if self.resume_timer is not None:
            self.resume_timer.cancel()
            self.resume_timer = None
        for s in self.listeners:
            if not self.paused:
                self.loop.remove_reader(s.fileno())
            s.close()
        self.listeners.clear()


async def serve(
    app: web.Application,
    listen: str,
    ssl_context: ssl.SSLContext | None = None,
    limits: WebLimits | None = None,
    reserve: Callable[[], int] = lambda: 0,
) -> web.AppRunner:
    """Serve ``app`` on ``listen`` within ``limits``; ``reserve`` is the number of file
    descriptors the probes need (see ProbeFdReserve)."""
    limits = limits or WebLimits()
    host, port = parse_listen(listen)
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=1.0,
        keepalive_timeout=limits.idle_timeout,
        logger=_ServerLog(logging.getLogger("aiohttp.server"), {}),
    )
    await runner.setup()
    site = _GuardedSite(runner, host, port, ssl_context=ssl_context, limits=limits, reserve=reserve)
    server = runner.server
    assert server is not None
    make_request, handle = server.request_factory, server.request_handler

    # aiohttp calls the request factory once a request's header is complete and the handler
    # to answer it: the two edges of a connection's "busy" state.
    def request_factory(*args: Any) -> web.BaseRequest:
        site.busy(args[2])
        return make_request(*args)

    async def request_handler(request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await handle(request)
        finally:
            site.idle(request.protocol)

    server.request_factory = request_factory
    server.request_handler = request_handler
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    cap = site.limit()
    log.info(
        "listening",
        extra={"address": f"{host}:{port}", "tls": ssl_context is not None, "max_connections": cap},
    )
    if cap < limits.max_connections:
        log.warning(
            "RLIMIT_NOFILE leaves the web server fewer connections than "
            "--web.max-connections; the rest is kept for the probes",
            extra={
                "max_connections": cap,
                "rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            },
        )
    return runner
