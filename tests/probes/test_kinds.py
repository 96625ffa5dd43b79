"""Every RTC probe kind against the real lab servers on loopback: passes, and fails with the
right bounded reason against closed ports, silent hosts, wrong certificates and wrong answers.

Only loopback addresses are used (127.0.0.x with a per-run x, and ::1); the servers are the
real ones (coturn, dnsmasq, TLS/HTTP servers) started by ``lab.services`` in a child process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.services import ServicesProcess
from probes import PROBES, connect, dns, http, icmp, path, relay, stun, tcp, tls, turn, udp, webrtc
from probes.base import ProbeContext, ProbeResult, Target
from probes.net.icmp import IcmpEngines
from probes.net.sockets import Endpoint, ProbeFailed, make_socket
from tests.helpers import out_of_fds

pytestmark = pytest.mark.skipif(
    not (Path("/usr/sbin/dnsmasq").exists() and Path("/usr/bin/turnserver").exists()),
    reason="dnsmasq and coturn are installed by scripts/bootstrap.sh",
)

ADDR = f"127.0.{os.getpid() % 200 + 20}.{os.getpid() % 250 + 2}"
NAME = "edge.lab.test"


def _free_port(host: str) -> int:
    """A port free for both TCP and UDP on ``host`` (bounded attempts)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(fam, socket.SOCK_STREAM) as t:
            t.bind((host, 0))
            port = int(t.getsockname()[1])
            try:
                with socket.socket(fam, socket.SOCK_DGRAM) as u:
                    u.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


class Recorder:
    """ProbeContext counters that remember every stray/malformed count."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def stray(self, probe: str, reason: str, n: int = 1) -> None:
        self.counts[(probe, reason)] = self.counts.get((probe, reason), 0) + n


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    names = [
        "tcp",
        "tls",
        "tls_wrong_name",
        "tls_expired",
        "tcp_silent",
        "http",
        "https",
        "udp_echo",
        "dns",
        "turn",
        "closed",
        "udp_silent",
        "tls6",
        "udp6",
    ]
    ports = {n: _free_port(ADDR) for n in names}
    ports["tls6"] = _free_port("::1")
    ports["udp6"] = _free_port("::1")
    state = tmp_path_factory.mktemp("services")
    cfg = {
        "state_dir": str(state),
        "tcp": [f"{ADDR}:{ports['tcp']}"],
        "tls": [f"{ADDR}:{ports['tls']}", f"[::1]:{ports['tls6']}"],
        "tls_wrong_name": [f"{ADDR}:{ports['tls_wrong_name']}"],
        "tls_expired": [f"{ADDR}:{ports['tls_expired']}"],
        "tcp_silent": [f"{ADDR}:{ports['tcp_silent']}"],
        "http": [f"{ADDR}:{ports['http']}"],
        "https": [f"{ADDR}:{ports['https']}"],
        "udp_echo": [f"{ADDR}:{ports['udp_echo']}", f"[::1]:{ports['udp6']}"],
        "dns": {"listen": [ADDR], "port": ports["dns"], "records": {NAME: [ADDR]}},
        "turn": {
            "listen": [ADDR],
            "port": ports["turn"],
            "realm": "lab.test",
            "users": {"probe": "s3cret-lab"},
        },
    }
    # A UDP socket that swallows datagrams: a silent host for the UDP kinds.
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind((ADDR, ports["udp_silent"]))
    with ServicesProcess(cfg) as s:
        yield {"ports": ports, "ca": str(s.ca_file), "state": state}
    silent.close()


def t(addr: str = ADDR) -> Target:
    return Target("e1", addr)


def ctx() -> ProbeContext:
    return ProbeContext(counters=Recorder())


def assert_valid(kind: str, res: ProbeResult) -> None:
    """A result honours the contract: declared reason and gauges, phases declared."""
    k = PROBES[kind]
    assert res.reason == "ok" or res.reason in k.all_reasons, res.reason
    assert set(res.gauges) <= set(k.gauges), res.gauges
    assert set(res.errors) <= set(k.all_reasons), res.errors
    if k.phases:
        assert set(res.phases) <= set(k.phases), res.phases


# -- options ---------------------------------------------------------------------------------


def test_default_options_are_valid_and_kinds_registered() -> None:
    for name in ("tcp", "tls", "http", "dns", "udp", "stun", "turn", "path", "connect"):
        k = PROBES[name]
        opts = k.options()
        errs = opts.validate()
        # Only the fields that must be set by the operator may complain with defaults.
        assert all(e.split(":")[0] in ("query_name", "username") for e in errs), (name, errs)
        assert k.all_reasons and len(set(k.all_reasons)) == len(k.all_reasons)
    assert PROBES["connect"].metric_prefix == "connect"
    assert PROBES["connect"].phases == ("dns", "tcp", "tls", "stun", "turn")
    assert PROBES["udp"].packet_based and PROBES["stun"].packet_based


def test_options_validation_messages() -> None:
    assert "port: must be between 1 and 65535" in tcp.TcpOptions(port=0).validate()
    assert any(
        e.startswith("source_address:") for e in tcp.TcpOptions(source_address="nope").validate()
    )
    assert any(
        e.startswith("source_address:")
        for e in tcp.TcpOptions(source_address="::1", ip_family="ipv4").validate()
    )
    assert any(e.startswith("max_hops:") for e in path.PathOptions(max_hops=99).validate())
    assert any(
        e.startswith("record_type:")
        for e in dns.DnsOptions(query_name="x", record_type="NOPE").validate()
    )
    assert any(
        e.startswith("password:")
        for e in turn.TurnOptions(username="u", password="p", password_file="/f").validate()
    )
    assert any(
        e.startswith("dns_server:")
        for e in connect.ConnectOptions(dns_server="dns.example.net").validate()
    )


def test_options_decode_strictly_from_yaml() -> None:
    decode = pytest.importorskip("agent.config.decode")
    node = decode.compose(
        "port: 8443\nserver_name: edge.lab.test\nalpn: [h2]\ntimeout: 500ms\ndscp: EF\n"
    )
    opts = decode.decode_dataclass(tls.TlsOptions, node)
    assert opts.port == 8443 and opts.alpn == ("h2",) and opts.timeout == 0.5
    assert opts.tos == 46 << 2
    node = decode.compose("expect_status: [200, 204]\nscheme: http\n")
    assert decode.decode_dataclass(http.HttpOptions, node).expect_status == (200, 204)


def test_turn_password_never_in_repr() -> None:
    o = turn.TurnOptions(username="u", password="hunter2-secret")
    c = connect.ConnectOptions(username="u", password="hunter2-secret")
    assert "hunter2" not in repr(o) and "hunter2" not in repr(c)


def test_dscp_and_source_address_on_sockets() -> None:
    ep = Endpoint(socket.AF_INET, "127.0.0.1")
    s = make_socket(ep, socket.SOCK_DGRAM, tcp.TcpOptions(dscp="EF", source_address="127.0.0.1"))
    try:
        assert s.getsockopt(socket.IPPROTO_IP, socket.IP_TOS) == 46 << 2
        assert s.getsockname()[0] == "127.0.0.1"
    finally:
        s.close()
    ep6 = Endpoint(socket.AF_INET6, "::1")
    s = make_socket(ep6, socket.SOCK_STREAM, tcp.TcpOptions(dscp="AF41"))
    try:
        assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS) == 34 << 2
    finally:
        s.close()
    # TEST-NET-1 is never local: the bind fails before any packet is sent.
    with pytest.raises(ProbeFailed) as e:
        make_socket(ep, socket.SOCK_DGRAM, tcp.TcpOptions(source_address="192.0.2.1"))
    assert e.value.reason == "source_bind_failed"


# -- tcp -----------------------------------------------------------------------------------


async def test_tcp_ok_refused_timeout(lab: dict[str, Any]) -> None:
    p = lab["ports"]
    res = await tcp.run(t(), tcp.TcpOptions(port=p["tcp"], dscp="EF"), ctx())
    assert res.success and 0 < res.phases["connect"] < 0.1
    assert_valid("tcp", res)
    res = await tcp.run(t(), tcp.TcpOptions(port=p["closed"]), ctx())
    assert (res.success, res.reason) == (False, "tcp_refused")
    # A silent host: a listener whose accept queue is full drops further SYNs.
    lst = socket.socket()
    lst.bind((ADDR, 0))
    lst.listen(0)
    fillers = []
    try:
        for _ in range(3):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(lst.getsockname())
            fillers.append(f)
        await asyncio.sleep(0.05)
        res = await tcp.run(t(), tcp.TcpOptions(port=lst.getsockname()[1], timeout=0.3), ctx())
        assert (res.success, res.reason) == (False, "tcp_timeout")
        assert 0.3 <= res.duration < 0.6
    finally:
        for f in fillers:
            f.close()
        lst.close()


async def test_tcp_ipv6_and_resolution_failures(lab: dict[str, Any]) -> None:
    res = await tcp.run(t("::1"), tcp.TcpOptions(port=lab["ports"]["tls6"]), ctx())
    assert res.success and res.info["ip_family"] == "ipv6"
    res = await tcp.run(t("::1"), tcp.TcpOptions(port=1, ip_family="ipv4"), ctx())
    assert res.reason == "resolve_empty"
    res = await tcp.run(t("does-not-exist.invalid"), tcp.TcpOptions(port=1), ctx())
    assert res.reason in ("resolve_failed", "resolve_empty")


# -- tls -----------------------------------------------------------------------------------


async def test_tls_ok_and_certificate_failures(lab: dict[str, Any]) -> None:
    p, ca = lab["ports"], lab["ca"]
    res = await tls.run(t(), tls.TlsOptions(port=p["tls"], server_name=NAME, ca_file=ca), ctx())
    assert res.success, res.reason
    assert res.info["tls_version"] == "TLS1.3"
    assert res.gauges["tls_cert_not_after_seconds"] > time.time()
    assert set(res.phases) == {"connect", "tls"}
    assert_valid("tls", res)
    res = await tls.run(
        t("::1"), tls.TlsOptions(port=p["tls6"], server_name=NAME, ca_file=ca), ctx()
    )
    assert res.success, res.reason
    cases = [
        (tls.TlsOptions(port=p["tls"], server_name=NAME), "tls_cert_untrusted"),
        (
            tls.TlsOptions(port=p["tls_wrong_name"], server_name=NAME, ca_file=ca),
            "tls_cert_hostname",
        ),
        (tls.TlsOptions(port=p["tls_expired"], server_name=NAME, ca_file=ca), "tls_cert_expired"),
        (
            tls.TlsOptions(port=p["tcp_silent"], server_name=NAME, ca_file=ca, timeout=0.3),
            "tls_timeout",
        ),
        (tls.TlsOptions(port=p["closed"], server_name=NAME, ca_file=ca), "tcp_refused"),
        (tls.TlsOptions(port=p["tcp"], server_name=NAME, ca_file=ca), "tls_reset"),
    ]
    for opts, want in cases:
        res = await tls.run(t(), opts, ctx())
        assert (res.success, res.reason) == (False, want) or (
            want == "tls_reset" and res.reason == "tls_handshake_failed"
        ), (opts, res.reason)
        assert_valid("tls", res)
    # insecure_skip_verify still reports the expiry (parsed from the DER certificate).
    res = await tls.run(
        t(), tls.TlsOptions(port=p["tls_expired"], insecure_skip_verify=True), ctx()
    )
    assert res.success and res.gauges["tls_cert_not_after_seconds"] < time.time()


# -- http ----------------------------------------------------------------------------------


async def test_http_phases_and_failures(lab: dict[str, Any]) -> None:
    p, ca = lab["ports"], lab["ca"]
    res = await http.run(
        t(),
        http.HttpOptions(
            port=p["https"], server_name=NAME, ca_file=ca, expect_body="edgeprobe lab"
        ),
        ctx(),
    )
    assert res.success, res.reason
    assert {"resolve", "connect", "tls", "ttfb", "transfer"} <= set(res.phases)
    assert res.gauges["http_status_code"] == 200
    assert_valid("http", res)
    plain = http.HttpOptions(scheme="http", port=p["http"], timeout=0.5)
    res = await http.run(t(), plain, ctx())
    assert res.success and "tls" not in res.phases
    cases = [
        (dataclasses.replace(plain, path="/status/503"), "http_status"),
        (dataclasses.replace(plain, path="/status/404", expect_status=(404,)), "ok"),
        (dataclasses.replace(plain, expect_body="something else"), "http_body_mismatch"),
        (dataclasses.replace(plain, max_body_bytes=4), "http_body_too_large"),
        (dataclasses.replace(plain, path="/slow"), "http_timeout"),
        (dataclasses.replace(plain, port=p["tcp_silent"]), "http_timeout"),
        (dataclasses.replace(plain, port=p["closed"]), "tcp_refused"),
        (http.HttpOptions(port=p["https"], server_name=NAME), "tls_cert_untrusted"),
        (
            http.HttpOptions(port=p["tls_wrong_name"], server_name=NAME, ca_file=ca),
            "tls_cert_hostname",
        ),
    ]
    for opts, want in cases:
        res = await http.run(t(), opts, ctx())
        assert res.reason == want, (opts, res)
        assert_valid("http", res)


# -- dns -----------------------------------------------------------------------------------


async def test_dns_against_dnsmasq(lab: dict[str, Any]) -> None:
    p = lab["ports"]
    ok = dns.DnsOptions(port=p["dns"], query_name=NAME, expect_answer=(ADDR,))
    res = await dns.run(t(), ok, ctx())
    assert res.success and res.info["rcode"] == "NOERROR", res
    assert_valid("dns", res)
    cases = [
        (dataclasses.replace(ok, expect_answer=("127.0.0.99",)), "dns_answer_mismatch"),
        (dataclasses.replace(ok, query_name="missing.lab.test", expect_answer=()), "dns_rcode"),
        (dataclasses.replace(ok, port=p["closed"]), "dns_refused"),
        (dataclasses.replace(ok, port=p["udp_silent"], timeout=0.3), "dns_timeout"),
    ]
    for opts, want in cases:
        res = await dns.run(t(), opts, ctx())
        assert (res.success, res.reason) == (False, want), (opts, res)
        assert_valid("dns", res)
    res = await dns.run(
        t(),
        dataclasses.replace(
            ok, query_name="missing.lab.test", expect_answer=(), expect_rcode="NXDOMAIN"
        ),
        ctx(),
    )
    assert res.success and res.info["rcode"] == "NXDOMAIN"


# -- udp / stun ----------------------------------------------------------------------------


async def test_udp_echo(lab: dict[str, Any]) -> None:
    p = lab["ports"]
    res = await udp.run(t(), udp.UdpOptions(port=p["udp_echo"], packets=10, spacing=0.005), ctx())
    assert res.success and len(res.rtts) == 10 and all(r is not None for r in res.rtts)
    assert res.packet_ids == list(range(10))
    assert_valid("udp", res)
    res = await udp.run(t("::1"), udp.UdpOptions(port=p["udp6"], packets=3), ctx())
    assert res.success
    res = await udp.run(t(), udp.UdpOptions(port=p["udp_silent"], packets=3, timeout=0.2), ctx())
    assert (res.reason, res.rtts) == ("udp_timeout", [None] * 3)
    res = await udp.run(t(), udp.UdpOptions(port=p["closed"], packets=2, timeout=0.2), ctx())
    assert res.reason == "udp_refused"


async def test_stun_binding_train_against_coturn(lab: dict[str, Any]) -> None:
    p = lab["ports"]
    c = ctx()
    res = await stun.run(t(), stun.StunOptions(port=p["turn"], packets=20, spacing=0.002), c)
    assert res.success and all(r is not None for r in res.rtts), res
    assert res.info["mapped_family"] == "ipv4"
    assert_valid("stun", res)
    assert not c.counters.counts  # type: ignore[attr-defined]
    res = await stun.run(t(), stun.StunOptions(port=p["udp_silent"], packets=3, timeout=0.2), ctx())
    assert (res.reason, res.rtts) == ("stun_timeout", [None] * 3)
    res = await stun.run(t(), stun.StunOptions(port=p["closed"], packets=2, timeout=0.2), ctx())
    assert res.reason == "stun_refused"


async def test_stun_at_most_ten_in_flight(lab: dict[str, Any]) -> None:
    # 25 requests into a silent socket: without replies only 10 may be outstanding, so the
    # 11th waits for the 1st to time out (0.2 s) and the run takes >= 2 timeouts.
    p = lab["ports"]
    t0 = time.monotonic()
    res = await stun.run(
        t(), stun.StunOptions(port=p["udp_silent"], packets=25, spacing=0.0, timeout=0.2), ctx()
    )
    took = time.monotonic() - t0
    assert res.rtts == [None] * 25
    assert took >= 0.2 * 3 - 0.05, took


# -- turn ----------------------------------------------------------------------------------


async def test_turn_allocate(
    lab: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = lab["ports"]
    pw = tmp_path / "turn.pass"
    pw.write_text("s3cret-lab\n")
    res = await turn.run(
        t(), turn.TurnOptions(port=p["turn"], username="probe", password_file=str(pw)), ctx()
    )
    assert res.success, res
    assert set(res.phases) == {"challenge", "allocate"}
    assert res.info["relayed_family"] == "ipv4"
    assert_valid("turn", res)
    cases = [
        (turn.TurnOptions(port=p["turn"], username="probe", password="wrong"), "turn_auth_failed"),
        (turn.TurnOptions(port=p["turn"], username="probe"), "turn_no_credentials"),
        (
            turn.TurnOptions(port=p["turn"], username="probe", password_file="/nonexistent/x"),
            "turn_credentials_unreadable",
        ),
        (
            turn.TurnOptions(port=p["udp_silent"], username="probe", password="x", timeout=0.2),
            "turn_timeout",
        ),
        (turn.TurnOptions(port=p["closed"], username="probe", password="x"), "turn_refused"),
    ]
    for opts, want in cases:
        res = await turn.run(t(), opts, ctx())
        assert (res.success, res.reason) == (False, want), (opts, res)
        assert "s3cret" not in repr(res)
    assert "s3cret" not in caplog.text


# -- path ----------------------------------------------------------------------------------


def test_error_queue_messages_parse_for_both_families() -> None:
    """The sock_extended_err + offender layout the icmp engine and the path kind both read."""
    import struct
    import sys

    from probes.net import errqueue

    def msg(origin: int, itype: int, family: int, addr: bytes) -> bytes:
        ee = struct.pack("=IBBBBII", 113, origin, itype, 0, 0, 0, 0)  # EHOSTUNREACH
        fam = family.to_bytes(2, sys.byteorder)
        if family == socket.AF_INET:
            return ee + fam + b"\0\0" + addr + bytes(8)
        return ee + fam + b"\0\0" + bytes(4) + addr + bytes(4)

    v4 = errqueue.parse(
        socket.IPPROTO_IP,
        errqueue.IP_RECVERR,
        msg(errqueue.ORIGIN_ICMP, 11, socket.AF_INET, bytes([192, 0, 2, 1])),
    )
    assert v4 is not None and v4.offender == "192.0.2.1" and v4.time_exceeded
    v6 = errqueue.parse(
        socket.IPPROTO_IPV6,
        errqueue.IPV6_RECVERR,
        msg(
            errqueue.ORIGIN_ICMP6,
            1,
            socket.AF_INET6,
            socket.inet_pton(socket.AF_INET6, "2001:db8::1"),
        ),
    )
    assert v6 is not None and v6.offender == "2001:db8::1" and not v6.time_exceeded
    assert v6.errno == 113
    # A local error (origin 1), another message type, or a short one: no ICMP error.
    assert (
        errqueue.parse(socket.IPPROTO_IP, errqueue.IP_RECVERR, msg(1, 0, socket.AF_INET, bytes(4)))
        is None
    )
    assert errqueue.parse(socket.SOL_SOCKET, 35, bytes(32)) is None
    assert errqueue.parse(socket.IPPROTO_IP, errqueue.IP_RECVERR, bytes(8)) is None


async def test_path_on_loopback() -> None:
    for addr in (ADDR, "::1"):
        res = await path.run(t(addr), path.PathOptions(max_hops=4, packets=2, timeout=0.5), ctx())
        assert res.success, res
        assert res.gauges["path_hops"] == 1
        assert res.hops is not None and len(res.hops) == 1
        assert res.hops[0].index == 1 and all(r is not None for r in res.hops[0].rtts)
        assert 0 <= res.gauges["path_route_hash"] < 2**52
        assert_valid("path", res)
    assert path.route_hash(["a", "b"]) != path.route_hash(["b", "a"])


# -- connect -------------------------------------------------------------------------------


def _connect_opts(lab: dict[str, Any], **kw: Any) -> connect.ConnectOptions:
    p = lab["ports"]
    base = connect.ConnectOptions(
        signalling_port=p["tls"],
        ca_file=lab["ca"],
        dns_server=ADDR,
        dns_port=p["dns"],
        stun_port=p["turn"],
        turn=True,
        username="probe",
        password="s3cret-lab",
        timeout=0.5,
    )
    return dataclasses.replace(base, **kw)


async def test_connect_full_sequence(lab: dict[str, Any]) -> None:
    res = await connect.run(t(NAME), _connect_opts(lab), ctx())
    assert res.success, res
    assert list(res.phases) == ["dns", "tcp", "tls", "stun", "turn"]
    assert res.duration >= sum(res.phases.values())
    assert res.gauges["connect_over_budget"] == 0
    assert res.info["tls_version"] == "TLS1.3" and res.info["mapped_family"] == "ipv4"
    assert_valid("connect", res)
    # IP literal: no dns phase.
    res = await connect.run(t(), _connect_opts(lab, server_name=NAME, turn=False), ctx())
    assert res.success and list(res.phases) == ["tcp", "tls", "stun"]


async def test_connect_failures_are_over_budget(lab: dict[str, Any]) -> None:
    p = lab["ports"]
    cases = [
        (
            _connect_opts(lab, stun_port=p["udp_silent"], timeout=0.2),
            "stun_timeout",
            ["dns", "tcp", "tls"],
        ),
        (
            _connect_opts(lab, signalling_port=p["tcp_silent"], timeout=0.2),
            "tls_timeout",
            ["dns", "tcp"],
        ),
        (_connect_opts(lab, signalling_port=p["closed"]), "tcp_refused", ["dns"]),
        (_connect_opts(lab, dns_port=p["udp_silent"], timeout=0.2), "dns_timeout", []),
        (_connect_opts(lab, password="wrong"), "turn_auth_failed", ["dns", "tcp", "tls", "stun"]),
    ]
    for opts, want, phases in cases:
        res = await connect.run(t(NAME), opts, ctx())
        assert (res.success, res.reason) == (False, want), res
        assert math.isinf(res.duration) and res.gauges["connect_over_budget"] == 1
        assert list(res.phases) == phases
        assert_valid("connect", res)


# -- out of file descriptors ---------------------------------------------------------------


async def test_every_kind_reports_socket_exhausted_and_recovers(lab: dict[str, Any]) -> None:
    """With the process out of descriptors, every kind returns ``socket_exhausted`` (a bounded
    reason it declares) instead of raising; with descriptors free again, the same runs work."""
    p, ca = lab["ports"], lab["ca"]
    icmp_ctx = ProbeContext.with_resources(IcmpEngines(mode="privileged"), counters=Recorder())
    turn_opts = turn.TurnOptions(port=p["turn"], username="probe", password="s3cret-lab")
    runs: dict[str, Callable[[], Awaitable[ProbeResult]]] = {
        # The ICMP engine opens its shared socket on first use: here, while out of fds.
        "icmp": lambda: icmp.run(t(), icmp.IcmpOptions(packets=2, timeout=0.5), icmp_ctx),
        "tcp": lambda: tcp.run(t(), tcp.TcpOptions(port=p["tcp"]), ctx()),
        "tls": lambda: tls.run(
            t(), tls.TlsOptions(port=p["tls"], server_name=NAME, ca_file=ca), ctx()
        ),
        "http": lambda: http.run(t(), http.HttpOptions(scheme="http", port=p["http"]), ctx()),
        "dns": lambda: dns.run(t(), dns.DnsOptions(port=p["dns"], query_name=NAME), ctx()),
        "udp": lambda: udp.run(t(), udp.UdpOptions(port=p["udp_echo"], packets=3), ctx()),
        "stun": lambda: stun.run(t(), stun.StunOptions(port=p["turn"], packets=2), ctx()),
        "turn": lambda: turn.run(t(), turn_opts, ctx()),
        "path": lambda: path.run(t(), path.PathOptions(max_hops=2, packets=1, timeout=0.5), ctx()),
        "connect": lambda: connect.run(t(NAME), _connect_opts(lab), ctx()),
        # Nothing listens on "closed": once it has sockets, the run ends at signalling.
        "webrtc": lambda: webrtc.run(
            t(), webrtc.WebrtcOptions(scheme="http", port=p["closed"], timeout=2.0), ctx()
        ),
        "relay": lambda: relay.run(
            t(),
            relay.RelayOptions(
                port=p["turn"], username="probe", password="s3cret-lab", packets=2, timeout=0.5
            ),
            ctx(),
        ),
    }
    assert set(runs) == set(PROBES)
    exhausted: dict[str, str] = {}
    with out_of_fds():
        for kind, run in runs.items():
            res = await run()
            exhausted[kind] = res.reason
            assert_valid(kind, res)
            assert not res.success
    assert exhausted == {k: "socket_exhausted" for k in runs}
    after = {kind: await run() for kind, run in runs.items()}
    try:
        assert {k: r.reason for k, r in after.items() if r.reason == "socket_exhausted"} == {}
        # Those with a server in the lab that answers them work again (the ICMP engine too).
        works = ("icmp", "tcp", "tls", "http", "dns", "udp", "stun", "turn", "path", "connect")
        assert {k: after[k].reason for k in works if not after[k].success} == {}
    finally:
        icmp_ctx.resources.close()
