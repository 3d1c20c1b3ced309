"""Generate the learner labs (``labs/``) from their masters (``solutions/``).

    python -m utils.labs generate          # write labs/labNN_<topic>.ipynb from each master
    python -m utils.labs generate --check  # exit 1 (and say which) if labs/ is not up to date

A master marks each answer with nbgrader's markers, ``### BEGIN SOLUTION`` / ``### END
SOLUTION``. Inside a function the region becomes nbgrader's stub (``# YOUR CODE HERE`` and
``raise NotImplementedError()``, at the marker's indentation); at top level (a variable such as a
multiple-choice answer, given a default before the markers) it becomes ``# YOUR ANSWER HERE``.
Outputs and execution counts are cleared, so nbval compares nothing in labs/ and only checks that
no cell raises unexpectedly: every cell that will raise in the blank lab (it calls a stubbed
function at top level, or uses a name only an answer defines) is tagged ``raises-exception``.
The same rules as nbgrader's ClearSolutions preprocessor, written out here because nbgrader is not
among the course's requirements.
"""

from __future__ import annotations

import argparse
import ast
import copy
import re
import sys
from pathlib import Path

import nbformat

from utils.nbtools import RAISES
from utils.paths import LABS_DIR, SOLUTIONS_DIR

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
LAB_FILE = re.compile(r"^lab\d\d_[a-z0-9_]+\.ipynb$")
CODE_STUB = ["# YOUR CODE HERE", "raise NotImplementedError()"]
TOP_LEVEL_STUB = ["# YOUR ANSWER HERE"]


class MarkerError(ValueError):
    """A master's solution markers do not pair up."""


def clear_solutions(source: str, where: str = "cell") -> tuple[str, list[tuple[int, str]]]:
    """``source`` with each marked region replaced by its stub; also returns, per region, its
    indentation and the original text (to learn which names only the answer defines)."""
    out, regions, inside, indent, body = [], [], False, "", []
    for number, line in enumerate(source.split("\n"), 1):
        stripped = line.strip()
        if stripped.startswith(BEGIN):
            if inside:
                raise MarkerError(f"{where}, line {number}: {BEGIN} inside another solution")
            inside, indent, body = True, line[: len(line) - len(line.lstrip())], []
            out += [indent + s for s in (TOP_LEVEL_STUB if not indent else CODE_STUB)]
        elif stripped.startswith(END):
            if not inside:
                raise MarkerError(f"{where}, line {number}: {END} without {BEGIN}")
            inside = False
            regions.append((len(indent), "\n".join(body)))
        elif inside:
            body.append(line)
        else:
            out.append(line)
    if inside:
        raise MarkerError(f"{where}: {BEGIN} without {END}")
    return "\n".join(out), regions


def _bound_names(tree) -> set[str]:
    names = set()
    for node in tree.body if isinstance(tree, ast.Module) else [tree]:
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef,
                                                            ast.AsyncFunctionDef)) else [node]:
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                names.add(sub.id)
            elif isinstance(sub, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                names.add(sub.name)
            elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                names |= {(a.asname or a.name).split(".")[0] for a in sub.names}
    return names


def _top_level_loads(tree: ast.Module) -> list[tuple[ast.Name, bool]]:
    """Names read by top-level code (not inside def/class/lambda bodies), each with whether it
    is only passed, as such, to ``check(...)``."""
    loads, check_args = [], set()
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id == "check":
            check_args |= {id(a) for a in node.args if isinstance(a, ast.Name)}
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            loads.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return [(n, id(n) in check_args) for n in loads]


def make_lab(master: nbformat.NotebookNode, where: str = "master") -> nbformat.NotebookNode:
    """The learner notebook for one master notebook."""
    lab = copy.deepcopy(master)
    stubbed, answer_names, defined_outside = set(), set(), set()
    cleared = []
    for index, cell in enumerate(lab.cells):
        if cell.cell_type != "code":
            cleared.append(None)
            continue
        source, regions = clear_solutions(cell.source, f"{where}, cell {index}")
        cleared.append(source)
        try:
            tree = ast.parse(source)
        except SyntaxError as e:
            raise MarkerError(f"{where}, cell {index}: the cleared cell is not valid Python "
                              f"({e.msg}, line {e.lineno})") from None
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(isinstance(s, ast.Raise) for s in node.body):
                raise MarkerError(f"{where}, cell {index}: a solution region directly in the body "
                                  f"of class {node.name} would raise when the class is defined; "
                                  f"put the markers inside each method")
        defined_outside |= _bound_names(tree)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                    isinstance(s, ast.Raise) for s in ast.walk(node)) and \
                    any(ind > 0 for ind, _ in regions) and CODE_STUB[1] in ast.unparse(node):
                stubbed.add(node.name)
        for ind, text in regions:
            if ind == 0:
                try:
                    answer_names |= _bound_names(ast.parse(text))
                except SyntaxError:
                    pass
    undefined = answer_names - defined_outside
    for cell, source in zip(lab.cells, cleared):
        if cell.cell_type == "code":
            cell.source = source
            cell.outputs = []
            cell.execution_count = None
            raises = False
            for statement in ast.parse(source).body:  # from the first that raises, nothing binds
                module = ast.Module(body=[statement], type_ignores=[])
                raises = raises or any(n.id in undefined or (n.id in stubbed and not only_checked)
                                       for n, only_checked in _top_level_loads(module))
                if raises:
                    undefined |= _bound_names(module)
            tags = [t for t in cell.metadata.get("tags", []) if t != RAISES]
            if raises:
                tags.append(RAISES)
            cell.metadata = {"tags": tags} if tags else {}
        else:
            cell.metadata = {k: v for k, v in cell.metadata.items() if k == "tags"}
    return lab


def masters() -> list[Path]:
    return sorted(p for p in SOLUTIONS_DIR.glob("lab*.ipynb") if LAB_FILE.match(p.name))


def render(master_path: Path) -> str:
    master = nbformat.read(master_path, as_version=4)
    return nbformat.writes(make_lab(master, master_path.name)) + "\n"


def generate(check: bool = False, labs_dir: Path = LABS_DIR) -> list[str]:
    """Write (or, with ``check``, compare) every lab; returns the problems found (check) or the
    files written."""
    problems, written = [], []
    expected = {}
    for master in masters():
        expected[master.name] = render(master)
    for name, text in expected.items():
        target = labs_dir / name
        if check:
            if not target.exists():
                problems.append(f"labs/{name} is missing")
            elif target.read_text(encoding="utf-8") != text:
                problems.append(f"labs/{name} differs from what its master produces")
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists() or target.read_text(encoding="utf-8") != text:
                target.write_text(text, encoding="utf-8")
            written.append(f"labs/{name}")
    for stale in sorted(p for p in labs_dir.glob("lab*.ipynb") if LAB_FILE.match(p.name)):
        if stale.name not in expected:
            if check:
                problems.append(f"labs/{stale.name} has no master in solutions/")
            else:
                stale.unlink()
                written.append(f"removed labs/{stale.name}")
    return problems if check else written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.labs generate",
                                     description="write labs/ from the masters in solutions/")
    parser.add_argument("--check", action="store_true", help="only check that labs/ is up to date")
    args = parser.parse_args(argv)
    result = generate(check=args.check)
    if args.check:
        for problem in result:
            print(problem)
        if result:
            print("run: python -m utils.labs generate", file=sys.stderr)
            return 1
        print(f"labs/ is up to date ({len(masters())} lab(s))")
        return 0
    for line in result:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
