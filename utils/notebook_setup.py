"""The first code cell of every notebook, lab and solution, kept here as the one source.

On Colab it clones the course and installs what Colab lacks, keeping Colab's own CUDA torch;
elsewhere it finds the repository root with pathlib (walking up from the notebook's folder) so
that ``utils`` imports without an absolute path. ``tests/test_setup.py`` checks that
every notebook starts with exactly this cell; ``utils.nbtools.new_notebook`` inserts it.
"""

COURSE_URL = "https://github.com/llm-inference-course/llm-inference-course"

SETUP_CELL = f'''\
# Set-up, the same in every notebook: on Colab, fetch the course and install what Colab lacks
# (keeping Colab's CUDA torch); elsewhere, find the repository root so that `utils` imports.
import pathlib, subprocess, sys
if "google.colab" in sys.modules:
    ROOT = pathlib.Path("/content/llm-inference-course")
    if not ROOT.exists():
        subprocess.run(["git", "clone", "--depth=1", "{COURSE_URL}", str(ROOT)], check=True)
        reqs = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith(("#", "-e", "torch=="))]
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *reqs], check=True)
else:
    ROOT = next(p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]
                if (p / "utils" / "__init__.py").is_file())
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))'''
