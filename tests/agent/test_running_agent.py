"""The hardening features inside the running agent: discovered targets, /probe, hostile names,
shutdown without false loss, TLS + basic auth through the CLI, and config fuzzing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import bcrypt
import pytest
import trustme
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.app import Agent
from agent.config import load as cfgmod
from agent.config.decode import ConfigError
from agent.server.http import build_app, serve
from lab.procs import free_port
from probes.net.resolve import Resolver
from tests.helpers import ROOT, agent_process, edgeprobe, out_of_fds, wait_ready

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Metrics:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def local(agent: Agent) -> Metrics:
    return parse(generate_latest(agent.registry).decode())


def series(m: Metrics, name: str) -> dict[str, float]:
    """edge -> value for one metric name."""
    return {dict(lbl)["edge"]: v for (n, lbl), v in m.items() if n == name and "edge" in dict(lbl)}


def sample(m: Metrics, name: str, **labels: str) -> float:
    want = set(labels.items())
    for (n, lbl), v in m.items():
        if n == name and want <= set(lbl):
            return v
    raise KeyError((name, labels))


async def wait_for(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


HEAD = """agent: {region: id-jakarta, max_targets: 20}
defaults:
  icmp: {interval: 300ms, packets: 2, spacing: 10ms, timeout: 200ms}
"""


@contextlib.asynccontextmanager
async def running(path: Path, web: bool = False) -> AsyncIterator[tuple[Agent, str]]:
    agent = Agent(cfgmod.load(path), path)
    runner = None
    url = ""
    if web:
        port = free_port()
        runner = await serve(build_app(agent), f"127.0.0.1:{port}")
        url = f"http://127.0.0.1:{port}"
    await agent.start()
    try:
        yield agent, url
    finally:
        await agent.stop(1.0)
        if runner is not None:
            await runner.cleanup()


async def test_discovered_targets_follow_the_inventory(tmp_path: Path) -> None:
    inv = tmp_path / "edges.json"
    inv.write_text(
        json.dumps([{"targets": ["127.0.0.2", "127.0.0.3"], "labels": {"tier": "near"}}])
    )
    cfg = tmp_path / "edgeprobe.yml"
    cfg.write_text(
        HEAD + "targets:\n  - {name: static-1, address: 127.0.0.1}\n"
        "discovery:\n  file_sd:\n    - {name: inv, files: [edges.json], "
        "poll_interval: 100ms}\n"
    )
    async with running(cfg) as (agent, _):
        m = local(agent)
        assert set(series(m, "edgeprobe_packets_sent_total")) == {
            "static-1",
            "127.0.0.2",
            "127.0.0.3",
        }
        assert sample(m, "edgeprobe_sd_targets", source="inv") == 2
        await wait_for(
            lambda: series(local(agent), "edgeprobe_packets_sent_total").get("127.0.0.2", 0) >= 2
        )
        before = series(local(agent), "edgeprobe_packets_sent_total")

        inv.write_text(
            json.dumps([{"targets": ["127.0.0.2", "127.0.0.4"], "labels": {"tier": "near"}}])
        )
        await wait_for(lambda: "127.0.0.4" in series(local(agent), "edgeprobe_packets_sent_total"))
        after = series(local(agent), "edgeprobe_packets_sent_total")
        assert "127.0.0.3" not in after  # removed: gone
        assert after["127.0.0.4"] <= 2  # added: starts at zero
        assert after["127.0.0.2"] >= before["127.0.0.2"]  # unchanged: continues
        assert after["static-1"] >= before["static-1"]

        inv.write_text("[{broken")  # bad inventory: keep targets
        await wait_for(
            lambda: sample(local(agent), "edgeprobe_sd_last_refresh_successful", source="inv") == 0
        )
        assert set(series(local(agent), "edgeprobe_packets_sent_total")) == set(after)

        # A reload that does not touch discovery keeps its state and its targets.
        cfg.write_text(cfg.read_text().replace("static-1", "static-2"))
        ok, err = await agent.reload()
        assert ok, err
        assert set(series(local(agent), "edgeprobe_packets_sent_total")) == {
            "static-2",
            "127.0.0.2",
            "127.0.0.4",
        }


async def test_discovery_cannot_exceed_max_targets(tmp_path: Path) -> None:
    inv = tmp_path / "edges.json"
    inv.write_text(json.dumps([{"targets": [f"127.0.1.{i}" for i in range(1, 30)]}]))
    cfg = tmp_path / "edgeprobe.yml"
    cfg.write_text(HEAD + "discovery:\n  file_sd:\n    - {name: inv, files: [edges.json]}\n")
    async with running(cfg) as (agent, _):
        m = local(agent)
        assert len(series(m, "edgeprobe_packets_sent_total")) == 20
        assert sample(m, "edgeprobe_sd_dropped_series") == 9


async def test_probe_endpoint_in_the_agent(tmp_path: Path) -> None:
    cfg = tmp_path / "edgeprobe.yml"
    cfg.write_text(
        HEAD + "probe_endpoint: {enabled: true, allow_names: [localhost], "
        "allow_special: [loopback]}\n"
    )
    async with running(cfg, web=True) as (agent, url), aiohttp.ClientSession() as s:
        async with s.get(f"{url}/probe", params={"target": "localhost", "module": "icmp"}) as r:
            assert r.status == 200
            m = parse(await r.text())
            assert m[("probe_success", ())] == 1 and m[("probe_packets_received", ())] == 2
        for target, status in (
            ("169.254.169.254", 403),
            ("10.0.0.1", 403),
            ("edge-sg-1.example.net", 403),
        ):
            async with s.get(f"{url}/probe", params={"target": target, "module": "icmp"}) as r:
                assert r.status == status, target
        # A reload can turn it off.
        cfg.write_text(HEAD)
        assert (await agent.reload())[0]
        async with s.get(f"{url}/probe", params={"target": "localhost", "module": "icmp"}) as r:
            assert r.status == 404


async def test_unresolvable_empty_and_flipping_names(tmp_path: Path) -> None:
    cfg = tmp_path / "edgeprobe.yml"
    cfg.write_text(
        HEAD + "targets:\n"
        "  - {name: good, address: 127.0.0.1}\n"
        "  - {name: nxdomain, address: edge-gone.example.net}\n"
        "  - {name: empty, address: edge-v6only.example.net, probes: "
        "{icmp: {ip_family: ipv4}}}\n"
        "  - {name: flip, address: edge-flip.example.net}\n"
    )
    flips = [0]

    async def fake_lookup(host: str) -> list[tuple[int, str]]:
        # A unit-level fake: these names are never sent to a real resolver.
        if host == "edge-gone.example.net":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if host == "edge-v6only.example.net":
            return [(socket.AF_INET6, "::1")]
        flips[0] += 1
        return [(socket.AF_INET, f"127.0.0.{2 + flips[0] % 2}")]

    async with running(cfg) as (agent, _):
        resolver = agent.resources.get(Resolver)
        assert resolver is not None
        resolver._lookup = fake_lookup  # type: ignore[method-assign]
        resolver.ttl = 0.0
        await wait_for(
            lambda: series(local(agent), "edgeprobe_packets_sent_total").get("flip", 0) >= 6
        )
        m = local(agent)
        assert (
            sample(m, "edgeprobe_probe_errors_total", edge="nxdomain", reason="resolve_failed") >= 1
        )
        assert sample(m, "edgeprobe_probe_errors_total", edge="empty", reason="resolve_empty") >= 1
        assert series(m, "edgeprobe_packets_sent_total")["good"] >= 6
        assert series(m, "edgeprobe_packets_lost_total")["flip"] == 0
        assert flips[0] >= 3


async def test_stop_abandons_runs_without_false_loss(tmp_path: Path) -> None:
    cfg = tmp_path / "edgeprobe.yml"
    # Each run spans most of its interval, so a stop always lands inside runs.
    cfg.write_text(
        "agent: {region: r}\ndefaults:\n  icmp: {interval: 1s, packets: 8, "
        "spacing: 100ms, timeout: 250ms}\ntargets:\n"
        + "".join(f"  - {{name: e{i}, address: 127.0.0.{i}}}\n" for i in range(1, 6))
    )
    for grace in (0.0, 3.0):
        agent = Agent(cfgmod.load(cfg), cfg)
        await agent.start()
        await asyncio.sleep(1.6)
        t0 = time.monotonic()
        await agent.stop(grace)
        assert time.monotonic() - t0 < grace + 1.0
        m = local(agent)
        assert sum(series(m, "edgeprobe_packets_sent_total").values()) > 0
        assert sum(series(m, "edgeprobe_packets_lost_total").values()) == 0, grace
        assert [
            t for t in asyncio.all_tasks() if t.get_name().startswith("probe:") and not t.done()
        ] == []


def make_pki(tmp: Path) -> tuple[trustme.CA, str]:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(tmp / "tls.crt"))
    leaf.private_key_pem.write_to_path(str(tmp / "tls.key"))
    hashed = bcrypt.hashpw(b"scrape-pw", bcrypt.gensalt(4)).decode()
    (tmp / "web.yml").write_text(
        yaml.safe_dump(
            {
                "tls_server_config": {"cert_file": "tls.crt", "key_file": "tls.key"},
                "basic_auth_users": {"prometheus": hashed},
            }
        )
    )
    return ca, hashed


async def test_cli_tls_basic_auth_and_sigterm(tmp_path: Path) -> None:
    ca, hashed = make_pki(tmp_path)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    good = {"Authorization": aiohttp.encode_basic_auth("prometheus", "scrape-pw")}
    bad = {"Authorization": aiohttp.encode_basic_auth("prometheus", "nope")}
    with agent_process(
        tmp_path,
        HEAD + "targets:\n  - {name: e1, address: 127.0.0.1}\n",
        (f"--web.config.file={tmp_path / 'web.yml'}",),
        scheme="https",
    ) as c:
        await wait_ready(c, 15, headers=good, tls=ctx)
        url = c.url + "/metrics"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            await asyncio.sleep(1.0)
            async with s.get(url, ssl=ctx, headers=good) as r:
                text = await r.text()
                assert "edgeprobe_packets_sent_total" in text
                assert hashed not in text and "scrape-pw" not in text
            async with s.get(url, ssl=ctx, headers=bad) as r:
                assert r.status == 401
            async with s.get(url, ssl=ctx) as r:
                assert r.status == 401
            with pytest.raises(aiohttp.ClientError):
                async with s.get(url.replace("https", "http"), headers=good) as r:
                    pass
        t0 = time.monotonic()
        c.proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(c.proc.wait, 10)
        assert rc == 0 and time.monotonic() - t0 < 5.0
    logs = c.text()
    assert hashed not in logs and "scrape-pw" not in logs


def test_cli_rejects_bad_web_config(tmp_path: Path) -> None:
    cfg = tmp_path / "edgeprobe.yml"
    cfg.write_text(HEAD)
    (tmp_path / "web.yml").write_text("basic_auth_users: {prometheus: plaintext}\n")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "run",
            f"--config.file={cfg}",
            f"--web.listen-address=127.0.0.1:{free_port()}",
            f"--web.config.file={tmp_path / 'web.yml'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 1
    assert "not a bcrypt hash" in res.stderr and "plaintext" not in res.stderr


# --------------------------------------------------------------------------------------------
# Config fuzzing: every input is either a Config or a ConfigError, never a crash.

keys = st.sampled_from(
    [
        "agent",
        "region",
        "targets",
        "name",
        "address",
        "probes",
        "icmp",
        "defaults",
        "interval",
        "packets",
        "timeout",
        "labels",
        "max_targets",
        "discovery",
        "file_sd",
        "files",
        "probe_endpoint",
        "enabled",
        "allow_cidrs",
        "metrics",
        "rtt_buckets",
        "budget",
    ]
)
leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["1s", "500ms", "-1s", "1e308s", "icmp", "127.0.0.1"])
)
docs = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(keys | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs)
def test_fuzz_config_structures(doc: object) -> None:
    with contextlib.suppress(ConfigError):
        cfgmod.loads(yaml.safe_dump(doc))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_config_text(text: str) -> None:
    with contextlib.suppress(ConfigError):
        cfgmod.loads(text)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000,
        "a: " + "{b: " * 5000 + "1" + "}" * 5000,
        "agent: {region: r, max_targets: 99999999999999999999999999}",
        "agent: {region: r, budget: 1e400}",
        "agent: {region: " + "x" * 1_000_000 + "}",
        "agent: &a {region: r, labels: *a}",
        "\x00\xff",
    ],
)
def test_hostile_config_documents(text: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        cfgmod.loads(text)
    p = tmp_path / "bad.yml"
    p.write_text(text, errors="surrogateescape")
    res = edgeprobe("check-config", str(p))
    assert res.returncode == 1 and "config error" in res.stderr
    assert "Traceback" not in res.stderr


async def test_secrets_stay_out_of_logs_metrics_and_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    secret = "hunter2-turn-secret"
    cfg = tmp_path / "edgeprobe.yml"
    good = (
        "agent: {region: r}\ntargets:\n  - {name: t, address: 127.0.0.1, probes: "
        f"{{turn: {{interval: 1s, timeout: 200ms, port: {free_port()}, username: u, "
        f"password: {secret}}}}}}}\n"
    )
    cfg.write_text(good)
    async with running(cfg, web=True) as (agent, url):
        await asyncio.sleep(1.2)
        async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
            text = await r.text()
        assert "edgeprobe_probe_success" in text
        for bad in (
            good.replace("port:", "prot:"),
            good.replace(secret, f"[{secret}]"),
            good.replace(f"password: {secret}", f"password: {{x: {secret}}}"),
        ):
            cfg.write_text(bad)
            ok, err = await agent.reload()
            assert not ok and secret not in err, err
        assert secret not in repr(agent.config)
    assert secret not in text
    assert secret not in caplog.text


async def test_out_of_fds_is_a_reason_and_the_agent_recovers(tmp_path: Path) -> None:
    """While the process is out of descriptors, the tcp series fails with socket_exhausted
    (no exception counted), the ICMP series goes on over the engine's open socket, the
    agent keeps ticking; once they are free the tcp series succeeds again."""
    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = tmp_path / "edgeprobe.yml"
    cfg.write_text(
        HEAD + "  tcp: {interval: 200ms, timeout: 150ms}\ntargets:\n"
        f"  - {{name: lo, address: 127.0.0.1, probes: {{icmp: {{}}, tcp: {{port: {port}}}}}}}\n"
    )

    def m(name: str, kind: str, **labels: str) -> float:
        try:
            return sample(local(agent), name, edge="lo", probe=kind, **labels)
        except KeyError:
            return 0.0

    try:
        async with running(cfg) as (agent, _):
            await wait_for(lambda: m("edgeprobe_probe_success", "tcp") == 1)
            with out_of_fds():
                runs = m("edgeprobe_probe_runs_total", "tcp")
                icmp_sent = m("edgeprobe_packets_sent_total", "icmp")
                exhausted = {"reason": "socket_exhausted"}
                await wait_for(lambda: m("edgeprobe_probe_errors_total", "tcp", **exhausted) >= 3)
                assert m("edgeprobe_probe_success", "tcp") == 0
                assert m("edgeprobe_probe_runs_total", "tcp") >= runs + 3
                await wait_for(lambda: m("edgeprobe_packets_sent_total", "icmp") > icmp_sent)
            assert sample(local(agent), "edgeprobe_probe_exceptions_total") == 0
            await wait_for(lambda: m("edgeprobe_probe_success", "tcp") == 1)
            assert m("edgeprobe_probe_success", "icmp") == 1
    finally:
        server.close()
        await server.wait_closed()
