"""The empirical study: its grid (every cell applies to vlt5-tiny's shapes) and its analyses."""

import numpy as np
import pandas as pd
import pytest

from workbench.studies import empirical as study
from workbench.studies import get_study
from workbench.train import RunConfig, run


def test_grid():
    s = get_study("empirical")
    cfgs = s.configs()
    assert len(cfgs) == 5 * 4 * 5 * 2 * 3 + len(study.retrain_configs()) + len(study.claim_configs())
    cfgs = cfgs[:5 * 4 * 5 * 2 * 3]  # the grid the analyses read
    assert {c.pool_size for c in cfgs} == {10_000} and {c.task for c in cfgs} == set(study.TASKS)
    assert study.config("shapes-vqa", "lora", 16, 64).method_config == {"r": 16}
    # methods x tasks x middle sizes x N, but prefix tuning at one size and N (its checkpoints are large)
    assert sum(s.keep_weights(c) for c in cfgs) == 4 * 2 * 2 * 3 + 2
    assert {(c.n_shots, c.method_config["length"]) for c in cfgs if c.method == "prefix" and s.keep_weights(c)} \
        == {(64, 8)}
    with pytest.raises(ValueError, match="r must be one of"):
        study.config("shapes-vqa", "lora", 3, 64)
    with pytest.raises(ValueError, match="task must be"):
        study.config("coco", "lora", 4, 64)


def test_every_size_applies_to_the_embedded_backbone():
    from workbench import methods
    from workbench.models import load_backbone

    for method, (option, sizes) in study.SIZES.items():
        counts = []
        for size in (sizes[0], sizes[-1]):
            model = load_backbone("vlt5-tiny")
            methods.apply(model, method, **{option: size})
            counts.append(methods.count_parameters(model)["trainable"])
        assert counts[0] < counts[1], method


def test_table_and_monotonicity(tiny_backbone, tmp_path):
    for size in (1, 16):
        for n in (16, 32):
            run(RunConfig(backbone=str(tiny_backbone), task="shapes-vqa", method="lora", method_config={"r": size},
                          n_shots=n, max_steps=4, eval_every=4, batch_size=8, pool_size=64, test_size=16,
                          quiet=True, task_options={"n_scenes": 40}, lr=study.SHARED_LR.get("lora")),
                store=tmp_path)
    t = study.grid_table(tmp_path)
    assert len(t) == 4 and set(t["size"]) == {1, 16} and (t["trainable"] > 0).all()
    m = study.monotonicity(tmp_path)  # from real stored runs: both axes, each over the 4 runs
    assert list(m["axis"]) == ["n_shots", "size"] and (m["runs"] == 4).all()


def test_monotonicity_finds_a_planted_trend(monkeypatch):
    rng = np.random.default_rng(0)
    rows = [{"task": "shapes-vqa", "method": "lora", "n_shots": n, "size": s, "seed": seed,
             "test_acc": 0.1 * np.log(n) + rng.normal(0, 0.02)}
            for n in (16, 64, 250, 1000) for s in (1, 4, 16, 64) for seed in (13, 21, 42)]
    monkeypatch.setattr(study, "_results", lambda store: pd.DataFrame(rows))
    m = study.monotonicity(None).set_index("axis")
    assert m.loc["n_shots", "spearman"] > 0.9 and m.loc["n_shots", "ci_low"] > 0.8  # rises with N
    assert m.loc["size", "ci_low"] < 0 < m.loc["size", "ci_high"]  # no trend planted in size
    assert not m.loc["n_shots", "consistent"] and m.loc["n_shots", "runs"] == 48


def test_monotonicity_of_a_group_depends_on_its_runs_alone(monkeypatch):
    """One group's interval is the same whether or not another group has runs, and whatever order
    the store lists the runs in (each interval has its own generator and reads runs by hash)."""
    rng = np.random.default_rng(0)
    rows = [{"run": f"{m}-{n}-{s}-{seed}", "task": "shapes-vqa", "method": m, "n_shots": n, "size": s, "seed": seed,
             "test_acc": 0.05 * np.log(n) + rng.normal(0, 0.05)}
            for m in ("lora", "prompt") for n in (16, 64, 250) for s in (1, 4, 16) for seed in (13, 21, 42)]
    df = pd.DataFrame(rows)
    more = pd.DataFrame([{**r, "run": r["run"] + "-more", "n_shots": 1000} for r in rows if r["method"] == "prompt"])
    frames = {"one": df, "more": pd.concat([df, more]), "shuffled": df.sample(frac=1, random_state=3)}
    monkeypatch.setattr(study, "_results", lambda store: frames[store])
    lora = {k: study.monotonicity(k).query("method == 'lora'").reset_index(drop=True) for k in frames}
    pd.testing.assert_frame_equal(lora["one"], lora["more"])
    pd.testing.assert_frame_equal(lora["one"], lora["shuffled"])
    assert study.monotonicity("more").query("method == 'prompt'")["runs"].tolist() == [54, 54]


def _planted(task="shapes-caption"):
    rng = np.random.default_rng(1)
    rows = []
    for method, (option, sizes) in study.SIZES.items():
        for k, size in enumerate(sizes):
            for n in (16, 64, 250, 1000):
                for seed in (13, 21, 42):
                    # an interior optimum in size (k = 1 or 2 best), no effect of N, layer > embedding by 0.1
                    score = 0.5 - 0.05 * (k - 1.5) ** 2 + (0.1 if study.COMPOSITION[method] == "layer" else 0)
                    rows.append({"task": task, "method": method, "size": size, "n_shots": n, "seed": seed,
                                 "test_acc": score + rng.normal(0, 0.005), "dev_best": score + rng.normal(0, 0.005),
                                 "trainable": 100 * (k + 1) * (
                                     1 if study.COMPOSITION[method] == "layer" else 1.1),
                                 "composition": study.COMPOSITION[method]})
    return pd.DataFrame(rows)


def test_slope_optimum_and_composition_on_a_planted_grid(monkeypatch):
    monkeypatch.setattr(study, "_results", lambda store: _planted())
    sl = study.data_slope(None)
    # N does not matter here: small slopes, intervals that hold 0 (but for about 1 in 20 by chance)
    assert (sl["slope_per_decade"].abs() < 0.01).all()
    assert ((sl["ci_low"] < 0) & (sl["ci_high"] > 0)).mean() >= 0.85
    opt = study.size_optimum(None)
    assert opt["interior"].all() and opt["significant_interior"].all()
    comp = study.composition(None)
    assert (comp["layer_minus_embedding"] > 0.08).all() and (comp["ci_low"] > 0).all()
    assert (comp["layer_params"] / comp["embedding_params"]).between(0.8, 1.2).all()
    effect = study.composition_effect(None).set_index("embedding_method")
    assert list(effect.index) == ["prefix", "prompt"] and (effect["ci_low"] > 0.08).all()
    assert (effect["pairs"] == 4 * 4).all() and (effect["seeds"] == 3).all()


def test_size_trend_is_read_within_each_n(monkeypatch):
    """Larger sizes trained only at larger N, where scores are lower: pooled over N, size would look
    harmful; within each N it helps, and that is what monotonicity reports."""
    rng = np.random.default_rng(0)
    rows = [{"run": f"{n}-{s}-{seed}", "task": "shapes-vqa", "method": "lora", "n_shots": n, "size": s, "seed": seed,
             "test_acc": -0.3 * np.log(n) + 0.01 * np.log(s) + rng.normal(0, 0.001)}
            for n, sizes in ((16, (1, 4)), (64, (4, 16)), (250, (16, 64))) for s in sizes for seed in (13, 21, 42)]
    df = pd.DataFrame(rows)
    monkeypatch.setattr(study, "_results", lambda store: df)
    m = study.monotonicity(None).set_index("axis")
    from scipy import stats
    assert stats.spearmanr(np.log(df["size"]), df["test_acc"]).statistic < -0.5  # pooled: misleading
    assert m.loc["size", "spearman"] > 0.8 and m.loc["size", "ci_low"] > 0.5
    assert m.loc["n_shots", "spearman"] < -0.8  # within each size, N lowers the planted score


def test_size_optimum_picks_by_dev_and_an_end_can_beat_every_interior_size(monkeypatch):
    rows = []
    for seed, noise in ((13, 0.0), (21, 0.004), (42, -0.003)):
        for k, size in enumerate((1, 4, 16, 64)):
            # test: size 4 best; dev: size 16 best (the pick follows dev)
            rows.append({"task": "shapes-caption", "method": "lora", "n_shots": 64, "size": size, "seed": seed,
                         "test_acc": (0.9 if size == 4 else 0.5) + noise, "dev_best": (0.9 if size == 16 else 0.5),
                         "trainable": size, "composition": "layer"})
            # the largest size best on both, by far: an end beats every interior size
            rows.append({"task": "shapes-caption", "method": "lora", "n_shots": 250, "size": size, "seed": seed,
                         "test_acc": 0.5 + 0.1 * (size == 64) + noise * k, "dev_best": 0.5 + 0.1 * (size == 64),
                         "trainable": size, "composition": "layer"})
    monkeypatch.setattr(study, "_results", lambda store: pd.DataFrame(rows))
    opt = study.size_optimum(None).set_index("n_shots")
    assert opt.loc[64, "best_size"] == 16 and opt.loc[64, "interior"] and not opt.loc[64, "significant_interior"]
    assert opt.loc[250, "best_size"] == 64 and opt.loc[250, "end_beats_interior"]
    v = study.verdicts(None).set_index("finding").loc["on the consistent task an interior parameter size is best"]
    assert v["verdict"] == "not reproduced" and "1 an end significantly better" in v["workbench"]


def test_composition_matches_within_a_ratio_and_falls_back_to_the_next_nearest(monkeypatch):
    """prompt 2 (100 parameters): its nearest layer configuration (lora 1, 110) has no runs at N = 64,
    so the next nearest within 2x (houlsby 2, 150) pairs with it there; prefix 2 (10,000) has no layer
    configuration within 2x and is not compared."""
    rows = []
    for n in (16, 64):
        for (method, size, params, score) in (("prompt", 2, 100, 0.3), ("prefix", 2, 10_000, 0.9),
                                              ("lora", 1, 110, 0.5), ("houlsby", 2, 150, 0.6)):
            if method == "lora" and n == 64:
                continue
            for seed, e in ((13, 0.0), (21, 0.01), (42, -0.01)):
                rows.append({"task": "shapes-vqa", "method": method, "size": size, "n_shots": n, "seed": seed,
                             "test_acc": score + e, "dev_best": score, "trainable": params,
                             "composition": study.COMPOSITION[method]})
    monkeypatch.setattr(study, "_results", lambda store: pd.DataFrame(rows))
    comp = study.composition(None).set_index("n_shots")
    assert list(comp["embedding"]) == ["prompt 2", "prompt 2"]
    assert comp.loc[16, "layer"] == "lora 1" and comp.loc[64, "layer"] == "houlsby 2"
    assert study.unmatched(None) == {"prefix 2": 10_000}
    v = study.verdicts(None).set_index("finding").iloc[-1]
    assert "prefix 2 (0.01M): not compared" in v["workbench"] and v["verdict"] == "reproduced"


def test_representation_shift_reads_frozen_and_tuned_encoders(tiny_backbone, tmp_path):
    cfg = RunConfig(backbone=str(tiny_backbone), task="shapes-vqa", method="lora", method_config={"r": 16},
                    n_shots=16, max_steps=8, eval_every=4, batch_size=8, pool_size=64, test_size=16, quiet=True,
                    task_options={"n_scenes": 40}, lr=0.05)
    run(cfg, store=tmp_path)
    shift = study.representation_shift(tmp_path, max_samples=16)
    assert list(shift["point"]) == ["encoder.final"]  # one encoder layer: only the final output
    assert 0 < shift["cka_frozen_tuned"].iloc[0] < 1  # LoRA moved the encoder, but not to noise


def test_verdicts_on_planted_grids(monkeypatch):
    """The caption grid planted flat in N with an interior optimum and layer > embedding; the VQA grid
    planted rising in N and in size: every finding reproduced."""
    caption = _planted("shapes-caption")
    vqa = _planted("shapes-vqa")
    rng = np.random.default_rng(2)
    k = vqa.groupby("method")["size"].rank(method="dense")
    vqa["test_acc"] = 0.2 + 0.05 * np.log(vqa["n_shots"]) + 0.03 * k + 0.1 * (vqa["composition"] == "layer") \
        + rng.normal(0, 0.005, len(vqa))
    monkeypatch.setattr(study, "_results", lambda store: pd.concat([caption, vqa], ignore_index=True))
    v = study.verdicts(None).set_index("finding")
    assert len(v) == 5 and (v["verdict"] == "reproduced").all(), v[["workbench", "verdict"]].to_string()
    assert "20 of 20 flat" in v.loc["on the consistent task data size stops mattering", "workbench"]
    # the caption grid made to rise with N: data still matters there
    caption["test_acc"] = caption["test_acc"] + 0.1 * np.log10(caption["n_shots"])
    monkeypatch.setattr(study, "_results", lambda store: pd.concat([caption, vqa], ignore_index=True))
    v = study.verdicts(None).set_index("finding")
    assert v.loc["on the consistent task data size stops mattering", "verdict"] == "not reproduced"
    # falling with N contradicts "data stops mattering" as much as rising does
    caption["test_acc"] = caption["test_acc"] - 0.2 * np.log10(caption["n_shots"])
    monkeypatch.setattr(study, "_results", lambda store: pd.concat([caption, vqa], ignore_index=True))
    v = study.verdicts(None).set_index("finding")
    assert v.loc["on the consistent task data size stops mattering", "verdict"] == "not reproduced"
    assert "0 of 20 flat (20 not reproduced)" in v.loc["on the consistent task data size stops mattering", "workbench"]


def test_analyses_of_an_empty_store(monkeypatch):
    monkeypatch.setattr(study, "_results", lambda store: pd.DataFrame())
    for f in (study.monotonicity, study.data_slope, study.size_optimum, study.composition,
              study.composition_effect):
        assert f(None).empty, f.__name__
    assert study.unmatched(None) == {}
    assert (study.verdicts(None)["verdict"] == "inconclusive").all()


def test_partial_cells_and_stray_seeds(monkeypatch):
    """A cell still missing its largest size has no optimum row (its best of three would look
    interior); a pair with an extra seed does not shrink the seeds the composition effect averages."""
    df = _planted()
    part = df[~((df["n_shots"] == 16) & (df["method"] == "lora") & (df["size"] == 64))]
    stray = df[(df["method"].isin(["prompt", "houlsby"])) & (df["size"] == 2) & (df["n_shots"] == 64)
               & (df["seed"] == 13)].assign(seed=7)
    monkeypatch.setattr(study, "_results", lambda store: pd.concat([part, stray], ignore_index=True))
    opt = study.size_optimum(None)
    assert not ((opt["method"] == "lora") & (opt["n_shots"] == 16)).any() and len(opt) == 5 * 4 - 1
    comp = study.composition(None)
    assert (comp["seeds"] == 4).sum() == 1  # prompt 2 and houlsby 2 at N = 64 share the stray seed
    effect = study.composition_effect(None)
    assert (effect["seeds"] == 3).all() and (effect["pairs"] == 16).all()


def test_verdicts_without_runs(monkeypatch):
    monkeypatch.setattr(study, "_results", lambda store: pd.DataFrame(
        columns=["task", "method", "size", "n_shots", "seed", "test_acc", "trainable", "composition"]))
    v = study.verdicts(None)
    assert len(v) == 5 and (v["verdict"] == "inconclusive").all()


def test_grid_table_reads_a_caption_metric(monkeypatch):
    df = _planted("shapes-caption").assign(**{"test/BLEU-4": 0.25})
    df = pd.concat([df, _planted("shapes-vqa")], ignore_index=True)
    monkeypatch.setattr(study, "_results", lambda store: df)
    bleu = study.grid_table(None, metric="BLEU-4")
    assert set(bleu["task"]) == {"shapes-caption"} and np.allclose(bleu["mean"], 0.25)
    assert set(study.grid_table(None)["task"]) == set(study.TASKS)
    with pytest.raises(ValueError, match="metric must be one of"):
        study.grid_table(None, metric="METEOR")
    assert study.metric_column("shapes-vqa", None) == "test_acc"
    with pytest.raises(ValueError, match="shapes-vqa is scored with"):
        study.metric_column("shapes-vqa", "BLEU-4")


def test_tasks_are_read_by_kind():
    """ShapesWorld's tasks and real ones (run with --task coco-caption / vqa-v2) alike: captions are
    the consistent task, VQA the inconsistent one, each with its metrics."""
    assert study.consistent("shapes-caption") and study.consistent("coco-caption")
    assert not study.consistent("shapes-vqa") and not study.consistent("vqa-v2") and not study.consistent("gqa")
    assert study.metrics_of("coco-caption") == ("CIDEr-D", "BLEU-4")
    assert study.metric_column("coco-caption", "BLEU-4") == "test/BLEU-4"
    assert study.metric_column("vqa-v2", None) == "test_acc"
    with pytest.raises(ValueError, match="scored with"):
        study.metric_column("vqa-v2", "BLEU-4")
    with pytest.raises(ValueError, match="caption or VQA task"):
        study.metrics_of("no-such-task")


def test_results_keep_only_the_grid(monkeypatch):
    """A shared run store holds other studies' runs: LoRA at its default rank or a method outside the
    five is not a cell of this grid; a real caption task is."""
    import workbench.train as train

    rows = pd.DataFrame([
        {"run": "a", "task": "shapes-vqa", "method": "lora", "method_config": {"r": 4}, "lr": study.shared_lr("lora")},
        {"run": "b", "task": "shapes-vqa", "method": "lora", "method_config": {}, "lr": study.shared_lr("lora")},  # rank 8
        {"run": "c", "task": "shapes-vqa", "method": "full", "method_config": {}},
        {"run": "d", "task": "coco-caption", "method": "prompt", "method_config": {"length": 8}},
        {"run": "e", "task": "shapes-vqa", "method": "houlsby", "method_config": {"bottleneck": 16}},
    ])
    monkeypatch.setattr(train, "load_results", lambda store: rows)
    df = study._results(train.RunStore.__new__(train.RunStore))
    assert list(df["run"]) == ["a", "d"] and list(df["size"]) == [4, 8]
    assert list(df["composition"]) == ["layer", "embedding"]


def test_results_keep_the_shared_learning_rate(monkeypatch):
    """The lr check's runs (empirical_lr) share the store: only the lr the study's runs of a method
    share (its default, or SHARED_LR while a changed default's runs are not re-trained) is a grid cell."""
    import workbench.train as train

    shared = study.shared_lr("lora", {"r": 4})
    rows = pd.DataFrame([
        {"run": "a", "task": "shapes-vqa", "method": "lora", "method_config": {"r": 4}, "lr": None},  # the default
        {"run": "b", "task": "shapes-vqa", "method": "lora", "method_config": {"r": 4}, "lr": shared / 3},
        {"run": "c", "task": "shapes-vqa", "method": "lora", "method_config": {"r": 4}, "lr": shared},
        {"run": "d", "task": "shapes-vqa", "method": "parallel", "method_config": {"bottleneck": 8}, "lr": np.nan},
    ])
    monkeypatch.setattr(train, "load_results", lambda store: rows)
    store = train.RunStore.__new__(train.RunStore)
    at_default = shared == train.RunConfig(method="lora").default_lr()
    assert list(study._results(store)["run"]) == (["a"] if at_default else []) + ["c", "d"]
    got = study._results(store, default_lr_only=False)
    assert list(got["run"]) == ["a", "b", "c", "d"]
    assert got["lr"].iloc[0] == train.RunConfig(method="lora").default_lr() and got["lr"].iloc[2] == shared
    assert list(got["retrain"]) == [not at_default, False, False, False]  # a retrain_configs() run


def test_the_retrain_configs_are_the_pinned_cells_at_the_current_default():
    cfgs = study.retrain_configs()
    cells = [c for c in study.empirical_configs() if c.method in study.SHARED_LR and c.lr is not None]
    assert len(cfgs) == len(cells) == 4 * 2 * 5 * 3 * len(study.SHARED_LR)
    assert all(c.lr is None and c.method in study.SHARED_LR for c in cfgs)
    assert {c.replace(lr=study.SHARED_LR[c.method]).hash for c in cfgs} == {c.hash for c in cells}
    assert [c.n_shots for c in cfgs] == sorted(c.n_shots for c in cfgs)  # the cheapest first
    grid = study.empirical_configs()
    assert grid[600:600 + len(cfgs)] == cfgs  # after the grid the analyses read, before the claim seeds


def test_the_claim_configs_are_the_caption_pairs_at_the_extra_seeds():
    cfgs = study.claim_configs()
    assert len(cfgs) == len(study.CLAIM_CONFIGS) * len(study.N_SHOTS) * 2
    assert {c.seed for c in cfgs} == set(study.CLAIM_SEEDS) - set(study.STUDY_SEEDS) == {87, 100}
    assert {c.task for c in cfgs} == {"shapes-caption"}
    assert [c.n_shots for c in cfgs] == sorted(c.n_shots for c in cfgs)  # whole N first, the cheapest first
    assert {(c.method, study.size_of(c.method, c.method_config)) for c in cfgs} == set(study.CLAIM_CONFIGS)
    assert study.empirical_configs()[-len(cfgs):] == cfgs
    assert not {c.hash for c in cfgs} & {c.hash for c in study.empirical_configs()[:600]}


def test_the_claim_configs_are_the_pairs_the_bundle_matches():
    """If a default changed the trainable counts, the caption pairs would change: the extra seeds
    must then follow them."""
    from workbench.studies import load_study

    comp = study.composition(load_study("empirical"))
    comp = comp[comp["task"] == study.CLAIM_TASK]
    pairs = {tuple(x.split()) for x in set(comp["embedding"]) | set(comp["layer"])}
    assert {(m, int(s)) for m, s in pairs} == set(study.CLAIM_CONFIGS)


def test_the_extra_seeds_enter_composition_alone(monkeypatch):
    """Seeds beyond STUDY_SEEDS (the caption pairs' fourth and fifth) are read by the composition
    test and by nothing else: the grid's other analyses compare cells on the same three seeds."""
    df = _planted()
    extra = df[df["method"].isin(["prompt", "houlsby"]) & (df["seed"] == 13)].assign(
        seed=87, test_acc=lambda d: d["test_acc"] + 5 * (d["method"] == "houlsby"))
    grid_analyses = (study.grid_table, study.data_slope, study.size_optimum, study.monotonicity)
    monkeypatch.setattr(study, "_results", lambda store: df)
    on_three = [f(None) for f in grid_analyses]
    monkeypatch.setattr(study, "_results", lambda store: pd.concat([df, extra], ignore_index=True))
    for f, expected in zip(grid_analyses, on_three):
        pd.testing.assert_frame_equal(f(None), expected)
    comp = study.composition(None)  # here every prompt and prefix configuration's partner is houlsby's
    assert set(comp["layer"].str.split().str[0]) == {"houlsby"}
    assert (comp["seeds"] == np.where(comp["embedding"].str.startswith("prompt"), 4, 3)).all()
    effect = study.composition_effect(None).set_index("embedding_method")
    assert effect.loc["prompt", "seeds"] == 4 and effect.loc["prefix", "seeds"] == 3
    three = study.composition_effect(None, seeds=study.STUDY_SEEDS).set_index("embedding_method")
    assert (three["seeds"] == 3).all() and (three["pairs"] == effect["pairs"]).all()
    assert three.loc["prefix"].equals(effect.loc["prefix"])
    assert effect.loc["prompt", "layer_minus_embedding"] > three.loc["prompt", "layer_minus_embedding"] + 1


def test_the_grid_spells_out_a_shared_lr():
    for cfg in study.empirical_configs()[:200:7]:
        assert cfg.lr == study.SHARED_LR.get(cfg.method)
        assert cfg.replace(lr=None).hash == cfg.hash or cfg.method in study.SHARED_LR


def test_verdicts_at_one_n_say_a_slope_needs_two(monkeypatch):
    one_n = _planted()
    monkeypatch.setattr(study, "_results", lambda store: one_n[one_n["n_shots"] == 16])
    row = study.verdicts(None).set_index("finding").loc["on the consistent task data size stops mattering"]
    assert row["verdict"] == "inconclusive" and "needs runs at two N" in row["workbench"]
    assert "nan" not in row["workbench"]
