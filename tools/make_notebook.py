"""Build a notebook from a plain-text source: cells separated by lines '# %%' (code) or
'# %% [markdown]' (markdown), like jupytext's percent format. Used to author notebooks/*.ipynb;
`make reproduce` then executes them in place.

    python tools/make_notebook.py notebooks/src/00_data_tour.py notebooks/00_data_tour.ipynb

A source may name, above its first cell, a folder its notebook reads (``# needs: results/empirical``):
while that folder does not exist the notebook is not built (it would fail without it), unless
``--force`` is given.

``--keep-outputs`` rebuilds an executed notebook after an edit to its narrative: every code cell whose
source is unchanged keeps its outputs from the notebook being replaced (cells are matched by their
source, in order); a new or edited code cell has none, so run it (``make reproduce``) before committing.
"""

import sys
from collections import defaultdict, deque
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def needs(src: str) -> list[str]:
    """The folders named by ``# needs: PATH`` lines above the first cell."""
    out = []
    for line in src.splitlines():
        if line.startswith("# %%"):
            break
        if line.startswith("# needs:"):
            out.append(line.split(":", 1)[1].strip())
    return out


def build(src: str) -> nbformat.NotebookNode:
    cells, kind, lines = [], None, []

    def flush():
        text = "\n".join(lines).strip("\n")
        if kind == "markdown":
            text = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in text.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(text))
        elif kind == "code" and text:
            cells.append(nbformat.v4.new_code_cell(text))

    for line in src.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def keep_outputs(new: nbformat.NotebookNode, old: nbformat.NotebookNode) -> int:
    """Copy into ``new`` what ``old``'s cells with the same type and source hold (a code cell's outputs,
    execution count and metadata; any cell's id, so that the diff shows only what changed), matched in
    order; returns how many code cells of ``new`` got no outputs (new or edited ones)."""
    before = defaultdict(deque)
    for cell in old.cells:
        before[(cell.cell_type, cell.source)].append(cell)
    missing = 0
    for cell in new.cells:
        match = before[(cell.cell_type, cell.source)]
        if not match:
            missing += cell.cell_type == "code"
            continue
        done = match.popleft()
        if "id" in done:
            cell.id = done.id
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = done.get("outputs", []), done.get("execution_count")
            cell.metadata = done.get("metadata", {})
    new.metadata = {**old.metadata, **new.metadata}
    return missing


if __name__ == "__main__":
    flags = ("--force", "--keep-outputs")
    args = [a for a in sys.argv[1:] if a not in flags]
    if len(args) != 2:
        sys.exit("usage: make_notebook.py SOURCE.py NOTEBOOK.ipynb [--force] [--keep-outputs]")
    src, dst = args
    text = open(src).read()
    missing = [n for n in needs(text) if not (ROOT / n).exists()]
    if missing and "--force" not in sys.argv:
        print(f"{src}: not built: it needs {', '.join(missing)}, which does not exist yet "
              f"(train and export its study first; --force builds it anyway)")
        sys.exit(0)
    nb = build(text)
    if "--keep-outputs" in sys.argv and Path(dst).is_file():
        missing = keep_outputs(nb, nbformat.read(dst, as_version=4))
        if missing:
            print(f"{dst}: {missing} code cell(s) new or edited, without outputs: execute the notebook")
    nbformat.write(nb, dst)
