"""Figures of the study notebooks: accuracy against N, per-layer redundancy curves with null bands,
ablations, inference routes and expert draws. Each takes the tidy DataFrame a study's analysis
returns (:mod:`workbench.studies.mixphm`) and returns a matplotlib Figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

MEASURE_LABELS = {"rsa": "RSA (Pearson of cosine RDMs)", "cka": "linear CKA", "mi": "MI, KSG on 4 PCs (nats)"}
TARGET_LABELS = {"pretrained": "u vs frozen output f (redundancy)", "task": "u vs final representation (task)"}


def _need(df, columns, what: str):
    if df is None or len(df) == 0:
        raise ValueError(f"{what}: the table is empty (no runs or rows to plot)")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: the table lacks the columns {missing}; it has {list(df.columns)}")


def plot_accuracy_vs_n(table, highlight: str | None = "mixphm", title: str = "test accuracy against N"):
    """Mean test accuracy against N (log axis), one line per method, +- one std over seeds as a band.

    ``table``: a summary with ``method, n_shots, mean, std, n`` (e.g. ``mixphm.table``).
    """
    _need(table, ["method", "n_shots", "mean", "std"], "plot_accuracy_vs_n")
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for method, part in table.groupby("method", sort=False, observed=True):
        part = part.sort_values("n_shots")
        x, y, s = part["n_shots"].to_numpy(), part["mean"].to_numpy(), np.nan_to_num(part["std"].to_numpy())
        bold = method == highlight
        line, = ax.plot(x, y, marker="o", lw=2.6 if bold else 1.3, label=str(method), zorder=3 if bold else 2)
        ax.fill_between(x, y - s, y + s, color=line.get_color(), alpha=0.15 if bold else 0.07, lw=0)
    ax.set(xscale="log", xlabel="N (training examples; dev has as many)", ylabel="test accuracy", title=title)
    ns = sorted(table["n_shots"].unique())
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def _positions(part):
    """x positions of the modules of one stack in forward order, and their labels ("2.ffn")."""
    points = list(dict.fromkeys(part["point"]))
    labels = [p.split(".", 1)[1] if "." in p else p for p in points]
    return {p: i for i, p in enumerate(points)}, labels


def plot_redundancy(df, measure: str = "rsa", methods=None, states=None, bands: bool = True,
                    title: str | None = None):
    """Per-layer curves of one measure: rows = target (redundancy with the frozen output, correlation
    with the task representation), columns = encoder / decoder; one colour per method, solid after
    training and dashed before; error bars = the bootstrap interval; shaded = the permutation null band.

    ``df``: :func:`~workbench.studies.redundancy_analysis` rows (with ``state`` when several states
    are drawn, ``null_lo`` ... when resampled).
    """
    _need(df, ["method", "stack", "point", "measure", "target", "value"], "plot_redundancy")
    d = df[df["measure"] == measure]
    if d.empty:
        raise ValueError(f"plot_redundancy: no rows for measure {measure!r}; the table has {sorted(set(df['measure']))}")
    if methods is not None:
        d = d[d["method"].isin(methods)]
    if "state" not in d.columns:
        d = d.assign(state="trained")
    if states is not None:
        d = d[d["state"].isin(states)]
    stacks = [s for s in ("encoder", "decoder") if s in set(d["stack"])]
    targets = [t for t in ("pretrained", "task") if t in set(d["target"])]
    fig, axes = plt.subplots(len(targets), len(stacks), figsize=(5.2 * len(stacks), 3.0 * len(targets)),
                             squeeze=False, sharey="row")
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(d["method"]))}
    for r, target in enumerate(targets):
        for c, stack in enumerate(stacks):
            ax = axes[r][c]
            part = d[(d["stack"] == stack) & (d["target"] == target)]
            pos, labels = _positions(d[d["stack"] == stack])
            for (method, state), g in part.groupby(["method", "state"], sort=False):
                x = np.array([pos[p] for p in g["point"]], dtype=float)
                y = g["value"].to_numpy()
                col, dashed = colours[method], state != "trained"
                lab = f"{method}" + (f" ({state})" if dashed else "")
                if "ci_lo" in g and g["ci_lo"].notna().any():
                    err = np.vstack([y - g["ci_lo"].to_numpy(), g["ci_hi"].to_numpy() - y])
                    ax.errorbar(x, y, yerr=np.clip(np.nan_to_num(err), 0, None), color=col, ls="--" if dashed else "-",
                                marker="o" if not dashed else "x", ms=4, lw=1.4, capsize=2, label=lab,
                                alpha=0.6 if dashed else 1.0)
                else:
                    ax.plot(x, y, color=col, ls="--" if dashed else "-", marker="o" if not dashed else "x", ms=4,
                            label=lab, alpha=0.6 if dashed else 1.0)
                if bands and not dashed and "null_lo" in g and g["null_lo"].notna().any():
                    ax.fill_between(x, g["null_lo"].to_numpy(), g["null_hi"].to_numpy(), color=col, alpha=0.12, lw=0)
            ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
            ax.grid(alpha=0.3)
            ax.set_title(f"{stack}: {TARGET_LABELS[target]}", fontsize=9)
            if c == 0:
                ax.set_ylabel(MEASURE_LABELS.get(measure, measure))
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(title or f"{MEASURE_LABELS.get(measure, measure)} per module (shaded: permutation null, "
                 "bars: bootstrap 95 %)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_ablations(df, title: str = "MixPHM ablations at N = 64"):
    """One panel per ablation axis: mean test accuracy +- the 95 % interval per value; the official
    value in black. ``df``: :func:`workbench.studies.mixphm.ablations`."""
    _need(df, ["axis", "value", "mean", "ci_low", "ci_high", "official"], "plot_ablations")
    axes_names = list(dict.fromkeys(df["axis"]))
    fig, axes = plt.subplots(1, len(axes_names), figsize=(3.0 * len(axes_names), 3.2), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], axes_names):
        part = df[df["axis"] == name].reset_index(drop=True)
        x = np.arange(len(part))
        y = part["mean"].to_numpy()
        err = np.vstack([y - part["ci_low"].to_numpy(), part["ci_high"].to_numpy() - y])
        for i, row in part.iterrows():
            ax.errorbar(x[i], y[i], yerr=np.nan_to_num(err[:, i:i + 1]), fmt="o", capsize=3,
                        color="black" if row["official"] else "C0")
        ax.set_xticks(x, [str(v) for v in part["value"]], rotation=30, fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (95 % interval)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_routes(df, title: str = "MixPHM at inference: merged, averaged or single experts"):
    """Test accuracy per inference route, one point per seed and the mean as a bar.
    ``df``: :func:`workbench.studies.mixphm.merges`."""
    _need(df, ["route", "seed", "test_acc"], "plot_routes")
    routes = list(dict.fromkeys(df["route"]))
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    means = df.groupby("route", sort=False)["test_acc"].mean().reindex(routes)
    ax.bar(range(len(routes)), means.to_numpy(), color="C7", alpha=0.5)
    for k, (seed, g) in enumerate(df.groupby("seed")):
        ax.plot([routes.index(r) for r in g["route"]], g["test_acc"], "o", color=f"C{k}", label=f"seed {seed}")
    ax.set_xticks(range(len(routes)), routes, rotation=20, fontsize=8)
    ax.set(ylabel="test accuracy", title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def plot_draws(df, title: str = "expert draws over training (share of each module's draws)"):
    """Heat map of each module's draw share per expert (rows: modules), from one run's ``routing`` rows."""
    _need(df, ["module", "draws"], "plot_draws")
    shares = np.array([np.asarray(d, float) / max(1, sum(d)) for d in df["draws"]])
    fig, ax = plt.subplots(figsize=(4.5, 0.28 * len(df) + 1.2))
    im = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0, vmax=max(0.5, float(shares.max())))
    ax.set_yticks(range(len(df)), list(df["module"]), fontsize=7)
    ax.set_xticks(range(shares.shape[1]), [f"expert {k}" for k in range(shares.shape[1])], fontsize=8)
    fig.colorbar(im, ax=ax, label="share of draws")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_mixphm_block():
    """Where MixPHM's analysis reads its representations in a T5 layer's FFN sub-layer: the frozen
    output f = FFN(LN(x)), the module's contribution u = Delta(f), the sub-layer output
    x + f + u, and (after the last layer) the stack's final representation g."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, ax = plt.subplots(figsize=(10.5, 2.8))
    ax.set_xlim(0, 11.6)
    ax.set_ylim(0.5, 3.1)
    ax.axis("off")
    h = 0.7

    def box(x0, y0, w, text, colour):
        ax.add_patch(FancyBboxPatch((x0, y0), w, h, boxstyle="round,pad=0.05", fc=colour, ec="black", lw=1))
        ax.text(x0 + w / 2, y0 + h / 2, text, ha="center", va="center", fontsize=8)

    def arrow(a, b, text=None, colour="black", dy=0.12):
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=10, color=colour, lw=1.2))
        if text:
            ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + dy, text, fontsize=9, color=colour, ha="center")

    y = 1.3
    box(0.1, y, 1.1, "x\n(layer input)", "white")
    box(1.6, y, 1.1, "LayerNorm", "#eeeeee")
    box(3.1, y, 1.1, "FFN\n(frozen)", "#dddddd")
    box(4.9, 2.25, 2.0, "MixPHM  Δ\nDown → GELU → Up_k", "#cfe3ff")
    box(7.2, y, 0.9, "f + u", "white")
    box(8.5, y, 1.0, "x + f + u", "white")
    box(10.0, y, 1.5, "later layers …\nfinal repr. g", "#fff2cc")
    mid = y + h / 2
    arrow((1.2, mid), (1.6, mid))
    arrow((2.7, mid), (3.1, mid))
    arrow((4.2, mid), (7.2, mid), "f (frozen output)", "C0")
    arrow((4.6, mid + 0.02), (5.2, 2.25), None, "C0")
    arrow((6.9, 2.6), (7.65, y + h + 0.02), "u = Δ(f)", "C3", dy=0.2)
    arrow((8.1, mid), (8.5, mid))
    arrow((9.5, mid), (10.0, mid))
    ax.plot([0.65, 0.65, 9.0], [y, 0.85, 0.85], color="black", lw=1)
    arrow((9.0, 0.85), (9.0, y))
    ax.text(4.8, 0.9, "residual", fontsize=8, ha="center")
    ax.text(0.1, 2.85, "redundancy = similarity(u, f)\ntask correlation = similarity(u, g)", fontsize=9,
            color="C3", va="center")
    fig.tight_layout()
    return fig


def plot_gates(df, title: str = "VL-PET gates after training (N = 64, seed 13)"):
    """Per gated module (x, in forward order) and method (colour): the median gate value with its
    5-95 % range (left), and how far the gate and the whole module move the frozen output (right:
    ||(G - 1) H|| / ||H|| solid, ||H_out - H|| / ||H|| dashed). ``df``: :func:`workbench.studies.vlpet.gates`."""
    _need(df, ["method", "point", "gate_q05", "gate_q50", "gate_q95", "gate_moves_H", "module_moves_H"], "plot_gates")
    points = list(dict.fromkeys(df["point"]))
    labels = [p.split(".", 1)[1] for p in points]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.6))
    methods = list(dict.fromkeys(df["method"]))
    width = 0.8 / max(1, len(methods))
    for k, (method, part) in enumerate(df.groupby("method", sort=False)):
        x = np.array([points.index(p) for p in part["point"]], dtype=float) + (k - (len(methods) - 1) / 2) * width
        med = part["gate_q50"].to_numpy()
        err = np.vstack([med - part["gate_q05"].to_numpy(), part["gate_q95"].to_numpy() - med])
        a.errorbar(x, med, yerr=np.clip(err, 0, None), fmt="o", ms=4, capsize=2, color=f"C{k}", label=method)
        xs = np.array([points.index(p) for p in part["point"]], dtype=float)
        b.plot(xs, part["gate_moves_H"], "-o", ms=3, color=f"C{k}", label=method)
        b.plot(xs, part["module_moves_H"], "--", color=f"C{k}", alpha=0.6)
    for ax in (a, b):
        ax.set_xticks(range(len(points)), labels, rotation=60, fontsize=7)
        ax.grid(alpha=0.3)
    a.set(ylabel="gate value (median, 5-95 %)", title="gate values per module")
    b.set(ylabel="relative change of H", title="||(G-1)H|| / ||H|| (solid), ||H_out - H|| / ||H|| (dashed)")
    a.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_mode_gates(df, title: str = "PETAL: soft mode gates over training"):
    """Heat map of the mode gates (rows: modes sorted by their final gate, columns: evaluation steps)
    with the number of modes on (> 0.5) and the threshold over training. ``df``:
    :func:`workbench.studies.petal.mode_gates`."""
    _need(df, ["step", "mode", "gate", "modes_on", "threshold"], "plot_mode_gates")
    grid = df.pivot(index="mode", columns="step", values="gate")
    grid = grid.loc[grid.iloc[:, -1].sort_values(ascending=False).index]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    im = a.imshow(grid.to_numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1,
                  extent=[grid.columns.min(), grid.columns.max(), len(grid), 0])
    fig.colorbar(im, ax=a, label="gate")
    a.set(xlabel="step", ylabel="mode (sorted by final gate)", title="mode gates")
    per_step = df.groupby("step")[["modes_on", "threshold"]].first()
    b.plot(per_step.index, per_step["modes_on"], "-o", ms=3, color="C0")
    b.set(xlabel="step", ylabel="modes on (gate > 0.5)", title="modes on and threshold")
    b2 = b.twinx()
    b2.plot(per_step.index, per_step["threshold"], "--", color="C3")
    b2.set_ylabel("threshold Γ", color="C3")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_type_routing(per_type, title: str = "PETAL: mean gate probability per question type and expert"):
    """Heat map of a type x expert table of mean routing probabilities (:func:`workbench.studies.petal.routing`)."""
    if per_type is None or len(per_type) == 0:
        raise ValueError("plot_type_routing: the table is empty (no routed questions)")
    fig, ax = plt.subplots(figsize=(1.2 * per_type.shape[1] + 2.5, 0.35 * len(per_type) + 1.4))
    im = ax.imshow(per_type.to_numpy(), aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(per_type.shape[1]), list(per_type.columns), fontsize=8)
    ax.set_yticks(range(len(per_type)), list(per_type.index), fontsize=8)
    for i in range(len(per_type)):
        for j in range(per_type.shape[1]):
            ax.text(j, i, f"{per_type.iat[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white")
    fig.colorbar(im, ax=ax, label="mean probability")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_information(df, title: str = "PETAL: the information bottleneck's weight"):
    """Accuracy (mean over seeds, and the analysed run) and the estimated I(instruction; answer) per
    IB weight, with the answers' entropy as the ceiling. ``df``: :func:`workbench.studies.petal.information`."""
    _need(df, ["w_ib", "acc_mean", "test_acc", "h_answer"], "plot_information")
    d = df.sort_values("w_ib")
    x = range(len(d))
    labels = [f"{w:g}" for w in d["w_ib"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    a.plot(x, d["acc_mean"], "-o", label="mean over seeds")
    a.plot(x, d["test_acc"], "s", mfc="none", label="the analysed run")
    a.set(xticks=list(x), xticklabels=labels, xlabel="IB weight", ylabel="test accuracy", title="accuracy")
    a.legend(fontsize=8)
    for i, col in enumerate(c for c in d.columns if c.startswith("mi_")):
        b.plot(x, d[col], "-o", color=f"C{i}", label=col[3:])
    b.plot(x, d["h_answer"], "--", color="grey", label="H(answer): ceiling")
    b.set(xticks=list(x), xticklabels=labels, xlabel="IB weight", ylabel="nats",
          title="I(instruction vector; answer), held-out bounds")
    b.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_score_vs_size(table, title: str = "score against parameter size, one line per N", ylabel: str = "score"):
    """Mean score against trainable parameters (log axis), one line per N, +- one std over seeds as a
    band. ``table``: rows of one task and method with ``n_shots, size, trainable, mean, std``
    (:func:`workbench.studies.empirical.grid_table`)."""
    _need(table, ["n_shots", "size", "trainable", "mean", "std"], "plot_score_vs_size")
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for n, part in table.groupby("n_shots"):
        part = part.sort_values("trainable")
        x, y, s = part["trainable"].to_numpy(float), part["mean"].to_numpy(), np.nan_to_num(part["std"].to_numpy())
        line, = ax.plot(x, y, marker="o", label=f"N={n}")
        ax.fill_between(x, y - s, y + s, color=line.get_color(), alpha=0.1, lw=0)
    ax.set(xscale="log", xlabel="trainable parameters", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def lr_label(divisor: float) -> str:
    """How a learning rate reads beside the method's default (``divisor``: default / lr)."""
    if np.isclose(divisor, 1):
        return "default lr"
    return f"default / {divisor:g}" if divisor > 1 else f"default x {round(1 / divisor, 2):g}"


def plot_lr_by_size(table, title: str = "shapes-vqa, N = 1000: test accuracy against size, one line per lr"):
    """Per method, mean test accuracy against size (log axis), one line per learning rate (the
    default, default / d and default x f), +- one std over seeds as error bars; a ring marks the lr each size's dev
    score picks. ``table``: :func:`workbench.studies.empirical_lr.lr_table`."""
    _need(table, ["method", "size", "lr_divisor", "test", "test_std", "chosen"], "plot_lr_by_size")
    methods = list(dict.fromkeys(table["method"]))
    colors = {d: f"C{i}" for i, d in enumerate(sorted(table["lr_divisor"].unique()))}  # one colour per lr everywhere
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.6), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods):
        part = table[table["method"] == method]
        for d, line in part.groupby("lr_divisor"):
            line = line.sort_values("size")
            ax.errorbar(line["size"], line["test"], yerr=np.nan_to_num(line["test_std"].to_numpy(float)),
                        marker="o", ms=4, capsize=2, color=colors[d],
                        label=lr_label(d))
        picked = part[part["chosen"]].sort_values("size")
        ax.plot(picked["size"], picked["test"], "o", ms=11, mfc="none", mec="black", label="picked by dev")
        ax.set(xscale="log", xlabel="size (rank or bottleneck)", title=method)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_score_heatmaps(table, title: str = "mean score: N x parameter size", methods=None):
    """One heat map per method (rows: N, columns: the method's sizes, smallest first) of the mean
    score over seeds, annotated, on a colour scale shared by the methods. ``table``: rows of one task
    (:func:`workbench.studies.empirical.grid_table`)."""
    _need(table, ["method", "n_shots", "size", "mean"], "plot_score_heatmaps")
    methods = list(methods) if methods is not None else list(dict.fromkeys(table["method"]))
    vmin, vmax = float(table["mean"].min()), float(table["mean"].max())
    fig, axes = plt.subplots(1, len(methods), figsize=(2.6 * len(methods) + 1.2, 3.2), squeeze=False)
    im = None
    for ax, method in zip(axes[0], methods):
        grid = table[table["method"] == method].pivot(index="n_shots", columns="size", values="mean")
        grid = grid.sort_index().sort_index(axis=1)
        im = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, origin="lower")
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns], fontsize=8)
        ax.set_yticks(range(grid.shape[0]), [str(i) for i in grid.index], fontsize=8)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                v = grid.iat[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white")
        ax.set(title=method, xlabel="size")
    axes[0][0].set_ylabel("N")
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), label="mean score", shrink=0.9)
    fig.suptitle(title, fontsize=10, y=1.04)  # above the panels' own titles
    return fig


def plot_mode_usage(shares, summary, title: str = "PETAL: how each matrix weights the shared modes"):
    """Heat map of each targeted matrix's share per mode (rows: matrices in model order, columns:
    modes sorted by their global gate), and per matrix the modes that carry 90 % of its weight.
    ``shares``, ``summary``: :func:`workbench.studies.petal.mode_usage`."""
    _need(shares, ["point", "mode", "share", "gate"], "plot_mode_usage")
    _need(summary, ["point", "modes_for_mass", "modes_on"], "plot_mode_usage")
    grid = shares.pivot(index="point", columns="mode", values="share").reindex(list(summary["point"]))
    order = shares.groupby("mode")["gate"].first().sort_values(ascending=False).index
    grid = grid[order]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 0.16 * len(grid) + 2.2), gridspec_kw={"width_ratios": [3, 1]})
    im = a.imshow(grid.to_numpy(), aspect="auto", cmap="magma", vmin=0)
    fig.colorbar(im, ax=a, label="share of the matrix's update")
    a.set_yticks(range(len(grid)), [str(p) for p in grid.index], fontsize=6)
    a.set(xlabel="mode (sorted by its global gate)", title="share per matrix and mode")
    y = np.arange(len(summary))
    b.barh(y, summary["modes_for_mass"], color="C0")
    b.axvline(float(summary["modes_on"].iloc[0]), color="C3", ls="--", label="modes on (gate > 0.5)")
    b.set_yticks(y, [""] * len(y))
    b.invert_yaxis()
    b.set(xlabel="modes for 90 % of the weight", title="modes used per matrix")
    b.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
