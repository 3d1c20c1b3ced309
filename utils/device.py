"""Device choice and clear errors for optional hardware and packages.

Every chapter calls ``pick_device()``: CUDA when a GPU is present, else the CPU, so the same
notebook takes the GPU path on Colab and runs on a laptop. GPU-only steps call
``require_cuda(what)`` and optional libraries ``require_package(name, why)``; both raise an error
that names what is missing and what to do, never a bare traceback from deep inside a library.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch


def pick_device(prefer: str | None = None) -> torch.device:
    """``cuda`` when available (or when ``prefer='cuda'``), otherwise ``cpu``.

    ``prefer='cpu'`` forces the CPU even on a GPU machine; ``prefer='cuda'`` without a GPU raises.
    """
    if prefer not in (None, "cpu", "cuda"):
        raise ValueError(f"prefer must be None, 'cpu' or 'cuda', got {prefer!r}")
    if prefer == "cpu":
        return torch.device("cpu")
    if prefer == "cuda":
        require_cuda("prefer='cuda'")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def has_cuda() -> bool:
    return torch.cuda.is_available()


class MissingGPUError(RuntimeError):
    """Raised by GPU-only helpers on a machine without a CUDA GPU."""


class MissingPackageError(ImportError):
    """Raised when an optional package a step needs is not installed."""


def require_cuda(what: str) -> torch.device:
    """Return the CUDA device, or raise ``MissingGPUError`` naming the step that needs it."""
    if not isinstance(what, str) or not what:
        raise ValueError("what must name the step that needs the GPU")
    if not torch.cuda.is_available():
        raise MissingGPUError(
            f"{what} needs a CUDA GPU, and torch.cuda.is_available() is False on this machine "
            f"(torch {torch.__version__}). Run this step on a GPU machine (Colab: Runtime > Change "
            f"runtime type > GPU); the CPU path of this chapter covers the same idea."
        )
    return torch.device("cuda")


def has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def require_package(name: str, why: str, pip_name: str | None = None):
    """Import and return module ``name``, or raise ``MissingPackageError`` with the pip command."""
    if not has_package(name):
        raise MissingPackageError(
            f"{why} needs the package {name!r}, which is not installed: "
            f"`pip install {pip_name or name}` (or `pip install -r requirements.txt`)"
        )
    return importlib.import_module(name)
