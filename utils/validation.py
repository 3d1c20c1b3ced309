"""Argument checks every chapter uses, so bad input always reads the same way:
``"<name> must be <what was expected>, got <what came>"``, naming the argument."""

from __future__ import annotations

import math

import torch


def check_positive_int(name: str, value) -> int:
    """``value`` if it is an int >= 1 (not a bool), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_positive_ints(**values) -> None:
    """``check_positive_int`` on each keyword: ``check_positive_ints(m=m, k=k, n=n)``."""
    for name, value in values.items():
        check_positive_int(name, value)


def check_positive(**values) -> None:
    """Each keyword must be a finite number > 0 (int or float, not a bool)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                or math.isinf(value):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_int_range(name: str, value, low: int, high: int) -> int:
    """``value`` if it is an int in [low, high], else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return value


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_callable(name: str, value) -> None:
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")


def check_tensor(name: str, value, *, floating: bool = False,
                 nonempty: bool = False) -> torch.Tensor:
    """``value`` if it is a torch.Tensor (floating-point / non-empty when asked), else an error
    naming ``name`` and what came instead."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if nonempty and value.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")
    return value
