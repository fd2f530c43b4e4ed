"""The committed vlt5-tiny checkpoint: loads, and reproduces its model card on a sample."""

import json

import pytest

from workbench.utils import repo_root

CKPT = repo_root() / "data" / "checkpoints" / "vlt5-tiny"


@pytest.fixture(scope="module")
def model():
    from workbench.models import load_backbone

    return load_backbone("vlt5-tiny")


def test_checkpoint_is_committed_with_its_card():
    for name in ("workbench_config.json", "model.safetensors", "tokenizer.json", "README.md", "pretrain_report.json"):
        assert (CKPT / name).is_file(), name
    assert (CKPT / "model.safetensors").stat().st_size < 20 * 2**20  # a few MB, fit for git


def test_reproduces_the_card_on_a_sample(model):
    from workbench.train.pretrain import evaluate_captions

    card = json.loads((CKPT / "pretrain_report.json").read_text())["test_scores"]
    again = evaluate_captions(model, 50)
    # Greedy decoding is deterministic; allow one scene of float noise across machines.
    assert abs(again["color_shape_correct"] - card["first_50"]["color_shape_correct"]) <= 0.02
    assert abs(again["fully_correct"] - card["first_50"]["fully_correct"]) <= 0.02
    assert card["color_shape_correct"] >= 0.9  # the pre-training target


def test_tokenizer_encodes_any_text(model):
    text = "Zebras (naïve) quizzed 42 jukeboxes!"
    ids = model.tokenizer(text)["input_ids"]
    assert model.tokenizer.unk_token_id not in ids
    assert model.tokenizer.decode(ids, skip_special_tokens=True).strip() == text


def test_scratch_baseline_keeps_the_visual_side_and_resets_the_lm(model):
    import torch

    from workbench.models import load_backbone
    from workbench.models.factory import backbone_fingerprint
    from workbench.train.pretrain import evaluate_captions

    scratch = load_backbone("vlt5-tiny-scratch")
    pre, new = model.state_dict(), scratch.state_dict()
    assert pre.keys() == new.keys()
    for name in pre:
        same = torch.equal(pre[name], new[name])
        # the CNN and projector are the pre-trained ones (same cached features); the T5 is fresh
        assert same == (not name.startswith("lm.")), name
    again = load_backbone("vlt5-tiny-scratch")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in new.items())  # seeded
    other = load_backbone("vlt5-tiny-scratch", seed=1)
    assert not torch.equal(other.lm.shared.weight, scratch.lm.shared.weight)
    assert scratch.config.name == "vlt5-tiny-scratch"
    # an untrained language model cannot caption; its runs are keyed to the same weights file
    assert evaluate_captions(scratch, 10)["color_shape_correct"] == 0.0
    assert backbone_fingerprint("vlt5-tiny-scratch") == backbone_fingerprint("vlt5-tiny") != "missing"
