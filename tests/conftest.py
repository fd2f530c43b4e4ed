"""Test-wide settings: deterministic threads, no hub access."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# A tiny workbench checkpoint (CNN + T5, random weights), the backbone of the trainer's and the studies' tests.
CORPUS = ["vqa: " + w for w in ("what color is the shape?", "how many circles are there?", "is there a red square?")]
CORPUS += ["yes", "no", "red", "blue", "circle", "square", "1", "2", "caption:", "a small red circle at the top"]


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory):
    """Path of a saved tiny VLModel with an embedded visual encoder (trainer tests use it as backbone)."""
    from workbench.models.testing import tiny_vlmodel

    model = tiny_vlmodel("t5", feat_dim=24, visual_encoder=dict(grid=2, channels=(8, 8, 8), pos_dim=8, groups=4),
                         seed=0, name="tiny-test", corpus=CORPUS, vocab_size=320,
                         d_model=32, layers=1, heads=2, d_ff=64)
    path = tmp_path_factory.mktemp("tiny-backbone") / "ckpt"
    model.save_pretrained(path)
    return path


# ------------------------------------------------------------------ real datasets on the fixture files
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FEAT_DIM = 16
# Every image of the fixture files, with its number of regions: they differ, so batches are padded.
REGIONS = {
    # VQA v2 train2014 / val2014
    "9": 3, "25": 5, "30": 2, "262148": 4, "393225": 2,
    # OK-VQA train2014 / val2014
    "51606": 6, "520950": 3, "297147": 2, "102705": 5,
    # GQA train / testdev
    "2375429": 4, "2417468": 2, "n161313": 3, "n288870": 6,
    # COCO Karpathy
    "391895": 2, "522418": 5, "57870": 3, "184613": 6, "403013": 4, "318219": 2,
}


@pytest.fixture(scope="session")
def real_data(tmp_path_factory):
    """The fixture folders and an HDF5 store (VL-T5 layout, with boxes) of random features for every
    fixture image: ``.root``, ``.store`` (its path), ``.feat_dim``, ``.regions`` (image id -> regions)."""
    from types import SimpleNamespace

    import numpy as np

    from workbench.data import FeatureStore

    rng = np.random.default_rng(0)
    feats = {k: rng.normal(size=(n, FEAT_DIM)).astype(np.float32) for k, n in REGIONS.items()}
    boxes = {k: rng.uniform(size=(n, 4)).astype(np.float32) for k, n in REGIONS.items()}
    store = FeatureStore.write(tmp_path_factory.mktemp("features") / "regions.h5", feats, boxes=boxes)
    return SimpleNamespace(root=FIXTURES, store=store, feat_dim=FEAT_DIM, regions=dict(REGIONS))


@pytest.fixture(scope="session")
def hf_backbones(tmp_path_factory):
    """Tiny random Hugging Face T5 and BART directories (config, weights, tokenizer), as a user's t5-base."""
    from workbench.models.testing import tiny_lm, tiny_tokenizer

    out = {}
    for family in ("t5", "bart"):
        lm, tok = tiny_lm(family, tiny_tokenizer(family), layers=1, d_model=32, heads=2, d_ff=64)
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        lm.save_pretrained(path)
        tok.save_pretrained(path)
        out[family] = path
    return out
