"""The main job (`make run` = bootstrap, then scripts/run.sh), run as a subprocess the way an
operator runs it, minus the package installation.

* ``test_main_job_lab`` (root): the lab, an agent per region, a regional agent-mode
  Prometheus per region, the central Prometheus and edgeprobe route come up; the route's map
  holds all three regions and the central server gets the route's decision back as the best
  edge of each region (through the regional tier and the route's scrape); the script prints
  the map; SIGINT stops everything within 20 s and leaves no namespace, link, process or state
  behind (only ``logs/``).
* ``test_main_job_loopback``: the fallback (``EDGEPROBE_LAB=0``, as without root) serves
  /metrics, its single Prometheus scrapes it (native histograms, as shipped) and the
  route service serves a map of its one region; SIGTERM stops it cleanly.

Every wait is bounded; the state goes to a temporary directory (``EDGEPROBE_RUN_DIR``), so a
`make run` of the developer's in run/ is never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.procs import http_ok, wait_for
from lab.prom import PromAPI, RouteAPI
from tests.helpers import ROOT, stop

RUN_SH = ROOT / "scripts" / "run.sh"
LAB_REGIONS = {"id-jakarta", "br-saopaulo", "ae-dubai"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="Linux only"),
    pytest.mark.skipif(
        not (ROOT / ".venv" / "bin" / "python").exists(),
        reason="scripts/run.sh runs .venv/bin/python (make bootstrap)",
    ),
]


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent PID, start time in clock ticks) of a live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19])


def alive(procs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    return {(pid, start) for pid, start in procs if (st := _stat(pid)) and st[1] == start}


class MainJob:
    """scripts/run.sh in its own session (a terminal's Ctrl-C is simulated by signalling it),
    output in a file that the test polls."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.run_dir = tmp / "run"
        self.out = tmp / "out.txt"
        with self.out.open("wb") as f:
            self.popen = subprocess.Popen(
                [str(RUN_SH)],
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=ROOT,
                env={**os.environ, "EDGEPROBE_RUN_DIR": str(self.run_dir), **env},
            )

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def printed(self, pattern: str, timeout: float) -> re.Match[str]:
        def find() -> re.Match[str] | None:
            if self.popen.poll() is not None:
                raise AssertionError(f"run.sh exited with {self.popen.returncode}:\n{self.text()}")
            return re.search(pattern, self.text())

        return wait_for(f"run.sh to print {pattern!r}", find, timeout)

    def stop(self, sig: signal.Signals, timeout: float) -> tuple[int, float]:
        """(exit code, seconds to exit); SIGKILL if it overruns (and the caller fails)."""
        t0 = time.monotonic()
        self.popen.send_signal(sig)
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)
            raise AssertionError(
                f"run.sh did not exit within {timeout:g}s of {sig.name}:\n{self.text()}"
            ) from None
        return code, time.monotonic() - t0

    def descendants(self) -> set[tuple[int, int]]:
        """(PID, start time) of every process below run.sh now, to check after it exits that
        none of them lives on (the start time tells a PID from its reuse)."""
        parent: dict[int, int] = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                st = _stat(int(d.name))
                if st:
                    parent[int(d.name)] = st[0]
        found: set[int] = set()
        todo = [self.popen.pid]
        for _ in range(len(parent) + 1):  # bounded: each PID is visited at most once
            if not todo:
                break
            pid = todo.pop()
            kids = [c for c, pp in parent.items() if pp == pid and c not in found]
            found.update(kids)
            todo.extend(kids)
        return {(pid, st[1]) for pid in found if (st := _stat(pid))}

    def processes(self) -> dict[int, str]:
        """Processes whose command line names this run's state directory: the agents, the
        Prometheus servers, Alertmanager, the lab's edge services."""
        tag = str(self.run_dir).encode()
        out: dict[int, str] = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    cmd = (d / "cmdline").read_bytes()
                except OSError:
                    continue
                if tag in cmd:
                    out[int(d.name)] = cmd.replace(b"\0", b" ").decode(errors="replace")[:200]
        return out


@pytest.fixture
def main_job_factory(tmp_path: Path) -> Iterator[list[MainJob]]:
    jobs: list[MainJob] = []
    yield jobs
    for job in jobs:  # after a failure: the job's own SIGTERM path cleans up
        stop(job.popen, 30)


@pytest.mark.lab
@pytest.mark.e2e
def test_main_job_lab(tmp_path: Path, main_job_factory: list[MainJob]) -> None:
    from lab.topology import lab_available, leftovers

    ok, why = lab_available()
    if not ok:
        pytest.skip(f"the lab cannot run here: {why}")
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (Debian package prometheus)")
    t_start = time.monotonic()
    job = MainJob(tmp_path, {})
    main_job_factory.append(job)

    run_id = job.printed(r"Lab ([0-9a-f]{6}) is up", 60).group(1)
    api = PromAPI(job.printed(r"Central Prometheus: (http://\S+)", 60).group(1))
    assert api.ready()
    # Through the regional tier: `up` carries the region only via each regional server's
    # external label, and the best edge needs the agents' series remote-written.
    wait_for(
        "the best edge of all three regions on the central Prometheus",
        lambda: b if set(b := api.best_edges()) == LAB_REGIONS else None,
        90,
    )
    up = {s["metric"].get("region") for s in api.query('up{job="edgeprobe"} == 1')}
    assert up == LAB_REGIONS
    # Native histograms end to end: scraped as protobuf, remote-written, stored native only.
    rtt = api.query('edgeprobe_rtt_seconds{probe="icmp"}')
    assert {s["metric"]["region"] for s in rtt} == LAB_REGIONS
    assert all("histogram" in s for s in rtt) and not api.query("edgeprobe_rtt_seconds_bucket")
    # The route service's map: every region, and the same decision as Prometheus holds.
    route = RouteAPI(
        job.printed(r"Routing map \(edgeprobe route[^:]*: (http://\S+)/v1/map", 20).group(1)
    )
    wait_for(
        "the map = region:edgeprobe_best_edge:info",
        lambda: set(route.best()) == LAB_REGIONS and route.best() == api.best_edges(),
        30,
    )
    # The script prints the map: per region the ordered edges with eligibility.
    job.printed(r"routing map \(edgeprobe route\)", 30)
    for region in LAB_REGIONS:
        job.printed(rf"\n  {region}\s+\S+ (ok|[A-Z_]+)", 10)
    started = job.descendants()
    procs = job.processes()
    n_prom = sum("prometheus" in c and "--config.file" in c for c in procs.values())
    n_agents = sum(" -m agent run" in c for c in procs.values())
    n_route = sum(" -m agent route" in c for c in procs.values())
    assert n_prom >= 4 and n_agents == 3 and n_route == 1, procs

    code, took = job.stop(signal.SIGINT, 20)
    assert code == 128 + signal.SIGINT, job.text()
    assert took < 20
    assert leftovers(run_id, str(job.run_dir)) == []
    assert job.processes() == {}
    assert alive(started) == set()
    assert {p.name for p in job.run_dir.iterdir()} == {"logs"}, "state left behind"
    with pytest.raises(OSError):
        http_ok(api.base + "/-/ready")
    assert "make run: stopped" in job.text()
    assert time.monotonic() - t_start < 150, "the main-job test must stay under 2.5 minutes"


def test_main_job_loopback(tmp_path: Path, main_job_factory: list[MainJob]) -> None:
    job = MainJob(tmp_path, {"EDGEPROBE_LAB": "0"})
    main_job_factory.append(job)
    job.printed("falling back to the loopback world", 30)
    metrics = job.printed(r"Agent: (http://\S+/metrics)", 30).group(1)
    with urllib.request.urlopen(metrics, timeout=5) as r:
        body = r.read().decode()
    assert "edgeprobe_build_info{" in body and 'region="local-loopback"' in body
    if shutil.which("prometheus") is not None:
        api = PromAPI(job.printed(r"Prometheus \(single server[^:]*: (http://\S+)", 30).group(1))
        # One demo scrape interval (5 s) plus start-up.
        wait_for(
            "the single Prometheus to scrape the agent",
            lambda: api.query('up{job="edgeprobe"} == 1'),
            30,
        )
        # As shipped: native histograms on, so the RTT histogram is stored native only.
        wait_for(
            "a native RTT histogram",
            lambda: [s for s in api.query("edgeprobe_rtt_seconds") if "histogram" in s],
            30,
        )
        assert not api.query("edgeprobe_rtt_seconds_bucket")
        route = RouteAPI(
            job.printed(r"Routing map \(edgeprobe route[^:]*: (http://\S+)/v1/map", 30).group(1)
        )
        wait_for(
            "a routing map of the loopback region",
            lambda: set(route.best()) == {"local-loopback"},
            60,
        )
    started = job.descendants()
    assert len(started) >= 1 + (shutil.which("prometheus") is not None)
    code, took = job.stop(signal.SIGTERM, 20)
    assert code == 128 + signal.SIGTERM, job.text()
    assert took < 20
    assert alive(started) == set()
    assert job.processes() == {}
    assert {p.name for p in job.run_dir.iterdir()} == {"logs"}, "state left behind"
