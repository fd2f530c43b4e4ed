"""The per-forward context a :class:`~workbench.models.VLModel` fills and everyone else reads.

One object per model (``model.context``), reset at the start of every forward, ``encode`` and
``generate`` and filled by the model itself: the masks of both stacks, the visual mask, the
labels, where the visual and the text tokens sit in the encoder sequence, and the last hidden
state of each stack. Methods (MixPHM's regularisers, VL-PET's small gate, PETAL's bottleneck
loss) and activation capture read it through the public attributes and :meth:`token_mask`;
nothing else records masks or labels with hooks of its own.

The state stays readable after the forward returns (a method's auxiliary loss is computed after
it) and is replaced by the next forward. A deep copy of the model gets a fresh, empty context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LAYOUTS = ("visual_first", "text_first")
"""Where the visual tokens go in the encoder input: ``[visual; text]`` (vlt5-tiny) or ``[text; visual]``
(the official VL-T5 / VL-Adapter / VL-PET / MixPHM code, with positions on the text tokens only)."""


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


@dataclass
class EncoderInputs:
    """What the encoder is about to receive: embeddings, mask, and where the visual tokens are.

    Input modifiers (prompt tuning, PETAL's instruction mixture, ...) take and return one of these.
    ``embeds[:, visual_start:visual_start + n_visual]`` are the projected visual tokens, the rest is
    the embedded prompt (and whatever modifiers inserted). With the ``visual_first`` layout
    ``visual_start`` is 0; with ``text_first`` the visual tokens close the sequence.
    ``input_ids`` and ``visual_feats`` are there to read, e.g. to pool the instruction; changing
    them has no effect.
    """

    embeds: torch.Tensor  # [batch, seq, d_model]
    mask: torch.Tensor  # [batch, seq], 1 = attend
    n_visual: int
    input_ids: torch.Tensor | None = None
    visual_feats: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)
    visual_start: int = 0
    layout: str = "visual_first"

    @property
    def visual_slice(self) -> slice:
        """The positions of the visual tokens."""
        return slice(self.visual_start, self.visual_start + self.n_visual)

    @property
    def text_slice(self) -> slice:
        """The positions of the text (prompt) tokens: everything that is not visual.

        The text block is contiguous in both layouts: after the visual tokens (``visual_first``) or
        before them (``text_first``).
        """
        if self.visual_start == 0:
            return slice(self.n_visual, self.embeds.shape[1])
        return slice(0, self.visual_start)

    @property
    def text_start(self) -> int:
        """Where the text block starts (where prompt tuning inserts its soft prompt)."""
        return self.text_slice.start

    def replace(self, embeds: torch.Tensor | None = None, mask: torch.Tensor | None = None, **extras) -> "EncoderInputs":
        """A copy with new embeddings / mask of the same length (e.g. text tokens edited in place)."""
        embeds = self.embeds if embeds is None else embeds
        mask = self.mask if mask is None else mask
        if embeds.shape[:2] != self.embeds.shape[:2] or mask.shape != self.mask.shape:
            raise ValueError("replace keeps the sequence: use insert() to add positions")
        return EncoderInputs(embeds, mask, self.n_visual, self.input_ids, self.visual_feats,
                             {**self.extras, **extras}, self.visual_start, self.layout)

    def insert(self, position: int, vectors: torch.Tensor, mask: torch.Tensor | None = None) -> "EncoderInputs":
        """Return a copy with ``vectors`` (``[L, d]`` or ``[batch, L, d]``) inserted at ``position``.

        Prompt tuning is ``inputs.insert(inputs.text_start, prompt)``: just before the text. Vectors
        inserted strictly inside the visual block (or at its start in the ``visual_first`` layout)
        count as visual tokens. The inserted positions are attended (mask 1) unless ``mask`` says
        otherwise.
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
        n = vectors.shape[1]
        vectors = vectors.to(self.embeds.dtype)
        embeds = torch.cat([self.embeds[:, :position], vectors, self.embeds[:, position:]], dim=1)
        new_mask = torch.cat([self.mask[:, :position], mask.to(self.mask.dtype), self.mask[:, position:]], dim=1)
        n_visual, visual_start = self.n_visual, self.visual_start
        inside = visual_start < position < visual_start + n_visual or (position == visual_start == 0 < n_visual)
        if inside:
            n_visual += n
        elif 0 < visual_start and position <= visual_start:  # before the visual block of text_first
            visual_start += n
        return EncoderInputs(embeds, new_mask, n_visual, self.input_ids, self.visual_feats, dict(self.extras),
                             visual_start, self.layout)


def _last_hidden(output):
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def _kwarg_or_arg(args, kwargs, key: str, index: int):
    if key in kwargs:
        return kwargs[key]
    return args[index] if len(args) > index else None


class ForwardContext:
    """The state of the current forward of one model (see the module docstring).

    Attributes (``None`` until the model sets them):
        layout: ``"visual_first"`` or ``"text_first"`` (fixed for the model).
        inputs: the :class:`EncoderInputs` the encoder received (after input modifiers).
        visual_mask: ``[batch, n_visual]``, 1 for real visual slots (all ones when not given).
        encoder_mask: ``[batch, seq]``, the encoder attention mask (visual + text, after modifiers).
        labels: the teacher-forcing targets of the current ``forward`` (``None`` in ``encode`` /
            ``generate``).
        decoder_mask: the 2-D attention mask the decoder stack received (``None``: causal only).
        cross_mask: the encoder mask as the decoder received it (repeated per beam in beam search).
        encoder_output, decoder_output: the last hidden state of each stack.
    """

    def __init__(self, layout: str = "visual_first"):
        self.layout = check_layout(layout)
        self.reset()

    def reset(self) -> None:
        """Forget the previous forward."""
        self.inputs: EncoderInputs | None = None
        self.visual_mask = None
        self.encoder_mask = None
        self.labels = None
        self.decoder_mask = None
        self.cross_mask = None
        self.encoder_output = None
        self.decoder_output = None

    def begin(self, inputs: EncoderInputs, visual_mask: torch.Tensor, labels=None) -> None:
        """Start a forward (called by the model once its encoder input is built)."""
        self.reset()
        self.inputs = inputs
        self.visual_mask = visual_mask
        self.encoder_mask = inputs.mask
        self.labels = labels

    @property
    def n_visual(self) -> int | None:
        return None if self.inputs is None else self.inputs.n_visual

    @property
    def visual_positions(self) -> slice | None:
        """The encoder positions of the visual tokens (``None`` before any forward)."""
        return None if self.inputs is None else self.inputs.visual_slice

    @property
    def text_positions(self) -> slice | None:
        """The encoder positions of the text tokens (``None`` before any forward)."""
        return None if self.inputs is None else self.inputs.text_slice

    def token_mask(self, stack: str, batch: int, length: int) -> torch.Tensor | None:
        """The valid-token mask ``[batch, length]`` of a tensor on ``stack``'s token axis, or ``None``.

        ``stack``: ``"visual"`` (the projector's tokens), ``"encoder"`` (encoder tokens, also the
        keys/values of cross-attention) or ``"decoder"``. The decoder uses its attention mask when
        one was passed, else ``labels != -100`` (position t of the teacher-forced decoder predicts
        ``labels[t]``). Under cached decoding the current tokens are the last ``length`` columns.
        ``None`` means no mask of that shape is known (every position counts).
        """
        if stack == "visual":
            candidates = [self.visual_mask]
        elif stack == "encoder":
            candidates = [self.encoder_mask, self.cross_mask]
        elif stack == "decoder":
            candidates = [self.decoder_mask]
            if self.decoder_mask is None and self.labels is not None:
                candidates.append(self.labels != -100)
        else:
            raise ValueError(f"stack must be 'visual', 'encoder' or 'decoder', got {stack!r}")
        for m in candidates:
            if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[0] != batch:
                continue
            if m.shape[1] == length:
                return m
            if m.shape[1] > length:  # cached decoding: the current tokens are the last ones
                return m[:, -length:]
        return None

    def has_mask(self, stack: str) -> bool:
        """Whether the current forward recorded any mask for ``stack`` (``"visual"``, ``"encoder"``,
        ``"decoder"``), whatever its shape."""
        masks = {"visual": (self.visual_mask,), "encoder": (self.encoder_mask, self.cross_mask),
                 "decoder": (self.decoder_mask, self.labels)}[stack]
        return any(isinstance(m, torch.Tensor) for m in masks)

    def __deepcopy__(self, memo) -> "ForwardContext":
        # The per-forward tensors belong to one forward (and may carry autograd history, which
        # cannot be deep-copied): a copied model starts with an empty context.
        new = ForwardContext(self.layout)
        memo[id(self)] = new
        return new

    def __repr__(self) -> str:
        state = "empty" if self.inputs is None else f"batch={self.inputs.embeds.shape[0]}, n_visual={self.n_visual}"
        return f"ForwardContext(layout={self.layout!r}, {state})"


class DecoderContextHook:
    """Forward pre-hook on the decoder stack: its attention mask and the encoder mask it attends with."""

    def __init__(self, context: ForwardContext):
        self.context = context

    def __call__(self, module, args, kwargs):
        ctx = self.context
        mask = _kwarg_or_arg(args, kwargs, "attention_mask", 1)
        ctx.decoder_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        cross = kwargs.get("encoder_attention_mask")
        ctx.cross_mask = cross if isinstance(cross, torch.Tensor) and cross.dim() == 2 else None
        return None


class StackOutputHook:
    """Forward hook on a stack: keep its last hidden state in the context."""

    def __init__(self, context: ForwardContext, stack: str):
        self.context = context
        self.attr = f"{stack}_output"

    def __call__(self, module, args, output):
        setattr(self.context, self.attr, _last_hidden(output))
        return None
