"""A real Prometheus scrapes the agent over TLS with basic auth, and uses /probe with the
blackbox multi-target relabelling, with scrape configs written as for any exporter."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import bcrypt
import pytest
import trustme
import yaml

from lab.procs import free_port
from tests.helpers import ROOT

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed"),
]


async def test_prometheus_scrapes_tls_basic_auth_and_probe(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    (tmp_path / "web.yml").write_text(
        yaml.safe_dump(
            {
                "tls_server_config": {"cert_file": "tls.crt", "key_file": "tls.key"},
                "basic_auth_users": {
                    "prometheus": bcrypt.hashpw(b"scrape-pw", bcrypt.gensalt(4)).decode()
                },
            }
        )
    )
    (tmp_path / "edgeprobe.yml").write_text(
        "agent: {region: id-jakarta}\n"
        "defaults:\n  icmp: {interval: 500ms, packets: 2, spacing: 10ms, timeout: 200ms}\n"
        "targets:\n  - {name: e1, address: 127.0.0.1}\n"
        "probe_endpoint: {enabled: true, allow_names: [localhost], "
        "allow_special: [loopback]}\n"
    )
    agent_port, prom_port = free_port(), free_port()
    agent_addr = f"127.0.0.1:{agent_port}"
    secure = {
        "scheme": "https",
        "tls_config": {"ca_file": str(tmp_path / "ca.crt")},
        "basic_auth": {"username": "prometheus", "password": "scrape-pw"},
    }
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "edgeprobe",
                        **secure,
                        "static_configs": [{"targets": [agent_addr]}],
                    },
                    {
                        "job_name": "wrong_password",
                        **secure,
                        "basic_auth": {"username": "prometheus", "password": "nope"},
                        "static_configs": [{"targets": [agent_addr]}],
                    },
                    {"job_name": "plain_http", "static_configs": [{"targets": [agent_addr]}]},
                    {
                        "job_name": "blackbox",
                        **secure,
                        "metrics_path": "/probe",
                        "params": {"module": ["icmp"]},
                        "static_configs": [{"targets": ["localhost"]}],
                        "relabel_configs": [
                            {"source_labels": ["__address__"], "target_label": "__param_target"},
                            {"source_labels": ["__param_target"], "target_label": "instance"},
                            {"target_label": "__address__", "replacement": agent_addr},
                        ],
                    },
                ],
            }
        )
    )
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "run",
            f"--config.file={tmp_path / 'edgeprobe.yml'}",
            f"--web.listen-address={agent_addr}",
            f"--web.config.file={tmp_path / 'web.yml'}",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    prom = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    want = {
        'up{job="edgeprobe"}': 1.0,
        'up{job="wrong_password"}': 0.0,
        'up{job="plain_http"}': 0.0,
        'probe_success{job="blackbox"}': 1.0,
        'edgeprobe_packets_sent_total{job="edgeprobe",edge="e1"} > bool 0': 1.0,
    }
    got: dict[str, float | None] = {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                for q in want:
                    try:
                        async with s.get(
                            f"http://127.0.0.1:{prom_port}/api/v1/query", params={"query": q}
                        ) as r:
                            res = (await r.json())["data"]["result"]
                        got[q] = float(res[0]["value"][1]) if res else None
                    except (aiohttp.ClientError, KeyError, ValueError):
                        got[q] = None
                if got == want:
                    break
        assert got == want
    finally:
        for p in (prom, agent):
            p.send_signal(signal.SIGTERM)
        for p in (prom, agent):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
    assert agent.returncode == 0
