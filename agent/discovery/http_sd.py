"""``http_sd``: target groups from an HTTP endpoint (bounded body, optional basic auth)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from agent.discovery.config import HttpSDConfig
from agent.discovery.groups import DiscoveredTarget, SDError, decode_sd_text, parse_groups
from agent.discovery.source import Source


class HttpSD(Source):
    kind = "http_sd"

    def __init__(self, cfg: HttpSDConfig, base_dir: Path = Path(".")) -> None:
        super().__init__(cfg.name, cfg.refresh_interval)
        self.cfg = cfg
        self.base_dir = base_dir
        self._session: aiohttp.ClientSession | None = None

    def _auth_header(self) -> dict[str, str]:
        ba = self.cfg.basic_auth
        if ba is None:
            return {}
        password = ""
        if ba.password_file:
            p = Path(ba.password_file)
            p = p if p.is_absolute() else self.base_dir / p
            try:
                password = p.read_text().strip()
            except OSError as e:
                raise SDError("io", f"basic_auth.password_file: {e.strerror}") from None
        return {"Authorization": aiohttp.encode_basic_auth(ba.username, password)}

    async def refresh(self) -> list[DiscoveredTarget]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": "edgeprobe", "Accept": "application/json"}
            )
        headers = {
            "X-Prometheus-Refresh-Interval-Seconds": f"{self.cfg.refresh_interval:g}",
            **self._auth_header(),
        }
        try:
            async with self._session.get(
                self.cfg.url,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
            ) as r:
                if r.status != 200:
                    raise SDError("http_status", f"HTTP status {r.status}")
                if r.content_type != "application/json":
                    raise SDError(
                        "content_type",
                        f"content type {r.content_type[:60]!r}, expected application/json",
                    )
                body = await self._read_body(r)
        except TimeoutError:
            raise SDError("timeout", f"no answer within {self.cfg.timeout:g}s") from None
        except aiohttp.ClientError as e:
            raise SDError("connect", type(e).__name__) from None
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise SDError("parse", "not UTF-8") from None
        doc = await asyncio.to_thread(decode_sd_text, text, False)
        return parse_groups(doc, self.cfg.name, self.cfg.probes, self.cfg.max_targets)

    async def _read_body(self, r: aiohttp.ClientResponse) -> bytes:
        """The whole body, or SDError("too_large") as soon as it passes ``max_bytes``
        (counted after any content decoding, so a compressed bomb is stopped too). One
        ``read(n)`` returns what has arrived so far, not n bytes: read until the end."""
        limit = self.cfg.max_bytes
        too_large = SDError("too_large", f"body larger than {limit} bytes")
        if (
            r.content_length is not None
            and r.content_length > limit
            and "Content-Encoding" not in r.headers
        ):
            raise too_large
        body = bytearray()
        async for chunk in r.content.iter_chunked(64 << 10):
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
