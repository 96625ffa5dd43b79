"""The rules operator-supplied text must pass, in one place for the config file and for the
target sources (file_sd, http_sd, DNS SRV): names, label names, host names.

Names end up in the exposition text of ``/metrics``, where a stray newline in one label name
breaks every series of the scrape; so every check is a full match (``re.match`` with ``$``
also accepts a trailing newline).
"""

from __future__ import annotations

import contextlib
import ipaddress
import re

_LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}")
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")

NAME_RULE = "1-63 characters of letters, digits, '_', '.', ':', '-'"

# Labels the agent sets itself; a static or discovered label may not shadow them.
RESERVED_LABELS = frozenset({"region", "edge", "probe", "reason", "phase", "le", "quantile",
                             "hop", "job", "instance"})


def is_label_name(s: object) -> bool:
    """A Prometheus label name."""
    return isinstance(s, str) and _LABEL_NAME_RE.fullmatch(s) is not None


def is_name(s: object) -> bool:
    """A region, target (edge) or source name: :data:`NAME_RULE`."""
    return isinstance(s, str) and _NAME_RE.fullmatch(s) is not None


def is_host(host: str) -> bool:
    """An IP address or a DNS name (``_`` allowed, as in SRV owner names)."""
    if len(host) > 253 or not host:
        return False
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return True
    return all(_HOST_LABEL_RE.fullmatch(lb) for lb in host.rstrip(".").split("."))
