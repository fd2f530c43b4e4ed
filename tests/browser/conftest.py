"""The browser tests' fixtures: one JupyterLab (started as `make lab` does) and one Chromium for the session.

Without Chromium or playwright the tests skip, saying how to install them; with
``WORKBENCH_REQUIRE_BROWSER=1`` (set by ``.ci/run``) they fail instead, so CI cannot pass without them.
"""

import os

import pytest

from .lab import HOW_TO_INSTALL, ROOT, chromium_path, start_lab


def _missing(what: str):
    message = f"browser tests need {what}: {HOW_TO_INSTALL}"
    if os.environ.get("WORKBENCH_REQUIRE_BROWSER") == "1":
        pytest.fail(message + " (WORKBENCH_REQUIRE_BROWSER=1: required here)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def chromium():
    path = chromium_path()
    if path is None:
        _missing("Chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def lab(tmp_path_factory, chromium):
    notebooks = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    server = start_lab(tmp_path_factory.mktemp("lab"), notebooks + [ROOT / "tests" / "browser" / "broken_panel.ipynb"])
    yield server
    server.stop()


@pytest.fixture
def page(chromium, lab):
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    p = context.new_page()
    yield p
    context.close()
