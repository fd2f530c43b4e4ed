"""The lr check of the empirical study: its grid and its analyses on planted runs."""

import numpy as np
import pandas as pd

from workbench.studies import empirical, get_study
from workbench.studies import empirical_lr as study


def test_grid():
    cfgs = get_study("empirical-lr").configs()
    extra = sum(study.base_lr(m) != empirical.shared_lr(m) for m in study.METHODS) * 4  # a base that is not shared
    # LoRA also at its base x 3, the parallel adapter / 30
    assert len(cfgs) == (3 * 4 * 2 + 4 + 4 + extra) * 3 == (108 if extra else 96)
    assert {(c.task, c.n_shots, c.pool_size) for c in cfgs} == {("shapes-vqa", 1000, 10_000)}
    assert {c.method for c in cfgs} == set(study.METHODS)
    base, shared = study.base_lr, empirical.shared_lr
    for c in cfgs:  # base / 3 and / 10, the extensions and the base, never the shared lr (the empirical bundle's)
        ratios = [1 / d for d in study.LR_DIVISORS] + list(study.LR_EXTENSIONS.get(c.method, ())) + [1.0]
        assert min(abs(c.lr / base(c.method) - f) for f in ratios) < 1e-9
        assert abs(c.lr - shared(c.method)) > 1e-12
    lora = sorted({round(c.lr, 12) for c in cfgs if c.method == "lora"})
    trained_at = [3e-4, 1e-3, 3e-3, 9e-3] if extra else [3e-4, 1e-3, 9e-3]  # the lrs its runs trained at
    assert np.allclose(lora, trained_at, rtol=1e-9, atol=0)
    assert {c.method for c in cfgs if c.lr > base(c.method) * 1.01} == {"lora"}
    assert {c.method for c in cfgs if c.lr < base(c.method) / 10 * 0.99} == {"parallel"}
    assert not {c.hash for c in cfgs} & set(get_study("empirical").hashes())
    assert [c.seed for c in cfgs[:len(cfgs) // 3]] == [13] * (len(cfgs) // 3)  # whole seeds first


def _planted():
    """LoRA at N = 1000: at the default lr (0.003) the largest rank falls behind; at lr / 3 it is best;
    x 3 (0.009) is too high for every rank."""
    rng = np.random.default_rng(0)
    rows = []
    for size in (1, 4, 16, 64):
        for lr, score in ((0.003, 0.66 - (0.15 if size == 64 else 0)), (0.001, 0.64 + 0.02 * np.log2(size) / 3),
                          (0.0003, 0.6), (0.009, 0.55)):
            for seed in (13, 21, 42):
                acc = score + rng.normal(0, 0.004)
                rows.append({"run": f"{size}-{lr}-{seed}", "task": "shapes-vqa", "n_shots": 1000, "method": "lora",
                             "method_config": {"r": size}, "size": size, "seed": seed,
                             "lr": lr, "default_lr": lr == 0.003, "test_acc": acc, "dev_best": acc + 0.03})
    df = pd.DataFrame(rows)  # as empirical._results gives them: the lr resolved, the default flagged
    return df[df["default_lr"]], df[~df["default_lr"]]


def _patch(monkeypatch):
    main, lr = _planted()
    monkeypatch.setattr(study, "_results", lambda store, default_lr_only=True: main if store == "main" else lr)


def test_lr_table_picks_each_size_by_dev(monkeypatch):
    _patch(monkeypatch)
    t = study.lr_table("lr", main="main")
    assert len(t) == 16 and (t["seeds"] == 3).all()
    assert sorted(set(t["lr_divisor"])) == [0.3333, 1, 3, 10]
    assert set(t.loc[t["default_lr"], "lr"]) == {0.003}
    chosen = t[t["chosen"]].set_index("size")["lr"]
    assert chosen[64] == 0.001 and chosen[1] == 0.003


def test_size_trend_and_verdict_with_a_learning_rate_per_size(monkeypatch):
    _patch(monkeypatch)
    trend = study.size_trend("lr", main="main").set_index("lr")
    assert trend.loc["default", "spearman"] < 0 and trend.loc["default", "best_size"] != 64
    assert trend.loc["per size", "ci_low"] > 0 and trend.loc["per size", "best_size"] == 64
    row = study.verdicts("lr", main="main").iloc[0]
    assert row["verdict"] == "reproduced" and "lora +" in row["workbench"] and "shared default lr" in row["workbench"]


def test_a_size_picked_at_the_top_lr_leaves_the_trend_inconclusive(monkeypatch):
    """Without the x 3 arm, ranks 1 and 4 pick the highest lr tried (the default): a higher one might
    lift them, so the rising trend is not called reproduced; with the x 3 arm, which they do not
    pick, it is."""
    main, lr = _planted()
    below = lr[lr["lr"] < 0.003]
    monkeypatch.setattr(study, "_results", lambda store, default_lr_only=True: main if store == "main" else below)
    assert study.size_trend("lr", main="main").set_index("lr").loc["per size", "ci_low"] > 0  # still rising
    row = study.verdicts("lr", main="main").iloc[0]
    assert row["verdict"] == "inconclusive" and "lowest lr tried, so maybe under-tuned: lora 1, 4" in row["workbench"]
    monkeypatch.setattr(study, "_results", lambda store, default_lr_only=True: main if store == "main" else lr)
    row = study.verdicts("lr", main="main").iloc[0]
    assert row["verdict"] == "reproduced" and "under-tuned" not in row["workbench"]
    # rank 4 picking the lowest lr tried is an edge too
    low = lr.assign(dev_best=np.where((lr["size"] == 4) & (lr["lr"] == 0.0003), 0.9, lr["dev_best"]))
    monkeypatch.setattr(study, "_results", lambda store, default_lr_only=True: main if store == "main" else low)
    row = study.verdicts("lr", main="main").iloc[0]
    assert row["verdict"] == "inconclusive" and "under-tuned: lora 4" in row["workbench"]


def test_without_runs(monkeypatch):
    monkeypatch.setattr(study, "_results", lambda store, default_lr_only=True: pd.DataFrame())
    assert study.lr_table("lr", main="main").empty and study.size_trend("lr", main="main").empty
    row = study.verdicts("lr", main="main").iloc[0]
    assert row["verdict"] == "inconclusive" and row["workbench"] == "no runs yet"


def test_learning_rates_are_compared_over_the_seeds_they_share(monkeypatch):
    """A partial bundle: lr / 3 has seed 13 only. Over all seeds the default's mean dev (0.633) is below
    lr / 3's seed 13 (0.68), but on seed 13 the default is better (0.70): the default is picked."""
    rows = [{"run": f"d{seed}", "seed": seed, "lr": 0.003, "dev_best": dev} for seed, dev in
            ((13, 0.70), (21, 0.60), (42, 0.60))] + [{"run": "t13", "seed": 13, "lr": 0.001, "dev_best": 0.68}]
    df = pd.DataFrame(rows).assign(task="shapes-vqa", n_shots=1000, method="lora", method_config=[{"r": 4}] * 4,
                                   size=4, test_acc=0.6)
    df["default_lr"] = df["lr"] == 0.003
    main, lr = df[df["default_lr"]], df[~df["default_lr"]]
    monkeypatch.setattr(study, "_results", lambda store, default_lr_only=True: main if store == "main" else lr)
    t = study.lr_table("lr", main="main").set_index("lr_divisor")
    assert t.loc[1, "chosen"] and not t.loc[3, "chosen"]
    assert t.loc[1, "seeds"] == 3 and t.loc[3, "seeds"] == 1


def test_size_trend_does_not_depend_on_where_the_runs_are_read_from(monkeypatch):
    """The same runs read from one run store (every lr together, in hash order) or from the two
    bundles (the lr check's runs, then the main study's) give the same correlations and intervals."""
    main, lr = _planted()
    both = pd.concat([main, lr]).sample(frac=1, random_state=1)  # another order of the same rows
    monkeypatch.setattr(study, "_results", lambda store, default_lr_only=True:
                        {"main": main, "lr": lr}.get(store, both if default_lr_only is False else main))
    split = study.size_trend("lr", main="main")
    together = study.size_trend("store", main="store")
    pd.testing.assert_frame_equal(split, together)


def test_size_trend_of_a_method_depends_on_its_runs_alone(monkeypatch):
    """Adding LoRA's runs leaves the Houlsby adapter's interval as it was (a generator per row;
    LoRA's rows come first)."""
    main, lr = _planted()
    houlsby = main.assign(method="houlsby", run=main["run"] + "-h")
    monkeypatch.setattr(study, "_results", lambda store, default_lr_only=True: {
        "houlsby": houlsby, "both": pd.concat([houlsby, main]), "lr": lr}[store])
    alone = study.size_trend("lr", main="houlsby")
    beside = study.size_trend("lr", main="both")
    assert list(beside["method"].unique()) == ["lora", "houlsby"]
    pd.testing.assert_frame_equal(alone[alone["method"] == "houlsby"].reset_index(drop=True),
                                  beside[beside["method"] == "houlsby"].reset_index(drop=True))
