"""--web.config.file: TLS and basic auth with a real aiohttp client over loopback sockets."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import trustme
import uvloop
import yaml
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.app import Agent
from agent.config import load as cfgmod
from agent.server.guard import WebGuard
from agent.server.tls import load_web_config, server_context
from agent.server.webconfig import WebConfigError, parse_web_config
from tests.helpers import ROOT, serve_app, stop

PASSWORD = "s3cret-pw"
# Cost 4 is bcrypt's minimum: the test exercises the code path, not the work factor.
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


@dataclass
class Pki:
    ca: trustme.CA
    dir: Path

    def client_ctx(
        self, cert: bool = False, max_version: ssl.TLSVersion | None = None
    ) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        if cert:
            self.ca.issue_cert("scraper.example.net").configure_cert(ctx)
        if max_version is not None:
            ctx.maximum_version = max_version
        return ctx


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    return Pki(ca, tmp_path)


def write_cfg(pki: Pki, doc: dict[str, object]) -> Path:
    p = pki.dir / "web.yml"
    p.write_text(yaml.safe_dump(doc))
    return p


TLS = {"cert_file": "server.crt", "key_file": "server.key"}


def basic(user: str, password: str) -> str:
    return aiohttp.encode_basic_auth(user, password)


Serve = Callable[[WebGuard], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def start(guard: WebGuard) -> str:
        async def metrics(_: web.Request) -> web.Response:
            return web.Response(text="edgeprobe_up 1\n")

        app = web.Application(middlewares=guard.middlewares())
        app.router.add_get("/metrics", metrics)
        runner, port = await serve_app(app, guard.ssl_context)
        runners.append(runner)
        scheme = "https" if guard.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{port}/metrics"

    yield start
    for r in runners:
        await r.cleanup()


async def get(
    url: str, ctx: ssl.SSLContext | bool | None = None, auth: str | None = None
) -> tuple[int, str, dict[str, str]]:
    headers = {"Authorization": auth} if auth else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s,
        s.get(url, ssl=ctx if ctx is not None else True, headers=headers) as r,
    ):
        return r.status, await r.text(), dict(r.headers)


async def test_tls_and_basic_auth(pki: Pki, serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    guard = WebGuard(write_cfg(pki, {"tls_server_config": TLS, "basic_auth_users": {"prom": HASH}}))
    url = await serve(guard)
    ctx = pki.client_ctx()

    status, body, headers = await get(url, ctx, basic("prom", PASSWORD))
    assert (status, body) == (200, "edgeprobe_up 1\n")
    # Twice: the second one is served from the verified-credentials cache.
    assert (await get(url, ctx, basic("prom", PASSWORD)))[0] == 200

    status, _, headers = await get(url, ctx, basic("prom", "wrong"))
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
    assert (await get(url, ctx, basic("nobody", PASSWORD)))[0] == 401
    assert (await get(url, ctx))[0] == 401
    assert (await get(url, ctx, basic("prom", "x" * 100)))[0] == 401

    # Plain HTTP on the TLS port gets no metrics.
    with pytest.raises(aiohttp.ClientError):
        await get(url.replace("https://", "http://"), auth=basic("prom", PASSWORD))
    # A client that does not trust the CA refuses the server.
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await get(url, ssl.create_default_context(), basic("prom", PASSWORD))

    text = caplog.text + repr(guard.config)
    assert HASH not in text and PASSWORD not in text


async def test_min_version_refuses_old_clients(pki: Pki, serve: Serve) -> None:
    guard = WebGuard(write_cfg(pki, {"tls_server_config": {**TLS, "min_version": "TLS13"}}))
    url = await serve(guard)
    assert (await get(url, pki.client_ctx()))[0] == 200
    with pytest.raises(aiohttp.ClientError):
        await get(url, pki.client_ctx(max_version=ssl.TLSVersion.TLSv1_2))


async def test_client_certificates_and_sans(pki: Pki, serve: Serve) -> None:
    tls: dict[str, object] = {
        **TLS,
        "client_auth_type": "RequireAndVerifyClientCert",
        "client_ca_file": "ca.crt",
    }
    url = await serve(WebGuard(write_cfg(pki, {"tls_server_config": tls})))
    assert (await get(url, pki.client_ctx(cert=True)))[0] == 200
    with pytest.raises(aiohttp.ClientError):
        await get(url, pki.client_ctx(cert=False))

    tls["client_allowed_sans"] = ["other.example.net"]
    url = await serve(WebGuard(write_cfg(pki, {"tls_server_config": tls})))
    assert (await get(url, pki.client_ctx(cert=True)))[0] == 403
    tls["client_allowed_sans"] = ["scraper.example.net"]
    url = await serve(WebGuard(write_cfg(pki, {"tls_server_config": tls})))
    assert (await get(url, pki.client_ctx(cert=True)))[0] == 200


async def test_headers_and_rate_limit(pki: Pki, serve: Serve) -> None:
    now = [0.0]
    guard = WebGuard(
        write_cfg(
            pki,
            {
                "http_server_config": {
                    "headers": {"X-Frame-Options": "deny", "X-Content-Type-Options": "nosniff"}
                },
                "rate_limit": {"interval": "1s", "burst": 2},
            },
        ),
        clock=lambda: now[0],
    )
    url = await serve(guard)
    status, _, headers = await get(url)
    assert status == 200 and headers["X-Frame-Options"] == "deny"
    assert (await get(url))[0] == 200
    status, _, headers = await get(url)
    assert status == 429 and headers["X-Content-Type-Options"] == "nosniff"
    now[0] += 1.0
    assert (await get(url))[0] == 200


async def test_reload_rotates_certs_and_keeps_old_on_error(pki: Pki, serve: Serve) -> None:
    path = write_cfg(pki, {"tls_server_config": TLS, "basic_auth_users": {"prom": HASH}})
    guard = WebGuard(path)
    url = await serve(guard)
    auth = basic("prom", PASSWORD)

    ca2 = trustme.CA()
    leaf = ca2.issue_cert("localhost", "127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(pki.dir / "server2.crt"))
    leaf.private_key_pem.write_to_path(str(pki.dir / "server2.key"))

    # A broken file: the running config stays.
    path.write_text("tls_server_config: {cert_file: server2.crt, key_file: missing.key}\n")
    with pytest.raises(WebConfigError):
        guard.reload()
    assert (await get(url, pki.client_ctx(), auth))[0] == 200

    new_hash = bcrypt.hashpw(b"rotated", bcrypt.gensalt(4)).decode()
    write_cfg(
        pki,
        {
            "tls_server_config": {"cert_file": "server2.crt", "key_file": "server2.key"},
            "basic_auth_users": {"prom": new_hash},
        },
    )
    guard.reload()
    ctx2 = ssl.create_default_context()
    ca2.configure_trust(ctx2)
    assert (await get(url, ctx2, basic("prom", "rotated")))[0] == 200
    assert (await get(url, ctx2, auth))[0] == 401
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await get(url, pki.client_ctx(), auth)

    write_cfg(pki, {})
    with pytest.raises(WebConfigError, match="restart"):
        guard.reload()


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"basic_auth_user": {"a": HASH}}, "basic_auth_user: unknown key"),
        (
            {"tls_server_config": {**TLS, "min_versoin": "TLS12"}},
            "tls_server_config.min_versoin: unknown key",
        ),
        ({"tls_server_config": {"cert_file": "server.crt"}}, "key_file"),
        ({"tls_server_config": {**TLS, "min_version": "TLS9"}}, "min_version"),
        ({"tls_server_config": {**TLS, "min_version": "TLS13", "max_version": "TLS12"}}, "above"),
        (
            {"tls_server_config": {**TLS, "client_auth_type": "RequireAnyClientCert"}},
            "not supported",
        ),
        (
            {"tls_server_config": {**TLS, "client_auth_type": "RequireAndVerifyClientCert"}},
            "client_ca_file",
        ),
        ({"tls_server_config": {**TLS, "cipher_suites": ["TLS_NULL"]}}, "cipher_suites"),
        ({"tls_server_config": {"cert_file": "nope.crt", "key_file": "server.key"}}, "cannot load"),
        ({"basic_auth_users": {"prom": "plaintext-password"}}, "not a bcrypt hash"),
        ({"basic_auth_users": {"a:b": HASH}}, "no ':'"),
        ({"basic_auth_users": ["prom"]}, "expected a mapping"),
        ({"http_server_config": {"headers": {"X-Frame-Options": "allow"}}}, "deny"),
        ({"http_server_config": {"headers": {"Server": "x"}}}, "unknown key"),
        (
            {"rate_limit": {"interval": "1 second", "burst": 1}},
            "rate_limit.interval: expected a duration",
        ),
        ({"rate_limit": {"interval": "1s"}}, "burst"),
    ],
)
def test_strict_errors(pki: Pki, doc: dict[str, object], match: str) -> None:
    with pytest.raises(WebConfigError, match=match) as e:
        load_web_config(write_cfg(pki, doc))
    assert "plaintext-password" not in str(e.value) and HASH not in str(e.value)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites:\n"
            "    - TLS_RSA_WITH_AES_128_CBC_SHA\n    - TLS_NULL\n",
            "web.yml:6: tls_server_config.cipher_suites[1]: unknown value 'TLS_NULL'",
        ),
        (
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS9\n",
            "web.yml:4: tls_server_config.min_version: unknown value 'TLS9'",
        ),
        (
            "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
            "web.yml:3: http_server_config.headers.X-Frame-Options: one of deny, sameorigin",
        ),
        ("rate_limit:\n  interval: 1s\n  burst: 0\n", "web.yml:3: rate_limit.burst: must be >= 1"),
        (
            f"basic_auth_users:\n  ops: {HASH}\n  prom: $2b$03${HASH[7:]}\n",
            "web.yml:3: basic_auth_users.prom: bcrypt cost outside 4..14",
        ),
        ("tls_server_config:\n", "web.yml:1: tls_server_config: empty"),
    ],
)
def test_validation_errors_name_key_and_line(text: str, where: str) -> None:
    with pytest.raises(WebConfigError) as e:
        parse_web_config(text, source="web.yml")
    assert str(e.value).startswith(where), str(e.value)
    assert HASH[7:29] not in str(e.value)


def test_null_values_mean_unset_as_in_the_toolkit() -> None:
    cfg = parse_web_config(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_ca_file:\n  cipher_suites:\n"
        "http_server_config:\n  headers:\n    X-Frame-Options:\n"
        "basic_auth_users:\nrate_limit:\n"
    )
    assert cfg.tls_server_config is not None
    assert (cfg.tls_server_config.client_ca_file, cfg.tls_server_config.cipher_suites) == ("", ())
    assert cfg.http_server_config.response_headers == {} and cfg.basic_auth_users == {}


def test_yaml_error_does_not_quote_the_file(pki: Pki) -> None:
    p = pki.dir / "web.yml"
    p.write_text(f"basic_auth_users:\n  prom: {HASH}\n  : [\n")
    with pytest.raises(WebConfigError) as e:
        load_web_config(p)
    assert HASH not in str(e.value) and "web.yml:" in str(e.value)


def test_inline_cert_and_key(pki: Pki) -> None:
    cfg = load_web_config(
        write_cfg(
            pki,
            {
                "tls_server_config": {
                    "cert": (pki.dir / "server.crt").read_text(),
                    "key": (pki.dir / "server.key").read_text(),
                    "curve_preferences": ["X25519", "CurveP256"],
                    "cipher_suites": ["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"],
                }
            },
        )
    )
    assert server_context(cfg) is not None
    assert "PRIVATE KEY" not in repr(cfg)


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "tls_server_config",
                    "basic_auth_users",
                    "cert_file",
                    "key_file",
                    "http_server_config",
                    "headers",
                    "rate_limit",
                    "interval",
                    "burst",
                    "min_version",
                    "x",
                ]
            )
            | st.text(max_size=8),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(yaml_values)
def test_fuzz_structures(doc: object) -> None:
    with contextlib.suppress(WebConfigError):
        parse_web_config(yaml.safe_dump(doc))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_text(text: str) -> None:
    with contextlib.suppress(WebConfigError):
        parse_web_config(text)


def test_deep_nesting_and_huge_values() -> None:
    with pytest.raises(WebConfigError):
        parse_web_config("[" * 100_000)
    with pytest.raises(WebConfigError):
        parse_web_config("rate_limit: {interval: 1e300s, burst: 1}")
    with pytest.raises(WebConfigError):
        parse_web_config("rate_limit: {interval: 1s, burst: 99999999999999999999999}")


# ---------------------------------------------------------------------------------------------
# Reload replaces the TLS policy: new handshakes see exactly the new file, nothing of the old.
# Each scenario runs on both event loops: the listening socket keeps one SSLContext for its
# lifetime, and how a new connection gets the reloaded policy depends on the loop's SSL code.

LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


def run_on(loop: str, scenario: Coroutine[Any, Any, None]) -> None:
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(scenario)


@contextlib.asynccontextmanager
async def serving(guard: WebGuard) -> AsyncIterator[str]:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text="edgeprobe_up 1\n")

    async def peer(request: web.Request) -> web.Response:
        assert request.transport is not None
        return web.Response(text=str(request.transport.get_extra_info("peername")[1]))

    app = web.Application(middlewares=guard.middlewares())
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/peer", peer)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=guard.ssl_context)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        yield f"{'https' if guard.ssl_context else 'http'}://127.0.0.1:{port}/metrics"
    finally:
        await runner.cleanup()


def client_cert_ctx(pki: Pki, issuer: trustme.CA) -> ssl.SSLContext:
    ctx = pki.client_ctx()
    issuer.issue_cert("scraper.example.net").configure_cert(ctx)
    return ctx


async def refused(url: str, ctx: ssl.SSLContext) -> bool:
    try:
        await get(url, ctx)
    except aiohttp.ClientError:
        return True
    return False


@LOOPS
def test_reload_revokes_a_removed_client_ca(pki: Pki, loop: str) -> None:
    ca_b = trustme.CA()
    ca_b.cert_pem.write_to_path(str(pki.dir / "ca_b.crt"))
    tls = {**TLS, "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": "ca.crt"}

    async def scenario() -> None:
        guard = WebGuard(write_cfg(pki, {"tls_server_config": tls}))
        async with serving(guard) as url:
            from_a, from_b = client_cert_ctx(pki, pki.ca), client_cert_ctx(pki, ca_b)
            assert (await get(url, from_a))[0] == 200
            assert await refused(url, from_b)

            write_cfg(pki, {"tls_server_config": {**tls, "client_ca_file": "ca_b.crt"}})
            guard.reload()
            assert await refused(url, from_a)  # CA a is gone, not merely joined by CA b
            assert (await get(url, from_b))[0] == 200

            write_cfg(pki, {"tls_server_config": TLS})  # client certificates off again
            guard.reload()
            assert (await get(url, pki.client_ctx()))[0] == 200

    run_on(loop, scenario())


@LOOPS
def test_reload_closes_kept_alive_connections_of_a_replaced_policy(pki: Pki, loop: str) -> None:
    ca_b = trustme.CA()
    ca_b.cert_pem.write_to_path(str(pki.dir / "ca_b.crt"))
    tls = {**TLS, "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": "ca.crt"}
    leaf = pki.ca.issue_cert("localhost", "127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(pki.dir / "server2.crt"))
    leaf.private_key_pem.write_to_path(str(pki.dir / "server2.key"))

    async def scenario() -> None:
        guard = WebGuard(write_cfg(pki, {"tls_server_config": tls}))
        async with (
            serving(guard) as url,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s,
        ):
            url = url.replace("/metrics", "/peer")
            from_a = client_cert_ctx(pki, pki.ca)

            async def peer_port() -> str:
                async with s.get(url, ssl=from_a) as r:
                    assert r.status == 200
                    return await r.text()

            first = await peer_port()
            assert await peer_port() == first  # kept alive

            # Same client policy (server certificate rotated, a header added): kept.
            write_cfg(
                pki,
                {
                    "tls_server_config": {
                        **tls,
                        "cert_file": "server2.crt",
                        "key_file": "server2.key",
                    },
                    "http_server_config": {"headers": {"X-Frame-Options": "deny"}},
                },
            )
            guard.reload()
            assert await peer_port() == first

            # CA a removed: the kept-alive connection gets no response, and no new one is made.
            write_cfg(pki, {"tls_server_config": {**tls, "client_ca_file": "ca_b.crt"}})
            guard.reload()
            with pytest.raises(aiohttp.ServerDisconnectedError):
                await peer_port()
            with pytest.raises(aiohttp.ClientError):
                await peer_port()

    run_on(loop, scenario())


@LOOPS
def test_reload_lifts_and_restores_a_cipher_restriction(pki: Pki, loop: str) -> None:
    only_128 = {
        **TLS,
        "max_version": "TLS12",
        "cipher_suites": ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"],
    }

    async def scenario() -> None:
        guard = WebGuard(write_cfg(pki, {"tls_server_config": only_128}))
        async with serving(guard) as url:
            wants_256 = pki.client_ctx(max_version=ssl.TLSVersion.TLSv1_2)
            wants_256.set_ciphers("ECDHE-ECDSA-AES256-GCM-SHA384")
            assert await refused(url, wants_256)

            write_cfg(pki, {"tls_server_config": {**TLS, "max_version": "TLS12"}})
            guard.reload()
            assert (await get(url, wants_256))[0] == 200

            write_cfg(pki, {"tls_server_config": only_128})
            guard.reload()
            assert await refused(url, wants_256)

    run_on(loop, scenario())


@LOOPS
def test_reload_changes_min_version_both_ways(pki: Pki, loop: str) -> None:
    async def scenario() -> None:
        guard = WebGuard(write_cfg(pki, {"tls_server_config": {**TLS, "min_version": "TLS13"}}))
        async with serving(guard) as url:
            tls12 = pki.client_ctx(max_version=ssl.TLSVersion.TLSv1_2)
            assert await refused(url, tls12)
            write_cfg(pki, {"tls_server_config": TLS})
            guard.reload()
            assert (await get(url, tls12))[0] == 200
            write_cfg(pki, {"tls_server_config": {**TLS, "min_version": "TLS13"}})
            guard.reload()
            assert await refused(url, tls12)

    run_on(loop, scenario())


@LOOPS
def test_failed_reload_leaves_the_tls_policy_untouched(pki: Pki, loop: str) -> None:
    tls = {**TLS, "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": "ca.crt"}

    async def scenario() -> None:
        guard = WebGuard(write_cfg(pki, {"tls_server_config": tls}))
        async with serving(guard) as url:
            # A valid policy with an unusable key: nothing of it may reach the running policy.
            write_cfg(
                pki,
                {
                    "tls_server_config": {
                        **tls,
                        "client_auth_type": "NoClientCert",
                        "key_file": "missing.key",
                    }
                },
            )
            with pytest.raises(WebConfigError):
                guard.reload()
            assert await refused(url, pki.client_ctx())
            assert (await get(url, pki.client_ctx(cert=True)))[0] == 200

    run_on(loop, scenario())


# ---------------------------------------------------------------------------------------------
# Every web-config error is a clean, one-line WebConfigError that quotes no secret.

WRONG_TAGS = ["!!int", "!!float", "!!bool", "!!timestamp", "!!binary", "!!set", "!!null"]


@pytest.mark.parametrize("tag", WRONG_TAGS)
def test_a_mistagged_hash_is_a_clean_error_naming_key_and_line(pki: Pki, tag: str) -> None:
    p = pki.dir / "web.yml"
    p.write_text(f"http_server_config: {{}}\nbasic_auth_users:\n  prom: {tag} {HASH}\n")
    with pytest.raises(WebConfigError) as e:
        load_web_config(p)
    msg = str(e.value)
    assert "prom" in msg and "\n" not in msg
    assert HASH[7:29].lower() not in msg.lower()  # not even a piece of the salt
    # These cannot decode a hash; the others may (to a value of the wrong type, found later).
    if tag in ("!!int", "!!float", "!!bool", "!!timestamp"):
        assert "web.yml:3:" in msg


def test_an_unforeseen_decoder_failure_is_still_clean(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.server.webconfig as wc

    def boom(users: object) -> bytes:
        raise ValueError(f"something quoting {HASH}")

    monkeypatch.setattr(wc, "_dummy_hash", boom)
    with pytest.raises(WebConfigError) as e:
        load_web_config(write_cfg(pki, {"basic_auth_users": {"prom": HASH}}))
    assert HASH not in str(e.value) and "ValueError" in str(e.value)


@pytest.mark.parametrize(
    "doc",
    [
        {"tls_server_config": {}},
        {"tls_server_config": None},
        {"tls_server_config": {}, "basic_auth_users": {"prom": HASH}},
    ],
)
def test_an_empty_tls_section_is_an_error_not_plain_http(pki: Pki, doc: dict[str, object]) -> None:
    with pytest.raises(WebConfigError, match="tls_server_config"):
        WebGuard(write_cfg(pki, doc))


# ---------------------------------------------------------------------------------------------
# bcrypt: hashes that cannot work are refused at load; unknown users cost what users cost;
# the work is bounded and sheds load.


def _hash(cost: int, password: bytes = PASSWORD.encode()) -> str:
    return bcrypt.hashpw(password, bcrypt.gensalt(cost)).decode()


def _alter(h: str, i: int, c: str) -> str:
    return h[:i] + c + h[i + 1 :]


@pytest.mark.parametrize(
    ("hashed", "match"),
    [
        pytest.param(HASH + "\n", "not a bcrypt hash", id="trailing-newline"),
        pytest.param(" " + HASH, "not a bcrypt hash", id="leading-space"),
        pytest.param("$2$" + HASH[4:], "not a bcrypt hash", id="prefix-2"),
        pytest.param("$2x$" + HASH[4:], "not a bcrypt hash", id="prefix-2x"),
        pytest.param(HASH[:-1], "not a bcrypt hash", id="short"),
        pytest.param(HASH + "a", "not a bcrypt hash", id="long"),
        pytest.param("$2b$03$" + HASH[7:], "cost outside 4..14", id="cost-3"),
        pytest.param("$2b$15$" + HASH[7:], "cost outside 4..14", id="cost-15"),
        pytest.param("$2b$31$" + HASH[7:], "cost outside 4..14", id="cost-31"),
        pytest.param(
            _alter(HASH, 28, "P" if HASH[28] != "P" else "Q"),
            "never match",
            id="salt-not-canonical",
        ),
        pytest.param(_alter(HASH, 59, "/"), "never match", id="digest-not-canonical"),
    ],
)
def test_hashes_that_cannot_work_are_refused_at_load(pki: Pki, hashed: str, match: str) -> None:
    with pytest.raises(WebConfigError, match=match) as e:
        WebGuard(write_cfg(pki, {"basic_auth_users": {"prom": hashed}}))
    assert hashed.strip() not in str(e.value) and HASH[7:29] not in str(e.value)


async def test_unknown_users_cost_as_much_bcrypt_as_configured_ones(
    pki: Pki, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[bytes] = []
    real = bcrypt.checkpw

    def spy(password: bytes, hashed: bytes) -> bool:
        checked.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", spy)
    guard = WebGuard(write_cfg(pki, {"basic_auth_users": {"prom": _hash(6), "ops": HASH}}))
    url = await serve(guard)
    assert (await get(url, auth=basic("nobody", PASSWORD)))[0] == 401
    assert (await get(url, auth=basic("prom", PASSWORD)))[0] == 200
    # The hash checked for the unknown user has the highest configured cost (6, not 4, not 10)
    # and is not any user's hash.
    assert [int(h[4:6]) for h in checked] == [6, 6]
    assert checked[0] not in {h.encode() for h in (_hash(6), HASH)}
    assert checked[0] == guard.config.dummy_hash

    # A reload recomputes it: cost 4 users only, so the unknown user costs 4.
    write_cfg(pki, {"basic_auth_users": {"ops": HASH}})
    guard.reload()
    checked.clear()
    assert (await get(url, auth=basic("nobody", PASSWORD)))[0] == 401
    assert [int(h[4:6]) for h in checked] == [4]


async def test_bcrypt_work_is_bounded_and_a_flood_is_shed_with_503(
    pki: Pki, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = threading.Lock()
    running, peak = [0], [0]
    real = bcrypt.checkpw

    def spy(password: bytes, hashed: bytes) -> bool:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            return real(password, hashed)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(bcrypt, "checkpw", spy)
    # Cost 11 (~100 ms a check): a burst of 60 connections outruns 2 workers.
    users = {"prom": _hash(11), "ops": _hash(11)}
    guard = WebGuard(write_cfg(pki, {"basic_auth_users": users}), bcrypt_workers=2, bcrypt_queue=4)
    url = await serve(guard)
    assert (await get(url, auth=basic("prom", PASSWORD)))[0] == 200  # now cached

    n = 60
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=n), timeout=aiohttp.ClientTimeout(total=30)
    ) as s:

        async def attempt(i: int) -> tuple[int, str | None]:
            user = ("nobody", "prom")[i % 2]
            async with s.get(url, headers={"Authorization": basic(user, f"wrong-{i}")}) as r:
                return r.status, r.headers.get("Retry-After")

        flood = [asyncio.create_task(attempt(i)) for i in range(n)]
        await asyncio.sleep(0.05)
        cached = await get(url, auth=basic("prom", PASSWORD))  # during the flood
        results = await asyncio.gather(*flood)

    statuses = collections.Counter(status for status, _ in results)
    assert set(statuses) <= {401, 503}, statuses
    assert statuses[503] >= 1 and statuses[401] >= 1, statuses
    assert all(ra == "1" for status, ra in results if status == 503)
    assert guard.bcrypt_shed_total == statuses[503]
    # Exported with the agent's self-metrics (and route's, the same collector).
    agent = Agent(cfgmod.loads("agent: {region: r}\ntargets: []\n"), web_guard=guard)
    text = b"".join(agent.render_metrics()).decode()
    assert f"edgeprobe_web_basic_auth_shed_total {float(statuses[503])}" in text.splitlines()
    assert peak[0] <= 2  # never more than the worker threads
    assert cached[0] == 200  # a verified scraper is never shed
    # Nothing is left counted as pending: an uncached valid login works right after.
    await asyncio.sleep(0)
    assert guard._bcrypt_pending == 0
    assert (await get(url, auth=basic("ops", PASSWORD)))[0] == 200
    guard.close()


# ---------------------------------------------------------------------------------------------
# The same errors through the agent: /-/reload and start-up.

AGENT_CFG = "agent: {region: id-jakarta}\ntargets: []\n"
MISTAGGED = (
    f"tls_server_config: {{cert_file: server.crt, key_file: server.key}}\n"
    f"basic_auth_users:\n  prom: !!int {HASH}\n"
)


async def test_reload_with_a_mistagged_hash_fails_cleanly(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    from agent.app import Agent
    from agent.config import load as cfgmod
    from agent.server.http import build_app
    from agent.server.http import serve as serve_app

    caplog.set_level(logging.DEBUG)
    cfg_path = pki.dir / "edgeprobe.yml"
    cfg_path.write_text(AGENT_CFG)
    path = write_cfg(pki, {"tls_server_config": TLS, "basic_auth_users": {"prom": HASH}})
    guard = WebGuard(path)
    agent = Agent(cfgmod.load(cfg_path), cfg_path, web_guard=guard)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    runner = await serve_app(
        build_app(agent, middlewares=guard.middlewares()),
        f"127.0.0.1:{port}",
        ssl_context=guard.ssl_context,
    )
    base, ctx, auth = f"https://127.0.0.1:{port}", pki.client_ctx(), basic("prom", PASSWORD)
    try:
        path.write_text(MISTAGGED)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            async with s.post(base + "/-/reload", ssl=ctx, headers={"Authorization": auth}) as r:
                status, body = r.status, await r.text()
            async with s.get(base + "/metrics", ssl=ctx, headers={"Authorization": auth}) as r:
                metrics = await r.text()
        assert status == 500 and "web.yml:3:" in body and "basic_auth_users.prom" in body
        assert 'edgeprobe_config_last_reload_successful{region="id-jakarta"} 0.0' in metrics
        assert guard.config.basic_auth_users["prom"] == HASH.encode()  # the old one serves
    finally:
        await runner.cleanup()
    for secret in (HASH, HASH.lower()):
        assert secret not in caplog.text and secret not in body


def test_start_up_with_a_mistagged_hash_exits_with_one_line(pki: Pki) -> None:
    cfg_path = pki.dir / "edgeprobe.yml"
    cfg_path.write_text(AGENT_CFG)
    (pki.dir / "web.yml").write_text(MISTAGGED)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "run",
            f"--config.file={cfg_path}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--web.config.file={pki.dir / 'web.yml'}",
            "--log.format=logfmt",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("edgeprobe:")]
    assert len(lines) == 1 and "basic_auth_users.prom" in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    out = res.stdout + res.stderr
    assert HASH not in out and HASH.lower() not in out


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed")
async def test_prometheus_scrapes_on_through_a_policy_change(pki: Pki) -> None:
    """The connection Prometheus keeps alive is closed after a client policy change; Go's
    client resends the scrape on a new connection, so no scrape fails."""
    ca_b = trustme.CA()
    (pki.dir / "bundle.crt").write_bytes(pki.ca.cert_pem.bytes() + ca_b.cert_pem.bytes())
    client = pki.ca.issue_cert("prometheus.example.net")
    client.cert_chain_pems[0].write_to_path(str(pki.dir / "client.crt"))
    client.private_key_pem.write_to_path(str(pki.dir / "client.key"))
    tls = {**TLS, "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": "ca.crt"}
    guard = WebGuard(write_cfg(pki, {"tls_server_config": tls}))
    ports: list[int] = []

    async def metrics(request: web.Request) -> web.Response:
        assert request.transport is not None
        ports.append(request.transport.get_extra_info("peername")[1])
        return web.Response(text="edgeprobe_up 1\n")

    app = web.Application(middlewares=guard.middlewares())
    app.router.add_get("/metrics", metrics)
    runner, port = await serve_app(app, guard.ssl_context)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        prom_port = sock.getsockname()[1]
    (pki.dir / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "edgeprobe",
                        "scheme": "https",
                        "tls_config": {
                            "ca_file": str(pki.dir / "ca.crt"),
                            "cert_file": str(pki.dir / "client.crt"),
                            "key_file": str(pki.dir / "client.key"),
                        },
                        "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
                    }
                ],
            }
        )
    )
    prom = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={pki.dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={pki.dir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    async def scrapes(n: int) -> None:
        deadline = time.monotonic() + 30
        while len(ports) < n:
            assert prom.poll() is None and time.monotonic() < deadline, "no scrapes"
            await asyncio.sleep(0.1)

    try:
        await scrapes(3)
        before = len(ports)
        write_cfg(pki, {"tls_server_config": {**tls, "client_ca_file": "bundle.crt"}})
        guard.reload()
        await scrapes(before + 3)
        await asyncio.sleep(1.5)  # let Prometheus commit the last samples
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s,
            s.get(
                f"http://127.0.0.1:{prom_port}/api/v1/query",
                params={"query": 'up{job="edgeprobe"}[5m]'},
            ) as r,
        ):
            samples = [float(v) for _, v in (await r.json())["data"]["result"][0]["values"]]
    finally:
        stop(prom)
        await runner.cleanup()
    assert len(set(ports[:before])) == 1  # one kept-alive connection
    assert set(ports[before:]).isdisjoint(ports[:before])  # a new one after the reload
    assert len(samples) >= 5 and set(samples) == {1.0}, samples  # no scrape failed


async def test_a_scraper_in_use_stays_cached(
    pki: Pki, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Used at least once a minute, a verified credential never needs bcrypt again: a flood
    that fills the bcrypt queue cannot fail a steady scraper's scrapes."""
    calls = [0]
    real = bcrypt.checkpw

    def spy(password: bytes, hashed: bytes) -> bool:
        calls[0] += 1
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", spy)
    now = [0.0]
    guard = WebGuard(write_cfg(pki, {"basic_auth_users": {"prom": HASH}}), clock=lambda: now[0])
    url = await serve(guard)
    for t in (0.0, 50.0, 100.0, 150.0):  # a 50 s scrape interval, past the 60 s TTL
        now[0] = t
        assert (await get(url, auth=basic("prom", PASSWORD)))[0] == 200
    assert calls[0] == 1
    now[0] += 61.0  # unused for longer than the TTL: verified anew
    assert (await get(url, auth=basic("prom", PASSWORD)))[0] == 200
    assert calls[0] == 2
