"""Permutation nulls and bootstrap intervals (workbench.probes.resampling)."""

import numpy as np
import pytest
import torch

from workbench.probes import DegenerateInputWarning, cka, compare_rdms, rdm
from workbench.probes.resampling import (
    Resampled,
    bootstrap_ci,
    permutation_test,
    similarity_test,
)


def _pair(n=64, dx=8, dy=6, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, dx, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(dx, dy, generator=g, dtype=torch.float64) + noise * torch.randn(n, dy, generator=g,
                                                                                       dtype=torch.float64)
    return X, Y


def _rsa(X, Y):
    return float(compare_rdms(rdm(X, "cosine"), rdm(Y, "cosine"), "pearson"))


@pytest.mark.parametrize("measure", ["cka", "rsa"])
def test_value_matches_the_plain_measure(measure):
    X, Y = _pair()
    r = similarity_test(X, Y, measure=measure, n_perm=0)
    want = float(cka(X, Y)) if measure == "cka" else _rsa(X, Y)
    assert r.value == pytest.approx(want, abs=1e-10)
    assert np.isnan(r.null_lo) and np.isnan(r.ci_lo) and np.isnan(r.p_value)


@pytest.mark.parametrize("measure,debiased,dy", [("cka", False, 6), ("cka", False, 60), ("cka", True, 6),
                                                ("rsa", False, 6)])
def test_fast_null_equals_the_generic_permutation_test(measure, debiased, dy):
    # feature form (d < n), Gram form (d >= n) and the debiased Gram form
    X, Y = _pair(n=40, dy=dy)
    fast = similarity_test(X, Y, measure=measure, n_perm=30, seed=3, chunk=7, debiased=debiased)
    slow = permutation_test(lambda a, b: float(cka(a, b, debiased=debiased)) if measure == "cka" else _rsa(a, b),
                            X, Y, n_perm=30, seed=3)
    assert fast.value == pytest.approx(slow.value, abs=1e-10)
    np.testing.assert_allclose(fast.null, slow.null, atol=1e-10)
    assert fast.p_value == slow.p_value


def test_fast_cka_bootstrap_equals_the_generic_bootstrap():
    X, Y = _pair(n=40)
    fast = similarity_test(X, Y, "cka", n_perm=0, n_boot=25, seed=5)
    slow = bootstrap_ci(lambda a, b: float(cka(a, b)), X, Y, n_boot=25, seed=5)
    np.testing.assert_allclose(fast.boot, slow.boot, atol=1e-10)
    assert (fast.ci_lo, fast.ci_hi) == pytest.approx((slow.ci_lo, slow.ci_hi))


@pytest.mark.parametrize("measure", ["cka", "rsa"])
def test_dependent_pairs_beat_the_null_and_independent_ones_do_not(measure):
    X, Y = _pair(n=80, noise=0.2)
    dep = similarity_test(X, Y, measure, n_perm=199, n_boot=100, seed=1)
    assert dep.value > dep.null_hi
    assert dep.p_value == pytest.approx(1 / 200)
    assert dep.ci_lo <= dep.value <= dep.ci_hi
    # independent representations: over many draws the p-values are about uniform
    ps = []
    for s in range(40):
        A, _ = _pair(n=30, seed=100 + s)
        B, _ = _pair(n=30, seed=500 + s)
        ps.append(similarity_test(A, B, measure, n_perm=49, seed=s).p_value)
    ps = np.array(ps)
    assert (ps <= 0.05).mean() <= 0.2
    assert 0.3 < ps.mean() < 0.7


def test_rsa_bootstrap_drops_pairs_of_copies():
    # with copies of one sample kept, the RDM would gain zero "dissimilarities" in both RDMs
    X, Y = _pair(n=30)
    r = similarity_test(X, Y, "rsa", n_perm=0, n_boot=50, seed=2)
    assert np.isfinite(r.boot).all() and r.ci_lo < r.value < r.ci_hi


def test_constant_input_is_nan_with_a_warning():
    X, _ = _pair()
    with pytest.warns(DegenerateInputWarning):
        r = similarity_test(X, torch.zeros(X.shape[0], 3, dtype=torch.float64), "cka", n_perm=5)
    assert isinstance(r, Resampled) and np.isnan(r.value) and np.isnan(r.null_hi)


def test_bad_input_is_named():
    X, Y = _pair()
    with pytest.raises(ValueError, match="measure"):
        similarity_test(X, Y, "mi")
    with pytest.raises(ValueError, match="same number of samples"):
        similarity_test(X, Y[:10])
    with pytest.raises(ValueError, match="level"):
        similarity_test(X, Y, level=95)
    with pytest.raises(ValueError, match="n_perm"):
        similarity_test(X, Y, n_perm=-1)
    with pytest.raises(ValueError, match="at least 4"):
        permutation_test(lambda a, b: 0.0, X[:3], Y[:3])
