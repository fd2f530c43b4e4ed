# %% [markdown]
# # 00 · A tour of the data
#
# Everything in this workbench runs on data that the project generates itself or ships inside a
# PyPI package — nothing is downloaded. This notebook shows what a model sees:
#
# 1. **ShapesWorld** scenes, their captions (the pre-training corpus) and typed questions (the
#    downstream VQA task, *inconsistent* with caption pre-training);
# 2. the question-type and answer distributions, i.e. the priors a model can exploit;
# 3. **easy-VQA**, an independently authored VQA set used as a transfer target;
# 4. a **low-resource split** (the MixPHM protocol: train = N, dev = N) next to the pool it
#    was drawn from.

# %%
%matplotlib inline
from collections import Counter

import matplotlib.pyplot as plt

from workbench.data import SEEDS, SHOTS, ShapesWorld, load_task, low_resource_split
from workbench.utils import seed_everything
from workbench.viz.data_plots import plot_distributions, plot_split, show_examples, split_table

seed_everything(0, threads=2)
FIGURES = "../figures"

# %% [markdown]
# ## 1 · ShapesWorld scenes and questions
#
# A scene holds 1–4 objects in distinct cells of a 3×3 grid; each has a shape, a colour and a
# size. Pixels, captions and answers are pure functions of `(seed, split, index)`, so these
# pictures are the same on every machine. Each question has a **type** — accuracy is always
# reported per type, because the types probe very different skills (counting, relations,
# comparisons, boolean logic).

# %%
pool = load_task("shapes-vqa", "train")
test = load_task("shapes-vqa", "test")
print(f"shapes-vqa: {len(pool)} pool questions, {len(test)} test questions")
fig = show_examples(pool[:12], ncols=6)
fig.savefig(f"{FIGURES}/00_shapes_vqa_samples.png", dpi=100, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## 2 · Captions: the pre-training corpus
#
# The embedded backbone is pre-trained on captions only (no questions, like VL-T5 "novqa").
# A caption names every object with its size, colour, shape and coarse position, in one of three
# surface templates. Captioning new scenes is therefore a task *consistent* with pre-training.

# %%
captions = load_task("shapes-caption", "test", n_scenes=8)
for ex in captions[:4]:
    print(f"{ex.image_id:>16}: {ex.answers[0]}")
fig = show_examples(captions[:8], ncols=4, width=34)
fig.savefig(f"{FIGURES}/00_shapes_captions.png", dpi=100, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## 3 · What a model could learn without looking
#
# The answer distribution is the prior: a model that ignores the image can reach the
# majority-answer baseline (printed in the title). Yes/no questions are balanced by
# construction; counts are mostly small.

# %%
fig = plot_distributions(pool, title="shapes-vqa pool")
fig.savefig(f"{FIGURES}/00_shapes_vqa_distributions.png", dpi=100, bbox_inches="tight")
plt.show()
by_type = Counter(e.question_type for e in pool)
print({t: by_type[t] for t in sorted(by_type)})

# %% [markdown]
# ## 4 · easy-VQA
#
# easy-VQA (4,000 train / 1,000 test images, 13 answers) comes from the `easy-vqa` PyPI package:
# one coloured shape per image, a different renderer and phrasing — a transfer target.

# %%
easy_train = load_task("easy-vqa", "train")
easy_test = load_task("easy-vqa", "test")
print(f"easy-vqa: {len(easy_train)} train questions, {len(easy_test)} test questions")
print("answers:", sorted({e.answers[0] for e in easy_train}))
fig = show_examples(easy_train[:8:1], ncols=8, width=22)
fig.savefig(f"{FIGURES}/00_easy_vqa_samples.png", dpi=100, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## 5 · A low-resource split
#
# The protocol of the MixPHM code: shuffle the pool with a seed, take the first N questions for
# training and the next N for model selection (dev); the test set is the full test split. With
# N = 64 the split is a noisy sample of the pool — some question types get only a handful of
# examples, which is exactly the regime this workbench studies. Shots and seeds are constants:

# %%
print("SHOTS =", SHOTS, " SEEDS =", SEEDS)
train, dev = low_resource_split(pool, n=64, seed=13)
print("first train ids:", [e.id for e in train[:3]])
split_table(pool, train, dev)

# %%
fig = plot_split(pool, train, dev)
fig.savefig(f"{FIGURES}/00_low_resource_split.png", dpi=100, bbox_inches="tight")
plt.show()

# %% [markdown]
# The same `(pool, N, seed)` always gives the same ids, in any process and on any machine
# (the permutation uses NumPy's frozen legacy RNG stream), so every run in the run store is
# reproducible from its config alone. Next: `01_quickstart.ipynb` trains on these splits.
