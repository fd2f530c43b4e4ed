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
