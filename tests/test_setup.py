"""The set-up promises of the README: one package list, one set-up cell, no machine paths."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from utils.notebook_setup import SETUP_CELL
from utils.paths import REPO_ROOT

NOTEBOOK_DIRS = ("notebooks", "solutions", "labs")


def _requirement_lines(text: str, prefix: str = "") -> list[str]:
    lines = [line.strip()[len(prefix):].strip() for line in text.splitlines()
             if line.strip().startswith(prefix)]
    return [line for line in lines if line and not line.startswith("#")]


def test_environment_yml_installs_exactly_the_requirement_files():
    yml = (REPO_ROOT / "environment.yml").read_text()
    pip_section = yml.split("- pip:", 1)[1]
    assert _requirement_lines(pip_section, prefix="- ") == ["-r requirements-dev.txt"]
    assert "python=3.11" in yml
    dev = _requirement_lines((REPO_ROOT / "requirements-dev.txt").read_text())
    assert dev[0] == "-r requirements.txt"
    runtime = _requirement_lines((REPO_ROOT / "requirements.txt").read_text())
    for tool in ("jupyterlab", "nbval", "pytest", "pytest-xdist", "nbclient"):  # dev only
        assert not any(line.startswith(tool) for line in runtime), tool
        assert any(line.startswith(tool) for line in dev), tool


def test_torch_is_pinned_and_linux_only_packages_carry_markers():
    from packaging.requirements import Requirement

    reqs = {Requirement(line).name: Requirement(line) for line in _requirement_lines(
        (REPO_ROOT / "requirements.txt").read_text()) if not line.startswith("-")}
    assert str(reqs["torch"].specifier) == "==2.13.0"
    env = {"sys_platform": "darwin", "platform_machine": "arm64"}
    assert reqs["triton"].marker is not None and not reqs["triton"].marker.evaluate(env)
    assert reqs["triton"].marker.evaluate({"sys_platform": "linux", "platform_machine": "x86_64"})


def test_ci_runs_the_readme_commands():
    readme, ci = (REPO_ROOT / "README.md").read_text(), (REPO_ROOT / ".ci" / "run").read_text()
    for command in ("python3.11 -m venv .venv && . .venv/bin/activate",
                    "pip install -r requirements-dev.txt", "python -m pytest",
                    "python -m pytest notebooks solutions --isa avx2"):
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


# --------------------------------------------------------------------------- Colab, simulated

MISSING_ON_FAKE_COLAB = ("py_cpuinfo", "torch_pruning")  # dist-info stems the fake Colab lacks
COLAB_RUNNER = """
import json, pathlib, sys, types
sys.modules["google"] = types.ModuleType("google")
sys.modules["google.colab"] = types.ModuleType("google.colab")  # what the set-up cell looks for
cells = [c for c in json.loads(pathlib.Path(sys.argv[1]).read_text())["cells"]
         if c["cell_type"] == "code"]
namespace = {}
for cell in cells[: int(sys.argv[2])]:
    exec("".join(cell["source"]), namespace)
import importlib.metadata as md
print("TORCH", md.version("torch"), "THREADS", namespace["THREADS"], flush=True)
"""


def _fake_colab_site(target):
    """Links to this environment's packages, as the packages Colab has: all but two small ones,
    and torch under another version (Colab's own build), which the set-up cell must keep."""
    import site

    source = next(p for p in map(pathlib.Path, site.getsitepackages())
                  if (p / "torch").is_dir())
    target.mkdir()
    for entry in source.iterdir():
        name = entry.name
        if name.endswith(".pth") or name.startswith("__editable__") or name in ("cpuinfo",
                                                                              "torch_pruning"):
            continue
        if name.endswith(".dist-info") and name.startswith(MISSING_ON_FAKE_COLAB):
            continue
        if name.startswith("torch-") and name.endswith(".dist-info"):
            fake = target / "torch-2.13.0+colab.dist-info"
            shutil.copytree(entry, fake)
            meta = (fake / "METADATA").read_text()
            (fake / "METADATA").write_text(re.sub(r"^Version: .*$", "Version: 2.13.0+colab", meta,
                                                  count=1, flags=re.M))
            continue
        (target / name).symlink_to(entry)


@pytest.mark.slow
def test_colab_setup_cell_keeps_torch_installs_only_what_is_missing_and_runs_the_next_cell(
        tmp_path):
    if subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                      capture_output=True).returncode:
        pytest.skip("needs the repository's git history to clone")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site_dir = pathlib.Path(subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    _fake_colab_site(tmp_path / "colab_site")
    (site_dir / "colab.pth").write_text(str(tmp_path / "colab_site") + "\n")
    probe = subprocess.run([py, "-m", "pip", "install", "--dry-run", "--no-deps", "-q",
                            "py-cpuinfo>=9,<10"], capture_output=True, text=True, timeout=120)
    if probe.returncode:
        pytest.skip(f"no package index reachable to install from: {probe.stderr[-300:]}")
    (tmp_path / "runner.py").write_text(COLAB_RUNNER)
    root = tmp_path / "content" / "llm-inference-course"
    env = {**os.environ, "COURSE_URL": REPO_ROOT.as_uri(), "COURSE_ROOT": str(root),
           "MPLBACKEND": "Agg", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    notebook = REPO_ROOT / "notebooks" / "00_measuring_inference.ipynb"
    run = lambda n: subprocess.run([py, str(tmp_path / "runner.py"), str(notebook), str(n)],  # noqa: E731
                                   cwd=tmp_path, env=env, capture_output=True, text=True,
                                   timeout=600)
    first = run(2)  # the set-up cell, then the notebook's next cell (imports, machine report)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    installing = [line for line in first.stdout.splitlines() if line.startswith("Installing")]
    assert len(installing) == 1, first.stdout
    assert "py-cpuinfo" in installing[0] and "torch-pruning" in installing[0]
    assert "torch==" not in installing[0] and "transformers" not in installing[0]
    assert "TORCH 2.13.0+colab" in first.stdout  # Colab's torch kept
    assert "torch_threads" in first.stdout  # the next cell ran: it prints the machine report
    assert (root / "utils" / "__init__.py").is_file() and (root / ".colab-installed").is_file()
    again = run(1)  # a rerun clones and installs nothing
    assert again.returncode == 0 and "Installing" not in again.stdout \
        and "Cloning" not in again.stdout, again.stdout + again.stderr[-2000:]
