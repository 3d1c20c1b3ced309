"""Batch autograder for the course's labs: one submission or a folder of them.

    python -m utils.labs grade lab00 submissions/*.ipynb --out grades.csv --json grades.json

Each submission (the student is the file's name) runs in its own OS sandbox (bubblewrap:
``utils.labs.sandbox``): its code cells run top to bottom without a Jupyter kernel (IPython magics
become no-ops), then each exercise's function is called on the public and hidden cases of the
lab's spec (``utils.labs.specs.labNN``). Only plain values come back; expected values and the
comparison stay here. An exercise scores ``points x passed / cases``; an exercise whose answer
calls the course's own reference implementation scores 0. Every lost point has a reason in the
JSON. If the process dies or hangs in a cell, it is rerun without that cell; if it dies in a
call, it is rerun for the calls after it, so one broken thing costs only what it broke.

Without bubblewrap the grader refuses to run, unless ``--trusted`` says the notebooks are trusted
(a learner grading their own work).

Private cases (not in the repository): ``--private cases.py``, a Python file defining
``CASES = {"exercise_name": [Case(...), ...]}`` (added to the hidden cases) and optionally
``SEED = 123`` (a different draw of the hidden cases).
"""

from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import os
import random
import re
import runpy
import sys
import tempfile
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from utils.labs.sandbox import (STARTUP_S, SandboxUnavailable, require_sandbox, run_job,
                                sandbox_problem, to_plain)
from utils.labs.sandbox_child import REFERENCE_ERROR
from utils.labs.spec import Case, Exercise, LabSpec, load_spec
from utils.notebook_setup import SETUP_CELL
from utils.paths import REPO_ROOT

MAX_NOTEBOOK_BYTES = 20 * 1024 * 1024
MAX_CODE_CELLS = 400        # cells run per submission (a real lab has a few dozen)
MAX_SCAN_CHARS = 400_000    # code the static reference scan reads (the runtime check remains)
MAX_NOTES = 20              # notes kept per submission (then a count of the rest)
SKIP_TAG = "grader-skip"  # a master's cell the grader need not run (a slow demo, a timing)
MAX_RERUNS = 6  # reruns that skip a cell or a function that killed the process


class GradingError(RuntimeError):
    """The grader itself could not run (not the student's fault)."""


# --------------------------------------------------------------------------- reading notebooks

@dataclass(frozen=True)
class NotebookCell:
    number: int          # position in the notebook, counting every cell from 1 (as seen)
    execution_count: int | None
    source: str

    @property
    def label(self) -> str:
        """How the learner finds the cell: ``cell 7 (In [3])``."""
        count = f" (In [{self.execution_count}])" if self.execution_count else ""
        return f"cell {self.number}{count}"


def read_cells(path: str | Path) -> list[NotebookCell]:
    """The code cells of a notebook file, read as plain JSON, numbered as in the notebook;
    ``ValueError`` with the reason when the file is not a usable notebook. Cells tagged
    ``grader-skip`` come back empty."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ValueError("cannot read the file: not a regular file")
    except OSError as e:
        raise ValueError(f"cannot read the file: {e.strerror}") from None
    if size > MAX_NOTEBOOK_BYTES:
        raise ValueError(f"the file is {size / 2**20:.0f} MiB, over the "
                         f"{MAX_NOTEBOOK_BYTES // 2**20} MiB limit for a notebook")
    try:
        nb = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not a notebook: the file is not UTF-8 text") from None
    except (ValueError, RecursionError, MemoryError) as e:
        raise ValueError(f"not a valid notebook: the JSON is malformed or truncated ({e})"[:300]) \
            from None
    except OSError as e:
        raise ValueError(f"cannot read the file: {e.strerror}") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ValueError("not a notebook: no list of cells at the top level")
    cells = []
    for number, cell in enumerate(nb["cells"], 1):
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        metadata = cell.get("metadata")
        tags = metadata.get("tags") if isinstance(metadata, dict) else None
        count = cell.get("execution_count")
        count = count if type(count) is int else None
        if isinstance(tags, list) and SKIP_TAG in tags:
            cells.append(NotebookCell(number, count, ""))
            continue
        source = cell.get("source", "")
        if isinstance(source, list) and all(isinstance(s, str) for s in source):
            source = "".join(source)
        if not isinstance(source, str):
            raise ValueError(f"not a valid notebook: cell {number}'s source is not text")
        cells.append(NotebookCell(number, count, source))
    return cells


def read_code_cells(path: str | Path) -> list[str]:
    """The code cells' sources (``read_cells`` without the numbering)."""
    return [c.source for c in read_cells(path)]


def needs_ipython(source: str) -> bool:
    """Whether a cell holds IPython syntax (a line starting with ``%`` or ``!``); the rewrite
    itself runs in the sandbox, on the student's time."""
    return bool(re.search(r"(?m)^\s*[%!]", source))


def _for_scan(source: str) -> str:
    """IPython lines blanked (kept as ``pass``) so that the rest of the cell parses."""
    return re.sub(r"(?m)^(\s*)[%!].*$", r"\1pass", source)


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
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue  # that cell only: the others are still scanned
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


def bounded_static_hits(sources: list[str], exercises, notes: "Notes") -> dict[str, list[str]]:
    """``static_reference_hits`` for each exercise, on at most ``MAX_SCAN_CHARS`` of code; a
    scan that fails (a cell the parser rejects with MemoryError, deep nesting) costs only the
    scan: the reference implementations are disabled in the sandbox anyway."""
    if sum(len(s) for s in sources) > MAX_SCAN_CHARS:
        notes.add(f"the notebook has over {MAX_SCAN_CHARS:,} characters of code; the static "
                  "scan for reference calls was skipped (calls at run time are still caught)")
        return {}
    scanned = [_for_scan(s) for s in sources]
    hits = {}
    for exercise in exercises:
        try:
            hits[exercise.name] = static_reference_hits(scanned, exercise)
        except (Exception, MemoryError, RecursionError) as e:  # noqa: BLE001
            notes.add(f"the static scan for reference calls failed ({type(e).__name__})")
            return {}
    return hits


# --------------------------------------------------------------------------- preparing a lab

@dataclass(frozen=True)
class GradedCase:
    id: str
    exercise: Exercise
    case: Case
    label: str
    expected: object  # plain value (or {"raises": name}); never leaves the grading process


def prepare(spec: LabSpec, private: str | Path | None = None) -> tuple[LabSpec, list[GradedCase]]:
    """Every graded case of the lab with its expected value, computed here from the spec."""
    extra, seed = {}, spec.seed
    if private is not None:
        if not Path(private).is_file():
            raise ValueError(f"--private: no such file {str(private)!r}")
        values = runpy.run_path(str(private))
        extra, seed = values.get("CASES", {}), values.get("SEED", spec.seed)
        if not isinstance(extra, dict):
            raise ValueError(f"--private: CASES must be a dict, got {type(extra).__name__}")
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

class Notes:
    """A submission's notes: unique, at most ``MAX_NOTES`` (then how many more), each short."""

    def __init__(self):
        self.items: list[str] = []
        self.seen: set[str] = set()
        self.dropped = 0

    def add(self, note: str) -> None:
        note = str(note)[:300]
        if note in self.seen:
            return
        self.seen.add(note)
        if len(self.items) < MAX_NOTES:
            self.items.append(note)
        else:
            self.dropped += 1

    def as_list(self) -> list[str]:
        more = [f"... and {self.dropped} more note(s)"] if self.dropped else []
        return self.items + more


def _call(gc: GradedCase) -> dict:
    plain = json.loads(json.dumps({"args": list(gc.case.args), "kwargs": gc.case.kwargs}))
    return {"id": gc.id, "name": gc.exercise.name, "kind": gc.exercise.kind,
            "adapter": gc.exercise.adapter, **plain}


def _error_text(error: dict) -> str:
    kind = error.get("kind")
    if kind in ("timeout", "skipped"):
        return f"timed out after {float(error['seconds']):g} s"
    return f"{error.get('name')}: {error.get('message', '')}"


def _case_reason(outcome: dict, gc: GradedCase) -> tuple[str | None, str | None]:
    """(why the case failed or None, the reference it called or None)."""
    error = outcome.get("error")
    if error is None:
        return gc.exercise.comparator(gc.case)(gc.expected, outcome.get("value")), None
    kind = error.get("kind")
    if kind == "crashed":
        return error["message"], None
    if kind == "missing":
        return (f"`{error['name']}` is not defined after running the notebook "
                "(was its cell deleted, renamed, or did it fail?)"), None
    if kind == "timeout":
        return f"timed out after {float(error['seconds']):g} s", None
    if kind == "skipped":
        return (f"not run: an earlier case of this function timed out after "
                f"{float(error['seconds']):g} s"), None
    if REFERENCE_ERROR in error.get("bases", ()) or error.get("name") == REFERENCE_ERROR:
        message = error.get("message", "")
        called = next((r for r in gc.exercise.references if r in message),
                      message.split(" ", 1)[0].strip("'\"")[:120] or "a reference")
        return (f"calls the course's reference implementation ({called}), which is disabled "
                "while grading"), called
    got = {"__raised__": error["name"], "__bases__": error["bases"],
           "message": error["message"]}
    if gc.case.raises:
        return gc.exercise.comparator(gc.case)(gc.expected, got), None
    if error["name"] == "NotImplementedError":
        return "not implemented: the stub still raises NotImplementedError", None
    return f"raised {error['name']}: {error['message']}"[:300], None


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
               student: str | None = None, trusted: bool = False,
               startup_s: float = STARTUP_S) -> dict:
    """Grade one submission; never raises for anything inside the submission (``GradingError``
    when the sandbox itself cannot start)."""
    path = Path(path)
    started = time.perf_counter()
    report = {"student": student or safe_text(path.stem), "file": safe_text(str(path)),
              "lab": spec.lab, "max_points": spec.total_points, "notes": []}
    notes = Notes()
    notebook_error, results, static = None, {}, {}
    try:
        cells = read_cells(path)
    except ValueError as e:
        notebook_error, cells = str(e), None
        notes.add(notebook_error)
    if cells is not None:
        try:
            setup = SETUP_CELL.strip()
            run = [c for c in cells if c.source.strip() and c.source.strip() != setup]
            if len(run) > MAX_CODE_CELLS:
                notes.add(f"the notebook has {len(run)} non-empty code cells; only the first "
                          f"{MAX_CODE_CELLS} were run")
                run = run[:MAX_CODE_CELLS]
            results = _run(run, spec, cases, report, notes, trusted, startup_s)
            static = bounded_static_hits([c.source for c in run], spec.exercises, notes)
        except (GradingError, SandboxUnavailable):
            raise
        except Exception as e:  # noqa: BLE001 - one submission never stops the batch
            notes.add(f"the grader failed on this submission ({type(e).__name__}: {e})"[:300])
    report["exercises"] = _score(spec, cases, results, static, notebook_error)
    report["total"] = round(sum(e["points"] for e in report["exercises"].values()), 4)
    report["notes"] = notes.as_list()
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def _run(cells: list[NotebookCell], spec: LabSpec, cases: list[GradedCase], report: dict,
         notes: Notes, trusted: bool, startup_s: float) -> dict:
    references = sorted({r for e in spec.exercises for r in e.references})
    labels = {c.number: c.label for c in cells}
    pending = [_call(gc) for gc in cases]
    skip: set[int] = set()
    results: dict[str, dict] = {}
    ipython = any(needs_ipython(c.source) for c in cells)
    # every run of one submission together, on the parent's clock
    deadline = time.monotonic() + 2 * spec.timeout_s + startup_s
    for _ in range(1 + MAX_RERUNS):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        job = {"repo_root": str(REPO_ROOT), "lab": spec.lab,
               "cells": [[c.number, c.source] for c in cells if c.number not in skip],
               "calls": pending, "references": references, "preimport": list(spec.preimport),
               "ipython": ipython, "cell_timeout_s": spec.cell_timeout_s,
               "call_timeout_s": spec.call_timeout_s}
        run = run_job(job, timeout_s=min(spec.timeout_s, remaining), memory_mb=spec.memory_mb,
                      trusted=trusted, startup_s=startup_s)
        if not run.ready:
            _check_start(spec, trusted, startup_s, run)  # GradingError if the sandbox is broken
            notes.add(f"the submission's events never reached the grader "
                      f"({_process_end(run)}); nothing after was graded")
            break
        report["sandbox"] = run.sandbox
        open_item = None
        for m in run.messages:
            kind = m["type"]
            if kind == "cell_start":
                open_item = ("cell", m["index"])
            elif kind == "cell_end":
                open_item = None
                if m.get("error"):
                    notes.add(f"{labels.get(m['index'], m['index'])} raised "
                              f"{_error_text(m['error'])}")
            elif kind == "call_start":
                open_item = ("call", m["id"])
            elif kind == "result":
                results[m["id"]] = {"value": m.get("value"), "error": m.get("error"),
                                    "refs": m.get("refs", [])}
                open_item = None
            elif kind == "done":
                report["output"] = {"stdout_chars": m.get("stdout_chars"),
                                    "stderr_chars": m.get("stderr_chars"),
                                    "stdout_head": str(m.get("stdout", ""))[:500]}
        if run.tampered:
            reason = (f"the submission wrote to the grader's result channel ({run.tampered}); "
                      "what followed was not graded")
            notes.add(reason)
            for c in pending:
                if c["id"] not in results:
                    results[c["id"]] = _crashed(reason)
            break
        if run.overflow:
            notes.add("the result channel overflowed; extra data was dropped")
        if run.done:
            break
        cause = _process_end(run)
        if open_item and open_item[0] == "cell":
            skip.add(open_item[1])
            notes.add(f"{labels.get(open_item[1], open_item[1])}: {cause}; graded again "
                      "without that cell")
        elif open_item and open_item[0] == "call":
            results[open_item[1]] = _crashed(cause)
            name = next(c["name"] for c in pending if c["id"] == open_item[1])
            for c in pending:  # the same function would end the process again: skip it
                if c["name"] == name and c["id"] not in results:
                    results[c["id"]] = _crashed(f"not run: an earlier case of this function "
                                                f"ended the process ({cause})")
        pending = [c for c in pending if c["id"] not in results]
        if not pending or not open_item:
            break  # done, or died outside any cell or call (nothing to skip)
    for call in pending:
        if call["id"] not in results:
            results[call["id"]] = _crashed("not run: the submission kept ending the grading "
                                           "process or ran out of time")
    return results


def _check_start(spec: LabSpec, trusted: bool, startup_s: float, failed) -> None:
    """A run that never said ``ready``: the sandbox is broken (``GradingError``, the batch
    stops) if a run with no student code fails too; otherwise the submission hid its events
    (that costs it only)."""
    probe = run_job({"repo_root": str(REPO_ROOT), "lab": spec.lab, "cells": [], "calls": [],
                     "references": [], "preimport": list(spec.preimport), "ipython": False,
                     "cell_timeout_s": spec.cell_timeout_s,
                     "call_timeout_s": spec.call_timeout_s},
                    timeout_s=spec.timeout_s, memory_mb=spec.memory_mb, trusted=trusted,
                    startup_s=startup_s)
    if not probe.ready:
        raise GradingError(f"the sandbox did not start (exit code {probe.returncode}); "
                           f"its output:\n{probe.output[-3000:] or failed.output[-3000:]}")


def _crashed(message: str) -> dict:
    return {"value": None, "error": {"kind": "crashed", "message": message}, "refs": []}


def _score(spec: LabSpec, cases: list[GradedCase], results: dict, static: dict,
           notebook_error: str | None) -> dict:
    exercises = {}
    for exercise in spec.exercises:
        mine = [gc for gc in cases if gc.exercise is exercise]
        per_case = exercise.points / len(mine) if mine else 0.0
        lost, passed = [], 0
        counts = {"public": [0, 0], "hidden": [0, 0]}
        refs = set(static.get(exercise.name, []))
        for gc in mine:
            outcome = results.get(gc.id)
            kind = gc.label.split(" ", 1)[0]
            counts[kind][1] += 1
            if notebook_error:
                reason = notebook_error
            elif outcome is None:
                reason = "not run"
            else:
                refs |= set(outcome.get("refs") or ()) & set(exercise.references)
                try:  # a comparison or a reason must never stop the batch
                    reason, called = _case_reason(outcome, gc)
                    if called:
                        refs.add(called)
                except Exception as e:  # noqa: BLE001
                    reason = f"could not compare the result ({type(e).__name__})"
                if reason is not None and not isinstance(reason, str):
                    reason = "could not compare the result"
            if reason is None:
                passed += 1
                counts[kind][0] += 1
            else:
                lost.append({"case": gc.label, "points_lost": round(per_case, 4),
                             "reason": reason[:500]})
        points = per_case * passed
        if refs:
            names = ", ".join(sorted(refs))
            if passed:
                lost = [{"case": "all", "points_lost": round(points, 4),
                         "reason": f"the answer calls the course's reference implementation "
                                   f"({names}); this exercise asks you to write it yourself"}] \
                    + lost
            points = 0.0
        exercises[exercise.name] = {"points": round(points, 4), "max": exercise.points,
                                    "passed": passed, "cases": len(mine),
                                    "public": {"passed": counts["public"][0],
                                               "cases": counts["public"][1]},
                                    "hidden": {"passed": counts["hidden"][0],
                                               "cases": counts["hidden"][1]},
                                    "calls_reference": sorted(refs), "lost": lost}
    return exercises


# --------------------------------------------------------------------------- a batch

def grade(lab: str, paths: list[str | Path], *, jobs: int | None = None,
          private: str | Path | None = None, trusted: bool = False,
          startup_s: float = STARTUP_S, **limits) -> list[dict]:
    """Grade several submissions in parallel (one sandbox each); reports in input order.
    ``limits`` override the spec's (``timeout_s``, ``cell_timeout_s``, ...). Without a sandbox
    ``SandboxUnavailable`` (what to install), unless ``trusted``: then the submissions run as
    plain processes (the sandbox is still used where it can start)."""
    if trusted:
        trusted = sandbox_problem() is not None
    else:
        require_sandbox()
    spec = load_spec(lab)
    if limits:
        spec = replace(spec, **limits)
    spec, cases = prepare(spec, private)
    paths = [Path(p) for p in paths]
    names = student_names(paths)
    if jobs is not None and (type(jobs) is not int or jobs < 1):
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    jobs = jobs or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda pn: grade_file(pn[0], spec, cases, student=pn[1],
                                                   trusted=trusted, startup_s=startup_s),
                             zip(paths, names)))


def safe_text(text: str) -> str:
    """``text`` with undecodable bytes of a file name as ``\\xNN`` and control or invisible
    characters escaped, so that it encodes anywhere and prints as one harmless line."""
    text = os.fsencode(text).decode("utf-8", "backslashreplace") if isinstance(text, str) \
        else str(text)
    out = []
    for ch in text:
        if unicodedata.category(ch)[0] in "CZ" and ch != " ":
            out.append(ch.encode("unicode_escape").decode("ascii") if ord(ch) < 0x10000
                       or ch in "\t\n\r" else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    return "".join(out)


def student_names(paths: list[Path]) -> list[str]:
    """One unique, printable name per file: the stem, qualified by as many parent folders as
    it takes when stems collide (``x/sub/alice`` and ``y/sub/alice``), numbered if the same
    file is given twice."""
    resolved = [p.absolute() for p in paths]
    depth = [0] * len(paths)

    def name(i):
        parts = resolved[i].parent.parts[len(resolved[i].parent.parts) - depth[i]:] \
            if depth[i] else ()
        return "/".join([*parts, resolved[i].stem])

    for _ in range(64):
        names = [name(i) for i in range(len(paths))]
        clash = [i for i, n in enumerate(names)
                 if any(m == n and resolved[j] != resolved[i] for j, m in enumerate(names))
                 and depth[i] < len(resolved[i].parent.parts)]
        if not clash:
            break
        for i in clash:
            depth[i] += 1
    names = [safe_text(name(i)) for i in range(len(paths))]
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return unique


# --------------------------------------------------------------------------- output files

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_field(value):
    """A CSV field a spreadsheet shows as text: one starting with = + - @ tab or CR gets a
    leading apostrophe; numbers stay numbers."""
    if isinstance(value, (int, float)):
        return value
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def summary_note(report: dict) -> str:
    """The CSV's notes column: what the instructor must know at a glance (a corrupt notebook,
    a cell that broke, a blank lab), never just a bare 0."""
    notes = list(report.get("notes") or [])
    if report.get("total", 0) == 0 and report.get("exercises"):
        reasons = [x["reason"] for e in report["exercises"].values() for x in e["lost"]]
        if reasons:
            common = max(sorted(set(reasons)), key=reasons.count)
            notes.insert(0, f"no points: {common}")
    refs = sorted({r for e in report.get("exercises", {}).values()
                   for r in e.get("calls_reference", [])})
    if refs:
        notes.append("calls the reference implementation: " + ", ".join(refs))
    return safe_text(" | ".join(notes))[:1000]


def _atomic_write(path: Path, data: str) -> None:
    """Write ``data`` to a temporary file next to ``path`` and rename it into place (whatever
    was at ``path``, a file, a FIFO or a link, is replaced, never opened)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def csv_text(reports: list[dict]) -> str:
    exercise_names = list(reports[0]["exercises"]) if reports else []
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["student", *exercise_names, "total", "max", "notes"])
    for r in reports:
        writer.writerow([csv_field(safe_text(r["student"])),
                         *(_num(r["exercises"][n]["points"]) for n in exercise_names),
                         _num(r["total"]), _num(r["max_points"]), csv_field(summary_note(r))])
    return buffer.getvalue()


def write_csv(reports: list[dict], path: str | Path) -> None:
    _atomic_write(Path(path), csv_text(reports))


def write_json(reports: list[dict], path: str | Path) -> None:
    _atomic_write(Path(path), json.dumps(reports, indent=1, ensure_ascii=True))


def _num(x):
    return int(x) if float(x).is_integer() else x


def _output_path(parser, value: Path | None, flag: str) -> None:
    if value is None:
        return
    if value.is_dir():
        parser.error(f"{flag}: {str(value)!r} is a folder; give a file name")
    if not value.parent.is_dir():
        parser.error(f"{flag}: the folder {str(value.parent)!r} does not exist")


def main(argv=None, **limits) -> int:
    """The command line; ``limits`` (Python callers: tests) override the spec's limits."""
    parser = argparse.ArgumentParser(prog="python -m utils.labs grade", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lab", help="lab id, e.g. lab00")
    parser.add_argument("paths", nargs="+", type=Path, help="submitted .ipynb files or folders")
    parser.add_argument("--out", type=Path, help="CSV: one row per student")
    parser.add_argument("--json", type=Path, help="JSON: every lost point with its reason")
    parser.add_argument("--jobs", type=int, default=None, help="parallel submissions "
                        "(default: the number of CPU cores)")
    parser.add_argument("--private", type=Path, help="a .py file with extra CASES (and SEED)")
    parser.add_argument("--trusted", action="store_true",
                        help="the notebooks are trusted (your own): where bubblewrap is not "
                             "available, run them without the OS sandbox instead of refusing")
    args = parser.parse_args(argv)
    try:
        load_spec(args.lab)
    except ValueError as e:
        parser.error(f"lab: {e}")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs: must be at least 1, got {args.jobs}")
    if args.private is not None and not args.private.is_file():
        parser.error(f"--private: no such file {str(args.private)!r}")
    _output_path(parser, args.out, "--out")
    _output_path(parser, args.json, "--json")
    files = []
    for p in args.paths:
        if p.is_dir():
            files += sorted(p.glob("*.ipynb"))
        elif p.exists():
            files.append(p)
        else:
            parser.error(f"paths: no such file or folder {safe_text(str(p))!r}")
    if not files:
        parser.error("paths: no .ipynb files to grade")
    started = time.perf_counter()
    try:
        reports = grade(args.lab, files, jobs=args.jobs, private=args.private,
                        trusted=args.trusted, **limits)
    except SandboxUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        parser.error(str(e))
    elapsed = time.perf_counter() - started
    if args.json:
        write_json(reports, args.json)
    if args.out:
        write_csv(reports, args.out)
    width = min(40, max(len(r["student"]) for r in reports))
    for r in reports:
        print(f"{safe_text(r['student']):<{width}}  {_num(r['total']):>6} / "
              f"{_num(r['max_points'])}")
    print(f"graded {len(reports)} submission(s) in {elapsed:.1f} s with "
          f"{args.jobs or os.cpu_count() or 1} parallel job(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
