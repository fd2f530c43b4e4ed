"""Everything the workbench knows about each backbone family (T5, BART), in one place.

PEFT methods never look inside a Hugging Face layer themselves; they ask for an *insertion point*
by a family-independent name and get back where it lives in this particular model:

- ``encoder.{i}.attn``: T5 ``encoder.block.i.layer.0`` (``SelfAttention``);
  BART ``model.encoder.layers.i.self_attn``
- ``encoder.{i}.ffn``: T5 ``encoder.block.i.layer.1`` (``DenseReluDense``);
  BART ``model.encoder.layers.i.fc1`` .. ``fc2``
- ``decoder.{i}.self_attn``: T5 ``decoder.block.i.layer.0``; BART ``model.decoder.layers.i.self_attn``
- ``decoder.{i}.cross_attn``: T5 ``decoder.block.i.layer.1`` (``EncDecAttention``);
  BART ``model.decoder.layers.i.encoder_attn``
- ``decoder.{i}.ffn``: T5 ``decoder.block.i.layer.2``; BART ``model.decoder.layers.i.fc1`` .. ``fc2``

and inside each attention the projections ``.q .k .v .o`` (T5 ``q k v o``, BART ``q_proj k_proj
v_proj out_proj``), inside each FFN ``.wi .wo`` (T5 ``wi wo``, gated T5 v1.1 ``wi_0 wi_1 wo``, BART
``fc1 fc2``).

For a sub-layer the workbench defines X as the residual stream entering it and H as
its output before dropout and residual. Where those tensors are, per family:

- T5 is pre-LN: ``layer.k(hidden_states)`` computes ``hidden + dropout(F(layer_norm(hidden)))``.
  X is the first input of the container ``layer.k`` (before its LayerNorm); H is the output of
  ``SelfAttention`` / ``EncDecAttention`` (element 0 of its tuple) or of ``DenseReluDense``.
- BART is post-LN: ``LN(hidden + dropout(F(hidden)))``. X is the first input of ``self_attn`` /
  ``encoder_attn`` / ``fc1`` (the previous LayerNorm's output, or the layer input); H is the
  output of the attention module (after ``out_proj``, element 0 of its tuple) or of ``fc2``.

So each sub-layer is described by two module paths relative to its layer: ``x_path`` (the module
whose first input is X) and ``h_path`` (the module whose output is H). That is all the hook
machinery in :mod:`workbench.models.vl_model` needs.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class SublayerSpec:
    """Where one sub-layer lives inside a layer (paths relative to the layer module)."""

    sublayer: str  # "attn" | "ffn" | "self_attn" | "cross_attn"
    x_path: str  # the module whose first input is X (the residual stream entering the sub-layer)
    h_path: str  # the module whose output (or output[0]) is H (before dropout and residual)
    projections: dict = field(default_factory=dict)  # short name ("q", "wi", ...) -> path


@dataclass(frozen=True)
class InsertionPoint:
    """A named place in the backbone where a PEFT method can act.

    Attributes:
        name: the family-independent name, e.g. ``"encoder.0.ffn"`` or ``"decoder.1.cross_attn.v"``.
        kind: ``"sublayer"`` (a modification sees X and H and returns H') or ``"projection"``
            (a linear map inside a sub-layer; a modification sees its input and output).
        stack: ``"encoder"`` or ``"decoder"``.
        layer: the layer index within the stack.
        sublayer: ``"attn"``, ``"ffn"`` (encoder), ``"self_attn"``, ``"cross_attn"``, ``"ffn"``
            (decoder).
        projection: for projections, ``"q" "k" "v" "o"`` or ``"wi" "wo"`` (``"wi_0" "wi_1"`` for
            gated T5); ``None`` for sub-layers.
        module_path: path (relative to the :class:`VLModel`) of the module whose output is H, or of
            the projection ``nn.Linear``: ``model.get_submodule(point.module_path)``.
        x_path: path of the module whose first input is X (equal to ``module_path`` for projections).
        layer_path: path of the HF layer (``T5Block`` / ``Bart{Encoder,Decoder}Layer``).
        mods_path: where modifications added at this point are registered as submodules
            (``<layer_path>.peft_mods.<key>``), so they appear in ``state_dict`` under that prefix.
        in_dim, out_dim: the feature sizes H (or the projection) maps between.
    """

    name: str
    kind: str
    stack: str
    layer: int
    sublayer: str
    projection: str | None
    module_path: str
    x_path: str
    layer_path: str
    mods_path: str
    in_dim: int
    out_dim: int

    @property
    def lm_path(self) -> str:
        """``module_path`` relative to the HF model (``model.lm``), e.g. for peft's target_modules."""
        return self.module_path.split(".", 1)[1] if self.module_path.startswith("lm.") else self.module_path

    @property
    def key(self) -> str:
        """The key of this point under ``<layer>.peft_mods`` (e.g. ``"ffn"``, ``"cross_attn_v"``)."""
        return self.mods_path.rsplit(".", 1)[1]


@dataclass(frozen=True)
class Family:
    """The per-family facts: classes, stack paths, sub-layer specs, norm placement."""

    name: str
    model_types: tuple
    lm_class_name: str
    config_class_name: str
    encoder_layers_path: str  # relative to the HF model
    decoder_layers_path: str
    encoder_sublayers: tuple
    decoder_sublayers: tuple
    pre_layernorm: bool
    notes: str = ""

    def lm_class(self):
        """The ``transformers`` model class (imported lazily: transformers is slow to import)."""
        import transformers

        return getattr(transformers, self.lm_class_name)

    def config_class(self):
        """The ``transformers`` config class of this family."""
        import transformers

        return getattr(transformers, self.config_class_name)

    def sizes(self, cfg) -> dict:
        """d_model, layer counts, head count and FFN width read from an HF config."""
        if self.name == "t5":
            return dict(
                d_model=cfg.d_model,
                n_enc_layers=cfg.num_layers,
                n_dec_layers=cfg.num_decoder_layers,
                n_heads=cfg.num_heads,
                d_ff=cfg.d_ff,
                vocab_size=cfg.vocab_size,
            )
        return dict(
            d_model=cfg.d_model,
            n_enc_layers=cfg.encoder_layers,
            n_dec_layers=cfg.decoder_layers,
            n_heads=cfg.encoder_attention_heads,
            d_ff=cfg.encoder_ffn_dim,
            vocab_size=cfg.vocab_size,
        )

    def text_embedding(self, lm: nn.Module) -> nn.Module:
        """The module the encoder itself uses to embed ``input_ids``.

        Using the encoder's own ``embed_tokens`` is what keeps ``inputs_embeds`` exact: for BART it
        is a ``BartScaledWordEmbedding`` that multiplies by ``embed_scale`` (sqrt(d_model) when
        ``scale_embedding``), exactly as the encoder does for ``input_ids`` (transformers 5). BART's
        encoder adds the learned positions itself, also for ``inputs_embeds``; T5 has none.
        """
        return lm.get_encoder().embed_tokens

    def embed_text(self, lm: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Embed token ids as the encoder would (scale included)."""
        return self.text_embedding(lm)(input_ids)


def _t5_specs(decoder: bool) -> tuple:
    attn = {"q": "SelfAttention.q", "k": "SelfAttention.k", "v": "SelfAttention.v", "o": "SelfAttention.o"}
    cross = {"q": "EncDecAttention.q", "k": "EncDecAttention.k", "v": "EncDecAttention.v", "o": "EncDecAttention.o"}
    # Both the plain (wi) and the gated (wi_0, wi_1) FFN are listed; only those present are exposed.
    ffn = {p: f"DenseReluDense.{p}" for p in ("wi", "wi_0", "wi_1", "wo")}

    def spec(sub, k, inner, projs):
        return SublayerSpec(sub, f"layer.{k}", f"layer.{k}.{inner}", {p: f"layer.{k}.{v}" for p, v in projs.items()})

    if not decoder:
        return (spec("attn", 0, "SelfAttention", attn), spec("ffn", 1, "DenseReluDense", ffn))
    return (
        spec("self_attn", 0, "SelfAttention", attn),
        spec("cross_attn", 1, "EncDecAttention", cross),
        spec("ffn", 2, "DenseReluDense", ffn),
    )


def _bart_specs(decoder: bool) -> tuple:
    def attn(sub, mod):
        projs = {"q": f"{mod}.q_proj", "k": f"{mod}.k_proj", "v": f"{mod}.v_proj", "o": f"{mod}.out_proj"}
        return SublayerSpec(sub, mod, mod, projs)

    ffn = SublayerSpec("ffn", "fc1", "fc2", {"wi": "fc1", "wo": "fc2"})
    if not decoder:
        return (attn("attn", "self_attn"), ffn)
    return (attn("self_attn", "self_attn"), attn("cross_attn", "encoder_attn"), ffn)


T5 = Family(
    name="t5",
    model_types=("t5",),
    lm_class_name="T5ForConditionalGeneration",
    config_class_name="T5Config",
    encoder_layers_path="encoder.block",
    decoder_layers_path="decoder.block",
    encoder_sublayers=_t5_specs(decoder=False),
    decoder_sublayers=_t5_specs(decoder=True),
    pre_layernorm=True,
    notes="pre-LN; dropout on H inside each T5Layer* container; no biases; relative position bias",
)

BART = Family(
    name="bart",
    model_types=("bart",),
    lm_class_name="BartForConditionalGeneration",
    config_class_name="BartConfig",
    encoder_layers_path="model.encoder.layers",
    decoder_layers_path="model.decoder.layers",
    encoder_sublayers=_bart_specs(decoder=False),
    decoder_sublayers=_bart_specs(decoder=True),
    pre_layernorm=False,
    notes="post-LN; functional dropout in the layer forward; learned positions; embed_scale",
)

FAMILIES = {"t5": T5, "bart": BART}


def get_family(name: str) -> Family:
    """The :class:`Family` called ``name`` (``"t5"`` or ``"bart"``)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown backbone family {name!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_for_model_type(model_type: str) -> Family:
    """The family of an HF ``config.model_type``; a clear error names the supported ones."""
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(
        f"unsupported model_type {model_type!r}: the workbench supports encoder-decoder LMs of "
        f"model_type {supported} (T5ForConditionalGeneration, BartForConditionalGeneration)"
    )


def family_of(lm: nn.Module) -> Family:
    """The family of an instantiated HF model."""
    return family_for_model_type(getattr(lm.config, "model_type", type(lm).__name__))


def install_context_hooks(lm: nn.Module, family: Family, context) -> None:
    """Install the model's own hooks that fill its :class:`~workbench.models.context.ForwardContext`.

    On every family: the decoder stack's masks (a pre-hook that runs before any other) and the
    last hidden state of each stack. With the ``text_first`` layout, the positional information is
    restricted to the text tokens, as the official VL-T5 code does: T5's relative position bias is
    computed for the text block and is zero between any pair involving a visual token; BART's learned
    positions are added to the text tokens only.
    """
    from .context import DecoderContextHook, StackOutputHook

    enc, dec = lm.get_encoder(), lm.get_decoder()
    dec.register_forward_pre_hook(DecoderContextHook(context), with_kwargs=True, prepend=True)
    enc.register_forward_hook(StackOutputHook(context, "encoder"))
    dec.register_forward_hook(StackOutputHook(context, "decoder"))
    if context.layout != "text_first":
        return
    if family.name == "t5":
        enc.block[0].layer[0].SelfAttention.register_forward_pre_hook(_T5TextOnlyBias(context), with_kwargs=True)
    else:
        enc.embed_positions.register_forward_hook(_BartTextOnlyPositions(context))


def _text_length(context, seq_len: int) -> int | None:
    """The length of the text block when the encoder runs on the context's input, else None."""
    inputs = context.inputs
    if inputs is None or inputs.embeds.shape[1] != seq_len or inputs.visual_start == 0:
        return None
    return inputs.visual_start


class _T5TextOnlyBias:
    """Pre-hook on the first encoder self-attention: hand it a bias that is T5's relative bias on the
    text block and 0 elsewhere (the later layers reuse the bias the first one returns)."""

    def __init__(self, context):
        self.context = context

    def __call__(self, module, args, kwargs):
        if kwargs.get("position_bias") is not None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        s = hidden.shape[1]
        t = _text_length(self.context, s)
        if t is None:
            return None
        text_bias = module.compute_bias(t, t, device=hidden.device)  # [1, heads, t, t]
        bias = text_bias.new_zeros(1, text_bias.shape[1], s, s)
        bias[:, :, :t, :t] = text_bias
        return args, {**kwargs, "position_bias": bias}


class _BartTextOnlyPositions:
    """Forward hook on BART's encoder position table: zero the positions of the visual tokens."""

    def __init__(self, context):
        self.context = context

    def __call__(self, module, args, output):
        s = output.shape[-2]
        t = _text_length(self.context, s)
        if t is None:
            return None
        keep = (torch.arange(s, device=output.device) < t).to(output.dtype).unsqueeze(-1)
        return output * keep


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _dims(module: nn.Module) -> tuple[int, int]:
    # nn.Linear and peft's wrapped linears both expose in_features / out_features.
    return int(module.in_features), int(module.out_features)


def insertion_points(lm: nn.Module, family: Family, prefix: str = "lm") -> "OrderedDict[str, InsertionPoint]":
    """Enumerate every insertion point of ``lm``, in forward order.

    Order: encoder layer 0 (attn, its projections, ffn, its projections), encoder layer 1, ...,
    then decoder layers (self_attn, cross_attn, ffn, each followed by its projections).
    Paths are prefixed with ``prefix`` (the attribute under which the LM sits in the VLModel).
    """
    d_model = family.sizes(lm.config)["d_model"]
    points: OrderedDict[str, InsertionPoint] = OrderedDict()
    pre = f"{prefix}." if prefix else ""
    for stack, layers_path, specs in (
        ("encoder", family.encoder_layers_path, family.encoder_sublayers),
        ("decoder", family.decoder_layers_path, family.decoder_sublayers),
    ):
        layers = lm.get_submodule(layers_path)
        for i, layer in enumerate(layers):
            layer_path = f"{pre}{layers_path}.{i}"
            for spec in specs:
                name = f"{stack}.{i}.{spec.sublayer}"
                points[name] = InsertionPoint(
                    name=name,
                    kind="sublayer",
                    stack=stack,
                    layer=i,
                    sublayer=spec.sublayer,
                    projection=None,
                    module_path=f"{layer_path}.{spec.h_path}",
                    x_path=f"{layer_path}.{spec.x_path}",
                    layer_path=layer_path,
                    mods_path=f"{layer_path}.peft_mods.{spec.sublayer}",
                    in_dim=d_model,
                    out_dim=d_model,
                )
                for proj, rel in spec.projections.items():
                    if not _has(layer, rel):
                        continue  # e.g. wi on a gated T5, wi_0/wi_1 on a plain one
                    in_dim, out_dim = _dims(layer.get_submodule(rel))
                    pname = f"{name}.{proj}"
                    points[pname] = InsertionPoint(
                        name=pname,
                        kind="projection",
                        stack=stack,
                        layer=i,
                        sublayer=spec.sublayer,
                        projection=proj,
                        module_path=f"{layer_path}.{rel}",
                        x_path=f"{layer_path}.{rel}",
                        layer_path=layer_path,
                        mods_path=f"{layer_path}.peft_mods.{spec.sublayer}_{proj}",
                        in_dim=in_dim,
                        out_dim=out_dim,
                    )
    return points


def unknown_point_error(name: str, valid) -> ValueError:
    """A ValueError for an unknown insertion-point name that suggests close valid names."""
    valid = list(valid)
    close = difflib.get_close_matches(str(name), valid, n=5, cutoff=0.5)
    hint = f"did you mean {close}? " if close else ""
    shown = valid if len(valid) <= 40 else valid[:40] + ["..."]
    return ValueError(
        f"unknown insertion point {name!r}; {hint}valid names look like 'encoder.0.attn', "
        f"'encoder.0.ffn', 'decoder.0.self_attn', 'decoder.0.cross_attn', 'decoder.0.ffn' and "
        f"'<sub-layer>.q|k|v|o' / '<ffn>.wi|wo'. All {len(valid)}: {shown}"
    )


def build_lm_config(
    family: str,
    tokenizer,
    d_model: int = 128,
    n_enc_layers: int = 4,
    n_dec_layers: int = 4,
    n_heads: int = 4,
    d_ff: int | None = None,
    dropout: float = 0.1,
    max_positions: int = 512,
    **extra,
):
    """An HF config for a fresh (randomly initialised) LM of ``family`` matching ``tokenizer``.

    The special-token ids come from the tokenizer (see :mod:`workbench.models.tokenizer`), so the
    model's pad / eos / decoder-start ids agree with it. ``extra`` goes to the HF config unchanged.
    Used by the tests (tiny random models) and by the pretraining of the embedded checkpoint.
    """
    fam = get_family(family)
    if d_model % n_heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
    d_ff = d_ff or 4 * d_model
    vocab_size = len(tokenizer)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None or eos is None:
        raise ValueError("the tokenizer needs a pad and an eos token")
    if fam.name == "t5":
        kw = dict(
            vocab_size=vocab_size,
            d_model=d_model,
            d_kv=d_model // n_heads,
            d_ff=d_ff,
            num_layers=n_enc_layers,
            num_decoder_layers=n_dec_layers,
            num_heads=n_heads,
            dropout_rate=dropout,
            pad_token_id=pad,
            eos_token_id=eos,
            decoder_start_token_id=pad,  # T5 starts decoding from <pad>
        )
    else:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise ValueError("a BART tokenizer needs a bos token")
        kw = dict(
            vocab_size=vocab_size,
            d_model=d_model,
            encoder_layers=n_enc_layers,
            decoder_layers=n_dec_layers,
            encoder_attention_heads=n_heads,
            decoder_attention_heads=n_heads,
            encoder_ffn_dim=d_ff,
            decoder_ffn_dim=d_ff,
            dropout=dropout,
            max_position_embeddings=max_positions,
            pad_token_id=pad,
            bos_token_id=bos,
            eos_token_id=eos,
            decoder_start_token_id=eos,  # BART starts decoding from </s>
            forced_eos_token_id=eos,
        )
    kw.update(extra)
    return fam.config_class()(**kw)
