"""The CLI end to end, as real processes."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from lab.procs import free_port
from tests.helpers import EDGEPROBE, ROOT, edgeprobe


@pytest.mark.parametrize("cmd", [[], ["run"], ["check-config"], ["probe"]])
def test_help_everywhere(cmd: list[str]) -> None:
    res = edgeprobe(*cmd, "--help")
    assert res.returncode == 0 and "usage: edgeprobe" in res.stdout


def test_check_config(tmp_path: Path) -> None:
    ok = edgeprobe("check-config", str(ROOT / "examples/loopback.yaml"))
    assert ok.returncode == 0 and "OK (3 probe series" in ok.stdout
    bad = tmp_path / "bad.yml"
    bad.write_text("agent:\n  region: x\n  colour: blue\n")
    res = edgeprobe("check-config", str(bad))
    assert res.returncode == 1
    assert "agent.colour: unknown key" in res.stderr and "(line 3)" in res.stderr
    missing = edgeprobe("check-config", str(tmp_path / "nope.yml"))
    assert missing.returncode == 1 and "cannot read config file" in missing.stderr


def test_probe_table_and_verdict() -> None:
    res = edgeprobe("probe", "-c", "5", "--spacing", "10ms", "127.0.0.1", "::1")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:4] == ["HOST", "SENT", "LOST", "LOSS%"]
    assert lines[1].startswith("127.0.0.1") and lines[1].rstrip().endswith("PASS")
    assert lines[2].startswith("::1")


def test_probe_unresolvable_name_is_a_reason_not_a_crash() -> None:
    res = edgeprobe("probe", "-c", "1", "no-such-edge.invalid", "127.0.0.1")
    assert res.returncode == 3
    assert "FAIL (resolve_failed)" in res.stdout
    assert "Traceback" not in res.stderr


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        body: bytes = r.read()
        return body.decode()


def test_run_serves_reloads_on_sighup_and_exits_zero_on_sigterm(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text((ROOT / "examples/loopback.yaml").read_text())
    port = free_port()
    proc = subprocess.Popen(
        [
            *EDGEPROBE,
            "run",
            f"--config.file={cfg}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.format=json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert _get(f"http://127.0.0.1:{port}/-/ready").startswith("Ready")
                break
            except OSError:
                assert time.monotonic() < deadline, "agent did not become ready"
                time.sleep(0.1)
        time.sleep(1.5)
        assert 'edge="loopback-v6"' in _get(f"http://127.0.0.1:{port}/metrics")
        cfg.write_text("agent: {region: x}\ntargets: 7\n")
        proc.send_signal(signal.SIGHUP)
        failed = 'edgeprobe_config_last_reload_successful{region="local-loopback"} 0.0'
        deadline = time.monotonic() + 20  # the new config is decoded in a child process
        while failed not in (body := _get(f"http://127.0.0.1:{port}/metrics")):
            assert time.monotonic() < deadline, "the reload did not fail"
            time.sleep(0.2)
        assert 'edge="loopback-v6"' in body  # the running config was kept
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
        assert rc == 0
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    assert '"msg": "config reload failed; keeping the running config"' in err
    assert '"icmp_mode"' in err


@pytest.mark.parametrize("cmd", ["run", "route"])
def test_run_and_route_refuse_to_start_alike(cmd: str, tmp_path: Path) -> None:
    """`run` and `route` read their flags, config and web config the same way: each refusal
    has its exit code and one line on stderr, before anything listens."""
    good = tmp_path / "good.yml"
    good.write_text((ROOT / "examples/loopback.yaml").read_text() if cmd == "run" else "")
    bad = tmp_path / "bad.yml"
    bad.write_text("agent: {region: x}\ntargets: 7\n" if cmd == "run" else "policy: {hold: x}\n")
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users: 7\n")
    port = f"--web.listen-address=127.0.0.1:{free_port()}"
    cases = [
        ([f"--config.file={good}", port, "--web.max-connections=0"], 2, "--web.max-connections"),
        ([f"--config.file={bad}", port], 1, "edgeprobe: config error: "),
        ([f"--config.file={good}", port, f"--web.config.file={web}"], 1, "web config error: "),
        ([f"--config.file={good}", "--web.listen-address=nowhere"], 1, "cannot listen on nowhere"),
    ]
    for flags, code, said in cases:
        res = edgeprobe(cmd, *flags, timeout=30)
        assert (res.returncode, said in res.stderr) == (code, True), (flags, res.stderr)
        assert "Traceback" not in res.stderr


def _nofile(pid: int) -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of ``pid``, as the kernel reports it."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no Max open files line")


@pytest.mark.parametrize("cmd", ["run", "route"])
def test_run_and_route_raise_the_soft_fd_limit_to_the_hard_one(cmd: str, tmp_path: Path) -> None:
    """Started with soft 256 < hard 4096, the process runs with 4096 (as a Go exporter would),
    says so once, and the web server's connection cap is computed from the raised limit (256
    would have capped it below the default 512)."""
    cfg = tmp_path / "c.yml"
    if cmd == "run":
        cfg.write_text((ROOT / "examples/loopback.yaml").read_text())
    else:  # a Prometheus that is not there, on loopback
        cfg.write_text(f"prometheus: {{url: 'http://127.0.0.1:{free_port()}'}}\n")
    port = free_port()
    hard = min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    assert hard > 512  # else nothing to show

    def low_soft() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    proc = subprocess.Popen(
        [
            *EDGEPROBE,
            cmd,
            f"--config.file={cfg}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.format=json",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        preexec_fn=low_soft,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                _get(f"http://127.0.0.1:{port}/-/healthy")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "did not start"
                time.sleep(0.1)
        assert _nofile(proc.pid) == (hard, hard)
        # Both export the web server's self-metrics.
        metrics = _get(f"http://127.0.0.1:{port}/metrics").splitlines()
        assert "edgeprobe_web_basic_auth_shed_total 0.0" in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [json.loads(x) for x in (proc.stderr.read() if proc.stderr else "").splitlines()]
    said = [x for x in lines if x["msg"] == "file descriptor limit"]
    assert [(x["soft"], x["hard"], x["was"]) for x in said] == [(hard, hard, 256)]
    listening = [x for x in lines if x["msg"] == "listening"]
    assert [x["max_connections"] for x in listening] == [512]
    assert not [x for x in lines if x["msg"].startswith("RLIMIT_NOFILE leaves")]
