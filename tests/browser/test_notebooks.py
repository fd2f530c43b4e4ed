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


def test_mixphm_panel_turns_every_control(ran, lab):
    """The MixPHM panel's controls set to non-default values through the page (experts, rank, both
    regulariser weights, seed), each setting one the bundle holds, which the panel must show. (The
    gallery panel's test covers a setting the kernel has to train.)"""
    from workbench.studies import load_study
    from workbench.studies.mixphm import base_config
    from workbench.train import RunStore, run

    page, _ = _run(ran, lab, "04_mixphm_redundancy.ipynb")
    panel = widget_panel(page, "panel.widget()")
    store = load_study("mixphm")
    defaults = {"num_experts": 4, "rank": 8, "reduction_factor": 12, "w_red": 0.2, "w_mi": 0.2, "N": 64, "seed": 13}
    steps = [  # (controls changed from the defaults, the config they name, in the bundle?)
        ({"num_experts": 2}, {"num_experts": 2}, 64, 13),
        ({"rank": 4}, {"rank": 4}, 64, 13),
        ({"w_red": 0.0, "w_mi": 0.0, "seed": 21}, {"w_red": 0.0, "w_mi": 0.0}, 64, 21),
    ]
    for changes, mc, n, seed in steps:
        for control, value in {**defaults, **changes}.items():
            set_dropdown(panel, control, value)
        cfg = base_config().replace(method="mixphm", n_shots=n, seed=seed, method_config=mc)
        if store.is_finished(cfg.hash):
            press_run(panel, run(cfg, store=store).summary().strip())
        else:  # trained now by the kernel (about a minute), then read back from the run store
            press_run(panel, finished_summary(cfg, store.overlay if hasattr(store, "overlay") else RunStore()),
                      timeout_s=900)


def test_a_panel_whose_callback_raises_fails(chromium, lab):
    context = chromium.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    try:
        open_notebook(page, lab, "broken_panel.ipynb")
        run_all(page, timeout_s=600)
        panel = widget_panel(page, "panel.widget()")
        with pytest.raises(AssertionError, match="deliberately broken runner"):
            press_run(panel, "this never appears", timeout_s=180)
    finally:
        context.close()


def test_report_times(ran):
    """Not a check: prints how long each notebook took in the browser (the closing notes quote it)."""
    _, _, times, _ = ran
    for name, seconds in sorted(times.items()):
        print(f"{name}: {seconds:.0f} s in the browser")
