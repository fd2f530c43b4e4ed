"""RSA: RDMs and comparisons against rsatoolbox 0.3.x and scipy, to 1e-10."""

import numpy as np
import pytest
import scipy.stats
import torch
from scipy.spatial.distance import pdist

from workbench.probes import (
    DegenerateInputWarning,
    compare_rdms,
    compare_rdms_batched,
    rankdata,
    rdm,
    upper_triangle,
)

rsatoolbox = pytest.importorskip("rsatoolbox")
from rsatoolbox.data import Dataset  # noqa: E402
from rsatoolbox.rdm import calc_rdm, compare  # noqa: E402

TOL = 1e-10

# rsatoolbox 0.3.2's _build_rdms casts NaN into an int descriptor (its own, harmless warning)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")


@pytest.fixture(scope="module")
def design():
    """12 conditions x 4 runs of 30 channels, rows shuffled."""
    rng = np.random.default_rng(0)
    n_cond, n_runs, d = 12, 4, 30
    signal = rng.standard_normal((n_cond, d))
    cond = np.repeat(np.arange(n_cond), n_runs)
    runs = np.tile(np.arange(n_runs), n_cond)
    X = signal[cond] + rng.standard_normal((len(cond), d))
    perm = rng.permutation(len(cond))
    return X[perm], cond[perm], runs[perm]


def _ds(X, cond, runs):
    return Dataset(X, obs_descriptors={"cond": cond, "run": runs})


@pytest.mark.parametrize("method", ["euclidean", "correlation"])
def test_rdm_matches_rsatoolbox(design, method):
    X, cond, runs = design
    ref = calc_rdm(_ds(X, cond, runs), method=method, descriptor="cond").get_vectors()[0]
    ours = upper_triangle(rdm(X, method, conditions=cond))
    assert np.abs(ours - ref).max() < TOL
    # one row per condition, no descriptor
    ref1 = calc_rdm(Dataset(X[:15]), method=method).get_vectors()[0]
    assert np.abs(upper_triangle(rdm(X[:15], method)) - ref1).max() < TOL


@pytest.mark.parametrize("with_noise", [False, True])
def test_crossnobis_matches_rsatoolbox(design, with_noise):
    X, cond, runs = design
    noise = None
    if with_noise:
        rng = np.random.default_rng(1)
        noise = np.linalg.inv(np.cov(rng.standard_normal((200, X.shape[1])).T))
    ref = calc_rdm(_ds(X, cond, runs), method="crossnobis", descriptor="cond", cv_descriptor="run",
                   noise=noise).get_vectors()[0]
    ours = upper_triangle(rdm(X, "crossnobis", conditions=cond, runs=runs, noise=noise))
    assert np.abs(ours - ref).max() < TOL


def test_crossnobis_unbiased_on_noise():
    rng = np.random.default_rng(2)
    n_cond, n_runs, d = 30, 5, 200
    cond = np.repeat(np.arange(n_cond), n_runs)
    runs = np.tile(np.arange(n_runs), n_cond)
    X = rng.standard_normal((len(cond), d))  # pure noise: every true distance is 0
    cross = upper_triangle(rdm(X, "crossnobis", conditions=cond, runs=runs))
    euclid = upper_triangle(rdm(X, "euclidean", conditions=cond))
    assert abs(cross.mean()) < 0.01  # about 0 (sd of the mean ~0.002) ...
    assert (cross < 0).any()  # ... so single entries go negative
    assert euclid.mean() == pytest.approx(2 / n_runs, abs=0.02)  # the plain distance is biased upward


def test_rdm_matches_scipy_pdist():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((25, 7))
    assert np.abs(upper_triangle(rdm(X, "euclidean")) - pdist(X, "sqeuclidean") / 7).max() < TOL
    assert np.abs(upper_triangle(rdm(X, "correlation")) - pdist(X, "correlation")).max() < TOL
    assert np.abs(upper_triangle(rdm(X, "cosine")) - pdist(X, "cosine")).max() < TOL
    R = rdm(X, "cosine")
    assert R.shape == (25, 25) and np.allclose(R, R.T) and np.all(np.diag(R) == 0)


def test_rdm_torch_in_torch_out():
    X = torch.randn(10, 4, dtype=torch.float32)
    R = rdm(X, "correlation")
    assert isinstance(R, torch.Tensor) and R.dtype == torch.float64 and R.shape == (10, 10)
    assert np.abs(R.numpy() - rdm(X.numpy(), "correlation")).max() < TOL


# ----------------------------------------------------------------------------- comparisons

PAIRS = [("spearman", "spearman"), ("pearson", "corr"), ("kendall", "tau-a"), ("tau-b", "kendall"),
         ("rho-a", "rho-a"), ("cosine", "cosine")]


@pytest.fixture(scope="module")
def rdm_vectors():
    rng = np.random.default_rng(4)
    a = pdist(rng.standard_normal((15, 6)), "sqeuclidean")
    b = a + 3 * pdist(rng.standard_normal((15, 6)), "sqeuclidean")
    b_tied = np.round(b / 4)  # a categorical-ish model RDM with many ties
    return a, b, b_tied


@pytest.mark.parametrize("numpy_on_cpu", [True, False], ids=["numpy-ranks", "torch-ranks"])
@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_compare_matches_rsatoolbox(rdm_vectors, ours, theirs, numpy_on_cpu, monkeypatch):
    import workbench.probes.rsa as rsa

    monkeypatch.setattr(rsa, "_NUMPY_ON_CPU", numpy_on_cpu)
    a, b, b_tied = rdm_vectors
    for other in (b, b_tied):
        ref = compare(a, other, method=theirs)[0, 0]
        assert abs(compare_rdms(a, other, ours) - ref) < TOL
    # square form in, same answer
    from scipy.spatial.distance import squareform

    assert abs(compare_rdms(squareform(a), squareform(b), ours) - compare(a, b, method=theirs)[0, 0]) < TOL


def test_compare_matches_scipy(rdm_vectors):
    a, b, b_tied = rdm_vectors
    for other in (b, b_tied):
        assert abs(compare_rdms(a, other, "spearman") - scipy.stats.spearmanr(a, other).statistic) < TOL
        assert abs(compare_rdms(a, other, "pearson") - scipy.stats.pearsonr(a, other).statistic) < TOL
        assert abs(compare_rdms(a, other, "tau-b") - scipy.stats.kendalltau(a, other).statistic) < TOL


def test_kendall_tau_a_brute_force():
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 5, 60).astype(float), rng.integers(0, 4, 60).astype(float) + 0.1 * rng.standard_normal(60)
    s = 0.0
    for i in range(60):
        s += (np.sign(a[i] - a[i + 1:]) * np.sign(b[i] - b[i + 1:])).sum()
    assert abs(compare_rdms(a, b, "kendall") - s / (60 * 59 / 2)) < TOL


def test_rankdata_matches_scipy():
    rng = np.random.default_rng(6)
    V = np.round(rng.standard_normal((5, 200)), 1)
    for backend in ("auto", "numpy", "torch"):
        got = rankdata(torch.tensor(V), backend=backend).numpy()
        assert np.array_equal(got, scipy.stats.rankdata(V, axis=1))


def test_batched_equals_pairwise_and_rsatoolbox():
    rng = np.random.default_rng(7)
    A = np.stack([pdist(rng.standard_normal((12, 3))) for _ in range(4)])
    B = np.stack([pdist(rng.standard_normal((12, 3))) for _ in range(3)])
    for ours, theirs in PAIRS:
        M = compare_rdms_batched(A, B, ours)
        assert M.shape == (4, 3)
        assert np.abs(M - compare(A, B, method=theirs)).max() < TOL
    from scipy.spatial.distance import squareform

    A_sq = np.stack([squareform(v) for v in A])
    assert np.abs(compare_rdms_batched(A_sq, None, "spearman") - compare(A, A, method="spearman")).max() < TOL
    Mt = compare_rdms_batched(torch.tensor(A), torch.tensor(B), "spearman")
    assert isinstance(Mt, torch.Tensor)


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise(design):
    X, cond, runs = design
    with pytest.raises(ValueError, match="method"):
        rdm(X, "manhattan")
    with pytest.raises(ValueError, match="X must be 2-D"):
        rdm(X[0], "euclidean")
    bad = X.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="X contains NaN"):
        rdm(bad, "euclidean")
    with pytest.raises(ValueError, match="runs"):
        rdm(X, "crossnobis", conditions=cond)
    with pytest.raises(ValueError, match="runs"):
        rdm(X, "crossnobis", conditions=cond, runs=np.zeros(len(cond)))
    with pytest.raises(ValueError, match="conditions"):
        rdm(X, "euclidean", conditions=cond[:-1])
    with pytest.raises(ValueError, match="noise"):
        rdm(X, "crossnobis", conditions=cond, runs=runs, noise=np.eye(3))
    with pytest.raises(ValueError, match="at least 2"):
        rdm(X[:1], "euclidean")
    a = pdist(X[:10])
    with pytest.raises(ValueError, match="same size"):
        compare_rdms(a, a[:-1])
    with pytest.raises(ValueError, match="b contains NaN"):
        compare_rdms(a, np.full_like(a, np.nan))
    with pytest.raises(ValueError, match="method"):
        compare_rdms(a, a, "dtw")
    with pytest.raises(ValueError, match="a must be"):
        compare_rdms(np.ones((2, 3, 3)), a)


def test_degenerate_inputs_warn_and_nan():
    rng = np.random.default_rng(8)
    X = rng.standard_normal((6, 5))
    X[2] = 4.0  # a constant pattern has no correlation with anything
    with pytest.warns(DegenerateInputWarning, match="zero variance"):
        R = rdm(X, "correlation")
    assert np.isnan(R[2, 0]) and not np.isnan(R[0, 1])
    a = pdist(rng.standard_normal((6, 3)))
    for method in ("spearman", "pearson", "kendall", "rho-a", "cosine"):
        with pytest.warns(DegenerateInputWarning, match="constant"):
            assert np.isnan(compare_rdms(a, np.ones_like(a), method))
