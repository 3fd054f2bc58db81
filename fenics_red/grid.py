"""Image grids, their meshes, and exact conversions between nodal values and images.

The solver works with nodal values of P1 functions distributed over MPI ranks; users, datasets and
the denoiser work with images. This module is the one place where the two meet.

Image convention (documented in the README):

* an image of nodal values has shape ``(ny + 1, nx + 1)``;
* row 0 is the transducer edge (the top of the domain, ``y = H``) and depth grows with the row
  index, so row ``i`` lies at ``y = H - i * H / ny``;
* column 0 is the left edge (``x = 0``), column ``j`` lies at ``x = j * W / nx``.

The conversions are exact round trips (values are copied, never interpolated) on any number of
ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from dolfinx import fem, mesh

__all__ = ["ImageGrid", "NodalImage", "validate_image"]


@dataclass(frozen=True)
class ImageGrid:
    """A rectangle ``[0, width] x [0, height]`` split into ``nx x ny`` cells.

    Each cell is cut into two P1 triangles, so the mesh vertices coincide with the image pixels.
    """

    nx: int
    ny: int
    width: float = 1.0
    height: float = 1.0

    def __post_init__(self):
        for name in ("nx", "ny"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"ImageGrid.{name} must be a positive integer, got {value!r}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"ImageGrid.{name} must be a positive number, got {value!r}")

    @classmethod
    def from_shape(cls, shape: tuple[int, ...], width: float | None = None,
                   height: float | None = None) -> ImageGrid:
        """The grid whose nodal images have ``shape == (ny + 1, nx + 1)``.

        Missing sizes give square cells: ``width`` defaults to 1 and ``height`` to
        ``width * ny / nx``.
        """
        if len(shape) != 2 or shape[0] < 2 or shape[1] < 2:
            raise ValueError(
                f"a nodal image must be 2-D with at least 2 x 2 pixels, got shape {tuple(shape)}")
        ny, nx = int(shape[0]) - 1, int(shape[1]) - 1
        if width is None and height is None:
            width = 1.0
        if height is None:
            height = width * ny / nx
        if width is None:
            width = height * nx / ny
        return cls(nx, ny, float(width), float(height))

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of an image of nodal values: ``(ny + 1, nx + 1)``."""
        return (self.ny + 1, self.nx + 1)

    @property
    def spacing(self) -> tuple[float, float]:
        """Cell size ``(hx, hy)``."""
        return (self.width / self.nx, self.height / self.ny)

    def create_mesh(self, comm: MPI.Comm) -> mesh.Mesh:
        """A distributed triangle mesh of the rectangle whose vertices are the image pixels."""
        return mesh.create_rectangle(
            comm,
            [np.array([0.0, 0.0]), np.array([self.width, self.height])],
            [self.nx, self.ny],
            mesh.CellType.triangle,
            diagonal=mesh.DiagonalType.right,
        )

    def pixel_index(self, points: np.ndarray) -> np.ndarray:
        """Flat image index (row-major) of each point (rows of ``points``) on the grid's nodes."""
        hx, hy = self.spacing
        cols = np.rint(points[:, 0] / hx).astype(np.int64)
        rows = np.rint((self.height - points[:, 1]) / hy).astype(np.int64)
        if (cols.min(initial=0) < 0 or cols.max(initial=0) > self.nx
                or rows.min(initial=0) < 0 or rows.max(initial=0) > self.ny):
            raise ValueError("points lie outside the image grid")
        return rows * (self.nx + 1) + cols


def validate_image(image, shape: tuple[int, int] | None = None, name: str = "image",
                   positive: bool = False) -> np.ndarray:
    """Check that ``image`` is a finite 2-D float array (of ``shape``, if given).

    Raises ``ValueError`` with a message that says what is wrong and what was expected.
    """
    array = np.asarray(image)
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D image of shape (ny+1, nx+1), got {array.ndim}-D shape "
            f"{array.shape}")
    if shape is not None and array.shape != tuple(shape):
        raise ValueError(f"{name} has shape {array.shape}, expected {tuple(shape)} (ny+1, nx+1)")
    bad = ~np.isfinite(array)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite value(s) (NaN or inf), first at row {i}, "
            f"column {j}")
    if positive and not (array > 0).all():
        i, j = np.argwhere(array <= 0)[0]
        raise ValueError(
            f"{name} must be strictly positive everywhere; found {array[i, j]!r} at row {i}, "
            f"column {j} (minimum {array.min()!r})")
    return np.ascontiguousarray(array, dtype=np.float64)


class NodalImage:
    """Exact map between a P1 function space (scalar or vector) and images on an :class:`ImageGrid`.

    Every rank gets the whole image from :meth:`to_images` (an ``Allreduce`` of disjoint owned
    values, hence exact), and :meth:`from_images` fills owned and ghost values directly from the
    image, so no scatter is needed.
    """

    def __init__(self, V: fem.FunctionSpace, grid: ImageGrid):
        self.V = V
        self.grid = grid
        self.comm = V.mesh.comm
        index_map = V.dofmap.index_map
        self.block_size = V.dofmap.index_map_bs
        self.num_owned = index_map.size_local
        self.num_local = index_map.size_local + index_map.num_ghosts
        points = V.tabulate_dof_coordinates()[: self.num_local]
        self._pixels = grid.pixel_index(points)
        n_pixels = int(np.prod(grid.shape))
        counts = np.zeros(n_pixels, dtype=np.int64)
        np.add.at(counts, self._pixels[: self.num_owned], 1)
        self.comm.Allreduce(MPI.IN_PLACE, counts, op=MPI.SUM)
        if not (counts == 1).all():
            raise ValueError(
                f"the function space's nodes do not match the {grid.nx} x {grid.ny} image grid "
                "one to one; use a P1 space on grid.create_mesh()")

    def to_images(self, values: np.ndarray) -> np.ndarray:
        """Images of local dof values (``fem.Function.x.array``), shape ``(bs, ny+1, nx+1)``.

        Collective: call on every rank.
        """
        bs = self.block_size
        owned = np.asarray(values)[: self.num_owned * bs].reshape(-1, bs)
        images = np.zeros((bs, int(np.prod(self.grid.shape))), dtype=np.float64)
        images[:, self._pixels[: self.num_owned]] = owned.T
        self.comm.Allreduce(MPI.IN_PLACE, images, op=MPI.SUM)
        return images.reshape((bs, *self.grid.shape))

    def to_image(self, function: fem.Function) -> np.ndarray:
        """Image of a scalar function, or the stacked component images of a vector function."""
        images = self.to_images(function.x.array)
        return images[0] if self.block_size == 1 else images

    def from_images(self, images: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Write images (``(bs, ny+1, nx+1)`` or ``(ny+1, nx+1)`` when scalar) into local values.

        Owned and ghost values are both filled, so no ghost update is needed afterwards.
        """
        bs = self.block_size
        images = np.asarray(images, dtype=np.float64).reshape(bs, -1)
        if images.shape[1] != np.prod(self.grid.shape):
            raise ValueError(
                f"image(s) of {images.shape[1]} pixels do not fit the {self.grid.shape} grid")
        out[: self.num_local * bs] = images[:, self._pixels].T.reshape(-1)
        return out

    def from_image(self, image: np.ndarray, function: fem.Function) -> fem.Function:
        """Set a function's values from its image (or stacked component images)."""
        self.from_images(image, function.x.array)
        return function
