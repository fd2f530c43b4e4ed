"""PETAL on tiny random T5 / BART models: modes and their threshold, the instruction MoE, the IB loss.

Uses the fixtures of tests/methods/conftest.py (``family``, ``tiny_model``, ``tiny_batch``).
"""

import math

import pytest
import torch

torch.set_num_threads(1)

from workbench import methods  # noqa: E402
from workbench.probes import routing_stats  # noqa: E402

SMALL = dict(rank=8)  # fewer modes keep the tests fast; every other option is the default


def apply(model, **overrides):
    return methods.apply(model, "petal", **{**SMALL, **overrides})


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_forward_backward_and_unchanged_at_step0(family, tiny_model, tiny_batch):
    base = tiny_model(family)
    model = tiny_model(family)
    batch = tiny_batch(model, n=3)
    ref = logits(base, batch)
    handle = apply(model)
    assert len(handle.modules) == 2 * 4 + 2 * 8  # q k v o of 2 encoder + 2 x 2 decoder attentions
    torch.testing.assert_close(logits(model, batch), ref, atol=0, rtol=0)  # p_j = 0, zero expert ups
    model.train()
    opt = torch.optim.SGD([p for _, p in handle.trainable_parameters()], lr=0.1)
    for step in range(2):
        opt.zero_grad()
        out = model(**batch)
        extra = handle.extra_losses()
        assert set(extra) == {"ib"}
        loss = out.loss + sum(extra.values())
        assert torch.isfinite(loss)
        loss.backward()
        if step == 0:
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            assert all(("peft_" in n or n.startswith(("input_modifiers.", "projector."))) for n in grads), \
                [n for n in grads if "peft_" not in n][:5]
            assert any(".petal.p" in n and g.abs().sum() > 0 for n, g in grads.items())
            assert grads["input_modifiers.0.up"].abs().sum() > 0
        opt.step()
    # after a step the shared factors, the strengths and the threshold learn too
    for n in ("peft_shared.petal_modes.U.96x96", "peft_shared.petal_modes.strength",
              "peft_shared.petal_modes.threshold", "input_modifiers.0.gate.weight", "input_modifiers.0.templates"):
        assert dict(model.named_parameters())[n].grad.abs().sum() > 0, n
    model.eval()
    assert not torch.allclose(logits(model, batch), ref)
    ids = model.generate(batch["visual_feats"], batch["input_ids"], batch["attention_mask"], max_new_tokens=3)
    assert ids.shape[0] == 3
    assert handle.extra_losses() == {}  # generate has no labels: no IB term


def test_threshold_switches_modes_off(family, tiny_model, tiny_batch):
    base = tiny_model(family)
    model = tiny_model(family)
    batch = tiny_batch(model)
    ref = logits(base, batch)
    handle = apply(model, moe=False, w_ib=0.0)
    R = handle.config.rank
    with torch.no_grad():
        for mod in handle.modules.values():
            mod.p.normal_()
    assert handle.modes_on() == R
    assert max(w.abs().max() for w in handle.delta_weights().values()) > 1e-2
    assert not torch.allclose(logits(model, batch), ref, atol=1e-4)
    bank = handle.bank
    with torch.no_grad():
        bank.strength[: R // 2] = 0.1  # below Gamma = 0.5
    assert handle.modes_on() == R - R // 2
    with torch.no_grad():
        bank.threshold.fill_(float(bank.strength.abs().max()) + 50 * handle.config.tau)  # gates <= sigmoid(-50)
    assert handle.modes_on() == 0
    assert (handle.mode_gates() < 1e-20).all()
    assert max(w.abs().max() for w in handle.delta_weights().values()) < 1e-18
    torch.testing.assert_close(logits(model, batch), ref, atol=1e-6, rtol=0)


def test_routing_probabilities(family, tiny_model, tiny_batch):
    model = tiny_model(family)
    batch = tiny_batch(model, n=4)
    handle = apply(model, n_experts=3)
    with pytest.raises(ValueError, match="no forward"):
        handle.routing_probs()
    with torch.no_grad():
        model.input_modifiers[0].up.normal_()
        model.input_modifiers[0].gate.weight.normal_()
    model(**batch)
    probs = handle.routing_probs()
    assert probs.shape == (4, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    stats = routing_stats(probs=probs)
    assert 0 <= float(stats["token_entropy"]) <= math.log(3) + 1e-6
    assert float(stats["balance_loss"]) >= 1 - 1e-6
    assert set(handle.routing_stats()) == set(stats)


def test_ib_loss_finite_differentiable_and_reads_the_answer(family, tiny_model, tiny_batch):
    model = tiny_model(family)
    batch = tiny_batch(model, n=3)
    handle = apply(model, beta=0.5, w_ib=2.0)
    moe = model.input_modifiers[0]
    y = moe.answer_tokens(batch["labels"])
    special = set(model.tokenizer.all_special_ids)
    assert all(int(t) not in special and int(t) >= 0 for t in y)
    first = 1 if family == "bart" else 0  # BART's labels start with <s>
    assert torch.equal(y, batch["labels"][:, first])
    model.train()
    model(**batch)
    ib = handle.extra_losses()["ib"]
    assert torch.isfinite(ib) and ib.requires_grad
    assert handle.last_ib["ib"] * 2.0 == pytest.approx(float(ib.detach()))
    assert handle.last_ib["ce"] > 0 and handle.last_ib["kl"] >= 0
    ib.backward()
    for n in ("ib_encoder.weight", "ib_head.weight", "up"):
        assert dict(moe.named_parameters())[n].grad.abs().sum() > 0, n
    assert model.lm.get_output_embeddings().weight.grad is None  # the tied classifier stays frozen
    # encode() alone carries no labels: no stale IB term from the previous forward
    model.encode(batch["visual_feats"], batch["input_ids"], batch["attention_mask"])
    assert handle.extra_losses() == {}


def test_tucker_form_and_merge(family, tiny_model, tiny_batch):
    model = tiny_model(family)
    batch = tiny_batch(model)
    handle = apply(model, form="tucker", w_gate=0.1)
    bank = handle.bank
    assert bank.core.shape == (8, 8, 8)
    with torch.no_grad():
        for mod in handle.modules.values():
            mod.p.normal_()
    point, mod = next(iter(handle.modules.items()))
    U, V = bank.U[mod.group], bank.V[mod.group]
    cp = (U * (bank.strength * mod.p * bank.gate())) @ V.T  # the superdiagonal core is the CP form
    torch.testing.assert_close(mod.delta_weight(), cp)
    model.train()
    out = model(**batch)
    losses = handle.extra_losses()
    assert set(losses) == {"ib", "gate"}
    (out.loss + sum(losses.values())).backward()
    assert bank.core.grad.abs().sum() > 0
    model.eval()
    before = logits(model, batch)
    handle.merge()
    assert not any(".peft_mods." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, batch), before, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="already merged"):
        handle.merge()


def test_parameter_count_and_save_load(tiny_model, tiny_batch, tmp_path):
    model = tiny_model("t5")
    handle = apply(model)
    cfg, d, R, J = handle.config, 96, 8, 24
    M, L, K, r, z = cfg.n_templates, cfg.template_len, cfg.n_experts, cfg.expert_rank, cfg.z_dim
    modes = 2 * d * R + R + 1 + J * R
    moe = M * L * d + K * 2 * d * r + (2 * d * K + K)
    ib = (d + 1) * 2 * z + (z + 1) * d
    assert methods.count_parameters(model)["method"] == modes + moe + ib
    with torch.no_grad():
        for p in handle.modules.values():
            p.p.normal_()
        model.input_modifiers[0].up.normal_()
    batch = tiny_batch(model)
    ref = logits(model, batch)
    methods.save_method(model, tmp_path / "petal.safetensors")
    other = tiny_model("t5")
    methods.load_method(other, tmp_path / "petal.safetensors")
    torch.testing.assert_close(logits(other, batch), ref)


def test_paper_is_the_default_variant_with_unchanged_defaults():
    cfg = methods.get_config("petal")
    assert cfg.variant == "paper"
    expected = dict(rank=64, form="cp", targets=("q", "k", "v", "o"), tau=0.1, threshold_init=0.5, scale=1.0,
                    moe=True, n_templates=4, template_len=4, n_experts=4, expert_rank=16, z_dim=32, beta=1e-3,
                    w_ib=0.1, w_gate=0.0, lr=3e-3)  # lr: tuned on vlt5-tiny
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert (cfg.mode_dropout, cfg.embed_weight, cfg.expert_weight) == (None, None, None)  # released only
    assert type(cfg)(**cfg.to_dict()) == cfg  # what save_method / load_method do


@pytest.mark.parametrize("bad, match", [
    (dict(variant="official"), "variant must be one of"),
    (dict(mode_dropout=0.2), "mode_dropout applies to variant='released' only"),
    (dict(embed_weight=0.5, expert_weight=0.5), "embed_weight, expert_weight apply to variant='released'"),
    (dict(rank=0), "rank"),
    (dict(form="tt"), "form"),
    (dict(targets=("wi",)), "targets"),
    (dict(tau=0.0), "tau"),
    (dict(beta=-1.0), "beta"),
    (dict(moe=False), "w_ib=0"),
    (dict(n_experts=1.5), "n_experts"),
])
def test_bad_config(tiny_model, bad, match):
    model = tiny_model("bart")
    with pytest.raises(ValueError, match=match):
        methods.apply(model, "petal", **bad)
    assert not model.modifications() and len(model.input_modifiers) == 0


def test_frozen_threshold_and_eval_statistics(tiny_model):
    model = tiny_model("t5")
    handle = apply(model, moe=False, w_ib=0.0, learn_threshold=False)
    assert not handle.bank.threshold.requires_grad
    assert "peft_shared.petal_modes.threshold" not in dict(handle.trainable_parameters())
    stats = handle.eval_statistics()
    assert stats["modes_on"] == handle.modes_on() == handle.config.rank and stats["threshold"] == 0.5
    assert len(stats["mode_gates"]) == handle.config.rank
    learned = apply(tiny_model("t5"), moe=False, w_ib=0.0)
    assert learned.bank.threshold.requires_grad  # the paper's default: Gamma learns
    released = apply(tiny_model("t5"), variant="released")
    assert released.eval_statistics() == {}
    with pytest.raises(ValueError, match="learn_threshold"):
        apply(tiny_model("t5"), learn_threshold="yes")


def test_instruction_vector_is_the_routed_mixture(family, tiny_model, tiny_batch):
    model = tiny_model(family)
    batch = tiny_batch(model, n=3)
    handle = apply(model)
    with pytest.raises(ValueError, match="no forward pass"):
        handle.instruction()
    with torch.no_grad():
        for p in model.input_modifiers[0].up:  # non-zero experts: mu is zero at initialisation
            p.normal_()
        model(**batch)
    mu, probs = handle.instruction(), handle.routing_probs()
    assert mu.shape == (3, model.config.d_model) and probs.shape[0] == 3 and mu.abs().sum() > 0
    released = tiny_model(family)
    h = apply(released, variant="released")
    with pytest.raises(ValueError, match="variant"):
        h.instruction()
    off = tiny_model(family)
    h = apply(off, moe=False, w_ib=0.0)
    with pytest.raises(ValueError, match="no instruction mixture"):
        h.instruction()
