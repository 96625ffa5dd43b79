"""WebRTC connect probe: a real peer connection (aiortc) signalled over WHIP (RFC 9725).

What an RTC client does before media flows, timed phase by phase (seconds):

1. ``gathering``: create the offer and gather local candidates (host candidates; in
   ``relay_only`` mode a TURN Allocate instead, two round trips to the TURN server).
2. ``signalling``: ``POST`` the offer to the WHIP URL on a fresh connection (TCP, TLS, the
   request) until the ``201 Created`` answer with its ``Location`` is read.
3. ``ice``: from applying the answer until ICE has a nominated pair (the probe is the
   controlling agent: a check, then the nominating check).
4. ``dtls``: from ICE connected until the DTLS handshake is done (the answerer is the DTLS
   client, ``a=setup:active``; the probe answers its ClientHello).
5. ``first_media`` (``first_media: datachannel``): from DTLS connected until a message sent on
   a data channel came back from the server's echo: SCTP association, channel open, one echo.
   A data-channel echo and not an RTCP receiver report on an audio track, because an RR comes
   when the server's RTCP timer fires (RFC 3550 §6.2: randomised, seconds apart), so its
   arrival measures the timer and not the path; an echo is one request and its answer. With
   ``first_media: none`` (servers without a data-channel echo, e.g. pure ingest servers) the
   offer carries a send-only audio section and the connect ends at DTLS connected.

``duration`` is the whole connect; a failed connect is ``+Inf`` (as for ``connect``), so the
connect histogram's ``le="0.6"`` bucket over its count is the fraction within the budget.

The session always ends with the WHIP ``DELETE`` on the ``Location`` resource, also after a
failure; a teardown that fails (or a ``Location`` on another origin, which would receive the
bearer token) is counted as ``teardown_failed`` and does not fail the connect. The bearer token
(``token_file``) and the TURN password (``password_file``) are read per run, sent only where
they belong, and never logged, exported or put in a reason.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import ssl
import time
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
from yarl import URL

from probes import connect
from probes.base import (
    SOCKET_EXHAUSTED,
    CommonOptions,
    ProbeContext,
    ProbeKind,
    ProbeResult,
    Target,
)
from probes.net.resolve import Resolver, literal
from probes.net.sockets import (
    RESOLVE_REASONS,
    ProbeFailed,
    check_ports,
    exhausted,
    os_error_reason,
    os_reasons,
    out_of_sockets,
    read_secret,
    resolve,
)
from probes.tls import TLS_REASONS, _ssl_reason, make_context
from probes.turn import read_password

PHASES: tuple[str, ...] = ("gathering", "signalling", "ice", "dtls", "first_media")
ECHO_BYTES = 32


@dataclass(frozen=True)
class WebrtcOptions(CommonOptions):
    interval: float = 30.0
    timeout: float = 5.0  # the whole connect (teardown not included)
    scheme: Literal["http", "https"] = "https"
    port: int = 0  # 0 = 80 or 443 by scheme
    path: str = "/whip"
    server_name: str = ""  # Host header and SNI; "" = the target's address
    ca_file: str = ""
    insecure_skip_verify: bool = False
    token_file: str = ""  # bearer token (first line); "" = no Authorization
    first_media: Literal["datachannel", "none"] = "datachannel"
    relay_only: bool = False  # ICE transport policy "relay"
    turn_url: str = ""  # "turn:host:port"; "" = turn:<target address>:3478
    username: str = ""
    password_file: str = ""
    max_answer_bytes: int = 65536
    teardown_timeout: float = 1.0
    candidates_from_target_only: bool = False  # ICE checks only to the signalled address

    def run_time(self) -> float:
        # The connect, then the DELETE and closing the peer, each bounded by teardown_timeout.
        return self.timeout + 2 * self.teardown_timeout

    def validate(self) -> list[str]:
        errs = super().validate()
        if self.port:
            errs += check_ports(self, "port")
        if not self.path.startswith("/"):
            errs.append("path: must start with /")
        if self.dscp:
            errs.append("dscp: not supported by webrtc (aiortc marks no DSCP)")
        if self.source_address:
            errs.append(
                "source_address: not supported by webrtc (ICE gathers every interface address)"
            )
        if self.relay_only and not (self.username and self.password_file):
            errs.append("relay_only: needs username and password_file")
        if self.turn_url and not self.turn_url.startswith(("turn:", "turns:")):
            errs.append("turn_url: must be turn:host[:port] or turns:host[:port]")
        if not 1024 <= self.max_answer_bytes <= 1 << 20:
            errs.append("max_answer_bytes: must be between 1024 and 1048576")
        if self.teardown_timeout <= 0:
            errs.append("teardown_timeout: must be > 0")
        return errs


def keep_candidates(sdp: str, ip_family: str, only: str = "") -> str:
    """``sdp`` without the remote candidates ICE must not use: those of the other address
    family (``ip_family`` pins ICE as well as signalling; ``auto`` keeps both), and with
    ``only`` set, every candidate whose address is not ``only``."""
    want = {"ipv4": 4, "ipv6": 6}.get(ip_family)
    out = []
    for line in sdp.split("\r\n"):
        if line.startswith("a=candidate:"):
            f = line.split()
            try:
                ip = ipaddress.ip_address(f[4] if len(f) > 5 else "")
            except ValueError:
                continue  # a name (mDNS) or garbage: never resolved, never checked
            if (want and ip.version != want) or (only and ip != ipaddress.ip_address(only)):
                continue
        out.append(line)
    return "\r\n".join(out)


def _turn_url(opts: WebrtcOptions, address: str) -> str:
    if opts.turn_url:
        return opts.turn_url
    host = f"[{address}]" if ":" in address else address
    return f"turn:{host}:3478"


class _Run:
    """The state of one connect; ``close`` releases all of it whatever happened."""

    def __init__(self, opts: WebrtcOptions) -> None:
        self.opts = opts
        self.phases: dict[str, float] = {}
        self.stage = "signalling"
        self.pc: Any = None
        self.session: aiohttp.ClientSession | None = None
        self.location: URL | None = None
        self.headers: dict[str, str] = {}
        self.server_hostname: str | None = None
        self.teardown_failed = False
        loop = asyncio.get_running_loop()
        self.ice_done: asyncio.Future[bool] = loop.create_future()
        self.dtls_done: asyncio.Future[bool] = loop.create_future()
        self.echo: asyncio.Future[bool] = loop.create_future()
        self.ice_ns = 0
        self.dtls_ns = 0

    def lap(self, name: str, since: int) -> int:
        now = time.perf_counter_ns()
        self.phases[name] = (now - since) / 1e9
        return now

    def peer(self, ice_servers: list[Any]) -> Any:
        from aiortc import (
            RTCConfiguration,
            RTCIceTransportPolicy,
            RTCPeerConnection,
        )

        policy = RTCIceTransportPolicy.RELAY if self.opts.relay_only else RTCIceTransportPolicy.ALL
        # iceServers must never be None: aiortc would then use a public STUN server.
        pc = RTCPeerConnection(RTCConfiguration(iceServers=ice_servers, iceTransportPolicy=policy))

        def settle(fut: asyncio.Future[bool], ok: bool) -> None:
            if not fut.done():
                fut.set_result(ok)

        @pc.on("iceconnectionstatechange")
        def on_ice() -> None:
            state = pc.iceConnectionState
            if state == "completed":
                self.ice_ns = self.ice_ns or time.perf_counter_ns()
                settle(self.ice_done, True)
            elif state == "failed":
                settle(self.ice_done, False)

        @pc.on("connectionstatechange")
        def on_conn() -> None:
            state = pc.connectionState
            if state == "connected":
                self.dtls_ns = self.dtls_ns or time.perf_counter_ns()
                settle(self.dtls_done, True)
            elif state in ("failed", "closed"):
                settle(self.dtls_done, False)

        self.pc = pc
        if self.opts.first_media == "datachannel":
            probe = os.urandom(ECHO_BYTES)
            ch = pc.createDataChannel("edgeprobe-echo")

            @ch.on("open")
            def on_open() -> None:
                ch.send(probe)

            @ch.on("message")
            def on_message(msg: Any) -> None:
                if msg == probe:
                    settle(self.echo, True)
        else:
            pc.addTransceiver("audio", direction="sendonly")
        return pc

    async def close(self, ctx: ProbeContext) -> None:
        if self.location is not None and self.session is not None:
            try:
                async with (
                    asyncio.timeout(self.opts.teardown_timeout),
                    self.session.delete(
                        self.location,
                        headers=self.headers,
                        server_hostname=self.server_hostname,
                        allow_redirects=False,
                    ) as resp,
                ):
                    # 2xx ends the session; 404 means it is already gone (expired).
                    self.teardown_failed = not (200 <= resp.status < 300 or resp.status == 404)
            except (TimeoutError, aiohttp.ClientError, OSError, ssl.SSLError):
                self.teardown_failed = True
        if self.pc is not None:
            try:
                async with asyncio.timeout(self.opts.teardown_timeout):
                    await self.pc.close()
            except Exception:  # a peer that cannot close cleanly is not this run's outcome
                ctx.log.debug("webrtc: peer connection did not close cleanly")
        if self.session is not None:
            await self.session.close()


def same_origin(loc: URL, url: URL, name: str) -> URL | None:
    """``loc`` aimed at the address the offer went to, or None when it names another origin
    (scheme, port, and host: the signalled address or ``name``, the server name)."""
    if loc.scheme != url.scheme or loc.port != url.port or loc.host not in (url.host, name):
        return None
    return loc.with_host(url.host) if url.host else None


async def _signal(r: _Run, target: Target, ep_address: str, offer: str, token: str) -> str:
    """POST the offer; the answer SDP. Sets ``r.location``. Raises ProbeFailed."""
    opts = r.opts
    port = opts.port or (443 if opts.scheme == "https" else 80)
    name = opts.server_name or target.address.strip("[]")
    host = f"[{ep_address}]" if ":" in ep_address else ep_address
    url = URL(f"{opts.scheme}://{host}:{port}{opts.path}")
    sslctx: ssl.SSLContext | bool = False
    if opts.scheme == "https":
        sslctx = make_context(opts.ca_file, opts.insecure_skip_verify, "TLS1.2")
    bracketed = f"[{name}]" if ":" in name else name
    default_port = port == (443 if opts.scheme == "https" else 80)
    r.headers = {"Host": bracketed if default_port else f"{bracketed}:{port}"}
    if token:
        r.headers["Authorization"] = f"Bearer {token}"
    connector = aiohttp.TCPConnector(limit=1, use_dns_cache=False, ssl=sslctx)
    r.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    r.server_hostname = name if opts.scheme == "https" and literal(name) is None else None
    try:
        async with r.session.post(
            url,
            data=offer.encode(),
            allow_redirects=False,
            server_hostname=r.server_hostname,
            headers={**r.headers, "Content-Type": "application/sdp"},
        ) as resp:
            loc = resp.headers.get("Location", "")
            if loc:
                r.location = same_origin(url.join(URL(loc)), url, name)
                # Never DELETE (with the token) anywhere but where the offer went.
                r.teardown_failed = r.location is None
            if resp.status not in (200, 201):
                raise ProbeFailed("signalling_status")
            if not loc:
                raise ProbeFailed("no_location")
            if resp.content_type != "application/sdp":
                raise ProbeFailed("signalling_content_type")
            body = await resp.content.read(opts.max_answer_bytes + 1)
            while body and len(body) <= opts.max_answer_bytes:
                more = await resp.content.read(opts.max_answer_bytes + 1 - len(body))
                if not more:
                    break
                body += more
            if len(body) > opts.max_answer_bytes:
                raise ProbeFailed("answer_too_large")
            return body.decode("utf-8", "replace")
    except ProbeFailed:
        raise
    except aiohttp.ClientConnectorCertificateError as e:
        raise ProbeFailed(_ssl_reason(e.certificate_error)) from None
    except aiohttp.ClientConnectorSSLError:
        raise ProbeFailed("tls_handshake_failed") from None
    except aiohttp.ClientConnectorError as e:
        if exhausted(e.os_error):
            raise ProbeFailed(SOCKET_EXHAUSTED) from None
        raise ProbeFailed(os_error_reason(e.os_error, "tcp")) from None
    except (aiohttp.ServerDisconnectedError, ConnectionResetError):
        raise ProbeFailed("signalling_reset") from None
    except (aiohttp.ClientError, OSError, ssl.SSLError, UnicodeError):
        raise ProbeFailed("signalling_error") from None


async def _connect(r: _Run, target: Target, ctx: ProbeContext) -> None:
    from aiortc import RTCIceServer, RTCSessionDescription

    opts = r.opts
    try:
        token = read_secret("", opts.token_file) if opts.token_file else ""
    except OSError as e:
        raise ProbeFailed(SOCKET_EXHAUSTED if exhausted(e) else "token_unreadable") from None
    ep = await resolve(target.address, opts, ctx)
    servers: list[Any] = []
    if opts.relay_only:
        password = read_password("", opts.password_file)
        servers = [
            RTCIceServer(
                urls=_turn_url(opts, ep.address), username=opts.username, credential=password
            )
        ]
    r.stage = "gathering"
    t = time.perf_counter_ns()
    pc = r.peer(servers)
    await pc.setLocalDescription(await pc.createOffer())
    offer = str(pc.localDescription.sdp)
    if "a=candidate:" not in offer:
        # No candidate: aioice skips an address it cannot open a socket on; otherwise (with
        # relay_only) no relayed candidate, the TURN server failed.
        raise ProbeFailed(SOCKET_EXHAUSTED if out_of_sockets() else "gather_failed")
    t = r.lap("gathering", t)
    r.stage = "signalling"
    answer = await _signal(r, target, ep.address, offer, token)
    t = r.lap("signalling", t)
    r.stage = "ice"
    try:
        answer = keep_candidates(
            answer, opts.ip_family, ep.address if opts.candidates_from_target_only else ""
        )
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    except Exception:  # aiortc raises ValueError and friends for any malformed answer
        raise ProbeFailed("bad_answer") from None
    if not await r.ice_done:
        raise ProbeFailed("ice_failed")
    r.phases["ice"] = (r.ice_ns - t) / 1e9
    r.stage = "dtls"
    if not await r.dtls_done:
        raise ProbeFailed("dtls_failed")
    r.phases["dtls"] = (r.dtls_ns - r.ice_ns) / 1e9
    if opts.first_media == "datachannel":
        r.stage = "media"
        await r.echo
        r.lap("first_media", r.dtls_ns)


async def run(target: Target, opts: WebrtcOptions, ctx: ProbeContext) -> ProbeResult:
    # aiortc is imported on first use, not with the probe registry (it is heavy, and only this
    # kind needs it), and before the clock starts: the first connect must not time an import.
    try:
        import aiortc  # noqa: F401
    except OSError as e:  # reading its files takes descriptors too
        if not exhausted(e):
            raise
        return _failure(SOCKET_EXHAUSTED, {}, {})
    t0 = time.perf_counter_ns()
    r = _Run(opts)
    reason = "ok"
    try:
        try:
            async with asyncio.timeout(opts.timeout):
                await _connect(r, target, ctx)
        except ProbeFailed as e:
            reason = e.reason
        except TimeoutError:
            reason = f"{r.stage}_timeout"
        except OSError as e:  # a socket aiortc opens itself (gathering, ICE, DTLS)
            reason = (
                SOCKET_EXHAUSTED
                if exhausted(e)
                else {"gathering": "gather_failed", "ice": "ice_failed"}.get(r.stage, "dtls_failed")
            )
        duration = (time.perf_counter_ns() - t0) / 1e9
    finally:
        # Also when the run is cancelled (a reload removed the target, shutdown): the peer's
        # sockets and tasks and the WHIP session must not outlive it.
        await r.close(ctx)
    errors = {"teardown_failed": 1} if r.teardown_failed else {}
    if reason != "ok":
        return _failure(reason, r.phases, errors)
    return ProbeResult(
        success=True,
        duration=duration,
        phases=r.phases,
        errors=errors,
        info={"relayed": "true" if opts.relay_only else "false"},
        gauges={"connect_over_budget": float(duration > ctx.budget)},
    )


def _failure(reason: str, phases: dict[str, float], errors: dict[str, int]) -> ProbeResult:
    """A connect that did not happen: over any budget (see the module's doc)."""
    return ProbeResult.failure(
        reason, float("inf"), phases=phases, errors=errors, gauges={"connect_over_budget": 1.0}
    )


REASONS: tuple[str, ...] = (
    "gather_failed",
    "signalling_timeout",
    "signalling_status",
    "signalling_content_type",
    "signalling_reset",
    "signalling_error",
    "no_location",
    "answer_too_large",
    "bad_answer",
    "ice_timeout",
    "ice_failed",
    "dtls_timeout",
    "dtls_failed",
    "media_timeout",
    "gathering_timeout",
    "teardown_failed",
    "token_unreadable",
    "turn_credentials_unreadable",
    "tls_config",
    *os_reasons("tcp"),
    *TLS_REASONS,
    *RESOLVE_REASONS,
)

KIND = ProbeKind(
    name="webrtc",
    options=WebrtcOptions,
    run=run,
    phases=PHASES,
    reasons=REASONS,
    metric_prefix="connect",
    info_labels=("relayed",),
    gauges=connect.KIND.gauges,  # the same family as the modelled connect's
    needs=(Resolver,),
    failure_gauges=connect.KIND.failure_gauges,
)
