"""PETAL (Zhai et al., arXiv 2312.12458): mode approximation, adaptive instruction MoE, IB loss.

The public PETAL code has neither the gate nor the learnable threshold nor the information-bottleneck
loss that the paper describes, so this module is **the workbench's reading of the paper**
(docs/methods.md#petal). Three parts, all trainable, the backbone frozen (the visual projector
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
   becomes ``y + scale * x V diag(lambda * p_j * gate) U^T``. Option ``form="tucker"``: the
   official code's Tucker form, a full core G (R x R x R) with
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
z_dim = 32, beta = 1e-3, w_ib = 0.1, w_gate = 0, lr 1e-3. At step 0 the model's outputs are those
of the backbone (p_j = 0 and zero expert up-projections).

Parameters: shared U, V (in + out) R per shape group, lambda R, Gamma 1, (Tucker: R^3); p_j R per
targeted matrix; MoE M L d + K (2 d r) + 2 d K + K; IB (d + 1) 2 z + (z + 1) d. On T5-base
(d 768, 144 attention matrices): 98,304 + 65 + 9,216 mode parameters, 12,288 + 98,304 + 6,148 MoE,
49,216 + 25,344 IB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .base import MethodConfig, MethodHandle, freeze_backbone, register_method

FORMS = ("cp", "tucker")
ATTENTION_SUBLAYERS = ("attn", "self_attn", "cross_attn")
PROJECTIONS = ("q", "k", "v", "o")


@dataclass
class PetalConfig(MethodConfig):
    # dynamic mode approximation
    rank: int = 64  # R, the number of modes
    form: str = "cp"  # "cp" (the paper's) or "tucker" (the official code's full core)
    targets: tuple = PROJECTIONS  # projections of every attention
    tau: float = 0.1  # temperature of the soft threshold
    threshold_init: float = 0.5  # Gamma at step 0 (lambda starts at 1)
    scale: float = 1.0
    # adaptive instruction mixture of experts
    moe: bool = True
    n_templates: int = 4  # M
    template_len: int = 4
    n_experts: int = 4  # K
    expert_rank: int = 16
    # score-based information bottleneck
    z_dim: int = 32
    beta: float = 1e-3
    w_ib: float = 0.1
    w_gate: float = 0.0
    lr: float = 1e-3

    def validate(self) -> None:
        super().validate()
        for name in ("rank", "n_templates", "template_len", "n_experts", "expert_rank", "z_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"petal: {name} must be a positive int, got {v!r}")
        if self.form not in FORMS:
            raise ValueError(f"petal: form must be one of {FORMS}, got {self.form!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        bad = set(targets) - set(PROJECTIONS)
        if bad or not targets:
            raise ValueError(f"petal: targets must be a non-empty subset of {PROJECTIONS}, got {self.targets!r}")
        for name in ("tau",):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"petal: {name} must be a number > 0, got {v!r}")
        for name in ("beta", "w_ib", "w_gate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"petal: {name} must be a number >= 0, got {v!r}")
        for name in ("threshold_init", "scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"petal: {name} must be a finite number, got {v!r}")
        if not isinstance(self.moe, bool):
            raise ValueError(f"petal: moe must be True or False, got {self.moe!r}")
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


# ------------------------------------------------------------------------------------ the handle
class PetalHandle(MethodHandle):
    """PETAL's handle: modes on, routing probabilities, the IB loss, merging the mode updates."""

    def __init__(self, model, config: PetalConfig, modules: dict, bank: ModeBank, moe: InstructionMoE | None):
        super().__init__(model, config, modules)
        self.bank = bank
        self.moe = moe
        self.merged = False
        self.last_ib: dict | None = None

    def modes_on(self) -> int:
        """How many of the R modes are on (gate > 0.5, i.e. |lambda_r| > Gamma)."""
        return self.bank.modes_on()

    def mode_gates(self) -> torch.Tensor:
        """The soft gates ``[R]`` (detached)."""
        with torch.no_grad():
            return self.bank.gate().detach().clone()

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """Point name -> Delta W_j ``[out, in]`` (detached)."""
        with torch.no_grad():
            return {p: m.delta_weight().detach().clone() for p, m in self.modules.items()}

    def routing_probs(self) -> torch.Tensor:
        """The gate probabilities ``[batch, K]`` of the last forward (rows sum to 1)."""
        if self.moe is None:
            raise ValueError("petal was applied with moe=False: there is no router")
        if self.moe.last_probs is None:
            raise ValueError("no forward pass with a prompt has run yet: routing probabilities are unknown")
        return self.moe.last_probs

    def routing_stats(self) -> dict:
        """:func:`workbench.probes.routing_stats` of the last routing probabilities."""
        from ..probes import routing_stats

        return routing_stats(probs=self.routing_probs())

    def extra_losses(self) -> dict[str, torch.Tensor]:
        """``{"ib": w_ib * L_IB}`` after a forward with labels (and ``{"gate": ...}`` if w_gate > 0)."""
        cfg, out = self.config, {}
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
        (for inference; the instruction MoE stays, it depends on the input)."""
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


@register_method("petal", PetalConfig, family="layer: PETAL", main_knob=("rank", (16, 32, 64, 128)))
def apply_petal(model, config: PetalConfig) -> MethodHandle:
    points = _targets(model, config)
    lm = model.lm
    out_embedding = lm.get_output_embeddings()
    if config.moe and config.w_ib > 0 and getattr(out_embedding, "weight", None) is None:
        raise ValueError("petal: the information bottleneck needs the LM's output embedding (lm_head)")
    d = model.d_model
    # Everything is valid: now change the model.
    freeze_backbone(model)
    shapes = list(dict.fromkeys((p.in_dim, p.out_dim) for p in points))
    bank = ModeBank(shapes, config.rank, config.form, config.tau, config.threshold_init).to(model.device)
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
