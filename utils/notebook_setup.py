"""The first code cell of every notebook, lab and solution, kept here as the one source, and the
"Open in Colab" badges, both built from the repository URL in ``pyproject.toml``.

On Colab the cell clones the course, installs only the packages Colab lacks (never torch: Colab's
own CUDA build stays, nor a newer copy of anything Colab already pins), says what it installs,
and marks success only once pip has finished, so a rerun after a failed install tries again.
Elsewhere it finds the repository root with pathlib (walking up from the notebook's folder) so
that ``utils`` imports without an absolute path. Either way it then sets torch's thread count
(``utils.bench.set_threads``: ``$COURSE_THREADS`` if set) and names it ``THREADS``.

``tests/test_setup.py`` checks that every notebook starts with exactly this cell and runs the
Colab branch against a fake ``google.colab`` in a fresh virtual environment;
``python -m utils.nbtools badges`` rewrites the badges from the URL.
"""

from __future__ import annotations

import re
import tomllib

from utils.paths import REPO_ROOT


def _repository_url() -> str:
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["urls"]["Repository"]


COURSE_URL = _repository_url()  # the one setting: [project.urls] Repository in pyproject.toml


def colab_badge(path: str) -> str:
    """Markdown for an "Open in Colab" badge of ``path`` (relative to the repository root)."""
    match = re.match(r"https://github\.com/([^/]+/[^/]+?)(?:\.git)?/?$", COURSE_URL)
    if not match:
        raise ValueError(f"[project.urls] Repository must be a https://github.com/OWNER/REPO URL "
                         f"for Colab badges, got {COURSE_URL!r}")
    return (f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"(https://colab.research.google.com/github/{match.group(1)}/blob/main/{path})")


SETUP_CELL = f'''\
# Set-up, the same in every notebook. On Colab: fetch the course and install only what Colab
# lacks (Colab's own torch stays). Elsewhere: find the repository root so that `utils` imports.
import os, pathlib, subprocess, sys
if "google.colab" in sys.modules:
    ROOT = pathlib.Path(os.environ.get("COURSE_ROOT", "/content/llm-inference-course"))
    if not (ROOT / "utils" / "__init__.py").is_file():
        print("Cloning the course ...", flush=True)
        url = os.environ.get("COURSE_URL", "{COURSE_URL}")
        subprocess.run(["git", "clone", "--depth=1", url, str(ROOT)], check=True)
    if not (ROOT / ".colab-installed").is_file():
        from importlib.metadata import PackageNotFoundError, distribution
        from packaging.requirements import Requirement
        missing = []
        for line in (ROOT / "requirements.txt").read_text().splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith(("#", "-")):
                continue
            req = Requirement(line)
            if req.name == "torch" or (req.marker and not req.marker.evaluate()):
                continue
            try:
                distribution(req.name)  # installed: keep Colab's version
            except PackageNotFoundError:
                missing.append(line)
        if missing:
            print("Installing what Colab lacks (a minute or two):", ", ".join(missing), flush=True)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
        (ROOT / ".colab-installed").touch()  # only after pip succeeded: a rerun retries
else:
    ROOT = next(p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]
                if (p / "utils" / "__init__.py").is_file())
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from utils.bench import set_threads
THREADS = set_threads()  # $COURSE_THREADS if set, else torch's default; every timing records it'''
