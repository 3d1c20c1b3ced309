"""The set-up promises of the README: one package list, one set-up cell, no machine paths."""

import json
import re

import pytest

from utils.notebook_setup import SETUP_CELL
from utils.paths import REPO_ROOT

NOTEBOOK_DIRS = ("notebooks", "solutions", "labs")


def _requirement_lines(text: str, prefix: str = "") -> list[str]:
    lines = [line.strip()[len(prefix):].strip() for line in text.splitlines()
             if line.strip().startswith(prefix)]
    return [line for line in lines if line and not line.startswith("#")]


def test_environment_yml_lists_the_same_packages_and_pins_as_requirements():
    requirements = _requirement_lines((REPO_ROOT / "requirements.txt").read_text())
    yml = (REPO_ROOT / "environment.yml").read_text()
    pip_section = yml.split("- pip:", 1)[1]
    conda_pip = _requirement_lines(pip_section, prefix="- ")
    assert sorted(conda_pip) == sorted(requirements)
    assert "python=3.11" in yml


def test_torch_is_pinned_to_the_cpu_build_version():
    assert "torch==2.13.0" in _requirement_lines((REPO_ROOT / "requirements.txt").read_text())


def test_ci_runs_the_readme_commands():
    readme, ci = (REPO_ROOT / "README.md").read_text(), (REPO_ROOT / ".ci" / "run").read_text()
    for command in ("python3.11 -m venv .venv && . .venv/bin/activate",
                    "pip install -r requirements.txt", "python -m pytest"):
        assert command in readme and command in ci, command


def _notebooks():
    return sorted(p for d in NOTEBOOK_DIRS for p in (REPO_ROOT / d).glob("*.ipynb"))


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_starts_with_the_shared_setup_cell_and_holds_no_machine_paths(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "".join(code_cells[0]["source"]) == SETUP_CELL, "first code cell must be SETUP_CELL"
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"/(work|root|home|tmp)/\w", "".join(
        "".join(c["source"]) for c in nb["cells"])), "absolute machine path in a cell"
    assert len(text) < 2_000_000, "keep images and data in files"
    if path.parent.name != "labs":  # labs are saved without outputs, on purpose
        assert any(c.get("execution_count") for c in code_cells), "saved without outputs"
        errors = [o for c in code_cells for o in c.get("outputs", [])
                  if o.get("output_type") == "error"
                  and "raises-exception" not in c.get("metadata", {}).get("tags", [])]
        assert not errors, "a saved output is an unexpected error"
