"""Trainer test fixtures: a small config on the tiny checkpoint (the real-data fixtures, the feature
store and the tiny Hugging Face T5 / BART directories are in tests/conftest.py: the studies use them too)."""

import pytest

@pytest.fixture
def small_config(tiny_backbone, tmp_path, monkeypatch):
    """A RunConfig that trains in about a second on the tiny backbone."""
    from workbench.train import RunConfig

    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    return RunConfig(backbone=str(tiny_backbone), task="shapes-vqa", n_shots=16, seed=13, method="lora",
                     max_steps=8, eval_every=4, batch_size=8, pool_size=64, test_size=24, quiet=True,
                     task_options={"n_scenes": 40})
