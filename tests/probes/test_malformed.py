"""Malformed STUN, UDP echo, DNS, TURN and HTTP responses from fake servers on loopback: counted,
never a valid reply, never a crash. Each fake server answers every request with a burst of bad
packets first and (where the case says so) the right answer last, so the probe must skip the bad
ones.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable

import dns.message
import pytest
from aioice import stun as codec

from probes import dns as dnsprobe
from probes import http, stun, turn, udp
from probes.base import ProbeContext, Target

Reply = Callable[[bytes], list[bytes]]


class Recorder:
    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def stray(self, probe: str, reason: str, n: int = 1) -> None:
        self.counts[(probe, reason)] = self.counts.get((probe, reason), 0) + n


class _Fake(asyncio.DatagramProtocol):
    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        for pkt in self.reply(data):
            self.transport.sendto(pkt, addr)


@pytest.fixture
async def udp_fake() -> AsyncIterator[Callable[[Reply], asyncio.Future[int]]]:
    transports: list[asyncio.DatagramTransport] = []

    async def start(reply: Reply) -> int:
        tr, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Fake(reply), local_addr=("127.0.0.1", 0)
        )
        transports.append(tr)
        return int(tr.get_extra_info("sockname")[1])

    yield start  # type: ignore[misc]
    for tr in transports:
        tr.close()


def _stun_response(req: bytes) -> bytes:
    msg = codec.parse_message(req)
    resp = codec.Message(
        codec.Method.BINDING,
        codec.Class.RESPONSE,
        msg.transaction_id,
        {"XOR-MAPPED-ADDRESS": ("127.0.0.1", 4242)},
    )
    resp.add_fingerprint()
    return bytes(resp)


def _bad_stun(req: bytes) -> list[bytes]:
    good = _stun_response(req)
    wrong_cookie = good[:4] + struct.pack("!I", 0xDEADBEEF) + good[8:]
    wrong_txid = good[:8] + bytes(12) + good[20:]
    bad_fp = good[:-1] + bytes([good[-1] ^ 0xFF])
    length_lie = good[:2] + struct.pack("!H", 400) + good[4:]
    # A short attribute header inside a valid-length message (struct.error in a naive codec).
    short_attr = good[:2] + struct.pack("!H", 4) + good[4:20] + b"\x00\x20\x00\x08"
    err = codec.Message(
        codec.Method.BINDING,
        codec.Class.ERROR,
        codec.parse_message(req).transaction_id,
        {"ERROR-CODE": (400, "Bad Request")},
    )
    err.add_fingerprint()
    error = bytes(err)
    return [
        b"\x00\x01",
        wrong_cookie,
        wrong_txid,
        bad_fp,
        length_lie,
        short_attr,
        bytes(60000),
        b"\xff" * 30,
        bytes(error),
        good,
        good,
    ]


async def test_stun_malformed_counted_and_skipped(
    udp_fake: Callable[[Reply], asyncio.Future[int]],
) -> None:
    port = await udp_fake(_bad_stun)
    rec = Recorder()
    res = await stun.run(
        Target("f", "127.0.0.1"),
        stun.StunOptions(port=port, packets=5, spacing=0.01, timeout=0.5),
        ProbeContext(counters=rec),
    )
    assert res.success and all(r is not None for r in res.rtts), res
    got = {r: n for (k, r), n in rec.counts.items() if k == "stun"}
    for reason in (
        "malformed",
        "bad_cookie",
        "unknown_txid",
        "bad_fingerprint",
        "not_stun",
        "duplicate",
        "error_response",
    ):
        assert got.get(reason, 0) >= 5, (reason, got)
    assert res.info["mapped_family"] == "ipv4"


async def test_stun_only_garbage_is_loss(udp_fake: Callable[[Reply], asyncio.Future[int]]) -> None:
    port = await udp_fake(lambda req: _bad_stun(req)[:-2])
    rec = Recorder()
    res = await stun.run(
        Target("f", "127.0.0.1"),
        stun.StunOptions(port=port, packets=3, timeout=0.2),
        ProbeContext(counters=rec),
    )
    assert (res.success, res.reason, res.rtts) == (False, "stun_timeout", [None] * 3)
    assert sum(rec.counts.values()) >= 3 * 8


def _bad_echo(req: bytes) -> list[bytes]:
    # The probe's payload is magic (4), run nonce (8), sequence (4), then padding.
    other_run = req[:4] + bytes(8) + req[12:]
    other_kind = b"XXXX" + req[4:]
    corrupt = req[:-1] + bytes([req[-1] ^ 0xFF])
    return [req[:10], other_run, other_kind, corrupt, req, req]


async def test_udp_echo_strays_counted_and_skipped(
    udp_fake: Callable[[Reply], asyncio.Future[int]],
) -> None:
    port = await udp_fake(_bad_echo)
    rec = Recorder()
    res = await udp.run(
        Target("f", "127.0.0.1"),
        udp.UdpOptions(port=port, packets=5, spacing=0.01, timeout=0.5, payload_size=32),
        ProbeContext(counters=rec),
    )
    assert (res.success, res.reason) == (True, "ok"), res
    assert all(r is not None for r in res.rtts) and res.packet_ids == list(range(5))
    got = {r: n for (k, r), n in rec.counts.items() if k == "udp"}
    assert got == {"malformed": 5, "foreign": 10, "corrupt": 5, "duplicate": 5}, got
    assert res.errors == {"duplicate": 5}, res.errors


async def test_udp_echo_only_strays_is_loss(
    udp_fake: Callable[[Reply], asyncio.Future[int]],
) -> None:
    port = await udp_fake(lambda req: _bad_echo(req)[:-2])
    rec = Recorder()
    res = await udp.run(
        Target("f", "127.0.0.1"),
        udp.UdpOptions(port=port, packets=3, timeout=0.2),
        ProbeContext(counters=rec),
    )
    assert (res.success, res.reason, res.rtts, res.errors) == (False, "udp_timeout", [None] * 3, {})


def _bad_dns(req: bytes) -> list[bytes]:
    q = dns.message.from_wire(req)
    r = dns.message.make_response(q)
    good = r.to_wire()
    wrong_id = struct.pack("!H", (q.id + 1) & 0xFFFF) + good[2:]
    return [good[:5], wrong_id, good[:12] + b"\xff" * 40, bytes(65000), b"", good]


async def test_dns_malformed_counted_and_skipped(
    udp_fake: Callable[[Reply], asyncio.Future[int]],
) -> None:
    port = await udp_fake(_bad_dns)
    rec = Recorder()
    opts = dnsprobe.DnsOptions(port=port, query_name="edge.lab.test", timeout=0.5)
    res = await dnsprobe.run(Target("f", "127.0.0.1"), opts, ProbeContext(counters=rec))
    assert res.success and res.info["rcode"] == "NOERROR", res
    assert rec.counts[("dns", "wrong_id")] == 1
    assert rec.counts[("dns", "malformed")] >= 3
    port = await udp_fake(lambda req: _bad_dns(req)[:-1])
    res = await dnsprobe.run(
        Target("f", "127.0.0.1"),
        dnsprobe.DnsOptions(port=port, query_name="x.test", timeout=0.2),
        ProbeContext(counters=rec),
    )
    assert (res.success, res.reason) == (False, "dns_timeout")


async def test_turn_malformed_counted(udp_fake: Callable[[Reply], asyncio.Future[int]]) -> None:
    def reply(req: bytes) -> list[bytes]:
        good = bytearray(_stun_response(req))
        return [
            b"\x01",
            bytes(good[:4]) + b"\0\0\0\0" + bytes(good[8:]),
            bytes(good[:8]) + bytes(12) + bytes(good[20:]),
            bytes(60000),
        ]

    port = await udp_fake(reply)
    rec = Recorder()
    res = await turn.run(
        Target("f", "127.0.0.1"),
        turn.TurnOptions(port=port, username="u", password="p", timeout=0.2),
        ProbeContext(counters=rec),
    )
    assert (res.success, res.reason) == (False, "turn_timeout")
    assert rec.counts[("turn", "malformed")] >= 1
    assert rec.counts[("turn", "bad_cookie")] >= 1
    assert rec.counts[("turn", "unknown_txid")] >= 1


async def _tcp_fake(payload: bytes, close: bool = True) -> tuple[asyncio.Server, int]:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await r.readuntil(b"\r\n\r\n")
            w.write(payload)
            await w.drain()
            if not close:
                await asyncio.sleep(5)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, int(srv.sockets[0].getsockname()[1])


@pytest.mark.parametrize(
    ("payload", "want"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", "http_malformed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n", "http_malformed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", "http_malformed"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n", "http_malformed"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n" + b"x" * 300000,
            "http_body_too_large",
        ),
        (b"", "http_reset"),
    ],
)
async def test_http_malformed_never_crashes(payload: bytes, want: str) -> None:
    srv, port = await _tcp_fake(payload)
    try:
        res = await http.run(
            Target("f", "127.0.0.1"),
            http.HttpOptions(scheme="http", port=port, timeout=1.0, max_body_bytes=100000),
            ProbeContext(),
        )
    finally:
        srv.close()
    assert not res.success
    assert res.reason in (want, "http_reset", "http_malformed"), res
    assert res.reason in http.KIND.all_reasons


def test_socket_errors_do_not_leak() -> None:
    # Every probe closes its sockets: a burst of failing runs leaves no fds behind.
    import os

    before = len(os.listdir("/proc/self/fd"))

    async def burst() -> None:
        for _ in range(20):
            await stun.run(
                Target("f", "127.0.0.1"),
                stun.StunOptions(port=9, packets=1, timeout=0.01),
                ProbeContext(),
            )

    asyncio.run(burst())
    assert len(os.listdir("/proc/self/fd")) <= before + 2
