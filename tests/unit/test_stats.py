"""Jitter, IPDV, loss bursts, windows and histogram boundaries on hand-computed sequences."""

from __future__ import annotations

import itertools
import math

import pytest

from agent.config.model import dense_rtt_buckets
from agent.runtime.stats import (
    BURST_BUCKETS,
    IPDV_BUCKETS,
    Histogram,
    PacketStats,
    Window,
    quantile,
)


def packets() -> PacketStats:
    return PacketStats(
        rtt=Histogram(dense_rtt_buckets()),
        ipdv=Histogram(IPDV_BUCKETS),
        bursts=Histogram(BURST_BUCKETS),
        window=Window(60),
    )


def test_rfc3550_jitter_by_hand() -> None:
    p = packets()
    p.add([0.100, 0.110, 0.105, 0.125], now=0)
    # |D| = 0.010, 0.005, 0.020; J = J + (|D| - J)/16 each step:
    j = 0.0
    for d in (0.010, 0.005, 0.020):
        j += (d - j) / 16
    assert j == pytest.approx(0.00209228515625, abs=1e-12)
    assert p.jitter == pytest.approx(j, abs=1e-12)


def test_jitter_skips_lost_packets_and_ipdv_uses_consecutive_answered() -> None:
    p = packets()
    p.add([0.100, None, 0.130, 0.120], now=0)
    # answered sequence: 0.100, 0.130, 0.120 -> |dRTT| = 0.030, 0.010
    assert p.ipdv.count == 2
    assert p.ipdv.sum == pytest.approx(0.040)
    expected = 0.0
    for d in (0.030, 0.010):
        expected += (d - expected) / 16
    assert p.jitter == pytest.approx(expected)


def test_loss_bursts_rfc3357() -> None:
    p = packets()
    # bursts: 1, 3 (spanning two runs), 2 (still open at the end: not observed yet)
    p.add([0.1, None, 0.1, None, None], now=0)
    p.add([None, 0.1, 0.1, None, None], now=1)
    assert p.sent == 10 and p.lost == 6
    assert p.bursts.count == 2
    assert p.bursts.sum == 4
    assert p.burst == 2
    p.add([0.1], now=2)
    assert p.bursts.count == 3 and p.bursts.sum == 6
    assert p.loss_periods == 3  # counted when each period begins


def test_lean_series_count_loss_periods_without_the_histograms() -> None:
    p = PacketStats(rtt=Histogram(dense_rtt_buckets()), window=Window(60))
    p.add([0.1, None, 0.1, None, None, None, 0.1, 0.1], now=0)
    assert p.ipdv is None and p.bursts is None
    assert (p.lost, p.loss_periods) == (4, 2)


def test_histogram_bound_is_inclusive_and_has_exactly_0_6() -> None:
    buckets = dense_rtt_buckets()
    assert 0.6 in buckets
    assert buckets[0] == 0.0005 and buckets[-1] == 5.0
    h = Histogram(buckets)
    h.observe(0.6)
    h.observe(0.6000001)
    cum = dict(zip(buckets, h.cumulative(), strict=False))
    assert cum[0.6] == 1
    assert h.cumulative()[-1] == 2


def test_default_buckets_are_fine_enough_for_2_percent_median() -> None:
    # histogram_quantile interpolates linearly inside a bucket: the worst case is half a bucket.
    b = [x for x in dense_rtt_buckets() if 0.005 <= x <= 1.0]
    worst = max((hi - lo) / 2 / lo for lo, hi in itertools.pairwise(b))
    assert worst <= 0.02


def test_window_prunes_old_samples_and_counts_loss() -> None:
    w = Window(10)
    w.add(0, [0.1, None])
    w.add(5, [0.3])
    answered, lost = w.snapshot(9)
    assert answered == [0.1, 0.3] and lost == 1
    answered, lost = w.snapshot(12)
    assert answered == [0.3] and lost == 0


def test_quantile_type7() -> None:
    assert quantile([1, 2, 3, 4], 0.5) == 2.5
    assert quantile([1, 2, 3, 4], 0.95) == pytest.approx(3.85)
    assert math.isnan(quantile([], 0.5))
