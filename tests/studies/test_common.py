"""The studies' shared verdict rule and interval."""

import numpy as np
import pytest

from workbench.studies._common import overall, t_interval, verdict


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
