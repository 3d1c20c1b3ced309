"""The Gradescope export: ``python -m utils.labs gradescope LAB --out DIR`` builds the zip, and
its ``run_autograder`` grades a submission in a fake ``/autograder`` layout (a temporary folder,
through ``$GRADESCOPE_AUTOGRADER_ROOT``), writing results.json in Gradescope's format."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import zipfile

import pytest

from utils.labs import gradescope
from utils.labs.spec import load_spec
from utils.paths import LABS_DIR, SOLUTIONS_DIR

SPEC = load_spec("lab00")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    private = out / "cases.py"
    private.write_text("from utils.labs.spec import Case\n"
                       "CASES = {'gemv_intensity': [Case((8192, 28672, 0.5))]}\n")
    assert gradescope.main(["lab00", "--out", str(out), "--private", str(private)]) == 0
    return out / "lab00_gradescope.zip"


def _autograder(tmp_path, bundle, notebook: bytes | None):
    root = tmp_path / "autograder"
    (root / "submission").mkdir(parents=True)
    with zipfile.ZipFile(bundle) as zf:
        zf.extractall(root / "source")
    for name in ("run_autograder", "setup.sh"):
        (root / "source" / name).chmod(0o755)
    (root / "run_autograder").write_bytes((root / "source" / "run_autograder").read_bytes())
    if notebook is not None:
        (root / "submission" / "my_lab.ipynb").write_bytes(notebook)
    env = dict(os.environ, **{gradescope.ROOT_ENV: str(root), "COURSE_PYTHON": sys.executable})
    done = subprocess.run(["bash", str(root / "run_autograder")], env=env, capture_output=True,
                          text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((root / "results" / "results.json").read_text()), done.stdout


def test_bundle_holds_what_gradescope_runs(bundle):
    with zipfile.ZipFile(bundle) as zf:
        names = set(zf.namelist())
        assert {"setup.sh", "run_autograder", "requirements-grading.txt", "pyproject.toml",
                "private_cases.py", "utils/labs/grade.py", "utils/labs/sandbox_child.py",
                "utils/labs/specs/lab00.py"} <= names
        assert not any("__pycache__" in n for n in names)
        mode = zf.getinfo("run_autograder").external_attr >> 16
        assert mode & stat.S_IXUSR
        setup = zf.read("setup.sh").decode()
        assert "bubblewrap" in setup and "requirements-grading.txt" in setup
        assert "-e ." not in zf.read("requirements-grading.txt").decode().splitlines()
        assert "--private private_cases.py" in zf.read("run_autograder").decode()


def test_run_autograder_grades_a_solution_in_a_fake_autograder_folder(bundle, tmp_path):
    results, stdout = _autograder(tmp_path, bundle,
                                  (SOLUTIONS_DIR / SPEC.notebook).read_bytes())
    assert results["score"] == SPEC.total_points, results
    for exercise in SPEC.exercises:  # public and hidden cases of each (an MCQ: hidden only)
        assert any(f"({exercise.name}): hidden cases" in t["name"] for t in results["tests"])
    for test in results["tests"]:
        assert set(test) >= {"score", "max_score", "name", "output", "visibility"}
        assert test["score"] == test["max_score"]
        assert test["visibility"] == ("visible" if "public" in test["name"]
                                      else "after_published")
    assert sum(t["max_score"] for t in results["tests"]) == pytest.approx(SPEC.total_points)
    gemv = [t for t in results["tests"] if "gemv_intensity" in t["name"] and "hidden" in t["name"]]
    assert gemv[0]["output"].startswith("6 of 6 hidden cases passed")  # 5 + the private one
    assert f"score {float(SPEC.total_points)}" in stdout


def test_run_autograder_reports_a_blank_lab_and_a_missing_notebook(bundle, tmp_path):
    results, _ = _autograder(tmp_path / "blank", bundle, (LABS_DIR / SPEC.notebook).read_bytes())
    assert results["score"] == 0
    assert all(t["score"] == 0 for t in results["tests"])
    assert "not implemented" in results["tests"][0]["output"]
    results, _ = _autograder(tmp_path / "none", bundle, None)
    assert results["score"] == 0 and "No .ipynb file" in results["output"]


def test_hidden_cases_can_stay_hidden():
    report = {"total": 0.0, "seconds": 1, "notes": [], "exercises": {
        e.name: {"points": 0.0, "cases": 2, "passed": 0, "calls_reference": [],
                 "public": {"passed": 0, "cases": 1}, "hidden": {"passed": 0, "cases": 1},
                 "lost": [{"case": "hidden 1: x", "reason": "expected 3, got 4"}]}
        for e in SPEC.exercises}}
    results = gradescope.to_results(report, SPEC, hidden_visibility="hidden")
    assert {t["visibility"] for t in results["tests"]} == {"visible", "hidden"}


def test_a_lab_that_reads_a_committed_run_is_graded_from_its_bundle(tmp_path):
    """Lab 10 grades PLAN against the capstone's committed run, a file outside utils/: the bundle
    packs it (``LabSpec.repo_files``) and the master scores full marks from the bundle alone."""
    lab10 = load_spec("lab10")
    assert lab10.repo_files
    zipped = gradescope.build_bundle("lab10", tmp_path)
    with zipfile.ZipFile(zipped) as zf:
        assert set(lab10.repo_files) <= set(zf.namelist())
    results, _ = _autograder(tmp_path, zipped, (SOLUTIONS_DIR / lab10.notebook).read_bytes())
    assert results["score"] == lab10.total_points, results


def test_gradescope_errors_name_the_argument(tmp_path, capsys):
    for argv, fragment in ((["lab98", "--out", str(tmp_path)], "lab:"),
                           (["lab00"], "--out"),
                           (["lab00", "--out", str(tmp_path / "missing")], "--out"),
                           (["lab00", "--out", str(tmp_path), "--private", "/no/file.py"],
                            "--private"),
                           (["lab00", "--run", "--root", str(tmp_path)], "--root")):
        with pytest.raises(SystemExit):
            gradescope.main(argv)
        assert fragment in capsys.readouterr().err
