"""``--web.config.file``: TLS, basic auth and response headers for the agent's HTTP server.

The file format is the Prometheus exporter-toolkit one (``docs/web-configuration.md`` in
prometheus/exporter-toolkit), so a Prometheus scrape config with ``basic_auth`` and
``tls_config`` that works against node_exporter works unchanged against edgeprobe.

Decoding is strict: an unknown key is an error (a typo such as ``basic_auth_user`` must not
silently disable authentication). Secrets (``tls_server_config.key``, the bcrypt hashes) never
appear in an error message, a ``repr`` or a log line.

Differences from the Go implementation, all documented in docs/operations/security.md:

* ``client_auth_type``: Python's ``ssl`` cannot ask for a client certificate without verifying
  it, so ``RequestClientCert`` and ``RequireAnyClientCert`` are rejected (the toolkit itself
  calls them insecure).
* ``curve_preferences``: ``ssl`` sets one ECDH group, so the most preferred curve is used.
* ``http2`` is accepted and ignored: aiohttp serves HTTP/1.1 only.
* The file is read at start and on a reload (:meth:`agent.server.guard.WebGuard.reload`), not
  on every request. A reload builds a new SSL context from scratch: the next handshake sees
  exactly the new file (a removed client CA or cipher restriction is gone), and a kept-alive
  connection made under a client policy that the reload changed is closed at its next request.
* ``tls_server_config`` present but empty is an error (the toolkit serves plain HTTP).
* bcrypt costs outside 4..14 are rejected (a cost of 31 would hang every login), and so is a
  hash that can never match (trailing newline, ``$2$`` prefix, non-canonical encoding).
* bcrypt runs on a small dedicated thread pool behind a bounded queue; when both are full a
  login that is not in the verified-credentials cache gets ``503`` with ``Retry-After``.
"""

from __future__ import annotations

import logging
import re
import secrets
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml

from agent.config import decode

log = logging.getLogger("edgeprobe.web")

MAX_FILE_BYTES = 1 << 20

TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

CLIENT_AUTH_TYPES: dict[str, ssl.VerifyMode] = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
UNSUPPORTED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")

# Go's crypto/tls names (what exporter-toolkit files contain) -> OpenSSL names. TLS 1.3 suites are
# not configurable in Go either, so only the TLS <= 1.2 ones exist here.
CIPHER_SUITES: dict[str, str] = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
}

CURVES: dict[str, str] = {
    "CurveP256": "prime256v1",
    "CurveP384": "secp384r1",
    "CurveP521": "secp521r1",
    "X25519": "X25519",
}

# The headers the toolkit allows, with the values it accepts (None = any string).
HEADERS: dict[str, tuple[str, ...] | None] = {
    "Content-Security-Policy": None,
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-Content-Type-Options": ("nosniff",),
    "X-XSS-Protection": None,
    "Strict-Transport-Security": None,
}

# bcrypt's own base64 alphabet, in value order. A hash is "$2b$" + two-digit cost + "$" + 22
# characters of salt (16 bytes) + 31 of digest (23 bytes). Both end in a character carrying
# fewer than 6 bits; bcrypt only produces (and, for the salt, only accepts) the canonical one.
_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_BCRYPT_RE = re.compile(r"\$2[aby]\$(\d\d)\$([./A-Za-z0-9]{22})([./A-Za-z0-9]{31})")
BCRYPT_MIN_COST, BCRYPT_MAX_COST = 4, 14


class WebConfigError(ValueError):
    """A web config file that cannot be used. The message never contains a secret."""


def parse_duration(value: object, where: str) -> float:
    """:func:`agent.config.decode.parse_duration`, below a billion seconds, as a WebConfigError."""
    try:
        seconds = decode.parse_duration(value)
    except ValueError as e:
        if isinstance(value, str):
            raise WebConfigError(
                f"{where}: invalid duration {value[:40]!r} (e.g. 500ms, 1m30s)"
            ) from None
        raise WebConfigError(f"{where}: {e}") from None
    if seconds >= 1e9:
        raise WebConfigError(f"{where}: duration out of range")
    return seconds


@dataclass(frozen=True)
class TLSServerConfig:
    cert_file: str = ""
    key_file: str = ""
    cert: str = field(default="", repr=False)
    key: str = field(default="", repr=False)
    client_ca: str = field(default="", repr=False)
    client_ca_file: str = ""
    client_auth_type: str = "NoClientCert"
    client_allowed_sans: tuple[str, ...] = ()
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    cipher_suites: tuple[str, ...] = ()
    prefer_server_cipher_suites: bool = True
    curve_preferences: tuple[str, ...] = ()


@dataclass(frozen=True)
class HTTPServerConfig:
    http2: bool = True
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RateLimit:
    interval: float = 0.0  # seconds between two requests; 0 disables the limiter
    burst: int = 0


@dataclass(frozen=True)
class WebConfig:
    tls: TLSServerConfig | None = None
    http: HTTPServerConfig = field(default_factory=HTTPServerConfig)
    # user -> bcrypt hash. repr=False: a hash is a secret too (offline cracking).
    basic_auth_users: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    rate_limit: RateLimit = field(default_factory=RateLimit)
    base_dir: Path = Path(".")
    # Checked for a user name that is not configured, so that "no such user" costs as much
    # bcrypt work as "wrong password" (no user enumeration by timing). Its cost is the highest
    # among the configured hashes; it matches no password.
    dummy_hash: bytes = field(default=b"", repr=False)


# ---------------------------------------------------------------------------------------------
# Strict decoding


def _mapping(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    for k in value:
        if not isinstance(k, str):
            raise WebConfigError(f"{where}: keys must be strings")
    return value


def _check_keys(d: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for k in d:
        if k not in allowed:
            raise WebConfigError(f"{where}: unknown key {k[:60]!r}; allowed: " + ", ".join(allowed))


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise WebConfigError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise WebConfigError(f"{where}: expected true or false, got {type(value).__name__}")
    return value


def _str_list(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise WebConfigError(f"{where}: expected a list, got {type(value).__name__}")
    return tuple(_str(v, f"{where}[{i}]") for i, v in enumerate(value))


def _choice(value: str, choices: Mapping[str, object] | tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise WebConfigError(f"{where}: unknown value {value[:60]!r}; one of " + ", ".join(choices))
    return value


_TLS_KEYS = (
    "cert",
    "key",
    "client_ca",
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "client_allowed_sans",
    "min_version",
    "max_version",
    "cipher_suites",
    "prefer_server_cipher_suites",
    "curve_preferences",
)


def _decode_tls(raw: object) -> TLSServerConfig:
    w = "tls_server_config"
    d = _mapping(raw, w)
    _check_keys(d, _TLS_KEYS, w)
    s = {
        k: _str(d[k], f"{w}.{k}")
        for k in (
            "cert",
            "key",
            "client_ca",
            "cert_file",
            "key_file",
            "client_auth_type",
            "client_ca_file",
            "min_version",
            "max_version",
        )
        if d.get(k) is not None
    }
    t = TLSServerConfig(
        **s,
        client_allowed_sans=_str_list(d.get("client_allowed_sans"), f"{w}.client_allowed_sans"),
        cipher_suites=_str_list(d.get("cipher_suites"), f"{w}.cipher_suites"),
        curve_preferences=_str_list(d.get("curve_preferences"), f"{w}.curve_preferences"),
        prefer_server_cipher_suites=_bool(
            d.get("prefer_server_cipher_suites", True), f"{w}.prefer_server_cipher_suites"
        ),
    )
    if bool(t.cert) == bool(t.cert_file):
        raise WebConfigError(f"{w}: exactly one of cert_file and cert is required")
    if bool(t.key) == bool(t.key_file):
        raise WebConfigError(f"{w}: exactly one of key_file and key is required")
    if t.client_ca and t.client_ca_file:
        raise WebConfigError(f"{w}: at most one of client_ca_file and client_ca")
    if t.client_auth_type in UNSUPPORTED_CLIENT_AUTH:
        raise WebConfigError(
            f"{w}.client_auth_type: {t.client_auth_type} accepts unverified client "
            "certificates and is not supported; use RequireAndVerifyClientCert"
        )
    _choice(t.client_auth_type, CLIENT_AUTH_TYPES, f"{w}.client_auth_type")
    if t.client_auth_type != "NoClientCert" and not (t.client_ca or t.client_ca_file):
        raise WebConfigError(f"{w}: client_auth_type {t.client_auth_type} needs client_ca_file")
    if t.client_allowed_sans and t.client_auth_type != "RequireAndVerifyClientCert":
        raise WebConfigError(
            f"{w}.client_allowed_sans: needs client_auth_type RequireAndVerifyClientCert"
        )
    _choice(t.min_version, TLS_VERSIONS, f"{w}.min_version")
    _choice(t.max_version, TLS_VERSIONS, f"{w}.max_version")
    if TLS_VERSIONS[t.min_version] > TLS_VERSIONS[t.max_version]:
        raise WebConfigError(f"{w}: min_version is above max_version")
    for i, c in enumerate(t.cipher_suites):
        _choice(c, CIPHER_SUITES, f"{w}.cipher_suites[{i}]")
    for i, c in enumerate(t.curve_preferences):
        _choice(c, CURVES, f"{w}.curve_preferences[{i}]")
    return t


def _decode_http(raw: object) -> HTTPServerConfig:
    w = "http_server_config"
    d = _mapping(raw, w)
    _check_keys(d, ("http2", "headers"), w)
    headers: dict[str, str] = {}
    hd = _mapping(d.get("headers"), f"{w}.headers")
    _check_keys(hd, tuple(HEADERS), f"{w}.headers")
    for k, v in hd.items():
        if v is None:
            continue
        val = _str(v, f"{w}.headers.{k}")
        allowed = HEADERS[k]
        if allowed is not None and val.lower() not in allowed:
            raise WebConfigError(f"{w}.headers.{k}: one of " + ", ".join(allowed))
        if "\n" in val or "\r" in val:
            raise WebConfigError(f"{w}.headers.{k}: must be a single line")
        if val:
            headers[k] = val
    return HTTPServerConfig(http2=_bool(d.get("http2", True), f"{w}.http2"), headers=headers)


def _decode_users(raw: object) -> dict[str, bytes]:
    w = "basic_auth_users"
    d = _mapping(raw, w)
    users: dict[str, bytes] = {}
    for user, h in d.items():
        if not user or ":" in user:
            raise WebConfigError(f"{w}: a user name must be non-empty and contain no ':'")
        # Never echo the value, not even its cost: it is a secret even when malformed.
        where = f"{w}.{user[:60]!r}"
        if not isinstance(h, str):
            raise WebConfigError(f"{where}: expected a bcrypt hash string, got {type(h).__name__}")
        m = _BCRYPT_RE.fullmatch(h)
        if m is None:
            raise WebConfigError(
                f"{where}: not a bcrypt hash ($2a$/$2b$/$2y$, two-digit cost, "
                "53 characters, nothing around it)"
            )
        if not BCRYPT_MIN_COST <= int(m.group(1)) <= BCRYPT_MAX_COST:
            raise WebConfigError(
                f"{where}: bcrypt cost outside {BCRYPT_MIN_COST}.."
                f"{BCRYPT_MAX_COST} (every login would take too long)"
            )
        if (
            _BCRYPT_ALPHABET.index(m.group(2)[-1]) % 16
            or _BCRYPT_ALPHABET.index(m.group(3)[-1]) % 4
        ):
            raise WebConfigError(f"{where}: not a canonical bcrypt hash; it can never match")
        users[user] = h.encode()
    return users


def bcrypt_cost(hashed: bytes) -> int:
    """The cost of a hash that passed :func:`_decode_users`."""
    return int(hashed[4:6])


def _dummy_hash(users: Mapping[str, bytes]) -> bytes:
    """A well-formed hash at the highest configured cost whose digest is random: checking it
    costs what checking a real user's hash costs, and it matches no password. Built without
    running bcrypt, so a reload never stalls the event loop for a cost-14 hash."""
    if not users:
        return b""
    salt = bcrypt.gensalt(max(bcrypt_cost(h) for h in users.values()))
    digest = "".join(secrets.choice(_BCRYPT_ALPHABET) for _ in range(30)) + secrets.choice(
        _BCRYPT_ALPHABET[::4]
    )
    return salt + digest.encode()


def _decode_rate_limit(raw: object) -> RateLimit:
    w = "rate_limit"
    d = _mapping(raw, w)
    _check_keys(d, ("interval", "burst"), w)
    interval = parse_duration(d.get("interval", 0), f"{w}.interval")
    burst = d.get("burst", 0)
    if isinstance(burst, bool) or not isinstance(burst, int) or not 0 <= burst <= 1_000_000:
        raise WebConfigError(f"{w}.burst: expected an integer between 0 and 1000000")
    if interval > 0 and burst < 1:
        raise WebConfigError(f"{w}.burst: must be >= 1 when interval is set")
    return RateLimit(interval=interval, burst=burst)


class _BadNode(yaml.MarkedYAMLError):
    """A node that could not be constructed, e.g. ``!!int $2b$12$...``; keeps the node so that
    the error can name its key."""

    def __init__(self, node: yaml.Node, problem: str, mark: yaml.Mark | None) -> None:
        super().__init__(problem=problem, problem_mark=mark or node.start_mark)
        self.node = node


class _Loader(yaml.SafeLoader):
    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # deep: build collections here, not later in construct_document, so that a failure is
        # caught below with its node (a self-referencing alias then becomes an error too).
        try:
            return super().construct_object(node, deep=True)
        except _BadNode:
            raise
        except Exception as e:
            if isinstance(e, yaml.MarkedYAMLError) and not isinstance(node, yaml.ScalarNode):
                raise _BadNode(node, str(e.problem), e.problem_mark) from None
            if isinstance(e, yaml.YAMLError) and not isinstance(e, yaml.MarkedYAMLError):
                raise
            # A scalar that its tag cannot decode. The exception text quotes the value
            # (int("$2b$12$..."), or its length for !!binary): keep where it is, not what.
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")[:40]
            raise _BadNode(node, f"the value cannot be decoded as {tag}", None) from None


def _node_path(root: yaml.Node, target: yaml.Node) -> str:
    """``basic_auth_users.prom``: the keys leading to ``target`` (names, never values)."""
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    seen: set[int] = set()
    while stack:
        node, path = stack.pop()
        if node is target:
            return path or "<document>"
        if id(node) in seen:
            continue  # an alias may point back up the tree
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                name = k.value[:60] if isinstance(k, yaml.ScalarNode) else "?"
                stack.append((v, f"{path}.{name}" if path else name))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node.value))
    return "<document>"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _load_yaml(text: str, source: str) -> object:
    loader: _Loader | None = None
    root: yaml.Node | None = None
    try:
        loader = _Loader(text)  # the reader already refuses control characters
        root = loader.get_single_node()
        return loader.construct_document(root) if root is not None else None
    except _BadNode as e:
        m = e.problem_mark
        at = f":{m.line + 1}:{m.column + 1}" if m is not None else ""
        where = _node_path(root, e.node) if root is not None else "<document>"
        raise WebConfigError(f"{source}{at}: {where!r}: {_one_line(str(e.problem))}") from None
    except yaml.MarkedYAMLError as e:
        # str(e) would quote the offending line, which may hold a key or a hash.
        mark = e.problem_mark
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise WebConfigError(f"{source}{at}: invalid YAML: {_one_line(str(e.problem))}") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise WebConfigError(f"{source}: invalid YAML ({type(e).__name__})") from None
    finally:
        if loader is not None:
            loader.dispose()


def parse_web_config(
    text: str, base_dir: Path = Path("."), source: str = "<web config>"
) -> WebConfig:
    """Decode and validate a web config (without touching certificate files)."""
    raw = _load_yaml(text, source) if text.strip() else {}
    d = _mapping(raw, source)
    _check_keys(
        d, ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"), source
    )
    if "tls_server_config" in d and not d["tls_server_config"]:
        # The toolkit serves plain HTTP here; someone who wrote the key meant TLS.
        raise WebConfigError(
            "tls_server_config: empty; set cert_file and key_file, or remove "
            "tls_server_config to serve plain HTTP"
        )
    users = _decode_users(d.get("basic_auth_users"))
    return WebConfig(
        tls=_decode_tls(d["tls_server_config"]) if "tls_server_config" in d else None,
        http=_decode_http(d.get("http_server_config")),
        basic_auth_users=users,
        rate_limit=_decode_rate_limit(d.get("rate_limit")),
        base_dir=base_dir,
        dummy_hash=_dummy_hash(users),
    )
