# needs: results/empirical
# needs: results/empirical-lr
# %% [markdown]
# # 07 · Data size × parameter size, on a task consistent with pre-training and on one that is not
#
# The empirical study of PEFT on vision-language models (arXiv 2403.08433) trains prompt tuning,
# prefix tuning, LoRA, the serial adapter and the parallel adapter at several sizes and amounts of
# data, and finds that how performance depends on both depends on whether the downstream task is
# **consistent with pre-training**. The embedded world was built for this question: vlt5-tiny was
# pre-trained on captions only, so `shapes-caption` is consistent with its pre-training and
# `shapes-vqa` is not.
#
# The **empirical study** (`workbench/studies/empirical.py`, bundle `results/empirical/`): 5 methods
# × 4 sizes (prompt and prefix length 2 … 128, LoRA rank 1 … 64, adapter bottleneck 2 … 128) × N ∈
# {16, 64, 250, 1000, 4000} × both tasks × 3 seeds, pools of 10,000 examples; captions scored with
# CIDEr-D, VQA with accuracy. Every method trains at its default learning rate (LoRA at 1.5e-3: its
# 120 runs were re-trained when its default was halved from 3e-3). The configurations the
# composition test pairs on captions run on the protocol's five seeds (`study.claim_configs()`,
# § 3); every other analysis reads the grid's three.

# %%
%matplotlib inline
import warnings

import matplotlib.pyplot as plt
import pandas as pd

from workbench.studies import load_study, verify_study
from workbench.studies import empirical as study
from workbench.studies import empirical_lr as lr_check
from workbench.train import run
from workbench.utils import seed_everything
from workbench.viz.panels import EmpiricalPanel
from workbench.viz.study_plots import (lr_label, plot_accuracy_vs_n, plot_lr_by_size, plot_score_heatmaps,
                                       plot_score_vs_size)

seed_everything(0, threads=2)
warnings.filterwarnings("ignore", message=".*(CUDA extension|boft_n_butterfly_factor).*")
pd.set_option("display.width", 140)
FIGURES = "../figures"

store = load_study("empirical")
print(f"the empirical bundle: {store.completeness}")

# %% [markdown]
# ## 1 · The grid
#
# Mean ± std over seeds of the headline score (CIDEr-D for captions, accuracy for VQA) per task,
# method, size and N, with each configuration's trainable parameters.

# %%
grid = study.grid_table(store)
grid.round(3)

# %% [markdown]
# **Is the bundle still what the code produces?** One cheap cell (LoRA rank 4 on `shapes-vqa` at
# N = 16, seed 13) is re-trained now and compared with the bundle: exactly when this machine matches
# the one that trained it (CPU model, torch, threads, pinned numerics), within a tolerance
# otherwise. `verify_study` raises if the run does not reproduce.

# %%
# NBVAL_IGNORE_OUTPUT
cheap = study.config("shapes-vqa", "lora", 4, n_shots=16, seed=13)
if store.is_finished(cheap.hash):
    report = verify_study("empirical", runs=[cheap.hash])
    print(report.summary())
    report.raise_if_failed()
else:
    print("the bundle does not hold this cell yet: nothing to verify")

# %% [markdown]
# ## 2 · Performance against N (one line per size) and against size (one line per N)

# %%
for task in study.TASKS:
    part = grid[grid["task"] == task]
    if part.empty:
        continue
    metric = study.METRICS[task][0]
    for method in study.SIZES:
        m = part[part["method"] == method]
        if m.empty:
            continue
        t = m.assign(method=[f"{method} {s}" for s in m["size"]])
        fig = plot_accuracy_vs_n(t, highlight=None, title=f"{task}: {method} — {metric} against N, one line per size")
        plt.show()
        if m["size"].nunique() > 1:
            fig = plot_score_vs_size(m, ylabel=metric,
                                     title=f"{task}: {method} — {metric} against parameters, one line per N")
            plt.show()

# %% [markdown]
# The same grid as heat maps, N × size per method (the colour scale is shared by the methods of a
# task), and BLEU-4 for the captions beside CIDEr-D.

# %%
for task in study.TASKS:
    part = grid[grid["task"] == task]
    if len(part):
        fig = plot_score_heatmaps(part, title=f"{task}: mean {study.METRICS[task][0]}, N x parameter size")
        fig.savefig(f"{FIGURES}/07_heatmap_{task}.png", dpi=100, bbox_inches="tight")
        plt.show()
bleu = study.grid_table(store, metric="BLEU-4")
if len(bleu):
    fig = plot_score_heatmaps(bleu, title="shapes-caption: mean BLEU-4, N x parameter size")
    plt.show()

# %% [markdown]
# ## 3 · The findings, tested
#
# - **Monotonicity** (inconsistent task): Spearman's correlation of the score with log N within each
#   size, and with log size within each N (the mean of the per-stratum correlations), with a
#   bootstrap interval that resamples runs within each stratum. Holding the other axis fixed keeps
#   the large effect of N from swamping, or faking, a trend in size.
# - **Data stops mattering** (consistent task): the slope of the score per tenfold N, fitted per seed
#   (a seed's smaller splits are prefixes of its larger ones, so its runs are not independent), with
#   the t-interval over seeds.
# - **An interior size is best** (consistent task): the size the **dev** score picks, and whether its
#   test score beats both ends paired over seeds (picking and testing on the same numbers would
#   favour the pick); or, when the pick is an end, whether it beats every interior size.
# - **Layer composition beats embedding composition** at about equal parameters: each prompt or
#   prefix configuration paired over seeds with the nearest LoRA or adapter configuration within 2x
#   its trainable parameters, then tested once per task and embedding method: per seed, the mean of
#   its pairs' differences, and the interval over seeds (one test each, instead of dozens of pairs
#   with three seeds, some of which would come out significant by chance). On vlt5-tiny prefix tuning
#   trains about 1.4 M parameters, most of them its reparameterisation MLP, 2.7x the largest layer
#   configuration: it has no partner within 2x, so the test covers prompt tuning.

# %%
study.monotonicity(store).round(3)

# %%
study.data_slope(store).round(3)

# %%
study.size_optimum(store).round(3)

# %%
study.composition(store).drop(columns="by_seed").round(3)

# %%
print("not matched within 2x:", study.unmatched(store))
study.composition_effect(store).round(3)

# %% [markdown]
# On captions the pairs' configurations (prompt tuning at its four lengths, the parallel adapter
# with bottleneck 2, LoRA rank 4) were trained on two more seeds, 87 and 100, because three seeds
# left this comparison open with a small seeds-to-settle estimate. The table above reads the seeds
# most pairs have, and only the pairs that have all of them. The same test on the grid's three
# seeds, the reading before the extension:

# %%
study.composition_effect(store, seeds=study.STUDY_SEEDS).round(3)

# %% [markdown]
# ## 4 · Why: how far each method moves the encoder
#
# Linear CKA between the frozen backbone's and the tuned model's encoder representation per layer,
# for the seed-13 runs the bundle keeps weights of (N = 16, 64 and 1000, the middle sizes; prefix
# tuning only at N = 64 and length 8, its checkpoints being large).

# %%
shift = study.representation_shift(store, max_samples=256)
if len(shift):
    display(shift.pivot_table(index=["task", "method", "size", "n_shots"], columns="layer",
                              values="cka_frozen_tuned").round(2))

# %% [markdown]
# ## 5 · One cell, live
#
# Method, task, metric, N, parameter size and seed: **run** shows the cell's run from the bundle, or
# trains it now when neither the bundle nor the run store holds it (about a minute at N = 64), with
# the cell's mean ± std over the seeds the bundle holds. The widget needs a live kernel.

# %%
# NBVAL_IGNORE_OUTPUT
panel = EmpiricalPanel(runner=lambda cfg: run(cfg, store=store), store=store)
panel.widget()

# %% [markdown]
# ## 6 · Size, or the learning rate?
#
# Every size of a method trains at one shared learning rate: the method's default, tuned at N = 64
# on its default size. On VQA at N = 1000 the largest adapter bottlenecks fall behind (§ 2), with a
# training loss that stalls, which could be the size or that learning rate. The **lr check**
# (`workbench/studies/empirical_lr.py`, bundle `results/empirical-lr/`) trains LoRA and the two
# adapters at their four sizes there with other learning rates too, over the same seeds: the
# adapters at their default / 3 and / 10 (the parallel adapter also / 30), LoRA at 3e-4, 1e-3, 3e-3
# and 9e-3 (its grid was scaled from 3e-3, its default when the check was designed, and extended
# where a size's pick sat at the edge of the first grid, since a pick at the edge is not an optimum).
# Each size gets the learning rate its **dev** score picks (the mean over seeds of the best
# validation accuracy; the test score is never used to choose). The default-lr runs are the
# empirical bundle's. Does performance then rise with size?

# %%
lr_store = load_study("empirical-lr")
print(f"the lr-check bundle: {lr_store.completeness}")
lrs = lr_check.lr_table(lr_store, main=store)
display(lrs.pivot_table(index=["method", "size"], columns="lr_divisor", values="test").round(3)
        .rename(columns=lr_label))
fig = plot_lr_by_size(lrs)
fig.savefig(f"{FIGURES}/07_lr_by_size.png", dpi=110, bbox_inches="tight")
plt.show()

# %%
lr_check.size_trend(lr_store, main=store).round(3)

# %% [markdown]
# ## 7 · Verdict
#
# Finding by finding, the paper's wording beside what the embedded world shows. **Every verdict is
# over the runs the bundle holds** (the first cell says how many; a partial bundle gives verdicts
# that can change as its runs arrive, and `python -m workbench.studies status empirical` says what is
# missing). A finding tested in
# several places (methods, sizes, N) is reproduced only where every test reproduces it and not
# reproduced as soon as one contradicts it. "Data stops mattering" is a claim of no effect: it counts
# as reproduced where the 95 % interval of the slope per tenfold N lies within ± 5 % of the mean
# score, and as not reproduced where it lies wholly above or below that band. The last row re-tests
# the size finding on VQA at N = 1000 with a learning rate per size (§ 6), over the runs the
# lr-check bundle holds; a method with a size below its largest picked at the highest or the lowest
# lr tried is inconclusive there (an lr beyond it might lift that size).

# %%
with pd.option_context("display.max_colwidth", 260):
    display(pd.concat([study.verdicts(store), lr_check.verdicts(lr_store, main=store)], ignore_index=True))

# %% [markdown]
# **What would settle it.** "Performance rises with parameter size" on VQA is not reproduced at one
# learning rate per method and reproduced once each size has its own (the last row): the finding
# holds, the shared defaults do not suit the largest sizes. One finding stays inconclusive, and
# more seeds decided another.
#
# - An interior size is best on captions: from N = 1000 the four sizes of every method lie within
#   about 0.15 CIDEr-D of each other, which three seeds cannot order; more seeds in the cells from
#   N = 250 on (seeds added to the study's grid, trained with `--filter n_shots=250,1000,4000`) are
#   the test.
# - Layer against embedding composition: on VQA layer composition wins (+0.310 [+0.269, +0.351]). On
#   captions three seeds left it open (+0.137 [-0.066, +0.340] over 20 pairs; about 5 seeds for an
#   80 % chance of an interval that excludes zero if the mean and spread held:
#   `workbench.studies.seeds_to_settle`). The pairs' configurations went to five seeds, and over the
#   20 pairs layer composition wins there too (+0.141 [+0.057, +0.225]), as the estimate predicted.
#   The lead shrinks as N grows: at N = 4000 prompt lengths 8 and 32 beat the parallel adapter they
#   are paired with (§ 3's pair table), and the mean stays positive through LoRA rank 4 against
#   prompt length 128. Whether layer composition still leads beyond N = 4000 on captions is the
#   open part; larger N on the same pairs would test it. Prefix
#   tuning, whose reparameterisation MLP trains 1.39 to 1.44 M parameters, has no layer configuration
#   within 2x of it. Layer configurations of that size, or prefix tuning with `reparam=False` (the
#   prefixes trained directly), would give it partners.
