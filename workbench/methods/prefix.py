"""Prefix tuning (Li & Liang, 2021): trainable key/value prefixes in every attention.

Every attention of the encoder (self) and of the decoder (self and cross) gets L trainable key and
value vectors that every query can attend to, in front of the real keys and values. ``peft``'s
PrefixTuning on seq2seq models only reaches the decoder, so this is the workbench's own
implementation, wired through transformers' attention interface (see
:mod:`workbench.methods._attention`): the LM is switched to the ``wb_prefix_sdpa`` (or
``wb_prefix_eager``) implementation, which prepends the prefix of each attention module, pads the
attention mask (and T5's relative position bias, with zeros) and calls the original sdpa / eager
function. The KV cache of ``generate`` only holds the real keys and values; the prefix is added at
every step.

Where the parameters live: each attention gets a *prefix site*, registered as an identity
sub-layer modification at ``encoder.{i}.attn`` / ``decoder.{i}.self_attn`` /
``decoder.{i}.cross_attn`` (so it sits under ``<layer>.peft_mods``: counted as a method parameter,
saved by ``save_method``, never part of the backbone checkpoint).

Reparameterisation (``reparam=True``, the default, as Li & Liang's seq2seq code): three groups
(encoder self-attention, decoder self-attention, decoder cross-attention), each with an embedding
P' in R^{L x d} (init N(0, 1), as their ``nn.Embedding``) and an MLP
``Linear(d, mid_dim) -> tanh -> Linear(mid_dim, n_layers * 2 * inner)`` that produces the keys and
values of all its layers (mid_dim 512 as in their table-to-text setup). The MLP parameters belong
to the site of the group's first layer; the other sites reference it. In eval mode without
gradients the MLP output is computed once and cached (invalidated when any of its parameters
changes). ``reparam=False`` trains the prefixes directly (init N(0, ``init_std``)).

Defaults: L = 10 (Li & Liang's table-to-text length; the empirical study sweeps L), lr = 1e-3
(Li & Liang used 5e-5 over many more steps than the low-resource runs of this workbench).

The identity case: with the prefix disabled (``handle.disabled()``) the attention functions call
sdpa / eager unchanged and the model computes exactly what the backbone computes. A prefix of zero
keys and values is *not* the identity: zero keys still take softmax mass (score 0), which shrinks
the attention output.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from . import _attention
from .base import MethodConfig, MethodHandle, freeze_backbone, register_method

GROUPS = ("encoder", "decoder_self", "decoder_cross")
_GROUP_SUBLAYER = {"encoder": "attn", "decoder_self": "self_attn", "decoder_cross": "cross_attn"}


@dataclass
class PrefixConfig(MethodConfig):
    """Prefix tuning options.

    Attributes:
        length: L, the number of prefix positions per attention.
        reparam: train through the reparameterisation MLP (Li & Liang) instead of directly.
        mid_dim: hidden width of the reparameterisation MLP.
        init_std: std of the direct prefixes (``reparam=False``).
        groups: which attentions get a prefix (default all: encoder self, decoder self, decoder cross).
        lr: learning rate.
    """

    length: int = 10
    reparam: bool = True
    mid_dim: int = 512
    init_std: float = 0.02
    groups: tuple = GROUPS
    lr: float = 1e-3

    def validate(self) -> None:
        super().validate()
        name = self.method_name
        if not isinstance(self.length, int) or isinstance(self.length, bool) or self.length <= 0:
            raise ValueError(f"{name}: prefix length must be a positive int, got {self.length!r}")
        if not isinstance(self.mid_dim, int) or isinstance(self.mid_dim, bool) or self.mid_dim <= 0:
            raise ValueError(f"{name}: mid_dim must be a positive int, got {self.mid_dim!r}")
        if not self.init_std > 0:
            raise ValueError(f"{name}: init_std must be > 0, got {self.init_std!r}")
        groups = tuple(self.groups)
        bad = set(groups) - set(GROUPS)
        if bad or not groups or len(set(groups)) != len(groups):
            raise ValueError(f"{name}: groups must be distinct names among {list(GROUPS)}, got {list(self.groups)}")


class PrefixReparam(nn.Module):
    """P' (L x d) -> MLP -> keys and values of every layer of one group (Li & Liang)."""

    def __init__(self, length: int, d_model: int, mid_dim: int, n_layers: int, inner_dim: int):
        super().__init__()
        self.length, self.n_layers, self.inner_dim = length, n_layers, inner_dim
        self.embedding = nn.Parameter(torch.randn(length, d_model))
        self.mlp = nn.Sequential(nn.Linear(d_model, mid_dim), nn.Tanh(), nn.Linear(mid_dim, n_layers * 2 * inner_dim))
        self._cache = None  # (key, tensor [n_layers, 2, L, inner]) in eval mode without grad

    def _all(self) -> torch.Tensor:
        out = self.mlp(self.embedding)  # [L, n_layers * 2 * inner]
        return out.view(self.length, self.n_layers, 2, self.inner_dim).permute(1, 2, 0, 3)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[L, inner]`` of layer ``i`` of the group."""
        if not self.training and not torch.is_grad_enabled():
            key = tuple((p.data_ptr(), p._version) for p in self.parameters())
            if self._cache is None or self._cache[0] != key:
                self._cache = (key, self._all().detach())
            kv = self._cache[1][i]
            return kv[0], kv[1]
        self._cache = None
        # Only the rows of layer i of the second linear: same result as slicing the full output.
        h = self.mlp[1](self.mlp[0](self.embedding))
        lin = self.mlp[2]
        rows = slice(i * 2 * self.inner_dim, (i + 1) * 2 * self.inner_dim)
        kv = nn.functional.linear(h, lin.weight[rows], lin.bias[rows]).view(self.length, 2, self.inner_dim)
        return kv[:, 0], kv[:, 1]


class _ReparamRef:
    """Plain holder so that non-owner sites reference the group's MLP without registering it twice."""

    def __init__(self, module: PrefixReparam):
        self.module = module


class PrefixSite(nn.Module):
    """The prefix of one attention module; an identity sub-layer modification (``forward(x, h) = h``)
    whose only job is to own the parameters and answer ``key_values()`` to the attention function."""

    def __init__(self, group: str, layer: int, length: int, inner_dim: int, reparam: PrefixReparam | None = None,
                 owner: bool = False, init_std: float = 0.02):
        super().__init__()
        self.group, self.layer, self.length, self.inner_dim = group, layer, length, inner_dim
        self.enabled = True
        if reparam is None:
            self.key = nn.Parameter(torch.randn(length, inner_dim) * init_std)
            self.value = nn.Parameter(torch.randn(length, inner_dim) * init_std)
            self._reparam = None
        elif owner:
            self.reparam = reparam
            self._reparam = None
        else:
            self._reparam = _ReparamRef(reparam)

    def _reparam_module(self):
        if "reparam" in self._modules:
            return self._modules["reparam"]
        return self._reparam.module if self._reparam is not None else None

    def key_values(self, dtype=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)``, each ``[L, heads * d_head]``."""
        rep = self._reparam_module()
        k, v = (self.key, self.value) if rep is None else rep.layer(self.layer)
        if dtype is not None or device is not None:
            k, v = k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)
        return k, v

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h

    def extra_repr(self) -> str:
        return f"group={self.group!r}, layer={self.layer}, length={self.length}, inner_dim={self.inner_dim}"


class PrefixHandle(MethodHandle):
    """Prefix tuning handle: ``sites()``, ``disabled()`` (the identity case), ``base_attention``."""

    def __init__(self, model, config, sites: dict, base_attention: str):
        super().__init__(model, config, modules=sites)
        self.base_attention = base_attention

    def sites(self) -> dict[str, PrefixSite]:
        return dict(self.modules)

    @contextlib.contextmanager
    def disabled(self):
        """Within the block the attention functions ignore the prefixes (backbone outputs exactly)."""
        states = {n: s.enabled for n, s in self.modules.items()}
        for s in self.modules.values():
            s.enabled = False
        try:
            yield self
        finally:
            for n, s in self.modules.items():
                s.enabled = states[n]


def _attention_module(model, point):
    return model.get_submodule(point.module_path)


@register_method("prefix", PrefixConfig, family="embedding composition", main_knob=("length", (5, 10, 20, 40)))
def apply_prefix(model, config: PrefixConfig) -> PrefixHandle:
    d = model.d_model
    n_layers = {"encoder": model.config.n_enc_layers, "decoder_self": model.config.n_dec_layers,
                "decoder_cross": model.config.n_dec_layers}
    # --- validate against the model before changing anything ---
    plan = []  # (group, layer, point, attention module, inner_dim)
    for group in config.groups:
        stack = "encoder" if group == "encoder" else "decoder"
        for i in range(n_layers[group]):
            point = model.get_point(f"{stack}.{i}.{_GROUP_SUBLAYER[group]}")
            k_point = model.get_point(f"{point.name}.k")
            attn = _attention_module(model, point)
            if not hasattr(attn, "config"):
                raise ValueError(f"prefix: {point.name} ({type(attn).__name__}) has no config; it does not use "
                                 "transformers' attention interface")
            plan.append((group, i, point, attn, k_point.out_dim))
    if not plan:
        raise ValueError("prefix: the backbone has no attention layers to prefix")
    if model.modifications() or len(model.input_modifiers):
        raise ValueError("prefix: the model already carries modifications; load a fresh backbone")
    base = _attention.current_implementation(model.lm)
    if base not in _attention.BASES:
        raise ValueError(f"prefix: needs the 'sdpa' or 'eager' attention implementation, the LM uses {base!r}")
    if model.family == "bart":
        max_pos = getattr(model.lm.config, "max_position_embeddings", None)
        if max_pos is not None and config.length >= max_pos:
            raise ValueError(f"prefix: length {config.length} must be < max_position_embeddings ({max_pos})")

    # --- build ---
    freeze_backbone(model)
    reparams = {}
    if config.reparam:
        for group in config.groups:
            inner = next(p[4] for p in plan if p[0] == group)
            reparams[group] = PrefixReparam(config.length, d, config.mid_dim, n_layers[group], inner)
    sites = {}
    for group, i, point, attn, inner in plan:
        site = PrefixSite(group, i, config.length, inner, reparam=reparams.get(group), owner=(i == 0),
                          init_std=config.init_std)
        model.add_sublayer_modification(point.name, site, name="prefix")
        _attention.attach_prefix(attn, site)
        sites[point.name] = site
        site.requires_grad_(True)
    try:
        base = _attention.switch_to_prefix(model.lm, [p[3] for p in plan])
    except Exception:
        for _, _, point, attn, _ in plan:
            _attention.detach_prefix(attn)
        model.remove_modifications()
        raise
    return PrefixHandle(model, config, sites, base)
