"""Compacter and Compacter++ (Mahabadi et al. 2021): adapters whose projections are PHM layers.

Each adapter is serial, H' = H + Up(act(Down(H))), with Down: d -> m and Up: m -> d PHM linears
(:class:`~workbench.methods._phm.PHMLinear`): W = sum_{i=1..n} A_i (kron) B_i, B_i = s_i t_i^T of
rank r. One A (n x n x n) is shared by *every* PHM layer of the model (both projections of all
adapters); it lives at ``model.peft_shared["phm_rule"]``.

Official defaults (docs/methods.md#compacter; the authors' ``phm_adapters.json``): n = 4, r = 1, reduction
factor 32 (m = d // 32), activation ``gelu_new``, A ~ N(0, 1e-4^2), s and t Glorot-uniform
(gain sqrt 2), biases zero, lr 3e-3.

- ``compacter``: adapters after the self-attention and the FFN sub-layer of every encoder and decoder
  layer (the official T5 code has none after cross-attention; ``sublayers`` adds it).
- ``compacter++``: FFN sub-layers only.

Not zero-initialised: with A ~ N(0, 1e-4^2) the adapters change the output by O(1e-4) relative at
step 0 (the official init; the tests check "nearly unchanged"). The official scripts also unfreeze
the LayerNorms; the counts in docs/methods.md cover only the adapters, so ``train_layer_norms`` defaults to False.

Parameters: per adapter, Down n*(d/n)*r + n*r*(m/n) + m and Up n*(m/n)*r + n*r*(d/n) + d, plus n^3
once for A. T5-base (d 768, m 24): 816 + 1,560 = 2,376 per adapter; compacter 48 adapters + 64 =
114,112; compacter++ 24 adapters + 64 = 57,088.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._phm import PHMLinear, check_phm_dims, init_rule
from .adapters import activation, bottleneck_size, check_sublayers, lm_dtype, sublayer_points
from .base import MethodConfig, MethodHandle, freeze_backbone, register_method


class PHMAdapter(nn.Module):
    """Serial PHM adapter ``(x, h) -> h + Up(act(Down(h)))`` with a shared A."""

    def __init__(self, d_model: int, bottleneck: int, n: int, rank: int | None, act: str, shared_rule: tuple,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(n=n, rank=rank, shared_rule=shared_rule, device=device, dtype=dtype)
        self.down = PHMLinear(d_model, bottleneck, **kw)
        self.act = activation(act)
        self.up = PHMLinear(bottleneck, d_model, **kw)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


@dataclass
class CompacterConfig(MethodConfig):
    n: int = 4
    rank: int | None = 1  # None: unfactorised B_i (the plain "PHM-Adapter")
    reduction_factor: int = 32
    bottleneck: int | None = None  # overrides reduction_factor
    activation: str = "gelu_new"
    rule_init_std: float = 1e-4
    sublayers: tuple = ("attn", "self_attn", "ffn")
    train_layer_norms: bool = False  # the official scripts' unfreeze_layer_norms
    lr: float = 3e-3

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
        self.sublayers = check_sublayers(self.sublayers, name)
        activation(self.activation)


@dataclass
class CompacterPPConfig(CompacterConfig):
    sublayers: tuple = ("ffn",)


def _is_layer_norm(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("LayerNorm")


def _apply_compacter(model, config: CompacterConfig) -> MethodHandle:
    name = config.method_name
    d = model.d_model
    m = bottleneck_size(d, config.reduction_factor, config.bottleneck, name)
    check_phm_dims(d, m, config.n, f"{name} down-projection (d_model -> bottleneck)")
    points = sublayer_points(model, config.sublayers)
    # Everything is valid: now change the model.
    freeze_backbone(model)
    dtype = lm_dtype(model)
    model.peft_shared = nn.ParameterDict({"phm_rule": init_rule(config.n, config.rule_init_std, model.device, dtype)})
    shared = (model.peft_shared, "phm_rule")
    modules = {}
    for point in points:
        mod = PHMAdapter(d, m, config.n, config.rank, config.activation, shared, device=model.device, dtype=dtype)
        model.add_sublayer_modification(point.name, mod, name="compacter")
        modules[point.name] = mod
    if config.train_layer_norms:
        for mname, module in model.lm.named_modules():
            if _is_layer_norm(mname, module):
                for p in module.parameters():
                    p.requires_grad_(True)
    return MethodHandle(model, config, modules)


@register_method("compacter", CompacterConfig, family="layer: PHM adapters",
                 main_knob=("reduction_factor", (4, 8, 16, 32)))
def apply_compacter(model, config: CompacterConfig) -> MethodHandle:
    return _apply_compacter(model, config)


@register_method("compacter++", CompacterPPConfig, family="layer: PHM adapters",
                 main_knob=("reduction_factor", (4, 8, 16, 32)))
def apply_compacter_pp(model, config: CompacterPPConfig) -> MethodHandle:
    return _apply_compacter(model, config)
