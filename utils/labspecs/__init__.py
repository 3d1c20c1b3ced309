"""Grading specs, one module per lab (``lab00.py`` ...), each defining ``SPEC``; see ``base``."""

from utils.labspecs.base import Case, Exercise, LabSpec, all_specs, load_spec

__all__ = ["Case", "Exercise", "LabSpec", "all_specs", "load_spec"]
