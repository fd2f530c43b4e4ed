"""Null bands and intervals for similarity measures: permutation tests and the sample bootstrap.

A similarity between two representations of the same n samples (RSA, CKA, MI) is only worth
reading against what it would be if the pairing of samples were broken (the permutation null:
shuffle the samples of one side) and with its sampling spread (the bootstrap: resample the samples
with replacement, both sides together). Both are generic here (:func:`permutation_test`,
:func:`bootstrap_ci`: any ``stat(X, Y) -> float``) and fast for the two measures the redundancy
analysis uses (:func:`similarity_test`: the Gram matrices or RDMs are computed once and permuted
or resampled by indexing, batched).

- Permutation null (the Mantel test for RSA): ``null`` holds the statistic for ``n_perm`` random
  permutations of Y's samples; the band is its central ``level`` quantile interval and the p-value
  is ``(1 + #{null >= observed}) / (1 + n_perm)`` (one-sided, "greater": is the pairing *more*
  similar than chance?), never 0.
- Bootstrap: the percentile interval of the statistic over ``n_boot`` resamples of the samples.
  For RSA a pair of copies of the same sample has no dissimilarity to compare, so those entries of
  the resampled RDMs are dropped (as rsatoolbox's pattern bootstrap does); for CKA the resampled
  Gram matrices are re-centred.

Everything is float64 and seeded (``numpy.random.default_rng(seed)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ._checks import (
    as_matrix,
    check_choice,
    check_int,
    check_same_n,
    degenerate,
    is_constant,
)
from .cka import _center_gram
from .rsa import rdm

SIMILARITY_MEASURES = ("cka", "rsa")


@dataclass
class Resampled:
    """A statistic with its permutation null band, p-value and bootstrap interval.

    ``value``: the observed statistic. ``null_lo``, ``null_hi``: the central ``level`` interval of
    the permutation null; ``p_value``: one-sided (observed >= null). ``ci_lo``, ``ci_hi``: the
    bootstrap percentile interval. Each is NaN when not computed (``n_perm`` / ``n_boot`` = 0).
    ``null`` and ``boot``: the raw resampled statistics.
    """

    value: float
    null_lo: float = float("nan")
    null_hi: float = float("nan")
    p_value: float = float("nan")
    ci_lo: float = float("nan")
    ci_hi: float = float("nan")
    null: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    boot: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)

    def as_dict(self) -> dict:
        """The scalar fields (for a table row)."""
        return {k: getattr(self, k) for k in ("value", "null_lo", "null_hi", "p_value", "ci_lo", "ci_hi")}


def _check_level(level) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be a number in (0, 1), e.g. 0.95, got {level!r}")
    return float(level)


def _band(values: np.ndarray, level: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(finite, [a, 1.0 - a])
    return float(lo), float(hi)


def _p_greater(observed: float, null: np.ndarray) -> float:
    finite = null[np.isfinite(null)]
    if not np.isfinite(observed) or finite.size == 0:
        return float("nan")
    return float((1 + np.sum(finite >= observed)) / (1 + finite.size))


def _finish(value: float, null: np.ndarray, boot: np.ndarray, level: float) -> Resampled:
    out = Resampled(float(value), null=null, boot=boot)
    if null.size:
        out.null_lo, out.null_hi = _band(null, level)
        out.p_value = _p_greater(out.value, null)
    if boot.size:
        out.ci_lo, out.ci_hi = _band(boot, level)
    return out


def _pair(X, Y, min_n: int = 4):
    Xt = as_matrix(X, "X", min_n=min_n, min_reason=f"resampling needs at least {min_n} samples")
    Yt = as_matrix(Y, "Y", min_n=min_n, min_reason=f"resampling needs at least {min_n} samples")
    check_same_n(Xt, Yt)
    return Xt, Yt.to(Xt.device)


def permutation_test(stat: Callable, X, Y, n_perm: int = 200, seed: int = 0, level: float = 0.95) -> Resampled:
    """``stat(X, Y)`` against ``n_perm`` shuffles of Y's samples (rows). Any statistic, slow path."""
    n_perm = check_int(n_perm, "n_perm", low=1)
    level = _check_level(level)
    Xt, Yt = _pair(X, Y)
    rng = np.random.default_rng(seed)
    value = float(stat(Xt, Yt))
    null = np.array([float(stat(Xt, Yt[torch.as_tensor(rng.permutation(Xt.shape[0]))])) for _ in range(n_perm)])
    return _finish(value, null, np.empty(0), level)


def bootstrap_ci(stat: Callable, X, Y, n_boot: int = 200, seed: int = 0, level: float = 0.95) -> Resampled:
    """The percentile interval of ``stat`` over ``n_boot`` resamples of the samples (rows of both)."""
    n_boot = check_int(n_boot, "n_boot", low=1)
    level = _check_level(level)
    Xt, Yt = _pair(X, Y)
    rng = np.random.default_rng(seed)
    n = Xt.shape[0]
    value = float(stat(Xt, Yt))
    boot = []
    for _ in range(n_boot):
        idx = torch.as_tensor(rng.integers(0, n, n))
        boot.append(float(stat(Xt[idx], Yt[idx])))
    return _finish(value, np.empty(0), np.array(boot), level)


# ---------------------------------------------------------------- the fast paths (Gram / RDM indexing)

def _cka_from_centered(Kc: torch.Tensor, Lc: torch.Tensor) -> torch.Tensor:
    return (Kc * Lc).sum((-2, -1)) / torch.sqrt((Kc * Kc).sum((-2, -1)) * (Lc * Lc).sum((-2, -1)))


def _pearson_rows(a: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the vector a [m] with each row of B [P, m]."""
    a = a - a.mean()
    B = B - B.mean(-1, keepdim=True)
    return (B @ a) / (a.norm() * B.norm(dim=-1))


def _cka_boot(K: torch.Tensor, L: torch.Tensor, boots, debiased: bool) -> list:
    """CKA of each resample from the Gram matrices, re-centred per resample (duplicates change the centring)."""
    out = []
    for idx in boots:
        Kb = _center_gram(K[idx][:, idx], unbiased=debiased)
        Lb = _center_gram(L[idx][:, idx], unbiased=debiased)
        out.append(_cka_from_centered(Kb, Lb))
    return out


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(total, start + size)


def similarity_test(X, Y, measure: str = "cka", n_perm: int = 200, n_boot: int = 0, seed: int = 0,
                    level: float = 0.95, debiased: bool = False, chunk: int = 64) -> Resampled:
    """A similarity between X ``[n, d_x]`` and Y ``[n, d_y]`` with its permutation null and bootstrap.

    ``measure``: ``"cka"`` (linear CKA, ``debiased`` as :func:`~workbench.probes.cka`) or ``"rsa"``
    (cosine RDMs compared by the Pearson correlation of their upper triangles, MixPHM's RSA). The
    Gram matrices / RDMs are computed once; permutations index them (batched by ``chunk``), so
    200 permutations of 256 samples cost about as much as a few dozen plain evaluations.
    A constant representation gives NaN everywhere, with a
    :class:`~workbench.probes.DegenerateInputWarning`.
    """
    check_choice(measure, "measure", SIMILARITY_MEASURES)
    n_perm = check_int(n_perm, "n_perm", low=0)
    n_boot = check_int(n_boot, "n_boot", low=0)
    chunk = check_int(chunk, "chunk", low=1)
    level = _check_level(level)
    Xt, Yt = _pair(X, Y)
    n = Xt.shape[0]
    if is_constant(Xt) or is_constant(Yt):
        degenerate(f"similarity_test: X or Y is constant over samples; {measure} is NaN")
        return Resampled(float("nan"))
    rng = np.random.default_rng(seed)
    perms = [torch.as_tensor(rng.permutation(n)) for _ in range(n_perm)]
    boots = [torch.as_tensor(rng.integers(0, n, n)) for _ in range(n_boot)]

    if measure == "cka" and not debiased and max(Xt.shape[1], Yt.shape[1]) < n:
        # Feature form (as cka's): ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F). A permutation of Y's
        # rows leaves its column means and ||Yc^T Yc|| unchanged: only Xc^T Yc[p] is recomputed.
        Xc, Yc = Xt - Xt.mean(0), Yt - Yt.mean(0)
        norm = torch.sqrt((Xc.T @ Xc).square().sum() * (Yc.T @ Yc).square().sum())
        value = float((Xc.T @ Yc).square().sum() / norm)
        null = []
        for a, b in _chunks(n_perm, chunk):
            P = torch.stack(perms[a:b])
            null.append(torch.matmul(Xc.T, Yc[P]).square().sum((-2, -1)) / norm)
        boot = _cka_boot(Xt @ Xt.T, Yt @ Yt.T, boots, debiased)
    elif measure == "cka":
        Kc = _center_gram(Xt @ Xt.T, unbiased=debiased)
        Lc = _center_gram(Yt @ Yt.T, unbiased=debiased)
        value = float(_cka_from_centered(Kc, Lc))
        null = []
        # Centring commutes with a permutation: centre(L)[p][:, p] = centre(L[p][:, p]).
        for a, b in _chunks(n_perm, chunk):
            P = torch.stack(perms[a:b])
            Lp = Lc[P[:, :, None], P[:, None, :]]
            null.append(_cka_from_centered(Kc.expand_as(Lp), Lp))
        boot = _cka_boot(Xt @ Xt.T, Yt @ Yt.T, boots, debiased)
    else:
        R1, R2 = rdm(Xt, "cosine"), rdm(Yt, "cosine")
        if not (bool(torch.isfinite(R1).all()) and bool(torch.isfinite(R2).all())):
            return Resampled(float("nan"))  # rdm already warned (a zero pattern)
        iu, ju = torch.triu_indices(n, n, offset=1, device=Xt.device)
        a_vec = R1[iu, ju]
        value = float(_pearson_rows(a_vec, R2[iu, ju][None])[0])
        null = []
        for a, b in _chunks(n_perm, chunk):  # the Mantel test: permute one RDM's rows and columns together
            P = torch.stack(perms[a:b])
            null.append(_pearson_rows(a_vec, R2[P[:, iu], P[:, ju]]))
        boot = []
        for a, b in _chunks(n_boot, chunk):
            B = torch.stack(boots[a:b])
            bi, bj = B[:, iu], B[:, ju]
            # two copies of one sample have no dissimilarity to compare: weight 0 (rsatoolbox drops them)
            w = (bi != bj).to(R1.dtype)
            A, C = R1[bi, bj], R2[bi, bj]
            m = w.sum(-1, keepdim=True)
            A = (A - (A * w).sum(-1, keepdim=True) / m) * w
            C = (C - (C * w).sum(-1, keepdim=True) / m) * w
            boot.append((A * C).sum(-1) / (A.norm(dim=-1) * C.norm(dim=-1)))

    def arr(parts):
        if not parts:
            return np.empty(0)
        return torch.cat([p.reshape(-1) for p in parts]).detach().cpu().numpy().astype(np.float64)

    return _finish(value, arr(null), arr(boot), level)
