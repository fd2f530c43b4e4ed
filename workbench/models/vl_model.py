"""The vision-language backbone: visual features -> projector -> HF encoder-decoder LM.

This is the VL-Adapter / VL-T5 design. Visual features ``[batch, n_visual, feat_dim]`` go through a
trainable projector (Linear + LayerNorm) into the LM's width and are placed *in front of* the
embedded text prompt; the concatenation is fed to the encoder through ``inputs_embeds``; the
decoder generates the answer or caption::

    visual_feats --projector--> [v_1 .. v_n] ++ embed(prompt) --> encoder --> decoder --> text

Extension points for PEFT methods (see the README section of :mod:`workbench.models`):

- ``insertion_points()`` / ``get_point(name)``: the named sub-layers and projections, the same
  names for T5 and BART (the per-family facts are in :mod:`workbench.models.families`).
- ``add_sublayer_modification(point, module)``: ``module(x, h) -> h'`` replaces the output H of a
  sub-layer (before dropout and residual), seeing its input X (the residual stream).
- ``add_projection_modification(point, module)``: ``module(x, y) -> y'`` replaces the output of a
  projection (q k v o wi wo) given its input.
- ``add_input_modifier(module)``: ``module(inputs: EncoderInputs) -> EncoderInputs`` edits the
  encoder's input embeddings and mask (prompt tuning), also during ``generate``.

Modifications are registered submodules (``state_dict``, ``.to()``, ``.parameters()`` see them) at
``<layer>.peft_mods.<point key>.<name>``; the forward hooks that apply them are installed once per
point, never by rewriting a Hugging Face ``forward``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .families import Family, InsertionPoint, family_of, get_family, insertion_points, unknown_point_error

CONFIG_NAME = "workbench_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_NAME = "workbench-vlmodel"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be read (corrupted, truncated, wrong contents)."""


@dataclass
class VLConfig:
    """The shape of a :class:`VLModel` (the LM's own config stays in ``model.lm.config``).

    Attributes:
        family: ``"t5"`` or ``"bart"``.
        feat_dim: the last dimension of the visual features the projector accepts.
        d_model, n_enc_layers, n_dec_layers, n_heads, d_ff, vocab_size: read from the LM config.
        visual_encoder: the config of the embedded :class:`~workbench.models.visual.VisualEncoder`
            (``None`` when features are precomputed outside the model).
        max_new_tokens: the default generation length.
        name: a free label (e.g. ``"vlt5-tiny"``).
    """

    family: str
    feat_dim: int
    d_model: int
    n_enc_layers: int
    n_dec_layers: int
    n_heads: int
    d_ff: int
    vocab_size: int
    visual_encoder: dict | None = None
    max_new_tokens: int = 20
    name: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "VLConfig":
        """Build from a dict, ignoring keys this version does not know (forward compatibility)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class EncoderInputs:
    """What the encoder is about to receive: embeddings, mask, and where the visual tokens end.

    Input modifiers (prompt tuning, PETAL's instruction mixture, ...) take and return one of these.
    ``embeds[:, :n_visual]`` are the projected visual tokens, the rest is the embedded prompt
    (and whatever modifiers inserted). ``input_ids`` and ``visual_feats`` are there to read, e.g.
    to pool the instruction; changing them has no effect.
    """

    embeds: torch.Tensor  # [batch, seq, d_model]
    mask: torch.Tensor  # [batch, seq], 1 = attend
    n_visual: int
    input_ids: torch.Tensor | None = None
    visual_feats: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    def insert(self, position: int, vectors: torch.Tensor, mask: torch.Tensor | None = None) -> "EncoderInputs":
        """Return a copy with ``vectors`` (``[L, d]`` or ``[batch, L, d]``) inserted at ``position``.

        Prompt tuning is ``inputs.insert(inputs.n_visual, prompt)``: after the visual tokens, before
        the text. The inserted positions are attended (mask 1) unless ``mask`` says otherwise.
        """
        b = self.embeds.shape[0]
        if vectors.dim() == 2:
            vectors = vectors.unsqueeze(0).expand(b, -1, -1)
        if vectors.dim() != 3 or vectors.shape[0] != b or vectors.shape[2] != self.embeds.shape[2]:
            raise ValueError(
                f"vectors to insert must be [L, {self.embeds.shape[2]}] or [{b}, L, {self.embeds.shape[2]}], "
                f"got {tuple(vectors.shape)}"
            )
        if not 0 <= position <= self.embeds.shape[1]:
            raise ValueError(f"position must be in [0, {self.embeds.shape[1]}], got {position}")
        if mask is None:
            mask = self.mask.new_ones(b, vectors.shape[1])
        vectors = vectors.to(self.embeds.dtype)
        embeds = torch.cat([self.embeds[:, :position], vectors, self.embeds[:, position:]], dim=1)
        new_mask = torch.cat([self.mask[:, :position], mask.to(self.mask.dtype), self.mask[:, position:]], dim=1)
        n_visual = self.n_visual + vectors.shape[1] if position < self.n_visual else self.n_visual
        return EncoderInputs(embeds, new_mask, n_visual, self.input_ids, self.visual_feats, dict(self.extras))


# ---------------------------------------------------------------------------------------------
# Modification sites and their hooks
# ---------------------------------------------------------------------------------------------


class ModificationSite(nn.ModuleDict):
    """The modifications registered at one insertion point, applied in insertion order.

    It lives at ``<layer>.peft_mods.<point key>`` so its modules are submodules of the model.
    Two hooks feed it: a forward pre-hook on the module whose first input is X stores X, and a
    forward hook on the module whose output is H replaces H by ``mods(x, h)`` in turn.
    """

    def __init__(self, point: InsertionPoint):
        super().__init__()
        self.point_name = point.name
        self.kind = point.kind
        # Plain attributes (not submodules): the modules the hooks sit on, and the handles.
        self._hooked: tuple = ()
        self._handles: list = []
        self._x = None

    def apply(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Run every modification in order: ``h <- mod(x, h)``."""
        for mod in self.values():
            h = mod(x, h)
        return h

    def extra_repr(self) -> str:
        return f"point={self.point_name!r}"


def _first_input(args, kwargs):
    # HF calls sub-layers with hidden_states first (positionally); fall back to the kwarg names.
    if args:
        return args[0]
    for key in ("hidden_states", "input", "x"):
        if key in kwargs:
            return kwargs[key]
    return next(iter(kwargs.values()), None)


class _CaptureX:
    """Forward pre-hook: remember the sub-layer input X for the site (a callable object rather than
    a closure so that ``copy.deepcopy(model)`` rebinds it to the copied site)."""

    def __init__(self, site: ModificationSite):
        self.site = site

    def __call__(self, module, args, kwargs):
        self.site._x = _first_input(args, kwargs)
        return None


class _ModifyH:
    """Forward hook: replace the output H (or ``output[0]`` for attention tuples) by the site's mods."""

    def __init__(self, site: ModificationSite):
        self.site = site

    def __call__(self, module, args, kwargs, output):
        site = self.site
        x, site._x = site._x, None  # drop the reference: X must not outlive the forward
        if len(site) == 0:
            return None
        if x is None:  # the pre-hook did not run: the module was called from an unexpected place
            x = _first_input(args, kwargs)
        if isinstance(output, tuple):
            return (site.apply(x, output[0]),) + tuple(output[1:])
        return site.apply(x, output)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class VLModel(nn.Module):
    """Visual features + text prompt -> HF seq2seq LM (T5 or BART).

    Args:
        lm: a ``T5ForConditionalGeneration`` or ``BartForConditionalGeneration``.
        tokenizer: its tokenizer (``encode_prompts``, ``encode_targets``, ``generate_text`` use it).
        feat_dim: the last dimension of the visual features.
        visual_encoder: optional embedded :class:`~workbench.models.visual.VisualEncoder` that turns
            images into features (``encode_images``); saved with the model.
        seed: seeds the projector's initialisation without touching the global RNG state.
        name: a free label stored in the config.

    Attributes:
        lm, projector, visual_encoder, tokenizer, family (``"t5"``/``"bart"``), config
        (:class:`VLConfig`), input_modifiers (``nn.ModuleList``).
    """

    def __init__(self, lm: nn.Module, tokenizer, feat_dim: int, visual_encoder: nn.Module | None = None,
                 seed: int | None = 0, name: str | None = None):
        super().__init__()
        fam = family_of(lm)
        if not isinstance(feat_dim, int) or isinstance(feat_dim, bool) or feat_dim < 1:
            raise ValueError(f"feat_dim must be a positive int, got {feat_dim!r}")
        if visual_encoder is not None and getattr(visual_encoder, "feat_dim", feat_dim) != feat_dim:
            raise ValueError(
                f"the visual encoder produces features of dim {visual_encoder.feat_dim} but feat_dim={feat_dim}"
            )
        sizes = fam.sizes(lm.config)
        self._family: Family = fam
        self.config = VLConfig(
            family=fam.name,
            feat_dim=feat_dim,
            visual_encoder=visual_encoder.config_dict() if visual_encoder is not None else None,
            name=name,
            **sizes,
        )
        self.lm = lm
        self.tokenizer = tokenizer
        self.visual_encoder = visual_encoder
        # fork_rng: a seeded projector init must not change what the caller's RNG produces next.
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.projector = nn.Sequential(nn.Linear(feat_dim, sizes["d_model"]), nn.LayerNorm(sizes["d_model"]))
        dtype = next(lm.parameters()).dtype
        self.projector.to(device=next(lm.parameters()).device, dtype=dtype)
        self.input_modifiers = nn.ModuleList()
        self._points = insertion_points(lm, fam, prefix="lm")

    # --- basic properties ---------------------------------------------------------------------

    @property
    def family(self) -> str:
        """``"t5"`` or ``"bart"``."""
        return self._family.name

    @property
    def family_spec(self) -> Family:
        """The :class:`~workbench.models.families.Family` record (paths, norm placement)."""
        return self._family

    @property
    def device(self) -> torch.device:
        return self.projector[0].weight.device

    @property
    def feat_dim(self) -> int:
        return self.config.feat_dim

    @property
    def d_model(self) -> int:
        return self.config.d_model

    # --- tokenisation helpers -----------------------------------------------------------------

    def encode_prompts(self, texts, max_length: int | None = None):
        """Tokenise prompts -> ``(input_ids, attention_mask)`` on the model's device (padded right)."""
        texts = _as_text_list(texts, "texts")
        enc = self.tokenizer(texts, padding=True, truncation=max_length is not None, max_length=max_length,
                             return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def encode_targets(self, texts, max_length: int | None = None) -> torch.Tensor:
        """Tokenise targets -> ``labels`` with padding replaced by -100 (ignored by the loss)."""
        texts = _as_text_list(texts, "texts")
        enc = self.tokenizer(texts, padding=True, truncation=max_length is not None, max_length=max_length,
                             return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return labels.to(self.device)

    def decode(self, ids) -> list[str]:
        """Token ids -> stripped strings (special tokens removed)."""
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # --- the input path ---------------------------------------------------------------------

    def encode_images(self, images) -> torch.Tensor:
        """Images (uint8 ``[b, H, W, 3]``) -> visual features with the embedded visual encoder."""
        if self.visual_encoder is None:
            raise ValueError("this backbone has no embedded visual encoder; pass precomputed visual_feats")
        return self.visual_encoder(images)

    def build_encoder_inputs(self, visual_feats, input_ids=None, attention_mask=None,
                             visual_mask=None) -> EncoderInputs:
        """Project the features, embed the prompt, concatenate, then run the input modifiers.

        This is the one place where the encoder's input is made (``forward``, ``encode`` and
        ``generate`` all call it), so an input modifier acts identically in training and decoding.
        """
        visual_feats, input_ids, attention_mask, visual_mask = self._check_inputs(
            visual_feats, input_ids, attention_mask, visual_mask
        )
        vis = self.projector(visual_feats.to(self.projector[0].weight.dtype))
        b, n_visual = vis.shape[:2]
        if visual_mask is None:
            visual_mask = torch.ones(b, n_visual, dtype=torch.long, device=vis.device)
        if input_ids is None:
            embeds, mask = vis, visual_mask.long()
        else:
            text = self._family.embed_text(self.lm, input_ids).to(vis.dtype)
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            embeds = torch.cat([vis, text], dim=1)
            mask = torch.cat([visual_mask.long(), attention_mask.long()], dim=1)
        inputs = EncoderInputs(embeds=embeds, mask=mask, n_visual=n_visual, input_ids=input_ids,
                               visual_feats=visual_feats)
        for modifier in self.input_modifiers:
            inputs = modifier(inputs)
            if not isinstance(inputs, EncoderInputs):
                raise TypeError(f"input modifier {type(modifier).__name__} must return an EncoderInputs")
        return inputs

    def _check_inputs(self, visual_feats, input_ids, attention_mask, visual_mask):
        """Validate shapes and dtypes up front, so errors name the argument instead of a torch op."""
        if isinstance(visual_feats, np.ndarray):
            visual_feats = torch.from_numpy(visual_feats)
        if not isinstance(visual_feats, torch.Tensor):
            raise TypeError("visual_feats must be a tensor [batch, n_visual, feat_dim], got "
                            f"{type(visual_feats).__name__}")
        if visual_feats.dim() != 3:
            raise ValueError(f"visual_feats must be [batch, n_visual, feat_dim], got shape {tuple(visual_feats.shape)}")
        if visual_feats.shape[-1] != self.config.feat_dim:
            raise ValueError(
                f"visual_feats has feature dim {visual_feats.shape[-1]} but this backbone's projector "
                f"expects feat_dim={self.config.feat_dim}"
            )
        if not visual_feats.is_floating_point():
            raise ValueError(f"visual_feats must be floating point, got {visual_feats.dtype}")
        b, n_visual = visual_feats.shape[:2]
        visual_feats = visual_feats.to(self.device)
        if visual_mask is not None:
            visual_mask = torch.as_tensor(visual_mask, device=self.device)
            if tuple(visual_mask.shape) != (b, n_visual):
                raise ValueError(f"visual_mask must be [{b}, {n_visual}], got {tuple(visual_mask.shape)}")
        if input_ids is not None:
            input_ids = torch.as_tensor(input_ids, device=self.device)
            if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int16):
                raise ValueError("input_ids must be an integer tensor [batch, seq], got "
                                 f"{input_ids.dtype} {tuple(input_ids.shape)}")
            if input_ids.shape[0] != b:
                raise ValueError(f"batch sizes differ: visual_feats has {b}, input_ids has {input_ids.shape[0]}")
            if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
                raise ValueError(f"input_ids must be in [0, {self.config.vocab_size}), got "
                                 f"[{int(input_ids.min())}, {int(input_ids.max())}]")
            input_ids = input_ids.long()
            if attention_mask is not None:
                attention_mask = torch.as_tensor(attention_mask, device=self.device)
                if attention_mask.shape != input_ids.shape:
                    raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                                     f"{tuple(input_ids.shape)}")
        elif attention_mask is not None:
            raise ValueError("attention_mask given without input_ids")
        return visual_feats, input_ids, attention_mask, visual_mask

    # --- forward / encode / generate -----------------------------------------------------------

    def encode(self, visual_feats, input_ids=None, attention_mask=None, visual_mask=None, **kw):
        """Run the encoder only -> ``(encoder_outputs, attention_mask)`` (for probes and ``generate``)."""
        self._sync_hooks()
        inputs = self.build_encoder_inputs(visual_feats, input_ids, attention_mask, visual_mask)
        enc = self.lm.get_encoder()(inputs_embeds=inputs.embeds, attention_mask=inputs.mask, return_dict=True, **kw)
        return enc, inputs.mask

    def forward(self, visual_feats, input_ids=None, attention_mask=None, labels=None, visual_mask=None,
                decoder_input_ids=None, **kw):
        """Teacher-forced pass; returns the HF ``Seq2SeqLMOutput`` (``.loss`` when ``labels`` given).

        Args:
            visual_feats: ``[batch, n_visual, feat_dim]`` float features.
            input_ids, attention_mask: the tokenised prompt ``[batch, seq]`` (``encode_prompts``).
            labels: ``[batch, tgt]`` target ids, -100 on padding (``encode_targets``); the decoder
                input is the labels shifted right, as HF does.
            visual_mask: ``[batch, n_visual]``, 0 for padded visual slots (e.g. fewer regions).
            decoder_input_ids: explicit decoder input instead of (or with) labels.
            **kw: passed to the HF model (``output_hidden_states=True``, ``decoder_attention_mask``, ...).
        """
        if labels is None and decoder_input_ids is None and "decoder_inputs_embeds" not in kw:
            raise ValueError("forward needs labels or decoder_input_ids (use encode() for the encoder alone, "
                             "generate() to decode)")
        if labels is not None:
            labels = torch.as_tensor(labels, device=self.device)
            if labels.dim() != 2 or labels.shape[0] != visual_feats.shape[0]:
                raise ValueError(f"labels must be [batch={visual_feats.shape[0]}, tgt_len], got {tuple(labels.shape)}")
        self._sync_hooks()
        inputs = self.build_encoder_inputs(visual_feats, input_ids, attention_mask, visual_mask)
        return self.lm(inputs_embeds=inputs.embeds, attention_mask=inputs.mask, labels=labels,
                       decoder_input_ids=decoder_input_ids, **kw)

    @torch.no_grad()
    def generate(self, visual_feats, input_ids=None, attention_mask=None, visual_mask=None, num_beams: int = 1,
                 max_new_tokens: int | None = None, **kw) -> torch.Tensor:
        """Decode answers -> token ids ``[batch, len]`` (greedy, or beam search with ``num_beams``).

        The encoder is run here (with every hook and input modifier) and its output handed to
        ``lm.generate(encoder_outputs=...)``: the robust way to generate from ``inputs_embeds``
        with an encoder-decoder model in transformers 5. ``kw`` goes to ``lm.generate``. The
        model's train/eval mode is left as it is (call ``.eval()`` for deterministic decoding).
        """
        if not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be a positive int, got {num_beams!r}")
        max_new_tokens = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        enc, mask = self.encode(visual_feats, input_ids, attention_mask, visual_mask)
        return self.lm.generate(encoder_outputs=enc, attention_mask=mask, num_beams=num_beams,
                                max_new_tokens=max_new_tokens, **kw)

    def generate_text(self, visual_feats, input_ids=None, attention_mask=None, visual_mask=None,
                      num_beams: int = 1, max_new_tokens: int | None = None, **kw) -> list[str]:
        """Like :meth:`generate`, decoded with ``self.tokenizer`` (special tokens dropped, stripped).

        ``input_ids`` may also be a list of prompt strings, tokenised with :meth:`encode_prompts`.
        """
        if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], str):
            input_ids, attention_mask = self.encode_prompts(input_ids)
        ids = self.generate(visual_feats, input_ids, attention_mask, visual_mask, num_beams=num_beams,
                            max_new_tokens=max_new_tokens, **kw)
        return self.decode(ids)

    # --- insertion points ---------------------------------------------------------------------

    def insertion_points(self, kind: str | None = None, stack: str | None = None) -> "OrderedDict[str, InsertionPoint]":
        """Every named insertion point in forward order, optionally filtered by ``kind`` / ``stack``.

        ``kind``: ``"sublayer"`` or ``"projection"``; ``stack``: ``"encoder"`` or ``"decoder"``.
        """
        if kind not in (None, "sublayer", "projection"):
            raise ValueError(f"kind must be None, 'sublayer' or 'projection', got {kind!r}")
        if stack not in (None, "encoder", "decoder"):
            raise ValueError(f"stack must be None, 'encoder' or 'decoder', got {stack!r}")
        return OrderedDict(
            (n, p) for n, p in self._points.items()
            if (kind is None or p.kind == kind) and (stack is None or p.stack == stack)
        )

    def get_point(self, name: str) -> InsertionPoint:
        """The :class:`InsertionPoint` called ``name``; a ValueError suggests close valid names."""
        if name not in self._points:
            raise unknown_point_error(name, self._points)
        return self._points[name]

    def get_point_module(self, name: str) -> nn.Module:
        """The module at a point: the projection ``nn.Linear`` (or its peft wrapper), or the module
        whose output is H (the attention module for attention sub-layers)."""
        return self.get_submodule(self.get_point(name).module_path)

    # --- modifications --------------------------------------------------------------------------

    def add_sublayer_modification(self, point_name: str, module: nn.Module, name: str | None = None) -> str:
        """Register ``module`` (``forward(x, h) -> h'``) at a sub-layer point; returns its module path.

        ``x`` is the residual stream entering the sub-layer (T5: before its LayerNorm; BART: the
        sub-layer's input), ``h`` its output before dropout and residual. Several modifications at
        one point compose in the order they were added. The module becomes a submodule at
        ``<point.mods_path>.<name>`` (``name`` defaults to its index at the point).
        """
        return self._add_modification(point_name, module, name, "sublayer")

    def add_projection_modification(self, point_name: str, module: nn.Module, name: str | None = None) -> str:
        """Register ``module`` (``forward(x, y) -> y'``) on a projection point (q k v o wi wo).

        ``x`` is the projection's input, ``y`` its output; e.g. VL-PET's decoder value adapter is
        ``y + up(gelu(down(x)))`` at ``decoder.{i}.cross_attn.v``, IA3 is ``y * l``.
        """
        return self._add_modification(point_name, module, name, "projection")

    def _add_modification(self, point_name, module, name, kind) -> str:
        point = self.get_point(point_name)
        if point.kind != kind:
            other = "add_projection_modification" if point.kind == "projection" else "add_sublayer_modification"
            raise ValueError(f"{point_name!r} is a {point.kind} point; use {other}")
        if not isinstance(module, nn.Module):
            raise TypeError(f"a modification must be an nn.Module, got {type(module).__name__}")
        site = self._site(point, create=True)
        name = str(len(site)) if name is None else str(name)
        if "." in name or not name:
            raise ValueError(f"modification name must be non-empty and contain no '.', got {name!r}")
        if name in site:
            raise ValueError(f"a modification named {name!r} already exists at {point_name!r}")
        site[name] = module.to(self.device)
        return f"{point.mods_path}.{name}"

    def _site(self, point: InsertionPoint, create: bool = False) -> ModificationSite | None:
        layer = self.get_submodule(point.layer_path)
        mods = getattr(layer, "peft_mods", None)
        if mods is not None and point.key in mods:
            return mods[point.key]
        if not create:
            return None
        if mods is None:
            layer.peft_mods = nn.ModuleDict()  # registered, so it is part of the state_dict
        site = ModificationSite(point)
        layer.peft_mods[point.key] = site
        self._hook_site(site, point)
        return site

    def _hook_site(self, site: ModificationSite, point: InsertionPoint) -> None:
        x_mod = self.get_submodule(point.x_path)
        h_mod = self.get_submodule(point.module_path)
        site._handles = [
            x_mod.register_forward_pre_hook(_CaptureX(site), with_kwargs=True),
            h_mod.register_forward_hook(_ModifyH(site), with_kwargs=True),
        ]
        site._hooked = (x_mod, h_mod)

    def _sync_hooks(self) -> None:
        """Move hooks whose module was replaced since they were installed.

        peft's ``inject_adapter_in_model`` replaces e.g. BART's ``fc2`` by a wrapper; a hook left on
        the wrapped base layer would see the output without the LoRA update. Checking identity is a
        few attribute lookups per site, so every forward / encode / generate does it.
        """
        for point, site in self._iter_sites():
            x_mod = self.get_submodule(point.x_path)
            h_mod = self.get_submodule(point.module_path)
            if site._hooked and (site._hooked[0] is not x_mod or site._hooked[1] is not h_mod):
                for handle in site._handles:
                    handle.remove()
                self._hook_site(site, point)

    def _iter_sites(self):
        for point in self._points.values():
            site = self._site(point)
            if site is not None:
                yield point, site

    def modifications(self) -> "OrderedDict[str, list[tuple[str, nn.Module]]]":
        """Point name -> ``[(name, module), ...]`` of every registered modification, in order."""
        return OrderedDict((p.name, list(site.items())) for p, site in self._iter_sites() if len(site))

    def remove_modifications(self, point_name: str | None = None, kind: str | None = None) -> list[nn.Module]:
        """Remove the modifications (and their hooks) at one point, of one kind, or all; return them."""
        if point_name is not None:
            self.get_point(point_name)  # validates the name
        removed = []
        for point, site in list(self._iter_sites()):
            if (point_name is not None and point.name != point_name) or (kind is not None and point.kind != kind):
                continue
            for handle in site._handles:
                handle.remove()
            site._handles, site._hooked = [], ()
            removed.extend(site.values())
            layer = self.get_submodule(point.layer_path)
            del layer.peft_mods[point.key]
            if len(layer.peft_mods) == 0:
                del layer.peft_mods
        return removed

    def remove_sublayer_modifications(self, point_name: str | None = None) -> list[nn.Module]:
        """Remove sub-layer modifications (all, or those at ``point_name``); return the modules."""
        return self.remove_modifications(point_name, kind="sublayer")

    def remove_projection_modifications(self, point_name: str | None = None) -> list[nn.Module]:
        """Remove projection modifications (all, or those at ``point_name``); return the modules."""
        return self.remove_modifications(point_name, kind="projection")

    def add_input_modifier(self, module: nn.Module) -> int:
        """Append ``module`` (``forward(inputs: EncoderInputs) -> EncoderInputs``) to the input path.

        Prompt tuning: ``return inputs.insert(inputs.n_visual, self.prompt)``. Modifiers run in
        order, after the visual/text concatenation, in forward, encode and generate alike. Returns
        the index in ``model.input_modifiers``.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"an input modifier must be an nn.Module, got {type(module).__name__}")
        self.input_modifiers.append(module.to(self.device))
        return len(self.input_modifiers) - 1

    def remove_input_modifiers(self) -> list[nn.Module]:
        """Remove every input modifier; return them."""
        removed = list(self.input_modifiers)
        self.input_modifiers = nn.ModuleList()
        return removed

    # --- saving ---------------------------------------------------------------------------------

    def backbone_state_dict(self) -> dict:
        """The state dict of the backbone alone: LM + projector + visual encoder.

        Modifications and input modifiers are left out (methods save their own weights). A model
        whose LM was rewritten by peft (``base_layer`` / ``lora_`` keys) must be merged first.
        """
        sd = OrderedDict()
        for k, v in self.state_dict().items():
            if ".peft_mods." in k or k.startswith(("input_modifiers.", "peft_shared.")):
                continue
            if ".base_layer." in k or "lora_" in k:
                raise ValueError(
                    f"the LM contains injected peft layers ({k}); merge and unload them before saving the "
                    "backbone (a method saves its own weights)"
                )
            sd[k] = v
        return sd

    def save_pretrained(self, path, overwrite: bool = True) -> Path:
        """Save config, weights and tokenizer to directory ``path``, atomically.

        Layout: ``workbench_config.json`` (the :class:`VLConfig`, the LM config, the format
        version), ``model.safetensors`` (LM + projector + visual encoder; tied tensors stored once),
        ``generation_config.json`` and the tokenizer files. Load it back with
        ``workbench.models.load_backbone(path)``. An existing directory is replaced only if it is
        empty or holds a workbench checkpoint.
        """
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists():
            if not path.is_dir():
                raise FileExistsError(f"{path} exists and is not a directory")
            if any(path.iterdir()) and not (path / CONFIG_NAME).exists():
                raise FileExistsError(f"{path} is a non-empty directory that is not a workbench checkpoint; "
                                      "refusing to overwrite it")
            if not overwrite:
                raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            tensors, aliases = _dedup_tensors(self.backbone_state_dict())
            meta = {"format": "pt", "aliases": json.dumps(aliases)}
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=meta)
            cfg = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "config": asdict(self.config),
                "lm_config": self.lm.config.to_dict(),
            }
            (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
            self.lm.generation_config.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
            # Swap: the old directory is moved aside first, so `path` always holds a whole checkpoint.
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
                os.rmdir(old)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def from_pretrained(cls, path, feat_dim: int | None = None, device=None) -> "VLModel":
        """Load a directory written by :meth:`save_pretrained` (see ``load_backbone``)."""
        path = Path(path)
        cfg_file = path / CONFIG_NAME
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} not found: {path} is not a workbench checkpoint "
                                    "(save one with VLModel.save_pretrained)")
        try:
            raw = json.loads(cfg_file.read_text())
            config = VLConfig.from_dict(raw["config"])
            lm_config_dict = raw["lm_config"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{cfg_file} is not a valid workbench config: {e}") from e
        if raw.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{cfg_file} has format version {raw['format_version']}; this workbench "
                                  f"reads up to {FORMAT_VERSION}")
        if feat_dim is not None and feat_dim != config.feat_dim:
            raise ValueError(f"feat_dim={feat_dim} disagrees with the checkpoint at {path}, whose projector "
                             f"expects feat_dim={config.feat_dim}")
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found: a workbench checkpoint needs {WEIGHTS_NAME} beside "
                                    f"{CONFIG_NAME}")
        fam = get_family(config.family)
        lm_config = fam.config_class().from_dict(lm_config_dict)
        lm = fam.lm_class()(lm_config)
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            from transformers import GenerationConfig

            lm.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
        tokenizer = _load_tokenizer(path)
        visual_encoder = None
        if config.visual_encoder is not None:
            from .visual import VisualEncoder

            visual_encoder = VisualEncoder.from_config_dict(config.visual_encoder)
        model = cls(lm, tokenizer, config.feat_dim, visual_encoder=visual_encoder, seed=None, name=config.name)
        model.config.max_new_tokens = config.max_new_tokens
        model.load_weights(weights)
        model.eval()
        if device is not None:
            model.to(device)
        return model

    def load_weights(self, file) -> None:
        """Load ``model.safetensors`` written by :meth:`save_pretrained`; errors name the file."""
        from safetensors import safe_open

        file = Path(file)
        try:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for a bad header / short file
            raise CheckpointError(f"cannot read {file}: the file is corrupted or truncated ({e}); "
                                  "re-save or re-create the checkpoint") from e
        try:
            aliases = json.loads(meta.get("aliases", "{}"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{file} has unreadable metadata: {e}") from e
        for alias, source in aliases.items():
            if source in tensors:
                tensors[alias] = tensors[source]
        expected = self.backbone_state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{file} does not match the model built from its config: missing "
                                  f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                                  f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        for k, v in tensors.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise CheckpointError(f"{file}: tensor {k} has shape {tuple(v.shape)}, the model expects "
                                      f"{tuple(expected[k].shape)}")
        self.load_state_dict(tensors, strict=False)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (each shared tensor counted once)."""
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            n += p.numel()
        return n


def _dedup_tensors(sd: dict) -> tuple[dict, dict]:
    """Keep one copy of tensors that share storage (tied embeddings); return (tensors, aliases)."""
    tensors, aliases, seen = {}, {}, {}
    for k, v in sd.items():
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if v.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        tensors[k] = v.detach().contiguous().cpu()
    return tensors, aliases


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise FileNotFoundError(
            f"could not load a tokenizer from {path} ({type(e).__name__}: {e}); put the tokenizer files there "
            "(tokenizer.json + tokenizer_config.json, or spiece.model for T5 / vocab.json + merges.txt for BART)"
        ) from e


def _as_text_list(texts, what: str) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{what} must be a non-empty list of strings")
    return texts
