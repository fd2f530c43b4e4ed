"""The VL-PET study: its grids and what its analyses read from a store of tiny runs."""

import numpy as np
import pytest

from workbench.studies import get_study
from workbench.studies import vlpet as study
from workbench.train import RunConfig, run


def test_grids():
    s = get_study("vlpet")
    cost = study.cost_configs()
    # 8 configurations x 4 N x 3 seeds, and VL-PET large, full fine-tuning and the adapter (the open
    # claims' runs) on two more seeds
    assert len(cost) == (4 + 4) * 4 * 3 + 3 * 4 * 2
    five = {(c.method, c.n_shots) for c in cost if c.seed in (87, 100) and not c.method_config}
    assert five == {(m, n) for m in ("vlpet", "full", "houlsby") for n in study.COST_N}
    assert study.vlpet_config("large").hash == RunConfig(task="shapes-vqa", method="vlpet", quiet=True).hash
    assert study.vlpet_config("small").method_config == {"granularity": "small"}
    # transfer: 4 methods x 3 N x 3 seeds; compacter and houlsby at N = 16, 64, 1000 are also cost runs
    # + no gate: 4 N x 3 seeds
    # + designs: 3 x 3 seeds, the full decoder on 2 more
    assert len(s.configs()) == 120 + 9 + 2 + 36 - 2 * 3 * 3 + 4 * 3
    assert len(study.no_gate_configs()) == 12
    assert {c.method_config["granularity"] for c in study.no_gate_configs()} == {"none"}
    kept = [c for c in s.configs() if s.keep_weights(c)]
    assert sorted(study.label(c.method, c.method_config) for c in kept) == sorted(
        ["vlpet-large", "vlpet-middleX", "vlpet-middleY", "vlpet-small", "vlpet-none", "houlsby+g+lw", "compacter+g+lw",
         "vlpet-large (encoder only)", "vlpet-large (value adapter only)", "vlpet-large (encoder + full decoder)"])
    with pytest.raises(ValueError, match="granularity must be"):
        study.vlpet_config("medium")


@pytest.fixture(scope="module")
def store(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("vlpet-store")
    base = tiny_base
    for seed in (13, 21):
        for g in study.GRANULARITIES:
            run(base.replace(method="vlpet", seed=seed, method_config={} if g == "large" else {"granularity": g}),
                store=root)
        for m in ("full", "houlsby", "houlsby+g+lw"):
            run(base.replace(method=m, seed=seed), store=root)
        run(base.replace(method="vlpet", seed=seed, method_config={"decoder_design": "none"}), store=root)
        run(base.replace(method="vlpet", seed=seed, method_config={"decoder_design": "full"}), store=root)
        run(base.replace(method="vlpet", seed=seed, method_config={"granularity": "none"}), store=root)
    return root


def test_table_versus_transfer_and_verdicts(store):
    t = study.table(store)
    assert list(t["method"]) == ["vlpet-large", "vlpet-middleX", "vlpet-middleY", "vlpet-small", "vlpet-none",
                                 "full", "houlsby"]
    assert (t["n"] == 2).all()
    v = study.versus(store)
    assert set(v["b"]) == {"vlpet-middleX", "vlpet-middleY", "vlpet-small", "full", "houlsby"}
    assert (v["a"] == "vlpet-large").all() and (v["n"] == 2).all()
    tr = study.transfer(store)
    assert list(zip(tr["a"], tr["b"])) == [("houlsby+g+lw", "houlsby")]
    ng = study.no_gate(store)
    assert list(ng["a"]) == [f"vlpet-{g}" for g in study.GRANULARITIES] and (ng["b"] == "vlpet-none").all()
    dec = study.decoder_versus(store)
    assert list(zip(dec["a"], dec["b"])) == [("vlpet-large", "vlpet-large (encoder + full decoder)")]
    assert dec.loc[0, "n"] == 2
    verdicts = study.verdicts(store)
    assert list(verdicts["claim"].str[:24]) == ["the large gate beats the", "every granularity beats ",
                                                "the lightweight decoder ", "VL-PET (large) beats ful",
                                                "VL-PET (large) beats the", "+G + LW improves Compact"]
    assert "no runs yet" not in set(verdicts["workbench"]) and set(verdicts["verdict"]) <= {"reproduced", "not reproduced", "inconclusive"}


def test_designs(store):
    d = study.designs(store)
    assert list(d["design"]) == ["encoder + value adapter (default)", "encoder only", "encoder + full decoder"]
    assert d.loc[0, "diff_vs_default"] == 0 and (d["n"] == 2).all()
    assert d.loc[1, "trainable_pct"] < d.loc[0, "trainable_pct"]


def test_gates_and_redundancy(store):
    g = study.gates(store, max_samples=16)
    assert set(g["method"]) == {"vlpet-large", "vlpet-middleX", "vlpet-middleY", "vlpet-small", "houlsby+g+lw"}
    # one row per gated encoder module (the tiny model: 1 layer x 2 sub-layers)
    assert g.groupby("method").size().eq(2).all()
    sig = g[g["method"] != "vlpet-middleY"]
    assert sig["gate_q05"].between(0, 1).all() and sig["gate_q95"].between(0, 1).all()  # sigmoid gates
    assert (g["gate_q05"] <= g["gate_q50"]).all() and (g["gate_q50"] <= g["gate_q95"]).all()
    assert np.isfinite(g["gate_moves_H"]).all() and (g["module_moves_H"] > 0).all()
    red = study.redundancy(store, max_samples=16, n_perm=9, n_boot=5)
    assert set(red["stack"]) == {"encoder"} and red["method"].nunique() == 5
    assert {"null_lo", "ci_hi"} <= set(red.columns)
