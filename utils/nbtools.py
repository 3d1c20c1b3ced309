"""Build and execute the course's notebooks with nbformat and nbclient.

``new_notebook`` starts every notebook with the shared set-up cell (``utils.notebook_setup``);
``execute`` runs one in a fresh kernel, in its own folder, with a timeout (nbclient would otherwise
wait forever), and saves it with outputs so nbval can compare them; ``refresh`` rewrites every
notebook's set-up cell and "Open in Colab" badge from their one source (after either changes)::

    python -m utils.nbtools execute notebooks/00_measuring_inference.ipynb [more.ipynb ...]
    python -m utils.nbtools refresh      # notebooks/ and solutions/; then: python -m utils.labs generate
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat

from utils.notebook_setup import SETUP_CELL, colab_badge
from utils.paths import NOTEBOOKS_DIR, REPO_ROOT, SOLUTIONS_DIR

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
    # store_widget_state: save ipywidgets' state in the notebook's metadata, so a static view
    # (GitHub, nbviewer, a reader without a kernel) still shows sliders and progress bars
    NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=allow_errors,
                   store_widget_state=True,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)
    return path


BADGE_PREFIX = "[![Open in Colab]"


def badge_target(path: Path) -> str:
    """The file a notebook's badge opens: itself, or for a lab's master the generated lab."""
    path = Path(path).resolve()
    folder = "labs" if path.parent == SOLUTIONS_DIR else path.parent.name
    return f"{folder}/{path.name}"


def refresh(path: str | Path) -> bool:
    """Make the first code cell ``SETUP_CELL`` and put the Colab badge under the title of the
    first markdown cell. Returns whether the file changed; outputs are kept."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    first_code.source = SETUP_CELL
    title = next((c for c in nb.cells if c.cell_type == "markdown"), None)
    if title is not None:
        lines = [line for line in title.source.split("\n") if not line.startswith(BADGE_PREFIX)]
        lines.insert(1, colab_badge(badge_target(path)))
        title.source = "\n".join(lines)
    if nbformat.writes(nb) == before:
        return False
    nbformat.write(nb, path)
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m utils.nbtools")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("execute", help="execute notebooks in place, saving outputs")
    run.add_argument("paths", nargs="+", type=Path)
    run.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    ref = sub.add_parser("refresh", help="rewrite set-up cells and Colab badges in place")
    ref.add_argument("paths", nargs="*", type=Path, help="default: notebooks/ and solutions/")
    args = parser.parse_args(argv)
    if args.command == "execute":
        for p in args.paths:
            print(f"executed {execute(p, timeout=args.timeout)}")
        return
    paths = args.paths or sorted([*NOTEBOOKS_DIR.glob("*.ipynb"), *SOLUTIONS_DIR.glob("*.ipynb")])
    for p in paths:
        if refresh(p):
            print(f"refreshed {Path(p).resolve().relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
