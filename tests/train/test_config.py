"""RunConfig: every field's type and range, one message for all problems, and what the hash covers."""

import json
from pathlib import Path

import numpy as np
import pytest

from workbench.train import RunConfig

NO_CKPT = "/nonexistent/ckpt"


@pytest.fixture(autouse=True)
def private_fingerprint_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_FINGERPRINTS", str(tmp_path / "fingerprints"))


BAD = [
    ("backbone", ""), ("backbone", 3), ("method", ""), ("method", None), ("task", 1),
    ("n_shots", 0), ("n_shots", 2.0), ("n_shots", True), ("batch_size", -1), ("eval_every", 2.5), ("grad_accum", 0),
    ("eval_every", 0), ("patience", 1.5), ("num_beams", 0), ("max_new_tokens", None),
    ("seed", -2), ("seed", 1.0),
    ("test_size", -5), ("test_size", 0), ("pool_size", 2.5), ("max_steps", 2.5), ("max_steps", 0),
    ("lr", -1.0), ("lr", 0), ("lr", float("nan")), ("lr", float("inf")), ("lr", "1e-3"),
    ("weight_decay", -5), ("weight_decay", float("inf")), ("weight_decay", None),
    ("adam_eps", 0), ("adam_eps", -1e-8), ("adam_eps", None),
    ("warmup_ratio", 1.0), ("warmup_ratio", -0.1), ("warmup_ratio", None),
    ("grad_clip", 0), ("grad_clip", -1.0), ("grad_clip", float("nan")),
    ("bf16", 1), ("bf16", "yes"), ("quiet", None),
    ("device", "gpu"), ("device", 0), ("device", ""),
    ("task_options", []), ("method_config", "r=8"), ("backbone_options", None), ("method_config", {1: 2}),
]


@pytest.mark.parametrize("name, value", BAD)
def test_each_bad_value_is_refused_with_the_field_named(name, value):
    with pytest.raises(ValueError, match=rf"invalid RunConfig: .*{name}") as info:
        RunConfig(**{name: value})
    assert repr(value)[:20] in str(info.value) or type(value).__name__ in str(info.value)


def test_bad_task_options_paths():
    with pytest.raises(ValueError, match=r"task_options\['features'\] must be a path"):
        RunConfig(task_options={"features": 3})
    with pytest.raises(ValueError, match=r"task_options\['root'\] must be a path"):
        RunConfig(task_options={"root": ""})


def test_one_message_lists_every_problem():
    with pytest.raises(ValueError) as info:
        RunConfig(test_size=-5, weight_decay=-5, max_steps=2.5, lr=0.0, bf16="no", device="tpu-ish")
    message = str(info.value)
    for name in ("test_size", "weight_decay", "max_steps", "lr", "bf16", "device"):
        assert name in message
    assert message.count(";") >= 5


def test_from_dict_validates_too():
    d = RunConfig().to_dict()
    with pytest.raises(ValueError, match="adam_eps"):
        RunConfig.from_dict({**d, "adam_eps": -1})
    with pytest.raises(ValueError, match="unknown RunConfig fields"):
        RunConfig.from_dict({**d, "colour": 1})


@pytest.mark.parametrize("changes", [
    {"lr": None, "grad_clip": None, "max_steps": None, "pool_size": None, "test_size": None, "device": None},
    {"lr": 1, "weight_decay": 0, "warmup_ratio": 0, "grad_clip": 1, "adam_eps": 1e-8, "max_steps": 1, "device": "cpu"},
    {"device": "cuda:1", "bf16": False, "quiet": True, "num_beams": 4, "seed": 0},
])
def test_good_values_are_accepted(changes):
    cfg = RunConfig(**changes)
    assert all(getattr(cfg, k) == v for k, v in changes.items())


def test_numpy_scalars_and_paths_become_plain_values_with_the_same_hash():
    plain = RunConfig(backbone=NO_CKPT, n_shots=16, seed=21, lr=1e-3)
    numpy = RunConfig(backbone=Path(NO_CKPT), n_shots=np.int64(16), seed=np.int32(21), lr=np.float64(1e-3))
    assert type(numpy.n_shots) is int and type(numpy.backbone) is str
    assert numpy.hash == plain.hash
    json.dumps(numpy.to_dict())


# ------------------------------------------------------------------------------ the hash
def test_hashes_without_a_features_option_are_unchanged():
    # pinned (also in test_real_tasks.py): covering data files must not rename existing runs
    assert RunConfig(backbone=NO_CKPT).hash == "205dc82aeecd"  # LoRA at lr 1.5e-3
    assert RunConfig(backbone=NO_CKPT, lr=3e-3).hash == "29b675e775eb"  # its earlier default, spelled out: the old run
    assert "features_fingerprint" not in RunConfig(backbone=NO_CKPT).hash_payload()


def test_the_budget_is_the_protocols_and_is_hashed_resolved():
    from workbench.train.config import protocol_budget

    assert protocol_budget(16) == (1000, 25) and protocol_budget(64) == (1000, 25)
    assert protocol_budget(1000) == (1890, 126)  # 30 epochs of 63 steps, dev every 2 epochs
    cfg = RunConfig(backbone=NO_CKPT, n_shots=64)
    assert cfg.budget() == (1000, 25) and cfg.replace(max_steps=300, eval_every=10).budget() == (300, 10)
    assert cfg.replace(max_steps=1000, eval_every=25).hash == cfg.hash  # spelling out the protocol: the same run
    assert cfg.replace(max_steps=2000).hash != cfg.hash
    assert cfg.replace(lr=cfg.default_lr()).hash == cfg.hash  # the method's default lr, spelled out
    assert cfg.replace(lr=cfg.default_lr() * 2).hash != cfg.hash
    with pytest.raises(ValueError, match="`epochs` is gone"):
        RunConfig.from_dict({**cfg.to_dict(), "epochs": 40})


def test_the_hash_covers_the_feature_store_content(tmp_path):
    store = tmp_path / "feats.npz"
    np.savez(store, a=np.zeros((2, 4), np.float32))
    cfg = RunConfig(backbone=NO_CKPT, task="vqa-v2", task_options={"features": str(store), "root": str(tmp_path / "d")})
    before = cfg.hash
    assert cfg.hash_payload()["data_fingerprint"] == "missing"
    np.savez(store, a=np.zeros((2, 4), np.float32))  # rewritten, same content: the same run
    assert cfg.hash == before
    np.savez(store, a=np.ones((2, 4), np.float32))
    assert cfg.hash != before
    store.unlink()
    assert cfg.hash_payload()["features_fingerprint"] == "missing"  # no error: run() names the missing file


def test_the_hash_covers_the_task_data_files(tmp_path):
    (tmp_path / "feats.npz").write_bytes(b"x")
    root = tmp_path / "vqa"
    root.mkdir()
    (root / "v2_OpenEnded_mscoco_train2014_questions.json").write_text('{"questions": []}')
    cfg = RunConfig(backbone=NO_CKPT, task="vqa-v2",
                    task_options={"features": str(tmp_path / "feats.npz"), "root": str(root)})
    before = cfg.hash
    (root / "README.txt").write_text("not read by the loader")
    assert cfg.hash == before
    (root / "v2_mscoco_train2014_annotations.json").write_text('{"annotations": []}')
    assert cfg.hash != before


def test_fingerprints_are_cached_on_disk(tmp_path, monkeypatch):
    from workbench import utils

    f = tmp_path / "big.bin"
    f.write_bytes(b"\0" * 1000)
    first = utils.file_fingerprint(f)
    utils._DIGESTS.clear()
    monkeypatch.setattr(utils, "_CHUNK", None)  # reading the file again would fail
    assert utils.file_fingerprint(f) == first


def test_an_option_at_its_neutral_value_leaves_the_hash_alone(monkeypatch):
    from workbench.methods.vlpet import VlpetConfig

    base = RunConfig(backbone="/nonexistent/ckpt", method="vlpet")
    base_hash = base.hash
    before = base.hash_payload()["method_config"]
    assert "encoder_modules" not in before and "decoder_design" not in before  # neutral: left out
    spelled = base.replace(method_config={"encoder_modules": True, "decoder_design": "value"})
    assert spelled.hash == base.hash
    changed = base.replace(method_config={"decoder_design": "full"})
    assert changed.hash != base.hash and changed.hash_payload()["method_config"]["decoder_design"] == "full"
    # without the declaration the new options would rename every stored VL-PET run
    monkeypatch.setattr(VlpetConfig, "HASH_NEUTRAL", {})
    assert RunConfig(backbone="/nonexistent/ckpt", method="vlpet").hash != base_hash
