"""The optimiser and schedule (workbench/train/optim.py): decay groups, the learning-rate factor, the
errors, and the multi-tensor AdamW giving the same floats as torch's single-tensor loop."""

import math

import pytest
import torch

from workbench.train.optim import (
    build_optimizer,
    lr_factor,
    no_decay_by_name,
    no_decay_vectors,
    param_groups,
)


def _named(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"enc.block.0.layer.0.SelfAttention.q.weight": (8, 8), "enc.block.0.layer.0.layer_norm.weight": (8,),
              "dec.final_layer_norm.weight": (8,), "lm_head.weight": (12, 8), "adapter.down.bias": (4,),
              "visual.cnn.0.weight": (4, 3, 3, 3), "projector.1.weight": (8,)}
    return [(n, torch.nn.Parameter(torch.randn(*s, generator=g))) for n, s in shapes.items()]


def test_no_decay_rules():
    named = dict(_named())
    assert [n for n, p in named.items() if no_decay_by_name(n, p)] == [
        "enc.block.0.layer.0.layer_norm.weight", "dec.final_layer_norm.weight", "adapter.down.bias",
        "projector.1.weight"]
    assert [n for n, p in named.items() if no_decay_vectors(n, p)] == [
        "enc.block.0.layer.0.layer_norm.weight", "dec.final_layer_norm.weight", "adapter.down.bias",
        "projector.1.weight"]


def test_param_groups_split_by_scale_then_by_decay():
    named = _named()
    groups = param_groups(named, 1e-3, 0.01, lr_scale=lambda n: 10.0 if n.startswith("visual") else 1.0)
    assert [(len(g["params"]), g["weight_decay"], g["lr"]) for g in groups] == [
        (2, 0.01, 1e-3), (4, 0.0, 1e-3), (1, 0.01, 1e-2)]
    assert sum(len(g["params"]) for g in groups) == len(named)


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_lr_factor_warms_up_then_decays_to_the_floor(decay):
    total, warm, floor = 100, 10, 0.05
    f = [lr_factor(s, total, warm, decay, floor) for s in range(total + 1)]
    assert f[:warm] == pytest.approx([(s + 1) / warm for s in range(warm)])
    assert f[warm] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[warm:], f[warm + 1:]))  # never rises after the warm-up
    assert f[total] == pytest.approx(floor)
    if decay == "cosine":
        assert f[(total + warm) // 2 + 0] == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=0.0), "lr > 0"), (dict(total_steps=0), "total_steps >= 1"), (dict(warmup_steps=0), "warmup_steps >= 1"),
    (dict(decay="step"), "decay must be one of"),
])
def test_bad_settings_are_refused(kwargs, message):
    args = dict(lr=1e-3, total_steps=10, warmup_steps=1, weight_decay=0.0) | kwargs
    with pytest.raises(ValueError, match=message):
        build_optimizer(_named(), args.pop("lr"), args.pop("total_steps"), **args)
    with pytest.raises(ValueError, match="no parameter to train"):
        build_optimizer([], 1e-3, 10, warmup_steps=1, weight_decay=0.0)


def _train(foreach: bool | None, steps=25):
    named = _named(1)
    opt, sched = build_optimizer(named, 3e-3, steps, warmup_steps=5, weight_decay=0.01, eps=1e-6)
    if foreach is not None:  # the single-tensor loop, as torch runs it on the CPU by default
        for group in opt.param_groups:
            group["foreach"] = foreach
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        for _, p in named:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for _, p in named]


def test_the_optimiser_is_the_multi_tensor_adamw_and_gives_the_single_tensor_floats():
    """build_optimizer asks for AdamW(foreach=True): less Python per step than the loop torch picks on
    the CPU by default, and bit for bit the same parameters (the committed bundles stay exact)."""
    opt, _ = build_optimizer(_named(), 1e-3, 10, warmup_steps=1, weight_decay=0.01)
    assert isinstance(opt, torch.optim.AdamW) and all(g["foreach"] for g in opt.param_groups)
    multi, single = _train(None), _train(False)
    assert all(torch.equal(a, b) for a, b in zip(multi, single))
    assert not torch.equal(multi[0], _named(1)[0][1])  # it trained
