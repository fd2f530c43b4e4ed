"""Shared fixtures for every test of ``workbench.methods`` (other method tests in this folder use them).

Nothing comes from the hub: :mod:`workbench.models.testing` trains a byte-level BPE tokenizer on a
few sentences and builds tiny random T5 / BART LMs from small configs. Shapes (``TINY_SHAPE``):
d_model 96, 2 + 2 layers, 4 heads, d_ff 192, visual features of dim 16 (``FEAT_DIM``), 4 visual
tokens (``N_VISUAL``).
d_model = 96 is chosen so that the method dimensions divide: MixPHM's bottleneck d/12 = 8 is a
multiple of the PHM n = 4, and d is a multiple of 4 heads and of n.
Compacter's official reduction factor 32 gives a bottleneck of 3 on d = 96, not divisible by
n = 4, so the test matrix uses :data:`TINY_OVERRIDES` for it (its default shapes are checked on the
T5-base-shaped meta model in ``test_param_counts.py``).

Fixtures (all function-scoped unless said):

``family``                 parametrised over ``("t5", "bart")``.
``tiny_model``             a factory ``tiny_model(family, seed=0) -> VLModel``: a *fresh* model in
                           eval mode on every call, with identical weights for the same ``seed``
                           (the LM is deep-copied from a session cache, so a call costs ~10 ms).
``tiny_batch``             a factory ``tiny_batch(model, seed=0, n=2) -> dict`` with
                           ``visual_feats``, ``input_ids``, ``attention_mask`` (prompts of different
                           lengths, so there is padding) and ``labels`` (-100 on padding); pass it
                           as ``model(**batch)``.
``method_config``          a factory ``method_config(name, **overrides) -> MethodConfig`` with the
                           registry defaults plus :data:`TINY_OVERRIDES` for the tiny shapes.
``meta_backbone``          a factory ``meta_backbone(family="t5")``: a T5-base- (BART-base-) shaped
                           VLModel on the meta device, for parameter counts at full size.

The same helpers as plain functions (for use outside pytest): :func:`make_tiny_model`,
:func:`make_batch`, :func:`tiny_config`, :func:`meta_t5_base` (no weights are allocated on the meta
device, nothing is downloaded). Tests should use the fixtures: with pytest's importlib import mode a
test module cannot ``import conftest``.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from workbench.models.testing import tiny_lm, tiny_tokenizer  # noqa: E402

torch.set_num_threads(1)

FEAT_DIM = 16
N_VISUAL = 4
FAMILIES = ("t5", "bart")
TINY_SHAPE = dict(d_model=96, layers=2, heads=4, d_ff=192)  # layers: encoder and decoder each

# Per-method config overrides for the tiny shapes, used by the test matrix. Only for defaults that
# cannot exist on a d_model = 96 model; every entry says why.
TINY_OVERRIDES: dict[str, dict] = {
    # d/32 = 3 is not divisible by n = 4; d/12 = 8 is.
    "compacter": {"reduction_factor": 12},
    "compacter++": {"reduction_factor": 12},
    "compacter+g+lw": {"inner_options": {"reduction_factor": 12}},  # VL-PET's transfer onto Compacter
}

_TOKENIZERS: dict = {}
_LMS: dict = {}


def _tokenizer(family: str):
    if family not in _TOKENIZERS:
        _TOKENIZERS[family] = tiny_tokenizer(family, vocab_size=300)
    return _TOKENIZERS[family]


def build_tiny_lm(family: str, seed: int = 0):
    """A tiny random LM of ``family`` (``TINY_SHAPE``) and its tokenizer; cached per (family, seed)."""
    key = (family, seed)
    if key not in _LMS:
        lm, _ = tiny_lm(family, _tokenizer(family), **TINY_SHAPE, seed=seed)
        _LMS[key] = lm.eval()
    return copy.deepcopy(_LMS[key]), _tokenizer(family)


def make_tiny_model(family: str, seed: int = 0):
    """A fresh :class:`~workbench.models.VLModel` (eval mode) around a tiny LM."""
    from workbench.models import VLModel

    lm, tok = build_tiny_lm(family, seed)
    return VLModel(lm, tok, FEAT_DIM, seed=seed, name=f"tiny-{family}").eval()


def make_batch(model, seed: int = 0, n: int = 2) -> dict:
    """``n`` examples (features, prompts of different lengths -> padding, labels with -100)."""
    prompts = ["vqa: what colour is the circle?", "caption:", "vqa: how many squares are there?", "red"]
    targets = ["red", "a small blue square", "two", "a green triangle left of a yellow diamond"]
    prompts, targets = (prompts * n)[:n], (targets * n)[:n]
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, N_VISUAL, FEAT_DIM, generator=g)
    ids, mask = model.encode_prompts(prompts)
    labels = model.encode_targets(targets)
    return dict(visual_feats=feats, input_ids=ids, attention_mask=mask, labels=labels)


def tiny_config(name: str, **overrides):
    """The registry config of ``name`` with :data:`TINY_OVERRIDES` and then ``overrides`` applied."""
    from workbench.methods import get_config

    return get_config(name, **{**TINY_OVERRIDES.get(name, {}), **overrides})


def meta_t5_base(family: str = "t5"):
    """A T5-base- (or BART-base-) shaped VLModel on the meta device: shapes only, no memory, no download.

    T5-base: d 768, d_ff 3072, 12 + 12 layers, 12 heads, vocab 32128. BART-base: d 768, d_ff 3072,
    6 + 6 layers, 12 heads, vocab 50265. The tokenizer is the tiny one (only the LM shape matters).
    """
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    from workbench.models import VLModel

    tok = _tokenizer(family)
    with torch.device("meta"):
        if family == "t5":
            lm = T5ForConditionalGeneration(T5Config(d_model=768, d_ff=3072, num_layers=12, num_decoder_layers=12,
                                                     num_heads=12, d_kv=64, vocab_size=32128))
        else:
            lm = BartForConditionalGeneration(BartConfig(d_model=768, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                                                         encoder_layers=6, decoder_layers=6,
                                                         encoder_attention_heads=12, decoder_attention_heads=12,
                                                         vocab_size=50265))
        return VLModel(lm, tok, 2048, seed=None, name=f"meta-{family}-base")


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny_model():
    """Factory: ``tiny_model(family, seed=0) -> VLModel`` (fresh, eval mode, same weights per seed)."""
    return make_tiny_model


@pytest.fixture
def tiny_batch():
    """Factory: ``tiny_batch(model, seed=0, n=2) -> dict`` of model inputs with padding and labels."""
    return make_batch


@pytest.fixture
def method_config():
    """Factory: ``method_config(name, **overrides)`` -> registry defaults + tiny-shape overrides."""
    return tiny_config


@pytest.fixture
def meta_backbone():
    """Factory: ``meta_backbone(family="t5")`` -> T5-base / BART-base-shaped VLModel on the meta device."""
    return meta_t5_base


def perturb_trainable(handle, seed: int = 0, scale: float = 0.5, relative: bool = True) -> None:
    """Move every trainable tensor away from its init (zero factors, identical experts), so that round
    trips, merges and comparisons are not trivially true. ``relative``: noise of ``scale`` times the
    tensor's mean magnitude (at least 1e-2); else absolute noise of standard deviation ``scale``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in handle.trainable_parameters():
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            p.add_(scale * (p.abs().mean().clamp(min=1e-2) if relative else 1.0) * noise)


@pytest.fixture
def perturb():
    """:func:`perturb_trainable`, for tests."""
    return perturb_trainable

