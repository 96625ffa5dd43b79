"""The lab's pieces without root: impairment model, packets, profiles, ground-truth helpers."""

from __future__ import annotations

import ipaddress
import math
import struct
from pathlib import Path

import pytest

from agent.config.decode import ConfigError
from lab import groundtruth as gt
from lab import packet
from lab.impair import DirState, Gilbert, Impairment, split_directions
from lab.spec import DEFAULT_PROFILES, decode_profile, load_profile, merge_edges
from tests.lab_helpers import ipdv, rfc3550_jitter, wilson


def test_durations_and_ratios() -> None:
    for text, seconds in (("20ms", 0.02), ("250us", 250e-6), (1.5, 1.5)):
        assert split_directions({"delay": text}, "k")[0].delay == pytest.approx(seconds)
    with pytest.raises(ConfigError, match=r"k\.delay: expected a duration"):
        split_directions({"delay": "soon"}, "k")
    up, down = split_directions({"delay": "10ms", "loss": "2%", "down": {"delay": "30ms"}}, "p")
    assert (up.delay, down.delay, up.loss, down.loss) == pytest.approx((0.01, 0.03, 0.02, 0.02))
    with pytest.raises(ConfigError, match=r"p.dealy: unknown key") as e:
        split_directions({"dealy": "10ms"}, "p")
    assert e.value.line is None  # plain data, not a file: no line to name
    with pytest.raises(ConfigError, match=r"p.up.loss: must be between 0 and 1"):
        split_directions({"up": {"loss": "120%"}}, "p")


def test_gilbert_matches_its_closed_form() -> None:
    # 200k packets: the loss ratio's standard error is sqrt(.074*.926/200k)*sqrt(burst factor
    # ~ (1+ (1-r-p))/(r+p) ≈ 7.7) ≈ 0.0016, so 4 sigma is ~0.0065; the mean burst 1/r = 4 has
    # ~1.1k bursts with sd 3.5 each, standard error ≈ 0.1, 4 sigma ≈ 0.42.
    d = DirState(Impairment(gilbert=Gilbert(p=0.02, r=0.25)), seed=3)
    lost = [d.lost() for _ in range(200_000)]
    bursts = gt.burst_lengths(lost)
    assert sum(lost) / len(lost) == pytest.approx(0.02 / 0.27, abs=0.0065)
    assert sum(bursts) / len(bursts) == pytest.approx(4.0, abs=0.42)


def test_order_preserving_jitter_never_reorders() -> None:
    d = DirState(Impairment(delay=0.01, jitter=0.005, jitter_dist="normal"), seed=1)
    rel = [d.release_ns(i * 1_000_000) for i in range(2000)]  # 1 ms apart, 5 ms jitter
    assert rel == sorted(rel)
    r = DirState(Impairment(delay=0.01, jitter=0.005, jitter_dist="normal", reorder=True), 1)
    rel2 = [r.release_ns(i * 1_000_000) for i in range(2000)]
    assert rel2 != sorted(rel2)


@pytest.mark.parametrize("dist", ["uniform", "normal", "exponential", "pareto"])
def test_jitter_distributions_are_non_negative(dist: str) -> None:
    d = DirState(Impairment(delay=0.001, jitter=0.002, jitter_dist=dist, reorder=True), 2)  # type: ignore[arg-type]
    xs = [d.delay_ns() for _ in range(5000)]
    assert min(xs) >= 0
    assert max(xs) > 1_000_000


def _echo4(ttl: int = 64) -> bytes:
    icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x1234, 7) + b"x" * 16)
    struct.pack_into("!H", icmp, 2, packet.checksum(icmp))
    return packet.ipv4(bytes([198, 19, 1, 2]), bytes([198, 18, 2, 1]), 1, bytes(icmp), ttl, 1)


def test_parse_age_and_time_exceeded_v4() -> None:
    p = _echo4(ttl=5)
    info = packet.parse(p)
    assert info is not None and (info.icmp_type, info.a, info.b, info.ttl) == (8, 0x1234, 7, 5)
    b = bytearray(p)
    packet.age(b, 3)
    assert b[8] == 2 and packet.checksum(b[:20]) == 0  # header checksum still valid
    te = packet.time_exceeded(p, bytes([198, 19, 64, 3]))
    assert packet.checksum(te[:20]) == 0 and packet.checksum(te[20:]) == 0
    ti = packet.parse(te)
    assert ti is not None and ti.icmp_type == 11 and (ti.a, ti.b) == (0x1234, 7)
    assert ti.dst == bytes([198, 19, 1, 2])


def test_time_exceeded_v6_checksum() -> None:
    src, dst = (
        ipaddress.ip_address("2001:db8:a:1::2").packed,
        ipaddress.ip_address("2001:db8:e:2::1").packed,
    )
    icmp = struct.pack("!BBHHH", 128, 0, 0, 9, 3) + b"y" * 8
    p = struct.pack("!IHBB16s16s", 6 << 28, len(icmp), 58, 2, src, dst) + icmp
    router = ipaddress.ip_address("2001:db8:f::5").packed
    te = packet.time_exceeded(p, router)
    pseudo = router + src + struct.pack("!I3xB", len(te) - 40, 58)
    assert packet.checksum(pseudo + te[40:]) == 0
    ti = packet.parse(te)
    assert ti is not None and (ti.icmp_type, ti.a, ti.b) == (3, 9, 3)


def test_shipped_profiles_have_their_roles() -> None:
    profs = [load_profile(n) for n in DEFAULT_PROFILES]
    merge_edges(profs)
    for p in profs:
        assert 3 <= len(p.paths) <= 4 and p.source
        tiers = {x.tier for x in p.paths}
        assert "near" in tiers and "far" in tiers and tiers & {"lossy", "jittery"}
        for x in p.paths:
            rtt = x.up.delay + x.down.delay
            if x.tier == "near":
                assert rtt < 0.04 and x.up.nominal_loss() == 0
            if x.tier == "far":  # marginal: between the cold and warm RTT ceilings
                assert 0.067 < rtt < 0.125
            if x.tier in ("lossy", "jittery"):
                assert x.up.nominal_loss() >= 0.01 or x.up.jitter >= 0.01
    jkt = profs[0]
    assert any(len(x.hops) in (7, 8) and any(h.loss for h in x.hops) for x in jkt.paths)
    assert jkt.schedule and jkt.schedule[0].at == 60


def test_profiles_are_strict() -> None:
    base = {
        "region": "xx-test",
        "edges": [{"name": "a", "ipv4": "198.18.9.9", "ipv6": "2001:db8:e:99::1", "path": {}}],
    }
    decode_profile(base)
    with pytest.raises(ConfigError, match=r"edges\[0\].ipv4: edge addresses must be in"):
        decode_profile({**base, "edges": [{**base["edges"][0], "ipv4": "10.0.0.1"}]})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=r"schedule\[0\].edge"):
        decode_profile({**base, "schedule": [{"at": "1s", "edge": "zz", "set": {}}]})
    with pytest.raises(ConfigError, match="hops' delays add up"):
        decode_profile(
            {
                **base,
                "edges": [
                    {
                        **base["edges"][0],
                        "path": {"delay": "1ms"},  # type: ignore[dict-item]
                        "hops": [{"name": "h", "delay": "2ms"}],
                    }
                ],
            }
        )


def test_a_profile_error_names_file_line_and_key(tmp_path: Path) -> None:
    p = tmp_path / "xx-test.yaml"
    p.write_text(
        "region: xx-test\n"
        "edges:\n"
        "  - name: a\n"
        "    ipv4: 198.18.9.9\n"
        "    ipv6: 2001:db8:e:99::1\n"
        "    path: {delay: 10ms}\n"
        "    hops:\n"
        "      - {name: h1, delay: 1ms}\n"
        "      - {name: h2, delay: 1ms, icmp_loss: 150%}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_profile(str(p))
    assert str(e.value).startswith(f"{p}:9: edges[0].hops[1].icmp_loss: must be between 0 and 1")
    p.write_text(p.read_text().replace("path: {delay: 10ms}", "path: {delay: 1ms}"))
    p.write_text(p.read_text().replace("150%", "1%"))
    with pytest.raises(ConfigError) as e:
        load_profile(str(p))
    assert str(e.value).startswith(f"{p}:7: edges[0].hops: the hops' delays add up")


def test_lab_command_reports_a_bad_profile_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lab.__main__ import main

    p = tmp_path / "bad.yaml"
    p.write_text("edges:\n  - name: x\n    bogus: 1\n")
    assert main(["up", "--profile", str(p)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lab: {p}:3: edges[0].bogus: unknown key") and err.count("\n") == 1


def test_wilson_and_jitter_helpers() -> None:
    lo, hi = wilson(0, 100, 1.96)
    assert lo == 0 and hi == pytest.approx(0.037, abs=0.001)  # reference table value
    assert rfc3550_jitter([0.01, 0.02, None, 0.01]) == pytest.approx((0.01 + 0.01 * 15 / 16) / 16)
    assert ipdv([0.01, 0.02, None, 0.01]) == pytest.approx([0.01])
    assert math.isnan(gt.quantile([], 0.5))
