"""ICMP errors from a socket's error queue (``IP_RECVERR`` / ``IPV6_RECVERR``).

With the option set, the kernel queues each ICMP error about the socket's traffic as a
``struct sock_extended_err`` ancillary message followed by the offender's address, readable
with ``MSG_ERRQUEUE``: no raw socket and no parsing of quoted headers is needed. The same queue
carries the kernel's transmit timestamps (``SO_TIMESTAMPING``), each named by its send's key.
"""

from __future__ import annotations

import socket
import struct
import sys
from dataclasses import dataclass

# Linux constants Python's socket module does not export everywhere.
IP_RECVERR: int = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR: int = getattr(socket, "IPV6_RECVERR", 25)
MSG_ERRQUEUE: int = getattr(socket, "MSG_ERRQUEUE", 0x2000)
ORIGIN_ICMP = 2  # SO_EE_ORIGIN_ICMP
ORIGIN_ICMP6 = 3  # SO_EE_ORIGIN_ICMP6
ORIGIN_TIMESTAMPING = 4  # SO_EE_ORIGIN_TIMESTAMPING
TSTAMP_SND = 0  # SCM_TSTAMP_SND: the driver took the packet

_EE = struct.Struct("=IBBBBII")  # struct sock_extended_err
_RECVERR = ((socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR))


@dataclass(frozen=True, slots=True)
class IcmpError:
    """One ICMP error the kernel matched to the socket's traffic."""

    errno: int
    origin: int  # ORIGIN_ICMP or ORIGIN_ICMP6
    type: int
    code: int
    offender: str  # the address that sent the error; "" if unknown

    @property
    def time_exceeded(self) -> bool:
        """A router dropped the packet for its TTL (else: unreachable, from a router or the
        destination)."""
        return self.type == (3 if self.origin == ORIGIN_ICMP6 else 11)


def enable(sock: socket.socket, v6: bool) -> None:
    """Have the kernel queue the ICMP errors about this socket's packets."""
    if v6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)


def parse(level: int, ctype: int, data: bytes) -> IcmpError | None:
    """The ICMP error in one ancillary message, or None when it carries none (another
    message type, a local error, or too short)."""
    if (level, ctype) not in _RECVERR or len(data) < _EE.size:
        return None
    ee_errno, origin, itype, code, _pad, _info, _data = _EE.unpack_from(data)
    if origin not in (ORIGIN_ICMP, ORIGIN_ICMP6):
        return None
    return IcmpError(ee_errno, origin, itype, code, _address(data[_EE.size :]))


def tx_key(level: int, ctype: int, data: bytes) -> int | None:
    """The key (``SOF_TIMESTAMPING_OPT_ID``) of the sent packet whose transmit timestamp this
    ancillary message announces, or None when it announces something else."""
    if (level, ctype) not in _RECVERR or len(data) < _EE.size:
        return None
    _errno, origin, _type, _code, _pad, info, key = _EE.unpack_from(data)
    return int(key) if origin == ORIGIN_TIMESTAMPING and info == TSTAMP_SND else None


def _address(raw: bytes) -> str:
    """The address in a ``sockaddr_in`` / ``sockaddr_in6`` as the kernel wrote it."""
    if len(raw) < 2:
        return ""
    family = int.from_bytes(raw[:2], sys.byteorder)  # sa_family_t, host byte order
    try:
        if family == socket.AF_INET6 and len(raw) >= 24:
            return socket.inet_ntop(socket.AF_INET6, raw[8:24])
        if family == socket.AF_INET and len(raw) >= 8:
            return socket.inet_ntop(socket.AF_INET, raw[4:8])
    except (OSError, ValueError):
        pass
    return ""
