"""The web config at work: basic auth (bcrypt on its own threads, verified credentials cached),
client SANs, response headers, the server-wide rate limit, and an SSL context that a reload
replaces."""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import hashlib
import hmac
import logging
import secrets
import ssl
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable
from pathlib import Path
from typing import Any

import bcrypt
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agent.export import catalog as C
from agent.server.ratelimit import TokenBucket
from agent.server.tls import load_with_tls
from agent.server.webconfig import RateLimit, WebConfig, WebConfigError

log = logging.getLogger("edgeprobe.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _AuthCache:
    """Recently verified credentials, so that bcrypt (tens to hundreds of ms) runs once per
    scraper, not once per scrape. An entry lives while it is used at least once per ``ttl``
    (a scraper on a steady interval never needs bcrypt again, so a flood that fills the bcrypt
    queue cannot fail its scrapes); a reload clears the cache, since the hashes may change.
    Keys are HMACs under a per-process random key: the cache holds neither a password nor
    anything an attacker with a memory dump could brute-force faster than the bcrypt hash."""

    def __init__(self, ttl: float = 60.0, size: int = 256) -> None:
        self._key = secrets.token_bytes(32)
        self._ttl = ttl
        self._size = size
        self._entries: OrderedDict[bytes, float] = OrderedDict()

    def _k(self, user: str, password: bytes, hashed: bytes) -> bytes:
        msg = b"\0".join((user.encode(), hashed, password))
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def hit(self, user: str, password: bytes, hashed: bytes, now: float) -> bool:
        k = self._k(user, password, hashed)
        exp = self._entries.get(k)
        if exp is None:
            return False
        if exp < now:
            del self._entries[k]
            return False
        self._entries[k] = now + self._ttl
        self._entries.move_to_end(k)
        return True

    def add(self, user: str, password: bytes, hashed: bytes, now: float) -> None:
        self._entries[self._k(user, password, hashed)] = now + self._ttl
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


class ReloadableContext(ssl.SSLContext):
    """The context a listening socket holds for its whole life. It serves nothing itself: each
    new connection is wrapped by :attr:`current`, the context built from the web config in force,
    so the next handshake after a reload sees exactly the new policy (a removed client CA or
    cipher restriction included). asyncio's and uvloop's SSL transports both create a
    connection's SSL object through ``wrap_bio``. Fails closed: a code path that used this
    context directly would find no certificate and every handshake would fail."""

    current: ssl.SSLContext

    # Both take SSLContext's own parameters, passed through as they come.
    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        return self.current.wrap_bio(*args, **kwargs)

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        return self.current.wrap_socket(*args, **kwargs)


class _Busy(Exception):
    """Every bcrypt worker is busy and the queue is full."""


class WebGuard:
    """The live web security state: the listening SSL context (whose policy a reload replaces)
    and one aiohttp middleware doing headers, rate limit, client SANs and basic auth.

    bcrypt runs on ``bcrypt_workers`` dedicated threads, never on the event loop (probe timing)
    nor the default executor (/metrics rendering). At most ``bcrypt_queue`` more checks wait;
    beyond that a login that is not in the verified-credentials cache gets 503 with
    Retry-After, so a flood of wrong passwords costs at most ``bcrypt_workers`` cores and
    bounded memory, and a cached (already verified) scraper is never delayed by it.

    ``WebGuard(None)`` is a no-op guard (no ``--web.config.file``)."""

    def __init__(
        self,
        path: str | Path | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        bcrypt_workers: int = 2,
        bcrypt_queue: int = 4,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self._clock = clock
        self.config, tls = (
            load_with_tls(self.path) if self.path is not None else (WebConfig(), None)
        )
        self._ssl: ReloadableContext | None = None
        # The contexts whose handshakes satisfy the client policy in force: a connection made
        # under any other one is closed at its next request (see _stale).
        self._admitted: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()
        self._policy: Hashable = None
        if tls is not None:
            self._ssl = ReloadableContext(ssl.PROTOCOL_TLS_SERVER)
            self._ssl.current, self._policy = tls
            self._admitted.add(self._ssl.current)
        self._cache = _AuthCache()
        self._bcrypt_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=bcrypt_workers, thread_name_prefix="edgeprobe-bcrypt"
        )
        self._bcrypt_limit = bcrypt_workers + bcrypt_queue
        self._bcrypt_pending = 0  # submitted to the pool and not finished (or cancelled)
        self.bcrypt_shed_total = 0
        self._bucket = TokenBucket(float(self.config.rate_limit.burst), clock())

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        """The guard's self-metrics, for the agent's and route's registries."""
        c = C.metric_family(C.WEB_AUTH_SHED)
        c.add_metric([], self.bcrypt_shed_total)
        yield c

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The context to listen with (TCPSite(ssl_context=...)); None when TLS is off."""
        return self._ssl

    def reload(self) -> None:
        """Re-read the file. On any error the old state stays and WebConfigError is raised.

        The new SSL context is built from scratch and, once the whole file validated, becomes
        the one new connections are wrapped with. If the client policy changed (a CA removed,
        a version or cipher restricted...), a kept-alive connection made under the old one is
        closed at its next request, so the client reconnects under the new policy; a reload
        that only rotates the server's certificate keeps connections. Turning TLS on or off
        needs a restart."""
        if self.path is None:
            return
        new, tls = load_with_tls(self.path)
        if (new.tls_server_config is None) != (self.config.tls_server_config is None):
            raise WebConfigError(f"{self.path}: turning TLS on or off needs a restart")
        if self._ssl is not None and tls is not None:
            ctx, policy = tls
            if policy != self._policy:
                self._admitted = weakref.WeakSet()
                self._policy = policy
            self._admitted.add(ctx)
            self._ssl.current = ctx
        self.config = new
        self._cache.clear()
        self._bucket.tokens = min(self._bucket.tokens, float(new.rate_limit.burst))

    def close(self) -> None:
        """Stop the bcrypt threads (checks already running finish)."""
        self._bcrypt_pool.shutdown(wait=False, cancel_futures=True)

    def middlewares(self) -> list[Callable[..., Awaitable[web.StreamResponse]]]:
        return [self.middleware]

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        cfg = self.config
        resp: web.StreamResponse
        if self._stale(request):
            # Go's HTTP client (Prometheus) retries an idempotent request on a new connection
            # when a reused one closes without a response; a status would fail the scrape.
            request.protocol.force_close()
            return web.Response(status=421, text="Misdirected Request\n")
        if not self._take_token(cfg.rate_limit):
            resp = web.Response(status=429, text="Too Many Requests\n")
        elif not self._sans_ok(request, cfg):
            resp = web.Response(status=403, text="Forbidden\n")
        else:
            try:
                authorized = not cfg.basic_auth_users or await self._authorized(request, cfg)
            except _Busy:
                resp = web.Response(
                    status=503, text="Service Unavailable\n", headers={"Retry-After": "1"}
                )
            else:
                if not authorized:
                    resp = web.Response(
                        status=401,
                        text="Unauthorized\n",
                        headers={"WWW-Authenticate": 'Basic realm="edgeprobe"'},
                    )
                else:
                    try:
                        resp = await handler(request)
                    except web.HTTPException as e:
                        resp = e
        for k, v in cfg.http_server_config.response_headers.items():
            resp.headers.setdefault(k, v)
        return resp

    def _stale(self, request: web.Request) -> bool:
        """Whether the request came on a TLS connection made under a client policy that a
        reload has since replaced."""
        if self._ssl is None or request.transport is None:
            return False
        sslobj = request.transport.get_extra_info("ssl_object")
        return sslobj is not None and sslobj.context not in self._admitted

    def _take_token(self, rl: RateLimit) -> bool:
        return rl.interval <= 0 or self._bucket.take(self._clock(), 1.0 / rl.interval, rl.burst)

    @staticmethod
    def _sans_ok(request: web.Request, cfg: WebConfig) -> bool:
        tls = cfg.tls_server_config
        if tls is None or not tls.client_allowed_sans:
            return True
        transport = request.transport
        cert = transport.get_extra_info("peercert") if transport is not None else None
        if not cert:
            return False
        sans = {v for _, v in cert.get("subjectAltName", ())}
        return bool(sans & set(tls.client_allowed_sans))

    async def _authorized(self, request: web.Request, cfg: WebConfig) -> bool:
        """Raises _Busy when the check would have to wait beyond the bounded queue."""
        creds = _parse_basic(request.headers.get("Authorization", ""))
        if creds is None:
            return False
        user, password = creds
        hashed = cfg.basic_auth_users.get(user)
        now = self._clock()
        if hashed is not None and self._cache.hit(user, password, hashed, now):
            return True
        ok = await self._checkpw(password, hashed or cfg.dummy_hash)
        if ok and hashed is not None:
            self._cache.add(user, password, hashed, now)
            return True
        log.info("basic auth failed", extra={"remote": request.remote or ""})
        return False

    async def _checkpw(self, password: bytes, hashed: bytes) -> bool:
        if self._bcrypt_pending >= self._bcrypt_limit:
            self.bcrypt_shed_total += 1
            raise _Busy
        loop = asyncio.get_running_loop()
        fut = self._bcrypt_pool.submit(_checkpw, password, hashed)
        self._bcrypt_pending += 1

        # Released when the thread is done (or the queued check is cancelled), not when this
        # coroutine stops waiting: a cancelled request must not free a slot still computing.
        def release(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to count
                loop.call_soon_threadsafe(self._bcrypt_done)

        fut.add_done_callback(release)
        return await asyncio.wrap_future(fut)

    def _bcrypt_done(self) -> None:
        self._bcrypt_pending -= 1


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        # bcrypt >= 5 refuses passwords over 72 bytes instead of truncating them.
        return False


def _parse_basic(header: str) -> tuple[str, bytes] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value or len(value) > 4096:
        return None
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = raw.partition(b":")
    if not sep:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None
