"""The batch autograder: full marks for solutions, zero for blank labs, hostile submissions cost
only what they broke, determinism, the CLI's CSV/JSON, and the sandbox's plain-value channel."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest

from utils.labs import grade as grading
from utils.labs.grade import GradingError, grade, read_code_cells, static_reference_hits
from utils.labs.spec import Case, all_specs, load_spec
from utils.paths import LABS_DIR, REPO_ROOT, SOLUTIONS_DIR
from utils.labs.sandbox import run_job, to_plain

FAST = {"timeout_s": 15, "cell_timeout_s": 2, "call_timeout_s": 1}  # hostile code hits limits


def _hostile():
    path = Path(__file__).parent / "hostile" / "__init__.py"
    spec = importlib.util.spec_from_file_location("hostile_submissions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_ipython_magics_become_no_ops():
    assert "get_ipython()" in grading.to_python("%time x = 1\n!ls")


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
        for report in grade(spec.lab, [SOLUTIONS_DIR / spec.notebook, LABS_DIR / spec.notebook]):
            reports[(spec.lab, Path(report["file"]).parent.name)] = report
    return reports


def test_every_solution_scores_full_marks(reference_reports):
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


def test_grading_is_deterministic(reference_reports):
    again = grade("lab00", [SOLUTIONS_DIR / "lab00_measuring_inference.ipynb",
                            LABS_DIR / "lab00_measuring_inference.ipynb"])
    for report in again:
        kind = Path(report["file"]).parent.name
        assert report["exercises"] == reference_reports[("lab00", kind)]["exercises"]


# --------------------------------------------------------------------------- hostile submissions

@pytest.fixture(scope="module")
def hostile_reports(tmp_path_factory):
    hostile = _hostile()
    folder = tmp_path_factory.mktemp("hostile")
    repo_grades = REPO_ROOT / "grades_forged_by_a_student.json"
    expected = hostile.build_all(folder, repo_grades)
    reports = grade("lab00", sorted(folder.glob("*.ipynb")), jobs=2, **FAST)
    assert not repo_grades.exists(), "a submission wrote into the repository"
    return expected, {r["student"]: r for r in reports}


def test_every_attack_is_in_the_hostile_set():
    names = set(_hostile().CASES) | set(_hostile().RAW)
    for attack in ("eq_always_true", "sys_exit_cell", "os_exit_cell", "endless_loop_in_function",
                   "endless_loop_unstoppable", "big_allocation_cell", "print_flood", "malformed",
                   "truncated", "deleted_cell", "duplicated_cells", "monkeypatch_checks",
                   "forged_score_file", "calls_reference"):
        assert attack in names


@pytest.mark.parametrize("name", sorted(set(_hostile().CASES) | set(_hostile().RAW)))
def test_hostile_submission_costs_only_what_it_broke(hostile_reports, name):
    expected, reports = hostile_reports
    total, fragments = expected[name]
    report = reports[name]
    text = json.dumps(report)
    lost = [(n, x["reason"]) for n, e in report["exercises"].items() for x in e["lost"]]
    assert math.isclose(report["total"], total), (report["total"], lost, report["notes"])
    for fragment in fragments:
        assert fragment in text, (fragment, lost, report["notes"])


def test_print_flood_is_capped(hostile_reports):
    report = hostile_reports[1]["print_flood"]
    assert report["output"]["stdout_chars"] > 5_000_000
    assert len(report["output"]["stdout_head"]) <= 500


def test_wrong_mcq_reason_does_not_reveal_the_answer(hostile_reports):
    reasons = [x["reason"] for x in
               hostile_reports[1]["wrong_mcq"]["exercises"]["ANSWER_DECODE_BOUND"]["lost"]]
    assert reasons and not any("'b'" in r for r in reasons)


# --------------------------------------------------------------------------- CLI, errors, private

def test_cli_writes_csv_and_json(tmp_path, capsys):
    solution = SOLUTIONS_DIR / "lab00_measuring_inference.ipynb"
    copy = tmp_path / "alice.ipynb"
    copy.write_bytes(solution.read_bytes())
    (tmp_path / "bob.ipynb").write_bytes((LABS_DIR / "lab00_measuring_inference.ipynb")
                                         .read_bytes())
    out, js = tmp_path / "grades.csv", tmp_path / "grades.json"
    assert grading.main(["lab00", str(tmp_path), "--out", str(out), "--json", str(js)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["student"] for r in rows] == ["alice", "bob"]
    assert rows[0]["total"] == "12" and rows[1]["total"] == "0"
    assert set(rows[0]) == {"student", "total", "max", *(e.name for e in
                                                         load_spec("lab00").exercises)}
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


def test_private_cases_are_added_to_the_hidden_ones(tmp_path):
    private = tmp_path / "private.py"
    private.write_text("from utils.labs.spec import Case\n"
                       "CASES = {'gemv_intensity': [Case((8192, 28672, 0.5))]}\nSEED = 7\n")
    spec = load_spec("lab00")
    _, base_cases = grading.prepare(spec)
    _, more = grading.prepare(spec, private)
    count = lambda cases: sum(c.exercise.name == "gemv_intensity" for c in cases)  # noqa: E731
    assert count(more) == count(base_cases) + 1
    report = grading.grade_file(SOLUTIONS_DIR / spec.notebook, spec, more)
    assert report["exercises"]["gemv_intensity"]["points"] == 1


def test_a_sandbox_that_cannot_start_is_the_graders_error():
    # a trusted start-up import that fails: the sandbox never reports ready (this must not
    # depend on how utils is installed, so no path tricks)
    spec = dataclasses.replace(load_spec("lab00"), preimport=("no_such_module_for_this_test",))
    _, cases = grading.prepare(spec)
    with pytest.raises(GradingError, match="did not start"):
        grading.grade_file(SOLUTIONS_DIR / spec.notebook, spec, cases[:1])


def test_forged_channel_lines_are_ignored():
    job = {"repo_root": str(REPO_ROOT), "references": [], "preimport": [],
           "cell_timeout_s": 2, "call_timeout_s": 1,
           "cells": [[1, "import os\nfor fd in range(3, 40):\n    try:\n        os.write(fd, "
                         "b'{\"type\": \"result\", \"id\": \"x\", \"value\": 1}\\n')\n"
                         "    except OSError:\n        pass\ndef f():\n    return 2"]],
           "calls": [{"id": "x", "name": "f", "kind": "function", "adapter": None, "args": [],
                      "kwargs": {}}]}
    result = run_job(job, timeout_s=10, memory_mb=1024)
    values = [m["value"] for m in result.messages if m["type"] == "result"]
    assert values == [2] and result.done


def test_case_describe_and_points():
    spec = load_spec("lab00")
    assert spec.total_points == 12
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
