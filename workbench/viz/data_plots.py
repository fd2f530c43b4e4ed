"""Figures for the data layer: scene grids, question/answer distributions, split overviews."""

from __future__ import annotations

import textwrap
from collections import Counter
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

from ..data import Example, load_image


def show_examples(
    examples: Sequence[Example],
    ncols: int = 4,
    width: int = 28,
    show_answer: bool = True,
    title: str | None = None,
):
    """Draw examples in a grid, each image with its prompt (and answer) wrapped underneath.

    Returns the matplotlib figure (the notebook saves it under ``figures/``).
    """
    if not examples:
        raise ValueError("show_examples needs at least one example")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    ncols = min(ncols, len(examples))
    nrows = int(np.ceil(len(examples) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, ex in zip(axes.flat, examples):
        ax.imshow(load_image(ex), interpolation="nearest")
        text = ex.prompt if ex.question_type else ex.answers[0]
        if ex.question_type and show_answer:
            text = f"{text}\n→ {ex.answers[0]}  [{ex.question_type}]"
        ax.set_title("\n".join(textwrap.wrap(text, width)), fontsize=8, loc="left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_distributions(examples: Sequence[Example], title: str = ""):
    """Bar charts of question types and answers (the answer prior a model can exploit)."""
    types = Counter(e.question_type for e in examples)
    answers = Counter(e.answers[0] for e in examples)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.5), gridspec_kw={"width_ratios": [1, 2]})
    names = sorted(types)
    a.bar(names, [types[n] for n in names], color="tab:blue")
    a.set_title("question types")
    a.tick_params(axis="x", rotation=45)
    top = answers.most_common()
    b.bar([k for k, _ in top], [v for _, v in top], color="tab:orange")
    b.set_title("answers (majority-answer baseline: %.1f %%)" % (100 * top[0][1] / len(examples)))
    b.tick_params(axis="x", rotation=60)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_split(pool: Sequence[Example], train: Sequence[Example], dev: Sequence[Example]):
    """Question-type shares of a low-resource split next to the pool it was drawn from."""
    groups = {"pool": pool, f"train (N={len(train)})": train, f"dev (N={len(dev)})": dev}
    types = sorted({e.question_type for e in pool})
    fig, ax = plt.subplots(figsize=(10, 3.5))
    width = 0.8 / len(groups)
    for g, (name, exs) in enumerate(groups.items()):
        counts = Counter(e.question_type for e in exs)
        shares = [counts[t] / max(len(exs), 1) for t in types]
        ax.bar(np.arange(len(types)) + g * width, shares, width, label=name)
    ax.set_xticks(np.arange(len(types)) + width * (len(groups) - 1) / 2, types, rotation=30)
    ax.set_ylabel("share of questions")
    ax.legend()
    ax.set_title("a low-resource split is a noisy sample of the pool")
    fig.tight_layout()
    return fig


def split_table(pool: Sequence[Example], train: Sequence[Example], dev: Sequence[Example]):
    """Counts per question type in pool / train / dev, as a pandas DataFrame."""
    import pandas as pd

    rows = {}
    for name, exs in (("pool", pool), ("train", train), ("dev", dev)):
        rows[name] = Counter(e.question_type for e in exs)
    table = pd.DataFrame(rows).fillna(0).astype(int).sort_index()
    table.loc["total"] = table.sum()
    return table
