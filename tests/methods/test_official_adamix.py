"""AdaMix against the official formulas, re-derived here in plain torch.

The mirrors below transcribe the official code (nothing is imported from ``workbench.methods.adamix``):

- ``OfficialMixtureSoup`` / ``OfficialExpertSoup``: microsoft/AdaMix
  ``src/transformers/models/expert_soup.py`` (ported unchanged to jingjing12110/MixPHM
  ``src/vl_t5/adaMix/expert_soup.py``): experts deep-copied from one ``nn.Linear``; in training
  ``torch.randint(low=0, high=N, size=(1,)).item()`` picks the expert of each side (Down first);
  in eval (``inference_level 3``) ``expert_soup()`` sums ``softmax(expert_score_weight)[i] * param``
  over the experts with ``expert_score_weight`` a frozen zero vector; ``result + residual``.
- ``official_symmetric_kl_vlt5``: MixPHM ``src/vl_t5/modeling_t5.py`` ``symmetric_KL_loss`` applied to
  ``lm_logits.view(-1, V)`` and the second pass's logits (every decoder position).
- ``official_symmetric_kl_nlg``: microsoft/AdaMix ``NLG/src/model.py`` ``symmetric_KL_loss(p, q, lm_mask)``
  (the positions with a label), multiplied by the caller's weight.

Each comparison is on tiny T5 and BART models (``workbench.models.testing.tiny_vlmodel``), to a relative 1e-6;
each negative variant (a one-directional KL, no detach, a sum instead of the batch mean, no mask, a
temperature; no averaging or averaging the outputs at eval) must fail the same comparison.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import get_activation

from workbench import methods
from workbench.models.testing import tiny_vlmodel

from .conftest import perturb_trainable

TOL = dict(rtol=1e-6, atol=1e-6)  # logits
LOSS_TOL = dict(rtol=1e-6, atol=1e-9)  # the loss (~1e-3 on the tiny models) and its gradients


# ------------------------------------------------------------------------------------- official mirrors
class OfficialMixtureSoup(nn.Module):
    def __init__(self, expert, num_local_experts=1):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList([copy.deepcopy(expert) for _ in range(num_local_experts)])
        self.num_local_experts = num_local_experts
        self.expert_score_weight = nn.Parameter(torch.zeros(num_local_experts), requires_grad=False)

    def expert_soup(self):
        weight = F.softmax(self.expert_score_weight, dim=-1)
        self.parameter_dict = {"weight": 0, "bias": 0}
        for idx in range(self.num_local_experts):
            for s_name, s_param in self.deepspeed_experts[idx].named_parameters():
                p_name = "weight" if "weight" in s_name else "bias"
                self.parameter_dict[p_name] = self.parameter_dict[p_name] + weight[idx] * s_param

    def forward(self, x, variant="official"):
        if self.deepspeed_experts[0].training:
            expert_idx = torch.randint(low=0, high=self.num_local_experts, size=(1,)).item()
            return self.deepspeed_experts[expert_idx](x)
        if variant == "first_expert":  # NEGATIVE: no averaging
            return self.deepspeed_experts[0](x)
        self.expert_soup()
        return F.linear(x, self.parameter_dict["weight"], self.parameter_dict["bias"])


class OfficialExpertSoup(nn.Module):
    def __init__(self, dim, r, act="gelu", num_expert=4, sharing_down=0, sharing_up=1):
        super().__init__()
        self.MoA_A = OfficialMixtureSoup(nn.Linear(dim, r), 1 if sharing_down == 1 else num_expert)
        self.act = get_activation(act)
        self.MoA_B = OfficialMixtureSoup(nn.Linear(r, dim), 1 if sharing_up == 1 else num_expert)
        self.variant = "official"

    def forward(self, x):
        residual = x
        if self.variant == "mean_of_outputs":  # NEGATIVE: average the experts' outputs, not their weights
            outs = [self.MoA_B.deepspeed_experts[j if self.MoA_B.num_local_experts > 1 else 0](
                self.act(self.MoA_A.deepspeed_experts[j if self.MoA_A.num_local_experts > 1 else 0](x)))
                for j in range(max(self.MoA_A.num_local_experts, self.MoA_B.num_local_experts))]
            return torch.stack(outs).mean(0) + residual
        result = self.MoA_A(x, self.variant)
        result = self.act(result)
        result = self.MoA_B(result, self.variant)
        return result + residual


class AtFFN(nn.Module):
    """The official module where MixPHM's T5LayerFF calls it: on the FFN output f, before dropout."""

    def __init__(self, soup):
        super().__init__()
        self.soup = soup

    def forward(self, x, h):
        return self.soup(h)


def official_symmetric_kl_vlt5(input, target, reduction="batchmean"):
    input, target = input.float(), target.float()
    loss = F.kl_div(F.log_softmax(input, dim=-1, dtype=torch.float32),
                    F.softmax(target.detach(), dim=-1, dtype=torch.float32), reduction=reduction) + \
        F.kl_div(F.log_softmax(target, dim=-1, dtype=torch.float32),
                 F.softmax(input.detach(), dim=-1, dtype=torch.float32), reduction=reduction)
    return 0.5 * loss.sum()


def official_symmetric_kl_nlg(p, q, attention_mask, reduction="batchmean"):
    p, q, attention_mask = p.float(), q.float(), attention_mask.view(-1)
    dict_size = q.size(-1)
    attention_mask = attention_mask.eq(1.0)
    p = p.view(-1, dict_size)[attention_mask]
    q = q.view(-1, dict_size)[attention_mask]
    loss = F.kl_div(F.log_softmax(p, dim=-1, dtype=torch.float32),
                    F.softmax(q.detach(), dim=-1, dtype=torch.float32), reduction=reduction) + \
        F.kl_div(F.log_softmax(q, dim=-1, dtype=torch.float32),
                 F.softmax(p.detach(), dim=-1, dtype=torch.float32), reduction=reduction)
    return 0.5 * loss.mean()


def negative_kl(variant, p, q, mask):
    """NEGATIVE variants of the NLG formula (each differs from the official in value or gradient)."""
    keep = mask.reshape(-1).bool()
    v = p.shape[-1]
    p, q = p.float().reshape(-1, v)[keep], q.float().reshape(-1, v)[keep]
    if variant == "one_directional":
        return F.kl_div(F.log_softmax(p, -1), F.softmax(q.detach(), -1), reduction="batchmean")
    if variant == "no_detach":
        return 0.5 * (F.kl_div(F.log_softmax(p, -1), F.softmax(q, -1), reduction="batchmean")
                      + F.kl_div(F.log_softmax(q, -1), F.softmax(p, -1), reduction="batchmean"))
    if variant == "sum_reduction":
        return 0.5 * (F.kl_div(F.log_softmax(p, -1), F.softmax(q.detach(), -1), reduction="sum")
                      + F.kl_div(F.log_softmax(q, -1), F.softmax(p.detach(), -1), reduction="sum"))
    if variant == "temperature_2":
        return 0.5 * (F.kl_div(F.log_softmax(p / 2, -1), F.softmax(q.detach() / 2, -1), reduction="batchmean")
                      + F.kl_div(F.log_softmax(q / 2, -1), F.softmax(p.detach() / 2, -1), reduction="batchmean"))
    raise KeyError(variant)


# ------------------------------------------------------------------------------------- helpers
def _batch(model, n=3, seed=0):
    prompts = ["vqa: what colour is the circle?", "caption:", "vqa: how many squares are there?"][:n]
    targets = ["red", "a small blue square at the bottom right", "two"][:n]
    g = torch.Generator().manual_seed(seed)
    ids, mask = model.encode_prompts(prompts)
    labels = model.encode_targets(targets)
    assert (labels == -100).any()  # padded targets: the mask matters
    return dict(visual_feats=torch.randn(n, 4, 16, generator=g), input_ids=ids, attention_mask=mask, labels=labels)


_perturb = perturb_trainable


def _pair(family, shared_side="up", num_experts=4, variant="official"):
    """The workbench's AdaMix on one tiny model, the official ExpertSoup (same weights) on a twin."""
    ours = tiny_vlmodel(family).eval()
    handle = methods.apply(ours, "adamix", shared_side=shared_side, num_experts=num_experts,
                           consistency_mask="all")
    _perturb(handle)
    twin = tiny_vlmodel(family).eval()
    twin.load_state_dict({k: v for k, v in ours.state_dict().items() if "peft_mods" not in k}, strict=False)
    d = ours.d_model
    for point, mod in handle.modules.items():
        m = mod.down.experts[0].out_features
        off = OfficialExpertSoup(d, m, "gelu", num_expert=num_experts, sharing_down=int(shared_side == "down"),
                                 sharing_up=int(shared_side == "up"))
        off.variant = variant
        with torch.no_grad():
            for mine, theirs in ((mod.down, off.MoA_A), (mod.up, off.MoA_B)):
                assert mine.num_experts == theirs.num_local_experts
                for e_mine, e_theirs in zip(mine.experts, theirs.deepspeed_experts):
                    e_theirs.weight.copy_(e_mine.weight)
                    e_theirs.bias.copy_(e_mine.bias)
        twin.add_sublayer_modification(point, AtFFN(off), name="official")
    return ours.eval(), handle, twin.eval()


def _logits(model, batch, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        return model(**batch).logits


# ------------------------------------------------------------------------------------- the module
@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("shared_side", ["up", "down", "none"])
def test_module_matches_the_official_expert_soup(family, shared_side):
    ours, handle, twin = _pair(family, shared_side)
    batch = _batch(ours)
    # eval: the expert soup (inference_level 3)
    torch.testing.assert_close(_logits(ours, batch), _logits(twin, batch), **TOL)
    # training: the same draws from the same global generator (Down first), dropout included
    ours.train(), twin.train()
    for seed in range(4):
        torch.testing.assert_close(_logits(ours, batch, seed), _logits(twin, batch, seed), **TOL)
    assert sum(c.sum() for c in handle.draw_counts().values()) > 0


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("variant", ["first_expert", "mean_of_outputs"])
def test_negative_eval_variants_fail_the_comparison(family, variant):
    ours, _, twin = _pair(family, "none", variant=variant)
    batch = _batch(ours)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(_logits(ours, batch), _logits(twin, batch), **TOL)


def test_official_init_is_a_deep_copy_of_one_linear():
    """The official experts start identical, with nn.Linear's default init: the same holds here, and
    the same draw of the global generator gives the same tensors."""
    model = tiny_vlmodel("t5")
    torch.manual_seed(5)
    mod = methods.apply(model, "adamix").modules["encoder.0.ffn"]
    torch.manual_seed(5)
    off = OfficialExpertSoup(32, 32 // 12, "gelu", num_expert=4, sharing_down=0, sharing_up=1)
    for mine, theirs in ((mod.down, off.MoA_A), (mod.up, off.MoA_B)):
        for e_mine, e_theirs in zip(mine.experts, theirs.deepspeed_experts):
            assert torch.equal(e_mine.weight, e_theirs.weight) and torch.equal(e_mine.bias, e_theirs.bias)


# ------------------------------------------------------------------------------------- the consistency loss
def _consistency(family, mask_mode, weight=1.0, seed=0):
    """(the handle's loss, logits of pass 1 and 2 as leaves, label mask) for one training batch."""
    model = tiny_vlmodel(family)
    torch.manual_seed(1)
    handle = methods.apply(model, "adamix", consistency_mask=mask_mode, consistency_weight=weight)
    _perturb(handle)
    batch = _batch(model)
    model.train()
    outs = []

    def forward():
        out = model(**batch)
        out.logits = out.logits.detach().requires_grad_(True)  # leaves: compare gradients w.r.t. the logits
        outs.append(out)
        return out

    torch.manual_seed(seed)
    loss = handle.training_losses(forward(), forward)["consistency"]
    assert len(outs) == 2
    return loss, outs[0].logits, outs[1].logits, (batch["labels"] != -100), outs


def _grads(loss, p, q):
    return torch.autograd.grad(loss, (p, q), allow_unused=True, materialize_grads=True)


def _assert_same(loss, expected, p, q):
    torch.testing.assert_close(loss, expected, **LOSS_TOL)
    for g, g_expected in zip(_grads(loss, p, q), _grads(expected, p, q)):
        torch.testing.assert_close(g, g_expected, **LOSS_TOL)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_consistency_matches_mixphm_vlt5_over_every_position(family):
    loss, p, q, _, _ = _consistency(family, "all")
    _assert_same(loss, official_symmetric_kl_vlt5(p.view(-1, p.size(-1)), q.view(-1, q.size(-1))), p, q)
    assert loss > 0


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("weight", [1.0, 100.0])
def test_consistency_matches_the_masked_nlg_formula(family, weight):
    loss, p, q, mask, _ = _consistency(family, "labels", weight)
    _assert_same(loss, weight * official_symmetric_kl_nlg(p, q, mask.float()), p, q)
    assert loss > 0


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("variant", ["one_directional", "no_detach", "sum_reduction", "temperature_2", "unmasked",
                                     "plus_second_task_loss"])
def test_negative_consistency_variants_fail_the_comparison(family, variant):
    loss, p, q, mask, outs = _consistency(family, "labels")
    if variant == "unmasked":
        wrong = official_symmetric_kl_vlt5(p.view(-1, p.size(-1)), q.view(-1, q.size(-1)))
    elif variant == "plus_second_task_loss":  # the second pass's cross-entropy (the official code does not add it)
        wrong = official_symmetric_kl_nlg(p, q, mask.float()) + outs[1].loss.detach()
    else:
        wrong = negative_kl(variant, p, q, mask)
    with pytest.raises(AssertionError):
        _assert_same(loss, wrong, p, q)

