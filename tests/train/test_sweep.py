"""Sweeps: grid expansion and its checks, sweep (resume, failures, executors), summarize / compare."""

import math
import sys

import pandas as pd
import pytest

from workbench.train import (
    RunConfig,
    RunStore,
    compare,
    grid,
    load_run,
    summarize,
    sweep,
)
from workbench.train import sweeps as sweep_module

T_975_DF2 = 4.302652729911275  # Student's t, 0.975 quantile, 2 degrees of freedom


@pytest.fixture
def tiny(small_config):
    """The trainer tests' small config cut to 2 optimiser steps (about a second a run)."""
    return small_config.replace(max_steps=2)


# ------------------------------------------------------------------------------------------ grid
def test_grid_expands_fields_and_method_options_in_order():
    base = RunConfig(max_steps=16, method_config={"alpha": 16})
    cfgs = grid(base, n_shots=[16, 64], seed=(13, 21), method_config__r=[4, 8], lr=1e-3)
    assert len(cfgs) == 8
    assert [(c.n_shots, c.seed, c.method_config["r"]) for c in cfgs] == [
        (n, s, r) for n in (16, 64) for s in (13, 21) for r in (4, 8)]
    assert all(c.lr == 1e-3 and c.max_steps == 16 and c.method_config["alpha"] == 16 for c in cfgs)  # merged
    assert base.method_config == {"alpha": 16}  # the base is not changed
    # a list-valued option is wrapped to be one value; unwrapped it is an axis
    one = grid(base, method_config__targets=[["q", "v"]])
    assert len(one) == 1 and one[0].method_config["targets"] == ["q", "v"]
    assert len(grid(base, method_config__targets=[["q", "v"], ["q", "k", "v", "o"]])) == 2
    # other dict fields, and whole-field axes
    t = grid(RunConfig(max_steps=16), task_options__types=[["exist"], ["count"]], method=["lora", "full"])
    assert [(c.task_options["types"], c.method) for c in t] == [
        (["exist"], "lora"), (["exist"], "full"), (["count"], "lora"), (["count"], "full")]
    assert grid(base) == [base]


def test_grid_rejects_bad_axes_before_running():
    base = RunConfig(max_steps=16)
    with pytest.raises(ValueError, match=r"unknown axis 'shots'.*n_shots.*method_config__r"):
        grid(base, shots=[16])
    with pytest.raises(ValueError, match=r"method_config__r is not an option of method 'houlsby'.*reduction_factor"):
        grid(base, method=["lora", "houlsby"], method_config__r=[4, 8])
    with pytest.raises(ValueError, match=r"method_config__rank is not an option of method 'lora'.*\br\b"):
        grid(base, method_config__rank=[4])
    with pytest.raises(ValueError, match=r"unknown method 'lorra'.*lora"):
        grid(base, method=["lora", "lorra"])
    with pytest.raises(ValueError, match=r"'n_shots': 0.*n_shots must be a positive int"):
        grid(base, n_shots=[16, 0])
    with pytest.raises(ValueError, match=r"'method_config__r': -1"):
        grid(base, method_config__r=[-1])
    with pytest.raises(ValueError, match="axis 'seed' is empty"):
        grid(base, seed=[])


# ----------------------------------------------------------------------------------------- sweep
def test_sweep_records_failures_goes_on_and_resumes(tiny, tmp_path):
    store = RunStore(tmp_path / "store")
    bad = tiny.replace(seed=21, task_options={**tiny.task_options, "target": "bogus"})
    configs = grid(tiny, seed=[13, 21], method_config__r=4) + [bad, tiny.replace(method_config={"r": 4})]
    landed = []
    df = sweep(configs, store=store, progress=False, on_run=lambda c, h, r: landed.append((c, h, store.is_finished(h))))
    assert df["status"].tolist() == ["done", "done", "failed", "reused"]  # the last repeats the first
    # on_run: once per run trained now, after it is in the store; not for the failure or the repeat
    assert landed == [(configs[0], configs[0].hash, True), (configs[1], configs[1].hash, True)]
    assert "task_options['target']" in df["error"][2] and df["error"][2].startswith("ValueError")
    assert df["error"][[0, 1, 3]].isna().all() and math.isnan(df["test_acc"][2])
    assert df["run"].tolist() == [c.hash for c in configs]
    assert df["method_config__r"].tolist() == [4, 4, 8, 4]  # the lora default, resolved, for the bad one
    for col in ("test_acc", "test_acc_last", "dev_best", "trainable_pct", "wall_s", "acc/exist", "seed", "n_shots"):
        assert col in df.columns
    assert df["test_acc"][1] == load_run(df["run"][1], store).metrics["test"]["overall"]
    assert (df["trainable_pct"][[0, 1]] > 0).all()

    again = sweep(configs, store=store, progress=True, on_run=lambda *a: landed.append(a))  # with the bar
    assert again["status"].tolist() == ["reused", "reused", "failed", "reused"]
    assert len(landed) == 2  # nothing trained, nothing reported
    pd.testing.assert_series_equal(again["test_acc"], df["test_acc"])
    pd.testing.assert_series_equal(again["wall_s"], df["wall_s"])  # the stored run's own time

    with pytest.raises(ValueError, match="target"):
        sweep([bad], store=store, progress=False, raise_on_error=True)


def test_sweep_checks_the_store_and_executor_first(tiny, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OSError, match="not writable"):
        sweep([tiny], store=blocker / "runs", progress=False)
    with pytest.raises(ValueError, match="executor must be one of"):
        sweep([tiny], executor="threads", store=tmp_path / "s", progress=False)
    with pytest.raises(TypeError, match="on_run must be a callable"):
        sweep([tiny], store=tmp_path / "s", progress=False, on_run="log")
    assert not (tmp_path / "s").exists()


def test_ray_missing_says_how_to_install(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ImportError, match="pip install ray"):
        sweep([tiny], executor="ray", store=tmp_path / "s", progress=False)


def _same_runs(df_a, store_a, df_b, store_b):
    assert df_a["run"].tolist() == df_b["run"].tolist()
    for col in ("test_acc", "test_acc_last", "dev_best", "trainable_pct"):
        assert df_a[col].tolist() == pytest.approx(df_b[col].tolist(), abs=1e-6), col
    for h in df_a["run"]:
        la = [r["loss"] for r in load_run(h, store_a).history]
        lb = [r["loss"] for r in load_run(h, store_b).history]
        assert la == pytest.approx(lb, rel=1e-4)


def test_processes_executor_gives_the_local_metrics(tiny, tmp_path):
    configs = grid(tiny, seed=[13, 21])
    local = sweep(configs, store=tmp_path / "local", progress=False)
    landed = []
    procs = sweep(configs, executor="processes", workers=2, store=tmp_path / "procs", progress=False,
                  on_run=lambda c, h, r: landed.append(h))
    assert procs["status"].tolist() == ["done", "done"]
    assert sorted(landed) == sorted(c.hash for c in configs)  # in the driver, in the order they finish
    assert procs["quiet"].tolist() == [True, True]
    _same_runs(local, RunStore(tmp_path / "local"), procs, RunStore(tmp_path / "procs"))


def test_local_executor_runs_at_the_threads_asked_for(tiny, tmp_path):
    """``threads`` holds for the local executor too (it was ignored: a local 1-thread sweep trained
    at the process's count, other floats than the bundles' 1-thread runs), and is restored after."""
    import torch

    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    df = sweep([tiny], store=tmp_path / "s", threads=want, progress=False)
    assert df["status"].tolist() == ["done"]
    assert load_run(df["run"].iloc[0], tmp_path / "s").timings["numerics"]["threads"] == want
    assert torch.get_num_threads() == before
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads must be a positive int"):
            sweep([tiny], store=tmp_path / "t", threads=bad, progress=False)
    assert not (tmp_path / "t").exists()


# The Ray executor: tests/train/test_sweep_ray.py.


# ------------------------------------------------------------------------------------ statistics
@pytest.fixture
def results():
    """Two methods x two N x three seeds, a failed row, and a group with one seed."""
    rows = []
    acc = {("a", 16): [0.6, 0.7, 0.9], ("b", 16): [0.5, 0.6, 0.7], ("a", 64): [0.8, 0.8, 0.8], ("b", 64): [0.7, 0.6, 0.8]}
    for (m, n), vals in acc.items():
        for seed, v in zip((13, 21, 42), vals):
            rows.append({"method": m, "n_shots": n, "seed": seed, "method_config__r": 4, "status": "done", "test_acc": v})
    rows.append({"method": "a", "n_shots": 16, "seed": 87, "method_config__r": 4, "status": "failed", "test_acc": float("nan")})
    rows.append({"method": "a", "n_shots": 500, "seed": 13, "method_config__r": 4, "status": "done", "test_acc": 0.9})
    rows.append({"method": "a", "n_shots": 16, "seed": 13, "method_config__r": 8, "status": "reused", "test_acc": 0.1})
    return pd.DataFrame(rows)


def test_summarize_against_hand_values(results):
    s = summarize(results[results["method_config__r"] == 4])
    assert s[["method", "n_shots", "n"]].values.tolist() == [["a", 16, 3], ["a", 64, 3], ["a", 500, 1],
                                                             ["b", 16, 3], ["b", 64, 3]]
    b16 = s.iloc[3]
    assert b16["mean"] == pytest.approx(0.6) and b16["std"] == pytest.approx(0.1)
    half = T_975_DF2 * 0.1 / math.sqrt(3)
    assert (b16["ci_low"], b16["ci_high"]) == pytest.approx((0.6 - half, 0.6 + half))
    a64 = s.iloc[1]
    assert a64["std"] == pytest.approx(0, abs=1e-12) and a64["ci_low"] == pytest.approx(0.8) == a64["ci_high"]
    assert math.isnan(s.iloc[2]["std"]) and math.isnan(s.iloc[2]["ci_low"])
    by_r = summarize(results, by="method_config__r")
    assert by_r["n"].tolist() == [13, 1]  # the failed row is left out


def test_compare_paired_against_hand_values(results):
    with pytest.raises(ValueError, match="several rows"):  # r=4 and r=8 both have seed 13 at N=16
        compare(results, "a", "b")
    c = compare(results, {"method": "a", "method_config__r": 4}, "b")
    assert c["n_shots"].tolist() == [16, 64] and c["n"].tolist() == [3, 3]
    # N=16: differences 0.1, 0.1, 0.2 -> mean 2/15, sd 1/sqrt(300), t = 4, p = 1 - 4 / sqrt(18)
    r16 = c.iloc[0]
    sd = 1 / math.sqrt(300)
    assert r16["mean_diff"] == pytest.approx(2 / 15) and r16["std_diff"] == pytest.approx(sd)
    assert r16["t"] == pytest.approx(4.0) and r16["p"] == pytest.approx(1 - 4 / math.sqrt(18))
    half = T_975_DF2 * sd / math.sqrt(3)
    assert (r16["ci_low"], r16["ci_high"]) == pytest.approx((2 / 15 - half, 2 / 15 + half))
    # N=64: differences 0.1, 0.2, 0.0 -> mean 0.1, sd 0.1, t = sqrt(3)
    r64 = c.iloc[1]
    assert r64["mean_diff"] == pytest.approx(0.1) and r64["t"] == pytest.approx(math.sqrt(3))
    from scipy.stats import ttest_rel

    ref = ttest_rel([0.8, 0.8, 0.8], [0.7, 0.6, 0.8])
    assert r64["p"] == pytest.approx(ref.pvalue)
    # by=None pools everything (pairs on N and seed); b - a flips the sign
    with pytest.raises(ValueError, match=r"several rows for \{'seed': 13\}"):
        compare(results, {"method": "a", "method_config__r": 4}, "b", by=None)
    pooled = compare(results, {"method": "a", "method_config__r": 4}, "b", by=None, pair_on=("n_shots", "seed"))
    assert pooled["n"].tolist() == [6]
    assert compare(results, "b", {"method": "a", "method_config__r": 4})["mean_diff"].tolist() == pytest.approx(
        [-2 / 15, -0.1])
    with pytest.raises(ValueError, match="not a column"):
        compare(results, {"methd": "a"}, "b")


def test_t_distribution_without_scipy_matches_scipy():
    from scipy.stats import t as student_t

    for df in (1, 2, 3, 4, 7, 10, 30):
        assert sweep_module._t_ppf_fallback(0.975, df) == pytest.approx(student_t.ppf(0.975, df), rel=1e-9)
        for t in (0.3, 1.0, 2.5, 6.0):
            assert sweep_module._t_sf2(t, df) == pytest.approx(2 * student_t.sf(t, df), rel=1e-9, abs=1e-15)


def test_a_damaged_run_in_the_store_is_trained_again_not_fatal(tiny, tmp_path):
    from workbench.train import DamagedRunWarning

    first = sweep([tiny], store=tmp_path / "runs", progress=False)
    (tmp_path / "runs" / first["run"][0] / "metrics.json").write_text("{trunc")
    with pytest.warns(DamagedRunWarning, match="metrics.json"):
        again = sweep([tiny], store=tmp_path / "runs", progress=False)
    assert again["status"].tolist() == ["done"] and again["test_acc"][0] == first["test_acc"][0]
    assert sweep([tiny], store=tmp_path / "runs", progress=False)["status"].tolist() == ["reused"]
