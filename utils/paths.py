"""Paths resolved from the repository root, found from this file with pathlib.

Nothing here depends on the working directory, so notebooks, labs, tests and scripts all
find the same files wherever they are started from.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
MODELS_DIR = REPO_ROOT / "models"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
LABS_DIR = REPO_ROOT / "labs"
SOLUTIONS_DIR = REPO_ROOT / "solutions"
