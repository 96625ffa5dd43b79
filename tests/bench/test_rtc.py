"""``python -m bench.rtc``: the bounded CPU measurement of the webrtc and relay probes runs and
reports every figure (no timed assertion: the figures are the bench's, not the test's)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
    ),
]


def test_bench_rtc_reports_cpu_per_connect_and_per_stream_second() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "bench.rtc", "--connects", "3", "--streams", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)
    assert r["connects_ok"] == 3 and r["streams_ok"] == 1
    for key in (
        "cpu_ms_per_connect_probe",
        "cpu_ms_per_connect_answerer",
        "cpu_ms_per_stream_second_probe",
        "cpu_ms_per_stream_second_turn",
    ):
        assert r[key] > 0, key
