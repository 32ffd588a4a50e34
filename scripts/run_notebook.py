"""Execute a notebook top to bottom with nbclient, optionally overriding its parameters cell.

    python scripts/run_notebook.py notebooks/02_compare_variants.ipynb                 # full size
    python scripts/run_notebook.py notebooks/02_compare_variants.ipynb --set steps=50  # smaller
    python scripts/run_notebook.py notebooks/01_cells_and_gates.ipynb --out runs/nb/01.ipynb

The cell tagged ``parameters`` holds the defaults; ``--set name=value`` adds
a cell after it that reassigns them (values are Python literals). The
executed notebook (with outputs) is written to ``--out`` (default
``runs/notebooks/<name>``); the committed notebook keeps no outputs.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys
import time


def execute(path, params: dict | None = None, *, cwd=None, timeout: int = 1800, out=None):
    """Run the notebook at ``path`` with ``params`` injected; returns the executed ``nbformat`` node."""
    import nbformat
    from nbclient import NotebookClient

    path = pathlib.Path(path)
    nb = nbformat.read(path, as_version=4)
    if params:
        idx = next((i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None)
        if idx is None:
            raise ValueError(f"{path}: no cell tagged 'parameters' to override.")
        src = "# injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
        nb.cells.insert(idx + 1, nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]}))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd or path.parent)}})
    client.execute()
    if out:
        out = pathlib.Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out)
    return nb


def images(nb) -> int:
    """How many PNG images the executed notebook displayed."""
    return sum("image/png" in o.get("data", {})
               for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebook")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--out", help="where to write the executed notebook")
    a = ap.parse_args(argv)
    params = {}
    for item in a.set:
        name, _, value = item.partition("=")
        try:
            params[name.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[name.strip()] = value
    out = a.out or pathlib.Path("runs") / "notebooks" / pathlib.Path(a.notebook).name
    t = time.perf_counter()
    nb = execute(a.notebook, params, out=out)
    print(f"{a.notebook}: executed in {time.perf_counter() - t:.0f}s, {images(nb)} figures -> {out}")


if __name__ == "__main__":
    sys.exit(main())
