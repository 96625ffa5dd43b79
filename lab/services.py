"""Edge services for the lab: the real servers an RTC edge runs, on addresses the caller gives.

``python -m lab.services --config FILE.json`` starts every configured service, prints ``READY``
once each one answers, and stops everything (child processes included) on SIGTERM/SIGINT.
The same is available in-process as ``async with Services(config) as s:`` and, in a child
process, as ``with ServicesProcess(config) as s:``.

Config keys (all optional except ``state_dir``)::

    {"state_dir": "/tmp/x",
     "tcp": ["127.0.0.2:7000"],                 # accept, then close
     "tcp_silent": ["127.0.0.2:7001"],          # accept, never answer (TLS/HTTP timeouts)
     "tls": ["127.0.0.2:7443"],                 # TLS 1.3, leaf from the lab CA (ca.pem)
     "tls_wrong_name": ["127.0.0.2:7444"],      # valid chain, name wrong.lab.test only
     "tls_expired": ["127.0.0.2:7445"],         # valid chain and names, expired
     "http": ["127.0.0.2:7080"], "https": ["127.0.0.2:7081"],   # both serve WHIP at /whip
     "udp_echo": ["127.0.0.2:7007"],
     "dns": {"listen": ["127.0.0.2"], "port": 7053,
             "records": {"edge.lab.test": ["127.0.0.2", "::1"]}},
     "turn": {"listen": ["127.0.0.2"], "port": 7478, "realm": "lab.test",
              "users": {"user": "pass"}}}

The TLS leaf covers ``edge.lab.test``, ``localhost``, every name in ``dns.records`` and every
listen address. dnsmasq never forwards (``--no-resolv``), and both dnsmasq and coturn listen
only on the addresses given. No service sends a packet anywhere it was not asked to.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from aiohttp import web

from agent.config.rules import split_host_port

LAB_NAME = "edge.lab.test"
HTTP_BODY = b"edgeprobe lab"


def split_hostport(s: str) -> tuple[str, int]:
    """``"127.0.0.1:80"`` or ``"[::1]:80"`` → (address, port)."""
    host, port = split_host_port(s)
    ipaddress.ip_address(host)
    if port is None:
        raise ValueError(f"{s!r}: no port")
    return host, port


def _family(addr: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


class _Echo(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)


def _http_app() -> web.Application:
    async def root(_: web.Request) -> web.Response:
        return web.Response(body=HTTP_BODY, content_type="text/plain")

    async def status(req: web.Request) -> web.Response:
        code = int(req.match_info["code"])
        if not 200 <= code <= 599:
            code = 400
        return web.Response(status=code, text=f"status {code}")

    async def slow(req: web.Request) -> web.StreamResponse:
        # Headers now, then the body one byte per `interval` seconds: a slow server that a
        # probe must time out on, never wait for (bounded by `bytes`).
        interval = min(float(req.query.get("interval", "0.5")), 5.0)
        count = min(int(req.query.get("bytes", "20")), 1000)
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.content_length = count
        await resp.prepare(req)
        try:
            for _ in range(count):
                await asyncio.sleep(interval)
                await resp.write(b".")
            await resp.write_eof()
        except ConnectionError:
            pass  # the client gave up: that is the point of this endpoint
        return resp

    app = web.Application()
    from lab.whip import WhipAnswerer  # the edge's WHIP endpoint (RTC signalling)

    WhipAnswerer().routes(app)
    app.router.add_get("/", root)
    app.router.add_get("/status/{code:\\d+}", status)
    app.router.add_get("/slow", slow)
    return app


class Services:
    """Starts and stops the configured services in the running event loop."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.state_dir = Path(config["state_dir"])
        self._servers: list[asyncio.AbstractServer] = []
        self._transports: list[asyncio.BaseTransport] = []
        self._runners: list[web.AppRunner] = []
        self._procs: list[asyncio.subprocess.Process] = []
        self._silent: list[socket.socket] = []
        self._silent_conns: set[asyncio.StreamWriter] = set()
        self.ca_file = self.state_dir / "ca.pem"

    # -- TLS material -----------------------------------------------------------------------
    def _names(self) -> list[str]:
        names = [LAB_NAME, "localhost"]
        names += list(self.config.get("dns", {}).get("records", {}))
        for key in ("tls", "tls_expired", "https"):
            names += [split_hostport(a)[0] for a in self.config.get(key, [])]
        return list(dict.fromkeys(names))

    def _make_tls(self) -> None:
        import trustme  # the lab's CA; a dev/lab dependency only

        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(self.ca_file))
        self._ctx_ok = self._server_ctx(ca.issue_cert(*self._names()))
        self._ctx_wrong = self._server_ctx(ca.issue_cert("wrong.lab.test"))
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
        self._ctx_expired = self._server_ctx(
            ca.issue_cert(
                *self._names(), not_before=past - datetime.timedelta(days=30), not_after=past
            )
        )

    @staticmethod
    def _server_ctx(leaf: Any) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        leaf.configure_cert(ctx)
        return ctx

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.config
        if any(cfg.get(k) for k in ("tls", "tls_wrong_name", "tls_expired", "https")):
            self._make_tls()
        for a in cfg.get("tcp", []):
            await self._tcp(a, self._close_conn, None)
        for a in cfg.get("tcp_silent", []):
            await self._tcp(a, self._hold_conn, None)
        for key, attr in (
            ("tls", "_ctx_ok"),
            ("tls_wrong_name", "_ctx_wrong"),
            ("tls_expired", "_ctx_expired"),
        ):
            for a in cfg.get(key, []):
                await self._tcp(a, self._tls_conn, getattr(self, attr))
        for key in ("http", "https"):
            for a in cfg.get(key, []):
                await self._http(a, self._ctx_ok if key == "https" else None)
        for a in cfg.get("udp_echo", []):
            host, port = split_hostport(a)
            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                _Echo, local_addr=(host, port), family=_family(host)
            )
            self._transports.append(transport)
        if cfg.get("dns"):
            await self._dnsmasq(cfg["dns"])
        if cfg.get("turn"):
            await self._coturn(cfg["turn"])

    async def stop(self) -> None:
        for w in list(self._silent_conns):
            w.transport.abort()
        for srv in self._servers:
            srv.close()
        for t in self._transports:
            t.close()
        for r in self._runners:
            await r.cleanup()
        for p in self._procs:
            if p.returncode is None:
                p.terminate()
                try:
                    async with asyncio.timeout(3):
                        await p.wait()
                except TimeoutError:
                    p.kill()
                    await p.wait()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await srv.wait_closed()
        self._servers.clear()
        self._procs.clear()

    async def __aenter__(self) -> Services:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- TCP family -----------------------------------------------------------------------------
    async def _tcp(self, addr: str, handler: Any, sslctx: ssl.SSLContext | None) -> None:
        host, port = split_hostport(addr)
        srv = await asyncio.start_server(
            handler,
            host,
            port,
            ssl=sslctx,
            reuse_address=True,
            ssl_handshake_timeout=5.0 if sslctx else None,
        )
        self._servers.append(srv)

    @staticmethod
    async def _close_conn(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    async def _hold_conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self._silent_conns.add(w)
        try:
            while await r.read(4096):
                pass  # swallow everything, answer nothing
        except OSError:
            pass
        finally:
            self._silent_conns.discard(w)
            w.close()

    @staticmethod
    async def _tls_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                await r.read(4096)
        except (OSError, TimeoutError, ssl.SSLError):
            pass
        w.close()

    async def _http(self, addr: str, sslctx: ssl.SSLContext | None) -> None:
        host, port = split_hostport(addr)
        runner = web.AppRunner(_http_app(), access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, host, port, ssl_context=sslctx, reuse_address=True).start()

    # -- child processes ----------------------------------------------------------------------
    async def _spawn(self, argv: list[str], name: str) -> asyncio.subprocess.Process:
        log = open(self.state_dir / f"{name}.out", "wb")  # noqa: SIM115, ASYNC230 - tiny, local
        try:
            p = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self._procs.append(p)
        return p

    async def _dnsmasq(self, dns: dict[str, Any]) -> None:
        port = int(dns.get("port", 53))
        argv = [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            f"--port={port}",
            "--user=root",
            "--group=root",
            "--cache-size=0",
            f"--pid-file={self.state_dir / 'dnsmasq.pid'}",
            f"--log-facility={self.state_dir / 'dnsmasq.log'}",
            "--log-queries",
        ]
        argv += [f"--listen-address={a}" for a in dns["listen"]]
        # Authoritative-style NXDOMAIN for unknown lab names instead of REFUSED.
        argv += [f"--local=/{d}/" for d in dns.get("local", ["lab.test"])]
        for name, addrs in dns.get("records", {}).items():
            for a in addrs:
                argv.append(f"--host-record={name},{a}")
        p = await self._spawn(argv, "dnsmasq")
        for a in dns["listen"]:
            await self._wait_udp(p, a, port, _dns_query(), "dnsmasq")

    async def _coturn(self, turn: dict[str, Any]) -> None:
        port = int(turn.get("port", 3478))
        conf = self.state_dir / "turnserver.conf"
        lines = [
            f"listening-port={port}",
            f"realm={turn.get('realm', 'lab.test')}",
            "lt-cred-mech",
            "fingerprint",
            "no-cli",
            "no-tls",
            "no-dtls",
            "allow-loopback-peers",
            "no-multicast-peers",
            "simple-log",
            "no-stdout-log",
            f"log-file={self.state_dir / 'turnserver.log'}",
            f"pidfile={self.state_dir / 'turnserver.pid'}",
            f"userdb={self.state_dir / 'turndb'}",
            f"min-port={int(turn.get('min_port', 49152))}",
            f"max-port={int(turn.get('max_port', 65535))}",
        ]
        for a in turn["listen"]:
            lines += [f"listening-ip={a}", f"relay-ip={a}"]
        for user, pw in turn.get("users", {}).items():
            lines.append(f"user={user}:{pw}")
        conf.write_text("\n".join(lines) + "\n")
        conf.chmod(0o600)  # it holds the lab's TURN passwords
        p = await self._spawn(["turnserver", "-c", str(conf)], "turnserver")
        for a in turn["listen"]:
            await self._wait_udp(p, a, port, _stun_binding(), "turnserver")

    @staticmethod
    async def _wait_udp(
        p: asyncio.subprocess.Process, host: str, port: int, query: bytes, name: str
    ) -> None:
        """Until the server answers ``query`` on (host, port); bounded to 10 s."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(_family(host), socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline:
                if p.returncode is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}")
                try:
                    sock.sendto(query, (host, port))
                    async with asyncio.timeout(0.2):
                        await loop.sock_recv(sock, 2048)
                    return
                except (TimeoutError, OSError):
                    await asyncio.sleep(0.05)
            raise RuntimeError(f"{name} did not answer on {host}:{port}")
        finally:
            sock.close()


def _dns_query() -> bytes:
    import dns.message

    return bytes(dns.message.make_query(LAB_NAME, "A").to_wire())


def _stun_binding() -> bytes:
    from aioice import stun

    return bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST))


class ServicesProcess:
    """The services in a child process (``python -m lab.services``), as a sync context."""

    def __init__(self, config: dict[str, Any], netns: str = "") -> None:
        self.config = config
        self.netns = netns
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServicesProcess:
        state = Path(self.config["state_dir"])
        state.mkdir(parents=True, exist_ok=True)
        cfg = state / "services.json"
        cfg.write_text(json.dumps(self.config))
        argv = [sys.executable, "-m", "lab.services", "--config", str(cfg)]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env, cwd=root)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # READY, or EOF when startup failed
        if line.strip() != b"READY":
            self.__exit__(None, None, None)
            raise RuntimeError(f"lab services failed to start (see {state})")
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    @property
    def ca_file(self) -> Path:
        return Path(self.config["state_dir"]) / "ca.pem"


async def _main(config: dict[str, Any]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Services(config):
        print("READY", flush=True)
        await stop.wait()


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.services", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="JSON file (see module docstring)")
    args = ap.parse_args(list(argv) if argv is not None else None)
    with open(args.config, encoding="utf-8") as f:
        config = json.load(f)
    asyncio.run(_main(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
