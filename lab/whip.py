"""A WHIP (RFC 9725) answerer for the lab's edges: an aiortc peer per POSTed offer.

Mounted on the lab's HTTP(S) apps (``lab/services.py``) at ``/whip``:

* ``POST /whip`` with ``Content-Type: application/sdp``: answers the offer (``201 Created``,
  ``Location: /whip/<id>``, ``application/sdp``). A data channel the client opens is an echo:
  every message comes back unchanged, which is what the ``webrtc`` probe's ``first_media``
  phase waits for.
* ``DELETE /whip/<id>``: ends that session (``200``; ``404`` for an unknown one).
* ``POST /whip/fail/<mode>``: broken servers for the failure tests: ``status500``,
  ``status403``, ``nolocation``, ``badsdp``, ``wrongtype``, ``oversized``, ``noice`` (a valid
  answer whose only candidate is a UDP port that never answers, so ICE never completes).

The answer's host candidate is the address the offer arrived on. aioice enumerates interface
addresses, but the lab's edges are local routes in the edge namespace, not interface
addresses, so the gathering is pointed at the request's own address through a context variable
(set in the request's task; aiortc's gathering tasks inherit it). Sessions are bounded in number
and in lifetime, so a client that never DELETEs cannot pile them up.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import secrets
import socket
from typing import Any

from aiohttp import web

MAX_SESSIONS = 200
SESSION_LIFETIME = 30.0  # seconds before an un-DELETEd session is closed anyway
MAX_OFFER_BYTES = 64 << 10

_HOST_ADDRESS: contextvars.ContextVar[str] = contextvars.ContextVar("whip_host_address", default="")


def _patch_gathering() -> None:
    """Make aioice gather on the request's address when one is set (see module docstring)."""
    from aioice import ice

    original = ice.get_host_addresses
    if getattr(original, "_whip", False):
        return

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        addr = _HOST_ADDRESS.get()
        return [addr] if addr else original(use_ipv4, use_ipv6)

    host_addresses._whip = True  # type: ignore[attr-defined]
    ice.get_host_addresses = host_addresses


class WhipAnswerer:
    """The sessions of one app; ``close()`` ends them all."""

    def __init__(self) -> None:
        self.sessions: dict[str, Any] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self._silent: dict[str, socket.socket] = {}
        _patch_gathering()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/whip", self.post)
        app.router.add_delete("/whip/{id}", self.delete)
        app.router.add_post("/whip/fail/{mode}", self.fail)
        app.on_shutdown.append(self._on_shutdown)

    async def _on_shutdown(self, _: web.Application) -> None:
        await self.close()

    async def close(self) -> None:
        for sid in list(self.sessions):
            await self._end(sid)
        for s in self._silent.values():
            s.close()
        self._silent.clear()

    async def _end(self, sid: str) -> bool:
        pc = self.sessions.pop(sid, None)
        h = self._expiry.pop(sid, None)
        if h is not None:
            h.cancel()
        if pc is None:
            return False
        with contextlib.suppress(Exception):
            await pc.close()
        return True

    async def _answer(self, req: web.Request) -> tuple[str, Any]:
        """The answer SDP for the request's offer, and its peer connection."""
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        offer = (await req.read()).decode("utf-8", "replace")
        sockname = req.transport.get_extra_info("sockname") if req.transport else None
        _HOST_ADDRESS.set(str(sockname[0]) if sockname else "")
        # iceServers=[]: aiortc's default would send STUN to a public server.
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))

        def on_channel(ch: Any) -> None:
            def on_message(msg: Any) -> None:
                if ch.readyState == "open":
                    ch.send(msg)

            ch.on("message", on_message)

        pc.on("datachannel", on_channel)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception:
            await pc.close()
            raise
        return str(pc.localDescription.sdp), pc

    async def post(self, req: web.Request) -> web.Response:
        if req.content_type != "application/sdp":
            return web.Response(status=415, text="want application/sdp")
        if (req.content_length or 0) > MAX_OFFER_BYTES:
            return web.Response(status=413)
        if len(self.sessions) >= MAX_SESSIONS:
            return web.Response(status=503, headers={"Retry-After": "1"})
        try:
            sdp, pc = await self._answer(req)
        except Exception:
            return web.Response(status=400, text="bad offer")
        sid = secrets.token_hex(8)
        self.sessions[sid] = pc
        self._expiry[sid] = asyncio.get_running_loop().call_later(
            SESSION_LIFETIME, lambda: asyncio.ensure_future(self._end(sid))
        )
        return web.Response(
            status=201,
            body=sdp.encode(),
            content_type="application/sdp",
            headers={"Location": f"/whip/{sid}"},
        )

    async def delete(self, req: web.Request) -> web.Response:
        return web.Response(status=200 if await self._end(req.match_info["id"]) else 404)

    async def fail(self, req: web.Request) -> web.Response:
        mode = req.match_info["mode"]
        if mode == "status500":
            return web.Response(status=500, text="internal error")
        if mode == "status403":
            return web.Response(status=403, text="forbidden")
        if mode == "badsdp":
            return web.Response(
                status=201,
                body=b"v=0\r\nthis is not sdp\r\n",
                content_type="application/sdp",
                headers={"Location": "/whip/none"},
            )
        if mode == "wrongtype":
            return web.Response(
                status=201,
                text="<html></html>",
                content_type="text/html",
                headers={"Location": "/whip/none"},
            )
        if mode == "oversized":
            return web.Response(
                status=201,
                body=b"a=x\r\n" * (300 << 10),
                content_type="application/sdp",
                headers={"Location": "/whip/none"},
            )
        if mode not in ("nolocation", "noice"):
            return web.Response(status=404)
        sdp, pc = await self._answer(req)
        await pc.close()
        if mode == "nolocation":
            return web.Response(status=201, body=sdp.encode(), content_type="application/sdp")
        return web.Response(
            status=201,
            body=self._blackhole(sdp).encode(),
            content_type="application/sdp",
            headers={"Location": "/whip/none"},
        )

    def _blackhole(self, sdp: str) -> str:
        """``sdp`` with its candidates replaced by one UDP port that reads and never answers."""
        lines = [ln for ln in sdp.split("\r\n") if not ln.startswith("a=candidate:")]
        addr = _HOST_ADDRESS.get() or "127.0.0.1"
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = self._silent.get(addr)
        if s is None:
            # One silent socket per address serves every such answer.
            s = self._silent[addr] = socket.socket(fam, socket.SOCK_DGRAM)
            s.bind((addr, 0))
        port = s.getsockname()[1]
        cand = f"a=candidate:1 1 udp 2130706431 {addr} {port} typ host"
        out: list[str] = []
        for ln in lines:
            out.append(ln)
            if ln.startswith("a=mid:"):
                out.append(cand)
        return "\r\n".join(out)
