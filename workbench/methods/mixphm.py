"""MixPHM (Jiang & Zheng, CVPR 2023): a mixture of PHM experts, after the official code.

Official code followed (github.com/jingjing12110/MixPHM, ``src/vl_t5/``):

- ``mixphm/phm_moe.py``: ``PHMAdapterMoE`` (the module: shared Down ``MoA_A``, Up experts ``MoA_B``,
  ``Dropout(0.5)``, ``is_r2loss`` returns ``(up, residual)``) and ``PHMExpert`` (random routing in
  training, ``expert_soup`` / ``expert_soup_forward`` for ``inference_level 3``);
- ``compacter/hypercomplex/layers.py`` (+ ``kronecker.py``, ``inits.py``): ``PHMLinear``,
  W = sum_i A_i kron (W_left_i W_right_i), Glorot-uniform with gain sqrt 2, zero bias;
- ``my_transformers/modeling_t5.py``: ``T5LayerFF.forward`` (where the module sits, what it returns)
  and ``T5Stack.forward`` (the decoder: ``R2Loss`` / ``MILoss`` per layer with the stack's
  ``attention_mask``, which is all ones because ``vqa_model.py``'s ``train_step`` passes no
  ``decoder_attention_mask``, and g = ``hidden_states.mean(1)``);
- ``modeling_t5.py``: ``JointEncoder.forward`` (the encoder: input [text; visual], mask
  ``cat([text_mask, vis_mask])``, the same two losses) and ``VLT5.forward`` (the weighting:
  ``red_w * 0.5 * (mean_enc + mean_dec)`` and ``align_w * 0.5 * (mean_enc + mean_dec) * 0.2``);
- ``losses/r2_loss.py``: ``R2Loss`` (redundancy) and ``MILoss`` (JSD mutual information);
- ``train.py``: the trainable set, parameters whose name contains ``phm_adapter_moe`` or
  ``phm_rule`` (``expert_score_weight`` fixed): the visual embedding stays frozen;
- ``trainer_base.py`` / ``param.py`` / ``scripts/vqav2_vlt5_mixphm.sh``: the settings (n 4, rank 8,
  reduction 12, 4 experts, ``--sharing_down 1 --sharing_up 0``, ``--inference_level 3``,
  ``red_w = align_w = 0.2``, lr 5e-3, ``non_linearity = "gelu_new"``, ``phm_init_range 0.01``).

Placement: one module in the FFN sub-layer of every encoder and decoder layer, none on attention.
With f = FFN(LN(x)) the frozen FFN output (the sub-layer output H):

    x' = x + Dropout(f + Delta(f)),    Delta(f) = Up_k(Dropout_0.5(GELU(Down(f)))),

so the module is a sub-layer modification ``(x, h=f) -> f + Delta(f)``; the backbone adds the
dropout and the residual.

PHM experts (``_phm.PHMLinear``): Down (d -> m) and Up (m -> d) are factorised PHM linears,
W = sum_i A_i kron (S_i T_i), n = 4, rank r = 8, m = d // 12. One A [n, n, n] is shared by every
layer, both projections and all experts (global sharing, A ~ N(0, 0.01^2), at
``model.peft_shared["phm_rule"]``); Down is shared by the experts of a module and Up has N_e = 4
experts (local sharing). S, T are Glorot-uniform (gain sqrt 2), biases zero; the official code
builds the experts as deep copies of one layer, so they start identical (``expert_init="copy"``;
``"independent"`` draws each). Activation ``gelu_new``, lr 5e-3.

Bottleneck rounding (the workbench's rule, :func:`~workbench.methods._phm.phm_bottleneck`): the PHM
layers need m to be a multiple of n. When ``bottleneck`` is not given and d // ``reduction_factor`` is
not a multiple of n, m is rounded *up* to the next multiple of n (no warning): vlt5-tiny (d = 128)
gets m = 12 for d // 12 = 10. The official size is kept wherever it is valid (T5-base: m = 64, the
parameter count below is unchanged). An explicit ``bottleneck=`` is never changed (ValueError if it
is not a multiple of n), nor is a d_model that is not a multiple of n. The size in use is
``handle.bottleneck`` (also ``MixPHMConfig.resolved_bottleneck(d_model)`` and each module's repr).

Routing: no gate. In training each module draws one expert uniformly at random per forward call
(the whole batch uses it), from torch's global RNG (so a seed makes it deterministic); the draws are
counted per module (:meth:`MixPHMHandle.draw_counts`). In eval mode the experts are merged once into
one ("expert soup", ``inference_level 3``): ``merge="official"`` averages each stored tensor
separately (S, T, b: the official ``expert_soup`` with ``softmax(expert_score_weight = 0)`` = uniform
weights), ``merge="product"`` averages the products S_i T_i (the mean of the experts' linear maps).
The merged weights are cached and recomputed only when a weight changes, so a merged MixPHM costs
what one adapter of the same bottleneck costs: the cache is keyed on the identity, storage pointer,
``_version`` counter, device and dtype of every source tensor (an optimizer step, an in-place
``copy_`` / ``normal_`` / ``load_state_dict``, ``.to()``, a replaced parameter), and it is also
dropped on every ``train()`` / ``eval()`` call and every ``load_state_dict``. Edits through
``p.data`` bypass the ``_version`` counters: call ``model.eval()`` (or :meth:`MixPHMHandle.merge`,
which always recomputes) after them. (The adapter is non-linear, so it cannot be folded into the
backbone's own weights.)

Losses (``handle.extra_losses()``, computed from what the modules stored during the last *training*
forward; the official code computes them in training only). Each module stores u = Delta(f) (before
its skip) and f. Over the selected tokens of the batch (below):

- redundancy (official ``R2Loss``): row-wise L2-normalise U and F, C = U_hat^T F_hat (d x d),
  L_red = lambda * (1/B) * sum_{i != j} C_ij^2, lambda = 3.9e-3, B = batch size;
- task relevance (official ``MILoss``, Jensen-Shannon / Deep InfoMax): scores s_jb = u_j . g_b with
  g_b the mean-pooled final output of the same stack (encoder or decoder, after its final LayerNorm
  and dropout), positives b = b(j), negatives the other samples:
  L_MI = E_neg[softplus(s) - log 2] - E_pos[log 2 - softplus(-s)];
- total: ``{"redundancy": w_red * 1/2 (mean_enc L_red + mean_dec L_red),
  "mi": w_mi * 0.2 * 1/2 (mean_enc L_MI + mean_dec L_MI)}``, w_red = w_mi = 0.2 (0 drops the term).

Which tokens (config fields; the defaults are the official behaviour, ``"masked"`` the workbench's
earlier one):

- ``encoder_tokens="official"``: per sample, the first ``mask.sum()`` positions (at least 1) of the
  encoder sequence *in VL-T5's order* [text; visual], with mask = the encoder's attention mask
  (``model.context.encoder_mask``: visual + text, after input modifiers). The official code slices
  ``up[i][:seq_len[i]]`` on its [text (right-padded); visual] sequence, so it takes the text
  padding and drops as many trailing visual tokens. On the ``text_first`` layout this is literally
  the official slice; on ``visual_first`` ([visual; text]) the same tokens are selected: the
  positions are ranked text first (every non-visual position, in order), then visual
  (``model.context.inputs.visual_slice``), and the first ``mask.sum()`` of that ranking are taken.
  ``"masked"``: the positions where the encoder's attention mask is 1.
- ``decoder_tokens="official"``: every decoder position, padding included (the official decoder
  stack's mask is all ones: no ``decoder_attention_mask`` is passed); if a 2-D
  ``decoder_attention_mask`` is passed to the forward, the first ``mask.sum()`` positions per sample,
  as the official ``R2Loss`` would slice it. ``"masked"``: that decoder mask when given, otherwise
  the positions whose label is not -100 (``model.context.token_mask("decoder")``).
- ``mi_pool="all"``: g = the mean of the stack's final output over every position, padding included
  (the official ``hidden_states.mean(1)``); ``"masked"``: over the positions of the stack's mask
  (the encoder's attention mask; the decoder mask or ``labels != -100``), whatever the token
  selection.

Trainable set: the MixPHM modules and the shared A only (``OFFICIAL_TRAIN_PROJECTOR = False``: the
official ``train.py`` keeps the visual embedding frozen). ``train_projector=True`` trains it; a
freshly initialised projector always trains (decided in :func:`workbench.methods.base.apply`).

Deliberate departures from the official code:

- Routing and merging: only the scripts' setting is implemented (no gate: random routing in
  training, the uniform expert soup in eval = ``inference_level 3``); the token-, sentence- and
  mean-level inference modes (0-2), the gates and ``ada_alpha`` (1.0 in the scripts) are not.
  ``merge="product"`` is an extra option. The soup is cached instead of rebuilt (with a
  ``deepcopy`` of expert 0) at every eval forward; the values are the same.
- RNG stream: the official ``PHMExpert`` calls ``torch.randint`` also for the single (shared) Down
  expert; the workbench draws only where there is a choice. Each draw is uniform in both, but a
  seed does not reproduce the official sequence of experts (nor does it reproduce its dropout).
- A batch of one: the official ``MILoss`` divides the negative term by ``N * (B - 1) = 0`` (inf or
  nan); here that term is 0.
- Precision: the losses are computed in float32 whatever the model's dtype.
- Where and how they are computed: from tensors the modules keep, after the forward, by
  ``handle.extra_losses()`` (the trainer adds them to the task loss), not inside the stacks'
  ``forward``; the modules of a stack in one batched pass; the redundancy loss through the Up
  projection's factors: u = z W + b, so C = U_hat^T F_hat = W^T ((w z)^T F_hat) + b (w^T F_hat) with
  w = 1 / |u| (``redundancy_loss_factored``, O(N m d) instead of the official O(N d^2), used where
  that is cheaper); the MI negatives as the sum over all scores less the positives'. The values
  and gradients are the same, to float rounding (``tests/methods/test_phm_paths.py``).
- Speed: the PHM layers take the cheapest way of computing x W (``_phm``: W materialised, or A
  folded into S or T), ``gelu_new`` is torch's fused tanh GELU (the same function).
- The encoder mask is the one the VLModel builds (the tokenizer's attention mask + the visual
  mask); the official ``train_step`` derives the text mask as ``input_ids != pad``. They agree for
  right-padded prompts that contain no pad token.
- On the ``visual_first`` layout the official token selection is mapped to the same tokens (above);
  on BART (the official code is T5 only) the module and the losses are applied the same way.

Parameters (T5-base, d 768, m 64): Down 6,720 + 4 x Up 7,424 = 36,416 per module, 24 modules,
+ 64 for A = 874,048.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ._phm import PHMLinear, check_phm_dims, init_rule, phm_activation, phm_bottleneck
from .adapters import activation, lm_dtype, sublayer_points
from .base import MethodConfig, MethodHandle, freeze_backbone, register_method

LOG2 = math.log(2.0)


# ------------------------------------------------------------------------------------ the losses
def redundancy_loss(u: torch.Tensor, f: torch.Tensor, batch_size: int, lam: float = 3.9e-3) -> torch.Tensor:
    """L_red = lam / B * sum_{i != j} C_ij^2, C = normalize(U)^T normalize(F), rows = the selected tokens.

    ``u``, ``f``: ``[N, d]`` (the selected tokens of a batch of ``batch_size`` samples), or ``[M, N, d]``
    for M modules at once (then one loss per module, ``[M]``).
    """
    u_hat = F.normalize(u.float(), dim=-1)
    f_hat = F.normalize(f.float(), dim=-1)
    c = u_hat.transpose(-2, -1) @ f_hat
    off_diagonal = c.pow(2).sum((-2, -1)) - torch.diagonal(c, dim1=-2, dim2=-1).pow(2).sum(-1)
    return lam * off_diagonal / batch_size


def redundancy_loss_factored(u: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             f: torch.Tensor, batch_size: int, lam: float = 3.9e-3) -> torch.Tensor:
    """:func:`redundancy_loss` of ``u = z weight + bias`` (the Up projection's output), in O(N m d)
    instead of O(N d^2): the same value and gradients, to float rounding.

    With w_n = 1 / max(|u_n|, eps) (what ``F.normalize`` divides by), U_hat = diag(w) (z W + 1 b^T), so
    C = U_hat^T F_hat = W^T ((w z)^T F_hat) + b (w^T F_hat): an [m, N] x [N, d] product and a
    [d, m] x [m, d] one instead of [d, N] x [N, d] (m, the bottleneck, is d / 12 in MixPHM).
    ``u``, ``f``: ``[..., N, d]``; ``z``: ``[..., N, m]``; ``weight``: ``[..., m, d]``; ``bias``: ``[..., d]``.
    """
    u, z, f, weight = u.float(), z.float(), f.float(), weight.float()
    inv = 1.0 / torch.linalg.vector_norm(u, dim=-1, keepdim=True).clamp_min(1e-12)  # [..., N, 1]
    f_hat = F.normalize(f, dim=-1)
    c = weight.transpose(-2, -1) @ ((z * inv).transpose(-2, -1) @ f_hat)  # [..., d, d]
    if bias is not None:
        c = c + bias.float().unsqueeze(-1) * (inv.transpose(-2, -1) @ f_hat)
    off_diagonal = c.pow(2).sum((-2, -1)) - torch.diagonal(c, dim1=-2, dim2=-1).pow(2).sum(-1)
    return lam * off_diagonal / batch_size


def factored_is_cheaper(rows: int, d: int, m: int) -> bool:
    """Whether :func:`redundancy_loss_factored` needs fewer multiply-adds than :func:`redundancy_loss`
    for ``rows`` tokens, width d and bottleneck m (N m d + d^2 (m + 1) against N d^2)."""
    return rows * m * d + d * d * (m + 1) < rows * d * d


def jsd_mi_loss(u: torch.Tensor, g: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon MI lower bound as a loss: E_neg[softplus(s) - log 2] - E_pos[log 2 - softplus(-s)].

    ``u``: ``[N, d]`` token representations (or ``[M, N, d]``: M modules at once, one loss each),
    ``g``: ``[B, d]`` pooled sample representations, ``owner``: ``[N]`` the sample of each token.
    s = u g^T; (j, owner[j]) are the positives. With one sample there are no negatives and that term
    is 0 (the official code divides by zero).
    """
    s = u.float() @ g.float().T  # [..., N, B]
    n, b = s.shape[-2:]
    # One positive per row, gathered; the negatives' sum is the sum over every entry less the positives'
    # (no boolean masks: fewer ops forward and backward, the same terms up to float rounding).
    s_pos = s.gather(-1, owner.unsqueeze(-1).expand(*s.shape[:-1], 1))
    e_pos = (LOG2 - F.softplus(-s_pos)).mean((-2, -1))
    if b < 2:
        return -e_pos
    e_neg = (F.softplus(s).sum((-2, -1)) - F.softplus(s_pos).sum((-2, -1))) / (n * (b - 1)) - LOG2
    return e_neg - e_pos


def pool(final: torch.Tensor, valid: torch.Tensor | None, mode: str = "all") -> torch.Tensor:
    """Mean over the sequence of ``final`` [B, L, d]: over every position (``"all"``, the official
    ``hidden_states.mean(1)``) or over the positions where ``valid`` is true (``"masked"``)."""
    if mode == "all" or valid is None:
        return final.mean(1)
    w = valid.to(final.dtype).unsqueeze(-1)
    return (final * w).sum(1) / w.sum(1).clamp(min=1.0)


# ------------------------------------------------------------------------------------ token selection
def prefix_tokens(mask: torch.Tensor, length: int | None = None, rank: torch.Tensor | None = None) -> torch.Tensor:
    """The official selection: per sample i, the first ``max(mask[i].sum(), 1)`` positions, as a bool [B, L].

    This is ``R2Loss`` / ``MILoss``'s ``x[i][:seq_len[i]]`` with ``seq_len = clamp(mask.sum(-1), min=1)``.
    ``rank`` ([L], a permutation) orders the positions first (position p is the ``rank[p]``-th); by
    default the sequence order.
    """
    length = mask.shape[1] if length is None else length
    counts = mask.long().sum(-1).clamp(min=1)
    if rank is None:
        rank = torch.arange(length, device=mask.device)
    return rank.to(mask.device).unsqueeze(0) < counts.unsqueeze(1)


def vlt5_rank(length: int, visual: slice | None, device=None) -> torch.Tensor:
    """``rank[p]``: where position p of an encoder sequence comes in VL-T5's order [text; visual].

    The text (every position outside ``visual``) keeps its order and comes first, then the visual
    tokens in their order. On a ``text_first`` sequence this is the identity.
    """
    positions = torch.arange(length, device=device)
    if visual is None:
        return positions
    is_visual = (positions >= visual.start) & (positions < visual.stop)
    order = torch.cat([positions[~is_visual], positions[is_visual]])  # order[j] = the j-th position
    rank = torch.empty_like(order)
    rank[order] = torch.arange(length, device=device)
    return rank


# ------------------------------------------------------------------------------------ the module
class MixPHMModule(nn.Module):
    """One MixPHM module, ``(x, h=f) -> f + Delta(f)`` (see the module docstring)."""

    def __init__(self, d_model: int, bottleneck: int, n: int, rank: int | None, num_experts: int, shared_side: str,
                 shared_rule: tuple, act: str = "gelu_new", dropout: float = 0.5, expert_init: str = "copy",
                 merge: str = "official", device=None, dtype=None):
        super().__init__()
        kw = {"n": n, "rank": rank, "shared_rule": shared_rule, "expert_init": expert_init,
              "device": device, "dtype": dtype}
        self.down = PHMLinear(d_model, bottleneck, experts=1 if shared_side == "down" else num_experts, **kw)
        self.act = phm_activation(act)  # gelu_new: torch's fused tanh GELU (the same function)
        self.dropout = nn.Dropout(dropout)
        self.up = PHMLinear(bottleneck, d_model, experts=1 if shared_side == "up" else num_experts, **kw)
        # Draw counts: buffers so they follow .to(); not persistent (they are statistics, not weights).
        self.register_buffer("down_draws", torch.zeros(self.down.experts, dtype=torch.long, device=device),
                             persistent=False)
        self.register_buffer("up_draws", torch.zeros(self.up.experts, dtype=torch.long, device=device),
                             persistent=False)
        self.bottleneck = bottleneck
        self.merge_mode = merge
        # What eval mode computes: "soup" (the merged expert, the official inference), "outputs" (the
        # average of the experts' outputs) or an int k (expert k alone). Set by MixPHMHandle.inference.
        self.eval_route: str | int = "soup"
        self.record = False  # the handle turns this on when a loss needs (u, f)
        self.last = None  # (u, f) of the last training forward, when recording
        self.last_up = None  # (z, expert): the Up projection's input and expert in that forward
        self._soup = None  # (key, Wd, bd, Wu, bu)

    # --- routing --------------------------------------------------------------------------------
    def _draw(self, layer: PHMLinear, counts: torch.Tensor) -> int:
        if layer.experts == 1:
            return 0
        k = int(torch.randint(layer.experts, (1,)))  # torch's global CPU RNG: deterministic for a seed
        counts[k] += 1
        return k

    # --- the expert soup ------------------------------------------------------------------------
    def _sources(self) -> list:
        return [*self.parameters(), self.down.rule]

    def _soup_key(self) -> tuple:
        # id(p) as well as the pointer: a replaced parameter may reuse a freed address and version.
        return (self.merge_mode,) + tuple((id(p), p.data_ptr(), p._version, str(p.device), p.dtype)
                                          for p in self._sources())

    def soup(self, refresh: bool = False) -> tuple:
        """Merged (W_down, b_down, W_up, b_up); cached while no weight changes and no grad is needed.

        The cache is dropped by ``train()`` / ``eval()`` and ``load_state_dict`` and rebuilt when a
        source tensor's identity, pointer, ``_version``, device or dtype changes; ``refresh=True``
        rebuilds it unconditionally (after edits through ``p.data``, which no counter sees).
        """
        if torch.is_grad_enabled() and any(p.requires_grad for p in self._sources()):
            return (*self.down.merged(self.merge_mode), *self.up.merged(self.merge_mode))
        key = self._soup_key()
        if refresh or self._soup is None or self._soup[0] != key:
            with torch.no_grad():
                self._soup = (key, *self.down.merged(self.merge_mode), *self.up.merged(self.merge_mode))
        return self._soup[1:]

    def train(self, mode: bool = True):
        # Every train()/eval() call drops the soup: an eval() after any weight edit (even one through
        # p.data, invisible to the version counters) merges the current experts.
        self._soup = None
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self._soup = None
        return super()._load_from_state_dict(*args, **kwargs)

    def delta(self, f: torch.Tensor) -> torch.Tensor:
        """Delta(f): a randomly drawn expert in training, the merged soup in eval."""
        if self.training:
            z = self.down(f, self._draw(self.down, self.down_draws))
            z = self.dropout(self.act(z))
            k = self._draw(self.up, self.up_draws)
            self.up.keep_weight = self.record  # the redundancy loss reuses this call's Up weight
            self.last_up = (z, k) if self.record else None
            return self.up(z, k)
        self.last_up = self.up.kept_weight = None
        if self.eval_route != "soup":
            return self._routed(f)
        wd, bd, wu, bu = self.soup()
        z = f @ wd.to(f.dtype)
        z = self.act(z + bd.to(f.dtype) if bd is not None else z)
        u = z @ wu.to(f.dtype)
        return u + bu.to(f.dtype) if bu is not None else u

    def _routed(self, f: torch.Tensor) -> torch.Tensor:
        """Eval without the soup: one expert (k; k is taken modulo a layer's experts, so a shared
        projection uses its only one) or the mean of the experts' outputs (pairing expert k of Down
        with expert k of Up when both have experts)."""
        n = max(self.down.experts, self.up.experts)
        ks = [self.eval_route] if isinstance(self.eval_route, int) else range(n)
        out = 0.0
        for k in ks:
            z = self.act(self.down(f, k % self.down.experts))
            out = out + self.up(z, k % self.up.experts)
        return out / len(ks)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        u = self.delta(h)
        self.last = (u, h) if (self.training and self.record) else None
        return h + u

    def extra_repr(self) -> str:
        return f"bottleneck={self.bottleneck}, merge={self.merge_mode!r}"


# ------------------------------------------------------------------------------------ config
@dataclass
class MixPHMConfig(MethodConfig):
    """MixPHM's options; the defaults are the official scripts' (``scripts/vqav2_vlt5_mixphm.sh``).

    Architecture:
        num_experts: N_e (4). n: PHM divisions (4). rank: rank of B_i = S_i T_i (8; ``None``: an
        unfactorised B_i). reduction_factor: m = d // 12, rounded up to the next multiple of n when
        it is not one (d = 128: 10 -> 12; see :meth:`resolved_bottleneck`); bottleneck: m directly
        (overrides it; must be a multiple of n, never rounded).
        shared_side: the projection the experts share, ``"down"`` (official ``--sharing_down 1
        --sharing_up 0``), ``"up"`` or ``"none"``. rule_init_std: A ~ N(0, 0.01^2).
        expert_init: ``"copy"`` (official: the experts are deep copies, identical at the start) or
        ``"independent"``. activation: ``"gelu_new"``. dropout: inside Delta (0.5).
        merge: the eval-time expert soup, ``"official"`` (average S, T and b separately) or
        ``"product"`` (average the products S T: the mean of the experts' maps).

    Auxiliary losses (see the module docstring for the formulas):
        w_red, w_mi: the weights (0.2 each, official ``red_w`` / ``align_w``; 0 drops the term).
        red_lambda: lambda of the redundancy loss (3.9e-3).
        encoder_tokens: which encoder tokens the two losses use.
            ``"official"`` (default): per sample the first ``mask.sum()`` positions of the sequence in
            VL-T5's order [text; visual] (text padding in, the last visual tokens out), whatever the
            model's layout. ``"masked"``: the positions of the encoder's attention mask.
        decoder_tokens: which decoder tokens. ``"official"`` (default): every position, padding
            included (the first ``mask.sum()`` if a ``decoder_attention_mask`` is passed).
            ``"masked"``: the decoder mask when given, else the positions whose label is not -100.
        mi_pool: how g (the MI term's pooled stack output) is pooled. ``"all"`` (default): over every
            position, padding included (official ``hidden_states.mean(1)``). ``"masked"``: over the
            positions of the stack's mask.

    Training: lr 5e-3 (official). The visual projector stays frozen (official ``train.py``);
    ``train_projector=True`` trains it (a freshly initialised projector always trains).
    """

    OFFICIAL_TRAIN_PROJECTOR: ClassVar[bool] = False

    num_experts: int = 4
    n: int = 4
    rank: int | None = 8
    reduction_factor: int = 12  # m = d // 12 (64 for d = 768), rounded up to a multiple of n if it is not one
    bottleneck: int | None = None  # overrides reduction_factor
    shared_side: str = "down"  # the projection shared by the experts: "down" (official), "up", "none"
    rule_init_std: float = 0.01
    expert_init: str = "copy"  # "copy": experts start identical (official deepcopy); "independent"
    activation: str = "gelu_new"
    dropout: float = 0.5
    merge: str = "official"  # eval-time expert soup: "official" (average S, T, b) or "product" (average S T)
    w_red: float = 0.2
    w_mi: float = 0.2
    red_lambda: float = 3.9e-3
    encoder_tokens: str = "official"  # "official": first mask.sum() in [text; visual] order; "masked"
    decoder_tokens: str = "official"  # "official": every position; "masked": decoder mask / labels != -100
    mi_pool: str = "all"  # "all": official mean over every position; "masked": over the stack's mask
    lr: float = 1e-2  # tuned on vlt5-tiny (the official recipe: 5e-3 on T5-base; docs/methods.md)

    def validate(self):
        super().validate()
        for name in ("num_experts", "n"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"mixphm: {name} must be a positive int, got {v!r}")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"mixphm: rank must be a positive int (or None for a full B_i), got {self.rank!r}")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ValueError(f"mixphm: reduction_factor must be a positive int, got {self.reduction_factor!r}")
        if self.bottleneck is not None and (not isinstance(self.bottleneck, int) or self.bottleneck < 1):
            raise ValueError(f"mixphm: bottleneck must be a positive int or None, got {self.bottleneck!r}")
        choices = {"shared_side": ("down", "up", "none"), "expert_init": ("copy", "independent"),
                   "merge": ("official", "product"), "mi_pool": ("all", "masked"),
                   "encoder_tokens": ("official", "masked"), "decoder_tokens": ("official", "masked")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"mixphm: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("w_red", "w_mi", "red_lambda", "rule_init_std"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                raise ValueError(f"mixphm: {name} must be a number >= 0, got {v!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"mixphm: dropout must be in [0, 1), got {self.dropout!r}")
        activation(self.activation)

    def resolved_bottleneck(self, d_model: int) -> int:
        """The bottleneck m on a model of width ``d_model``: ``bottleneck`` if set, else d // 12 rounded
        up to the next multiple of n (:func:`~workbench.methods._phm.phm_bottleneck`)."""
        return phm_bottleneck(d_model, self.reduction_factor, self.bottleneck, self.n, "mixphm")


# ------------------------------------------------------------------------------------ the handle
class MixPHMHandle(MethodHandle):
    """The MixPHM handle: routing statistics, the expert soup, and the two auxiliary losses.

    ``bottleneck``: the bottleneck m in use (after the rounding rule of the module docstring).
    """

    def __init__(self, model, config: MixPHMConfig, modules: dict, stacks: dict, bottleneck: int | None = None):
        super().__init__(model, config, modules)
        self.stacks = stacks  # point name -> "encoder" | "decoder"
        self.bottleneck = bottleneck

    def draw_counts(self) -> dict[str, torch.Tensor]:
        """How often each expert was drawn in training, per module.

        Keys are the insertion points (``"encoder.0.ffn"``, ...) when one projection has experts (the
        default: Up), ``"<point>.down"`` / ``"<point>.up"`` when both have (``shared_side="none"``).
        """
        out = {}
        for point, mod in self.modules.items():
            sides = [(s, getattr(mod, f"{s}_draws")) for s in ("down", "up") if getattr(mod, s).experts > 1]
            for side, counts in sides:
                out[point if len(sides) == 1 else f"{point}.{side}"] = counts.detach().cpu().clone()
        return out

    def inference(self, route: str | int = "soup") -> None:
        """What the modules compute in eval mode (training is unchanged: a random expert per forward).

        ``"soup"``: the merged expert under ``config.merge`` (the official inference, the default);
        ``"outputs"``: the average of the experts' outputs (with a shared Down and a linear Up this
        equals ``merge="product"``'s soup); an int k: expert k alone (``0 <= k < num_experts``).
        """
        if isinstance(route, bool) or not (route in ("soup", "outputs") or isinstance(route, int)):
            raise ValueError(f"inference route must be 'soup', 'outputs' or an expert index, got {route!r}")
        if isinstance(route, int) and not 0 <= route < self.config.num_experts:
            raise ValueError(f"expert index must be in [0, {self.config.num_experts}), got {route}")
        for mod in self.modules.values():
            mod.eval_route = route

    def reset_draw_counts(self) -> None:
        for mod in self.modules.values():
            mod.down_draws.zero_()
            mod.up_draws.zero_()

    def merge(self) -> None:
        """(Re)compute the expert soup of every module from the current weights (eval mode uses it; the
        backbone is unchanged: the adapter is non-linear, so there is nothing to fold into the frozen
        weights). Always recomputes, so it also picks up edits made through ``p.data``."""
        with torch.no_grad():
            for mod in self.modules.values():
                mod.soup(refresh=True)

    def stack_mask(self, stack: str, batch: int, length: int) -> torch.Tensor | None:
        """The stack's mask from the forward context (``"masked"`` selection and pooling), or ``None``.

        Encoder: its attention mask; decoder: the ``decoder_attention_mask`` when one was passed,
        else ``labels != -100`` (:meth:`~workbench.models.context.ForwardContext.token_mask`).
        """
        mask = self.model.context.token_mask(stack, batch, length)
        return None if mask is None else mask.bool()

    def selected_tokens(self, stack: str, batch: int, length: int, device=None) -> torch.Tensor:
        """Bool ``[batch, length]``: the tokens of ``stack`` the losses use under this config's
        ``encoder_tokens`` / ``decoder_tokens`` (see :class:`MixPHMConfig`)."""
        ctx = self.model.context
        mode = self.config.encoder_tokens if stack == "encoder" else self.config.decoder_tokens
        if mode == "masked":
            mask = self.stack_mask(stack, batch, length)
            out = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask
        elif stack == "encoder":
            mask = ctx.token_mask("encoder", batch, length)
            if mask is None:  # no mask known: every position is valid, the prefix is the sequence
                mask = torch.ones(batch, length, dtype=torch.long)
            inputs = ctx.inputs
            visual = inputs.visual_slice if inputs is not None and inputs.embeds.shape[1] == length else None
            out = prefix_tokens(mask, length, vlt5_rank(length, visual, mask.device))
        else:
            # The official decoder stack's mask: the decoder_attention_mask if one is passed, else ones.
            dec = ctx.decoder_mask
            if isinstance(dec, torch.Tensor) and dec.dim() == 2 and dec.shape[0] == batch and dec.shape[1] >= length:
                out = prefix_tokens(dec[:, -length:], length)
            else:
                out = torch.ones(batch, length, dtype=torch.bool)
        out = out.bool()
        return out if device is None else out.to(device)

    @staticmethod
    def _up_factors(mod):
        """(z, W, b) with u = z W + b for the module's last training forward, or None (not recorded).
        W is the one the forward built (dense path), else built here (a fold path never forms it)."""
        if mod.last_up is None:
            return None
        z, k = mod.last_up
        kept = mod.up.kept_weight
        w = kept[1] if kept is not None and kept[0] == k else mod.up.weight(k)
        return z, w, mod.up.bias(k)

    def extra_losses(self) -> dict[str, torch.Tensor]:
        """``{"redundancy": ..., "mi": ...}`` from the last training forward (``{}`` if there is none)."""
        cfg = self.config
        # The modules of a stack see the same tokens: their (u, f) are stacked and the per-module losses
        # computed in one batched pass (a handful of ops per stack instead of per module; each module's
        # loss is the same as computed alone, up to float rounding). The redundancy loss goes through the
        # Up projection's factors (u = z W + b, redundancy_loss_factored) where that is cheaper.
        groups: dict[tuple, list] = {}
        for point, mod in self.modules.items():
            if mod.last is None:
                continue
            u, f = mod.last
            factors = self._up_factors(mod)
            key = (self.stacks[point], tuple(u.shape), tuple(f.shape),
                   None if factors is None else (tuple(factors[0].shape), factors[2] is None))
            groups.setdefault(key, []).append((u, f, factors))
        if not groups:
            return {}
        per_stack = {"encoder": {"red": [], "mi": []}, "decoder": {"red": [], "mi": []}}
        selections, pooled = {}, {}
        for (stack, u_shape, _, factored), pairs in groups.items():
            b, length = u_shape[:2]
            device = pairs[0][0].device
            if (stack, b, length) not in selections:
                # The selected rows of the flattened [b * length, d] tokens (row-major, as u[sel] takes them;
                # None: every row) and the sample each of them belongs to.
                flat = self.selected_tokens(stack, b, length, device).reshape(-1)
                rows = None if bool(flat.all()) else flat.nonzero().squeeze(1)
                owner = (torch.arange(b * length, device=device) if rows is None else rows) // length
                selections[(stack, b, length)] = (rows, owner)
            rows, owner = selections[(stack, b, length)]
            uu = torch.stack([u.reshape(b * length, -1) for u, _, _ in pairs])  # [M, b * length, d]
            ff = torch.stack([f.reshape(b * length, -1) for _, f, _ in pairs])
            if rows is not None:
                uu, ff = uu.index_select(1, rows), ff.index_select(1, rows)
            if cfg.w_red > 0:
                n_rows, d = uu.shape[1:]
                if factored is not None and factored_is_cheaper(n_rows, d, factored[0][-1]):
                    zz = torch.stack([z.reshape(b * length, -1) for _, _, (z, _, _) in pairs])
                    if rows is not None:
                        zz = zz.index_select(1, rows)
                    ww = torch.stack([w for _, _, (_, w, _) in pairs])
                    bb = None if factored[1] else torch.stack([bias for _, _, (_, _, bias) in pairs])
                    red = redundancy_loss_factored(uu, zz, ww, bb, ff, b, cfg.red_lambda)
                else:
                    red = redundancy_loss(uu, ff, b, cfg.red_lambda)
                per_stack[stack]["red"].append(red)
            final = getattr(self.model.context, f"{stack}_output")
            if cfg.w_mi > 0 and final is not None:
                if stack not in pooled:
                    mask = self.stack_mask(stack, b, final.shape[1]) if cfg.mi_pool == "masked" else None
                    pooled[stack] = pool(final, None if mask is None else mask.to(final.device), cfg.mi_pool)
                per_stack[stack]["mi"].append(jsd_mi_loss(uu, pooled[stack], owner))

        def half_sum(key):
            # The mean over a stack's modules, then 1/2 (mean_enc + mean_dec).
            terms = [torch.cat(per_stack[s][key]).mean() for s in ("encoder", "decoder") if per_stack[s][key]]
            return 0.5 * torch.stack(terms).sum() if terms else None

        out = {}
        red, mi = half_sum("red"), half_sum("mi")
        if cfg.w_red > 0 and red is not None:
            out["redundancy"] = cfg.w_red * red
        if cfg.w_mi > 0 and mi is not None:
            out["mi"] = cfg.w_mi * 0.2 * mi
        return out


@register_method("mixphm", MixPHMConfig, family="layer: PHM adapters", main_knob=("num_experts", (1, 2, 4, 8)))
def apply_mixphm(model, config: MixPHMConfig) -> MethodHandle:
    d = model.d_model
    m = config.resolved_bottleneck(d)  # d // 12, rounded up to a multiple of n (an explicit bottleneck: as is)
    check_phm_dims(d, m, config.n, "mixphm down-projection (d_model -> bottleneck)")
    points = sublayer_points(model, ("ffn",))
    # Everything is valid: now change the model.
    freeze_backbone(model)
    dtype = lm_dtype(model)
    model.peft_shared = nn.ParameterDict({"phm_rule": init_rule(config.n, config.rule_init_std, model.device, dtype)})
    shared = (model.peft_shared, "phm_rule")
    modules, stacks = {}, {}
    for point in points:
        mod = MixPHMModule(d, m, config.n, config.rank, config.num_experts, config.shared_side, shared,
                           act=config.activation, dropout=config.dropout, expert_init=config.expert_init,
                           merge=config.merge, device=model.device, dtype=dtype)
        mod.record = config.w_red > 0 or config.w_mi > 0
        model.add_sublayer_modification(point.name, mod, name="mixphm")
        modules[point.name], stacks[point.name] = mod, point.stack
    return MixPHMHandle(model, config, modules, stacks, bottleneck=m)
