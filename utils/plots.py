"""Matplotlib helpers every chapter reuses, so plots look alike across the course.

Each returns the ``(fig, ax)`` it drew so a notebook can add to it; none calls ``plt.show()``
(Jupyter shows the figure at the end of the cell).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt


def line_plot(x: Sequence[float], series: Mapping[str, Sequence[float]], *, xlabel: str,
              ylabel: str, title: str = "", logx: bool = False, logy: bool = False, ax=None):
    """One line per entry of ``series`` against the shared ``x`` (baseline first)."""
    if not series:
        raise ValueError("series must hold at least one named line")
    for name, ys in series.items():
        if len(ys) != len(x):
            raise ValueError(f"series {name!r} has {len(ys)} points but x has {len(x)}")
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6.4, 4))
    for name, ys in series.items():
        ax.plot(x, ys, marker="o", label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig, ax


def bar_plot(values: Mapping[str, float], *, ylabel: str, title: str = "", ax=None,
             annotate: str = "{:.2f}"):
    """Bars labelled by the keys of ``values``, each annotated with its value."""
    if not values:
        raise ValueError("values must not be empty")
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6.4, 4))
    bars = ax.bar(list(values), list(values.values()), color="tab:blue")
    ax.bar_label(bars, labels=[annotate.format(v) for v in values.values()])
    ax.set(ylabel=ylabel, title=title)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig, ax


def roofline_plot(peak_flops: float, bandwidth: float,
                  points: Mapping[str, tuple[float, float]], *, title: str = "Roofline", ax=None):
    """The roofline of Williams et al. (2009): attainable FLOP/s = min(peak, bandwidth x AI).

    ``points`` maps a name to ``(arithmetic intensity in FLOP/byte, achieved FLOP/s)``.
    """
    import numpy as np

    if peak_flops <= 0 or bandwidth <= 0:
        raise ValueError("peak_flops and bandwidth must be positive")
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6.4, 4.4))
    intensities = [ai for ai, _ in points.values()] or [1.0]
    lo, hi = min(0.1, min(intensities) / 2), max(1e3, max(intensities) * 2)
    ai = np.logspace(np.log10(lo), np.log10(hi), 200)
    ax.loglog(ai, np.minimum(peak_flops, bandwidth * ai) / 1e9, "k-", label="roofline")
    ridge = peak_flops / bandwidth
    ax.axvline(ridge, color="grey", ls=":", label=f"ridge point {ridge:.1f} FLOP/B")
    for name, (x, y) in points.items():
        ax.loglog([x], [y / 1e9], "o", ms=8, label=name)
    ax.set(xlabel="arithmetic intensity (FLOP/byte)", ylabel="GFLOP/s", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig, ax
