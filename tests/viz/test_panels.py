"""The gallery panel's logic, driven without a browser."""

import pytest

from workbench.train import RunConfig
from workbench.viz.panels import GalleryPanel, main_knob


def test_config_follows_the_choices():
    calls = []
    panel = GalleryPanel(RunConfig(), methods=("lora", "mixphm", "full"), runner=lambda c: calls.append(c) or c)
    panel.method, panel.n_shots, panel.knob_value = "mixphm", 32, 8
    cfg = panel.run()
    assert cfg.method == "mixphm" and cfg.n_shots == 32 and cfg.method_config == {"num_experts": 8}
    assert calls == [cfg] and panel.last is cfg
    panel.method, panel.knob_value = "full", None
    assert panel.config().method_config == {}


def test_bad_choices_are_refused():
    panel = GalleryPanel(RunConfig(), methods=("lora",))
    panel.method = "adalora"
    with pytest.raises(ValueError, match="offers"):
        panel.config()
    panel.method, panel.knob_value = "lora", 3
    with pytest.raises(ValueError, match="r must be one of"):
        panel.config()


def test_widget_runs_through_the_same_logic():
    pytest.importorskip("ipywidgets")
    seen = []
    panel = GalleryPanel(RunConfig(), methods=("lora", "vlpet"), runner=lambda c: seen.append(c) or _Fake())
    box = panel.widget()
    method, shots, knob, button = box.children[0].children
    method.value = "vlpet"
    assert knob.description == "granularity" and "middleX" in knob.options
    knob.value, shots.value = "small", 16
    button.click()
    assert seen[-1].method == "vlpet" and seen[-1].n_shots == 16 and seen[-1].method_config == {"granularity": "small"}
    assert main_knob("vlpet")[0] == "granularity"


class _Fake:
    def summary(self):
        return "ok"


def test_panel_drops_a_knob_equal_to_the_default_and_applies_settings():
    # the default rank of lora: choosing it must give the same run (hash) as not choosing it
    from workbench.methods import get_config

    settings = {"lora": {"lr": 5e-3}, "mixphm": {"method_config": {"reduction_factor": 16}}}
    panel = GalleryPanel(RunConfig(), methods=("lora", "mixphm"), settings=settings)
    panel.method, panel.knob_value = "lora", get_config("lora").r
    chosen = panel.config()
    panel.knob_value = None
    assert chosen.hash == panel.config().hash
    assert chosen.lr == 5e-3 and chosen.method_config == {}
    panel.method, panel.knob_value = "mixphm", 2
    assert panel.config().method_config == {"reduction_factor": 16, "num_experts": 2}


def test_panel_widget_offers_default_and_reports_bad_configs(capsys):
    def refuse(cfg):
        raise ValueError("bottleneck 10 is not divisible by n = 4")

    panel = GalleryPanel(RunConfig(), methods=("lora", "mixphm"), runner=refuse)
    box = panel.widget()
    method, shots, knob, button = box.children[0].children
    assert knob.options[0] == "default" and knob.value == "default"
    method.value = "mixphm"
    assert knob.description == "num_experts" and knob.value == "default"
    button.click()
    # outside a notebook the Output area passes prints through to stdout
    assert "not run: bottleneck 10" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- MixPHM panel
class _Result:
    def __init__(self, cfg, acc=0.5):
        self.config, self.hash, self.test_accuracy, self.reused = cfg, cfg.hash, acc, False
        self.params = {"trainable_pct": 1.234}

    def summary(self):
        return f"mixphm {self.config.method_config}"


def _rows(value):
    import pandas as pd

    return pd.DataFrame({"method": "ref", "stack": ["encoder", "encoder", "decoder"],
                         "point": ["encoder.0.ffn", "encoder.1.ffn", "decoder.0.ffn"], "measure": "rsa",
                         "target": "pretrained", "value": [value, value + 0.1, value]})


def test_mixphm_panel_builds_the_study_configs_and_keeps_its_runs():
    from workbench.studies.mixphm import ablation_config
    from workbench.viz.panels import MixPHMPanel

    base = RunConfig(task="shapes-vqa", quiet=True)
    panel = MixPHMPanel(base, runner=_Result, analyser=lambda r: _rows(0.3), reference=_rows(0.5))
    assert panel.config().hash == ablation_config("num_experts", 4).hash  # the official run
    panel.num_experts = 2
    assert panel.config().hash == ablation_config("num_experts", 2).hash
    panel.w_red = panel.w_mi = 0.0
    assert panel.config().method_config == {"num_experts": 2, "w_red": 0.0, "w_mi": 0.0}
    panel.run()
    panel.run()  # the same configuration twice is one row
    panel.num_experts = 8
    panel.run()
    t = panel.table()
    assert len(t) == 2 and list(t["configuration"]) == [
        "mixphm [num_experts=2, w_red=0.0, w_mi=0.0] N=64 s13", "mixphm [num_experts=8, w_red=0.0, w_mi=0.0] N=64 s13"]
    assert len(panel.curves) == 2
    fig = panel.figure()
    legend = next(a.get_legend() for a in fig.axes if a.get_legend() is not None)
    labels = {t.get_text() for t in legend.get_texts()}
    assert {"ref", "mixphm [num_experts=2, w_red=0.0, w_mi=0.0] N=64 s13"} <= labels
    panel.rank = 3
    with pytest.raises(ValueError, match="rank must be one of"):
        panel.config()


def test_mixphm_panel_widget_sets_the_fields_and_reports(capsys):
    pytest.importorskip("ipywidgets")
    from workbench.viz.panels import MixPHMPanel

    seen = []
    panel = MixPHMPanel(RunConfig(task="shapes-vqa", quiet=True), runner=lambda c: seen.append(c) or _Result(c))
    box = panel.widget()
    row1, row2, out = box.children
    experts, rank, reduction, w_red = row1.children
    w_mi, shots, seed, button = row2.children
    experts.value, rank.value, shots.value, seed.value = 8, 16, 100, 42
    button.click()
    assert seen[-1].method_config == {"num_experts": 8, "rank": 16}
    assert seen[-1].n_shots == 100 and seen[-1].seed == 42
    assert panel.table()["configuration"].iloc[0].startswith("mixphm [num_experts=8, rank=16]")


def test_vlpet_panel_builds_the_study_configs():
    from workbench.studies import vlpet as study
    from workbench.viz.panels import VLPETPanel

    panel = VLPETPanel(RunConfig(task="shapes-vqa", quiet=True), runner=_Result, analyser=lambda r: "rows")
    assert panel.config().hash == study.vlpet_config("large").hash
    panel.granularity, panel.design = "small", "encoder only"
    assert panel.config().hash == study.vlpet_config("small", decoder_design="none").hash
    panel.run()
    panel.scale, panel.n_shots = 1.0, 16
    assert panel.config().method_config == {"granularity": "small", "scale": 1.0, "decoder_design": "none"}
    panel.run()
    assert len(panel.table()) == 2 and panel.analyses[panel.label(panel.results[0])] == "rows"
    panel.r = 100
    with pytest.raises(ValueError, match="r must be one of"):
        panel.config()


def test_vlpet_panel_widget(capsys):
    pytest.importorskip("ipywidgets")
    from workbench.viz.panels import VLPETPanel

    seen = []
    panel = VLPETPanel(RunConfig(task="shapes-vqa", quiet=True), runner=lambda c: seen.append(c) or _Result(c))
    row1, row2, _ = panel.widget().children
    granularity, r, r_gate, scale = row1.children
    design, shots, seed, button = row2.children
    granularity.value, design.value, shots.value = "middleY", "encoder + full decoder", 500
    button.click()
    assert seen[-1].method_config == {"granularity": "middleY", "decoder_design": "full"} and seen[-1].n_shots == 500


def test_petal_panel_builds_the_study_configs():
    from workbench.studies import petal as study
    from workbench.viz.panels import PETALPanel

    panel = PETALPanel(RunConfig(task="shapes-vqa", quiet=True), runner=_Result)
    assert panel.config().hash == study.ablation_config("rank (CP)", 64).hash
    panel.learn_threshold = False
    assert panel.config().hash == study.ablation_config("threshold", "frozen").hash
    panel.learn_threshold, panel.w_ib, panel.n_shots = True, 0.0, 16
    assert panel.config().method_config == {"w_ib": 0.0} and panel.config().n_shots == 16
    panel.run()
    assert panel.table()["configuration"].iloc[0] == "petal [w_ib=0.0] N=16 s13"


# ------------------------------------------------------------------------------------- empirical panel
class _Scored(_Result):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.metrics = {"test": {"overall": 0.61, "BLEU-4": 0.22, "CIDEr": 0.61, "n": 10, "per_type": {}}}


def _grid(monkeypatch):
    import pandas as pd

    from workbench.studies import empirical as study

    def grid_table(store, metric=None):
        value = 0.2 if metric == "BLEU-4" else 0.6
        return pd.DataFrame([{"task": "shapes-caption", "method": "prompt", "size": 32, "n_shots": 250,
                              "mean": value, "std": 0.01, "n": 3}])

    monkeypatch.setattr(study, "grid_table", grid_table)
    return study


def test_empirical_panel_builds_the_grid_cells_and_reads_the_metric(monkeypatch):
    from workbench.viz.panels import EmpiricalPanel

    study = _grid(monkeypatch)
    panel = EmpiricalPanel(runner=_Scored, store="bundle")
    assert panel.config().hash == study.config("shapes-vqa", "lora", 4, 64, 13).hash  # the middle size
    panel.method, panel.task, panel.size, panel.n_shots = "prompt", "shapes-caption", 32, 250
    assert panel.config().hash == study.config("shapes-caption", "prompt", 32, 250, 13).hash
    result = panel.run()
    assert panel.score(result) == 0.61
    assert panel.describe(result).endswith("CIDEr-D 0.610 (seed 13); over 3 seeds 0.600 +- 0.010")
    panel.metric = "BLEU-4"
    assert panel.score(result) == 0.22 and "over 3 seeds 0.200" in panel.describe(result)
    panel.task = "shapes-vqa"
    with pytest.raises(ValueError, match=r"shapes-vqa is scored with \('accuracy',\)"):
        panel.config()
    panel.metric, panel.size = None, 5
    with pytest.raises(ValueError, match="prompt: length must be one of"):
        panel.config()
    panel.size, panel.n_shots = 8, 100
    with pytest.raises(ValueError, match="n_shots must be one of"):
        panel.config()


def test_empirical_panel_widget_follows_method_and_task(monkeypatch, capsys):
    pytest.importorskip("ipywidgets")
    from workbench.viz.panels import EmpiricalPanel

    _grid(monkeypatch)
    seen = []
    panel = EmpiricalPanel(runner=lambda c: seen.append(c) or _Scored(c), store="bundle")
    row1, row2, out = panel.widget().children
    method, task, metric = row1.children
    shots, size, seed, button = row2.children
    assert size.description == "r" and list(size.options) == [1, 4, 16, 64] and list(metric.options) == ["accuracy"]
    method.value, task.value = "prompt", "shapes-caption"
    assert size.description == "length" and size.value == 8
    assert list(metric.options) == ["CIDEr-D", "BLEU-4"]
    size.value, shots.value, metric.value, seed.value = 32, 250, "BLEU-4", 21
    button.click()
    assert seen[-1].method == "prompt" and seen[-1].method_config == {"length": 32}
    assert seen[-1].task == "shapes-caption" and seen[-1].n_shots == 250 and seen[-1].seed == 21
    assert panel.metric == "BLEU-4"
