"""Routing statistics at known extremes, the chi-square test for gate-less routers, expert similarity."""

import math

import numpy as np
import pytest
import torch

from workbench.probes import DegenerateInputWarning, cka, expert_similarity, routing_stats

E, T = 8, 800


def test_uniform_router():
    probs = torch.full((T, E), 1.0 / E, dtype=torch.float64)
    assign = torch.arange(T) % E  # perfectly balanced assignments
    st = routing_stats(probs=probs, assignments=assign)
    assert st["balance_loss"].item() == pytest.approx(1.0)
    assert st["token_entropy"].item() == pytest.approx(math.log(E))
    assert st["marginal_entropy"].item() == pytest.approx(math.log(E))
    assert st["cv2_importance"].item() == pytest.approx(0.0, abs=1e-12)
    assert st["cv2_load"].item() == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(st["utilisation"], torch.full((E,), 1.0 / E, dtype=torch.float64))
    assert torch.allclose(st["importance"], torch.full((E,), T / E, dtype=torch.float64))


def test_collapsed_router():
    probs = torch.zeros(T, E, dtype=torch.float64)
    probs[:, 3] = 1.0
    st = routing_stats(probs=probs)
    assert st["balance_loss"].item() == pytest.approx(E)
    assert st["token_entropy"].item() == 0.0 and st["marginal_entropy"].item() == 0.0
    # population variance: CV^2 of a one-hot vector is E - 1
    assert st["cv2_importance"].item() == pytest.approx(E - 1)
    assert st["cv2_load"].item() == pytest.approx(E - 1)
    assert st["load"][3].item() == T


def test_zero_logits_z_loss_and_gradients():
    logits = torch.zeros(T, E, requires_grad=True)
    st = routing_stats(logits=logits)
    assert st["z_loss"].item() == pytest.approx(math.log(E) ** 2)
    assert st["token_entropy"].item() == pytest.approx(math.log(E))
    # the losses are differentiable: usable inside a training objective
    (st["z_loss"] + st["balance_loss"]).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    logits2 = torch.randn(T, E, dtype=torch.float64)
    lse = torch.logsumexp(logits2, -1)
    assert routing_stats(logits=logits2)["z_loss"].item() == pytest.approx((lse**2).mean().item())


def test_top_k_coactivation_and_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((T, E))
    st = routing_stats(logits=logits, top_k=2)
    C = st["coactivation"]
    assert isinstance(C, np.ndarray) and C.shape == (E, E)
    assert np.allclose(C, C.T) and np.isclose(np.trace(C), 2.0)  # each token picks 2 experts
    top2 = np.argsort(-logits, 1)[:, :2]
    i, j = 1, 5
    both = np.mean([(i in row) and (j in row) for row in top2])
    assert C[i, j] == pytest.approx(both)
    assert st["utilisation"].sum() == pytest.approx(1.0)
    assert isinstance(st["balance_loss"], float)


def test_gateless_draws_chi_square():
    uniform = routing_stats(draws=np.array([250, 248, 255, 247]))
    skewed = routing_stats(draws=np.array([700, 100, 100, 100]))
    assert uniform["p_value"] > 0.5
    assert skewed["p_value"] < 1e-10
    assert skewed["marginal_entropy"] < uniform["marginal_entropy"] <= math.log(4)
    from scipy.stats import chisquare

    assert skewed["chi2"] == pytest.approx(chisquare([700, 100, 100, 100]).statistic)


def test_expert_similarity():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((60, 16))
    outs = [base, base @ np.linalg.qr(rng.standard_normal((16, 16)))[0], rng.standard_normal((60, 16))]
    w = [rng.standard_normal((4, 4)) for _ in range(3)]
    res = expert_similarity(outs, weights=w, merged_output=sum(outs) / 3)
    assert res["cka"][0, 1] == pytest.approx(1.0)  # rotated copy of the same expert
    assert res["cka"][0, 2] == pytest.approx(cka(outs[0], outs[2]))
    assert res["weight_distance"][0, 2] == pytest.approx(np.linalg.norm(w[0] - w[2]))
    assert res["merged_gap"][2] == pytest.approx(np.linalg.norm(sum(outs) / 3 - outs[2]) / np.linalg.norm(outs[2]))
    assert res["merged_cka"].shape == (3,)


def test_bad_inputs_raise():
    probs = torch.full((10, 4), 0.25)
    with pytest.raises(ValueError, match="give probs or logits"):
        routing_stats()
    with pytest.raises(ValueError, match="probs must be non-negative"):
        routing_stats(probs=torch.randn(10, 4))
    with pytest.raises(ValueError, match="probs contains NaN"):
        routing_stats(probs=torch.full((10, 4), float("nan")))
    with pytest.raises(ValueError, match="logits must be 2-D"):
        routing_stats(logits=torch.zeros(2, 10, 4))
    with pytest.raises(ValueError, match="assignments"):
        routing_stats(probs=probs, assignments=torch.full((10,), 7))
    with pytest.raises(ValueError, match="assignments"):
        routing_stats(probs=probs, assignments=torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="top_k"):
        routing_stats(probs=probs, top_k=5)
    with pytest.raises(ValueError, match="draws"):
        routing_stats(draws=np.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="draws cannot be combined"):
        routing_stats(probs=probs, draws=np.array([1, 2]))
    with pytest.raises(ValueError, match="outputs"):
        expert_similarity([np.zeros((5, 2))])
    with pytest.raises(ValueError, match=r"outputs\[1\]"):
        expert_similarity([np.ones((5, 2)), np.ones((6, 2))])


def test_degenerate_warns():
    with pytest.warns(DegenerateInputWarning):
        st = routing_stats(draws=np.zeros(4))
    assert np.isnan(st["p_value"])
    rng = np.random.default_rng(2)
    with pytest.warns(DegenerateInputWarning, match="constant"):
        res = expert_similarity([rng.standard_normal((10, 3)), np.ones((10, 3))])
    assert np.isnan(res["cka"][0, 1])
