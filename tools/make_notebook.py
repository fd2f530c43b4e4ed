"""Build a notebook from a plain-text source: cells separated by lines '# %%' (code) or
'# %% [markdown]' (markdown), like jupytext's percent format. Used to author notebooks/*.ipynb;
`make reproduce` then executes them in place.

    python tools/make_notebook.py notebooks/src/00_data_tour.py notebooks/00_data_tour.ipynb
"""

import sys

import nbformat


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
    src, dst = sys.argv[1], sys.argv[2]
    nbformat.write(build(open(src).read()), dst)
