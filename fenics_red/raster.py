"""The one boundary between nodal fields on a mesh and images: rasters.

The solver works with nodal values of P1 functions distributed over MPI ranks; users, data sets,
metrics, figures and the denoiser work with images. Every conversion between the two goes through
a raster from this module:

* :class:`NodalImage` on a grid mesh whose nodes are the pixels (:meth:`ImageGrid.create_mesh`):
  values are copied, never interpolated, so the round trip is exact on any number of ranks;
* :class:`PointRaster` on any other 2-D mesh: the image samples the P1 field at the pixels
  (linear interpolation in the cell that holds each pixel), pixels outside the domain are masked
  (and, for the denoiser, filled from the nearest pixel inside); the way back interpolates the
  image bilinearly at the nodes, and :meth:`PointRaster.adjoint_images` applies the transpose of
  the sampling.

Image convention (documented in the README):

* an image of nodal values has shape ``(ny + 1, nx + 1)``;
* row 0 is the transducer edge (the top of the field, ``y = y0 + H``) and depth grows with the row
  index, so row ``i`` lies at ``y = y0 + H - i * H / ny``;
* column 0 is the left edge (``x = x0``), column ``j`` lies at ``x = x0 + j * W / nx``.

A 3-D grid (``nz > 0``, depth along ``z``) has volumes of shape ``(nz + 1, ny + 1, nx + 1)``: axis 0
is depth from the transducer face (``z = z0 + D`` at index 0), axis 1 is ``y`` (elevation, from
``y0``) and axis 2 is ``x`` (lateral, from ``x0``); slice ``volume[:, j, :]`` is an axial-lateral
plane, the 2-D image of that elevation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mpi4py import MPI

import numpy as np
from scipy import sparse

from dolfinx import fem, geometry, mesh

__all__ = ["ImageGrid", "NodalImage", "NodeOrder", "PointRaster", "ValueRaster",
           "validate_image", "raster_for", "central_slice"]


@dataclass(frozen=True)
class ImageGrid:
    """A rectangle ``[x0, x0 + width] x [y0, y0 + height]`` split into ``nx x ny`` cells, or with
    ``nz > 0`` a box that adds ``[z0, z0 + depth]`` in ``nz`` cells (depth along ``z``).

    Its pixels (voxels) are the cell corners; :meth:`create_mesh` cuts each cell into P1
    triangles (tetrahedra), so that the mesh vertices coincide with the pixels.
    """

    nx: int
    ny: int
    width: float = 1.0
    height: float = 1.0
    x0: float = 0.0
    y0: float = 0.0
    nz: int = 0
    depth: float = 1.0
    z0: float = 0.0

    def __post_init__(self):
        for name in ("nx", "ny", "nz"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or value < (0 if name == "nz" else 1):
                raise ValueError(f"ImageGrid.{name} must be a positive integer, got {value!r}")
        for name in ("width", "height", "depth"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"ImageGrid.{name} must be a positive number, got {value!r}")
        for name in ("x0", "y0", "z0"):
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"ImageGrid.{name} must be finite, got {getattr(self, name)!r}")

    @property
    def dim(self) -> int:
        """2 for a rectangle, 3 for a box."""
        return 3 if self.nz else 2

    @classmethod
    def from_shape(cls, shape: tuple[int, ...], width: float | None = None,
                   height: float | None = None) -> ImageGrid:
        """The grid whose nodal images have ``shape == (ny + 1, nx + 1)`` (2-D) or volumes
        ``(nz + 1, ny + 1, nx + 1)`` (3-D, cubic cells of width ``width / nx``).

        Missing sizes give square cells: ``width`` defaults to 1 and ``height`` to
        ``width * ny / nx``.
        """
        if len(shape) not in (2, 3) or min(shape) < 2:
            raise ValueError(f"a nodal image must be 2-D (or a 3-D volume) with at least 2 "
                             f"pixels per axis, got shape {tuple(shape)}")
        ny, nx = int(shape[-2]) - 1, int(shape[-1]) - 1
        if width is None and height is None:
            width = 1.0
        if height is None:
            height = width * ny / nx
        if width is None:
            width = height * nx / ny
        if len(shape) == 3:
            nz = int(shape[0]) - 1
            return cls(nx, ny, float(width), float(height), nz=nz, depth=float(width) * nz / nx)
        return cls(nx, ny, float(width), float(height))

    @classmethod
    def covering(cls, lower, upper, spacing: float) -> ImageGrid:
        """The grid over the box ``[lower, upper]`` (2-D, or 3-D for 3-D corners, depth along
        ``z``) with square (cubic) pixels of about ``spacing``."""
        lower, upper = np.asarray(lower, float).ravel(), np.asarray(upper, float).ravel()
        size = upper - lower
        if not (np.isfinite(spacing) and spacing > 0):
            raise ValueError(f"pixel spacing must be a positive number, got {spacing!r}")
        n = [max(1, int(np.ceil(k - 1e-9))) for k in size / spacing]
        grid = cls(n[0], n[1], float(size[0]), float(size[1]), float(lower[0]), float(lower[1]))
        if len(size) == 3:
            return replace(grid, nz=n[2], depth=float(size[2]), z0=float(lower[2]))
        return grid

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of an image of nodal values: ``(ny + 1, nx + 1)``, in 3-D
        ``(nz + 1, ny + 1, nx + 1)``."""
        if self.nz:
            return (self.nz + 1, self.ny + 1, self.nx + 1)
        return (self.ny + 1, self.nx + 1)

    @property
    def divisions(self) -> tuple[int, ...]:
        """Cells per axis ``(nx, ny[, nz])``."""
        return (self.nx, self.ny, self.nz) if self.nz else (self.nx, self.ny)

    @property
    def extent(self) -> tuple[float, ...]:
        """Sizes ``(width, height[, depth])`` along ``x, y[, z]``."""
        return (self.width, self.height, self.depth) if self.nz else (self.width, self.height)

    @property
    def origin(self) -> tuple[float, ...]:
        """The lower corner ``(x0, y0[, z0])``."""
        return (self.x0, self.y0, self.z0) if self.nz else (self.x0, self.y0)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Cell size ``(hx, hy[, hz])``."""
        return tuple(e / n for e, n in zip(self.extent, self.divisions, strict=True))

    def axial_plane(self) -> ImageGrid:
        """The 2-D grid of an axial-lateral slice ``volume[:, j, :]`` of a 3-D grid (x lateral,
        depth along the image's rows): the image a 2-D denoiser or figure sees."""
        if not self.nz:
            return self
        return ImageGrid(self.nx, self.nz, self.width, self.depth, self.x0, self.z0)

    def label(self) -> str:
        """``"NX x NY"`` or ``"NX x NY x NZ"`` (cells), for messages."""
        return " x ".join(str(n) for n in self.divisions)

    def pixel_points(self) -> np.ndarray:
        """Coordinates ``(n_pixels, dim)`` of the pixels in row-major image order."""
        index = np.indices(self.shape).reshape(len(self.shape), -1)
        h = self.spacing
        if self.nz:  # axes (z from the top, y, x)
            return np.column_stack([self.x0 + index[2] * h[0], self.y0 + index[1] * h[1],
                                    self.z0 + self.depth - index[0] * h[2]])
        return np.column_stack([self.x0 + index[1] * h[0],
                                self.y0 + self.height - index[0] * h[1]])

    def create_mesh(self, comm: MPI.Comm) -> mesh.Mesh:
        """A distributed triangle (tetrahedron) mesh whose vertices are the image pixels."""
        lower, upper = np.array(self.origin), np.array(self.origin) + np.array(self.extent)
        if self.nz:
            return mesh.create_box(comm, [lower, upper], list(self.divisions),
                                   mesh.CellType.tetrahedron)
        return mesh.create_rectangle(comm, [lower, upper], list(self.divisions),
                                     mesh.CellType.triangle, diagonal=mesh.DiagonalType.right)

    def image_coordinates(self, points: np.ndarray) -> np.ndarray:
        """Fractional image indices ``(n, dim)`` of ``points`` (rows ``(x, y[, z])``), in the
        image's axis order: axis 0 counts pixels down from the probe face (the last coordinate,
        flipped), the others follow ``y`` (3-D) and ``x``."""
        points = np.asarray(points, dtype=np.float64)
        d = self.dim
        index = [(points[:, d - 1 - axis] - self.origin[d - 1 - axis]) / self.spacing[d - 1 - axis]
                 for axis in range(d)]
        index[0] = self.divisions[d - 1] - index[0]
        return np.column_stack(index)

    def pixel_index(self, points: np.ndarray) -> np.ndarray:
        """Flat image index (row-major) of each point (rows of ``points``) on the grid's nodes."""
        index = np.rint(self.image_coordinates(points)).astype(np.int64)
        if len(index) and (index.min() < 0 or np.any(index.max(axis=0) >= self.shape)):
            raise ValueError("points lie outside the image grid")
        return np.ravel_multi_index(tuple(index.T), self.shape)


def central_slice(mask: np.ndarray | None, shape: tuple[int, ...]) -> int:
    """The elevation index ``j`` of the axial-lateral slice ``volume[:, j, :]`` to show: the one
    with the most inclusion voxels of ``mask``, else the middle one."""
    if mask is not None and np.any(mask):
        return int(np.argmax((np.asarray(mask) > 0).sum(axis=(0, 2))))
    return shape[1] // 2


def validate_image(image, shape: tuple[int, ...] | None = None, name: str = "image",
                   positive: bool = False) -> np.ndarray:
    """Check that ``image`` is a finite 2-D float array, or a 3-D volume when ``shape`` is 3-D
    (of ``shape``, if given).

    Raises ``ValueError`` with a message that says what is wrong and what was expected.
    """
    array = np.asarray(image)
    ndim = 2 if shape is None else len(shape)
    layout = "(ny+1, nx+1)" if ndim == 2 else "(nz+1, ny+1, nx+1)"
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.ndim != ndim:
        what = "a 2-D image" if ndim == 2 else "a 3-D volume"
        raise ValueError(f"{name} must be {what} of shape {layout}, got {array.ndim}-D shape "
                         f"{array.shape}")
    if shape is not None and array.shape != tuple(shape):
        raise ValueError(f"{name} has shape {array.shape}, expected {tuple(shape)} {layout}")
    bad = ~np.isfinite(array)
    if bad.any():
        raise ValueError(f"{name} has {int(bad.sum())} non-finite value(s) (NaN or inf), first "
                         f"at {_position(np.argwhere(bad)[0])}")
    if positive and not (array > 0).all():
        where = tuple(np.argwhere(array <= 0)[0])
        raise ValueError(
            f"{name} must be strictly positive everywhere; found {array[where].item()!r} at "
            f"{_position(where)} (minimum {array.min().item()!r})")
    return np.ascontiguousarray(array, dtype=np.float64)


def _position(index) -> str:
    """``row i, column j`` of an image, ``voxel (k, i, j)`` of a volume."""
    index = tuple(int(i) for i in index)
    if len(index) == 2:
        return f"row {index[0]}, column {index[1]}"
    return f"voxel {index}"


class NodeOrder:
    """Exact map between local values of a P1 space and global arrays in a fixed node order.

    ``index[i]`` is the global position of local node ``i`` (owned, then ghost). Every rank gets
    the whole array from :meth:`gather` (an ``Allreduce`` of disjoint owned values, hence exact),
    and :meth:`scatter` fills owned and ghost values directly, so no ghost update is needed.
    """

    def __init__(self, V: fem.FunctionSpace, index: np.ndarray, size: int):
        self.V = V
        self.comm = V.mesh.comm
        index_map = V.dofmap.index_map
        self.block_size = V.dofmap.index_map_bs
        self.num_owned = index_map.size_local
        self.num_local = index_map.size_local + index_map.num_ghosts
        self.size = int(size)
        self._index = np.asarray(index, dtype=np.int64)[: self.num_local]
        counts = np.zeros(self.size, dtype=np.int64)
        np.add.at(counts, self._index[: self.num_owned], 1)
        self.comm.Allreduce(MPI.IN_PLACE, counts, op=MPI.SUM)
        self.one_to_one = bool((counts == 1).all())

    def gather(self, values: np.ndarray) -> np.ndarray:
        """Arrays ``(bs, size)`` of local values (``fem.Function.x.array``). Collective."""
        bs = self.block_size
        return self.gather_rows(np.asarray(values)[: self.num_local * bs].reshape(-1, bs))

    def gather_rows(self, rows: np.ndarray) -> np.ndarray:
        """Arrays ``(k, size)`` of ``k`` values per local node (rows of ``rows``). Collective."""
        owned = np.asarray(rows, dtype=np.float64)[: self.num_owned]
        arrays = np.zeros((owned.shape[1], self.size), dtype=np.float64)
        arrays[:, self._index[: self.num_owned]] = owned.T
        self.comm.Allreduce(MPI.IN_PLACE, arrays, op=MPI.SUM)
        return arrays

    def scatter(self, arrays: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Write arrays ``(bs, size)`` (or ``(size,)`` when scalar) into local values ``out``."""
        bs = self.block_size
        arrays = np.asarray(arrays, dtype=np.float64).reshape(bs, -1)
        if arrays.shape[1] != self.size:
            raise ValueError(f"got {arrays.shape[1]} values per component, expected {self.size}")
        out[: self.num_local * bs] = arrays[:, self._index].T.reshape(-1)
        return out


class NodalImage(NodeOrder):
    """Exact raster of a P1 space (scalar or vector) on the mesh of an :class:`ImageGrid`."""

    def __init__(self, V: fem.FunctionSpace, grid: ImageGrid):
        super().__init__(V, grid.pixel_index(V.tabulate_dof_coordinates()),
                         int(np.prod(grid.shape)))
        self.grid = grid
        if not self.one_to_one:
            raise ValueError(
                f"the function space's nodes do not match the {grid.label()} image grid "
                "one to one; use a P1 space on grid.create_mesh()")

    @property
    def shape(self) -> tuple[int, int]:
        return self.grid.shape

    @property
    def mask(self) -> np.ndarray:
        """Pixels inside the domain: all of them."""
        return np.ones(self.grid.shape, dtype=bool)

    def to_images(self, values: np.ndarray) -> np.ndarray:
        """Images of local dof values (``fem.Function.x.array``), shape ``(bs, ny+1, nx+1)``.

        Collective: call on every rank.
        """
        return self.gather(values).reshape((self.block_size, *self.grid.shape))

    def to_image(self, function: fem.Function) -> np.ndarray:
        """Image of a scalar function, or the stacked component images of a vector function."""
        images = self.to_images(function.x.array)
        return images[0] if self.block_size == 1 else images

    def from_images(self, images: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Write images (``(bs, ny+1, nx+1)`` or ``(ny+1, nx+1)`` when scalar) into local values.

        Owned and ghost values are both filled, so no ghost update is needed afterwards.
        """
        images = np.asarray(images, dtype=np.float64).reshape(self.block_size, -1)
        if images.shape[1] != self.size:
            raise ValueError(
                f"image(s) of {images.shape[1]} pixels do not fit the {self.grid.shape} grid")
        return self.scatter(images, out)

    def from_image(self, image: np.ndarray, function: fem.Function) -> fem.Function:
        """Set a function's values from its image (or stacked component images)."""
        self.from_images(image, function.x.array)
        return function

    adjoint_images = from_images  # the copy is a permutation: its transpose is its inverse


class PointRaster(NodalImage):
    """Raster of a P1 space on any 2-D or 3-D mesh: sampling at the pixels (voxels) and a
    bilinear (trilinear) way back.

    ``to_images`` samples the field at each pixel inside the domain (the P1 interpolant in the
    cell holding it) and fills the pixels outside (:attr:`mask` False) from the nearest pixel
    inside, so a denoiser sees a complete image. ``from_images`` interpolates an image
    multilinearly at the mesh nodes from the pixels inside (weights renormalised near the boundary);
    ``adjoint_images`` applies the transpose of the sampling (for gradients of image-space
    functionals). Both sparse operators are built once, on every rank, in the file
    order of the domain's nodes (:meth:`fenics_red.domain.Domain.node_indices`).
    """

    def __init__(self, V: fem.FunctionSpace, grid: ImageGrid, node_index: np.ndarray,
                 num_nodes: int):
        NodeOrder.__init__(self, V, node_index, num_nodes)
        self.grid = grid
        gdim = V.mesh.geometry.dim
        if grid.dim != gdim:
            raise ValueError(f"a {grid.dim}-D image grid cannot raster a {gdim}-D mesh")
        points = self.gather_rows(V.tabulate_dof_coordinates()[:, :gdim]).T
        self.sample = _sampling_matrix(V.mesh, grid, num_nodes)
        inside = np.asarray(self.sample.sum(axis=1)).ravel() > 0.5
        self._mask = inside.reshape(grid.shape)
        self.fill = _nearest_fill(self._mask)
        self.back = _inside_weights(_multilinear_matrix(grid, points), self._mask.ravel(),
                                    self.fill)

    @property
    def mask(self) -> np.ndarray:
        """Pixels inside the domain."""
        return self._mask

    def to_images(self, values: np.ndarray) -> np.ndarray:
        nodal = self.gather(values)
        images = (self.fill @ (self.sample @ nodal.T)).T
        return images.reshape((self.block_size, *self.grid.shape))

    def from_images(self, images: np.ndarray, out: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float64).reshape(self.block_size, -1)
        if images.shape[1] != np.prod(self.grid.shape):
            raise ValueError(
                f"image(s) of {images.shape[1]} pixels do not fit the {self.grid.shape} grid")
        return self.scatter((self.back @ images.T).T, out)

    def adjoint_images(self, images: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out = Sᵀ F ᵀ image``: the transpose of :meth:`to_images` (sampling and filling)."""
        images = np.asarray(images, dtype=np.float64).reshape(self.block_size, -1)
        return self.scatter((self.sample.T @ (self.fill.T @ images.T)).T, out)


def _sampling_matrix(msh: mesh.Mesh, grid: ImageGrid, num_nodes: int) -> sparse.csr_matrix:
    """``S`` (n_pixels x num_nodes): P1 interpolation at each pixel inside the mesh. Collective.

    Each rank locates the pixels in its owned cells; a pixel found by several ranks (on a shared
    facet) is kept by the lowest. Columns are file node indices.
    """
    comm = msh.comm
    tdim, gdim = msh.topology.dim, msh.geometry.dim
    n_cells = msh.topology.index_map(tdim).size_local
    points = np.zeros((int(np.prod(grid.shape)), 3))
    points[:, :gdim] = grid.pixel_points()
    tree = geometry.bb_tree(msh, tdim, np.arange(n_cells, dtype=np.int32))
    candidates = geometry.compute_collisions_points(tree, points)
    colliding = geometry.compute_colliding_cells(msh, candidates, points)
    x = msh.geometry.x[:, :gdim]
    nodes = msh.geometry.dofmap
    file_index = np.asarray(msh.geometry.input_global_indices, dtype=np.int64)
    rows, cols, vals = [], [], []
    for pixel in np.flatnonzero(np.diff(colliding.offsets) > 0):
        cell = colliding.links(pixel)[0]
        vertices = x[nodes[cell]]
        T = (vertices[1:] - vertices[0]).T
        lam = np.linalg.solve(T, points[pixel, :gdim] - vertices[0])
        weights = np.concatenate([[1.0 - lam.sum()], lam]).clip(0.0, 1.0)
        rows.extend([pixel] * len(weights))
        cols.extend(file_index[nodes[cell]])
        vals.extend(weights / weights.sum())
    found = np.unique(np.asarray(rows, dtype=np.int64))
    owners = np.full(int(np.prod(grid.shape)), comm.size, dtype=np.int64)
    owners[found] = comm.rank
    comm.Allreduce(MPI.IN_PLACE, owners, op=MPI.MIN)
    keep = owners[np.asarray(rows, dtype=np.int64)] == comm.rank if rows else np.zeros(0, bool)
    triplets = comm.allgather((np.asarray(rows, np.int64)[keep], np.asarray(cols, np.int64)[keep],
                               np.asarray(vals, float)[keep]))
    r, c, v = (np.concatenate([t[k] for t in triplets]) for k in range(3))
    return sparse.csr_matrix((v, (r, c)), shape=(len(points), num_nodes))


def _nearest_fill(mask: np.ndarray) -> sparse.csr_matrix:
    """``F``: copy each pixel outside ``mask`` from the nearest pixel inside (identity inside)."""
    from scipy import ndimage

    if not mask.any():
        raise ValueError("no pixel of the image grid lies inside the mesh")
    _, nearest = ndimage.distance_transform_edt(~mask, return_indices=True)
    source = np.ravel_multi_index(tuple(nearest), mask.shape).ravel()
    n = mask.size
    return sparse.csr_matrix((np.ones(n), (np.arange(n), source)), shape=(n, n))


def _multilinear_matrix(grid: ImageGrid, points: np.ndarray) -> sparse.csr_matrix:
    """``B`` (n_points x n_pixels): bilinear (2-D) or trilinear (3-D) interpolation of an image
    at ``points``: each point takes the 2^d pixels around it."""
    shape = np.array(grid.shape)
    index = np.clip(grid.image_coordinates(points), 0.0, shape - 1)
    lower = np.minimum(np.floor(index).astype(np.int64), shape - 2)
    frac = index - lower
    rows, cols, vals = [], [], []
    for corner in np.ndindex(*(2,) * grid.dim):
        offset = np.array(corner)
        rows.append(np.arange(len(points)))
        cols.append(np.ravel_multi_index(tuple((lower + offset).T), grid.shape))
        vals.append(np.prod(np.where(offset == 1, frac, 1.0 - frac), axis=1))
    return sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                             shape=(len(points), int(np.prod(grid.shape))))


def _inside_weights(B: sparse.csr_matrix, inside: np.ndarray, fill: sparse.csr_matrix
                    ) -> sparse.csr_matrix:
    """Multilinear weights on pixels inside only, renormalised; nodes whose 2^d pixels all lie
    outside take the filled image (nearest pixel inside)."""
    Bin = (B @ sparse.diags(inside.astype(float))).tocsr()
    total = np.asarray(Bin.sum(axis=1)).ravel()
    some = total > 1e-12
    scale = sparse.diags(np.where(some, 1.0 / np.where(some, total, 1.0), 0.0))
    rest = sparse.diags((~some).astype(float))
    return (scale @ Bin + rest @ (B @ fill)).tocsr()


def raster_for(V: fem.FunctionSpace, domain, spacing: float | None = None) -> NodalImage:
    """The raster of a P1 space on a :class:`~fenics_red.domain.Domain`. Collective.

    Exact (:class:`NodalImage`) on grid domains; otherwise a :class:`PointRaster` over the
    mesh's bounding box with square (cubic) pixels of ``spacing`` (default: the mesh's mean
    node spacing, :func:`mean_node_spacing`).
    """
    if domain.grid is not None:
        return NodalImage(V, domain.grid)
    lower, upper = domain.bounds()
    if spacing is None:
        spacing = mean_node_spacing(domain.mesh)
    grid = ImageGrid.covering(lower, upper, spacing)
    return PointRaster(V, grid, domain.node_indices(V), domain.num_file_nodes)


def mean_node_spacing(msh: mesh.Mesh) -> float:
    """``(size / number of nodes)^(1/d)``, ``size`` the area (2-D) or volume (3-D): the pixel
    size that keeps as many pixels as nodes. Collective."""
    one = fem.form(fem.Constant(msh, 1.0) * _dx(msh))
    size = msh.comm.allreduce(fem.assemble_scalar(one), op=MPI.SUM)
    return float((size / msh.geometry.index_map().size_global) ** (1.0 / msh.geometry.dim))


def _dx(msh):
    import ufl

    return ufl.dx(domain=msh)


class ValueRaster:
    """Images of nodal arrays in file order, serially (for metrics and figures of data sets).

    On an :class:`ImageGrid` the arrays already are images; on
    :class:`~fenics_red.domain.MeshArrays` they are sampled at the pixels of ``grid`` (default:
    the mesh's mean node spacing) by a :class:`PointRaster`, the pixels outside the mesh filled
    from the nearest inside and marked False in :attr:`mask`.
    """

    def __init__(self, space, grid: ImageGrid | None = None):
        if isinstance(space, ImageGrid):
            self.grid, self._matrix = space, None
            self.mask = np.ones(space.shape, dtype=bool)
            return
        domain = space.domain(MPI.COMM_SELF)
        Q = fem.functionspace(domain.mesh, ("Lagrange", 1))
        if grid is None:
            lower, upper = domain.bounds()
            grid = ImageGrid.covering(lower, upper, mean_node_spacing(domain.mesh))
        raster = PointRaster(Q, grid, domain.node_indices(Q), domain.num_file_nodes)
        self.grid, self.mask = grid, raster.mask
        self._matrix = (raster.fill @ raster.sample).tocsr()

    def image(self, values: np.ndarray) -> np.ndarray:
        """The image of one array of nodal values (a copy on grids)."""
        values = np.asarray(values, dtype=np.float64)
        if self._matrix is None:
            return values.reshape(self.grid.shape).copy()
        return (self._matrix @ values.ravel()).reshape(self.grid.shape)

    def labels(self, labels: np.ndarray) -> np.ndarray:
        """A label image: each pixel takes the label with the largest interpolation weight."""
        labels = np.asarray(labels)
        if self._matrix is None:
            return labels.reshape(self.grid.shape).copy()
        out = np.zeros(self.grid.shape, dtype=labels.dtype)
        weight = np.zeros(self.grid.shape)
        for label in np.unique(labels):
            share = self.image((labels == label).astype(np.float64))
            better = share > weight
            out[better], weight[better] = label, share[better]
        return out
