"""The Kubernetes manifests (deploy/kubernetes/), checked without a cluster.

What is checked: every overlay, the cluster kustomization and the cap-net-raw component render
with the real kustomize (`kubectl kustomize`, kustomize v5 built into kubectl); the rendered
built-in kinds validate strictly against the Kubernetes 1.30 OpenAPI schemas
(kubernetes-validate, offline); the Deployment's promises (region pin, ICMP through the safe
sysctl or CAP_NET_RAW only, read-only root, requests and limits, probes, non-root); each
overlay's ConfigMap is the region's agent config and loads with the agent's loader; the
PrometheusRule is exactly what deploy/gen_prometheusrule.py makes of deploy/prometheus/rules/
(so the two cannot drift) and its groups pass `promtool check rules`; the PodMonitor selects the
agent pods' metrics port; and the reload path: the agent started with the Deployment's own
arguments picks up a ConfigMap change, swapped in the way the kubelet does it, without a
restart.

What is not: the prometheus-operator CRDs (PodMonitor, PrometheusRule) against their OpenAPI
schemas. No package here ships them (the PyPI "cloudcoil-models-prometheus-operator" has
pydantic models that ignore unknown fields, which would not catch a typo), so their fields are
checked structurally below, and the rules' content by promtool. Nor anything a cluster does:
admission, scheduling, the kubelet.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT, stop

K8S = ROOT / "deploy" / "kubernetes"
REGIONS = ("id-jakarta", "br-saopaulo", "ae-dubai")
KUBERNETES_VERSION = "1.30.0"
BUILTIN_GROUPS = ("v1", "apps/v1")


def _load_generator() -> Any:
    # deploy/ is not a package; load the script the way it runs, by path.
    spec = importlib.util.spec_from_file_location(
        "gen_prometheusrule", ROOT / "deploy" / "gen_prometheusrule.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen_prometheusrule = _load_generator()


def _kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    proc = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    out = {r: _kustomize(K8S / "overlays" / r) for r in REGIONS}
    out["cluster"] = _kustomize(K8S / "cluster")
    return out


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def test_builtin_kinds_validate_strictly(rendered: dict[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate

    seen = set()
    for name, docs in rendered.items():
        for d in docs:
            if d["apiVersion"] not in BUILTIN_GROUPS:
                continue
            try:
                kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name}: {d['kind']}/{d['metadata']['name']}: {e}")
            seen.add(d["kind"])
    assert seen == {"Deployment", "ConfigMap", "ServiceAccount", "Namespace"}


@pytest.mark.parametrize("region", REGIONS)
def test_overlay_deployment(rendered: dict[str, list[dict[str, Any]]], region: str) -> None:
    docs = rendered[region]
    dep = _one(docs, "Deployment")
    assert dep["metadata"]["name"] == f"edgeprobe-{region}"
    assert dep["metadata"]["namespace"] == "edgeprobe"
    pod = dep["spec"]["template"]["spec"]
    assert set(dep["spec"]["selector"]["matchLabels"].items()) <= set(
        dep["spec"]["template"]["metadata"]["labels"].items()
    )
    assert dep["spec"]["selector"]["matchLabels"]["edgeprobe.example.net/region"] == region
    assert pod["nodeSelector"]["topology.kubernetes.io/region"]
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    (sysctl,) = sc["sysctls"]
    assert sysctl["name"] == "net.ipv4.ping_group_range"
    lo, hi = map(int, sysctl["value"].split())
    assert lo <= sc["runAsGroup"] <= hi
    (agent,) = pod["containers"]
    for c in pod["containers"]:
        csc = c["securityContext"]
        assert csc["readOnlyRootFilesystem"] is True
        assert csc["allowPrivilegeEscalation"] is False
        assert csc["capabilities"] == {"drop": ["ALL"]}
        for k in ("cpu", "memory"):
            assert c["resources"]["requests"][k] and c["resources"]["limits"][k]
    port = agent["ports"][0]
    assert port["name"] == "metrics"
    assert agent["livenessProbe"]["httpGet"] == {"path": "/-/healthy", "port": "metrics"}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/-/ready", "port": "metrics"}
    assert "--config.file=/etc/edgeprobe/edgeprobe.yml" in agent["args"]
    assert f"--web.listen-address=:{port['containerPort']}" in agent["args"]
    assert "--config.watch" in agent["args"]
    # The ConfigMap is mounted as a directory: a subPath mount never sees updates.
    (mount,) = [m for m in agent["volumeMounts"] if m["mountPath"] == "/etc/edgeprobe"]
    assert "subPath" not in mount
    (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    cm = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == vol["configMap"]["name"]
    ]
    assert len(cm) == 1, "the volume's ConfigMap is rendered (updated in place, no hash)"
    assert cm[0]["metadata"]["namespace"] == "edgeprobe"
    assert cm[0]["data"]["edgeprobe.yml"] == (ROOT / "deploy/agent" / f"{region}.yml").read_text()


@pytest.mark.parametrize("region", REGIONS)
def test_overlay_config_is_the_region_config(region: str) -> None:
    from agent.config import load as cfgmod

    copy = K8S / "overlays" / region / "edgeprobe.yml"
    source = ROOT / "deploy" / "agent" / f"{region}.yml"
    assert copy.read_text() == source.read_text(), f"cp {source} {copy}"
    assert cfgmod.load(copy).agent.region == region


def test_regions_do_not_overlap(rendered: dict[str, list[dict[str, Any]]]) -> None:
    names: set[str] = set()
    for region in REGIONS:
        for d in rendered[region]:
            key = f"{d['kind']}/{d['metadata'].get('namespace', '')}/{d['metadata']['name']}"
            assert key not in names, f"{key} is in two overlays"
            names.add(key)
    pins = {
        _one(rendered[r], "Deployment")["spec"]["template"]["spec"]["nodeSelector"][
            "topology.kubernetes.io/region"
        ]
        for r in REGIONS
    }
    assert len(pins) == len(REGIONS)


def test_cap_net_raw_component(tmp_path: Path) -> None:
    rel = os.path.relpath(K8S, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{rel}/overlays/ae-dubai]\ncomponents: [{rel}/components/cap-net-raw]\n"
    )
    docs = _kustomize(tmp_path)
    import kubernetes_validate

    dep = _one(docs, "Deployment")
    kubernetes_validate.validate(dep, KUBERNETES_VERSION, strict=True)
    pod = dep["spec"]["template"]["spec"]
    assert "sysctls" not in pod["securityContext"]
    (agent,) = pod["containers"]
    assert agent["image"].endswith("-netraw")
    caps = agent["securityContext"]["capabilities"]
    assert caps == {"drop": ["ALL"], "add": ["NET_RAW"]}
    # The file capability needs exec without no_new_privs.
    assert agent["securityContext"]["allowPrivilegeEscalation"] is True


# --- prometheus-operator resources ----------------------------------------------------------


def test_prometheusrule_is_generated_from_the_rule_files() -> None:
    files = gen_prometheusrule.rule_files()
    assert [p.name for p in files] == sorted(
        p.name for p in (ROOT / "deploy/prometheus/rules").glob("*.y*ml")
    )
    committed = gen_prometheusrule.OUTPUT.read_text()
    assert committed == gen_prometheusrule.render(files), (
        "deploy/kubernetes/cluster/prometheusrule.yaml is stale: "
        "run python deploy/gen_prometheusrule.py"
    )
    # And, independent of formatting, the same rules in the same order.
    rule = yaml.safe_load(committed)
    expected = [g for p in files for g in yaml.safe_load(p.read_text())["groups"]]
    assert rule["spec"]["groups"] == expected


def test_prometheusrule_groups_pass_promtool(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    rule = _one(rendered["cluster"], "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(rule["spec"]) == {"groups"}
    f = tmp_path / "rules.yml"
    f.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    proc = subprocess.run(
        [promtool, "check", "rules", str(f)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_generator_rejects_duplicate_groups_and_odd_files(tmp_path: Path) -> None:
    a = tmp_path / "a.yml"
    b = tmp_path / "b.yml"
    a.write_text("groups:\n  - name: g\n    rules:\n      - record: x:y\n        expr: '1'\n")
    b.write_text("groups:\n  - name: g\n    rules: []\n")
    text = gen_prometheusrule.render([a])
    doc = yaml.safe_load(text)
    assert doc["kind"] == "PrometheusRule" and doc["spec"]["groups"][0]["name"] == "g"
    assert text.startswith("# GENERATED")
    with pytest.raises(gen_prometheusrule.RulesError, match="also in"):
        gen_prometheusrule.render([a, b])
    b.write_text("groups: []\nextra: 1\n")
    with pytest.raises(gen_prometheusrule.RulesError, match="only `groups:`"):
        gen_prometheusrule.render([b])


# The PodMonitor fields used here, from the prometheus-operator API reference
# (monitoring.coreos.com/v1 PodMonitorSpec / PodMetricsEndpoint), hand-written: no package here
# ships the CRD schema.
PODMONITOR_SPEC_KEYS = {
    "selector",
    "podMetricsEndpoints",
    "namespaceSelector",
    "jobLabel",
    "podTargetLabels",
    "sampleLimit",
}
PODMETRICSENDPOINT_KEYS = {
    "port",
    "path",
    "interval",
    "scrapeTimeout",
    "scheme",
    "relabelings",
    "metricRelabelings",
    "honorLabels",
}


def test_podmonitor_selects_the_agents(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pm = _one(rendered["cluster"], "PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["metadata"]["namespace"] == "edgeprobe"
    assert set(pm["spec"]) <= PODMONITOR_SPEC_KEYS
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert set(ep) <= PODMETRICSENDPOINT_KEYS
    # A `region` target label would clash with the agent's own (exported_region).
    assert not ep.get("honorLabels") and "relabelings" not in ep
    assert re.fullmatch(r"\d+s", ep["interval"]) and re.fullmatch(r"\d+s", ep["scrapeTimeout"])
    assert int(ep["scrapeTimeout"][:-1]) < int(ep["interval"][:-1])
    sel = pm["spec"]["selector"]["matchLabels"]
    for region in REGIONS:
        dep = _one(rendered[region], "Deployment")
        assert dep["metadata"]["namespace"] == pm["metadata"]["namespace"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert set(sel.items()) <= set(labels.items()), region
        ports = {
            p["name"]
            for c in dep["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        assert ep["port"] in ports
    # The agent alerts select up{job=~".*edgeprobe.*"}; the operator's job is namespace/name.
    assert "edgeprobe" in f"{pm['metadata']['namespace']}/{pm['metadata']['name']}"


# --- reload without a restart ---------------------------------------------------------------

LOOPBACK_CONFIG = """\
agent:
  region: {region}
defaults:
  icmp: {{interval: 1s, packets: 2, spacing: 20ms, timeout: 500ms}}
targets:
{targets}
"""


def _config(region: str, n_targets: int) -> str:
    targets = "".join(
        f"  - name: lo-{i}\n    address: 127.0.0.{i + 1}\n    probes: [icmp]\n"
        for i in range(n_targets)
    )
    return LOOPBACK_CONFIG.format(region=region, targets=targets)


def _kubelet_write(volume: Path, files: dict[str, str], serial: int) -> None:
    """Update a ConfigMap volume the way the kubelet's AtomicWriter does: a new timestamped
    directory, the ..data symlink swapped to it by rename, user-visible names linking through
    ..data."""
    new = volume / f"..2026_01_01_00_00_{serial:02d}.000000000"
    new.mkdir()
    for name, text in files.items():
        (new / name).write_text(text)
    tmp = volume / "..data_tmp"
    tmp.symlink_to(new.name)
    old = os.readlink(volume / "..data") if (volume / "..data").is_symlink() else None
    tmp.replace(volume / "..data")
    for name in files:
        link = volume / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    if old:
        shutil.rmtree(volume / old)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metric(port: int, pattern: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            body = r.read().decode()
    except OSError:
        return None
    m = re.search(pattern + r" (\S+)$", body, re.M)
    return float(m.group(1)) if m else None


@pytest.mark.slow
def test_configmap_change_is_applied_without_restart(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    edgeprobe = Path(sys.executable).parent / "edgeprobe"
    if not edgeprobe.exists():
        pytest.skip("the edgeprobe console script is not installed in this venv")
    dep = _one(rendered["id-jakarta"], "Deployment")
    (agent,) = dep["spec"]["template"]["spec"]["containers"]
    volume = tmp_path / "etc-edgeprobe"
    volume.mkdir()
    _kubelet_write(volume, {"edgeprobe.yml": _config("id-jakarta", 1)}, 1)
    port = _free_port()
    # The Deployment's own arguments; only the mount point and the listen address (loopback,
    # a free port) are moved.
    args = [a.replace("/etc/edgeprobe", str(volume)) for a in agent["args"]]
    args = [
        f"--web.listen-address=127.0.0.1:{port}" if a.startswith("--web.listen-address=") else a
        for a in args
    ]
    log = tmp_path / "agent.log"
    targets = r'^edgeprobe_targets\{[^}]*probe="icmp"[^}]*\}'
    with log.open("wb") as logf:
        proc = subprocess.Popen([str(edgeprobe), *args], stdout=logf, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while _metric(port, targets) != 1.0:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        _kubelet_write(volume, {"edgeprobe.yml": _config("id-jakarta", 3)}, 2)
        # The agent polls every 2 s; allow a few periods.
        deadline = time.monotonic() + 20
        while _metric(port, targets) != 3.0:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "change not applied in 20 s:\n" + log.read_text()
            time.sleep(0.2)
        assert _metric(port, r"^edgeprobe_config_last_reload_successful(?:{[^}]*})?") == 1.0
        assert proc.poll() is None, "the agent restarted"
    finally:
        stop(proc)


# --- edgeprobe route ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def route_docs() -> list[dict[str, Any]]:
    return _kustomize(K8S / "route")


def test_route_builtin_kinds_validate_strictly(route_docs: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    kinds = set()
    for d in route_docs:
        if d["apiVersion"] in BUILTIN_GROUPS:
            try:
                kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{d['kind']}/{d['metadata']['name']}: {e}")
        kinds.add(d["kind"])
    assert kinds == {
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "ConfigMap",
        "ServiceAccount",
        "PodMonitor",
    }
    assert {d["metadata"]["namespace"] for d in route_docs} == {"edgeprobe"}


def test_route_deployment(route_docs: list[dict[str, Any]]) -> None:
    """The same image, non-root, read-only root, its state on a claim that survives a new pod,
    one replica, and a config that is the route's own and points at the state volume."""
    dep = _one(route_docs, "Deployment")
    spec = dep["spec"]
    # One incumbent per region: one replica, and the RWO claim never has two writers.
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["fsGroup"] == sc["runAsGroup"] == 10001
    assert sc["seccompProfile"]["type"] == "RuntimeDefault" and "sysctls" not in sc
    assert pod["automountServiceAccountToken"] is False
    (c,) = pod["containers"]
    agent = _one(_kustomize(K8S / "overlays" / "id-jakarta"), "Deployment")
    assert c["image"] == agent["spec"]["template"]["spec"]["containers"][0]["image"]
    csc = c["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True and csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    for k in ("cpu", "memory"):
        assert c["resources"]["requests"][k] and c["resources"]["limits"][k]
    assert c["args"][0] == "route"
    (port,) = c["ports"]
    assert f"--web.listen-address=:{port['containerPort']}" in c["args"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/-/healthy", "port": port["name"]}
    assert c["readinessProbe"]["httpGet"] == {"path": "/-/ready", "port": port["name"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # The config: a file of the mounted ConfigMap.
    cfg_path = Path(next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--config.file=")))
    cfg_mount = mounts[str(cfg_path.parent)]
    assert cfg_mount["readOnly"] is True
    cm_name = volumes[cfg_mount["name"]]["configMap"]["name"]
    cm = next(
        d for d in route_docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name
    )
    text = cm["data"][cfg_path.name]
    assert text == (K8S / "route" / "edgeprobe-route.yml").read_text()
    cfg = yaml.safe_load(text)
    # The state file is on the claim, not on the (read-only) root or an emptyDir.
    state = Path(cfg["map"]["state_file"])
    state_mount = mounts[str(state.parent)]
    assert "readOnly" not in state_mount
    claim = volumes[state_mount["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = _one(route_docs, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == claim and pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert cfg["prometheus"]["url"].startswith("http")
    # The route's own strict loader, where the route is installed.
    settings = pytest.importorskip("agent.route.settings")
    loaded = settings.loads(text, "edgeprobe-route.yml")
    assert loaded.map.state_file == str(state)


def test_route_service_and_podmonitor(route_docs: list[dict[str, Any]]) -> None:
    dep = _one(route_docs, "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    svc = _one(route_docs, "Service")
    assert set(svc["spec"]["selector"].items()) <= set(labels.items())
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    pm = _one(route_docs, "PodMonitor")
    assert set(pm["spec"]) <= PODMONITOR_SPEC_KEYS
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert set(ep) <= PODMETRICSENDPOINT_KEYS and ep["port"] in ports
    assert set(pm["spec"]["selector"]["matchLabels"].items()) <= set(labels.items())
    # The route alerts select this job; the agent alerts and the agents' PodMonitor do not.
    job = f"{pm['metadata']['namespace']}/{pm['metadata']['name']}"
    assert re.fullmatch(".*edgeprobe-route.*", job)
    agents_pm = _one(_kustomize(K8S / "cluster"), "PodMonitor")
    assert not set(agents_pm["spec"]["selector"]["matchLabels"].items()) <= set(labels.items())
