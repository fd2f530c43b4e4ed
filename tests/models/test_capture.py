"""Activation capture on tiny random T5 / BART VLModels: names, masks, pooling, no side effects."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

torch.set_num_threads(1)

from workbench.models.testing import RandomAdapter, tiny_vlmodel  # noqa: E402
from workbench.models import Activations, available_points, capture  # noqa: E402

CORPUS = [
    "a large red circle at the top left",
    "a small blue square at the bottom right",
    "vqa: what colour is the circle?",
    "vqa: how many squares are there?",
    "caption:", "red", "blue", "green", "yes", "no", "two",
]
FEAT_DIM, N_VISUAL, D = 16, 5, 32


class Adapter(RandomAdapter):
    """The shared random adapter at this file's width (its class name labels the probe rows)."""

    def __init__(self, seed=0):
        super().__init__(D, seed=seed)


class Scale(nn.Module):
    """A projection modification y -> 1.5 y."""

    def forward(self, x, y):
        return 1.5 * y


@pytest.fixture(scope="module", params=["t5", "bart"])
def model(request):
    """A tiny random VLModel (eval mode): d_model D, 2 + 2 layers, 4 heads, tokenizer trained on CORPUS."""
    return tiny_vlmodel(request.param, feat_dim=FEAT_DIM, d_model=D, layers=2, heads=4, d_ff=64, corpus=CORPUS).eval()


def make_batch(model, prompts=("vqa: what colour is the circle?", "caption:", "red"),
               targets=("red", "a small blue square", "no"), seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(prompts), N_VISUAL, FEAT_DIM, generator=g)
    ids, mask = model.encode_prompts(list(prompts))
    labels = model.encode_targets(list(targets))
    return dict(visual_feats=feats, input_ids=ids, attention_mask=mask, labels=labels)


def hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


@pytest.fixture
def with_mods(model):
    """The module's model with an adapter at encoder.0.ffn and decoder.1.ffn and a projection mod."""
    model.add_sublayer_modification("encoder.0.ffn", Adapter(seed=1))
    model.add_sublayer_modification("decoder.1.ffn", Adapter(seed=2))
    model.add_projection_modification("encoder.1.attn.q", Scale())
    yield model
    model.remove_modifications()


def test_outputs_bit_identical_and_hooks_removed(with_mods):
    model = with_mods
    batch = make_batch(model)
    before = hook_counts(model)
    ref = model(**batch)
    with capture(model, ["*"]) as acts:  # every capturable name at once
        out = model(**batch)
        enc, _ = model.encode(batch["visual_feats"], batch["input_ids"], batch["attention_mask"])
    assert torch.equal(ref.logits, out.logits)
    assert torch.equal(ref.encoder_last_hidden_state, enc.last_hidden_state)
    assert hook_counts(model) == before
    assert "build_encoder_inputs" not in model.__dict__
    assert isinstance(acts, Activations)
    assert set(acts) == set(available_points(model))
    assert torch.equal(model(**batch).logits, ref.logits)


def test_hooks_removed_on_exception(model):
    before = hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, ["encoder.*.ffn", "projector", "decoder.final"]):
            raise RuntimeError("boom")
    assert hook_counts(model) == before
    assert "build_encoder_inputs" not in model.__dict__


def test_names_and_modified(with_mods):
    model = with_mods
    names = available_points(model)
    assert names[0] == "projector"
    for n in ("encoder.0.ffn", "encoder.0.ffn:input", "encoder.0.ffn:modified", "encoder.0.ffn@0",
              "encoder.0.ffn@0:x", "encoder.0.ffn@0:h", "encoder.0.ffn@0:delta", "encoder.1.attn.q@0",
              "decoder.1.ffn@0:delta", "encoder.final", "decoder.final", "decoder.0.cross_attn.k"):
        assert n in names
    batch = make_batch(model)
    with capture(model, ["encoder.0.ffn*", "encoder.1.attn.q*", "decoder.1.ffn*"], pool="tokens") as acts:
        model(**batch)
    h, out = acts["encoder.0.ffn"], acts["encoder.0.ffn@0"]
    assert torch.equal(acts["encoder.0.ffn@0:h"], h)  # the module receives the frozen H
    assert torch.equal(acts["encoder.0.ffn:modified"], out)
    torch.testing.assert_close(acts["encoder.0.ffn@0:delta"], out - h)
    assert not torch.allclose(out, h)
    torch.testing.assert_close(acts["encoder.1.attn.q@0"], 1.5 * acts["encoder.1.attn.q"])
    assert torch.equal(acts["encoder.1.attn.q:input"], acts["encoder.1.attn.q@0:x"])
    n_valid_enc = int(batch["attention_mask"].sum()) + 3 * N_VISUAL
    assert acts["encoder.0.ffn"].shape == (n_valid_enc, D)
    assert acts["decoder.1.ffn@0"].shape == (int((batch["labels"] != -100).sum()), D)
    assert acts.n_samples("encoder.0.ffn") == 3


def test_mean_pool_matches_manual_masked_mean(model):
    batch = make_batch(model)
    with capture(model, ["encoder.final", "decoder.final", "projector"]) as acts:
        out = model(**batch, output_hidden_states=True)
    enc_mask = torch.cat([torch.ones(3, N_VISUAL, dtype=torch.long), batch["attention_mask"]], 1)
    w = enc_mask.unsqueeze(-1).float()
    manual = (out.encoder_last_hidden_state * w).sum(1) / w.sum(1)
    torch.testing.assert_close(acts["encoder.final"], manual)
    dec_last = out.decoder_hidden_states[-1]
    w = (batch["labels"] != -100).unsqueeze(-1).float()
    torch.testing.assert_close(acts["decoder.final"], (dec_last * w).sum(1) / w.sum(1))
    assert acts["projector"].dtype == torch.float32 and acts["projector"].device.type == "cpu"


def test_padding_does_not_change_pooled_values(model):
    """An example pooled alone equals the same example pooled in a padded batch (masks are used)."""
    names = ["encoder.0.attn", "encoder.1.ffn:input", "decoder.0.cross_attn", "decoder.1.ffn", "decoder.final",
             "decoder.0.cross_attn.k", "encoder.final"]
    batch = make_batch(model)
    single = make_batch(model, prompts=("red",), targets=("no",))
    single["visual_feats"] = batch["visual_feats"][2:]
    with capture(model, names) as acts_b:
        model(**batch)
    with capture(model, names) as acts_1:
        model(**single)
    assert batch["attention_mask"][2].sum() < batch["attention_mask"].shape[1]  # row 2 is padded
    for n in names:
        torch.testing.assert_close(acts_b[n][2], acts_1[n][0], atol=1e-5, rtol=1e-4, msg=n)


def test_visual_mask_pools_projector(model):
    batch = make_batch(model)
    vmask = torch.ones(3, N_VISUAL, dtype=torch.long)
    vmask[0, 3:] = 0
    with capture(model, ["projector"]) as acts:
        model(**batch, visual_mask=vmask)
    proj = model.projector(batch["visual_feats"])
    torch.testing.assert_close(acts["projector"][0], proj[0, :3].mean(0).detach())
    torch.testing.assert_close(acts["projector"][1], proj[1].mean(0).detach())


def test_pool_first_flatten_and_dtype(model):
    batch = make_batch(model)
    with capture(model, ["encoder.final"], pool="first", dtype=torch.float64) as first:
        enc, mask = model.encode(batch["visual_feats"], batch["input_ids"], batch["attention_mask"])
    assert first["encoder.final"].dtype == torch.float64
    torch.testing.assert_close(first["encoder.final"], enc.last_hidden_state[:, 0].double())
    with capture(model, ["encoder.final"], pool="flatten") as flat:
        model.encode(batch["visual_feats"], batch["input_ids"], batch["attention_mask"])
        model.encode(batch["visual_feats"][:1], batch["input_ids"][:1, :4], batch["attention_mask"][:1, :4])
    seq = mask.shape[1]
    x = flat["encoder.final"]
    assert x.shape == (4, seq * D)
    assert torch.all(x[3, (N_VISUAL + 4) * D:] == 0)  # the shorter batch is zero-padded
    assert torch.all(x[2].reshape(seq, D)[mask[2] == 0] == 0)  # padding positions are zeroed


def test_function_form_caps_samples_and_restores_mode(model):
    batches = [make_batch(model, seed=s) for s in range(3)]  # 3 x 3 examples
    model.train()
    try:
        acts = capture(model, ["encoder.1.ffn", "decoder.final"], data=batches, max_samples=7)
        assert all(m.training for m in model.modules())
    finally:
        model.eval()
    assert acts["encoder.1.ffn"].shape == (7, D) and acts["decoder.final"].shape == (7, D)
    with capture(model, ["encoder.1.ffn", "decoder.final"]) as ref:
        for b in batches:
            model(**b)
    torch.testing.assert_close(acts["encoder.1.ffn"], ref["encoder.1.ffn"][:7])
    # tuples (visual_feats, input_ids, attention_mask[, labels]) and encoder-only data
    enc_only = capture(model, "encoder.final", data=[(b["visual_feats"], b["input_ids"], b["attention_mask"])
                                                      for b in batches])
    assert enc_only["encoder.final"].shape == (9, D)
    with pytest.raises(ValueError, match="labels"):
        capture(model, ["decoder.final"], data=[(batches[0]["visual_feats"],)])


def test_context_manager_cap_and_missing_decoder(model):
    batch = make_batch(model)
    with capture(model, ["encoder.final", "decoder.final"], max_samples=2) as acts:
        model.encode(batch["visual_feats"], batch["input_ids"], batch["attention_mask"])
    assert acts["encoder.final"].shape == (2, D)
    assert list(acts) == ["encoder.final"]
    with pytest.raises(KeyError, match="recorded nothing"):
        acts["decoder.final"]


def test_bad_input(model):
    with pytest.raises(ValueError, match="did you mean"):
        capture(model, ["encoder.0.fnn"])
    with pytest.raises(ValueError, match="matches no capture point"):
        capture(model, ["encoder.9.*"])
    with pytest.raises(ValueError, match="pool"):
        capture(model, ["projector"], pool="max")
    with pytest.raises(ValueError, match="max_samples"):
        capture(model, ["projector"], max_samples=0)
    with pytest.raises(ValueError, match="at least one"):
        capture(model, [])
    with pytest.raises(TypeError, match="VLModel"):
        capture(nn.Linear(2, 2), ["projector"])
    with pytest.raises(ValueError, match="visual_feats"):
        capture(model, ["projector"], data=[{"input_ids": torch.zeros(1, 2, dtype=torch.long)}])
