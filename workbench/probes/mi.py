"""Mutual information estimators. All values are in nats (natural log); divide by log(2) for bits.

- :func:`mi_ksg`: Kraskov-Stoegbauer-Grassberger estimator 1 (k nearest neighbours), multivariate.
- :func:`mi_binned`: plug-in estimator on discrete or binned data (optional Miller-Madow).
- Variational lower bounds on a critic score matrix S[i, j] = f(x_i, y_j), positives on the
  diagonal (Poole et al. 2019; Song & Ermon 2020): :func:`infonce`, :func:`nwj`, :func:`dv`,
  :func:`mine`, :func:`js`, :func:`smile`. Torch in, torch out, differentiable; a leading batch
  of score matrices ``[..., N, N]`` gives one value per matrix.
- Trainable critics :class:`SeparableCritic`, :class:`ConcatCritic` and :func:`estimate_mi`.
- Ground truth helpers for correlated Gaussians: :func:`correlated_gaussians`,
  :func:`gaussian_mi`, :func:`gaussian_critic`.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from scipy.spatial import cKDTree
from scipy.special import digamma
from torch import nn

from ._checks import (
    as_matrix,
    check_choice,
    check_finite,
    check_int,
    check_positive,
    check_same_n,
    degenerate,
    is_constant,
    is_torch,
    to_tensor,
)

# ----------------------------------------------------------------------------- KSG


def _numpy_pair(X, Y, min_n: int, min_reason: str):
    Xt = as_matrix(X, "X", allow_1d=True, min_n=min_n, min_reason=min_reason)
    Yt = as_matrix(Y, "Y", allow_1d=True, min_n=min_n, min_reason=min_reason)
    check_same_n(Xt, Yt)
    return Xt.detach().cpu().numpy(), Yt.detach().cpu().numpy()


def mi_ksg(
    X,
    Y,
    k: int = 3,
    standardize: bool = True,
    jitter: float = 1e-10,
    seed: int = 0,
    workers: int = 1,
) -> float:
    """KSG estimator 1 of the mutual information I(X; Y), in nats.

    I = psi(k) + psi(N) - < psi(n_x + 1) + psi(n_y + 1) >, where eps_i is the max-norm distance
    from sample i to its k-th neighbour in the joint space (x, y), and n_x(i), n_y(i) count the
    other samples strictly closer than eps_i in the marginal spaces (max norm). Kraskov et al.
    (2004). Not clipped at 0 (sklearn's ``mutual_info_regression`` clips).

    X: ``[n]`` or ``[n, d_x]``; Y: ``[n]`` or ``[n, d_y]``; needs k < n. ``standardize`` scales
    every column to unit standard deviation (sample std, as sklearn); ``jitter`` adds seeded
    noise ``jitter * max(1, mean|column|) * N(0, 1)`` against ties (0 disables it). k-d trees
    (``scipy.spatial.cKDTree``, p = inf) make it O(n log n) in low dimension; ``workers`` is
    passed to the tree queries (-1: all cores). A constant X or Y gives NaN and a warning.
    """
    k = check_int(k, "k", low=1)
    x, y = _numpy_pair(X, Y, min_n=2, min_reason="")
    n = x.shape[0]
    if k >= n:
        raise ValueError(f"k must be < n (number of samples), got k={k} with n={n}")
    if not math.isfinite(jitter) or jitter < 0:
        raise ValueError(f"jitter must be a finite number >= 0, got {jitter!r}")
    if np.all(x == x[:1]) or np.all(y == y[:1]):
        return degenerate("mi_ksg: X or Y is constant over samples")
    rng = np.random.default_rng(seed)
    cols = []
    for v in (x, y):
        v = v.copy()
        if standardize:
            std = v.std(axis=0, ddof=1)
            v /= np.where(std > 0, std, 1.0)
        if jitter > 0:
            v += jitter * np.maximum(1.0, np.abs(v).mean(axis=0)) * rng.standard_normal(v.shape)
        cols.append(v)
    x, y = cols
    joint = np.hstack([x, y])
    dist, _ = cKDTree(joint).query(joint, k=[k + 1], p=np.inf, workers=workers)
    radius = np.nextafter(dist[:, 0], 0)  # "<= nextafter(eps, 0)" is "< eps"
    nx = cKDTree(x).query_ball_point(x, radius, p=np.inf, return_length=True, workers=workers) - 1
    ny = cKDTree(y).query_ball_point(y, radius, p=np.inf, return_length=True, workers=workers) - 1
    return float(digamma(k) + digamma(n) - np.mean(digamma(nx + 1) + digamma(ny + 1)))


# ----------------------------------------------------------------------------- plug-in


def _symbols(v, name: str, bins) -> np.ndarray:
    """Integer symbol per sample: unique rows (discrete) or per-column histogram bins."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    arr = np.asarray(v)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 1-D [n] or 2-D [n_samples, n_features], got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(f"{name} has n={arr.shape[0]} samples; at least 2 are needed")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    if bins is not None:
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"{name} must be numeric to be binned")
        coded = np.empty(arr.shape, dtype=np.int64)
        for j in range(arr.shape[1]):
            edges = np.histogram_bin_edges(arr[:, j], bins=bins)
            coded[:, j] = np.clip(np.searchsorted(edges, arr[:, j], side="right") - 1, 0, len(edges) - 2)
        arr = coded
    return np.unique(arr, axis=0, return_inverse=True)[1].reshape(-1)


def _entropy_from_counts(counts: np.ndarray, n: int) -> float:
    p = counts[counts > 0] / n
    return float(-(p * np.log(p)).sum())


def mi_binned(x, y, bins=None, miller_madow: bool = False) -> float:
    """Plug-in (maximum-likelihood) mutual information of discrete or binned variables, in nats.

    I = sum_{a,b} p(a,b) log(p(a,b) / (p(a) p(b))) with empirical frequencies; equal to
    ``sklearn.metrics.mutual_info_score`` on discrete labels. x, y: ``[n]`` or ``[n, d]``
    (each distinct row is a symbol). ``bins=None`` treats the values as discrete labels;
    otherwise each column is cut into ``bins`` (an int, edges or a numpy rule such as "fd").
    ``miller_madow`` adds the Miller-Madow correction (m - 1) / (2n) to each entropy, m = the
    number of occupied cells: I_MM = I + (m_x + m_y - m_xy - 1) / (2n). A constant x or y
    (no information to measure) gives NaN and a warning.
    """
    a = _symbols(x, "x", bins)
    b = _symbols(y, "y", bins)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got {a.shape[0]} and {b.shape[0]}")
    n = a.shape[0]
    if a.max() == 0 or b.max() == 0:
        return degenerate("mi_binned: x or y is constant (a single symbol)")
    joint = a * (b.max() + 1) + b
    ca, cb, cj = np.bincount(a), np.bincount(b), np.unique(joint, return_counts=True)[1]
    mi = _entropy_from_counts(ca, n) + _entropy_from_counts(cb, n) - _entropy_from_counts(cj, n)
    if miller_madow:
        mi += ((ca > 0).sum() + (cb > 0).sum() - (cj > 0).sum() - 1) / (2.0 * n)
    return float(max(mi, 0.0)) if not miller_madow else float(mi)


# ----------------------------------------------------------------------------- bounds


def _scores(S, name: str = "S") -> torch.Tensor:
    t = to_tensor(S, name, dtype=None)
    if not t.is_floating_point():
        t = t.double()
    if t.ndim < 2 or t.shape[-1] != t.shape[-2]:
        raise ValueError(f"{name} must be a square [..., N, N] critic score matrix, got shape {tuple(t.shape)}")
    if t.shape[-1] < 2:
        raise ValueError(f"{name} must have N >= 2 samples (one positive and one negative per row)")
    check_finite(t, name)
    return t


def _offdiag_logmeanexp(S: torch.Tensor) -> torch.Tensor:
    n = S.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=S.device)
    masked = S.masked_fill(eye, float("-inf"))
    return torch.logsumexp(masked.flatten(-2), dim=-1) - math.log(n * (n - 1))


def _diag_mean(S: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(S, dim1=-2, dim2=-1).mean(-1)


def _out(value: torch.Tensor, S) -> torch.Tensor | float:
    if is_torch(S):
        return value
    return value.detach().cpu().numpy() if value.ndim else float(value)


def infonce(S):
    """InfoNCE / CPC bound (van den Oord et al. 2018), nats:
    mean_i (S_ii - logsumexp_j S_ij) + log N. Never above log N (N = batch size)."""
    S_t = _scores(S)
    n = S_t.shape[-1]
    v = (torch.diagonal(S_t, dim1=-2, dim2=-1) - torch.logsumexp(S_t, dim=-1)).mean(-1) + math.log(n)
    return _out(v, S)


def nwj(S):
    """NWJ / f-GAN KL bound (Nguyen, Wainwright & Jordan 2010), nats:
    E_p[f] - e^{-1} E_q[e^f] = mean_i S_ii - e^{-1} mean_{i != j} e^{S_ij}.
    Optimal critic 1 + log p(x,y)/(p(x)p(y)); unbiased but high variance at large MI."""
    S_t = _scores(S)
    v = _diag_mean(S_t) - torch.exp(_offdiag_logmeanexp(S_t) - 1.0)
    return _out(v, S)


def dv(S):
    """Donsker-Varadhan bound (the MINE objective), nats:
    mean_i S_ii - log mean_{i != j} e^{S_ij}. Invariant to a constant shift of the critic."""
    S_t = _scores(S)
    return _out(_diag_mean(S_t) - _offdiag_logmeanexp(S_t), S)


def mine(S, ema=None, momentum: float = 0.99):
    """MINE (Belghazi et al. 2018): the DV value with the moving-average gradient correction.

    Returns ``(estimate, new_ema)``. The estimate equals :func:`dv` in value; its gradient
    replaces the biased d/dtheta log mean e^S by (d/dtheta mean e^S) / ema, with
    ema <- momentum * ema + (1 - momentum) * mean_{i != j} e^{S_ij} (pass ``ema=None`` at the
    first step). Nats.
    """
    S_t = _scores(S)
    check_positive(1.0 - momentum, "1 - momentum")
    lme = _offdiag_logmeanexp(S_t)
    mean_exp = torch.exp(lme)
    with torch.no_grad():
        new = mean_exp.detach() if ema is None else momentum * torch.as_tensor(ema) + (1 - momentum) * mean_exp
    corrected = mean_exp / new  # gradient carrier; value 1 at the fixed point
    value = _diag_mean(S_t) - lme.detach() - (corrected - corrected.detach())
    return _out(value, S), (new if is_torch(S) else float(new))


def js(S):
    """Jensen-Shannon (Deep InfoMax / f-GAN) objective, nats-scaled but *not* an MI estimate:
    -mean_i softplus(-S_ii) - mean_{i != j} softplus(S_ij). Its optimal critic is the log
    density ratio, so ``nwj(S + 1)`` of a JS-trained critic estimates the MI."""
    S_t = _scores(S)
    n = S_t.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=S_t.device)
    pos = nn.functional.softplus(-torch.diagonal(S_t, dim1=-2, dim2=-1)).mean(-1)
    neg = nn.functional.softplus(S_t).masked_fill(eye, 0.0).sum((-2, -1)) / (n * (n - 1))
    return _out(-pos - neg, S)


def smile(S, tau: float = 5.0):
    """SMILE bound (Song & Ermon 2020), nats: DV with the scores clipped to [-tau, tau] in the
    partition term only: mean_i S_ii - log mean_{i != j} e^{clip(S_ij, -tau, tau)}.
    Lower variance than DV at the cost of a bias for MI above ~tau."""
    S_t = _scores(S)
    tau = check_positive(tau, "tau")
    return _out(_diag_mean(S_t) - _offdiag_logmeanexp(S_t.clamp(-tau, tau)), S)


# ----------------------------------------------------------------------------- critics


def _mlp(d_in: int, hidden: int, d_out: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    d = d_in
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    mods.append(nn.Linear(d, d_out))
    return nn.Sequential(*mods)


class SeparableCritic(nn.Module):
    """f(x, y) = g(x)^T h(y) with two small MLPs; all N^2 scores from one matrix product."""

    def __init__(self, dim_x: int, dim_y: int, hidden: int = 128, embed: int = 32, layers: int = 2):
        super().__init__()
        self.g = _mlp(dim_x, hidden, embed, layers)
        self.h = _mlp(dim_y, hidden, embed, layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Score matrix S ``[N, N]`` with S[i, j] = f(x_i, y_j)."""
        return self.g(x) @ self.h(y).T


class ConcatCritic(nn.Module):
    """f(x, y) = MLP([x, y]) evaluated on all N^2 pairs (more expressive, N^2 forward cost)."""

    def __init__(self, dim_x: int, dim_y: int, hidden: int = 128, layers: int = 2):
        super().__init__()
        self.f = _mlp(dim_x + dim_y, hidden, 1, layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Score matrix S ``[N, N]`` with S[i, j] = f(x_i, y_j)."""
        n = x.shape[0]
        pairs = torch.cat([x[:, None, :].expand(n, n, -1), y[None, :, :].expand(n, n, -1)], dim=-1)
        return self.f(pairs).squeeze(-1)


# ----------------------------------------------------------------------------- estimate_mi

NEURAL = ("infonce", "nwj", "dv", "mine", "js", "smile")
ESTIMATORS = NEURAL + ("ksg", "binned")


def _report(S: torch.Tensor, estimator: str, tau: float) -> torch.Tensor:
    """The MI estimate reported for a critic trained with ``estimator``."""
    if estimator == "infonce":
        return infonce(S)
    if estimator == "nwj":
        return nwj(S)
    if estimator in ("dv", "mine"):
        return dv(S)
    if estimator == "js":
        return nwj(S + 1.0)
    return smile(S, tau)


def _objective(S: torch.Tensor, estimator: str, tau: float, state: dict) -> torch.Tensor:
    """Training objective (maximised). JS and SMILE train with the JS gradient (Song & Ermon)."""
    if estimator in ("infonce", "nwj", "dv"):
        return _report(S, estimator, tau)
    if estimator == "mine":
        value, state["ema"] = mine(S, state.get("ema"))
        return value
    return js(S)


def estimate_mi(
    X,
    Y,
    estimator: str = "infonce",
    critic: str | nn.Module = "separable",
    batch_size: int = 128,
    max_steps: int = 2000,
    lr: float = 5e-4,
    val_fraction: float = 0.2,
    eval_every: int = 50,
    patience: int = 5,
    tau: float = 5.0,
    k: int = 3,
    bins=10,
    hidden: int = 128,
    seed: int = 0,
    device=None,
    return_details: bool = False,
):
    """Estimate I(X; Y) in nats.

    ``estimator="ksg"`` calls :func:`mi_ksg` (with ``k``), ``"binned"`` :func:`mi_binned`
    (with ``bins``). The neural estimators (``"infonce"``, ``"nwj"``, ``"dv"``, ``"mine"``,
    ``"js"``, ``"smile"``) fit a critic (``"separable"``, ``"concat"`` or your own
    ``nn.Module`` mapping (x ``[N, d_x]``, y ``[N, d_y]``) to S ``[N, N]``) with Adam on
    minibatches of ``batch_size`` from a training split, evaluate the bound on the held-out
    ``val_fraction`` every ``eval_every`` steps, stop after ``patience`` evaluations without
    improvement, and return the held-out estimate of the best critic (the mean of the bound
    over held-out batches of ``batch_size``). What is reported: InfoNCE (<= log batch_size),
    NWJ, DV (for dv and mine), NWJ(S + 1) for a JS-trained critic, SMILE(tau) for SMILE
    (trained with the JS gradient). The best-of-evaluations choice makes the held-out number
    slightly optimistic. ``return_details=True`` returns a dict with the estimate, the
    held-out history and the fitted critic.
    """
    check_choice(estimator, "estimator", ESTIMATORS)
    if estimator == "ksg":
        value = mi_ksg(X, Y, k=k, seed=seed)
        return {"estimate": value} if return_details else value
    if estimator == "binned":
        value = mi_binned(X, Y, bins=bins)
        return {"estimate": value} if return_details else value
    batch_size = check_int(batch_size, "batch_size", low=2)
    max_steps = check_int(max_steps, "max_steps", low=1)
    eval_every = check_int(eval_every, "eval_every", low=1)
    patience = check_int(patience, "patience", low=1)
    lr = check_positive(lr, "lr")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    Xt = as_matrix(X, "X", allow_1d=True, min_n=4, dtype=torch.float32)
    Yt = as_matrix(Y, "Y", allow_1d=True, min_n=4, dtype=torch.float32)
    check_same_n(Xt, Yt)
    n = Xt.shape[0]
    n_val = int(round(val_fraction * n))
    if n_val < 2 or n - n_val < 2:
        raise ValueError(f"X has n={n} samples: too few for a train/held-out split with val_fraction={val_fraction}")
    if is_constant(Xt) or is_constant(Yt):
        value = degenerate("estimate_mi: X or Y is constant over samples")
        return {"estimate": value} if return_details else value
    device = torch.device(device) if device is not None else Xt.device
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    Xt, Yt = Xt[perm].to(device), Yt[perm].to(device)
    mean_x, std_x = Xt[n_val:].mean(0), Xt[n_val:].std(0).clamp_min(1e-12)
    mean_y, std_y = Yt[n_val:].mean(0), Yt[n_val:].std(0).clamp_min(1e-12)
    Xt, Yt = (Xt - mean_x) / std_x, (Yt - mean_y) / std_y
    x_val, y_val, x_tr, y_tr = Xt[:n_val], Yt[:n_val], Xt[n_val:], Yt[n_val:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if critic == "separable":
            net: nn.Module = SeparableCritic(Xt.shape[1], Yt.shape[1], hidden=hidden)
        elif critic == "concat":
            net = ConcatCritic(Xt.shape[1], Yt.shape[1], hidden=hidden)
        elif isinstance(critic, nn.Module):
            net = critic
        else:
            raise ValueError(f"critic must be 'separable', 'concat' or an nn.Module, got {critic!r}")
    net = net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    bs_val = min(batch_size, n_val)

    def held_out() -> float:
        net.eval()
        with torch.no_grad():
            vals = [
                float(_report(net(x_val[i : i + bs_val], y_val[i : i + bs_val]), estimator, tau))
                for i in range(0, n_val - bs_val + 1, bs_val)
            ]
        net.train()
        return float(np.mean(vals))

    state: dict = {}
    best, best_state, since, history = -math.inf, None, 0, []
    bs_tr = min(batch_size, x_tr.shape[0])
    for step in range(1, max_steps + 1):
        idx = torch.randint(0, x_tr.shape[0], (bs_tr,), generator=gen).to(device)
        loss = -_objective(net(x_tr[idx], y_tr[idx]), estimator, tau, state)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == max_steps:
            value = held_out()
            history.append((step, value))
            if value > best:
                best, best_state, since = value, copy.deepcopy(net.state_dict()), 0
            else:
                since += 1
                if since >= patience:
                    break
    if best_state is not None:
        net.load_state_dict(best_state)
    if not math.isfinite(best):
        best = degenerate("estimate_mi: the held-out bound is not finite")
    if return_details:
        return {"estimate": best, "history": history, "critic": net, "steps": history[-1][0]}
    return best


# ----------------------------------------------------------------------------- ground truth


def gaussian_mi(rho: float, dim: int = 1) -> float:
    """True MI of y = rho x + sqrt(1 - rho^2) e, x, e ~ N(0, I_dim): -(dim/2) log(1 - rho^2) nats."""
    return -0.5 * dim * math.log1p(-rho * rho)


def rho_for_mi(mi: float, dim: int) -> float:
    """The rho giving ``mi`` nats in ``dim`` dimensions: sqrt(1 - exp(-2 mi / dim))."""
    return math.sqrt(-math.expm1(-2.0 * mi / dim))


def correlated_gaussians(n: int, dim: int = 1, rho: float | None = None, mi: float | None = None, seed: int = 0,
                         batch: tuple[int, ...] = ()):
    """Samples (x, y) ``[*batch, n, dim]`` (float64 tensors) with y = rho x + sqrt(1 - rho^2) e.

    Give either ``rho`` or the target ``mi`` (nats). Returns ``(x, y, rho)``.
    """
    if (rho is None) == (mi is None):
        raise ValueError("give exactly one of rho and mi")
    if rho is None:
        rho = rho_for_mi(mi, dim)
    if not -1 < rho < 1:
        raise ValueError(f"rho must be in (-1, 1), got {rho}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, dim, generator=gen, dtype=torch.float64)
    e = torch.randn(*batch, n, dim, generator=gen, dtype=torch.float64)
    return x, rho * x + math.sqrt(1 - rho * rho) * e, rho


def gaussian_critic(x: torch.Tensor, y: torch.Tensor, rho: float) -> torch.Tensor:
    """The true critic S[i, j] = log p(y_j | x_i) / p(y_j) for the correlated Gaussians
    (the pointwise MI, nats), batched over leading dims: ``[..., N, N]``."""
    s2 = 1 - rho * rho
    d = x.shape[-1]
    xx = x.square().sum(-1)[..., :, None]  # [..., N, 1]
    yy = y.square().sum(-1)[..., None, :]  # [..., 1, N]
    xy = x @ y.transpose(-1, -2)  # [..., N, N]
    # sum_d [-log(s2)/2 - (y - rho x)^2 / (2 s2) + y^2 / 2], expanded into one matrix product
    return -0.5 * d * math.log(s2) - (yy - 2 * rho * xy + rho * rho * xx) / (2 * s2) + yy / 2


__all__ = [
    "mi_ksg",
    "mi_binned",
    "infonce",
    "nwj",
    "dv",
    "mine",
    "js",
    "smile",
    "SeparableCritic",
    "ConcatCritic",
    "estimate_mi",
    "gaussian_mi",
    "rho_for_mi",
    "correlated_gaussians",
    "gaussian_critic",
]

