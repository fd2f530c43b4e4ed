"""Training figures and tables, on fake RunResult-like objects (no training)."""

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest

from workbench.viz.training_plots import (
    answers_table,
    method_family,
    plot_accuracy_vs_params,
    results_table,
    run_label,
)


def fake(method, acc, pct, method_config=None, per_type=None):
    return SimpleNamespace(
        config=SimpleNamespace(method=method, method_config=method_config or {}, task="shapes-vqa", n_shots=64,
                               seed=13),
        metrics={"test": {"overall": acc, "per_type": per_type or {}},
                 "test_last": {"overall": acc - 0.01, "per_type": {}}, "dev_best": acc + 0.01},
        params={"trainable": int(pct * 1000), "trainable_pct": pct},
        history=[{"step": 4, "epoch": 2, "loss": 1.0, "dev": acc}],
    )


RESULTS = [
    fake("lora", 0.41, 3.47),
    fake("prompt", 0.30, 1.07),
    fake("mixphm", 0.44, 2.5, method_config={"bottleneck": 12}),
    fake("full", 0.47, 100.89),
]


def test_one_labelled_point_per_method_and_full_as_a_line():
    fig = plot_accuracy_vs_params(RESULTS)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    offsets = [tuple(o) for c in ax.collections for o in c.get_offsets()]
    assert sorted(offsets) == sorted([(3.47, 0.41), (1.07, 0.30), (2.5, 0.44)])  # no point for full
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == ["lora", "mixphm (bottleneck=12)", "prompt"]
    hlines = [l for l in ax.lines if l.get_linestyle() == "--"]
    assert len(hlines) == 1 and all(y == pytest.approx(0.47) for y in hlines[0].get_ydata())
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("full fine-tuning") and "0.47" in t for t in legend)
    assert "embedding composition" in legend and "layer: PHM adapters" in legend
    assert "shapes-vqa" in ax.get_title()
    plt.close(fig)


def test_without_a_reference_there_is_no_line_and_an_axis_can_be_given():
    fig, ax = plt.subplots()
    out = plot_accuracy_vs_params(RESULTS[:2], ax=ax, title="t", metric="test_last", baselines={"prior": 0.25})
    assert out is fig and ax.get_title() == "t"
    assert not [l for l in ax.lines if l.get_linestyle() == "--"]
    dotted = [l for l in ax.lines if l.get_linestyle() == ":"]
    assert len(dotted) == 1 and dotted[0].get_ydata()[0] == 0.25
    assert "prior: 0.25" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(o[1] for c in ax.collections for o in c.get_offsets()) == pytest.approx([0.29, 0.40])
    plt.close(fig)


def test_empty_results_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        plot_accuracy_vs_params([])


def test_labels_and_families():
    assert run_label(RESULTS[0]) == "lora" and run_label(RESULTS[2]) == "mixphm (bottleneck=12)"
    assert method_family("prefix") == "embedding composition"
    assert method_family("lora") != method_family("prompt")
    assert method_family("not-a-method") == "other"


def test_results_table_rounds_and_keeps_per_type_columns():
    table = results_table([fake("lora", 0.41234, 3.4712, per_type={"count": 0.256, "exist": 0.5})], digits=2)
    row = table.iloc[0]
    assert row["test acc"] == 0.41 and row["count"] == 0.26 and row["trainable %"] == 3.47


def test_answers_table_shows_the_most_frequent_answer():
    r = fake("lora", 0.17, 3.47)
    r.metrics.update(lr=0.001, steps=22, best_step=2)
    r.predictions = {"q1": "no", "q2": "no", "q3": "the image shows", "q4": "no"}
    row = answers_table([r, fake("prompt", 0.0, 1.07)]).iloc[0]
    assert row["run"] == "lora" and row["most frequent answer"] == "no" and row["its share"] == 0.75
    assert row["distinct answers"] == 2 and row["steps run"] == 22 and row["best step"] == 2
    assert row["last train loss"] == 1.0 and row["lr"] == 0.001  # not rounded away
    with pytest.raises(ValueError, match="at least one"):
        answers_table([])


def test_answers_table_breaks_ties_whatever_the_order_of_the_predictions():
    a, b = fake("lora", 0.0, 3.47), fake("lora", 0.0, 3.47)
    a.predictions = {"q1": "circle", "q2": "diamond"}
    b.predictions = {"q2": "diamond", "q1": "circle"}
    assert answers_table([a])["most frequent answer"][0] == answers_table([b])["most frequent answer"][0] == "circle"


def test_plot_summary_vs_params_draws_error_bars_and_the_reference():
    import pandas as pd

    from workbench.viz.training_plots import plot_summary_vs_params

    table = pd.DataFrame({"method": ["full", "lora", "prompt"], "mean": [0.5, 0.45, 0.2], "std": [0.02, 0.03, float("nan")],
                          "n": [3, 3, 1], "trainable_pct": [100.0, 3.5, 0.1]})
    fig = plot_summary_vs_params(table)
    ax = fig.axes[0]
    assert any(line.get_linestyle() == "--" and line.get_ydata()[0] == 0.5 for line in ax.get_lines())
    assert len(ax.containers) >= 1  # error bar containers
    with pytest.raises(ValueError, match="missing.*trainable_pct"):
        plot_summary_vs_params(table.drop(columns=["trainable_pct"]))
    plt.close(fig)
