"""Dynamic targets: Prometheus ``file_sd`` and ``http_sd`` formats, and DNS SRV records.

Operators keep hundreds of edges in an inventory, not in a hand-edited config. Each source
produces :class:`DiscoveredTarget` lists and calls ``on_change(source_name, targets)`` whenever
its list changes.

An unattended agent must not lose its targets because an inventory file was half-written or an
HTTP endpoint was down: a refresh that fails for any reason keeps the last good list (per file
and per DNS name, so one bad file does not empty the others) and sets
``edgeprobe_sd_last_refresh_successful{source} 0``. To really remove every target of a source,
remove the source or publish an empty list.

Group format (file_sd / http_sd)::

    [{"targets": ["edge-sg-1.example.net", "edge-sg-2.example.net:3478"],
      "labels": {"tier": "near", "__edge__": "sg-2", "__probes__": "icmp,stun"}}]

* a target is ``host`` or ``host:port``; the port is kept for kinds with a ``port`` option;
* the ``edge`` label (the target's name) is ``__edge__`` when a group has exactly one target,
  else the host;
* ``__probes__`` (comma-separated kinds) overrides the source's ``probes``;
* other labels starting with ``__`` are dropped, as Prometheus drops them after relabelling;
  label names edgeprobe sets itself (``region``, ``edge``, ``probe``...) are an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver
import yaml
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.config import rules
from agent.config.decode import Duration, Problem
from agent.config.rules import (
    NAME_RULE,
    RESERVED_LABELS,
    YAMLLimitError,
    is_host,
    is_label_name,
    is_name,
    load_yaml,
)
from probes.base import Target, secret_field

log = logging.getLogger("edgeprobe.discovery")

MAX_LABEL_VALUE = 1024
SD_FILE_SUFFIXES = (".json", ".yml", ".yaml")

# Bounded failure reasons (the `reason` label of edgeprobe_sd_refresh_failures_total).
REASONS = ("io", "parse", "invalid", "too_large", "too_many", "timeout", "connect",
           "http_status", "content_type", "nxdomain", "no_answer", "dns_error")


class SDError(Exception):
    """A refresh failure with a bounded reason; the message is for the log only."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Config (decoded strictly by agent.decode.decode_dataclass)


@dataclass(frozen=True)
class FileSDConfig:
    name: str
    files: tuple[str, ...]
    probes: tuple[str, ...] = ("icmp",)
    poll_interval: Duration = Duration(5.0)
    max_targets: int = 10000
    max_file_bytes: int = 16 << 20

    def validate(self) -> list[Problem]:
        errs = _common_errs(self.name, self.probes, self.max_targets, self.poll_interval,
                            "poll_interval")
        if not self.files:
            errs.append(Problem("files", "at least one file or pattern is required"))
        for f in self.files:
            if not f.endswith(SD_FILE_SUFFIXES):
                errs.append(Problem("files", f"{f!r} must end in .json, .yml or .yaml"))
            if glob.has_magic(os.path.dirname(f)):
                errs.append(Problem("files",
                                    f"{f!r}: patterns are only allowed in the file name"))
        if not 1 <= self.max_file_bytes <= 256 << 20:
            errs.append(Problem("max_file_bytes", "must be between 1 and 256 MiB"))
        return errs


@dataclass(frozen=True)
class BasicAuth:
    username: str
    password_file: str = secret_field()


@dataclass(frozen=True)
class HttpSDConfig:
    name: str
    url: str
    probes: tuple[str, ...] = ("icmp",)
    refresh_interval: Duration = Duration(60.0)
    timeout: Duration = Duration(10.0)
    max_targets: int = 10000
    max_bytes: int = 16 << 20
    basic_auth: BasicAuth | None = None

    def validate(self) -> list[Problem]:
        errs = _common_errs(self.name, self.probes, self.max_targets, self.refresh_interval,
                            "refresh_interval")
        # Whole string: a newline or control character after the host would reach the
        # request line.
        if not (re.fullmatch(r"https?://[^/\s]+(?:/\S*)?", self.url) and self.url.isprintable()):
            errs.append(Problem("url", "must be an http:// or https:// URL"))
        if not 0 < self.timeout <= self.refresh_interval:
            errs.append(Problem("timeout", "must be > 0 and <= refresh_interval"))
        if not 1 <= self.max_bytes <= 256 << 20:
            errs.append(Problem("max_bytes", "must be between 1 and 256 MiB"))
        return errs


@dataclass(frozen=True)
class DnsSDConfig:
    name: str
    names: tuple[str, ...]
    probes: tuple[str, ...] = ("icmp",)
    refresh_interval: Duration = Duration(30.0)
    timeout: Duration = Duration(5.0)
    server: str = ""            # "ip" or "ip:port" / "[ip6]:port"; "" = the system's resolvers
    max_targets: int = 10000

    def validate(self) -> list[Problem]:
        errs = _common_errs(self.name, self.probes, self.max_targets, self.refresh_interval,
                            "refresh_interval")
        if not self.names:
            errs.append(Problem("names", "at least one SRV name is required"))
        for n in self.names:
            if not is_host(n):
                errs.append(Problem("names", f"invalid DNS name {n!r}"))
        if not 0 < self.timeout <= self.refresh_interval:
            errs.append(Problem("timeout", "must be > 0 and <= refresh_interval"))
        if self.server:
            try:
                _split_server(self.server)
            except ValueError as e:
                errs.append(Problem("server", str(e)))
        return errs


@dataclass(frozen=True)
class DiscoveryConfig:
    file_sd: tuple[FileSDConfig, ...] = ()
    http_sd: tuple[HttpSDConfig, ...] = ()
    dns_sd: tuple[DnsSDConfig, ...] = ()

    def validate(self) -> list[Problem]:
        names = [s.name for s in self.sources()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        return [Problem("name", f"source name {n!r} used twice") for n in dupes]

    def sources(self) -> list[FileSDConfig | HttpSDConfig | DnsSDConfig]:
        return [*self.file_sd, *self.http_sd, *self.dns_sd]


def _common_errs(name: str, probes: tuple[str, ...], max_targets: int, interval: float,
                 interval_key: str) -> list[Problem]:
    from probes import PROBES

    errs: list[Problem] = []
    if not is_name(name):
        errs.append(Problem("name", f"must be {NAME_RULE}"))
    if not probes:
        errs.append(Problem("probes", "at least one probe kind is required"))
    for p in probes:
        if p not in PROBES:
            errs.append(Problem("probes", f"unknown probe kind {p!r} (known: "
                                          f"{', '.join(sorted(PROBES))})"))
    if not 1 <= max_targets <= 1_000_000:
        errs.append(Problem("max_targets", "must be between 1 and 1000000"))
    if not 0.1 <= interval <= 86400:
        errs.append(Problem(interval_key, "must be between 100ms and 24h"))
    return errs


def _split_server(server: str) -> tuple[str, int]:
    host, port = split_host_port(server)
    ipaddress.ip_address(host)
    if port is None:
        return host, 53
    if not 1 <= port <= 65535:
        raise ValueError("port must be between 1 and 65535")
    return host, port


# ---------------------------------------------------------------------------------------------
# Target groups


@dataclass(frozen=True)
class DiscoveredTarget:
    target: Target
    probes: tuple[str, ...]
    port: int | None = None      # from "host:port"; for kinds with a `port` option
    source: str = ""


def split_host_port(raw: str) -> tuple[str, int | None]:
    host, port = rules.split_host_port(raw)
    if port == 0:
        raise ValueError("invalid port")
    if not is_host(host):
        raise ValueError("invalid host")
    return host.rstrip("."), port


def parse_groups(data: object, source: str, default_probes: tuple[str, ...],
                 max_targets: int) -> list[DiscoveredTarget]:
    """Validate Prometheus SD target groups. Raises SDError("invalid"/"too_many")."""
    from probes import PROBES

    if not isinstance(data, list):
        raise SDError("invalid", "expected a list of target groups")
    out: list[DiscoveredTarget] = []
    names: set[str] = set()
    for gi, group in enumerate(data):
        where = f"group {gi}"
        if not isinstance(group, dict):
            raise SDError("invalid", f"{where}: expected a mapping")
        unknown = set(group) - {"targets", "labels"}
        if unknown:
            raise SDError("invalid", f"{where}: unknown key(s) "
                          + ", ".join(sorted(map(str, unknown))[:5]))
        targets = group.get("targets") or []
        raw_labels = group.get("labels") or {}
        if not isinstance(targets, list) or not isinstance(raw_labels, dict):
            raise SDError("invalid", f"{where}: targets must be a list, labels a mapping")
        labels: dict[str, str] = {}
        edge, probes = "", default_probes
        for k, v in raw_labels.items():
            if not is_label_name(k):
                raise SDError("invalid", f"{where}: invalid label name {str(k)[:60]!r}")
            if isinstance(v, dict | list) or v is None:
                raise SDError("invalid", f"{where}: label {k}: expected a string")
            # YAML scalars like `tier: 1` are strings to Prometheus too.
            val = str(v).lower() if isinstance(v, bool) else str(v)
            if len(val) > MAX_LABEL_VALUE:
                raise SDError("invalid", f"{where}: label {k}: value too long")
            if k == "__edge__":
                edge = val
            elif k == "__probes__":
                probes = tuple(p.strip() for p in val.split(",") if p.strip())
                bad = [p for p in probes if p not in PROBES]
                if bad or not probes:
                    raise SDError("invalid", f"{where}: __probes__: unknown kind(s) "
                                  + ", ".join(bad[:5]))
            elif k.startswith("__"):
                continue
            elif k in RESERVED_LABELS:
                raise SDError("invalid", f"{where}: label name {k!r} is reserved by edgeprobe")
            else:
                labels[k] = val
        if edge and len(targets) != 1:
            raise SDError("invalid", f"{where}: __edge__ needs exactly one target")
        for ti, t in enumerate(targets):
            if not isinstance(t, str):
                raise SDError("invalid", f"{where}: targets[{ti}]: expected a string")
            try:
                host, port = split_host_port(t)
            except ValueError as e:
                raise SDError("invalid", f"{where}: targets[{ti}]: {e}") from None
            name = edge or host
            if not is_name(name):
                raise SDError("invalid", f"{where}: targets[{ti}]: edge name {name[:70]!r} is "
                              f"not {NAME_RULE} (set __edge__)")
            if name in names:
                raise SDError("invalid", f"{where}: duplicate target name {name!r}")
            names.add(name)
            out.append(DiscoveredTarget(Target(name=name, address=host, labels=dict(labels)),
                                        probes=probes, port=port, source=source))
            if len(out) > max_targets:
                raise SDError("too_many", f"more than {max_targets} targets")
    return out


def decode_sd_text(text: str, yaml_format: bool) -> object:
    try:
        if yaml_format:
            return load_yaml(text)
        return json.loads(text)
    except YAMLLimitError as e:
        at = f"line {e.line}: " if e.line is not None else ""
        raise SDError("too_large" if e.expands else "parse", f"{at}{e.message}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        at = f"line {mark.line + 1}: " if mark is not None else ""
        raise SDError("parse", f"{at}{e.problem}") from None
    except (yaml.YAMLError, ValueError) as e:
        raise SDError("parse", str(e)[:200]) from None
    except RecursionError:
        raise SDError("parse", "nested too deeply") from None


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass
class SourceState:
    name: str
    kind: str                                   # file_sd | http_sd | dns_sd
    successful: bool = False
    targets: list[DiscoveredTarget] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    last_success_time: float = 0.0              # wall clock, for the timestamp metric only
    last_error: str = ""                        # for logs and /config, never a label


class Source:
    """One source: ``refresh()`` fetches, keeps last good parts, and returns the full list."""

    kind = ""

    def __init__(self, name: str, interval: float) -> None:
        self.state = SourceState(name=name, kind=self.kind)
        self.interval = interval

    async def refresh(self) -> list[DiscoveredTarget]:
        raise NotImplementedError

    async def close(self) -> None:
        return None


class FileSD(Source):
    kind = "file_sd"

    def __init__(self, cfg: FileSDConfig, base_dir: Path = Path(".")) -> None:
        super().__init__(cfg.name, cfg.poll_interval)
        self.cfg = cfg
        self.base_dir = base_dir
        self._stamp: dict[str, tuple[int, int, int]] = {}
        self._last_good: dict[str, list[DiscoveredTarget]] = {}

    def _paths(self) -> list[str]:
        out: list[str] = []
        for pat in self.cfg.files:
            p = pat if os.path.isabs(pat) else str(self.base_dir / pat)
            out += sorted(glob.glob(p)) if glob.has_magic(p) else [p] if os.path.exists(p) \
                else []
        return list(dict.fromkeys(out))

    async def refresh(self) -> list[DiscoveredTarget]:
        paths = await asyncio.to_thread(self._paths)
        errors: list[SDError] = []
        for gone in set(self._last_good) - set(paths):
            self._last_good.pop(gone, None)
            self._stamp.pop(gone, None)
        for p in paths:
            try:
                st = os.stat(p)
            except OSError as e:
                errors.append(SDError("io", f"{p}: {e.strerror}"))
                continue
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if self._stamp.get(p) == stamp:
                continue
            try:
                self._last_good[p] = await asyncio.to_thread(self._read, p, st.st_size)
                self._stamp[p] = stamp
            except SDError as e:
                # Keep the file's previous targets; retry on the next poll even if the
                # stamp does not change (the problem may have been a transient read error).
                self._stamp.pop(p, None)
                errors.append(SDError(e.reason, f"{p}: {e}"))
        merged: list[DiscoveredTarget] = []
        seen: set[str] = set()
        for p in paths:
            for t in self._last_good.get(p, []):
                if t.target.name in seen:
                    errors.append(SDError("invalid", f"{p}: duplicate target name "
                                          f"{t.target.name!r} across files"))
                    continue
                seen.add(t.target.name)
                merged.append(t)
        if len(merged) > self.cfg.max_targets:
            raise SDError("too_many", f"more than {self.cfg.max_targets} targets")
        if errors:
            raise _Partial(merged, errors)
        return merged

    def _read(self, path: str, size: int) -> list[DiscoveredTarget]:
        if size > self.cfg.max_file_bytes:
            raise SDError("too_large", f"larger than {self.cfg.max_file_bytes} bytes")
        try:
            with open(path, "rb") as f:
                data = f.read(self.cfg.max_file_bytes + 1)
        except OSError as e:
            raise SDError("io", e.strerror or "read error") from None
        if len(data) > self.cfg.max_file_bytes:
            raise SDError("too_large", f"larger than {self.cfg.max_file_bytes} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SDError("parse", "not UTF-8") from None
        doc = decode_sd_text(text, yaml_format=not path.endswith(".json"))
        return parse_groups(doc, self.cfg.name, self.cfg.probes, self.cfg.max_targets)


class _Partial(Exception):
    """Some parts failed: ``targets`` is the list with last-good parts kept."""

    def __init__(self, targets: list[DiscoveredTarget], errors: list[SDError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.targets = targets
        self.errors = errors


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
                headers={"User-Agent": "edgeprobe", "Accept": "application/json"})
        headers = {"X-Prometheus-Refresh-Interval-Seconds": f"{self.cfg.refresh_interval:g}",
                   **self._auth_header()}
        try:
            async with self._session.get(
                    self.cfg.url, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self.cfg.timeout)) as r:
                if r.status != 200:
                    raise SDError("http_status", f"HTTP status {r.status}")
                if r.content_type != "application/json":
                    raise SDError("content_type", f"content type {r.content_type[:60]!r}, "
                                  "expected application/json")
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
        if r.content_length is not None and r.content_length > limit \
                and "Content-Encoding" not in r.headers:
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


class DnsSD(Source):
    kind = "dns_sd"

    def __init__(self, cfg: DnsSDConfig) -> None:
        super().__init__(cfg.name, cfg.refresh_interval)
        self.cfg = cfg
        if cfg.server:
            host, port = _split_server(cfg.server)
            self.resolver = dns.asyncresolver.Resolver(configure=False)
            self.resolver.nameservers = [host]
            self.resolver.port = port
        else:
            self.resolver = dns.asyncresolver.Resolver()
        self._last_good: dict[str, list[DiscoveredTarget]] = {}

    async def _query(self, name: str) -> list[DiscoveredTarget]:
        try:
            ans = await self.resolver.resolve(name, "SRV", lifetime=self.cfg.timeout,
                                              search=False)
        except dns.resolver.NXDOMAIN:
            raise SDError("nxdomain", f"{name}: no such name") from None
        except dns.resolver.NoAnswer:
            raise SDError("no_answer", f"{name}: no SRV records") from None
        except dns.exception.Timeout:
            raise SDError("timeout", f"{name}: no answer within {self.cfg.timeout:g}s") from None
        except (dns.exception.DNSException, OSError) as e:
            raise SDError("dns_error", f"{name}: {type(e).__name__}") from None
        out: list[DiscoveredTarget] = []
        for rr in sorted(ans, key=lambda r: (r.priority, -r.weight, str(r.target), r.port)):
            if rr.rdtype != dns.rdatatype.SRV:
                continue
            host = rr.target.to_text(omit_final_dot=True)
            if host in ("", "."):
                continue   # RFC 2782: "." means the service is decidedly not available
            out.append(DiscoveredTarget(Target(name=host, address=host, labels={}),
                                        probes=self.cfg.probes, port=int(rr.port),
                                        source=self.cfg.name))
        return out

    async def refresh(self) -> list[DiscoveredTarget]:
        errors: list[SDError] = []
        results = await asyncio.gather(*(self._query(n) for n in self.cfg.names),
                                       return_exceptions=True)
        for n, res in zip(self.cfg.names, results, strict=True):
            if isinstance(res, SDError):
                errors.append(res)
            elif isinstance(res, BaseException):
                raise res
            else:
                self._last_good[n] = res
        merged: list[DiscoveredTarget] = []
        seen: set[str] = set()
        for n in self.cfg.names:
            for t in self._last_good.get(n, []):
                # The same host under two names or ports: first (by priority) wins.
                if t.target.name not in seen:
                    seen.add(t.target.name)
                    merged.append(t)
        if len(merged) > self.cfg.max_targets:
            raise SDError("too_many", f"more than {self.cfg.max_targets} targets")
        if errors:
            raise _Partial(merged, errors)
        return merged


# ---------------------------------------------------------------------------------------------
# The manager

OnChange = Callable[[str, list[DiscoveredTarget]], None]


class Discovery:
    """Runs every source on its own interval; calls ``on_change`` when a source's list changes.

    ``await start()`` does one refresh of every source before returning, so the agent starts
    with its dynamic targets in place; then each source refreshes in its own task."""

    def __init__(self, cfg: DiscoveryConfig, on_change: OnChange, *,
                 base_dir: Path = Path("."), wall_clock: Callable[[], float] = time.time
                 ) -> None:
        self.cfg = cfg
        self.on_change = on_change
        self._wall = wall_clock
        self.sources: list[Source] = []
        for s in cfg.sources():
            if isinstance(s, FileSDConfig):
                self.sources.append(FileSD(s, base_dir))
            elif isinstance(s, HttpSDConfig):
                self.sources.append(HttpSD(s, base_dir))
            else:
                self.sources.append(DnsSD(s))
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await asyncio.gather(*(self.refresh(s) for s in self.sources))
        self._tasks = [asyncio.create_task(self._loop(s), name=f"sd:{s.state.name}")
                       for s in self.sources]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        for s in self.sources:
            await s.close()

    async def _loop(self, s: Source) -> None:
        while True:
            await asyncio.sleep(s.interval)
            await self.refresh(s)

    async def refresh(self, s: Source) -> None:
        st = s.state
        before = st.targets
        errors: list[SDError]
        try:
            new = await s.refresh()
            errors = []
        except _Partial as p:
            new, errors = p.targets, p.errors
        except SDError as e:
            new, errors = before, [e]
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # A bug must not stop discovery: keep the last good list and say so.
            log.exception("target source refresh crashed", extra={"source": st.name})
            new, errors = before, [SDError("invalid", type(e).__name__)]
        for err in errors:
            st.failures[err.reason] += 1
        if errors:
            msg = "; ".join(str(err) for err in errors)[:1000]
            if not st.successful or msg != st.last_error:
                log.warning("target source refresh failed, keeping the last good targets",
                            extra={"source": st.name, "kind": st.kind, "error": msg})
            st.successful = False
            st.last_error = msg
        else:
            st.successful = True
            st.last_error = ""
            st.last_success_time = self._wall()
        if new != before:
            st.targets = new
            self.on_change(st.name, list(new))

    def targets(self) -> list[DiscoveredTarget]:
        """All sources' targets; a name already taken by an earlier source is skipped."""
        return merge_targets(s.state.targets for s in self.sources)

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        ok = GaugeMetricFamily("edgeprobe_sd_last_refresh_successful",
                               "Whether the last refresh of a target source succeeded",
                               labels=["source"])
        n = GaugeMetricFamily("edgeprobe_sd_targets", "Targets a source currently provides",
                              labels=["source"])
        ts = GaugeMetricFamily("edgeprobe_sd_last_refresh_success_timestamp_seconds",
                               "Unix time of the last successful refresh", labels=["source"])
        fails = CounterMetricFamily("edgeprobe_sd_refresh_failures",
                                    "Failed refreshes of a target source by reason",
                                    labels=["source", "reason"])
        for s in self.sources:
            st = s.state
            ok.add_metric([st.name], 1.0 if st.successful else 0.0)
            n.add_metric([st.name], float(len(st.targets)))
            ts.add_metric([st.name], st.last_success_time)
            for reason, count in st.failures.items():
                fails.add_metric([st.name, reason], count)
        yield from (ok, n, ts, fails)


def merge_targets(lists: Iterable[list[DiscoveredTarget]],
                  taken: Mapping[str, Any] | None = None) -> list[DiscoveredTarget]:
    """Concatenate, skipping names in ``taken`` (e.g. static targets) or already seen."""
    seen: set[str] = set(taken or ())
    out: list[DiscoveredTarget] = []
    for lst in lists:
        for t in lst:
            if t.target.name not in seen:
                seen.add(t.target.name)
                out.append(t)
    return out
