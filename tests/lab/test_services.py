"""lab.services: READY protocol, real servers answering, listening only where told, and a clean
stop of every child process on SIGTERM. Loopback only."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import dns.message
import dns.query
import pytest
from aioice import stun

from lab.services import Services, split_hostport
from tests.helpers import ROOT

pytestmark = pytest.mark.skipif(
    not (Path("/usr/sbin/dnsmasq").exists() and Path("/usr/bin/turnserver").exists()),
    reason="dnsmasq and coturn are installed by scripts/bootstrap.sh",
)

ADDR = f"127.0.{os.getpid() % 200 + 20}.{(os.getpid() + 7) % 250 + 2}"


def _port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])


def _pids_alive(pids: list[int]) -> list[int]:
    return [
        p
        for p in pids
        if Path(f"/proc/{p}").exists()
        and "zombie" not in Path(f"/proc/{p}/status").read_text().lower()
    ]


def _listeners(port: int) -> set[str]:
    out = subprocess.run(
        ["ss", "-Hlun", f"sport = :{port}"], capture_output=True, text=True, check=False
    ).stdout
    return {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}


def test_split_hostport() -> None:
    assert split_hostport("127.0.0.1:80") == ("127.0.0.1", 80)
    assert split_hostport("[::1]:3478") == ("::1", 3478)
    with pytest.raises(ValueError):
        split_hostport("edge.example.net:80")


def test_cli_ready_serves_and_stops_children(tmp_path: Path) -> None:
    dport, tport, eport = _port(), _port(), _port()
    cfg = {
        "state_dir": str(tmp_path / "s"),
        "udp_echo": [f"[::1]:{eport}"],
        "dns": {
            "listen": [ADDR, "::1"],
            "port": dport,
            "records": {"edge.lab.test": [ADDR, "::1"]},
        },
        "turn": {"listen": [ADDR], "port": tport, "realm": "lab.test", "users": {"u": "p"}},
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.services", "--config", str(path)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"READY"
        # dnsmasq answers on both families and never forwards: unknown names are NXDOMAIN.
        for server in (ADDR, "::1"):
            r = dns.query.udp(
                dns.message.make_query("edge.lab.test", "AAAA"), server, port=dport, timeout=2
            )
            assert [x.to_text() for rr in r.answer for x in rr] == ["::1"]
        r = dns.query.udp(
            dns.message.make_query("other.lab.test", "A"), ADDR, port=dport, timeout=2
        )
        assert r.rcode() == 3
        # Listening only where told.
        assert _listeners(dport) == {ADDR, "[::1]"}
        assert _listeners(tport) == {ADDR}
        # The TURN password file is private.
        assert (tmp_path / "s" / "turnserver.conf").stat().st_mode & 0o077 == 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.sendto(bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST)), (ADDR, tport))
            assert stun.parse_message(s.recv(2048)).message_class == stun.Class.RESPONSE
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.sendto(b"ping", ("::1", eport))
            assert s.recv(100) == b"ping"
        children = [
            int((tmp_path / "s" / f).read_text().split()[0])
            for f in ("dnsmasq.pid", "turnserver.pid")
        ]
        assert len(_pids_alive(children)) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        if proc.stdout:
            proc.stdout.close()
    deadline = time.monotonic() + 5
    while _pids_alive(children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pids_alive(children) == []


async def test_in_process_tls_and_http(tmp_path: Path) -> None:
    tls_port, http_port = _port(), _port()
    cfg = {
        "state_dir": str(tmp_path),
        "tls": [f"{ADDR}:{tls_port}"],
        "https": [f"{ADDR}:{http_port}"],
    }
    async with Services(cfg) as s:
        ctx = ssl.create_default_context(cafile=str(s.ca_file))
        r, w = await asyncio.open_connection(
            ADDR, tls_port, ssl=ctx, server_hostname="edge.lab.test"
        )
        obj = w.get_extra_info("ssl_object")
        assert obj.version() == "TLSv1.3"
        w.close()
        r, w = await asyncio.open_connection(ADDR, http_port, ssl=ctx, server_hostname=ADDR)
        w.write(b"GET /status/418 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = await r.read()
        assert data.startswith(b"HTTP/1.1 418")
        w.close()
