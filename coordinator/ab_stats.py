"""Statistics of an A/B test: rates with Wilson intervals, two-proportion z-tests, the winner.

Each arm's counts are shoppers (`edge_client.outcomes.arm_counts`): n exposed, x of whom
clicked (or converted). A shopper is one Bernoulli trial, so:

- the rate x / n gets a Wilson score interval (Wilson 1927), which keeps its coverage for
  small n and rates near 0, where the normal (Wald) interval does not;
- two arms are compared with the two-sided two-proportion z-test with pooled variance,
  z = (p1 - p2) / sqrt(p (1 - p) (1/n1 + 1/n2)), p = (x1 + x2) / (n1 + n2);
- with k arms the best arm must beat each of the k - 1 others at alpha / (k - 1)
  (Bonferroni) to be declared the winner.

Noisy counts (sites adding discrete Laplace noise of variance ``noise_var`` per count and
site) add that variance to the numerator: the interval's half-width and the test's variance
are widened by ``noise_var * sites / n^2`` (a normal approximation; n's own noise is
ignored, it is small next to n in any test worth reading).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z_95 = 1.959963984540054


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def wilson_interval(
    successes: float, n: float, z: float = Z_95, extra_var: float = 0.0
) -> tuple[float, float]:
    """Wilson score interval of a proportion (0, 0 when n <= 0), widened by ``extra_var``.

    ``extra_var`` is additional variance of the rate itself (noise), added in quadrature.
    """
    if n <= 0:
        return 0.0, 0.0
    p = min(max(successes / n, 0.0), 1.0)
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
    half = math.sqrt(half * half + z * z * extra_var)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class ZTest:
    """A two-sided two-proportion z-test of arm a against arm b."""

    difference: float  # p_a - p_b
    z: float
    p_value: float


def two_proportion_z_test(
    x_a: float, n_a: float, x_b: float, n_b: float, extra_var: float = 0.0
) -> ZTest:
    """Pooled two-proportion z-test (two-sided); ``extra_var`` adds noise variance of p_a - p_b."""
    if n_a <= 0 or n_b <= 0:
        return ZTest(0.0, 0.0, 1.0)
    p_a, p_b = x_a / n_a, x_b / n_b
    pooled = min(max((x_a + x_b) / (n_a + n_b), 0.0), 1.0)
    var = pooled * (1.0 - pooled) * (1.0 / n_a + 1.0 / n_b) + extra_var
    if var <= 0:
        same = math.isclose(p_a, p_b)
        return ZTest(p_a - p_b, 0.0 if same else math.copysign(math.inf, p_a - p_b), float(same))
    z = (p_a - p_b) / math.sqrt(var)
    return ZTest(p_a - p_b, z, min(1.0, 2.0 * normal_sf(abs(z))))


def discrete_laplace_variance(epsilon: float, sensitivity: float) -> float:
    """Variance of two-sided geometric noise with P(k) ~ exp(-epsilon |k| / sensitivity)."""
    if epsilon <= 0:
        return 0.0
    a = math.exp(-epsilon / sensitivity)
    return 2.0 * a / (1.0 - a) ** 2


@dataclass(frozen=True)
class ArmRate:
    """One arm's rate of one metric."""

    arm: int
    n: float
    successes: float
    rate: float
    low: float
    high: float
    vs_control: ZTest | None  # None for the control (first arm)


@dataclass(frozen=True)
class MetricComparison:
    """Every arm's rate of one metric, the best arm, and whether it won significantly."""

    metric: str
    arms: list[ArmRate]
    best: int
    significant: bool
    alpha: float
    p_values_vs_best: dict[int, float]


def compare_arms(
    metric: str,
    exposed: list[float],
    successes: list[float],
    *,
    alpha: float = 0.05,
    noise_var: float = 0.0,
    z: float = Z_95,
) -> MetricComparison:
    """Rates, Wilson intervals, tests against the control and the Bonferroni winner rule.

    ``noise_var`` is the total noise variance of one arm's summed count (0 for exact counts).
    Noisy sums are clamped to 0 <= successes <= exposed first (post-processing).
    """
    n = [max(0.0, v) for v in exposed]
    x = [min(max(0.0, s), m) for s, m in zip(successes, n, strict=True)]
    rates = [xi / ni if ni > 0 else 0.0 for xi, ni in zip(x, n, strict=True)]

    def rate_var(i: int) -> float:
        return noise_var / (n[i] * n[i]) if n[i] > 0 else 0.0

    arms = []
    for i in range(len(n)):
        low, high = wilson_interval(x[i], n[i], z, rate_var(i))
        test = (
            None
            if i == 0
            else two_proportion_z_test(x[i], n[i], x[0], n[0], rate_var(i) + rate_var(0))
        )
        arms.append(ArmRate(i, n[i], x[i], rates[i], low, high, test))
    best = max(range(len(n)), key=lambda i: (rates[i], n[i] > 0))
    p_vs_best = {
        i: two_proportion_z_test(x[best], n[best], x[i], n[i], rate_var(best) + rate_var(i)).p_value
        for i in range(len(n))
        if i != best
    }
    corrected = alpha / max(1, len(n) - 1)
    significant = bool(p_vs_best) and all(
        p < corrected and rates[best] > rates[i] for i, p in p_vs_best.items()
    )
    return MetricComparison(metric, arms, best, significant, alpha, p_vs_best)
