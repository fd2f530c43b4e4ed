"""Build a notebook from a plain-text source: cells separated by lines '# %%' (code) or
'# %% [markdown]' (markdown), like jupytext's percent format. Used to author notebooks/*.ipynb;
`make reproduce` then executes them in place.

    python tools/make_notebook.py notebooks/src/00_data_tour.py notebooks/00_data_tour.ipynb

A source may name, above its first cell, a folder its notebook reads (``# needs: results/empirical``):
while that folder does not exist the notebook is not built (it would fail without it), unless
``--force`` is given.
"""

import sys
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


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--force"]
    if len(args) != 2:
        sys.exit("usage: make_notebook.py SOURCE.py NOTEBOOK.ipynb [--force]")
    src, dst = args
    text = open(src).read()
    missing = [n for n in needs(text) if not (ROOT / n).exists()]
    if missing and "--force" not in sys.argv:
        print(f"{src}: not built: it needs {', '.join(missing)}, which does not exist yet "
              f"(train and export its study first; --force builds it anyway)")
        sys.exit(0)
    nbformat.write(build(text), dst)
