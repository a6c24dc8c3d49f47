"""Small matplotlib helpers shared by the experiment programs (Agg backend: no display).

The figures of the paper compare runs that differ only in the truncation depth K, so the
helpers give every K the same color in every figure of a program (full RMD in black).
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # the programs run headless (CI, servers): never open a window.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.common.run_state import write_atomically  # noqa: E402

__all__ = ["label_axes", "plot_curve", "plt", "save_figure", "semilogy_curves", "truncation_colors",
           "truncation_label"]

SPARSE_POINTS = 40  # curves with at most this many points get a marker at each


def truncation_colors(truncations: Sequence[int], steps: int) -> dict[int, tuple]:
    """One color per K (viridis, small K dark), black for K = T (full RMD)."""
    partial = sorted(k for k in set(truncations) if k < steps)
    cmap = plt.get_cmap("viridis")
    colors = {k: cmap(0.85 * i / max(1, len(partial) - 1)) for i, k in enumerate(partial)}
    if steps in truncations:
        colors[steps] = (0.0, 0.0, 0.0, 1.0)
    return colors


def truncation_label(truncate: int, steps: int) -> str:
    """Legend label: "K=5" or "K=100 (full RMD)"."""
    return f"K={truncate} (full RMD)" if truncate >= steps else f"K={truncate}"


def semilogy_curves(
    ax,
    curves: Mapping[str, Sequence[float]],
    *,
    x: Optional[Sequence[float]] = None,
    colors: Optional[Mapping[str, tuple]] = None,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
) -> None:
    """Plots each named curve on a log y-axis. Non-positive or non-finite values (e.g. an error
    that is exactly 0) cannot be shown on a log axis and are left out rather than clipped."""
    for name, values in curves.items():
        values = np.asarray(values, dtype=np.float64)
        xs = np.arange(1, len(values) + 1) if x is None else np.asarray(x, dtype=np.float64)
        keep = np.isfinite(values) & (values > 0)
        color = None if colors is None else colors.get(name)
        ax.semilogy(xs[keep], values[keep], label=name, color=color, lw=1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)


def plot_curve(ax, x: Sequence[float], y: Sequence[float], *, log: bool = False, **kwargs) -> None:
    """One line, with a marker at each point when it has few (sparse samples read as points,
    not as a smooth curve); on a log axis, non-positive and non-finite values are left out."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(y) & ((y > 0) if log else True)
    kwargs.setdefault("lw", 1.4)
    if np.count_nonzero(keep) <= SPARSE_POINTS:
        kwargs.setdefault("marker", "o")
        kwargs.setdefault("ms", 3.5)
    (ax.semilogy if log else ax.plot)(x[keep], y[keep], **kwargs)


def label_axes(ax, xlabel: str, ylabel: str, title: str = "", legend: bool = True) -> None:
    """Axis labels, title, grid, and a legend of the labelled lines placed where they leave room."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=9, loc="best")


def save_figure(fig, path: str, dpi: int = 130) -> str:
    """Writes `fig` as PNG to `path` (creating its folder), closes it, returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    write_atomically(path, lambda temporary: fig.savefig(temporary, dpi=dpi, format="png"))
    plt.close(fig)
    return path
