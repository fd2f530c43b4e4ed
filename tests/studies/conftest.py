"""Study test fixtures: the base config of the tiny N = 64 runs the analyses are tested on."""

import pytest


@pytest.fixture(scope="module")
def tiny_base(tiny_backbone):
    """A RunConfig at N = 64 that trains in about a second on the tiny checkpoint (tests/conftest.py)."""
    from workbench.train import RunConfig

    return RunConfig(backbone=str(tiny_backbone), task="shapes-vqa", n_shots=64, max_steps=8, eval_every=4,
                     batch_size=16, pool_size=160, test_size=24, quiet=True, task_options={"n_scenes": 60})
