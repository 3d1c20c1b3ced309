"""The batch autograder: full marks for every lab's solution, zero for every blank lab, grading
twice gives the same results, reading and scanning notebooks, the CLI's CSV/JSON and its errors.
Hostile submissions and the sandbox itself: tests/test_sandbox.py."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import pytest

from utils.labs import grade as grading
from utils.labs.grade import GradingError, grade, read_code_cells, static_reference_hits
from utils.labs.spec import Case, all_specs, load_spec
from utils.paths import LABS_DIR, REPO_ROOT, SOLUTIONS_DIR
from utils.labs.sandbox import run_job, sandbox_problem, to_plain

# solutions and blank labs are trusted: where bubblewrap is missing they run without it
TRUSTED = sandbox_problem() is not None


# --------------------------------------------------------------------------- plain values

class _AlwaysEqual:
    def __eq__(self, other):
        return True

    __hash__ = object.__hash__


class _LyingFloat(float):
    def __eq__(self, other):
        return True

    __hash__ = float.__hash__


def test_to_plain_keeps_plain_values_and_never_trusts_objects():
    assert to_plain([1, 2.5, "x", None, True, (3,), {"a": 1}]) == \
        [1, 2.5, "x", None, True, [3], {"a": 1}]
    assert to_plain(float("nan")) == {"__float__": "nan"}
    assert to_plain(_AlwaysEqual()) == {"__unplain__": "_AlwaysEqual"}
    lying = to_plain(_LyingFloat(1.0))
    assert type(lying) is float and lying == 1.0
    assert to_plain({1: 2}) == {"__unplain__": "dict with non-str keys"}
    assert to_plain(list(range(300_000)))[-1] == {"__unplain__":
                                                  "value too large or too deeply nested"}


def test_to_plain_encodes_arrays_and_tensors():
    import numpy as np
    import torch

    assert to_plain(np.arange(4, dtype=np.int32).reshape(2, 2)) == \
        {"__array__": [[0, 1], [2, 3]], "dtype": "int32", "shape": [2, 2]}
    assert to_plain(np.float32(0.5)) == 0.5
    plain = to_plain(torch.tensor([1.0, float("inf")], dtype=torch.bfloat16))
    assert plain == {"__array__": [1.0, {"__float__": "inf"}], "dtype": "bfloat16",
                     "shape": [2]}


# --------------------------------------------------------------------------- reading and scanning

def test_read_code_cells_reports_what_is_wrong(tmp_path):
    bad = tmp_path / "bad.ipynb"
    for content, message in ((b"{oops", "malformed or truncated"), (b"[1, 2]", "no list of cells"),
                             (b"\xff\xfe", "not UTF-8"),
                             (b'{"cells": [{"cell_type": "code", "source": 3}]}', "not text")):
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=message):
            read_code_cells(bad)
    with pytest.raises(ValueError, match="cannot read"):
        read_code_cells(tmp_path / "missing.ipynb")
    bad.write_text(json.dumps({"cells": [{"cell_type": "code", "source": ["a = 1\n", "b"]},
                                         {"cell_type": "markdown", "source": "x"},
                                         {"cell_type": "code", "source": "slow()",
                                          "metadata": {"tags": ["grader-skip"]}}]}))
    assert read_code_cells(bad) == ["a = 1\nb", ""]


def test_cells_are_numbered_as_in_the_notebook(tmp_path):
    nb = tmp_path / "nb.ipynb"
    nb.write_text(json.dumps({"cells": [
        {"cell_type": "markdown", "source": "# title"},
        {"cell_type": "code", "source": "a = 1", "execution_count": 4},
        {"cell_type": "raw", "source": "x"},
        {"cell_type": "code", "source": "b = 2", "execution_count": None}]}))
    cells = grading.read_cells(nb)
    assert [(c.number, c.label) for c in cells] == [(2, "cell 2 (In [4])"), (4, "cell 4")]


def test_static_scan_is_bounded_and_never_raises():
    exercise = load_spec("lab00").exercise("kv_cache_bytes_gqa")
    notes = grading.Notes()
    assert grading.bounded_static_hits(["-" * 100_000 + "1", "%time x\nimport os"],
                                       [exercise], notes) == {"kv_cache_bytes_gqa": []}
    assert grading.bounded_static_hits(["x = 1\n" * 100_000], [exercise], notes) == {}
    assert any("static scan" in n for n in notes.as_list())


@pytest.mark.parametrize("source, hit", [
    ("from utils.roofline import kv_cache_bytes as k\ndef kv_cache_bytes_gqa(*a):\n"
     "    return k(*a)", True),
    ("import utils.roofline as R\ndef kv_cache_bytes_gqa(*a):\n    return R.kv_cache_bytes(*a)",
     True),
    ("def helper(*a):\n    from utils import roofline\n    return roofline.kv_cache_bytes(*a)\n"
     "def kv_cache_bytes_gqa(*a):\n    return helper(*a)", True),
    ("import utils.roofline as R\ndef kv_cache_bytes_gqa(*a):\n"
     "    return getattr(R, 'kv_cache_bytes')(*a)", True),
    ("from utils.roofline import kv_cache_bytes as kv_cache_bytes_gqa", True),
    ("def kv_cache_bytes_gqa(layers, kv, d, t):\n    kv_cache_bytes = 2 * layers * kv * d * t\n"
     "    return kv_cache_bytes", False),
    ("from utils.roofline import kv_cache_bytes\nprint(kv_cache_bytes(1, 1, 1, 1))\n"
     "def kv_cache_bytes_gqa(*a):\n    return 2", False),  # using it elsewhere is fine
])
def test_static_scan_finds_calls_to_the_reference(source, hit):
    exercise = load_spec("lab00").exercise("kv_cache_bytes_gqa")
    assert static_reference_hits([source], exercise) == (["utils.roofline.kv_cache_bytes"]
                                                         if hit else [])


# --------------------------------------------------------------------------- solutions and blanks

@pytest.fixture(scope="module")
def reference_reports():
    reports = {}
    for spec in all_specs():  # the solution and the blank lab side by side, in parallel
        for report in grade(spec.lab, [SOLUTIONS_DIR / spec.notebook, LABS_DIR / spec.notebook],
                            jobs=2, trusted=TRUSTED):
            reports[(spec.lab, Path(report["file"]).parent.name)] = report
    return reports


def test_every_solution_scores_full_marks(reference_reports):
    assert {lab for lab, _ in reference_reports} == {s.lab for s in all_specs()}
    for (lab, kind), report in reference_reports.items():
        if kind == "solutions":
            lost = [x for e in report["exercises"].values() for x in e["lost"]]
            assert report["total"] == report["max_points"], (lab, lost, report["notes"])
            assert report["notes"] == [], report["notes"]


def test_every_blank_lab_scores_zero_with_reasons(reference_reports):
    for (lab, kind), report in reference_reports.items():
        if kind == "labs":
            assert report["total"] == 0, lab
            for exercise in report["exercises"].values():
                assert exercise["points"] == 0 and exercise["lost"]
                assert all(x["reason"] for x in exercise["lost"])
            assert grading.summary_note(report).startswith("no points: ")


def test_grading_twice_gives_identical_results(reference_reports):
    for spec in all_specs():
        again = grade(spec.lab, [SOLUTIONS_DIR / spec.notebook, LABS_DIR / spec.notebook],
                      jobs=2, trusted=TRUSTED)
        for report in again:
            kind = Path(report["file"]).parent.name
            first = reference_reports[(spec.lab, kind)]
            assert report["exercises"] == first["exercises"], spec.lab
            assert report["notes"] == first["notes"]


# --------------------------------------------------------------------------- CLI, errors, private

def test_cli_writes_csv_and_json(tmp_path, capsys):
    solution = SOLUTIONS_DIR / "lab00_measuring_inference.ipynb"
    copy = tmp_path / "alice.ipynb"
    copy.write_bytes(solution.read_bytes())
    (tmp_path / "bob.ipynb").write_bytes((LABS_DIR / "lab00_measuring_inference.ipynb")
                                         .read_bytes())
    out, js = tmp_path / "grades.csv", tmp_path / "grades.json"
    (tmp_path / "carol.ipynb").write_bytes(b"{this is not json")
    args = ["lab00", str(tmp_path), "--out", str(out), "--json", str(js), "--jobs", "2"]
    assert grading.main(args + (["--trusted"] if TRUSTED else [])) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["student"] for r in rows] == ["alice", "bob", "carol"]
    full = str(int(load_spec("lab00").total_points))
    assert rows[0]["total"] == full and rows[1]["total"] == "0" and rows[2]["total"] == "0"
    assert set(rows[0]) == {"student", "total", "max", "notes",
                            *(e.name for e in load_spec("lab00").exercises)}
    assert rows[0]["notes"] == ""
    assert "NotImplementedError" in rows[1]["notes"] and "not a valid notebook" in rows[2]["notes"]
    reports = json.loads(js.read_text())
    assert reports[1]["exercises"]["kv_cache_bytes_gqa"]["lost"][0]["reason"]
    assert "alice" in capsys.readouterr().out


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="lab must look like"):
        load_spec("00")
    with pytest.raises(ValueError, match="no grading spec"):
        load_spec("lab98")
    private = tmp_path / "private.py"
    private.write_text("CASES = {'no_such_exercise': []}\n")
    with pytest.raises(ValueError, match="unknown exercises"):
        grading.prepare(load_spec("lab00"), private)
    with pytest.raises(ValueError, match="jobs must be a positive int"):
        grade("lab00", [], jobs=0, trusted=True)


@pytest.mark.parametrize("extra, fragment", [
    (["--jobs", "0"], "--jobs"), (["--private", "/no/such/cases.py"], "--private"),
    (["--out", "/no/such/folder/g.csv"], "--out"), (["--json", "."], "--json"),
])
def test_cli_errors_name_the_argument(extra, fragment, capsys):
    with pytest.raises(SystemExit) as stop:
        grading.main(["lab00", str(SOLUTIONS_DIR / "lab00_measuring_inference.ipynb"), *extra])
    assert stop.value.code == 2 and fragment in capsys.readouterr().err


def test_cli_errors_for_a_bad_lab_or_path(capsys, tmp_path):
    for argv, fragment in ((["lab98", str(tmp_path)], "lab: no grading spec"),
                           (["lab00", str(tmp_path / "nope.ipynb")], "paths: no such file"),
                           (["lab00", str(tmp_path)], "paths: no .ipynb files")):
        with pytest.raises(SystemExit):
            grading.main(argv)
        assert fragment in capsys.readouterr().err


def test_private_cases_are_added_to_the_hidden_ones(tmp_path):
    private = tmp_path / "private.py"
    private.write_text("from utils.labs.spec import Case\n"
                       "CASES = {'gemv_intensity': [Case((8192, 28672, 0.5))]}\nSEED = 7\n")
    spec = load_spec("lab00")
    _, base_cases = grading.prepare(spec)
    _, more = grading.prepare(spec, private)
    count = lambda cases: sum(c.exercise.name == "gemv_intensity" for c in cases)  # noqa: E731
    assert count(more) == count(base_cases) + 1
    report = grading.grade_file(SOLUTIONS_DIR / spec.notebook, spec, more, trusted=TRUSTED)
    assert report["exercises"]["gemv_intensity"]["points"] == 1


def test_a_sandbox_that_cannot_start_is_the_graders_error():
    # a trusted start-up import that fails: the sandbox never reports ready (this must not
    # depend on how utils is installed, so no path tricks)
    spec = dataclasses.replace(load_spec("lab00"), preimport=("no_such_module_for_this_test",))
    _, cases = grading.prepare(spec)
    with pytest.raises(GradingError, match="did not start"):
        grading.grade_file(SOLUTIONS_DIR / spec.notebook, spec, cases[:1], trusted=TRUSTED)


def test_forged_channel_lines_count_against_the_submission():
    job = {"repo_root": str(REPO_ROOT), "references": [], "preimport": [],
           "cell_timeout_s": 2, "call_timeout_s": 1,
           "cells": [[1, "import os\nfor fd in range(3, 40):\n    try:\n        os.write(fd, "
                         "b'{\"type\": \"result\", \"id\": \"x\", \"value\": 1}\\n')\n"
                         "    except OSError:\n        pass\ndef f():\n    return 2"]],
           "calls": [{"id": "x", "name": "f", "kind": "function", "adapter": None, "args": [],
                      "kwargs": {}}]}
    result = run_job(job, timeout_s=10, memory_mb=1024, trusted=TRUSTED)
    assert result.ready and result.tampered and "unexpected 'result'" in result.tampered
    assert [m for m in result.messages if m["type"] == "result"] == []


def test_output_fields_are_safe_for_spreadsheets_and_consoles():
    assert grading.csv_field("=1+1") == "'=1+1" and grading.csv_field("-x") == "'-x"
    assert grading.csv_field("\tx") == "'\tx" and grading.csv_field("alice") == "alice"
    assert grading.csv_field(3) == 3
    assert grading.safe_text("a\nb\x1b[31m") == "a\\nb\\x1b[31m"
    assert grading.safe_text(os.fsdecode(b"\xe9l\xe8ve")) == "\\xe9l\\xe8ve"
    assert grading.safe_text("\u202eevil") == "\\u202eevil"


def test_student_names_are_unique_and_path_qualified(tmp_path):
    paths = [tmp_path / "x" / "sub" / "alice.ipynb", tmp_path / "y" / "sub" / "alice.ipynb",
             tmp_path / "bob.ipynb", tmp_path / "bob.ipynb"]
    assert grading.student_names(paths) == ["x/sub/alice", "y/sub/alice", "bob", "bob#2"]


def test_outputs_are_written_atomically_over_anything(tmp_path):
    report = {"student": "=evil", "exercises": {"a": {"points": 1.0, "lost": []}}, "total": 1.0,
              "max_points": 2, "notes": ["+note"]}
    fifo = tmp_path / "grades.csv"
    os.mkfifo(fifo)
    grading.write_csv([report], fifo)
    grading.write_json([report], tmp_path / "grades.json")
    assert fifo.is_file() and not fifo.is_fifo()
    assert list(csv.reader(fifo.open())) == [["student", "a", "total", "max", "notes"],
                                             ["'=evil", "1", "1", "2", "'+note"]]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_case_describe_and_points():
    spec = load_spec("lab00")
    assert spec.total_points == sum(e.points for e in spec.exercises) > 0
    assert Case((1, 2), {"b": 3}).describe() == "1, 2, b=3"


def test_tensor_arguments_and_array_comparison():
    import torch

    from utils.labs.spec import array_close, call_with_tensors, tensor_arg

    arg = tensor_arg([[1.0, -2.0], [0.5, 4.0]], "float32")
    got = to_plain(call_with_tensors(lambda x: x * 2, arg))
    expected = to_plain(torch.tensor([[2.0, -4.0], [1.0, 8.0]]))
    assert array_close()(expected, got) is None
    wrong = to_plain(torch.tensor([[2.0, -4.0], [1.0, 9.0]]))
    assert "element 3" in array_close()(expected, wrong)
    assert "shape" in array_close()(expected, to_plain(torch.zeros(4)))
    assert "expected a tensor" in array_close()(expected, 3.0)
    inf = to_plain(torch.tensor([float("inf"), 1.0]))  # an infinity must come back as itself
    assert array_close()(inf, inf) is None
    for got in ([5.0, 1.0], [float("-inf"), 1.0]):
        assert "element 0" in array_close()(inf, to_plain(torch.tensor(got)))
    assert "element 0" in array_close()(to_plain(torch.tensor([5.0, 1.0])), inf)
