"""Tiny random backbones for tests and examples; nothing downloaded.

Like ``transformers``' testing utilities: a byte-level BPE tokenizer is trained on a handful of
sentences (:func:`tiny_tokenizer`), a randomly initialised T5 / BART LM is built from a tiny config
(:func:`tiny_lm`), and :func:`tiny_vlmodel` wraps one in a :class:`~workbench.models.VLModel`
(optionally with a small embedded :class:`~workbench.models.VisualEncoder`). Everything is
deterministic: the same arguments give the same vocabulary and the same weights, and building a
model leaves the global RNG state untouched.

::

    from workbench.models.testing import tiny_vlmodel
    model = tiny_vlmodel("t5", feat_dim=16).eval()          # d_model 32, 2 + 2 layers, 4 heads
    ids, mask = model.encode_prompts(["vqa: what colour is the circle?"])
    out = model(torch.randn(1, 5, 16), ids, mask, labels=model.encode_targets(["red"]))

The vocabulary (hence the embedding size and the tokenisation) depends on the corpus: pass your own
``corpus`` when a test relies on particular merges; otherwise :data:`CORPUS` is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

__all__ = ["BART_EXTRA", "CORPUS", "TINY_VISUAL_ENCODER", "tiny_lm", "tiny_tokenizer", "tiny_vlmodel"]

CORPUS: tuple[str, ...] = (
    "a large red circle at the top left",
    "a small blue square at the bottom right",
    "a green triangle left of a yellow diamond",
    "vqa: what colour is the circle?",
    "vqa: how many squares are there?",
    "caption:",
    "red", "blue", "green", "yes", "no", "two", "three",
)
"""The default tokenizer corpus: a few prompts, captions and answers of the synthetic shape tasks."""

BART_EXTRA: dict = {"scale_embedding": True, "max_positions": 64}
"""Config options :func:`tiny_lm` adds for BART unless overridden: embedding scaling on (so the
scale is exercised) and a short position table."""

TINY_VISUAL_ENCODER: dict = {"grid": 2, "channels": (8, 8, 8), "pos_dim": 8, "groups": 4}
"""The :class:`~workbench.models.VisualEncoder` options used by ``tiny_vlmodel(visual_encoder=True)``."""


def tiny_tokenizer(family: str, corpus: Iterable[str] | None = None, vocab_size: int = 300, repeat: int = 4):
    """A byte-level BPE tokenizer of ``family`` trained on ``corpus`` (default :data:`CORPUS`).

    The corpus is repeated ``repeat`` times so that its merges pass the frequency threshold.
    ``vocab_size`` counts the 256 byte symbols and the special tokens.
    """
    from . import train_tokenizer

    corpus = list(CORPUS if corpus is None else corpus)
    return train_tokenizer(corpus * repeat, vocab_size=vocab_size, family=family)


def tiny_lm(family: str, tokenizer=None, *, d_model: int = 32, layers: int = 2, heads: int = 4, d_ff: int = 64,
            seed: int | None = 0, corpus: Iterable[str] | None = None, vocab_size: int = 300, **extra):
    """A tiny randomly initialised LM of ``family`` and its tokenizer: ``(lm, tokenizer)``.

    Args:
        family: ``"t5"`` or ``"bart"``.
        tokenizer: reuse this tokenizer; by default one is trained with
            ``tiny_tokenizer(family, corpus, vocab_size)``.
        d_model, heads, d_ff: the LM width, attention heads and feed-forward width.
        layers: the number of encoder layers and of decoder layers (each).
        seed: the weights' seed (``torch.manual_seed`` inside a forked RNG, so the global state is
            left as it was); ``None`` draws from the current global RNG instead.
        extra: further config options for :func:`~workbench.models.build_lm_config` (e.g.
            ``dropout``); for BART, :data:`BART_EXTRA` is added unless overridden.

    The LM is returned as constructed (training mode).
    """
    from . import build_lm_config, get_family

    if tokenizer is None:
        tokenizer = tiny_tokenizer(family, corpus, vocab_size)
    fam = get_family(family)
    if fam.name == "bart":
        extra = {**BART_EXTRA, **extra}
    cfg = build_lm_config(family, tokenizer, d_model=d_model, n_enc_layers=layers, n_dec_layers=layers,
                          n_heads=heads, d_ff=d_ff, **extra)
    if seed is None:
        return fam.lm_class()(cfg), tokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fam.lm_class()(cfg), tokenizer


def tiny_vlmodel(family: str, feat_dim: int = 16, visual_encoder: bool | dict | None = None, seed: int | None = 0,
                 name: str | None = None, layout: str = "visual_first", **lm_options):
    """A :class:`~workbench.models.VLModel` around :func:`tiny_lm` (as constructed; call ``.eval()``).

    Args:
        family: ``"t5"`` or ``"bart"``.
        feat_dim: the dimension of the visual features the projector takes.
        visual_encoder: ``None`` for a features-only model; a dict of
            :class:`~workbench.models.VisualEncoder` options (its ``feat_dim`` is ``feat_dim``) or
            ``True`` for :data:`TINY_VISUAL_ENCODER`, to embed an image encoder.
        seed: seeds the weights (one forked RNG stream: the LM's first, then the visual encoder's)
            and the projector (``VLModel(seed=...)``); ``None``: unseeded, from the global RNG.
        name: the model's free label (``VLConfig.name``).
        layout: ``"visual_first"`` or ``"text_first"`` (``VLModel(layout=...)``).
        lm_options: passed to :func:`tiny_lm` (``d_model``, ``layers``, ``heads``, ``d_ff``,
            ``tokenizer``, ``corpus``, ``vocab_size``, config extras).
    """
    from . import VisualEncoder, VLModel

    if visual_encoder is True:
        visual_encoder = TINY_VISUAL_ENCODER
    with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        lm, tok = tiny_lm(family, seed=None, **lm_options)
        enc = None
        if visual_encoder is not None and visual_encoder is not False:
            enc = VisualEncoder(feat_dim=feat_dim, **visual_encoder)
    return VLModel(lm, tok, feat_dim, visual_encoder=enc, seed=seed, name=name, layout=layout)


class RandomAdapter(torch.nn.Module):
    """A serial bottleneck adapter with random (non-zero) weights, ``h + up(gelu(down(h)))``.

    A sub-layer modification (``model.add_sublayer_modification(point, RandomAdapter(d))``) whose
    effect is visible from step 0, for tests of hooks and probes.
    """

    def __init__(self, d: int, m: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.down = torch.nn.Parameter(torch.randn(d, m, generator=g) / d**0.5)
        self.up = torch.nn.Parameter(torch.randn(m, d, generator=g) / m**0.5)

    def forward(self, x, h):
        return h + torch.nn.functional.gelu(h @ self.down) @ self.up
