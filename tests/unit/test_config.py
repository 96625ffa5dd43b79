"""Config decoding: the minimal shape, defaults and overrides, and a table of bad files each with
its exact message (key path and line)."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

import pytest

from agent.config.decode import ConfigError, Problem, compose, decode_dataclass
from agent.config.load import loads

MINIMAL = """
agent:
  region: id-jakarta
targets:
  - name: sg-1
    address: 127.0.0.1
    probes: [icmp]
"""


def test_minimal_shape() -> None:
    cfg = loads(MINIMAL)
    assert cfg.agent.region == "id-jakarta"
    assert cfg.agent.budget == 0.6
    [job] = cfg.jobs
    assert job.key == ("sg-1", "icmp")
    assert job.options.interval == 1.0 and job.options.packets == 5


def test_defaults_and_target_overrides_layer() -> None:
    cfg = loads(
        textwrap.dedent("""
        agent: {region: br-saopaulo, labels: {provider: example}}
        defaults:
          icmp: {interval: 2s, packets: 10, spacing: 50ms, timeout: 800ms, payload_size: 100}
        targets:
          - name: a
            address: edge-a.example.net
            labels: {tier: near}
            probes:
              icmp: {packets: 4}
          - name: b
            address: "::1"
    """)
    )
    a, b = cfg.jobs
    assert (
        a.options.interval,
        a.options.packets,
        a.options.spacing,
        a.options.timeout,
        a.options.payload_size,
    ) == (2.0, 4, 0.05, 0.8, 100)
    assert b.kind == "icmp" and b.options.packets == 10
    assert cfg.target_label_keys == ("tier",)
    assert cfg.agent.labels == {"provider": "example"}


BAD = [
    ("", "agent: required key is missing (the config is empty)"),
    (
        "agent: {region: x}\nfoo: 1\n",
        "foo: unknown key (known keys: agent, defaults, metrics, "
        "targets, discovery, probe_endpoint) (line 2)",
    ),
    (
        "agent:\n  region: x\n  regoin: y\n",
        "agent.regoin: unknown key (known keys: budget, "
        "icmp_mode, labels, late_tick_threshold, max_targets, model, region, resolve_interval) "
        "(line 3)",
    ),
    ("targets: []\n", "agent: required key is missing (line 1)"),
    (
        "agent: {region: x}\ntargets:\n  - name: a\n",
        "targets[0].address: required key is missing (line 3)",
    ),
    (
        "agent: {region: x}\ntargets:\n  - {name: a, address: h, probes: [icmpp]}\n",
        "targets[0].probes.icmpp: unknown probe kind (known: connect, dns, http, icmp, path, "
        "relay, stun, tcp, tls, turn, udp, webrtc) (line 3)",
    ),
    (
        "agent: {region: x}\ntargets:\n  - name: a\n    address: h\n    probes:\n      icmp:\n"
        "        timout: 1s\n",
        "targets[0].probes.icmp.timout: unknown key (known keys: dscp, "
        "interval, ip_family, packets, payload_size, source_address, spacing, timeout, ttl) "
        "(line 7)",
    ),
    (
        "agent: {region: x}\ndefaults:\n  icmp: {interval: 1s, packets: 20, spacing: 100ms}\n",
        "defaults.icmp.interval: a run takes up to 2.8s ((packets-1)*spacing + timeout) which does "
        "not fit in the interval of 1s (line 3)",
    ),
    (
        "agent: {region: x}\ndefaults:\n  icmp: {interval: soon}\n",
        "defaults.icmp.interval: expected a duration like 500ms or 1s, got 'soon' (line 3)",
    ),
    (
        "agent: {region: x}\ndefaults:\n  icmp: {packets: 2.5}\n",
        "defaults.icmp.packets: expected an integer, got 2.5 (line 3)",
    ),
    (
        "agent: {region: x}\ntargets:\n  - {name: a, address: h}\n  - {name: a, address: g}\n",
        "targets[1].name: duplicate target name 'a' (first at line 3) (line 4)",
    ),
    (
        "agent: {region: x, labels: {edge: y}}\n",
        "agent.labels: label name 'edge' is reserved by edgeprobe (line 1)",
    ),
    (
        "agent: {region: x, max_targets: 1}\ntargets:\n  - {name: a, address: h}\n"
        "  - {name: b, address: g}\n",
        "targets: 2 probe series exceed agent.max_targets (1) (line 3)",
    ),
    ("agent: {region: x}\ntargets: {name: a}\n", "targets: expected a list (line 2)"),
    ("agent: [x]\n", "agent: expected a mapping (line 1)"),
    ("agent: {region: x\n", "<config>: invalid YAML: did not find expected ',' or '}' (line 2)"),
    (
        "agent: {region: 'bad region!'}\n",
        "agent.region: must be 1-63 characters of letters, digits, '_', '.', ':', '-' (line 1)",
    ),
    (
        "agent: {region: x, icmp_mode: root}\n",
        "agent.icmp_mode: must be one of auto, privileged, unprivileged; got 'root' (line 1)",
    ),
    (
        "agent: {region: x}\nmetrics: {rtt_buckets: [0.1, 0.05]}\n",
        "metrics.rtt_buckets: must be strictly increasing positive numbers (line 2)",
    ),
    (
        "agent: {region: x}\ntargets:\n  - {name: a, address: 'two words'}\n",
        "targets[0].address: must be an IP address or a hostname (line 3)",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_config_exact_message(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        loads(text)
    assert str(e.value) == message


@dataclass(frozen=True)
class _Section:
    bad: str = ""  # the key validate() finds fault with
    users: dict[str, bytes] = field(default_factory=dict)
    ciphers: tuple[str, ...] = ()

    def validate(self) -> list[Problem]:
        return [Problem(self.bad, "wrong")]


@pytest.mark.parametrize(
    ("key", "path", "line"),
    [
        ("users.bob", "s.users.bob", 5),
        ("ciphers[1]", "s.ciphers[1]", 8),
        ("users.nobody", "s.users.nobody", 3),  # not in the document: the nearest key's line
        ("", "s", 2),  # the section itself
    ],
)
def test_a_validate_problem_names_the_line_of_a_nested_key(key: str, path: str, line: int) -> None:
    text = f"s:\n  bad: '{key}'\n  users:\n    alice: a\n    bob: b\n  ciphers:\n    - x\n    - y\n"
    root = compose(text)
    assert root is not None
    with pytest.raises(ConfigError) as e:
        decode_dataclass(_Section, root.value[0][1], "s")
    assert (e.value.path, e.value.message, e.value.line) == (path, "wrong", line)


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    deep = "agent: {region: x, labels: " + "[" * 5000 + "]" * 5000 + "}\n"
    with pytest.raises(ConfigError):
        loads(deep)


def test_every_kind_default_options_are_valid() -> None:
    from probes import PROBES

    # A kind may require a field (dns: query_name, turn: username) but its timing defaults
    # must always fit: a target that lists the kind without options must load.
    for name, kind in PROBES.items():
        assert [e for e in kind.options().validate() if not e.endswith(": required")] == [], name


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("1.5s", 1.5),
        ("250us", 250e-6),
        ("500 ms", 0.5),
        ("2", 2.0),
        ("1m30s", 90.0),
        ("1h5m", 3900.0),
        ("1d", 86400.0),
        ("1w", 604800.0),
        ("1y", 31536000.0),
        ("1d12h", 129600.0),
    ],
)
def test_one_duration_grammar(text: str, seconds: float) -> None:
    """The config, the web config and the lab read durations with one grammar (Prometheus's,
    plus single fractional or sub-millisecond terms)."""
    from agent.config.decode import parse_duration
    from agent.server.webconfig import parse_web_config
    from lab.impair import split_directions

    assert parse_duration(text) == pytest.approx(seconds)
    web = parse_web_config(f"rate_limit: {{interval: {text}, burst: 1}}")
    assert web.rate_limit.interval == pytest.approx(seconds)
    assert split_directions({"delay": text}, "k")[0].delay == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["30s1m", "1s1s", "1.5m30s", "soon", "", "1x", "-1s"])
def test_one_duration_grammar_refuses(text: str) -> None:
    from agent.config.decode import parse_duration

    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("edge.example.net:443", ("edge.example.net", 443)),
        ("[::1]:53", ("::1", 53)),
        ("[::1]", ("::1", None)),
        ("::1", ("::1", None)),
        (":9798", ("", 9798)),
        ("192.0.2.1", ("192.0.2.1", None)),
        ("host:", ("host", None)),
    ],
)
def test_one_host_port_splitter(raw: str, want: tuple[str, int | None]) -> None:
    """Discovery, the DNS SD server, the listen address and the lab split host:port one way."""
    from agent.config.rules import split_host_port

    assert split_host_port(raw) == want


@pytest.mark.parametrize("raw", ["[::1]x", "h:70000", "h:٥٣", "h:-1"])
def test_one_host_port_splitter_refuses(raw: str) -> None:
    from agent.config.rules import split_host_port

    with pytest.raises(ValueError):
        split_host_port(raw)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("edge.example.net", True),
        ("edge.example.net.", True),
        ("_srv.example", True),
        ("192.0.2.1", True),
        ("-bad.example", False),
        ("bad-.example", False),
        ("a..b", False),
        ("::1", False),
        ("x" * 64, False),
        ("", False),
        ("é.example", False),
    ],
)
def test_probe_allow_names_use_the_host_rule(name: str, ok: bool) -> None:
    """/probe's allow_names patterns are checked with the one host rule (no IPv6 literal)."""
    from agent.server.probe.config import is_host_name

    assert is_host_name(name) is ok
