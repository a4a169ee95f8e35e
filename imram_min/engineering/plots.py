"""Plotting helpers for the notebooks (matplotlib only; no model code).

Every function draws on a matplotlib ``Axes`` the caller gives it and returns what it drew
(an image or a list of artists), so that figures can be laid out freely:

* ``draw_scene``: a synthetic scene (``{split}_scenes.json``) as a 3 x 3 grid of coloured discs.
* ``attention_heatmap``: a matrix of attention weights (query items x context items).
* ``matrix_heatmap``: any small labelled matrix, with the values written in the cells.
* ``plot_log_curves``: a column of ``log.jsonl`` (training log) against the epoch, one line per run.
* ``parity_plot``: y against x with the identity line (e.g. ONNX vs PyTorch similarities).
* ``bar_groups``: grouped bars (e.g. scores per step, recall per model).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

# Size of a drawn object: radius of its disc in grid cells.
SIZE_RADIUS = {"small": 0.17, "medium": 0.24, "large": 0.32}


def draw_scene(ax, objects: Sequence[Mapping], title: str | None = None, grid: int = 3) -> list:
    """Draw a synthetic scene: each object a disc of its colour and size in its grid cell, labelled.

    objects: dicts with "category", "colour", "size" and "cell" = [column, row] (row 0 at the top),
    as in ``{split}_scenes.json``. Returns the list of discs.
    """
    ax.set_xlim(0, grid)
    ax.set_ylim(grid, 0)  # row 0 at the top, as in the data
    ax.set_aspect("equal")
    for k in range(1, grid):
        ax.axhline(k, color="0.85", lw=0.8)
        ax.axvline(k, color="0.85", lw=0.8)
    discs = []
    for obj in objects:
        col, row = obj["cell"]
        radius = SIZE_RADIUS.get(obj["size"], 0.3)
        disc = plt.Circle((col + 0.5, row + 0.42), radius, facecolor=obj["colour"], edgecolor="black", lw=1)
        ax.add_patch(disc)
        discs.append(disc)
        ax.text(col + 0.5, row + 0.86, f"{obj['size']} {obj['colour']} {obj['category']}",
                ha="center", va="center", fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return discs


def attention_heatmap(ax, weights, row_labels: Sequence[str], col_labels: Sequence[str], title: str | None = None,
                      vmax: float | None = 1.0, cmap: str = "viridis", colorbar: bool = False,
                      vmin: float | None = 0.0):
    """Show an attention matrix (rows: query items, columns: context items; each row sums to 1).

    weights: (n_rows, n_cols) array-like (a torch tensor works: it is converted with np.asarray).
    vmin / vmax: the colour range (None: the data's). Returns the image.
    """
    w = np.asarray(weights, dtype=float)
    image = ax.imshow(w, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(len(row_labels)))
    ax.set_yticklabels(row_labels, fontsize=7)
    ax.set_xticks(range(len(col_labels)))
    ax.set_xticklabels(col_labels, fontsize=7, rotation=60, ha="right")
    if title:
        ax.set_title(title, fontsize=9)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return image


def matrix_heatmap(ax, values, row_labels: Sequence[str], col_labels: Sequence[str], title: str | None = None,
                   fmt: str = "{:.2f}", cmap: str = "magma", vmin: float | None = None, vmax: float | None = None,
                   rotation: float = 60):
    """A small labelled matrix with each value written in its cell (x labels turned by ``rotation``
    degrees). Returns the image."""
    v = np.asarray(values, dtype=float)
    image = ax.imshow(v, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    lo, hi = image.get_clim()
    for (r, c), x in np.ndenumerate(v):
        dark = (x - lo) / (hi - lo + 1e-12) < 0.5
        ax.text(c, r, fmt.format(x), ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_yticks(range(len(row_labels)))
    ax.set_yticklabels(row_labels, fontsize=7)
    ax.set_xticks(range(len(col_labels)))
    ax.set_xticklabels(col_labels, fontsize=7, rotation=rotation, ha="right" if rotation else "center")
    if title:
        ax.set_title(title, fontsize=9)
    return image


def plot_log_curves(ax, logs: Mapping[str, Sequence[Mapping]], key: str, ylabel: str | None = None,
                    title: str | None = None) -> list:
    """One line per run: ``entry[key]`` against ``entry["epoch"]`` for the entries of each log.

    logs: {run name: list of log.jsonl entries (dicts)}. Returns the lines.
    """
    lines = []
    for name, entries in logs.items():
        epochs = [e["epoch"] for e in entries]
        lines += ax.plot(epochs, [e[key] for e in entries], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel or key)
    ax.set_xticks(sorted({e["epoch"] for entries in logs.values() for e in entries}))
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if len(logs) > 1:
        ax.legend(fontsize=8)
    return lines


def parity_plot(ax, x, y, xlabel: str, ylabel: str, title: str | None = None, max_points: int = 20000,
                seed: int = 0):
    """Scatter y against x with the line y = x; at most ``max_points`` points (a fixed random subset)."""
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.size > max_points:
        keep = np.random.default_rng(seed).choice(x.size, max_points, replace=False)
        x, y = x[keep], y[keep]
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, zorder=0)
    points = ax.scatter(x, y, s=3, alpha=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title, fontsize=10)
    return points


def bar_groups(ax, groups: Sequence[str], series: Mapping[str, Sequence[float]], ylabel: str | None = None,
               title: str | None = None, fmt: str | None = "{:.2f}") -> list:
    """Grouped bars: one group per name in ``groups``, one bar per series in each group.

    series: {series name: one value per group}. ``fmt`` writes each value above its bar (None: no labels).
    Returns the bar containers.
    """
    n = len(series)
    width = 0.8 / max(n, 1)
    x = np.arange(len(groups))
    containers = []
    for k, (name, values) in enumerate(series.items()):
        bars = ax.bar(x + (k - (n - 1) / 2) * width, values, width, label=name)
        containers.append(bars)
        if fmt:
            ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=7, padding=1)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, fontsize=8)
    ax.margins(y=0.2)  # room for the value labels and the legend
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if n > 1:
        ax.legend(fontsize=8, loc="best")
    ax.grid(axis="y", alpha=0.3)
    return containers
