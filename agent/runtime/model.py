"""The connect-budget model: what measured RTT and loss predict about a session connect.

Derivation (see also docs/concepts/budget-model.md):

* Lossless connect time: T0 = n * RTT + T_fixed, with n round trips on the critical path
  (≈4.5 warm: signalling, ICE, DTLS 1.2, half an RTT to first media; ≈7.5 cold: adds DNS, TCP
  and TLS 1.3) and T_fixed for processing.
* A lost packet on the critical path costs a retransmission timer: TCP SYN 1 s (RFC 6298 §2.1),
  STUN ≥ 500 ms (RFC 8489 §6.2.1, RFC 8445 §14.3), DTLS 1 s / 400 ms (RFC 6347 §4.2.4.1,
  RFC 9147 §5.8.2). Each exceeds the slack S = B − T0 for any useful path, so any loss of one of
  the E critical-path exchanges misses the budget B:  P(ok | RTT) = (1 − p)^E.
* With RTT spread (mean μ, standard deviation σ, n independent round trips), the lossless time is
  ≈ Normal(n·μ + T_fixed, σ·√n), so
  P(ok) ≈ (1 − p)^E · Φ((B − T_fixed − n·μ) / (σ·√n)), and P(miss) = 1 − P(ok).
* p is the round-trip loss ratio a probe sees (RFC 7680): 1 − (1 − p_up)(1 − p_down).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from agent.runtime.stats import quantile

Z95 = 1.959963984540054


def wilson_interval(lost: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a loss ratio; (0, 1) when there is no data."""
    if n <= 0:
        return 0.0, 1.0
    p = lost / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


@dataclass(frozen=True)
class Prediction:
    estimate: float  # lossless connect seconds (n * median RTT + fixed)
    miss_probability: float
    r_factor: float
    mos: float


def connect_estimate(rtt: float, round_trips: float, fixed: float) -> float:
    return round_trips * rtt + fixed


def miss_probability(
    loss: float,
    mean_rtt: float,
    sd_rtt: float,
    budget: float,
    round_trips: float,
    fixed: float,
    exchanges: int,
) -> float:
    loss = min(max(loss, 0.0), 1.0)
    p_lossless_ok = (1 - loss) ** exchanges
    slack = budget - fixed - round_trips * mean_rtt
    if sd_rtt <= 0:
        p_time_ok = 1.0 if slack >= 0 else 0.0
    else:
        p_time_ok = normal_cdf(slack / (sd_rtt * math.sqrt(round_trips)))
    return min(1.0, max(0.0, 1 - p_lossless_ok * p_time_ok))


def r_factor(latency: float, jitter: float, loss: float) -> float:
    """The simplified E-model used by PingPlotter, NetBeez and others — not ITU-T G.107 proper
    (no codec impairment factors, no echo, no advantage factor). ``latency`` is the mean RTT, as
    those tools take it, which is conservative for one-way mouth-to-ear delay. Seconds in,
    ratio ``loss`` in."""
    eff_ms = latency * 1000 + 2 * jitter * 1000 + 10
    r = 93.2 - eff_ms / 40 if eff_ms < 160 else 93.2 - (eff_ms - 120) / 10
    r -= 2.5 * loss * 100
    return min(100.0, max(0.0, r))


def mos(r: float) -> float:
    """R → MOS, ITU-T G.107 Annex B."""
    if r <= 0:
        return 1.0
    if r >= 100:
        return 4.5
    return 1 + 0.035 * r + 7e-6 * r * (r - 60) * (100 - r)


def predict(
    answered: Sequence[float],
    lost: int,
    jitter: float,
    budget: float,
    round_trips: float,
    fixed: float,
    exchanges: int,
) -> Prediction | None:
    """Budget prediction from a window of sorted answered RTTs and a lost count."""
    n = len(answered) + lost
    if n == 0:
        return None
    loss = lost / n
    if not answered:
        return Prediction(math.inf, 1.0, 0.0, 1.0)
    median = quantile(answered, 0.5)
    mean = sum(answered) / len(answered)
    sd = (
        math.sqrt(sum((x - mean) ** 2 for x in answered) / (len(answered) - 1))
        if len(answered) > 1
        else 0.0
    )
    r = r_factor(mean, jitter, loss)
    return Prediction(
        estimate=connect_estimate(median, round_trips, fixed),
        miss_probability=miss_probability(loss, mean, sd, budget, round_trips, fixed, exchanges),
        r_factor=r,
        mos=mos(r),
    )
