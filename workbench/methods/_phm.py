"""Parameterised hypercomplex multiplication (PHM) linear layers, shared by Compacter and MixPHM.

A PHM linear R^{in} -> R^{out} with n divisions (Zhang et al. 2021; Mahabadi et al. 2021) is

    y = x W + b,    W = sum_{i=1..n} A_i (kron) B_i,

A_i in R^{n x n} (the "rule", ``A`` of shape ``[n, n, n]``), B_i in R^{(in/n) x (out/n)}. With a
rank-r factorisation (Compacter, MixPHM) B_i = S_i T_i, S_i in R^{(in/n) x r}, T_i in R^{r x (out/n)}
(the official code's ``W_left`` / ``W_right``). Parameters per layer: n * (in/n) * r + n * r * (out/n)
+ out (bias), plus the n^3 of A unless A is shared.

:class:`PHMLinear` optionally holds ``experts`` independent copies of (S, T, b) stacked along a
leading dimension (MixPHM's experts); every expert uses the same A. Init as in the official code
(``hypercomplex/layers.py``): each slice S_i, T_i (or B_i) is Glorot-uniform with gain sqrt(2), the
bias is zero, A ~ N(0, rule_init_std^2).

Official files: rabeehk/compacter ``seq2seq/hypercomplex/layers.py`` (``PHMLinear``,
``matvec_product``: ``y = x @ sum_i kron(A_i, W_i) + b`` with ``W = bmm(W_left, W_right)``),
``kronecker.py`` (``kronecker_product_einsum_batched``) and ``inits.py`` (``xavier_uniform_(gain=sqrt(2))``);
the same files are vendored in ylsung/VL_adapter (``VL-T5/src/adapters/hypercomplex/``), HenryHZY/VL-PET
(``src/adapters/hypercomplex/``) and jingjing12110/MixPHM (``src/vl_t5/compacter/hypercomplex/``).
``tests/methods/test_official_adapters.py`` compares Compacter's layers with that ``matvec_product``.

Deliberate departures: the Kronecker sum is one einsum of a different index order (the same matrix);
the ``experts`` dimension is the workbench's (MixPHM keeps one layer per expert); a layer's own A is
drawn with ``rule_init_std`` (rabeehk's ``layers.py`` hard-codes std 0.01 there, VL-PET's copy uses
``phm_init_range``); ``phm_c_init="uniform"``, a factorised A and a shared W are not implemented.

A shared A lives on the model (``model.peft_shared["phm_rule"]``) so that state_dict, ``.to()`` and
``count_parameters`` see it once; layers keep a plain (unregistered) reference to its container.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def kron_sum(rule: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``sum_i kron(rule[i], blocks[i])`` for ``rule`` [n, n, n] and ``blocks`` [n, p, q] -> [n p, n q].

    ``kron(A, B)[a p + c, b q + d] = A[a, b] B[c, d]``, written as one einsum (no Python loop).
    """
    n, p, q = blocks.shape
    return torch.einsum("iab,icd->acbd", rule, blocks).reshape(n * p, n * q)


def check_phm_dims(in_features: int, out_features: int, n: int, what: str = "PHM layer") -> None:
    """ValueError unless in and out are positive multiples of n (the PHM constraint)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{what}: the PHM division n must be a positive int, got {n!r}")
    for label, dim in (("in", in_features), ("out", out_features)):
        if dim < 1 or dim % n:
            raise ValueError(
                f"{what}: {label}_features = {dim} is not divisible by the PHM division n = {n} "
                f"(W = sum_i A_i kron B_i needs in and out to be multiples of n)"
            )


def init_rule(n: int, std: float, device=None, dtype=None) -> nn.Parameter:
    """A fresh PHM rule A [n, n, n] ~ N(0, std^2) (the official ``phm_c_init="normal"``)."""
    rule = torch.empty(n, n, n, device=device, dtype=dtype)
    nn.init.normal_(rule, mean=0.0, std=std)
    return nn.Parameter(rule)


def _glorot_slices_(t: torch.Tensor) -> None:
    # The official init: xavier_uniform_ with gain sqrt(2) on every 2-D slice (per expert, per i).
    gain = math.sqrt(2.0)
    fan_out, fan_in = t.shape[-2], t.shape[-1]  # torch's convention for a 2-D weight [out, in]
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        t.uniform_(-bound, bound)


class PHMLinear(nn.Module):
    """y = x W + b, W = sum_i A_i kron B_i (see the module docstring), with optional experts.

    Args:
        in_features, out_features: must be multiples of ``n``.
        n: the number of divisions (A is n x n x n).
        rank: rank r of B_i = S_i T_i; ``None`` for an unfactorised B_i.
        experts: number of (S, T, b) copies; :meth:`forward` takes the expert index.
        shared_rule: ``(container, key)`` where ``container[key]`` is the shared A; ``None`` gives
            the layer its own A (registered as ``phm_rule``) initialised with ``rule_init_std``.
        expert_init: ``"copy"`` -- every expert starts from the same draw (the official MixPHM
            builds its experts with ``copy.deepcopy`` of one layer); ``"independent"`` -- one draw each.
    """

    def __init__(self, in_features: int, out_features: int, n: int = 4, rank: int | None = 1, bias: bool = True,
                 experts: int = 1, shared_rule: tuple | None = None, rule_init_std: float = 1e-4,
                 expert_init: str = "copy", device=None, dtype=None):
        super().__init__()
        check_phm_dims(in_features, out_features, n)
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise ValueError(f"PHM layer: rank must be a positive int or None, got {rank!r}")
        if not isinstance(experts, int) or experts < 1:
            raise ValueError(f"PHM layer: experts must be a positive int, got {experts!r}")
        if expert_init not in ("copy", "independent"):
            raise ValueError(f"PHM layer: expert_init must be 'copy' or 'independent', got {expert_init!r}")
        self.in_features, self.out_features = in_features, out_features
        self.n, self.rank, self.experts = n, rank, experts
        p, q = in_features // n, out_features // n
        kw = dict(device=device, dtype=dtype)
        draws = 1 if expert_init == "copy" else experts
        if rank is None:
            w = torch.empty(draws, n, p, q, **kw)
            _glorot_slices_(w)
            self.W = nn.Parameter(w.expand(experts, -1, -1, -1).clone())
        else:
            s, t = torch.empty(draws, n, p, rank, **kw), torch.empty(draws, n, rank, q, **kw)
            _glorot_slices_(s)
            _glorot_slices_(t)
            self.S = nn.Parameter(s.expand(experts, -1, -1, -1).clone())  # official W_left
            self.T = nn.Parameter(t.expand(experts, -1, -1, -1).clone())  # official W_right
        self.b = nn.Parameter(torch.zeros(experts, out_features, **kw)) if bias else None
        # A tuple is not registered by nn.Module: the shared A stays owned (and counted) by the model.
        self._shared_rule = shared_rule
        if shared_rule is None:
            self.phm_rule = init_rule(n, rule_init_std, **kw)

    @property
    def rule(self) -> torch.Tensor:
        """The A in use (the shared one, or this layer's own)."""
        if self._shared_rule is not None:
            container, key = self._shared_rule
            return container[key]
        return self.phm_rule

    def blocks(self, expert: int = 0) -> torch.Tensor:
        """B [n, in/n, out/n] of one expert."""
        if self.rank is None:
            return self.W[expert]
        return self.S[expert] @ self.T[expert]

    def weight(self, expert: int = 0) -> torch.Tensor:
        """The dense W [in, out] of one expert."""
        return kron_sum(self.rule, self.blocks(expert))

    def bias(self, expert: int = 0) -> torch.Tensor | None:
        return None if self.b is None else self.b[expert]

    def merged(self, mode: str = "official") -> tuple[torch.Tensor, torch.Tensor | None]:
        """One (W, b) from the experts' uniform average (MixPHM's "expert soup").

        ``"official"`` averages each stored tensor separately (S, T and b, as the official
        ``expert_soup``: W = sum_i A_i kron (mean_e S_ei)(mean_e T_ei)); ``"product"`` averages the
        products (W = sum_i A_i kron mean_e(S_ei T_ei) = the mean of the experts' linear maps).
        The two differ as soon as the experts differ.
        """
        if mode not in ("official", "product"):
            raise ValueError(f"merge mode must be 'official' or 'product', got {mode!r}")
        if self.rank is None or mode == "product":
            blocks = torch.stack([self.blocks(e) for e in range(self.experts)]).mean(0)
        else:
            blocks = self.S.mean(0) @ self.T.mean(0)
        bias = None if self.b is None else self.b.mean(0)
        return kron_sum(self.rule, blocks), bias

    def forward(self, x: torch.Tensor, expert: int = 0) -> torch.Tensor:
        y = x @ self.weight(expert).to(x.dtype)
        b = self.bias(expert)
        return y if b is None else y + b.to(x.dtype)

    def extra_repr(self) -> str:
        shared = "shared A" if self._shared_rule is not None else "own A"
        return (f"in={self.in_features}, out={self.out_features}, n={self.n}, rank={self.rank}, "
                f"experts={self.experts}, bias={self.b is not None}, {shared}")
