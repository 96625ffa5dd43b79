"""`python -m bench --quick` as a CI smoke test: the script works and its outputs are
well-formed. Nothing here asserts a speed or an accuracy; those are the benchmark's figures,
not pass/fail conditions on a shared CI machine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.analysis import histogram_quantile, parse_prom, quantile, subset_buckets
from bench.tools import SMOKEPING_DEFAULT_BUCKETS, fine_buckets
from tests.helpers import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_histogram_quantile_matches_promql() -> None:
    # 10 observations, 4 at or below 1, 10 at or below 2: the median's rank 5 lies 1/6 of the
    # way into the (1, 2] bucket.
    b = [(1.0, 4.0), (2.0, 10.0), (math.inf, 10.0)]
    assert histogram_quantile(0.5, b) == pytest.approx(1 + 1 / 6)
    assert histogram_quantile(0.2, b) == pytest.approx(0.5)
    assert math.isnan(histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]))
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0


def test_rebucketing_to_default_layout_is_exact() -> None:
    fine = fine_buckets([0.02])
    assert set(SMOKEPING_DEFAULT_BUCKETS) <= set(fine)
    cum = [(le, float(i)) for i, le in enumerate(fine)] + [(math.inf, float(len(fine)))]
    sub = subset_buckets(cum, SMOKEPING_DEFAULT_BUCKETS)
    assert [le for le, _ in sub] == [*SMOKEPING_DEFAULT_BUCKETS, math.inf]


def test_parse_prom_reads_only_wanted_samples() -> None:
    text = '# HELP x_total a\nx_total{a="1",b="q\\"uote"} 3\nx_totalish 9\ny_bucket{le="+Inf"} 2\n'
    got = parse_prom(text, ["x_total", "y_bucket"])
    assert got["x_total"] == [({"a": "1", "b": 'q\\"uote'}, 3.0)]
    assert got["y_bucket"] == [({"le": "+Inf"}, 2.0)]


@pytest.mark.lab
@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the bench needs root (network namespaces)")
def test_bench_quick_outputs(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.terminate()  # the bench's SIGTERM handler tears its namespaces down
            proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    doc = json.loads((tmp_path / "latest.json").read_text())
    assert doc["quick"] is True and doc["schema"] == 1
    assert doc["machine"]["cpus"] >= 1
    runs = [r for w in doc["workloads"] for r in w["runs"]]
    # Every tool ran in every workload, and each run says whether it went through the lab.
    assert {r["tool"] for r in runs} == {"edgeprobe", "fping", "smokeping_prober"}
    assert any(not r["via_lab"] for r in runs)
    for r in runs:
        assert r["ok"], r["error"]
        assert r["probes"] > 0 and r["cpu_s"] is not None and r["peak_rss_mb"] > 0
        assert r["rtt_error"]["n_targets"] > 0
        assert isinstance(r["rtt_error"]["median_ms"], float)
        assert 0.0 <= r["loss"]["measured"] <= 1.0
    ep = [r for r in runs if r["tool"] == "edgeprobe"]
    assert all(r["agent"]["scheduler_lateness_p99_ms"] is not None for r in ep)
    md = (tmp_path / "latest.md").read_text()
    assert md.count("| edgeprobe |") == len(ep)
    assert "Targets (docs/development/performance.md)" in md
    assert (tmp_path / "latest.png").read_bytes()[:8] == PNG_MAGIC
    # Nothing left behind: the bench's own namespace (named after its PID) is gone.
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"epbench{proc.pid}" not in ns
