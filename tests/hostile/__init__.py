"""Hostile lab 00 submissions, built from the master notebook by ``build_all(folder)``.

Each entry: a file name, how to make it from the solution (or the blank lab), the total it must
score (written out of the original 12 points: what it loses), and fragments that must appear in its grading report (reasons and notes).
They are generated rather than committed so that they follow the master when it changes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import nbformat

from utils.labs.spec import load_spec
from utils.paths import LABS_DIR, SOLUTIONS_DIR

SPEC = load_spec("lab00")
SOLUTION = SOLUTIONS_DIR / SPEC.notebook
BLANK = LABS_DIR / SPEC.notebook


def _code(source: str):
    return nbformat.v4.new_code_cell(source)


def _replace_body(nb, name: str, body: str):
    """Replace the body of the master cell defining ``name`` (keeping its def line)."""
    for cell in nb.cells:
        if cell.cell_type == "code" and f"def {name}(" in cell.source:
            header = cell.source.split("### BEGIN SOLUTION")[0].rstrip(" ")
            cell.source = header + "\n".join("    " + line for line in body.strip().split("\n"))
            return nb
    raise KeyError(name)


def _index(nb, fragment: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if fragment in c.source)


def _insert_after(nb, fragment: str, source: str):
    nb.cells.insert(_index(nb, fragment) + 1, _code(source))
    return nb


EVIL_EQ = '''
class Always:
    def __eq__(self, other):
        return True
    __hash__ = object.__hash__
    def __float__(self):
        return 0.0
return Always()
'''

FLOAT_EQ = '''
class Liar(float):
    def __eq__(self, other):
        return True
    __hash__ = float.__hash__
return Liar(1.0)
'''

UNSTOPPABLE = '''
while True:
    try:
        while True:
            pass
    except BaseException:
        pass
'''

FLOOD = '''
import os, sys
for _ in range(100_000):
    print("spam " * 40)
os.write(1, b"x" * (8 * 2**20))
sys.stderr.write("e" * (4 * 2**20))
'''

MONKEYPATCH = '''
import utils.labs.check, utils.labs.grade, utils.labs.spec as base
utils.labs.check.check = lambda *a, **k: print("all checks pass!")
utils.labs.grade._score = lambda *a, **k: {"matmul_intensity": {"points": 12}}
base.close = lambda *a, **k: (lambda expected, got: None)
'''

FORGE = '''
import json, os
for name in ("grades.csv", "grades.json", "score.json"):
    with open(name, "w") as f:
        f.write("student,total\\nme,12\\n")
for target in (REPO_GRADES, "/tmp/grades.json"):
    try:
        with open(target, "w") as f:
            f.write('{"total": 12}')
    except PermissionError as e:
        print("blocked:", e)
fake = json.dumps({"token": "0" * 32, "type": "result", "id": "matmul_intensity#0",
                   "value": 341.3333333333333, "refs": []}) + "\\n"
for fd in range(1, 30):
    try:
        os.write(fd, fake.encode())
    except OSError:
        pass
print('{"total": 12, "max": 12}')
'''

REFERENCE_KV = '''
if hidden_size % num_heads or num_heads % num_kv_heads:
    raise ValueError("shapes do not divide")
from utils.roofline import kv_cache_bytes
return kv_cache_bytes(num_layers, num_kv_heads, hidden_size // num_heads, seq_len,
                      batch_size, bytes_per_value)
'''

KEPT_ORIGINAL_SETUP = "import utils.roofline as _R\n_KEEP = _R.kv_cache_bytes  # kept before grading"

KEPT_ORIGINAL = '''
if hidden_size % num_heads or num_heads % num_kv_heads:
    raise ValueError("shapes do not divide")
return _KEEP(num_layers, num_kv_heads, hidden_size // num_heads, seq_len, batch_size,
             bytes_per_value)
'''

REFERENCE_OBFUSCATED = '''
import importlib
module = importlib.import_module("utils." + "roof" + "line")
return getattr(module, "arithmetic_" + "intensity")(m, k, n, bytes_per_value)
'''


def _solution():
    return nbformat.read(SOLUTION, as_version=4)


def _blank():
    return nbformat.read(BLANK, as_version=4)


def _with_mcq(nb, answer):
    i = _index(nb, "ANSWER_DECODE_BOUND = None")
    nb.cells[i].source = f'ANSWER_DECODE_BOUND = "{answer}"'
    return nb


def _deleted(nb):
    del nb.cells[_index(nb, "def kv_cache_bytes_gqa(")]
    return nb


def _duplicated(nb):
    cells = []
    for c in nb.cells:
        cells.append(c)
        if c.cell_type == "code" and "Set-up" not in c.source:
            twin = copy.deepcopy(c)
            twin.id = f"{c.id}-twin"
            cells.append(twin)
    nb.cells = cells
    return nb


# name -> (builder, expected total, fragments that must appear in the JSON report)
CASES = {
    "eq_always_true": (lambda: _replace_body(_solution(), "decode_tokens_per_second", EVIL_EQ),
                       10, ["an object of type Always"]),
    "float_subclass_eq": (lambda: _replace_body(_solution(), "decode_tokens_per_second",
                                                FLOAT_EQ), 10, ["expected 71.4286, got 1"]),
    "sys_exit_cell": (lambda: _insert_after(_solution(), "check(matmul_intensity)",
                                            "import sys\nsys.exit(0)"), 12, ["SystemExit"]),
    "sys_exit_in_function": (lambda: _replace_body(_solution(), "gemv_intensity",
                                                   "import sys\nsys.exit(1)"), 11,
                             ["raised SystemExit"]),
    "os_exit_cell": (lambda: _insert_after(_solution(), "check(gemv_intensity)",
                                           "import os\nos._exit(0)"), 12,
                     ["exited early with code 0", "graded again without that cell"]),
    "os_exit_in_function": (lambda: _replace_body(_solution(), "kv_cache_bytes_gqa",
                                                  "import os\nos._exit(3)"), 9,
                            ["exited early with code 3",
                             "an earlier case of this function ended the process"]),
    "endless_loop_in_function": (lambda: _replace_body(_solution(), "measure_latency",
                                                       "while True:\n    pass"), 9,
                                 ["timed out after 1 s", "an earlier case of this function "
                                  "timed out"]),
    "endless_loop_unstoppable": (lambda: _insert_after(_solution(), "check(kv_cache_bytes_gqa)",
                                                       UNSTOPPABLE), 12,
                                 ["wall-clock limit", "graded again without that cell"]),
    "big_allocation_cell": (lambda: _insert_after(_solution(), "check(matmul_intensity)",
                                                  "blob = bytearray(4 * 2**30)"), 12,
                            ["MemoryError"]),
    "big_allocation_in_function": (lambda: _replace_body(_solution(), "decode_tokens_per_second",
                                                         "blob = bytearray(4 * 2**30)\n"
                                                         "return 1.0"), 10,
                                   ["raised MemoryError"]),
    "print_flood": (lambda: _insert_after(_solution(), "check(matmul_intensity)", FLOOD), 12, []),
    "deleted_cell": (lambda: _deleted(_solution()), 9, ["`kv_cache_bytes_gqa` is not defined"]),
    "duplicated_cells": (lambda: _duplicated(_solution()), 12, []),
    "monkeypatch_checks": (lambda: _insert_after(_blank(), "from utils.labs.check import check",
                                                 MONKEYPATCH), 0,
                           ["not implemented: the stub still raises NotImplementedError"]),
    "forged_score_file": (lambda: _insert_after(_blank(), "from utils.labs.check import check",
                                                FORGE), 0, ["result channel"]),
    "calls_reference": (lambda: _replace_body(_solution(), "kv_cache_bytes_gqa", REFERENCE_KV),
                        9, ["reference implementation (utils.roofline.kv_cache_bytes)"]),
    "calls_kept_original": (lambda: _insert_after(
        _replace_body(_solution(), "kv_cache_bytes_gqa", KEPT_ORIGINAL),
        "from utils.labs.check import check", KEPT_ORIGINAL_SETUP), 9,
        ["reference implementation (utils.roofline.kv_cache_bytes)"]),
    "calls_reference_obfuscated": (lambda: _replace_body(_solution(), "matmul_intensity",
                                                         REFERENCE_OBFUSCATED), 9,
                                   ["reference implementation (utils.roofline."
                                    "arithmetic_intensity)"]),
    "network_and_signals": (lambda: _insert_after(
        _solution(), "check(matmul_intensity)",
        "import os, socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n"
        "except OSError as e:\n    print(e)\nos.kill(os.getppid(), 0)"), 12,
        ["signalling other processes"]),
    "wrong_mcq": (lambda: _with_mcq(_solution(), "a"), 11, ["'a' is not the right answer"]),
}

# Raw files that are not notebooks at all.
RAW = {
    "malformed": (b"{this is not json", 0, ["not a valid notebook"]),
    "truncated": (None, 0, ["malformed or truncated"]),  # the solution cut in half
}


def build_all(folder: Path, repo_grades: Path) -> dict[str, tuple[int, list[str]]]:
    """Write every hostile submission into ``folder``; returns name -> (total, fragments)."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    full = SPEC.total_points
    for name, (build, total, fragments) in CASES.items():
        total = 0 if total == 0 else full - (12 - total)  # totals above: points lost out of 12
        nb = build()
        text = nbformat.writes(nb).replace("REPO_GRADES", repr(str(repo_grades)))
        (folder / f"{name}.ipynb").write_text(text, encoding="utf-8")
        expected[name] = (total, fragments)
    for name, (data, total, fragments) in RAW.items():
        if data is None:
            whole = SOLUTION.read_bytes()
            data = whole[: len(whole) // 2]
        (folder / f"{name}.ipynb").write_bytes(data)
        expected[name] = (total, fragments)
    return expected


def report_text(report: dict) -> str:
    return json.dumps(report)
