"""Figures of a forward simulation (matplotlib, off-screen)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import atomic_output


def plot_forward(modulus: np.ndarray, ux: np.ndarray, uy: np.ndarray, path: Path) -> None:
    """Modulus and displacement images side by side, row 0 (the transducer) at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), constrained_layout=True)
    for ax, image, title, cmap in [(axes[0], modulus, "modulus E [100 kPa]", "viridis"),
                                   (axes[1], ux, "lateral displacement ux", "RdBu_r"),
                                   (axes[2], uy, "axial displacement uy", "RdBu_r")]:
        shown = ax.imshow(image, cmap=cmap, origin="upper")
        ax.set_title(title)
        ax.set_xlabel("column (lateral)")
        ax.set_ylabel("row (depth)")
        fig.colorbar(shown, ax=ax, shrink=0.85)
    with atomic_output(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
