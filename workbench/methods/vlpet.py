"""VL-PET (Hu et al., ICCV 2023): granularity-controlled modular modifications, lightweight decoder.

Faithful to the official code (HenryHZY/VL-PET, ``src/my_transformers/modeling_{bart,t5}.py``,
``src/trainer_base.py`` and ``scripts/image-text/*VL-PET-*.sh``) and to docs/methods.md#vlpet:

Encoder, every layer, both sub-layers (self-attention and FFN), with X the sub-layer input (the
residual stream) and H its output before dropout and residual::

    Z  = GELU_tanh(concat_i(H W_down,i + b_i))      W_down,i in R^{d x r/Nh}, i = 1..Nh
    H~ = H + Z W_up + b_up                           (the multi-head modification)
    H_out = s * G (.) H~                             (G also multiplies the frozen output H)

then the backbone's own dropout + residual (+ LayerNorm for BART). The granularity of G:

- ``large``:   G = sigmoid(GELU_tanh(X W_ld + b) W_lu + b'), N x d per sample, low rank r_g;
- ``middleX``: G = sigmoid((X + H~) w + b), N x 1 (one gate per token);
- ``middleY``: G = 1 + z, z in R^d, 1 x d (one gate per channel; official ``H~ + H~ * z``);
  option ``middley_form="one_plus_sigmoid"``: G = 1 + sigmoid(z) (the paper's figure);
- ``small``:   g = mean over tokens of sigmoid([X ; H~] w + b), one scalar per sample. The official
  code averages over the padding tokens too (``torch.mean(gate, dim=1)``); by default the mean here
  is over the valid tokens only (the encoder's attention mask, recorded by a forward pre-hook on the
  encoder), ``small_mask_padding=False`` is the official behaviour.

Decoder (lightweight design): one parallel adapter on the value projection of the cross-attention
of every decoder layer, V = E W_v + b_v + GELU_tanh(E W_d + b_d) W_u + b_u (E the encoder output),
r = 96, no gate. Encoder LayerNorms are trainable (official ``--unfreeze_encoder_layer_norms``).

Defaults (official scripts; ``None`` fields are resolved from ``model.family`` at apply time, and
the handle's config holds the resolved values):

============  =====  ====  =====  =====  ======  =========================================
family        r      Nh    r_g    s      lr      init
============  =====  ====  =====  =====  ======  =========================================
BART          96     4     96     1.0    1e-3    HF BART init: Linear N(0, 0.02), zero bias;
                                                 z ~ N(0, 0.02) (the BART scripts set no
                                                 zero-init flag)
T5            192    4     192    0.3    3e-4    zero-initialised up-projections (W_up, the
                                                 large gate's W_lu and biases), middleX/small
                                                 linears, z and the decoder adapter's W_u
                                                 (the T5 scripts' ``*_zero_init`` flags); the
                                                 down-projections keep torch's default init
============  =====  ====  =====  =====  ======  =========================================

``zero_init=True/False`` overrides the family choice. What is true at step 0 with zero-init: the
up-projection is zero, so H~ = H exactly, and H_out = s * G0 * H with G0 = sigmoid(0) = 0.5 for
large / middleX / small and G0 = 1 for middleY. The output is therefore *not* unchanged in general
(T5 default: every encoder sub-layer output is scaled by 0.3 * 0.5 = 0.15); it is unchanged only
for middleY with s = 1 (and the decoder value adapters, whose up-projection is zero, are then the
identity).

Transfer ("+G + LW", paper Table 9): ``inner=`` another registered sub-layer method (``houlsby``,
``compacter``, ``compacter++``, ``pfeiffer``, ``parallel``) replaces the multi-head modification:
that method is applied first through the registry (so it builds its modules its own way, shared
tensors included), then every module it put on an encoder sub-layer is wrapped by the gate
(``H_out = s * G (.) inner(X, H)``) and the modules it put on decoder sub-layers are replaced by the
lightweight decoder. Registered as ``houlsby+g+lw`` and ``compacter+g+lw`` (options of the inner
method go in ``inner_options``).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .base import MethodConfig, MethodHandle, freeze_backbone, get_config, list_methods, method_spec, register_method

GRANULARITIES = ("large", "middleX", "middleY", "small")
MIDDLEY_FORMS = ("one_plus_z", "one_plus_sigmoid")
# Methods whose modules are sub-layer modifications ``module(x, h) -> h'`` that the gate can wrap.
INNER_METHODS = ("multihead", "houlsby", "pfeiffer", "parallel", "compacter", "compacter++")

FAMILY_DEFAULTS = {
    "bart": dict(r=96, n_heads=4, r_gate=96, scale=1.0, lr=1e-3, zero_init=False),
    "t5": dict(r=192, n_heads=4, r_gate=192, scale=0.3, lr=3e-4, zero_init=True),
}
_RESOLVED = ("r", "n_heads", "r_gate", "scale", "lr", "zero_init")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (``gelu_new`` in the official code)."""
    return F.gelu(x, approximate="tanh")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class VlpetConfig(MethodConfig):
    """VL-PET options; ``None`` means "the official default for the backbone family".

    Attributes:
        granularity: ``large | middleX | middleY | small``.
        r: bottleneck of the multi-head modification (BART 96, T5 192).
        n_heads: Nh, the number of down-projection heads (4); ``r`` must be divisible by it.
        r_gate: rank r_g of the large gate (BART 96, T5 192).
        scale: s (BART 1.0, T5 0.3).
        decoder_r: bottleneck of the decoder value adapters (96 for both families).
        zero_init: zero-initialise the up-projections, middleX/small linears and z (T5 yes, BART no).
        small_mask_padding: ``small`` averages over valid tokens only (default) or, when False,
            over padding too (official).
        middley_form: ``one_plus_z`` (official code) or ``one_plus_sigmoid`` (paper figure).
        train_encoder_layernorms: the encoder LayerNorms train (official VL-PET setting).
        inner: the sub-layer modification the gate wraps: ``multihead`` (VL-PET's own) or a
            registered sub-layer method (``houlsby``, ``compacter``, ...: the "+G + LW" transfer).
        inner_options: config overrides for ``inner`` (only with a registered inner method).
        lr: learning rate (BART 1e-3, T5 3e-4).
    """

    granularity: str = "large"
    r: int | None = None
    n_heads: int | None = None
    r_gate: int | None = None
    scale: float | None = None
    decoder_r: int = 96
    zero_init: bool | None = None
    small_mask_padding: bool = True
    middley_form: str = "one_plus_z"
    train_encoder_layernorms: bool = True
    inner: str = "multihead"
    inner_options: dict = field(default_factory=dict)
    lr: float | None = None

    def validate(self) -> None:
        name = self.method_name
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"{name}: lr must be > 0 (or None for the family default), got {self.lr!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"{name}: unknown granularity {self.granularity!r}; choose one of {list(GRANULARITIES)}")
        for key in ("r", "n_heads", "r_gate"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"{name}: {key} must be a positive int (or None for the family default), got {v!r}")
        if not isinstance(self.decoder_r, int) or isinstance(self.decoder_r, bool) or self.decoder_r <= 0:
            raise ValueError(f"{name}: decoder_r must be a positive int, got {self.decoder_r!r}")
        if self.r is not None and self.n_heads is not None and self.r % self.n_heads:
            raise ValueError(f"{name}: r ({self.r}) must be divisible by the number of heads n_heads ({self.n_heads})")
        if self.scale is not None and not (isinstance(self.scale, (int, float)) and self.scale > 0):
            raise ValueError(f"{name}: scale s must be > 0, got {self.scale!r}")
        if self.middley_form not in MIDDLEY_FORMS:
            raise ValueError(f"{name}: middley_form must be one of {list(MIDDLEY_FORMS)}, got {self.middley_form!r}")
        if self.zero_init not in (None, True, False):
            raise ValueError(f"{name}: zero_init must be True, False or None, got {self.zero_init!r}")
        if self.inner not in INNER_METHODS:
            raise ValueError(f"{name}: inner must be one of {list(INNER_METHODS)}, got {self.inner!r}")
        if not isinstance(self.inner_options, dict):
            raise ValueError(f"{name}: inner_options must be a dict, got {type(self.inner_options).__name__}")
        if self.inner == "multihead" and self.inner_options:
            raise ValueError(f"{name}: inner_options are for a registered inner method, not 'multihead' "
                             f"(got {self.inner_options}); use r / n_heads")

    def resolved(self, family: str) -> "VlpetConfig":
        """A copy with every ``None`` default replaced by the official value for ``family``."""
        if family not in FAMILY_DEFAULTS:
            raise ValueError(f"{self.method_name}: no defaults for backbone family {family!r}; "
                             f"known: {sorted(FAMILY_DEFAULTS)}")
        fam = FAMILY_DEFAULTS[family]
        cfg = replace(self, **{k: fam[k] for k in _RESOLVED if getattr(self, k) is None})
        cfg.inner_options = dict(self.inner_options)
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HoulsbyGLwConfig(VlpetConfig):
    """``houlsby+g+lw``: the VL-PET gate around serial (Houlsby) adapters + the lightweight decoder."""

    inner: str = "houlsby"

    def validate(self) -> None:
        super().validate()
        if self.inner != "houlsby":
            raise ValueError(f"{self.method_name}: inner is fixed to 'houlsby' (use 'vlpet' with inner=...)")


@dataclass
class CompacterGLwConfig(VlpetConfig):
    """``compacter+g+lw``: the VL-PET gate around Compacter modules + the lightweight decoder."""

    inner: str = "compacter"

    def validate(self) -> None:
        super().validate()
        if self.inner != "compacter":
            raise ValueError(f"{self.method_name}: inner is fixed to 'compacter' (use 'vlpet' with inner=...)")


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class MultiHeadModification(nn.Module):
    """H~ = H + GELU_tanh(concat_i(H W_down,i + b_i)) W_up + b_up, with Nh down-projection heads.

    The heads are kept as Nh linears (the official parameterisation); since the activation is
    element-wise, concatenating them is one matmul with the stacked weights, which is what runs.
    """

    def __init__(self, d_model: int, r: int, n_heads: int):
        super().__init__()
        if r % n_heads:
            raise ValueError(f"r ({r}) must be divisible by n_heads ({n_heads})")
        self.down = nn.ModuleList(nn.Linear(d_model, r // n_heads) for _ in range(n_heads))
        self.up = nn.Linear(r, d_model)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        w = torch.cat([lin.weight for lin in self.down], dim=0)
        b = torch.cat([lin.bias for lin in self.down], dim=0)
        return h + self.up(gelu_tanh(F.linear(h, w, b)))


class LargeGate(nn.Module):
    """G = sigmoid(GELU_tanh(X W_ld + b) W_lu + b'): shape [batch, N, d]."""

    granularity = "large"

    def __init__(self, d_model: int, r_gate: int):
        super().__init__()
        self.down = nn.Linear(d_model, r_gate)
        self.up = nn.Linear(r_gate, d_model)

    def forward(self, x, h_tilde):
        return torch.sigmoid(self.up(gelu_tanh(self.down(x))))


class MiddleXGate(nn.Module):
    """G = sigmoid((X + H~) w + b): shape [batch, N, 1]."""

    granularity = "middleX"

    def __init__(self, d_model: int):
        super().__init__()
        self.linear = nn.Linear(d_model, 1)

    def forward(self, x, h_tilde):
        return torch.sigmoid(self.linear(x + h_tilde))


class MiddleYGate(nn.Module):
    """G = 1 + z (official) or 1 + sigmoid(z) (paper figure): shape [d] (1 x d, shared by all tokens)."""

    granularity = "middleY"

    def __init__(self, d_model: int, form: str = "one_plus_z"):
        super().__init__()
        if form not in MIDDLEY_FORMS:
            raise ValueError(f"middleY form must be one of {list(MIDDLEY_FORMS)}, got {form!r}")
        self.form = form
        self.z = nn.Parameter(torch.zeros(d_model))

    def forward(self, x, h_tilde):
        return 1.0 + (torch.sigmoid(self.z) if self.form == "one_plus_sigmoid" else self.z)

    def extra_repr(self) -> str:
        return f"form={self.form!r}"


class SmallGate(nn.Module):
    """g = mean over tokens of sigmoid([X ; H~] w + b): shape [batch, 1, 1].

    ``mask_padding=True`` averages over the valid tokens of the encoder attention mask of the current
    forward (``model.context.encoder_mask``, the 2-D mask the encoder stack receives); ``False``
    averages over every position (official). Without a mask (a gate used outside a VLModel) every
    position counts, as in the official code.
    """

    granularity = "small"

    def __init__(self, d_model: int, mask_padding: bool = True):
        super().__init__()
        self.linear = nn.Linear(2 * d_model, 1)
        self.mask_padding = mask_padding
        self.context = None  # the model's ForwardContext (a plain reference, set when applied)

    def token_gates(self, x, h_tilde):
        """Per-token sigmoid scores before the mean, [batch, N, 1]."""
        return torch.sigmoid(self.linear(torch.cat([x, h_tilde], dim=-1)))

    def forward(self, x, h_tilde, mask: torch.Tensor | None = None):
        g = self.token_gates(x, h_tilde)
        if mask is None and self.mask_padding and self.context is not None:
            mask = self.context.encoder_mask
        if not self.mask_padding or mask is None:
            return g.mean(dim=1, keepdim=True)
        if tuple(mask.shape) != tuple(g.shape[:2]):
            raise ValueError(f"VL-PET small gate: recorded encoder mask has shape {tuple(mask.shape)} but the "
                             f"sub-layer sees {tuple(g.shape[:2])} tokens")
        m = mask.to(g.dtype).unsqueeze(-1)
        return (g * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1.0)

    def extra_repr(self) -> str:
        return f"mask_padding={self.mask_padding}"


class _Chain(nn.Module):
    """Several sub-layer modifications applied in order (h <- m(x, h))."""

    def __init__(self, mods):
        super().__init__()
        self.mods = nn.ModuleList(mods)

    def forward(self, x, h):
        for m in self.mods:
            h = m(x, h)
        return h


class GatedModification(nn.Module):
    """H_out = s * G(X, H~) (.) H~ with H~ = inner(X, H): wraps any ``module(x, h) -> h'``.

    ``record_gate = True`` keeps the last gate (detached) in ``last_gate`` for probes and tests.
    """

    def __init__(self, inner: nn.Module, gate: nn.Module, scale: float = 1.0):
        super().__init__()
        self.inner = inner
        self.gate = gate
        self.scale = float(scale)
        self.record_gate = False
        self.last_gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        h_tilde = self.inner(x, h)
        g = self.gate(x, h_tilde)
        if self.record_gate:
            self.last_gate = g.detach()
        out = g * h_tilde
        return out * self.scale if self.scale != 1.0 else out

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class DecoderValueAdapter(nn.Module):
    """Lightweight decoder: V = E W_v + b_v + GELU_tanh(E W_d + b_d) W_u + b_u (a projection mod)."""

    def __init__(self, in_dim: int, r: int, out_dim: int):
        super().__init__()
        self.down = nn.Linear(in_dim, r)
        self.up = nn.Linear(r, out_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(gelu_tanh(self.down(x)))


def make_gate(granularity: str, d_model: int, r_gate: int, middley_form: str = "one_plus_z",
              small_mask_padding: bool = True) -> nn.Module:
    """The gate module of ``granularity``."""
    if granularity == "large":
        return LargeGate(d_model, r_gate)
    if granularity == "middleX":
        return MiddleXGate(d_model)
    if granularity == "middleY":
        return MiddleYGate(d_model, middley_form)
    if granularity == "small":
        return SmallGate(d_model, small_mask_padding)
    raise ValueError(f"unknown granularity {granularity!r}; choose one of {list(GRANULARITIES)}")


# ---------------------------------------------------------------------------------------------
# Initialisation (official per family, see the module docstring)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _init_modules(gated: list, dec: list, family: str, zero_init: bool, init_std: float, own_inner: bool) -> None:
    def hf_normal(lin: nn.Linear):
        lin.weight.normal_(0.0, init_std)
        if lin.bias is not None:
            lin.bias.zero_()

    def zero(lin: nn.Linear):
        lin.weight.zero_()
        if lin.bias is not None:
            lin.bias.zero_()

    for mod in gated:
        own = [mod.gate] + ([mod.inner] if own_inner else [])
        if family == "bart":  # HF BartPretrainedModel._init_weights on every new Linear
            for part in own:
                for m in part.modules():
                    if isinstance(m, nn.Linear):
                        hf_normal(m)
        if isinstance(mod.gate, MiddleYGate):
            mod.gate.z.normal_(0.0, 0.02)  # official nn.init.normal_(std=0.02)
        if zero_init:
            if own_inner:
                zero(mod.inner.up)
            gate = mod.gate
            if isinstance(gate, LargeGate):
                zero(gate.up)
            elif isinstance(gate, (MiddleXGate, SmallGate)):
                zero(gate.linear)
            elif isinstance(gate, MiddleYGate):
                gate.z.zero_()
    for ad in dec:
        if family == "bart":
            hf_normal(ad.down)
            hf_normal(ad.up)
        if zero_init:
            zero(ad.up)


# ---------------------------------------------------------------------------------------------
# Handle and apply
# ---------------------------------------------------------------------------------------------


class VlpetHandle(MethodHandle):
    """The VL-PET handle: ``gated_modules()``, ``decoder_adapters()``, ``record_gates()``,
    ``method_parameter_count()`` on top of the common protocol."""

    def __init__(self, model, config, gated: dict, decoder: dict, inner_handle=None):
        super().__init__(model, config, modules={**gated, **decoder})
        self.gated = dict(gated)
        self.decoder = dict(decoder)
        self.inner_handle = inner_handle

    def gated_modules(self) -> dict[str, GatedModification]:
        """Encoder point name -> :class:`GatedModification`."""
        return dict(self.gated)

    def decoder_adapters(self) -> dict[str, DecoderValueAdapter]:
        """Decoder point name (``decoder.{i}.cross_attn.v``) -> :class:`DecoderValueAdapter`."""
        return dict(self.decoder)

    @contextlib.contextmanager
    def record_gates(self):
        """Within the block every gated module keeps its last gate in ``last_gate``."""
        for m in self.gated.values():
            m.record_gate, m.last_gate = True, None
        try:
            yield {name: m for name, m in self.gated.items()}
        finally:
            for m in self.gated.values():
                m.record_gate = False

    def method_parameter_count(self) -> int:
        """Parameters of the inserted method modules (gates, inner modifications, decoder adapters)
        plus tensors an inner method shares through ``model.peft_shared`` (Compacter's A), each
        counted once; not the trainable LayerNorms nor the projector."""
        shared = getattr(self.model, "peft_shared", None)
        parts = list(self.modules.values()) + ([shared] if isinstance(shared, nn.Module) else [])
        seen, n = set(), 0
        for m in parts:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
        return n

    def extra_losses(self) -> dict:
        return self.inner_handle.extra_losses() if self.inner_handle is not None else {}


def _encoder_layernorm_params(model) -> list:
    params = []
    for m in model.lm.get_encoder().modules():
        if isinstance(m, nn.LayerNorm) or "LayerNorm" in type(m).__name__:
            params.extend(p for p in m.parameters(recurse=False))
    return params


def _apply_vlpet(model, config: VlpetConfig) -> VlpetHandle:
    cfg = config.resolved(model.family)
    cfg.validate()
    d = model.d_model
    n_enc, n_dec = model.config.n_enc_layers, model.config.n_dec_layers
    # --- validate against the model before changing anything ---
    enc_points = [model.get_point(f"encoder.{i}.{sub}") for i in range(n_enc) for sub in ("attn", "ffn")]
    dec_points = [model.get_point(f"decoder.{i}.cross_attn.v") for i in range(n_dec)]
    if not enc_points or not dec_points:
        raise ValueError(f"{cfg.method_name}: the backbone needs encoder and decoder layers "
                         f"(has {n_enc} + {n_dec})")
    if model.modifications() or len(model.input_modifiers):
        raise ValueError(f"{cfg.method_name}: the model already carries modifications "
                         f"({list(model.modifications())[:3]}...); load a fresh backbone")
    inner_fn = inner_cfg = None
    if cfg.inner != "multihead":
        if cfg.inner not in list_methods():
            raise ValueError(
                f"{cfg.method_name}: the inner method {cfg.inner!r} is not registered (its module in "
                f"workbench/methods is missing?); registered: {', '.join(list_methods())}"
            )
        inner_fn = method_spec(cfg.inner).apply_fn
        inner_cfg = get_config(cfg.inner, **cfg.inner_options)  # validates the inner options

    # --- build ---
    inner_handle = None
    inners: dict[str, nn.Module] = {}
    if inner_fn is None:
        freeze_backbone(model)
        for p in enc_points:
            inners[p.name] = MultiHeadModification(d, cfg.r, cfg.n_heads)
    else:
        n_inputs = len(model.input_modifiers)
        inner_handle = inner_fn(model, inner_cfg)  # validates against the model, freezes the backbone, inserts
        if len(model.input_modifiers) != n_inputs or any(
            model.get_point(name).kind != "sublayer" for name in model.modifications()
        ):
            raise RuntimeError(f"{cfg.method_name}: inner method {cfg.inner!r} inserted something other than "
                               "sub-layer modifications; the VL-PET gate can only wrap module(x, h) -> h'")
        enc_names = {p.name for p in enc_points}
        for name in list(model.modifications()):
            mods = model.remove_modifications(name)
            if name in enc_names:
                inners[name] = mods[0] if len(mods) == 1 else _Chain(mods)
            # decoder sub-layer modules are dropped: the lightweight design puts only the value adapter there
        if not inners:
            raise RuntimeError(f"{cfg.method_name}: inner method {cfg.inner!r} put no module on an encoder sub-layer")

    gated: dict[str, GatedModification] = {}
    for p in enc_points:
        if p.name not in inners:
            continue
        gate = make_gate(cfg.granularity, d, cfg.r_gate, cfg.middley_form, cfg.small_mask_padding)
        if isinstance(gate, SmallGate):
            gate.context = model.context
        gated[p.name] = GatedModification(inners[p.name], gate, cfg.scale)
    decoder = {p.name: DecoderValueAdapter(p.in_dim, cfg.decoder_r, p.out_dim) for p in dec_points}
    init_std = float(getattr(model.lm.config, "init_std", 0.02) or 0.02)
    _init_modules(list(gated.values()), list(decoder.values()), model.family, cfg.zero_init, init_std,
                  own_inner=inner_fn is None)
    for name, mod in gated.items():
        model.add_sublayer_modification(name, mod, name="vlpet")
    for name, mod in decoder.items():
        model.add_projection_modification(name, mod, name="vlpet_lw")
    for mod in list(gated.values()) + list(decoder.values()):
        mod.requires_grad_(True)
    if cfg.train_encoder_layernorms:
        for p in _encoder_layernorm_params(model):
            p.requires_grad_(True)
    return VlpetHandle(model, cfg, gated, decoder, inner_handle)


_GATED = "layer: gated (VL-PET)"
register_method("vlpet", VlpetConfig, family=_GATED,
                main_knob=("granularity", ("large", "middleX", "middleY", "small")))(_apply_vlpet)
register_method("houlsby+g+lw", HoulsbyGLwConfig, family=_GATED)(_apply_vlpet)
register_method("compacter+g+lw", CompacterGLwConfig, family=_GATED)(_apply_vlpet)
