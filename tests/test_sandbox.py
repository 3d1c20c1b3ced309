"""The grading sandbox against hostile submissions (issue 10), for every lab, plus the pieces of
the sandbox's child and the result channel's protocol.

One batch per lab, through the command line with ``--jobs 2``: honest classmates, one submission
per attack class (tests/hostile/attacks.py) and, for lab 00, the older hostile set
(tests/hostile/__init__.py) and file names built to break the output files. Each test then checks
one promise: honest classmates keep full marks, each attack costs only its own submission,
nothing outside the sandbox changed, nothing secret reached any output, both files were written.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import math
import os
import site
import stat
import sys
from pathlib import Path

import nbformat
import pytest

from utils.labs import grade as grading
from utils.labs import sandbox, sandbox_child
from utils.labs.spec import all_specs
from utils.paths import REPO_ROOT, SOLUTIONS_DIR

NO_SANDBOX = sandbox.sandbox_problem()
needs_sandbox = pytest.mark.skipif(NO_SANDBOX is not None,
                                   reason=f"no bubblewrap sandbox here: {NO_SANDBOX}")
LABS = [s.lab for s in all_specs()]
LIMITS = {"lab00": {"timeout_s": 15, "cell_timeout_s": 2, "call_timeout_s": 1,
                    "startup_s": 10},
          "default": {"timeout_s": 15, "cell_timeout_s": 5, "call_timeout_s": 3,
                      "startup_s": 10}}
NASTY_NAMES = ["=HYPERLINK(\"x\")", "+cmd", "new\nline\x1b[31mred", "tab\there"]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


HOSTILE_DIR = Path(__file__).parent / "hostile"
attacks = _load("hostile_attacks", HOSTILE_DIR / "attacks.py")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _site_packages() -> Path:
    return Path(site.getsitepackages()[0])


# --------------------------------------------------------------------------- one batch per lab

@pytest.fixture(scope="module", params=LABS)
def batch(request, tmp_path_factory, monkeypatch_module):
    if NO_SANDBOX is not None:
        pytest.skip(f"no bubblewrap sandbox here: {NO_SANDBOX}")
    lab = request.param
    spec = next(s for s in all_specs() if s.lab == lab)
    root = tmp_path_factory.mktemp(f"batch-{lab}")
    folder, canary, outdir = root / "submissions", root / "canary", root / "grader"
    for d in (folder, canary, outdir):
        d.mkdir()
    secret = f"{attacks.SECRET_PREFIX}{os.urandom(6).hex()}"
    private = outdir / "private_cases.py"
    private.write_text(f"# {secret}-private\nCASES = {{}}\n")
    private.chmod(0o600)
    instructor = outdir / "gradebook.txt"
    instructor.write_text("instructor's notes\n")
    instructor.chmod(0o644)
    out, js = outdir / "grades.csv", outdir / "grades.json"
    os.mkfifo(out)  # a FIFO at --out must not hang the grader
    ctx = attacks.Context(folder=folder, canary=canary, classmate=folder / "alice.ipynb", out=out,
                          json=js, private=private, utils_init=REPO_ROOT / "utils" / "__init__.py",
                          site_packages=_site_packages(), instructor=instructor,
                          secrets=(secret,))
    expected = attacks.build_lab_batch(lab, ctx)
    alice = nbformat.read(ctx.classmate, as_version=4)  # a classmate's secret, as a comment
    alice.cells.append(nbformat.v4.new_code_cell(f"# {secret}-classmate"))
    nbformat.write(alice, ctx.classmate)
    extra_paths = []
    if lab == "lab00":
        legacy = _load("hostile_lab00", HOSTILE_DIR / "__init__.py")
        repo_grades = REPO_ROOT / "grades_forged_by_a_student.json"
        for name, (total, fragments) in legacy.build_all(folder, repo_grades).items():
            expected[name] = attacks.Expect(total, fragments=tuple(fragments))
        solution = (SOLUTIONS_DIR / spec.notebook).read_bytes()
        for name in NASTY_NAMES:
            (folder / f"{name}.ipynb").write_bytes(solution)
        (Path(os.fsdecode(os.fsencode(folder) + b"/\xe9l\xe8ve.ipynb"))).write_bytes(solution)
        for sub in ("x", "y"):
            (root / sub / "sub").mkdir(parents=True)
            (root / sub / "sub" / "carol.ipynb").write_bytes(solution)
            extra_paths.append(str(root / sub / "sub" / "carol.ipynb"))
    monkeypatch_module.setenv("GRADER_TOKEN", f"{secret}-environment")
    watched = {p: _digest(p) for p in [ctx.classmate, private]}  # utils/: others edit it
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [instructor, private]}
    site_before = sorted(os.listdir(ctx.site_packages))
    limits = dict(LIMITS.get(lab, LIMITS["default"]))
    argv = [lab, str(folder), *extra_paths, "--out", str(out), "--json", str(js), "--jobs", "2",
            "--private", str(private)]
    code = grading.main(argv, **limits)
    return {"lab": lab, "spec": spec, "ctx": ctx, "expected": expected, "code": code,
            "watched": watched, "modes": modes, "site_before": site_before, "limits": limits,
            "reports": {r["student"]: r for r in json.loads(js.read_text())}}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_the_batch_completes_with_both_files(batch):
    assert batch["code"] == 0
    ctx = batch["ctx"]
    assert stat.S_ISREG(ctx.out.stat().st_mode) and stat.S_ISREG(ctx.json.stat().st_mode)
    rows = list(csv.DictReader(ctx.out.open(encoding="utf-8")))
    assert len(rows) == len(batch["reports"]) and "notes" in rows[0]
    assert not [p for p in ctx.out.parent.iterdir() if p.name.endswith(".tmp")]


def test_honest_classmates_keep_full_marks(batch):
    full = batch["spec"].total_points
    for name in ("alice", "bob"):
        report = batch["reports"][name]
        assert report["total"] == full, (name, report["notes"])
        assert report["sandbox"] == "bwrap"


def test_each_attack_costs_only_its_own_submission(batch):
    failures = []
    for name, expect in batch["expected"].items():
        report = batch["reports"][name]
        text = json.dumps(report)
        lost = [(n, x["reason"]) for n, e in report["exercises"].items() for x in e["lost"]]
        if expect.at_most is not None:
            ok = report["total"] <= expect.at_most
        else:
            ok = math.isclose(report["total"], expect.total)
        missing = [f for f in expect.fragments if f not in text]
        if not ok or missing:
            failures.append((name, report["total"], missing, lost[:3], report["notes"][:4]))
        if expect.max_seconds is not None and report["seconds"] > expect.max_seconds:
            failures.append((name, "too slow", report["seconds"]))
    assert not failures, failures


def test_a_submission_cannot_hold_its_slot(batch):
    limits = batch["limits"]
    bound = 2 * limits["timeout_s"] + limits["startup_s"] + 2 * (limits["timeout_s"]
                                                                  + limits["startup_s"])
    slow = {n: r["seconds"] for n, r in batch["reports"].items() if r["seconds"] > bound}
    assert not slow, slow


def test_nothing_outside_the_sandbox_changed(batch):
    ctx = batch["ctx"]
    assert list(ctx.canary.iterdir()) == []
    for path, digest in batch["watched"].items():
        assert _digest(path) == digest, path
    for path, mode in batch["modes"].items():
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    assert "HOSTILE-APPEND" not in ctx.utils_init.read_text()
    assert not (ctx.site_packages / "zz_hostile.pth").exists()
    new = set(os.listdir(ctx.site_packages)) - set(batch["site_before"])  # others install too
    assert not [n for n in new if n.endswith(".pth")], new
    assert not (REPO_ROOT / "grades_forged_by_a_student.json").exists()
    assert "me,999" not in ctx.out.read_text(encoding="utf-8")
    assert "\nforged\n" not in "\n" + ctx.out.read_text(encoding="utf-8")


def test_no_secret_reaches_any_output(batch, capsys):
    ctx = batch["ctx"]
    texts = [ctx.out.read_text(encoding="utf-8"), ctx.json.read_text(encoding="utf-8")]
    for secret in ctx.secrets:
        for text in texts:
            assert secret not in text and attacks.SECRET_PREFIX not in text
    report = batch["reports"]["reads_secrets"]
    assert "LEAKS: []" in report.get("output", {}).get("stdout_head", ""), report


def test_escapes_were_blocked_not_ignored(batch):
    head = batch["reports"]["escape_processes"]["output"]["stdout_head"]
    assert "blocked: fork_exec" in head and "ESCAPED" not in head, head
    head = batch["reports"]["writes_outside"]["output"]["stdout_head"]
    assert "blocked: dir_fd overwrite" in head and "ESCAPED" not in head, head


def test_cell_notes_name_cells_as_the_learner_sees_them(batch):
    notes = batch["reports"]["many_error_cells"]["notes"]
    assert len(notes) <= grading.MAX_NOTES + 1
    assert any(n.startswith("cell ") and "ZeroDivisionError" in n for n in notes), notes
    assert notes[-1].startswith("... and ")


def test_output_names_are_unique_escaped_and_not_formulas(batch, capsys):
    if batch["lab"] != "lab00":
        pytest.skip("file names are tested once, on lab00's batch")
    names = list(batch["reports"])
    assert len(set(names)) == len(names)
    assert any(n.endswith("x/sub/carol") for n in names) and \
        any(n.endswith("y/sub/carol") for n in names)
    assert "\\xe9l\\xe8ve" in names
    assert all(not any(ord(c) < 32 for c in n) for n in names)
    rows = list(csv.reader(batch["ctx"].out.open(encoding="utf-8")))
    students = [r[0] for r in rows[1:]]
    assert "'=HYPERLINK(\"x\")" in students and "'+cmd" in students
    assert not any(s.startswith(("=", "+", "-", "@", "\t", "\r")) for s in students)
    assert all(r[-1] == "" or not r[-1].startswith(("=", "+", "-", "@")) for r in rows[1:])
    for r in batch["reports"].values():
        if r["student"].startswith("=HYPER"):
            assert r["total"] == batch["spec"].total_points


# --------------------------------------------------------------------------- refusing without one

def test_without_a_sandbox_batch_grading_refuses_naming_what_to_install(monkeypatch, tmp_path,
                                                                        capsys):
    monkeypatch.setattr(sandbox, "bwrap_path", lambda: None)
    sandbox.sandbox_problem.cache_clear()
    try:
        with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install bubblewrap"):
            grading.grade("lab00", [SOLUTIONS_DIR / "lab00_measuring_inference.ipynb"])
        code = grading.main(["lab00", str(SOLUTIONS_DIR / "lab00_measuring_inference.ipynb"),
                             "--out", str(tmp_path / "g.csv")])
        assert code == 2 and not (tmp_path / "g.csv").exists()
        err = capsys.readouterr().err
        assert "bubblewrap" in err and "--trusted" in err
    finally:
        sandbox.sandbox_problem.cache_clear()


def test_trusted_mode_grades_without_a_sandbox(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "bwrap_path", lambda: None)
    sandbox.sandbox_problem.cache_clear()
    try:
        mine = tmp_path / "me.ipynb"
        mine.write_bytes((SOLUTIONS_DIR / "lab00_measuring_inference.ipynb").read_bytes())
        assert grading.main(["lab00", str(mine), "--trusted", "--json",
                             str(tmp_path / "g.json")]) == 0
        report = json.loads((tmp_path / "g.json").read_text())[0]
        assert report["total"] == report["max_points"] and report["sandbox"] == "none (trusted)"
    finally:
        sandbox.sandbox_problem.cache_clear()


# --------------------------------------------------------------------------- the protocol

def _lines(*events) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in events)


READY, DONE = {"type": "ready"}, {"type": "done"}


def test_protocol_accepts_the_real_order_and_a_cut_last_line():
    data = _lines(READY, {"type": "cell_start", "index": 3},
                  {"type": "cell_end", "index": 3, "error": None},
                  {"type": "call_start", "id": "f#0"},
                  {"type": "result", "id": "f#0", "value": 1, "refs": []}, DONE)
    events, problem = sandbox.check_protocol(data + b'{"type": "res', [3], ["f#0"])
    assert problem is None and [e["type"] for e in events][-1] == "done"


@pytest.mark.parametrize("events, fragment", [
    ([{"type": "result", "id": "f#0", "value": 1}], "before the sandbox was ready"),
    ([READY, {"type": "call_start", "id": "f#1"}], "out of order"),
    ([READY, {"type": "call_start", "id": "f#0"},
      {"type": "result", "id": "f#0", "value": 1, "refs": []},
      {"type": "result", "id": "f#0", "value": 2, "refs": []}], "unexpected 'result'"),
    ([READY, {"type": "call_start", "id": "f#0"},
      {"type": "result", "id": "f#0", "value": 1, "error": {"kind": "timeout", "seconds": 1}}],
     "malformed result"),
    ([READY, {"type": "call_start", "id": "f#0"},
      {"type": "result", "id": "f#0", "error": {"kind": "timeout", "seconds": "x"}}],
     "malformed result"),
    ([READY, {"type": "pause"}], "unexpected 'pause'"),
    ([READY, DONE], "unexpected 'done'"),
])
def test_protocol_counts_extra_duplicated_or_malformed_lines(events, fragment):
    events_ok, problem = sandbox.check_protocol(_lines(*events), [], ["f#0", "f#1"])
    assert problem and fragment in problem


def test_protocol_counts_lines_that_are_not_json():
    problem = sandbox.check_protocol(_lines(READY) + b"not json\n", [], [])[1]
    assert problem == "line 2 of the result channel is not JSON"


def test_seccomp_program_is_well_formed():
    program = sandbox.seccomp_program("x86_64")
    assert program and len(program) % 8 == 0 and len(program) // 8 < 255
    assert sandbox.seccomp_program("sparc") is None
    assert sandbox.seccomp_program("aarch64")


# --------------------------------------------------------------------------- the child's pieces

def test_channel_sends_json_lines_whatever_the_student_replaced(monkeypatch):
    read_fd, write_fd = os.pipe()
    channel = sandbox_child.Channel(write_fd)
    monkeypatch.setattr(os, "write", lambda *a: 0)
    monkeypatch.setattr(json, "dumps", lambda *a, **k: "forged")
    channel.send("result", id="x", value=float("nan"))
    os.close(write_fd)
    line = os.read(read_fd, 1000)
    os.close(read_fd)
    assert json.loads(line) == {"type": "result", "id": "x", "value": {"__unplain__":
                                                                        "unencodable"}}


def test_cells_keep_their_source_for_inspect_as_in_ipython():
    """``@triton.jit`` (and anything else that calls ``inspect.getsource``) needs a cell's
    source; the child registers it with linecache as IPython does."""
    import inspect

    namespace = {}
    exec(sandbox_child.compile_cell("def kernel(x):\n    return x + 1\n", 7), namespace)
    assert inspect.getsource(namespace["kernel"]) == "def kernel(x):\n    return x + 1\n"


def test_capped_text_keeps_the_head_and_counts_everything():
    out = sandbox_child.CappedText(cap=5)
    out.write("hello world")
    out.write(3)
    assert out.getvalue() == "hello" and out.total == 12


def test_disabled_reference_raises_for_every_alias(tmp_path, monkeypatch):
    module = tmp_path / "refmod_for_test.py"
    module.write_text("def ref(x):\n    return x * 2\n\ndef helper(x):\n    return ref(x) + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import refmod_for_test as m

    kept = m.ref
    import math

    original_sqrt = math.sqrt
    disabled, wrapped = sandbox_child.disable_references(
        ["refmod_for_test.ref", "math.sqrt", "refmod_for_test.missing"], ())
    assert disabled == {"refmod_for_test.ref"} and set(wrapped) == {"math.sqrt"}
    for call in (lambda: m.ref(1), lambda: kept(1), lambda: m.helper(1)):
        with pytest.raises(Exception, match="reference implementation"):
            call()
    import math as _math

    sandbox_child.RECORD.names, sandbox_child.RECORD.active = [], True
    try:
        assert _math.sqrt(4.0) == 2.0
    finally:
        sandbox_child.RECORD.active = False
        monkeypatch.setattr(_math, "sqrt", original_sqrt)
    assert sandbox_child.RECORD.names == ["math.sqrt"]


def test_make_call_reports_values_errors_and_missing_names():
    limiter = sandbox_child.Limiter()
    namespace = {"ok": lambda x: x + 1, "boom": lambda: 1 / 0,
                 "slow": lambda: [None for _ in iter(int, 1)]}
    call = lambda name, *args: {"id": "x", "name": name, "kind": "function",  # noqa: E731
                                "adapter": None, "args": list(args), "kwargs": {}}
    plain, name = sandbox.to_plain, sandbox._type_name
    assert sandbox_child.make_call(call("ok", 1), namespace, {}, limiter, 1, plain, name)[0] \
        == {"value": 2}
    error = sandbox_child.make_call(call("boom"), namespace, {}, limiter, 1, plain, name)[0]
    assert error["error"]["name"] == "ZeroDivisionError" and "ArithmeticError" in \
        error["error"]["bases"]
    assert sandbox_child.make_call(call("nope"), namespace, {}, limiter, 1, plain, name)[0] == \
        {"error": {"kind": "missing", "name": "nope"}}
    assert sandbox_child.make_call(call("slow"), namespace, {}, limiter, 0.2, plain,
                                   name)[0]["error"]["kind"] == "timeout"


def test_path_checks_resolve_dir_fd_and_descriptors(tmp_path):
    inside = str(tmp_path / "work") + os.sep
    os.mkdir(inside)
    outside_fd = os.open(str(tmp_path), os.O_RDONLY)
    inside_fd = os.open(inside, os.O_RDONLY)
    try:
        assert sandbox_child.path_is_outside("a.txt", outside_fd, inside)
        assert not sandbox_child.path_is_outside("a.txt", inside_fd, inside)
        assert sandbox_child.path_is_outside(outside_fd, None, inside)
        assert not sandbox_child.path_is_outside(inside + "x", None, inside)
    finally:
        os.close(outside_fd)
        os.close(inside_fd)


def test_ipython_rewrite_happens_in_the_child():
    assert "get_ipython()" in sandbox_child.to_python("%time x = 1\n!ls")
    assert sandbox_child.to_python("x = 1") == "x = 1"
    assert grading.needs_ipython("a = 1\n  %time b") and not grading.needs_ipython("a % b")


def test_print_flood_is_capped(batch):
    report = batch["reports"]["print_flood"]
    assert report["output"]["stdout_chars"] > 1_000_000
    assert len(report["output"]["stdout_head"]) <= 500


def test_wrong_mcq_reason_does_not_reveal_the_answer(batch):
    if batch["lab"] != "lab00":
        pytest.skip("lab00's multiple-choice item")
    reasons = [x["reason"] for x in
               batch["reports"]["wrong_mcq"]["exercises"]["ANSWER_DECODE_BOUND"]["lost"]]
    assert reasons and not any("'b'" in r for r in reasons)


def test_every_attack_class_is_in_the_batch(batch):
    for attack in ("escape_processes", "writes_outside", "reads_secrets", "forged_channel",
                   "spec_expected_helpers", "marker_return_values", "parser_memory_error",
                   "many_magics", "many_error_cells", "print_flood", "fake_pause_then_hang"):
        assert attack in batch["reports"]


def test_run_cells_and_run_calls_send_the_protocol_the_parent_checks():
    read_fd, write_fd = os.pipe()
    channel, limiter = sandbox_child.Channel(write_fd), sandbox_child.Limiter()
    namespace = sandbox_child.new_namespace()
    cells = [[2, "def f(x):\n    return x * 2"], [5, "1 / 0"], [7, "%time y = 1"]]
    calls = [{"id": f"f#{i}", "name": "f", "kind": "function", "adapter": None, "args": [i],
              "kwargs": {}} for i in range(2)]
    channel.send("ready")
    sandbox_child.run_cells(cells, namespace, channel, limiter, 2, sandbox._type_name)
    sandbox_child.run_calls(calls, namespace, {}, channel, limiter, 1, sandbox.to_plain,
                            sandbox._type_name)
    channel.send("done")
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 65536):
        data += chunk
    os.close(read_fd)
    events, problem = sandbox.check_protocol(data, [2, 5, 7], ["f#0", "f#1"])
    assert problem is None
    ends = [e for e in events if e["type"] == "cell_end"]
    assert ends[0]["error"] is None and ends[1]["error"]["name"] == "ZeroDivisionError"
    assert ends[2]["error"] is None  # the magic ran as a no-op
    assert [e["value"] for e in events if e["type"] == "result"] == [0, 2]


def test_second_line_fences_hold_without_the_sandbox(tmp_path):
    """The audit hook alone (trusted mode, no bubblewrap): dir_fd and descriptor forms of
    writes, chmod and utime, mkfifo/mknod are refused. Targets are temporary copies."""
    targets = tmp_path / "targets"
    (targets / "site").mkdir(parents=True)
    mate, init, instructor = targets / "mate.ipynb", targets / "init.py", targets / "book.txt"
    for p in (mate, init, instructor):
        p.write_text("original\n")
    instructor.chmod(0o644)
    before = {p: (p.read_text(), stat.S_IMODE(p.stat().st_mode), p.stat().st_mtime_ns)
              for p in (mate, init, instructor)}
    canary = targets / "canary"
    canary.mkdir()
    source = attacks.WRITES.format(canary=str(canary), out=str(targets / "grades.csv"),
                                   classmate=str(mate), utils_init=str(init),
                                   site=str(targets / "site"), instructor=str(instructor))
    job = {"repo_root": str(REPO_ROOT), "references": [], "preimport": [], "lab": None,
           "cell_timeout_s": 5, "call_timeout_s": 1, "cells": [[1, source]], "calls": []}
    result = sandbox.run_job(job, timeout_s=20, memory_mb=1024, trusted=True)
    assert result.done and not result.tampered, result.output
    head = [m for m in result.messages if m["type"] == "done"][0]["stdout"]
    assert "ESCAPED" not in head and "blocked: dir_fd overwrite" in head, head
    after = {p: (p.read_text(), stat.S_IMODE(p.stat().st_mode), p.stat().st_mtime_ns)
             for p in (mate, init, instructor)}
    assert after == before
    assert sorted(os.listdir(targets)) == ["book.txt", "canary", "init.py", "mate.ipynb", "site"]
    assert list(canary.iterdir()) == [] and list((targets / "site").iterdir()) == []
