"""The pre-training objectives derived from captions (workbench.train.pretrain)."""

import numpy as np
import pytest
import torch

from workbench.data.shapesworld import ShapesWorld, parse_caption
from workbench.models import load_backbone
from workbench.train.pretrain import (
    PretrainConfig,
    _task_mix,
    fill_example,
    ground_example,
    match_example,
    pretrain,
    task_pairs,
)

CAPTION = "there is a large blue diamond at the top and a small white square at the bottom right."


def _captions(n=40):
    world = ShapesWorld(0)
    return [world.caption(world.scene("pretrain", i)) for i in range(n)]


def test_fill_masks_whole_attribute_slots_and_lists_them_in_order():
    rng = np.random.RandomState(0)
    for caption in _captions():
        prompt, target = fill_example(caption, rng, prob=0.3)
        assert prompt.startswith("fill: ") and "_" in prompt
        answers = target.split(", ")
        assert prompt.count("_") == len(answers)
        # putting the answers back gives the caption
        text = prompt[len("fill: "):]
        for a in answers:
            text = text.replace("_", a, 1)
        assert text == caption


def test_match_negatives_change_exactly_one_attribute():
    rng = np.random.RandomState(1)
    labels = []
    for caption in _captions(200):
        prompt, label = match_example(caption, rng)
        labels.append(label)
        text = prompt[len("match: "):]
        truth, seen = parse_caption(caption), parse_caption(text)
        assert len(seen) == len(truth)
        changed = sum(a != b for t, s in zip(truth, seen) for a, b in zip(t, s))
        assert changed == (0 if label == "true" else 1)
    assert 0.35 < labels.count("true") / len(labels) < 0.65


def test_grounding_answers_follow_from_the_caption():
    rng = np.random.RandomState(2)
    kinds = set()
    for _ in range(200):
        prompt, target = ground_example(CAPTION, rng)
        kinds.add((prompt.split(":")[0], target in ("nothing", "nowhere")))
        if prompt == "describe: top":
            assert target == "large blue diamond"
        if prompt == "describe: center":
            assert target == "nothing"
        if prompt in ("locate: square", "locate: white shape", "locate: small white square"):
            assert target == "bottom right"
        if prompt in ("locate: large shape", "locate: diamond"):
            assert target == "top"
        if prompt == "locate: red shape":
            assert target == "nowhere"
    # both tasks, with both present and absent referents
    assert kinds == {("describe", False), ("describe", True), ("locate", False), ("locate", True)}


def test_task_shares_are_validated():
    with pytest.raises(ValueError, match="task shares"):
        PretrainConfig(fill_share=0.6, match_share=0.5)


def test_text_warmup_draws_only_text_tasks_then_mixes_in_captions():
    cfg = PretrainConfig(fill_share=0.1, match_share=0.1, ground_share=0.2, steps=100, text_warmup_steps=10)
    captions = _captions(200)

    def kinds(step):
        pairs = task_pairs(captions, cfg, step, np.random.RandomState(0))
        return [p.split(":")[0] for p, _ in pairs]

    warm, after = kinds(9), kinds(10)
    assert "caption" not in warm and set(warm) == {"fill", "match", "describe", "locate"}
    # in proportion to the shares: fill 1/4, match 1/4, ground (describe + locate) 1/2
    assert abs(warm.count("fill") / len(warm) - 0.25) < 0.1
    assert abs((warm.count("describe") + warm.count("locate")) / len(warm) - 0.5) < 0.1
    assert abs(after.count("caption") / len(after) - 0.6) < 0.1  # the rest of the shares
    no_warmup = PretrainConfig(fill_share=0.1, match_share=0.1, ground_share=0.2)
    assert task_pairs(captions, no_warmup, 0, np.random.RandomState(0)) == task_pairs(
        captions, cfg, 10, np.random.RandomState(0))


def test_text_warmup_is_validated():
    with pytest.raises(ValueError, match="text_warmup_steps must be"):
        PretrainConfig(fill_share=0.1, steps=100, text_warmup_steps=100)
    with pytest.raises(ValueError, match="needs at least one text-side task"):
        PretrainConfig(fill_share=0.0, match_share=0.0, ground_share=0.0, text_warmup_steps=10)


def test_model_card_states_the_task_mix_it_was_trained_with():
    mixed = _task_mix(PretrainConfig(fill_share=0.3, match_share=0.1, ground_share=0.4))
    assert "20 % captioning" in mixed and "30 % attribute filling" in mixed
    assert "10 % caption-image matching" in mixed and "40 % grounded captioning" in mixed
    only_captions = _task_mix(PretrainConfig(fill_share=0.0, match_share=0.0, ground_share=0.0))
    assert only_captions == "Every batch is captioning (prompt `caption:`)."


def test_pretraining_is_deterministic_and_writes_a_loadable_checkpoint(tmp_path):
    """Two runs of the same config give the same weights and scores (what `make pretrain` relies
    on), and the saved checkpoint loads through the factory with the same weights."""
    cfg = PretrainConfig(n_scenes=64, steps=3, batch_size=8, warmup=1, d_model=32, d_ff=64, n_heads=2,
                         n_enc_layers=1, n_dec_layers=1, vocab_size=300, eval_scenes=2)
    first, report = pretrain(cfg, out=tmp_path / "a", quiet=True)
    second, again = pretrain(cfg, quiet=True)
    assert report["final_loss"] == again["final_loss"] and report["test_scores"] == again["test_scores"]
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    loaded = load_backbone(str(tmp_path / "a"))
    assert all(torch.equal(a, loaded.state_dict()[n]) for n, a in first.state_dict().items())
    assert "30 % attribute filling" in (tmp_path / "a" / "README.md").read_text()
