"""The ``discovery`` config section: one dataclass per source kind, decoded strictly by
:func:`agent.config.decode.decode_dataclass`."""

from __future__ import annotations

import glob
import ipaddress
import os
import re
from dataclasses import dataclass

from agent.config import rules
from agent.config.decode import Duration, Problem
from agent.config.rules import NAME_RULE, is_host, is_name
from probes.base import secret_field

SD_FILE_SUFFIXES = (".json", ".yml", ".yaml")


@dataclass(frozen=True)
class FileSDConfig:
    name: str
    files: tuple[str, ...]
    probes: tuple[str, ...] = ("icmp",)
    poll_interval: Duration = Duration(5.0)
    max_targets: int = 10000
    max_file_bytes: int = 16 << 20

    def validate(self) -> list[Problem]:
        errs = _common_errs(
            self.name, self.probes, self.max_targets, self.poll_interval, "poll_interval"
        )
        if not self.files:
            errs.append(Problem("files", "at least one file or pattern is required"))
        for f in self.files:
            if not f.endswith(SD_FILE_SUFFIXES):
                errs.append(Problem("files", f"{f!r} must end in .json, .yml or .yaml"))
            if glob.has_magic(os.path.dirname(f)):
                errs.append(Problem("files", f"{f!r}: patterns are only allowed in the file name"))
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
        errs = _common_errs(
            self.name, self.probes, self.max_targets, self.refresh_interval, "refresh_interval"
        )
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
    server: str = ""  # "ip" or "ip:port" / "[ip6]:port"; "" = the system's resolvers
    max_targets: int = 10000

    def validate(self) -> list[Problem]:
        errs = _common_errs(
            self.name, self.probes, self.max_targets, self.refresh_interval, "refresh_interval"
        )
        if not self.names:
            errs.append(Problem("names", "at least one SRV name is required"))
        for n in self.names:
            if not is_host(n):
                errs.append(Problem("names", f"invalid DNS name {n!r}"))
        if not 0 < self.timeout <= self.refresh_interval:
            errs.append(Problem("timeout", "must be > 0 and <= refresh_interval"))
        if self.server:
            try:
                split_server(self.server)
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


def _common_errs(
    name: str, probes: tuple[str, ...], max_targets: int, interval: float, interval_key: str
) -> list[Problem]:
    from probes import PROBES

    errs: list[Problem] = []
    if not is_name(name):
        errs.append(Problem("name", f"must be {NAME_RULE}"))
    if not probes:
        errs.append(Problem("probes", "at least one probe kind is required"))
    for p in probes:
        if p not in PROBES:
            errs.append(
                Problem("probes", f"unknown probe kind {p!r} (known: {', '.join(sorted(PROBES))})")
            )
    if not 1 <= max_targets <= 1_000_000:
        errs.append(Problem("max_targets", "must be between 1 and 1000000"))
    if not 0.1 <= interval <= 86400:
        errs.append(Problem(interval_key, "must be between 100ms and 24h"))
    return errs


def split_server(server: str) -> tuple[str, int]:
    host, port = rules.split_host_port(server)
    ipaddress.ip_address(host)
    if port is None:
        return host, 53
    if not 1 <= port <= 65535:
        raise ValueError("port must be between 1 and 65535")
    return host, port
