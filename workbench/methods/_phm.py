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

How the forward is computed (:func:`phm_path_costs`, ``PHMLinear.path``). y = x W for N rows of x
can be computed without materialising W, when that is cheaper. With x viewed as [N, n, p]
(x[N, a, c] = x[N, a p + c]), ``W[a p + c, b q + d] = sum_i A[i, a, b] B_i[c, d]`` and B_i = S_i T_i,
three contractions give the same y, each two matrix products on the activations (multiply-adds
per row in brackets; the backward costs about twice the forward on every path):

- ``"dense"``: W = sum_i A_i kron (S_i T_i) (``n p r q + n^3 p q``, once), then x W [``n^2 p q``];
- ``"left"`` (A folded into S): L[(a c), (b i r)] = A[i, a, b] S_i[c, r] (``n^3 p r``, once), then
  (x L) viewed as [N n, n r] times T viewed as [(i r), q] [``n^3 p r + n^2 r q``];
- ``"right"`` (A folded into T): x viewed as [N n, p] times S viewed as [c, (i r)], then that viewed
  as [N, n^2 r] times K[(a i r), (b d)] = A[i, a, b] T_i[r, d] (``n^3 r q``, once)
  [``n^2 p r + n^3 r q``].

``path="auto"`` (the default) takes the cheapest by this count for the rows of each call (ties go to
``"dense"``, the reference); an unfactorised B (``rank=None``) is always dense (the folds cost more
there). A layer's shape decides: on T5-base MixPHM (n 4, r 8, d 768, m 64) Down takes ``"right"`` and
Up ``"left"``, 32,768 multiply-adds per row instead of 49,152; on vlt5-tiny (d 128, m 12) r = 8 is
not low-rank against q = 3 and every layer stays dense. The paths agree to float rounding
(``tests/methods/test_phm_paths.py`` checks values and gradients against the dense reference).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import activation, bottleneck_size


def kron_sum(rule: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``sum_i kron(rule[i], blocks[i])`` for ``rule`` [n, n, n] and ``blocks`` [n, p, q] -> [n p, n q].

    ``kron(A, B)[a p + c, b q + d] = A[a, b] B[c, d]``: one matrix product over i,
    [(a b), i] x [i, (c d)], then the axes reordered (no Python loop).
    """
    n, p, q = blocks.shape
    m = torch.mm(rule.reshape(n, n * n).t(), blocks.reshape(n, p * q))  # [(a b), (c d)]
    return m.view(n, n, p, q).permute(0, 2, 1, 3).reshape(n * p, n * q)


PATHS = ("auto", "dense", "left", "right")


def phm_path_costs(in_features: int, out_features: int, n: int, rank: int | None, rows: int) -> dict[str, int]:
    """Multiply-adds of one forward y = x W + b of ``rows`` rows, per way of computing it (the module
    docstring): weight-side work (once per call) plus activation-side work (per row). The backward
    costs about twice as much on every path, so the forward decides. ``rank=None``: dense only."""
    p, q = in_features // n, out_features // n
    dense = n * p * q * n * n + rows * in_features * out_features
    if rank is None:
        return {"dense": dense}
    r = rank
    return {
        "dense": n * p * r * q + dense,
        "left": n ** 3 * p * r + rows * (n ** 3 * p * r + n * n * r * q),
        "right": n ** 3 * r * q + rows * (n * n * p * r + n ** 3 * r * q),
    }


def cheapest_path(in_features: int, out_features: int, n: int, rank: int | None, rows: int) -> str:
    """The path of :func:`phm_path_costs` with the fewest multiply-adds (``"dense"`` on a tie)."""
    costs = phm_path_costs(in_features, out_features, n, rank, rows)
    return min(costs, key=lambda k: (costs[k], k != "dense"))


@functools.lru_cache(maxsize=4096)
def _cheapest(in_features: int, out_features: int, n: int, rank: int | None, rows: int) -> str:
    return cheapest_path(in_features, out_features, n, rank, rows)


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


def phm_bottleneck(d_model: int, reduction_factor: int, bottleneck: int | None, n: int, what: str) -> int:
    """The bottleneck m of a PHM adapter (Compacter, MixPHM), with the workbench's rounding rule.

    - ``bottleneck`` given: m = ``bottleneck``, as is (the caller's :func:`check_phm_dims` rejects a
      value that is not a multiple of n: an explicit size is never changed);
    - otherwise m = d // ``reduction_factor`` (the official rule) when that is a multiple of n, else
      **rounded up to the next multiple of n**: m = n * ceil((d // reduction_factor) / n). No
      warning: the rule is deterministic and documented, and the resolved size is exposed
      (``handle.bottleneck``). The official sizes are multiples of n wherever the official code
      defines them (T5-base d = 768: 768 // 12 = 64, 768 // 32 = 24), so they are unchanged;
      vlt5-tiny (d = 128) gets 12 for MixPHM's d // 12 = 10.

    ValueError (from ``bottleneck_size``) when d // reduction_factor < 1.
    """
    m = bottleneck_size(d_model, reduction_factor, bottleneck, what)
    if bottleneck is None and isinstance(n, int) and n >= 1 and m % n:
        m = n * -(-m // n)
    return m


class TanhGELU(nn.Module):
    """transformers' ``gelu_new``, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), computed by torch's
    fused kernel (``F.gelu(approximate="tanh")``: the same formula, equal to float rounding, one op
    forward and one backward instead of about eight and ten)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


def phm_activation(name: str) -> nn.Module:
    """The activation of a PHM adapter by its transformers name; ``gelu_new`` (the official PHM
    adapters' ``non_linearity``) is :class:`TanhGELU`, the others come from :func:`~.adapters.activation`."""
    return TanhGELU() if name == "gelu_new" else activation(name)


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
        path: how :meth:`forward` computes x W: ``"auto"`` (the cheapest for each call's number of
            rows, :func:`cheapest_path`), or ``"dense"`` / ``"left"`` / ``"right"`` (module docstring).
            The result is the same up to float rounding; it can be changed at any time
            (``layer.path = "dense"``).
    """

    def __init__(self, in_features: int, out_features: int, n: int = 4, rank: int | None = 1, bias: bool = True,
                 experts: int = 1, shared_rule: tuple | None = None, rule_init_std: float = 1e-4,
                 expert_init: str = "copy", path: str = "auto", device=None, dtype=None):
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
        self.path = path
        # keep_weight: a dense forward keeps (expert, W) in kept_weight (graph attached), for a loss that
        # needs this call's W (MixPHM's redundancy loss); None after a call that built no W.
        self.keep_weight, self.kept_weight = False, None
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

    @staticmethod
    def _expert(t: torch.Tensor, expert: int) -> torch.Tensor:
        # A layer with one expert drops the dimension by a view: its backward is a view too, where a
        # select's allocates a zero gradient for the whole tensor and copies into it (same values).
        return t.squeeze(0) if t.shape[0] == 1 and expert == 0 else t[expert]

    def blocks(self, expert: int = 0) -> torch.Tensor:
        """B [n, in/n, out/n] of one expert."""
        if self.rank is None:
            return self._expert(self.W, expert)
        # bmm, not @: matmul would reach the same bmm through expand/reshape views (same values).
        return torch.bmm(self._expert(self.S, expert), self._expert(self.T, expert))

    def weight(self, expert: int = 0) -> torch.Tensor:
        """The dense W [in, out] of one expert."""
        return kron_sum(self.rule, self.blocks(expert))

    def bias(self, expert: int = 0) -> torch.Tensor | None:
        return None if self.b is None else self._expert(self.b, expert)

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

    @property
    def path(self) -> str:
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        if value not in PATHS:
            raise ValueError(f"PHM layer: path must be one of {PATHS}, got {value!r}")
        if value in ("left", "right") and self.rank is None:
            raise ValueError(f"PHM layer: path {value!r} needs a factorised B (rank=None is dense only)")
        self._path = value

    def path_for(self, rows: int) -> str:
        """The path :meth:`forward` takes for ``rows`` rows of x."""
        if self._path != "auto":
            return self._path
        return _cheapest(self.in_features, self.out_features, self.n, self.rank, rows)

    def forward(self, x: torch.Tensor, expert: int = 0) -> torch.Tensor:
        n, dt = self.n, x.dtype
        lead, rows = x.shape[:-1], x.numel() // self.in_features
        path = self.path_for(rows)
        b = self.bias(expert)
        b = None if b is None else b.to(dt)
        x2 = x.reshape(rows, self.in_features)
        self.kept_weight = None
        if path == "dense":
            w = self.weight(expert)
            if self.keep_weight:
                self.kept_weight = (expert, w)
            w = w.to(dt)
            y = x2 @ w if b is None else torch.addmm(b, x2, w)
            return y.reshape(*lead, self.out_features)
        s, t, rule = self._expert(self.S, expert), self._expert(self.T, expert), self.rule
        r, p, q = self.rank, self.in_features // n, self.out_features // n
        if path == "left":
            # L[(a c), (b i r)] = A[i, a, b] S_i[c, r];  y[N, b, d] = sum_{i r} (x L)[N, b, i, r] T_i[r, d]
            left = torch.einsum("iab,icr->acbir", rule, s).reshape(self.in_features, n * n * r).to(dt)
            z = (x2 @ left).view(rows * n, n * r)
            y = z @ t.reshape(n * r, q).to(dt)
        else:
            # V[N, a, i, r] = sum_c x[N, a, c] S_i[c, r];  K[(a i r), (b d)] = A[i, a, b] T_i[r, d]
            v = (x2.reshape(rows * n, p) @ s.transpose(0, 1).reshape(p, n * r).to(dt)).view(rows, n * n * r)
            right = torch.einsum("iab,ird->airbd", rule, t).reshape(n * n * r, self.out_features).to(dt)
            y = v @ right if b is None else torch.addmm(b, v, right)
            return y.reshape(*lead, self.out_features)
        y = y.view(rows, self.out_features)
        return (y if b is None else y + b).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        shared = "shared A" if self._shared_rule is not None else "own A"
        path = "" if self._path == "auto" else f", path={self._path!r}"
        return (f"in={self.in_features}, out={self.out_features}, n={self.n}, rank={self.rank}, "
                f"experts={self.experts}, bias={self.b is not None}, {shared}{path}")
