"""The ``webrtc`` and ``relay`` kinds without the lab: options, the answer filter, and the
WHIP teardown rules against real HTTP servers on loopback (no ICE needed for these)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from yarl import URL

from probes import PROBES
from probes.base import ProbeContext, Target
from probes.relay import RelayOptions
from probes.webrtc import WebrtcOptions, keep_candidates, same_origin


def test_registered_with_the_connect_families() -> None:
    w, r = PROBES["webrtc"], PROBES["relay"]
    assert w.metric_prefix == "connect" and not w.packet_based
    assert w.phases == ("gathering", "signalling", "ice", "dtls", "first_media")
    assert r.packet_based and r.metric_prefix == "probe"
    for k in (w, r):
        assert len(set(k.all_reasons)) == len(k.all_reasons)
    assert WebrtcOptions().validate() == []
    assert [e.split(":")[0] for e in RelayOptions().validate()] == ["username"]
    # 50 packets/s of 200 bytes for 5 s, and the whole run fits its interval.
    o = RelayOptions(username="u")
    assert (o.packets, o.spacing, o.payload_size) == (250, 0.02, 200)
    assert o.validate() == [] and o.run_time() <= o.interval


def test_options_validation() -> None:
    def keys(o: Any) -> list[str]:
        return [e.split(":")[0] for e in o.validate()]

    assert keys(WebrtcOptions(dscp="EF")) == ["dscp"]
    assert keys(WebrtcOptions(source_address="192.0.2.1")) == ["source_address"]
    assert keys(WebrtcOptions(relay_only=True)) == ["relay_only"]
    assert keys(WebrtcOptions(relay_only=True, username="u", password_file="/f")) == []
    assert keys(WebrtcOptions(turn_url="stun:x")) == ["turn_url"]
    assert keys(WebrtcOptions(path="whip")) == ["path"]
    assert keys(WebrtcOptions(port=70000)) == ["port"]
    assert keys(RelayOptions(username="u", payload_size=8)) == ["payload_size"]
    assert keys(RelayOptions(username="u", payload_size=1500)) == ["payload_size"]
    assert keys(RelayOptions(username="u", packets=250, spacing=0.2)) == ["interval"]
    assert "password" not in repr(RelayOptions(username="u", password="s3cret")).replace(
        "password_file", ""
    )


SDP = (
    "v=0\r\na=mid:0\r\na=candidate:1 1 udp 1 192.0.2.1 5000 typ host\r\n"
    "a=candidate:2 1 udp 1 2001:db8::1 5000 typ host\r\na=end-of-candidates\r\n"
)


def test_keep_candidates_filters_remote_candidates() -> None:
    assert keep_candidates(SDP, "auto") == SDP
    v4 = keep_candidates(SDP, "ipv4")
    assert "192.0.2.1" in v4 and "2001:db8::1" not in v4 and "a=mid:0" in v4
    v6 = keep_candidates(SDP, "ipv6")
    assert "192.0.2.1" not in v6 and "2001:db8::1" in v6
    # Only the signalled address: a hostile answer cannot aim checks elsewhere.
    only = keep_candidates(
        SDP + "a=candidate:3 1 udp 1 198.51.100.7 53 typ host\r\n", "auto", "2001:db8:0::1"
    )
    assert "2001:db8::1" in only and "192.0.2.1" not in only and "198.51.100.7" not in only
    # mDNS names are dropped: the probe resolves no name an answer hands it.
    assert "x.local" not in keep_candidates(
        "a=candidate:4 1 udp 1 x.local 5000 typ host\r\n", "auto"
    )


@pytest.fixture
async def servers() -> AsyncIterator[dict[str, Any]]:
    """Two loopback HTTP servers: the WHIP one, and another origin that must see nothing."""
    seen: dict[str, list[tuple[str, str, str]]] = {"whip": [], "other": []}

    def app(name: str, location: str) -> web.Application:
        async def any_(req: web.Request) -> web.Response:
            seen[name].append((req.method, req.path, req.headers.get("Authorization", "")))
            if req.method == "POST":
                return web.Response(
                    status=201,
                    text="<html/>",
                    content_type="text/html",
                    headers={"Location": location},
                )
            return web.Response(status=200)

        a = web.Application()
        a.router.add_route("*", "/{tail:.*}", any_)
        return a

    runners = []
    ports: dict[str, int] = {}
    for name in ("other", "whip"):
        loc = f"http://127.0.0.1:{ports.get('other', 1)}/whip/x" if name == "whip" else "/x"
        r = web.AppRunner(app(name, loc), access_log=None)
        await r.setup()
        site = web.TCPSite(r, "127.0.0.1", 0)
        await site.start()
        ports[name] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        runners.append(r)
    try:
        yield {"ports": ports, "seen": seen}
    finally:
        for r in runners:
            await r.cleanup()


async def test_location_on_another_origin_is_never_sent_the_token(
    servers: dict[str, Any], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The suite runs in a namespace with only loopback, and aioice gathers no loopback
    # candidates: give it one, so the offer is made and the signalling is what is tested.
    import aioice.ice

    monkeypatch.setattr(
        aioice.ice,
        "get_host_addresses",
        lambda use_ipv4, use_ipv6: ["127.0.0.1"] if use_ipv4 else [],
    )
    token = tmp_path / "token"
    token.write_text("t0ken-abc\n")
    o = WebrtcOptions(
        scheme="http",
        port=servers["ports"]["whip"],
        timeout=2.0,
        token_file=str(token),
        first_media="none",
    )
    res = await PROBES["webrtc"].run(Target("e", "127.0.0.1"), o, ProbeContext())
    assert res.reason == "signalling_content_type"
    assert res.errors == {"teardown_failed": 1}
    assert servers["seen"]["other"] == []
    assert servers["seen"]["whip"] == [("POST", "/whip", "Bearer t0ken-abc")]
    assert res.duration == float("inf") and res.gauges == {"connect_over_budget": 1.0}


async def test_unreadable_secrets_are_bounded_reasons(tmp_path: Any) -> None:
    w = PROBES["webrtc"]
    o = WebrtcOptions(scheme="http", port=9, token_file=str(tmp_path / "missing"))
    assert (await w.run(Target("e", "127.0.0.1"), o, ProbeContext())).reason == "token_unreadable"
    o = WebrtcOptions(
        scheme="http",
        port=9,
        relay_only=True,
        username="u",
        password_file=str(tmp_path / "missing"),
    )
    assert (
        await w.run(Target("e", "127.0.0.1"), o, ProbeContext())
    ).reason == "turn_credentials_unreadable"


def test_same_origin() -> None:
    url = URL("https://192.0.2.1:443/whip")
    assert same_origin(url.join(URL("/whip/abc")), url, "edge.example.net") == URL(
        "https://192.0.2.1:443/whip/abc"
    )
    # An absolute Location with the server's name is the same server: aimed at its address.
    assert same_origin(URL("https://edge.example.net/whip/abc"), url, "edge.example.net") == URL(
        "https://192.0.2.1/whip/abc"
    )
    for other in (
        "https://evil.example.net/whip/abc",
        "http://192.0.2.1/whip/abc",
        "https://192.0.2.1:8443/whip/abc",
    ):
        assert same_origin(URL(other), url, "edge.example.net") is None, other
    v6 = URL("https://[2001:db8::1]:443/whip")
    assert same_origin(v6.join(URL("/whip/x")), v6, "edge.example.net") == URL(
        "https://[2001:db8::1]:443/whip/x"
    )
