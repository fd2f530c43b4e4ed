"""The PETAL study: its grids and what its analyses read from a store of tiny runs."""

import numpy as np
import pytest

from workbench.studies import get_study
from workbench.studies import petal as study
from workbench.train import RunConfig, run


def test_grids_and_labels():
    s = get_study("petal")
    assert len(study.few_shot_configs()) == 4 * 3 * 5
    # 17 settings besides the default (whose runs are the few-shot grid's at N = 64); the two the
    # verdicts read over five seeds, the rest over three
    assert len(s.configs()) == 60 + 17 * 3 + 2 * 2
    assert [study.ablation_seeds(a, v) for a, v in study.CLAIM_ABLATIONS] == [study.FEW_SHOT_SEEDS] * 2
    assert study.ablation_seeds("experts K", 2) == study.STUDY_SEEDS == (13, 21, 42)
    assert study.ablation_config("threshold", "frozen").method_config == {"learn_threshold": False}
    assert study.ablation_config("rank (Tucker)", 64).method_config == {"form": "tucker"}
    assert study.ablation_config("rank (CP)", 64).hash == RunConfig(task="shapes-vqa", method="petal", quiet=True).hash
    for axis, values in study.ABLATIONS.items():
        for v in values:
            mc = study.ablation_config(axis, v).method_config
            assert study.ablation_label(mc) == (("default", "default") if not mc else (axis, v))
    assert sum(s.keep_weights(c) for c in s.configs()) == 18
    with pytest.raises(ValueError, match="IB weight must be one of"):
        study.ablation_config("IB weight", 0.2)


@pytest.fixture(scope="module")
def store(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("petal-store")
    base = tiny_base
    for seed in (13, 21):
        for method, mc in (("petal", {}), ("petal", {"moe": False, "w_ib": 0.0}), ("petal", {"w_ib": 0.0}), ("lora", {}),
                           ("full", {})):
            run(base.replace(method=method, seed=seed, method_config=mc), store=root)
    return root


def test_few_shot_ablations_and_verdicts(store):
    fs = study.few_shot(store)
    assert list(fs["method"]) == ["petal", "lora", "full"] and (fs["n"] == 2).all()
    vs = study.versus(store)
    assert list(vs["against"]) == ["lora", "full"]
    abl = study.ablations(store)
    assert set(zip(abl["axis"], abl["value"])) >= {("mixture", "off"), ("IB weight", 0.0)}
    assert np.isfinite(abl["diff_ci_low"]).all()
    v = study.verdicts(store)
    assert list(v["claim"]) == ["PETAL trains about 0.5 % of the parameters", "PETAL beats full fine-tuning",
                                "PETAL beats LoRA at few shots", "the instruction mixture (and the bottleneck that reads it) helps",
                                "the information bottleneck helps"]


def test_mode_gates_and_routing(store):
    g = study.mode_gates(store)
    assert set(g["step"]) == {4, 8} and g["mode"].nunique() == 64 and g["gate"].between(0, 1).all()
    per_type, stats, test = study.routing(store)
    assert per_type.shape[1] == 4 and np.allclose(per_type.sum(1), 1.0)
    assert 0 <= test["p"] <= 1 or np.isnan(test["p"])
    assert test["n"] == 24 and "entropy" in " ".join(stats)


def test_information_estimates_mi_per_ib_weight(store):
    info = study.information(store, mi_steps=60, components=4)
    assert list(info["w_ib"]) == [0.1, 0.0]  # the IB weights the store holds, in the ablation's order
    assert (info["n"] == 24).all() and (info["acc_n"] == 2).all()
    assert (info["h_answer"] > 0).all()
    for est in ("infonce", "nwj"):
        assert np.isfinite(info[f"mi_{est}"]).all()
    # InfoNCE is a lower bound capped at log(batch): never above the answers' entropy by more than noise
    assert (info["mi_infonce"] <= info["h_answer"] + 0.1).all()


def test_mode_usage_per_matrix(store):
    shares, summary = study.mode_usage(store)
    assert summary["point"].nunique() == len(summary) and len(shares) == 64 * len(summary)
    assert np.allclose(shares.groupby("point")["share"].sum(), 1.0)
    assert summary["modes_for_mass"].between(1, 64).all()
    assert (summary["participation"] >= 1).all() and (summary["participation"] <= 64 + 1e-6).all()
    assert study.mode_usage(store, method_config={"rank": 4, "form": "tucker"}) == (None, None)
