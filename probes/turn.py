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

from probes.base import CommonOptions, ProbeContext, ProbeKind, ProbeResult, Target, secret_field
from probes.net.resolve import Resolver
from probes.net.sockets import (
    NET_REASONS,
    Endpoint,
    ProbeFailed,
    SocketOptions,
    check_secret,
    make_socket,
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


async def _signed(
    sock: socket.socket,
    method: stun.Method,
    attributes: dict[str, object],
    username: str,
    realm: str,
    nonce: bytes,
    key: bytes,
    timeout: float,
    ctx: ProbeContext,
) -> tuple[stun.Message, float, bytes]:
    """A request signed with MESSAGE-INTEGRITY: (response, seconds, the nonce now valid). A 438
    Stale Nonce gets one retry with the fresh nonce, and both exchanges are timed."""
    took = 0.0
    for _ in range(2):
        req = stun.Message(
            method,
            stun.Class.REQUEST,
            attributes={
                **attributes,
                "SOFTWARE": SOFTWARE,
                "USERNAME": username,
                "REALM": realm,
                "NONCE": nonce,
            },
        )
        req.add_message_integrity(key)
        resp, t = await _exchange(sock, req, timeout, ctx)
        took += t
        if (
            resp.message_class == stun.Class.ERROR
            and resp.error_code == 438
            and "NONCE" in resp.attributes
        ):
            nonce = resp.attributes["NONCE"]
            continue
        break
    return resp, took, nonce


@dataclass
class OpenAllocation:
    """An allocation still held on the server, with what later requests need to sign."""

    sock: socket.socket
    username: str
    realm: str
    nonce: bytes
    key: bytes
    relayed: tuple[str, int] | None
    allocation: Allocation
    timeout: float  # per exchange
    ctx: ProbeContext

    async def request(self, method: stun.Method, attributes: dict[str, object]) -> stun.Message:
        """One signed request on the allocation (a 438 Stale Nonce gets one retry)."""
        resp, _, self.nonce = await _signed(
            self.sock,
            method,
            attributes,
            self.username,
            self.realm,
            self.nonce,
            self.key,
            self.timeout,
            self.ctx,
        )
        return resp

    async def release(self) -> None:
        """Refresh with LIFETIME 0, then close the socket. The wait for the answer is short:
        without one the allocation expires by itself, and the run's outcome is known."""
        try:
            await _release(
                self.sock,
                self.username,
                self.realm,
                self.nonce,
                self.key,
                min(self.timeout, 0.5),
                self.ctx,
            )
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
    sock = make_socket(ep, socket.SOCK_DGRAM, opts)
    try:
        try:
            sock.connect(ep.sockaddr(port))
        except OSError:
            raise ProbeFailed("turn_unreachable") from None
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
        nonce = resp.attributes["NONCE"]
        key = make_integrity_key(username, realm, password)
        resp, took, nonce = await _signed(
            sock,
            stun.Method.ALLOCATE,
            {"REQUESTED-TRANSPORT": UDP_TRANSPORT},
            username,
            realm,
            nonce,
            key,
            timeout,
            ctx,
        )
        if resp.message_class != stun.Class.RESPONSE:
            raise ProbeFailed(_error_reason(resp.error_code))
        if not resp.check_message_integrity(key):
            raise ProbeFailed("turn_bad_integrity")
        relayed = resp.attributes.get("XOR-RELAYED-ADDRESS")
        family = "none" if not relayed else ("ipv6" if ":" in str(relayed[0]) else "ipv4")
        return OpenAllocation(
            sock,
            username,
            realm,
            resp.attributes.get("NONCE", nonce),
            key,
            (str(relayed[0]), int(relayed[1])) if relayed else None,
            Allocation(challenge, took, family),
            timeout,
            ctx,
        )
    except BaseException:
        sock.close()
        raise


async def _release(
    sock: socket.socket,
    username: str,
    realm: str,
    nonce: bytes,
    key: bytes,
    timeout: float,
    ctx: ProbeContext,
) -> None:
    req = stun.Message(
        stun.Method.REFRESH,
        stun.Class.REQUEST,
        attributes={
            "LIFETIME": 0,
            "SOFTWARE": SOFTWARE,
            "USERNAME": username,
            "REALM": realm,
            "NONCE": nonce,
        },
    )
    req.add_message_integrity(key)
    # Without an answer the allocation expires by itself; not this run's outcome.
    with contextlib.suppress(ProbeFailed):
        await _exchange(sock, req, timeout, ctx)


def read_password(password: str, password_file: str) -> str:
    """The TURN password from the option or its file. Raises
    ProbeFailed(turn_credentials_unreadable)."""
    try:
        return read_secret(password, password_file)
    except OSError:
        raise ProbeFailed("turn_credentials_unreadable") from None


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
