"""The rules operator-supplied text must pass, in one place for the config file and for the
target sources (file_sd, http_sd, DNS SRV): names, label names, host names, and the shape of a
YAML document before it is built.

Names end up in the exposition text of ``/metrics``, where a stray newline in one label name
breaks every series of the scrape; so every check is a full match (``re.match`` with ``$``
also accepts a trailing newline).
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Iterator

import yaml

_LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}")
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")

NAME_RULE = "1-63 characters of letters, digits, '_', '.', ':', '-'"

# Labels the agent sets itself; a static or discovered label may not shadow them.
RESERVED_LABELS = frozenset(
    {"region", "edge", "probe", "reason", "phase", "le", "quantile", "hop", "job", "instance"}
)


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


def split_host_port(raw: str) -> tuple[str, int | None]:
    """``host:port``, ``[ip6]:port``, ``[ip6]``, ``host`` or a bare IPv6 address (more than one
    ':') -> (host, port or None; an empty port is None). The port is 0..65535; the host is not
    checked (callers want a name, an address, or an empty listen host). Raises ValueError."""
    s = raw.strip()
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError("expected [ip6]:port")
        port_s = rest[1:]
    elif s.count(":") == 1:
        host, port_s = s.split(":")
    else:
        host, port_s = s, ""
    if not port_s:
        return host, None
    # isdigit() alone accepts other scripts' digits, which int() reads.
    if not (port_s.isascii() and port_s.isdigit()) or int(port_s) > 65535:
        raise ValueError("invalid port")
    return host, int(port_s)


# ---------------------------------------------------------------------------------------------
# YAML documents: aliases and depth, checked on the composed node graph before anything walks
# the document expanded. Composing is linear in the text (an alias is a second reference to
# the same node), but every walk after it (constructing, decoding a config, validating target
# groups) visits an aliased node once per reference: a few kB of nested aliases stand for
# billions of nodes.

MAX_YAML_DEPTH = 64
# Aliases may add at most as many nodes as the document has, plus this many: a shared label
# block reused by every group of a large inventory passes, a nested alias bomb does not.
YAML_ALIAS_ALLOWANCE = 100_000


class YAMLLimitError(ValueError):
    """The document is nested too deeply or loops through an alias (``expands`` False), or
    its aliases expand it too much (``expands`` True)."""

    def __init__(self, message: str, line: int | None = None, *, expands: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.expands = expands


def _children(node: yaml.Node) -> Iterator[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        yield from node.value
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            yield k
            yield v


def check_yaml_graph(root: yaml.Node) -> None:
    """Raise :class:`YAMLLimitError` unless ``root`` is at most :data:`MAX_YAML_DEPTH` deep,
    free of alias loops, and expands (every alias counted as a copy) to at most
    ``2 * distinct nodes + YAML_ALIAS_ALLOWANCE`` nodes. Linear in the distinct nodes."""
    expanded: dict[int, int] = {}  # id(node) -> nodes under it, aliases expanded
    total = 0  # distinct nodes
    reused: dict[int, tuple[yaml.Node, int]] = {}  # node reached again -> (node, times)
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, Iterator[yaml.Node], list[int]]] = []

    def enter(node: yaml.Node) -> None:
        nonlocal total
        if len(stack) >= MAX_YAML_DEPTH:
            raise YAMLLimitError(
                f"nested deeper than {MAX_YAML_DEPTH} levels", node.start_mark.line + 1
            )
        total += 1
        on_path.add(id(node))
        stack.append((node, _children(node), [1]))

    enter(root)
    while stack:
        node, children, size = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            on_path.discard(id(node))
            expanded[id(node)] = size[0]
            if stack:
                stack[-1][2][0] += size[0]
            continue
        cid = id(child)
        if cid in on_path:
            raise YAMLLimitError(
                "an alias refers to a node that contains it", child.start_mark.line + 1
            )
        if cid in expanded:
            reused[cid] = (child, reused.get(cid, (child, 0))[1] + 1)
            size[0] += expanded[cid]
            continue
        enter(child)
    limit = 2 * total + YAML_ALIAS_ALLOWANCE
    if expanded[id(root)] > limit:
        # Name the anchor whose reuse costs the most: the one to look at first.
        worst = max(reused.values(), key=lambda nt: expanded[id(nt[0])] * nt[1])[0]
        raise YAMLLimitError(
            f"aliases expand the document to more than {limit:,} nodes (twice its "
            f"{total:,} plus {YAML_ALIAS_ALLOWANCE:,}); the line is that of the anchor whose "
            "reuse costs most",
            worst.start_mark.line + 1,
            expands=True,
        )


def load_yaml(text: str) -> object:
    """``yaml.safe_load`` with :func:`check_yaml_graph` between composing and building.
    Raises ``yaml.YAMLError``, ``YAMLLimitError`` or ``RecursionError``."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is None:
        return None
    check_yaml_graph(root)
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(root)
    finally:
        loader.dispose()
