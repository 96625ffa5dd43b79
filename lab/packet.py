"""Just enough IPv4/IPv6 to forward, age and describe packets read from a TUN device."""

from __future__ import annotations

import struct
from typing import NamedTuple

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMP6 = 58

ICMP4_ECHO_REQUEST, ICMP4_ECHO_REPLY, ICMP4_TIME_EXCEEDED = 8, 0, 11
ICMP6_ECHO_REQUEST, ICMP6_ECHO_REPLY, ICMP6_TIME_EXCEEDED = 128, 129, 3


class Info(NamedTuple):
    """What the ground truth records about a packet. ``a``/``b`` are the ICMP id/seq or the
    transport ports; ``icmp_type`` is 255 for non-ICMP."""

    version: int
    src: bytes
    dst: bytes
    proto: int
    icmp_type: int
    a: int
    b: int
    ttl: int


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def parse(pkt: bytes) -> Info | None:
    """Describe a packet, or None if it is not a well-formed IPv4/IPv6 packet."""
    if len(pkt) < 20:
        return None
    v = pkt[0] >> 4
    if v == 4:
        ihl = (pkt[0] & 0x0F) * 4
        if ihl < 20 or len(pkt) < ihl:
            return None
        proto = pkt[9]
        src, dst, ttl, off = pkt[12:16], pkt[16:20], pkt[8], ihl
        # A non-first fragment carries no transport header.
        if struct.unpack_from("!H", pkt, 6)[0] & 0x1FFF:
            return Info(4, src, dst, proto, 255, 0, 0, ttl)
    elif v == 6:
        if len(pkt) < 40:
            return None
        proto = pkt[6]
        src, dst, ttl, off = pkt[8:24], pkt[24:40], pkt[7], 40
    else:
        return None
    icmp_type, a, b = 255, 0, 0
    if proto in (PROTO_ICMP, PROTO_ICMP6) and len(pkt) >= off + 8:
        icmp_type = pkt[off]
        a, b = struct.unpack_from("!HH", pkt, off + 4)
        if (icmp_type in (ICMP4_TIME_EXCEEDED, 3) and proto == PROTO_ICMP) or (
            proto == PROTO_ICMP6 and icmp_type in (1, ICMP6_TIME_EXCEEDED)
        ):
            # An error quotes the offending packet: record the quoted echo's id/seq so the
            # ground truth can be matched with the probe that caused it.
            inner = parse(pkt[off + 8 :])
            if inner is not None and inner.proto == proto:
                a, b = inner.a, inner.b
    elif proto in (PROTO_TCP, PROTO_UDP) and len(pkt) >= off + 4:
        a, b = struct.unpack_from("!HH", pkt, off)
    return Info(v, src, dst, proto, icmp_type, a, b, ttl)


def age(pkt: bytearray, hops: int) -> None:
    """Decrement TTL / hop limit by ``hops`` in place (IPv4: incremental checksum, RFC 1624)."""
    if hops <= 0:
        return
    if pkt[0] >> 4 == 4:
        old = (pkt[8] << 8) | pkt[9]
        pkt[8] -= hops
        new = (pkt[8] << 8) | pkt[9]
        c = (~((pkt[10] << 8) | pkt[11]) & 0xFFFF) + (~old & 0xFFFF) + new
        while c >> 16:
            c = (c & 0xFFFF) + (c >> 16)
        c = ~c & 0xFFFF
        pkt[10], pkt[11] = c >> 8, c & 0xFF
    else:
        pkt[7] -= hops


def ipv4(
    src: bytes, dst: bytes, proto: int, payload: bytes, ttl: int = 64, ident: int = 0
) -> bytes:
    """An IPv4 packet (20-byte header, no options, checksummed) carrying ``payload``."""
    hdr = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, ttl, proto, 0, src, dst)
    )
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return bytes(hdr) + payload


def time_exceeded(pkt: bytes, router: bytes, ttl: int = 64) -> bytes:
    """ICMP Time Exceeded (in transit) from ``router`` back to the sender of ``pkt``."""
    if pkt[0] >> 4 == 4:
        ihl = (pkt[0] & 0x0F) * 4
        # RFC 792 needs the header + 8 bytes; like Linux, quote more (up to 576 bytes total).
        quote = pkt[: max(ihl + 8, 576 - 28)]
        icmp = bytearray(struct.pack("!BBHI", ICMP4_TIME_EXCEEDED, 0, 0, 0) + quote)
        struct.pack_into("!H", icmp, 2, checksum(icmp))
        return ipv4(router, pkt[12:16], PROTO_ICMP, bytes(icmp), ttl)
    # RFC 4443 §2.4(c): as much of the invoking packet as fits in the minimum MTU (1280).
    quote6 = pkt[: 1280 - 48]
    icmp = bytearray(struct.pack("!BBHI", ICMP6_TIME_EXCEEDED, 0, 0, 0) + quote6)
    dst = pkt[8:24]
    pseudo = router + dst + struct.pack("!I3xB", len(icmp), PROTO_ICMP6)
    struct.pack_into("!H", icmp, 2, checksum(pseudo + icmp))
    hdr6 = struct.pack("!IHBB16s16s", 6 << 28, len(icmp), PROTO_ICMP6, ttl, router, dst)
    return hdr6 + bytes(icmp)
