"""Representational similarity analysis: RDMs and their comparison.

Kriegeskorte et al. (2008); the definitions follow rsatoolbox 0.3 (``rsatoolbox.rdm.calc_rdm``
and ``rsatoolbox.rdm.compare``), which gives the same numbers to 1e-10 on the same inputs.

An RDM here is the square ``[c, c]`` matrix of dissimilarities between c conditions, zero on the
diagonal; comparisons use its upper triangle (row-major, as ``scipy.spatial.distance.squareform``
and rsatoolbox). Inputs are torch tensors or numpy arrays; computation is float64 on the
input's device; the answer has the input's kind (tensor or numpy array / float).
"""

from __future__ import annotations

import numpy as np
import scipy.stats
import torch

from ._checks import (
    DEFAULT_DTYPE,
    array_out,
    as_matrix,
    check_choice,
    check_finite,
    degenerate,
    is_torch,
    scalar_out,
    to_tensor,
)

RDM_METHODS = ("euclidean", "correlation", "cosine", "crossnobis")
COMPARE_METHODS = ("spearman", "pearson", "kendall", "tau-b", "rho-a", "cosine")
_ALIASES = {"corr": "pearson", "tau-a": "kendall"}
# rank-based work on CPU tensors runs in numpy (its sort is faster than torch's there, and it
# avoids torch's thread pool on a busy machine); the tests switch it off to cover the torch path
_NUMPY_ON_CPU = True


# ----------------------------------------------------------------------------- RDMs


def _labels(values, name: str, n: int) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D sequence of {n} labels (one per row of X), got shape {arr.shape}")
    return arr


def _sum_by(X: torch.Tensor, inverse: np.ndarray, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums ``[n_groups, d]`` and row counts ``[n_groups]`` of X per group label."""
    idx = torch.as_tensor(inverse, device=X.device, dtype=torch.long)
    sums = torch.zeros(n_groups, X.shape[1], dtype=X.dtype, device=X.device).index_add_(0, idx, X)
    counts = torch.as_tensor(np.bincount(inverse, minlength=n_groups), dtype=X.dtype, device=X.device)
    return sums, counts


def _average_by(X: torch.Tensor, inverse: np.ndarray, n_groups: int) -> torch.Tensor:
    sums, counts = _sum_by(X, inverse, n_groups)
    return sums / counts[:, None]


def _zero_diag(R: torch.Tensor) -> torch.Tensor:
    """Set the diagonal of a freshly computed RDM to 0 in place (autograd-safe on a non-leaf)."""
    R.diagonal().zero_()
    return R


def _unit_rows(P: torch.Tensor, what: str) -> torch.Tensor:
    norms = P.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        degenerate(f"rdm: {int((norms == 0).sum())} pattern(s) have zero {what}; their entries are NaN", stacklevel=4)
    return P / norms


def _crossnobis(X, conditions, runs, noise, n_cond, cond_inv) -> torch.Tensor:
    runs = _labels(runs, "runs", X.shape[0])
    folds, run_inv = np.unique(runs, return_inverse=True)
    if len(folds) < 2:
        raise ValueError("runs must name at least 2 distinct runs/partitions for crossnobis")
    present = np.zeros((len(folds), n_cond), dtype=bool)
    present[run_inv, cond_inv] = True
    if not present.all():
        raise ValueError("runs: every condition must be measured in every run for crossnobis")
    d = X.shape[1]
    if noise is None:
        prec = None
    else:
        prec = to_tensor(noise, "noise", X.dtype).to(X.device)
        check_finite(prec, "noise")
        if prec.shape != (d, d):
            raise ValueError(f"noise must be a [{d}, {d}] precision matrix, got shape {tuple(prec.shape)}")
    # one pass: sums and counts per (run, condition); the training mean of run f is the mean of
    # all rows of the other runs (as rsatoolbox), i.e. (total - run f) / (count - count in f)
    n_runs = len(folds)
    sums, counts = _sum_by(X, run_inv * n_cond + cond_inv, n_runs * n_cond)
    sums, counts = sums.reshape(n_runs, n_cond, d), counts.reshape(n_runs, n_cond, 1)
    all_sums, all_counts = sums.sum(0), counts.sum(0)
    total = torch.zeros(n_cond, n_cond, dtype=X.dtype, device=X.device)
    for f in range(n_runs):
        m_test = sums[f] / counts[f]
        m_train = (all_sums - sums[f]) / (all_counts - counts[f])
        K = m_train @ (m_test.T if prec is None else prec @ m_test.T)
        dk = torch.diagonal(K)
        total = total + dk[None, :] + dk[:, None] - K - K.T
    return total / (len(folds) * d)


def rdm(
    X,
    method: str = "correlation",
    conditions=None,
    runs=None,
    noise=None,
    dtype: torch.dtype = DEFAULT_DTYPE,
):
    """Representational dissimilarity matrix ``[c, c]`` of the patterns in X ``[n, d]``.

    Rows of X sharing a label in ``conditions`` are averaged first (conditions are ordered as
    ``np.unique(conditions)``); with ``conditions=None`` each row is a condition. Methods:

    - ``"euclidean"``: d_ij = ||p_i - p_j||^2 / d (squared, per feature, as rsatoolbox).
    - ``"correlation"``: d_ij = 1 - Pearson(p_i, p_j) across features.
    - ``"cosine"``: d_ij = 1 - p_i.p_j / (||p_i|| ||p_j||).
    - ``"crossnobis"``: cross-validated (squared) Mahalanobis distance / d, leave-one-run-out:
      for each run r, d_ij^(r) = (a_i - a_j)^T Lambda (b_i - b_j) with b the condition means of
      run r and a those of the other runs; averaged over runs. Needs ``conditions`` and
      ``runs`` (a run/partition label per row, >= 2 runs, every condition in every run) and
      takes an optional noise precision ``noise`` ``[d, d]`` (identity when None). Unbiased:
      about 0 on average on pure noise (individual entries can be negative).

    Units: squared units of X per feature (euclidean, crossnobis); unitless otherwise. A
    constant (correlation) or zero (cosine) pattern gives NaN entries and a warning.
    """
    check_choice(method, "method", RDM_METHODS)
    Xt = as_matrix(X, "X", min_n=2, dtype=dtype)
    n = Xt.shape[0]
    if method == "crossnobis" and (conditions is None or runs is None):
        raise ValueError("crossnobis needs conditions= and runs= (run/partition label of each row of X)")
    if method != "crossnobis" and runs is not None:
        raise ValueError("runs is used only by method='crossnobis'")
    if method != "crossnobis" and noise is not None:
        raise ValueError("noise is used only by method='crossnobis'")
    if conditions is None:
        P, n_cond, cond_inv = Xt, n, np.arange(n)
    else:
        _, cond_inv = np.unique(_labels(conditions, "conditions", n), return_inverse=True)
        n_cond = int(cond_inv.max()) + 1
        P = _average_by(Xt, cond_inv, n_cond)
    if n_cond < 2:
        raise ValueError("conditions: at least 2 distinct conditions are needed for an RDM")
    if method == "euclidean":
        sq = (P * P).sum(1)
        R = torch.addmm(sq[:, None] + sq[None, :], P, P.T, alpha=-2.0).clamp_min(0.0) / P.shape[1]
    elif method in ("correlation", "cosine"):
        if method == "correlation":
            U = _unit_rows(P - P.mean(1, keepdim=True), "variance across features")
        else:
            U = _unit_rows(P, "norm")
        R = torch.addmm(torch.ones((), dtype=U.dtype, device=U.device), U, U.T, alpha=-1.0)  # 1 - U U^T
    else:
        R = _crossnobis(Xt, conditions, runs, noise, n_cond, cond_inv)
    R = _zero_diag(R)
    return array_out(R, is_torch(X))


def upper_triangle(R):
    """The strict upper triangle of a square RDM ``[c, c]`` as a vector of c(c-1)/2 entries
    (row-major, the order of ``scipy.spatial.distance.squareform`` and rsatoolbox)."""
    t = to_tensor(R, "R")
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"R must be a square [c, c] RDM, got shape {tuple(t.shape)}")
    i, j = torch.triu_indices(t.shape[0], t.shape[0], 1, device=t.device)
    return array_out(t[i, j], is_torch(R))


# ----------------------------------------------------------------------------- comparisons


def _as_vectors(R, name: str, batched: bool) -> torch.Tensor:
    """RDM(s) as a ``[m, p]`` matrix of upper-triangle vectors.

    Single: a square ``[c, c]`` matrix or a condensed vector ``[p]``. Batched: ``[m, c, c]``
    square matrices or ``[m, p]`` condensed vectors.
    """
    t = to_tensor(R, name)
    square_ndim = 3 if batched else 2
    if t.ndim == square_ndim:
        c = t.shape[-1]
        if t.shape[-2] != c:
            raise ValueError(f"{name} must hold square RDMs, got shape {tuple(t.shape)}")
        i, j = torch.triu_indices(c, c, 1, device=t.device)
        t = t[..., i, j]
    elif t.ndim != square_ndim - 1:
        want = "[m, c, c] or [m, p]" if batched else "[c, c] or a condensed [p] vector"
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    t = t.reshape(-1, t.shape[-1])
    if t.shape[-1] < 2:
        raise ValueError(f"{name} has {t.shape[-1]} dissimilarities; at least 2 (3 conditions) are needed")
    check_finite(t, name)
    return t


def _rank_numpy(v: np.ndarray) -> np.ndarray:
    """Average ranks of each row of a 2-D numpy array (see :func:`rankdata`)."""
    p = v.shape[1]
    order = np.argsort(v, axis=1)
    srt = np.take_along_axis(v, order, 1)
    idx = np.broadcast_to(np.arange(p), srt.shape)
    starts = np.ones(srt.shape, dtype=bool)
    starts[:, 1:] = srt[:, 1:] != srt[:, :-1]
    ranks = np.empty(srt.shape, dtype=np.float64)
    if starts.all():  # no ties: the rank is the position in sorted order
        np.put_along_axis(ranks, order, idx + 1.0, 1)
        return ranks
    ends = np.ones(srt.shape, dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    first = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, idx, p)[:, ::-1], axis=1)[:, ::-1]
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, 1)
    return ranks


def rankdata(V: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Average ranks (1-based, ties share their mean rank, as ``scipy.stats.rankdata``) of
    each row of ``V`` ``[m, p]``, O(m p log p); tied runs get (first + last) / 2 + 1.
    ``backend="auto"`` sorts in numpy for CPU tensors (faster than torch's sort there) and in
    torch on other devices; ``"numpy"`` / ``"torch"`` force one."""
    check_choice(backend, "backend", ("auto", "numpy", "torch"))
    if V.ndim != 2:
        raise ValueError(f"V must be 2-D [m, p], got shape {tuple(V.shape)}")
    if backend == "numpy" or (backend == "auto" and V.device.type == "cpu" and _NUMPY_ON_CPU):
        ranks = _rank_numpy(V.detach().cpu().numpy())
        return torch.from_numpy(ranks).to(dtype=V.dtype, device=V.device)
    p = V.shape[1]
    srt, order = torch.sort(V, dim=1)
    idx = torch.arange(p, device=V.device).expand_as(srt)
    starts = torch.ones_like(srt, dtype=torch.bool)
    starts[:, 1:] = srt[:, 1:] != srt[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.cummax(torch.where(starts, idx, 0), dim=1).values
    last = torch.cummin(torch.where(ends, idx, p).flip(1), dim=1).values.flip(1)
    ranks_sorted = (first + last).to(V.dtype) / 2.0 + 1.0
    return torch.empty_like(ranks_sorted).scatter(1, order, ranks_sorted)


def _rank_compare_cpu(A: torch.Tensor, B: torch.Tensor, method: str) -> torch.Tensor:
    """Spearman / rho-a on the CPU, in numpy (ranks carry no gradient anyway). The mean of
    average ranks is always (p + 1) / 2, so centring is one subtraction."""
    p = A.shape[1]
    ra = _rank_numpy(A.detach().numpy()) - (p + 1) / 2.0
    rb = ra if B is A else _rank_numpy(B.detach().numpy()) - (p + 1) / 2.0
    dots = ra @ rb.T
    if method == "rho-a":
        out = 12.0 * dots / (p**3 - p)
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            out = dots / (np.linalg.norm(ra, axis=1)[:, None] * np.linalg.norm(rb, axis=1)[None, :])
    return torch.from_numpy(out).to(A.dtype)


def _tau_a(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall tau-a = (concordant - discordant) / (p (p - 1) / 2), O(p log p) via scipy's
    merge-sort tau-b and the tie counts: tau_a = tau_b sqrt((P0 - T_a)(P0 - T_b)) / P0."""
    p = a.size
    tot = p * (p - 1) / 2.0

    def ties(v):
        _, cnt = np.unique(v, return_counts=True)
        return float((cnt * (cnt - 1) / 2.0).sum())

    ta, tb = ties(a), ties(b)
    if ta == tot or tb == tot:
        return float("nan")
    tau_b = scipy.stats.kendalltau(a, b, variant="b", method="asymptotic").statistic
    return float(tau_b * np.sqrt((tot - ta) * (tot - tb)) / tot)


def _tau_b(a: np.ndarray, b: np.ndarray) -> float:
    return float(scipy.stats.kendalltau(a, b, variant="b", method="asymptotic").statistic)


def _compare(A: torch.Tensor, B: torch.Tensor, method: str) -> torch.Tensor:
    method = _ALIASES.get(method, method)
    check_choice(method, "method", COMPARE_METHODS + tuple(_ALIASES))
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"the RDMs must have the same size, got {A.shape[1]} and {B.shape[1]} dissimilarities")
    p = A.shape[1]
    const_a = (A == A[:, :1]).all(1)
    const_b = (B == B[:, :1]).all(1)
    if bool(const_a.any() or const_b.any()):
        degenerate("compare_rdms: an RDM is constant; comparisons with it are NaN", stacklevel=4)
    if method in ("kendall", "tau-b"):
        f = _tau_a if method == "kendall" else _tau_b
        a_np, b_np = A.detach().cpu().numpy(), B.detach().cpu().numpy()
        out = torch.tensor(
            [[f(a, b) for b in b_np] for a in a_np], dtype=A.dtype, device=A.device
        ).reshape(A.shape[0], B.shape[0])
    elif method == "cosine":
        out = (A @ B.T) / (A.norm(dim=1)[:, None] * B.norm(dim=1)[None, :])
    elif method in ("spearman", "rho-a") and A.device.type == "cpu" and _NUMPY_ON_CPU:
        out = _rank_compare_cpu(A, B, method)
    else:
        if method in ("spearman", "rho-a"):
            A, B = rankdata(A), rankdata(B)
        A = A - A.mean(1, keepdim=True)
        B = B - B.mean(1, keepdim=True)
        if method == "rho-a":
            out = 12.0 * (A @ B.T) / (p**3 - p)
        else:
            out = (A @ B.T) / (A.norm(dim=1)[:, None] * B.norm(dim=1)[None, :])
    mask = const_a[:, None] | const_b[None, :]
    return out.masked_fill(mask, float("nan"))


def compare_rdms(a, b, method: str = "spearman"):
    """Similarity of two RDMs over their upper triangles (unitless, in [-1, 1]).

    a, b: square ``[c, c]`` RDMs or condensed vectors ``[p]`` with p = c(c-1)/2. Methods
    (rsatoolbox's names in brackets):

    - ``"spearman"``: Pearson correlation of the average ranks ("spearman").
    - ``"pearson"`` (alias ``"corr"``): Pearson correlation ("corr").
    - ``"kendall"`` (alias ``"tau-a"``): Kendall tau-a = (n_c - n_d) / (p(p-1)/2), O(p log p)
      ("tau-a"; note that rsatoolbox's own "kendall" is tau-b, here ``"tau-b"``).
    - ``"rho-a"``: 12 sum r1 r2 / (p^3 - p) on mean-centred ranks ("rho-a").
    - ``"cosine"``: a.b / (||a|| ||b||) ("cosine").

    Returns a float (a 0-d tensor for tensor inputs; kendall runs on the CPU). A constant RDM
    gives NaN and a warning.
    """
    A = _as_vectors(a, "a", batched=False)
    B = _as_vectors(b, "b", batched=False).to(A.device)
    return scalar_out(_compare(A, B, method)[0, 0], is_torch(a, b))


def compare_rdms_batched(A, B=None, method: str = "spearman"):
    """All pairwise comparisons between two stacks of RDMs, the fast path: ``[m, k]``.

    A: ``[m, c, c]`` square RDMs or ``[m, p]`` condensed vectors; B likewise (None: A with
    itself). Spearman, pearson, rho-a and cosine are one rank transform (on the device) plus
    one matrix product; kendall loops over pairs. Same definitions as :func:`compare_rdms`.
    """
    At = _as_vectors(A, "A", batched=True)
    Bt = At if B is None else _as_vectors(B, "B", batched=True).to(At.device)
    return array_out(_compare(At, Bt, method), is_torch(A) or is_torch(B))


__all__ = ["rdm", "upper_triangle", "compare_rdms", "compare_rdms_batched", "rankdata"]
