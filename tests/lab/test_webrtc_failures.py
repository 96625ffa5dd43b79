"""The ``webrtc`` probe against broken WHIP servers: 1,000 failed runs leave no socket, task or
file descriptor behind, every failure maps to its bounded reason, and the secrets (bearer
token, TURN password) appear in no log line, label, reason or result.

Real parts: the lab's WHIP answerer (``lab/whip.py``, aiortc) and coturn, in a child process,
in a network namespace this test creates (``unshare -n``) with one veth pair, because aioice
gathers no loopback candidates. Signalling failures that need no ICE go over the namespace's
loopback; the server that never finishes ICE answers with a candidate on the veth address.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None,
        reason="needs root and unshare (a network namespace with a veth pair)",
    ),
]

NETNS = r"""
ip link set lo up
ip link add v0 type veth peer name v1
ip addr add 10.99.0.1/24 dev v0
ip addr add fd99::1/64 dev v0 nodad
ip link set v0 up
ip link set v1 up
exec "$@"
"""

CHILD = r"""
import asyncio, gc, io, json, logging, os, sys
from lab.services import ServicesProcess
from probes import PROBES
from probes.base import ProbeContext, Target

state, token, turn_pw = sys.argv[1], sys.argv[2], sys.argv[3]
log = io.StringIO()
logging.basicConfig(level=logging.DEBUG, stream=log, force=True)
with open(f"{state}/token", "w") as f:
    f.write(token + "\n")
with open(f"{state}/turn.pass", "w") as f:
    f.write(turn_pw + "\n")
with open(f"{state}/wrong.pass", "w") as f:
    f.write(turn_pw + "-wrong\n")
cfg = {"state_dir": f"{state}/services", "http": ["127.0.0.1:8080", "10.99.0.1:8080"],
       "https": ["10.99.0.1:8443"], "udp_echo": ["10.99.0.1:7"],
       "turn": {"listen": ["10.99.0.1"], "port": 3478, "users": {"probe": turn_pw}}}
W = PROBES["webrtc"]
R = PROBES["relay"]
ctx = ProbeContext()

def opts(**kw):
    o = W.options(**{"scheme": "http", "port": 8080, "timeout": 0.3,
                     "teardown_timeout": 0.3, "token_file": f"{state}/token", **kw})
    assert not o.validate(), o.validate()
    return o

MODES = [("refused", opts(port=8081), "tcp_refused", "127.0.0.1"),
         ("status500", opts(path="/whip/fail/status500"), "signalling_status", "127.0.0.1"),
         ("status403", opts(path="/whip/fail/status403"), "signalling_status", "127.0.0.1"),
         ("badsdp", opts(path="/whip/fail/badsdp"), "bad_answer", "127.0.0.1"),
         ("nolocation", opts(path="/whip/fail/nolocation"), "no_location", "127.0.0.1"),
         ("wrongtype", opts(path="/whip/fail/wrongtype"), "signalling_content_type",
          "127.0.0.1"),
         ("oversized", opts(path="/whip/fail/oversized"), "answer_too_large", "127.0.0.1"),
         ("noice", opts(path="/whip/fail/noice"), "ice_timeout", "10.99.0.1")]

def fds():
    return len(os.listdir("/proc/self/fd"))

async def main():
    out = {}
    async def one(i):
        name, o, want, addr = MODES[i % len(MODES)]
        r = await W.run(Target("e", addr), o, ctx)
        return name, want, r
    # Warm-up: imports, aiohttp's and aiortc's lazily created module state.
    for i in range(len(MODES)):
        await one(i)
    gc.collect()
    await asyncio.sleep(0.2)
    out["fds_before"], out["tasks_before"] = fds(), len(asyncio.all_tasks())
    sem = asyncio.Semaphore(8)
    async def bounded(i):
        async with sem:
            return await one(i)
    results = await asyncio.gather(*(bounded(i) for i in range(int(sys.argv[4]))))
    # Runs cancelled mid-ICE (a reload removing the target, shutdown) clean up too.
    for _ in range(20):
        t = asyncio.ensure_future(W.run(Target("e", "10.99.0.1"),
                                        opts(path="/whip/fail/noice", timeout=5.0), ctx))
        await asyncio.sleep(0.15)
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)
    await asyncio.sleep(0.5)   # closing transports finish on the next loop iterations
    gc.collect()
    out["fds_after"], out["tasks_after"] = fds(), len(asyncio.all_tasks())
    out["wrong"] = sorted({(n, w, r.reason) for n, w, r in results if r.reason != w})
    out["counts"] = len(results)
    out["teardown_failed"] = sum(r.errors.get("teardown_failed", 0) for _, _, r in results)
    # Secrets: a relay-only connect and relay streams with the right and a wrong password.
    dump = []
    for pw_file in ("turn.pass", "wrong.pass"):
        ro = W.options(port=8443, insecure_skip_verify=True, relay_only=True, username="probe",
                       password_file=f"{state}/{pw_file}", token_file=f"{state}/token",
                       timeout=3.0)
        r = await W.run(Target("e", "10.99.0.1"), ro, ctx)
        dump.append(repr(r)); dump.append(repr(ro))
        out.setdefault("relay_only", []).append(r.reason)
        rr = R.options(username="probe", password_file=f"{state}/{pw_file}", packets=5)
        r = await R.run(Target("e", "10.99.0.1"), rr, ctx)
        dump.append(repr(r)); dump.append(repr(rr))
        out.setdefault("relay", []).append(r.reason)
    dump += [repr(r) for _, _, r in results[:len(MODES)]]
    out["dump"] = "\n".join(dump)
    return out

with ServicesProcess(cfg):
    out = asyncio.run(main())
out["log"] = log.getvalue()
print(json.dumps(out))
"""


def test_thousand_failed_runs_leave_nothing_behind_and_leak_no_secret(tmp_path: Path) -> None:
    token = "tok-" + os.urandom(12).hex()
    turn_pw = "pw-" + os.urandom(12).hex()
    script = tmp_path / "netns.sh"
    script.write_text(NETNS)
    p = subprocess.run(
        [
            "unshare",
            "-n",
            "sh",
            str(script),
            sys.executable,
            "-c",
            CHILD,
            str(tmp_path),
            token,
            turn_pw,
            "1000",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["counts"] == 1000
    assert out["wrong"] == [], out["wrong"]
    assert out["fds_after"] == out["fds_before"], (out["fds_before"], out["fds_after"])
    assert out["tasks_after"] == out["tasks_before"], (out["tasks_before"], out["tasks_after"])
    # Every failed session with a Location was DELETEd (404 for the fake ones counts as gone).
    assert out["teardown_failed"] == 0
    assert out["relay_only"] == ["ok", "gather_failed"], out["relay_only"]
    assert out["relay"] == ["ok", "turn_auth_failed"], out["relay"]
    for secret in (token, turn_pw):
        assert secret not in out["log"]
        assert secret not in out["dump"]
        assert secret not in p.stderr
    assert "DEBUG" in out["log"]  # the check above looked at real debug logging
