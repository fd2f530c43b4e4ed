"""The study notebooks' figures: what they draw from the analyses' tables, and their errors."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from workbench.viz.study_plots import (
    plot_ablations,
    plot_accuracy_vs_n,
    plot_draws,
    plot_redundancy,
    plot_routes,
)


def _redundancy(resampled=True):
    rows = []
    for method in ("houlsby", "mixphm"):
        for state in ("init", "trained"):
            for stack in ("encoder", "decoder"):
                for layer in range(3):
                    for target in ("pretrained", "task"):
                        for measure in ("rsa", "cka"):
                            v = 0.1 * layer + (0.3 if state == "trained" else 0.0)
                            row = dict(method=method, state=state, stack=stack, layer=layer,
                                       point=f"{stack}.{layer}.ffn", measure=measure, target=target, value=v)
                            if resampled:
                                row.update(null_lo=-0.05, null_hi=0.05, ci_lo=v - 0.02, ci_hi=v + 0.02, p_value=0.01)
                            rows.append(row)
    return pd.DataFrame(rows)


def test_accuracy_vs_n_draws_a_line_and_band_per_method():
    t = pd.DataFrame({"method": ["full"] * 2 + ["mixphm"] * 2, "n_shots": [16, 64] * 2, "mean": [.3, .5, .2, .4],
                      "std": [.01, .02, np.nan, .03], "n": 3})
    fig = plot_accuracy_vs_n(t)
    ax = fig.axes[0]
    assert [l.get_label() for l in ax.get_lines()] == ["full", "mixphm"]
    assert ax.get_lines()[1].get_linewidth() > ax.get_lines()[0].get_linewidth()  # the highlighted method
    assert len(ax.collections) == 2 and ax.get_xscale() == "log"


def test_redundancy_panels_curves_bands_and_errors():
    df = _redundancy()
    fig = plot_redundancy(df, "rsa")
    assert len(fig.axes) == 4  # 2 targets x 2 stacks
    ax = fig.axes[0]
    assert "encoder" in ax.get_title() and "redundancy" in ax.get_title()
    # one null band per trained method; x ticks are the modules in forward order
    assert sum(isinstance(c, matplotlib.collections.PolyCollection) for c in ax.collections) == 2
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.ffn", "1.ffn", "2.ffn"]
    fig = plot_redundancy(_redundancy(resampled=False), "cka", methods=["mixphm"], states=["trained"])
    assert len(fig.axes[0].get_lines()) == 1
    with pytest.raises(ValueError, match="no rows for measure 'mi'"):
        plot_redundancy(df, "mi")
    with pytest.raises(ValueError, match="lacks the columns"):
        plot_redundancy(df.drop(columns="point"))
    with pytest.raises(ValueError, match="empty"):
        plot_redundancy(df.iloc[:0])


def test_ablations_routes_and_draws():
    abl = pd.DataFrame({"axis": ["num_experts"] * 2 + ["rank"] * 2, "value": [4, 1, 8, 16], "official": [1, 0, 1, 0],
                        "mean": [.4, .3, .4, .35], "ci_low": [.3, .2, .3, .3], "ci_high": [.5, .4, .5, .4]})
    fig = plot_ablations(abl)
    assert [a.get_title() for a in fig.axes] == ["num_experts", "rank"]
    routes = pd.DataFrame({"seed": [13, 13, 21, 21], "route": ["official soup", "expert 0"] * 2,
                           "test_acc": [.4, .3, .42, .2]})
    fig = plot_routes(routes)
    assert [p.get_height() for p in fig.axes[0].patches] == pytest.approx([.41, .25])
    draws = pd.DataFrame({"module": ["encoder.0.ffn", "decoder.0.ffn"], "draws": [[1, 3], [2, 2]]})
    fig = plot_draws(draws)
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), [[.25, .75], [.5, .5]])
    with pytest.raises(ValueError, match="lacks the columns"):
        plot_routes(routes.drop(columns="route"))


def test_block_diagram_names_the_three_representations():
    from workbench.viz.study_plots import plot_mixphm_block

    texts = " ".join(t.get_text() for t in plot_mixphm_block().axes[0].texts)
    assert "f (frozen output)" in texts and "u = Δ(f)" in texts and "final repr. g" in texts


def test_gates_plot():
    from workbench.viz.study_plots import plot_gates

    rows = [dict(method=m, point=f"encoder.{i}.{s}", gate_q05=0.1, gate_q50=0.5, gate_q95=0.9, gate_moves_H=0.5,
                 module_moves_H=0.7) for m in ("vlpet-large", "vlpet-small") for i in range(2) for s in ("attn", "ffn")]
    fig = plot_gates(pd.DataFrame(rows))
    a, b = fig.axes
    assert [t.get_text() for t in a.get_xticklabels()] == ["0.attn", "0.ffn", "1.attn", "1.ffn"]
    assert len(b.get_lines()) == 4  # solid and dashed per method
    with pytest.raises(ValueError, match="lacks the columns"):
        plot_gates(pd.DataFrame(rows).drop(columns="gate_q50"))


def test_mode_gates_and_type_routing_plots():
    from workbench.viz.study_plots import plot_mode_gates, plot_type_routing

    rows = [dict(step=s, mode=m, gate=(1.0 if m < 3 else 0.1 * s / 50), modes_on=3, threshold=0.5 + s / 1000)
            for s in (25, 50) for m in range(5)]
    fig = plot_mode_gates(pd.DataFrame(rows))
    img = fig.axes[0].images[0].get_array()
    assert img.shape == (5, 2) and (img[:3, -1] == 1).all()  # sorted by the final gate
    per_type = pd.DataFrame({"expert 0": [0.7, 0.2], "expert 1": [0.3, 0.8]}, index=["count", "exist"])
    fig = plot_type_routing(per_type)
    assert [t.get_text() for t in fig.axes[0].texts][:2] == ["0.70", "0.30"]
    with pytest.raises(ValueError, match="empty"):
        plot_type_routing(per_type.iloc[:0])


def test_information_plot():
    from workbench.viz.study_plots import plot_information

    df = pd.DataFrame({"w_ib": [0.1, 0.0, 1.0], "acc_mean": [0.3, 0.2, 0.25], "test_acc": [0.31, 0.22, 0.2],
                       "mi_infonce": [1.0, 0.5, 0.8], "mi_nwj": [0.9, 0.4, 0.7], "h_answer": [2.5] * 3})
    fig = plot_information(df)
    a, b = fig.axes
    assert [t.get_text() for t in a.get_xticklabels()] == ["0", "0.1", "1"]  # sorted by weight
    assert list(a.get_lines()[0].get_ydata()) == [0.2, 0.3, 0.25]
    assert len(b.get_lines()) == 3  # two estimators and the ceiling
    with pytest.raises(ValueError, match="lacks the columns"):
        plot_information(df.drop(columns="h_answer"))


def _empirical_table():
    rows = [{"task": "shapes-vqa", "method": m, "size": s, "n_shots": n, "trainable": 10 * s,
             "mean": 0.1 * k + 0.01 * n / 16, "std": 0.01, "n": 3}
            for m in ("lora", "prompt") for k, s in enumerate((1, 4, 16)) for n in (16, 64)]
    return pd.DataFrame(rows)


def test_score_vs_size_and_heatmaps():
    from workbench.viz.study_plots import plot_score_heatmaps, plot_score_vs_size

    t = _empirical_table()
    fig = plot_score_vs_size(t[t["method"] == "lora"])
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["N=16", "N=64"] and list(lines[0].get_xdata()) == [10, 40, 160]
    fig = plot_score_heatmaps(t)
    maps = [a for a in fig.axes if a.images]
    assert [a.get_title() for a in maps] == ["lora", "prompt"]
    img = maps[0].images[0].get_array()
    assert img.shape == (2, 3) and img[0, 2] == pytest.approx(0.21)  # row N=16, column size 16
    with pytest.raises(ValueError, match="lacks the columns"):
        plot_score_vs_size(t.drop(columns="trainable"))


def test_mode_usage_plot():
    from workbench.viz.study_plots import plot_mode_usage

    shares = pd.DataFrame([{"point": p, "mode": m, "share": s, "gate": g}
                           for p, ss in (("enc.q", (0.7, 0.2, 0.1)), ("enc.v", (0.1, 0.1, 0.8)))
                           for m, (s, g) in enumerate(zip(ss, (0.2, 0.9, 0.6)))])
    summary = pd.DataFrame({"point": ["enc.q", "enc.v"], "modes_for_mass": [2, 2], "modes_on": [2, 2]})
    fig = plot_mode_usage(shares, summary)
    img = fig.axes[0].images[0].get_array()
    assert img.shape == (2, 3) and img[0, 0] == pytest.approx(0.2)  # mode 1 (gate 0.9) first
    with pytest.raises(ValueError, match="lacks the columns"):
        plot_mode_usage(shares.drop(columns="gate"), summary)


def test_lr_by_size():
    from workbench.viz.study_plots import plot_lr_by_size

    t = pd.DataFrame([{"method": m, "size": s, "lr_divisor": d, "test": 0.6 + 0.01 * d, "test_std": 0.01,
                       "chosen": d == 10} for m in ("lora", "parallel") for s in (1, 4) for d in (1, 10)])
    t = t[~((t["method"] == "parallel") & (t["lr_divisor"] == 1))]  # a method without the default's runs
    fig = plot_lr_by_size(t)
    assert [a.get_title() for a in fig.axes] == ["lora", "parallel"]
    lora = {c.get_label(): c for c in fig.axes[0].containers}
    par = {c.get_label(): c for c in fig.axes[1].containers}
    assert set(lora) == {"default lr", "default / 10"} and set(par) == {"default / 10"}
    # one colour per learning rate in every panel
    assert lora["default / 10"].lines[0].get_color() == par["default / 10"].lines[0].get_color()
    picked = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "picked by dev"][0]
    assert list(picked.get_ydata()) == pytest.approx([0.7, 0.7])
    with pytest.raises(ValueError, match="lacks the columns"):
        plot_lr_by_size(t.drop(columns="chosen"))
