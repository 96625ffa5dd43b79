"""Whatever names and labels the config or a target source gets accepted, /metrics stays
parseable: by a real ``promtool check metrics`` and by prometheus_client's own parser.

One label name with a trailing newline (``re.match`` with ``$`` accepts ``"tier\\n"``) used
to be printed raw and break every series of the scrape, static ones included."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.app import Agent
from agent.config import load as cfgmod
from agent.config.decode import ConfigError
from agent.config.model import Config
from agent.config.rules import is_host, is_label_name, is_name
from agent.discovery.groups import (
    DiscoveredTarget,
    SDError,
    decode_sd_text,
    merge_targets,
    parse_groups,
)
from agent.discovery.manager import Discovery

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
SOURCE = "inv"

# What an operator or a hostile inventory may put after an otherwise valid name.
NASTY = [
    "",
    "",
    "\n",
    "\r",
    "\r\n",
    " ",
    "\t",
    '"',
    "\\",
    "}",
    "{",
    ",",
    "=",
    "\n\n",
    "\x00",
    "\u2028",
    "\x85",
    "é",
    "#",
]
label_names = st.builds(
    lambda a, b: a + b,
    st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True),
    st.sampled_from(NASTY),
)
names = st.builds(
    lambda a, b: a + b,
    st.from_regex(r"[a-z0-9][a-z0-9_.:-]{0,8}", fullmatch=True),
    st.sampled_from(NASTY),
)
values = st.text(max_size=12) | st.sampled_from(
    ['a"b', "a\\b", "a\nb", "\\n", "\\", '"', "\n", "\r", "é\u2028", '\\"\n']
)
label_maps = st.dictionaries(label_names, values, max_size=3)


def _render(agent: Agent) -> str:
    return b"".join(agent.render_metrics()).decode()


def _agent(cfg: Config, discovered: list[Any]) -> Agent:
    """The agent as start() builds it, without starting probes (the names are random)."""
    agent = Agent(cfg)
    assert cfg.discovery is not None
    agent.discovery = Discovery(cfg.discovery, agent._on_discovery)
    agent.discovery.sources[0].state.targets = discovered
    agent.discovered = {SOURCE: discovered}
    agent.config = agent._effective(cfg)
    agent._apply_state_identity(agent.config)
    agent.state.series = agent._views_for(agent.config, None, True)
    return agent


def check_exposition(text: str) -> None:
    families = list(text_string_to_metric_families(text))
    assert families
    res = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == "" and res.stderr.strip() == "", res.stdout + res.stderr


BASE: dict[str, Any] = {
    "agent": {"region": "id-jakarta", "max_targets": 100},
    "targets": [{"name": "static-1", "address": "127.0.0.1"}],
    "discovery": {"file_sd": [{"name": SOURCE, "files": ["inv.json"]}]},
}


def _accepted(doc: dict[str, Any]) -> bool:
    try:
        cfgmod.loads(yaml.safe_dump(doc))
    except ConfigError:
        return False
    return True


def _with(**agent: Any) -> dict[str, Any]:
    return {**BASE, "agent": {**BASE["agent"], **agent}}


@pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool not installed")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    region=names,
    agent_labels=label_maps,
    target_name=names,
    target_labels=label_maps,
    source=names,
    edge=names,
    host=names,
    group_labels=label_maps,
)
def test_accepted_names_render_parseable_metrics(
    region: str,
    agent_labels: dict[str, str],
    target_name: str,
    target_labels: dict[str, str],
    source: str,
    edge: str,
    host: str,
    group_labels: dict[str, str],
) -> None:
    # Each generated piece is kept if the agent accepts it on its own (else the valid default
    # stays), so that every example combines as many hostile-but-accepted pieces as it can.
    region = region if _accepted(_with(region=region)) else "id-jakarta"
    agent_labels = {k: v for k, v in agent_labels.items() if _accepted(_with(labels={k: v}))}
    target: dict[str, Any] = {"name": target_name, "address": "127.0.0.1"}
    if not _accepted({**BASE, "targets": [target]}):
        target["name"] = "static-1"
    target["labels"] = {
        k: v
        for k, v in target_labels.items()
        if _accepted({**BASE, "targets": [{**target, "labels": {k: v}}]})
    }
    discovery = {"file_sd": [{"name": source, "files": ["inv.json"]}]}
    if not _accepted({**BASE, "discovery": discovery}):
        discovery = BASE["discovery"]
    cfg = cfgmod.loads(
        yaml.safe_dump(
            {
                "agent": {"region": region, "labels": agent_labels, "max_targets": 100},
                "targets": [target],
                "discovery": discovery,
            }
        )
    )
    assert is_name(cfg.agent.region) and all(is_label_name(k) for k in cfg.agent.labels)
    assert all(
        is_name(j.target.name) and all(is_label_name(k) for k in j.target.labels) for j in cfg.jobs
    )

    def parsed(group: dict[str, Any]) -> list[DiscoveredTarget]:
        with contextlib.suppress(SDError):
            return parse_groups([group], SOURCE, ("icmp",), 100)
        return []

    labels = {
        k: v
        for k, v in group_labels.items()
        if parsed({"targets": ["edge-1.example.net"], "labels": {k: v}})
    }
    found = merge_targets(
        [
            parsed({"targets": [host], "labels": {**labels, "__edge__": edge}}),
            parsed({"targets": [f"{host}.example.net", "198.51.100.7:3478"]}),
            parsed({"targets": ["edge-1.example.net", "edge-2.example.net"], "labels": labels}),
        ]
    )
    assert len(found) >= 2
    assert all(is_name(t.target.name) and is_host(t.target.address) for t in found)
    assert all(is_label_name(k) for t in found for k in t.target.labels)

    agent = _agent(cfg, found)
    check_exposition(_render(agent))
    list(text_string_to_metric_families(generate_latest(agent.registry).decode()))


@pytest.mark.parametrize("where", ["agent", "target", "group"])
def test_a_label_name_ending_in_newline_is_refused(where: str) -> None:
    doc: dict[str, Any] = {
        "agent": {"region": "r"},
        "targets": [{"name": "t", "address": "127.0.0.1"}],
    }
    bad = {"tier\n": "near"}
    if where == "agent":
        doc["agent"]["labels"] = bad
    elif where == "target":
        doc["targets"][0]["labels"] = bad
    if where != "group":
        with pytest.raises(ConfigError, match="invalid label name"):
            cfgmod.loads(yaml.safe_dump(doc))
        return
    # From an http_sd JSON body, as the hostile review sent it.
    with pytest.raises(SDError, match="invalid label name"):
        parse_groups(
            decode_sd_text(
                '[{"targets": ["edge-1.example.net"], "labels": {"tier\\n": "near"}}]', False
            ),
            SOURCE,
            ("icmp",),
            10,
        )


@pytest.mark.parametrize(
    "doc",
    [
        {"agent": {"region": "r\n"}},
        {"agent": {"region": "r"}, "targets": [{"name": "t\n", "address": "127.0.0.1"}]},
        {
            "agent": {"region": "r"},
            "discovery": {"file_sd": [{"name": "inv\n", "files": ["a.json"]}]},
        },
        {
            "agent": {"region": "r"},
            "discovery": {"http_sd": [{"name": "inv", "url": "http://x/sd\n"}]},
        },
        {
            "agent": {"region": "r"},
            "discovery": {"dns_sd": [{"name": "srv", "names": ["_e._udp.example.net\n"]}]},
        },
    ],
)
def test_names_ending_in_newline_are_refused(doc: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        cfgmod.loads(yaml.safe_dump(doc))


@pytest.mark.parametrize(
    "group",
    [
        {"targets": ["198.51.100.7"], "labels": {"__edge__": "sg-1\n"}},
        {"targets": ["edge-1\n.example.net"], "labels": {"__edge__": "sg-1"}},
        {"targets": ["198.51.100.7"], "labels": {"__edge__": "sg-1", "tier\n": "near"}},
    ],
)
def test_discovered_names_ending_in_newline_are_refused(group: dict[str, Any]) -> None:
    with pytest.raises(SDError) as e:
        parse_groups([group], SOURCE, ("icmp",), 10)
    assert e.value.reason == "invalid"


def test_label_values_are_escaped_in_metrics() -> None:
    value = 'a\\b"c\nd'
    cfg = cfgmod.loads(
        yaml.safe_dump({**BASE, "agent": {"region": "r", "labels": {"note": value}}})
    )
    found = parse_groups(
        [{"targets": ["edge-1.example.net"], "labels": {"tier": value}}], SOURCE, ("icmp",), 10
    )
    text = _render(_agent(cfg, found))
    assert 'note="a\\\\b\\"c\\nd"' in text and 'tier="a\\\\b\\"c\\nd"' in text
    check_exposition(text)
    got = {
        (s.labels["edge"], s.labels.get("tier", ""), s.labels["note"])
        for f in text_string_to_metric_families(text)
        if f.name == "edgeprobe_packets_sent"
        for s in f.samples
    }
    assert got == {("static-1", "", value), ("edge-1.example.net", value, value)}
