"""A tiny workbench checkpoint (CNN + T5, random weights) for fast trainer tests."""

import pytest

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


@pytest.fixture
def small_config(tiny_backbone, tmp_path, monkeypatch):
    """A RunConfig that trains in about a second on the tiny backbone."""
    from workbench.train import RunConfig

    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    return RunConfig(backbone=str(tiny_backbone), task="shapes-vqa", n_shots=16, seed=13, method="lora",
                     epochs=4, eval_every=2, batch_size=8, pool_size=64, test_size=24, quiet=True,
                     task_options={"n_scenes": 40})
