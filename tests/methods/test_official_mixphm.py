"""MixPHM against the official code, re-derived here in plain torch.

The official code is github.com/jingjing12110/MixPHM (VL-T5, ``src/vl_t5/``). The functions below
transcribe it, keeping its structure and names:

- ``losses/r2_loss.py``: ``off_diagonal``, ``R2Loss.forward`` (redundancy), ``MILoss.forward`` /
  ``create_masks`` / ``compute_mi`` (the JSD mutual-information loss);
- ``compacter/hypercomplex/kronecker.py`` + ``layers.py``: ``kronecker_product_einsum_batched``,
  ``matvec_product`` and ``PHMLinear.forward`` with ``factorized_phm`` (W = bmm(W_left, W_right));
- ``mixphm/phm_moe.py``: ``PHMAdapterMoE.forward`` (``is_r2loss=True`` returns ``(up, residual)``),
  ``PHMExpert.expert_soup`` / ``expert_soup_forward`` (``inference_level 3``);
- ``modeling_t5.py`` ``JointEncoder.forward`` and ``my_transformers/modeling_t5.py``
  ``T5Stack.forward``: per layer ``r2_loss_fun(ups, residuals, attention_mask.int())`` and
  ``r2_loss_fun.mi_loss(ups, hidden_states.mean(1), attention_mask.int())``, the encoder's input being
  [text; visual] with mask ``cat([text_mask, vis_mask])`` and the decoder's mask all ones (no
  ``decoder_attention_mask`` is passed by ``vqa_model.py``'s ``train_step``);
- ``modeling_t5.py`` ``VLT5.forward``: ``red_w * 0.5 * (mean_enc + mean_dec)`` and
  ``align_w * 0.5 * (mean_enc + mean_dec) * 0.2``.

What the tests take from the workbench model: the frozen FFN outputs f (a hook on the backbone's FFN,
registered before MixPHM), the stacks' final outputs, which expert each module drew, and the
weights (ported to the official parameter layout). Everything else is recomputed the official way:
the adapters' outputs, the token selection (on ``visual_first`` models the sequence is first put in
VL-T5's [text; visual] order), the losses and their weighting, the expert soup. Both layouts.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import get_activation

from workbench import methods
from workbench.models.testing import tiny_vlmodel

TOL = 1e-6  # the losses (scalars of order 0.01-1): absolute
D_MODEL = 48  # m = 48 // 12 = 4: the official reduction factor 12 with n = 4 divides
N_VISUAL = 8
FEAT_DIM = 16
LAYOUTS = ("visual_first", "text_first")
PROMPTS = ["vqa: what colour is the circle?", "caption:", "vqa: how many squares are there?"]
TARGETS = ["red", "a small blue square", "two"]


# ================================================================== the official code, transcribed
# losses/r2_loss.py
def off_diagonal(x):
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def r2_loss(up_x, res_x, mask=None, lam=3.9e-3):
    """``R2Loss.forward``."""
    scale_factor = 1.0 / up_x.shape[0]
    seq_len = torch.clamp(mask.sum(-1), min=1)
    up_x = torch.cat([up_x[i][:seq_len[i]] for i in range(len(seq_len))])
    res_x = torch.cat([res_x[i][:seq_len[i]] for i in range(len(seq_len))])
    up_x_self = F.normalize(up_x, dim=1)
    res_x_self = F.normalize(res_x, dim=1)
    c = up_x_self.T @ res_x_self
    off_diag = off_diagonal(c).pow_(2).sum().mul(scale_factor)
    return lam * off_diag


def create_masks(lens_a):
    pos_mask = torch.zeros((lens_a.sum(), len(lens_a))).to(lens_a.device)
    neg_mask = torch.ones((lens_a.sum(), len(lens_a))).to(lens_a.device)
    temp = 0
    for idx in range(len(lens_a)):
        for j in range(temp, lens_a[idx] + temp):
            pos_mask[j][idx] = 1.
            neg_mask[j][idx] = 0.
        temp += lens_a[idx]
    return pos_mask, neg_mask


def compute_mi(l_enc, g_enc, pos_mask, neg_mask, measure):
    res = torch.mm(l_enc, g_enc.t())
    num_nodes = pos_mask.size(0)
    num_graphs = pos_mask.size(1)
    entropy_pos = torch.sum(math.log(2.) - F.softplus(- res * pos_mask)) / num_nodes
    q_samples = res * neg_mask
    entropy_neg = torch.sum(F.softplus(-q_samples) + q_samples - math.log(2.)) / (num_nodes * (num_graphs - 1))
    return entropy_neg - entropy_pos


def mi_loss(seq_embed, ctx_embed, mask, measure="JSD"):
    """``MILoss.forward``."""
    seq_lens = torch.clamp(mask.sum(-1), min=1)
    tok_rep = [seq_embed[i][:seq_lens[i]] for i in range(len(seq_lens))]
    tok_rep = torch.cat(tok_rep, dim=0)
    pos_mask, neg_mask = create_masks(seq_lens)
    return compute_mi(tok_rep, ctx_embed, pos_mask, neg_mask, measure)


# compacter/hypercomplex/kronecker.py, layers.py
def kronecker_product_einsum_batched(A, B):
    assert A.dim() == 3 and B.dim() == 3
    res = torch.einsum("bac,bkp->bakcp", A, B).view(A.size(0), A.size(1) * B.size(1), A.size(2) * B.size(2))
    return res


def matvec_product(W, x, bias, phm_rule):
    H = kronecker_product_einsum_batched(phm_rule, W).sum(0)
    y = torch.matmul(input=x, other=H)
    if bias is not None:
        y += bias
    return y


def phm_linear(x, expert):
    """``PHMLinear.forward`` with ``factorized_phm=True``; ``expert``: its parameters by official name."""
    W = torch.bmm(expert["W_left"], expert["W_right"])
    return matvec_product(W=W, x=x, bias=expert["b"], phm_rule=expert["phm_rule"])


# mixphm/phm_moe.py
def expert_soup(experts):
    """``PHMExpert.expert_soup``: softmax(expert_score_weight = zeros) -> a weighted sum per tensor name."""
    weight = F.softmax(torch.zeros(len(experts)), dim=0)
    parameter_dict = {"phm_rule": 0, "W_left": 0, "W_right": 0, "b": 0}
    for idx, single_expert in enumerate(experts):
        for p_name, s_param in single_expert.items():
            parameter_dict[p_name] += weight[idx] * s_param
    return parameter_dict


def phm_expert_forward(x, experts, training, expert_idx):
    """``PHMExpert.forward`` without a gate: the drawn expert in training, the soup at level 3."""
    if training:
        return phm_linear(x, experts[expert_idx])
    return phm_linear(x, expert_soup(experts))  # expert_soup_forward: expert 0 with the averaged tensors


def phm_adapter_moe_forward(x, moa_a, moa_b, training, idx_a=0, idx_b=0):
    """``PHMAdapterMoE.forward(x, is_r2loss=True)`` with dropout 0 (the tests set it to 0), ada_alpha 1."""
    residual = x
    result = phm_expert_forward(x, moa_a, training, idx_a)
    result = get_activation("gelu_new")(result)  # Activations(config.non_linearity = "gelu_new")
    result = phm_expert_forward(result, moa_b, training, idx_b)
    result = 1.0 * result  # ada_alpha
    return result + residual, (result, residual)


# modeling_t5.py (JointEncoder / T5Stack / VLT5.forward)
def stack_losses(ups, residuals, hidden_states, attention_mask):
    """The loop after each stack's final layer norm: one R2 and one MI term per layer."""
    ada_red_loss, ada_align_loss = [], []
    for n_l in range(len(ups)):
        ada_red_loss.append(r2_loss(ups[n_l], residuals[n_l], attention_mask.int()))
        ada_align_loss.append(mi_loss(ups[n_l], hidden_states.mean(1), attention_mask.int(), measure="JSD"))
    return ada_red_loss, ada_align_loss


def vlt5_aux_losses(encoder, decoder, red_w=0.2, align_w=0.2):
    adapter_red_loss = red_w * 0.5 * (torch.stack(encoder[0]).mean() + torch.stack(decoder[0]).mean())
    adapter_align_loss = align_w * 0.5 * (torch.stack(encoder[1]).mean() + torch.stack(decoder[1]).mean()) * 0.2
    return adapter_red_loss, adapter_align_loss


# ================================================================== the workbench side
def port_experts(proj, rule):
    """The workbench PHMLinear's experts in the official parameter layout (W_left = S, W_right = T)."""
    return [{"phm_rule": rule, "W_left": proj.S[e], "W_right": proj.T[e], "b": proj.b[e]} for e in range(proj.experts)]


def to_vlt5_order(x, layout):
    """An encoder tensor [B, L, ...] of the model's layout in VL-T5's order [text; visual]."""
    if layout == "text_first":
        return x
    return torch.cat([x[:, N_VISUAL:], x[:, :N_VISUAL]], dim=1)


def make_model(layout, **overrides):
    model = tiny_vlmodel("t5", feat_dim=FEAT_DIM, layout=layout, d_model=D_MODEL, d_ff=2 * D_MODEL)
    ffn = {p.name: model.get_point_module(p.name) for p in model.insertion_points(kind="sublayer").values()
           if p.sublayer == "ffn"}
    f_out, h_out = {}, {}
    # Registered before MixPHM's hook, so this one sees f (the frozen FFN output); the second one,
    # registered after, sees the modified output f + Delta(f).
    for n, m in ffn.items():
        m.register_forward_hook(lambda mod, a, o, n=n: f_out.__setitem__(n, o))
    torch.manual_seed(0)  # MixPHM's init draws from the global RNG
    handle = methods.apply(model, "mixphm", **overrides)
    for n, m in ffn.items():
        m.register_forward_hook(lambda mod, a, o, n=n: h_out.__setitem__(n, o))
    perturb(handle)
    return model, handle, f_out, h_out


def perturb(handle, seed=0, scale=0.5, rule_std=0.3):
    """Make every expert differ (the official init starts them identical) and A large enough
    (official init: N(0, 0.01^2)) that u = Delta(f) and the MI scores u . g are of order 1, so that
    an absolute tolerance of 1e-6 is a strict comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in handle.trainable_parameters():
            if name == "peft_shared.phm_rule":
                p.copy_(rule_std * torch.randn(p.shape, generator=g))
            elif not name.startswith("projector."):
                p.add_(scale * p.abs().mean().clamp(min=1e-2) * torch.randn(p.shape, generator=g))


def make_batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, mask = model.encode_prompts(PROMPTS)
    return {"visual_feats": torch.randn(len(PROMPTS), N_VISUAL, FEAT_DIM, generator=g), "input_ids": ids,
            "attention_mask": mask, "labels": model.encode_targets(TARGETS)}


def training_forward(layout, **overrides):
    """One training forward; returns the workbench's losses and the official ones from the same run."""
    overrides = {"dropout": 0.0, **overrides}  # Delta's dropout off, so that u can be recomputed
    model, handle, f_out, h_out = make_model(layout, **overrides)
    batch = make_batch(model)
    text_mask = batch["attention_mask"]
    assert (text_mask == 0).any() and (batch["labels"] == -100).any()  # padding on both sides
    model.train()
    handle.reset_draw_counts()
    torch.manual_seed(0)
    out = model(**batch, output_hidden_states=True)
    losses = handle.extra_losses()
    draws = handle.draw_counts()
    rule = model.peft_shared["phm_rule"]

    b = text_mask.shape[0]
    stacks = {"encoder": ([], []), "decoder": ([], [])}
    for point, mod in handle.modules.items():
        assert int(draws[point].sum()) == 1
        k = int(draws[point].argmax())
        f = f_out[point]
        h_ref, (up, residual) = phm_adapter_moe_forward(f, port_experts(mod.down, rule), port_experts(mod.up, rule),
                                                        training=True, idx_a=0, idx_b=k)
        # The module's output in training: f + the drawn expert's Delta(f).
        assert_close_to_scale(h_out[point], h_ref)
        stack = point.split(".")[0]
        if stack == "encoder":
            up, residual = to_vlt5_order(up, layout), to_vlt5_order(residual, layout)
        stacks[stack][0].append(up)
        stacks[stack][1].append(residual)

    # JointEncoder: [text; visual], attention_mask = cat([text_mask, vis_attention_mask (ones)]).
    enc_hidden = to_vlt5_order(out.encoder_last_hidden_state, layout)
    enc_mask = torch.cat([text_mask, text_mask.new_ones(b, N_VISUAL)], dim=1)
    # T5Stack (decoder): attention_mask = ones(batch, seq) since train_step passes no decoder mask.
    dec_hidden = out.decoder_hidden_states[-1]
    dec_mask = torch.ones(b, dec_hidden.shape[1])
    encoder = stack_losses(*stacks["encoder"], enc_hidden, enc_mask)
    decoder = stack_losses(*stacks["decoder"], dec_hidden, dec_mask)
    red, align = vlt5_aux_losses(encoder, decoder)
    return losses, {"redundancy": red, "mi": align}, model, handle


def gap(a, b):
    return (a.detach() - b.detach()).abs().item()


def assert_close_to_scale(actual, expected):
    """max |actual - expected| <= TOL * max(1, max |expected|): activations (of order 1-10 here) are
    compared relative to the tensor's scale; the PHM weights are summed in another order than the
    official einsum, so float32 rounding differs elementwise."""
    scale = max(1.0, expected.detach().abs().max().item())
    assert gap_max(actual, expected) <= TOL * scale, (gap_max(actual, expected), scale)


def gap_max(a, b):
    return (a.detach() - b.detach()).abs().max().item()


# ================================================================== the tests
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_default_losses_are_the_official_ones(layout):
    losses, official, _, _ = training_forward(layout)
    assert set(losses) == {"redundancy", "mi"}
    for key in ("redundancy", "mi"):
        assert gap(losses[key], official[key]) <= TOL, (key, losses[key].item(), official[key].item())
    total = losses["redundancy"] + losses["mi"]
    assert gap(total, official["redundancy"] + official["mi"]) <= TOL
    assert losses["redundancy"] > 0


OLD_BEHAVIOUR = [
    ({"encoder_tokens": "masked"}, {"redundancy", "mi"}),
    ({"decoder_tokens": "masked"}, {"redundancy", "mi"}),
    ({"mi_pool": "masked"}, {"mi"}),
    ({"encoder_tokens": "masked", "decoder_tokens": "masked", "mi_pool": "masked"}, {"redundancy", "mi"}),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("options, changed", OLD_BEHAVIOUR, ids=lambda x: "+".join(x) if isinstance(x, dict) else None)
def test_the_masked_options_are_not_the_official_losses(layout, options, changed):
    """Negative control: with an old (masked) option the comparison above fails, by more than TOL;
    the term an option does not touch still matches."""
    losses, official, _, _ = training_forward(layout, **options)
    for key in ("redundancy", "mi"):
        if key in changed:
            assert gap(losses[key], official[key]) > TOL, (key, options)
        else:
            assert gap(losses[key], official[key]) <= TOL, (key, options)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_encoder_selection_is_the_vlt5_prefix(layout):
    """Per sample, the first ``mask.sum()`` tokens of [text; visual], mapped to the model's layout."""
    model, handle, _, _ = make_model(layout)
    batch = make_batch(model)
    model.train()
    model(**batch)
    text_mask = batch["attention_mask"]
    b, t = text_mask.shape
    sel = handle.selected_tokens("encoder", b, t + N_VISUAL)
    n_text = text_mask.sum(1)
    for i in range(b):
        k = int(n_text[i]) + N_VISUAL  # mask.sum(): valid text + every visual token
        vlt5 = torch.zeros(t + N_VISUAL, dtype=torch.bool)
        vlt5[:k] = True  # the official slice up[i][:seq_len[i]] on [text; visual]
        expected = torch.cat([vlt5[t:], vlt5[:t]]) if layout == "visual_first" else vlt5  # -> [visual; text]
        assert torch.equal(sel[i], expected), i
    # The short prompt takes text padding and leaves visual tokens out; the masked option does not.
    assert not torch.equal(sel, handle.stack_mask("encoder", b, t + N_VISUAL))


def test_the_decoder_selection():
    model, handle, _, _ = make_model("text_first")
    batch = make_batch(model)
    model.train()
    model(**batch)
    b, length = batch["labels"].shape
    assert handle.selected_tokens("decoder", b, length).all()  # every position, padding included
    # An explicit decoder mask is sliced as the official R2Loss slices its mask: a prefix of mask.sum().
    dec_mask = torch.zeros(b, length, dtype=torch.long)
    dec_mask[:, :2] = 1
    dec_mask[0, 4] = 1  # not a prefix: the official slice takes the first 3 positions
    model(**batch, decoder_attention_mask=dec_mask)
    sel = handle.selected_tokens("decoder", b, length)
    assert sel[0, :3].all() and not sel[0, 3:].any() and sel[1:, :2].all() and not sel[1:, 2:].any()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_expert_soup_is_the_official_one(layout):
    model, handle, f_out, h_out = make_model(layout)  # the defaults (Delta's dropout is off in eval)
    rule = model.peft_shared["phm_rule"]
    model.eval()
    with torch.no_grad():
        model(**make_batch(model))
        for point, mod in handle.modules.items():
            f = f_out[point]
            h_ref, (up, _) = phm_adapter_moe_forward(f, port_experts(mod.down, rule), port_experts(mod.up, rule),
                                                     training=False)
            assert_close_to_scale(h_out[point], h_ref)
            assert_close_to_scale(mod.delta(f), up)
            # Negative control: the experts differ, so no single expert is the soup.
            single = phm_adapter_moe_forward(f, port_experts(mod.down, rule), port_experts(mod.up, rule),
                                             training=True, idx_b=0)[1][0]
            assert gap_max(single, up) > TOL * max(1.0, up.abs().max().item())
    assert all(c.sum() == 0 for c in handle.draw_counts().values())  # eval draws nothing


def test_the_product_merge_is_not_the_official_soup():
    model, handle, f_out, _ = make_model("text_first", merge="product")
    rule = model.peft_shared["phm_rule"]
    model.eval()
    with torch.no_grad():
        model(**make_batch(model))
        mod = handle.modules["decoder.1.ffn"]
        f = f_out["decoder.1.ffn"]
        up = phm_adapter_moe_forward(f, port_experts(mod.down, rule), port_experts(mod.up, rule), training=False)[1][0]
        assert gap_max(mod.delta(f), up) > TOL * max(1.0, up.abs().max().item())


def test_a_batch_of_one_is_a_documented_departure():
    """The official MILoss divides its negative term by N * (B - 1): with B = 1 it is 0 / 0. The
    workbench has no negatives then and the term is 0 (the redundancy term is the official one)."""
    model, handle, f_out, _ = make_model("text_first", dropout=0.0)
    batch = {k: v[:1] for k, v in make_batch(model).items()}
    model.train()
    handle.reset_draw_counts()
    out = model(**batch)
    losses = handle.extra_losses()
    assert all(torch.isfinite(v) for v in losses.values())
    point = "encoder.0.ffn"
    mod, rule = handle.modules[point], model.peft_shared["phm_rule"]
    k = int(handle.draw_counts()[point].argmax())
    _, (up, _) = phm_adapter_moe_forward(f_out[point], port_experts(mod.down, rule), port_experts(mod.up, rule),
                                         training=True, idx_b=k)
    mask = torch.cat([batch["attention_mask"], torch.ones(1, N_VISUAL, dtype=torch.long)], dim=1)
    assert not torch.isfinite(mi_loss(up, out.encoder_last_hidden_state.mean(1), mask))


def test_the_trainable_set_is_the_official_one(tmp_path):
    """Official train.py: only parameters named ``phm_adapter_moe`` / ``phm_rule`` train (the visual
    embedding stays frozen). On a backbone with a pre-trained projector (loaded from a checkpoint) the
    workbench trains exactly the MixPHM modules and the shared A."""
    from workbench.models import load_backbone

    tiny_vlmodel("t5", feat_dim=FEAT_DIM, d_model=D_MODEL, d_ff=2 * D_MODEL).save_pretrained(tmp_path / "ck")
    model = load_backbone(tmp_path / "ck")
    assert not model.projector_fresh
    handle = methods.apply(model, "mixphm")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if methods.is_method_parameter(model, n)}
    assert "peft_shared.phm_rule" in trainable and not any(n.startswith("projector.") for n in trainable)
    assert handle.projector_note.startswith("frozen (the official setting")
    counts = methods.count_parameters(model)
    assert counts["projector"] == 0 and counts["backbone"] == 0 and counts["trainable"] == counts["method"]
    # train_projector=True trains it anyway.
    model = load_backbone(tmp_path / "ck")
    methods.apply(model, "mixphm", train_projector=True)
    assert all(p.requires_grad for p in model.projector.parameters())
