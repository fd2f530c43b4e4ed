"""The two input layouts and the per-forward context the model owns.

``text_first`` is the official VL-T5 input: ``[text; visual]`` with positional information on the
text tokens only (T5's relative bias, BART's learned positions); ``visual_first`` is vlt5-tiny's.
"""

import copy

import pytest
import torch

from workbench import methods
from workbench.models import LAYOUTS, ForwardContext, load_backbone
from workbench.models.testing import tiny_vlmodel

from .conftest import FEAT_DIM

N_VISUAL = 3


def _batch(model, n_visual=N_VISUAL, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, mask = model.encode_prompts(["vqa: what colour is the circle?", "caption:"])
    return {
        "visual_feats": torch.randn(2, n_visual, model.feat_dim, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "labels": model.encode_targets(["red", "a large red circle"]),
    }


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_a_hf_directory_is_wrapped_text_first_and_the_layout_is_saved(tiny_hf_dirs, family, tmp_path):
    model = load_backbone(tiny_hf_dirs[family], feat_dim=FEAT_DIM)
    assert model.layout == "text_first" and model.context.layout == "text_first"
    model.save_pretrained(tmp_path / "ck")
    again = load_backbone(tmp_path / "ck")
    assert again.layout == "text_first"
    with pytest.raises(ValueError, match="layout='visual_first' disagrees"):
        load_backbone(tmp_path / "ck", layout="visual_first")
    with pytest.raises(ValueError, match="layout must be one of"):
        load_backbone(tiny_hf_dirs[family], feat_dim=FEAT_DIM, layout="visual_last")


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_text_first_puts_the_text_block_first(family):
    model = tiny_vlmodel(family, feat_dim=FEAT_DIM, layout="text_first").eval()
    b = _batch(model)
    inputs = model.build_encoder_inputs(b["visual_feats"], b["input_ids"], b["attention_mask"])
    n_text = b["input_ids"].shape[1]
    assert (inputs.visual_start, inputs.n_visual) == (n_text, N_VISUAL)
    assert inputs.text_slice == slice(0, n_text) and inputs.visual_slice == slice(n_text, n_text + N_VISUAL)
    assert torch.equal(inputs.embeds[:, n_text:], model.projector(b["visual_feats"]))
    assert torch.equal(inputs.mask[:, :n_text], b["attention_mask"])


def test_t5_text_first_bias_covers_the_text_block_only():
    """The visual tokens carry no position: permuting them permutes their outputs (a sequence model
    with a bias over every token would not be equivariant), and the text block's bias is T5's."""
    model = tiny_vlmodel("t5", feat_dim=FEAT_DIM, layout="text_first").eval()
    b = _batch(model)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        enc, _ = model.encode(b["visual_feats"], b["input_ids"], b["attention_mask"])
        enc_p, _ = model.encode(b["visual_feats"][:, perm], b["input_ids"], b["attention_mask"])
    t = b["input_ids"].shape[1]
    out, out_p = enc.last_hidden_state, enc_p.last_hidden_state
    torch.testing.assert_close(out_p[:, t:], out[:, t:][:, perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_p[:, :t], out[:, :t], rtol=1e-5, atol=1e-5)
    # The visual_first model is not equivariant: its bias spans the visual tokens.
    vf = tiny_vlmodel("t5", feat_dim=FEAT_DIM, layout="visual_first").eval()
    with torch.no_grad():
        a = vf.encode(b["visual_feats"], b["input_ids"], b["attention_mask"])[0].last_hidden_state
        a_p = vf.encode(b["visual_feats"][:, perm], b["input_ids"], b["attention_mask"])[0].last_hidden_state
    assert not torch.allclose(a_p[:, :N_VISUAL], a[:, :N_VISUAL][:, perm], atol=1e-4)


def test_t5_text_first_bias_matches_the_official_construction():
    """VL-T5's JointEncoder: bias = zeros(S, S) with [:L, :L] = compute_bias(L, L)."""
    model = tiny_vlmodel("t5", feat_dim=FEAT_DIM, layout="text_first").eval()
    b = _batch(model)
    attn = model.lm.encoder.block[0].layer[0].SelfAttention
    seen = {}

    def keep_bias(module, args, kwargs, output):
        seen["bias"] = output[1]

    handle = attn.register_forward_hook(keep_bias, with_kwargs=True)
    try:
        with torch.no_grad():
            model.encode(b["visual_feats"], b["input_ids"], b["attention_mask"])
    finally:
        handle.remove()
    t = b["input_ids"].shape[1]
    s = t + N_VISUAL
    expected = torch.zeros(1, attn.n_heads, s, s)
    expected[:, :, :t, :t] = attn.compute_bias(t, t)
    torch.testing.assert_close(seen["bias"], expected)


def test_bart_text_first_positions_on_text_only():
    model = tiny_vlmodel("bart", feat_dim=FEAT_DIM, layout="text_first").eval()
    b = _batch(model)
    perm = torch.tensor([1, 2, 0])
    with torch.no_grad():
        out = model.encode(b["visual_feats"], b["input_ids"], b["attention_mask"])[0].last_hidden_state
        out_p = model.encode(b["visual_feats"][:, perm], b["input_ids"], b["attention_mask"])[0].last_hidden_state
    t = b["input_ids"].shape[1]
    torch.testing.assert_close(out_p[:, t:], out[:, t:][:, perm], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_step_and_generate_in_both_layouts(family, layout):
    model = tiny_vlmodel(family, feat_dim=FEAT_DIM, layout=layout)
    b = _batch(model)
    vmask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = model(**b, visual_mask=vmask)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.projector[0].weight.grad is not None
    model.eval()
    texts = model.generate_text(b["visual_feats"], b["input_ids"], b["attention_mask"], visual_mask=vmask,
                                max_new_tokens=3)
    assert len(texts) == 2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_padded_visual_slots_do_not_change_the_output(layout):
    """A store with fewer regions pads with zeros and masks them: the padding must be invisible."""
    model = tiny_vlmodel("t5", feat_dim=FEAT_DIM, layout=layout).eval()
    b = _batch(model)
    feats = b["visual_feats"][:1, :2]
    padded = torch.cat([feats, torch.zeros(1, 1, FEAT_DIM)], 1)
    ids, mask = b["input_ids"][:1], b["attention_mask"][:1]
    with torch.no_grad():
        short = model.generate(feats, ids, mask, max_new_tokens=4)
        long = model.generate(padded, ids, mask, visual_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=4)
    assert torch.equal(short, long)


# --- the forward context --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_context_holds_the_forward(layout):
    model = tiny_vlmodel("t5", feat_dim=FEAT_DIM, layout=layout)
    b = _batch(model)
    vmask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    model(**b, visual_mask=vmask)
    ctx = model.context
    assert isinstance(ctx, ForwardContext) and ctx.layout == layout
    assert torch.equal(ctx.visual_mask, vmask) and torch.equal(ctx.labels, b["labels"])
    assert torch.equal(ctx.encoder_mask[:, ctx.visual_positions], vmask)
    assert torch.equal(ctx.encoder_mask[:, ctx.text_positions], b["attention_mask"])
    s = ctx.encoder_mask.shape[1]
    assert ctx.encoder_output.shape == (2, s, model.d_model)
    assert ctx.decoder_output.shape[:2] == b["labels"].shape
    # The decoder had no explicit mask: its valid tokens are the labels that are not -100.
    assert torch.equal(ctx.token_mask("decoder", 2, b["labels"].shape[1]), b["labels"] != -100)
    assert ctx.token_mask("decoder", 2, 99) is None
    # encode() starts a new forward without labels.
    model.encode(b["visual_feats"], b["input_ids"], b["attention_mask"])
    assert ctx.labels is None and ctx.decoder_output is None


def test_input_modifiers_keep_the_layout_straight():
    """Prompt tuning inserts just before the text in both layouts; the context follows."""
    for layout in LAYOUTS:
        model = tiny_vlmodel("t5", feat_dim=FEAT_DIM, layout=layout)
        methods.apply(model, "prompt", length=4)
        b = _batch(model)
        inputs = model.build_encoder_inputs(b["visual_feats"], b["input_ids"], b["attention_mask"])
        n_text = b["input_ids"].shape[1]
        assert inputs.n_visual == N_VISUAL
        prompt = model.input_modifiers[0].prompt
        start = inputs.text_start
        torch.testing.assert_close(inputs.embeds[0, start:start + 4], prompt.to(inputs.embeds.dtype))
        assert inputs.text_slice.stop - inputs.text_slice.start == n_text + 4
        model(**b)
        assert model.context.visual_positions == inputs.visual_slice


@pytest.mark.parametrize("method", ["mixphm", "petal", "vlpet"])
def test_methods_that_read_the_context_train_in_text_first(method):
    opts = {"granularity": "small"} if method == "vlpet" else {}
    model = tiny_vlmodel("t5", feat_dim=FEAT_DIM, layout="text_first", d_model=32)
    handle = methods.apply(model, method, **({"reduction_factor": 4} if method == "mixphm" else {}), **opts)
    model.train()
    b = _batch(model)
    out = model(**b)
    extra = handle.extra_losses()
    loss = out.loss + sum(extra.values(), torch.zeros(()))
    loss.backward()
    assert torch.isfinite(loss)
    if method in ("mixphm", "petal"):
        assert extra, f"{method} added no auxiliary loss"


def test_a_deep_copy_gets_its_own_empty_context():
    model = tiny_vlmodel("t5", feat_dim=FEAT_DIM, layout="text_first")
    model(**_batch(model))  # the context now holds tensors with autograd history
    twin = copy.deepcopy(model)
    assert twin.context is not model.context and twin.context.inputs is None
    assert twin.context.layout == "text_first"
    twin(**_batch(twin))
    assert twin.context.inputs is not None
    assert model.context.inputs is not twin.context.inputs
