"""Batch autograder for the course's labs: one submission or a folder of them.

    python -m utils.labs grade lab00 submissions/*.ipynb --out grades.csv --json grades.json

Each submission (the student is the file's name) runs in its own fresh, limited process
(``utils.labs.sandbox``): its code cells run top to bottom without a Jupyter kernel (IPython magics
become no-ops), then each exercise's function is called on the public and hidden cases of the
lab's spec (``utils.labs.specs.labNN``). Only plain values come back; expected values and the
comparison stay here. An exercise scores ``points x passed / cases``; an exercise whose answer
calls the course's own reference implementation scores 0. Every lost point has a reason in the
JSON. If the process dies or hangs in a cell, it is rerun without that cell; if it dies in a
call, it is rerun for the calls after it, so one broken thing costs only what it broke.

Private cases (not in the repository): ``--private cases.py``, a Python file defining
``CASES = {"exercise_name": [Case(...), ...]}`` (added to the hidden cases) and optionally
``SEED = 123`` (a different draw of the hidden cases).
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import random
import runpy
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from utils.labs.spec import Case, Exercise, LabSpec, load_spec
from utils.notebook_setup import SETUP_CELL
from utils.paths import REPO_ROOT
from utils.labs.sandbox import MAX_PAUSE_S, run_job, to_plain

MAX_NOTEBOOK_BYTES = 20 * 1024 * 1024
SKIP_TAG = "grader-skip"  # a master's cell the grader need not run (a slow demo, a timing)
MAX_RERUNS = 6  # reruns that skip a cell or a function that killed the process


class GradingError(RuntimeError):
    """The grader itself could not run (not the student's fault)."""


# --------------------------------------------------------------------------- reading notebooks

def read_code_cells(path: str | Path) -> list[str]:
    """The code cells' sources of a notebook file, read as plain JSON; ``ValueError`` with the
    reason when the file is not a usable notebook."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ValueError(f"cannot read the file: {e.strerror}") from None
    if size > MAX_NOTEBOOK_BYTES:
        raise ValueError(f"the file is {size / 2**20:.0f} MiB, over the "
                         f"{MAX_NOTEBOOK_BYTES // 2**20} MiB limit for a notebook")
    try:
        nb = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not a notebook: the file is not UTF-8 text") from None
    except (ValueError, RecursionError) as e:
        raise ValueError(f"not a valid notebook: the JSON is malformed or truncated ({e})"[:300]) \
            from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ValueError("not a notebook: no list of cells at the top level")
    sources = []
    for cell in nb["cells"]:
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        metadata = cell.get("metadata")
        tags = metadata.get("tags") if isinstance(metadata, dict) else None
        if isinstance(tags, list) and SKIP_TAG in tags:
            sources.append("")  # keeps the numbering of code cells in the notes
            continue
        source = cell.get("source", "")
        if isinstance(source, list) and all(isinstance(s, str) for s in source):
            source = "".join(source)
        if not isinstance(source, str):
            raise ValueError("not a valid notebook: a code cell's source is not text")
        sources.append(source)
    return sources


def to_python(source: str) -> str:
    """IPython syntax (``%magic``, ``!shell``, ``%%cell``) turned into plain Python calling
    ``get_ipython()``, which the sandbox provides as a no-op."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        return TransformerManager().transform_cell(source)
    except Exception:  # an odd cell: hand it over as it is, the sandbox reports its error
        return source


# --------------------------------------------------------------------------- static reference scan

def _dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _aliases(tree) -> dict[str, str]:
    """Names bound by imports anywhere in ``tree``: local name -> dotted target."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else \
                    a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def static_reference_hits(cells: list[str], exercise: Exercise) -> list[str]:
    """References of ``exercise`` that its answer (its function, the notebook functions that
    function uses, or an assignment to its name) mentions: by import, attribute or string."""
    if not exercise.references:
        return []
    trees = []
    for source in cells:
        try:
            trees.append(ast.parse(source))
        except (SyntaxError, ValueError, RecursionError):
            continue
    functions, assigned, aliases = {}, [], {}
    for tree in trees:
        aliases.update(_aliases(tree))
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions[node.name] = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == exercise.name for t in targets):
                    assigned.append(node)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                if any((a.asname or a.name) == exercise.name for a in node.names):
                    assigned.append(node)
    todo = [functions[exercise.name]] if exercise.name in functions else []
    todo += assigned
    seen, nodes = set(), []
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and sub.id in functions and sub.id != exercise.name:
                todo.append(functions[sub.id])
    hits = set()
    for node in nodes:
        local = dict(aliases, **_aliases(node))
        for sub in ast.walk(node):
            candidates = []
            if isinstance(sub, ast.Name):
                candidates.append(local.get(sub.id, sub.id))
            elif isinstance(sub, ast.Attribute):
                dotted = _dotted(sub)
                if dotted:
                    head, _, rest = dotted.partition(".")
                    candidates.append(f"{local.get(head, head)}.{rest}" if rest else dotted)
                candidates.append("." + sub.attr)
            elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                candidates.append("." + sub.value)
            elif isinstance(sub, ast.ImportFrom) and sub.module:
                candidates += [f"{sub.module}.{a.name}" for a in sub.names]
            for ref in exercise.references:
                short = "." + ref.rpartition(".")[2]
                if any(c == ref or c == short or c.endswith(short) and c.startswith("utils.")
                       for c in candidates):
                    hits.add(ref)
    return sorted(hits)


# --------------------------------------------------------------------------- preparing a lab

@dataclass(frozen=True)
class GradedCase:
    id: str
    exercise: Exercise
    case: Case
    label: str
    expected: object  # plain value (or {"raises": name})


def prepare(spec: LabSpec, private: str | Path | None = None) -> tuple[LabSpec, list[GradedCase]]:
    """Every graded case of the lab with its expected value, computed here from the spec."""
    extra, seed = {}, spec.seed
    if private is not None:
        values = runpy.run_path(str(private))
        extra, seed = values.get("CASES", {}), values.get("SEED", spec.seed)
        unknown = set(extra) - {e.name for e in spec.exercises}
        if unknown:
            raise ValueError(f"private cases name unknown exercises {sorted(unknown)}; "
                             f"{spec.lab} has {[e.name for e in spec.exercises]}")
    prepared = []
    for number, exercise in enumerate(spec.exercises):
        rng = random.Random(f"{seed}:{number}")
        public = [c for c in exercise.public if c.graded]
        hidden = list(exercise.hidden(rng)) if exercise.hidden else []
        hidden += list(extra.get(exercise.name, []))
        for i, case in enumerate(public + hidden):
            kind = "public" if i < len(public) else "hidden"
            n = i + 1 if kind == "public" else i - len(public) + 1
            label = f"{kind} {n}: {case.describe()}"
            expected = to_plain(exercise.expected_for(case))
            prepared.append(GradedCase(f"{exercise.name}#{i}", exercise, case, label, expected))
    return spec, prepared


# --------------------------------------------------------------------------- grading one file

def _call(gc: GradedCase) -> dict:
    plain = json.loads(json.dumps({"args": list(gc.case.args), "kwargs": gc.case.kwargs}))
    return {"id": gc.id, "name": gc.exercise.name, "kind": gc.exercise.kind,
            "adapter": gc.exercise.adapter, **plain}


def _failure_reason(value) -> str | None:
    if not isinstance(value, dict):
        return None
    if "__missing__" in value:
        return (f"`{value['__missing__']}` is not defined after running the notebook "
                "(was its cell deleted, renamed, or did it fail?)")
    if "__timeout__" in value:
        if value.get("skipped"):
            return (f"not run: an earlier case of this function timed out after "
                    f"{value['__timeout__']:g} s")
        return f"timed out after {value['__timeout__']:g} s"
    if "__crashed__" in value:
        return value["__crashed__"]
    return None


def _raised_reason(value, case: Case) -> str | None:
    if not (isinstance(value, dict) and "__raised__" in value) or case.raises:
        return None
    if value["__raised__"] == "NotImplementedError":
        return "not implemented: the stub still raises NotImplementedError"
    return f"raised {value['__raised__']}: {value.get('message', '')}"[:300]


def _process_end(result) -> str:
    if result.timed_out:
        return "the wall-clock limit was reached (endless loop?); the process was killed"
    code = result.returncode
    if code is not None and code < 0:
        import signal as _signal

        try:
            name = _signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        extra = {"SIGXCPU": " (CPU-time limit)", "SIGKILL": " (killed)",
                 "SIGSEGV": " (crash)", "SIGXFSZ": " (file-size limit)"}.get(name, "")
        return f"the process was ended by {name}{extra}"
    return f"the process exited early with code {code} (sys.exit/os._exit?)"


def grade_file(path: str | Path, spec: LabSpec, cases: list[GradedCase], *,
               student: str | None = None) -> dict:
    """Grade one submission; never raises for anything inside the submission."""
    path = Path(path)
    started = time.perf_counter()
    report = {"student": student or path.stem, "file": str(path), "lab": spec.lab,
              "max_points": spec.total_points, "notes": []}
    try:
        sources = read_code_cells(path)
    except ValueError as e:
        sources, report["notes"] = None, [str(e)]
    results: dict[str, object] = {}
    if sources is not None:
        setup = SETUP_CELL.strip()
        cells = [(i, to_python(s)) for i, s in enumerate(sources, 1)
                 if s.strip() and s.strip() != setup]
        results = _run(cells, spec, cases, report)
        static = {e.name: static_reference_hits([c for _, c in cells], e) for e in spec.exercises}
    else:
        static = {}
    report["exercises"] = _score(spec, cases, results, static, notebook_error=report["notes"][0]
                                 if sources is None else None)
    report["total"] = round(sum(e["points"] for e in report["exercises"].values()), 4)
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def _run(cells, spec: LabSpec, cases: list[GradedCase], report: dict) -> dict:
    references = sorted({r for e in spec.exercises for r in e.references})
    pending = [_call(gc) for gc in cases]
    skip: set[int] = set()
    results: dict[str, object] = {}
    # all runs of one submission together (plus what trusted start-up and imports may take)
    deadline = time.monotonic() + 3 * spec.timeout_s + MAX_PAUSE_S
    for _ in range(1 + MAX_RERUNS):
        job = {"repo_root": str(REPO_ROOT), "cells": [c for c in cells if c[0] not in skip],
               "calls": pending, "references": references, "preimport": list(spec.preimport),
               "cell_timeout_s": spec.cell_timeout_s, "call_timeout_s": spec.call_timeout_s}
        run = run_job(job, timeout_s=spec.timeout_s, memory_mb=spec.memory_mb)
        if not run.ready:
            raise GradingError(f"the sandbox did not start (exit code {run.returncode}); "
                               f"its output:\n{run.output[-3000:]}")
        report["network"] = run.network
        open_item = None
        for m in run.messages:
            kind = m.get("type")
            if kind == "cell_start":
                open_item = ("cell", m.get("index"))
            elif kind == "cell_end":
                open_item = None
                if m.get("error"):
                    error = m["error"]
                    text = (f"timed out after {error['__timeout__']:g} s" if "__timeout__" in error
                            else f"{error.get('__raised__')}: {error.get('message', '')}")
                    note = f"code cell {m.get('index')} raised {text}"[:300]
                    if note not in report["notes"]:
                        report["notes"].append(note)
            elif kind == "call_start":
                open_item = ("call", m.get("id"))
            elif kind == "result" and m.get("id") not in results:
                results[m["id"]] = {"value": m.get("value"), "refs": m.get("refs") or []}
                open_item = None
            elif kind == "done":
                report["output"] = {"stdout_chars": m.get("stdout_chars"),
                                    "stderr_chars": m.get("stderr_chars"),
                                    "stdout_head": str(m.get("stdout", ""))[:500]}
        if run.overflow:
            report["notes"].append("the result channel overflowed; extra data was dropped")
        if run.done:
            break
        cause = _process_end(run)
        if open_item and open_item[0] == "cell":
            skip.add(open_item[1])
            report["notes"].append(f"code cell {open_item[1]}: {cause}; graded again "
                                   "without that cell")
        elif open_item and open_item[0] == "call":
            results[open_item[1]] = {"value": {"__crashed__": cause}, "refs": []}
            name = next(c["name"] for c in pending if c["id"] == open_item[1])
            for c in pending:  # the same function would end the process again: skip it
                if c["name"] == name and c["id"] not in results:
                    results[c["id"]] = {"value": {"__crashed__": f"not run: an earlier case of "
                                                  f"this function ended the process ({cause})"},
                                        "refs": []}
        pending = [c for c in pending if c["id"] not in results]
        if not pending or not open_item or time.monotonic() > deadline:
            break  # done, or died outside any cell or call (nothing to skip), or out of time
    for call in pending:
        if call["id"] not in results:
            results[call["id"]] = {"value": {"__crashed__": "not run: the submission kept ending "
                                             "the grading process or ran out of time"},
                                   "refs": []}
    return results


def _score(spec: LabSpec, cases: list[GradedCase], results: dict, static: dict,
           notebook_error: str | None) -> dict:
    exercises = {}
    for exercise in spec.exercises:
        mine = [gc for gc in cases if gc.exercise is exercise]
        per_case = exercise.points / len(mine) if mine else 0.0
        lost, passed = [], 0
        refs = set(static.get(exercise.name, []))
        for gc in mine:
            outcome = results.get(gc.id)
            if notebook_error:
                reason = notebook_error
            elif outcome is None:
                reason = "not run"
            else:
                refs |= set(outcome["refs"]) & set(exercise.references)
                value = outcome["value"]
                reason = _failure_reason(value) or _raised_reason(value, gc.case)
                if reason is None:
                    try:
                        reason = exercise.comparator(gc.case)(gc.expected, value)
                    except Exception as e:  # a comparison must never stop the batch
                        reason = f"could not compare the result ({type(e).__name__})"
            if reason is None:
                passed += 1
            else:
                lost.append({"case": gc.label, "points_lost": round(per_case, 4),
                             "reason": reason})
        points = per_case * passed
        if refs and passed:
            names = ", ".join(sorted(refs))
            lost = [{"case": "all", "points_lost": round(points, 4),
                     "reason": f"the answer calls the course's reference implementation "
                               f"({names}); this exercise asks you to write it yourself"}] + lost
            points = 0.0
        exercises[exercise.name] = {"points": round(points, 4), "max": exercise.points,
                                    "passed": passed, "cases": len(mine), "lost": lost}
    return exercises


# --------------------------------------------------------------------------- a batch

def grade(lab: str, paths: list[str | Path], *, jobs: int | None = None,
          private: str | Path | None = None, **limits) -> list[dict]:
    """Grade several submissions in parallel (one sandboxed process each); reports in input
    order. ``limits`` override the spec's (``timeout_s``, ``cell_timeout_s``, ...)."""
    spec = load_spec(lab)
    if limits:
        spec = replace(spec, **limits)
    spec, cases = prepare(spec, private)
    paths = [Path(p) for p in paths]
    names = _student_names(paths)
    jobs = max(1, jobs or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda pn: grade_file(pn[0], spec, cases, student=pn[1]),
                             zip(paths, names)))


def _student_names(paths: list[Path]) -> list[str]:
    stems = [p.stem for p in paths]
    return [p.stem if stems.count(p.stem) == 1 else f"{p.parent.name}/{p.stem}" for p in paths]


def write_csv(reports: list[dict], path: str | Path) -> None:
    exercise_names = list(reports[0]["exercises"]) if reports else []
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["student", *exercise_names, "total", "max"])
        for r in reports:
            writer.writerow([r["student"], *(_num(r["exercises"][n]["points"])
                                              for n in exercise_names),
                             _num(r["total"]), _num(r["max_points"])])


def _num(x):
    return int(x) if float(x).is_integer() else x


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.labs grade", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lab", help="lab id, e.g. lab00")
    parser.add_argument("paths", nargs="+", type=Path, help="submitted .ipynb files or folders")
    parser.add_argument("--out", type=Path, help="CSV: one row per student")
    parser.add_argument("--json", type=Path, help="JSON: every lost point with its reason")
    parser.add_argument("--jobs", type=int, default=None, help="parallel submissions "
                        "(default: the number of CPU cores)")
    parser.add_argument("--private", type=Path, help="a .py file with extra CASES (and SEED)")
    args = parser.parse_args(argv)
    files = []
    for p in args.paths:
        files += sorted(p.glob("*.ipynb")) if p.is_dir() else [p]
    if not files:
        parser.error("no .ipynb files to grade")
    started = time.perf_counter()
    reports = grade(args.lab, files, jobs=args.jobs, private=args.private)
    elapsed = time.perf_counter() - started
    if args.out:
        write_csv(reports, args.out)
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1), encoding="utf-8")
    width = max(len(r["student"]) for r in reports)
    for r in reports:
        print(f"{r['student']:<{width}}  {_num(r['total']):>6} / {_num(r['max_points'])}")
    print(f"graded {len(reports)} submission(s) in {elapsed:.1f} s with "
          f"{max(1, args.jobs or os.cpu_count() or 1)} parallel job(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
