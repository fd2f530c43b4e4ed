"""Every notebook opened and run in JupyterLab in Chromium; every widget panel turned and answering.

JupyterLab is started as `make lab` starts it (localhost, token authentication; tests/browser/lab.py),
with output-free copies of the notebooks, so what is checked is what the browser ran now. A
screenshot of each notebook goes to figures/browser/ (gitignored).
"""

import time

import pytest

from .lab import (
    ROOT,
    error_outputs,
    finished_summary,
    image_outputs,
    open_notebook,
    press_run,
    run_all,
    save,
    screenshot,
    set_dropdown,
    widget_panel,
)

NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9]*.ipynb"))


def test_the_server_refuses_requests_without_the_token(lab):
    assert lab.get("/api/contents", token=False) == 403
    assert lab.get("/api/contents", token=True) == 200
    assert "localhost" in lab.url


# First in the module, before the notebook pages whose kernels stay busy for the panel checks.
def test_a_panel_whose_callback_raises_fails(chromium, lab):
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    try:
        open_notebook(page, lab, "broken_panel.ipynb")
        run_all(page, timeout_s=300)
        panel = widget_panel(page, "panel.widget()")
        with pytest.raises(AssertionError, match="deliberately broken runner"):
            press_run(panel, "this never appears", timeout_s=180)
    finally:
        context.close()


def _committed_images(name: str) -> int:
    import json

    nb = json.loads((ROOT / "notebooks" / name).read_text())
    return image_outputs(nb)


@pytest.fixture(scope="module")
def ran(chromium, lab):
    """Each notebook run once in the browser (its page kept open for the widget tests)."""
    pages, saved, times = {}, {}, {}
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    yield pages, saved, times, context
    context.close()


def _run(ran, lab, name):
    pages, saved, times, context = ran
    if name not in pages:
        page = context.new_page()
        t0 = time.perf_counter()
        open_notebook(page, lab, name)
        run_all(page)
        saved[name] = save(page, lab, name)
        times[name] = time.perf_counter() - t0
        screenshot(page, name)
        pages[name] = page
    return pages[name], saved[name]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_the_browser(ran, lab, name):
    page, nb = _run(ran, lab, name)
    assert not error_outputs(nb), f"{name} shows errors in the browser: {error_outputs(nb)}"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["execution_count"] for c in code), f"{name}: not every code cell ran"
    expected = _committed_images(name)
    assert image_outputs(nb) >= expected, f"{name}: {image_outputs(nb)} figures rendered, {expected} committed"
    if expected:
        assert page.locator(".jp-RenderedImage img").count() >= expected  # drawn on the page, not only saved


def test_gallery_panel_answers_from_the_bundle_and_trains_new_configs(ran, lab):
    from workbench.studies import load_study
    from workbench.train import RunConfig, RunStore, run

    page, _ = _run(ran, lab, "02_method_gallery.ipynb")
    panel = widget_panel(page, "panel.widget()")
    # a configuration of the bundle: the panel must show the bundle's run
    set_dropdown(panel, "method", "houlsby")
    set_dropdown(panel, "N", 16)
    expected = run(RunConfig(task="shapes-vqa", n_shots=16, seed=13, quiet=True, method="houlsby"),
                   store=load_study("gallery")).summary()
    press_run(panel, expected.strip())
    # a knob the bundle does not hold: the kernel trains it (or finds it in the run store); the
    # panel must show what the run store holds once the kernel has published the run there
    set_dropdown(panel, "method", "lora")
    set_dropdown(panel, "r", 4)
    cfg = RunConfig(task="shapes-vqa", n_shots=16, seed=13, quiet=True, method="lora", method_config={"r": 4})
    press_run(panel, finished_summary(cfg, RunStore()), timeout_s=900)


# Each study panel: (notebook, study module, panel class, steps). A step sets some controls away from
# their defaults (the others back to them) through the page; the panel must then show the run its
# configuration names: the bundle's when the bundle holds it, else the one the kernel trains.
PANEL_STEPS = {
    "04_mixphm_redundancy.ipynb": ("mixphm", "MixPHMPanel", [
        {"num_experts": 2}, {"rank": 4}, {"w_red": 0.0, "w_mi": 0.0, "seed": 21}]),
    "05_vlpet_granularity.ipynb": ("vlpet", "VLPETPanel", [
        {"granularity": "small"}, {"design": "encoder only"}, {"granularity": "middleX", "n_shots": 16, "seed": 21}]),
    "06_petal.ipynb": ("petal", "PETALPanel", [
        {"w_ib": 0.0}, {"n_experts": 2}, {"rank": 4, "seed": 21}]),
}


@pytest.mark.parametrize("name", sorted(PANEL_STEPS))
def test_study_panel_turns_every_control(ran, lab, name):
    """A study panel's controls set to non-default values through the page; each setting's result is
    read from the bundle (or, for one the bundle lacks, from the run store once the kernel has trained
    it) by building the same panel in the test process, so the page is checked against the kernel's
    own configuration logic. (The gallery panel's test always covers a setting the kernel trains.)"""
    import importlib

    from workbench.studies import load_study
    from workbench.train import run
    from workbench.viz import panels

    if not (ROOT / "notebooks" / name).is_file():
        pytest.skip(f"{name} is not built yet")
    study_name, cls, steps = PANEL_STEPS[name]
    study = importlib.import_module(f"workbench.studies.{study_name}")
    page, _ = _run(ran, lab, name)
    panel = widget_panel(page, "panel.widget()")
    store = load_study(study_name)
    defaults = getattr(panels, cls)(study.base_config())
    controls = {**{k: v[0] for k, v in defaults.KNOBS.items()}, "n_shots": defaults.n_shots, "seed": defaults.seed}
    labels = {"n_shots": "N"}
    for changes in steps:
        mirror = getattr(panels, cls)(study.base_config())
        for control, value in {**controls, **changes}.items():
            set_dropdown(panel, labels.get(control, control), value)
            setattr(mirror, control, value)
        cfg = mirror.config()
        if store.is_finished(cfg.hash):
            press_run(panel, run(cfg, store=store).summary().strip())
        else:  # trained now by the kernel (about a minute), then read back from the run store
            press_run(panel, finished_summary(cfg, store.overlay), timeout_s=900)


def test_empirical_panel_shows_the_cell(ran, lab):
    """The empirical study's panel: method, task, metric, N, size and seed chosen through the page;
    the panel shows the cell's run and its score in the chosen metric (BLEU-4 for a caption cell)."""
    from workbench.studies import empirical as study
    from workbench.studies import load_study
    from workbench.train import RunStore, run
    from workbench.viz.panels import EmpiricalPanel

    name = "07_empirical_study.ipynb"
    if not (ROOT / "notebooks" / name).is_file():
        pytest.skip(f"{name} is not built yet")
    page, _ = _run(ran, lab, name)
    panel = widget_panel(page, "panel.widget()")
    store = load_study("empirical")
    for choice in ({"method": "prompt", "task": "shapes-caption", "metric": "BLEU-4", "n_shots": 16, "size": 8,
                    "seed": 21},
                   {"method": "lora", "task": "shapes-vqa", "metric": "accuracy", "n_shots": 16, "size": 16,
                    "seed": 13}):
        mirror = EmpiricalPanel(store=store, method=choice["method"], task=choice["task"],
                                n_shots=choice["n_shots"], size=choice["size"], seed=choice["seed"],
                                metric=None if choice["metric"] == study.METRICS[choice["task"]][0] else choice["metric"])
        option = study.SIZES[choice["method"]][0]
        for control, label in (("method", "method"), ("task", "task"), ("metric", "metric"), ("n_shots", "N"),
                               ("size", option), ("seed", "seed")):
            set_dropdown(panel, label, choice[control])
        cfg = mirror.config()
        if store.is_finished(cfg.hash):
            press_run(panel, mirror.describe(run(cfg, store=store)))
        else:
            target = store.overlay if hasattr(store, "overlay") else RunStore()

            def described(cfg=cfg, target=target, mirror=mirror):
                summary = finished_summary(cfg, target)()
                return None if summary is None else mirror.describe(run(cfg, store=target))

            press_run(panel, described, timeout_s=900)


def test_report_times(ran):
    """Not a check: prints how long each notebook took in the browser (the closing notes quote it)."""
    _, _, times, _ = ran
    for name, seconds in sorted(times.items()):
        print(f"{name}: {seconds:.0f} s in the browser")
