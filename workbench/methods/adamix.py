"""AdaMix (Wang et al., EMNLP 2022, "AdaMix: Mixture-of-Adaptations for Parameter-efficient Model
Tuning"; official code microsoft/AdaMix), placed as the MixPHM repository (jingjing12110/MixPHM)
runs it as a baseline on VL-T5.

Official files followed:

- ``microsoft/AdaMix: src/transformers/models/expert_soup.py`` -- ``MixtureSoup`` (N experts, deep
  copies of one ``nn.Linear``; in training one expert drawn per call with
  ``torch.randint(0, N, (1,)).item()``; in eval with ``inference_level 3`` the "expert soup": every
  expert's weight and bias weighted by ``softmax(expert_score_weight)`` with that vector a frozen
  zero parameter, i.e. averaged, then one ``F.linear``) and ``ExpertSoup`` (``MoA_A``: the Down
  mixture d -> m, activation, ``MoA_B``: the Up mixture m -> d, plus the residual;
  ``sharing_down`` / ``sharing_up`` make one side a single shared expert);
- ``jingjing12110/MixPHM: src/vl_t5/adaMix/expert_soup.py`` (the same two classes, ported) and
  ``src/vl_t5/my_transformers/modeling_t5.py`` (``T5LayerFF``: ``f = DenseReluDense(LN(x))``,
  ``f = ExpertSoup(f)`` = ``f + Up(gelu(Down(f)))``, then ``x + Dropout(f)``; with
  ``use_adapter_cross_attn`` (default False) also after cross-attention; ``'gelu'``, size
  ``--adapter_size`` = 64, ``--num_experts`` 4, ``--inference_level`` 3 in ``src/vl_t5/param.py``);
  ``src/vl_t5/train.py`` trains only the parameters named ``ExpertSoup`` (``expert_score_weight`` fixed),
  so the visual embedding stays frozen (:attr:`AdaMixConfig.OFFICIAL_TRAIN_PROJECTOR` is False);
- the consistency regularisation: ``microsoft/AdaMix: src/transformers/models/roberta/modeling_roberta.py``
  (``symmetric_KL_loss`` and the second pass of ``RobertaForSequenceClassification.forward``),
  ``NLG/src/model.py`` (the token-level, masked version of the generation experiments) and MixPHM's
  ``src/vl_t5/modeling_t5.py`` (``VLT5.forward``: second encoder-decoder pass, ``symmetric_KL_loss``
  over every decoder position; ``src/vl_t5/vqa_model.py`` adds it to the task loss).

The module (a sub-layer modification ``(x, h) -> h'`` on every FFN, so the backbone adds its own
dropout and residual, and for post-LN BART its LayerNorm, as ``BertOutput`` does in the official NLU
code)::

    h' = h + Up_j(act(Down_i(h)))

**Experts and sharing.** Down (d -> m) and Up (m -> d) are ``nn.Linear`` layers with bias. By default
Down has N = 4 experts and Up is one layer shared by them (the official recipe in
``README.md`` / ``bert_base_mnli_expert_soup.sh`` / ``roberta_large_mnli_expert_soup.sh``:
``--sharing_up 1 --sharing_down 0``). ``shared_side="down"`` shares Down instead (MixPHM's own
sharing), ``"none"`` gives both sides N experts (MixPHM's ``param.py`` default; AdaMix's "w/o
sharing" ablation). Initialisation as on VL-T5: T5's ``_init_weights`` leaves plain ``nn.Linear``
layers alone, so every layer keeps torch's default init and the experts start as deep copies of one
draw (``expert_init="copy"``); Up is *not* zero, so the model changes at step 0.
``expert_init="independent"`` draws each expert; ``zero_init_up=True`` zeroes Up (the workbench's
adapters' init; then the model is unchanged at step 0).

**Routing.** No gate. In training, every call draws Down's expert then Up's expert, each with
``torch.randint(0, n_side, (1,))`` from torch's global generator, so the whole batch uses one
expert per side and a seed makes the draws repeatable. As in the official code a shared side (one
expert) draws too (it always gets 0): the global RNG stream is the official one.
:meth:`AdaMixHandle.draw_counts` counts the draws. In eval mode each side is the expert soup
``W = sum_i softmax(0)_i W_i``, ``b = sum_i softmax(0)_i b_i`` (``inference_level 3``), cached and
rebuilt when a weight changes (identity, storage, ``_version``, device, dtype of each tensor), on
every ``train()`` / ``eval()`` and ``load_state_dict``; :meth:`AdaMixHandle.merge` rebuilds it
unconditionally (after edits through ``p.data``). The adapter is non-linear, so it is never folded
into the frozen weights.

**Consistency regularisation** (:meth:`AdaMixHandle.training_losses`, training only). The trainer's
``forward()`` runs the same batch again (new expert draws, new dropout masks); with logits z1 (the
batch's output) and z2 (the second pass), over the decoder positions kept::

    L_c = 1/2 [ KL(softmax(z2).detach() || softmax(z1)) + KL(softmax(z1).detach() || softmax(z2)) ]

each KL by ``F.kl_div(log_softmax(.), softmax(.detach()), reduction="batchmean")`` in float32 (no
temperature), i.e. summed over the vocabulary and averaged over the positions kept;
``{"consistency": consistency_weight * L_c}`` is added to the first pass's task loss. The second
pass's task loss is *not* added (the official RoBERTa code has it commented out; the NLG and VL-T5
code never compute it). ``extra_losses()`` (no second pass available) is ``{}``.
Positions kept: ``consistency_mask="labels"`` (default) the decoder positions with a label (the
model's decoder mask, else ``labels != -100``), as ``NLG/src/model.py`` masks with ``lm_mask``;
``"all"`` every decoder position, padding included, as MixPHM's VL-T5 port (``lm_logits.view(-1, V)``).
Weight 1 (the adapter AdaMix: the RoBERTa code, MixPHM's VL-T5 port);
the LoRA-AdaMix generation code uses 100 (``consistency_weight=100``); 0 disables it (no second pass).

Deliberate departures:

- The default mask is ``"labels"``: MixPHM's VL-T5 port averages over every decoder position,
  padding included, which makes the loss depend on how much a batch is padded (``"all"`` restores it).
- Only ``inference_level 3`` (weight averaging) is implemented; the official levels 0 / 1 (random
  token- / sentence-level routing at eval) make evaluation random and are left out.
- The official ``expert_score_weight`` (a frozen zero vector, softmax -> uniform 1/N) is not stored:
  it never trains, so the weights are the constant softmax(0).
- The learning rate default is the MixPHM paper's VL-T5 protocol (5e-3 for every PEFT method);
  microsoft/AdaMix's GLUE scripts use 4e-4 (BERT-base) and 3e-4 (RoBERTa-large).
- Sharing: MixPHM ships no AdaMix script and its ``param.py`` defaults to no sharing; the default here
  is AdaMix's own recipe (Up shared), ``shared_side="none"`` is the argparse default.
- Initialisation: torch's default on both families (MixPHM has no BART code). The microsoft/AdaMix
  BERT/RoBERTa models instead re-draw every ``nn.Linear`` N(0, 0.02) with zero bias in
  ``_init_weights``, expert by expert (independent experts); not offered as such.
- A module created by ``apply`` takes the model's current train/eval mode.

Parameters (T5-base, d 768, m 64, N 4, Up shared): Down 4 x (768 x 64 + 64) = 196,864 + Up
64 x 768 + 768 = 49,920 -> 246,784 per FFN, 24 FFNs: **5,922,816** (BART-base: 12 FFNs, 2,961,408).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import activation, bottleneck_size, check_sublayers, lm_dtype, sublayer_points
from .base import MethodConfig, MethodHandle, freeze_backbone, register_method


# ------------------------------------------------------------------------------------ the loss
def symmetric_kl(logits: torch.Tensor, logits_2: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The official ``symmetric_KL_loss``: 1/2 (KL(q.detach() || p) + KL(p.detach() || q)), batchmean.

    ``logits``, ``logits_2``: ``[..., V]``; rows are the positions (flattened). ``mask``: ``[...]``,
    the positions kept (``None``: all). The mean is over the positions kept; with none kept the loss is 0.
    """
    vocab = logits.shape[-1]
    p = logits.float().reshape(-1, vocab)
    q = logits_2.float().reshape(-1, vocab)
    if mask is not None:
        keep = mask.reshape(-1).to(p.device).bool()
        p, q = p[keep], q[keep]
    if p.shape[0] == 0:
        return (logits.float().sum() + logits_2.float().sum()) * 0.0
    loss = F.kl_div(F.log_softmax(p, dim=-1), F.softmax(q.detach(), dim=-1), reduction="batchmean") + \
        F.kl_div(F.log_softmax(q, dim=-1), F.softmax(p.detach(), dim=-1), reduction="batchmean")
    return 0.5 * loss


# ------------------------------------------------------------------------------------ the module
class ExpertMixture(nn.Module):
    """The official ``MixtureSoup`` of ``nn.Linear`` experts: one drawn expert in training, the averaged
    one (the expert soup) in eval."""

    def __init__(self, d_in: int, d_out: int, experts: int, expert_init: str = "copy", zero: bool = False,
                 device=None, dtype=None):
        super().__init__()

        def linear():
            layer = nn.Linear(d_in, d_out, device=device, dtype=dtype)
            if zero:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
            return layer

        if expert_init == "copy":
            proto = linear()
            self.experts = nn.ModuleList([copy.deepcopy(proto) for _ in range(experts)])
        else:
            self.experts = nn.ModuleList([linear() for _ in range(experts)])
        # Draw counts: a buffer so it follows .to(); not persistent (statistics, not weights).
        self.register_buffer("draws", torch.zeros(experts, dtype=torch.long, device=device), persistent=False)
        self._soup = None  # (key, weight, bias)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def draw(self) -> int:
        """One expert index, ``torch.randint(0, N, (1,))`` from the global generator (also when N = 1,
        as the official code)."""
        k = int(torch.randint(low=0, high=self.num_experts, size=(1,)).item())
        self.draws[k] += 1
        return k

    # --- the expert soup ------------------------------------------------------------------------
    def _sources(self) -> list:
        return [p for e in self.experts for p in (e.weight, e.bias)]

    def _average(self) -> tuple:
        # The official expert_soup: softmax of the (frozen, zero) score vector, summed in expert order.
        w = torch.softmax(torch.zeros(self.num_experts), dim=0)
        weight, bias = 0, 0
        for i, e in enumerate(self.experts):
            weight = weight + w[i].to(e.weight.device) * e.weight
            bias = bias + w[i].to(e.bias.device) * e.bias
        return weight, bias

    def _key(self) -> tuple:
        # id(p) as well as the pointer: a replaced parameter may reuse a freed address and version.
        return tuple((id(p), p.data_ptr(), p._version, str(p.device), p.dtype) for p in self._sources())

    def soup(self, refresh: bool = False) -> tuple:
        """The averaged ``(weight, bias)``; cached while no weight changes and no gradient is needed."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self._sources()):
            return self._average()  # differentiable, not cached
        key = self._key()
        if refresh or self._soup is None or self._soup[0] != key:
            with torch.no_grad():
                self._soup = (key, *self._average())
        return self._soup[1:]

    def train(self, mode: bool = True):
        self._soup = None  # every train()/eval() merges the current experts afresh
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self._soup = None
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.experts[self.draw()](x)
        weight, bias = self.soup()
        return F.linear(x, weight.to(x.dtype), bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}"


class AdaMixModule(nn.Module):
    """One AdaMix module (the official ``ExpertSoup``), ``(x, h) -> h + Up(act(Down(h)))``."""

    def __init__(self, d_model: int, bottleneck: int, num_experts: int, shared_side: str = "up",
                 act: str = "gelu", expert_init: str = "copy", zero_init_up: bool = False, device=None, dtype=None):
        super().__init__()
        kw = dict(expert_init=expert_init, device=device, dtype=dtype)
        down_n = 1 if shared_side == "down" else num_experts
        up_n = 1 if shared_side == "up" else num_experts
        self.down = ExpertMixture(d_model, bottleneck, down_n, **kw)
        self.act = activation(act)
        self.up = ExpertMixture(bottleneck, d_model, up_n, zero=zero_init_up, **kw)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h)))  # Down draws before Up, as MoA_A before MoA_B

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(h)


# ------------------------------------------------------------------------------------ config
@dataclass
class AdaMixConfig(MethodConfig):
    """AdaMix's options; each default's source is in the comment beside it (see the module docstring)."""

    # MixPHM's src/vl_t5/train.py trains only 'ExpertSoup' tensors: the visual embedding stays frozen
    OFFICIAL_TRAIN_PROJECTOR: ClassVar[bool] = False

    num_experts: int = 4  # microsoft/AdaMix README + scripts --num_experts 4; MixPHM param.py default 4
    reduction_factor: int = 12  # m = d // 12 = 64 on t5-base: MixPHM param.py --adapter_size 64
    bottleneck: int | None = None  # overrides reduction_factor
    shared_side: str = "up"  # AdaMix scripts --sharing_up 1 --sharing_down 0; "down", "none" (MixPHM param.py default)
    activation: str = "gelu"  # ExpertSoup(..., 'gelu') in both repositories
    sublayers: tuple = ("ffn",)  # MixPHM T5LayerFF (cross_attn with its use_adapter_cross_attn, default False)
    expert_init: str = "copy"  # MixtureSoup deep-copies one nn.Linear (torch's default init kept on T5)
    zero_init_up: bool = False  # official: Up keeps torch's default init (not zero)
    consistency_weight: float = 1.0  # adapter AdaMix (RoBERTa, VL-T5 port): weight 1; NLG LoRA-AdaMix: 100; 0 = off
    consistency_mask: str = "labels"  # NLG lm_mask; "all": MixPHM's VL-T5 port (every decoder position)
    lr: float = 1e-2  # tuned on vlt5-tiny (MixPHM's VL-T5 protocol: 5e-3; AdaMix GLUE: 3e-4 / 4e-4)

    def validate(self):
        super().validate()
        name = self.method_name
        for key in ("num_experts", "reduction_factor"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: {key} must be a positive int, got {v!r}")
        if self.bottleneck is not None and (not isinstance(self.bottleneck, int) or isinstance(self.bottleneck, bool)
                                            or self.bottleneck < 1):
            raise ValueError(f"{name}: bottleneck must be a positive int or None, got {self.bottleneck!r}")
        choices = {"shared_side": ("up", "down", "none"), "expert_init": ("copy", "independent"),
                   "consistency_mask": ("labels", "all")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{name}: {key} must be one of {allowed}, got {getattr(self, key)!r}")
        if not isinstance(self.zero_init_up, bool):
            raise ValueError(f"{name}: zero_init_up must be a bool, got {self.zero_init_up!r}")
        w = self.consistency_weight
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not w >= 0:
            raise ValueError(f"{name}: consistency_weight must be a number >= 0, got {w!r}")
        self.sublayers = check_sublayers(self.sublayers, name)
        activation(self.activation)


# ------------------------------------------------------------------------------------ the handle
class AdaMixHandle(MethodHandle):
    """The AdaMix handle: routing statistics, the expert soup, the consistency regularisation."""

    def draw_counts(self) -> dict[str, torch.Tensor]:
        """How often each expert was drawn in training, per module.

        Keys are the insertion points (``"encoder.0.ffn"``, ...) when one side has experts (the
        default: Down), ``"<point>.down"`` / ``"<point>.up"`` when both have (``shared_side="none"``).
        """
        out = {}
        for point, mod in self.modules.items():
            sides = [(s, getattr(mod, s)) for s in ("down", "up") if getattr(mod, s).num_experts > 1]
            for side, mix in sides:
                out[point if len(sides) == 1 else f"{point}.{side}"] = mix.draws.detach().cpu().clone()
        return out

    def reset_draw_counts(self) -> None:
        for mod in self.modules.values():
            mod.down.draws.zero_()
            mod.up.draws.zero_()

    def merge(self) -> None:
        """(Re)compute the expert soup of every module from the current weights (eval mode uses it; the
        backbone is unchanged: the adapter is non-linear). Always recomputes, so it also picks up edits
        made through ``p.data``."""
        with torch.no_grad():
            for mod in self.modules.values():
                mod.down.soup(refresh=True)
                mod.up.soup(refresh=True)

    def consistency_loss(self, out, out_2) -> torch.Tensor:
        """``consistency_weight * symmetric_kl`` between two outputs of the same batch, over the decoder
        positions ``consistency_mask`` keeps (the labels come from the model's forward context)."""
        logits, logits_2 = out.logits, out_2.logits
        mask = None
        if self.config.consistency_mask == "labels":
            b, length = logits.shape[:2]
            mask = self.model.context.token_mask("decoder", b, length)
        return self.config.consistency_weight * symmetric_kl(logits, logits_2, mask)

    def training_losses(self, out, forward) -> dict[str, torch.Tensor]:
        """``{"consistency": w * L_c}`` with a second pass ``forward()`` of the same batch (training
        mode only; ``{}`` in eval mode or with ``consistency_weight=0``)."""
        if self.config.consistency_weight == 0 or not self.model.training:
            return {}
        return {"consistency": self.consistency_loss(out, forward())}

    def extra_losses(self) -> dict[str, torch.Tensor]:
        """Nothing: the consistency term needs a second pass (:meth:`training_losses`)."""
        return {}


@register_method("adamix", AdaMixConfig, family="layer: adapters", main_knob=("num_experts", (1, 2, 4, 8)))
def apply_adamix(model, config: AdaMixConfig) -> MethodHandle:
    d = model.d_model
    m = bottleneck_size(d, config.reduction_factor, config.bottleneck, "adamix")
    points = sublayer_points(model, config.sublayers)  # validated before anything changes
    freeze_backbone(model)
    dtype = lm_dtype(model)
    modules = {}
    for point in points:
        mod = AdaMixModule(d, m, config.num_experts, config.shared_side, act=config.activation,
                           expert_init=config.expert_init, zero_init_up=config.zero_init_up,
                           device=model.device, dtype=dtype)
        mod.train(model.training)  # routing (train) or the soup (eval) follows the model's current mode
        model.add_sublayer_modification(point.name, mod, name="adamix")
        modules[point.name] = mod
    return AdaMixHandle(model, config, modules)
