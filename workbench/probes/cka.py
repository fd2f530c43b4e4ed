"""Centred kernel alignment (CKA) and HSIC.

Kornblith et al. (2019), "Similarity of neural network representations revisited", and
Nguyen et al. (2021) for the minibatch estimator. CKA is unitless and lies in [0, 1] for the
biased estimator (the debiased one can dip slightly below 0 on independent data).

All functions take torch tensors or numpy arrays ``[n_samples, n_features]``, compute in
float64 on the input's device, and are differentiable when given tensors. They return a 0-d
tensor (or a tensor matrix) when given tensors, a float (or numpy array) when given arrays.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._checks import (
    DEFAULT_DTYPE,
    array_out,
    as_matrix,
    check_choice,
    check_positive,
    check_same_n,
    degenerate,
    is_constant,
    is_torch,
    nan_like,
    scalar_out,
)

KERNELS = ("linear", "rbf")


def _zero_diag(K: torch.Tensor) -> torch.Tensor:
    """K with its diagonal set to 0 (out of place, differentiable; never ``K - diag`` as a vector)."""
    n = K.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=K.device)
    return K.masked_fill(eye, 0.0)


def _median(values: torch.Tensor) -> torch.Tensor:
    """numpy's median (mean of the two middle values for an even count) over all entries."""
    flat = values.reshape(-1)
    m = flat.numel()
    srt = torch.sort(flat).values
    if m % 2:
        return srt[m // 2]
    return 0.5 * (srt[m // 2 - 1] + srt[m // 2])


def gram_linear(X):
    """Linear-kernel Gram matrix K = X X^T, ``[n, n]`` (units: those of X squared)."""
    t = as_matrix(X, "X")
    return array_out(t @ t.T, is_torch(X))


def _sq_distances(X: torch.Tensor) -> torch.Tensor:
    sq_norms = (X * X).sum(1)
    D = sq_norms[:, None] + sq_norms[None, :] - 2.0 * (X @ X.T)
    return _zero_diag(D.clamp_min(0.0))


def _gram_rbf(X: torch.Tensor, threshold: float) -> torch.Tensor:
    D = _sq_distances(X)
    sigma2 = threshold**2 * _median(D)
    return torch.exp(-D / (2.0 * sigma2))


def gram_rbf(X, threshold: float = 1.0):
    """RBF Gram matrix K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2)), ``[n, n]``.

    sigma^2 = threshold^2 * median of the squared distances, the median taken over the full
    n x n matrix including its zero diagonal (as Kornblith et al.'s reference code).
    """
    threshold = check_positive(threshold, "threshold")
    t = as_matrix(X, "X", min_n=2)
    return array_out(_gram_rbf(t, threshold), is_torch(X))


def center_gram(K, unbiased: bool = False):
    """Centre a symmetric Gram matrix ``[n, n]`` (tensor in, tensor out; array in, array out).

    Biased: H K H with H = I - 11^T/n. Unbiased (U-centring, Kornblith et al.): zero the
    diagonal, subtract row/column sums / (n - 2), add the total / ((n - 1)(n - 2)), zero the
    diagonal again; then <U(K), U(L)> = n (n - 3) HSIC_1(K, L).
    """
    Kt = as_matrix(K, "K", min_n=4 if unbiased else 1, min_reason="U-centring needs n >= 4")
    if Kt.shape[0] != Kt.shape[1]:
        raise ValueError(f"K must be a square Gram matrix, got shape {tuple(Kt.shape)}")
    return array_out(_center_gram(Kt, unbiased), is_torch(K))


def _center_gram(K: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    n = K.shape[-1]
    if unbiased:
        K = _zero_diag(K)
        means = K.sum(0) / (n - 2)
        means = means - means.sum() / (2 * (n - 1))
        return _zero_diag(K - means[:, None] - means[None, :])
    means = K.mean(0)
    means = means - means.mean() / 2
    return K - means[:, None] - means[None, :]


def _hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012) HSIC_1 with zeroed diagonals, batched over leading dims."""
    n = K.shape[-1]
    Kt, Lt = _zero_diag(K), _zero_diag(L)
    trace = (Kt * Lt.transpose(-1, -2)).sum((-1, -2))
    sums = Kt.sum((-1, -2)) * Lt.sum((-1, -2)) / ((n - 1) * (n - 2))
    cross = (Kt.sum(-1) * Lt.sum(-2)).sum(-1) * 2.0 / (n - 2)
    return (trace + sums - cross) / (n * (n - 3))


def hsic(K, L, unbiased: bool = False):
    """Hilbert-Schmidt independence criterion between two Gram matrices ``[n, n]``.

    Biased (Gretton et al. 2005): HSIC_0 = tr(K H L H) / (n - 1)^2.
    Unbiased (Song et al. 2012), needs n >= 4, with K~, L~ the Grams with zeroed diagonals:
    HSIC_1 = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1)/((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3)).
    Units: those of K times those of L.
    """
    Kt = as_matrix(K, "K", min_n=4 if unbiased else 2, min_reason="unbiased HSIC needs n >= 4" if unbiased else "")
    Lt = as_matrix(L, "L", min_n=4 if unbiased else 2, min_reason="unbiased HSIC needs n >= 4" if unbiased else "")
    for t, name in ((Kt, "K"), (Lt, "L")):
        if t.shape[0] != t.shape[1]:
            raise ValueError(f"{name} must be a square Gram matrix, got shape {tuple(t.shape)}")
    check_same_n(Kt, Lt, "K", "L")
    n = Kt.shape[0]
    if unbiased:
        value = _hsic_unbiased(Kt, Lt)
    else:
        value = (_center_gram(Kt) * Lt).sum() / (n - 1) ** 2
    return scalar_out(value, is_torch(K, L))


def _feature_cka(X: torch.Tensor, Y: torch.Tensor, debiased: bool) -> torch.Tensor:
    """Linear CKA in feature space, O(n d^2); Kornblith's debiased helper when asked."""
    Xc = X - X.mean(0, keepdim=True)
    Yc = Y - Y.mean(0, keepdim=True)
    xy = (Yc.T @ Xc).square().sum()
    xx = (Xc.T @ Xc).square().sum()
    yy = (Yc.T @ Yc).square().sum()
    if debiased:
        n = X.shape[0]
        rx = (Xc * Xc).sum(1)
        ry = (Yc * Yc).sum(1)
        sx, sy = rx.sum(), ry.sum()

        def helper(dot, ra, rb, sa, sb):
            return dot - n / (n - 2.0) * (ra @ rb) + sa * sb / ((n - 1) * (n - 2))

        xy = helper(xy, rx, ry, sx, sy)
        xx = helper(xx, rx, rx, sx, sx)
        yy = helper(yy, ry, ry, sy, sy)
    return xy / torch.sqrt(xx * yy)


def _gram_cka(K: torch.Tensor, L: torch.Tensor, debiased: bool) -> torch.Tensor:
    Kc = _center_gram(K, unbiased=debiased)
    Lc = _center_gram(L, unbiased=debiased)
    return (Kc * Lc).sum() / torch.sqrt((Kc * Kc).sum() * (Lc * Lc).sum())


def _check_pair(X, Y, debiased: bool, dtype):
    min_n = 4 if debiased else 2
    reason = "debiased HSIC needs n >= 4" if debiased else "CKA needs n >= 2"
    Xt = as_matrix(X, "X", min_n=min_n, min_reason=reason, dtype=dtype)
    Yt = as_matrix(Y, "Y", min_n=min_n, min_reason=reason, dtype=dtype)
    check_same_n(Xt, Yt)
    if Xt.device != Yt.device:
        raise ValueError(f"X and Y must be on the same device, got {Xt.device} and {Yt.device}")
    return Xt, Yt


def cka(
    X,
    Y,
    kernel: str = "linear",
    threshold: float = 1.0,
    debiased: bool = False,
    form: str = "auto",
    dtype: torch.dtype = DEFAULT_DTYPE,
):
    """Centred kernel alignment between two representations of the same n samples.

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), unitless, in [0, 1] (biased).

    - ``kernel="linear"``: K = X X^T. Feature form (default when max(d_x, d_y) < n, O(n d^2)):
      ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc. Gram form
      (``form="gram"``, O(n^2 d)) gives the same value to ~1e-12.
    - ``kernel="rbf"``: K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2)), sigma^2 = threshold^2 *
      median squared distance (full matrix, zero diagonal included, as Kornblith).
    - ``debiased=True``: unbiased HSIC_1 (Song et al. 2012) in the numerator *and* both
      denominator terms (Kornblith's debiased CKA; needs n >= 4).

    X: ``[n, d_x]``, Y: ``[n, d_y]``. Returns a 0-d tensor (differentiable) for tensor
    inputs, else a float; NaN with a :class:`DegenerateInputWarning` for a constant input.
    """
    check_choice(kernel, "kernel", KERNELS)
    check_choice(form, "form", ("auto", "gram", "feature"))
    threshold = check_positive(threshold, "threshold")
    Xt, Yt = _check_pair(X, Y, debiased, dtype)
    as_tensor = is_torch(X, Y)
    if is_constant(Xt) or is_constant(Yt):
        degenerate("cka: X or Y is constant over samples (zero centred Gram)")
        return scalar_out(nan_like(Xt), as_tensor)
    n = Xt.shape[0]
    if kernel == "linear":
        use_feature = form == "feature" or (form == "auto" and max(Xt.shape[1], Yt.shape[1]) < n)
        if use_feature:
            value = _feature_cka(Xt, Yt, debiased)
        else:
            value = _gram_cka(Xt @ Xt.T, Yt @ Yt.T, debiased)
    else:
        if form == "feature":
            raise ValueError("form='feature' exists only for kernel='linear'")
        value = _gram_cka(_gram_rbf(Xt, threshold), _gram_rbf(Yt, threshold), debiased)
    if not bool(torch.isfinite(value)):
        degenerate("cka: a self-similarity term is zero or negative")
        return scalar_out(nan_like(Xt), as_tensor)
    return scalar_out(value, as_tensor)


def _layer_list(acts, name: str, min_n: int, dtype, finite: bool = True) -> list[torch.Tensor]:
    if isinstance(acts, torch.Tensor) or not isinstance(acts, Sequence) or len(acts) == 0:
        raise ValueError(f"{name} must be a non-empty list of [n, d] activations, one per layer")
    reason = "unbiased HSIC needs n >= 4" if min_n >= 4 else ""
    out = [
        as_matrix(a, f"{name}[{i}]", min_n=min_n, dtype=dtype, min_reason=reason, finite=finite)
        for i, a in enumerate(acts)
    ]
    for i, t in enumerate(out):
        check_same_n(out[0], t, f"{name}[0]", f"{name}[{i}]")
    return out


def cka_matrix(
    acts_a,
    acts_b=None,
    kernel: str = "linear",
    threshold: float = 1.0,
    debiased: bool = False,
    dtype: torch.dtype = DEFAULT_DTYPE,
):
    """CKA between every layer of ``acts_a`` and every layer of ``acts_b`` (a layer heatmap).

    acts_a: list of La tensors ``[n, d_l]``; acts_b: list of Lb tensors ``[n, d_m]`` over the
    same n samples (None: ``acts_a`` against itself). Returns ``[La, Lb]`` with entry
    (l, m) = ``cka(acts_a[l], acts_b[m], kernel, threshold, debiased)``. Computes each layer's
    centred statistic once: the linear biased case in feature space, the others from centred
    Grams (memory O(L n^2): use :class:`MinibatchCKA` for many samples).
    """
    check_choice(kernel, "kernel", KERNELS)
    threshold = check_positive(threshold, "threshold")
    min_n = 4 if debiased else 2
    A = _layer_list(acts_a, "acts_a", min_n, dtype)
    B = A if acts_b is None else _layer_list(acts_b, "acts_b", min_n, dtype)
    check_same_n(A[0], B[0], "acts_a", "acts_b")
    as_tensor = is_torch(*acts_a) or (acts_b is not None and is_torch(*acts_b))
    n = A[0].shape[0]
    bad = [t for t in A + B if is_constant(t)]
    if bad:
        degenerate("cka_matrix: some layers are constant over samples; their rows/columns are NaN")

    def norm_stat(t: torch.Tensor) -> tuple[str, torch.Tensor]:
        # ("feature", Xc / sqrt||Xc^T Xc||_F) or ("gram", Kc / ||Kc||_F): CKA is their inner product
        if kernel == "linear" and not debiased and t.shape[1] < n:
            tc = t - t.mean(0, keepdim=True)
            return "feature", tc / (tc.T @ tc).norm().sqrt()
        K = t @ t.T if kernel == "linear" else _gram_rbf(t, threshold)
        Kc = _center_gram(K, unbiased=debiased)
        return "gram", Kc / Kc.norm()

    def as_gram(stat: tuple[str, torch.Tensor]) -> torch.Tensor:
        form, m = stat
        return m @ m.T if form == "feature" else m  # ||Xc Xc^T||_F = ||Xc^T Xc||_F

    sa = [None if is_constant(t) else norm_stat(t) for t in A]
    sb = sa if acts_b is None else [None if is_constant(t) else norm_stat(t) for t in B]
    out = torch.full((len(A), len(B)), float("nan"), dtype=A[0].dtype, device=A[0].device)
    for i, a in enumerate(sa):
        for j, b in enumerate(sb):
            if a is None or b is None:
                continue
            if a[0] == b[0] == "feature":
                out[i, j] = (b[1].T @ a[1]).square().sum()
            else:
                out[i, j] = (as_gram(a) * as_gram(b)).sum()
    return array_out(out, as_tensor)


class MinibatchCKA:
    """Minibatch linear CKA (Nguyen et al. 2021) for many layer pairs at once.

    For batches i = 1..m with linear Grams K_i (layer l of A) and L_i (layer m of B):

        CKA_mb(l, m) = sum_i HSIC_1(K_i, L_i) / sqrt(sum_i HSIC_1(K_i, K_i) sum_i HSIC_1(L_i, L_i))

    with the unbiased HSIC_1 of Song et al. (2012), accumulated in float64. Memory is
    O(La Lb + (La + Lb) b^2) for batch size b, independent of the number of samples streamed.
    Unitless. Every batch needs b >= 4 samples, the same b for all layers of that update.

    Usage::

        mb = MinibatchCKA()
        for batch in loader:
            mb.update([a1, a2, ...], [b1, b2, ...])   # lists of [b, d_l] tensors
        heatmap = mb.compute()                        # [La, Lb]
    """

    def __init__(self, dtype: torch.dtype = DEFAULT_DTYPE):
        self.dtype = dtype
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._xy: torch.Tensor | None = None
        self._xx: torch.Tensor | None = None
        self._yy: torch.Tensor | None = None
        self._as_tensor = True
        self.n_samples = 0
        self.n_batches = 0

    @staticmethod
    def _grams(acts: list[torch.Tensor], name: str) -> torch.Tensor:
        """Linear Grams with zeroed diagonals ``[L, b, b]``. The NaN/inf check runs here, once
        for all layers: a NaN or inf anywhere in a row makes that row's squared norm (the
        Gram's diagonal) NaN or inf."""
        if all(a.shape == acts[0].shape for a in acts):
            A = torch.stack(acts)
            K = torch.bmm(A, A.transpose(1, 2))
        else:
            K = torch.stack([a @ a.T for a in acts])
        bad = ~torch.isfinite(K.diagonal(dim1=1, dim2=2).sum(1))
        if bool(bad.any()):
            raise ValueError(f"{name}[{int(bad.nonzero()[0])}] contains NaN or inf (or overflows)")
        return _zero_diag(K)

    @staticmethod
    def _stats(K: torch.Tensor):
        """Per-layer pieces of HSIC_1: flattened Grams, total sums, row sums."""
        return K.reshape(K.shape[0], -1), K.sum((1, 2)), K.sum(2)

    def update(self, acts_a, acts_b=None) -> None:
        """Add one batch: ``acts_a``/``acts_b`` are lists of ``[b, d_l]`` activations (same b).

        ``acts_b=None`` (or the same list) compares ``acts_a`` with itself.
        """
        same = acts_b is None or acts_b is acts_a
        A = _layer_list(acts_a, "acts_a", 4, self.dtype, finite=False)
        B = A if same else _layer_list(acts_b, "acts_b", 4, self.dtype, finite=False)
        check_same_n(A[0], B[0], "acts_a", "acts_b")
        with torch.no_grad():
            fa, sa, ra = self._stats(self._grams(A, "acts_a"))
            fb, sb, rb = (fa, sa, ra) if same else self._stats(self._grams(B, "acts_b"))
            b = A[0].shape[0]
            scale = 1.0 / (b * (b - 3))
            c1, c2 = 1.0 / ((b - 1) * (b - 2)), 2.0 / (b - 2)
            # HSIC_1 = [tr(K~L~) + c1 (1'K~1)(1'L~1) - c2 (K~1).(L~1)] / (b (b - 3)), all pairs at once
            xy = (fa @ fb.T + c1 * sa[:, None] * sb[None, :] - c2 * (ra @ rb.T)) * scale
            xx = ((fa * fa).sum(1) + c1 * sa * sa - c2 * (ra * ra).sum(1)) * scale
            yy = xx if same else ((fb * fb).sum(1) + c1 * sb * sb - c2 * (rb * rb).sum(1)) * scale
        if self._xy is None:
            self._xy, self._xx, self._yy = xy, xx, yy
            self._as_tensor = is_torch(*acts_a) or (not same and is_torch(*acts_b))
        else:
            if self._xy.shape != xy.shape:
                raise ValueError(
                    f"acts_a/acts_b: expected {tuple(self._xy.shape)} layers as before, got {tuple(xy.shape)}"
                )
            self._xy = self._xy + xy
            self._xx = self._xx + xx
            self._yy = self._yy + yy
        self.n_samples += b
        self.n_batches += 1

    def compute(self):
        """The ``[La, Lb]`` matrix of minibatch CKA values accumulated so far."""
        if self._xy is None:
            raise ValueError("MinibatchCKA.compute: no batch was added (call update first)")
        denom = torch.sqrt(self._xx[:, None] * self._yy[None, :])
        if not bool((denom > 0).all()):
            degenerate("MinibatchCKA: a layer has zero self-HSIC (constant activations)")
            denom = torch.where(denom > 0, denom, torch.full_like(denom, float("nan")))
        return array_out(self._xy / denom, self._as_tensor)


__all__ = ["cka", "cka_matrix", "hsic", "gram_linear", "gram_rbf", "center_gram", "MinibatchCKA"]
