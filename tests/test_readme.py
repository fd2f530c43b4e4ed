"""The README's "Extending the workbench" examples run as printed: a method in one file, a dataset
as one loader plus one ``register_task`` call, both trained and scored by ``run``."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from workbench import methods
from workbench.data import list_tasks, unregister_task
from workbench.models.testing import tiny_lm
from workbench.train import RunConfig, RunStore, run

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Extending the workbench"):]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    lm, tok = tiny_lm("t5")
    d = tmp_path_factory.mktemp("t5")
    lm.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _tiny(cfg: RunConfig) -> RunConfig:
    return cfg.replace(n_shots=4, max_steps=2, eval_every=1, batch_size=4, quiet=True)


def test_the_method_example(t5_dir, tmp_path):
    method_code = next(b for b in _section_blocks() if "register_method" in b)
    # As a file inside workbench/methods it imports `.base`; here it runs as a script.
    code = method_code.replace("from .base import", "from workbench.methods.base import")
    namespace = {"__name__": "readme_method"}
    exec(compile(code, "README.md", "exec"), namespace)
    try:
        spec = methods.method_spec("scaled-ffn")
        assert spec.family == "layer: rescaling" and spec.default_lr == 3e-3
        data = _write_vqa(tmp_path)
        _register_test_task("my-vqa-method-test")
        cfg = _tiny(RunConfig(method="scaled-ffn", task="my-vqa-method-test", backbone=str(t5_dir),
                              backbone_options={"feat_dim": 8},
                              task_options={"root": str(data), "features": str(data / "feats.npz")}))
        result = run(cfg, store=RunStore(tmp_path / "runs"))
        assert result.params["method"] == 2 * 2 * 32  # one scale vector per FFN, encoder and decoder, d = 32
        assert 0.0 <= result.test_accuracy <= 1.0
    finally:
        methods.METHODS.unregister("scaled-ffn")
        if "my-vqa-method-test" in list_tasks():
            unregister_task("my-vqa-method-test")


def _write_vqa(root: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = {
        split: [{"id": f"{split}{i}", "image": f"img{i % 5}", "question": "what colour is it?",
                 "answers": ["red"] * 7 + ["blue"] * 3, "type": "color"} for i in range(n)]
        for split, n in (("train", 12), ("test", 5))
    }
    for split, r in rows.items():
        (root / f"{split}.json").write_text(json.dumps(r))
    # a different number of regions per image, as real region features have
    np.savez(root / "feats.npz", **{f"img{i}": rng.normal(size=(2 + i, 8)).astype(np.float32) for i in range(5)})
    return root


def _register_test_task(name):
    task_code = next(b for b in _section_blocks() if "register_task" in b)
    exec(compile(task_code.replace('"my-vqa"', repr(name)), "README.md", "exec"), {"__name__": "readme_task"})


def test_the_dataset_example(t5_dir, tmp_path):
    data = _write_vqa(tmp_path)
    _register_test_task("my-vqa")
    try:
        cfg = _tiny(RunConfig(task="my-vqa", backbone=str(t5_dir), backbone_options={"feat_dim": 8},
                              task_options={"root": str(data), "features": str(data / "feats.npz")}))
        result = run(cfg, store=RunStore(tmp_path / "runs"))
        # Official VQA accuracy over the ten answers: "red" scores 1, "blue" 0.9 (3 of 10), else 0.
        preds = list(result.predictions.values())
        expected = np.mean([1.0 if p == "red" else 0.9 if p == "blue" else 0.0 for p in preds])
        assert result.test_accuracy == pytest.approx(expected)
        assert set(result.metrics["test"]["per_type"]) == {"color"}
    finally:
        unregister_task("my-vqa")
