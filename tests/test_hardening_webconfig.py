"""--web.config.file: TLS and basic auth with a real aiohttp client over loopback sockets."""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import bcrypt
import pytest
import trustme
import yaml
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.webconfig import WebConfigError, WebGuard, load_web_config, parse_web_config

PASSWORD = "s3cret-pw"
# Cost 4 is bcrypt's minimum: the test exercises the code path, not the work factor.
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


@dataclass
class Pki:
    ca: trustme.CA
    dir: Path

    def client_ctx(self, cert: bool = False, max_version: ssl.TLSVersion | None = None
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
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=guard.ssl_context)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        scheme = "https" if guard.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{port}/metrics"

    yield start
    for r in runners:
        await r.cleanup()


async def get(url: str, ctx: ssl.SSLContext | bool | None = None,
              auth: str | None = None) -> tuple[int, str, dict[str, str]]:
    headers = {"Authorization": auth} if auth else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s, \
            s.get(url, ssl=ctx if ctx is not None else True, headers=headers) as r:
        return r.status, await r.text(), dict(r.headers)


async def test_tls_and_basic_auth(pki: Pki, serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    guard = WebGuard(write_cfg(pki, {"tls_server_config": TLS,
                                     "basic_auth_users": {"prom": HASH}}))
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
    tls: dict[str, object] = {**TLS, "client_auth_type": "RequireAndVerifyClientCert",
                              "client_ca_file": "ca.crt"}
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
    guard = WebGuard(write_cfg(pki, {
        "http_server_config": {"headers": {"X-Frame-Options": "deny",
                                           "X-Content-Type-Options": "nosniff"}},
        "rate_limit": {"interval": "1s", "burst": 2}}), clock=lambda: now[0])
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
    write_cfg(pki, {"tls_server_config": {"cert_file": "server2.crt", "key_file": "server2.key"},
                    "basic_auth_users": {"prom": new_hash}})
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


@pytest.mark.parametrize(("doc", "match"), [
    ({"basic_auth_user": {"a": HASH}}, "unknown key 'basic_auth_user'"),
    ({"tls_server_config": {**TLS, "min_versoin": "TLS12"}}, "unknown key 'min_versoin'"),
    ({"tls_server_config": {"cert_file": "server.crt"}}, "key_file"),
    ({"tls_server_config": {**TLS, "min_version": "TLS9"}}, "min_version"),
    ({"tls_server_config": {**TLS, "min_version": "TLS13", "max_version": "TLS12"}}, "above"),
    ({"tls_server_config": {**TLS, "client_auth_type": "RequireAnyClientCert"}}, "not supported"),
    ({"tls_server_config": {**TLS, "client_auth_type": "RequireAndVerifyClientCert"}},
     "client_ca_file"),
    ({"tls_server_config": {**TLS, "cipher_suites": ["TLS_NULL"]}}, "cipher_suites"),
    ({"tls_server_config": {"cert_file": "nope.crt", "key_file": "server.key"}}, "cannot load"),
    ({"basic_auth_users": {"prom": "plaintext-password"}}, "not a bcrypt hash"),
    ({"basic_auth_users": {"a:b": HASH}}, "no ':'"),
    ({"basic_auth_users": ["prom"]}, "expected a mapping"),
    ({"http_server_config": {"headers": {"X-Frame-Options": "allow"}}}, "deny"),
    ({"http_server_config": {"headers": {"Server": "x"}}}, "unknown key"),
    ({"rate_limit": {"interval": "1 second", "burst": 1}}, "invalid duration"),
    ({"rate_limit": {"interval": "1s"}}, "burst"),
])
def test_strict_errors(pki: Pki, doc: dict[str, object], match: str) -> None:
    with pytest.raises(WebConfigError, match=match) as e:
        load_web_config(write_cfg(pki, doc))
    assert "plaintext-password" not in str(e.value) and HASH not in str(e.value)


def test_yaml_error_does_not_quote_the_file(pki: Pki) -> None:
    p = pki.dir / "web.yml"
    p.write_text(f"basic_auth_users:\n  prom: {HASH}\n  : [\n")
    with pytest.raises(WebConfigError) as e:
        load_web_config(p)
    assert HASH not in str(e.value) and "web.yml:" in str(e.value)


def test_inline_cert_and_key(pki: Pki) -> None:
    cfg = load_web_config(write_cfg(pki, {"tls_server_config": {
        "cert": (pki.dir / "server.crt").read_text(), "key": (pki.dir / "server.key").read_text(),
        "curve_preferences": ["X25519", "CurveP256"], "cipher_suites": [
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"]}}))
    assert cfg.ssl_context() is not None
    assert "PRIVATE KEY" not in repr(cfg)


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["tls_server_config", "basic_auth_users", "cert_file",
                                       "key_file", "http_server_config", "headers", "rate_limit",
                                       "interval", "burst", "min_version", "x"]) | st.text(
                                           max_size=8), inner, max_size=4),
    max_leaves=20)


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
