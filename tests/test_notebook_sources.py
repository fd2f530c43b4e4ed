"""Every notebook is built from its percent-format source (notebooks/src/NAME.py): one way to author."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_cells_are_its_source(notebook):
    pytest.importorskip("nbformat")
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from make_notebook import build
    finally:
        sys.path.pop(0)
    src = ROOT / "notebooks" / "src" / f"{notebook.stem}.py"
    assert src.is_file(), f"{notebook.name} has no source {src.relative_to(ROOT)}; notebooks are authored there"
    cells = json.loads(notebook.read_text())["cells"]
    committed = [(c["cell_type"], "".join(c["source"])) for c in cells]
    built = [(c["cell_type"], c["source"]) for c in build(src.read_text()).cells]
    assert committed == built, (f"{notebook.name} differs from {src.name}: edit the source, then "
                                f"`python tools/make_notebook.py {src.relative_to(ROOT)} notebooks/{notebook.name}` "
                                "and `make reproduce`")


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4
