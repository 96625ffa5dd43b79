"""Child processes inside network namespaces, and what /proc says they cost.

Every tool runs as ``ip netns exec NS TOOL ...``; ``ip netns exec`` execs the tool in place,
so the PID we hold is the tool's own and ``/proc/PID`` describes it. A tool is stopped by that
PID only (its process group, which it leads), never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    at_ns: int  # CLOCK_MONOTONIC, same clock as the lab's ground truth
    cpu_s: float  # utime + stime + cutime + cstime
    out_echos: int  # ICMP echo requests sent in the tool's namespace (/proc/PID/net/snmp)
    in_echo_reps: int  # ICMP echo replies received there


def _stat_fields(pid: int) -> list[str]:
    # The command name (field 2) may contain spaces; everything after its ")" is fixed.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def start_ticks(pid: int) -> int:
    """Process start time in clock ticks since boot: tells our PID from a reused one."""
    try:
        return int(_stat_fields(pid)[19])
    except (OSError, ValueError, IndexError):
        return -1


def cpu_seconds(pid: int) -> float:
    f = _stat_fields(pid)
    # Fields 14-17 of proc(5) (utime, stime, cutime, cstime) are 11..14 after the name.
    return sum(int(x) for x in f[11:15]) / CLK_TCK


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def icmp_counters(pid: int) -> tuple[int, int]:
    """(OutEchos, InEchoReps) of the network namespace the process lives in."""
    lines = [
        ln.split()
        for ln in Path(f"/proc/{pid}/net/snmp").read_text().splitlines()
        if ln.startswith("Icmp:")
    ]
    head, vals = lines[0], lines[1]
    d = dict(zip(head[1:], (int(v) for v in vals[1:]), strict=True))
    return d["OutEchos"], d["InEchoReps"]


def sample(pid: int) -> CpuSample:
    out, rep = icmp_counters(pid)
    return CpuSample(time.monotonic_ns(), cpu_seconds(pid), out, rep)


class Child:
    """A tool running in a namespace, with stdout/stderr to files. Always stopped on exit."""

    def __init__(
        self, ns: str, argv: Sequence[str], out: Path, err: Path, stop_signal: int = signal.SIGTERM
    ) -> None:
        self.argv = ["ip", "netns", "exec", ns, *argv]
        self.out_path, self.err_path = out, err
        self.stop_signal = stop_signal
        self.proc: subprocess.Popen[bytes] | None = None
        self.start = -1
        self.returncode: int | None = None

    def __enter__(self) -> Child:
        with self.out_path.open("wb") as o, self.err_path.open("wb") as e:
            self.proc = subprocess.Popen(
                self.argv, stdout=o, stderr=e, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.start = start_ticks(self.proc.pid)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return (
            self.proc is not None
            and self.proc.poll() is None
            and start_ticks(self.proc.pid) == self.start
        )

    def stop(self, grace: float = 10.0) -> int | None:
        """The tool's stop signal (fping prints its summary on SIGINT), then SIGKILL."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, self.stop_signal)
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        self.returncode = p.returncode
        return p.returncode

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def run_in(
    ns: str, argv: Sequence[str], timeout: float = 120.0
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, timeout=timeout, check=False
    )


class LoopbackNs:
    """A fresh namespace with only ``lo`` up: every 127.0.0.0/8 address answers pings there,
    and nothing outside it is touched. The name carries our PID so parallel runs don't clash."""

    def __init__(self, tag: str) -> None:
        self.name = f"epbench{os.getpid()}{tag}"

    def __enter__(self) -> LoopbackNs:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        try:
            subprocess.run(
                ["ip", "-n", self.name, "link", "set", "lo", "up"], check=True, capture_output=True
            )
            # Unprivileged ping sockets for smokeping_prober's default mode. Echo replies are
            # outside icmp_ratemask, so no rate limit applies to them anyway.
            run_in(
                self.name,
                [
                    "sysctl",
                    "-qw",
                    "net.ipv4.ping_group_range=0 2147483647",
                    "net.ipv4.icmp_ratelimit=0",
                ],
            )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
