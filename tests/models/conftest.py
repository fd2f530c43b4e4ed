"""Fixtures for the backbone tests: tiny random T5 and BART checkpoints saved to temporary dirs.

Nothing comes from the hub: :mod:`workbench.models.testing` trains a byte-level BPE tokenizer on a
few sentences (its default ``CORPUS``) and builds the LMs from tiny configs (d_model 32,
2 + 2 layers, 4 heads, d_ff 64; BART with scale_embedding to test the scale).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from workbench.models.testing import tiny_lm  # noqa: E402

torch.set_num_threads(1)

FEAT_DIM = 16
N_VISUAL = 5
FAMILIES = ("t5", "bart")


def build_tiny_lm(family: str, seed: int = 0):
    """A tiny random LM of ``family`` and its tokenizer (BART with scale_embedding to test the scale)."""
    return tiny_lm(family, d_model=32, layers=2, heads=4, d_ff=64, seed=seed)


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory):
    """``{family: directory}`` holding a plain HF checkpoint (config.json + weights + tokenizer)."""
    dirs = {}
    for family in FAMILIES:
        lm, tok = build_tiny_lm(family)
        d = tmp_path_factory.mktemp(f"tiny-{family}")
        lm.save_pretrained(d)
        tok.save_pretrained(d)
        dirs[family] = d
    return dirs


@pytest.fixture(scope="session")
def make_tiny_lm():
    """The builder ``make_tiny_lm(family, seed=0) -> (lm, tokenizer)``."""
    return build_tiny_lm


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny_model(tiny_hf_dirs, family):
    """A fresh :class:`VLModel` (eval mode) wrapping the tiny checkpoint of ``family``, ``visual_first``
    (the layout these tests spell out; ``test_layout.py`` covers ``text_first``, the HF default)."""
    from workbench.models import load_backbone

    return load_backbone(tiny_hf_dirs[family], feat_dim=FEAT_DIM, seed=0, layout="visual_first").eval()


@pytest.fixture
def batch(tiny_model):
    """Two examples: features, prompt ids/mask, labels (prompts of different lengths -> padding)."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, N_VISUAL, FEAT_DIM, generator=g)
    ids, mask = tiny_model.encode_prompts(["vqa: what colour is the circle?", "caption:"])
    labels = tiny_model.encode_targets(["red", "a small blue square"])
    return dict(visual_feats=feats, input_ids=ids, attention_mask=mask, labels=labels)
