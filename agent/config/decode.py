"""Strict YAML decoding into frozen dataclasses, with the key path and line in every error.

Why not a schema library: the types are plain dataclasses shared with the probes, and we want
errors an operator can act on ("targets[2].probes.icmp.timout: unknown key (line 14)").
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import (
    Any,
    Literal,
    NamedTuple,
    TypeVar,
    Union,
    cast,
    get_args,
    get_origin,
    get_type_hints,
)

import yaml

from agent.config.rules import MAX_YAML_DEPTH, YAMLLimitError, check_yaml_graph
from probes.base import is_secret

T = TypeVar("T")

# Deeper nesting than any real config needs; guards against pathological documents.
MAX_DEPTH = 32
# One term of a duration: a number and its unit ("1m30s" is two terms). Units are matched
# longest first: "ms" before "m".
_DURATION_TERM_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h|d|w|y)")
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")
# A quoted fragment in a YAML syntax error ("found undefined alias 'x'"): it may be the
# document's text, even a secret (an unquoted password starting with '*', '&' or '!').
_QUOTED_RE = re.compile(r"'((?:[^'\\]|\\.)*)'" r'|"((?:[^"\\]|\\.)*)"')
# What such a fragment may show: a single character or escape, or a token name ('<stream end>').
_SAFE_QUOTED_RE = re.compile(r"\\?.|<[a-z ]+>", re.DOTALL)
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
    "y": 31536000.0,
}


class ConfigError(ValueError):
    """A config problem, phrased for the operator: the key path, the message and the line.
    With ``source`` (the file, for messages read away from it) it reads
    ``source:line: key: message``."""

    def __init__(self, path: str, message: str, line: int | None = None, source: str = "") -> None:
        self.path = path
        self.message = message
        self.line = line
        self.source = source
        if source:
            at = f"{source}:{line}" if line is not None else source
            key = f"{path}: " if path and path != source else ""
            text = f"{at}: {key}{message}"
        else:
            text = f"{path or '<root>'}: {message}" + (
                f" (line {line})" if line is not None else ""
            )
        super().__init__(text)

    def in_file(self, source: str) -> ConfigError:
        """This error, naming the file it is about."""
        return ConfigError(self.path, self.message, self.line, source)


class Problem(NamedTuple):
    """A ``validate()`` finding: the key (relative to the section validated) and what is wrong.
    The decoder adds the key's path and line."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class Duration(float):
    """Seconds. Decoded from a number or a string like '500ms', '1s', '2m'."""

    @classmethod
    def from_config(cls, value: object) -> Duration:
        return cls(parse_duration(value))


def parse_duration(value: object) -> float:
    """Seconds from a number or a duration string, for every file the project reads.

    The grammar is Prometheus's (``1m30s``, ``2h``, ``500ms``, ``1d``, ``1w``, ``1y``: terms
    from the largest unit down, each unit once), widened so that a single term may be
    fractional or finer than a millisecond (``1.5s``, ``250us``, ``500 ms``) and a bare
    number counts seconds. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 500ms or 1s, got a boolean")
    if isinstance(value, int | float):
        f = float(value)
    elif isinstance(value, str):
        parsed = _parse_duration_text(value.strip())
        if parsed is None:
            raise ValueError(f"expected a duration like 500ms or 1s, got {value!r}")
        f = parsed
    else:
        raise ValueError(f"expected a duration like 500ms or 1s, got {type(value).__name__}")
    if not math.isfinite(f) or f < 0:
        raise ValueError(f"duration must be a finite non-negative number, got {value!r}")
    return f


def _parse_duration_text(text: str) -> float | None:
    if _NUMBER_RE.fullmatch(text):
        return float(text)
    terms = list(_DURATION_TERM_RE.finditer(text))
    pos, total, last_unit = 0, 0.0, math.inf
    for m in terms:
        unit = _DURATION_UNITS[m.group(2)]
        # Largest unit first, each once; fractions only in a term of its own.
        if m.start() != pos or unit >= last_unit or (len(terms) > 1 and "." in m.group(1)):
            return None
        total += float(m.group(1)) * unit
        pos, last_unit = m.end(), unit
    return total if terms and pos == len(text) else None


# libyaml, where PyYAML was built with it: it composes ~10x faster than the pure-Python loader
# (a 10,000-target config in 0.3 s instead of 2.8 s).
_CLOADER: type[Any] | None = getattr(yaml, "CSafeLoader", None)


def read_config(path: str | Path, max_bytes: int) -> str:
    """A config file's text, at most ``max_bytes``. Raises ConfigError naming the file."""
    p = Path(path)
    try:
        if p.stat().st_size > max_bytes:
            raise ConfigError(str(p), f"config larger than {max_bytes} bytes")
        return p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(p), f"cannot read config file: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(p), "config file is not valid UTF-8") from None


def compose(text: str, source: str = "<config>") -> yaml.Node | None:
    """Parse YAML into a node tree (keeping line numbers), refusing alias bombs and deep
    nesting (:func:`agent.config.rules.check_yaml_graph`). Raises ConfigError."""
    # Syntax errors cannot tell which key they are in, so they quote no part of the document
    # longer than a character or an escape: that part may be a secret.
    try:
        if _CLOADER is None:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        else:
            _check_depth(text, source)
            root = yaml.compose(text, Loader=_CLOADER)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark is not None else None
        raise ConfigError(source, f"invalid YAML: {_unquote(str(e.problem))}", line) from None
    except yaml.YAMLError as e:
        raise ConfigError(source, f"invalid YAML: {_unquote(str(e))}") from None
    except RecursionError:
        raise ConfigError(source, "invalid YAML: nested too deeply") from None
    if root is not None:
        try:
            check_yaml_graph(root)
        except YAMLLimitError as e:
            raise ConfigError(source, f"invalid YAML: {e.message}", e.line) from None
    return root


def _check_depth(text: str, source: str) -> None:
    """Refuse a document nested deeper than MAX_YAML_DEPTH from libyaml's event stream, before
    libyaml's composer sees it: the parser keeps its own stack, but the composer recurses in C,
    where a deep document would overflow the stack instead of raising."""
    loader = _CLOADER(text) if _CLOADER is not None else None
    if loader is None:
        return
    depth = 0
    try:
        while loader.check_event():
            ev = loader.get_event()
            if isinstance(ev, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    line = ev.start_mark.line + 1 if ev.start_mark is not None else None
                    raise ConfigError(
                        source, f"invalid YAML: nested deeper than {MAX_YAML_DEPTH} levels", line
                    )
            elif isinstance(ev, yaml.CollectionEndEvent):
                depth -= 1
    finally:
        loader.dispose()


def _unquote(problem: str) -> str:
    def hide(m: re.Match[str]) -> str:
        inner = m.group(1) if m.group(1) is not None else m.group(2)
        return m.group(0) if _SAFE_QUOTED_RE.fullmatch(inner) else "(not shown)"

    return _QUOTED_RE.sub(hide, problem)


def _line(node: yaml.Node) -> int | None:
    # None for a node built from data rather than read from a file (node_of).
    return int(node.start_mark.line) + 1 if node.start_mark is not None else None


line_of = _line


def node_of(data: object) -> yaml.Node:
    """Plain data (JSON types, from a control message or from code) as a node tree, to be
    decoded like a file's; its errors name the key and no line."""
    return yaml.SafeDumper(io.StringIO(), sort_keys=False).represent_data(data)


def is_null(node: yaml.Node) -> bool:
    """An explicit YAML null (``key:`` or ``key: null``)."""
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def mapping_items(node: yaml.Node, path: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """A mapping node's entries by key, each as (key node, value node), before decoding them:
    for sections whose keys are names (probe kinds) rather than fields."""
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(path, "expected a mapping", _line(node))
    out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for k, v in node.value:
        key = k.value if isinstance(k, yaml.ScalarNode) else None
        sub = f"{path}.{key}" if path else str(key)
        if not isinstance(key, str):
            raise ConfigError(path, "keys must be strings", _line(k))
        if key in out:
            raise ConfigError(sub, "duplicate key", _line(k))
        out[key] = (k, v)
    return out


def _scalar(node: yaml.Node, path: str) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        kind = "a mapping" if isinstance(node, yaml.MappingNode) else "a list"
        raise ConfigError(path, f"expected a single value, got {kind}", _line(node))
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except yaml.MarkedYAMLError as e:
        # Not str(e): it quotes the document's line, which may hold another key's secret.
        raise ConfigError(path, f"invalid value: {e.problem}", _line(node)) from None
    except (yaml.YAMLError, ValueError, OverflowError) as e:
        raise ConfigError(path, f"invalid value: {e}", _line(node)) from None
    except Exception:
        # The safe constructors fail on some malformed values with whatever the input made
        # them hit (!!bool x: KeyError, !!timestamp x: AttributeError).
        raise ConfigError(path, f"not a valid {node.tag} value", _line(node)) from None
    finally:
        loader.dispose()


def _type_name(tp: Any) -> str:
    if tp is Duration:
        return "duration"
    if tp is bytes:
        return "string"
    origin = get_origin(tp)
    if origin in (dict, Mapping):
        return "a mapping"
    if origin in (list, tuple):
        return "a list"
    if isinstance(tp, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            tp.__name__, tp.__name__
        )
    return str(tp)


def decode(tp: Any, node: yaml.Node | None, path: str = "", depth: int = 0) -> Any:
    """Decode ``node`` as type ``tp``. Supports dataclasses, Literal, Optional/unions with None,
    list[X], tuple[X, ...], dict[str, X], Mapping[str, X], str, bytes (a string, kept as its
    UTF-8 bytes), int, float (a string is a duration), bool, and a type that parses a single
    value itself with a ``from_config(value)`` classmethod (Duration; ValueError is the
    error)."""
    if depth > MAX_DEPTH:
        raise ConfigError(path, "nested too deeply", _line(node) if node else None)
    if node is None:
        raise ConfigError(path, "missing value")
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if is_null(node):
            return None
        if len(args) == 1:
            return decode(args[0], node, path, depth)
        raise TypeError(f"unsupported union {tp}")
    if origin is Literal:
        value = _scalar(node, path)
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(
                path, f"must be one of {', '.join(map(str, allowed))}; got {value!r}", _line(node)
            )
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return decode_dataclass(tp, node, path, depth)
    if origin in (list, tuple):
        targs: tuple[Any, ...] = get_args(tp)
        if not isinstance(node, yaml.SequenceNode):
            raise ConfigError(path, "expected a list", _line(node))
        item_tp = targs[0] if targs else Any
        items = [decode(item_tp, n, f"{path}[{i}]", depth + 1) for i, n in enumerate(node.value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        _, val_tp = get_args(tp)
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(path, "expected a mapping", _line(node))
        out: dict[str, Any] = {}
        for k, v in node.value:
            key = _scalar(k, path)
            if not isinstance(key, str):
                raise ConfigError(path, f"keys must be strings, got {key!r}", _line(k))
            sub = f"{path}.{key}" if path else key
            if key in out:
                raise ConfigError(sub, "duplicate key", _line(k))
            out[key] = decode(val_tp, v, sub, depth + 1)
        return out
    if tp is Any:
        return _scalar(node, path) if isinstance(node, yaml.ScalarNode) else node
    value = _scalar(node, path)
    parse = getattr(tp, "from_config", None)
    if parse is None and tp is float and isinstance(value, str):
        parse = parse_duration
    if parse is not None:
        try:
            return parse(value)
        except ValueError as e:
            raise ConfigError(path, str(e), _line(node)) from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected a boolean, got {value!r}", _line(node))
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}", _line(node))
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"expected a number, got {value!r}", _line(node))
        if not math.isfinite(value):
            raise ConfigError(path, f"expected a finite number, got {value!r}", _line(node))
        return float(value)
    if tp is str:
        if isinstance(value, bool | dict | list) or value is None:
            raise ConfigError(path, f"expected a string, got {value!r}", _line(node))
        return str(value)
    if tp is bytes:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {type(value).__name__}", _line(node))
        return value.encode()
    raise TypeError(f"unsupported type {tp!r} at {path}")


@functools.cache
def _hints(cls: type[Any]) -> dict[str, Any]:
    # Resolved once per class: get_type_hints evaluates every annotation string each call,
    # which was a fifth of decoding a 10,000-target config.
    return get_type_hints(cls)


def decode_dataclass(
    cls: type[T],
    node: yaml.Node,
    path: str = "",
    depth: int = 0,
    base: Mapping[str, Any] | None = None,
) -> T:
    """Decode a mapping node into dataclass ``cls``; unknown keys are errors. ``base`` supplies
    values for keys the node does not set (layered defaults).

    After building it, the decoder calls the instance's ``validate()`` if it has one: each
    :class:`Problem` it returns is raised with its key's path and line (a key may reach into the
    section: ``users.alice``, ``ciphers[2]``; an empty key is the section itself). A class with
    ``NULL_IS_UNSET = True`` reads an explicit null (``key:``) as "not set", as Go's YAML
    decoding does for the file formats borrowed from Prometheus."""
    if not isinstance(node, yaml.MappingNode):
        if is_null(node):
            node = yaml.MappingNode("tag:yaml.org,2002:map", [], node.start_mark, node.end_mark)
        else:
            raise ConfigError(path, "expected a mapping", _line(node))
    hints = _hints(cast(Any, cls))
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    null_is_unset = bool(getattr(cls, "NULL_IS_UNSET", False))
    values: dict[str, Any] = dict(base or {})
    seen: set[str] = set()
    for k, v in node.value:
        key = _scalar(k, path)
        sub = f"{path}.{key}" if path else str(key)
        if not isinstance(key, str) or key not in fields or not fields[key].init:
            known = ", ".join(sorted(n for n, f in fields.items() if f.init))
            raise ConfigError(sub, f"unknown key (known keys: {known})", _line(k))
        if key in seen:
            raise ConfigError(sub, "duplicate key", _line(k))
        seen.add(key)
        if null_is_unset and is_null(v):
            continue
        try:
            values[key] = decode(hints[key], v, sub, depth + 1)
        except ConfigError as e:
            if not is_secret(fields[key]):
                raise
            # Every message about a value may quote it (the YAML constructor's do). The path
            # may go below the key (a user name in a map of hashes): it names keys only.
            tp = hints[key] if e.path == sub else (get_args(hints[key]) or (str,))[-1]
            raise ConfigError(
                e.path,
                f"invalid value: expected {_type_name(tp)} (a secret: the value is not shown)",
                e.line,
            ) from None
    for name, f in fields.items():
        if (
            f.init
            and name not in values
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            raise ConfigError(
                f"{path}.{name}" if path else name, "required key is missing", _line(node)
            )
    secrets = _secret_values(values, fields)
    try:
        obj = cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(path, _redact(str(e), secrets), _line(node)) from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        for problem in validate():
            if not isinstance(problem, Problem):
                # The probe kinds' options still say "key: message".
                key, _, msg = problem.partition(": ")
                problem = Problem(key, msg or problem)
            sub = f"{path}.{problem.key}" if path and problem.key else path or problem.key
            line = _key_line(node, problem.key)
            raise ConfigError(sub, _redact(problem.message, secrets), line)
    return obj


# One step of a key path: a mapping key, or a list index in brackets.
_KEY_STEP_RE = re.compile(r"[^.\[\]]+|\[\d+\]")


def _key_line(node: yaml.MappingNode, key: str) -> int | None:
    """The line of ``key`` (``users.alice``, ``ciphers[2]``) below ``node``, or of as much of
    it as the document has."""
    line = _line(node)
    at: yaml.Node = node
    for step in _KEY_STEP_RE.findall(key):
        if isinstance(at, yaml.MappingNode):
            hit = next((kv for kv in at.value if getattr(kv[0], "value", None) == step), None)
            if hit is None:
                break
            line, at = _line(hit[0]), hit[1]
        elif isinstance(at, yaml.SequenceNode) and step[0] == "[":
            i = int(step[1:-1])
            if i >= len(at.value):
                break
            at = at.value[i]
            line = _line(at)
        else:
            break
    return line


def _secret_values(
    values: Mapping[str, Any], fields: Mapping[str, dataclasses.Field[Any]]
) -> list[str]:
    """The texts of the secret fields among ``values`` (a map's values too), for _redact."""
    out: list[str] = []
    for name, v in values.items():
        if not is_secret(fields[name]):
            continue
        for item in v.values() if isinstance(v, Mapping) else (v,):
            text = item.decode(errors="replace") if isinstance(item, bytes) else item
            if isinstance(text, str) and text:
                out.append(text)
    return out


def _redact(message: str, secrets: list[str]) -> str:
    """``message`` without the values of secret fields, should a check have quoted one."""
    for s in secrets:
        message = message.replace(s, "(secret not shown)")
    return message


def fields_as_dict(obj: Any) -> dict[str, Any]:
    """Shallow field → value map of a dataclass instance (for layering defaults)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
