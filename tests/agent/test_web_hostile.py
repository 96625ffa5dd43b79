"""The agent's web server against hostile clients: held idle and slowloris connections under a
low RLIMIT_NOFILE, SIGHUP during start-up, malformed requests. The agent runs as a child
process (`python -m agent run`); every connection is on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import agent_process, wait_ready

HEADER_TIMEOUT = 2.0


def nofile(n: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    return apply


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(url: str) -> Samples:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s,
        s.get(url + "/metrics") as r,
    ):
        assert r.status == 200
        text = await r.text()
    return {
        (m.name, tuple(sorted(m.labels.items()))): m.value
        for f in text_string_to_metric_families(text)
        for m in f.samples
    }


def total(m: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lbl), v in m.items() if n == name and want <= set(lbl))


@contextlib.asynccontextmanager
async def tcp_target() -> AsyncIterator[int]:
    """A loopback TCP server that accepts and closes: the TCP probe's target."""

    async def handle(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


@dataclass
class Held:
    sock: socket.socket
    opened: float
    closed: float | None = None


def open_held(url: str, n: int) -> list[Held]:
    host, port = url.removeprefix("http://").split(":")
    out = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(2.0)
        try:
            s.connect((host, int(port)))
        except OSError:
            s.close()
            continue
        s.setblocking(False)
        out.append(Held(s, time.monotonic()))
    return out


def poll_closed(held: list[Held]) -> None:
    """Mark the connections the agent has closed (EOF or reset)."""
    for h in held:
        if h.closed is not None:
            continue
        try:
            data = h.sock.recv(4096)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if not data:
            h.closed = time.monotonic()


def trickle(held: list[Held], first: bool) -> None:
    """One step of slowloris: the request line once, then one header line a step, never the
    blank line that ends the header."""
    for h in held:
        if h.closed is None:
            with contextlib.suppress(OSError):
                h.sock.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n" if first else b"X-a: b\r\n")


TCP_CONFIG = """agent: {{region: test}}
targets:
  - name: t1
    address: 127.0.0.1
    probes:
      tcp: {{port: {port}, interval: 200ms, timeout: 150ms}}
"""


async def test_held_connections_leave_scrapes_and_probes_alone(tmp_path: Path) -> None:
    """RLIMIT_NOFILE 64 and 30 idle (kept alive after a request) + 30 slowloris connections
    held against the agent: every scrape succeeds, the TCP probe never fails (no EMFILE), and
    the agent closes each slowloris connection, by eviction or at the header timeout."""
    n = 30
    async with tcp_target() as port:
        with agent_process(
            tmp_path,
            TCP_CONFIG.format(port=port),
            (f"--web.read-header-timeout={HEADER_TIMEOUT}s", "--web.idle-timeout=60s"),
            preexec=nofile(64),
        ) as c:
            await wait_ready(c)
            before = await scrape(c.url)
            idle = open_held(c.url, n)
            for h in idle:
                h.sock.send(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
            slow = open_held(c.url, n)
            scrapes = ok = 0
            trickle(slow, first=True)
            t_end = time.monotonic() + 3 * HEADER_TIMEOUT + 2
            while time.monotonic() < t_end:
                await asyncio.sleep(0.5)
                trickle(slow, first=False)
                poll_closed(idle + slow)
                scrapes += 1
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, AssertionError):
                    after = await scrape(c.url)
                    ok += 1
            poll_closed(idle + slow)
            lifetimes = sorted(h.closed - h.opened for h in slow if h.closed is not None)
            cap = re.search(r"msg=listening .*max_connections=(\d+)", c.text())
            print(
                f"web connection cap {cap and cap[1]}; scrapes {ok}/{scrapes}; slowloris "
                f"closed {len(lifetimes)}/{len(slow)} after {lifetimes[:1]}..{lifetimes[-1:]}"
                f" s; idle closed {sum(h.closed is not None for h in idle)}/{len(idle)}"
            )
            for h in idle + slow:
                h.sock.close()
            assert c.proc.poll() is None, c.text()
    log = c.text()
    assert ok == scrapes, f"{scrapes - ok} of {scrapes} scrapes failed\n{log}"
    runs = total(after, "edgeprobe_probe_duration_seconds_count", edge="t1") - total(
        before, "edgeprobe_probe_duration_seconds_count", edge="t1"
    )
    print(
        f"TCP probe runs while held: {runs:g}, errors "
        f"{total(after, 'edgeprobe_probe_errors_total', edge='t1'):g}"
    )
    assert runs >= 10
    assert total(after, "edgeprobe_probe_errors_total", edge="t1") == 0, log
    assert total(after, "edgeprobe_probe_exceptions_total") == 0, log
    assert "Too many open files" not in log and "EMFILE" not in log, log
    assert len(lifetimes) == len(slow), "slowloris connections left open"
    assert lifetimes[-1] < 3 * HEADER_TIMEOUT + 2


async def test_header_and_idle_timeouts(tmp_path: Path) -> None:
    """No limit in play: a connection that sends nothing, one that trickles a header, and a
    kept-alive one that starts a header it never ends are closed once the header timeout has
    passed, not before; a kept-alive connection idle after its request is closed once the
    idle timeout has passed, not before."""
    idle_timeout = 4.0
    with agent_process(
        tmp_path,
        SMALL_CONFIG,
        (f"--web.read-header-timeout={HEADER_TIMEOUT}s", f"--web.idle-timeout={idle_timeout}s"),
    ) as c:
        await wait_ready(c)
        silent, slow, idle, partial = (open_held(c.url, 1)[0] for _ in range(4))
        conns = {
            "silent": silent,
            "slowloris": slow,
            "kept-alive, idle": idle,
            "kept-alive, then a partial header": partial,
        }
        for h in (idle, partial):
            h.sock.send(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
        trickle([slow], first=True)
        partial_sent = False
        t_end = time.monotonic() + idle_timeout + 3 * HEADER_TIMEOUT
        while time.monotonic() < t_end and any(h.closed is None for h in conns.values()):
            await asyncio.sleep(0.1)
            trickle([slow], first=False)
            if not partial_sent and time.monotonic() - partial.opened >= 1.0:
                partial.sock.send(b"GET / HTTP/1.1\r\n")
                partial.opened = time.monotonic()  # its header timeout starts now
                partial_sent = True
            poll_closed(list(conns.values()))  # also drains the answers to the requests
        for h in conns.values():
            h.sock.close()
        life = {
            k: None if h.closed is None else round(h.closed - h.opened, 2) for k, h in conns.items()
        }
        print("lifetimes (s):", life)
        assert c.proc.poll() is None
    for name in ("silent", "slowloris", "kept-alive, then a partial header"):
        v = life[name]
        assert v is not None and HEADER_TIMEOUT - 0.1 <= v < 3 * HEADER_TIMEOUT, (name, v)
    v = life["kept-alive, idle"]
    assert v is not None and idle_timeout - 0.1 <= v < idle_timeout + 2 * HEADER_TIMEOUT, v


async def test_tls_handshake_counts_against_the_header_timeout(tmp_path: Path) -> None:
    """With TLS: a client that never sends its ClientHello, and one that completes the
    handshake and then sends half a header, are closed once the header timeout has passed;
    a scrape over TLS still works."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    (tmp_path / "web.yml").write_text(
        "tls_server_config: {cert_file: tls.crt, key_file: tls.key}\n"
    )
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with agent_process(
        tmp_path,
        SMALL_CONFIG,
        (
            f"--web.read-header-timeout={HEADER_TIMEOUT}s",
            f"--web.config.file={tmp_path / 'web.yml'}",
        ),
    ) as c:
        url = c.url.replace("http:", "https:")
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
            while True:
                assert c.proc.poll() is None and time.monotonic() < deadline, c.text()
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with s.get(url + "/metrics", ssl=ctx) as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.1)
        host, port = c.url.removeprefix("http://").split(":")
        silent = open_held(c.url, 1)[0]
        half = Held(socket.socket(), time.monotonic())  # the deadline runs from accept
        r, w = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname="127.0.0.1")
        w.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError, ssl.SSLError):
            await asyncio.wait_for(r.read(), 3 * HEADER_TIMEOUT)
        half.closed = time.monotonic()
        half.sock.close()
        w.close()
        t_end = time.monotonic() + 3 * HEADER_TIMEOUT
        while silent.closed is None and time.monotonic() < t_end:
            await asyncio.sleep(0.1)
            poll_closed([silent])
        silent.sock.close()
    life = {
        k: None if h.closed is None else round(h.closed - h.opened, 2)
        for k, h in (("no ClientHello", silent), ("half a header", half))
    }
    print("TLS lifetimes (s):", life)
    for k, v in life.items():
        assert v is not None and HEADER_TIMEOUT - 0.1 <= v < 3 * HEADER_TIMEOUT, (k, v)


SMALL_CONFIG = """agent: {region: test}
targets:
  - name: lo
    address: 127.0.0.1
    probes:
      tcp: {port: 9, interval: 1s, timeout: 200ms}
"""


async def test_sighup_from_spawn_is_never_a_death(tmp_path: Path) -> None:
    """SIGHUP every 5 ms from the moment the agent's own code starts importing until it
    serves, and a little beyond: it survives, serves, and reloads."""
    with agent_process(tmp_path, SMALL_CONFIG) as c:
        maps = Path(f"/proc/{c.proc.pid}/maps")
        sent = 0
        deadline = time.monotonic() + 20
        # Before the agent's own code runs (the interpreter's own start-up) nothing can catch a
        # signal; the agent's first import is uvloop's extension.
        while time.monotonic() < deadline and c.proc.poll() is None:
            with contextlib.suppress(OSError):
                if "uvloop" in maps.read_text():
                    break
            await asyncio.sleep(0.001)
        ready_at: float | None = None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as s:
            while time.monotonic() < deadline and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGHUP)
                sent += 1
                await asyncio.sleep(0.005)
                if ready_at is None and sent % 10 == 0:
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                        async with s.get(c.url + "/-/ready") as r:
                            if r.status == 200:
                                ready_at = time.monotonic()
                if ready_at is not None and time.monotonic() > ready_at + 0.5:
                    break
        assert c.proc.poll() is None, (
            f"agent died ({c.proc.returncode}) after {sent} SIGHUPs:\n{c.text()}"
        )
        await wait_ready(c)
        m = await scrape(c.url)
        assert total(m, "edgeprobe_config_last_reload_successful") == 1
        await asyncio.sleep(0.5)
    assert "config reloaded" in c.text()


MALFORMED = [
    b"GET / HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32) + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Long: " + b"a" * 20000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n",
]


async def test_malformed_requests_log_no_error(tmp_path: Path) -> None:
    """Malformed requests are answered 4xx (or closed) and logged at debug, one line each:
    no ERROR line and no traceback at any level."""
    with agent_process(tmp_path, SMALL_CONFIG, ("--log.level=debug",)) as c:
        await wait_ready(c)
        host, port = c.url.removeprefix("http://").split(":")
        for raw in MALFORMED:
            r, w = await asyncio.open_connection(host, int(port))
            w.write(raw)
            await w.drain()
            with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
                await asyncio.wait_for(r.read(), 5)
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()
        await wait_ready(c)
    log = c.text()
    assert not re.search(r"level=error|Traceback", log), log
    assert "malformed HTTP request" in log, log


async def test_sighup_bursts_are_deferred_and_coalesced() -> None:
    """Unit: SIGHUPs before start-up make one reload once started; a burst during a reload
    makes one more reload after it; none after close."""
    from agent.cli import HupReloads

    class FakeAgent:
        def __init__(self) -> None:
            self.reloads = 0
            self.gate = asyncio.Event()

        async def reload(self) -> tuple[bool, str]:
            self.reloads += 1
            await self.gate.wait()
            self.gate.clear()
            return True, ""

    hups, agent = HupReloads(), FakeAgent()
    for _ in range(5):
        hups.request()
    hups.start(agent)
    await asyncio.sleep(0)
    assert agent.reloads == 1
    for _ in range(100):
        hups.request()
    agent.gate.set()
    await asyncio.sleep(0.01)
    assert agent.reloads == 2
    agent.gate.set()
    await asyncio.sleep(0.01)
    assert agent.reloads == 2 and hups.task is None
    hups.request()
    await asyncio.sleep(0)
    agent.gate.set()
    await hups.close(1.0)
    hups.request()
    await asyncio.sleep(0.01)
    assert agent.reloads == 3 and hups.task is None


def test_probe_fd_reserve_by_kind(tmp_path: Path) -> None:
    """Unit: the reserve counts one socket per run, none for ICMP (shared sockets), three for
    connect, packets x max_hops for path, and three per /probe request in flight."""
    from types import SimpleNamespace

    from agent.config import load as cfgmod
    from agent.server.http import ProbeFdReserve

    p = tmp_path / "e.yml"
    p.write_text("""agent: {region: test}
targets:
  - name: a
    address: 127.0.0.1
    probes:
      icmp: {}
      tcp: {port: 9}
      dns: {query_name: a.test, server: 127.0.0.1}
      path: {interval: 30s, packets: 2, max_hops: 8}
""")
    cfg = cfgmod.load(p)
    agent = SimpleNamespace(config=cfg, probe_endpoint=None)
    reserve = ProbeFdReserve(agent)  # type: ignore[arg-type]
    assert reserve() == 0 + 1 + 1 + 2 * 8
    agent.probe_endpoint = SimpleNamespace(cfg=SimpleNamespace(max_concurrent=4))
    assert reserve() == 18 + 3 * 4


def test_server_log_demotes_only_malformed_requests(caplog: pytest.LogCaptureFixture) -> None:
    """Unit: aiohttp's report of a malformed request is one debug line without a traceback;
    any other exception it reports (a bug in a handler) stays an ERROR with its traceback."""
    import logging

    from aiohttp.http_exceptions import BadHttpMessage

    from agent.server.http import _ServerLog

    adapter = _ServerLog(logging.getLogger("aiohttp.server"), {})
    with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
        adapter.exception("Error handling request from %s", "x", exc_info=BadHttpMessage("m"))
        adapter.debug("Error handling request from %s", "x", exc_info=BadHttpMessage("m"))
        adapter.exception("Error handling request from %s", "x", exc_info=RuntimeError("bug"))
    got = [(r.levelno, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert got == [
        (logging.DEBUG, "malformed HTTP request", False),
        (logging.DEBUG, "malformed HTTP request", False),
        (logging.ERROR, "Error handling request from x", True),
    ]
