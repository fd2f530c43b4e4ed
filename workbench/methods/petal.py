"""PETAL (Zhai et al., arXiv 2312.12458), in two variants: ``"paper"`` and ``"released"``.

``variant="paper"`` (the default) is **the workbench's reading of the paper**: the public code has
neither the gate, nor the learnable threshold, nor the information-bottleneck loss that the paper
describes. ``variant="released"`` reproduces **the released code** instead (melonking32/PETAL,
LAVIS InstructBLIP: ``lavis/models/blip2_models/Qformer_PETAL_MOE.py``, where the updates and the
experts act, and ``lavis/models/blip2_models/blip2_t5_instruct_petal_moe.py``, which owns the
shared factors; ``train.py`` decides what trains), mapped from the Q-Former onto the workbench's
encoder-decoder. Both are registered under the one name ``petal`` (docs/methods.md#petal).

**variant="paper"**: three parts, all trainable, the backbone frozen (the visual projector
trains, as in every method):

1. **Dynamic mode approximation** (projection modifications on the ``q k v o`` projections of every
   attention: encoder self-attention, decoder self- and cross-attention). The J updates are the
   slices of one tensor in CP form::

       Delta W_j = U diag(lambda * p_j * gate) V^T,    gate_r = sigmoid((|lambda_r| - Gamma) / tau)

   U (out x R) and V (in x R) are shared by every targeted matrix (one pair per distinct
   (in, out) shape: a single pair when the attention inner width equals d_model, as in T5/BART-base),
   p_j in R^R belongs to matrix j, lambda in R^R are the mode strengths and Gamma a learnable
   threshold: a mode whose strength falls below Gamma is softly switched off.
   ``handle.modes_on()`` counts the modes with gate > 0.5 (|lambda_r| > Gamma). The projection
   becomes ``y + scale * x V diag(lambda * p_j * gate) U^T``. Option ``form="tucker"``: a full core
   G (R x R x R), as the released code's ``CP_C``, with
   ``Delta W_j = U [sum_c G[:, :, c] (lambda * p_j * gate)_c] V^T`` (the gate acts on the
   per-matrix mode; the CP form is the superdiagonal core, which is G's initial value).
   Init: U, V ~ N(0, 1/dim) (unit-norm columns on average), lambda = 1, Gamma = 0.5, p_j = 0,
   so Delta W = 0 at step 0.
2. **Adaptive instruction mixture of experts** (an input modifier, ``model.add_input_modifier``).
   The batch holds the prompt only as token ids, so the "M instruction templates" are realised as
   M *learned* instruction embeddings T_m (``template_len`` vectors each, initialised from random
   token embeddings): the question rendered with template m is pooled as the masked mean over
   ``[T_m ; question tokens]``, e_m. K experts (low-rank MLPs d -> r -> d, GELU, zero-initialised
   up-projections) read the M renderings, o_k = mean_m E_k(e_m); a gate
   ``softmax(W_g [pooled visual ; mean_m e_m])`` weighs them; the mixture mu = sum_k g_k o_k is
   added to every (valid) text token embedding. The last routing probabilities [batch, K] are
   ``handle.routing_probs()`` (feed them to ``workbench.probes.routing_stats(probs=...)``).
3. **Score-based information bottleneck**. Attention scores between the mixed instruction mu and
   the mixed text tokens x~_i (s_i = <mu, x~_i> / sqrt(d), softmax over the valid text tokens) pool
   t = sum_i a_i x~_i; a Gaussian encoder q(z|t) = N(m(t), diag exp(logvar(t))) gives z
   (reparameterised in training, the mean in eval); a head maps z to d_model and scores it against
   the frozen output embedding of the LM (tied classifier, no vocabulary-sized parameters).
   ``L_IB = CE(head(z), y) + beta * KL(q(z|t) || N(0, I))`` (variational IB, the textbook
   ``CE(head(t), y)`` with the head on the sampled code). y is the *first content token of the
   answer*: the first label that is not -100 and not a special token (BART's labels start with
   <s>), read from the model's forward context (``model.context.labels``).
   ``handle.extra_losses()`` returns ``{"ib": w_ib * L_IB}`` after a forward with labels (``{}``
   otherwise), so the total is ``L = L_task + w_ib * L_IB``; with ``w_gate > 0`` also
   ``{"gate": w_gate * mean(gate)}``, an optional L1 push that lets the threshold switch modes off.

Defaults (the workbench's choice; the paper gives no values for our backbones): R = 64 modes,
tau = 0.1, Gamma_0 = 0.5, scale 1, M = 4 templates of 4 vectors, K = 4 experts of rank 16,
z_dim = 32, beta = 1e-3, w_ib = 0.1, w_gate = 0, lr 3e-3 (tuned on vlt5-tiny). At step 0 the model's outputs are those
of the backbone (p_j = 0 and zero expert up-projections).

Parameters: shared U, V (in + out) R per shape group, lambda R, Gamma 1, (Tucker: R^3); p_j R per
targeted matrix; MoE M L d + K (2 d r) + 2 d K + K; IB (d + 1) 2 z + (z + 1) d. On T5-base
(d 768, 144 attention matrices): 98,304 + 65 + 9,216 mode parameters, 12,288 + 98,304 + 6,148 MoE,
49,216 + 25,344 IB.

**variant="released"**: what the released code computes, no gate, no threshold, no loss of its own
(``handle.extra_losses()`` is always ``{}``):

1. **Mode approximation on q, k, v** (``BertSelfAttention``: the query of every attention, the key
   and value of every attention; the output projection is left alone). Two factor sets, each a
   ``U`` (``CP_U = Linear(in, R, bias=False)``, PyTorch's default init), a ``V``
   (``CP_V = Linear(R, out, bias=False)``, zeros) and a full core ``C`` (R x R x R, Xavier-uniform):
   the ``"self"`` set (the code's ``CP_U, CP_V, CP_C``) for the projections that read the
   attention's own stream (self-attention q k v, cross-attention q), the ``"cross"`` set (the
   code's ``CP_U_Image, CP_V_Image, CP_C_Image``, which read the image features in the Q-Former)
   for the cross-attention k and v, which read the encoder output here. Each targeted matrix j has
   its own ``p_j`` (the code's ``q_CP`` / ``k_CP`` / ``v_CP``, R x 1, Xavier-uniform). The
   projection becomes::

       y + scale * V( dropout(U x) @ M_j ),    M_j = (C @ p_j)[:, :, 0],  M_j[a, b] = sum_c C[a, b, c] p_j[c]

   i.e. ``Delta W_j = scale * V M_j^T U`` (dropout 0.1 on ``U x``, the code's ``self.dp``; one
   draw per projection call). Delta W = 0 at step 0 (V = 0). ``merge`` folds it in.
2. **Uniform instruction mixture** (``BertModel.forward``, on the embedding output)::

       e' = 0.6 e + 0.4 * (1/K) sum_k B_k(A_k(e)),   A_k = Linear(d, r), B_k = Linear(r, d)

   K = 6 affine experts of rank r = 64 (no activation in between; weights N(0, 0.02) and zero
   biases, BERT's ``_init_weights``), averaged with fixed weights 1/K: no gate, no routing
   probabilities. Here it is an input modifier on the text (prompt) tokens of the encoder input,
   found with ``inputs.text_slice`` so that both layouts work.

Options of variant ``"released"`` (defaults = the released code): ``rank`` (64), ``targets``
(``("q", "k", "v")``, a subset of them), ``scale`` (1), ``mode_dropout`` (0.1), ``moe`` (True),
``n_experts`` (6), ``expert_rank`` (64), ``embed_weight`` (0.6), ``expert_weight`` (0.4), ``lr``.
The paper's options (``form tau threshold_init n_templates template_len z_dim beta w_ib w_gate``)
do not apply and raise a ValueError when set; so do the released ones under ``"paper"``. Options
whose default depends on the variant (``targets``, ``n_experts``, ``expert_rank``) and those that
belong to one variant default to ``None`` in the signature and are filled in by the variant.

Parameters (released): per factor set (in + out) R + R^3 (per distinct shape for U, V); R per
targeted matrix; K (2 d r + r + d) experts. On T5-base (d 768, 108 q/k/v matrices, 24 of them
cross-attention k/v): 2 x (98,304 + 262,144) + 6,912 + 594,816 = 1,322,624.

Deliberate departures of ``"released"`` from the released code (what the mapping cannot keep, or
keeps out on purpose):

- *Where*: the code adapts InstructBLIP's Q-Former (BERT, post-LN) in front of a frozen FlanT5; here
  the updates sit in the LM's own attentions (encoder self, decoder self and cross) and the
  mixture on the encoder's text tokens. The "cross" factor set reads the encoder output (d_model
  wide) where the code's reads the ViT features (1408 wide).
- *Which tokens*: the code mixes every Q-Former input position, the 32 learned query tokens and the
  instruction tokens (padding included); here the valid text tokens only (visual tokens and
  padding keep their embeddings; padding is masked out of attention in both cases).
- *Not reproduced*: the code also trains, under names containing ``CP``, a per-layer scale/shift
  residual ``layer_output += 0.1 (a * CP_scaleself + CP_shiftself)`` (a = the self-attention
  block's output; ``CP_scalecross``/``CP_shiftcross`` are created and set trainable, but their term
  is commented out, so they never change), and adds ``0.1 x`` the *batch mean* of the first query token's self-attention
  output to the cross-attention output of that token (``All_Context``, no parameters, couples the
  examples of a batch). Neither is part of the paper's method nor maps onto the insertion points
  (the residual skips the FFN sub-layer and its post-LN in BART); both are left out.
- *Cached decoding*: the code skips the update of k, v in self-attention when it reuses a key/value
  cache (a branch the Q-Former never takes in InstructBLIP); here every computed k, v is updated.
- *Init under from_pretrained*: the code's per-matrix vectors are created inside
  ``BertLMHeadModel.from_pretrained``; depending on the transformers version, its skip-init context
  may leave them at their ``torch.zeros`` value (with V = 0 the update would then receive no
  gradient). The workbench applies the init the code writes (Xavier-uniform).
- *Projector and learning rate*: ``train.py`` (in the repository's ``PETAL_v3.zip``) trains only the
  parameters whose name contains ``CP`` or ``Expert`` (the Q-Former, its query tokens and
  ``t5_proj`` stay frozen); so ``"released"`` keeps a pre-trained projector frozen too
  (``train_projector=True`` trains it; a freshly initialised one always trains). The
  code's lr (2e-5, cosine, weight decay 0.02 on FlanT5-XXL,
  ``lavis/projects/blip2/train/aurora_mixture/``) is not the default; ``lr`` stays the tuned 3e-3.
- At step 0 the released variant does *not* compute the backbone's function: the text embeddings
  are scaled by 0.6 (plus a small random expert term), as in the code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from .base import MethodConfig, MethodHandle, freeze_backbone, register_method

FORMS = ("cp", "tucker")
VARIANTS = ("paper", "released")
ATTENTION_SUBLAYERS = ("attn", "self_attn", "cross_attn")
PROJECTIONS = ("q", "k", "v", "o")
RELEASED_PROJECTIONS = ("q", "k", "v")  # BertSelfAttention: query, key, value (not the output dense)

# Options of one variant only (their defaults when that variant is used; None under the other).
PAPER_ONLY = {"form": "cp", "tau": 0.1, "threshold_init": 0.5, "learn_threshold": True, "n_templates": 4,
              "template_len": 4,
              "z_dim": 32, "beta": 1e-3, "w_ib": 0.1, "w_gate": 0.0}
RELEASED_ONLY = {"mode_dropout": 0.1, "embed_weight": 0.6, "expert_weight": 0.4}
# Options of both variants whose default depends on the variant.
VARIANT_DEFAULTS = {
    "paper": {"targets": PROJECTIONS, "n_experts": 4, "expert_rank": 16},
    "released": {"targets": RELEASED_PROJECTIONS, "n_experts": 6, "expert_rank": 64},
}


@dataclass
class PetalConfig(MethodConfig):
    """PETAL's options. ``None`` means "the variant's default" (see the module docstring); the
    options of the other variant stay ``None`` and raise a ValueError when set."""

    # learn_threshold came after the gallery's runs: learned (paper) or absent (released) changes nothing
    HASH_NEUTRAL: ClassVar[dict] = {"learn_threshold": (True, None)}

    variant: str = "paper"  # "paper" (the workbench's reading of the paper) or "released" (the code)
    # mode approximation (both variants)
    rank: int = 64  # R, the number of modes
    targets: tuple | None = None  # paper: q k v o of every attention; released: q k v
    scale: float = 1.0
    # paper only: the soft threshold and the form
    form: str | None = None  # "cp" (the paper's) or "tucker" (a full core, as the released CP_C)
    tau: float | None = None  # temperature of the soft threshold (0.1)
    threshold_init: float | None = None  # Gamma at step 0 (0.5; lambda starts at 1)
    learn_threshold: bool | None = None  # Gamma trains (True, the paper's); False freezes it at threshold_init
    # released only
    mode_dropout: float | None = None  # dropout on U x (0.1, the code's self.dp)
    # instruction mixture (both variants)
    moe: bool = True
    n_experts: int | None = None  # K: paper 4, released 6
    expert_rank: int | None = None  # paper 16, released 64
    # paper only: the templates
    n_templates: int | None = None  # M (4)
    template_len: int | None = None  # (4)
    # released only: e' = embed_weight * e + expert_weight * mean_k expert_k(e)
    embed_weight: float | None = None  # 0.6
    expert_weight: float | None = None  # 0.4
    # paper only: score-based information bottleneck
    z_dim: int | None = None  # (32)
    beta: float | None = None  # (1e-3)
    w_ib: float | None = None  # (0.1)
    w_gate: float | None = None  # (0.0)
    lr: float = 3e-3  # tuned on vlt5-tiny (docs/methods.md)

    def __post_init__(self) -> None:
        self._resolve()

    def _resolve(self) -> None:
        """Fill the ``None`` options of the chosen variant with its defaults (idempotent)."""
        if self.variant not in VARIANTS:
            return  # validate() says what is wrong
        own = {**VARIANT_DEFAULTS[self.variant], **(PAPER_ONLY if self.variant == "paper" else RELEASED_ONLY)}
        for name, default in own.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        elif isinstance(self.targets, list):
            self.targets = tuple(self.targets)

    @property
    def official_train_projector(self) -> bool:
        # the released train.py trains only parameters named CP* / Expert*: the projection to T5 stays frozen
        return self.variant != "released"

    def validate(self) -> None:
        super().validate()
        if self.variant not in VARIANTS:
            raise ValueError(f"petal: variant must be one of {VARIANTS}, got {self.variant!r}")
        self._resolve()
        other = RELEASED_ONLY if self.variant == "paper" else PAPER_ONLY
        other_name = "released" if self.variant == "paper" else "paper"
        given = [n for n in other if getattr(self, n) is not None]
        if given:
            raise ValueError(f"petal: {', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to "
                             f"variant={other_name!r} only, not to variant={self.variant!r}; leave "
                             f"{'it' if len(given) == 1 else 'them'} unset")
        ints = ["rank", "n_experts", "expert_rank"]
        if self.variant == "paper":
            ints += ["n_templates", "template_len", "z_dim"]
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"petal: {name} must be a positive int, got {v!r}")
        allowed = PROJECTIONS if self.variant == "paper" else RELEASED_PROJECTIONS
        targets = tuple(self.targets) if isinstance(self.targets, (tuple, list)) else (self.targets,)
        if not targets or set(targets) - set(allowed):
            why = "" if self.variant == "paper" else " (the released code modifies query, key and value only)"
            raise ValueError(f"petal: targets must be a non-empty subset of {allowed} for "
                             f"variant={self.variant!r}{why}, got {self.targets!r}")
        if not isinstance(self.moe, bool):
            raise ValueError(f"petal: moe must be True or False, got {self.moe!r}")
        finite = ["scale"] + (["threshold_init"] if self.variant == "paper" else ["embed_weight", "expert_weight"])
        for name in finite:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"petal: {name} must be a finite number, got {v!r}")
        if self.variant == "released":
            v = self.mode_dropout
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ValueError(f"petal: mode_dropout must be a number in [0, 1), got {v!r}")
            return
        if self.form not in FORMS:
            raise ValueError(f"petal: form must be one of {FORMS}, got {self.form!r}")
        if not isinstance(self.learn_threshold, bool):
            raise ValueError(f"petal: learn_threshold must be True or False, got {self.learn_threshold!r}")
        v = self.tau
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"petal: tau must be a number > 0, got {v!r}")
        for name in ("beta", "w_ib", "w_gate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"petal: {name} must be a number >= 0, got {v!r}")
        if self.w_ib > 0 and not self.moe:
            raise ValueError("petal: the information bottleneck reads the instruction mixture; "
                             "set w_ib=0 when moe=False")


# ------------------------------------------------------------------------------ mode approximation
class ModeBank(nn.Module):
    """The shared part of the mode approximation: U, V per shape group, lambda, Gamma (and G)."""

    def __init__(self, shapes: list[tuple[int, int]], rank: int, form: str, tau: float, threshold_init: float):
        super().__init__()
        self.rank, self.form, self.tau = rank, form, float(tau)
        self.U = nn.ParameterDict()
        self.V = nn.ParameterDict()
        for in_dim, out_dim in shapes:
            key = self.key(in_dim, out_dim)
            self.U[key] = nn.Parameter(torch.randn(out_dim, rank) / math.sqrt(out_dim))
            self.V[key] = nn.Parameter(torch.randn(in_dim, rank) / math.sqrt(in_dim))
        self.strength = nn.Parameter(torch.ones(rank))  # lambda
        self.threshold = nn.Parameter(torch.tensor(float(threshold_init)))  # Gamma
        if form == "tucker":
            core = torch.zeros(rank, rank, rank)
            idx = torch.arange(rank)
            core[idx, idx, idx] = 1.0  # the CP form at step 0
            self.core = nn.Parameter(core)

    @staticmethod
    def key(in_dim: int, out_dim: int) -> str:
        return f"{out_dim}x{in_dim}"

    def gate(self) -> torch.Tensor:
        """gate_r = sigmoid((|lambda_r| - Gamma) / tau), ``[R]``."""
        return torch.sigmoid((self.strength.abs() - self.threshold) / self.tau)

    def modes_on(self) -> int:
        return int((self.gate() > 0.5).sum())

    def mixing(self, p: torch.Tensor) -> torch.Tensor:
        """The per-matrix mode coefficients: ``[R]`` (CP) or the ``[R, R]`` matrix M_j (Tucker)."""
        c = self.strength * p * self.gate()
        if self.form == "cp":
            return c
        return torch.einsum("abc,c->ab", self.core, c)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, form={self.form!r}, tau={self.tau}, groups={list(self.U.keys())}"


class ModeProjection(nn.Module):
    """Projection modification ``(x, y) -> y + scale * x Delta W_j^T`` for one targeted matrix j."""

    def __init__(self, bank: ModeBank, in_dim: int, out_dim: int, scale: float):
        super().__init__()
        object.__setattr__(self, "_bank", bank)  # shared, registered once at model.peft_shared
        self.group = ModeBank.key(in_dim, out_dim)
        self.scale = float(scale)
        self.p = nn.Parameter(torch.zeros(bank.rank))

    @property
    def bank(self) -> ModeBank:
        return self._bank

    def delta_weight(self) -> torch.Tensor:
        """Delta W_j ``[out, in]`` (times ``scale``)."""
        U, V = self.bank.U[self.group], self.bank.V[self.group]
        M = self.bank.mixing(self.p)
        mid = U * M if M.dim() == 1 else U @ M
        return self.scale * mid @ V.T

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        U, V = self.bank.U[self.group].to(x.dtype), self.bank.V[self.group].to(x.dtype)
        M = self.bank.mixing(self.p).to(x.dtype)
        z = x @ V
        z = z * M if M.dim() == 1 else z @ M.T
        return y + self.scale * (z @ U.T).to(y.dtype)

    def extra_repr(self) -> str:
        return f"group={self.group!r}, scale={self.scale}"


# ------------------------------------------------------------------- instruction MoE + the IB
class InstructionMoE(nn.Module):
    """Input modifier: adds the routed instruction mixture to the text embeddings; keeps the IB state."""

    def __init__(self, d: int, config: PetalConfig, template_init: torch.Tensor, output_embedding: nn.Module,
                 special_ids: list[int]):
        super().__init__()
        K, r = config.n_experts, config.expert_rank
        self.d = d
        self.templates = nn.Parameter(template_init.clone())  # [M, L, d]
        self.down = nn.Parameter(torch.randn(K, d, r) / math.sqrt(d))
        self.up = nn.Parameter(torch.zeros(K, r, d))
        self.gate = nn.Linear(2 * d, K)
        nn.init.normal_(self.gate.weight, std=0.02)
        nn.init.zeros_(self.gate.bias)
        self.use_ib = config.w_ib > 0
        if self.use_ib:
            self.ib_encoder = nn.Linear(d, 2 * config.z_dim)
            self.ib_head = nn.Linear(config.z_dim, d)
        object.__setattr__(self, "_out_embedding", output_embedding)  # frozen, owned by the LM
        self.register_buffer("special_ids", torch.tensor(sorted(set(special_ids)), dtype=torch.long),
                             persistent=False)
        self.last_probs: torch.Tensor | None = None
        self.last_instruction: torch.Tensor | None = None  # mu [B, d] of the last forward (probes read it)
        self._ib = None  # (z, mean, logvar) of the last forward

    def forward(self, inputs):
        ts, vs = inputs.text_slice, inputs.visual_slice  # either layout: [visual; text] or [text; visual]
        emb, mask = inputs.embeds, inputs.mask
        txt = emb[:, ts]
        if txt.shape[1] == 0:  # no prompt: nothing to instruct
            self._ib = None
            return inputs
        dtype = emb.dtype
        tmask = mask[:, ts].to(dtype)
        vmask = mask[:, vs].to(dtype)
        n_q = tmask.sum(1)  # [B]
        q_sum = (txt * tmask.unsqueeze(-1)).sum(1)  # [B, d]
        T = self.templates.to(dtype)
        M, L = T.shape[:2]
        # e_m: the question rendered with template m, mean-pooled over [T_m ; question]
        e = (q_sum.unsqueeze(1) + T.sum(1).unsqueeze(0)) / (n_q + L).view(-1, 1, 1)  # [B, M, d]
        e_bar = e.mean(1)
        if inputs.n_visual > 0:
            v_bar = (emb[:, vs] * vmask.unsqueeze(-1)).sum(1) / vmask.sum(1, keepdim=True).clamp_min(1.0)
        else:
            v_bar = torch.zeros_like(e_bar)
        probs = torch.softmax(self.gate(torch.cat([v_bar, e_bar], -1).to(self.gate.weight.dtype)), -1).to(dtype)
        hidden = F.gelu(torch.einsum("bmd,kdr->bmkr", e, self.down.to(dtype)))
        experts = torch.einsum("bmkr,krd->bmkd", hidden, self.up.to(dtype)).mean(1)  # [B, K, d]
        mu = (probs.unsqueeze(-1) * experts).sum(1)  # [B, d]
        mixed = txt + mu.unsqueeze(1) * tmask.unsqueeze(-1)
        self.last_probs = probs.detach()
        self.last_instruction = mu.detach()
        self._ib = self._bottleneck(mu, mixed, tmask) if self.use_ib else None
        embeds = torch.cat([emb[:, : ts.start], mixed, emb[:, ts.stop :]], 1)
        return inputs.replace(embeds=embeds, petal_routing=self.last_probs)

    def _bottleneck(self, mu, mixed, tmask):
        scores = (mixed @ mu.unsqueeze(-1)).squeeze(-1) / math.sqrt(self.d)  # [B, S]
        scores = scores.masked_fill(tmask <= 0, float("-inf"))
        has_text = tmask.sum(1) > 0
        attn = torch.softmax(scores.masked_fill(~has_text.unsqueeze(1), 0.0), -1) * tmask
        t = (attn.unsqueeze(-1) * mixed).sum(1)
        stats = self.ib_encoder(t.to(self.ib_encoder.weight.dtype))
        mean, logvar = stats.chunk(2, -1)
        logvar = logvar.clamp(-10.0, 10.0)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if self.training else mean
        return z, mean, logvar

    def answer_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        """The first content token of each answer (-100 where there is none)."""
        valid = (labels != -100) & ~torch.isin(labels, self.special_ids.to(labels.device))
        first = valid.to(torch.int64).argmax(1)
        y = labels.gather(1, first.unsqueeze(1)).squeeze(1)
        return y.masked_fill(~valid.any(1), -100)

    def ib_loss(self, beta: float, labels: torch.Tensor | None):
        """``(L_IB, CE, KL)`` for the last forward given its ``labels`` (``model.context.labels``), or
        None without labels."""
        if self._ib is None or labels is None:
            return None
        z, mean, logvar = self._ib
        if labels.shape[0] != z.shape[0]:
            return None
        y = self.answer_tokens(labels.to(z.device))
        weight = self._out_embedding.weight  # [V, d], frozen
        logits = self.ib_head(z) @ weight.to(z.dtype).T
        if bool((y != -100).any()):
            ce = F.cross_entropy(logits.float(), y, ignore_index=-100)
        else:
            ce = logits.sum() * 0.0
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1).mean()
        return ce + beta * kl, ce, kl


# ----------------------------------------------------------------------- variant="released"
class ReleasedModeBank(nn.Module):
    """The released code's shared factors: per factor set (``"self"``, ``"cross"``) a core
    C [R, R, R] and, per distinct (in, out) shape, U [R, in] (``CP_U.weight``) and V [out, R]
    (``CP_V.weight``)."""

    def __init__(self, groups: dict[str, list[tuple[int, int]]], rank: int):
        super().__init__()
        self.rank = rank
        self.U = nn.ParameterDict()
        self.V = nn.ParameterDict()
        self.core = nn.ParameterDict()
        for factor_set, shapes in groups.items():
            core = torch.empty(rank, rank, rank)
            nn.init.xavier_uniform_(core)  # CP_C
            self.core[factor_set] = nn.Parameter(core)
            for in_dim, out_dim in shapes:
                key = self.key(factor_set, in_dim, out_dim)
                U = torch.empty(rank, in_dim)
                nn.init.kaiming_uniform_(U, a=math.sqrt(5))  # CP_U = nn.Linear(in, R, bias=False)
                self.U[key] = nn.Parameter(U)
                self.V[key] = nn.Parameter(torch.zeros(out_dim, rank))  # CP_V, zero-initialised

    @staticmethod
    def key(factor_set: str, in_dim: int, out_dim: int) -> str:
        return f"{factor_set}_{out_dim}x{in_dim}"

    def extra_repr(self) -> str:
        return f"rank={self.rank}, sets={list(self.core.keys())}, groups={list(self.U.keys())}"


class ReleasedModeProjection(nn.Module):
    """Projection modification ``(x, y) -> y + scale * V(dropout(U x) @ M_j)``, M_j = (C @ p_j)[:, :, 0]."""

    def __init__(self, bank: ReleasedModeBank, factor_set: str, in_dim: int, out_dim: int, scale: float,
                 dropout: float):
        super().__init__()
        object.__setattr__(self, "_bank", bank)  # shared, registered once at model.peft_shared
        self.factor_set = factor_set
        self.group = ReleasedModeBank.key(factor_set, in_dim, out_dim)
        self.scale = float(scale)
        R = bank.rank
        bound = math.sqrt(6.0 / (R + 1))  # xavier_uniform_ of an [R, 1] tensor (q_CP / k_CP / v_CP)
        self.p = nn.Parameter(torch.empty(R).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)

    @property
    def bank(self) -> ReleasedModeBank:
        return self._bank

    def mixing(self) -> torch.Tensor:
        """M_j ``[R, R]``: ``M_j[a, b] = sum_c C[a, b, c] p_j[c]``."""
        return torch.einsum("abc,c->ab", self.bank.core[self.factor_set], self.p)

    def delta_weight(self) -> torch.Tensor:
        """Delta W_j ``[out, in]`` (times ``scale``): ``V M_j^T U``."""
        U, V = self.bank.U[self.group], self.bank.V[self.group]
        return self.scale * V @ self.mixing().T @ U

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        U, V = self.bank.U[self.group].to(x.dtype), self.bank.V[self.group].to(x.dtype)
        z = self.dropout(x @ U.T) @ self.mixing().to(x.dtype)
        return y + self.scale * (z @ V.T).to(y.dtype)

    def extra_repr(self) -> str:
        return f"group={self.group!r}, scale={self.scale}"


class UniformExpertMixture(nn.Module):
    """Input modifier: ``e' = embed_weight * e + expert_weight * mean_k B_k(A_k(e))`` on the valid
    text tokens (the released code's ``ExpertA`` / ``ExpertB``, averaged with fixed weights 1/K)."""

    def __init__(self, d: int, n_experts: int, rank: int, embed_weight: float, expert_weight: float,
                 init_std: float = 0.02):
        super().__init__()
        self.embed_weight, self.expert_weight = float(embed_weight), float(expert_weight)
        self.down = nn.ModuleList(nn.Linear(d, rank) for _ in range(n_experts))  # ExpertA
        self.up = nn.ModuleList(nn.Linear(rank, d) for _ in range(n_experts))  # ExpertB
        for lin in (*self.down, *self.up):  # BERT's _init_weights (initializer_range 0.02)
            nn.init.normal_(lin.weight, std=init_std)
            nn.init.zeros_(lin.bias)

    def mix(self, txt: torch.Tensor) -> torch.Tensor:
        """The mixture of text embeddings ``[..., d]`` (every position)."""
        dtype = txt.dtype
        total = 0
        for a, b in zip(self.down, self.up):
            hidden = F.linear(txt, a.weight.to(dtype), a.bias.to(dtype))
            total = total + F.linear(hidden, b.weight.to(dtype), b.bias.to(dtype))
        return self.embed_weight * txt + self.expert_weight * (total / len(self.down))

    def forward(self, inputs):
        ts = inputs.text_slice  # either layout: [visual; text] or [text; visual]
        emb = inputs.embeds
        txt = emb[:, ts]
        if txt.shape[1] == 0:  # no prompt: nothing to mix
            return inputs
        valid = inputs.mask[:, ts].bool().unsqueeze(-1)
        mixed = torch.where(valid, self.mix(txt), txt)  # padding keeps its embedding
        embeds = torch.cat([emb[:, : ts.start], mixed, emb[:, ts.stop :]], 1)
        return inputs.replace(embeds=embeds)

    def extra_repr(self) -> str:
        return (f"experts={len(self.down)}, embed_weight={self.embed_weight}, "
                f"expert_weight={self.expert_weight}")


# ------------------------------------------------------------------------------------ the handle
class PetalHandle(MethodHandle):
    """PETAL's handle: modes on, routing probabilities, the IB loss, merging the mode updates.

    With ``variant="released"`` there is no threshold (``modes_on`` / ``mode_gates`` raise), no router
    (``routing_probs`` raises: the experts are averaged with fixed weights 1/K) and no loss
    (``extra_losses()`` is ``{}``); ``delta_weights`` and ``merge`` work for both variants.
    """

    def __init__(self, model, config: PetalConfig, modules: dict, bank: ModeBank | ReleasedModeBank,
                 moe: InstructionMoE | UniformExpertMixture | None):
        super().__init__(model, config, modules)
        self.bank = bank
        self.moe = moe
        self.merged = False
        self.last_ib: dict | None = None

    @property
    def variant(self) -> str:
        return self.config.variant

    def _paper_only(self, what: str) -> None:
        if self.variant != "paper":
            raise ValueError(f"petal: {what} belongs to variant='paper'; variant={self.variant!r} has "
                             "no gate, no threshold and no router (its experts are averaged uniformly)")

    def modes_on(self) -> int:
        """How many of the R modes are on (gate > 0.5, i.e. |lambda_r| > Gamma)."""
        self._paper_only("modes_on (the learnable threshold)")
        return self.bank.modes_on()

    def mode_gates(self) -> torch.Tensor:
        """The soft gates ``[R]`` (detached)."""
        self._paper_only("mode_gates (the learnable threshold)")
        with torch.no_grad():
            return self.bank.gate().detach().clone()

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """Point name -> Delta W_j ``[out, in]`` (detached)."""
        with torch.no_grad():
            return {p: m.delta_weight().detach().clone() for p, m in self.modules.items()}

    def routing_probs(self) -> torch.Tensor:
        """The gate probabilities ``[batch, K]`` of the last forward (rows sum to 1)."""
        return self._last("last_probs", "routing_probs (the gate of the instruction mixture)", "routing probabilities")

    def instruction(self) -> torch.Tensor:
        """The mixed instruction vector mu ``[batch, d]`` of the last forward (what the mixture adds to
        every prompt token, and what the information bottleneck reads); the released variant mixes
        each token on its own and has no such vector."""
        return self._last("last_instruction", "instruction (the mixed instruction vector)", "the instruction vector")

    def _last(self, attr: str, what: str, noun: str) -> torch.Tensor:
        """The mixture's record ``attr`` of the last forward, or a ValueError saying why there is none."""
        self._paper_only(what)
        if self.moe is None:
            raise ValueError("petal was applied with moe=False: there is no instruction mixture (and no router)")
        if getattr(self.moe, attr) is None:
            raise ValueError(f"no forward pass with a prompt has run yet: {noun} unknown")
        return getattr(self.moe, attr)

    def eval_statistics(self) -> dict:
        """What the trainer records at every evaluation (``history[i]["method"]``): the soft mode
        gates (``gate_r = sigmoid((|lambda_r| - Gamma) / tau)``), how many are on (> 0.5) and the
        threshold Gamma; ``{}`` for ``variant="released"`` (no threshold)."""
        if self.variant != "paper":
            return {}
        with torch.no_grad():
            gates = self.bank.gate().float().cpu()
        return {"mode_gates": [round(float(g), 6) for g in gates], "modes_on": int((gates > 0.5).sum()),
                "threshold": float(self.bank.threshold.detach())}

    def routing_stats(self) -> dict:
        """:func:`workbench.probes.routing_stats` of the last routing probabilities."""
        from ..probes import routing_stats

        return routing_stats(probs=self.routing_probs())

    def extra_losses(self) -> dict[str, torch.Tensor]:
        """``{"ib": w_ib * L_IB}`` after a forward with labels (and ``{"gate": ...}`` if w_gate > 0);
        always ``{}`` for ``variant="released"``."""
        cfg, out = self.config, {}
        if self.variant != "paper":
            return out
        if self.moe is not None and cfg.w_ib > 0:
            terms = self.moe.ib_loss(cfg.beta, self.model.context.labels)
            if terms is not None:
                loss, ce, kl = terms
                self.last_ib = {"ib": float(loss.detach()), "ce": float(ce.detach()), "kl": float(kl.detach())}
                out["ib"] = cfg.w_ib * loss
        if cfg.w_gate > 0 and self.modules:
            out["gate"] = cfg.w_gate * self.bank.gate().mean()
        return out

    def merge(self) -> None:
        """Fold every Delta W_j into its frozen projection weight and remove the mode modifications
        (for inference; the instruction mixture stays, it depends on the input)."""
        if self.merged:
            raise ValueError("petal: the mode updates are already merged")
        with torch.no_grad():
            for point, mod in self.modules.items():
                linear = self.model.get_point_module(point)
                linear.weight.add_(mod.delta_weight().to(linear.weight.dtype))
        for point in self.modules:
            self.model.remove_projection_modifications(point)
        self.merged = True


def _targets(model, config: PetalConfig) -> list:
    targets = (config.targets,) if isinstance(config.targets, str) else tuple(config.targets)
    points = [p for p in model.insertion_points(kind="projection").values()
              if p.sublayer in ATTENTION_SUBLAYERS and p.projection in targets]
    if not points:
        raise ValueError(f"petal: the backbone has no attention projections named {sorted(targets)}")
    for p in points:
        linear = model.get_submodule(p.module_path)
        if not isinstance(getattr(linear, "weight", None), torch.Tensor):
            raise ValueError(f"petal: {p.name} is not a linear layer with a weight ({type(linear).__name__})")
    return points


def released_factor_set(point) -> str:
    """``"cross"`` for the cross-attention key and value (they read the encoder output, as the code's
    ``CP_*_Image`` factors read the image features), ``"self"`` for every other q, k, v."""
    return "cross" if point.sublayer == "cross_attn" and point.projection in ("k", "v") else "self"


@register_method("petal", PetalConfig, family="layer: PETAL", main_knob=("rank", (16, 32, 64, 128)))
def apply_petal(model, config: PetalConfig) -> MethodHandle:
    points = _targets(model, config)
    if config.variant == "released":
        return _apply_released(model, config, points)
    lm = model.lm
    out_embedding = lm.get_output_embeddings()
    if config.moe and config.w_ib > 0 and getattr(out_embedding, "weight", None) is None:
        raise ValueError("petal: the information bottleneck needs the LM's output embedding (lm_head)")
    d = model.d_model
    # Everything is valid: now change the model.
    freeze_backbone(model)
    shapes = list(dict.fromkeys((p.in_dim, p.out_dim) for p in points))
    bank = ModeBank(shapes, config.rank, config.form, config.tau, config.threshold_init).to(model.device)
    if not config.learn_threshold:  # the ablation "threshold frozen": Gamma stays at threshold_init
        bank.threshold.requires_grad_(False)
    model.peft_shared = nn.ModuleDict({"petal_modes": bank})
    modules = {}
    for p in points:
        mod = ModeProjection(bank, p.in_dim, p.out_dim, config.scale)
        model.add_projection_modification(p.name, mod, name="petal")
        modules[p.name] = mod
    moe = None
    if config.moe:
        with torch.no_grad():
            ids = torch.randint(0, model.config.vocab_size, (config.n_templates, config.template_len),
                                device=model.device)
            template_init = model.family_spec.embed_text(lm, ids).float()
        special = list(getattr(model.tokenizer, "all_special_ids", []) or [])
        moe = InstructionMoE(d, config, template_init, out_embedding, special)
        model.add_input_modifier(moe)
    return PetalHandle(model, config, modules, bank, moe)


def _apply_released(model, config: PetalConfig, points: list) -> MethodHandle:
    """``variant="released"``: the code's q/k/v updates and the uniform expert mixture."""
    groups: dict[str, list] = {}
    for p in points:
        shapes = groups.setdefault(released_factor_set(p), [])
        if (p.in_dim, p.out_dim) not in shapes:
            shapes.append((p.in_dim, p.out_dim))
    # Everything is valid: now change the model.
    freeze_backbone(model)
    bank = ReleasedModeBank(groups, config.rank).to(model.device)
    model.peft_shared = nn.ModuleDict({"petal_modes": bank})
    modules = {}
    for p in points:
        mod = ReleasedModeProjection(bank, released_factor_set(p), p.in_dim, p.out_dim, config.scale,
                                     config.mode_dropout)
        model.add_projection_modification(p.name, mod, name="petal")
        modules[p.name] = mod
    moe = None
    if config.moe:
        moe = UniformExpertMixture(model.d_model, config.n_experts, config.expert_rank, config.embed_weight,
                                   config.expert_weight)
        model.add_input_modifier(moe)
    return PetalHandle(model, config, modules, bank, moe)
