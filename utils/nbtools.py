"""Build and execute the course's notebooks with nbformat and nbclient.

``new_notebook`` starts every notebook with the shared set-up cell (``utils.notebook_setup``);
``execute`` runs one in a fresh kernel, in its own folder, with a timeout (nbclient would otherwise
wait forever), and saves it with outputs so nbval can compare them::

    python -m utils.nbtools execute notebooks/00_measuring_inference.ipynb [more.ipynb ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat

from utils.notebook_setup import SETUP_CELL

IGNORE_OUTPUT = "nbval-ignore-output"  # tag for cells whose output is machine-specific (timings)
RAISES = "raises-exception"  # tag for cells expected to raise (nbval accepts them)


def markdown(source: str):
    return nbformat.v4.new_markdown_cell(source.strip("\n"))


def code(source: str, *tags: str):
    """A code cell; pass ``IGNORE_OUTPUT`` for timing cells so nbval skips their numbers."""
    cell = nbformat.v4.new_code_cell(source.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def new_notebook(cells) -> nbformat.NotebookNode:
    """A notebook whose first code cell is the shared set-up cell, then ``cells``."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    first_markdown = [c for c in cells[:1] if c.cell_type == "markdown"]
    nb.cells = [*first_markdown, code(SETUP_CELL), *cells[len(first_markdown):]]
    return nb


def execute(path: str | Path, timeout: int = 900, allow_errors: bool = False) -> Path:
    """Run a notebook top to bottom in a fresh kernel (cwd = its folder) and save its outputs."""
    from nbclient import NotebookClient

    path = Path(path).resolve()
    if path.suffix != ".ipynb" or not path.is_file():
        raise FileNotFoundError(f"path must be an existing .ipynb file, got {path}")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=allow_errors,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m utils.nbtools")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("execute", help="execute notebooks in place, saving outputs")
    run.add_argument("paths", nargs="+", type=Path)
    run.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args(argv)
    for p in args.paths:
        print(f"executed {execute(p, timeout=args.timeout)}")


if __name__ == "__main__":
    main()
