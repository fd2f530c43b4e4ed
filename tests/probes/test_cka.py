"""CKA / HSIC: Kornblith's golden values, Gram vs feature forms, invariances, minibatch CKA."""

import numpy as np
import pytest
import torch

from workbench.probes import (
    DegenerateInputWarning,
    MinibatchCKA,
    center_gram,
    cka,
    cka_matrix,
    gram_linear,
    gram_rbf,
    hsic,
)


@pytest.fixture(scope="module")
def kornblith_xy():
    np.random.seed(1337)
    X = np.random.randn(100, 10)
    Y = np.random.randn(100, 10) + X
    return X, Y


# ----------------------------------------------------------------------------- golden values


def test_golden_values_kornblith(kornblith_xy):
    X, Y = kornblith_xy
    assert cka(X, Y) == pytest.approx(0.55761, abs=1e-5)
    assert cka(X, Y, kernel="rbf", threshold=0.5) == pytest.approx(0.65483, abs=1e-5)
    assert cka(X, Y, debiased=True) == pytest.approx(0.51346, abs=1e-5)


def _kornblith_gram_cka(K, L, debiased):
    """Kornblith et al.'s reference implementation, transcribed in numpy."""

    def center(g):
        g = g.copy()
        n = g.shape[0]
        if debiased:
            np.fill_diagonal(g, 0)
            means = np.sum(g, 0) / (n - 2)
            means -= np.sum(means) / (2 * (n - 1))
            g -= means[:, None]
            g -= means[None, :]
            np.fill_diagonal(g, 0)
        else:
            means = np.mean(g, 0)
            means -= np.mean(means) / 2
            g -= means[:, None]
            g -= means[None, :]
        return g

    K, L = center(K), center(L)
    return K.ravel() @ L.ravel() / (np.linalg.norm(K) * np.linalg.norm(L))


@pytest.mark.parametrize("debiased", [False, True])
def test_gram_and_feature_forms_agree(kornblith_xy, debiased):
    X, Y = kornblith_xy
    gram = cka(X, Y, debiased=debiased, form="gram")
    feature = cka(X, Y, debiased=debiased, form="feature")
    assert abs(gram - feature) < 1e-10
    assert abs(gram - _kornblith_gram_cka(X @ X.T, Y @ Y.T, debiased)) < 1e-10
    # and with d > n (auto picks the Gram form)
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((30, 50)), rng.standard_normal((30, 40))
    assert abs(cka(A, B, debiased=debiased) - cka(A, B, debiased=debiased, form="feature")) < 1e-10


def test_rbf_matches_reference(kornblith_xy):
    X, Y = kornblith_xy

    def rbf(x, threshold):
        dots = x @ x.T
        sq = np.diag(dots)
        d = -2 * dots + sq[:, None] + sq[None, :]
        return np.exp(-d / (2 * threshold**2 * np.median(d)))

    for thr in (0.5, 1.0, 2.0):
        ref = _kornblith_gram_cka(rbf(X, thr), rbf(Y, thr), False)
        assert abs(cka(X, Y, kernel="rbf", threshold=thr) - ref) < 1e-10
        assert np.abs(gram_rbf(X, thr) - rbf(X, thr)).max() < 1e-10


def test_hsic_unbiased_is_u_centred_inner_product(kornblith_xy):
    X, Y = kornblith_xy
    K, L = gram_linear(X), gram_linear(Y)
    n = K.shape[0]
    uk, ul = center_gram(K, unbiased=True), center_gram(L, unbiased=True)
    assert abs(hsic(K, L, unbiased=True) - (uk * ul).sum() / (n * (n - 3))) < 1e-10
    H = np.eye(n) - 1.0 / n
    assert abs(hsic(K, L) - np.trace(K @ H @ L @ H) / (n - 1) ** 2) < 1e-10


# ----------------------------------------------------------------------------- invariances


def test_self_similarity_and_invariances(kornblith_xy):
    X, Y = kornblith_xy
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    A = rng.standard_normal((10, 10)) * np.linspace(0.1, 5, 10)  # invertible, anisotropic
    base = cka(X, Y)
    assert cka(X, X) == pytest.approx(1.0, abs=1e-12)
    for kernel in ("linear", "rbf"):
        for debiased in (False, True):
            ref = cka(X, Y, kernel=kernel, debiased=debiased)
            assert cka(X @ Q, Y, kernel=kernel, debiased=debiased) == pytest.approx(ref, abs=1e-10)
            assert cka(3.7 * X, Y, kernel=kernel, debiased=debiased) == pytest.approx(ref, abs=1e-10)
    assert abs(cka(X @ A, Y) - base) > 0.02  # not invariant to arbitrary invertible maps


def test_debiased_near_zero_on_independent_data():
    rng = np.random.default_rng(2)
    vals_d, vals_b = [], []
    for _ in range(10):
        X, Y = rng.standard_normal((100, 50)), rng.standard_normal((100, 50))
        vals_d.append(cka(X, Y, debiased=True))
        vals_b.append(cka(X, Y))
    assert abs(np.mean(vals_d)) < 0.01
    assert np.mean(vals_b) > 0.25  # the biased estimator is inflated at small n / large d


# ----------------------------------------------------------------------------- torch


def test_torch_in_torch_out_and_gradients(kornblith_xy):
    X, Y = kornblith_xy
    Xt = torch.tensor(X, dtype=torch.float32, requires_grad=True)
    Yt = torch.tensor(Y, dtype=torch.float32)
    for kernel in ("linear", "rbf"):
        for debiased in (False, True):
            for form in (("auto", "gram") if kernel == "linear" else ("auto",)):
                val = cka(Xt, Yt, kernel=kernel, debiased=debiased, form=form)
                assert isinstance(val, torch.Tensor) and val.dtype == torch.float64
                assert val.item() == pytest.approx(cka(X.astype(np.float32), Y.astype(np.float32), kernel, 1.0,
                                                       debiased), abs=1e-10)
                (g,) = torch.autograd.grad(val, Xt)
                assert torch.isfinite(g).all() and g.abs().sum() > 0


# ----------------------------------------------------------------------------- matrices


def test_cka_matrix_matches_pairwise():
    rng = np.random.default_rng(3)
    acts_a = [rng.standard_normal((40, d)) for d in (5, 60, 12)]
    acts_b = [acts_a[0] @ rng.standard_normal((5, 7)), rng.standard_normal((40, 80))]
    for kernel, debiased in (("linear", False), ("linear", True), ("rbf", False)):
        M = cka_matrix(acts_a, acts_b, kernel=kernel, debiased=debiased)
        assert M.shape == (3, 2)
        for i, a in enumerate(acts_a):
            for j, b in enumerate(acts_b):
                assert abs(M[i, j] - cka(a, b, kernel=kernel, debiased=debiased)) < 1e-10
    S = cka_matrix(acts_a)
    assert np.allclose(np.diag(S), 1.0) and np.allclose(S, S.T)


def _hsic1(K, L):
    """Song et al.'s unbiased HSIC, written out directly."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    return (np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ K @ L @ one) / (n * (n - 3))


def test_minibatch_cka_equals_direct_formula():
    rng = np.random.default_rng(4)
    n, b = 120, 30
    base = rng.standard_normal((n, 6))
    acts_a = [base @ rng.standard_normal((6, 8)), rng.standard_normal((n, 5))]
    acts_b = [base @ rng.standard_normal((6, 4)) + 0.3 * rng.standard_normal((n, 4)),
              rng.standard_normal((n, 9)), base]
    mb = MinibatchCKA()
    for s in range(0, n, b):
        mb.update([a[s:s + b] for a in acts_a], [y[s:s + b] for y in acts_b])
    got = mb.compute()
    assert got.shape == (2, 3) and mb.n_samples == n and mb.n_batches == n // b
    for i, a in enumerate(acts_a):
        for j, y in enumerate(acts_b):
            xy = xx = yy = 0.0
            for s in range(0, n, b):
                K, L = a[s:s + b] @ a[s:s + b].T, y[s:s + b] @ y[s:s + b].T
                xy += _hsic1(K, L)
                xx += _hsic1(K, K)
                yy += _hsic1(L, L)
            assert abs(got[i, j] - xy / np.sqrt(xx * yy)) < 1e-10
    # a single batch of everything is the debiased CKA
    one = MinibatchCKA()
    one.update(acts_a, acts_b)
    assert abs(one.compute()[0, 0] - cka(acts_a[0], acts_b[0], debiased=True)) < 1e-10
    # self-comparison
    self_mb = MinibatchCKA()
    self_mb.update([a[:b] for a in acts_a])
    assert np.allclose(np.diag(self_mb.compute()), 1.0)


def test_minibatch_cka_errors():
    mb = MinibatchCKA()
    with pytest.raises(ValueError, match="no batch"):
        mb.compute()
    with pytest.raises(ValueError, match="at least 4"):
        mb.update([np.ones((3, 2))], [np.ones((3, 2))])
    with pytest.raises(ValueError, match="acts_a"):
        mb.update(np.ones((10, 2)), [np.ones((10, 2))])
    bad = np.random.randn(10, 2)
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"acts_b\[1\] contains NaN"):
        mb.update([np.random.randn(10, 2)], [np.random.randn(10, 2), bad])
    bad[3, 1] = -np.inf
    with pytest.raises(ValueError, match=r"acts_a\[0\] contains NaN or inf"):
        mb.update([bad], [np.random.randn(10, 2)])
    mb.update([np.random.randn(10, 2)], [np.random.randn(10, 2)])
    with pytest.raises(ValueError, match="layers"):
        mb.update([np.random.randn(10, 2)] * 2, [np.random.randn(10, 2)])


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((20, 3))
    with pytest.raises(ValueError, match="same number of samples"):
        cka(X, X[:10])
    with pytest.raises(ValueError, match=r"X has n=3 .*n >= 4"):
        cka(X[:3], X[:3], debiased=True)
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="Y contains NaN"):
        cka(X, bad)
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="X contains NaN or inf"):
        cka(bad, X)
    with pytest.raises(ValueError, match="X must be 2-D"):
        cka(X[:, 0], X)
    with pytest.raises(ValueError, match="Y must be 2-D"):
        cka(X, X[None])
    with pytest.raises(ValueError, match="kernel"):
        cka(X, X, kernel="poly")
    with pytest.raises(ValueError, match="threshold"):
        cka(X, X, kernel="rbf", threshold=0)
    with pytest.raises(ValueError, match="unbiased HSIC needs n >= 4"):
        hsic(np.eye(3), np.eye(3), unbiased=True)


def test_constant_representation_is_nan_with_warning():
    X = np.random.default_rng(6).standard_normal((20, 3))
    for kwargs in ({}, {"kernel": "rbf"}, {"debiased": True}, {"form": "gram"}):
        with pytest.warns(DegenerateInputWarning, match="constant"):
            assert np.isnan(cka(X, np.ones((20, 4)), **kwargs))
    with pytest.warns(DegenerateInputWarning):
        M = cka_matrix([X, np.zeros((20, 2))])
    assert np.isnan(M[1]).all() and M[0, 0] == pytest.approx(1.0)
    mb = MinibatchCKA()
    mb.update([X], [np.zeros((20, 2))])
    with pytest.warns(DegenerateInputWarning):
        assert np.isnan(mb.compute()[0, 0])
