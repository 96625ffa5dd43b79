"""Test helpers: the checkout's root, the agent and Prometheus as child processes, a fake clock
for the scheduler, network-namespace helpers."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import itertools
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from lab.procs import free_port
from lab.promconfig import NATIVE_HISTOGRAMS

# The checkout: where the tests run the agent, the lab and the bench from, and read the files
# they check (docs, deploy, rules).
ROOT = Path(__file__).resolve().parents[1]
# The shipped rule files and dashboards, which several groups check or load.
RULE_FILES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))


async def serve_app(
    app: web.Application, ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on 127.0.0.1 at a port the kernel picks; the caller cleans the runner up."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.base_events.Server)
    return runner, server.sockets[0].getsockname()[1]


def shipped_rules() -> list[dict[str, Any]]:
    """Every rule (recording and alerting) of the shipped rule files, in file order."""
    return [
        r for p in RULE_FILES for g in yaml.safe_load(p.read_text())["groups"] for r in g["rules"]
    ]


# What the tests put in for a dashboard's variables when they run its queries.
DASHBOARD_VARIABLES = {
    "region": ".*",
    "edge": ".*",
    "instance": ".*",
    "probe": ".*",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
}


def substitute(expr: str, **values: str) -> str:
    """A dashboard query with its variables (``$edge``, ``${edge}``) replaced: ``values``
    first, then ``DASHBOARD_VARIABLES``."""
    for var, value in {**DASHBOARD_VARIABLES, **values}.items():
        expr = re.sub(rf"\${var}\b", value, expr.replace(f"${{{var}}}", value))
    return expr


# The edgeprobe command as a test runs it: this Python, from the checkout.
EDGEPROBE = (sys.executable, "-m", "agent")


def edgeprobe(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``edgeprobe *args`` to completion, its output captured as text."""
    return subprocess.run(
        [*EDGEPROBE, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def dev_tool(name: str) -> str | None:
    """A dev dependency's executable: the one in this Python's virtualenv, else from PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


def stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL if ``proc`` has not exited within ``timeout``; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


@dataclass
class Server:
    """A server a test started as a child process: its process, base URL and log."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def server(
    argv: list[str],
    url: str,
    log: Path,
    preexec: Callable[[], None] | None = None,
    stop_timeout: float = 10.0,
) -> Iterator[Server]:
    """``argv`` started from the checkout, its output in ``log``; stopped on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec
        )
    try:
        yield Server(proc, url, log)
    finally:
        stop(proc, stop_timeout)


@contextlib.contextmanager
def agent_process(
    tmp: Path,
    config: str,
    flags: tuple[str, ...] = (),
    preexec: Callable[[], None] | None = None,
    scheme: str = "http",
) -> Iterator[Server]:
    """``edgeprobe run`` on ``config`` (written to ``tmp/edgeprobe.yml``), listening on a free
    loopback port, its output in ``tmp/agent.log``."""
    cfg = tmp / "edgeprobe.yml"
    cfg.write_text(config)
    listen = f"127.0.0.1:{free_port()}"
    argv = [*EDGEPROBE, "run", f"--config.file={cfg}", f"--web.listen-address={listen}", *flags]
    with server(argv, f"{scheme}://{listen}", tmp / "agent.log", preexec) as s:
        yield s


async def wait_ready(
    c: Server,
    timeout: float = 20.0,
    headers: Mapping[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Until the agent answers ``/-/ready`` with 200 (with ``headers`` and ``tls`` when its web
    config asks for them); fails if it exits or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
        while True:
            assert c.proc.poll() is None, f"agent exited {c.proc.returncode}:\n{c.text()}"
            assert time.monotonic() < deadline, f"agent not ready:\n{c.text()}"
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with s.get(c.url + "/-/ready", headers=headers, ssl=tls or True) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.1)


@contextlib.contextmanager
def prometheus(tmp: Path, config: str) -> Iterator[Server]:
    """Debian's ``prometheus`` with native histograms, as shipped, on ``config`` (the text of a
    prometheus.yml), on a free loopback port, its storage and log under ``tmp``."""
    cfg = tmp / "prometheus.yml"
    cfg.write_text(config)
    listen = f"127.0.0.1:{free_port()}"
    argv = [
        "prometheus",
        f"--config.file={cfg}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address={listen}",
        NATIVE_HISTOGRAMS,
        "--log.level=warn",
    ]
    with server(argv, f"http://{listen}", tmp / "prometheus.log", stop_timeout=20) as s:
        yield s


async def query(s: aiohttp.ClientSession, base: str, expr: str) -> list[dict[str, Any]]:
    """An instant query's result vector; fails unless the server says success."""
    async with s.get(f"{base}/api/v1/query", params={"query": expr}) as r:
        data = await r.json()
    assert data["status"] == "success", (expr, data)
    result: list[dict[str, Any]] = data["data"]["result"]
    return result


class _FakeTimer:
    __slots__ = ("args", "cancelled", "fn")

    def __init__(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A manually advanced clock: ``call_at`` callbacks run, in time order, when ``advance``
    passes their time."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start
        self._timers: list[tuple[float, int, _FakeTimer]] = []
        self._n = itertools.count()

    def call_at(self, when: float, fn: Callable[..., None], *args: Any) -> _FakeTimer:
        h = _FakeTimer(fn, args)
        heapq.heappush(self._timers, (when, next(self._n), h))
        return h

    def now(self) -> float:
        return self.t

    async def advance(self, dt: float, step: float | None = None) -> None:
        """Move time forward by ``dt``, firing timers in order and letting what they start
        run."""
        end = self.t + dt
        while True:
            await _settle()
            if not self._timers or self._timers[0][0] > end:
                break
            when, _, timer = heapq.heappop(self._timers)
            self.t = max(self.t, when)
            if not timer.cancelled:
                timer.fn(*timer.args)
        self.t = end
        await _settle()

    async def jump(self, dt: float) -> None:
        """Move time forward without waking anyone in between (a stalled event loop)."""
        self.t += dt
        await self.advance(0)


async def _settle(rounds: int = 20) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


@contextlib.contextmanager
def netns(prefix: str = "eptest") -> Iterator[str]:
    """A fresh network namespace with only ``lo`` up (root only); removed on exit, always.
    Nothing in it can reach any real network."""
    name = f"{prefix}{os.getpid()}x{next(_ns_counter)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_netns(name: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", name, *cmd]


def can_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


_ns_counter = itertools.count()


@contextlib.contextmanager
def out_of_fds(spare: int = 64) -> Iterator[int]:
    """This process at its RLIMIT_NOFILE: the soft limit lowered to a little above the
    descriptors open now, then every free one held (/dev/null), so the next socket() fails
    with EMFILE. Yields how many were held; all are closed and the limit restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, top + spare), hard))
    held: list[int] = []
    try:
        for _ in range(top + spare):  # bounded: never more than the lowered limit
            try:
                held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as e:
                assert e.errno == errno.EMFILE
                break
        try:
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
        except OSError as e:
            assert e.errno == errno.EMFILE
        else:
            raise AssertionError("a socket could still be opened")
        yield len(held)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
