"""/probe: every refusal proven, DNS rebind, rate limit, scrape timeout; real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import yaml
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from agent.config.decode import ConfigError, compose, decode_dataclass
from agent.server.probe.config import CATEGORIES, ProbeEndpointConfig, special_category
from agent.server.probe.handler import ProbeEndpoint, add_probe_route, modules_from_defaults
from agent.server.probe.policy import Refused, TargetPolicy, credential_fields, parse_target
from agent.server.probe.resolver import DnsResolver
from agent.server.ratelimit import ClientLimiter
from lab.forwarder import inside
from probes import PROBES
from probes.base import CommonOptions, ProbeContext, ProbeKind, ProbeResult, Target
from probes.connect import ConnectOptions as ConnectKindOptions
from probes.http import HttpOptions
from probes.turn import TurnOptions
from tests.helpers import ROOT, serve_app


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
                    asyncio.open_connection(target.address, opts.port), opts.timeout
                )
            except (OSError, TimeoutError):
                return ProbeResult.failure("refused")
            rtt = time.perf_counter() - t0
            w.close()
            await w.wait_closed()
            return ProbeResult(success=True, rtts=[rtt], phases={"connect": rtt})
        # Anything else is never contacted: the fake only records that it would have been.
        return ProbeResult(success=True, rtts=[0.01])

    return ProbeKind(
        name="tcp",
        options=ConnectOptions,
        run=run,
        packet_based=True,
        phases=("connect",),
        reasons=("refused",),
    )


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

    async def get(
        self,
        target: str | None = "edge-sg-1.example.net",
        module: str = "tcp",
        headers: dict[str, str] | None = None,
        local: str = "127.0.0.1",
    ) -> tuple[int, str]:
        params = {"module": module}
        if target is not None:
            params["target"] = target
        conn = aiohttp.TCPConnector(local_addr=(local, 0))
        async with (
            aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=10)) as s,
            s.get(self.url, params=params, headers=headers or {}) as r,
        ):
            return r.status, await r.text()


def metrics(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
    }


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
        ep = add_probe_route(
            app,
            ProbeEndpointConfig(**cfg),
            {"tcp": tcp_kind(rec)},
            modules_from_defaults({"tcp": ConnectOptions(timeout=2.0)}),
            ProbeContext(),
            resolver=resolver,
            clock=lambda: clock[0],
        )
        assert ep is not None
        runner, port = await serve_app(app)
        runners.append(runner)
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
        assert m[("probe_packets_sent", ())] == 1  # fresh registry: not 2 the second time
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
    for target in (
        "evil.example.org",
        "example.net",
        "xexample.net",
        "a.example.net.evil.org",
        "metadata.google.internal",
    ):
        status, body = await env.get(target)
        assert (status, body) == (403, "target refused: not in the allowlist\n"), target
    assert env.resolver.calls == [] and env.rec.targets == []


async def test_literal_outside_cidrs_is_refused(make_env: MakeEnv) -> None:
    env = await make_env(allow_cidrs=("203.0.113.0/25",), allow_special=("documentation",))
    assert (await env.get("203.0.113.200"))[0] == 403
    assert (await env.get("203.0.113.7"))[0] == 200
    assert env.rec.targets[-1].address == "203.0.113.7"


SPECIAL = [
    ("127.0.0.1", "loopback"),
    ("127.8.9.10", "loopback"),
    ("::1", "loopback"),
    ("169.254.169.254", "metadata"),
    ("fd00:ec2::254", "metadata"),
    ("169.254.170.2", "metadata"),
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("100.64.0.1", "cgnat"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("255.255.255.255", "reserved"),
    ("240.0.0.1", "reserved"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:169.254.169.254", "metadata"),
    ("64:ff9b::a9fe:a9fe", "metadata"),
    ("2002:7f00:1::1", "loopback"),
    ("2001:db8::1", "documentation"),
    ("198.51.100.1", "documentation"),
]


@pytest.mark.parametrize(("addr", "category"), SPECIAL)
async def test_special_addresses_are_refused(make_env: MakeEnv, addr: str, category: str) -> None:
    # Even with the whole address space allowlisted, and whether the client gives the
    # address or a name resolving to it.
    env = await make_env([[addr]], allow_cidrs=("0.0.0.0/0", "::/0"), allow_wide_cidrs=True)
    literal = f"[{addr}]" if ":" in addr else addr
    for target in (literal, "edge-sg-1.example.net"):
        status, body = await env.get(target)
        assert (status, body) == (403, f"target refused: {category} address\n"), target
    assert env.rec.targets == []


async def test_special_ranges_need_explicit_allowance(make_env: MakeEnv) -> None:
    env = await make_env([["10.1.2.3"]], allow_cidrs=("10.1.0.0/16", "169.254.0.0/16"))
    assert (await env.get("edge-sg-1.example.net"))[0] == 200  # 10.1/16 is explicit
    assert (await env.get("10.1.9.9"))[0] == 200
    assert (await env.get("10.2.0.1"))[0] == 403  # outside the CIDR
    assert (await env.get("169.254.1.1"))[0] == 200  # link-local, explicit
    # The metadata address is its own category: allowing link-local does not allow it.
    assert (await env.get("169.254.169.254")) == (403, "target refused: metadata address\n")

    env = await make_env([["127.0.0.1"]], allow_special=("loopback",))
    assert (await env.get("edge-sg-1.example.net"))[0] == 200
    env.resolver.answers = [["10.0.0.1"]]
    assert (await env.get("edge-sg-1.example.net"))[0] == 403


async def test_dns_rebind_cannot_switch_the_address(make_env: MakeEnv) -> None:
    # 203.0.113.7 (documentation range, allowed here) stands in for a public address; the
    # fake probe never contacts it.
    env = await make_env([["203.0.113.7"], ["127.0.0.1"]], allow_special=("documentation",))
    status, _ = await env.get()
    assert status == 200
    # Resolved once, and the probe got the checked literal, not the name to resolve again.
    assert env.resolver.calls == ["edge-sg-1.example.net"]
    assert env.rec.targets == [Target(name="edge-sg-1.example.net", address="203.0.113.7")]
    assert (await env.get()) == (403, "target refused: loopback address\n")
    assert len(env.rec.targets) == 1

    # One bad address among good ones refuses the whole name.
    env = await make_env([["203.0.113.7", "169.254.169.254"]], allow_special=("documentation",))
    assert (await env.get()) == (403, "target refused: metadata address\n")
    assert env.rec.targets == []


async def test_rate_limit_per_client(make_env: MakeEnv) -> None:
    env = await make_env(burst=2, rate=0.5, allow_special=("loopback",))
    assert (await env.get())[0] == 200
    assert (await env.get())[0] == 200
    assert (await env.get())[0] == 429
    assert (await env.get(local="127.0.0.2"))[0] == 200  # another client has its own bucket
    env.clock[0] += 2.0  # one token back at 0.5/s
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
    for t in (
        "http://user:pw@edge-sg-1.example.net/",
        "edge-sg-1.example.net:99999",
        "edge sg",
        "edge-sg-1.example.net/path",
    ):
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
    for text, match in (
        ("enabled: true", "needs allow_names"),
        ("allow_special: [everything]", "unknown category"),
        ("allowlist: []", "unknown key"),
        ("allow_cidrs: [10.0.0.1/8]", "host bits"),
        ("burst: true", "integer"),
        ("allow_names: ['*']", "invalid name"),
        ("timeout: 1h", "timeout"),
    ):
        with pytest.raises(ConfigError, match=match):
            decode_cfg(text)
    cfg = decode_cfg(
        "{enabled: true, allow_names: ['*.example.net'], allow_cidrs: [10.1.0.0/16],"
        " rate: 2, timeout: 5s}"
    )
    assert cfg.rate == 2.0 and cfg.timeout == 5.0
    assert cfg.networks == (ipaddress.ip_network("10.1.0.0/16"),)


def test_wide_allowlist_needs_opt_in_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    wide = ("0.0.0.0/0", "::/0", "198.50.0.0/15", "2001:db8::/47")
    for cidr in wide:
        with pytest.raises(
            ConfigError,
            match=re.escape("wider than /16 (IPv4) or /48 (IPv6); set allow_wide_cidrs: true"),
        ):
            decode_cfg(f"{{enabled: true, allow_cidrs: ['{cidr}']}}")
        with pytest.raises(ValueError, match="allow_wide_cidrs"):
            add_probe_route(
                web.Application(),
                ProbeEndpointConfig(enabled=True, allow_cidrs=(cidr,)),
                {},
                lambda m: None,
                ProbeContext(),
            )
    caplog.set_level(logging.WARNING, "edgeprobe.probe_endpoint")
    # At the limit: accepted, no warning.
    ok = decode_cfg("{enabled: true, allow_cidrs: [198.51.0.0/16, '2001:db8:1::/48']}")
    assert add_probe_route(web.Application(), ok, {}, lambda m: None, ProbeContext())
    assert not caplog.records
    # Wider, with the opt-in: accepted, and the start says so.
    cfg = decode_cfg(
        "{enabled: true, allow_wide_cidrs: true, allow_cidrs: ['" + "', '".join(wide) + "']}"
    )
    assert add_probe_route(web.Application(), cfg, {}, lambda m: None, ProbeContext())
    [rec] = caplog.records
    assert rec.levelno == logging.WARNING and "wide address ranges" in rec.getMessage()
    assert rec.cidrs == ",".join(wide)  # type: ignore[attr-defined]


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_parse_target(raw: str) -> None:
    with contextlib.suppress(Refused):
        host, port, _ = parse_target(raw)
        assert host and (port is None or 0 <= port <= 65535)


@settings(max_examples=1000, deadline=None)
@given(st.ip_addresses())
def test_fuzz_policy(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    policy = TargetPolicy(ProbeEndpointConfig(allow_cidrs=("0.0.0.0/0", "::/0")))
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


config_values = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=10)
    | st.lists(st.text(max_size=20), max_size=3)
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "enabled",
                "allow_names",
                "allow_cidrs",
                "allow_special",
                "rate",
                "burst",
                "timeout",
                "x",
            ]
        ),
        config_values,
    )
)
def test_fuzz_config(raw: dict[str, object]) -> None:
    with contextlib.suppress(ConfigError):
        decode_cfg(yaml.safe_dump(raw))


# ---------------------------------------------------------------------------------------------
# Credentials: the client picks host, port and path, so a module with a secret is refused.


@dataclass
class Listener:
    """What reached the loopback listeners: HTTP requests and UDP datagrams."""

    http_port: int
    udp_port: int
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    datagrams: list[bytes] = field(default_factory=list)


class _Sink(asyncio.DatagramProtocol):
    def __init__(self, got: list[bytes]) -> None:
        self.got = got

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.got.append(data)


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    got: list[tuple[str, dict[str, str]]] = []
    datagrams: list[bytes] = []

    async def record(request: web.Request) -> web.Response:
        got.append((request.path, dict(request.headers)))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner, port = await serve_app(app)
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: _Sink(datagrams), local_addr=("127.0.0.1", 0)
    )
    udp_port = transport.get_extra_info("sockname")[1]
    yield Listener(port, udp_port, got, datagrams)
    transport.close()
    await runner.cleanup()


SECRET = "s3cret-token-0f9a"


async def test_credentials_never_reach_a_client_chosen_target(
    listener: Listener, tmp_path: Path
) -> None:
    pw_file = tmp_path / "turn.pw"
    pw_file.write_text(SECRET)
    plain = HttpOptions(scheme="http", timeout=2.0, headers=("User-Agent: edgeprobe",))
    modules = modules_from_defaults(
        {
            "http": HttpOptions(
                scheme="http", timeout=2.0, headers=(f"Authorization: Bearer {SECRET}",)
            ),
            "turn": TurnOptions(timeout=0.5, username="edge", password=SECRET),
            "connect": ConnectKindOptions(
                timeout=0.5, turn=True, username="edge", password_file=str(pw_file)
            ),
        },
        {
            "http_plain": ("http", plain),
            "http_apikey": ("http", dataclasses.replace(plain, headers=(f"X-Api-Key: {SECRET}",))),
            "http_cookie": ("http", dataclasses.replace(plain, headers=(f"cookie: s={SECRET}",))),
            "turn_file": (
                "turn",
                TurnOptions(timeout=0.5, username="edge", password_file=str(pw_file)),
            ),
        },
    )
    app = web.Application()
    ep = add_probe_route(
        app,
        ProbeEndpointConfig(enabled=True, allow_cidrs=("127.0.0.0/16",), burst=100),
        PROBES,
        modules,
        ProbeContext(),
    )
    assert ep is not None
    runner, port = await serve_app(app)
    url = f"http://127.0.0.1:{port}/probe"
    http_target = f"http://127.0.0.1:{listener.http_port}/steal"
    udp_target = f"127.0.0.1:{listener.udp_port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:

            async def get(module: str, target: str) -> tuple[int, str]:
                async with s.get(url, params={"module": module, "target": target}) as r:
                    return r.status, await r.text()

            # Without a credential the client-chosen host, port and path are reached: the
            # listener sees what a module would send.
            status, body = await get("http_plain", http_target)
            assert status == 200 and metrics(body)[("probe_success", ())] == 1
            assert [p for p, _ in listener.requests] == ["/steal"]
            answers = {
                module: await get(module, target)
                for module, target in (
                    ("http", http_target),
                    ("http_apikey", http_target),
                    ("http_cookie", http_target),
                    ("turn", udp_target),
                    ("turn_file", udp_target),
                    ("connect", udp_target),
                )
            }
            await asyncio.sleep(0.2)  # a datagram or request in flight would have landed
    finally:
        await runner.cleanup()
    leaked = [(p, k) for p, h in listener.requests for k, v in h.items() if SECRET in v]
    assert leaked == [] and len(listener.requests) == 1
    assert listener.datagrams == []
    assert answers == dict.fromkeys(answers, (403, "module refused: it carries credentials\n"))
    assert ep.stats.requests["credentials"] == 6


def test_credential_fields() -> None:
    assert credential_fields(HttpOptions()) == []
    assert credential_fields(HttpOptions(headers=("Accept: */*", "user-agent: x"))) == []
    for h in (
        "Authorization: Basic eDp5",
        "Proxy-Authorization: x",
        "X-Edge-Pass: x",
        "Cookie: a=b",
        "x-api-key: k",
    ):
        assert credential_fields(HttpOptions(headers=(h,))) == ["headers"], h
    assert credential_fields(TurnOptions(username="u", password_file="/run/pw")) == [
        "username",
        "password_file",
    ]
    assert credential_fields(ConnectKindOptions()) == []
    assert credential_fields(ConnectKindOptions(password="p")) == ["password"]

    # A field added later is covered by its name.
    @dataclass(frozen=True)
    class Future(CommonOptions):
        client_cert: str = ""
        client_key_file: str = ""
        bearer_token_file: str = ""
        ca_file: str = ""
        key_log: bool = False

    assert credential_fields(Future(ca_file="ca.pem")) == []
    assert credential_fields(
        Future(client_cert="c", client_key_file="k", bearer_token_file="t", key_log=True)
    ) == ["client_cert", "client_key_file", "bearer_token_file", "key_log"]


# ---------------------------------------------------------------------------------------------
# /probe's own resolver, against a DNS server on loopback (this process's, never the host's).


class LoopbackDns(asyncio.DatagramProtocol):
    """Answers ``records`` at once, never answers a name ending in ``.silent.test``."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.queries: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        q = dns.message.from_wire(data)
        name = q.question[0].name.to_text(omit_final_dot=True).lower()
        self.queries.append(name)
        if name.endswith(".silent.test"):
            return
        r = dns.message.make_response(q)
        rdtype = q.question[0].rdtype
        for a in self.records.get(name, []):
            if (rdtype == dns.rdatatype.AAAA) == (":" in a):
                r.answer.append(
                    dns.rrset.from_text(
                        q.question[0].name, 60, "IN", dns.rdatatype.to_text(rdtype), a
                    )
                )
        if name not in self.records:
            r.set_rcode(dns.rcode.NXDOMAIN)
        self.transport.sendto(r.to_wire(), addr)


LoopbackEnv = tuple[LoopbackDns, Callable[..., DnsResolver]]


@pytest.fixture
async def loopback_dns(tmp_path: Path) -> AsyncIterator[LoopbackEnv]:
    server = LoopbackDns()
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: server, local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1\n")
    (tmp_path / "hosts").write_text(
        "127.0.0.1 localhost\n::1 localhost ip6-localhost\n"
        "203.0.113.9 Edge-H.example.net # from the hosts file\n"
    )

    def make(limit: int = 16, timeout: float = 5.0) -> DnsResolver:
        return DnsResolver(
            limit,
            timeout,
            hosts=tmp_path / "hosts",
            resolv_conf=tmp_path / "resolv.conf",
            port=port,
        )

    yield server, make
    transport.close()


async def test_resolver_hosts_file_then_dns(loopback_dns: LoopbackEnv, tmp_path: Path) -> None:
    server, make = loopback_dns
    server.records["edge-1.example.net"] = ["203.0.113.7", "2001:db8::7"]
    r = make()
    assert await r("edge-1.example.net", socket.AF_UNSPEC) == ["203.0.113.7", "2001:db8::7"]
    assert await r("edge-1.example.net.", socket.AF_INET6) == ["2001:db8::7"]
    assert await r("edge-1.example.net", socket.AF_INET) == ["203.0.113.7"]
    with pytest.raises(OSError):
        await r("gone.example.net", socket.AF_UNSPEC)
    n = len(server.queries)
    assert await r("localhost", socket.AF_UNSPEC) == ["127.0.0.1", "::1"]
    assert await r("edge-h.example.net", socket.AF_INET) == ["203.0.113.9"]
    assert len(server.queries) == n  # the hosts file answered, no query sent
    # Not in the hosts file for that family: DNS is asked.
    with pytest.raises(OSError):
        await r("edge-h.example.net", socket.AF_INET6)
    # The hosts file is read again when it changes.
    (tmp_path / "hosts").write_text("203.0.113.10 edge-h.example.net extra\n")
    assert await r("edge-h.example.net", socket.AF_UNSPEC) == ["203.0.113.10"]
    # No usable resolv.conf: DNS names fail, the hosts file still answers.
    (tmp_path / "resolv.conf").write_text("# nothing\n")
    with pytest.raises(OSError):
        await r("edge-1.example.net", socket.AF_UNSPEC)
    assert await r("extra", socket.AF_UNSPEC) == ["203.0.113.10"]


async def test_lookup_ends_with_its_request(loopback_dns: LoopbackEnv, make_env: MakeEnv) -> None:
    server, make = loopback_dns
    env = await make_env()
    resolver = make(limit=1)
    env.ep.resolver = resolver
    status, body = await env.get("x.example.net")
    assert status == 200  # NXDOMAIN from the server: a probe outcome
    assert metrics(body)[("probe_failed_due_to", (("reason", "resolve_failed"),))] == 1

    env = await make_env(allow_names=("*.silent.test",))
    env.ep.resolver = resolver
    status, body = await env.get(
        "edge.silent.test", headers={"X-Prometheus-Scrape-Timeout-Seconds": "1.2"}
    )
    assert status == 200
    assert metrics(body)[("probe_failed_due_to", (("reason", "resolve_failed"),))] == 1
    # The lookup was cancelled with the request (0.7 s budget), not left running: nothing in
    # flight, and no retry reaches the server after the answer (dnspython would resend
    # after its 1 s per-try timeout).
    assert resolver.in_flight == 0
    asked = len(server.queries)
    assert asked >= 1
    await asyncio.sleep(1.5)
    assert len(server.queries) == asked

    # The pool is bounded: with one lookup in flight, the next fails at once.
    slow = asyncio.create_task(resolver("a.silent.test", socket.AF_INET))
    await asyncio.sleep(0.1)
    with pytest.raises(OSError, match="too many"):
        await resolver("b.silent.test", socket.AF_INET)
    slow.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await slow
    assert resolver.in_flight == 0


# ---------------------------------------------------------------------------------------------
# A /probe flood against a slow resolver must not starve the agent's own name resolution.
# Everything runs in a network namespace this test creates: a small DNS server that answers
# the agent's own names at once and the flood's names only after DNS_DELAY, the agent as a
# subprocess, and the flood client (this process, switched into the namespace).

DNS_SERVER = r"""
import asyncio, json, signal, sys
import dns.message, dns.rcode, dns.rdatatype, dns.rrset

ADDR, DELAY = sys.argv[1], float(sys.argv[2])
counts = {"own": 0, "slow": 0}


class Server(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.t = transport

    def datagram_received(self, data, addr):
        try:
            q = dns.message.from_wire(data)
            name, rdtype = q.question[0].name, q.question[0].rdtype
        except Exception:
            return
        r = dns.message.make_response(q)
        text = name.to_text().lower()
        if text.endswith(".own.test."):
            counts["own"] += 1
            if rdtype == dns.rdatatype.A:
                r.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "127.0.0.1"))
            self.t.sendto(r.to_wire(), addr)
        elif text.endswith(".slow.test."):
            counts["slow"] += 1
            r.set_rcode(dns.rcode.NXDOMAIN)
            asyncio.get_running_loop().call_later(DELAY, self.t.sendto, r.to_wire(), addr)
        else:
            r.set_rcode(dns.rcode.NXDOMAIN)
            self.t.sendto(r.to_wire(), addr)


async def main():
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(Server, local_addr=(ADDR, 53))
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    print("READY", flush=True)
    await stop
    print(json.dumps(counts), flush=True)

asyncio.run(main())
"""

DNS_ADDR, DNS_DELAY = "127.0.0.53", 4.0
AGENT_PORT = 9115
OWN_NAMES = [f"own-{i}.own.test" for i in range(4)]


@contextlib.contextmanager
def netns() -> Iterator[str]:
    """A fresh network namespace (loopback up) whose resolv.conf points at DNS_ADDR."""
    name = f"eph11pe{os.getpid()}"
    etc = Path("/etc/netns") / name
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        etc.mkdir(parents=True)
        # glibc's defaults (5 s, 2 attempts) would make each slow lookup hold its thread
        # longer still; these keep the test short without changing what it shows.
        (etc / "resolv.conf").write_text(f"nameserver {DNS_ADDR}\noptions timeout:5 attempts:1\n")
        yield name
    finally:
        shutil.rmtree(etc, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def stop(p: subprocess.Popen[bytes]) -> bytes:
    if p.poll() is None:
        p.terminate()
    try:
        out, _ = p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
    return out or b""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2 for a network namespace",
)
async def test_probe_flood_does_not_starve_own_resolution(tmp_path: Path) -> None:
    (tmp_path / "dns_server.py").write_text(DNS_SERVER)
    targets = "".join(f"  - {{name: own-{i}, address: {n}}}\n" for i, n in enumerate(OWN_NAMES))
    (tmp_path / "edgeprobe.yml").write_text(
        "agent: {region: test, resolve_interval: 1s}\n"
        "defaults:\n  icmp: {interval: 250ms, packets: 1, timeout: 200ms}\n"
        "targets:\n"
        + targets
        + "probe_endpoint: {enabled: true, allow_names: ['*.slow.test'], rate: 1000,"
        " burst: 1000, max_concurrent: 16, timeout: 2s}\n"
    )
    flood_seconds, workers = 12.0, 32
    with netns() as ns:
        dns_proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                str(tmp_path / "dns_server.py"),
                DNS_ADDR,
                str(DNS_DELAY),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        agent_proc = None
        try:
            assert dns_proc.stdout is not None
            assert dns_proc.stdout.readline().strip() == b"READY"
            agent_proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    sys.executable,
                    "-m",
                    "agent",
                    "run",
                    f"--config.file={tmp_path / 'edgeprobe.yml'}",
                    f"--web.listen-address=127.0.0.1:{AGENT_PORT}",
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            base = f"http://127.0.0.1:{AGENT_PORT}"
            with inside(ns):
                async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=15), connector=aiohttp.TCPConnector(limit=0)
                ) as s:

                    async def own_counts() -> tuple[dict[str, float], dict[str, float]]:
                        async with s.get(f"{base}/metrics") as r:
                            m = metrics(await r.text())
                        sent = {
                            dict(lbl)["edge"]: v
                            for (n, lbl), v in m.items()
                            if n == "edgeprobe_packets_sent_total"
                        }
                        failed = {
                            dict(lbl)["edge"]: v
                            for (n, lbl), v in m.items()
                            if n == "edgeprobe_probe_errors_total"
                            and dict(lbl).get("reason") == "resolve_failed"
                        }
                        return sent, failed

                    # Up, and every own name resolved once.
                    for _ in range(200):
                        with contextlib.suppress(aiohttp.ClientError, KeyError):
                            sent, _f = await own_counts()
                            if len(sent) == len(OWN_NAMES) and min(sent.values()) > 0:
                                break
                        await asyncio.sleep(0.1)
                    else:
                        pytest.fail("the agent did not come up and probe its targets")
                    sent_before, failed_before = await own_counts()

                    answers: list[tuple[int, str]] = []
                    end = time.monotonic() + flood_seconds

                    async def flood(w: int) -> None:
                        for i in range(10_000):
                            if time.monotonic() >= end:
                                return
                            async with s.get(
                                f"{base}/probe",
                                params={"module": "icmp", "target": f"f{w}-{i}.slow.test"},
                            ) as r:
                                answers.append((r.status, await r.text()))
                            if r.status != 200:
                                await asyncio.sleep(0.05)  # refused at once: do not spin

                    await asyncio.gather(*(flood(w) for w in range(workers)))
                    # The agent's own names (cached 1 s, kept 1 s more after a failed
                    # refresh, 5 s per lookup) have needed several fresh lookups by now.
                    await asyncio.sleep(DNS_DELAY)
                    sent_after, failed_after = await own_counts()
        finally:
            if agent_proc is not None:
                stop(agent_proc)
            dns_counts = json.loads(stop(dns_proc).splitlines()[-1] or b"{}")

    statuses = {code: sum(1 for a, _ in answers if a == code) for code, _ in answers}
    own_failed = sum(failed_after.values()) - sum(failed_before.values())
    print(
        f"answers by status {statuses}, dns queries {dns_counts}, "
        f"own resolve_failed during the flood: {own_failed}"
    )
    # The flood was answered, each with a bounded outcome: refused (busy, rate limited), or
    # a failed resolution.
    assert answers and set(statuses) <= {200, 429, 503}
    for code, body in answers:
        if code == 200:
            assert metrics(body)[("probe_failed_due_to", (("reason", "resolve_failed"),))] == 1
    assert dns_counts["slow"] > 0
    assert dns_counts["own"] > 2 * len(OWN_NAMES)  # looked up again during the flood
    # The agent's own names kept resolving, and its probes kept running.
    assert own_failed == 0
    assert all(sent_after[e] > sent_before[e] for e in sent_before)
