"""Fixtures for the backbone tests: tiny random T5 and BART checkpoints saved to temporary dirs.

Nothing comes from the hub: a byte-level BPE tokenizer is trained on a few sentences and the LMs
are built from tiny configs (d_model 32, 2 + 2 layers, 4 heads).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(1)

CORPUS = [
    "a large red circle at the top left",
    "a small blue square at the bottom right",
    "a green triangle left of a yellow diamond",
    "vqa: what colour is the circle?",
    "vqa: how many squares are there?",
    "caption:",
    "red", "blue", "green", "yes", "no", "two", "three",
]
FEAT_DIM = 16
N_VISUAL = 5
FAMILIES = ("t5", "bart")


def build_tiny_lm(family: str, seed: int = 0):
    """A tiny random LM of ``family`` and its tokenizer (BART with scale_embedding to test the scale)."""
    from workbench.models import build_lm_config, get_family, train_tokenizer

    tok = train_tokenizer(CORPUS * 4, vocab_size=300, family=family)
    extra = {"scale_embedding": True, "max_positions": 64} if family == "bart" else {}
    cfg = build_lm_config(family, tok, d_model=32, n_enc_layers=2, n_dec_layers=2, n_heads=4, d_ff=64, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = get_family(family).lm_class()(cfg)
    return lm, tok


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
    """A fresh :class:`VLModel` (eval mode) wrapping the tiny checkpoint of ``family``."""
    from workbench.models import load_backbone

    return load_backbone(tiny_hf_dirs[family], feat_dim=FEAT_DIM, seed=0).eval()


@pytest.fixture
def batch(tiny_model):
    """Two examples: features, prompt ids/mask, labels (prompts of different lengths -> padding)."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, N_VISUAL, FEAT_DIM, generator=g)
    ids, mask = tiny_model.encode_prompts(["vqa: what colour is the circle?", "caption:"])
    labels = tiny_model.encode_targets(["red", "a small blue square"])
    return dict(visual_feats=feats, input_ids=ids, attention_mask=mask, labels=labels)
