"""TURN probe: an authenticated Allocate (RFC 8656) over UDP with long-term credentials.

The exchange an RTC client does before relayed media can flow: an unauthenticated Allocate,
the server's 401 with REALM and NONCE, then the Allocate signed with MESSAGE-INTEGRITY
(key = MD5(username:realm:password), RFC 8489 §9.2.2). Both round trips are timed
(``challenge`` and ``allocate``). The allocation is released right away (Refresh, LIFETIME 0)
so probes never pile up relays on the edge. Each request is sent once, like every packet
train here: a miss is a timeout, not a hidden retransmit.

The password comes from ``password`` or ``password_file`` and is never logged, exported or put
in a reason; ``repr`` of the options hides it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from dataclasses import dataclass

from aioice import stun
from aioice.turn import make_integrity_key

from probes.base import (
    SOCKET_EXHAUSTED,
    CommonOptions,
    ProbeContext,
    ProbeKind,
    ProbeResult,
    Target,
    secret_field,
)
from probes.net.resolve import Resolver
from probes.net.sockets import (
    NET_REASONS,
    Endpoint,
    ProbeFailed,
    SocketOptions,
    check_secret,
    connected_udp,
    exhausted,
    read_secret,
    resolve,
)
from probes.stun import SOFTWARE

UDP_TRANSPORT = 17 << 24  # REQUESTED-TRANSPORT: protocol number in the top byte

TURN_REASONS: tuple[str, ...] = (
    "turn_timeout",
    "turn_refused",
    "turn_unreachable",
    "turn_auth_failed",
    "turn_quota",
    "turn_error",
    "turn_bad_integrity",
    "turn_no_credentials",
    "turn_credentials_unreadable",
)


@dataclass(frozen=True)
class TurnOptions(SocketOptions):
    interval: float = 10.0
    port: int = 3478
    username: str = ""
    password: str = secret_field()
    password_file: str = secret_field()

    def check(self) -> list[str]:
        errs = check_secret(self.password, self.password_file)
        if not self.username:
            errs.append("username: required")
        return errs


@dataclass
class Allocation:
    challenge: float
    allocate: float
    relayed_family: str


async def _exchange(
    sock: socket.socket, msg: stun.Message, timeout: float, ctx: ProbeContext
) -> tuple[stun.Message, float]:
    """Send ``msg`` once and wait for the response with its transaction ID."""
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter_ns()
    try:
        sock.send(bytes(msg))
        async with asyncio.timeout(timeout):
            while True:
                data = await loop.sock_recv(sock, 65536)
                took = (time.perf_counter_ns() - t0) / 1e9
                if len(data) < stun.HEADER_LENGTH:
                    ctx.counters.stray("turn", "malformed")
                    continue
                _, _, cookie, txid = struct.unpack_from("!HHI12s", data)
                if cookie != stun.COOKIE:
                    ctx.counters.stray("turn", "bad_cookie")
                    continue
                if txid != msg.transaction_id:
                    ctx.counters.stray("turn", "unknown_txid")
                    continue
                try:
                    resp = stun.parse_message(data)
                except (ValueError, struct.error, IndexError, KeyError):
                    ctx.counters.stray("turn", "malformed")
                    continue
                return resp, took
    except TimeoutError:
        raise ProbeFailed("turn_timeout") from None
    except ConnectionRefusedError:
        raise ProbeFailed("turn_refused") from None
    except OSError:
        raise ProbeFailed("turn_unreachable") from None


def _error_reason(code: int | None) -> str:
    if code in (401, 403):
        return "turn_auth_failed"
    if code == 486:
        return "turn_quota"
    return "turn_error"


@dataclass
class _LongTermAuth:
    """The long-term credential of one allocation (RFC 8489 §9.2) and the nonce valid now."""

    username: str
    realm: str
    nonce: bytes
    key: bytes  # MD5(username:realm:password)

    def message(self, method: stun.Method, attributes: dict[str, object]) -> stun.Message:
        req = stun.Message(
            method,
            stun.Class.REQUEST,
            attributes={
                **attributes,
                "SOFTWARE": SOFTWARE,
                "USERNAME": self.username,
                "REALM": self.realm,
                "NONCE": self.nonce,
            },
        )
        req.add_message_integrity(self.key)
        return req


async def _signed(
    sock: socket.socket,
    auth: _LongTermAuth,
    method: stun.Method,
    attributes: dict[str, object],
    timeout: float,
    ctx: ProbeContext,
) -> tuple[stun.Message, float]:
    """A request signed with MESSAGE-INTEGRITY: (response, seconds). A 438 Stale Nonce gets one
    retry with the fresh nonce, which ``auth`` keeps, and both exchanges are timed."""
    took = 0.0
    for _ in range(2):
        resp, t = await _exchange(sock, auth.message(method, attributes), timeout, ctx)
        took += t
        if (
            resp.message_class == stun.Class.ERROR
            and resp.error_code == 438
            and "NONCE" in resp.attributes
        ):
            auth.nonce = resp.attributes["NONCE"]
            continue
        break
    return resp, took


@dataclass
class OpenAllocation:
    """An allocation still held on the server, with what later requests need to sign."""

    sock: socket.socket
    auth: _LongTermAuth
    relayed: tuple[str, int] | None
    allocation: Allocation
    timeout: float  # per exchange
    ctx: ProbeContext

    async def request(self, method: stun.Method, attributes: dict[str, object]) -> stun.Message:
        """One signed request on the allocation (a 438 Stale Nonce gets one retry)."""
        resp, _ = await _signed(self.sock, self.auth, method, attributes, self.timeout, self.ctx)
        return resp

    async def release(self) -> None:
        """Refresh with LIFETIME 0, then close the socket. The wait for the answer is short:
        without one the allocation expires by itself, and it is not this run's outcome."""
        try:
            req = self.auth.message(stun.Method.REFRESH, {"LIFETIME": 0})
            with contextlib.suppress(ProbeFailed):
                await _exchange(self.sock, req, min(self.timeout, 0.5), self.ctx)
        finally:
            self.sock.close()


async def open_allocation(
    ep: Endpoint,
    port: int,
    opts: CommonOptions,
    username: str,
    password: str,
    timeout: float,
    ctx: ProbeContext,
) -> OpenAllocation:
    """One authenticated Allocate, kept: the caller must ``release()`` it. Raises
    ProbeFailed(turn_*), with the socket closed."""
    sock = connected_udp(ep, port, opts, "turn_unreachable")
    try:
        req = stun.Message(
            stun.Method.ALLOCATE,
            stun.Class.REQUEST,
            attributes={"REQUESTED-TRANSPORT": UDP_TRANSPORT, "SOFTWARE": SOFTWARE},
        )
        req.add_fingerprint()
        resp, challenge = await _exchange(sock, req, timeout, ctx)
        if (
            resp.message_class != stun.Class.ERROR
            or resp.error_code != 401
            or "NONCE" not in resp.attributes
            or "REALM" not in resp.attributes
        ):
            # A server that allocates without auth is misconfigured for this probe.
            raise ProbeFailed(_error_reason(resp.error_code))
        realm = str(resp.attributes["REALM"])
        key = make_integrity_key(username, realm, password)
        auth = _LongTermAuth(username, realm, resp.attributes["NONCE"], key)
        resp, took = await _signed(
            sock, auth, stun.Method.ALLOCATE, {"REQUESTED-TRANSPORT": UDP_TRANSPORT}, timeout, ctx
        )
        if resp.message_class != stun.Class.RESPONSE:
            raise ProbeFailed(_error_reason(resp.error_code))
        if not resp.check_message_integrity(key):
            raise ProbeFailed("turn_bad_integrity")
        auth.nonce = resp.attributes.get("NONCE", auth.nonce)
        relayed = resp.attributes.get("XOR-RELAYED-ADDRESS")
        family = "none" if not relayed else ("ipv6" if ":" in str(relayed[0]) else "ipv4")
        return OpenAllocation(
            sock,
            auth,
            (str(relayed[0]), int(relayed[1])) if relayed else None,
            Allocation(challenge, took, family),
            timeout,
            ctx,
        )
    except BaseException:
        sock.close()
        raise


def read_password(password: str, password_file: str) -> str:
    """The TURN password from the option or its file. Raises
    ProbeFailed(turn_credentials_unreadable), or (socket_exhausted) when out of descriptors."""
    try:
        return read_secret(password, password_file)
    except OSError as e:
        raise ProbeFailed(
            SOCKET_EXHAUSTED if exhausted(e) else "turn_credentials_unreadable"
        ) from None


async def open_target(target: Target, opts: TurnOptions, ctx: ProbeContext) -> OpenAllocation:
    """An authenticated Allocate on the target with the options' credentials, kept: the caller
    must ``release()`` it. Raises ProbeFailed(turn_*, resolve_*, source_*)."""
    password = read_password(opts.password, opts.password_file)
    if not opts.username or not password:
        raise ProbeFailed("turn_no_credentials")
    ep = await resolve(target.address, opts, ctx)
    return await open_allocation(ep, opts.port, opts, opts.username, password, opts.timeout, ctx)


async def run(target: Target, opts: TurnOptions, ctx: ProbeContext) -> ProbeResult:
    t0 = time.perf_counter_ns()
    try:
        a = await open_target(target, opts, ctx)
    except ProbeFailed as e:
        return ProbeResult.failure(e.reason, (time.perf_counter_ns() - t0) / 1e9)
    await a.release()
    return ProbeResult(
        success=True,
        duration=(time.perf_counter_ns() - t0) / 1e9,
        phases={"challenge": a.allocation.challenge, "allocate": a.allocation.allocate},
        info={"relayed_family": a.allocation.relayed_family},
    )


REASONS: tuple[str, ...] = (*TURN_REASONS, *NET_REASONS)

KIND = ProbeKind(
    name="turn",
    options=TurnOptions,
    run=run,
    phases=("challenge", "allocate"),
    reasons=REASONS,
    stray_reasons=("malformed", "bad_cookie", "unknown_txid"),
    info_labels=("relayed_family",),
    needs=(Resolver,),
)
