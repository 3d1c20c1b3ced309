"""``python -m utils.report [CHAPTER ...] [--json]``: each chapter's headline measurements.

Runs on this machine, with the same functions the chapter's notebook uses, and prints one table
per chapter beside the machine report (or JSON with ``--json``). CHAPTER is a number (``00``,
``2``) or a name (``measuring``, ``quantization``); none means every chapter written so far.

A chapter joins the report by adding a line to ``CHAPTERS``: its module must define
``report_rows() -> list[dict]``, each dict one row of the table (same keys in every row).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from utils.bench import format_machine_info, machine_info

# number -> (name, module with report_rows())
CHAPTERS: dict[str, tuple[str, str]] = {
    "00": ("measuring", "utils.roofline"),
    "01": ("fusion", "utils.fusion"),
    "02": ("quantization", "utils.quantization"),
}


def resolve(chapter: str) -> str:
    """Map ``'0'``, ``'00'`` or ``'measuring'`` to ``'00'``; raise a clear error otherwise."""
    key = chapter.strip().lower()
    if key.isdigit() and f"{int(key):02d}" in CHAPTERS:
        return f"{int(key):02d}"
    for number, (name, _) in CHAPTERS.items():
        if key == name:
            return number
    known = ", ".join(f"{n} ({name})" for n, (name, _) in CHAPTERS.items())
    raise ValueError(f"unknown chapter {chapter!r}: expected one of {known}")


def format_table(rows: list[dict]) -> str:
    """Rows of equal keys as an aligned plain-text table (floats to 4 significant digits)."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = {c: max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols),
             "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(cell(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def run(chapters: list[str]) -> dict:
    numbers = [resolve(c) for c in chapters] or list(CHAPTERS)
    result = {"machine": machine_info(), "chapters": {}}
    for number in numbers:
        name, module = CHAPTERS[number]
        start = time.perf_counter()
        rows = importlib.import_module(module).report_rows()
        result["chapters"][number] = {"name": name, "rows": rows,
                                      "seconds": round(time.perf_counter() - start, 1)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chapters", nargs="*", help="numbers or names; none means all")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    try:
        result = run(args.chapters)
    except ValueError as err:
        parser.error(str(err))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    print(format_machine_info(result["machine"]))
    for number, chapter in result["chapters"].items():
        print(f"\n== chapter {number}: {chapter['name']} ({chapter['seconds']} s) ==")
        print(format_table(chapter["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
