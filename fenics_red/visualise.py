"""Figures of synthetic data set samples (matplotlib, off-screen; imported only when plotting)."""

from __future__ import annotations

import os

import numpy as np

from .grid import ImageGrid
from .io import atomic_output

__all__ = ["plot_sample"]


def plot_sample(sample, path: str | os.PathLike, grid: ImageGrid | None = None,
                overwrite: bool = False, title: str | None = None) -> None:
    """Write a PNG of one sample: modulus and mask, clean and noisy ``ux`` and ``uy``.

    Layout: top row modulus ``E`` (inclusion outlines from the mask), clean ``ux``, clean ``uy``;
    bottom row the mask labels, noisy ``ux``, noisy ``uy``. Clean and noisy images of a component
    share one colour scale. Row 0 of the images (the transducer, ``y = H``) is at the top; axes
    are in the grid's length units. The file is written atomically (``overwrite`` as in
    :func:`fenics_red.io.atomic_output`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = grid or ImageGrid.from_shape(np.shape(sample.E))
    extent = (0.0, grid.width, 0.0, grid.height)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.2), constrained_layout=True)

    def show(ax, image, name, cmap, vmin=None, vmax=None):
        shown = ax.imshow(image, cmap=cmap, origin="upper", extent=extent, vmin=vmin,
                          vmax=vmax, interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel("x (lateral)")
        ax.set_ylabel("y (transducer at top)")
        fig.colorbar(shown, ax=ax, shrink=0.85)
        return shown

    show(axes[0, 0], sample.E, "modulus E [100 kPa]", "viridis")
    labels = np.asarray(sample.mask)
    if labels.max() > 0:
        axes[0, 0].contour(np.flipud(labels > 0).astype(float), [0.5], colors="white",
                           linewidths=0.8, extent=extent)
    n_labels = max(int(labels.max()), 1)
    show(axes[1, 0], labels, f"mask ({int(labels.max())} inclusion label(s))",
         plt.get_cmap("tab20", n_labels + 1), vmin=-0.5, vmax=n_labels + 0.5)
    sigma = tuple(sample.noise_std)
    for column, (name, clean, noisy, s) in enumerate(
            [("lateral ux", sample.ux, sample.ux_noisy, sigma[0]),
             ("axial uy", sample.uy, sample.uy_noisy, sigma[1])], start=1):
        lo = float(min(np.min(clean), np.min(noisy)))
        hi = float(max(np.max(clean), np.max(noisy)))
        cmap = "viridis"
        if lo < 0 < hi:  # a signed field: diverging colours centred on zero
            cmap, hi = "RdBu_r", max(-lo, hi)
            lo = -hi
        show(axes[0, column], clean, f"clean {name}", cmap, lo, hi)
        show(axes[1, column], noisy, f"noisy {name} (σ = {s:.3g})", cmap, lo, hi)
    index = getattr(sample, "index", None)
    heading = title or (f"sample {index}" if index is not None else "sample")
    force = float(getattr(sample, "force_std", 0.0) or 0.0)
    fig.suptitle(heading + (f", force noise σw = {force:.3g}" if force > 0 else ""))
    try:
        with atomic_output(path, overwrite=overwrite) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
