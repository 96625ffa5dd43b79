"""The stack's process supervisor: child processes stopped by PID in reverse order (under the
main job also when it dies), each with a log whose tail a failed check shows; ``wait_for``
polls, bounded in time and count."""

from __future__ import annotations

import contextlib
import ctypes
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

PR_SET_PDEATHSIG = 1
T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, for a server started next. Taken below the kernel's
    ephemeral range: a port from that range (what binding port 0 gives) can be taken by any
    outbound connection, a probe's or a scrape's, before the server binds it."""
    lo = _ephemeral_low()
    for port in random.sample(range(1024, lo), min(200, lo - 1024)):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        any_port: int = s.getsockname()[1]
        return any_port


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_or_free(port: int, host: str = "127.0.0.1") -> int:
    """``port`` if it can be bound on ``host`` now, else a free one. SO_REUSEADDR as Go's
    listeners set it, so a TIME_WAIT left by the previous run does not count as taken."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return free_port(host)
    return port


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies, even by SIGKILL, so a killed
    ``make run`` leaves no Prometheus or agent behind (it survives ``ip netns exec``, which
    execs). Also unblock what the parent blocked around the fork (see ``Procs.start``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class Procs:
    """Processes started here; stopped by PID (never by name), in reverse order.

    ``supervised=True`` (the main job): each child gets its own process group, so a Ctrl-C on
    the terminal reaches only the supervisor, which then stops the children in order; and it
    dies with the supervisor. The start is shielded from SIGINT/SIGTERM, so no child is ever
    started without being recorded."""

    logdir: Path
    items: list[Proc] = field(default_factory=list)
    supervised: bool = False

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        log = self.logdir / f"{name}.log"
        kw: dict[str, Any] = {}
        if self.supervised:
            kw = {"process_group": 0, "preexec_fn": _die_with_parent}
        old = (
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            if self.supervised
            else None
        )
        try:
            with log.open("wb") as f:
                p = subprocess.Popen(
                    list(argv),
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=dict(env) if env else None,
                    cwd=cwd,
                    **kw,
                )
            proc = Proc(name, p, log)
            self.items.append(proc)
        finally:
            if old is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return proc

    def check_alive(self) -> None:
        for p in self.items:
            if p.popen.poll() is not None:
                raise AssertionError(f"{p.name} exited with {p.popen.returncode}:\n{p.tail()}")

    def stop_all(self, timeout: float = 15.0) -> dict[str, int | None]:
        """SIGTERM each process and wait for it, newest first: the regional servers flush
        their remote write while the central one still listens, then the central one stops,
        then the agents."""
        codes: dict[str, int | None] = {}
        for p in reversed(self.items):
            codes.update(self._stop([p], timeout))
        self.items.clear()
        return codes

    def stop_tiers(
        self, tiers: Sequence[Sequence[str]], timeout: float = 8.0
    ) -> dict[str, int | None]:
        """Stop by tiers of name prefixes, in order, each tier's processes together (three
        agents draining at once, not one after another); then whatever is left."""
        codes: dict[str, int | None] = {}
        for prefixes in tiers:
            tier = [p for p in self.items if p.name.startswith(tuple(prefixes))]
            codes.update(self._stop(tier, timeout))
            self.items = [p for p in self.items if p not in tier]
        codes.update(self._stop(list(reversed(self.items)), timeout))
        self.items.clear()
        return codes

    @staticmethod
    def _stop(procs: Sequence[Proc], timeout: float) -> dict[str, int | None]:
        for p in procs:
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[str, int | None] = {}
        for p in procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(timeout=5)
            codes[p.name] = p.popen.returncode
        return codes


def wait_for(
    what: str,
    fn: Callable[[], T | None],
    timeout: float,
    interval: float = 0.5,
    procs: Procs | None = None,
) -> T:
    """Poll ``fn`` until it returns a truthy value; bounded in time and count."""
    deadline = time.monotonic() + timeout
    last: Any = None
    for _ in range(int(timeout / interval) + 2):
        if procs is not None:
            procs.check_alive()
        try:
            last = fn()
        except (OSError, ValueError) as e:
            last = e
        if last and not isinstance(last, Exception):
            return last  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return bool(r.status == 200)


def wait_http_ok(
    what: str, url: str, procs: Procs, timeout: float = 30, interval: float = 0.5
) -> None:
    """``wait_for`` ``url`` to answer 200, checking that ``procs`` are still alive."""
    wait_for(what, lambda: http_ok(url), timeout, interval=interval, procs=procs)
