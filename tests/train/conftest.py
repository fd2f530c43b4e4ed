"""Trainer test fixtures: a small config on the tiny checkpoint (tests/conftest.py); for the real datasets,
the official-format fixture files, a feature store and tiny Hugging Face T5 / BART directories."""

from pathlib import Path

import pytest

@pytest.fixture
def small_config(tiny_backbone, tmp_path, monkeypatch):
    """A RunConfig that trains in about a second on the tiny backbone."""
    from workbench.train import RunConfig

    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    return RunConfig(backbone=str(tiny_backbone), task="shapes-vqa", n_shots=16, seed=13, method="lora",
                     max_steps=8, eval_every=4, batch_size=8, pool_size=64, test_size=24, quiet=True,
                     task_options={"n_scenes": 40})


# ------------------------------------------------------------------ real datasets on the fixture files
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
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
