"""Mutual information (nats): KSG vs brute force and analytic values, plug-in vs sklearn,
variational bounds with the true critic, trained critics."""

import math

import numpy as np
import pytest
import torch
from scipy.special import digamma
from sklearn.feature_selection import mutual_info_regression
from sklearn.metrics import mutual_info_score

from workbench.probes import (
    DegenerateInputWarning,
    correlated_gaussians,
    dv,
    estimate_mi,
    gaussian_critic,
    gaussian_mi,
    infonce,
    js,
    mi_binned,
    mi_ksg,
    mine,
    nwj,
    smile,
)


def _ksg_brute_force(x, y, k):
    """KSG estimator 1 in O(n^2): max-norm kNN radius in the joint space, strict marginal counts."""
    x = x.reshape(len(x), -1)
    y = y.reshape(len(y), -1)
    n = len(x)
    dx = np.abs(x[:, None, :] - x[None, :, :]).max(-1)
    dy = np.abs(y[:, None, :] - y[None, :, :]).max(-1)
    dz = np.maximum(dx, dy)
    np.fill_diagonal(dz, np.inf)
    eps = np.sort(dz, axis=1)[:, k - 1]
    np.fill_diagonal(dx, np.inf)
    np.fill_diagonal(dy, np.inf)
    nx = (dx < eps[:, None]).sum(1)
    ny = (dy < eps[:, None]).sum(1)
    return digamma(k) + digamma(n) - np.mean(digamma(nx + 1) + digamma(ny + 1))


# ----------------------------------------------------------------------------- KSG


@pytest.mark.parametrize("dx,dy,k", [(1, 1, 3), (3, 2, 5), (4, 4, 1)])
def test_ksg_equals_brute_force(dx, dy, k):
    rng = np.random.default_rng(dx * 10 + dy)
    x = rng.standard_normal((400, dx))
    y = x[:, :1] * 0.8 + rng.standard_normal((400, dy))
    ours = mi_ksg(x, y, k=k, standardize=False, jitter=0)
    assert abs(ours - _ksg_brute_force(x, y, k)) < 1e-6
    # with the default standardisation: same as brute force on standardised data
    xs, ys = x / x.std(0, ddof=1), y / y.std(0, ddof=1)
    assert abs(mi_ksg(x, y, k=k, jitter=0) - _ksg_brute_force(xs, ys, k)) < 1e-6


def test_ksg_equals_sklearn_in_1d():
    x, y, _ = correlated_gaussians(1000, 1, rho=0.6, seed=3)
    x, y = x.numpy(), y.numpy()
    ref = mutual_info_regression(x, y.ravel(), n_neighbors=3, random_state=0)[0]
    assert abs(mi_ksg(x, y, k=3) - ref) < 1e-6


@pytest.mark.parametrize("rho,truth", [(0.5, 0.1438), (0.75, 0.4133), (0.9, 0.8304)])
def test_ksg_analytic_1d(rho, truth):
    # the mean over 5 fixed seeds (0..4), not a picked seed: one run has an sd of about 0.02
    assert gaussian_mi(rho) == pytest.approx(truth, abs=1e-4)
    ests = [mi_ksg(*correlated_gaussians(2000, 1, rho=rho, seed=s)[:2], k=3) for s in range(5)]
    assert abs(np.mean(ests) - truth) < 0.02


def test_ksg_invariant_to_cubic_transform():
    x, y, rho = correlated_gaussians(2000, 1, rho=0.8, seed=7)
    plain = mi_ksg(x, y)
    cubed = mi_ksg(x, y**3)
    assert abs(plain - cubed) < 0.05
    assert abs(cubed - gaussian_mi(rho)) < 0.08


def test_ksg_multivariate_and_torch():
    x, y, rho = correlated_gaussians(1500, 3, rho=0.6, seed=1)
    est = mi_ksg(x, y)  # tensors in, float out (KSG runs on the CPU)
    assert isinstance(est, float)
    assert abs(est - gaussian_mi(rho, 3)) < 0.1
    indep = mi_ksg(x, torch.randn(1500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert abs(indep) < 0.05


def test_ksg_jitter_breaks_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, 500).astype(float)  # heavy ties
    y = x + rng.integers(0, 2, 500)
    assert np.isfinite(mi_ksg(x, y))
    assert mi_ksg(x, y, seed=1) == pytest.approx(mi_ksg(x, y, seed=1))  # seeded


# ----------------------------------------------------------------------------- plug-in


def test_binned_equals_sklearn_on_discrete():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 5, 3000)
    b = (a + rng.integers(0, 3, 3000)) % 6
    assert abs(mi_binned(a, b) - mutual_info_score(a, b)) < 1e-12
    labels = np.array(["cat", "dog", "eel"])[a % 3]
    assert abs(mi_binned(labels, b) - mutual_info_score(labels, b)) < 1e-12


def test_binned_miller_madow_and_bins():
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 6, 400), rng.integers(0, 6, 400)  # independent: true MI 0
    plain, mm = mi_binned(a, b), mi_binned(a, b, miller_madow=True)
    mx, my, mxy = 6, 6, len(set(zip(a, b)))
    assert mm == pytest.approx(plain + (mx + my - mxy - 1) / 800, abs=1e-12)
    assert abs(mm) < plain  # the correction removes most of the positive bias
    x, y, rho = correlated_gaussians(20000, 1, rho=0.9, seed=0)
    assert abs(mi_binned(x, y, bins=30) - gaussian_mi(rho)) < 0.1


# ----------------------------------------------------------------------------- bounds


@pytest.fixture(scope="module")
def critic_scores():
    """The true critic on 2000 batches of 64 from 20-D correlated Gaussians, at I = 2 and 10."""
    out = {}
    for mi in (2, 10):
        x, y, rho = correlated_gaussians(64, 20, mi=mi, seed=mi, batch=(2000,))
        out[mi] = gaussian_critic(x, y, rho)
    return out


def test_bounds_with_true_critic(critic_scores):
    # averages over 2000 batches; the standard errors are <= 0.01 (NWJ at I=2 about 0.006)
    S2, S10 = critic_scores[2], critic_scores[10]
    assert infonce(S2).mean().item() == pytest.approx(1.82, abs=0.03)
    assert nwj(S2 + 1).mean().item() == pytest.approx(2.02, abs=0.04)  # NWJ's optimum is 1 + pmi
    assert dv(S2).mean().item() == pytest.approx(2.02, abs=0.04)
    assert infonce(S10).mean().item() == pytest.approx(4.12, abs=0.03)
    assert dv(S10).mean().item() == pytest.approx(11.2, abs=0.3)
    # ordering at I = 10: InfoNCE saturates, NWJ spreads
    assert nwj(S10 + 1).std().item() > 10 * nwj(S2 + 1).std().item()


def test_infonce_never_above_log_n(critic_scores):
    for S in critic_scores.values():
        assert (infonce(S) <= math.log(64) + 1e-12).all()
    huge = torch.diag(torch.full((16,), 1e4, dtype=torch.float64))
    assert infonce(huge).item() == pytest.approx(math.log(16))


def test_bound_formulas_by_hand():
    rng = np.random.default_rng(4)
    S = rng.standard_normal((5, 5))
    off = S[~np.eye(5, dtype=bool)]
    lse = np.log(np.exp(S).sum(1))
    assert infonce(S) == pytest.approx(np.mean(np.diag(S) - lse) + np.log(5), abs=1e-12)
    assert nwj(S) == pytest.approx(np.diag(S).mean() - np.exp(-1) * np.exp(off).mean(), abs=1e-12)
    assert dv(S) == pytest.approx(np.diag(S).mean() - np.log(np.exp(off).mean()), abs=1e-12)
    sp = lambda v: np.log1p(np.exp(v))  # noqa: E731
    assert js(S) == pytest.approx(-sp(-np.diag(S)).mean() - sp(off).mean(), abs=1e-12)
    assert smile(S, 0.5) == pytest.approx(np.diag(S).mean() - np.log(np.exp(np.clip(off, -0.5, 0.5)).mean()),
                                          abs=1e-12)
    value, ema = mine(S)
    assert value == pytest.approx(dv(S), abs=1e-12) and ema == pytest.approx(np.exp(off).mean())


def test_bounds_are_differentiable():
    S = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    for f in (infonce, nwj, dv, js, lambda s: smile(s, 1.0), lambda s: mine(s, ema=torch.tensor(1.0))[0]):
        val = f(S)
        assert isinstance(val, torch.Tensor) and val.ndim == 0
        (g,) = torch.autograd.grad(val, S)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    # DV's gradient equals MINE's when the moving average equals the batch mean
    off = S.detach()[~torch.eye(8, dtype=torch.bool)].exp().mean()
    (g_dv,) = torch.autograd.grad(dv(S), S)
    (g_mine,) = torch.autograd.grad(mine(S, ema=off, momentum=0.5)[0], S)
    assert torch.allclose(g_dv, g_mine)


def test_bounds_bad_inputs():
    with pytest.raises(ValueError, match="S must be a square"):
        infonce(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="S must be a square"):
        nwj(torch.zeros(3))
    with pytest.raises(ValueError, match="N >= 2"):
        dv(torch.zeros(1, 1))
    with pytest.raises(ValueError, match="S contains NaN"):
        js(torch.tensor([[0.0, float("nan")], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="tau"):
        smile(torch.zeros(3, 3), tau=-1)


# ----------------------------------------------------------------------------- trained critics


@pytest.fixture
def one_thread():
    """Tiny MLPs train fastest (and least sensitive to a busy machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_estimate_mi_trained_critic(one_thread):
    x, y, rho = correlated_gaussians(2000, 2, mi=1.0, seed=5)
    res = estimate_mi(x, y, "infonce", max_steps=300, eval_every=50, hidden=64, return_details=True)
    assert 0.75 < res["estimate"] <= math.log(128) and len(res["history"]) >= 2
    smile_est = estimate_mi(x, y, "smile", critic="concat", max_steps=200, batch_size=64,
                            eval_every=50, hidden=32, lr=2e-3)
    assert 0.8 < smile_est < 1.2
    assert estimate_mi(x, y, "ksg") == pytest.approx(mi_ksg(x, y))
    with pytest.raises(ValueError, match="estimator"):
        estimate_mi(x, y, "mmd")


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal(50), rng.standard_normal(50)
    with pytest.raises(ValueError, match="same number of samples"):
        mi_ksg(x, y[:40])
    with pytest.raises(ValueError, match="k must be < n"):
        mi_ksg(x[:3], y[:3], k=3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        mi_ksg(x, y, k=0)
    with pytest.raises(ValueError, match="X contains NaN"):
        mi_ksg(np.r_[np.nan, x[1:]], y)
    with pytest.raises(ValueError, match="Y contains NaN or inf"):
        mi_ksg(x, np.r_[np.inf, y[1:]])
    with pytest.raises(ValueError, match="X must be 1-D"):
        mi_ksg(x.reshape(5, 5, 2), y)
    with pytest.raises(ValueError, match="same number of samples"):
        mi_binned(x, y[:10], bins=5)
    with pytest.raises(ValueError, match="y contains NaN"):
        mi_binned(x, np.r_[np.nan, y[1:]], bins=5)
    with pytest.raises(ValueError, match="x must be"):
        mi_binned(np.zeros((2, 2, 2)), y[:2])
    with pytest.raises(ValueError, match="same number of samples"):
        estimate_mi(x, y[:10])


def test_constant_input_is_nan_with_warning():
    x = np.random.default_rng(7).standard_normal(100)
    with pytest.warns(DegenerateInputWarning, match="constant"):
        assert np.isnan(mi_ksg(x, np.full(100, 2.0)))
    with pytest.warns(DegenerateInputWarning, match="constant"):
        assert np.isnan(mi_binned(np.zeros(100, dtype=int), (x > 0).astype(int)))
    with pytest.warns(DegenerateInputWarning, match="constant"):
        assert np.isnan(estimate_mi(np.ones((100, 2)), x))
