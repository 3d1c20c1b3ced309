"""A lab as a Gradescope autograder: ``python -m utils.labs gradescope lab00 --out DIR``.

Writes ``DIR/lab00_gradescope.zip``, the bundle Gradescope's "programming assignment" takes
(https://gradescope-autograders.readthedocs.io/en/latest/specs/):

- ``setup.sh``: run once, as root, when Gradescope builds the image (Ubuntu): installs Python,
  bubblewrap and the course's requirements into ``/autograder/venv``;
- ``run_autograder``: run once per submission in a fresh container, from ``/autograder``: grades
  the notebook found in ``/autograder/submission`` with the same grader as the command line
  (in the bubblewrap sandbox where it can start; otherwise Gradescope's per-submission container
  is the only boundary, and the output says so) and writes ``/autograder/results/results.json``;
- the course's ``utils`` package, ``pyproject.toml``, the requirements and, with
  ``--private cases.py``, the private cases (the zip stays with the instructor on Gradescope).

``results.json`` has the total ``score`` and, per exercise, two tests (``score``, ``max_score``,
``name``, ``output``, ``visibility``): its public cases (``visible``) and its hidden cases
(``after_published`` by default, ``--hidden-visibility hidden`` to never show them).

The root folder is ``$GRADESCOPE_AUTOGRADER_ROOT`` (default ``/autograder``) and the Python is
``$COURSE_PYTHON`` (default ``$ROOT/venv/bin/python``), so that a test can run the bundle against
a fake ``/autograder`` layout in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
import zipfile
from pathlib import Path

ROOT_ENV = "GRADESCOPE_AUTOGRADER_ROOT"
DEFAULT_ROOT = "/autograder"
VISIBILITIES = ("after_published", "hidden", "after_due_date", "visible")

SETUP_SH = """#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder image (Ubuntu).
set -euo pipefail
apt-get update
apt-get install -y python3 python3-venv python3-pip bubblewrap
python3 -m venv /autograder/venv
/autograder/venv/bin/pip install --no-cache-dir -r /autograder/source/requirements-grading.txt
"""

RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope runs this once per submission, in a fresh container.
ROOT="${{{root_env}:-{default_root}}}"
PYTHON="${{COURSE_PYTHON:-$ROOT/venv/bin/python}}"
cd "$ROOT/source" || exit 1
exec "$PYTHON" -m utils.labs gradescope {lab} --run --root "$ROOT" {extra}
"""


def _requirements(repo: Path) -> str:
    """The course's requirements without the editable install of the repository itself (the
    bundle runs from its own copy of ``utils``)."""
    lines = (repo / "requirements.txt").read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() not in ("-e .", "-e.", ".")]
    return "\n".join(kept) + "\n"


def _add(zf: zipfile.ZipFile, name: str, data: str | bytes, executable: bool = False) -> None:
    info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    mode = 0o755 if executable else 0o644
    info.external_attr = (stat.S_IFREG | mode) << 16
    zf.writestr(info, data)


def build_bundle(lab: str, out_dir: str | Path, *, private: str | Path | None = None,
                 hidden_visibility: str = "after_published") -> Path:
    """Write ``out_dir/<lab>_gradescope.zip`` and return its path."""
    from utils.labs.grade import prepare
    from utils.labs.spec import load_spec
    from utils.paths import REPO_ROOT

    spec = load_spec(lab)  # ValueError naming the lab when there is no spec
    if hidden_visibility not in VISIBILITIES:
        raise ValueError(f"hidden_visibility must be one of {VISIBILITIES}, "
                         f"got {hidden_visibility!r}")
    if private is not None:
        prepare(spec, private)  # a broken private file fails here, not on Gradescope
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ValueError(f"--out: {str(out_dir)!r} is not a folder")
    extra = f"--hidden-visibility {hidden_visibility}"
    if private is not None:
        extra += " --private private_cases.py"
    path = out_dir / f"{lab}_gradescope.zip"
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w") as zf:
        _add(zf, "setup.sh", SETUP_SH, executable=True)
        _add(zf, "run_autograder", RUN_AUTOGRADER.format(
            root_env=ROOT_ENV, default_root=DEFAULT_ROOT, lab=lab, extra=extra),
            executable=True)
        _add(zf, "requirements-grading.txt", _requirements(REPO_ROOT))
        _add(zf, "pyproject.toml", (REPO_ROOT / "pyproject.toml").read_bytes())
        for file in sorted((REPO_ROOT / "utils").rglob("*")):
            if file.is_file() and "__pycache__" not in file.parts and file.suffix != ".pyc":
                _add(zf, file.relative_to(REPO_ROOT).as_posix(), file.read_bytes())
        for name in spec.repo_files:
            _add(zf, name, (REPO_ROOT / name).read_bytes())
        if private is not None:
            _add(zf, "private_cases.py", Path(private).read_bytes())
        _add(zf, "README.txt", f"Gradescope autograder for {spec.title} ({lab}); built by "
             f"`python -m utils.labs gradescope {lab}`. Upload this zip as the autograder of a "
             "programming assignment.\n")
    os.replace(tmp, path)
    return path


def to_results(report: dict, spec, *, hidden_visibility: str = "after_published",
               note: str = "") -> dict:
    """A grading report as Gradescope's results.json."""
    tests = []
    for exercise in spec.exercises:
        e = report["exercises"][exercise.name]
        per_case = exercise.points / e["cases"] if e["cases"] else 0.0
        penalised = bool(e.get("calls_reference"))
        for kind, visibility in (("public", "visible"), ("hidden", hidden_visibility)):
            counts = e[kind]
            if not counts["cases"]:
                continue
            lost = [x for x in e["lost"] if x["case"].startswith(kind) or x["case"] == "all"]
            lines = [f"{counts['passed']} of {counts['cases']} {kind} cases passed"]
            if penalised:
                lines.append("the answer calls the course's reference implementation "
                             f"({', '.join(e['calls_reference'])}): 0 points")
            lines += [f"- {x['case']}: {x['reason']}" for x in lost if x["case"] != "all"]
            tests.append({"name": f"{exercise.title} ({exercise.name}): {kind} cases",
                          "score": 0.0 if penalised else round(per_case * counts["passed"], 4),
                          "max_score": round(per_case * counts["cases"], 4),
                          "output": "\n".join(lines)[:8000], "visibility": visibility})
    output = "\n".join(([note] if note else []) + list(report.get("notes", [])))
    return {"score": report["total"], "execution_time": int(report.get("seconds", 0)),
            "output": output[:8000], "stdout_visibility": "hidden", "tests": tests}


def run(lab: str, root: str | Path, *, private: str | Path | None = None,
        hidden_visibility: str = "after_published") -> dict:
    """Grade the notebook in ``root/submission`` and write ``root/results/results.json``."""
    from utils.labs.grade import _atomic_write, grade
    from utils.labs.sandbox import sandbox_problem
    from utils.labs.spec import load_spec

    root = Path(root)
    spec = load_spec(lab)
    started = time.perf_counter()
    notebooks = sorted(p for p in (root / "submission").rglob("*.ipynb")
                       if ".ipynb_checkpoints" not in p.parts)
    (root / "results").mkdir(parents=True, exist_ok=True)
    if not notebooks:
        results = {"score": 0.0, "output": f"No .ipynb file in the submission: upload your "
                   f"{spec.notebook}.", "tests": []}
    else:
        problem = sandbox_problem()
        note = "" if problem is None else (
            f"graded without the bubblewrap sandbox ({problem}); Gradescope's "
            "per-submission container is the boundary")
        if len(notebooks) > 1:
            note = (note + "\n" if note else "") + \
                f"several notebooks submitted; graded {notebooks[0].name}"
        report = grade(lab, notebooks[:1], jobs=1, private=private, trusted=problem is not None)[0]
        results = to_results(report, spec, hidden_visibility=hidden_visibility, note=note)
    results.setdefault("execution_time", int(time.perf_counter() - started))
    _atomic_write(root / "results" / "results.json", json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.labs gradescope", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lab", help="lab id, e.g. lab00")
    parser.add_argument("--out", type=Path, help="folder to write <lab>_gradescope.zip into")
    parser.add_argument("--private", type=Path, help="a .py file with extra CASES (and SEED)")
    parser.add_argument("--hidden-visibility", default="after_published", choices=VISIBILITIES,
                        help="when students see the hidden cases' results")
    parser.add_argument("--run", action="store_true",
                        help="grade the submission (what run_autograder does on Gradescope)")
    parser.add_argument("--root", type=Path, default=None,
                        help=f"the autograder root (default ${ROOT_ENV} or {DEFAULT_ROOT})")
    args = parser.parse_args(argv)
    from utils.labs.spec import load_spec

    try:
        load_spec(args.lab)
    except ValueError as e:
        parser.error(f"lab: {e}")
    if args.private is not None and not args.private.is_file():
        parser.error(f"--private: no such file {str(args.private)!r}")
    if args.run:
        root = args.root or Path(os.environ.get(ROOT_ENV, DEFAULT_ROOT))
        if not (root / "submission").is_dir():
            parser.error(f"--root: {str(root)!r} has no submission folder")
        results = run(args.lab, root, private=args.private,
                      hidden_visibility=args.hidden_visibility)
        print(f"score {results['score']}; results in {root / 'results' / 'results.json'}")
        return 0
    if args.out is None:
        parser.error("--out: give the folder to write the zip into (or --run to grade)")
    if not args.out.is_dir():
        parser.error(f"--out: {str(args.out)!r} is not a folder")
    try:
        path = build_bundle(args.lab, args.out, private=args.private,
                            hidden_visibility=args.hidden_visibility)
    except ValueError as e:
        parser.error(str(e))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
