# %% [markdown]
# # 05 · VL-PET: granularity control, lightweight designs and their transfer
#
# VL-PET (Hu et al., ICCV 2023, arXiv 2308.09804) puts a **gate** G on what each encoder sub-layer
# outputs, H_out = s · G ⊙ (H + Δ(H)), and chooses how fine G is: **large** (one value per token and
# channel, from a low-rank projection of the sub-layer input), **middleX** (one per token),
# **middleY** (one per channel, shared by every token and sample) or **small** (one per sample).
# Its decoder is **lightweight**: a single adapter on the value projection of each cross-attention.
# It reports that the large gate is best, that VL-PET beats full fine-tuning with about 4 % of the
# parameters, and that its gate and decoder improve other methods ("+G + LW", Table 9).
#
# This notebook tests those claims on the embedded world with the **vlpet study**
# (`workbench/studies/vlpet.py`, bundle `results/vlpet/`):
#
# 1. granularity against cost, with full fine-tuning, LoRA, Compacter and the VL-Adapter adapter,
#    and against no gate at all;
# 2. what the gates do after training;
# 3. the lightweight designs;
# 4. the "+G + LW" transfer;
# 5. redundancy and task correlation of the gated modules;
# 6. a widget to train another configuration;
# 7. the verdict table.

# %%
%matplotlib inline
import warnings

import matplotlib.pyplot as plt
import pandas as pd

from workbench.studies import load_study
from workbench.studies import vlpet as study
from workbench.train import restore_run, run
from workbench.utils import seed_everything
from workbench.viz.panels import VLPETPanel
from workbench.viz.study_plots import plot_accuracy_vs_n, plot_gates, plot_redundancy

seed_everything(0, threads=2)
warnings.filterwarnings("ignore", message=".*(CUDA extension|boft_n_butterfly_factor).*")
pd.set_option("display.width", 140)
FIGURES = "../figures"

store = load_study("vlpet")
print(f"the vlpet bundle: {store.completeness}")

# %% [markdown]
# ## 1 · Granularity against cost
#
# Test accuracy (mean ± std over the seeds 13, 21, 42, the paper's three; VL-PET large, full
# fine-tuning and the VL-Adapter adapter over the protocol's five, 87 and 100 as well, for the claim
# three seeds left open) of VL-PET at each granularity and of the baselines, at N ∈ {16, 64, 500,
# 1000}, with the trainable share of the language model (`n` is the seeds). VL-PET runs
# at its T5 values (r 192 split over 4 heads, gate rank 192, scale 0.3, lr 3e-4, zero-initialised
# up-projections) — the paper's own numbers are BART-base multi-task averages (full fine-tuning 77.33,
# large 79.18, middleX 78.37, middleY 78.23, small 78.14, VL-Adapter 76.93, LoRA 76.60, Compacter
# 75.78): only the ordering can be compared.

# %%
table = study.table(store)
wide = table.assign(cell=[f"{m:.3f} ± {s:.3f}" if pd.notna(s) else f"{m:.3f}"
                          for m, s in zip(table["mean"], table["std"])]).pivot(index="method", columns="n_shots",
                                                                                values="cell")
wide.insert(0, "trainable %", table.groupby("method", observed=True)["trainable_pct"].first().round(2))
wide

# %%
fig = plot_accuracy_vs_n(table.assign(method=table["method"].astype(str)), highlight="vlpet-large",
                         title="shapes-vqa: VL-PET's granularities and the baselines (band: ± one std)")
fig.savefig(f"{FIGURES}/05_accuracy_vs_n.png", dpi=100, bbox_inches="tight")
plt.show()

# %% [markdown]
# Paired over seeds (the same training questions), per N: VL-PET large minus each other
# granularity and each baseline, with the 95 % t-interval.

# %%
study.versus(store).round(3)

# %% [markdown]
# **Granularity control against no gate.** The same modification and lightweight decoder with
# G = 1 (`granularity="none"`, row `vlpet-none` above): H_out = s · (H + Δ(H)). Each granularity
# minus no gate, paired over seeds, per N — the paper's claim is that every granularity beats it.

# %%
study.no_gate(store).round(3)

# %% [markdown]
# ## 2 · What the gates do
#
# For the N = 64, seed-13 run of each granularity (and the two "+G + LW" methods), rebuilt from the
# bundle's weights and run on 256 test questions: the distribution of the gate values per encoder
# sub-layer (over valid tokens; per channel for middleY, per sample for small), and how far each
# gate moves the frozen output, ||(G − 1) ⊙ H|| / ||H||, beside how far the whole module moves it.
# Note the T5 scale s = 0.3: every gated sub-layer output is multiplied by 0.3 · G, so even G = 1
# shrinks it — the solid and dashed lines differ by what the modification Δ adds.

# %%
gates = study.gates(store)
if len(gates):
    display(gates.groupby("method")[["gate_mean", "gate_std", "share_below_0.1", "share_above_0.9",
                                     "gate_moves_H", "module_moves_H"]].mean().round(2))
    fig = plot_gates(gates)
    fig.savefig(f"{FIGURES}/05_gates.png", dpi=100, bbox_inches="tight")
    plt.show()
else:
    print("no VL-PET weights in the bundle yet")

# %% [markdown]
# ## 3 · The lightweight designs
#
# VL-PET large with its modules in the encoder only, the decoder's value adapter only, and with a
# full decoder (VL-Adapter's adapter after every decoder sub-layer, as the official code builds it
# without `--no_decoder_adapter`) instead of the value adapter, at N = 64 over three seeds; the
# default design and the full decoder, whose comparison three seeds left open, over five.

# %%
study.designs(store).round(3)

# %% [markdown]
# The lightweight decoder minus the full decoder adapter, paired over seeds (the paper: the
# lightweight design is enough, with fewer parameters).

# %%
study.decoder_versus(store).round(3)

# %% [markdown]
# ## 4 · Transfer: + G + LW (Table 9)
#
# The large gate and the lightweight decoder around Compacter's and VL-Adapter's modules, against
# the plain methods, paired over seeds.

# %%
study.transfer(store).round(3)

# %% [markdown]
# ## 5 · Redundancy and task correlation of the gated modules
#
# MixPHM's analysis (notebook 04) applied to VL-PET: the contribution u = H_out − H of each gated
# encoder module against the frozen output H and against the encoder's final representation, RSA
# per module, with permutation null bands (shaded) and bootstrap intervals (bars).

# %%
red = study.redundancy(store, max_samples=256, n_perm=100, n_boot=100)
if len(red):
    fig = plot_redundancy(red, "rsa", title="RSA of the gated modules' contributions (N = 64, seed 13)")
    plt.show()

# %% [markdown]
# ## 6 · Try another configuration
#
# Granularity, bottleneck r, gate rank r_g, scale s, the design, N and seed; **run** reuses a
# configuration the bundle holds and trains a new one (about a minute at N = 64), then shows its
# gate statistics. The widget needs a live kernel.

# %%
def gate_rows(result):
    try:
        return pd.DataFrame(study.gate_statistics(restore_run(result, store=store), max_samples=128)).round(2)
    except FileNotFoundError:
        return None


panel = VLPETPanel(study.base_config(), runner=lambda cfg: run(cfg, store=store), analyser=gate_rows)

# %%
# NBVAL_IGNORE_OUTPUT
panel.widget()

# %% [markdown]
# ## 7 · Verdict
#
# Reproduced when the paired 95 % interval excludes zero in the paper's direction at every N,
# not reproduced when one excludes it in the other direction, inconclusive otherwise.

# %%
with pd.option_context("display.max_colwidth", 220):
    display(study.verdicts(store))

# %% [markdown]
# **What would settle it.** Four claims are decided on this world: the large gate is not the best
# granularity, no granularity beats the ungated modules everywhere, VL-PET (large) falls behind full
# fine-tuning from N = 500, and the designs do not improve Compacter. Two stayed open on three seeds,
# and their runs went to the protocol's five (VL-PET large, full fine-tuning and the adapter at every
# N; the full-decoder design). They are still open. With two more seeds the means shrank, so the
# `workbench.studies.seeds_to_settle` estimates (an 80 % chance of an interval that excludes zero,
# if the mean and spread held) grew:
#
# - the lightweight decoder against a full decoder adapter: +0.022 [-0.032, +0.076] on three seeds
#   (about 10 seeds to settle), +0.011 [-0.017, +0.039] on five (about 35). Read as the paper means
#   it, "no worse with fewer parameters", the five seeds already bound the deficit at 1.7 points.
#   A non-inferiority test with a margin stated in advance would decide it; the verdict rule here
#   tests for a difference only;
# - VL-PET (large) against the VL-Adapter adapter: ahead at N = 64 (+0.101 [+0.057, +0.145]), level
#   at 16 (-0.018 [-0.099, +0.063]), 500 (+0.002 [-0.015, +0.020]) and 1000 (-0.003 [-0.018,
#   +0.012]; about 8 seeds on three seeds' figures, about 130 now). From N = 500 the two are level to
#   within two points, so more seeds could only turn that into a small difference either way.
#
# The granularity claims rest on gaps of under one point in the paper (large 79.18 against 78.14 to
# 78.37), on BART-base and T5-base with the official r = 192, which exceeds vlt5-tiny's width: the
# study on the paper's setting (`python -m workbench.studies run vlpet --backbone path/to/t5-base
# --backbone-option feat_dim=2048 --task vqa-v2 ...`, the options as in notebook 04) is what could
# confirm or refute them.
