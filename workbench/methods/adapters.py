"""Bottleneck adapters: serial (Houlsby / VL-Adapter, Pfeiffer / MixPHM's baseline) and parallel (He et al.).

One module class, :class:`Adapter`, placed as a sub-layer modification. With X the sub-layer input
(residual stream), H the sub-layer output before dropout and residual, Down: d -> m, Up: m -> d
(docs/methods.md#bottleneck-adapters)::

    serial    H' = H + Up(act(Down(H)))            (houlsby, pfeiffer)
    parallel  H' = H + s * Up(act(Down(X)))        (parallel)

then the backbone's own dropout + residual (+ LayerNorm for post-LN BART). Bottleneck
m = d // ``reduction_factor`` or ``bottleneck=`` directly. Placement is a tuple of sub-layer names
(``attn`` = encoder self-attention, ``self_attn`` / ``cross_attn`` = decoder attentions, ``ffn`` =
every FFN), resolved through the backbone's insertion points, so one config serves T5 and BART.

``houlsby`` -- VL-Adapter's adapter (ylsung/VL_adapter, the VL-T5 code; the same files are vendored in
HenryHZY/VL-PET ``src/``):

- ``VL-T5/src/adapters/adapter_modeling.py`` ``Adapter``: ``down_sampler = nn.Linear(d, d // reduction_factor)``,
  ``up_sampler = nn.Linear(m, d)``, no re-initialisation; ``adapter_controller.py``
  ``AdapterController.forward``: ``adapter(x) + x`` (no adapter LayerNorm: ``add_layer_norm_before/after_adapter``
  are off);
- ``VL-T5/src/adapters/config.py`` ``AdapterConfig.non_linearity = "gelu_new"`` -> ``activation="gelu_new"``
  (GELU, tanh approximation);
- ``VL-T5/scripts/image/single_adapter.sh``: ``--reduction_factor 8`` -> m = d // 8 (96 at d = 768),
  ``--unfreeze_layer_norms`` -> ``train_layer_norms=True``, ``--lr 1e-3`` -> ``lr``;
- ``VL-T5/src/param.py`` ``--add_adapter_cross_attn`` default True and
  ``VL-T5/src/my_transformers/modeling_{t5,bart}.py``: adapters after every self-attention, the decoder
  cross-attention and every FFN, on the sub-layer output before dropout and residual;
- ``VL-T5/src/trainer_base.py`` ``unfreeze_parameters``: ``--unfreeze_layer_norms`` unfreezes every
  ``T5LayerNorm`` / ``nn.LayerNorm`` of the model (here: every LayerNorm of the LM; the projector's own
  LayerNorm trains with the projector, as VL-Adapter's always-trainable ``visual_embedding``);
- initialisation (``init="official"``): the modules keep ``nn.Linear``'s default init on T5 (the VL-T5
  ``T5PreTrainedModel._init_weights`` only touches T5's own classes); on BART every new ``nn.Linear``
  is re-drawn N(0, ``init_std``) with zero bias by ``BartPretrainedModel._init_weights``, which
  ``VLBart.__init__`` runs through ``init_weights()`` before the pre-trained weights are loaded.

T5-base: 60 adapters x 148,320 = 8,899,200 method parameters (2 * 768 * 96 + 96 + 768 each); the 62
unfrozen LayerNorm weights (47,616) are pre-trained LM tensors, reported by ``count_parameters``
under ``backbone``.

``pfeiffer`` -- MixPHM's own adapter baseline (jingjing12110/MixPHM):

- ``src/vl_t5/my_transformers/modeling_t5.py`` ``T5LayerFF``: ``Adapter(hidden, adapter_size,
  'swish' if adapter_type == 'houlsby' else 'relu')`` on the FFN output, and only
  ``adapter_type == 'houlsby'`` adds one to ``T5LayerSelfAttention`` -> FFN sub-layers only, ReLU;
- ``src/vl_t5/param.py`` ``--adapter_size`` default 64 -> m = d // 12 (64 at d = 768);
- ``src/vl_t5/adaMix/adapter.py`` ``Adapter``: ``adapter_B(act(adapter_A(x))) + x`` with two default
  ``nn.Linear`` (``init="official"`` = torch's default on both families; MixPHM has no BART code);
- ``src/vl_t5/train.py``: only parameters whose name contains ``adapter`` train -> no LayerNorm, and
  the pre-trained visual embedding stays frozen (``OFFICIAL_TRAIN_PROJECTOR = False``).

``parallel`` (He et al. 2022, "Towards a unified view of PET"): H' = H + s * Up(act(Down(X))), FFN by
default (option: attention too), s = 4, exact GELU, Up zero-initialised and Down with ``nn.Linear``'s
default init (their LoRA-style init, ``init="zero_up"``).

Deliberate departures (all methods here):

- the adapter is one module per site for all tasks (VL-Adapter's ``--use_single_adapter`` form; the
  workbench trains one task at a time);
- the official code applies the adapter inside the HF layer forward; here a forward hook replaces H
  at the same place (the same computation);
- the reduction factor, not an absolute size, is the knob of ``pfeiffer`` (``adapter_size=64`` is
  d // 12 at d = 768 only; ``bottleneck=64`` gives it at any width).

``init`` options: ``"official"`` (per method, above), ``"torch"`` (``nn.Linear`` default for Down and
Up), ``"normal"`` (Down and Up N(0, ``init_std``), zero biases: the HF BART draw), ``"zero_up"`` (Down
torch default, Up all zeros: the model is unchanged at step 0 -- the workbench's former default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import MethodConfig, MethodHandle, freeze_backbone, register_method

SUBLAYERS = ("attn", "self_attn", "cross_attn", "ffn")
ATTENTION = ("attn", "self_attn", "cross_attn")
INITS = ("official", "torch", "normal", "zero_up")
"""Initialisations of an adapter's Down / Up (see the module docstring)."""


def activation(name: str) -> nn.Module:
    """An activation module by its transformers name (``gelu``, ``gelu_new``, ``relu``, ``swish``, ...)."""
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACT2FN)}")
    act = ACT2FN[name]
    return act if isinstance(act, nn.Module) else _Fn(act)


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def check_sublayers(sublayers, what: str) -> tuple:
    """Validate a placement tuple (lists from a JSON round trip are accepted)."""
    if isinstance(sublayers, str):
        sublayers = (sublayers,)
    sublayers = tuple(sublayers)
    bad = [s for s in sublayers if s not in SUBLAYERS]
    if bad or not sublayers:
        raise ValueError(f"{what}: sublayers must be a non-empty subset of {SUBLAYERS}, got {sublayers!r}")
    return sublayers


def sublayer_points(model, sublayers) -> list:
    """The sub-layer insertion points of ``model`` whose sub-layer is in ``sublayers``, in forward order."""
    points = [p for p in model.insertion_points(kind="sublayer").values() if p.sublayer in set(sublayers)]
    if not points:
        raise ValueError(f"the backbone has no sub-layer insertion points of kinds {sorted(sublayers)}")
    return points


def bottleneck_size(d_model: int, reduction_factor: int, bottleneck: int | None, what: str) -> int:
    """m = bottleneck, or d // reduction_factor; ValueError if that is < 1."""
    m = bottleneck if bottleneck is not None else d_model // reduction_factor
    if m < 1:
        raise ValueError(f"{what}: the bottleneck d_model // reduction_factor = {d_model} // {reduction_factor} "
                         f"is {m}; use a smaller reduction_factor or set bottleneck=")
    return m


def lm_dtype(model) -> torch.dtype:
    return next(model.lm.parameters()).dtype


def lm_init_std(model) -> float:
    """The std of the LM's own ``_init_weights`` for new linears (BART ``init_std``; 0.02 otherwise)."""
    return float(getattr(model.lm.config, "init_std", 0.02) or 0.02)


def unfreeze_layer_norms(model) -> list[str]:
    """Make every LayerNorm of the LM trainable (the official ``--unfreeze_layer_norms``: every
    ``T5LayerNorm`` / ``nn.LayerNorm``); returns the names of the unfrozen parameters."""
    names = []
    for mname, module in model.lm.named_modules():
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("LayerNorm"):
            for pname, p in module.named_parameters(recurse=False):
                p.requires_grad_(True)
                names.append(f"lm.{mname}.{pname}")
    return names


class Adapter(nn.Module):
    """Bottleneck adapter as a sub-layer modification ``(x, h) -> h'``.

    ``reads="h"`` (serial): h' = h + scale * Up(act(Down(h))); ``reads="x"`` (parallel):
    h' = h + scale * Up(act(Down(x))). ``init``: ``"zero_up"`` (default of the class: Up all zeros,
    so h' = h at initialisation), ``"torch"`` (``nn.Linear``'s default for both), ``"normal"``
    (both N(0, ``init_std``), zero biases). The methods pass their official choice.
    """

    def __init__(self, d_model: int, bottleneck: int, act: str = "gelu", reads: str = "h", scale: float = 1.0,
                 init: str = "zero_up", init_std: float = 0.02, device=None, dtype=None):
        super().__init__()
        if reads not in ("h", "x"):
            raise ValueError(f"reads must be 'h' (serial) or 'x' (parallel), got {reads!r}")
        if init not in ("torch", "normal", "zero_up"):
            raise ValueError(f"Adapter init must be 'torch', 'normal' or 'zero_up', got {init!r}")
        self.reads, self.scale = reads, float(scale)
        self.down = nn.Linear(d_model, bottleneck, device=device, dtype=dtype)
        self.act = activation(act)
        self.up = nn.Linear(bottleneck, d_model, device=device, dtype=dtype)
        with torch.no_grad():
            if init == "normal":
                for lin in (self.down, self.up):
                    lin.weight.normal_(0.0, init_std)
                    lin.bias.zero_()
            elif init == "zero_up":
                self.up.weight.zero_()
                self.up.bias.zero_()

    def delta(self, src: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(src)))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        src = h if self.reads == "h" else x
        return h + self.scale * self.delta(src)

    def extra_repr(self) -> str:
        return f"reads={self.reads!r}, scale={self.scale}"


@dataclass
class _AdapterConfig(MethodConfig):
    """Fields shared by the adapter methods (each method sets its own official defaults).

    Attributes:
        reduction_factor: m = d // reduction_factor.
        bottleneck: m directly (overrides ``reduction_factor``).
        activation: a transformers activation name (``gelu_new``, ``gelu``, ``relu``, ...).
        sublayers: where the adapters go (``attn``, ``self_attn``, ``cross_attn``, ``ffn``).
        init: ``official`` (the method's official code, per backbone family), ``torch``, ``normal``,
            ``zero_up``.
        train_layer_norms: unfreeze every LayerNorm of the LM (the official ``--unfreeze_layer_norms``).
        lr: learning rate.
    """

    reduction_factor: int = 12
    bottleneck: int | None = None  # overrides reduction_factor when set
    activation: str = "gelu"
    sublayers: tuple = ("attn", "self_attn", "cross_attn", "ffn")
    init: str = "zero_up"
    train_layer_norms: bool = False
    lr: float = 1e-3

    def validate(self):
        super().validate()
        name = self.method_name
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ValueError(f"{name}: reduction_factor must be a positive int, got {self.reduction_factor!r}")
        if self.bottleneck is not None and (not isinstance(self.bottleneck, int) or self.bottleneck < 1):
            raise ValueError(f"{name}: bottleneck must be a positive int or None, got {self.bottleneck!r}")
        self.sublayers = check_sublayers(self.sublayers, name)
        activation(self.activation)
        if self.init not in INITS:
            raise ValueError(f"{name}: init must be one of {list(INITS)}, got {self.init!r}")
        if self.train_layer_norms not in (True, False):
            raise ValueError(f"{name}: train_layer_norms must be True or False, got {self.train_layer_norms!r}")

    def official_init(self, family: str) -> str:
        """What ``init="official"`` means on a backbone ``family`` (``torch`` / ``normal`` / ``zero_up``)."""
        return "zero_up"

    def resolved_init(self, family: str) -> str:
        return self.official_init(family) if self.init == "official" else self.init


@dataclass
class HoulsbyConfig(_AdapterConfig):
    """VL-Adapter's serial adapter after every attention (decoder: self and cross) and FFN sub-layer:
    d // 8, ``gelu_new``, official init, LayerNorms unfrozen (see the module docstring for the files)."""

    reduction_factor: int = 8  # VL-T5/scripts/image/single_adapter.sh --reduction_factor 8
    activation: str = "gelu_new"  # VL-T5/src/adapters/config.py AdapterConfig.non_linearity
    sublayers: tuple = ("attn", "self_attn", "cross_attn", "ffn")  # param.py --add_adapter_cross_attn True
    init: str = "official"  # nn.Linear default (T5) / BART _init_weights N(0, init_std) (BART)
    train_layer_norms: bool = True  # single_adapter.sh --unfreeze_layer_norms
    lr: float = 1e-2  # tuned on vlt5-tiny (single_adapter.sh: 1e-3 on T5-base; docs/methods.md)

    def official_init(self, family: str) -> str:
        return "normal" if family == "bart" else "torch"


@dataclass
class PfeifferConfig(_AdapterConfig):
    """MixPHM's Pfeiffer baseline: serial adapter after the FFN only, ReLU, d // 12, ``nn.Linear``
    default init, no LayerNorm, projector frozen (see the module docstring for the files)."""

    OFFICIAL_TRAIN_PROJECTOR: ClassVar[bool] = False  # src/vl_t5/train.py trains only '*adapter*' tensors

    reduction_factor: int = 12  # src/vl_t5/param.py --adapter_size 64 = 768 // 12
    activation: str = "relu"  # modeling_t5.py: 'swish' if adapter_type == 'houlsby' else 'relu'
    sublayers: tuple = ("ffn",)
    init: str = "official"  # adaMix/adapter.py: two default nn.Linear
    train_layer_norms: bool = False
    lr: float = 3e-3  # tuned on vlt5-tiny (MixPHM's recipe: 5e-3 on T5-base; docs/methods.md)

    def official_init(self, family: str) -> str:
        return "torch"


@dataclass
class ParallelConfig(_AdapterConfig):
    """Parallel adapter reading the sub-layer input, scaled by ``scale`` (He et al.: s = 4, FFN)."""

    sublayers: tuple = ("ffn",)  # add "attn", "self_attn", "cross_attn" for the attention variant
    scale: float = 4.0
    lr: float = 1e-2  # tuned on vlt5-tiny (docs/methods.md)

    def validate(self):
        super().validate()
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool):
            raise ValueError(f"parallel: scale must be a number, got {self.scale!r}")


def _apply_adapters(model, config: _AdapterConfig, reads: str, scale: float) -> MethodHandle:
    name = config.method_name
    d = model.d_model
    m = bottleneck_size(d, config.reduction_factor, config.bottleneck, name)
    points = sublayer_points(model, config.sublayers)  # validated before anything changes
    init = config.resolved_init(model.family)
    freeze_backbone(model)
    modules = {}
    for point in points:
        mod = Adapter(d, m, config.activation, reads=reads, scale=scale, init=init, init_std=lm_init_std(model),
                      device=model.device, dtype=lm_dtype(model))
        model.add_sublayer_modification(point.name, mod, name=name)
        modules[point.name] = mod
    if config.train_layer_norms:
        unfreeze_layer_norms(model)
    return MethodHandle(model, config, modules)


@register_method("houlsby", HoulsbyConfig, family="layer: adapters",
                 main_knob=("reduction_factor", (4, 8, 12, 24, 48)))
def apply_houlsby(model, config: HoulsbyConfig) -> MethodHandle:
    return _apply_adapters(model, config, reads="h", scale=1.0)


@register_method("pfeiffer", PfeifferConfig, family="layer: adapters",
                 main_knob=("reduction_factor", (4, 8, 12, 24, 48)))
def apply_pfeiffer(model, config: PfeifferConfig) -> MethodHandle:
    return _apply_adapters(model, config, reads="h", scale=1.0)


@register_method("parallel", ParallelConfig, family="layer: adapters",
                 main_knob=("reduction_factor", (4, 8, 12, 24, 48)))
def apply_parallel(model, config: ParallelConfig) -> MethodHandle:
    return _apply_adapters(model, config, reads="x", scale=config.scale)
