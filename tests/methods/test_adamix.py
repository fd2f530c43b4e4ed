"""AdaMix: the parameter count, placement and sharing, the official init, random routing, the expert
soup at eval, the consistency regularisation, and a few training steps through the trainer.

The official formulas themselves are re-derived in plain torch in ``test_official_adamix.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from workbench import methods
from workbench.methods.adamix import AdaMixHandle

from .conftest import perturb_trainable

D, M = 768, 64  # T5-base width, the bottleneck (MixPHM's --adapter_size 64 = 768 // 12)
DOWN, UP = D * M + M, M * D + D  # one nn.Linear each, with bias: 49,216 and 49,920


_perturb = perturb_trainable


# ------------------------------------------------------------------------------------- the count
def test_t5_base_parameter_count_is_5922816(meta_backbone):
    model = meta_backbone("t5")
    handle = methods.apply(model, "adamix")
    assert set(handle.modules) == {f"{s}.{i}.ffn" for s in ("encoder", "decoder") for i in range(12)}
    for mod in handle.modules.values():
        assert (mod.down.num_experts, mod.up.num_experts) == (4, 1)  # Down has 4 experts, Up is shared
        down = sum(p.numel() for p in mod.down.parameters())
        up = sum(p.numel() for p in mod.up.parameters())
        assert (down, up) == (4 * 49_216, 49_920) == (4 * DOWN, UP)
        assert down + up == 246_784
    counts = methods.count_parameters(model)
    assert counts["method"] == 24 * 246_784 == 5_922_816
    assert counts["backbone"] == 0
    assert counts["backbone_total"] == 222_903_552
    # The official code keeps the visual embedding frozen; a fresh projector (as here) trains anyway.
    assert counts["projector"] == 2048 * D + D + 2 * D
    assert "freshly initialised" in handle.projector_note


@pytest.mark.parametrize("shared_side, per_module", [
    ("down", DOWN + 4 * UP),  # MixPHM's own sharing: 248,896
    ("none", 4 * (DOWN + UP)),  # no sharing (MixPHM's param.py default, AdaMix's "w/o sharing"): 396,544
])
def test_t5_base_counts_of_the_other_sharings(shared_side, per_module, meta_backbone):
    model = meta_backbone("t5")
    methods.apply(model, "adamix", shared_side=shared_side)
    assert methods.count_parameters(model)["method"] == 24 * per_module


def test_bart_base_count(meta_backbone):
    model = meta_backbone("bart")
    methods.apply(model, "adamix")
    assert methods.count_parameters(model)["method"] == 12 * 246_784 == 2_961_408


def test_analytic_count_on_a_small_model(tiny_model):
    """The same formula on real (non-meta) tensors: d = 96, m = 8, 2 + 2 FFNs."""
    model = tiny_model("t5")
    methods.apply(model, "adamix")
    d, m = 96, 96 // 12
    assert methods.count_parameters(model)["method"] == 4 * (4 * (d * m + m) + (m * d + d))


# ------------------------------------------------------------------------------------- placement
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_placement_and_shapes(family, tiny_model, tiny_batch):
    model = tiny_model(family)
    batch = tiny_batch(model)
    handle = methods.apply(model, "adamix")
    assert set(handle.modules) == {f"{s}.{i}.ffn" for s in ("encoder", "decoder") for i in range(2)}
    with_cross = methods.apply(tiny_model(family), "adamix", sublayers=("ffn", "cross_attn"))
    assert {p for p in with_cross.modules if "cross_attn" in p} == {"decoder.0.cross_attn", "decoder.1.cross_attn"}
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[:2] == batch["labels"].shape and torch.isfinite(out.logits).all()
    mod = handle.modules["encoder.0.ffn"]
    h = torch.randn(3, 5, 96)
    assert mod(h, h).shape == h.shape


# ------------------------------------------------------------------------------------- init
def test_official_init(tiny_model, tiny_batch):
    model = tiny_model("t5")
    batch = tiny_batch(model)
    with torch.no_grad():
        reference = model(**batch).logits
    handle = methods.apply(model, "adamix")
    mod = handle.modules["encoder.0.ffn"]
    # MixtureSoup deep-copies one nn.Linear: the experts start identical; torch's default init (not zero).
    for e in range(1, 4):
        assert torch.equal(mod.down.experts[e].weight, mod.down.experts[0].weight)
        assert torch.equal(mod.down.experts[e].bias, mod.down.experts[0].bias)
    bound_up = 1 / math.sqrt(8)  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = m = 8
    up = mod.up.experts[0]
    assert 0.5 * bound_up < up.weight.abs().max() <= bound_up and up.bias.abs().max() <= bound_up
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, reference)  # the official AdaMix changes step 0

    independent = methods.apply(tiny_model("t5"), "adamix", expert_init="independent").modules["encoder.0.ffn"]
    assert not torch.equal(independent.down.experts[1].weight, independent.down.experts[0].weight)

    zero = tiny_model("t5")
    zero_handle = methods.apply(zero, "adamix", zero_init_up=True)
    assert not zero_handle.modules["encoder.0.ffn"].up.experts[0].weight.any()
    zero.eval()
    with torch.no_grad():
        torch.testing.assert_close(zero(**batch).logits, reference, rtol=0, atol=0)


# ------------------------------------------------------------------------------------- routing
def test_routing_draws_follow_the_global_generator(tiny_model):
    """Each call draws Down's expert then Up's (the shared Up draws too: always 0), with
    torch.randint(0, n, (1,)) -- the official stream of the global generator."""
    handle = methods.apply(tiny_model("t5"), "adamix")
    _perturb(handle)
    mod = handle.modules["encoder.1.ffn"].train()
    h = torch.randn(2, 3, 96)
    for seed in range(5):
        torch.manual_seed(seed)
        k_down = torch.randint(low=0, high=4, size=(1,)).item()
        k_up = torch.randint(low=0, high=1, size=(1,)).item()
        after = torch.rand(1)  # the generator's next number after the two draws
        with torch.no_grad():
            expected = h + mod.up.experts[k_up](F.gelu(mod.down.experts[k_down](h)))
            torch.manual_seed(seed)
            got = mod(h, h)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert torch.equal(torch.rand(1), after)


def test_random_routing_is_uniform_and_counted(tiny_model):
    handle = methods.apply(tiny_model("t5"), "adamix")
    mod = handle.modules["encoder.0.ffn"].train()
    h = torch.randn(2, 3, 96)
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(2000):
            mod(h, h)
    counts = handle.draw_counts()["encoder.0.ffn"]
    assert counts.shape == (4,) and counts.sum() == 2000
    chi2 = (((counts.float() - 500) ** 2) / 500).sum().item()  # 3 dof, p > 0.001
    assert chi2 < 16.27, counts
    assert mod.up.draws.tolist() == [2000]  # the shared Up is "drawn" too, always expert 0
    handle.reset_draw_counts()
    assert all(c.sum() == 0 for c in handle.draw_counts().values())


def test_draw_count_keys_when_both_sides_have_experts(tiny_model):
    handle = methods.apply(tiny_model("t5"), "adamix", shared_side="none", num_experts=3)
    assert set(handle.draw_counts()) == {f"{p}.{s}" for p in handle.modules for s in ("down", "up")}
    assert all(c.shape == (3,) for c in handle.draw_counts().values())


def test_routing_is_deterministic_for_a_seed_and_per_batch(tiny_model, tiny_batch):
    model = tiny_model("bart")
    batch = tiny_batch(model, n=3)
    handle = methods.apply(model, "adamix")
    _perturb(handle)
    model.train()

    def draws(seed):
        handle.reset_draw_counts()
        torch.manual_seed(seed)
        seq = []
        with torch.no_grad():
            for _ in range(12):
                before = {k: v.clone() for k, v in handle.draw_counts().items()}
                model(**batch)
                now = handle.draw_counts()
                assert all((now[k] - before[k]).sum() == 1 for k in now)  # one draw per forward per module
                seq.append(tuple(int((now[k] - before[k]).argmax()) for k in sorted(now)))
        return seq

    a, b, c = draws(3), draws(3), draws(4)
    assert a == b and a != c
    # eval never draws
    model.eval()
    handle.reset_draw_counts()
    with torch.no_grad():
        model(**batch)
    assert all(v.sum() == 0 for v in handle.draw_counts().values())


# ------------------------------------------------------------------------------------- eval: the soup
def test_eval_uses_the_averaged_expert(tiny_model):
    handle = methods.apply(tiny_model("t5"), "adamix", shared_side="none")
    _perturb(handle)
    mod = handle.modules["decoder.0.ffn"].eval()
    h = torch.randn(2, 5, 96)
    with torch.no_grad():
        wd = torch.stack([e.weight for e in mod.down.experts]).mean(0)
        bd = torch.stack([e.bias for e in mod.down.experts]).mean(0)
        wu = torch.stack([e.weight for e in mod.up.experts]).mean(0)
        bu = torch.stack([e.bias for e in mod.up.experts]).mean(0)
        expected = h + F.linear(F.gelu(F.linear(h, wd, bd)), wu, bu)
        got = mod(h, h)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # ... which is neither one expert nor the mean of the experts' outputs (the adapter is non-linear).
    with torch.no_grad():
        first = h + mod.up.experts[0](F.gelu(mod.down.experts[0](h)))
        outputs = torch.stack([h + mod.up.experts[i](F.gelu(mod.down.experts[i](h))) for i in range(4)]).mean(0)
    assert (got - first).abs().max() > 1e-3 and (got - outputs).abs().max() > 1e-4


def test_soup_is_cached_and_follows_weight_changes(tiny_model, tiny_batch):
    model = tiny_model("t5")
    batch = tiny_batch(model)
    handle = methods.apply(model, "adamix")
    _perturb(handle)
    model.eval()
    mix = handle.modules["encoder.0.ffn"].down
    with torch.no_grad():
        first = model(**batch).logits
        saved = mix.experts[2].weight.clone()
        soup = mix._soup
        assert soup is not None
        model(**batch)
        assert mix._soup is soup  # not recomputed while nothing changed
        mix.experts[2].weight.add_(0.3)  # an in-place change (as an optimiser step): the soup follows
        changed = model(**batch).logits
    assert mix._soup is not soup and not torch.allclose(changed, first)
    with torch.no_grad():
        mix.experts[2].weight.data.copy_(saved)  # through .data: invisible to the version counter ...
        stale = model(**batch).logits
        handle.merge()  # ... until merge() (or eval()) recomputes
        torch.testing.assert_close(model(**batch).logits, first, rtol=0, atol=0)
    assert not torch.allclose(stale, first)


def test_eval_is_differentiable_when_gradients_are_needed(tiny_model, tiny_batch):
    model = tiny_model("t5")
    batch = tiny_batch(model)
    handle = methods.apply(model, "adamix")
    model.eval()
    model(**batch).loss.backward()
    grads = [e.weight.grad for e in handle.modules["encoder.0.ffn"].down.experts]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    torch.testing.assert_close(grads[1], grads[0])  # identical experts, each weighted 1/4


# ------------------------------------------------------------------------------------- consistency
def _capturing_forward(model, batch, store):
    def forward():
        out = model(**batch)
        store.append(out)
        return out

    return forward


def _training_adamix(tiny_model, tiny_batch, family="t5"):
    """(handle, forward, outs): perturbed AdaMix in training mode on a 3-sample batch; ``forward()``
    appends each output to ``outs``."""
    model = tiny_model(family)
    batch = tiny_batch(model, n=3)
    handle = methods.apply(model, "adamix")
    _perturb(handle)
    model.train()
    outs = []
    return handle, _capturing_forward(model, batch, outs), outs


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_consistency_loss_in_training(family, tiny_model, tiny_batch):
    handle, forward, outs = _training_adamix(tiny_model, tiny_batch, family)
    torch.manual_seed(0)
    out = forward()
    losses = handle.training_losses(out, forward)
    assert len(outs) == 2, "training_losses runs the batch a second time"
    assert set(losses) == {"consistency"}
    c = losses["consistency"]
    assert c.dim() == 0 and torch.isfinite(c) and c > 0
    # It trains the method: gradients reach the experts of both passes through the symmetric KL.
    c.backward()
    grads = [p.grad for n, p in handle.trainable_parameters() if "peft_mods" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert handle.extra_losses() == {}  # no second pass there


def test_handle_loss_is_task_loss_plus_training_losses(tiny_model, tiny_batch):
    """``handle.loss(forward)`` (what the trainer minimises) = the first pass's task loss + the
    consistency term over both passes, computed from the same random draws."""
    handle, forward, outs = _training_adamix(tiny_model, tiny_batch)
    torch.manual_seed(0)
    loss = handle.loss(forward)
    assert len(outs) == 2
    torch.manual_seed(0)
    out = forward()
    expected = out.loss + handle.training_losses(out, forward)["consistency"]
    assert loss.dim() == 0 and torch.equal(loss, expected)
    assert loss > outs[0].loss  # the consistency term is counted, not dropped


def test_no_second_pass_in_eval_or_when_disabled(tiny_model, tiny_batch):
    model = tiny_model("t5")
    batch = tiny_batch(model)
    handle = methods.apply(model, "adamix")
    calls = []
    forward = _capturing_forward(model, batch, calls)
    model.eval()
    with torch.no_grad():
        assert handle.training_losses(forward(), forward) == {}
    assert len(calls) == 1
    off_model = tiny_model("t5")
    off = methods.apply(off_model, "adamix", consistency_weight=0.0)
    off_model.train()
    calls = []
    forward = _capturing_forward(off_model, batch, calls)
    assert off.training_losses(forward(), forward) == {}
    assert len(calls) == 1


def test_weight_and_mask_options(tiny_model, tiny_batch):
    """The weight scales the loss; "labels" and "all" differ when targets are padded."""
    batch_model = tiny_model("t5")
    batch = tiny_batch(batch_model, n=3)
    assert (batch["labels"] == -100).any()
    values = {}
    for key, opts in {"default": {}, "w100": {"consistency_weight": 100.0},
                      "all": {"consistency_mask": "all"}}.items():
        model = tiny_model("t5")
        torch.manual_seed(1)  # the same init (torch's default nn.Linear draw) for the three
        handle = methods.apply(model, "adamix", **opts)
        _perturb(handle)
        model.train()
        forward = _capturing_forward(model, batch, [])
        torch.manual_seed(0)
        values[key] = handle.training_losses(forward(), forward)["consistency"].detach()
    torch.testing.assert_close(values["w100"], 100 * values["default"], rtol=1e-5, atol=0)
    assert not torch.allclose(values["all"], values["default"])


# ------------------------------------------------------------------------------------- the trainer
# tiny_backbone: the shared tiny checkpoint (tests/conftest.py)
def test_trains_a_few_steps_with_the_consistency_loss(tiny_backbone, tmp_path, monkeypatch):
    from workbench.train import RunConfig, run

    seen = []
    original = AdaMixHandle.training_losses

    def recording(self, out, forward):
        losses = original(self, out, forward)
        seen.append((self.model.training, {k: float(v.detach()) for k, v in losses.items()}))
        return losses

    monkeypatch.setattr(AdaMixHandle, "training_losses", recording)
    cfg = RunConfig(backbone=str(tiny_backbone), task="shapes-vqa", n_shots=16, seed=13, method="adamix",
                    method_config={"bottleneck": 4}, max_steps=4, eval_every=4, batch_size=8, pool_size=64,
                    test_size=16, quiet=True, task_options={"n_scenes": 40})
    result = run(cfg, store=tmp_path / "runs")
    assert len(seen) == 4  # 16 examples, batch 8, 4 steps
    assert all(training for training, _ in seen)
    values = [losses["consistency"] for _, losses in seen]
    assert all(math.isfinite(v) and v > 0 for v in values), values
    assert result.metrics["steps"] == 4 and math.isfinite(result.history[-1]["loss"])
    assert result.params["method"] == 1 * 2 * (4 * (32 * 4 + 4) + (4 * 32 + 32))  # 2 FFNs of d 32, m 4
    assert 0 <= result.metrics["test"]["overall"] <= 1


# ------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("overrides, match", [
    ({"num_experts": 0}, "num_experts"),
    ({"shared_side": "both"}, "shared_side"),
    ({"expert_init": "zeros"}, "expert_init"),
    ({"consistency_mask": "none"}, "consistency_mask"),
    ({"consistency_weight": -1.0}, "consistency_weight"),
    ({"sublayers": ("mlp",)}, "sublayers"),
    ({"activation": "nope"}, "activation"),
    ({"bottleneck": 0}, "bottleneck"),
    ({"zero_init_up": 1}, "zero_init_up"),
])
def test_invalid_options(overrides, match):
    with pytest.raises(ValueError, match=match):
        methods.get_config("adamix", **overrides)


def test_registration_metadata():
    spec = methods.method_spec("adamix")
    assert spec.family == methods.method_spec("pfeiffer").family == "layer: adapters"
    assert spec.main_knob == ("num_experts", (1, 2, 4, 8))
    cfg = methods.get_config("adamix")
    assert (cfg.num_experts, cfg.reduction_factor, cfg.shared_side, cfg.activation, cfg.sublayers) == \
        (4, 12, "up", "gelu", ("ffn",))
    assert (cfg.consistency_weight, cfg.consistency_mask) == (1.0, "labels")
    assert cfg.lr == 1e-2  # tuned on vlt5-tiny (the MixPHM protocol: 5e-3 on T5-base)
    assert type(cfg).OFFICIAL_TRAIN_PROJECTOR is False


def test_the_projector_of_a_pretrained_backbone_stays_frozen(tiny_model):
    """As MixPHM's trainer: only the AdaMix tensors train (a freshly made projector trains anyway)."""
    model = tiny_model("t5")
    model.projector_fresh = False  # as after loading a checkpoint
    handle = methods.apply(model, "adamix")
    assert not any(p.requires_grad for p in model.projector.parameters())
    assert "frozen" in handle.projector_note
    assert all("peft_mods" in n for n, _ in handle.trainable_parameters())
    trained = methods.apply(tiny_model("t5"), "adamix", train_projector=True).model
    assert all(p.requires_grad for p in trained.projector.parameters())
