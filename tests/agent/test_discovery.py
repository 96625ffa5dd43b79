"""Target discovery: file_sd, http_sd, DNS SRV; good, bad and unreachable sources on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
import yaml
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from agent.config.decode import ConfigError, Duration, compose, decode_dataclass
from agent.discovery.config import (
    BasicAuth,
    DiscoveryConfig,
    DnsSDConfig,
    FileSDConfig,
    HttpSDConfig,
)
from agent.discovery.groups import (
    DiscoveredTarget,
    SDError,
    decode_sd_text,
    merge_targets,
    parse_groups,
    split_host_port,
)
from agent.discovery.http_sd import HttpSD
from agent.discovery.manager import Discovery
from probes.base import Target
from tests.helpers import serve_app


@dataclass
class Changes:
    calls: list[tuple[str, list[DiscoveredTarget]]] = field(default_factory=list)

    def __call__(self, source: str, targets: list[DiscoveredTarget]) -> None:
        self.calls.append((source, targets))

    def names(self) -> list[str]:
        return [t.target.name for t in self.calls[-1][1]] if self.calls else []


async def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def sample(d: Discovery, name: str, **labels: str) -> float:
    reg = CollectorRegistry()
    reg.register(d)
    v = reg.get_sample_value(name, labels)
    assert v is not None, (name, labels)
    return v


# --------------------------------------------------------------------------------------------
# file_sd


async def test_file_sd_watch_and_keep_last_good(tmp_path: Path) -> None:
    a = tmp_path / "a.json"
    b = tmp_path / "b.yml"
    a.write_text(
        json.dumps(
            [
                {
                    "targets": ["edge-sg-1.example.net", "edge-sg-2.example.net:3478"],
                    "labels": {"tier": "near", "__meta_x": "dropped"},
                }
            ]
        )
    )
    b.write_text(
        yaml.safe_dump(
            [
                {
                    "targets": ["198.51.100.7"],
                    "labels": {"__edge__": "jkt-1", "__probes__": "icmp", "rack": 7},
                }
            ]
        )
    )
    cfg = DiscoveryConfig(
        file_sd=(
            FileSDConfig(
                name="inv", files=(str(tmp_path / "*.json"), "b.yml"), poll_interval=Duration(0.05)
            ),
        )
    )
    ch = Changes()
    d = Discovery(cfg, ch, base_dir=tmp_path)
    await d.start()
    try:
        assert ch.names() == ["edge-sg-1.example.net", "edge-sg-2.example.net", "jkt-1"]
        t = ch.calls[-1][1]
        assert t[0].target == Target(
            "edge-sg-1.example.net", "edge-sg-1.example.net", {"tier": "near"}
        )
        assert t[1].port == 3478 and t[0].port is None
        assert t[2].target == Target("jkt-1", "198.51.100.7", {"rack": "7"})
        assert sample(d, "edgeprobe_sd_last_refresh_successful", source="inv") == 1
        assert sample(d, "edgeprobe_sd_targets", source="inv") == 3

        # A half-written file: its previous targets stay, the source says it failed.
        a.write_text('[{"targets": ["edge-sg-1.exa')
        await wait_for(lambda: sample(d, "edgeprobe_sd_last_refresh_successful", source="inv") == 0)
        assert sample(d, "edgeprobe_sd_targets", source="inv") == 3
        assert sample(d, "edgeprobe_sd_refresh_failures_total", source="inv", reason="parse") >= 1
        n_calls = len(ch.calls)

        a.write_text(json.dumps([{"targets": ["edge-sg-3.example.net"]}]))
        await wait_for(lambda: ch.names() == ["edge-sg-3.example.net", "jkt-1"])
        assert sample(d, "edgeprobe_sd_last_refresh_successful", source="inv") == 1
        assert len(ch.calls) == n_calls + 1  # one change, not one per poll

        # Reserved label: invalid, the old list stays.
        b.write_text(yaml.safe_dump([{"targets": ["x.example.net"], "labels": {"edge": "y"}}]))
        await wait_for(
            lambda: (
                sample(d, "edgeprobe_sd_refresh_failures_total", source="inv", reason="invalid")
                >= 1
            )
        )
        assert ch.names() == ["edge-sg-3.example.net", "jkt-1"]

        b.unlink()  # a removed file removes its targets
        await wait_for(lambda: ch.names() == ["edge-sg-3.example.net"])
    finally:
        await d.stop()


async def test_file_sd_limits(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_text(json.dumps([{"targets": [f"e{i}.example.net" for i in range(50)]}]))
    ch = Changes()
    d = Discovery(
        DiscoveryConfig(file_sd=(FileSDConfig(name="inv", files=(str(big),), max_targets=10),)), ch
    )
    await d.start()
    await d.stop()
    assert ch.calls == []
    assert sample(d, "edgeprobe_sd_refresh_failures_total", source="inv", reason="too_many") == 1

    # A YAML alias bomb expands lazily into millions of targets; the limit stops the walk.
    bomb = tmp_path / "bomb.yml"
    lines = ["a0: &a0 [x.example.net, y.example.net]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, 30)]
    bomb.write_text("\n".join(lines) + "\n")
    with pytest.raises(SDError):
        parse_groups(decode_sd_text(bomb.read_text(), True), "s", ("icmp",), 1000)
    doc = yaml.safe_load(
        "- targets: &t [a.example.net, b.example.net]\n"
        + "".join("- targets: *t\n" for _ in range(5))
    )
    with pytest.raises(SDError, match="duplicate"):
        parse_groups(doc, "s", ("icmp",), 1000)


# --------------------------------------------------------------------------------------------
# http_sd


@dataclass
class HttpState:
    status: int = 200
    body: bytes = b"[]"
    content_type: str = "application/json"
    delay: float = 0.0
    seen_headers: list[dict[str, str]] = field(default_factory=list)


@pytest.fixture
async def http_sd() -> AsyncIterator[tuple[str, HttpState]]:
    state = HttpState()

    async def handler(request: web.Request) -> web.Response:
        state.seen_headers.append(dict(request.headers))
        if state.delay:
            await asyncio.sleep(state.delay)
        return web.Response(
            status=state.status, body=state.body, headers={"Content-Type": state.content_type}
        )

    app = web.Application()
    app.router.add_get("/sd", handler)
    runner, port = await serve_app(app)
    yield f"http://127.0.0.1:{port}/sd", state
    await runner.cleanup()


async def test_http_sd_good_bad_slow(http_sd: tuple[str, HttpState], tmp_path: Path) -> None:
    url, state = http_sd
    (tmp_path / "pw").write_text("hunter2\n")
    state.body = json.dumps(
        [{"targets": ["edge-sg-1.example.net:443"], "labels": {"dc": "sg"}}]
    ).encode()
    ch = Changes()
    cfg = HttpSDConfig(
        name="cmdb",
        url=url,
        refresh_interval=Duration(60),
        timeout=Duration(0.5),
        max_bytes=4096,
        probes=("icmp",),
        basic_auth=BasicAuth("edgeprobe", "pw"),
    )
    d = Discovery(DiscoveryConfig(http_sd=(cfg,)), ch, base_dir=tmp_path)
    src = d.sources[0]
    await d.start()
    try:
        assert ch.names() == ["edge-sg-1.example.net"]
        assert ch.calls[-1][1][0].port == 443
        h = state.seen_headers[-1]
        assert h["X-Prometheus-Refresh-Interval-Seconds"] == "60"
        assert h["Authorization"].startswith("Basic ")

        bad: list[tuple[str, Callable[[], None]]] = [
            ("http_status", lambda: setattr(state, "status", 500)),
            ("content_type", lambda: setattr(state, "content_type", "text/html")),
            ("parse", lambda: setattr(state, "body", b"[{not json")),
            ("invalid", lambda: setattr(state, "body", b'{"targets": []}')),
            ("too_large", lambda: setattr(state, "body", b"[" + b" " * 5000 + b"]")),
            ("timeout", lambda: setattr(state, "delay", 1.0)),
        ]
        for reason, breakit in bad:
            state.status, state.content_type, state.delay = 200, "application/json", 0.0
            breakit()
            t0 = time.monotonic()
            await d.refresh(src)
            assert time.monotonic() - t0 < 1.5
            assert (
                sample(d, "edgeprobe_sd_refresh_failures_total", source="cmdb", reason=reason) == 1
            ), reason
            assert sample(d, "edgeprobe_sd_last_refresh_successful", source="cmdb") == 0
            assert sample(d, "edgeprobe_sd_targets", source="cmdb") == 1
        assert len(ch.calls) == 1

        state.delay, state.body = 0.0, b"[]"  # an explicit empty list does empty it
        await d.refresh(src)
        assert ch.names() == [] and len(ch.calls) == 2
        assert sample(d, "edgeprobe_sd_last_refresh_successful", source="cmdb") == 1
    finally:
        await d.stop()


async def test_http_sd_unreachable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ch = Changes()
    d = Discovery(
        DiscoveryConfig(
            http_sd=(
                HttpSDConfig(name="cmdb", url=f"http://127.0.0.1:{port}/sd", timeout=Duration(1.0)),
            )
        ),
        ch,
    )
    await d.start()
    await d.stop()
    assert ch.calls == []
    assert sample(d, "edgeprobe_sd_refresh_failures_total", source="cmdb", reason="connect") == 1


# --------------------------------------------------------------------------------------------
# DNS SRV, against a small dnspython server on a loopback UDP port


@dataclass
class DnsState:
    records: dict[str, list[tuple[int, int, int, str]]] = field(default_factory=dict)
    mode: str = "ok"  # ok | servfail | drop | garbage
    queries: int = 0


class DnsServer(asyncio.DatagramProtocol):
    def __init__(self, state: DnsState) -> None:
        self.state = state
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.state.queries += 1
        q = dns.message.from_wire(data)
        if self.state.mode == "drop":
            return
        if self.state.mode == "garbage":
            self.transport.sendto(data[:2] + b"\x81\x80garbage", addr)
            return
        resp = dns.message.make_response(q)
        resp.flags |= dns.flags.AA
        name = q.question[0].name.to_text()
        if self.state.mode == "servfail":
            resp.set_rcode(dns.rcode.SERVFAIL)
        elif name not in self.state.records:
            resp.set_rcode(dns.rcode.NXDOMAIN)
        elif self.state.records[name]:
            rrs = [f"{p} {w} {port} {t}" for p, w, port, t in self.state.records[name]]
            resp.answer.append(dns.rrset.from_text(name, 30, "IN", "SRV", *rrs))
        self.transport.sendto(resp.to_wire(), addr)


@pytest.fixture
async def dns_server() -> AsyncIterator[tuple[str, DnsState]]:
    state = DnsState()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: DnsServer(state), local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]
    yield f"127.0.0.1:{port}", state
    transport.close()


async def test_dns_srv(dns_server: tuple[str, DnsState]) -> None:
    server, state = dns_server
    state.records["_edge._udp.example.net."] = [
        (10, 5, 3478, "edge-sg-1.example.net."),
        (20, 5, 3478, "edge-sg-2.example.net."),
    ]
    state.records["_edge._tcp.example.net."] = [
        (10, 5, 443, "edge-sg-1.example.net."),
        (10, 5, 443, "edge-hk-1.example.net."),
    ]
    cfg = DnsSDConfig(
        name="srv",
        names=("_edge._udp.example.net", "_edge._tcp.example.net"),
        server=server,
        timeout=Duration(0.5),
        probes=("icmp",),
    )
    ch = Changes()
    d = Discovery(DiscoveryConfig(dns_sd=(cfg,)), ch)
    src = d.sources[0]
    await d.start()
    try:
        assert ch.names() == [
            "edge-sg-1.example.net",
            "edge-sg-2.example.net",
            "edge-hk-1.example.net",
        ]
        assert [t.port for t in ch.calls[-1][1]] == [3478, 3478, 443]

        for mode, reason in (
            ("servfail", "dns_error"),
            ("drop", "timeout"),
            ("garbage", "dns_error"),
        ):
            state.mode = mode
            await d.refresh(src)
            assert (
                sample(d, "edgeprobe_sd_refresh_failures_total", source="srv", reason=reason) >= 1
            ), mode
            assert sample(d, "edgeprobe_sd_targets", source="srv") == 3
        state.mode = "ok"
        del state.records["_edge._tcp.example.net."]
        await d.refresh(src)  # nxdomain for one name: its last good stays
        assert (
            sample(d, "edgeprobe_sd_refresh_failures_total", source="srv", reason="nxdomain") == 1
        )
        assert len(ch.names()) == 3
        state.records["_edge._tcp.example.net."] = [(0, 0, 0, ".")]  # "not available"
        state.records["_edge._udp.example.net."] = [(10, 5, 3478, "edge-sg-9.example.net.")]
        await d.refresh(src)
        assert ch.names() == ["edge-sg-9.example.net"]
        assert sample(d, "edgeprobe_sd_last_refresh_successful", source="srv") == 1
    finally:
        await d.stop()


async def test_dns_unreachable_server() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = Discovery(
        DiscoveryConfig(
            dns_sd=(
                DnsSDConfig(
                    name="srv",
                    names=("_edge._udp.example.net",),
                    server=f"127.0.0.1:{port}",
                    timeout=Duration(0.5),
                ),
            )
        ),
        Changes(),
    )
    await d.start()
    await d.stop()
    assert sample(d, "edgeprobe_sd_last_refresh_successful", source="srv") == 0


# --------------------------------------------------------------------------------------------
# config decoding and fuzzing


def test_config_decoding() -> None:
    node = compose(
        "file_sd:\n  - {name: inv, files: [/etc/edgeprobe/*.json], "
        "poll_interval: 10s, probes: [icmp]}\n"
        "dns_sd:\n  - {name: srv, names: [_edge._udp.example.net], "
        "server: '127.0.0.1:5353'}\n"
    )
    assert node is not None
    cfg = decode_dataclass(DiscoveryConfig, node, "discovery")
    assert cfg.file_sd[0].poll_interval == 10.0
    assert cfg.dns_sd[0].server == "127.0.0.1:5353"
    for text, match in (
        ("file_sd: [{name: a, files: [x.txt]}]", "json"),
        ("file_sd: [{name: a, files: ['/etc/*/x.json']}]", "only allowed"),
        ("file_sd: [{name: a, files: [x.json], probes: [nope]}]", "unknown probe"),
        ("file_sd: [{name: a, files: [x.json]}, {name: a, files: [y.json]}]", "twice"),
        ("http_sd: [{name: a, url: 'ftp://x'}]", "url"),
        ("http_sd: [{name: a, url: 'http://x', timeout: 2m}]", "timeout"),
        ("dns_sd: [{name: a, names: [x], server: 'not-an-ip'}]", "server"),
        ("dns_sd: [{name: a, names: [x], sever: '127.0.0.1'}]", "unknown key"),
    ):
        n = compose(text)
        assert n is not None
        with pytest.raises(ConfigError, match=match):
            decode_dataclass(DiscoveryConfig, n, "discovery")


def test_merge_targets() -> None:
    def t(name: str, src: str) -> DiscoveredTarget:
        return DiscoveredTarget(Target(name, name), ("icmp",), source=src)

    out = merge_targets(
        [[t("a", "s1"), t("b", "s1")], [t("b", "s2"), t("c", "s2")]], taken={"a": None}
    )
    assert [(x.target.name, x.source) for x in out] == [("b", "s1"), ("c", "s2")]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["targets", "labels", "__edge__", "__probes__", "tier", "edge", "x"])
            | st.text(max_size=8),
            inner,
            max_size=4,
        )
    ),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_fuzz_groups(doc: object) -> None:
    with contextlib.suppress(SDError):
        out = parse_groups(doc, "s", ("icmp",), 100)
        assert len({t.target.name for t in out}) == len(out)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200), st.booleans())
def test_fuzz_sd_text(text: str, as_yaml: bool) -> None:
    with contextlib.suppress(SDError):
        parse_groups(decode_sd_text(text, as_yaml), "s", ("icmp",), 100)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=60))
def test_fuzz_host_port(raw: str) -> None:
    with contextlib.suppress(ValueError):
        host, port = split_host_port(raw)
        assert host and (port is None or 1 <= port <= 65535)


def test_deep_nesting() -> None:
    for text, as_yaml in (("[" * 50_000, True), ("[" * 50_000 + "]" * 50_000, False)):
        with pytest.raises(SDError):
            parse_groups(decode_sd_text(text, as_yaml), "s", ("icmp",), 100)


# --------------------------------------------------------------------------------------------
# http_sd bodies larger than one read, from a raw HTTP server on loopback that controls how
# the bytes are written: one write, or many small chunked writes.


def inventory(n: int) -> bytes:
    return json.dumps(
        [{"targets": [f"edge-{i}.example.net:3478" for i in range(n)], "labels": {"tier": "near"}}]
    ).encode()


@contextlib.asynccontextmanager
async def raw_http(body: bytes, chunk: int | None) -> AsyncIterator[str]:
    """Serves ``body`` to every request: with Content-Length in one write (``chunk`` None),
    or with chunked transfer encoding in writes of ``chunk`` bytes, pausing now and then so
    the pieces reach the client as separate reads."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            if chunk is None:
                writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            else:
                writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
                for i, off in enumerate(range(0, len(body), chunk)):
                    part = body[off : off + chunk]
                    writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                    await writer.drain()
                    if i % 64 == 0:
                        await asyncio.sleep(0.001)
                writer.write(b"0\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/sd"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("chunk", [None, 1000], ids=["one_write", "1000_byte_chunks"])
async def test_http_sd_reads_the_whole_body(chunk: int | None) -> None:
    body = inventory(10_000)
    assert len(body) > 290_000
    async with raw_http(body, chunk) as url:
        ch = Changes()
        d = Discovery(
            DiscoveryConfig(http_sd=(HttpSDConfig(name="cmdb", url=url, timeout=Duration(10)),)), ch
        )
        await d.start()
        await d.stop()
    assert sample(d, "edgeprobe_sd_last_refresh_successful", source="cmdb") == 1, d.sources[
        0
    ].state.last_error
    assert len(ch.names()) == 10_000 and ch.names()[-1] == "edge-9999.example.net"


@pytest.mark.parametrize("chunk", [None, 65536], ids=["content_length", "chunked"])
async def test_http_sd_body_over_the_limit_is_too_large(chunk: int | None) -> None:
    good = inventory(3)
    big = b"[" + b" " * (20 << 20) + b"]"  # valid JSON, 20 MB: over the 16 MiB default
    async with raw_http(good, None) as url_good, raw_http(big, chunk) as url_big:
        ch = Changes()
        d = Discovery(
            DiscoveryConfig(
                http_sd=(HttpSDConfig(name="cmdb", url=url_good, timeout=Duration(20)),)
            ),
            ch,
        )
        src = d.sources[0]
        await d.start()
        assert len(ch.names()) == 3
        assert isinstance(src, HttpSD)
        src.cfg = dataclasses.replace(src.cfg, url=url_big)
        await d.refresh(src)
        await d.stop()
    assert sample(d, "edgeprobe_sd_refresh_failures_total", source="cmdb", reason="too_large") == 1
    assert sample(d, "edgeprobe_sd_refresh_failures_total", source="cmdb", reason="parse") == 0
    assert len(ch.names()) == 3 and len(ch.calls) == 1  # the last good list stays


async def test_http_sd_body_exactly_at_the_limit() -> None:
    body = inventory(2000)
    for limit, ok in ((len(body), 1), (len(body) - 1, 0)):
        async with raw_http(body, 4096) as url:
            d = Discovery(
                DiscoveryConfig(http_sd=(HttpSDConfig(name="cmdb", url=url, max_bytes=limit),)),
                Changes(),
            )
            await d.start()
            await d.stop()
        assert sample(d, "edgeprobe_sd_last_refresh_successful", source="cmdb") == ok, limit


# --------------------------------------------------------------------------------------------
# YAML anchors and aliases: a small file must not stand for millions of nodes.


def label_bomb(labels: int, groups: int) -> str:
    """Every group refers to one big label block: (labels x groups) label checks, in
    a file of a few bytes per group."""
    block = ", ".join(f"l{i}: v" for i in range(labels))
    return (
        f"- {{targets: [edge-0.example.net], labels: &L {{{block}}}}}\n"
        + "- {labels: *L}\n" * groups
    )


def nested_bomb(levels: int) -> str:
    lines = ["- targets: [x.example.net]", "  labels: &a0 {k: v}"]
    lines += [f"- {{labels: {{l{i}: &a{i} [*a{i - 1}, *a{i - 1}]}}}}" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "text", [label_bomb(300, 3000), nested_bomb(40)], ids=["label_block_x3000", "nested_x2^40"]
)
async def test_file_sd_alias_bomb_is_refused_and_last_good_kept(text: str, tmp_path: Path) -> None:
    inv = tmp_path / "inv.yml"
    inv.write_text("- targets: [edge-1.example.net, edge-2.example.net]\n")
    ch = Changes()
    d = Discovery(DiscoveryConfig(file_sd=(FileSDConfig(name="inv", files=(str(inv),)),)), ch)
    src = d.sources[0]
    await d.start()
    try:
        assert ch.names() == ["edge-1.example.net", "edge-2.example.net"]
        inv.write_text(text)
        await d.refresh(src)
        assert (
            sample(d, "edgeprobe_sd_refresh_failures_total", source="inv", reason="too_large") == 1
        )
        assert sample(d, "edgeprobe_sd_last_refresh_successful", source="inv") == 0
        assert ch.names() == ["edge-1.example.net", "edge-2.example.net"]
        assert len(ch.calls) == 1
        err = src.state.last_error
        assert re.match(rf"{re.escape(str(inv))}: line \d+: aliases expand", err), err
    finally:
        await d.stop()


def test_yaml_alias_limits() -> None:
    # Ordinary use of an anchor: one label block shared by 10,000 groups.
    text = (
        "- targets: [edge-0.example.net]\n  labels: &common "
        "{tier: near, dc: sg, owner: rtc, rack: r1, pod: p1}\n"
        + "".join(
            f"- {{targets: [edge-{i}.example.net], labels: *common}}\n" for i in range(1, 10_000)
        )
    )
    out = parse_groups(decode_sd_text(text, True), "s", ("icmp",), 10_000)
    assert len(out) == 10_000 and out[-1].target.labels["pod"] == "p1"
    with pytest.raises(SDError) as e:
        decode_sd_text("- &a {labels: *a}\n", True)
    assert e.value.reason == "parse" and "contains it" in str(e.value)
    with pytest.raises(SDError) as e:
        decode_sd_text("- " + "[" * 70 + "]" * 70 + "\n", True)
    assert e.value.reason == "parse" and "nested deeper" in str(e.value)


def test_config_alias_bomb_is_refused(tmp_path: Path) -> None:
    from agent.config import load as cfgmod

    # The main config has the same hole: each target's labels are decoded once per alias.
    p = tmp_path / "edgeprobe.yml"
    p.write_text(
        "agent: {region: r, max_targets: 100000}\n"
        "targets:\n  - {name: t0, address: 127.0.0.1, labels: &L {"
        + ", ".join(f"l{i}: v" for i in range(300))
        + "}}\n"
        + "".join(f"  - {{name: t{i}, address: 127.0.0.1, labels: *L}}\n" for i in range(1, 1000))
    )
    with pytest.raises(ConfigError, match="aliases expand the document") as e:
        cfgmod.load(p)
    assert str(p) in str(e.value) and "line" in str(e.value)


def test_config_ordinary_anchors_still_work() -> None:
    from agent.config import load as cfgmod

    cfg = cfgmod.loads(
        "agent: {region: r}\n"
        "targets:\n"
        "  - {name: a, address: 127.0.0.1, labels: &l {tier: near},"
        " probes: &p {icmp: {packets: 3}}}\n"
        "  - {name: b, address: 127.0.0.2, labels: *l, probes: *p}\n"
    )
    assert [j.target.labels for j in cfg.jobs] == [{"tier": "near"}] * 2
