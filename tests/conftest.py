"""Test-wide settings: deterministic threads, no hub access."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
