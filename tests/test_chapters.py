"""Every chapter found by utils.report has its six files, a working quick report, and keeps the
layout's import rule; a new chapter is found without editing any shared file."""

from __future__ import annotations

import ast
import json
import math
import re
import subprocess
import sys

import pytest

from utils import report
from utils.labs.spec import load_spec
from utils.paths import LABS_DIR, NOTEBOOKS_DIR, REPO_ROOT, SOLUTIONS_DIR

CHAPTERS = report.discover()
UTILS = REPO_ROOT / "utils"
CORE = {"paths", "device", "bench", "metrics", "data", "models", "validation", "plots", "report",
        "nbtools", "notebook_setup", "pytest_plugin"}
MODEL = {"llama"}


def test_the_written_chapters_are_found_by_number_and_both_names():
    assert {n: c.module for n, c in CHAPTERS.items()}.items() >= {
        "00": "roofline", "01": "fusion", "02": "quantization"}.items()
    for number, ch in CHAPTERS.items():
        assert report.resolve(number) == number == report.resolve(str(int(number)))
        assert report.resolve(ch.module) == number == report.resolve(ch.notebook.upper())
    with pytest.raises(ValueError, match="unknown chapter '99'"):
        report.resolve("99")


@pytest.mark.parametrize("number", CHAPTERS)
def test_chapter_has_its_notebook_lab_master_lab_and_spec(number):
    ch = CHAPTERS[number]
    stem = f"lab{number}_{ch.notebook}.ipynb"
    assert (NOTEBOOKS_DIR / f"{number}_{ch.notebook}.ipynb").is_file()
    assert (SOLUTIONS_DIR / stem).is_file() and (LABS_DIR / stem).is_file()
    spec = load_spec(f"lab{number}")
    assert spec.notebook == stem
    assert (REPO_ROOT / "tests" / f"test_{ch.module}.py").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("number", CHAPTERS)
def test_quick_report_runs_and_keeps_its_row_format(number):
    result = report.run([number], quick=True)
    rows = result["chapters"][number]["rows"]
    assert rows and all(list(r) == list(rows[0]) for r in rows)
    numbers = [v for r in rows for v in r.values() if isinstance(v, float)]
    assert numbers and all(math.isfinite(v) for v in numbers)  # missing values are None
    text = json.dumps(report._plain(result), allow_nan=False)  # valid JSON: no NaN, no ""
    assert '""' not in text


def test_report_json_maps_nan_and_empty_to_null():
    assert report._plain({"a": float("nan"), "b": "", "c": [1.5, float("inf")], "d": "x"}) == \
        {"a": None, "b": None, "c": [1.5, None], "d": "x"}
    table = report.format_table([{"a": 1.23456, "b": None}, {"a": 2.0, "b": "yy"}])
    assert table.splitlines()[2].split() == ["1.235", "-"]


def test_report_rejects_rows_of_different_shapes():
    with pytest.raises(ValueError, match="row 1 has keys"):
        report.check_rows("x", [{"a": 1}, {"b": 2}])
    with pytest.raises(TypeError, match="list of dicts"):
        report.check_rows("x", {"a": 1})


def test_a_new_chapter_is_found_without_editing_a_shared_file(tmp_path):
    """What adding chapter 11 takes: its own module with CHAPTER and report_rows (and its own
    notebook); nothing else is edited."""
    utils_dir, nb_dir = tmp_path / "utils", tmp_path / "notebooks"
    utils_dir.mkdir(), nb_dir.mkdir()
    for path in UTILS.glob("*.py"):
        (utils_dir / path.name).write_text(path.read_text())
    before = report.discover(utils_dir, nb_dir)
    (utils_dir / "capstone_demo.py").write_text(
        'CHAPTER = "11"\n\ndef report_rows(quick=False):\n    return [{"x": 1.0}]\n')
    (nb_dir / "11_putting_it_together.ipynb").write_text("{}")
    after = report.discover(utils_dir, nb_dir)
    assert set(after) - set(before) == {"11"}
    assert after["11"].module == "capstone_demo" and after["11"].notebook == "putting_it_together"
    assert report.resolve("putting_it_together", after) == "11"
    (utils_dir / "clash.py").write_text('CHAPTER = "11"\n')
    with pytest.raises(ValueError, match="claimed by both"):
        report.discover(utils_dir, nb_dir)


def _imports(path) -> set[str]:
    """The ``utils.*`` modules a file imports (module level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("utils"):
            if node.module == "utils":
                found |= {f"utils.{a.name}" for a in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("utils")}
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] == "labs":
        return "labs.specs" if len(parts) > 2 and parts[2] == "specs" else "labs"
    name = parts[1] if len(parts) > 1 else ""
    if name in CORE:
        return "core"
    if name in MODEL:
        return "model"
    if name in {c.module for c in CHAPTERS.values()} or module in PARTS:
        return "chapter"
    return "unknown"


ALLOWED = {"core": {"core"}, "model": {"core"}, "chapter": {"core", "model"},
           "labs": {"core", "labs"}, "labs.specs": {"core", "model", "chapter", "labs", "labs.specs"}}


@pytest.mark.parametrize("path", sorted(UTILS.rglob("*.py")), ids=lambda p: str(p.relative_to(UTILS)))
def test_import_rule_of_utils(path):
    """The rule in utils/__init__.py: core imports no chapter; the course model imports core;
    a chapter imports core, the model and earlier chapters (the capstone may import any); the lab
    system imports core, and its specs are the one bridge to chapter modules."""
    module = "utils." + ".".join(path.relative_to(UTILS).with_suffix("").parts)
    module = module.removesuffix(".__init__").removesuffix(".__main__")
    layer = _layer(module)
    if module == "utils":
        return
    assert layer != "unknown", f"{module}: add it to a layer in tests/test_chapters.py"
    allowed = ALLOWED[layer] | ({"chapter"} if module == "utils.capstone" else set())
    imports = _imports(path)
    bad = {m for m in imports if _layer(m) not in allowed and m != "utils"
           and not _earlier_chapter(m, module)}
    assert not bad, f"{module} ({layer}) must not import {sorted(bad)}"


# a chapter whose code outgrows one module splits it: the second module says CHAPTER_PART = "NN"
PARTS = {f"utils.{path.stem}": m.group(1) for path in UTILS.glob("*.py")
         if (m := re.search(r'^CHAPTER_PART = "(\d\d)"', path.read_text(encoding="utf-8"), re.M))}


def _chapter_number(module: str) -> str | None:
    return next((n for n, c in CHAPTERS.items() if f"utils.{c.module}" == module),
                PARTS.get(module))


def _earlier_chapter(imported: str, importer: str) -> bool:
    """A chapter may build on an earlier chapter (04 heals 03's pruned teacher), never on a
    later one, so the chapters still read and run in order."""
    a, b = _chapter_number(imported), _chapter_number(importer)
    return a is not None and b is not None and (a < b or a == b and imported != importer)


def test_the_import_rule_refuses_a_later_chapter():
    assert _earlier_chapter("utils.pruning", "utils.distillation")
    assert not _earlier_chapter("utils.distillation", "utils.pruning")
    assert not _earlier_chapter("utils.pruning", "utils.models")
    assert _earlier_chapter("utils.serving", "utils.kvcache")  # chapter 06's two modules


def test_importing_utils_changes_no_global_setting():
    code = ("import torch; before = (torch.get_num_threads(), torch.get_default_dtype()); "
            "import pkgutil, importlib, utils, utils.labs; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(utils.__path__, 'utils.') "
            "if not m.name.endswith('__main__')]; "
            "assert (torch.get_num_threads(), torch.get_default_dtype()) == before; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
