"""Figures and ParaView files: samples, reconstructions (paper, Fig. 2 and 3), forward solutions.

Everything renders off-screen: matplotlib with the Agg backend, pyvista with an Xvfb server it
starts itself when no display is set (``xvfb`` is part of the stack). matplotlib, pyvista and
DOLFINx's writers are imported inside the functions, so ``import fenics_red`` stays light.
Every file is written through :func:`fenics_red.io.atomic_output`. Images follow the convention
of :mod:`fenics_red.raster` (row 0 is the transducer edge, drawn at the top).
"""

from __future__ import annotations

import os
from dataclasses import replace as _replace
from io import BytesIO

import numpy as np

from .io import atomic_output, check_output_path, write_failure
from .raster import ImageGrid, ValueRaster, central_slice, validate_image

__all__ = ["plot_sample", "plot_forward", "plot_comparison", "plot_profiles",
           "plot_uncertainty", "profile_row", "write_xdmf"]


def plot_sample(sample, path: str | os.PathLike, grid: ImageGrid | None = None,
                overwrite: bool = False, title: str | None = None) -> None:
    """Write a PNG of one sample: modulus and mask, clean and noisy ``ux`` and ``uy``.

    Layout: top row modulus ``E`` (inclusion outlines from the mask), clean ``ux``, clean ``uy``;
    bottom row the mask labels, noisy ``ux``, noisy ``uy``. Clean and noisy images of a component
    share one colour scale; a sample without truth (``E`` and ``mask`` ``None``, a real
    measurement) gets a note in their panels. Row 0 of the images (the transducer, ``y = H``)
    is at the top; axes are in the grid's length units. A 3-D sample (volumes on a 3-D ``grid``)
    is drawn on the axial-lateral slice that the evaluation draws (:func:`central_slice`: through
    the inclusions), with ``uz`` as the axial component. The file is written atomically
    (``overwrite`` as in :func:`fenics_red.io.atomic_output`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = grid or ImageGrid.from_shape(np.shape(sample.ux_noisy))
    sigma = tuple(sample.noise_std)
    components = [("lateral ux", sample.ux, sample.ux_noisy, sigma[0]),
                  ("axial uy", sample.uy, sample.uy_noisy, sigma[1])]
    where = ""
    if grid.dim == 3:  # the axial-lateral slice that evaluate draws: (depth, x) at y index j
        j = central_slice(sample.mask, grid.shape)

        def cut(volume):
            return None if volume is None else np.asarray(volume)[:, j, :]

        components = [("lateral ux", cut(sample.ux), cut(sample.ux_noisy), sigma[0]),
                      ("axial uz", cut(sample.uz), cut(sample.uz_noisy), sigma[2])]
        sample = _replace(sample, E=cut(sample.E), mask=cut(sample.mask))
        grid, where = grid.axial_plane(), f", slice y[{j}]"
    extent = (grid.x0, grid.x0 + grid.width, grid.y0, grid.y0 + grid.height)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.2), constrained_layout=True)

    def show(ax, image, name, cmap, vmin=None, vmax=None):
        shown = ax.imshow(image, cmap=cmap, origin="upper", extent=extent, vmin=vmin,
                          vmax=vmax, interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel("x (lateral)")
        ax.set_ylabel(f"{'z' if where else 'y'} (transducer at top)")
        fig.colorbar(shown, ax=ax, shrink=0.85)
        return shown

    if sample.E is not None:
        show(axes[0, 0], sample.E, "modulus E [100 kPa]", "viridis")
    if sample.mask is not None:
        labels = np.asarray(sample.mask)
        if labels.max() > 0 and sample.E is not None:
            axes[0, 0].contour(np.flipud(labels > 0).astype(float), [0.5], colors="white",
                               linewidths=0.8, extent=extent)
        n_labels = max(int(labels.max()), 1)
        show(axes[1, 0], labels, f"mask ({int(labels.max())} inclusion label(s))",
             plt.get_cmap("tab20", n_labels + 1), vmin=-0.5, vmax=n_labels + 0.5)
    for ax, what in ((axes[0, 0], sample.E), (axes[1, 0], sample.mask)):
        if what is None:
            ax.text(0.5, 0.5, "no truth\n(a measurement)", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_axis_off()
    for column, (name, clean, noisy, s) in enumerate(components, start=1):
        both = [a for a in (clean, noisy) if a is not None]
        lo = float(min(np.nanmin(a) for a in both))
        hi = float(max(np.nanmax(a) for a in both))
        cmap = "viridis"
        if lo < 0 < hi:  # a signed field: diverging colours centred on zero
            cmap, hi = "RdBu_r", max(-lo, hi)
            lo = -hi
        if clean is None:  # a measurement: no clean displacement
            axes[0, column].text(0.5, 0.5, f"no clean {name}\n(a measurement)", ha="center",
                                 va="center", transform=axes[0, column].transAxes)
            axes[0, column].set_axis_off()
        else:
            show(axes[0, column], clean, f"clean {name}", cmap, lo, hi)
        label = "measured" if clean is None else "noisy"
        show(axes[1, column], noisy, f"{label} {name} (σ = {s:.3g})", cmap, lo, hi)
    index = getattr(sample, "index", None)
    heading = title or (f"sample {index}" if index is not None else "sample")
    force = float(getattr(sample, "force_std", 0.0) or 0.0)
    fig.suptitle(heading + where + (f", force noise σw = {force:.3g}" if force > 0 else ""))
    try:
        with atomic_output(path, overwrite=overwrite) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def plot_forward(modulus: np.ndarray, ux: np.ndarray, uy: np.ndarray, path: str | os.PathLike,
                 overwrite: bool = True) -> None:
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
    try:
        with atomic_output(path, overwrite=overwrite) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)


_xvfb_started = False


def _pyvista():
    """pyvista, with an off-screen X server started once when there is no display."""
    global _xvfb_started
    import pyvista

    pyvista.OFF_SCREEN = True
    if not os.environ.get("DISPLAY") and not _xvfb_started and os.name == "posix":
        import shutil
        import warnings

        if shutil.which("Xvfb") is None:
            raise RuntimeError("pyvista needs a display or Xvfb to render off-screen; install "
                               "xvfb (it is in docker/packages.txt) or set DISPLAY")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pyvista.start_xvfb(wait=0.5)
        _xvfb_started = True
    return pyvista


def _image_data(pyvista, image: np.ndarray, grid: ImageGrid, name: str):
    """A pyvista ImageData of a nodal image (points at the grid's nodes, y upwards)."""
    hx, hy = grid.spacing
    data = pyvista.ImageData(dimensions=(grid.nx + 1, grid.ny + 1, 1), spacing=(hx, hy, 1.0),
                             origin=(grid.x0, grid.y0, 0.0))
    data.point_data[name] = np.flipud(np.asarray(image, dtype=np.float64)).ravel()
    return data


def _mesh_data(pyvista, values: np.ndarray, mesh, name: str):
    """A pyvista UnstructuredGrid of nodal values on a 2-D triangle mesh (MeshArrays)."""
    points = np.zeros((len(mesh.points), 3))
    points[:, :2] = mesh.points[:, :2]
    cells = np.hstack([np.full((len(mesh.cells), 1), 3), mesh.cells]).ravel()
    types = np.full(len(mesh.cells), pyvista.CellType.TRIANGLE, dtype=np.uint8)
    data = pyvista.UnstructuredGrid(cells, types, points)
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (len(points),) or not np.isfinite(values).all():
        raise ValueError(f"field {name!r} must hold {len(points)} finite nodal values, got "
                         f"shape {values.shape}")
    data.point_data[name] = values
    return data


def plot_comparison(truth: np.ndarray | None, estimates: dict[str, np.ndarray],
                    path: str | os.PathLike, grid: ImageGrid | None = None, *,
                    labels: dict[str, str] | None = None, clim: tuple[float, float] | None = None,
                    units: str = "E [100 kPa]", columns: int | None = None,
                    overwrite: bool = True) -> None:
    """The paper's Fig. 2: the true modulus and each method's estimate on one colour scale.

    ``estimates`` maps a method name to its modulus image (or, with ``grid`` the
    :class:`~fenics_red.domain.MeshArrays` of a 2-D mesh, its nodal values, drawn on the mesh
    itself; of a 3-D mesh, the axial-lateral slice through the middle of its voxel raster);
    ``labels`` (optional) gives each panel
    a subtitle (e.g. its relative RMSE). The colour scale is ``clim`` (default: 0 to the largest
    value of the truth, or of the estimates without truth) and one colour bar with ``units``
    serves every panel. Rendered by pyvista off-screen, written atomically as PNG.
    """
    panels = ([("truth", truth)] if truth is not None else []) + list(estimates.items())
    if not panels:
        raise ValueError("nothing to plot: give a truth or at least one estimate")
    on_mesh = grid is not None and hasattr(grid, "cells")
    if on_mesh and grid.dim == 3:
        raster = ValueRaster(grid)
        j = central_slice(None, raster.grid.shape)
        panels = [(name, raster.image(values)[:, j, :]) for name, values in panels]
        truth = None if truth is None else panels[0][1]
        grid, on_mesh = raster.grid.axial_plane(), False
    first = np.asarray(panels[0][1])
    grid = grid or ImageGrid.from_shape(first.shape)
    if clim is None:
        reference = truth if truth is not None else np.stack([e for _, e in panels])
        clim = (0.0, float(np.max(reference)))
    labels = labels or {}
    pv = _pyvista()
    n = len(panels)
    columns = columns or min(n, 3)
    rows = -(-n // columns)
    # one narrow extra column, spanning all rows, holds the shared colour bar
    plotter = pv.Plotter(off_screen=True, shape=(rows, columns + 1), border=False,
                         col_weights=[1.0] * columns + [0.32],
                         groups=[(np.s_[:], columns)],
                         window_size=(int(360 * (columns + 0.32)), 400 * rows))
    try:
        data = None
        for k, (name, image) in enumerate(panels):
            plotter.subplot(k // columns, k % columns)
            data = (_mesh_data(pv, image, grid, units) if on_mesh else
                    _image_data(pv, validate_image(image, grid.shape, f"image {name!r}"),
                                grid, units))
            plotter.add_mesh(data, scalars=units, cmap="viridis", clim=clim,
                             show_scalar_bar=False)
            text = name if name not in labels else f"{name}\n{labels[name]}"
            plotter.add_text(text, position="upper_edge", font_size=10, color="black")
            plotter.view_xy()
            plotter.camera.zoom(1.15)
        plotter.subplot(0, columns)
        actor = plotter.add_mesh(data.copy(), scalars=units, cmap="viridis", clim=clim,
                                 opacity=0.0, show_scalar_bar=False)
        plotter.add_scalar_bar(title=units, mapper=actor.mapper, n_labels=5, fmt="%.2f",
                               vertical=True, position_x=0.15, position_y=0.15, height=0.7,
                               width=0.45, color="black", title_font_size=14,
                               label_font_size=12)
        plotter.set_background("white")
        png = BytesIO()
        plotter.screenshot(png)  # PNG-encoded into memory
        with atomic_output(path, overwrite=overwrite) as tmp:
            tmp.write_bytes(png.getvalue())
    finally:
        plotter.close()


def profile_row(mask: np.ndarray | None, shape: tuple[int, int]) -> int:
    """The image row of a cross-section through the largest inclusion (its centroid's depth).

    Without a mask (or an empty one) the middle row.
    """
    if mask is None or not np.any(mask):
        return shape[0] // 2
    labels = np.asarray(mask)
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    rows = np.nonzero(labels == values[np.argmax(counts)])[0]
    return int(round(rows.mean()))


def plot_profiles(truth: np.ndarray | None, estimates: dict[str, np.ndarray],
                  path: str | os.PathLike, grid: ImageGrid | None = None, *,
                  row: int | None = None, mask: np.ndarray | None = None,
                  units: str = "E [100 kPa]", overwrite: bool = True) -> int:
    """The paper's Fig. 3: the modulus along one lateral cross-section, truth and estimates.

    ``row`` defaults to :func:`profile_row` of ``mask`` (through the largest inclusion). Returns
    the row used. matplotlib, off-screen, written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ([("truth", truth)] if truth is not None else []) + list(estimates.items())
    if not panels:
        raise ValueError("nothing to plot: give a truth or at least one estimate")
    shape = np.shape(panels[0][1])
    grid = grid or ImageGrid.from_shape(shape)
    row = profile_row(mask, shape) if row is None else int(row)
    if not 0 <= row < shape[0]:
        raise ValueError(f"profile row {row} is outside the image's {shape[0]} rows")
    x = np.linspace(grid.x0, grid.x0 + grid.width, grid.nx + 1)
    depth = grid.height * row / grid.ny
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    for name, image in panels:
        image = validate_image(image, grid.shape, f"image {name!r}")
        style = dict(color="black", linewidth=2.2) if name == "truth" else dict(linewidth=1.4)
        ax.plot(x, image[row], label=name, **style)
    ax.set_xlabel("lateral position x")
    ax.set_ylabel(units)
    ax.set_title(f"cross-section at depth {depth:.3g} (row {row})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    try:
        with atomic_output(path, overwrite=overwrite) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return row


def plot_uncertainty(truth: np.ndarray | None, estimates: dict[str, np.ndarray],
                     stds: dict[str, np.ndarray], path: str | os.PathLike,
                     grid: ImageGrid | None = None, *, units: str = "E [100 kPa]",
                     overwrite: bool = True) -> None:
    """Where an estimate can be trusted: per method (one row each) the estimate, its posterior
    standard deviation ``σ`` (:mod:`fenics_red.uncertainty`) and, with a truth, the standardised
    error ``|E_true − E_est| / σ`` on ``[0, 4]`` with the ±2σ contour and the share of nodes
    inside it in the title. Images ``(ny+1, nx+1)``; matplotlib, off-screen, atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in estimates if m in stds]
    if not methods:
        raise ValueError("nothing to plot: give at least one estimate with its standard deviation")
    shape = np.shape(estimates[methods[0]])
    grid = grid or ImageGrid.from_shape(shape)
    extent = (grid.x0, grid.x0 + grid.width, grid.y0, grid.y0 + grid.height)
    columns = 3 if truth is not None else 2
    fig, axes = plt.subplots(len(methods), columns, figsize=(4.3 * columns, 3.6 * len(methods)),
                             constrained_layout=True, squeeze=False)

    def show(ax, image, title, cmap, vmin=None, vmax=None):
        shown = ax.imshow(image, cmap=cmap, origin="upper", extent=extent, vmin=vmin, vmax=vmax,
                          interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("x (lateral)")
        ax.set_ylabel("y (transducer at top)")
        fig.colorbar(shown, ax=ax, shrink=0.85)

    for row, method in enumerate(methods):
        estimate = validate_image(estimates[method], grid.shape, f"estimate {method!r}")
        std = validate_image(stds[method], grid.shape, f"standard deviation {method!r}")
        show(axes[row, 0], estimate, f"{method}: estimate {units}", "viridis")
        show(axes[row, 1], std, f"{method}: posterior σ {units}", "magma")
        if truth is not None:
            truth = validate_image(truth, grid.shape, "truth")
            z = np.abs(truth - estimate) / np.maximum(std, np.finfo(float).tiny)
            inside = 100.0 * float(np.mean(z <= 2.0))
            show(axes[row, 2], np.minimum(z, 4.0), f"{method}: |error| / σ ({inside:.0f} % ≤ 2)",
                 "coolwarm", 0.0, 4.0)
            axes[row, 2].contour(np.flipud(z), [2.0], colors="black", linewidths=0.6,
                                 extent=extent)
    try:
        with atomic_output(path, overwrite=overwrite) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)


def write_xdmf(fields: dict[str, np.ndarray], path: str | os.PathLike, grid, comm,
               overwrite: bool = True) -> None:
    """Write moduli as P1 functions on their mesh to an XDMF file (ParaView).

    ``grid``: an :class:`ImageGrid` (fields are images) or the
    :class:`~fenics_red.domain.MeshArrays` of a mesh data set (fields hold one value per node in
    its order).

    Collective on ``comm`` (the mesh is distributed over it). DOLFINx writes the ``.xdmf`` and
    its ``.h5`` under a temporary name; rank 0 then moves them into place through
    :func:`fenics_red.io.atomic_output` (the ``.h5`` first), so a failed run leaves no
    half-written output.
    """
    import secrets
    from pathlib import Path

    from dolfinx import fem, io

    from .domain import make_domain
    from .parallel import check_all, on_root
    from .raster import NodeOrder

    path = Path(path)
    if path.suffix != ".xdmf":
        raise ValueError(f"an XDMF output needs the suffix .xdmf, got {str(path)!r}")
    h5 = path.with_suffix(".h5")
    check_all(comm, lambda: [check_output_path(p, overwrite) for p in (path, h5)])
    domain = make_domain(grid, comm)
    msh = domain.mesh
    Q = fem.functionspace(msh, ("Lagrange", 1))
    order = NodeOrder(Q, domain.node_indices(Q), domain.num_file_nodes)
    # one name on every rank, unique among concurrent writers of the folder
    work = path.with_name(f".{path.stem}.{comm.bcast(secrets.token_hex(4), root=0)}.xdmf")

    def publish():
        text = work.read_text().replace(work.with_suffix(".h5").name, h5.name)
        with atomic_output(h5, overwrite) as tmp:
            os.replace(work.with_suffix(".h5"), tmp)
        with atomic_output(path, overwrite) as tmp:
            tmp.write_text(text)

    try:
        try:
            with io.XDMFFile(comm, work, "w") as xdmf:
                xdmf.write_mesh(msh)
                for name, image in fields.items():
                    f = fem.Function(Q, name=name)
                    values = np.asarray(image, dtype=np.float64)
                    if values.shape != domain.value_shape or not np.isfinite(values).all():
                        raise ValueError(f"field {name!r} must hold finite values of shape "
                                         f"{domain.value_shape}, got {values.shape}")
                    order.scatter(values, f.x.array)
                    xdmf.write_function(f)
        except (OSError, RuntimeError) as error:  # HDF5's report does not name the file
            raise write_failure(path, error) from error
        comm.Barrier()
        on_root(comm, publish)
    finally:
        if comm.rank == 0:
            for leftover in (work, work.with_suffix(".h5")):
                leftover.unlink(missing_ok=True)
