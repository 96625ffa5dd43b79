"""The web config's TLS: a fresh server SSL context per load (OpenSSL can add CAs to a context
but not remove them), the client policy that decides whether a kept-alive connection outlives a
reload, and loading a web config file with its certificates proven to load."""

from __future__ import annotations

import dataclasses
import re
import ssl
from collections.abc import Hashable
from pathlib import Path

from agent.server.webconfig import (
    CIPHER_SUITES,
    CLIENT_AUTH_TYPES,
    CURVES,
    MAX_FILE_BYTES,
    TLS_VERSIONS,
    WebConfig,
    WebConfigError,
    parse_web_config,
)

_PEM_CERT_RE = re.compile(
    r"-----BEGIN (TRUSTED |X509 )?CERTIFICATE-----[A-Za-z0-9+/=\s]+"
    r"-----END \1?CERTIFICATE-----"
)


def server_context(cfg: WebConfig) -> tuple[ssl.SSLContext, Hashable] | None:
    """A new server context and its client policy: everything that decides which clients
    a handshake admits (all of tls_server_config but the server's own certificate and key,
    with the client CAs by content)."""
    if cfg.tls_server_config is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client_cas = _configure(cfg, ctx)
    policy = dataclasses.replace(
        cfg.tls_server_config,
        cert_file="",
        key_file="",
        cert="",
        key="",
        client_ca_file="",
        client_ca="",
    )
    return ctx, (policy, client_cas)


def _configure(cfg: WebConfig, ctx: ssl.SSLContext) -> str:
    """Load certificates and policy into a fresh ``ctx``; returns the client CAs loaded.
    Only ever on a new context: OpenSSL can add CAs to a context but not remove them."""
    t = cfg.tls_server_config
    assert t is not None
    ctx.minimum_version = TLS_VERSIONS[t.min_version]
    ctx.maximum_version = TLS_VERSIONS[t.max_version]
    if t.cipher_suites:
        ctx.set_ciphers(":".join(CIPHER_SUITES[c] for c in t.cipher_suites))
    if t.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if t.curve_preferences:
        ctx.set_ecdh_curve(CURVES[t.curve_preferences[0]])
    try:
        _load_cert_chain(ctx, _path(cfg, t.cert_file), t.cert, _path(cfg, t.key_file), t.key)
    except (OSError, ssl.SSLError) as e:
        # The OpenSSL message names no key material; errno text names the file at most.
        raise WebConfigError(
            f"tls_server_config: cannot load certificate/key: {_describe(e)}"
        ) from None
    ctx.verify_mode = CLIENT_AUTH_TYPES[t.client_auth_type]
    if not (t.client_ca_file or t.client_ca):
        return ""
    # Read once and loaded from memory, so that the policy compared across reloads is
    # exactly what this context trusts.
    try:
        text = t.client_ca or _path(cfg, t.client_ca_file).read_bytes().decode("latin-1")
    except OSError as e:
        raise WebConfigError(f"tls_server_config: cannot load client CA: {_describe(e)}") from None
    pem = "\n".join(m.group(0) for m in _PEM_CERT_RE.finditer(text))
    if not pem:
        raise WebConfigError("tls_server_config: no PEM certificate in the client CA")
    try:
        ctx.load_verify_locations(cadata=pem)
    except ssl.SSLError as e:
        raise WebConfigError(f"tls_server_config: cannot load client CA: {_describe(e)}") from None
    return pem


def _path(cfg: WebConfig, p: str) -> Path:
    return cfg.base_dir / p if p and not Path(p).is_absolute() else Path(p)


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} ({e.filename})" if e.filename else e.strerror
    return type(e).__name__ + (f": {e.reason}" if isinstance(e, ssl.SSLError) and e.reason else "")


def _load_cert_chain(
    ctx: ssl.SSLContext, cert_file: Path, cert: str, key_file: Path, key: str
) -> None:
    if cert_file.name and key_file.name:
        ctx.load_cert_chain(str(cert_file), str(key_file))
        return
    # Inline PEM: ssl only loads from files, so use a private temporary directory.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgeprobe-tls-") as d:
        cpath, kpath = (
            str(cert_file) if cert_file.name else f"{d}/c.pem",
            str(key_file) if key_file.name else f"{d}/k.pem",
        )
        if not cert_file.name:
            Path(cpath).write_text(cert)
        if not key_file.name:
            Path(kpath).write_text(key)
            Path(kpath).chmod(0o600)
        ctx.load_cert_chain(cpath, kpath)


def load_with_tls(path: Path) -> tuple[WebConfig, tuple[ssl.SSLContext, Hashable] | None]:
    """Read, decode and fully validate ``path``; the SSL context proves cert, key and CA load.
    Raises WebConfigError only, with a message that quotes no value from the file."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise WebConfigError(f"{path}: {_describe(e)}") from None
    if len(data) > MAX_FILE_BYTES:
        raise WebConfigError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise WebConfigError(f"{path}: not UTF-8") from None
    try:
        # Relative file names are relative to the config file, like the toolkit's.
        cfg = parse_web_config(text, base_dir=path.parent, source=str(path))
        return cfg, server_context(cfg)
    except WebConfigError:
        raise
    except Exception as e:
        # A case the decoder does not foresee must still be a clean error, and its text may
        # quote a secret: keep the type only.
        raise WebConfigError(f"{path}: unusable web config ({type(e).__name__})") from None


def load_web_config(path: str | Path) -> WebConfig:
    """Read, decode and fully validate ``path``, including loading the certificates once."""
    return load_with_tls(Path(path))[0]
