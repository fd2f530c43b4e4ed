"""Mixture-of-experts routing statistics and expert similarity.

For a learned router: probabilities P ``[T, E]`` (tokens x experts), the chosen experts, and
the router logits. For routers without a gate (MixPHM / AdaMix random routing): the number of
times each expert was drawn. Entropies are in nats. Tensor values stay tensors (so the balance
and z-losses can be used as training losses); numpy inputs give numpy values / floats.
"""

from __future__ import annotations

import math

import scipy.stats
import torch

from ._checks import (
    array_out,
    as_matrix,
    check_finite,
    check_int,
    degenerate,
    is_torch,
    to_tensor,
)
from .cka import cka_matrix


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """-sum p log p over the last dim, with 0 log 0 = 0 (nats)."""
    return torch.special.entr(p).sum(-1)


def _cv2(v: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation with the *population* variance (ddof=0), as Shazeer
    et al.'s tensor2tensor code: var(v) / mean(v)^2. 0 when balanced, E - 1 when collapsed."""
    mean = v.mean()
    return ((v - mean) ** 2).mean() / mean**2


def routing_stats(
    probs=None,
    assignments=None,
    draws=None,
    logits=None,
    top_k: int = 1,
    num_experts: int | None = None,
):
    """Load and balance statistics of a router, as a dict.

    Learned router (give ``logits`` and/or ``probs`` ``[T, E]``; ``assignments`` ``[T]`` or
    ``[T, k]`` expert indices, by default the ``top_k`` largest probabilities):

    - ``utilisation`` f ``[E]``: fraction of the T*k assignments that went to each expert.
    - ``importance`` ``[E]``: sum over tokens of P[:, i]; ``mean_prob`` P-bar = importance / T.
    - ``load`` ``[E]``: number of tokens assigned to each expert.
    - ``token_entropy``: mean over tokens of H(P[t]) (nats; log E uniform, 0 one-hot).
    - ``marginal_entropy``: H(P-bar) (nats; log E when balanced, 0 collapsed).
    - ``balance_loss``: Switch Transformer E * sum_i f_i P-bar_i (1 uniform, E collapsed).
    - ``cv2_importance``, ``cv2_load``: Shazeer et al.'s CV^2 = var / mean^2 with the
      population variance (ddof=0): 0 balanced, E - 1 collapsed.
    - ``z_loss`` (with ``logits``): mean_t logsumexp(logits_t)^2 ((log E)^2 for zero logits).
    - ``coactivation`` ``[E, E]`` (k > 1): C_ij = fraction of tokens routed to both i and j
      (C_ii = fraction routed to i).

    Gate-less router: ``draws`` ``[E]`` = how many times each expert was drawn. Gives
    ``counts``, ``utilisation``, ``marginal_entropy``, ``cv2_load`` and the chi-square test of
    uniformity ``chi2``, ``p_value`` (``scipy.stats.chisquare``; small p = not uniform).
    """
    if draws is not None:
        if probs is not None or logits is not None or assignments is not None:
            raise ValueError("draws cannot be combined with probs, logits or assignments")
        return _draw_stats(draws)
    if probs is None and logits is None:
        raise ValueError("give probs or logits (learned router) or draws (gate-less router)")
    as_tensor = is_torch(probs, logits, assignments)
    out: dict = {}
    L = None
    if logits is not None:
        L = as_matrix(logits, "logits")
        lse = torch.logsumexp(L, dim=-1)
        out["z_loss"] = (lse**2).mean()
    if probs is not None:
        P = as_matrix(probs, "probs")
        rows_ok = torch.allclose(P.sum(-1), torch.ones((), dtype=P.dtype, device=P.device), atol=1e-6)
        if bool((P < 0).any()) or not rows_ok:
            raise ValueError("probs must be non-negative with rows summing to 1 (did you pass logits?)")
        if L is not None and L.shape != P.shape:
            raise ValueError(f"probs and logits must have the same shape, got {tuple(P.shape)} and {tuple(L.shape)}")
    else:
        P = torch.softmax(L, dim=-1)
    T, E = P.shape
    if num_experts is not None and check_int(num_experts, "num_experts", low=1) != E:
        raise ValueError(f"num_experts={num_experts} but probs/logits have {E} columns")
    if assignments is None:
        top_k = check_int(top_k, "top_k", low=1, high=E)
        A = torch.topk(P, top_k, dim=-1).indices
    else:
        A = to_tensor(assignments, "assignments", dtype=None).to(P.device)
        if A.is_floating_point() or A.dtype == torch.bool:
            raise ValueError("assignments must hold integer expert indices")
        if A.ndim == 1:
            A = A[:, None]
        if A.ndim != 2 or A.shape[0] != T:
            raise ValueError(f"assignments must be [T] or [T, k] with T={T}, got shape {tuple(A.shape)}")
        if bool((A < 0).any() or (A >= E).any()):
            raise ValueError(f"assignments must be expert indices in [0, {E - 1}]")
    k = A.shape[1]
    mask = torch.zeros(T, E, dtype=P.dtype, device=P.device).scatter(1, A.long(), 1.0)  # [T, E] 0/1
    load = mask.sum(0)
    f = load / (T * k)
    mean_p = P.mean(0)
    out.update(
        num_experts=E,
        num_tokens=T,
        top_k=k,
        utilisation=f,
        importance=P.sum(0),
        mean_prob=mean_p,
        load=load,
        token_entropy=_entropy(P).mean(),
        marginal_entropy=_entropy(mean_p),
        max_entropy=math.log(E),
        balance_loss=E * (f * mean_p).sum(),
        cv2_importance=_cv2(P.sum(0)),
        cv2_load=_cv2(load),
    )
    if k > 1:
        out["coactivation"] = mask.T @ mask / T
    return {key: _convert(v, as_tensor) for key, v in out.items()}


def _convert(v, as_tensor: bool):
    if not isinstance(v, torch.Tensor) or as_tensor:
        return v
    return float(v) if v.ndim == 0 else v.detach().cpu().numpy()


def _draw_stats(draws) -> dict:
    c = to_tensor(draws, "draws")
    if c.ndim != 1 or c.shape[0] < 2:
        raise ValueError(f"draws must be a 1-D vector of counts per expert (E >= 2), got shape {tuple(c.shape)}")
    check_finite(c, "draws")
    if bool((c < 0).any()) or not bool((c == c.round()).all()):
        raise ValueError("draws must be non-negative integer counts per expert")
    total = float(c.sum())
    E = c.shape[0]
    as_tensor = is_torch(draws)
    if total == 0:
        nan = degenerate("routing_stats: draws are all zero")
        return {"counts": _convert(c, as_tensor), "chi2": nan, "p_value": nan}
    f = c / total
    res = scipy.stats.chisquare(c.detach().cpu().numpy())
    out = dict(
        num_experts=E,
        num_draws=int(total),
        counts=c,
        utilisation=f,
        marginal_entropy=_entropy(f),
        max_entropy=math.log(E),
        cv2_load=_cv2(c),
        chi2=float(res.statistic),
        p_value=float(res.pvalue),
    )
    return {key: _convert(v, as_tensor) for key, v in out.items()}


def expert_similarity(outputs, weights=None, merged_output=None) -> dict:
    """How alike the experts of one layer are.

    - ``outputs``: list of E expert outputs ``[n, d]`` on the same n inputs ->
      ``cka`` ``[E, E]`` (linear CKA between experts' outputs, unitless).
    - ``weights``: list of E tensors (or E lists of tensors, flattened and concatenated) ->
      ``weight_distance`` ``[E, E]`` = ||w_i - w_j||_2 (units of the weights) and
      ``weight_cosine`` ``[E, E]``.
    - ``merged_output`` ``[n, d]`` (e.g. the averaged expert used at inference) ->
      ``merged_gap`` ``[E]`` = ||merged - out_i||_F / ||out_i||_F and ``merged_cka`` ``[E]``.
    """
    if isinstance(outputs, torch.Tensor) or not isinstance(outputs, (list, tuple)) or len(outputs) < 2:
        raise ValueError("outputs must be a list of at least 2 expert outputs [n, d]")
    as_tensor = is_torch(*outputs)
    outs = [as_matrix(o, f"outputs[{i}]", min_n=2) for i, o in enumerate(outputs)]
    for i, o in enumerate(outs):
        if o.shape != outs[0].shape:
            raise ValueError(f"outputs[{i}] has shape {tuple(o.shape)}, expected {tuple(outs[0].shape)}")
    res: dict = {"cka": cka_matrix(outs)}
    if weights is not None:
        if not isinstance(weights, (list, tuple)) or len(weights) != len(outs):
            raise ValueError(f"weights must be a list of {len(outs)} tensors, one per expert")
        flat = []
        for i, w in enumerate(weights):
            parts = w if isinstance(w, (list, tuple)) else [w]
            vec = torch.cat([to_tensor(p, f"weights[{i}]").reshape(-1).to(outs[0].device) for p in parts])
            check_finite(vec, f"weights[{i}]")
            flat.append(vec)
        if len({v.numel() for v in flat}) != 1:
            raise ValueError("weights: every expert must have the same number of parameters")
        W = torch.stack(flat)
        res["weight_distance"] = torch.cdist(W, W)
        norms = W.norm(dim=1)
        if bool((norms == 0).any()):
            degenerate("expert_similarity: an expert has all-zero weights (cosine undefined)")
        res["weight_cosine"] = (W @ W.T) / (norms[:, None] * norms[None, :])
    if merged_output is not None:
        M = as_matrix(merged_output, "merged_output", min_n=2)
        if M.shape != outs[0].shape:
            raise ValueError(f"merged_output has shape {tuple(M.shape)}, expected {tuple(outs[0].shape)}")
        res["merged_gap"] = torch.stack([(M - o).norm() / o.norm() for o in outs])
        res["merged_cka"] = cka_matrix([M], outs)[0]
    return {key: array_out(v, as_tensor) if isinstance(v, torch.Tensor) else v for key, v in res.items()}


__all__ = ["routing_stats", "expert_similarity"]
