"""The tissue domain: a DOLFINx mesh with its loaded and supported boundary parts.

A :class:`Domain` is what the forward model needs to know about geometry: the mesh (2-D triangles
or 3-D tetrahedra, any number of MPI ranks), which boundary facets carry the probe's load and which
rest on a support, and the order of the nodes in the file it came from (so that values given per
node in that order come back in that order). It is made from a rectangle grid (the image grids of
the paper's experiments), a gmsh ``.msh`` file or an XDMF file.

Boundary convention: the depth axis is the last coordinate (``y`` in 2-D, ``z`` in 3-D) and the
transducer sits at its maximum. Physical groups named ``load`` and ``support`` (gmsh) or facet
tags 1 and 2 (XDMF, :data:`LOAD` and :data:`SUPPORT`) override it; without them the load acts on
the boundary facets at the maximum depth coordinate and the support is at its minimum.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from mpi4py import MPI

import numpy as np

from dolfinx import fem, mesh

from .io import check_input_file
from .parallel import on_every_rank, on_root, raise_shared

__all__ = ["Domain", "LOAD", "SUPPORT", "MeshArrays", "make_domain", "read_mesh", "mesh_bounds",
           "planar_points", "read_domain", "read_facets", "read_meshio", "check_cells"]

#: Facet tag values of the loaded and the supported boundary in every :class:`Domain`.
LOAD, SUPPORT = 1, 2

_MESH_SUFFIXES = (".msh", ".xdmf")
#: other mesh files, read by meshio: VTK (XML and legacy), Abaqus, Medit, Salome MED.
_MESHIO_SUFFIXES = (".vtu", ".vtk", ".inp", ".mesh", ".med")
#: gmsh element types the package takes: 3-node triangles (2-D) and 4-node tetrahedra (3-D).
_GMSH_CELLS = {2: 2, 3: 4}
#: meshio cell types of the dimension of its triangles / tetrahedra that the package refuses.
_SAME_DIMENSION = {
    "triangle": {"quad", "quad8", "quad9", "triangle6", "triangle7", "polygon"},
    "tetra": {"hexahedron", "hexahedron20", "hexahedron27", "wedge", "wedge15", "pyramid",
              "pyramid13", "tetra10"}}


def planar_points(points: np.ndarray, nodes_per_cell: int) -> np.ndarray:
    """``points`` ``(N, 2)`` of triangles given as ``(N, 3)`` with a constant third coordinate
    (how meshio and many codes store a 2-D mesh); other points unchanged."""
    points = np.asarray(points)
    if not (points.ndim == 2 and points.shape[1] == 3 and nodes_per_cell == 3 and len(points)
            and points.dtype.kind in "fiu" and np.isfinite(points).all()):
        return points
    problem = _off_plane(points)
    if problem is None:
        return points[:, :2]
    raise ValueError(f"the triangles lie in {problem}; 2-D meshes must lie in the x-y plane "
                     "with the depth along y: rotate the mesh there")


def _off_plane(points: np.ndarray) -> str | None:
    """Where the points ``(N, 3)`` of a 2-D mesh lie when z is not constant (``"x-z (z from a
    to b)"``), or None: DOLFINx would read their x and y only."""
    extent = np.ptp(points, axis=0)
    if extent[2] <= 1e-12 * max(float(extent[:2].max()), 1e-300):
        return None
    plane = "x-z" if extent[1] <= 1e-12 * extent.max() else "a plane other than x-y"
    return f"{plane} (z from {points[:, 2].min():g} to {points[:, 2].max():g})"


def check_cells(points: np.ndarray, cells: np.ndarray) -> None:
    """Refuse unused nodes, repeated nodes in a cell, zero-size cells and inverted cells (a
    fold: two cells on one side of the facet they share)."""
    n, d = points.shape
    if cells.shape[1] != d + 1:
        raise ValueError(f"{d}-D nodes need {'triangles (M, 3)' if d == 2 else 'tetrahedra (M, 4)'}"
                         f" as cells, got cells of {cells.shape[1]} nodes")
    nodes = np.sort(cells, axis=1)
    unique, counts = np.unique(nodes, axis=0, return_counts=True)
    if (counts > 1).any():
        twice = np.flatnonzero((nodes == unique[counts > 1][0]).all(axis=1))
        raise ValueError(f"{int((counts - 1).sum())} cell(s) appear twice (first: cells "
                         f"{int(twice[0])} and {int(twice[1])}, 0-based, of the same nodes): a "
                         "cell in two cell groups? keep each cell once")
    used = np.zeros(n, dtype=bool)
    used[cells.ravel()] = True
    if not used.all():
        raise ValueError(f"{int((~used).sum())} node(s) are used by no cell (first: node "
                         f"{int(np.flatnonzero(~used)[0])}, 0-based); remove them or check the "
                         "cells")
    edges = points[cells[:, 1:]] - points[cells[:, :1]]
    size = np.linalg.det(edges)  # twice the area / six times the volume, signed
    scale = np.max(np.abs(edges)) ** d
    tiny = np.abs(size) <= 1e-12 * scale
    if tiny.any():
        first = int(np.flatnonzero(tiny)[0])
        raise ValueError(f"{int(tiny.sum())} cell(s) have zero {'area' if d == 2 else 'volume'} "
                         f"(first: cell {first}, 0-based, of nodes "
                         f"{', '.join(map(str, cells[first]))}): repeated or collinear nodes")
    folded = _folded_facets(points, cells)
    if len(folded):
        a, b = folded[0]
        shared = sorted(set(cells[a].tolist()) & set(cells[b].tolist()))
        raise ValueError(f"{len(folded)} interior facet(s) have both their cells on one side "
                         f"(first: between cells {a} and {b}, 0-based, across nodes "
                         f"{', '.join(map(str, shared))}): inverted cells, a tangled mesh or "
                         "cells that do not match the nodes")


def _folded_facets(points: np.ndarray, cells: np.ndarray) -> list[tuple[int, int]]:
    """Pairs of cells that share a facet but lie on the same side of it (a fold: one of them is
    inverted). The test does not depend on the cells' orientation, which meshers choose freely."""
    d = points.shape[1]
    k = d + 1
    local = [[j for j in range(k) if j != i] for i in range(k)]  # facet i: all nodes but i
    facets = np.concatenate([np.sort(cells[:, f], axis=1) for f in local])
    opposite = np.concatenate([cells[:, i] for i in range(k)])
    owner = np.tile(np.arange(len(cells)), k)
    order = np.lexsort(facets.T[::-1])
    facets, opposite, owner = facets[order], opposite[order], owner[order]
    same = (facets[1:] == facets[:-1]).all(axis=1)
    first = np.flatnonzero(same)
    if not len(first):
        return []
    f, a, b = facets[first], opposite[first], opposite[first + 1]
    base = points[f[:, 0]]
    edges = np.stack([points[f[:, j]] - base for j in range(1, d)], axis=1)  # (n, d-1, d)

    def side(node):
        return np.linalg.det(np.concatenate([edges, (points[node] - base)[:, None]], axis=1))

    bad = np.flatnonzero(side(a) * side(b) > 0)
    return [(int(owner[first[i]]), int(owner[first[i] + 1])) for i in bad]


@dataclass(frozen=True, eq=False)
class MeshArrays:
    """A mesh as plain arrays in file order, the same on every rank (what data sets store).

    ``points`` ``(N, gdim)``, 0-based ``cells`` ``(M, gdim + 1)``, and the ``load`` and
    ``support`` facets as node lists ``(F, gdim)``. Values on such a mesh are arrays of
    :attr:`shape` ``(N,)``, node ``i`` at ``points[i]``. ``force``: optional nodal forces
    ``(N, gdim)`` (a measurement's load, in place of the traction on the ``load`` facets).
    """

    points: np.ndarray
    cells: np.ndarray
    load: np.ndarray
    support: np.ndarray
    force: np.ndarray | None = None

    def __post_init__(self):
        points = np.asarray(self.points)
        if (points.ndim != 2 or points.shape[1] not in (2, 3) or points.dtype.kind not in "fiu"
                or not np.isfinite(points).all()):
            raise ValueError(f"mesh points must be finite coordinates of shape (N, 2) or (N, 3), "
                             f"got shape {points.shape}")
        n, gdim = points.shape
        arrays = {"points": points.astype(np.float64)}
        for name, width in (("cells", gdim + 1), ("load", gdim), ("support", gdim)):
            a = np.asarray(getattr(self, name))
            if a.size == 0 and name != "cells":
                a = a.reshape(0, width)
            what = {"cells": "triangles (M, 3)" if gdim == 2 else "tetrahedra (M, 4)",
                    "load": "facets (F, 2), node pairs" if gdim == 2 else "facets (F, 3)",
                    "support": "facets (F, 2), node pairs" if gdim == 2 else "facets (F, 3)"}
            if name == "cells" and a.ndim == 2 and a.shape[1] != width and a.dtype.kind in "iu":
                kind = {(2, 4): "quadrilaterals", (2, 6): "second-order triangles",
                        (3, 8): "hexahedra", (3, 10): "second-order tetrahedra"}.get(
                    (gdim, a.shape[1]), f"cells of {a.shape[1]} nodes")
                raise ValueError(f"the mesh has {kind}; the package takes first-order "
                                 f"{what[name]} on {gdim}-D points only: mesh it again with "
                                 "those")
            if a.ndim != 2 or a.shape[1] != width or a.dtype.kind not in "iu":
                raise ValueError(f"mesh {name} must be integer node indices, {what[name]} for "
                                 f"{gdim}-D points; got dtype {a.dtype}, shape {a.shape}")
            if a.size and (a.min() < 0 or a.max() >= n):
                bad = int(a.min() if a.min() < 0 else a.max())
                raise ValueError(f"mesh {name} reference node {bad}, outside 0..{n - 1} (0-based "
                                 f"indices into the {n} points)")
            arrays[name] = a.astype(np.int64)
        if len(arrays["cells"]) == 0:
            raise ValueError("the mesh has no cells")
        unused = np.setdiff1d(np.arange(n), arrays["cells"])
        if len(unused):
            raise ValueError(f"the mesh has {len(unused)} node(s) that no cell uses (first: node "
                             f"{int(unused[0])}, 0-based); remove them (a node's values would "
                             "have nothing to hold them)")
        if self.force is not None:
            force = np.asarray(self.force)
            if (force.shape != (n, gdim) or force.dtype.kind not in "fiu"
                    or not np.isfinite(force).all()):
                raise ValueError(f"nodal forces must be finite numbers of shape ({n}, {gdim}), "
                                 f"got shape {force.shape}")
            arrays["force"] = force.astype(np.float64)
        for name, value in arrays.items():
            object.__setattr__(self, name, value)

    @property
    def dim(self) -> int:
        return int(self.points.shape[1])

    @property
    def shape(self) -> tuple[int]:
        return (int(self.points.shape[0]),)

    def adjacency(self):
        """``(N, N)`` sparse matrix (CSR) with a one where two nodes share a cell (no diagonal)."""
        from scipy import sparse

        k = self.cells.shape[1]
        pairs = np.concatenate([self.cells[:, [a, b]] for a in range(k) for b in range(k)
                                if a != b])
        n = len(self.points)
        A = sparse.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])),
                              shape=(n, n)).tocsr()
        A.data[:] = 1.0  # a pair shared by several cells counts once
        return A

    def mean_spacing(self) -> float:
        """``(size / N)^(1/d)``, ``size`` the area (2-D) or volume (3-D): the pixel size of a
        raster with as many pixels as nodes (in 2-D :func:`fenics_red.raster.mean_node_spacing`
        of the distributed mesh, to round-off). Serial."""
        edges = self.points[self.cells[:, 1:]] - self.points[self.cells[:, :1]]
        size = float(np.abs(np.linalg.det(edges)).sum()) / (2 if self.dim == 2 else 6)
        return (size / len(self.points)) ** (1.0 / self.dim)

    @classmethod
    def of_grid(cls, grid) -> MeshArrays:
        """The triangle mesh of an :class:`~fenics_red.raster.ImageGrid` as arrays, its nodes in
        the image's row-major pixel order (serial)."""
        return Domain.rectangle(grid, MPI.COMM_SELF).to_arrays()

    def domain(self, comm: MPI.Comm) -> Domain:
        """The distributed domain of these arrays. Collective."""
        return Domain.from_arrays(self.points, self.cells, comm, load=self.load,
                                  support=self.support, source="data set", force=self.force)


def make_domain(spec, comm: MPI.Comm) -> Domain:
    """The :class:`Domain` of an :class:`~fenics_red.raster.ImageGrid` or :class:`MeshArrays`
    (a data set's geometry), distributed over ``comm``; a Domain passes through."""
    if isinstance(spec, Domain):
        return spec
    if isinstance(spec, MeshArrays):
        return spec.domain(comm)
    if hasattr(spec, "create_mesh"):
        return Domain.rectangle(spec, comm)
    raise TypeError(f"expected an ImageGrid, MeshArrays or Domain, got {type(spec).__name__}")


@dataclass
class Domain:
    """A mesh with tagged load (:data:`LOAD`) and support (:data:`SUPPORT`) facets.

    Attributes:
        mesh: the distributed DOLFINx mesh; its communicator is the domain's.
        facet_tags: facet tags holding :data:`LOAD` and :data:`SUPPORT` (other facets untagged).
        grid: the :class:`~fenics_red.raster.ImageGrid` when the mesh is a grid whose nodes are
            the image pixels (then images convert exactly), else ``None``.
        source: where the mesh came from (a file path, or ``"grid"``), for the record.
        num_file_nodes: number of nodes in the source's own order (see :meth:`node_indices`).
        force: nodal forces ``(num_file_nodes, gdim)`` in file order on every rank, applied
            instead of the traction (a measurement's load), or ``None``.
    """

    mesh: mesh.Mesh
    facet_tags: mesh.MeshTags
    grid: object = None
    source: str = "mesh"
    num_file_nodes: int = 0
    force: np.ndarray | None = None

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_mesh(cls, msh: mesh.Mesh, facet_tags: mesh.MeshTags | None = None,
                  names: dict[str, int] | None = None, **kwargs) -> Domain:
        """Tag a mesh: ``names`` maps ``"load"``/``"support"`` to values of ``facet_tags``.

        Parts not named fall back to the depth-axis convention of the module docstring.
        """
        names = names or {}
        fdim = msh.topology.dim - 1
        msh.topology.create_connectivity(fdim, msh.topology.dim)
        parts, tagged = {}, {}
        for name, tag in (("load", LOAD), ("support", SUPPORT)):
            if facet_tags is not None and name in names:
                parts[tag] = tagged[tag] = facet_tags.find(names[name])
            else:
                parts[tag] = _depth_facets(msh, top=(name == "load"))
        _check_on_boundary(msh, tagged)
        for tag, facets in parts.items():
            count = msh.comm.allreduce(len(facets), op=MPI.SUM)
            if count == 0:
                what = "load" if tag == LOAD else "support"
                raise ValueError(f"the mesh has no {what} facets: name them (a physical group "
                                 f"or set '{what}' in a mesh file, --{what}-facets for nodal "
                                 "arrays) or check the depth axis (the last coordinate)")
        parts[SUPPORT] = np.setdiff1d(parts[SUPPORT], parts[LOAD])  # a facet in both: the load's
        if msh.comm.allreduce(len(parts[SUPPORT]), op=MPI.SUM) == 0:
            raise ValueError("every support facet is also a load facet (the load's group covers "
                             "the support, given or by the depth default): mark a support apart "
                             "from the load")
        if kwargs.get("grid") is None:  # a grid is one piece of regular cells
            _check_cell_sizes(msh)
            _check_parts_supported(msh, parts[SUPPORT])
        facets = np.concatenate([parts[LOAD], parts[SUPPORT]]).astype(np.int32)
        values = np.concatenate([np.full(len(parts[LOAD]), LOAD, np.int32),
                                 np.full(len(parts[SUPPORT]), SUPPORT, np.int32)])
        order = np.argsort(facets, kind="stable")
        tags = mesh.meshtags(msh, fdim, facets[order], values[order])
        if kwargs.get("grid") is not None:  # a grid's nodes are its pixels
            kwargs.setdefault("num_file_nodes", int(np.prod(kwargs["grid"].shape)))
        elif "num_file_nodes" not in kwargs:  # nodes of the file that no cell uses are dropped
            kwargs["num_file_nodes"] = _num_file_nodes(msh)
        return cls(msh, tags, **kwargs)

    @classmethod
    def rectangle(cls, grid, comm: MPI.Comm) -> Domain:
        """The triangle mesh of an image grid; its nodes (and file order) are the pixels."""
        return cls.from_mesh(grid.create_mesh(comm), grid=grid, source="grid")

    @classmethod
    def from_arrays(cls, points, cells, comm: MPI.Comm, load=None, support=None,
                    source: str = "arrays", force=None) -> Domain:
        """A domain from node coordinates ``(N, gdim)`` and 0-based cells ``(M, gdim + 1)``
        (triangles or tetrahedra), given on rank 0 (ignored elsewhere). ``load``/``support``:
        optional boundary facets as node lists ``(F, gdim)``; missing ones follow the depth
        axis. Node ``i`` of ``points`` is node ``i`` of the file order. Collective."""

        def header():
            empty = np.zeros((0, np.shape(points)[-1] if np.ndim(points) == 2 else 2), np.int64)
            checked = MeshArrays(points, cells, empty if load is None else load,
                                 empty if support is None else support)  # raises if malformed
            return checked.dim, len(checked.points)

        gdim, n_nodes = on_root(comm, header)
        msh, tags, names = _tagged_mesh(comm, points, cells, gdim, load, support)
        force = None if force is None else np.asarray(force, dtype=np.float64)
        return cls.from_mesh(msh, tags, names, source=source, num_file_nodes=n_nodes,
                             force=force)

    @classmethod
    def from_file(cls, path: str | os.PathLike, comm: MPI.Comm,
                  facets: str | os.PathLike | None = None) -> Domain:
        """Read a mesh file (:func:`read_mesh`), distributed over ``comm``. ``facets``: a second
        file that holds the load and support facets instead (:func:`read_facets`: the layout
        of meshio's conversion, the cells in ``mesh.xdmf``, the boundary lines in another).
        Collective."""
        msh, tags, names = read_mesh(path, comm)
        if facets is None:
            return cls.from_mesh(msh, tags, names, source=str(path))
        # the facets file replaces the mesh file's boundary: the mesh in file order, untagged
        fdim = msh.topology.dim - 1
        msh.topology.create_connectivity(fdim, fdim + 1)
        none = np.zeros(0, dtype=np.int32)
        arrays = cls(msh, mesh.meshtags(msh, fdim, none, none), source=str(path),
                     num_file_nodes=_num_file_nodes(msh)).to_arrays()
        load, support = on_root(comm, lambda: read_facets(facets, arrays.points, arrays.cells))
        return cls.from_arrays(arrays.points, arrays.cells, comm, load, support,
                               source=f"{path} (facets: {facets})")

    # -- queries ---------------------------------------------------------------------------------

    @property
    def comm(self) -> MPI.Comm:
        return self.mesh.comm

    @property
    def dim(self) -> int:
        """The geometric dimension (2 or 3)."""
        return self.mesh.geometry.dim

    @property
    def value_shape(self) -> tuple[int, ...]:
        """Shape of an array of nodal values in file order: the image shape on grid domains,
        ``(num_file_nodes,)`` otherwise."""
        return tuple(self.grid.shape) if self.grid is not None else (self.num_file_nodes,)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """The global bounding box ``(lower, upper)`` of the mesh nodes. Collective."""
        return mesh_bounds(self.mesh)

    def facets(self, tag: int) -> np.ndarray:
        """Local facet indices with tag :data:`LOAD` or :data:`SUPPORT`."""
        return self.facet_tags.find(tag)

    def to_arrays(self) -> MeshArrays:
        """The mesh in file order as :class:`MeshArrays`, on every rank: ``points`` ``(N, gdim)``,
        ``cells`` (in the source's cell order), and the ``load`` and ``support`` facets as node
        lists; :meth:`from_arrays` rebuilds the same domain. Collective."""
        msh, gdim = self.mesh, self.dim
        tdim = msh.topology.dim
        n_nodes = msh.geometry.index_map().size_local
        nodes = np.zeros((self.num_file_nodes, gdim))
        nodes[_file_nodes(self, np.arange(n_nodes))] = msh.geometry.x[:n_nodes, :gdim]
        self.comm.Allreduce(MPI.IN_PLACE, nodes, op=MPI.SUM)
        n_cells = msh.topology.index_map(tdim).size_local
        original = np.asarray(msh.topology.original_cell_index, dtype=np.int64)[:n_cells]
        facets = {}
        n_facets = msh.topology.index_map(tdim - 1).size_local
        for name, tag in (("load", LOAD), ("support", SUPPORT)):
            local = self.facets(tag)
            local = local[local < n_facets]
            # (DOLFINx 0.9 divides by zero in entities_to_geometry for an empty list)
            geometry_nodes = (mesh.entities_to_geometry(msh, tdim - 1, local.astype(np.int32))
                              if len(local) else np.zeros((0, tdim), dtype=np.int32))
            facets[name] = self.comm.gather(_file_nodes(self, geometry_nodes), root=0)
        cells = _file_nodes(self, msh.geometry.dofmap[:n_cells])
        gathered = self.comm.gather((original, cells), root=0)
        out = None
        if self.comm.rank == 0:
            order = np.concatenate([g[0] for g in gathered])
            out = {"points": nodes,
                   "cells": np.vstack([g[1] for g in gathered])[np.argsort(order, kind="stable")]}
            for name, parts in facets.items():
                out[name] = np.unique(np.sort(np.vstack(parts), axis=1), axis=0)
        return MeshArrays(**self.comm.bcast(out, root=0), force=self.force)

    def node_indices(self, V: fem.FunctionSpace) -> np.ndarray:
        """File node index of each local (owned, then ghost) node of a P1 space ``V``.

        On a grid domain the file order is the image's row-major pixel order (row 0 at the
        transducer). Otherwise it is the node order of the source file (gmsh: node tag − 1).
        """
        if self.grid is not None:
            return self.grid.pixel_index(V.tabulate_dof_coordinates())
        return p1_input_indices(V)


def read_domain(path: str | os.PathLike, comm: MPI.Comm,
                facets: str | os.PathLike | None = None) -> Domain:
    """:meth:`Domain.from_file` of a user's mesh file (and facets file), each checked to exist
    first (the command line's and the importer's one way to read them). Collective."""
    return Domain.from_file(check_input_file(path, "mesh file"), comm, facets=(
        None if facets is None else check_input_file(facets, "facets file")))


def _num_file_nodes(msh: mesh.Mesh) -> int:
    """Nodes in the file a mesh was read from: one past its largest input index. Collective."""
    last = np.max(msh.geometry.input_global_indices, initial=-1)
    return msh.comm.allreduce(int(last), op=MPI.MAX) + 1


def _check_cell_sizes(msh: mesh.Mesh) -> None:
    """Refuse cells of zero area (volume): collinear (coplanar) nodes make ``K`` singular, and
    the solve failed with a message about the modulus. Collective."""
    tdim = msh.topology.dim
    nodes = msh.geometry.dofmap
    x = msh.geometry.x
    edges = x[nodes[:, 1:]] - x[nodes[:, :1]]  # (cells, tdim, 3)
    size = (np.linalg.norm(np.cross(edges[:, 0], edges[:, 1]), axis=1) if tdim == 2
            else np.abs(np.linalg.det(edges)))
    total = msh.comm.allreduce((float(size.sum()), len(size)), op=MPI.SUM)
    bad = np.flatnonzero(size <= 1e-10 * total[0] / max(total[1], 1))
    first = (None if len(bad) == 0 else
             np.asarray(msh.geometry.input_global_indices)[nodes[bad[0]]].tolist())
    counts = msh.comm.allgather((len(bad), first))
    count = sum(c for c, _ in counts)
    if count:
        example = next(f for c, f in counts if c)
        what = "area (collinear nodes)" if tdim == 2 else "volume (coplanar nodes)"
        raise on_every_rank(ValueError(
            f"the mesh has {count} cell(s) of zero {what}, e.g. the cell of nodes "
            f"{', '.join(map(str, example))} (0-based, file order): remove or mend them"))


def _check_on_boundary(msh: mesh.Mesh, tagged: dict[int, np.ndarray]) -> None:
    """Refuse load or support facets (``tagged``: tag -> local facets) that are not on the
    mesh's boundary: a traction there is never applied (the load's work is zero) and a support
    there holds inner nodes, and the solve runs without a word. Collective."""
    fdim = msh.topology.dim - 1
    msh.topology.create_connectivity(fdim, fdim + 1)
    exterior = mesh.exterior_facet_indices(msh.topology)
    owned = msh.topology.index_map(fdim).size_local  # a shared facet: its owner checks it
    inner = {tag: f[(f < owned) & ~np.isin(f, exterior)] for tag, f in tagged.items()}
    example = next(((tag, f[:1]) for tag, f in inner.items() if len(f)), None)
    if example is not None:
        nodes = mesh.entities_to_geometry(msh, fdim, example[1].astype(np.int32), False)[0]
        example = (example[0], np.asarray(msh.geometry.input_global_indices)[nodes].tolist())
    found = msh.comm.allgather((sum(len(f) for f in inner.values()), example))
    count = sum(c for c, _ in found)
    if count:
        tag, nodes = next(e for _, e in found if e is not None)
        raise on_every_rank(ValueError(
            f"the mesh marks {count} load or support facet(s) inside it, not on its boundary, "
            f"e.g. the {'load' if tag == LOAD else 'support'} facet of nodes "
            f"{', '.join(map(str, sorted(nodes)))} (0-based, file order): a traction there is "
            "never applied and a support there holds inner nodes; mark boundary facets only"))


def _check_parts_supported(msh: mesh.Mesh, support: np.ndarray) -> None:
    """Refuse a mesh of which a connected part (cells joined through shared facets: faces in
    3-D, edges in 2-D) has no support facet: ``K`` is singular there (a part held only by a node
    or an edge turns about it) and a solve returns garbage without a word.

    Each rank labels the parts of its local cells; rank 0 joins the labels through the global
    numbers of the facets that may be shared with another rank (those with one local cell, and
    with ghost cells those of a ghost cell) and says how many parts there are and how many touch
    no support facet. Collective."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    tdim = msh.topology.dim
    msh.topology.create_connectivity(tdim - 1, tdim)
    facets = msh.topology.index_map(tdim - 1)
    n_owned = msh.topology.index_map(tdim).size_local
    n_cells = n_owned + msh.topology.index_map(tdim).num_ghosts
    f2c = msh.topology.connectivity(tdim - 1, tdim)
    offsets, links = f2c.offsets, f2c.array
    counts = np.diff(offsets)
    inner = offsets[:-1][counts == 2]
    graph = sparse.coo_matrix((np.ones(len(inner)), (links[inner], links[inner + 1])),
                              shape=(n_cells, n_cells))
    n_local, local = connected_components(graph, directed=False)
    touched = np.zeros(n_local, dtype=bool)
    touched[local[links[offsets[np.asarray(support, dtype=np.int64)]]]] = True
    ghostly = np.zeros(len(counts), dtype=bool)  # a facet of a ghost cell
    ghostly[np.repeat(np.arange(len(counts)), counts)[links >= n_owned]] = True
    shared = np.flatnonzero((counts == 1) | ghostly).astype(np.int32)
    glob = facets.local_to_global(shared).astype(np.int64)
    gathered = msh.comm.gather((glob, local[links[offsets[shared]]], touched), root=0)
    problem = None
    if msh.comm.rank == 0:
        keys, rows = np.unique(np.concatenate([g for g, _, _ in gathered]), return_inverse=True)
        parts = np.cumsum([0] + [len(t) for _, _, t in gathered])
        cols = np.concatenate([len(keys) + o + lab
                               for (_, lab, _), o in zip(gathered, parts[:-1], strict=True)])
        size = len(keys) + int(parts[-1])
        joined = sparse.coo_matrix((np.ones(len(rows)), (rows.ravel(), cols)), shape=(size, size))
        _, label = connected_components(joined, directed=False)
        label = label[len(keys):]  # the parts of the mesh: the labels of the local parts
        n_parts = len(np.unique(label))
        supported = np.unique(label[np.concatenate([t for _, _, t in gathered])])
        loose = int(n_parts - len(supported))
        if loose:
            them = "it" if loose == 1 else "them"
            joints = "faces: a shared node or edge" if tdim == 3 else "edges: a shared node"
            problem = (f"the mesh has {n_parts} separate parts (cells joined through shared "
                       f"{joints} lets a part turn) and {loose} of them "
                       f"touch{'es' if loose == 1 else ''} no support facet: "
                       f"{'its' if loose == 1 else 'their'} displacement is undetermined; "
                       f"remove {them} or connect {them} to a supported part")
    problem = msh.comm.bcast(problem, root=0)
    raise_shared(msh.comm, problem and ("ValueError", problem), collective=False)


def _file_nodes(domain: Domain, geometry_nodes: np.ndarray) -> np.ndarray:
    """File indices of geometry nodes (an array of any shape)."""
    if domain.grid is None:
        return np.asarray(domain.mesh.geometry.input_global_indices,
                          dtype=np.int64)[geometry_nodes]
    x = domain.mesh.geometry.x[geometry_nodes.ravel()]
    return domain.grid.pixel_index(x).reshape(geometry_nodes.shape)


def p1_input_indices(V: fem.FunctionSpace) -> np.ndarray:
    """The mesh-input (file) index of every local node of a P1 space on a first-order mesh.

    P1 dofs and geometry nodes sit on the same vertices in the same cell-local order, so the
    cell-wise dofmaps pair them; ``input_global_indices`` leads from geometry nodes to the file.
    """
    msh = V.mesh
    index_map = V.dofmap.index_map
    n_local = index_map.size_local + index_map.num_ghosts
    dofs = V.dofmap.list
    nodes = msh.geometry.dofmap
    if dofs.shape != nodes.shape:
        raise ValueError("file node order needs a P1 space on a first-order (linear) mesh")
    out = np.full(n_local, -1, dtype=np.int64)
    out[dofs.ravel()] = np.asarray(msh.geometry.input_global_indices,
                                   dtype=np.int64)[nodes.ravel()]
    if (out < 0).any():
        raise RuntimeError("some P1 dofs are not attached to any local cell")
    return out


def mesh_bounds(msh: mesh.Mesh) -> tuple[np.ndarray, np.ndarray]:
    """The global bounding box ``(lower, upper)`` of a distributed mesh's nodes (a rank without
    nodes included). Collective."""
    gdim = msh.geometry.dim
    x = msh.geometry.x[:, :gdim]
    local_min = x.min(axis=0) if len(x) else np.full(gdim, np.inf)
    local_max = x.max(axis=0) if len(x) else np.full(gdim, -np.inf)
    lower, upper = np.empty(gdim), np.empty(gdim)
    msh.comm.Allreduce(local_min, lower, op=MPI.MIN)
    msh.comm.Allreduce(local_max, upper, op=MPI.MAX)
    return lower, upper


def _depth_facets(msh: mesh.Mesh, top: bool) -> np.ndarray:
    """Boundary facets on the plane of the largest (``top``) or smallest depth coordinate."""
    lower, upper = mesh_bounds(msh)
    axis = msh.geometry.dim - 1
    level = upper[axis] if top else lower[axis]
    tol = 1e-10 * float(np.max(upper - lower))
    return mesh.locate_entities_boundary(msh, msh.topology.dim - 1,
                                         lambda p: np.isclose(p[axis], level, atol=tol))


def _tagged_mesh(comm: MPI.Comm, points, cells, gdim: int, load=None, support=None):
    """``(mesh, facet tags or None, names)`` from checked arrays on rank 0: ``load`` /
    ``support`` boundary facets as node lists (``None``: not given, the depth axis decides).
    Collective."""
    from dolfinx.graph import adjacencylist
    from dolfinx.io import distribute_entity_data

    on_root(comm, lambda: _check_marked(load, support, cells))
    msh = _create_mesh(comm, points, cells, gdim)
    root = comm.rank == 0
    fdim = gdim - 1
    msh.topology.create_connectivity(fdim, gdim)
    given = {name: facets for name, facets in (("load", load), ("support", support))
             if comm.bcast(facets is not None if root else None, root=0)}
    tags, names = None, {}
    if given:
        entities = [np.asarray(given[n], np.int64) if root else np.zeros((0, gdim), np.int64)
                    for n in given]
        values = [np.full(len(e), LOAD if n == "load" else SUPPORT, np.int32)
                  for n, e in zip(given, entities, strict=True)]
        local, local_values = distribute_entity_data(msh, fdim, np.vstack(entities),
                                                     np.concatenate(values))
        tags = mesh.meshtags_from_entities(msh, fdim, adjacencylist(local.astype(np.int32)),
                                           local_values.astype(np.int32))
        names = {n: LOAD if n == "load" else SUPPORT for n in given}
    return msh, tags, names


def _tag_values_problem(path: Path, found: list[int], where: str, warn: bool = True,
                        what: str = "mesh file") -> str | None:
    """Facet tags that hold neither 1 (load) nor 2 (support): the problem, or None. Other
    values beside them are left free, with a warning (``warn``: on the rank that reports)."""
    if not found:
        return None
    if not {LOAD, SUPPORT} & set(found):
        return (f"{what} {str(path)!r}: its facet tags ({where}) hold the values "
                f"{', '.join(map(str, found))}, and a mesh file's facet numbers are read as "
                f"{LOAD} = load, {SUPPORT} = support: renumber them, or name the groups or sets "
                "'load' and 'support' (gmsh .msh, Abaqus, MED)")
    others = sorted(set(found) - {LOAD, SUPPORT})
    if others and warn:
        warnings.warn(f"{what} {str(path)!r}: its facet tags ({where}) hold "
                      f"{', '.join(map(str, others))} beside {LOAD} (load) and {SUPPORT} "
                      "(support); those facets are left free. If the numbers are not load and "
                      "support markers (a mesher's own curve numbers), renumber them",
                      UserWarning, stacklevel=3)
    return None


def _create_mesh(comm: MPI.Comm, points, cells, gdim: int) -> mesh.Mesh:
    """A P1 triangle/tetrahedron mesh from checked points and 0-based cells given on rank 0
    (ignored elsewhere), distributed over ``comm``. Collective."""
    import basix.ufl
    import ufl

    cell = "triangle" if gdim == 2 else "tetrahedron"
    element = ufl.Mesh(basix.ufl.element("Lagrange", cell, 1, shape=(gdim,)))
    root = comm.rank == 0
    x = np.asarray(points, dtype=np.float64) if root else np.zeros((0, gdim))
    topology = (np.asarray(cells, dtype=np.int64) if root
                else np.zeros((0, gdim + 1), dtype=np.int64))
    return mesh.create_mesh(comm, topology, x, element)


def _checked_arrays(path: Path, points, cells: np.ndarray) -> np.ndarray:
    """The points of a mesh file's arrays (``points``: the array or a function giving it) once
    they are whole (:class:`MeshArrays`) and its cells sound (:func:`check_cells`: no repeated
    nodes, zero sizes or folds, which DOLFINx does not check and on which it crashes under
    MPI); a problem is a ``ValueError`` naming the file. Serial, before the mesh is built."""
    try:
        points = points() if callable(points) else points
        empty = np.zeros((0, points.shape[1]), np.int64)
        MeshArrays(points, cells, empty, empty)  # raises if malformed
        check_cells(points, cells)
    except ValueError as error:
        raise ValueError(f"mesh file {str(path)!r}: {error}") from None
    return points


def read_mesh(path: str | os.PathLike, comm: MPI.Comm):
    """``(mesh, facet_tags or None, names)`` from a gmsh ``.msh``, an XDMF file or another format
    that meshio reads (:data:`_MESHIO_SUFFIXES`). Collective.

    ``names`` maps the physical names ``load``/``support`` to their tag values. Errors (missing
    file, unknown suffix, unreadable content) are raised on every rank with one clear line.
    """
    path = Path(path)
    problem = None
    if comm.rank == 0:
        if not path.is_file():
            problem = f"mesh file {str(path)!r} does not exist"
        elif path.suffix.lower() not in _MESH_SUFFIXES + _MESHIO_SUFFIXES:
            problem = (f"mesh file {str(path)!r} has an unknown suffix; use a gmsh .msh, an "
                       f".xdmf or a {', '.join(_MESHIO_SUFFIXES)} file")
    raise_shared(comm, problem and ("ValueError", problem))
    if path.suffix.lower() == ".msh":
        return _read_gmsh(path, comm)
    if path.suffix.lower() == ".xdmf":
        return _read_xdmf(path, comm)
    return _read_meshio(path, comm)


def _read_gmsh(path: Path, comm: MPI.Comm):
    import gmsh

    from dolfinx.io import gmshio

    problem, gdim, names = None, 0, {}
    if comm.rank == 0:
        if not gmsh.isInitialized():
            gmsh.initialize(["-noenv"], readConfigFiles=False)
        gmsh.option.setNumber("General.Terminal", 0)
        gmsh.clear()
        try:
            gmsh.merge(str(path))
            gdim = gmsh.model.getDimension()
            if gdim not in (2, 3):
                problem = (f"mesh file {str(path)!r} holds no 2-D or 3-D cells (dimension "
                           f"{gdim})")
            elif not gmsh.model.getPhysicalGroups(gdim):
                problem = (f"mesh file {str(path)!r} has no physical group of dimension {gdim}: "
                           "DOLFINx reads only cells in physical groups (add e.g. Physical "
                           f"{'Surface' if gdim == 2 else 'Volume'}(\"tissue\") to the .geo)")
            others = []
            groups = gmsh.model.getPhysicalGroups(gdim - 1) if gdim else []
            twice = _twice_named(gmsh.model.getPhysicalName(d, t) for d, t in groups)
            if twice:
                problem = problem or (f"mesh file {str(path)!r} has two boundary groups named "
                                      f"{twice!r} (in some case): merge them into one")
            for dim, tag in groups:
                name = gmsh.model.getPhysicalName(dim, tag)
                if _role(name):  # any case: "Load", "SUPPORT"
                    names[name.lower()] = tag
                else:
                    others.append(name or str(tag))
            problem = (problem or _gmsh_cell_problem(gmsh, gdim, path)
                       or _gmsh_shared_cells_problem(gmsh, gdim, path)
                       or _gmsh_empty_group_problem(path, gdim, names)
                       or _gmsh_node_problem(gmsh, gdim, path)
                       or _gmsh_group_problem(gmsh, gdim, names, path))
            if not problem:
                try:
                    _checked_arrays(path, *_gmsh_arrays(gmsh, gdim))
                except ValueError as error:  # one line, not inside "cannot read" below
                    problem = str(error)
            if not problem and others and not names:
                warnings.warn(f"mesh file {str(path)!r} has boundary groups {', '.join(others)} "
                              "but none named 'load' or 'support': the load goes on the top "
                              "(largest depth coordinate) and the support on the bottom; name "
                              "the groups 'load' and 'support' to choose them", UserWarning,
                              stacklevel=2)
            elif not problem and len(names) == 1:
                given, = names
                missing, where = (("support", "bottom (smallest") if given == "load" else
                                  ("load", "top (largest"))
                warnings.warn(f"mesh file {str(path)!r} has a '{given}' group but no "
                              f"'{missing}' group: the {missing} goes on the {where} depth "
                              f"coordinate); name a '{missing}' group to choose it", UserWarning,
                              stacklevel=2)
        except Exception as error:  # gmsh raises plain Exception with its log message
            problem = f"cannot read mesh file {str(path)!r}: {error}"
    raise_shared(comm, problem and ("ValueError", problem))
    gdim, names = comm.bcast((gdim, names), root=0)
    unused = [] if comm.rank else [(d, t) for d, t in gmsh.model.getPhysicalGroups(gdim - 1)
                                   if t not in names.values()]
    if unused:  # other boundary groups are unused, and DOLFINx keeps one tag per facet: a
        # 'walls' group over the top took the load's facets when its physical tag was smaller
        gmsh.model.removePhysicalGroups(unused)  # (an empty list would remove every group)
    msh, _, facet_tags = gmshio.model_to_mesh(gmsh.model if comm.rank == 0 else None, comm, 0,
                                              gdim=gdim)
    if comm.rank == 0:
        gmsh.clear()
    return msh, facet_tags, names


def _gmsh_arrays(gmsh, gdim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(points, 0-based cells)`` of the cells in the physical groups of dimension ``gdim``
    (nodes numbered 1..N without gaps: :func:`_gmsh_node_problem` checked)."""
    tags, coordinates, _ = gmsh.model.mesh.getNodes()
    points = np.empty((len(tags), 3))
    points[np.asarray(tags, dtype=np.int64) - 1] = np.asarray(coordinates).reshape(-1, 3)
    cells = [np.asarray(nodes, dtype=np.int64).reshape(-1, gdim + 1) - 1
             for _, group in gmsh.model.getPhysicalGroups(gdim)
             for entity in gmsh.model.getEntitiesForPhysicalGroup(gdim, group)
             for kind, _, nodes in zip(*gmsh.model.mesh.getElements(gdim, entity), strict=True)
             if kind == _GMSH_CELLS[gdim]]
    return points[:, :gdim], np.vstack(cells)


def _gmsh_shared_cells_problem(gmsh, gdim: int, path: Path) -> str | None:
    """Cell groups that share entities (a "tissue" of every surface beside an "inclusion" of
    one), or None: DOLFINx's reader takes each group's cells, so shared cells come twice and
    the mesh is broken (it crashed)."""
    owner, shared = {}, []
    for _, group in gmsh.model.getPhysicalGroups(gdim):
        name = gmsh.model.getPhysicalName(gdim, group) or str(group)
        for entity in gmsh.model.getEntitiesForPhysicalGroup(gdim, group):
            if entity in owner:
                shared.append((owner[entity], name, int(entity)))
            owner.setdefault(entity, name)
    if not shared:
        return None
    first, second, entity = shared[0]
    kind = "surface" if gdim == 2 else "volume"
    return (f"mesh file {str(path)!r}: the cell groups {first!r} and {second!r} share {kind} "
            f"{entity}, so its cells would be read twice: put each {kind} in one physical group "
            "(the package reads the cells of every group, whatever their names)")


def _gmsh_cell_problem(gmsh, gdim: int, path: Path) -> str | None:
    """Cells other than first-order triangles/tetrahedra, or a 2-D mesh outside the x-y plane
    (DOLFINx would read its x and y only), or None."""
    kinds = set()
    for _, group in gmsh.model.getPhysicalGroups(gdim):
        for entity in gmsh.model.getEntitiesForPhysicalGroup(gdim, group):
            kinds.update(int(k) for k in gmsh.model.mesh.getElementTypes(gdim, entity))
    wanted = _GMSH_CELLS[gdim]
    if kinds - {wanted}:
        found = ", ".join(sorted(gmsh.model.mesh.getElementProperties(k)[0] for k in kinds))
        return (f"mesh file {str(path)!r} has {found} cells; the package takes first-order "
                f"{'triangles' if gdim == 2 else 'tetrahedra'} only: mesh it again without "
                "recombination (no Recombine) and with Mesh.ElementOrder = 1")
    if gdim == 2:
        problem = _off_plane(np.asarray(gmsh.model.mesh.getNodes()[1]).reshape(-1, 3))
        if problem is not None:
            return (f"mesh file {str(path)!r} is a 2-D mesh in {problem}; 2-D meshes must lie "
                    "in the x-y plane with the depth along y: draw or rotate it there")
    return None


def _gmsh_empty_group_problem(path: Path, gdim: int, names: dict[str, int]) -> str | None:
    """A 'load' or 'support' group named in the file's ``$PhysicalNames`` (near its start, text
    even in binary files) that holds no elements (a .geo that named missing curves), or None:
    gmsh drops such a group, and the depth-axis default would silently take its place."""
    import re

    with open(path, "rb") as stream:
        head = stream.read(1 << 20)
    section = re.search(rb"\$PhysicalNames\s+\d+\s+(.*?)\$EndPhysicalNames", head, re.S)
    declared = [(int(d), name.decode(errors="replace").lower()) for d, name in re.findall(
        rb'^\s*(\d+)\s+\d+\s+"([^"]*)"', section.group(1), re.M)] if section else []
    empty = sorted({name for d, name in declared
                    if d == gdim - 1 and _role(name) and name not in names})
    if not empty:
        return None
    kind = "curve" if gdim == 2 else "surface"
    several = len(empty) > 1
    return (f"mesh file {str(path)!r} names the group{'s' if several else ''} "
            f"{' and '.join(repr(n) for n in empty)} but {'they hold' if several else 'it holds'} "
            f"no elements (the physical {kind}s it lists do not exist?): check its {kind} tags "
            "in the .geo or script and mesh it again")


def _gmsh_group_problem(gmsh, gdim: int, names: dict[str, int], path: Path) -> str | None:
    """The 'load' and 'support' groups sharing boundary entities (DOLFINx keeps one tag per
    facet, so one group would lose them), or None. (Other boundary groups are dropped before
    DOLFINx reads the file: :func:`_read_gmsh`.)"""
    if len(names) < 2:
        return None
    load, support = (set(gmsh.model.getEntitiesForPhysicalGroup(gdim - 1, names[n]))
                     for n in ("load", "support"))
    shared = sorted(load & support)
    if not shared:
        return None
    kind = "curve" if gdim == 2 else "surface"
    return (f"mesh file {str(path)!r}: the groups 'load' and 'support' overlap (they share "
            f"{len(shared)} boundary {kind}{'s' if len(shared) > 1 else ''}, gmsh tag"
            f"{'s' if len(shared) > 1 else ''} {', '.join(map(str, shared))}); a boundary part is "
            "either loaded or supported: give each group its own")


def _gmsh_node_problem(gmsh, gdim: int, path: Path) -> str | None:
    """What DOLFINx's gmsh reader cannot take (it would abort the MPI run), or None."""
    tags = np.asarray(gmsh.model.mesh.getNodes()[0], dtype=np.int64)
    if not np.array_equal(np.sort(tags), np.arange(1, len(tags) + 1)):
        return (f"mesh file {str(path)!r} numbers its nodes with gaps; renumber them in gmsh "
                "(Mesh > Renumber nodes, or -renumber) and save again")
    used = set()
    for _, group in gmsh.model.getPhysicalGroups(gdim):
        for entity in gmsh.model.getEntitiesForPhysicalGroup(gdim, group):
            for nodes in gmsh.model.mesh.getElements(gdim, entity)[2]:
                used.update(np.asarray(nodes, dtype=np.int64).tolist())
    if len(used) < len(tags):
        return (f"mesh file {str(path)!r} has {len(tags) - len(used)} node(s) that no cell of a "
                f"{gdim}-D physical group uses (a Physical Point, or cells outside the physical "
                "groups?); DOLFINx cannot read such a file: remove them and save again")
    return None


def _xdmf_grids(path: Path) -> list[tuple[str, str, bool]]:
    """``(name, topology type, has an attribute)`` of each grid of an XDMF file's domain (none
    when its XML does not parse: the XDMF readers then say what is wrong). An HDF5 file that
    it refers to is refused in one line when missing, unless the one of the same name is there
    (which DOLFINx reads whatever the reference says). Serial."""
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError):
        return []
    for item in root.iter("DataItem"):
        if item.get("Format", "").upper() == "HDF" and ":" in (item.text or ""):
            h5 = path.parent / item.text.strip().rsplit(":", 1)[0]
            if not h5.is_file() and not path.with_suffix(".h5").is_file():  # DOLFINx's
                raise ValueError(f"mesh file {str(path)!r} keeps its data in {str(h5)!r}, "
                                 "which does not exist: copy that file beside it")
    grids = []
    for grid in root.iterfind("Domain/Grid"):
        topology = grid.find("Topology")
        grids.append((grid.get("Name", ""),
                      "" if topology is None else topology.get("TopologyType", ""),
                      grid.find("Attribute") is not None))
    return grids


def _xdmf_arrays(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """``(points, cells)`` of the grid ``mesh`` of a DOLFINx-written XDMF file of P1 triangles
    or tetrahedra (data in HDF5), or None for another layout (its reader then says what is
    wrong). Serial."""
    import xml.etree.ElementTree as ElementTree

    import h5py

    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError):
        return None
    grid = next((g for g in root.iterfind("Domain/Grid") if g.get("Name") == "mesh"), None)
    arrays = []
    for part in ("Geometry", "Topology"):
        item = None if grid is None else grid.find(f"{part}/DataItem")
        if item is None or item.get("Format", "").upper() != "HDF" or ":" not in (item.text or ""):
            return None
        name, dataset = item.text.strip().rsplit(":", 1)
        h5 = path.parent / name
        try:
            with h5py.File(h5 if h5.is_file() else path.with_suffix(".h5"), "r") as file:
                arrays.append(np.asarray(file[dataset]))
        except (OSError, KeyError, TypeError):
            return None
    points, cells = arrays
    if points.ndim == 2 and cells.ndim == 2 and cells.shape[1] == 3 and points.shape[1] == 3:
        try:
            points = planar_points(points, 3)  # a 2-D mesh stored with a zero z
        except ValueError:  # off the x-y plane: the reader says so
            return None
    if (cells.ndim != 2 or points.ndim != 2 or cells.dtype.kind not in "iu"
            or cells.shape[1] != points.shape[1] + 1 or cells.shape[1] not in (3, 4)
            or cells.size == 0 or cells.min() < 0 or cells.max() >= len(points)):
        return None
    return points, cells.astype(np.int64)


def _xdmf_tags_name(path: Path, grids: list[tuple[str, str, bool]]) -> str | None:
    """The name of the facet tags of the grid ``mesh`` in a DOLFINx-written XDMF file:
    ``facet_tags`` (this package's), else the one grid of tagged facets whatever its name
    (``gmshio`` names its tags "Facet tags"), or None. Several candidates are refused in one
    line. (Other layouts, meshio's, are read by :func:`_read_meshio`.)"""
    facets_of = {"triangle": "polyline", "tetrahedron": "triangle"}
    cells = next((t.lower() for n, t, tagged in grids if n == "mesh" and not tagged), "")
    facets = [n for n, t, tagged in grids if tagged and t.lower() == facets_of.get(cells)]
    if len(facets) > 1 and "facet_tags" not in facets:
        raise ValueError(f"mesh file {str(path)!r} holds several sets of facet tags ("
                         f"{', '.join(map(repr, facets))}); name the one that marks the load "
                         f"({LOAD}) and the support ({SUPPORT}) 'facet_tags', or keep only it")
    return None if not facets else "facet_tags" if "facet_tags" in facets else facets[0]


def _read_xdmf_tags(xdmf, msh, path: Path, name: str):
    """The facet tags ``name`` of an open DOLFINx XDMF file; a failure is a ``ValueError`` (the
    caller takes a ``RuntimeError`` for another layout). Collective."""
    try:
        return xdmf.read_meshtags(msh, name=name)
    except RuntimeError as error:
        raise on_every_rank(ValueError(f"mesh file {str(path)!r}: cannot read its facet tags "
                                       f"{name!r}: {error}")) from None


def _read_xdmf(path: Path, comm: MPI.Comm):
    from dolfinx.io import XDMFFile

    def check():
        arrays = _xdmf_arrays(path)
        if arrays is not None:
            _checked_arrays(path, *arrays)
        return _xdmf_tags_name(path, _xdmf_grids(path))

    tags_name = on_root(comm, check)
    try:
        with XDMFFile(comm, str(path), "r") as xdmf:
            msh = xdmf.read_mesh(name="mesh")
            msh.topology.create_connectivity(msh.topology.dim - 1, msh.topology.dim)
            tags = None if tags_name is None else _read_xdmf_tags(xdmf, msh, path, tags_name)
    except RuntimeError as error:  # not DOLFINx's layout: meshio's (one block of cells)?
        return _read_meshio(path, comm, error)
    cell = msh.topology.cell_type.name
    if cell not in ("triangle", "tetrahedron") or msh.geometry.cmap.degree != 1:
        order = "" if msh.geometry.cmap.degree == 1 else f"order-{msh.geometry.cmap.degree} "
        raise on_every_rank(ValueError(
            f"mesh file {str(path)!r} has {order}{cell} cells; the package takes first-order "
            "triangles or tetrahedra only: mesh it again with those"))
    names = {}
    if tags is not None:
        values = msh.comm.allgather(np.unique(tags.values).tolist())
        problem = _tag_values_problem(path, sorted(set().union(*map(set, values))),
                                      repr(tags_name), warn=msh.comm.rank == 0)
        if problem:
            raise on_every_rank(ValueError(problem))
        names = {"load": LOAD, "support": SUPPORT}
    return msh, tags, names


def read_meshio(path: str | os.PathLike):
    """``(data, blocks)``: a file read by meshio (its warnings silenced) and its blocks of
    triangles and tetrahedra. An XDMF time series (DOLFINx's ``write_function``: the mesh and
    a collection of steps) is read as its mesh with the point data of its last step. Serial."""
    import contextlib
    import io

    import meshio

    printed, series = io.StringIO(), None
    with (warnings.catch_warnings(), contextlib.redirect_stdout(printed),
          contextlib.redirect_stderr(printed)):
        warnings.simplefilter("ignore")
        try:
            data = meshio.read(path)
        except SystemExit:  # meshio 5 prints why no reader took the file, then exits
            series = _xdmf_time_series(path) if str(path).lower().endswith(".xdmf") else None
            if series is None:
                raise ValueError(" ".join(printed.getvalue().split())
                                 or "no meshio reader takes it") from None
            data, steps, time = series
    if series is not None and steps > 1:
        warnings.warn(f"{str(path)!r} holds {steps} time steps; the last (t = {time:g}) is read",
                      UserWarning, stacklevel=2)
    return data, [b for b in data.cells if b.type in ("triangle", "tetra")]


def _xdmf_time_series(path):
    """``(mesh with the point data of the last step, steps, its time)`` of an XDMF time
    series, or None when meshio does not read it as one."""
    import meshio

    try:
        with meshio.xdmf.TimeSeriesReader(path) as reader:
            points, cells = reader.read_points_cells()
            steps = reader.num_steps
            time, point_data, _ = reader.read_data(steps - 1)
    except Exception:  # not a time series that meshio reads: the caller says so
        return None
    return meshio.Mesh(points, cells, point_data=point_data), steps, time


def _read_meshio(path: Path, comm: MPI.Comm, dolfinx_error: Exception | None = None):
    """``(mesh, facet tags or None, names)`` of a mesh file read by meshio on rank 0: an XDMF
    mesh that DOLFINx's reader does not take (``dolfinx_error``; meshio writes blocks of cells,
    2-D points with a zero z) or another format meshio reads. The load and support facets as
    :func:`_meshio_facets` finds them (``meshio convert`` of a .msh keeps the physical numbers
    as ``gmsh:physical``, not the names). Collective."""

    def read():
        try:
            data, blocks = read_meshio(path)
        except Exception as error:
            numbered = isinstance(error, KeyError) and isinstance(error.args[0], int | np.integer)
            why = (f"a cell type meshio does not know ({error.args[0]}): first-order triangles "
                   "or tetrahedra only?" if numbered else f"{type(error).__name__}: {error}"
                   if isinstance(error, KeyError) else str(error))
            raise ValueError(f"cannot read mesh file {str(path)!r}" + (
                f" as XDMF: DOLFINx: {dolfinx_error}; meshio: {why}" if dolfinx_error
                else f": {why}")) from None
        kind = ("tetra" if any(b.type in _SAME_DIMENSION["tetra"] | {"tetra"}
                               for b in data.cells) else "triangle")
        others = sorted({b.type for b in data.cells if b.type in _SAME_DIMENSION[kind]})
        if others:
            beside = f" as well as {kind}s" if any(b.type == kind for b in blocks) else ""
            raise ValueError(f"mesh file {str(path)!r} holds {', '.join(others)} cells{beside}; "
                             "the package takes first-order "
                             f"{'tetrahedra' if kind == 'tetra' else 'triangles'} only: mesh it "
                             "again without recombination and with element order 1")
        blocks = [b.data for b in blocks if b.type == kind]
        if not blocks:
            raise ValueError(f"mesh file {str(path)!r} holds no triangles or tetrahedra (cells: "
                             f"{', '.join(b.type for b in data.cells) or 'none'})")
        cells = np.vstack(blocks).astype(np.int64)
        points = _checked_arrays(path, lambda: planar_points(data.points, cells.shape[1]),
                                 cells)
        facets = _meshio_facets(data, "line" if kind == "triangle" else "triangle", cells)
        problem = _tag_values_problem(path, sorted({int(v) for _, v in facets}),
                                      "the facet cells' integer data")
        if problem:
            raise ValueError(problem)
        return (points, cells, *_load_and_support(facets))

    points, cells, load, support = on_root(comm, read)
    return _tagged_mesh(comm, points, cells, points.shape[1], load, support)


def read_facets(path: str | os.PathLike, points: np.ndarray, cells: np.ndarray
                ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The load and support facets ``(F, gdim)`` (``None``: none in the file) of the mesh
    ``points``/``cells`` from a second file read by meshio (XDMF, VTK, ...), marked as in a
    mesh file (:func:`_meshio_facets`: sets or groups named ``load``/``support``, node sets
    too, or facet numbers 1 / 2). Its points are matched to the mesh's nodes by coordinates (to
    1e-9 of the mesh's size), so the two files may number nodes differently; every marked
    facet must be a boundary facet of the mesh. Serial."""
    import meshio
    from scipy.spatial import cKDTree

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"facets file {str(path)!r} does not exist")
    try:
        data, _ = read_meshio(path)
    except Exception as error:
        raise ValueError(f"cannot read facets file {str(path)!r}: {error}") from None
    gdim = points.shape[1]
    file_points = np.asarray(data.points, dtype=np.float64)
    if gdim == 2 and file_points.shape[1] == 3 and np.ptp(file_points[:, 2]) == 0.0:
        file_points = file_points[:, :2]  # 2-D facets stored with a constant z
    lookup = np.full(len(file_points), -1, dtype=np.int64)  # facets file node -> mesh node
    if file_points.shape[1] == gdim and len(file_points):
        distance, nearest = cKDTree(points).query(file_points)
        size = float(np.ptp(points, axis=0).max())
        lookup = np.where(distance <= 1e-9 * size, nearest, -1)
    # the file in the mesh's numbering (a node off the mesh: -1), its sets and groups kept
    node_sets = {**data.point_sets, **_med_node_sets(data)}
    renumbered = meshio.Mesh(points, [(b.type, lookup[b.data]) for b in data.cells],
                             cell_data=data.cell_data, cell_sets=data.cell_sets,
                             point_sets={k: lookup[np.asarray(v, np.int64)]
                                         for k, v in node_sets.items()})
    renumbered.cell_tags = getattr(data, "cell_tags", None) or {}
    facets = _meshio_facets(renumbered, "line" if gdim == 2 else "triangle", cells)
    problem = _tag_values_problem(path, sorted({v for _, v in facets}),
                                  "the facet cells' integer data", what="facets file")
    if problem or not facets:
        raise ValueError(problem or f"facets file {str(path)!r} holds no "
                         f"{'lines' if gdim == 2 else 'triangles'} marked as load (1) or "
                         f"support (2) (cells: {', '.join(b.type for b in data.cells) or 'none'})")
    off = [f for f, _ in facets if (f < 0).any()] + [
        v for k, v in renumbered.point_sets.items() if _role(k) and (v < 0).any()]
    if off:
        raise ValueError(f"facets file {str(path)!r} marks nodes that are not nodes of the "
                         f"{gdim}-D mesh; the facets must be drawn on the mesh's nodes (the same "
                         "mesh, the same length unit)")
    return _load_and_support(facets)


def _load_and_support(facets: list[tuple[np.ndarray, int]]
                      ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The load's and the support's facets ``(F, gdim)`` of ``(nodes, value)`` pairs (``None``:
    none marked)."""
    load, support = ([f for f, v in facets if v == tag] for tag in (LOAD, SUPPORT))
    return tuple(np.vstack(f).astype(np.int64) if f else None for f in (load, support))


def _check_marked(load: np.ndarray | None, support: np.ndarray | None, cells) -> None:
    """Refuse load or support facets (node lists) that are no side of any cell (DOLFINx would
    drop them without a word) or that are marked both (it keeps one tag per facet). Whether
    they lie on the boundary :meth:`Domain.from_mesh` checks. Serial, on the arrays."""
    given = {tag: np.sort(np.asarray(f, dtype=np.int64), axis=1)
             for tag, f in ((LOAD, load), (SUPPORT, support)) if f is not None and len(f)}
    if not given:
        return
    cells = np.asarray(cells, dtype=np.int64)
    sides = _cell_sides(cells)
    _, ids = np.unique(np.vstack([sides, *given.values()]), axis=0, return_inverse=True)
    ids = ids.ravel()
    known = np.zeros(ids.max() + 1, dtype=bool)
    known[ids[:len(sides)]] = True
    start, marked = len(sides), {}
    for tag, facets in given.items():
        marked[tag] = ids[start:start + len(facets)]
        start += len(facets)
        stray = np.flatnonzero(~known[marked[tag]])
        if len(stray):
            raise ValueError(f"{len(stray)} {'load' if tag == LOAD else 'support'} facet(s) are "
                             f"no side of any cell (first: nodes "
                             f"{', '.join(map(str, facets[stray[0]]))}, 0-based): give facets as "
                             "the nodes of a cell's side (an edge in 2-D, a triangle in 3-D)")
    if len(marked) == 2:
        both = np.flatnonzero(np.isin(marked[LOAD], marked[SUPPORT]))
        if len(both):
            raise ValueError(f"{len(both)} facet(s) are marked as both load and support (first: "
                             f"nodes {', '.join(map(str, given[LOAD][both[0]]))}, 0-based): a "
                             "facet is loaded or supported; give the two parts different facets")


def _meshio_facets(data, kind: str, cells: np.ndarray | None) -> list[tuple[np.ndarray, int]]:
    """``(nodes, value)`` of the load (1) and support (2) facets of a file read by meshio: its
    sets or groups named ``load`` and ``support`` (:func:`_meshio_named_facets`), else each
    facet cell of type ``kind`` that carries an integer in the file's cell data
    (``gmsh:physical`` first, Medit's ``medit:ref``; never gmsh's geometrical entity numbers
    or MED's family numbers)."""
    named = _meshio_named_facets(data, kind, cells)
    if named:
        return named
    med = bool(getattr(data, "cell_tags", None))  # then cell_tags are MED family numbers
    keys = sorted((k for k in data.cell_data if k != "gmsh:geometrical"
                   and not (med and k == "cell_tags")
                   and not any(_role(n) for n in k.split("-"))),  # sets, not numbers
                  key=lambda k: k != "gmsh:physical")
    facets = []
    for k, block in enumerate(data.cells):
        if block.type != kind:
            continue
        for key in keys:
            values = np.asarray(data.cell_data[key][k])
            if values.ndim == 1 and values.dtype.kind in "iu" and len(values) == len(block.data):
                facets += list(zip(np.asarray(block.data), values.tolist(), strict=True))
                break
    return facets


def _role(name) -> int | None:
    """``LOAD``/``SUPPORT`` for a set named ``load``/``support`` in any case, else None."""
    return {"load": LOAD, "support": SUPPORT}.get(str(name).lower())


def _twice_named(names) -> str | None:
    """``"load"`` or ``"support"`` when two of ``names`` give that role (in any case), else
    None."""
    roles = [str(n).lower() for n in names if _role(n)]
    return next((r for r in roles if roles.count(r) > 1), None)


def _meshio_named_facets(data, kind: str, cells: np.ndarray | None
                         ) -> list[tuple[np.ndarray, int]]:
    """The facets in sets named ``load`` and ``support`` (any case): element sets of facet
    cells of type ``kind`` (Abaqus ``*ELSET``), MED groups of them, or such sets written to VTK
    by meshio (cell data ``load-support``: the index of the set); for a name without such
    a set, the boundary facets of ``cells`` (unless None) whose nodes all lie in a node set of
    that name (Abaqus ``*NSET``). Two sets of one name in different cases are refused."""
    for sets in (data.cell_sets, data.point_sets):
        twice = _twice_named(sets)
        if twice:
            raise ValueError(f"two sets are named {twice!r} (in some case): merge them into one")
    chosen = {LOAD: [], SUPPORT: []}
    for name, indices in data.cell_sets.items():
        if not _role(name):
            continue
        for block, index in zip(data.cells, indices, strict=False):
            if block.type == kind and index is not None and len(index):
                chosen[_role(name)] += list(block.data[np.asarray(index, np.int64)])
    for key, arrays in data.cell_data.items():  # sets that meshio's VTK writer turned into
        names = key.split("-")  # cell data "load-support": value i = names[i], -1 = none
        if not any(_role(n) for n in names):
            continue
        arrays = [np.asarray(values) for values in arrays]
        found = set().union(*(np.unique(v).tolist() for v in arrays))  # all blocks: one rule
        if not found <= set(range(-1, len(names))) | {1}:
            raise ValueError(f"cell data {key!r} holds {sorted(found)}: a set's cell data holds "
                             "the set's index (-1: none), or 1 / 0 for one set")
        indicator = len(names) == 1 and -1 not in found  # 1 = in the set, 0 = not
        entities = data.cell_data.get("gmsh:geometrical", [None] * len(data.cells))
        shown = set()
        for block, values, numbers in zip(data.cells, arrays, entities, strict=False):
            if block.type != kind or values.ndim != 1:
                continue
            roles = np.array([_role(names[0] if value == 1 else None) if indicator else
                              _role(names[value]) if 0 <= value < len(names) else None
                              for value in values.tolist()], dtype=object)
            shown |= set(roles.tolist()) - {None}
            if numbers is not None and len(numbers) == len(values) and not indicator:
                roles = _roles_by_entity(roles, np.asarray(numbers), values, names, key)
            for nodes, role in zip(block.data, roles, strict=True):
                if role is not None:
                    chosen[role].append(nodes)
        hidden = sorted({n for n in names if _role(n) and _role(n) not in shown})
        if hidden:  # the depth default would take its place: refused, not guessed
            raise ValueError(f"cell data {key!r} names the set(s) {', '.join(hidden)}, but no "
                             "facet shows them: meshio keeps one set per facet, and a later set "
                             "covers them; read the .msh itself, or give them their own cell "
                             "data")
    families = _med_families(getattr(data, "cell_tags", None))
    for block, numbers in zip(data.cells, data.cell_data.get("cell_tags", []) if families
                              else [], strict=False):
        if block.type == kind:
            for nodes, number in zip(block.data, np.asarray(numbers).tolist(), strict=True):
                if number in families:
                    chosen[families[number]].append(nodes)
    node_sets = {_role(name): np.asarray(nodes, np.int64) for name, nodes in
                 {**data.point_sets, **_med_node_sets(data)}.items()
                 if _role(name) and not chosen[_role(name)]}
    if node_sets and cells is not None:
        boundary = _boundary_facets(cells)
        for value, nodes in node_sets.items():
            chosen[value] += list(boundary[np.isin(boundary, nodes).all(axis=1)])
    return [(nodes, value) for value in (LOAD, SUPPORT) for nodes in chosen[value]]


def _roles_by_entity(roles: np.ndarray, entities: np.ndarray, values: np.ndarray,
                     names: list[str], key: str) -> np.ndarray:
    """The roles of facet cells from meshio's sets array ``key`` (set index ``values`` into
    ``names``), completed by their gmsh entity (``gmsh:geometrical``): meshio writes the sets of
    a converted .msh as one index per cell, so a facet in ``load`` and in meshio's own
    ``gmsh:bounding_entities`` keeps only the latter, while every facet of one gmsh curve (or
    surface) is in the same groups. An entity whose other facets show one set only, a role,
    gives it to those that show a ``gmsh:`` set; one whose facets show two sets cannot say which
    such facets were in the role's, which a warning says."""
    internal = np.array([0 <= v < len(names) and names[v].startswith("gmsh:")
                         for v in values.tolist()], dtype=bool)
    out = roles.copy()
    for entity in np.unique(entities):
        here = entities == entity
        shown = {names[v] for v in values[here & ~internal].tolist() if 0 <= v < len(names)}
        hidden = here & internal
        if not hidden.any() or not any(_role(n) for n in shown):
            continue
        if len(shown) == 1:
            out[hidden] = _role(shown.pop())
        else:
            warnings.warn(f"cell data {key!r}: {int(hidden.sum())} facet(s) of gmsh entity "
                          f"{entity} show only a gmsh set, and the entity's others show "
                          f"{', '.join(sorted(shown))}: meshio keeps one set per facet, so some "
                          "load or support facets may be missing; read the .msh itself",
                          UserWarning, stacklevel=4)
    return out


def _med_families(tags) -> dict[int, int]:
    """MED: family number -> ``LOAD``/``SUPPORT`` from its groups (meshio's ``cell_tags`` or
    ``point_tags``: number -> group names); a family in both groups is refused."""
    families = {}
    for family, groups in (tags or {}).items():
        roles = {_role(g) for g in groups} - {None}
        if len(roles) > 1:
            raise ValueError(f"MED family {family} is in both a 'load' and a 'support' group: "
                             "a facet is loaded or supported")
        if roles:
            families[family] = roles.pop()
    return families


def _med_node_sets(data) -> dict[str, np.ndarray]:
    """MED node groups named load/support as node sets (meshio: ``point_tags`` and the
    ``point_tags`` point data of family numbers)."""
    families = _med_families(getattr(data, "point_tags", None))
    numbers = data.point_data.get("point_tags")
    if not families or numbers is None:
        return {}
    numbers = np.asarray(numbers)
    return {("load" if role == LOAD else "support"):
            np.flatnonzero(np.isin(numbers, [f for f, r in families.items() if r == role]))
            for role in set(families.values())}


def _cell_sides(cells: np.ndarray) -> np.ndarray:
    """Every side of every cell (its node list, sorted), once per cell it bounds."""
    n = cells.shape[1]
    return np.sort(np.vstack([np.delete(cells, i, axis=1) for i in range(n)]), axis=1)


def _boundary_facets(cells: np.ndarray) -> np.ndarray:
    """The facets (node lists, sorted) that belong to one cell only: the boundary."""
    unique, counts = np.unique(_cell_sides(cells), axis=0, return_counts=True)
    return unique[counts == 1]
