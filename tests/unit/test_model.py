"""The budget model's formulas against the reference's worked numbers."""

from __future__ import annotations

import pytest

from agent.runtime import model


@pytest.mark.parametrize(("n", "upper"), [(20, 0.161), (50, 0.071), (100, 0.037), (600, 0.0064)])
def test_wilson_upper_bound_with_zero_losses(n: int, upper: float) -> None:
    assert model.wilson_interval(0, n)[1] == pytest.approx(upper, abs=0.0006)


def test_wilson_no_data_is_uninformative() -> None:
    assert model.wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("lat", "jit", "loss", "r", "mos"),
    [
        (0.050, 0.005, 0.00, 91.5, 4.37),
        (0.150, 0.020, 0.01, 82.7, 4.12),
        (0.300, 0.030, 0.02, 63.2, 3.26),
    ],
)
def test_simplified_e_model(lat: float, jit: float, loss: float, r: float, mos: float) -> None:
    got = model.r_factor(lat, jit, loss)
    assert got == pytest.approx(r, abs=0.06)
    assert model.mos(got) == pytest.approx(mos, abs=0.01)


def test_miss_probability_loss_term() -> None:
    # With no RTT spread and slack left, only loss matters: 1 - (1 - p)^E.
    p = model.miss_probability(0.05, 0.02, 0.0, 0.6, 7.5, 0.1, 4)
    assert p == pytest.approx(1 - 0.95**4)
    assert model.miss_probability(0.0, 0.02, 0.0, 0.6, 7.5, 0.1, 4) == 0.0


def test_miss_probability_rtt_term() -> None:
    # Mean RTT exactly at the ceiling (B - fixed)/n: half the connects miss.
    ceiling = (0.6 - 0.1) / 7.5
    assert model.miss_probability(0.0, ceiling, 0.01, 0.6, 7.5, 0.1, 4) == pytest.approx(0.5)
    assert model.miss_probability(0.0, ceiling * 1.5, 0.0, 0.6, 7.5, 0.1, 4) == 1.0


def test_slo_loss_threshold_from_reference() -> None:
    # p_rt <= 1 - tau^(1/E); E = 4: tau 99 % -> 0.25 %.
    p = 1 - 0.99 ** (1 / 4)
    assert p == pytest.approx(0.0025, abs=0.0001)
    assert model.miss_probability(p, 0.02, 0.0, 0.6, 7.5, 0.1, 4) == pytest.approx(0.01)


def test_predict_uses_window() -> None:
    pred = model.predict([0.05, 0.05, 0.06], 1, 0.002, 0.6, 7.5, 0.1, 4)
    assert pred is not None
    assert pred.estimate == pytest.approx(7.5 * 0.05 + 0.1)
    assert 0 < pred.miss_probability <= 1
    assert model.predict([], 0, 0, 0.6, 7.5, 0.1, 4) is None
    dead = model.predict([], 5, 0, 0.6, 7.5, 0.1, 4)
    assert dead is not None and dead.miss_probability == 1.0
