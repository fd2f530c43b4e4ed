"""Figures and tables for training runs: learning curves, accuracy tables."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt

from ..methods import list_methods, method_spec


def results_table(results: Sequence, digits: int = 3):
    """One row per run: method, N, seed, test accuracy (dev-best and last), per type, trainable %.

    Accuracies are rounded to ``digits`` so that the table survives float noise in notebooks.
    """
    import pandas as pd

    if not results:
        raise ValueError("results_table needs at least one RunResult")
    rows = []
    for r in results:
        row = {
            "method": r.config.method,
            "N": r.config.n_shots,
            "seed": r.config.seed,
            "test acc": r.metrics["test"]["overall"],
            "test acc (last)": r.metrics["test_last"]["overall"],
            "dev best": r.metrics["dev_best"],
        }
        row.update({t: v for t, v in sorted(r.metrics["test"].get("per_type", {}).items())})
        row["trainable"] = r.params["trainable"]
        row["trainable %"] = r.params["trainable_pct"]
        rows.append(row)
    return pd.DataFrame(rows).round(digits)


def plot_learning_curves(results: Sequence, title: str = "learning curves"):
    """Training loss and dev accuracy against optimiser steps, one line per run (one point per evaluation)."""
    if not results:
        raise ValueError("plot_learning_curves needs at least one RunResult")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    for r in results:
        label = f"{r.config.method} N={r.config.n_shots}"
        h = r.history
        line, = a.plot([x["step"] for x in h], [x["loss"] for x in h], label=label)
        dev = [x for x in h if "dev" in x]
        b.plot([x["step"] for x in dev], [x["dev"] for x in dev], marker=".", color=line.get_color(), label=label)
    a.set(xlabel="step", ylabel="training loss", yscale="log", title="training loss")
    b.set(xlabel="step", ylabel="dev accuracy", title="dev accuracy (model selection)")
    b.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def method_family(method: str) -> str:
    """The family a method registered with (``"other"`` for a name that is not registered).

    The 2403.08433 study groups PEFT methods into embedding composition (prompt, prefix) and layer
    composition (LoRA, serial and parallel adapters); the workbench's other methods sit in the
    layer-composition sub-families they belong to. Used to colour ``plot_accuracy_vs_params``.
    """
    return method_spec(method).family if method in list_methods() else "other"


def run_label(result) -> str:
    """``method`` or ``method (option=value, ...)`` when the run changed the method's defaults."""
    options = getattr(result.config, "method_config", None) or {}
    if not options:
        return result.config.method
    return f"{result.config.method} ({', '.join(f'{k}={v}' for k, v in sorted(options.items()))})"


def plot_accuracy_vs_params(results: Sequence, reference: str = "full", title: str | None = None,
                            metric: str = "test", baselines: dict | None = None, ax=None):
    """Test accuracy against % trainable parameters (log x), one labelled point per run.

    The plot MixPHM (arXiv 2303.01239) opens with. Runs of the ``reference`` method (full
    fine-tuning) are drawn as a horizontal dashed line instead of a point; the other points are
    coloured by :func:`method_family`. ``baselines`` (``{label: accuracy}``, e.g. an answer prior)
    adds dotted horizontal lines. ``metric`` picks ``metrics[metric]["overall"]`` (``"test"``
    is the dev-best checkpoint, ``"test_last"`` the last one). Returns the figure.
    """
    if not results:
        raise ValueError("plot_accuracy_vs_params needs at least one RunResult")
    if ax is None:
        fig, ax = plt.subplots(figsize=(9, 5.2))
    else:
        fig = ax.figure
    points = [r for r in results if r.config.method != reference]
    refs = [r for r in results if r.config.method == reference]
    families = sorted({method_family(r.config.method) for r in points})
    cmap = plt.get_cmap("tab10" if len(families) <= 10 else "tab20")
    colour = {f: cmap(i % cmap.N) for i, f in enumerate(families)}
    for family in families:
        rs = [r for r in points if method_family(r.config.method) == family]
        ax.scatter([r.params["trainable_pct"] for r in rs], [r.metrics[metric]["overall"] for r in rs],
                   s=36, color=colour[family], label=family, zorder=3, edgecolor="black", linewidth=0.4)
    for r in refs:
        acc = r.metrics[metric]["overall"]
        ax.axhline(acc, color="black", linestyle="--", linewidth=1, zorder=1,
                   label=f"{run_label(r)} fine-tuning ({r.params['trainable_pct']:.0f}% trainable): {acc:.2f}")
    for label, acc in (baselines or {}).items():
        ax.axhline(acc, color="grey", linestyle=":", linewidth=1.2, zorder=1, label=f"{label}: {acc:.2f}")
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters (% of the backbone, log scale)", ylabel=f"{metric} accuracy")
    if title is None:
        c = results[0].config
        title = "accuracy against trainable parameters"
        if all(hasattr(c, k) for k in ("task", "n_shots", "seed")):
            title = f"{c.task}, N = {c.n_shots}, seed {c.seed}: {title}"
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    _label_points(ax, [(run_label(r), r.params["trainable_pct"], r.metrics[metric]["overall"]) for r in points])
    return fig


def plot_summary_vs_params(table, reference: str = "full", title: str = "accuracy against trainable parameters",
                           baselines: dict | None = None, ax=None):
    """Mean test accuracy over seeds against % trainable parameters (log x), with error bars.

    ``table`` has one row per method: ``method``, ``mean``, ``std``, ``n`` and ``trainable_pct``
    (e.g. :func:`workbench.train.summarize` of one N with the runs' trainable share added, as the
    gallery study's ``summary`` analysis gives). Error bars are one standard deviation over seeds
    (none where a method has one seed). The ``reference`` method is a dashed line with a grey band
    of +- one std; ``baselines`` (``{label: accuracy}``) add dotted lines. Returns the figure.
    """
    import numpy as np

    need = {"method", "mean", "std", "n", "trainable_pct"}
    if missing := need - set(table.columns):
        raise ValueError(f"plot_summary_vs_params needs columns {sorted(need)}; missing {sorted(missing)}")
    if table.empty:
        raise ValueError("plot_summary_vs_params needs at least one row")
    if ax is None:
        fig, ax = plt.subplots(figsize=(9, 5.2))
    else:
        fig = ax.figure
    points = table[table["method"] != reference]
    families = sorted({method_family(m) for m in points["method"]})
    cmap = plt.get_cmap("tab10" if len(families) <= 10 else "tab20")
    for i, family in enumerate(families):
        rows = points[points["method"].map(method_family) == family]
        ax.errorbar(rows["trainable_pct"], rows["mean"], yerr=np.nan_to_num(rows["std"].to_numpy(float)), fmt="o",
                    ms=6, color=cmap(i % cmap.N), ecolor=cmap(i % cmap.N), elinewidth=1, capsize=2,
                    markeredgecolor="black", markeredgewidth=0.4, label=family, zorder=3)
    for _, r in table[table["method"] == reference].iterrows():
        ax.axhline(r["mean"], color="black", linestyle="--", linewidth=1, zorder=1,
                   label=f"{reference} fine-tuning: {r['mean']:.2f} (n = {int(r['n'])})")
        if r["n"] > 1 and np.isfinite(r["std"]):
            ax.axhspan(r["mean"] - r["std"], r["mean"] + r["std"], color="grey", alpha=0.15, zorder=0)
    for label, acc in (baselines or {}).items():
        ax.axhline(acc, color="grey", linestyle=":", linewidth=1.2, zorder=1, label=f"{label}: {acc:.2f}")
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters (% of the backbone, log scale)", ylabel="test accuracy (mean +- std over seeds)",
           title=title)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    _label_points(ax, list(zip(points["method"], points["trainable_pct"], points["mean"])))
    return fig


def _label_points(ax, labelled: list) -> None:
    """Annotate ``(label, x, y)`` points, stacking a label higher (with a leader line) when it would
    overlap a label already placed: many runs share an accuracy (0, or the "always no" score)."""
    from matplotlib.text import Text

    renderer = ax.figure.canvas.get_renderer()
    placed = []
    levels = [3, -11] + [3 + 9 * k for k in range(1, 40)]
    for label, x, y in sorted(labelled, key=lambda t: (t[1], t[2])):
        for i, dy in enumerate(levels):
            last = i == len(levels) - 1
            ann = ax.annotate(label, (x, y), textcoords="offset points", xytext=(3, dy), fontsize=7,
                              arrowprops=dict(arrowstyle="-", lw=0.4, color="grey") if dy > 3 else None)
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer)  # the text only, not the leader line
            if last or not any(box.overlaps(b) for b in placed):
                placed.append(box)
                break
            ann.remove()


def answers_table(results: Sequence, digits: int = 2):
    """What each run learned to say: one row per run with its learning rate, the steps it ran, the
    dev-best step, the last training loss, and its most frequent test prediction with that
    answer's share and the number of distinct answers. Shows at a glance which runs still produce
    the pre-training format (captions) instead of answers.
    """
    import pandas as pd
    from collections import Counter

    if not results:
        raise ValueError("answers_table needs at least one RunResult")
    rows = []
    for r in results:
        preds = list((getattr(r, "predictions", None) or {}).values())
        # ties broken alphabetically: a stored run's predictions come back sorted by id, a fresh
        # run's in test order, and the table must not depend on which one it got
        top, count = min(Counter(preds).items(), key=lambda kv: (-kv[1], kv[0])) if preds else ("", 0)
        rows.append({
            "run": run_label(r),
            "lr": r.metrics.get("lr"),
            "steps run": r.metrics.get("steps"),
            "best step": r.metrics.get("best_step"),
            "last train loss": r.history[-1]["loss"] if r.history else float("nan"),
            "most frequent answer": top,
            "its share": count / len(preds) if preds else float("nan"),
            "distinct answers": len(set(preds)),
        })
    return pd.DataFrame(rows).round({"last train loss": digits, "its share": digits})  # the lr as it is
