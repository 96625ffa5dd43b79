"""``--web.config.file``: TLS, basic auth and response headers for the agent's HTTP server.

The file format is the Prometheus exporter-toolkit one (``docs/web-configuration.md`` in
prometheus/exporter-toolkit), so a Prometheus scrape config with ``basic_auth`` and
``tls_config`` that works against node_exporter works unchanged against edgeprobe.

The sections are dataclasses that :mod:`agent.config.decode` decodes strictly: an unknown key is
an error (a typo such as ``basic_auth_user`` must not silently disable authentication), and an
error names the file, the line and the key. Secrets (``tls_server_config.key``, the bcrypt
hashes) never appear in an error message, a ``repr`` or a log line.

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
from typing import ClassVar

import bcrypt

from agent.config import decode
from agent.config.decode import Duration, Problem
from probes.base import secret_field

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


def _choices(value: str, choices: Mapping[str, object], key: str) -> list[Problem]:
    if value in choices:
        return []
    return [Problem(key, f"unknown value {value[:60]!r}; one of " + ", ".join(choices))]


@dataclass(frozen=True)
class TLSServerConfig:
    NULL_IS_UNSET: ClassVar[bool] = True

    cert_file: str = ""
    key_file: str = ""
    cert: str = field(default="", repr=False)
    key: str = secret_field()
    client_ca: str = field(default="", repr=False)
    client_ca_file: str = ""
    client_auth_type: str = "NoClientCert"
    client_allowed_sans: tuple[str, ...] = ()
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    cipher_suites: tuple[str, ...] = ()
    prefer_server_cipher_suites: bool = True
    curve_preferences: tuple[str, ...] = ()

    def validate(self) -> list[Problem]:
        if self == TLSServerConfig():
            # The toolkit serves plain HTTP here; someone who wrote the key meant TLS.
            return [Problem("", _EMPTY_TLS)]
        errs: list[Problem] = []
        if bool(self.cert) == bool(self.cert_file):
            errs.append(Problem("cert_file", "exactly one of cert_file and cert is required"))
        if bool(self.key) == bool(self.key_file):
            errs.append(Problem("key_file", "exactly one of key_file and key is required"))
        if self.client_ca and self.client_ca_file:
            errs.append(Problem("client_ca_file", "at most one of client_ca_file and client_ca"))
        auth = self.client_auth_type
        if auth in UNSUPPORTED_CLIENT_AUTH:
            errs.append(
                Problem(
                    "client_auth_type",
                    f"{auth} accepts unverified client certificates and is not supported; "
                    "use RequireAndVerifyClientCert",
                )
            )
        else:
            errs += _choices(auth, CLIENT_AUTH_TYPES, "client_auth_type")
        if auth != "NoClientCert" and not (self.client_ca or self.client_ca_file):
            errs.append(Problem("client_auth_type", f"{auth} needs client_ca_file"))
        if self.client_allowed_sans and auth != "RequireAndVerifyClientCert":
            errs.append(
                Problem("client_allowed_sans", "needs client_auth_type RequireAndVerifyClientCert")
            )
        versions = _choices(self.min_version, TLS_VERSIONS, "min_version") + _choices(
            self.max_version, TLS_VERSIONS, "max_version"
        )
        if not versions and TLS_VERSIONS[self.min_version] > TLS_VERSIONS[self.max_version]:
            versions.append(Problem("min_version", "min_version is above max_version"))
        errs += versions
        for i, c in enumerate(self.cipher_suites):
            errs += _choices(c, CIPHER_SUITES, f"cipher_suites[{i}]")
        for i, c in enumerate(self.curve_preferences):
            errs += _choices(c, CURVES, f"curve_preferences[{i}]")
        return errs


_EMPTY_TLS = "empty; set cert_file and key_file, or remove tls_server_config to serve plain HTTP"


@dataclass(frozen=True)
class HTTPServerConfig:
    NULL_IS_UNSET: ClassVar[bool] = True

    http2: bool = True  # accepted and ignored: aiohttp serves HTTP/1.1 only
    headers: Mapping[str, str | None] = field(default_factory=dict)

    @property
    def response_headers(self) -> dict[str, str]:
        """The headers to add to every response (an empty or null value sets none)."""
        return {k: v for k, v in self.headers.items() if v}

    def validate(self) -> list[Problem]:
        errs: list[Problem] = []
        for k, v in self.headers.items():
            key = f"headers.{k[:60]}"
            if k not in HEADERS:
                errs.append(Problem(key, "unknown key (known keys: " + ", ".join(HEADERS) + ")"))
                continue
            allowed = HEADERS[k]
            if v and allowed is not None and v.lower() not in allowed:
                errs.append(Problem(key, "one of " + ", ".join(allowed)))
            if v and ("\n" in v or "\r" in v):
                errs.append(Problem(key, "must be a single line"))
        return errs


@dataclass(frozen=True)
class RateLimit:
    NULL_IS_UNSET: ClassVar[bool] = True

    interval: Duration = Duration(0.0)  # between two requests; 0 disables the limiter
    burst: int = 0

    def validate(self) -> list[Problem]:
        if self.interval >= 1e9:
            return [Problem("interval", "duration out of range")]
        if not 0 <= self.burst <= 1_000_000:
            return [Problem("burst", "expected an integer between 0 and 1000000")]
        if self.interval > 0 and self.burst < 1:
            return [Problem("burst", "must be >= 1 when interval is set")]
        return []


@dataclass(frozen=True)
class WebConfigFile:
    """What the file says, under the exporter-toolkit's key names."""

    NULL_IS_UNSET: ClassVar[bool] = True

    tls_server_config: TLSServerConfig | None = None
    http_server_config: HTTPServerConfig = field(default_factory=HTTPServerConfig)
    # user -> bcrypt hash. A secret: a hash can be cracked offline.
    basic_auth_users: Mapping[str, bytes] = secret_field(factory=dict)
    rate_limit: RateLimit = field(default_factory=RateLimit)

    def validate(self) -> list[Problem]:
        errs: list[Problem] = []
        for user, hashed in self.basic_auth_users.items():
            # Never echo the value, not even its cost: it is a secret even when malformed.
            key = f"basic_auth_users.{user[:60]}"
            if not user or ":" in user:
                errs.append(Problem(key, "a user name must be non-empty and contain no ':'"))
            elif (problem := _bcrypt_problem(hashed)) is not None:
                errs.append(Problem(key, problem))
        return errs


def _bcrypt_problem(hashed: bytes) -> str | None:
    m = _BCRYPT_RE.fullmatch(hashed.decode(errors="replace"))
    if m is None:
        return (
            "not a bcrypt hash ($2a$/$2b$/$2y$, two-digit cost, 53 characters, nothing around it)"
        )
    if not BCRYPT_MIN_COST <= int(m.group(1)) <= BCRYPT_MAX_COST:
        return (
            f"bcrypt cost outside {BCRYPT_MIN_COST}..{BCRYPT_MAX_COST} "
            "(every login would take too long)"
        )
    if _BCRYPT_ALPHABET.index(m.group(2)[-1]) % 16 or _BCRYPT_ALPHABET.index(m.group(3)[-1]) % 4:
        return "not a canonical bcrypt hash; it can never match"
    return None


@dataclass(frozen=True)
class WebConfig(WebConfigFile):
    """The file's sections, and what the agent derives from them."""

    base_dir: Path = Path(".")  # relative file names are relative to the web config file
    # Checked for a user name that is not configured, so that "no such user" costs as much
    # bcrypt work as "wrong password" (no user enumeration by timing). Its cost is the highest
    # among the configured hashes; it matches no password.
    dummy_hash: bytes = field(default=b"", repr=False)


def bcrypt_cost(hashed: bytes) -> int:
    """The cost of a hash that passed :meth:`WebConfigFile.validate`."""
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


def parse_web_config(
    text: str, base_dir: Path = Path("."), source: str = "<web config>"
) -> WebConfig:
    """Decode and validate a web config (without touching certificate files)."""
    try:
        root = decode.compose(text, source)
        if root is None or decode.is_null(root):
            return WebConfig(base_dir=base_dir)
        file = decode.decode_dataclass(WebConfigFile, root)
        if file.tls_server_config is None:
            # ``tls_server_config:`` with nothing under it: as for an empty mapping.
            present = decode.mapping_items(root, "").get("tls_server_config")
            if present is not None:
                raise decode.ConfigError(
                    "tls_server_config", _EMPTY_TLS, decode.line_of(present[0])
                )
    except decode.ConfigError as e:
        raise WebConfigError(str(e.in_file(source))) from None
    return WebConfig(
        **decode.fields_as_dict(file),
        base_dir=base_dir,
        dummy_hash=_dummy_hash(file.basic_auth_users),
    )
