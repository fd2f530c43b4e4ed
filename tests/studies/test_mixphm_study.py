"""The MixPHM study: its grids, what its bundle keeps, and its analyses on a store of tiny runs."""

import numpy as np
import pytest

from workbench.studies import get_study
from workbench.studies import mixphm as study
from workbench.train import RunConfig, run


def test_grids():
    s = get_study("mixphm")
    table = study.table_configs()
    assert len(table) == 8 * 6 * 5
    assert {c.method for c in table} == set(study.TABLE_METHODS)
    abl = study.ablation_configs()
    # the official setting of every axis is the table's run (same hash): 15 distinct settings x 5 seeds
    assert len({c.hash for c in abl}) == 15 * 5
    assert study.ablation_config("num_experts", 4).hash == RunConfig(task="shapes-vqa", method="mixphm",
                                                                     quiet=True).hash
    assert study.ablation_config("regularisers", "none").method_config == {"w_red": 0.0, "w_mi": 0.0}
    assert study.ablation_config("reg_weight", 0.5).method_config == {"w_red": 0.5, "w_mi": 0.5}
    assert len(s.configs()) == 240 + 14 * 5
    kept = [c for c in s.configs() if s.keep_weights(c)]
    # 6 table methods (not full) at seed 13, mixphm with/without regularisers on 5 seeds, and the
    # other 13 ablation settings at seed 13
    assert sorted((c.method, c.seed, bool(c.method_config)) for c in kept) == sorted(
        [(m, 13, False) for m in study.PEFT_METHODS if m != "mixphm"]
        + [("mixphm", s_, False) for s_ in study.TABLE_SEEDS] + [("mixphm", s_, True) for s_ in study.TABLE_SEEDS]
        + [("mixphm", 13, True)] * 13)
    with pytest.raises(ValueError, match="unknown ablation axis"):
        study.ablation_config("experts", 2)
    with pytest.raises(ValueError, match="regularisers must be"):
        study.ablation_config("regularisers", "red")


@pytest.fixture(scope="module")
def store(tiny_base, tmp_path_factory):
    """Tiny runs at N = 64: full, houlsby and MixPHM (default, no regularisers, 2 experts) on two seeds."""
    root = tmp_path_factory.mktemp("mixphm-store")
    base = tiny_base
    for seed in (13, 21):
        for method, mc in (("full", {}), ("houlsby", {}), ("mixphm", {"bottleneck": 4}),
                           ("mixphm", {"bottleneck": 4, "num_experts": 2}),
                           ("mixphm", {"bottleneck": 4, "w_red": 0.0, "w_mi": 0.0})):
            run(base.replace(method=method, seed=seed, method_config=mc), store=root)
    return root


def test_table_and_versus(store, monkeypatch):
    # the tiny runs carry a bottleneck: let the table read them as the defaults
    monkeypatch.setattr(study, "_table_rows", lambda df: df[df["method_config"].apply(
        lambda v: v in ({}, {"bottleneck": 4}))])
    t = study.table(store)
    assert list(t["method"]) == ["full", "houlsby", "mixphm"] and (t["n"] == 2).all()
    v = study.versus(store)
    assert list(v["against"]) == ["full fine-tuning", "best other PEFT (houlsby)"]
    assert (v["n"] == 2).all() and np.isfinite(v["mean_diff"]).all()


def test_redundancy_merges_and_routing(store, monkeypatch):
    monkeypatch.setattr(study, "_weighted_runs", _tiny_weighted_runs)
    red = study.redundancy(store, methods=("houlsby", "mixphm"), max_samples=16, n_perm=19, n_boot=10, mi=False)
    assert set(red["method"]) == {"houlsby", "mixphm", "mixphm (no reg.)"}
    assert set(red["state"]) == {"init", "trained"}
    # the official inits (torch's default Linear, Glorot PHM) contribute from the start: measurable
    assert red["value"].notna().all()
    init, trained = (red[red.state == s].reset_index(drop=True) for s in ("init", "trained"))
    assert not np.allclose(init["value"], trained["value"])
    assert trained["value"].notna().all() and (trained["null_lo"] <= trained["null_hi"]).all()
    m = study.merges(store, seeds=(13,))
    assert list(m["route"]) == list(study.ROUTES[:3]) + ["expert 0", "expert 1", "expert 2", "expert 3"]
    official = m[m.route == "official soup"].iloc[0]
    assert official["test_acc"] == official["stored"]  # the restored model scores what the run scored
    r = study.routing(store)
    assert set(r["method"]) == {"mixphm"} and (r["total"] == 8).all()  # one draw per training step
    assert r["p"].between(0, 1).all()


def _tiny_weighted_runs(store, method, seeds=(13,), method_config=None):
    from workbench.train import load_results, load_run

    mc = {"bottleneck": 4, **(method_config or {})} if method == "mixphm" else (method_config or {})
    df = load_results(store)
    sel = df[(df.method == method) & df.seed.isin(seeds) & df.method_config.apply(lambda v: v == mc)]
    return [load_run(h, store) for h in sel.sort_values("seed")["run"]]


def test_ablation_labels():
    assert study._ablation_label({}) == ("official", "official")
    assert study._ablation_label({"w_red": 0.0, "w_mi": 0.0}) == ("regularisers", "none")
    assert study._ablation_label({"w_red": 0.5, "w_mi": 0.5}) == ("reg_weight", 0.5)
    assert study._ablation_label({"num_experts": 8}) == ("num_experts", 8)


def test_ablation_redundancy(store):
    # the tiny runs all carry a bottleneck: each is read as an ablation of that option
    a = study.ablation_redundancy(store, max_samples=16)
    assert set(a["stack"]) == {"encoder", "decoder"} and set(a["target"]) == {"pretrained", "task"}
    assert len(a) == 3 * 2 * 2 * 2  # three settings x stacks x measures x targets
    assert a["mean"].notna().all()


def test_experts_and_verdicts(store, monkeypatch):
    monkeypatch.setattr(study, "_weighted_runs", _tiny_weighted_runs)
    e = study.experts(store)
    assert list(e["point"]) == ["encoder.0.ffn", "decoder.0.ffn"]
    assert e["cka_between"].between(0, 1 + 1e-9).all() and (e["weight_distance"] > 0).all()
    assert (e["soup_gap"] > 0).all()
    monkeypatch.setattr(study, "_table_rows", lambda df: df[df["method_config"].apply(
        lambda v: v in ({}, {"bottleneck": 4}))])
    red = study.redundancy(store, methods=("houlsby", "mixphm"), states=("trained",), max_samples=16, n_perm=0,
                           n_boot=0, mi=False, seeds=(13, 21))
    v = study.verdicts(store, red)
    assert len(v) == 5 and set(v["verdict"]) <= {"reproduced", "not reproduced", "inconclusive"}
    assert v["claim"].iloc[0].startswith("MixPHM beats full") and "N=64" in v["workbench"].iloc[0]
    assert "over 2 seeds" in v["workbench"].iloc[3]


def test_experts_verdict_row(monkeypatch):
    """The "more experts help, up to a point" row: K = 4 against K = 1 and K = 8 against K = 4, paired
    over the seeds; reproduced only when both go the claimed way."""
    import pandas as pd

    empty = pd.DataFrame(columns=["n_shots", "against", "n", "mean_diff", "ci_low", "ci_high", "p"])
    monkeypatch.setattr(study, "versus", lambda store: empty)
    seeds = [13, 21, 42]

    def accs(k1, k4, k8):
        return {1: pd.Series(k1, index=seeds), 4: pd.Series(k4, index=seeds), 8: pd.Series(k8, index=seeds)}

    monkeypatch.setattr(study, "_experts_accuracy", lambda store: accs([.30, .31, .32], [.40, .42, .41],
                                                                       [.35, .36, .36]))
    row = study.verdicts(None).iloc[-1]
    assert row["claim"].startswith("more experts help") and row["verdict"] == "reproduced"
    assert "4 - 1 experts = +0.100" in row["workbench"] and "(n=3)" in row["workbench"]
    monkeypatch.setattr(study, "_experts_accuracy", lambda store: accs([.50, .51, .52], [.40, .42, .41],
                                                                       [.35, .36, .36]))
    assert study.verdicts(None).iloc[-1]["verdict"] == "not reproduced"
    monkeypatch.setattr(study, "_experts_accuracy", lambda store: {4: pd.Series([.4] * 3, index=seeds)})
    assert not study.verdicts(None)["claim"].str.startswith("more experts").any()
