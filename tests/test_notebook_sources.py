"""Every notebook is built from its percent-format source (notebooks/src/NAME.py): one way to author."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


def _make_notebook():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import make_notebook
    finally:
        sys.path.pop(0)
    return make_notebook


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_cells_are_its_source(notebook):
    pytest.importorskip("nbformat")
    build = _make_notebook().build
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



def test_a_source_whose_bundle_is_missing_is_not_built(tmp_path):
    """``# needs: PATH`` above the first cell: `make notebooks` skips the source while PATH is missing
    (its notebook would fail under nbval), builds it with --force, and the line never reaches a cell."""
    import subprocess

    pytest.importorskip("nbformat")
    src = tmp_path / "99_x.py"
    src.write_text("# needs: results/no-such-bundle\n# %% [markdown]\n# # Title\n\n# %%\nx = 1\n")
    assert _make_notebook().needs(src.read_text()) == ["results/no-such-bundle"]
    dst = tmp_path / "99_x.ipynb"
    tool = [sys.executable, str(ROOT / "tools" / "make_notebook.py"), str(src), str(dst)]
    out = subprocess.run(tool, capture_output=True, text=True, check=True).stdout
    assert "not built" in out and "results/no-such-bundle" in out and not dst.exists()
    subprocess.run(tool + ["--force"], check=True)
    cells = json.loads(dst.read_text())["cells"]
    assert [c["cell_type"] for c in cells] == ["markdown", "code"]
    assert "needs" not in "".join("".join(c["source"]) for c in cells)


def test_keep_outputs_keeps_unchanged_code_cells_outputs(tmp_path):
    """``--keep-outputs``: a narrative edit keeps every unchanged code cell's outputs; an edited code
    cell gets none (and the tool says so)."""
    import subprocess

    nbformat = pytest.importorskip("nbformat")
    src = tmp_path / "99_x.py"
    src.write_text("# %% [markdown]\n# # Title\n\n# %%\nx = 1\n\n# %%\ny = 2\n")
    dst = tmp_path / "99_x.ipynb"
    tool = [sys.executable, str(ROOT / "tools" / "make_notebook.py"), str(src), str(dst), "--keep-outputs"]
    subprocess.run(tool, check=True)
    nb = nbformat.read(dst, as_version=4)
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.outputs = [nbformat.v4.new_output("stream", text=f"out {i}\n")]
        cell.execution_count = i + 1
    nbformat.write(nb, dst)
    src.write_text("# %% [markdown]\n# # A new title\n\n# %%\nx = 1\n\n# %% [markdown]\n# more\n\n# %%\ny = 3\n")
    out = subprocess.run(tool, capture_output=True, text=True, check=True).stdout
    assert "1 code cell(s) new or edited" in out
    cells = nbformat.read(dst, as_version=4).cells
    assert [c.cell_type for c in cells] == ["markdown", "code", "markdown", "code"]
    assert cells[0].source == "# A new title"
    assert cells[1].outputs[0]["text"] == "out 0\n" and cells[1].execution_count == 1
    assert cells[3].source == "y = 3" and cells[3].outputs == []
