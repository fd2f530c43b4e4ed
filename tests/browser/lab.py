"""Drive JupyterLab in a real browser: start it as ``make lab`` does, open a notebook, run it, read it back.

Used by the browser tests (``tests/browser/``). Chromium comes from the system (Debian:
``apt-get install chromium``; or set ``WORKBENCH_CHROMIUM`` to a Chromium/Chrome binary), driven by
the ``playwright`` package (its own browser download is not needed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
HOW_TO_INSTALL = ("install Chromium with the system's package manager (Debian/Ubuntu: `apt-get install chromium`) "
                  "and the test extra (`pip install -e .[test]`, which has playwright), or set WORKBENCH_CHROMIUM "
                  "to a Chromium binary")


def chromium_path() -> str | None:
    """The system Chromium: ``$WORKBENCH_CHROMIUM`` or the first of :data:`CHROMIUM_NAMES` on the PATH."""
    env = os.environ.get("WORKBENCH_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def make_lab_command() -> list[str]:
    """The command ``make lab`` runs (``make -n``), as an argument list."""
    out = subprocess.run(["make", "-s", "-n", "lab"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = [l for l in out.splitlines() if "jupyter" in l and " lab" in l]
    if not lines:
        raise RuntimeError(f"`make -n lab` printed no jupyter lab command:\n{out}")
    return lines[-1].split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def strip_outputs(src: Path, dst: Path) -> None:
    """Copy a notebook without its outputs, so that what the browser shows is what it ran."""
    nb = json.loads(src.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    dst.write_text(json.dumps(nb, indent=1))


@dataclass
class Lab:
    """A running JupyterLab: ``url`` (no token), ``token``, ``root`` (its notebook directory's parent)."""

    process: subprocess.Popen
    url: str
    token: str
    root: Path
    log: Path

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    def get(self, path: str, token: bool = True) -> int:
        """HTTP status of a GET on the server (with or without the token)."""
        url = f"{self.url}{path}" + (f"?token={self.token}" if token else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_lab(root: Path, notebooks, timeout: float = 120.0) -> Lab:
    """Start JupyterLab as ``make lab`` does (localhost, token authentication) on a free port, serving
    output-free copies of ``notebooks`` from ``root/notebooks``, with throw-away settings and workspaces;
    return once it answers with the token it printed."""
    (root / "notebooks").mkdir(parents=True, exist_ok=True)
    (root / "figures").mkdir(exist_ok=True)  # the notebooks save their figures to ../figures
    # Throw-away user settings: every cell in the page (JupyterLab 4 renders only the visible cells
    # by default, which would hide the cells a test looks for) and no news pop-up over the page.
    settings = root / "settings"
    for plugin, values in (("@jupyterlab/notebook-extension/tracker", {"windowingMode": "none"}),
                           ("@jupyterlab/apputils-extension/notification", {"fetchNews": "false",
                                                                           "checkForUpdates": False})):
        path = settings / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    for nb in notebooks:
        strip_outputs(Path(nb), root / "notebooks" / Path(nb).name)
    args = make_lab_command()
    args = [f"--notebook-dir={root / 'notebooks'}" if a.startswith("--notebook-dir=") else a for a in args]
    if not Path(args[0]).is_absolute():
        args[0] = str(ROOT / args[0])
    port = free_port()
    args += [f"--port={port}", "--no-browser", "--ServerApp.port_retries=0"]
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(root / "ws"),
               JUPYTER_RUNTIME_DIR=str(root / "runtime"), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    log = root / "lab.log"
    handle = log.open("w")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True)
    t0, token = time.time(), None
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        m = re.search(rf"http://(?:localhost|127\.0\.0\.1):{port}/lab\?token=([0-9a-f]+)", log.read_text())
        if m:
            token = m.group(1)
            lab = Lab(proc, f"http://localhost:{port}", token, root, log)
            try:
                if lab.get("/api/status") == 200:
                    return lab
            except urllib.error.URLError:
                pass  # printed its URL but not accepting yet (seen once on a busy machine): ask again
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"JupyterLab did not start within {timeout:.0f} s (token seen: {token is not None}):\n"
                       f"{log.read_text()[-3000:]}")


def accept_kernel_dialog(page) -> bool:
    """Accept JupyterLab's *Select Kernel* dialog if it is open; whether it was."""
    dialog = page.locator(".jp-Dialog")
    if dialog.count() and dialog.filter(has_text="Select Kernel").count():
        dialog.get_by_role("button", name="Select").click()
        return True
    return False


def open_notebook(page, lab: Lab, name: str, timeout_s: float = 180.0) -> None:
    """Open a notebook, accept the kernel JupyterLab proposes if it asks, and wait until the kernel
    is idle (the status bar names it and says Idle).

    Each page gets a workspace of its own: in the shared default one JupyterLab restores the tabs an
    earlier page left open, so a page held several notebooks (their kernels, dialogs and widget panels
    all in its DOM) and the checks could act on the wrong one."""
    workspace = f"test-{uuid.uuid4().hex[:12]}"
    page.goto(f"{lab.url}/lab/workspaces/{workspace}/tree/{name}?token={lab.token}")
    page.wait_for_selector(".jp-Notebook", timeout=timeout_s * 1000)
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        accept_kernel_dialog(page)
        status = page.locator(".jp-StatusBar-Widget", has_text="Idle")
        if status.count() and "ipykernel" in " ".join(status.all_inner_texts()):
            return
        time.sleep(0.5)
    raise AssertionError(f"{name}: the kernel did not start within {timeout_s:.0f} s")


def run_all(page, timeout_s: float = 1500.0) -> None:
    """Run every cell (menu Run > Run All Cells) and wait until every code cell has run.

    JupyterLab marks a cell ``[*]`` as soon as it is queued; a menu click that did not register
    leaves every prompt blank, so the command is given again (at most three times in all)."""
    dialog = page.locator(".jp-Dialog")
    if accept_kernel_dialog(page):  # asked after the status said Idle
        dialog.wait_for(state="detached", timeout=30_000)
    if dialog.count():  # it would swallow the clicks below; say what it asks instead of timing out
        raise AssertionError(f"a dialog is open over the notebook: {dialog.first.inner_text()[:500]!r}")
    for attempt in range(3):
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_text("Run All Cells", exact=True).click()
        try:
            page.wait_for_function(
                """() => [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]
                    .some(e => /^\\[(\\*|\\d+)\\]:$/.test(e.textContent.trim()))""",
                timeout=60_000, polling=500)
            break
        except Exception:  # playwright's TimeoutError
            page.keyboard.press("Escape")  # close a menu left open
    else:
        raise AssertionError("Run All Cells never queued a cell (three tries, a minute each)")
    page.wait_for_function(
        """() => {
            const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]
                .map(e => e.textContent.trim());
            return prompts.length > 0 && prompts.every(t => /^\\[\\d+\\]:$/.test(t));
        }""", timeout=timeout_s * 1000, polling=1000)
    # attached, not visible: a narrow status bar hides the indicator, which is still there
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", state="attached",
                           timeout=timeout_s * 1000)


def save(page, lab: Lab, name: str) -> dict:
    """Save the notebook from the browser and read it back from the server's disk."""
    path = lab.notebooks / name
    before = path.stat().st_mtime
    page.keyboard.press("Control+s")
    t0 = time.time()
    while time.time() - t0 < 30 and path.stat().st_mtime == before:
        time.sleep(0.2)
    return json.loads(path.read_text())


def error_outputs(nb: dict) -> list[str]:
    """``cell i: Ename: value`` for every error output of a saved notebook."""
    out = []
    for i, cell in enumerate(nb["cells"]):
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                out.append(f"cell {i}: {o.get('ename')}: {o.get('evalue')}")
    return out


def image_outputs(nb: dict) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))


def screenshot(page, name: str) -> Path:
    """A full-page screenshot under figures/browser/ (gitignored), for people to look at."""
    folder = ROOT / "figures" / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{Path(name).stem}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def widget_panel(page, cell_text: str):
    """The widget view of the code cell whose source contains ``cell_text``."""
    cell = page.locator(".jp-CodeCell").filter(has_text=cell_text).last
    cell.scroll_into_view_if_needed()
    return cell.locator(".jp-OutputArea-output").first  # the widget's view (its own output area nests inside)


def wait_kernel_idle(page, settle_s: float = 1.0, timeout_s: float = 60.0) -> None:
    """Wait until the kernel has stayed idle for ``settle_s``: every widget update the page sent has
    reached the kernel. (ipywidgets holds back a model's next update until the kernel has answered
    its previous one, while a button click goes out at once, so a click right after a few dropdown
    changes can overtake one of them and run with a stale value.)"""
    indicator = page.locator(".jp-Notebook-ExecutionIndicator")
    t0 = time.time()
    idle_since = None
    while time.time() - t0 < timeout_s:
        if indicator.first.get_attribute("data-status") == "idle":
            idle_since = idle_since or time.time()
            if time.time() - idle_since >= settle_s:
                return
        else:
            idle_since = None
        time.sleep(0.1)
    raise AssertionError(f"the kernel did not settle to idle within {timeout_s:.0f} s")


def set_dropdown(panel, description: str, value) -> None:
    """Choose ``value`` in the panel's dropdown whose label is ``description``, and wait until the
    kernel has received the change."""
    box = panel.locator(".widget-dropdown").filter(has=panel.page.locator(f"label:text-is('{description}')"))
    select = box.locator("select")
    select.select_option(label=str(value))
    # ipywidgets renders an option's spaces as no-break spaces (in some Chromium builds), so compare
    # the text with its whitespace normalised.
    shown = select.evaluate("e => e.options[e.selectedIndex].text")
    if " ".join(shown.split()) != " ".join(str(value).split()):
        raise AssertionError(f"the {description!r} dropdown shows {shown!r} after choosing {value!r}")
    wait_kernel_idle(panel.page)


def output_text(panel) -> str:
    """The text of a widget panel's own output area (what its callback printed), without its controls."""
    return "\n".join(panel.locator(".jp-OutputArea-output").all_inner_texts())


def press_run(panel, expect, timeout_s: float = 300.0) -> str:
    """Click the panel's run button and wait until its output area shows ``expect``; return that text.

    ``expect`` is the text itself, or a function returning it once it is known and None until then
    (e.g. the summary of a run the kernel is training, read from the run store once the run is
    published there), so that the test never reads a result before the kernel has written it.

    Raises AssertionError naming what the panel showed when its callback raised (a traceback in the
    output area) or when the expected text does not appear within ``timeout_s``.
    """
    before = output_text(panel)
    panel.locator("button", has_text="run").click()
    t0, text, wanted = time.time(), before, None
    while time.time() - t0 < timeout_s:
        text = output_text(panel)
        if "Traceback" in text or re.search(r"\b\w+Error: ", text):
            raise AssertionError(f"the panel's callback raised:\n{text[-2000:]}")
        wanted = expect() if callable(expect) else expect
        if wanted is not None and wanted in text and (text != before or wanted not in before):
            return text
        time.sleep(0.5)
    what = repr(wanted) if wanted is not None else "the run's result (it never reached the run store)"
    raise AssertionError(f"the panel did not show {what} within {timeout_s:.0f} s; its output:\n{text[-2000:]}")


def finished_summary(cfg, store):
    """A function for :func:`press_run`: the summary of ``cfg``'s run once ``store`` holds it, else None
    (never trains: the kernel does)."""
    from workbench.train import run

    def summary():
        if not store.is_finished(cfg.hash):
            return None
        result = run(cfg, store=store)
        assert result.reused, "the run was trained by the test, not by the kernel"
        return result.summary().strip()

    return summary
