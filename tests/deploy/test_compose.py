"""The compose stack (deploy/compose/compose.yaml), checked by parsing: no Docker engine here.

What is checked: the file against the Compose Specification JSON schema (the copy that
check-jsonschema ships, `vendor.compose-spec`); that every bind-mounted file and build context
exists; the stack's shape (three regions, each an agent and an agent-mode Prometheus, the
central Prometheus, Alertmanager, Grafana); per-service ICMP settings; and each service's
configs as the container would see them, by laying the bind mounts out under a temporary root
and running the real validators on that: `promtool check config` (which also loads the rule
files), `amtool check-config`, and the agent's own config loader.

What is not: `docker compose config` (no compose plugin), starting the containers, and
Grafana's reading of the provisioning files (no Grafana here).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT, dev_tool

COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
REGIONS = ("id-jakarta", "br-saopaulo", "ae-dubai")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def _bind_mounts(svc: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of each bind mount; named volumes skipped."""
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, dict):
            if v.get("type") != "bind":
                continue
            src, dst = v["source"], v["target"]
        else:
            src, dst = v.split(":")[:2]
            if not src.startswith((".", "/")):
                continue  # a named volume
        out.append(((COMPOSE_DIR / src).resolve(), dst))
    return out


def test_compose_spec_schema() -> None:
    exe = dev_tool("check-jsonschema")
    assert exe, "check-jsonschema is a dev dependency"
    proc = subprocess.run(
        [exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_referenced_file_exists(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for host, _ in _bind_mounts(svc):
            assert host.exists(), f"{name}: bind mount source {host} does not exist"
        build = svc.get("build")
        if build:
            ctx = (COMPOSE_DIR / build["context"]).resolve()
            assert (ctx / build.get("dockerfile", "Dockerfile")).is_file(), name
            if "target" in build:
                stages = re.findall(
                    r"^FROM\s+\S+\s+AS\s+(\S+)",
                    (ctx / build.get("dockerfile", "Dockerfile")).read_text(),
                    re.M | re.I,
                )
                assert build["target"] in stages, f"{name}: no stage {build['target']}"
        for dep in svc.get("depends_on", []):
            assert dep in compose["services"], f"{name} depends on unknown {dep}"
        for net in svc.get("networks", []):
            assert net in compose.get("networks", {}), f"{name}: unknown network {net}"


def test_stack_shape(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"prometheus-central", "alertmanager", "grafana"} <= set(services)
    for region in REGIONS:
        agent = services[f"edgeprobe-{region}"]
        prom = services[f"prometheus-agent-{region}"]
        assert agent["labels"]["net.example.edgeprobe.region"] == region
        mounts = dict((c, h) for h, c in _bind_mounts(agent))
        cfg = mounts["/etc/edgeprobe/edgeprobe.yml"]
        assert cfg == ROOT / "deploy" / "agent" / f"{region}.yml"
        assert yaml.safe_load(cfg.read_text())["agent"]["region"] == region
        assert "--enable-feature=agent" in prom["command"]
        assert region in agent["networks"] and region in prom["networks"]
        assert "central" in prom["networks"] and "central" not in agent["networks"]
        # Configs are mounted, not baked in.
        assert all(":ro" in v for v in agent["volumes"])
    central = services["prometheus-central"]
    assert "--web.enable-remote-write-receiver" in central["command"]


def test_icmp_settings_per_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    modes = {}
    for region in REGIONS:
        svc = services[f"edgeprobe-{region}"]
        assert svc["cap_drop"] == ["ALL"], region
        assert svc["user"] == "10001:10001" and svc["read_only"] is True
        sysctl = (svc.get("sysctls") or {}).get("net.ipv4.ping_group_range")
        if sysctl is not None:
            # Unprivileged ICMP: the agent's group in the range, and not one capability.
            lo, hi = map(int, sysctl.split())
            assert lo <= 10001 <= hi and not svc.get("cap_add"), region
            assert "no-new-privileges:true" in svc.get("security_opt", [])
            modes[region] = "unprivileged"
        else:
            # CAP_NET_RAW only, as the netraw image's file capability; no-new-privileges
            # would keep the kernel from granting it.
            assert svc["cap_add"] == ["NET_RAW"] and svc["build"]["target"] == "netraw"
            assert "no-new-privileges:true" not in svc.get("security_opt", [])
            modes[region] = "privileged"
    assert set(modes.values()) == {"unprivileged", "privileged"}, "both ways are shown"


def _container_view(svc: dict[str, Any], root: Path) -> None:
    """Lay the service's bind mounts out under ``root`` as the container sees them."""
    for host, target in _bind_mounts(svc):
        dest = root / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if host.is_dir():
            shutil.copytree(host, dest, dirs_exist_ok=True)
        else:
            shutil.copy2(host, dest)


def _flag(cmd: list[str], name: str) -> str:
    for c in cmd:
        if c.startswith(f"{name}="):
            return c.split("=", 1)[1]
    raise AssertionError(f"{name} not in {cmd}")


def test_route_service(compose: dict[str, Any], tmp_path: Path) -> None:
    """edgeprobe route beside the central Prometheus: the agents' image, non-root, read-only
    root, its state on a named volume, its config pointing at the central Prometheus, scraped
    by it under the job the route alerts select."""
    services = compose["services"]
    svc = services["edgeprobe-route"]
    agent = services["edgeprobe-id-jakarta"]
    assert svc["image"] == agent["image"] and svc["build"] == agent["build"]
    assert svc["user"] == "10001:10001" and svc["read_only"] is True
    assert svc["cap_drop"] == ["ALL"] and not svc.get("cap_add") and not svc.get("sysctls")
    assert "no-new-privileges:true" in svc["security_opt"]
    cmd = svc["command"]
    assert cmd[0] == "route"
    listen = _flag(cmd, "--web.listen-address")
    port = listen.rsplit(":", 1)[1]
    assert f"127.0.0.1:{port}:{port}" in svc["ports"]
    assert f"127.0.0.1:{port}/-/healthy" in " ".join(svc["healthcheck"]["test"])
    assert "central" in svc["networks"] and "prometheus-central" in svc["depends_on"]
    assert all(v.endswith(":ro") for v in svc["volumes"] if v.startswith("."))
    # The config, as the container sees it.
    _container_view(svc, tmp_path)
    cfg_text = (tmp_path / _flag(cmd, "--config.file").lstrip("/")).read_text()
    cfg = yaml.safe_load(cfg_text)
    url = re.match(r"http://([^:/]+):(\d+)", cfg["prometheus"]["url"])
    assert url and url.group(1) == "prometheus-central" and url.group(2) == "9090"
    # The state file's directory is a named volume (the root is read-only).
    state_dir = str(Path(cfg["map"]["state_file"]).parent)
    named = {
        v.split(":")[1]: v.split(":")[0] for v in svc["volumes"] if not v.startswith((".", "/"))
    }
    assert state_dir in named and named[state_dir] in compose["volumes"]
    # The image makes that directory the user's, so a fresh named volume is writable.
    dockerfile = (COMPOSE_DIR / svc["build"]["context"] / "Dockerfile").read_text()
    assert f"install -d -o 10001 -g 10001 -m 0750 {state_dir}" in dockerfile
    # Scraped by the central Prometheus, as job edgeprobe-route.
    central = services["prometheus-central"]
    _container_view(central, tmp_path / "central")
    ccfg = yaml.safe_load(
        (tmp_path / "central" / _flag(central["command"], "--config.file").lstrip("/")).read_text()
    )
    (job,) = [j for j in ccfg["scrape_configs"] if j["job_name"] == "edgeprobe-route"]
    assert job["static_configs"][0]["targets"] == [f"edgeprobe-route:{port}"]
    assert set(svc["networks"]) & set(central["networks"])
    # The route's own strict loader, where the route is installed.
    settings = pytest.importorskip("agent.route.settings")
    assert (
        settings.loads(cfg_text, "edgeprobe-route.yml").map.state_file == cfg["map"]["state_file"]
    )


@pytest.mark.parametrize(
    "service", ["prometheus-central", *(f"prometheus-agent-{r}" for r in REGIONS)]
)
def test_prometheus_configs_as_mounted(
    compose: dict[str, Any], service: str, tmp_path: Path
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    svc = compose["services"][service]
    _container_view(svc, tmp_path)
    cfg_path = tmp_path / _flag(svc["command"], "--config.file").lstrip("/")
    proc = subprocess.run(
        [promtool, "check", "config", str(cfg_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg = yaml.safe_load(cfg_path.read_text())
    services = compose["services"]
    # Native histograms on both tiers: scraped and forwarded by the regional servers, stored by
    # the central one.
    assert "--enable-feature=native-histograms" in svc["command"]
    if service == "prometheus-central":
        # The rules really load (promtool found them through the mount).
        n_rule_files = len(list((ROOT / "deploy/prometheus/rules").glob("*.yml")))
        assert n_rule_files and f"SUCCESS: {n_rule_files} rule files found" in proc.stdout, (
            proc.stdout
        )
        am = cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0]
        assert am.split(":")[0] in services
        return
    region = service.removeprefix("prometheus-agent-")
    assert cfg["global"]["external_labels"] == {"region": region}
    assert "rule_files" not in cfg and "alerting" not in cfg  # agent mode evaluates nothing
    (job,) = cfg["scrape_configs"]
    assert "edgeprobe" in job["job_name"]
    (target,) = job["static_configs"][0]["targets"]
    assert target == f"edgeprobe-{region}:9798" and "labels" not in job["static_configs"][0]
    (rw,) = cfg["remote_write"]
    assert rw["send_native_histograms"] is True
    assert "--enable-feature=agent" in svc["command"]
    host = re.match(r"https?://([^:/]+)", rw["url"])
    assert host and host.group(1) in services and rw["url"].endswith("/api/v1/write")


def test_alertmanager_config_as_mounted(compose: dict[str, Any], tmp_path: Path) -> None:
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool is not installed")
    svc = compose["services"]["alertmanager"]
    _container_view(svc, tmp_path)
    cfg = tmp_path / _flag(svc["command"], "--config.file").lstrip("/")
    proc = subprocess.run(
        [amtool, "check-config", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Every severity the rules set has a route.
    rules_text = "".join(p.read_text() for p in (ROOT / "deploy/prometheus/rules").glob("*.yml"))
    severities = set(re.findall(r"^\s+severity:\s*(\w+)", rules_text, re.M))
    routed = json.dumps(yaml.safe_load(cfg.read_text())["route"])
    for sev in severities:
        assert sev in routed, f"severity {sev} has no route"


def test_grafana_provisioning_as_mounted(compose: dict[str, Any], tmp_path: Path) -> None:
    svc = compose["services"]["grafana"]
    _container_view(svc, tmp_path)
    prov = tmp_path / "etc/grafana/provisioning"
    (ds_file,) = list((prov / "datasources").glob("*.yml"))
    ds = yaml.safe_load(ds_file.read_text())["datasources"]
    assert ds[0]["url"] == "http://prometheus-central:9090"
    # The same uid as deploy/grafana's own data source, which the dashboards refer to.
    upstream = list((ROOT / "deploy/grafana/provisioning/datasources").glob("*.y*ml"))
    assert upstream, "deploy/grafana/provisioning/datasources/ is missing"
    uids = {d["uid"] for p in upstream for d in yaml.safe_load(p.read_text())["datasources"]}
    assert ds[0]["uid"] in uids
    # The dashboard provider's path holds the dashboards in the container.
    providers = [
        p
        for f in (prov / "dashboards").glob("*.y*ml")
        for p in yaml.safe_load(f.read_text())["providers"]
    ]
    assert providers
    for p in providers:
        path = tmp_path / p["options"]["path"].lstrip("/")
        dashboards = list(path.glob("*.json"))
        assert dashboards, f"no dashboards at {p['options']['path']} in the container"
        for d in dashboards:
            json.loads(d.read_text())


@pytest.mark.parametrize("region", REGIONS)
def test_agent_configs_load(region: str) -> None:
    # The agent's own strict loader: parsing and validation only, no name is resolved.
    from agent.config import load as cfgmod

    cfg = cfgmod.load(ROOT / "deploy" / "agent" / f"{region}.yml")
    assert cfg.agent.region == region
    for job in cfg.jobs:
        assert job.target.address.endswith(".example.net"), job.target.address
