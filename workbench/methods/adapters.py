"""Bottleneck adapters: serial (Houlsby, Pfeiffer) and parallel (He et al.), one ``Adapter`` class.

With X the sub-layer input (residual stream), H the sub-layer output before dropout and residual,
Down: d -> m, Up: m -> d, act = GELU (docs/methods.md#bottleneck-adapters):

- ``houlsby`` (Houlsby et al. 2019): serial, H' = H + Up(act(Down(H))) after the attention and the FFN
  sub-layer of every layer; in the decoder also after cross-attention.
- ``pfeiffer`` (Pfeiffer et al. 2021): the same serial adapter, FFN sub-layer only.
- ``parallel`` (He et al. 2022, "Towards a unified view of PET"): H' = H + s * Up(act(Down(X))), the
  adapter reads the sub-layer *input*; FFN sub-layer by default (option: attention too), s = 4.

Bottleneck m = d // reduction_factor (default 12: m = 64 on a d = 768 model, the adapter size of the
MixPHM paper's adapter baselines, so a merged MixPHM and a Pfeiffer adapter have the same bottleneck),
or ``bottleneck=`` directly. Up is zero-initialised (weight and bias), so the model is unchanged at
step 0; Down keeps ``nn.Linear``'s default init (as He et al.'s LoRA-style init).

Placement is a tuple of sub-layer names (``attn`` = encoder self-attention, ``self_attn`` /
``cross_attn`` = decoder attentions, ``ffn`` = every FFN), resolved through the backbone's
insertion points, so the same config works for T5 and BART.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import MethodConfig, MethodHandle, freeze_backbone, register_method

SUBLAYERS = ("attn", "self_attn", "cross_attn", "ffn")
ATTENTION = ("attn", "self_attn", "cross_attn")


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


class Adapter(nn.Module):
    """Bottleneck adapter as a sub-layer modification ``(x, h) -> h'``.

    ``reads="h"`` (serial): h' = h + scale * Up(act(Down(h))); ``reads="x"`` (parallel):
    h' = h + scale * Up(act(Down(x))). Up starts at zero, so h' = h at initialisation.
    """

    def __init__(self, d_model: int, bottleneck: int, act: str = "gelu", reads: str = "h", scale: float = 1.0,
                 device=None, dtype=None):
        super().__init__()
        if reads not in ("h", "x"):
            raise ValueError(f"reads must be 'h' (serial) or 'x' (parallel), got {reads!r}")
        self.reads, self.scale = reads, float(scale)
        self.down = nn.Linear(d_model, bottleneck, device=device, dtype=dtype)
        self.act = activation(act)
        self.up = nn.Linear(bottleneck, d_model, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)  # zero-init: the model is unchanged at step 0
        nn.init.zeros_(self.up.bias)

    def delta(self, src: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(src)))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        src = h if self.reads == "h" else x
        return h + self.scale * self.delta(src)

    def extra_repr(self) -> str:
        return f"reads={self.reads!r}, scale={self.scale}"


@dataclass
class _AdapterConfig(MethodConfig):
    reduction_factor: int = 12
    bottleneck: int | None = None  # overrides reduction_factor when set
    activation: str = "gelu"
    sublayers: tuple = ("attn", "self_attn", "cross_attn", "ffn")
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


@dataclass
class HoulsbyConfig(_AdapterConfig):
    """Serial adapter after every attention (decoder: self and cross) and FFN sub-layer."""

    sublayers: tuple = ("attn", "self_attn", "cross_attn", "ffn")


@dataclass
class PfeifferConfig(_AdapterConfig):
    """Serial adapter after the FFN sub-layer only."""

    sublayers: tuple = ("ffn",)


@dataclass
class ParallelConfig(_AdapterConfig):
    """Parallel adapter reading the sub-layer input, scaled by ``scale`` (He et al.: s = 4, FFN)."""

    sublayers: tuple = ("ffn",)  # add "attn", "self_attn", "cross_attn" for the attention variant
    scale: float = 4.0

    def validate(self):
        super().validate()
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool):
            raise ValueError(f"parallel: scale must be a number, got {self.scale!r}")


def _apply_adapters(model, config: _AdapterConfig, reads: str, scale: float) -> MethodHandle:
    name = config.method_name
    d = model.d_model
    m = bottleneck_size(d, config.reduction_factor, config.bottleneck, name)
    points = sublayer_points(model, config.sublayers)  # validated before anything changes
    freeze_backbone(model)
    modules = {}
    for point in points:
        mod = Adapter(d, m, config.activation, reads=reads, scale=scale, device=model.device, dtype=lm_dtype(model))
        model.add_sublayer_modification(point.name, mod, name=name)
        modules[point.name] = mod
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
