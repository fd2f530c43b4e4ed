"""The vision-language backbone: visual features -> projector -> HF encoder-decoder LM.

This is the VL-Adapter / VL-T5 design. Visual features ``[batch, n_visual, feat_dim]`` go through a
trainable projector (Linear + LayerNorm) into the LM's width and are joined with the embedded text
prompt; the concatenation is fed to the encoder through ``inputs_embeds``; the decoder generates
the answer or caption::

    visual_feats --projector--> [v_1 .. v_n] ++ embed(prompt) --> encoder --> decoder --> text

The order is the backbone's ``layout``: ``"visual_first"`` ([visual; text], positions over every
token; vlt5-tiny was pre-trained so) or ``"text_first"`` ([text; visual] with the positional
information -- T5's relative bias, BART's learned positions -- on the text tokens only, as the
official VL-T5 / VL-Adapter / VL-PET / MixPHM code feeds T5).

The model owns its hook points and the per-forward context (:mod:`workbench.models.context`):
``model.context`` holds the masks, labels and stack outputs of the current forward for methods and
activation capture (:mod:`workbench.models.capture`) to read. The modification sites are in
:mod:`workbench.models.sites`, checkpoint I/O in :mod:`workbench.models.checkpoint`.

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

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from .checkpoint import CheckpointMixin
from .context import EncoderInputs, ForwardContext, check_layout
from .families import Family, family_of, insertion_points, install_context_hooks
from .sites import SitesMixin


# torch.compile's "am I tracing" test (torch.compiler.is_compiling from torch 2.3; torch._dynamo's before).
_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling


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
        layout: ``"visual_first"`` or ``"text_first"`` (see the module docstring). A checkpoint
            written before layouts existed was trained ``visual_first``, hence the default.
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
    layout: str = "visual_first"

    @classmethod
    def from_dict(cls, d: dict) -> "VLConfig":
        """Build from a dict, ignoring keys this version does not know (forward compatibility)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})



class VLModel(SitesMixin, CheckpointMixin, nn.Module):
    """Visual features + text prompt -> HF seq2seq LM (T5 or BART).

    Args:
        lm: a ``T5ForConditionalGeneration`` or ``BartForConditionalGeneration``.
        tokenizer: its tokenizer (``encode_prompts``, ``encode_targets``, ``generate_text`` use it).
        feat_dim: the last dimension of the visual features.
        visual_encoder: optional embedded :class:`~workbench.models.visual.VisualEncoder` that turns
            images into features (``encode_images``); saved with the model.
        seed: seeds the projector's initialisation without touching the global RNG state.
        name: a free label stored in the config.
        layout: ``"visual_first"`` (default) or ``"text_first"``.

    Attributes:
        lm, projector, visual_encoder, tokenizer, family (``"t5"``/``"bart"``), config
        (:class:`VLConfig`), input_modifiers (``nn.ModuleList``), context
        (:class:`~workbench.models.context.ForwardContext`), projector_fresh (``True`` until the
        projector's weights come from a checkpoint: a method that keeps it frozen trains it then).
    """

    config_class = VLConfig

    def __init__(self, lm: nn.Module, tokenizer, feat_dim: int, visual_encoder: nn.Module | None = None,
                 seed: int | None = 0, name: str | None = None, layout: str = "visual_first"):
        super().__init__()
        check_layout(layout)
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
            layout=layout,
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
        # A new projector is random until trained; from_pretrained clears this once weights load.
        self.projector_fresh = True
        self.input_modifiers = nn.ModuleList()
        self._points = insertion_points(lm, fam, prefix="lm")
        # The model's own hook points: the context is filled here and read by methods and capture.
        self.context = ForwardContext(layout)
        install_context_hooks(lm, fam, self.context)

    @property
    def layout(self) -> str:
        """``"visual_first"`` or ``"text_first"``: where the visual tokens sit in the encoder input."""
        return self.config.layout

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
        """Project the features, embed the prompt, join them in the model's layout, run the input modifiers.

        This is the one place where the encoder's input is made (``forward``, ``encode`` and
        ``generate`` all call it), so an input modifier acts identically in training and decoding.
        It does not touch ``model.context`` (``forward`` / ``encode`` start the context with it).
        """
        inputs, _ = self._build(visual_feats, input_ids, attention_mask, visual_mask)
        return inputs

    def _build(self, visual_feats, input_ids, attention_mask, visual_mask, context: ForwardContext | None = None):
        visual_feats, input_ids, attention_mask, visual_mask = self._check_inputs(
            visual_feats, input_ids, attention_mask, visual_mask
        )
        b, n_visual = visual_feats.shape[:2]
        if visual_mask is None:
            visual_mask = torch.ones(b, n_visual, dtype=torch.long, device=visual_feats.device)
        if context is not None:  # readers of the projector's output pool with the visual mask
            context.visual_mask = visual_mask
        vis = self.projector(visual_feats.to(self.projector[0].weight.dtype))
        visual_start = 0
        if input_ids is None:
            embeds, mask = vis, visual_mask.long()
        else:
            text = self._family.embed_text(self.lm, input_ids).to(vis.dtype)
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            if self.layout == "text_first":
                embeds = torch.cat([text, vis], dim=1)
                mask = torch.cat([attention_mask.long(), visual_mask.long()], dim=1)
                visual_start = text.shape[1]
            else:
                embeds = torch.cat([vis, text], dim=1)
                mask = torch.cat([visual_mask.long(), attention_mask.long()], dim=1)
        inputs = EncoderInputs(embeds=embeds, mask=mask, n_visual=n_visual, input_ids=input_ids,
                               visual_feats=visual_feats, visual_start=visual_start, layout=self.layout)
        for modifier in self.input_modifiers:
            inputs = modifier(inputs)
            if not isinstance(inputs, EncoderInputs):
                raise TypeError(f"input modifier {type(modifier).__name__} must return an EncoderInputs")
        return inputs, visual_mask

    def _begin(self, visual_feats, input_ids, attention_mask, visual_mask, labels=None) -> EncoderInputs:
        """Build the encoder input and start the forward context with it."""
        self.refresh_hooks()
        self.context.reset()
        inputs, visual_mask = self._build(visual_feats, input_ids, attention_mask, visual_mask, self.context)
        self.context.begin(inputs, visual_mask, labels)
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
            # The range check reads the ids' values (a device sync, and a graph break under
            # torch.compile); while compiling it is left to the embedding, which fails on a bad id too.
            if (input_ids.numel() and not _compiling()
                    and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size)):
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
        inputs = self._begin(visual_feats, input_ids, attention_mask, visual_mask)
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
        inputs = self._begin(visual_feats, input_ids, attention_mask, visual_mask, labels)
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

def _as_text_list(texts, what: str) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{what} must be a non-empty list of strings")
    return texts
