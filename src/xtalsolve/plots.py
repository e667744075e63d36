"""Figures written by the commands (matplotlib, Agg backend: works without a display)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_patterns(x: np.ndarray, patterns: list[np.ndarray], labels: list[str], path: str | Path,
                  x_label: str = "2theta (degrees)", title: str = "", offset: float = 1.1) -> Path:
    """Stacked patterns, each scaled to its maximum and offset vertically; written as PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 1.2 + 1.1 * len(patterns)))
    for i, (y, label) in enumerate(zip(patterns, labels)):
        scale = float(np.max(y)) or 1.0
        ax.plot(x, y / scale + i * offset, lw=1.0, label=label)
        ax.text(x[-1], i * offset + 0.35, label, ha="right", va="bottom", fontsize=9)
    ax.set_xlabel(x_label)
    ax.set_ylabel("intensity (normalised, offset)")
    ax.set_yticks([])
    ax.set_xlim(float(x[0]), float(x[-1]))
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
