"""The studies' shared verdict rule and interval."""

import numpy as np
import pytest

from workbench.studies._common import overall, seeds_to_settle, t_interval, verdict


def test_verdict_rule():
    assert verdict(0.1, 0.2) == "reproduced" and verdict(-0.2, -0.1) == "not reproduced"
    assert verdict(-0.1, 0.1) == "inconclusive" and verdict(np.nan, np.nan) == "inconclusive"
    assert verdict(-0.2, -0.1, positive=False) == "reproduced" and verdict(0.1, 0.2, positive=False) == "not reproduced"
    assert overall(["reproduced", "reproduced"]) == "reproduced"
    assert overall(["reproduced", "inconclusive"]) == "inconclusive"
    assert overall(["reproduced", "not reproduced"]) == "not reproduced" and overall([]) == "inconclusive"


def test_t_interval_matches_scipy():
    from scipy import stats

    x = [0.1, 0.3, 0.2, 0.25, np.nan]
    m, lo, hi, n = t_interval(x)
    ref = stats.t.interval(0.95, 3, loc=np.mean(x[:4]), scale=stats.sem(x[:4]))
    assert n == 4 and m == pytest.approx(0.2125) and (lo, hi) == pytest.approx(ref)
    assert np.isnan(t_interval([0.5])[1]) and t_interval([])[3] == 0


def test_seeds_to_settle_gives_the_power_it_promises():
    """Ground truth by simulation: with the effect and spread that an interval implies, intervals over
    the returned number of seeds exclude 0 about ``power`` of the time, over one seed fewer less often."""
    from scipy import stats

    rng = np.random.default_rng(0)
    x = [0.02, 0.05, -0.01]  # three seeds: inconclusive
    mean, lo, hi, n = t_interval(x)
    assert lo < 0 < hi
    sd = float(np.std(x, ddof=1))

    def excluded(k):
        draws = rng.normal(mean, sd, size=(40_000, k))
        half = stats.t.ppf(0.975, k - 1) * draws.std(axis=1, ddof=1) / np.sqrt(k)
        return float(np.mean(np.abs(draws.mean(axis=1)) > half))

    for power in (0.5, 0.8, 0.9):
        m = seeds_to_settle(mean, lo, hi, n, power=power)
        assert m is not None and m > n
        # The smallest count that reaches the power (the approximation is within about 0.02 of it).
        assert excluded(m) >= power - 0.02 and excluded(m - 1) <= power + 0.02
    assert excluded(seeds_to_settle(mean, lo, hi, n)) == pytest.approx(0.8, abs=0.025)


def test_seeds_to_settle_edge_cases():
    assert seeds_to_settle(0.0, -0.1, 0.1, 3) is None  # no effect to find
    assert seeds_to_settle(0.1, np.nan, np.nan, 1) is None  # no interval
    assert seeds_to_settle(1e-6, -1.0, 1.0, 3, max_n=100) is None  # beyond max_n
    assert seeds_to_settle(0.1, 0.1, 0.1, 3) == 2  # no spread
    # A wider interval around the same mean needs more seeds; a larger power, too.
    assert seeds_to_settle(0.05, -0.05, 0.15, 3) > seeds_to_settle(0.05, 0.0, 0.1, 3)
    assert seeds_to_settle(0.05, -0.05, 0.15, 3, power=0.9) > seeds_to_settle(0.05, -0.05, 0.15, 3)
    with pytest.raises(ValueError, match="power"):
        seeds_to_settle(0.05, -0.05, 0.15, 3, power=0.3)
