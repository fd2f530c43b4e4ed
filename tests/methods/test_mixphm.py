"""MixPHM: the parameter count, PHM experts and sharing, random routing, the expert soup, the losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from workbench import methods

from .conftest import perturb_trainable

N_VISUAL = 4  # conftest.N_VISUAL (the tiny batches' visual tokens)


_perturb = perturb_trainable


# ------------------------------------------------------------------------------------- the count
def test_t5_base_parameter_count_is_874048(meta_backbone):
    model = meta_backbone("t5")
    handle = methods.apply(model, "mixphm")
    assert len(handle.modules) == 24  # one per FFN: 12 encoder + 12 decoder layers, none on attention
    assert set(handle.modules) == {f"{s}.{i}.ffn" for s in ("encoder", "decoder") for i in range(12)}
    for mod in handle.modules.values():
        down = sum(p.numel() for p in mod.down.parameters())
        up = sum(p.numel() for p in mod.up.parameters())
        assert (down, up) == (6_720, 4 * 7_424)  # Down shared by the experts, Up has 4 experts
        assert down + up == 36_416
    assert model.peft_shared["phm_rule"].numel() == 64  # one A (4 x 4 x 4) for everything
    method_params = {n: p for n, p in model.named_parameters() if "peft_" in n}
    assert sum(p.numel() for p in method_params.values()) == 874_048
    assert methods.count_parameters(model)["method"] == 874_048
    # The meta backbone wraps the LM with a *fresh* projector, which always trains (base.apply), even
    # though MixPHM's official setting keeps a pre-trained one frozen (next test).
    assert model.projector_fresh
    assert methods.count_parameters(model)["projector"] == 2048 * 768 + 768 + 2 * 768


def test_t5_base_trains_only_the_method_with_a_pretrained_projector(meta_backbone):
    """The official train.py trains only ``phm_adapter_moe`` / ``phm_rule`` parameters: with a
    pre-trained projector (``projector_fresh = False``, as ``load_backbone`` of a saved checkpoint sets
    it) exactly the 874,048 method parameters train."""
    assert type(methods.get_config("mixphm")).OFFICIAL_TRAIN_PROJECTOR is False
    model = meta_backbone("t5")
    model.projector_fresh = False
    handle = methods.apply(model, "mixphm")
    counts = methods.count_parameters(model)
    assert (counts["method"], counts["projector"], counts["backbone"]) == (874_048, 0, 0)
    assert counts["trainable"] == 874_048
    assert sum(p.numel() for _, p in handle.trainable_parameters()) == 874_048
    assert "frozen" in handle.projector_note
    # train_projector=True trains it on top.
    model = meta_backbone("t5")
    model.projector_fresh = False
    methods.apply(model, "mixphm", train_projector=True)
    counts = methods.count_parameters(model)
    assert (counts["method"], counts["projector"]) == (874_048, 2048 * 768 + 768 + 2 * 768)


def test_the_defaults_are_the_official_settings():
    cfg = methods.get_config("mixphm")
    assert (cfg.encoder_tokens, cfg.decoder_tokens, cfg.mi_pool) == ("official", "official", "all")
    assert (cfg.w_red, cfg.w_mi, cfg.red_lambda, cfg.merge) == (0.2, 0.2, 3.9e-3, "official")
    assert cfg.lr == 1e-2  # tuned on vlt5-tiny; the official recipe's 5e-3 (T5-base) is in docs/methods.md
    assert cfg.train_projector is None  # follows OFFICIAL_TRAIN_PROJECTOR (False)


def test_bart_base_count(meta_backbone):
    model = meta_backbone("bart")
    methods.apply(model, "mixphm")
    assert methods.count_parameters(model)["method"] == 12 * 36_416 + 64


def test_global_and_local_sharing(tiny_model):
    model = tiny_model("t5")
    handle = methods.apply(model, "mixphm")
    rule = model.peft_shared["phm_rule"]
    for mod in handle.modules.values():
        assert mod.down.rule is rule and mod.up.rule is rule  # global: every layer, both projections
        assert mod.down.experts == 1 and mod.up.experts == 4  # local: Down shared, Up has N_e = 4
    # A is stored once in the model; no layer registers it.
    assert [n for n, p in model.named_parameters() if p is rule] == ["peft_shared.phm_rule"]
    assert sum("phm_rule" in k for k in model.state_dict()) == 1
    # The other sharing options.
    up_shared = methods.apply(tiny_model("t5"), "mixphm", shared_side="up")
    assert all(m.down.experts == 4 and m.up.experts == 1 for m in up_shared.modules.values())
    none_shared = methods.apply(tiny_model("t5"), "mixphm", shared_side="none", num_experts=3)
    assert all(m.down.experts == 3 and m.up.experts == 3 for m in none_shared.modules.values())


def test_official_init(tiny_model):
    model = tiny_model("t5")
    torch.manual_seed(0)
    handle = methods.apply(model, "mixphm")
    rule = model.peft_shared["phm_rule"]
    assert 0.004 < rule.std().item() < 0.02  # A ~ N(0, 0.01^2) (64 samples)
    mod = handle.modules["encoder.0.ffn"]
    # The official code deep-copies one expert: all experts start identical; biases start at zero.
    for e in range(1, 4):
        assert torch.equal(mod.up.S[e], mod.up.S[0]) and torch.equal(mod.up.T[e], mod.up.T[0])
    assert not mod.up.b.any() and not mod.down.b.any()
    # Glorot-uniform with gain sqrt(2) on each slice S_i [in/n, r]: bound sqrt(2) * sqrt(6 / (in/n + r)).
    bound = math.sqrt(2) * math.sqrt(6 / (24 + 8))
    assert mod.down.S.abs().max() <= bound and mod.down.S.abs().max() > 0.8 * bound
    independent = methods.apply(tiny_model("t5"), "mixphm", expert_init="independent").modules["encoder.0.ffn"]
    assert not torch.equal(independent.up.S[1], independent.up.S[0])


# ------------------------------------------------------------------------------------- routing
def test_random_routing_is_uniform_over_many_calls(tiny_model):
    handle = methods.apply(tiny_model("t5"), "mixphm")
    mod = handle.modules["encoder.0.ffn"].train()
    f = torch.randn(2, 3, 96)
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(2000):
            mod(f, f)
    counts = handle.draw_counts()["encoder.0.ffn"]
    assert counts.sum() == 2000 and counts.shape == (4,)
    # Each expert p = 1/4: mean 500, sd ~19; a chi-square test at 3 dof, p > 0.001.
    chi2 = (((counts.float() - 500) ** 2) / 500).sum().item()
    assert chi2 < 16.27, counts
    assert handle.modules["encoder.0.ffn"].down_draws.sum() == 0  # the shared Down is not routed


def _draw_sequence(mod, seed, calls=40):
    torch.manual_seed(seed)
    seq = []
    with torch.no_grad():
        for _ in range(calls):
            before = mod.up_draws.clone()
            mod(torch.zeros(1, 2, 96), torch.zeros(1, 2, 96))
            seq.append(int((mod.up_draws - before).argmax()))
    return seq


def test_routing_is_deterministic_for_a_seed(tiny_model):
    mod = methods.apply(tiny_model("t5"), "mixphm").modules["decoder.1.ffn"].train()
    a, b, c = _draw_sequence(mod, 7), _draw_sequence(mod, 7), _draw_sequence(mod, 8)
    assert a == b and a != c
    assert set(a) == {0, 1, 2, 3}


def test_one_expert_per_forward_for_the_whole_batch(tiny_model, tiny_batch):
    model = tiny_model("bart")
    handle = methods.apply(model, "mixphm", dropout=0.0)
    _perturb(handle)
    mod = handle.modules["encoder.1.ffn"].train()
    f = torch.randn(3, 5, 96)
    with torch.no_grad():
        before = mod.up_draws.clone()
        out = mod(f, f)
        k = int((mod.up_draws - before).argmax())
        expected = f + mod.up(mod.act(mod.down(f, 0)), k)
    torch.testing.assert_close(out, expected)
    # In the model: one training forward draws exactly once in every module; eval never draws.
    model.train()
    handle.reset_draw_counts()
    model(**tiny_batch(model))
    assert all(c.sum() == 1 for c in handle.draw_counts().values())
    model.eval()
    with torch.no_grad():
        model(**tiny_batch(model))
    assert all(c.sum() == 1 for c in handle.draw_counts().values())


# ------------------------------------------------------------------------------------- the soup
def test_official_and_product_merges_differ(tiny_model, tiny_batch):
    model = tiny_model("t5")
    batch = tiny_batch(model)
    handle = methods.apply(model, "mixphm")
    mod = handle.modules["encoder.0.ffn"]
    # Identical experts (the official init): both merges are the same expert.
    w_off, _ = mod.up.merged("official")
    w_prod, _ = mod.up.merged("product")
    torch.testing.assert_close(w_off, w_prod)
    _perturb(handle)
    w_off, b_off = mod.up.merged("official")
    w_prod, b_prod = mod.up.merged("product")
    assert not torch.allclose(w_off, w_prod, atol=1e-6)  # mean(S) mean(T) != mean(S T)
    torch.testing.assert_close(b_off, b_prod)  # a bias is averaged the same way by both
    # The product average is the mean of the experts' linear maps; the official one is not.
    z = torch.randn(4, 8)
    experts_mean = torch.stack([mod.up(z, e) for e in range(4)]).mean(0)
    torch.testing.assert_close(z @ w_prod + b_prod, experts_mean, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(z @ w_off + b_off, experts_mean, atol=1e-4)
    # And so do the eval outputs of two models with the same weights and different merges.
    other = tiny_model("t5")
    methods.apply(other, "mixphm", merge="product").load_state_dict(handle.state_dict())
    model.eval(), other.eval()
    with torch.no_grad():
        a, b = model(**batch).logits, other(**batch).logits
    assert (a - b).abs().max() > 1e-5


def test_eval_uses_the_merged_expert(tiny_model):
    handle = methods.apply(tiny_model("t5"), "mixphm")
    _perturb(handle)
    mod = handle.modules["decoder.0.ffn"].eval()
    f = torch.randn(2, 5, 96)
    with torch.no_grad():
        out = mod(f, f)
        wd, bd = mod.down.merged("official")
        wu, bu = mod.up.merged("official")
        expected = f + mod.act(f @ wd + bd) @ wu + bu
        torch.testing.assert_close(out, expected)
        singles = [f + mod.up(mod.act(mod.down(f, 0)), e) for e in range(4)]
    assert all((out - s).abs().max() > 1e-5 for s in singles)
    assert all(c.sum() == 0 for c in handle.draw_counts().values())  # eval draws nothing


def test_inference_routes(tiny_model):
    handle = methods.apply(tiny_model("t5"), "mixphm")
    _perturb(handle)
    mod = handle.modules["decoder.0.ffn"].eval()
    f = torch.randn(2, 5, 96)
    with torch.no_grad():
        singles = [f + mod.up(mod.act(mod.down(f, 0)), e) for e in range(4)]
        handle.inference(2)
        torch.testing.assert_close(mod(f, f), singles[2])
        handle.inference("outputs")
        outs = mod(f, f)
        torch.testing.assert_close(outs, torch.stack(singles).mean(0))
        # a shared Down and a linear Up: the outputs' average is the product soup
        wd, bd = mod.down.merged("product")
        wu, bu = mod.up.merged("product")
        torch.testing.assert_close(outs, f + mod.act(f @ wd + bd) @ wu + bu, rtol=1e-4, atol=1e-5)
        handle.inference("soup")
        assert (mod(f, f) - outs).abs().max() > 1e-5  # the official soup is neither
    mod.train()
    assert mod.eval_route == "soup"
    for bad in ("mean", 4, -1, True):
        with pytest.raises(ValueError, match="inference route|expert index"):
            handle.inference(bad)


def test_soup_is_computed_once_and_follows_weight_changes(tiny_model, tiny_batch):
    model = tiny_model("t5")
    batch = tiny_batch(model)
    handle = methods.apply(model, "mixphm")
    _perturb(handle)
    model.eval()
    handle.merge()  # precompute
    mod = handle.modules["encoder.0.ffn"]
    cached = mod._soup
    assert cached is not None
    with torch.no_grad():
        first = model(**batch).logits
        assert mod._soup is cached  # reused, not recomputed
        mod.up.S.add_(0.5)  # what an optimizer step does
        second = model(**batch).logits
    assert mod._soup is not cached
    assert (first - second).abs().max() > 1e-6
    with torch.no_grad():
        mod.up.S.sub_(0.5)
        torch.testing.assert_close(model(**batch).logits, first)
    # With gradients enabled, the soup is differentiable (no stale cache).
    out = model(**batch).logits.sum()
    out.backward()
    assert mod.up.S.grad is not None


@pytest.mark.parametrize("edit", ["normal_", "data.normal_", "load_state_dict"])
def test_eval_is_deterministic_after_random_weights(edit, tiny_model, tiny_batch):
    """Regression: weights randomised after apply (and after a cached eval forward) must give one
    answer in eval, with or without grad, and it must be the soup of the *new* weights. Edits
    through ``p.data`` do not bump ``_version``; the soup was stale until the next train()."""
    model = tiny_model("t5")
    batch = tiny_batch(model)
    handle = methods.apply(model, "mixphm")
    model.eval()
    with torch.no_grad():
        model(**batch)  # caches the soup of the initial weights
    params = [p for n, p in handle.trainable_parameters() if not n.startswith("projector.")]
    assert any(p is model.peft_shared["phm_rule"] for p in params)
    torch.manual_seed(7)
    with torch.no_grad():
        if edit == "load_state_dict":
            handle.load_state_dict({k: torch.randn_like(v) for k, v in handle.state_dict().items()})
        for p in params if edit != "load_state_dict" else ():
            (p.data if edit == "data.normal_" else p).normal_(std=0.3)
    model.eval()
    with torch.no_grad():
        first = model(**batch).logits
        second = model(**batch).logits
    with_grad = model(**batch).logits.detach()  # the differentiable soup, computed from the weights
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(with_grad, first, rtol=1e-5, atol=1e-5)
    # And the soup is the merge of the new weights.
    mod = handle.modules["decoder.1.ffn"]
    for cached, fresh in zip(mod.soup(), (*mod.down.merged(), *mod.up.merged())):
        torch.testing.assert_close(cached, fresh, rtol=0, atol=0)
    # handle.merge() always recomputes, also after a .data edit made in eval mode.
    with torch.no_grad():
        mod.up.S.data.mul_(2.0)
    handle.merge()
    torch.testing.assert_close(mod.soup()[2], mod.up.merged()[0], rtol=0, atol=0)


# ------------------------------------------------------------------------------------- the losses
def _official_redundancy(up, res, mask, lam=3.9e-3):
    """Transcribed from the official ``R2Loss.forward`` (valid tokens = a prefix of each row)."""
    scale_factor = 1.0 / up.shape[0]
    seq_len = torch.clamp(mask.sum(-1), min=1)
    up = torch.cat([up[i][: seq_len[i]] for i in range(len(seq_len))])
    res = torch.cat([res[i][: seq_len[i]] for i in range(len(seq_len))])
    c = F.normalize(up, dim=1).T @ F.normalize(res, dim=1)
    n = c.shape[0]
    off = c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()
    return lam * off.pow(2).sum() * scale_factor


def _official_mi(seq, ctx, mask):
    """Transcribed from the official ``MILoss`` with ``measure='JSD'``."""
    seq_lens = torch.clamp(mask.sum(-1), min=1)
    tok = torch.cat([seq[i][: seq_lens[i]] for i in range(len(seq_lens))])
    pos_mask = torch.zeros(int(seq_lens.sum()), len(seq_lens))
    neg_mask = torch.ones(int(seq_lens.sum()), len(seq_lens))
    t = 0
    for idx in range(len(seq_lens)):
        for j in range(t, int(seq_lens[idx]) + t):
            pos_mask[j][idx], neg_mask[j][idx] = 1.0, 0.0
        t += int(seq_lens[idx])
    res = tok @ ctx.T
    num_nodes, num_graphs = pos_mask.shape
    e_pos = torch.sum(math.log(2.0) - F.softplus(-res * pos_mask)) / num_nodes
    q = res * neg_mask
    e_neg = torch.sum(F.softplus(-q) + q - math.log(2.0)) / (num_nodes * (num_graphs - 1))
    return e_neg - e_pos


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("mi_pool", ["masked", "all"])
def test_masked_losses_match_a_direct_computation(family, mi_pool, tiny_model, tiny_batch):
    """The ``"masked"`` token selection (the workbench's earlier default, now an option): the losses
    over the tokens of the stacks' masks (encoder attention mask; decoder ``labels != -100``).

    This test used to run with the defaults; the defaults are now the official selection (the first
    ``mask.sum()`` encoder tokens in VL-T5's [text; visual] order, every decoder position), checked
    against the official code in ``test_official_mixphm.py``. Here the official formulas are applied
    to the masked token sets: on this visual_first model [visual; text] with right-padded text, the
    prefix of ``mask.sum()`` positions *is* the set of masked positions, so the transcribed prefix
    slicing below selects exactly the masked tokens.
    """
    model = tiny_model(family)
    batch = tiny_batch(model, n=3)
    assert (batch["attention_mask"] == 0).any()  # there is padding to exclude
    assert model.layout == "visual_first"
    ffn = {p.name: model.get_point_module(p.name) for p in model.insertion_points(kind="sublayer").values()
           if p.sublayer == "ffn"}
    f_out, h_out = {}, {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: f_out.__setitem__(n, o)) for n, m in ffn.items()]
    handle = methods.apply(model, "mixphm", mi_pool=mi_pool, encoder_tokens="masked",
                           decoder_tokens="masked")  # its hook runs after ours: we see f
    hooks += [m.register_forward_hook(lambda mod, a, o, n=n: h_out.__setitem__(n, o)) for n, m in ffn.items()]
    _perturb(handle)
    model.train()
    torch.manual_seed(0)
    out = model(**batch, output_hidden_states=True)
    losses = handle.extra_losses()
    for h in hooks:
        h.remove()

    b = batch["labels"].shape[0]
    masks = {
        "encoder": torch.cat([torch.ones(b, N_VISUAL, dtype=torch.long), batch["attention_mask"]], dim=1),
        "decoder": (batch["labels"] != -100).long(),
    }
    finals = {"encoder": out.encoder_last_hidden_state, "decoder": out.decoder_hidden_states[-1]}
    red, mi = {"encoder": [], "decoder": []}, {"encoder": [], "decoder": []}
    for name in ffn:
        stack = name.split(".")[0]
        f, u = f_out[name], h_out[name] - f_out[name]
        mask, final = masks[stack], finals[stack]
        red[stack].append(_official_redundancy(u, f, mask))
        if mi_pool == "masked":
            w = mask.unsqueeze(-1).float()
            g = (final * w).sum(1) / w.sum(1)
        else:
            g = final.mean(1)  # the official pooling (padding included)
        mi[stack].append(_official_mi(u, g, mask))
    mean = lambda xs: torch.stack(xs).mean()  # noqa: E731
    expected_red = 0.2 * 0.5 * (mean(red["encoder"]) + mean(red["decoder"]))
    expected_mi = 0.2 * 0.2 * 0.5 * (mean(mi["encoder"]) + mean(mi["decoder"]))
    assert set(losses) == {"redundancy", "mi"}
    torch.testing.assert_close(losses["redundancy"], expected_red, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(losses["mi"], expected_mi, rtol=1e-4, atol=1e-7)
    assert losses["redundancy"] > 0
    # Both losses train the method (and the shared A).
    (out.loss + losses["redundancy"] + losses["mi"]).backward()
    assert model.peft_shared["phm_rule"].grad is not None


def test_loss_weights_and_modes(tiny_model, tiny_batch):
    model = tiny_model("t5")
    batch = tiny_batch(model)
    handle = methods.apply(model, "mixphm", w_red=0.0)
    assert handle.extra_losses() == {}  # nothing recorded yet
    model.train()
    model(**batch)
    assert set(handle.extra_losses()) == {"mi"}  # weight 0 turns the term off
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert handle.extra_losses() == {}  # the losses exist in training only, as in the official code

    off = tiny_model("t5")
    h_off = methods.apply(off, "mixphm", w_red=0.0, w_mi=0.0)
    off.train()
    off(**batch)
    assert h_off.extra_losses() == {}
    assert all(m.last is None for m in h_off.modules.values())  # nothing kept in memory


def test_training_is_reproducible_for_a_seed(tiny_model, tiny_batch):
    results = []
    for _ in range(2):
        model = tiny_model("bart")
        torch.manual_seed(3)
        handle = methods.apply(model, "mixphm")
        model.train()
        out = model(**tiny_batch(model))
        losses = handle.extra_losses()
        results.append((out.loss.item(), {k: v.item() for k, v in losses.items()},
                        {k: v.tolist() for k, v in handle.draw_counts().items()}))
    assert results[0] == results[1]


def test_a_deep_copy_records_its_own_forward(tiny_model, tiny_batch):
    import copy

    model = tiny_model("t5")
    batch = tiny_batch(model)
    handle = methods.apply(model, "mixphm")
    twin = copy.deepcopy(model)
    twin_handle = methods.handle_of(twin)
    assert twin_handle.model is twin and twin.context is not model.context
    losses = []
    for m, h in ((model, handle), (twin, twin_handle)):
        m.train()
        torch.manual_seed(5)
        m(**batch)
        losses.append({k: v.item() for k, v in h.extra_losses().items()})
    assert losses[0] == losses[1] and set(losses[0]) == {"redundancy", "mi"}


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides, match", [
    ({"bottleneck": 6}, "divisible"),  # bottleneck not a multiple of n = 4
    ({"n": 5}, "divisible"),  # d = 96 is not a multiple of 5
    ({"reduction_factor": 200}, "bottleneck"),
])
def test_impossible_shapes_raise_before_any_change(tiny_model, overrides, match):
    model = tiny_model("t5")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        methods.apply(model, "mixphm", **overrides)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not model.modifications() and not hasattr(model, "peft_shared")
    methods.apply(model, "mixphm")  # the model is still clean


@pytest.mark.parametrize("overrides", [{"rank": 0}, {"num_experts": 0}, {"merge": "mean"}, {"shared_side": "both"},
                                       {"w_red": -1.0}, {"mi_pool": "max"}, {"activation": "nope"},
                                       {"encoder_tokens": "all"}, {"decoder_tokens": "labels"}])
def test_invalid_options(overrides):
    with pytest.raises(ValueError):
        methods.get_config("mixphm", **overrides)
