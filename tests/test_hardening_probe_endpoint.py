"""/probe: every refusal proven, DNS rebind, rate limit, scrape timeout; real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from agent.decode import ConfigError, compose, decode_dataclass
from agent.probe_endpoint import (
    CATEGORIES,
    ClientLimiter,
    ProbeEndpoint,
    ProbeEndpointConfig,
    Refused,
    TargetPolicy,
    add_probe_route,
    modules_from_defaults,
    parse_target,
    special_category,
)
from probes.base import CommonOptions, ProbeContext, ProbeKind, ProbeResult, Target


@dataclass(frozen=True)
class ConnectOptions(CommonOptions):
    port: int = 0


@dataclass
class Recorder:
    targets: list[Target] = field(default_factory=list)
    opts: list[ConnectOptions] = field(default_factory=list)
    sleep: float = 0.0


def tcp_kind(rec: Recorder) -> ProbeKind[ConnectOptions]:
    """A real TCP connect probe (loopback only in these tests) that records its inputs."""

    async def run(target: Target, opts: ConnectOptions, ctx: ProbeContext) -> ProbeResult:
        rec.targets.append(target)
        rec.opts.append(opts)
        if rec.sleep:
            await asyncio.sleep(rec.sleep)
        if ipaddress.ip_address(target.address).is_loopback and opts.port:
            t0 = time.perf_counter()
            try:
                _, w = await asyncio.wait_for(
                    asyncio.open_connection(target.address, opts.port), opts.timeout)
            except (OSError, TimeoutError):
                return ProbeResult.failure("refused")
            rtt = time.perf_counter() - t0
            w.close()
            await w.wait_closed()
            return ProbeResult(success=True, rtts=[rtt], phases={"connect": rtt})
        # Anything else is never contacted: the fake only records that it would have been.
        return ProbeResult(success=True, rtts=[0.01])

    return ProbeKind(name="tcp", options=ConnectOptions, run=run, packet_based=True,
                     phases=("connect",), reasons=("refused",))


class FakeResolver:
    def __init__(self, answers: list[list[str]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def __call__(self, host: str, family: int) -> list[str]:
        self.calls.append(host)
        ans = self.answers[min(len(self.calls) - 1, len(self.answers) - 1)]
        if not ans:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return ans


@dataclass
class Env:
    url: str
    rec: Recorder
    ep: ProbeEndpoint
    resolver: FakeResolver
    clock: list[float]

    async def get(self, target: str | None = "edge-sg-1.example.net", module: str = "tcp",
                  headers: dict[str, str] | None = None, local: str = "127.0.0.1"
                  ) -> tuple[int, str]:
        params = {"module": module}
        if target is not None:
            params["target"] = target
        conn = aiohttp.TCPConnector(local_addr=(local, 0))
        async with aiohttp.ClientSession(connector=conn,
                                         timeout=aiohttp.ClientTimeout(total=10)) as s, \
                s.get(self.url, params=params, headers=headers or {}) as r:
            return r.status, await r.text()


def metrics(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


MakeEnv = Callable[..., Awaitable[Env]]


@pytest.fixture
async def make_env() -> AsyncIterator[MakeEnv]:
    runners: list[web.AppRunner] = []

    async def make(answers: list[list[str]] | None = None, **cfg: Any) -> Env:
        cfg.setdefault("enabled", True)
        cfg.setdefault("allow_names", ("*.example.net",))
        cfg.setdefault("burst", 100)
        rec = Recorder()
        resolver = FakeResolver(answers if answers is not None else [["127.0.0.1"]])
        clock = [0.0]
        app = web.Application()
        ep = add_probe_route(app, ProbeEndpointConfig(**cfg), {"tcp": tcp_kind(rec)},
                             modules_from_defaults({"tcp": ConnectOptions(timeout=2.0)}),
                             ProbeContext(), resolver=resolver, clock=lambda: clock[0])
        assert ep is not None
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return Env(f"http://127.0.0.1:{port}/probe", rec, ep, resolver, clock)

    yield make
    for r in runners:
        await r.cleanup()


@pytest.fixture
async def tcp_server() -> AsyncIterator[int]:
    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_allowed_probe_returns_fresh_metrics(make_env: MakeEnv, tcp_server: int) -> None:
    env = await make_env(allow_special=("loopback",))
    for _ in range(2):
        status, body = await env.get(f"edge-sg-1.example.net:{tcp_server}")
        assert status == 200, body
        m = metrics(body)
        assert m[("probe_success", ())] == 1
        assert m[("probe_packets_sent", ())] == 1    # fresh registry: not 2 the second time
        assert m[("probe_ip_protocol", ())] == 4
        assert m[("probe_failed_due_to", (("reason", "refused"),))] == 0
    assert env.rec.targets[0] == Target(name="edge-sg-1.example.net", address="127.0.0.1")
    assert env.rec.opts[0].port == tcp_server


async def test_disabled_by_default() -> None:
    app = web.Application()
    assert ProbeEndpointConfig().enabled is False
    assert add_probe_route(app, ProbeEndpointConfig(), {}, lambda m: None, ProbeContext()) is None
    assert not [r for r in app.router.routes() if r.resource and r.resource.canonical == "/probe"]


async def test_name_outside_allowlist_is_refused_before_resolving(make_env: MakeEnv) -> None:
    env = await make_env(allow_special=CATEGORIES)
    for target in ("evil.example.org", "example.net", "xexample.net", "a.example.net.evil.org",
                   "metadata.google.internal"):
        status, body = await env.get(target)
        assert (status, body) == (403, "target refused: not in the allowlist\n"), target
    assert env.resolver.calls == [] and env.rec.targets == []


async def test_literal_outside_cidrs_is_refused(make_env: MakeEnv) -> None:
    env = await make_env(allow_cidrs=("203.0.113.0/25",),
                         allow_special=("documentation",))
    assert (await env.get("203.0.113.200"))[0] == 403
    assert (await env.get("203.0.113.7"))[0] == 200
    assert env.rec.targets[-1].address == "203.0.113.7"


SPECIAL = [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("169.254.169.254", "metadata"), ("fd00:ec2::254", "metadata"),
    ("169.254.170.2", "metadata"), ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
    ("fc00::1", "private"), ("fd12:3456::1", "private"), ("100.64.0.1", "cgnat"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("0.0.0.0", "unspecified"),
    ("::", "unspecified"), ("255.255.255.255", "reserved"), ("240.0.0.1", "reserved"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "metadata"),
    ("64:ff9b::a9fe:a9fe", "metadata"), ("2002:7f00:1::1", "loopback"),
    ("2001:db8::1", "documentation"), ("198.51.100.1", "documentation"),
]


@pytest.mark.parametrize(("addr", "category"), SPECIAL)
async def test_special_addresses_are_refused(make_env: MakeEnv, addr: str, category: str
                                             ) -> None:
    # Even with the whole address space allowlisted, and whether the client gives the
    # address or a name resolving to it.
    env = await make_env([[addr]], allow_cidrs=("0.0.0.0/0",
                                                "::/0"))
    literal = f"[{addr}]" if ":" in addr else addr
    for target in (literal, "edge-sg-1.example.net"):
        status, body = await env.get(target)
        assert (status, body) == (403, f"target refused: {category} address\n"), target
    assert env.rec.targets == []


async def test_special_ranges_need_explicit_allowance(make_env: MakeEnv) -> None:
    env = await make_env([["10.1.2.3"]], allow_cidrs=("10.1.0.0/16",
                                                      "169.254.0.0/16"))
    assert (await env.get("edge-sg-1.example.net"))[0] == 200       # 10.1/16 is explicit
    assert (await env.get("10.1.9.9"))[0] == 200
    assert (await env.get("10.2.0.1"))[0] == 403                    # outside the CIDR
    assert (await env.get("169.254.1.1"))[0] == 200                 # link-local, explicit
    # The metadata address is its own category: allowing link-local does not allow it.
    assert (await env.get("169.254.169.254")) == (403, "target refused: metadata address\n")

    env = await make_env([["127.0.0.1"]], allow_special=("loopback",))
    assert (await env.get("edge-sg-1.example.net"))[0] == 200
    env.resolver.answers = [["10.0.0.1"]]
    assert (await env.get("edge-sg-1.example.net"))[0] == 403


async def test_dns_rebind_cannot_switch_the_address(make_env: MakeEnv) -> None:
    # 203.0.113.7 (documentation range, allowed here) stands in for a public address; the
    # fake probe never contacts it.
    env = await make_env([["203.0.113.7"], ["127.0.0.1"]],
                         allow_special=("documentation",))
    status, _ = await env.get()
    assert status == 200
    # Resolved once, and the probe got the checked literal, not the name to resolve again.
    assert env.resolver.calls == ["edge-sg-1.example.net"]
    assert env.rec.targets == [Target(name="edge-sg-1.example.net", address="203.0.113.7")]
    assert (await env.get()) == (403, "target refused: loopback address\n")
    assert len(env.rec.targets) == 1

    # One bad address among good ones refuses the whole name.
    env = await make_env([["203.0.113.7", "169.254.169.254"]],
                         allow_special=("documentation",))
    assert (await env.get()) == (403, "target refused: metadata address\n")
    assert env.rec.targets == []


async def test_rate_limit_per_client(make_env: MakeEnv) -> None:
    env = await make_env(burst=2, rate=0.5, allow_special=("loopback",))
    assert (await env.get())[0] == 200
    assert (await env.get())[0] == 200
    assert (await env.get())[0] == 429
    assert (await env.get(local="127.0.0.2"))[0] == 200   # another client has its own bucket
    env.clock[0] += 2.0                                    # one token back at 0.5/s
    assert (await env.get())[0] == 200
    assert (await env.get())[0] == 429
    assert env.ep.stats.requests["rate_limited"] == 2


def test_limiter_memory_is_bounded() -> None:
    lim = ClientLimiter(rate=1.0, burst=1, max_clients=100, clock=lambda: 0.0)
    for i in range(10_000):
        lim.allow(f"10.0.{i // 256}.{i % 256}")
    assert len(lim) == 100


async def test_scrape_timeout_header(make_env: MakeEnv) -> None:
    env = await make_env(allow_special=("loopback",))
    env.rec.sleep = 5.0
    t0 = time.monotonic()
    status, body = await env.get(headers={"X-Prometheus-Scrape-Timeout-Seconds": "1.2"})
    elapsed = time.monotonic() - t0
    assert status == 200
    assert metrics(body)[("probe_failed_due_to", (("reason", "deadline"),))] == 1
    # 1.2 s scrape timeout - 0.5 s offset = 0.7 s budget; generous upper bound for CI jitter.
    assert 0.6 < elapsed < 1.15
    assert env.rec.opts[0].timeout == pytest.approx(0.7, abs=0.05)
    for bad in ("abc", "0", "-1", "nan", "inf"):
        assert (await env.get(headers={"X-Prometheus-Scrape-Timeout-Seconds": bad}))[0] == 400


async def test_bad_requests(make_env: MakeEnv) -> None:
    env = await make_env()
    assert await env.get(target=None) == (400, "target parameter is missing\n")
    assert await env.get(module="nope") == (400, "unknown module\n")
    for t in ("http://user:pw@edge-sg-1.example.net/", "edge-sg-1.example.net:99999",
              "edge sg", "edge-sg-1.example.net/path"):
        assert (await env.get(t))[0] == 400, t


async def test_unresolvable_name_is_a_probe_failure(make_env: MakeEnv) -> None:
    env = await make_env([[]])
    status, body = await env.get()
    assert status == 200
    m = metrics(body)
    assert m[("probe_success", ())] == 0
    assert m[("probe_failed_due_to", (("reason", "resolve_failed"),))] == 1


async def test_concurrency_limit(make_env: MakeEnv) -> None:
    env = await make_env(max_concurrent=1, allow_special=("loopback",))
    env.rec.sleep = 0.5
    first = asyncio.create_task(env.get())
    await asyncio.sleep(0.2)
    assert await env.get() == (503, "too many probes in flight\n")
    assert (await first)[0] == 200


def decode_cfg(text: str) -> ProbeEndpointConfig:
    node = compose(text)
    assert node is not None
    cfg: ProbeEndpointConfig = decode_dataclass(ProbeEndpointConfig, node, "probe_endpoint")
    return cfg


def test_config_validation() -> None:
    for text, match in (("enabled: true", "needs allow_names"),
                        ("allow_special: [everything]", "unknown category"),
                        ("allowlist: []", "unknown key"),
                        ("allow_cidrs: [10.0.0.1/8]", "host bits"),
                        ("burst: true", "integer"),
                        ("allow_names: ['*']", "invalid name"),
                        ("timeout: 1h", "timeout")):
        with pytest.raises(ConfigError, match=match):
            decode_cfg(text)
    cfg = decode_cfg("{enabled: true, allow_names: ['*.example.net'], allow_cidrs: [10.0.0.0/8],"
                     " rate: 2, timeout: 5s}")
    assert cfg.rate == 2.0 and cfg.timeout == 5.0
    assert cfg.networks == (ipaddress.ip_network("10.0.0.0/8"),)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_parse_target(raw: str) -> None:
    with contextlib.suppress(Refused):
        host, port, _ = parse_target(raw)
        assert host and (port is None or 0 <= port <= 65535)


@settings(max_examples=1000, deadline=None)
@given(st.ip_addresses())
def test_fuzz_policy(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    policy = TargetPolicy(ProbeEndpointConfig(
        allow_cidrs=("0.0.0.0/0", "::/0")))
    special = special_category(addr) is not None
    try:
        policy.check_address(addr, literal=True)
        refused = False
    except Refused:
        refused = True
    assert refused == special
    # Python's own idea of "not global" must never slip through as allowed, whatever the
    # category table says.
    if not addr.is_global and not refused:
        pytest.fail(f"{addr} is not global but was allowed")


config_values = st.none() | st.booleans() | st.integers() | st.floats() \
    | st.text(max_size=10) | st.lists(st.text(max_size=20), max_size=3)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["enabled", "allow_names", "allow_cidrs",
                                        "allow_special", "rate", "burst", "timeout", "x"]),
                       config_values))
def test_fuzz_config(raw: dict[str, object]) -> None:
    with contextlib.suppress(ConfigError):
        decode_cfg(yaml.safe_dump(raw))
