# %% [markdown]
# # 02 · The method gallery
#
# Every PEFT method of the workbench trained once under the same low-resource protocol, so
# that they can be compared side by side:
#
# 1. the **families** the methods belong to;
# 2. every registered method on **shapes-vqa at N = 64** (seed 13) with the embedded backbone
#    `vlt5-tiny`, each at its official defaults, trained with the MixPHM recipe's learning rate;
# 3. a **table** of test accuracy, overall and per question type, with the trainable parameters;
# 4. the plot **MixPHM** (arXiv 2303.01239) opens with: accuracy against % trainable parameters;
# 5. what each run actually answers, and what that says about the regime;
# 6. a **widget** to re-run one method with another number of shots or another main knob.
#
# Every run is written to the run store (`runs/<hash of the config>/`): executing the notebook a
# second time reuses the finished runs instead of training them again.
#
# **Every method is what its official code trains** (`docs/methods.md` has one table of placement,
# trainable set, defaults, source files and departures). Compared with earlier versions of this
# gallery: MixPHM computes its redundancy and mutual-information terms over the tokens the official
# code uses and keeps the pre-trained visual projector frozen; `houlsby` is VL-Adapter's adapter
# (bottleneck d/8, `gelu_new`, LayerNorms trained); `pfeiffer` is MixPHM's baseline (FFN, ReLU,
# d/12, projector frozen); Compacter trains the LayerNorms as `compacter.json` does; VL-PET's small
# gate averages over every position; `houlsby+g+lw` and `compacter+g+lw` rebuild VL-PET's Table 9
# modules; and **AdaMix** (a mixture of adapter experts with a consistency loss) joins the zoo.
# PETAL runs its paper reading (`variant="paper"`); the released code's variant is an option.

# %%
%matplotlib inline
import time
import warnings
from types import SimpleNamespace

import matplotlib.pyplot as plt

from workbench.methods import list_methods
from workbench.train import NonFiniteLossError, RunConfig, accuracy_by_type, run
from workbench.train.loop import load_splits
from workbench.utils import seed_everything
from workbench.viz.panels import GalleryPanel
from workbench.viz.training_plots import (
    answers_table,
    method_family,
    plot_accuracy_vs_params,
    results_table,
    run_label,
)

seed_everything(0, threads=2)
warnings.filterwarnings("ignore", message=".*(CUDA extension|boft_n_butterfly_factor).*")  # peft's BOFT on CPU
FIGURES = "../figures"

base = RunConfig(task="shapes-vqa", n_shots=64, seed=13, epochs=40, eval_every=2, patience=10,
                 test_size=500, quiet=True)
# What each method gets on top of `base`: the official MixPHM recipe's lr 5e-3 for every PEFT
# method, 3e-4 for full fine-tuning (its default, as in 01_quickstart), and for MixPHM the nearest bottleneck
# that its PHM layers can take on this backbone (see section 2).
SETTINGS = {m: {"lr": 5e-3} for m in list_methods()}
SETTINGS["full"] = {"lr": 3e-4}
SETTINGS["mixphm"] = {"lr": 5e-3, "method_config": {"bottleneck": 12}}
print(f"{len(list_methods())} registered methods:", ", ".join(list_methods()))

# %% [markdown]
# ## 1 · Families
#
# The empirical study of PEFT on vision-language models (arXiv 2403.08433) sorts methods by
# *where* they add their parameters:
#
# - **embedding composition** adds trainable vectors to the *inputs* of the frozen layers:
#   prompt tuning (L vectors after the visual tokens) and prefix tuning (key/value prefixes in
#   every attention of the encoder and the decoder);
# - **layer composition** changes what the *layers compute*: LoRA (a low-rank update of the
#   q and v projections), the serial adapter (Houlsby: a bottleneck MLP after each sub-layer;
#   Pfeiffer: after the FFN only) and the parallel adapter (He et al.: reads the sub-layer input,
#   added beside it).
#
# The study finds layer composition ahead of embedding composition on VQA, a task inconsistent
# with caption pre-training. The other methods of the workbench are all layer composition:
#
# - **PHM adapters**: Compacter and Compacter++ build the adapter's matrices as sums of Kronecker
#   products with a globally shared factor; **MixPHM** makes the up-projection a mixture of PHM
#   experts, drawn at random in training and merged into one "expert soup" at inference, plus a
#   redundancy regulariser and a task-relevance (mutual information) term;
# - **gated** (VL-PET): a gate of chosen granularity (large / middleX / middleY / small) scales
#   the whole sub-layer output in the encoder, with a lightweight decoder (one adapter on the
#   cross-attention values); `houlsby+g+lw` and `compacter+g+lw` put the same gate and decoder
#   around other modules;
# - **PETAL**: the q/k/v/o updates of all layers as one CP-decomposed tensor with a learnable
#   threshold that switches modes off, an instruction mixture-of-experts and an
#   information-bottleneck loss (the workbench's reading of the paper);
# - the other **peft tuners** (low-rank or reparameterised updates, orthogonal updates, IA³'s
#   rescaling), reached through `peft`'s `inject_adapter_in_model`;
# - the baselines **BitFit** (biases — T5 has none, so LayerNorm weights) and **full fine-tuning**.

# %%
for family in sorted({method_family(m) for m in list_methods()}):
    print(f"{family:>28}: {', '.join(m for m in list_methods() if method_family(m) == family)}")

# %% [markdown]
# ## 2 · Training every method at N = 64
#
# One configuration per method, only the method changes: 64 training and 64 dev questions
# drawn with seed 13, up to 40 epochs of batch 16, dev accuracy every 2 epochs with early
# stopping after 10 evaluations without progress, and the dev-best checkpoint scored on 500 test
# questions. Every PEFT method trains with lr 5e-3, the learning rate of the official MixPHM
# recipe for VL-T5 (docs/data.md#low-resource-protocol), full fine-tuning with 3e-4. A method whose defaults do not
# fit the tiny backbone would be listed with the reason instead of a number.
#
# **MixPHM at its defaults does not fit vlt5-tiny**: its bottleneck is d // 12 = 128 // 12 = 10,
# and a PHM layer needs both of its sizes to be multiples of n = 4. So that the paper's method
# still appears in the comparison, it runs with the nearest valid bottleneck, 12 (the reduction
# d / 12 = 10.7 rounded up to a multiple of 4), everything else at its defaults; `apply` itself
# refuses the default with a clear error, shown at the end of this section.
#
# The runs are grouped in three cells: the baselines and the study's five methods, the methods of
# the MixPHM (with its AdaMix baseline), VL-PET and PETAL papers, and the rest of the peft zoo. On a 2-core CPU each run
# takes a few seconds to a few tens of seconds; reused runs are instant.

# %%
results, failures = {}, {}


def train_all(names):
    """Train (or reuse) one run per method with its SETTINGS; record the runs that cannot be made."""
    for name in names:
        cfg = base.replace(method=name, **SETTINGS.get(name, {}))
        t0 = time.perf_counter()
        try:
            result = run(cfg)
        except (ValueError, NonFiniteLossError) as e:
            failures[run_label(SimpleNamespace(config=cfg))] = str(e)
            print(f"{name:>16}: not run ({type(e).__name__})")
            continue
        results[run_label(result)] = result
        how = "reused" if result.reused else "trained"
        print(f"{run_label(result):>16}: {how} in {time.perf_counter() - t0:5.1f} s, test {result.test_accuracy:.2f}")

# %%
# NBVAL_IGNORE_OUTPUT
t_start = time.perf_counter()
train_all(["full", "bitfit", "prompt", "prefix", "lora", "houlsby", "pfeiffer", "parallel"])

# %%
# NBVAL_IGNORE_OUTPUT
train_all(["compacter", "compacter++", "mixphm", "adamix", "vlpet", "houlsby+g+lw", "compacter+g+lw", "petal"])

# %%
# NBVAL_IGNORE_OUTPUT
done = {r.config.method for r in results.values()} | {k.split(" ")[0] for k in failures}
train_all([m for m in list_methods() if m not in done])
print(f"\n{len(results)} runs, {len(failures)} not run, {time.perf_counter() - t_start:.0f} s in all")

# %%
for label, reason in sorted(failures.items()):
    print(f"{label} — not run on vlt5-tiny:\n    {reason}")
print(f"{len(results)} runs in the gallery")
try:  # MixPHM at its own defaults, for the record: refused before any training
    run(base.replace(method="mixphm"))
except ValueError as e:
    print(f"\nmixphm at its defaults: {e}")

# %% [markdown]
# ## 3 · The table
#
# Test accuracy of the dev-best checkpoint, overall and per question type (exact match on 500
# test questions), the dev accuracy that selected it, and the trainable parameters (method
# modules, any unfrozen backbone part and the visual projector where the method's official code
# trains it: MixPHM, Pfeiffer and AdaMix keep vlt5-tiny's pre-trained projector frozen) in number
# and as % of the language model. Sorted by test accuracy.
#
# For scale, a *blind* reference: answer every question with the most frequent answer of its
# type among the 64 training questions (no image, no model).

# %%
train_ex, dev_ex, test_ex = load_splits(base)
majority = {}
for t in sorted({e.question_type for e in train_ex}):
    answers = [e.target for e in train_ex if e.question_type == t]
    majority[t] = max(sorted(set(answers)), key=answers.count)
prior = accuracy_by_type([majority.get(e.question_type, "yes") for e in test_ex], test_ex)
print(f"per-type majority answer of the 64 training questions: test accuracy {prior['overall']:.2f}")
print({t: round(v, 2) for t, v in sorted(prior["per_type"].items())})

# %%
table = results_table(list(results.values()), digits=2)
table.insert(1, "options", [", ".join(f"{k}={v}" for k, v in r.config.method_config.items())
                            for r in results.values()])
table = table.drop(columns=["N", "seed", "test acc (last)"])
table = table.sort_values(["test acc", "trainable %"], ascending=[False, True], kind="stable")
table.reset_index(drop=True)

# %% [markdown]
# ## 4 · Accuracy against trainable parameters
#
# The MixPHM paper opens with this plot for VQA v2 with 64 to 1,000 examples on T5-base: every
# PEFT method sits below full fine-tuning except MixPHM, which beats it with about 0.7 % of the
# parameters trainable. VL-PET makes a similar claim on its multi-task benchmarks (its large gate
# ahead of full fine-tuning, the lighter granularities close behind). Here the dashed line is
# full fine-tuning, the dotted line the blind prior above, and each point one method, coloured by
# family. The x axis counts what a run trains (projector included where it trains) against the language model:
# on a backbone of 1.4 M parameters the methods' full-size defaults can be large — VL-PET's
# T5 default rank 192 exceeds the width 128, and prefix tuning's reparameterisation MLP
# (mid_dim 512) is almost the size of the model.

# %%
fig = plot_accuracy_vs_params(list(results.values()), baselines={"blind per-type prior": prior["overall"]})
fig.savefig(f"{FIGURES}/02_accuracy_vs_params.png", dpi=100, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## 5 · What the runs learned to say
#
# Accuracy alone hides *why* a run scores 0. The table below gives, per run, the learning rate it
# used, how many epochs it ran before early stopping, the epoch of the dev-best state (the one
# scored on test), the last training loss (task loss plus the method's own losses, if any), and
# the answer it gives most often on the 500 test questions.

# %%
answers = answers_table(list(results.values())).sort_values("its share", kind="stable").reset_index(drop=True)
answers

# %%
stuck = [r for r in results.values() if r.metrics["dev_best"] == 0]
below = [r for r in results.values() if r.test_accuracy < prior["overall"]]
print(f"{len(stuck)} of {len(results)} runs never answer a dev question right; "
      f"{len(below)} of {len(results)} score below the blind prior ({prior['overall']:.2f})")
above = sorted((r for r in results.values() if r.test_accuracy > prior["overall"]), key=lambda r: -r.test_accuracy)
print(f"{len(above)} runs above the blind prior:", ", ".join(f"{run_label(r)} {r.test_accuracy:.2f}" for r in above))

# %% [markdown]
# **What to read from this — honestly.** At N = 64, with the recipe's learning rate and the CPU
# budget of this protocol (4 steps per epoch, at most 160 steps):
#
# - **almost every run switches from its pre-training tasks to answers**; the count of runs that
#   never answer a dev question right is printed above. About a third beat the blind per-type
#   prior, so they have started to use the image: they answer colour, shape and size queries
#   above the prior. No run beats the prior on counting (0.50: always "1").
# - **full fine-tuning leads (0.50), with VL-PET and its gated Houlsby adapter close behind
#   (0.48, 0.46)**, level with OFT. Then come PETAL, DeLoRA, the gated Compacter and the parallel
#   adapter (0.42 to 0.44), then GraLoRA, DoRA, LoHa, the serial adapters and LoRA (0.36 to 0.41).
# - **embedding composition trails layer composition**: prefix tuning scores 0.23 and prompt
#   tuning 0.06, as the empirical study (2403.08433) finds on tasks inconsistent with
#   pre-training.
# - **what the official defaults changed**: Pfeiffer as MixPHM's baseline (ReLU, FFN only, frozen
#   projector) rises from 0.32 to 0.37; Compacter and Compacter++ with their LayerNorms trained, as
#   `compacter.json` does, from 0.10 and 0.04 to 0.22 and 0.15; VL-Adapter's Houlsby adapter and the
#   Table 9 rebuilds stay within a point of before (0.36, 0.46, 0.43). MixPHM drops from 0.17 to
#   0.09: with the official trainable set the visual projector stays frozen, so only the PHM experts
#   adapt, and they learn slowly (its training loss is still 3.1 after 160 steps, the answers table).
#   AdaMix, MixPHM's strongest baseline, scores 0.18.
# - **MixPHM, AdaMix, Compacter and Compacter++ stay in the bottom half**, with IA³, VeRA, BitFit and
#   prompt tuning: the methods with the fewest or most constrained trainable parameters, whose
#   training loss is still high after 160 steps. The MixPHM paper's headline, MixPHM above full
#   fine-tuning with under 1 % of the parameters, is **not reproduced here**. Its recipe (lr 5e-3,
#   bottleneck d/12, 4 experts) comes from T5-base and thousands of steps; on a 1.4 M-parameter
#   model at 160 steps, the PHM layers (sums of Kronecker products with a shared factor) learn too
#   slowly. Whether it holds with a converged budget is a question for the engine's protocol.
#
# One seed, 64 questions and 500 test questions: the standard error of one accuracy is about
# 0.02, so neighbours in the table are not distinguishable. Per-method learning rates move single
# runs. LoRA scores 0.36 here at 5e-3 and 0.28 at its default 1e-3 (`01_quickstart.ipynb`), while
# at N = 1000 the default does better (0.69 against 0.61). The amount of data moves the numbers
# more than the choice of method: the widget below re-runs any method with more shots.

# %% [markdown]
# ## 6 · Re-run one configuration
#
# Pick a method, the number of shots and the method's main knob (rank, bottleneck reduction,
# experts, granularity, prompt length), then press **run**. The panel builds the RunConfig from
# `base` and calls `run`: **a configuration already in the run store is reused, not retrained**,
# so the summary of any run of the gallery above appears at once; a new one trains (a few
# seconds to a minute at N = 64, longer at N = 1000). The panel applies the gallery's SETTINGS,
# and a knob value equal to the method's default is dropped from the config, so choosing it
# gives the gallery's own run.
# The widget needs a live kernel (it is not rendered in a static view of the notebook).

# %%
# NBVAL_IGNORE_OUTPUT
panel = GalleryPanel(base, methods=tuple(list_methods()), settings=SETTINGS)
panel.widget()

# %% [markdown]
# The panel is plain Python, so a script (or a test) can drive it by setting its fields. LoRA at
# N = 64 with rank 8 (its default) is the gallery's own run: it comes back from the store.

# %%
panel.method, panel.n_shots, panel.knob_value = "lora", 64, 8
t0 = time.perf_counter()
again = panel.run()
print(f"same run as the gallery's: {again.hash == results['lora'].hash}, reused from the store: {again.reused}")
print(f"lora N=64: test {again.test_accuracy:.2f}, trainable {again.params['trainable_pct']:.2f} %")
