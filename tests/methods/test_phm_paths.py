"""PHM layers computed without materialising the Kronecker product (``workbench/methods/_phm.py``).

y = x (sum_i A_i kron S_i T_i) + b has three ways of being computed -- ``"dense"`` (W built),
``"left"`` (A folded into S), ``"right"`` (A folded into T) -- and ``path="auto"`` takes the one with
the fewest multiply-adds for the call's number of rows. Checked here: every path gives the dense
values and gradients (x, S, T, b, A; experts, a shared A, 2-D and 3-D inputs, float64 to rounding);
the cost model is what ``FlopCounterMode`` counts; the choice on the official shapes; MixPHM and
Compacter train and evaluate the same whatever the path; the bad paths are refused.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from workbench import methods
from workbench.methods._phm import PATHS, PHMLinear, cheapest_path, kron_sum, phm_path_costs

# (in, out, n, rank): T5-base MixPHM Down / Up, vlt5-tiny MixPHM, Compacter-like, odd small ones.
SHAPES = [(768, 64, 4, 8), (64, 768, 4, 8), (128, 12, 4, 8), (96, 8, 4, 1), (24, 36, 2, 3), (12, 8, 4, 2)]


def _layer(i, o, n, r, experts=3, dtype=torch.float64, shared=None):
    torch.manual_seed(0)
    layer = PHMLinear(i, o, n=n, rank=r, experts=experts, rule_init_std=1.0, expert_init="independent",
                      shared_rule=shared, dtype=dtype)
    with torch.no_grad():
        layer.b.normal_()
    return layer


def _run(layer, x, expert, path):
    """(y, dx, dS, dT, db, dA) of a fixed random scalar function of y, through ``path``."""
    layer.path = path
    layer.zero_grad(set_to_none=True)
    rule = layer.rule
    rule.grad = None
    x = x.detach().clone().requires_grad_()
    y = layer(x, expert)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    (y * weights).sum().backward()
    return y.detach(), x.grad, layer.S.grad.clone(), layer.T.grad.clone(), layer.b.grad.clone(), rule.grad.clone()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("path", ["left", "right", "auto"])
def test_every_path_gives_the_dense_values_and_gradients(shape, path):
    i, o, n, r = shape
    layer = _layer(i, o, n, r)
    x = torch.randn(2, 5, i, dtype=torch.float64)  # [batch, length, in]: a 3-D input as in the model
    expected = _run(layer, x, 1, "dense")
    actual = _run(layer, x, 1, path)
    for name, a, e in zip(("y", "dx", "dS", "dT", "db", "dA"), actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
    # Only the used expert gets a gradient (the others' slices are zero), whatever the path.
    assert actual[2][0].abs().sum() == 0 and actual[2][2].abs().sum() == 0


@pytest.mark.parametrize("path", ["left", "right"])
def test_float32_agrees_to_float_tolerance(path):
    torch.manual_seed(0)
    layer = PHMLinear(768, 64, n=4, rank=8, rule_init_std=0.01)
    x = torch.randn(16, 40, 768)
    dense = _run(layer, x, 0, "dense")
    other = _run(layer, x, 0, path)
    for a, e in zip(other, dense):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5 * max(1.0, e.abs().max().item()))


def test_a_shared_rule_gets_its_gradient_on_every_path():
    container = nn.ParameterDict({"phm_rule": nn.Parameter(torch.randn(4, 4, 4, dtype=torch.float64))})
    layer = _layer(64, 768, 4, 8, shared=(container, "phm_rule"))
    x = torch.randn(7, 64, dtype=torch.float64)
    expected = _run(layer, x, 2, "dense")
    for path in ("left", "right"):
        torch.testing.assert_close(_run(layer, x, 2, path)[5], expected[5], rtol=1e-10, atol=1e-10)


def test_an_input_of_another_dtype_is_cast_as_by_the_dense_path():
    layer = _layer(64, 768, 4, 8, dtype=torch.float32)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    ys = {}
    for path in ("dense", "left", "right"):
        layer.path = path
        with torch.no_grad():
            ys[path] = layer(x)
    assert all(y.dtype == torch.bfloat16 for y in ys.values())
    for path in ("left", "right"):
        torch.testing.assert_close(ys[path].float(), ys["dense"].float(), rtol=5e-2, atol=5e-2)


# ------------------------------------------------------------------------------------ the cost model
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_the_cost_model_is_what_flop_counter_counts(shape):
    """FlopCounterMode counts 2 FLOPs per multiply-add of every matmul. The folds build L / K by a
    product without a sum (an element-wise multiply, which it does not count): that build is added."""
    i, o, n, r = shape
    rows = 37
    p, q = i // n, o // n
    build = {"dense": 0, "left": n ** 3 * p * r, "right": n ** 3 * r * q}
    costs = phm_path_costs(i, o, n, r, rows)
    layer = _layer(i, o, n, r, dtype=torch.float32)
    x = torch.randn(rows, i)
    for path in ("dense", "left", "right"):
        layer.path = path
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            layer(x, 1)
        assert counter.get_total_flops() == 2 * (costs[path] - build[path]), path


def test_the_choice_on_the_official_shapes():
    # T5-base MixPHM (d 768, m 64, n 4, r 8): Down folds A into T, Up into S; 2/3 of the dense work.
    rows = 16 * 60
    assert cheapest_path(768, 64, 4, 8, rows) == "right" and cheapest_path(64, 768, 4, 8, rows) == "left"
    costs = phm_path_costs(768, 64, 4, 8, rows)
    assert costs["right"] / costs["dense"] < 0.7
    # vlt5-tiny MixPHM (d 128, m 12): r = 8 is not low-rank against q = 3: dense.
    assert cheapest_path(128, 12, 4, 8, rows) == "dense" == cheapest_path(12, 128, 4, 8, rows)
    # Compacter on T5-base (r = 1): Down 768 -> 24 and Up 24 -> 768 fold.
    assert cheapest_path(768, 24, 4, 1, rows) == "right" and cheapest_path(24, 768, 4, 1, rows) == "left"
    # An unfactorised B is always dense; a tie goes to dense.
    assert phm_path_costs(768, 64, 4, None, rows).keys() == {"dense"}
    assert cheapest_path(768, 64, 4, None, rows) == "dense"


def test_auto_follows_the_number_of_rows():
    layer = PHMLinear(768, 64, n=4, rank=8)
    assert layer.path == "auto"
    assert layer.path_for(1000) == "right"
    # One row: building W (n p r q + n^3 p q) is no longer amortised either; whatever is cheapest.
    costs = phm_path_costs(768, 64, 4, 8, 1)
    assert layer.path_for(1) == min(costs, key=costs.get)


def test_bad_paths_are_refused():
    with pytest.raises(ValueError, match="path"):
        PHMLinear(12, 8, n=4, rank=2, path="fast")
    with pytest.raises(ValueError, match="rank=None"):
        PHMLinear(12, 8, n=4, rank=None, path="left")
    layer = PHMLinear(12, 8, n=4, rank=None)
    with pytest.raises(ValueError, match="rank=None"):
        layer.path = "right"
    assert set(PATHS) == {"auto", "dense", "left", "right"}
    assert "path='left'" in repr(PHMLinear(12, 8, n=4, rank=2, path="left"))


def test_weight_is_still_the_kronecker_sum():
    layer = _layer(12, 8, 4, 2, experts=2)
    w = sum(torch.kron(layer.rule[i], layer.S[1, i] @ layer.T[1, i]) for i in range(4))
    torch.testing.assert_close(layer.weight(1), w)
    torch.testing.assert_close(kron_sum(layer.rule, layer.blocks(1)), w)


# ------------------------------------------------------------------------------------ in the methods
def _paths(handle, path):
    for mod in handle.modules.values():
        for layer in mod.modules():
            if isinstance(layer, PHMLinear):
                layer.path = path


@pytest.mark.parametrize("name", ["mixphm", "compacter"])
def test_a_method_trains_and_evaluates_the_same_on_every_path(name, tiny_model, tiny_batch, method_config):
    """The T5-base shapes are what fold; here the tiny model's layers are forced onto each path. Same
    seed, same routing draws and dropout masks: the same loss, extra losses, gradients, eval logits."""
    model = tiny_model("t5")
    handle = methods.apply(model, method_config(name))
    batch = tiny_batch(model, n=3)
    results = {}
    for path in ("dense", "left", "right"):
        _paths(handle, path)
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        out = model(**batch)
        extra = handle.extra_losses()
        loss = out.loss + sum(extra.values(), torch.zeros(()))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in handle.trainable_parameters()}
        model.eval()
        with torch.no_grad():
            logits = model(**batch).logits
        results[path] = (loss.detach(), {k: v.detach() for k, v in extra.items()}, grads, logits)
    dense = results["dense"]
    for path in ("left", "right"):
        loss, extra, grads, logits = results[path]
        torch.testing.assert_close(loss, dense[0], rtol=1e-5, atol=1e-6)
        assert extra.keys() == dense[1].keys()
        for k in extra:
            torch.testing.assert_close(extra[k], dense[1][k], rtol=1e-4, atol=1e-6)
        assert grads.keys() == dense[2].keys()
        for k in grads:
            torch.testing.assert_close(grads[k], dense[2][k], rtol=1e-3, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        torch.testing.assert_close(logits, dense[3], rtol=1e-5, atol=1e-5)


def test_mixphm_routing_and_the_soup_do_not_depend_on_the_path(tiny_model):
    """One expert drawn per forward and module (the draws counted the same), and the eval soup is the
    merged weights whatever the training path."""
    model = tiny_model("t5")
    handle = methods.apply(model, "mixphm", dropout=0.0)
    for path in ("left", "right", "dense"):
        _paths(handle, path)
        handle.reset_draw_counts()
        mod = handle.modules["encoder.1.ffn"].train()
        f = torch.randn(2, 5, 96)
        torch.manual_seed(11)
        with torch.no_grad():
            out = mod(f, f)
        k = int(handle.draw_counts()["encoder.1.ffn"].argmax())
        _paths(handle, "dense")
        with torch.no_grad():
            expected = f + mod.up(mod.act(mod.down(f, 0)), k)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        assert sum(int(c.sum()) for c in handle.draw_counts().values()) == 1


@pytest.mark.parametrize("path", ["dense", "left", "right"])
def test_non_contiguous_inputs(path):
    layer = _layer(64, 768, 4, 8)
    layer.path = path
    base = torch.randn(2, 5, 64 + 3, dtype=torch.float64)
    for x in (base[..., :64], base[..., :64].transpose(0, 1)):
        assert not x.is_contiguous()
        with torch.no_grad():
            torch.testing.assert_close(layer(x, 1), layer(x.contiguous(), 1), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------ MixPHM's redundancy loss
def test_the_factored_redundancy_loss_is_the_redundancy_loss():
    """u = z W + b: the loss through the factors (O(N m d)) equals the direct one (O(N d^2)), value
    and gradients, batched over modules, with and without a bias (both compute in float32, as the
    MixPHM losses always do)."""
    from workbench.methods.mixphm import factored_is_cheaper, redundancy_loss, redundancy_loss_factored

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 40, 12, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 12, 128, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, 128, dtype=torch.float64, generator=g, requires_grad=True)
    f = torch.randn(3, 40, 128, dtype=torch.float64, generator=g, requires_grad=True)
    for bias in (b, None):
        u = z @ w + (bias.unsqueeze(1) if bias is not None else 0)
        direct = redundancy_loss(u, f, 4)
        factored = redundancy_loss_factored(u, z, w, bias, f, 4)
        assert direct.shape == factored.shape == (3,)
        torch.testing.assert_close(factored, direct, rtol=1e-5, atol=1e-7)  # both compute in float32
        inputs = (z, w, f) if bias is None else (z, w, b, f)
        grads_direct = torch.autograd.grad(direct.sum(), inputs, retain_graph=True)
        grads_factored = torch.autograd.grad(factored.sum(), inputs)
        for a, e in zip(grads_factored, grads_direct):
            torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-5 * e.abs().max().item())
    assert factored_is_cheaper(384, 128, 12) and factored_is_cheaper(960, 768, 64)
    assert not factored_is_cheaper(4, 128, 12)  # a few tokens: building d x d through the factors costs more


@pytest.mark.parametrize("path", ["dense", "right"])
def test_mixphm_losses_through_the_factors_match_the_direct_ones(path, tiny_model, tiny_batch, monkeypatch):
    """The handle's redundancy loss (through the factors) against the direct formula on the same
    forward, for the dense path (W kept from the forward) and a fold path (W rebuilt)."""
    from workbench.methods import mixphm

    model = tiny_model("t5")
    handle = methods.apply(model, "mixphm", dropout=0.0)
    _paths(handle, path)
    model.train()
    torch.manual_seed(2)
    model(**tiny_batch(model, n=3))
    via_factors = handle.extra_losses()
    kept = [m.up.kept_weight is not None for m in handle.modules.values()]
    assert all(kept) if path == "dense" else not any(kept)
    monkeypatch.setattr(mixphm, "factored_is_cheaper", lambda *a: False)
    direct = handle.extra_losses()
    assert via_factors.keys() == direct.keys() == {"redundancy", "mi"}
    torch.testing.assert_close(via_factors["redundancy"], direct["redundancy"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(via_factors["mi"], direct["mi"])
