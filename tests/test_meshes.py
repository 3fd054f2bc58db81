"""Specification of the gmsh meshes shipped in meshes/ (made from the .geo files by `make meshes`).

Every mesh is in millimetres, with the depth axis last (y in 2-D, z in 3-D) and the probe at the
top. Physical groups by name: facets "load" (the probe) and "support" (the deep boundary), cells
"tissue". DOLFINx 0.9's gmshio.read_from_msh returns tags as numbers only, so the names come from
the same file through meshio. Runs serially and under mpirun -n 2: global counts are summed over
the ranks' owned entities.
"""

from pathlib import Path

from mpi4py import MPI

import meshio
import numpy as np
import pytest

import ufl
from dolfinx import fem
from dolfinx import mesh as dmesh
from dolfinx.io import gmshio

MESHES = Path(__file__).resolve().parent.parent / "meshes"

# name: (gdim, meshio cell type of the cells, of the facets)
SPECS = {
    "roi-2d": (2, "triangle", "line"),
    "sector-2d": (2, "triangle", "line"),
    "box-3d": (3, "tetra", "triangle"),
}

SECTOR_APEX = np.array([30.0, 60.0])
SECTOR_RADII = (20.0, 60.0)
SECTOR_HALF_ANGLE = np.pi / 6


def _read(name, comm):
    """(mesh, cell_tags, facet_tags, {physical name: tag}, meshio mesh) of meshes/NAME.msh."""
    path = MESHES / f"{name}.msh"
    gdim = SPECS[name][0]
    msh, cell_tags, facet_tags = gmshio.read_from_msh(str(path), comm, rank=0, gdim=gdim)
    mio = meshio.read(path)
    names = {key: int(tag) for key, (tag, _dim) in mio.field_data.items()}
    return msh, cell_tags, facet_tags, names, mio


def _owned(msh, dim, entities):
    """The entities among ENTITIES (local indices) that this rank owns."""
    return entities[entities < msh.topology.index_map(dim).size_local]


def _global_count(comm, msh, dim, entities):
    return comm.allreduce(len(_owned(msh, dim, entities)), op=MPI.SUM)


def _facet_points(msh, facet_tags, tag):
    """Coordinates (n, 3) of the nodes of this rank's facets tagged TAG."""
    fdim = msh.topology.dim - 1
    facets = facet_tags.find(tag)
    if len(facets) == 0:  # DOLFINx 0.9 divides by zero in entities_to_geometry on empty lists
        return np.zeros((0, 3))
    nodes = dmesh.entities_to_geometry(msh, fdim, facets)
    return msh.geometry.x[nodes.reshape(-1)]


def _extent(comm, msh):
    """Global (min, max) of the node coordinates, each of length gdim."""
    x = msh.geometry.x[:, : msh.geometry.dim]
    lo, hi = np.empty(x.shape[1]), np.empty(x.shape[1])
    # Buffer reductions: the pickled allreduce cannot take MIN/MAX of numpy arrays.
    comm.Allreduce(x.min(axis=0), lo, op=MPI.MIN)
    comm.Allreduce(x.max(axis=0), hi, op=MPI.MAX)
    return lo, hi


def _measure(comm, msh):
    """Global area (2-D) or volume (3-D): the integral of 1 over the mesh."""
    one = fem.form(fem.Constant(msh, 1.0) * ufl.dx(domain=msh))
    return comm.allreduce(fem.assemble_scalar(one), op=MPI.SUM)


def _check_load_and_support_tags(comm, msh, facet_tags, names, depth_top):
    """'load' and 'support' exist and are non-empty; load facets lie at the top, support at 0."""
    assert {"load", "support", "tissue"} <= set(names)
    depth = msh.geometry.dim - 1
    for group, level in (("load", depth_top), ("support", 0.0)):
        assert _global_count(comm, msh, msh.topology.dim - 1, facet_tags.find(names[group])) > 0
        points = _facet_points(msh, facet_tags, names[group])
        assert np.allclose(points[:, depth], level, atol=1e-9), group


# ---------------------------------------------------------------- roi-2d


def test_roi_mesh_is_a_40_by_30_mm_rectangle_of_triangles(comm):
    msh, _, _, _, _ = _read("roi-2d", comm)
    assert msh.geometry.dim == 2 and msh.topology.dim == 2
    assert msh.topology.cell_type == dmesh.CellType.triangle
    lo, hi = _extent(comm, msh)
    assert np.allclose(lo, [0.0, 0.0]) and np.allclose(hi, [40.0, 30.0])
    assert _measure(comm, msh) == pytest.approx(40.0 * 30.0, rel=1e-10)
    nodes = msh.geometry.index_map().size_global
    assert 2000 <= nodes <= 5000


def test_roi_mesh_has_load_on_top_and_support_at_bottom(comm):
    msh, _, facet_tags, names, _ = _read("roi-2d", comm)
    _check_load_and_support_tags(comm, msh, facet_tags, names, depth_top=30.0)


def test_roi_mesh_is_refined_in_a_disc_of_radius_5_mm_around_the_centre(comm):
    msh, _, _, _, _ = _read("roi-2d", comm)
    tdim = msh.topology.dim
    cells = np.arange(msh.topology.index_map(tdim).size_local, dtype=np.int32)
    sizes = msh.h(tdim, cells)  # longest edge of each cell
    centres = dmesh.compute_midpoints(msh, tdim, cells)[:, :2]
    r = np.linalg.norm(centres - [20.0, 15.0], axis=1)
    inside_max = comm.allreduce(sizes[r < 4.0].max(initial=0.0), op=MPI.MAX)
    outside = comm.allgather(sizes[r > 8.0])
    # Longest edges: target 0.45 mm inside (0.58 at most), 0.9 mm outside (median 0.90).
    assert 0.0 < inside_max < 0.7
    assert np.median(np.concatenate(outside)) > 0.8


# ---------------------------------------------------------------- sector-2d


def test_sector_mesh_is_a_60_degree_annular_sector_between_radii_20_and_60_mm(comm):
    msh, _, _, _, _ = _read("sector-2d", comm)
    assert msh.geometry.dim == 2 and msh.topology.dim == 2
    assert msh.topology.cell_type == dmesh.CellType.triangle
    x = msh.geometry.x[:, :2] - SECTOR_APEX
    r = np.linalg.norm(x, axis=1)
    angle = np.arctan2(x[:, 0], -x[:, 1])  # from the downward vertical
    assert np.all(r >= SECTOR_RADII[0] - 1e-9) and np.all(r <= SECTOR_RADII[1] + 1e-9)
    assert np.all(np.abs(angle) <= SECTOR_HALF_ANGLE + 1e-9)
    lo, hi = _extent(comm, msh)
    assert np.all(lo >= -1e-12) and np.allclose(lo, [0.0, 0.0])  # deepest point y = 0
    top = SECTOR_APEX[1] - SECTOR_RADII[0] * np.cos(SECTOR_HALF_ANGLE)
    assert np.allclose(hi, [60.0, top])
    exact = SECTOR_HALF_ANGLE * (SECTOR_RADII[1] ** 2 - SECTOR_RADII[0] ** 2)
    # The arcs are polygons: the chords lose about h^3/(12 r) each, well under 0.1 %.
    assert _measure(comm, msh) == pytest.approx(exact, rel=1e-3)
    nodes = msh.geometry.index_map().size_global
    assert 1000 <= nodes <= 4000


def test_sector_mesh_has_load_on_the_probe_arc_and_support_on_the_deep_arc(comm):
    msh, _, facet_tags, names, _ = _read("sector-2d", comm)
    assert {"load", "support", "tissue"} <= set(names)
    for group, radius in (("load", SECTOR_RADII[0]), ("support", SECTOR_RADII[1])):
        assert _global_count(comm, msh, 1, facet_tags.find(names[group])) > 0
        points = _facet_points(msh, facet_tags, names[group])[:, :2]
        assert np.allclose(np.linalg.norm(points - SECTOR_APEX, axis=1), radius), group


# ---------------------------------------------------------------- box-3d


def test_box_mesh_is_a_30_by_30_by_20_mm_block_of_tetrahedra(comm):
    msh, _, _, _, _ = _read("box-3d", comm)
    assert msh.geometry.dim == 3 and msh.topology.dim == 3
    assert msh.topology.cell_type == dmesh.CellType.tetrahedron
    lo, hi = _extent(comm, msh)
    assert np.allclose(lo, [0.0, 0.0, 0.0]) and np.allclose(hi, [30.0, 30.0, 20.0])
    assert _measure(comm, msh) == pytest.approx(30.0 * 30.0 * 20.0, rel=1e-10)
    assert msh.geometry.index_map().size_global < 2000  # small enough for tests under MPI


def test_box_mesh_has_load_on_top_and_support_at_bottom(comm):
    msh, _, facet_tags, names, _ = _read("box-3d", comm)
    _check_load_and_support_tags(comm, msh, facet_tags, names, depth_top=20.0)


# ---------------------------------------------------------------- all meshes


@pytest.mark.parametrize("name", sorted(SPECS))
def test_mesh_has_the_nodes_and_cells_of_its_msh_file(comm, name):
    """DOLFINx reads every node and cell of the file (no orphan nodes, nothing dropped)."""
    msh, _, _, _, mio = _read(name, comm)
    _gdim, cell_type, _ = SPECS[name]
    tdim = msh.topology.dim
    assert msh.geometry.index_map().size_global == len(mio.points)
    assert msh.topology.index_map(0).size_global == len(mio.points)  # first order
    n_cells = sum(len(block.data) for block in mio.cells if block.type == cell_type)
    assert msh.topology.index_map(tdim).size_global == n_cells


@pytest.mark.parametrize("name", sorted(SPECS))
def test_mesh_tags_are_the_physical_groups_named_in_the_file(comm, name):
    """Cells all carry "tissue"; facets carry "load" or "support", as many as in the file."""
    msh, cell_tags, facet_tags, names, mio = _read(name, comm)
    _gdim, cell_type, facet_type = SPECS[name]
    tdim = msh.topology.dim
    assert set(names) == {"load", "support", "tissue"}
    assert len(set(names.values())) == 3
    dims = {key: int(dim) for key, (_tag, dim) in mio.field_data.items()}
    assert dims == {"load": tdim - 1, "support": tdim - 1, "tissue": tdim}

    cells = _owned(msh, tdim, cell_tags.indices)
    assert np.all(cell_tags.values == names["tissue"])
    assert comm.allreduce(len(cells), op=MPI.SUM) == msh.topology.index_map(tdim).size_global

    assert set(np.unique(facet_tags.values)) <= {names["load"], names["support"]}
    for group in ("load", "support"):
        in_file = sum(
            int(np.count_nonzero(tags == names[group]))
            for block, tags in zip(mio.cells, mio.cell_data["gmsh:physical"], strict=True)
            if block.type == facet_type
        )
        found = _global_count(comm, msh, tdim - 1, facet_tags.find(names[group]))
        assert found == in_file > 0, group
    assert cell_type in {block.type for block in mio.cells}
