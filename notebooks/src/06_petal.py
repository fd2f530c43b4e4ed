# %% [markdown]
# # 06 · PETAL: mode approximation, the instruction mixture-of-experts and its routing
#
# PETAL (arXiv 2312.12458) writes the updates of every q/k/v/o projection of the model as one
# low-rank tensor: R shared **modes** (CP form), each weighted per matrix, with a learnable
# **threshold** that switches weak modes off. On top, an **instruction mixture-of-experts** routes each
# question through K experts mixed with learned instruction templates, and an **information
# bottleneck** loss keeps the instruction representation informative about the answer. It claims
# about 0.5 % of the parameters, accuracy above full fine-tuning, and a few-shot advantage.
#
# The released code differs from the paper (no threshold, experts averaged uniformly, no loss of
# its own): the workbench implements both, `variant="paper"` (the default, the paper's reading) and
# `variant="released"`. This notebook reads the **petal study** (`workbench/studies/petal.py`, bundle
# `results/petal/`):
#
# 1. few-shot accuracy against LoRA, VL-PET and full fine-tuning;
# 2. mode approximation: modes R, CP vs Tucker, the threshold (frozen, and over training);
# 3. the instruction mixture: experts, templates, routing per question type;
# 4. the information bottleneck: its weight, accuracy and what the instruction knows of the answer;
# 5. a widget; 6. the verdict table.

# %%
%matplotlib inline
import warnings

import matplotlib.pyplot as plt
import pandas as pd

from workbench.studies import load_study
from workbench.studies import petal as study
from workbench.train import run
from workbench.utils import seed_everything
from workbench.viz.panels import PETALPanel
from workbench.viz.study_plots import (
    plot_ablations,
    plot_accuracy_vs_n,
    plot_information,
    plot_mode_gates,
    plot_mode_usage,
    plot_type_routing,
)

seed_everything(0, threads=2)
warnings.filterwarnings("ignore", message=".*(CUDA extension|boft_n_butterfly_factor).*")
pd.set_option("display.width", 140)
FIGURES = "../figures"

store = load_study("petal")
print(f"the petal bundle: {store.completeness}")

# %% [markdown]
# ## 1 · Few-shot: PETAL against LoRA, VL-PET and full fine-tuning
#
# Mean ± std over the protocol's five seeds (13, 21, 42, 87, 100) at N ∈ {16, 64, 1000}, the trainable share of the language model,
# and PETAL minus each method paired over seeds. On vlt5-tiny (1.4 M parameters) PETAL's default
# R = 64 modes are a larger share than the paper's 0.5 % of a billion-parameter model.

# %%
few = study.few_shot(store)
few.round(3)

# %%
if len(few):
    fig = plot_accuracy_vs_n(few.assign(method=few["method"].astype(str)), highlight="petal",
                             title="shapes-vqa: PETAL against LoRA, VL-PET and full fine-tuning")
    fig.savefig(f"{FIGURES}/06_accuracy_vs_n.png", dpi=100, bbox_inches="tight")
    plt.show()

# %%
study.versus(store).round(3)

# %% [markdown]
# ## 2 · Mode approximation and the threshold
#
# One axis at a time around the defaults at N = 64: the number of modes in the CP form and in the
# Tucker form (a full R × R × R core), the threshold frozen at its initial value, the mixture off,
# K experts, M templates, the bottleneck weight, and the released variant. Each panel: mean test
# accuracy with its 95 % interval; the default in black; `diff_vs_default` paired over seeds. The
# default and the two settings the verdicts read (the mixture off, IB weight 0) have five seeds,
# the exploratory settings three (13, 21, 42), each paired with the default on its own seeds.

# %%
abl = study.ablations(store)
if len(abl):
    display(abl.round(3))
    fig = plot_ablations(abl, title="PETAL ablations at N = 64")
    fig.savefig(f"{FIGURES}/06_ablations.png", dpi=100, bbox_inches="tight")
    plt.show()

# %% [markdown]
# **How many modes stay on.** The soft gate of mode r is sigmoid((|λ_r| − Γ) / τ): the trainer records
# all R gates, the number above 0.5 and Γ at every evaluation (the default run at N = 64, seed 13).

# %%
gates = study.mode_gates(store)
if len(gates):
    fig = plot_mode_gates(gates)
    plt.show()
else:
    print("the default run's history holds no mode gates (trained before the trainer recorded them)")

# %% [markdown]
# **Modes per matrix.** The threshold switches modes off for every matrix at once, but each matrix j
# weights the shared modes with its own coefficients p_j. After training (the same run), the share of
# each mode in each matrix's update, and how many modes carry 90 % of it: few modes per matrix means
# the matrices specialise on different parts of the shared bank.

# %%
shares, usage = study.mode_usage(store)
if shares is not None:
    fig = plot_mode_usage(shares, usage)
    plt.show()
    print(usage[["modes_for_mass", "participation"]].describe().loc[["mean", "min", "max"]].round(1))
else:
    print("no weights of the default PETAL run in the bundle yet")

# %% [markdown]
# ## 3 · The instruction mixture: where does it send each question?
#
# The default run (N = 64, seed 13) rebuilt from the bundle, its router read on the test questions:
# the mean gate probability per question type and expert, the routing statistics, and a chi-square
# test of independence between the question type and the top expert (a small p-value: the router
# separates types). The released variant averages its experts uniformly: its routing statistics are
# degenerate by construction, so they are not shown.

# %%
per_type, stats, test = study.routing(store)
if per_type is not None:
    fig = plot_type_routing(per_type)
    plt.show()
    print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in test.items()})
    print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in stats.items() if not isinstance(v, list)})
else:
    print("no PETAL weights in the bundle yet")

# %% [markdown]
# ## 4 · The information bottleneck
#
# The bottleneck attends from the mixed instruction vector μ (what the mixture adds to every prompt
# token) over the prompt, encodes the result to a stochastic code z and asks z to predict the answer's
# first token, with a KL penalty: it should make the instruction carry what the answer needs. For
# each bottleneck weight (N = 64, seed 13, rebuilt from the bundle) the table gives the accuracy (that
# run, and the mean over seeds) and I(μ; answer) on the 1,000 test questions, estimated by two
# held-out variational lower bounds (InfoNCE, NWJ) on the 16 leading principal components of μ
# against the one-hot answer. H(answer) is the ceiling. If the bottleneck works as the paper says,
# the information rises with the weight and accuracy with it. A lower bound can miss information the
# critic did not find, so a flat line is weaker evidence than a rising one.

# %%
# NBVAL_IGNORE_OUTPUT
info = study.information(store)  # estimated live (critics trained now): checked in code, not as text
if len(info):
    if not (info.filter(like="mi_").le(info["h_answer"] + 0.1, axis=0).all().all()):
        raise AssertionError(f"an MI estimate exceeds the answers' entropy:\n{info}")
    display(info.round(3))
    fig = plot_information(info)
    fig.savefig(f"{FIGURES}/06_information.png", dpi=100, bbox_inches="tight")
    plt.show()
else:
    print("no PETAL runs with weights for the bottleneck's weights in the bundle yet")

# %% [markdown]
# ## 5 · Try another configuration
#
# Modes R, the threshold learned or frozen, experts K, templates M and the bottleneck weight, N and
# seed: **run** reuses a configuration the bundle holds and trains a new one (about a minute at
# N = 64). The widget needs a live kernel.

# %%
# NBVAL_IGNORE_OUTPUT
panel = PETALPanel(study.base_config(), runner=lambda cfg: run(cfg, store=store))
panel.widget()

# %% [markdown]
# ## 6 · Verdict
#
# Reproduced when the paired 95 % interval excludes zero in the paper's direction (at every N for
# the comparisons across N), not reproduced when it excludes zero in the other direction,
# inconclusive otherwise.

# %%
with pd.option_context("display.max_colwidth", 220):
    display(study.verdicts(store))

# %% [markdown]
# **What would settle it.** Two claims are decided here. "PETAL beats full fine-tuning" is not
# reproduced (behind it at N = 1000, level at few shots), and the instruction mixture helps:
# +0.076 [+0.017, +0.134] for the default over the mixture off, paired over the five seeds (on the
# first three it was +0.069 [-0.065, +0.203], inconclusive; two more seeds settled it). The
# inconclusive rows, with the seeds that would give an 80 % chance of an interval that excludes
# zero if the means and spreads of the five seeds held (`workbench.studies.seeds_to_settle`):
#
# - PETAL against LoRA at few shots: +0.015 [-0.023, +0.054] at N = 16 (about 36 seeds: the mean
#   shrank from +0.033 on three seeds) and +0.038 [-0.022, +0.098] at N = 64 (about 15);
# - the information bottleneck, -0.010 [-0.025, +0.005] for the default over IB weight 0: about 14
#   seeds, and the sign is against the claim. Its interval already rules out a gain of more than
#   half a point on this world, whichever way more seeds decided it.
#
# The parameter share (4.42 % of vlt5-tiny's language model against the paper's 0.5 %) is not
# comparable at all: PETAL's shared modes grow with the width d (U and V are d x R, R = 64) and its
# per-matrix and expert parameters are small, while the backbone grows with d^2 times its depth, so
# the share falls as the backbone grows; the 0.5 % is a statement about BLIP-2-sized models.
