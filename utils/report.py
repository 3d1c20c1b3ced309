"""``python -m utils.report [CHAPTER ...] [--quick] [--json]``: each chapter's headline measurements.

Runs on this machine, with the same functions the chapter's notebook uses, and prints one table
per chapter beside the machine report (or JSON with ``--json``). CHAPTER is a number (``00``,
``2``), a module name (``roofline``) or a notebook name (``measuring_inference``); none means
every chapter found.

A chapter is found, not registered: any module ``utils/<name>.py`` that assigns a string
``CHAPTER = "NN"`` at module level and defines ``report_rows(quick=False) -> list[dict]`` (the
same keys in every row). Finding them reads the source only; a chapter's module is imported when
its report runs.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from utils.paths import NOTEBOOKS_DIR, REPO_ROOT

UTILS_DIR = REPO_ROOT / "utils"


@dataclass(frozen=True)
class Chapter:
    number: str  # "00"
    module: str  # "roofline": utils.roofline holds the chapter's reference code
    notebook: str  # "measuring_inference": notebooks/00_measuring_inference.ipynb, lab00_...

    @property
    def names(self) -> tuple[str, ...]:
        return (self.module, self.notebook)


def _chapter_number(path: Path) -> str | None:
    """The string assigned to a module-level ``CHAPTER`` in ``path``, read without importing."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "CHAPTER" for t in node.targets) \
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return node.value.value
    return None


def discover(utils_dir: Path = UTILS_DIR, notebooks_dir: Path = NOTEBOOKS_DIR) -> dict[str, Chapter]:
    """Every chapter module in ``utils_dir``, keyed by number, in order."""
    found: dict[str, Chapter] = {}
    for path in sorted(utils_dir.glob("*.py")):
        number = _chapter_number(path)
        if number is None:
            continue
        if not (len(number) == 2 and number.isdigit()):
            raise ValueError(f"{path.name}: CHAPTER must be two digits like '03', got {number!r}")
        if number in found:
            raise ValueError(f"chapter {number} is claimed by both utils/{found[number].module}.py "
                             f"and utils/{path.name}")
        notebooks = sorted(notebooks_dir.glob(f"{number}_*.ipynb"))
        notebook = notebooks[0].stem[3:] if notebooks else path.stem
        found[number] = Chapter(number, path.stem, notebook)
    return dict(sorted(found.items()))


def resolve(chapter: str, chapters: dict[str, Chapter] | None = None) -> str:
    """Map ``'0'``, ``'00'``, ``'roofline'`` or ``'measuring_inference'`` to ``'00'``."""
    chapters = discover() if chapters is None else chapters
    key = str(chapter).strip().lower()
    if key.isdigit() and f"{int(key):02d}" in chapters:
        return f"{int(key):02d}"
    for number, ch in chapters.items():
        if key in ch.names:
            return number
    known = ", ".join(f"{n} ({ch.module}, {ch.notebook})" for n, ch in chapters.items())
    raise ValueError(f"unknown chapter {chapter!r}: expected one of {known}")


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict]) -> str:
    """Rows of equal keys as an aligned plain-text table (floats to 4 significant digits,
    missing values as ``-``)."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols),
             "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(_cell(r.get(c)).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def _plain(value):
    """JSON-safe: NaN, inf and empty strings become null; tensors and numpy scalars numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value == "" or value is None or isinstance(value, (bool, int, float, str)):
        return None if value == "" else value
    return str(value)


def check_rows(module: str, rows) -> list[dict]:
    """A chapter's rows must be a list of dicts with the same keys in every row."""
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise TypeError(f"utils.{module}.report_rows must return a list of dicts, got "
                        f"{type(rows).__name__}")
    for i, row in enumerate(rows[1:], 1):
        if list(row) != list(rows[0]):
            raise ValueError(f"utils.{module}.report_rows: row {i} has keys {list(row)}, "
                             f"row 0 has {list(rows[0])}")
    return rows


def run(chapters: list[str], quick: bool = False, progress: bool = False) -> dict:
    from utils.bench import machine_info

    found = discover()
    numbers = [resolve(c, found) for c in chapters] or list(found)
    result = {"machine": machine_info(), "quick": quick, "chapters": {}}
    for i, number in enumerate(numbers, 1):
        ch = found[number]
        if progress:
            print(f"[{i}/{len(numbers)}] chapter {number} ({ch.module}) ...", file=sys.stderr,
                  flush=True)
        start = time.perf_counter()
        rows = importlib.import_module(f"utils.{ch.module}").report_rows(quick=quick)
        result["chapters"][number] = {"module": ch.module, "notebook": ch.notebook,
                                      "rows": check_rows(ch.module, rows),
                                      "seconds": round(time.perf_counter() - start, 1)}
    return result


def main(argv: list[str] | None = None) -> int:
    from utils.bench import format_machine_info, set_threads

    parser = argparse.ArgumentParser(prog="python -m utils.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chapters", nargs="*", help="numbers or names; none means all")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and shorter timings (a smoke test, not the figures)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    set_threads()  # $COURSE_THREADS if set; recorded in the machine report
    try:
        result = run(args.chapters, quick=args.quick, progress=True)
    except ValueError as err:
        parser.error(str(err))
    if args.json:
        print(json.dumps(_plain(result), indent=2, allow_nan=False))
        return 0
    print(format_machine_info(result["machine"]))
    for number, chapter in result["chapters"].items():
        print(f"\n== chapter {number}: {chapter['notebook']} (utils.{chapter['module']}, "
              f"{chapter['seconds']} s) ==")
        print(format_table(chapter["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
