"""What ``/probe`` refuses: modules that carry credentials, malformed targets, and addresses
outside the allow lists or inside a special range."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from agent.server.probe.config import (
    IPAddress,
    ProbeEndpointConfig,
    embedded_ipv4,
    special_category,
)
from probes.base import CommonOptions

# Request headers that carry no secret. Any other header counts as a credential: a token can
# hide under any name (X-Api-Key, X-Edge-Pass, ...), so the list says what is safe, not what
# is not.
HARMLESS_HEADERS = frozenset(
    {
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "cache-control",
        "connection",
        "content-type",
        "dnt",
        "host",
        "origin",
        "pragma",
        "referer",
        "user-agent",
        "x-requested-with",
    }
)
# Option fields that hold a credential when set (passwords, password files, TURN usernames,
# tokens, client certificates and keys). Matched by name, so a new field named like one is
# covered without being listed here.
_CREDENTIAL_FIELD = re.compile(
    r"pass|secret|token|bearer|credential|auth|username|cookie|(^|_)cert($|_)|(^|_)key($|_)"
)


def credential_fields(opts: CommonOptions) -> list[str]:
    """The option fields of a module that carry a credential; /probe refuses such a module,
    because the client chooses host, port and path, and the credential would go there."""
    out: list[str] = []
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        if f.name == "headers":
            lines = value.keys() if isinstance(value, Mapping) else value
            names = {str(h).split(":", 1)[0].strip().lower() for h in lines}
            if names - HARMLESS_HEADERS:
                out.append(f.name)
        elif _CREDENTIAL_FIELD.search(f.name) and value:
            out.append(f.name)
    return out


class Refused(Exception):
    def __init__(self, status: int, message: str, why: str) -> None:
        super().__init__(message)
        self.status, self.message, self.why = status, message, why


def parse_target(raw: str) -> tuple[str, int | None, str | None]:
    """``host``, ``host:port``, ``[v6]:port``, a bare IPv6 literal or a URL ->
    (host, port or None, URL path or None)."""
    raw = raw.strip()
    if not raw or len(raw) > 2048 or any(ord(c) < 0x21 or ord(c) == 0x7F for c in raw):
        raise Refused(400, "invalid target", "invalid")
    path: str | None = None
    if "://" in raw:
        try:
            u = urlsplit(raw)
            host, port = u.hostname or "", u.port
        except ValueError:
            raise Refused(400, "invalid target", "invalid") from None
        if u.username is not None or u.password is not None:
            raise Refused(400, "invalid target: credentials in URL", "invalid")
        path = u.path or "/"
        if u.query:
            path += "?" + u.query
    else:
        try:
            ipaddress.IPv6Address(raw)
            return raw, None, None
        except ValueError:
            pass
        try:
            u = urlsplit("//" + raw)
            host, port = u.hostname or "", u.port
        except ValueError:
            raise Refused(400, "invalid target", "invalid") from None
        if u.path or u.query or u.fragment or u.username is not None:
            raise Refused(400, "invalid target", "invalid")
    if not host:
        raise Refused(400, "invalid target", "invalid")
    return host, port, path


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0] if "%" in host else host)
    except ValueError:
        return None


class TargetPolicy:
    """The allowlist and the special-range rules; pure, so each refusal is unit-testable."""

    def __init__(self, cfg: ProbeEndpointConfig) -> None:
        self.cfg = cfg

    def name_allowed(self, host: str) -> bool:
        h = host.lower().rstrip(".")
        for pat in self.cfg.allow_names:
            p = pat.lower().rstrip(".")
            if p.startswith("*."):
                if h.endswith(p[1:]) and len(h) > len(p) - 1:
                    return True
            elif h == p:
                return True
        return False

    def check_address(self, addr: IPAddress, literal: bool) -> None:
        """Raise Refused unless ``addr`` may be probed. ``literal``: the client gave an IP."""
        in_cidrs = [n for n in self.cfg.networks if n.version == addr.version and addr in n]
        if literal and not in_cidrs:
            raise Refused(403, "target refused: not in the allowlist", "allowlist")
        special = special_category(addr)
        if special is None:
            return
        cat, rng = special
        if cat in self.cfg.allow_special:
            return
        # A CIDR the operator wrote inside the special range is an explicit allowance of it.
        v4 = embedded_ipv4(addr)
        probe_addr: IPAddress = v4 if v4 is not None and rng.version == 4 else addr
        if any(
            n.version == rng.version
            and n.subnet_of(rng)  # type: ignore[arg-type]
            and probe_addr in n
            for n in self.cfg.networks
        ):
            return
        raise Refused(403, f"target refused: {cat.replace('_', '-')} address", "special")
