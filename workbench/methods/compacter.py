"""Compacter and Compacter++ (Mahabadi et al. 2021): adapters whose projections are PHM layers.

Each adapter is serial, H' = H + Up(act(Down(H))), with Down: d -> m and Up: m -> d PHM linears
(:class:`~workbench.methods._phm.PHMLinear`): W = sum_{i=1..n} A_i (kron) B_i, B_i = s_i t_i^T of
rank r. By default one A (n x n x n) is shared by *every* PHM layer of the model (both projections
of all adapters); it lives at ``model.peft_shared["phm_rule"]``.

Official code: rabeehk/compacter. Every default is a value of ``seq2seq/configs/compacter.json``
(``compacter++.json`` for ``compacter++``):

================================  ==========================  =======================================
compacter.json                    value                       field here
================================  ==========================  =======================================
``hypercomplex_division``         4                           ``n``
``factorized_phm`` / phm_rank     true / 1 (config default)   ``rank=1`` (``None``: unfactorised B_i)
``task_reduction_factor``         32                          ``reduction_factor`` (m = d // 32)
``non_linearity``                 ``gelu_new``                ``activation``
``shared_phm_rule``               true                        ``shared_rule``
``phm_c_init`` / phm_init_range   ``normal`` / 1e-4           ``rule_init_std`` (A ~ N(0, 1e-4^2))
``hypercomplex_nonlinearity``     ``glorot-uniform``          S, T Glorot-uniform, gain sqrt 2 (fixed)
``learn_phm``                     true                        A trains
``factorized_phm_rule``           false                       (A is not factorised)
``add_layer_norm_before/after``   false / false               (no adapter LayerNorm)
``unfreeze_layer_norms``          true                        ``train_layer_norms=True``
``unfreeze_lm_head``              false                       (the LM head stays frozen)
``learning_rate``                 3e-3                        ``lr``
``add_adapter_in_self_attention`` true (compacter++: false)   ``sublayers`` (``ffn`` only for ``++``)
================================  ==========================  =======================================

Placement (``seq2seq/third_party/models/t5/modeling_t5.py``): an ``AdapterController`` in
``T5LayerSelfAttention`` and ``T5LayerFF`` of the encoder and the decoder, none in
``T5LayerCrossAttention`` -> ``sublayers=("attn", "self_attn", "ffn")`` (``"cross_attn"`` adds it).
The controller computes ``adapter(y) + y`` on the sub-layer output before dropout and residual
(``seq2seq/adapters/adapter_controller.py``); the PHM layer is ``y = x @ sum_i kron(A_i, W_i) + b``
(``seq2seq/hypercomplex/layers.py`` ``matvec_product``), biases zero, each W slice
``xavier_uniform_(gain=sqrt(2))`` (``hypercomplex/inits.py``). ``--unfreeze_layer_norms``
(``seq2seq/utils/utils.py`` ``freeze_model_params``) unfreezes every ``T5LayerNorm`` / ``nn.LayerNorm``
outside the adapters, i.e. every LayerNorm of the LM; they are pre-trained tensors, reported by
``count_parameters`` under ``backbone``.

Bottleneck rounding (the workbench's rule, shared with MixPHM:
:func:`~workbench.methods._phm.phm_bottleneck`): the PHM layers need m to be a multiple of n. When
``bottleneck`` is not given and d // ``reduction_factor`` is not a multiple of n, m is rounded *up*
to the next multiple of n (no warning): d = 96 gives d // 32 = 3 -> m = 4. The official size is
kept wherever it is valid (T5-base / BART-base d = 768: m = 24, the counts below are unchanged;
vlt5-tiny d = 128: m = 4). An explicit ``bottleneck=`` is never changed (ValueError if it is not a
multiple of n), nor is a d_model that is not a multiple of n. The size in use is
``handle.bottleneck`` (also ``CompacterConfig.resolved_bottleneck(d_model)``).

Speed (same values, to float rounding): the PHM layers compute x W the cheapest way for their shape
(``_phm``: W materialised, or A folded into S or T; on T5-base both projections fold), and
``gelu_new`` is torch's fused tanh GELU (``_phm.TanhGELU``, the same formula).

Not zero-initialised: with A ~ N(0, 1e-4^2) the adapters change the output by O(1e-4) relative at
step 0 (the official init; the tests check "nearly unchanged").

Options beyond compacter.json, used by VL-PET's "Compacter + G + LW" (``workbench.methods.vlpet``),
whose Compacter is the VL baselines' (ylsung/VL_adapter ``VL-T5/scripts/image/single_compacter.sh``,
HenryHZY/VL-PET ``scripts/image-text/single_compacter.sh``: ``--hypercomplex_division 2
--shared_phm_rule False --factorized_phm False --reduction_factor 8``): ``shared_rule=False`` gives
every PHM layer its own A, drawn N(0, ``rule_init_std``^2) (VL-PET's ``src/adapters/hypercomplex/layers.py``
draws it with ``phm_init_range``, ``src/param.py`` default 0.01); ``rank=None`` an unfactorised B_i.

Deliberate departures:

- the official code is a T5 text model; here the same adapters sit on the VL backbone (the projector
  trains, as every method's does unless its official code says otherwise), and on BART at the same
  sub-layers (self-attention and FFN);
- rabeehk/compacter draws a non-shared A with a hard-coded std 0.01 (``layers.py`` ignores
  ``phm_init_range`` there); the workbench uses ``rule_init_std`` for a shared and a per-layer A alike
  (VL-PET's copy of ``layers.py`` does the same with ``phm_init_range``).

Parameters: per adapter, Down n*(d/n)*r + n*r*(m/n) + m and Up n*(m/n)*r + n*r*(d/n) + d, plus n^3
once for a shared A (2 n^3 per adapter when not shared). T5-base (d 768, m 24): 816 + 1,560 = 2,376
per adapter; compacter 48 adapters + 64 = 114,112; compacter++ 24 adapters + 64 = 57,088.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._phm import PHMLinear, check_phm_dims, init_rule, phm_activation, phm_bottleneck
from .adapters import activation, check_sublayers, lm_dtype, sublayer_points, unfreeze_layer_norms
from .base import MethodConfig, MethodHandle, freeze_backbone, register_method


class PHMAdapter(nn.Module):
    """PHM adapter ``(x, h) -> h + Up(act(Down(src)))`` with ``src = h`` (serial, ``reads="h"``) or
    ``src = x`` (parallel, ``reads="x"``: VL-PET's decoder value adapter built from a Compacter).

    ``shared_rule``: ``(container, key)`` of a shared A, or ``None`` for an own A per PHM layer drawn
    N(0, ``rule_init_std``^2). ``out_dim`` defaults to ``d_model`` (a projection modification may map
    between different widths).
    """

    def __init__(self, d_model: int, bottleneck: int, n: int, rank: int | None, act: str, shared_rule: tuple | None,
                 rule_init_std: float = 1e-4, reads: str = "h", out_dim: int | None = None, device=None, dtype=None):
        super().__init__()
        if reads not in ("h", "x"):
            raise ValueError(f"reads must be 'h' (serial) or 'x' (parallel), got {reads!r}")
        self.reads = reads
        kw = dict(n=n, rank=rank, shared_rule=shared_rule, rule_init_std=rule_init_std, device=device, dtype=dtype)
        self.down = PHMLinear(d_model, bottleneck, **kw)
        self.act = phm_activation(act)  # gelu_new: torch's fused tanh GELU (the same function)
        self.up = PHMLinear(bottleneck, d_model if out_dim is None else out_dim, **kw)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        src = h if self.reads == "h" else x
        return h + self.up(self.act(self.down(src)))

    def extra_repr(self) -> str:
        return f"reads={self.reads!r}"


@dataclass
class CompacterConfig(MethodConfig):
    """Compacter options; the defaults are seq2seq/configs/compacter.json (see the module docstring)."""

    n: int = 4
    rank: int | None = 1  # None: unfactorised B_i (the plain "PHM-Adapter")
    reduction_factor: int = 32  # m = d // 32, rounded up to a multiple of n if it is not one
    bottleneck: int | None = None  # overrides reduction_factor (never rounded)
    activation: str = "gelu_new"
    rule_init_std: float = 1e-4
    shared_rule: bool = True  # compacter.json shared_phm_rule
    sublayers: tuple = ("attn", "self_attn", "ffn")
    train_layer_norms: bool = True  # compacter.json unfreeze_layer_norms
    lr: float = 1e-2  # tuned on vlt5-tiny (compacter.json: 3e-3 on T5-base; docs/methods.md)

    def validate(self):
        super().validate()
        name = self.method_name
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"{name}: the PHM division n must be a positive int, got {self.n!r}")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"{name}: rank must be a positive int (or None for a full B_i), got {self.rank!r}")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ValueError(f"{name}: reduction_factor must be a positive int, got {self.reduction_factor!r}")
        if self.bottleneck is not None and (not isinstance(self.bottleneck, int) or self.bottleneck < 1):
            raise ValueError(f"{name}: bottleneck must be a positive int or None, got {self.bottleneck!r}")
        if not self.rule_init_std >= 0:
            raise ValueError(f"{name}: rule_init_std must be >= 0, got {self.rule_init_std!r}")
        for key in ("shared_rule", "train_layer_norms"):
            if getattr(self, key) not in (True, False):
                raise ValueError(f"{name}: {key} must be True or False, got {getattr(self, key)!r}")
        self.sublayers = check_sublayers(self.sublayers, name)
        activation(self.activation)

    def resolved_bottleneck(self, d_model: int) -> int:
        """The bottleneck m on a model of width ``d_model``: ``bottleneck`` if set, else d // 32 rounded
        up to the next multiple of n (:func:`~workbench.methods._phm.phm_bottleneck`)."""
        return phm_bottleneck(d_model, self.reduction_factor, self.bottleneck, self.n, self.method_name)


@dataclass
class CompacterPPConfig(CompacterConfig):
    """Compacter++: FFN sub-layers only (compacter++.json ``add_adapter_in_self_attention: false``)."""

    sublayers: tuple = ("ffn",)


def _apply_compacter(model, config: CompacterConfig) -> MethodHandle:
    name = config.method_name
    d = model.d_model
    m = config.resolved_bottleneck(d)  # d // 32, rounded up to a multiple of n (an explicit bottleneck: as is)
    check_phm_dims(d, m, config.n, f"{name} down-projection (d_model -> bottleneck)")
    points = sublayer_points(model, config.sublayers)
    # Everything is valid: now change the model.
    freeze_backbone(model)
    dtype = lm_dtype(model)
    shared = None
    if config.shared_rule:
        rule = init_rule(config.n, config.rule_init_std, model.device, dtype)
        model.peft_shared = nn.ParameterDict({"phm_rule": rule})
        shared = (model.peft_shared, "phm_rule")
    modules = {}
    for point in points:
        mod = PHMAdapter(d, m, config.n, config.rank, config.activation, shared, rule_init_std=config.rule_init_std,
                         device=model.device, dtype=dtype)
        model.add_sublayer_modification(point.name, mod, name="compacter")
        modules[point.name] = mod
    if config.train_layer_norms:
        unfreeze_layer_norms(model)
    handle = MethodHandle(model, config, modules)
    handle.bottleneck = m  # the size in use, after the rounding rule (module docstring)
    return handle


@register_method("compacter", CompacterConfig, family="layer: PHM adapters",
                 main_knob=("reduction_factor", (4, 8, 16, 32)))
def apply_compacter(model, config: CompacterConfig) -> MethodHandle:
    return _apply_compacter(model, config)


@register_method("compacter++", CompacterPPConfig, family="layer: PHM adapters",
                 main_knob=("reduction_factor", (4, 8, 16, 32)))
def apply_compacter_pp(model, config: CompacterPPConfig) -> MethodHandle:
    return _apply_compacter(model, config)
