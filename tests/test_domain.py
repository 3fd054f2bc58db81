"""Specification of domains from mesh files and the forward model on them.

The forward solution on the gmsh meshes of ``meshes/`` must agree to round-off with an independent
finite-element code (``tests/reference_fe.py``: numpy/scipy, the file's own node order), serially
and under ``mpirun -n 2``.
"""

import re
import warnings
from pathlib import Path

from mpi4py import MPI

import meshio
import numpy as np
import pytest
from reference_fe import facets_from_meshio, solve_elasticity

from fenics_red.domain import LOAD, SUPPORT, Domain, MeshArrays
from fenics_red.forward import ElasticityModel, ForwardSettings
from fenics_red.raster import ImageGrid

MESHES = Path(__file__).resolve().parents[1] / "meshes"
_CELLS = {2: "triangle", 3: "tetra"}


def _read(name: str):
    data = meshio.read(MESHES / f"{name}.msh")
    dim = 3 if "tetra" in data.cells_dict else 2
    return data, data.points[:, :dim], data.cells_dict[_CELLS[dim]], dim


def _gmsh():
    """gmsh, started quietly (once) with an empty model; rank 0 only."""
    import gmsh

    if not gmsh.isInitialized():
        gmsh.initialize(["-noenv"], readConfigFiles=False)
    gmsh.option.setNumber("General.Terminal", 0)
    gmsh.clear()
    return gmsh


def _modulus(points: np.ndarray) -> np.ndarray:
    """A smooth, clearly non-uniform modulus (values per node in file order)."""
    depth = points[:, -1] / points[:, -1].max()
    return 0.1 + 0.05 * np.sin(points[:, 0] / 7.0) ** 2 + 0.3 * depth**2


def _solve_on_file(name: str, comm, settings: ForwardSettings):
    """The package's displacement, per node in the file's order, on every rank."""
    data, points, _, dim = _read(name)
    model = ElasticityModel(Domain.from_file(MESHES / f"{name}.msh", comm), settings)
    Q = model.node_order("Q")
    model.set_modulus(Q.scatter(_modulus(points), np.empty_like(model.E.x.array)))
    model.solve()
    u = model.node_order("V").gather(model.u.x.array).T
    model.destroy()
    return u


@pytest.mark.parametrize("name", ["roi-2d", "sector-2d", "box-3d"])
def test_file_node_order_survives_distribution(comm, name):
    _, points, _, dim = _read(name)
    domain = Domain.from_file(MESHES / f"{name}.msh", comm)
    model = ElasticityModel(domain)
    coords = model.node_order("Q").gather_rows(model.Q.tabulate_dof_coordinates()[:, :dim]).T
    assert domain.dim == dim
    assert domain.num_file_nodes == len(points)
    assert np.abs(coords - points).max() < 1e-12 * np.abs(points).max()
    # values given in file order come back unchanged through the distributed function
    values = np.arange(len(points), dtype=float)
    order = model.node_order("Q")
    assert np.array_equal(order.gather(order.scatter(values, model.E.x.array))[0], values)


@pytest.mark.parametrize(("name", "support", "pressure"), [
    ("roi-2d", "fixed", 1e-3), ("roi-2d", "sliding", 1e-3), ("box-3d", "fixed", 1e-3),
    ("box-3d", "sliding", 1e-3), ("sector-2d", "fixed", 0.0)])
def test_forward_on_gmsh_meshes_matches_an_independent_fe_code(comm, name, support, pressure):
    data, points, cells, dim = _read(name)
    shear = 2e-4
    settings = ForwardSettings(traction=pressure, shear_traction=shear, support=support, nu=0.45,
                               volumetric="element")  # the independent code is plain P1
    u = _solve_on_file(name, comm, settings)
    traction = np.zeros(dim)
    traction[0], traction[-1] = shear, -pressure  # -p n with n the upward normal of a flat top
    reference = solve_elasticity(points, cells, _modulus(points), nu=0.45, plane="stress",
                                 traction=traction, support=support,
                                 load_facets=facets_from_meshio(data, "load"),
                                 support_facets=facets_from_meshio(data, "support"))
    assert np.linalg.norm(u - reference) <= 1e-10 * np.linalg.norm(reference)


def test_probe_pressure_on_a_curved_boundary_acts_along_the_normal(comm):
    """Uniform pressure on the sector's probe arc pushes the tissue away from the apex."""
    data, points, _, _ = _read("sector-2d")
    u = _solve_on_file("sector-2d", comm, ForwardSettings(traction=1e-3))
    load = np.unique(facets_from_meshio(data, "load"))
    arc = points[load]
    half_width = np.ptp(arc[:, 0]) / 2  # the probe arc has radius 20 mm, the apex above it
    end = arc[np.argmin(arc[:, 0])]
    apex = np.array([end[0] + half_width, end[1] + np.sqrt(20.0**2 - half_width**2)])
    radial = points[load] - apex
    assert np.allclose(np.linalg.norm(radial, axis=1), 20.0, rtol=1e-6)
    assert np.all(np.einsum("ij,ij->i", u[load], radial) > 0)


def test_sliding_support_on_a_curved_boundary_is_refused(comm):
    domain = Domain.from_file(MESHES / "sector-2d.msh", comm)
    with pytest.raises(ValueError, match="flat support"):
        ElasticityModel(domain, ForwardSettings(support="sliding"))


def test_grid_domain_tags_the_top_as_load_and_the_bottom_as_support(comm):
    grid = ImageGrid(6, 4, 1.5, 1.0)
    domain = Domain.rectangle(grid, comm)
    x = domain.mesh.geometry.x
    domain.mesh.topology.create_connectivity(1, 0)
    conn = domain.mesh.topology.connectivity(1, 0)
    n_owned = domain.mesh.topology.index_map(1).size_local
    for tag, level in ((LOAD, 1.0), (SUPPORT, 0.0)):
        facets = domain.facets(tag)
        assert np.allclose([x[conn.links(f), 1] for f in facets], level)
        assert comm.allreduce(int((facets < n_owned).sum()), op=MPI.SUM) == grid.nx


@pytest.mark.parametrize("content", [None, b"not a mesh",
                                     b"$MeshFormat\n4.1 0 8\n$EndMeshFormat\n"])
def test_missing_or_corrupt_mesh_files_fail_with_one_clear_error(comm, mpi_tmp_path, content):
    path = mpi_tmp_path / "bad.msh"
    if content is not None and comm.rank == 0:
        path.write_bytes(content)
    comm.Barrier()
    with pytest.raises(ValueError, match="mesh file"):
        Domain.from_file(path, comm)


def test_a_mesh_file_with_an_unknown_suffix_is_refused(comm, mpi_tmp_path):
    path = mpi_tmp_path / "mesh.stl"
    if comm.rank == 0:
        path.write_text("solid empty\nendsolid empty\n")
    comm.Barrier()
    with pytest.raises(ValueError, match="unknown suffix"):
        Domain.from_file(path, comm)


@pytest.mark.parametrize("name", ["sector-2d", "box-3d", "grid"])
def test_a_domain_saved_as_arrays_rebuilds_the_same_problem(comm, name):
    """``to_arrays`` (mesh in file order, load and support facets) and ``from_arrays`` give the
    same displacement per file node: what data sets of format 2 rely on."""
    if name == "grid":
        domain = Domain.rectangle(ImageGrid(7, 5, 1.4, 1.0), comm)
    else:
        domain = Domain.from_file(MESHES / f"{name}.msh", comm)
    arrays = domain.to_arrays()  # the same on every rank
    rebuilt = arrays.domain(comm)
    assert rebuilt.num_file_nodes == domain.num_file_nodes
    solutions = []
    for d in (domain, rebuilt):
        model = ElasticityModel(d, ForwardSettings(shear_traction=1e-4))
        order = model.node_order("Q")
        model.set_modulus(order.scatter(_modulus(arrays.points), np.empty_like(model.E.x.array)))
        model.solve()
        solutions.append(model.node_order("V").gather(model.u.x.array))
        model.destroy()
    np.testing.assert_allclose(solutions[1], solutions[0], rtol=0,
                               atol=1e-12 * np.abs(solutions[0]).max())


def test_an_xdmf_mesh_with_facet_tags_gives_the_same_solution_as_its_gmsh_source(comm,
                                                                                mpi_tmp_path):
    from dolfinx.io import XDMFFile

    source = Domain.from_file(MESHES / "roi-2d.msh", comm)
    path = mpi_tmp_path / "roi.xdmf"
    with XDMFFile(comm, path, "w") as xdmf:
        xdmf.write_mesh(source.mesh)
        source.facet_tags.name = "facet_tags"
        xdmf.write_meshtags(source.facet_tags, source.mesh.geometry)
    comm.Barrier()
    copy = Domain.from_file(path, comm)
    assert copy.num_file_nodes == source.num_file_nodes
    solutions = []
    for domain in (source, copy):
        model = ElasticityModel(domain, ForwardSettings(support="sliding"))
        order = model.node_order("Q")
        points = order.gather_rows(model.Q.tabulate_dof_coordinates()[:, :2]).T
        model.set_modulus(order.scatter(_modulus(points), np.empty_like(model.E.x.array)))
        model.solve()
        u = model.node_order("V").gather(model.u.x.array).T
        # the two files number nodes differently: sort by coordinates, rounded so that round-off
        # in them (BLAS) cannot swap two nodes of one mesh line
        solutions.append(u[np.lexsort(np.round(points, 9).T)])
        model.destroy()
    np.testing.assert_allclose(solutions[1], solutions[0], rtol=0,
                               atol=1e-12 * np.abs(solutions[0]).max())


def _tagged_depths(domain: Domain) -> list[float]:
    """The mean depth coordinate of the load's and of the support's facets."""
    import ufl
    from dolfinx import fem

    ds = ufl.Measure("ds", domain=domain.mesh, subdomain_data=domain.facet_tags)
    depth = ufl.SpatialCoordinate(domain.mesh)[domain.mesh.geometry.dim - 1]
    means = []
    for tag in (LOAD, SUPPORT):
        integrals = [domain.mesh.comm.allreduce(fem.assemble_scalar(fem.form(f * ds(tag))))
                     for f in (depth, 1.0 + 0.0 * depth)]
        means.append(integrals[0] / integrals[1])
    return means


def test_xdmf_facet_tags_are_read_under_any_name_and_several_are_refused(comm, mpi_tmp_path):
    """DOLFINx's ``gmshio`` names its facet tags "Facet tags": such a file's tags were ignored
    and the depth default took their place. Here the tags are swapped (load at the bottom) so
    that the default would differ; a grid of cell tags beside them is not taken for them."""
    from dolfinx import mesh
    from dolfinx.io import XDMFFile

    source = Domain.from_file(MESHES / "roi-2d.msh", comm)
    tags = source.facet_tags
    swapped = mesh.meshtags(source.mesh, 1, tags.indices, np.where(tags.values == LOAD, SUPPORT,
                                                                   LOAD).astype(np.int32))
    n_cells = source.mesh.topology.index_map(2).size_local
    cell_tags = mesh.meshtags(source.mesh, 2, np.arange(n_cells, dtype=np.int32),
                              np.ones(n_cells, np.int32))
    swapped.name, cell_tags.name, tags.name = "Facet tags", "Cell tags", "boundary"
    path, several = mpi_tmp_path / "gmshio.xdmf", mpi_tmp_path / "several.xdmf"
    for file, extra in ((path, []), (several, [tags])):
        with XDMFFile(comm, file, "w") as xdmf:
            xdmf.write_mesh(source.mesh)
            for item in (swapped, cell_tags, *extra):
                xdmf.write_meshtags(item, source.mesh.geometry)
    comm.Barrier()
    load, support = _tagged_depths(source)
    assert load > support
    np.testing.assert_allclose(_tagged_depths(Domain.from_file(path, comm)), [support, load],
                               rtol=1e-12)
    with pytest.raises(ValueError, match="holds several sets of facet tags \\('Facet tags', "
                                         "'boundary'\\); name the one that marks the load"):
        Domain.from_file(several, comm)


@pytest.mark.parametrize(("change", "message"), [
    (lambda p, c: (p, c + 100), "outside 0"),
    (lambda p, c: (p, c - 1), "outside 0"),
    (lambda p, c: (p, c + 0.5), "integer node indices"),
    (lambda p, c: (p, c[:, :2]), "triangles"),
    (lambda p, c: (np.full_like(p, np.nan), c), "finite coordinates"),
    (lambda p, c: (np.vstack([p, [[2.0, 2.0]]]), c), r"1 node\(s\) that no cell uses"),
])
def test_malformed_mesh_arrays_fail_with_one_clear_error_on_every_rank(comm, change, message):
    points = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    cells = np.array([[0, 1, 2], [0, 2, 3]])
    points, cells = change(points, cells)
    with pytest.raises(ValueError, match=message):
        Domain.from_arrays(points, cells, comm)


def test_gmsh_files_that_dolfinx_cannot_read_are_refused_before_it_aborts(comm, mpi_tmp_path):
    """An isolated node (a Physical Point away from the cells) would abort DOLFINx's reader."""
    path = mpi_tmp_path / "orphan.msh"
    if comm.rank == 0:
        text = (MESHES / "sector-2d.geo").read_text()
        geo = mpi_tmp_path / "orphan.geo"
        geo.write_text(text + '\nPoint(9999) = {1000, 1000, 0, 1};\nPhysical Point("apex") = '
                       '{9999};\n')
        gmsh = _gmsh()
        gmsh.open(str(geo))
        gmsh.model.mesh.generate(2)
        gmsh.write(str(path))
        gmsh.clear()
    comm.Barrier()
    with pytest.raises(ValueError, match="no cell"):
        Domain.from_file(path, comm)


def _gmsh_rectangle(path: Path, *, recombine: bool = False, order: int = 1, plane: str = "xy",
                    groups: tuple[str, str | None] = ("load", "support"),
                    edges: tuple[int, int] = (2, 0)) -> None:
    """A 40 x 30 rectangle meshed by gmsh (rank 0): the top and bottom edges (``edges``: 0
    bottom, 1 right, 2 top, 3 left) in facet groups named ``groups`` (``None``: no group)."""
    gmsh = _gmsh()
    geo = gmsh.model.geo
    corners = [(0, 0), (40, 0), (40, 30), (0, 30)]
    points = [geo.addPoint(x, 0, y, 4) if plane == "xz" else geo.addPoint(x, y, 0, 4)
              for x, y in corners]
    lines = [geo.addLine(points[i], points[(i + 1) % 4]) for i in range(4)]
    surface = geo.addPlaneSurface([geo.addCurveLoop(lines)])
    geo.synchronize()
    for name, edge in zip(groups, edges, strict=True):
        if name is not None:
            gmsh.model.addPhysicalGroup(1, [lines[edge]], -1, name)
    gmsh.model.addPhysicalGroup(2, [surface], -1, "tissue")
    if recombine:
        gmsh.model.mesh.setRecombine(2, surface)
    gmsh.model.mesh.generate(2)
    gmsh.model.mesh.setOrder(order)
    gmsh.write(str(path))
    gmsh.clear()


@pytest.mark.parametrize(("kind", "message"), [
    ({"recombine": True}, "has Quadrilateral 4 cells; the package takes first-order triangles"),
    ({"order": 2}, "has Triangle 6 cells; the package takes first-order triangles"),
    ({"plane": "xz"}, "is a 2-D mesh in x-z .*must lie in the x-y plane"),
])
def test_gmsh_meshes_of_other_cells_or_planes_are_refused_in_one_line(comm, mpi_tmp_path, kind,
                                                                        message):
    """Quadrilaterals, second-order cells and a 2-D mesh drawn in the x-z plane (DOLFINx would
    keep x and y: cells of zero area) are named, with what to do, before DOLFINx reads them."""
    path = mpi_tmp_path / "other.msh"
    if comm.rank == 0:
        _gmsh_rectangle(path, **kind)
    comm.Barrier()
    _refused_in_one_line(path, comm, message)


def _refused_in_one_line(path: Path, comm, message: str) -> None:
    """Reading the mesh file ``path`` fails with ``message``, on one line."""
    with pytest.raises(ValueError, match=message) as error:
        Domain.from_file(path, comm)
    assert "\n" not in str(error.value)


def test_boundary_groups_of_other_names_are_said_to_be_unused(comm, mpi_tmp_path):
    path = mpi_tmp_path / "renamed.msh"
    if comm.rank == 0:
        _gmsh_rectangle(path, groups=("Probe", "Bottom"))
    comm.Barrier()
    if comm.rank == 0:
        with pytest.warns(UserWarning, match="boundary groups Probe, Bottom but none named"):
            domain = Domain.from_file(path, comm)
    else:
        domain = Domain.from_file(path, comm)
    top = domain.to_arrays()
    assert np.allclose(top.points[np.unique(top.load)][:, 1], 30.0)  # the depth rule applies


def test_gmsh_groups_named_load_and_support_in_any_case_mark_the_boundary(comm, mpi_tmp_path):
    """"Load" on the bottom edge and "SUPPORT" on the top, unlike the depth default (such names
    were taken for other groups: the default applied, with a warning)."""
    path = mpi_tmp_path / "cased.msh"
    if comm.rank == 0:
        _gmsh_rectangle(path, groups=("Load", "SUPPORT"), edges=(0, 2))
    comm.Barrier()
    arrays = Domain.from_file(path, comm).to_arrays()
    assert np.allclose(arrays.points[np.unique(arrays.load)][:, 1], 0.0)
    assert np.allclose(arrays.points[np.unique(arrays.support)][:, 1], 30.0)
    twice = mpi_tmp_path / "twice.msh"
    if comm.rank == 0:
        _gmsh_rectangle(twice, groups=("load", "Load"))
    comm.Barrier()
    _refused_in_one_line(twice, comm, "has two boundary groups named 'load' \\(in some case\\): "
                                      "merge them into one")


def _unused_node(points, cells):
    """Node 5 moved out of the cells' numbering: no cell uses it."""
    return (np.vstack([points[:5], [[100.0, 100.0, 0.0]], points[5:]]),
            [("triangle", np.where(cells >= 5, cells + 1, cells))])


def _with_quads(points, cells):
    quads = np.array([[0, 1, 2, 3]]) + len(points)
    square = np.array([[50.0, 0, 0], [51, 0, 0], [51, 1, 0], [50, 1, 0]])
    return np.vstack([points, square]), [("triangle", cells), ("quad", quads)]


def _in_xz(points, cells):
    return points[:, [0, 2, 1]], [("triangle", cells)]


def _flat_cell(points, cells):
    cells = cells.copy()
    cells[0, 2] = cells[0, 1]  # two corners at one node: a cell of zero area
    return points, [("triangle", cells)]


@pytest.mark.parametrize(("change", "message"), [
    (_unused_node, r"has 1 node\(s\) that no cell uses \(first: node 5, 0-based\); remove them"),
    (_with_quads, "holds quad cells as well as triangles; the package takes first-order "
                  "triangles only"),
    (_in_xz, "the triangles lie in x-z .*; 2-D meshes must lie in the x-y plane"),
    (_flat_cell, r"1 cell\(s\) have zero area \(first: cell 0, 0-based, of nodes \d+, \d+, \d+\): "
                 "repeated or collinear"),
])
def test_meshio_xdmf_meshes_that_cannot_be_solved_are_refused_in_one_line(comm, mpi_tmp_path,
                                                                         change, message):
    """(An unused node made ``simulate`` abort the MPI run and ``forward`` write wrong node
    coordinates; quads next to triangles were dropped; a flat cell failed as a solver error.)"""
    path = mpi_tmp_path / "bad.xdmf"
    data, _, cells, _ = _read("roi-2d")
    if comm.rank == 0:
        meshio.write(path, meshio.Mesh(*change(data.points, cells)))
    comm.Barrier()
    _refused_in_one_line(path, comm, message)


def _folded_points(points: np.ndarray, cells: np.ndarray) -> tuple[np.ndarray, int]:
    """``points`` with the interior node of most cells moved past a neighbour (its cells fold
    over), and that node."""
    k = int(np.argmax(np.bincount(cells.ravel())))
    j = int(next(n for n in cells[np.any(cells == k, axis=1)][0] if n != k))
    folded = points.copy()
    folded[k] += 1.5 * (points[j] - points[k])
    return folded, k


def _tangled_msh(path: Path) -> None:
    """``meshes/roi-2d.msh`` with one interior node moved by gmsh itself (rank 0)."""
    data, points, cells, _ = _read("roi-2d")
    folded, k = _folded_points(points, cells)
    gmsh = _gmsh()
    gmsh.merge(str(MESHES / "roi-2d.msh"))
    tags, coordinates, _ = gmsh.model.mesh.getNodes()
    tag = int(tags[np.argmin(np.linalg.norm(coordinates.reshape(-1, 3)[:, :2] - points[k],
                                            axis=1))])
    gmsh.model.mesh.setNode(tag, [*folded[k], 0.0], [])
    gmsh.write(str(path))
    gmsh.clear()


def _tangled_dolfinx_xdmf(path: Path) -> None:
    """The ROI mesh folded, written by DOLFINx (``write_mesh``; rank 0, built serially)."""
    import basix.ufl
    import ufl
    from dolfinx import mesh as dmesh
    from dolfinx.io import XDMFFile

    _, points, cells, _ = _read("roi-2d")
    folded, _ = _folded_points(points, cells)
    element = ufl.Mesh(basix.ufl.element("Lagrange", "triangle", 1, shape=(2,)))
    msh = dmesh.create_mesh(MPI.COMM_SELF, cells.astype(np.int64), folded, element)
    with XDMFFile(MPI.COMM_SELF, str(path), "w") as xdmf:
        xdmf.write_mesh(msh)


def _degenerate_vtu(path: Path) -> None:
    """``meshes/box-3d.msh`` as VTU with one tetrahedron's last node repeated (rank 0)."""
    _, points, cells, _ = _read("box-3d")
    cells = cells.copy()
    cells[-1, 3] = cells[-1, 2]
    meshio.write(path, meshio.Mesh(points, [("tetra", cells)]))


def _twice_vtu(path: Path) -> None:
    """The ROI mesh as VTU with its first triangle twice (rank 0)."""
    _, points, cells, _ = _read("roi-2d")
    meshio.write(path, meshio.Mesh(points, [("triangle", np.vstack([cells, cells[:1]]))]))


def _overlapping_groups_msh(path: Path) -> None:
    """A rectangle with a disc, the cell groups 'tissue' (both surfaces) and 'inclusion' (the
    disc) sharing the disc (rank 0)."""
    gmsh = _gmsh()
    occ = gmsh.model.occ
    occ.fragment([(2, occ.addRectangle(0, 0, 0, 40, 30))], [(2, occ.addDisk(20, 15, 0, 5, 5))])
    occ.synchronize()
    surfaces = [s for _, s in gmsh.model.getEntities(2)]
    gmsh.model.addPhysicalGroup(2, surfaces, -1, "tissue")
    gmsh.model.addPhysicalGroup(2, surfaces[:1], -1, "inclusion")
    gmsh.option.setNumber("Mesh.MeshSizeMax", 4.0)
    gmsh.model.mesh.generate(2)
    gmsh.write(str(path))
    gmsh.clear()


@pytest.mark.parametrize(("name", "write", "message"), [
    ("tangled.msh", _tangled_msh, "interior facet\\(s\\) have both their cells on one side"),
    ("twice.vtu", _twice_vtu, "1 cell\\(s\\) appear twice \\(first: cells 0 and"),
    ("overlap.msh", _overlapping_groups_msh,
     "the cell groups 'tissue' and 'inclusion' share surface"),
    ("tangled.xdmf", _tangled_dolfinx_xdmf,
     "interior facet\\(s\\) have both their cells on one side"),
    ("repeated.vtu", _degenerate_vtu, "1 cell\\(s\\) have zero volume"),
])
def test_tangled_and_degenerate_meshes_are_refused_before_dolfinx_builds_them(comm, mpi_tmp_path,
                                                                             name, write,
                                                                             message):
    """Every mesh file is checked as arrays on rank 0 before DOLFINx builds the mesh. (A folded
    mesh in a .msh or XDMF file was solved without a word; a tetrahedron with a repeated node
    crashed DOLFINx's topology builder under ``mpirun -n 2`` with ``munmap_chunk(): invalid
    pointer``, and so did a .msh whose cell groups shared a surface, even serially.)"""
    path = mpi_tmp_path / name
    if comm.rank == 0:
        write(path)
    comm.Barrier()
    _refused_in_one_line(path, comm, message)


def _two_layers_msh(path: Path, inner: str) -> None:
    """Two 40 x 15 rectangles stacked, the line between them in the group ``inner`` (``load``
    or ``support``) and the top (or bottom) edge in the other (rank 0)."""
    gmsh = _gmsh()
    occ = gmsh.model.occ
    occ.fragment([(2, occ.addRectangle(0, 0, 0, 40, 15))],
                 [(2, occ.addRectangle(0, 15, 0, 40, 15))])
    occ.synchronize()
    gmsh.option.setNumber("Mesh.MeshSizeMax", 5.0)
    lines = {}
    for _, line in gmsh.model.getEntities(1):
        y = gmsh.model.occ.getCenterOfMass(1, line)[1]
        lines.setdefault(round(y), []).append(line)
    outer = 30 if inner == "support" else 0
    other = "load" if inner == "support" else "support"
    gmsh.model.addPhysicalGroup(1, lines[15], -1, inner)
    gmsh.model.addPhysicalGroup(1, lines[outer], -1, other)
    gmsh.model.addPhysicalGroup(2, [s for _, s in gmsh.model.getEntities(2)], -1, "tissue")
    gmsh.model.mesh.generate(2)
    gmsh.write(str(path))
    gmsh.clear()


@pytest.mark.parametrize("inner", ["load", "support"])
def test_load_or_support_facets_inside_the_mesh_are_refused(comm, mpi_tmp_path, inner):
    """A group on an inner line (a layer interface) is no boundary: a traction there did no
    work (a zero displacement came back), a support there clamped the mid-plane; both ran
    without a word, from gmsh files, DOLFINx XDMF files and nodal arrays alike."""
    path = mpi_tmp_path / "layers.msh"
    if comm.rank == 0:
        _two_layers_msh(path, inner)
    comm.Barrier()
    _refused_in_one_line(path, comm, "facet\\(s\\) inside it, not on its boundary, e.g. the "
                         f"{inner} facet of nodes")
    grid = MeshArrays.of_grid(ImageGrid(4, 4, 4.0, 4.0))
    middle = grid.points[:, 1] == 2.0
    facet = np.flatnonzero(middle)[:2][None, :]  # an inner edge of the grid, on y = 2
    with pytest.raises(ValueError, match="inside it, not on its boundary") as error:
        Domain.from_arrays(grid.points, grid.cells, comm, **{inner: facet})
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="marked as both load and support"):
        top = np.flatnonzero(grid.points[:, 1] == 4.0)[:2][None, :]
        Domain.from_arrays(grid.points, grid.cells, comm, load=top, support=top)


@pytest.mark.parametrize("name", ["box-3d", "roi-2d"])
def test_a_gmsh_mesh_converted_by_meshio_keeps_its_load_and_support(comm, mpi_tmp_path, name):
    """meshio writes the sets of a .msh as one VTK array of one set index per facet, so a
    facet in ``load`` and in gmsh's ``gmsh:bounding_entities`` keeps only the latter; their
    ``gmsh:physical`` numbers complete them. (4 of the 242 load facets of ``box-3d`` were lost,
    the displacement 32 % off, without a word.)"""
    import ufl
    from dolfinx import fem

    path = mpi_tmp_path / f"{name}.vtu"
    if comm.rank == 0:
        meshio.read(MESHES / f"{name}.msh").write(path)
    comm.Barrier()

    def sizes(domain):
        ds = ufl.Measure("ds", domain=domain.mesh, subdomain_data=domain.facet_tags)
        one = fem.Constant(domain.mesh, 1.0)
        return [comm.allreduce(fem.assemble_scalar(fem.form(one * ds(tag))))
                for tag in (LOAD, SUPPORT)]

    np.testing.assert_allclose(sizes(Domain.from_file(path, comm)),
                               sizes(Domain.from_file(MESHES / f"{name}.msh", comm)), rtol=1e-12)


@pytest.mark.parametrize("walls_first", [True, False])
def test_a_mesh_whose_groups_share_lines_keeps_its_load_or_says_why_not(comm, mpi_tmp_path,
                                                                       walls_first):
    """A group ``walls`` (top and sides) beside ``load`` (the top). In the .msh the load is
    whole either way: the unused boundary groups are dropped before DOLFINx reads it (it keeps
    one tag per facet, and ``walls`` took the top when its tag was smaller: "no load facets").
    Converted to VTU by meshio, every facet keeps one set: each gmsh curve's facets complete
    each other (a completion by physical number loaded the side walls); when ``walls`` comes
    after ``load`` no facet shows ``load`` at all, and that is refused, not guessed."""
    path = mpi_tmp_path / "walls.vtu"
    if comm.rank == 0:
        gmsh = _gmsh()
        rectangle = gmsh.model.occ.addRectangle(0, 0, 0, 2, 1)
        gmsh.model.occ.synchronize()
        curves = [c for _, c in gmsh.model.getBoundary([(2, rectangle)], oriented=False)]
        height = {c: gmsh.model.occ.getCenterOfMass(1, c)[1] for c in curves}
        top, bottom = max(curves, key=height.get), min(curves, key=height.get)
        walls = [c for c in curves if c != bottom]
        if walls_first:
            gmsh.model.addPhysicalGroup(1, walls, 3, "walls")
        gmsh.model.addPhysicalGroup(1, [top], 7, "load")
        gmsh.model.addPhysicalGroup(1, [bottom], 8, "support")
        if not walls_first:
            gmsh.model.addPhysicalGroup(1, walls, 9, "walls")
        gmsh.model.addPhysicalGroup(2, [rectangle], 10, "tissue")
        gmsh.option.setNumber("Mesh.MeshSizeMax", 0.2)
        gmsh.model.mesh.generate(2)
        gmsh.write(str(path.with_suffix(".msh")))
        gmsh.clear()
        meshio.read(path.with_suffix(".msh")).write(path)
    comm.Barrier()
    msh = Domain.from_file(path.with_suffix(".msh"), comm).to_arrays()
    edges = np.sort(np.vstack([msh.cells[:, [0, 1]], msh.cells[:, [1, 2]], msh.cells[:, [0, 2]]]),
                    axis=1)
    top_edges = len(np.unique(edges[(msh.points[edges, 1] == 1.0).all(axis=1)], axis=0))
    assert len(msh.load) == top_edges
    np.testing.assert_allclose(msh.points[msh.load.ravel(), 1], 1.0)
    if not walls_first:
        with pytest.raises(ValueError, match="names the set\\(s\\) load, but no facet shows them"):
            Domain.from_file(path, comm)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        arrays = Domain.from_file(path, comm).to_arrays()
    assert len(arrays.load) == top_edges and not [w for w in caught if "meshio" in str(w.message)]
    np.testing.assert_allclose(arrays.points[arrays.load.ravel(), 1], 1.0)  # the top only



def test_dolfinx_xdmf_meshes_of_quadrilaterals_or_unknown_tags_are_refused(comm, mpi_tmp_path):
    from dolfinx import mesh
    from dolfinx.io import XDMFFile

    quads = mpi_tmp_path / "quads.xdmf"
    square = mesh.create_unit_square(comm, 4, 4, mesh.CellType.quadrilateral)
    with XDMFFile(comm, quads, "w") as xdmf:
        xdmf.write_mesh(square)
    with pytest.raises(ValueError, match="has quadrilateral cells; the package takes "
                                         "first-order triangles or tetrahedra only"):
        Domain.from_file(quads, comm)
    tagged = mpi_tmp_path / "tags.xdmf"
    square = mesh.create_unit_square(comm, 4, 4)
    fdim = square.topology.dim - 1
    square.topology.create_connectivity(fdim, fdim + 1)
    top = mesh.locate_entities_boundary(square, fdim, lambda x: np.isclose(x[1], 1.0))
    bottom = mesh.locate_entities_boundary(square, fdim, lambda x: np.isclose(x[1], 0.0))
    order = np.argsort(np.concatenate([top, bottom]))
    tags = mesh.meshtags(square, fdim, np.concatenate([top, bottom])[order].astype(np.int32),
                         np.concatenate([np.full(len(top), 5), np.full(len(bottom), 6)])[order]
                         .astype(np.int32))
    tags.name = "facet_tags"
    with XDMFFile(comm, tagged, "w") as xdmf:
        xdmf.write_mesh(square)
        xdmf.write_meshtags(tags, square.geometry)
    with pytest.raises(ValueError, match=r"its facet tags \('facet_tags'\) hold the values 5, 6, "
                                         "and a mesh file's facet numbers are read as 1 = "
                                         "load, 2 = support"):
        Domain.from_file(tagged, comm)


def test_an_xdmf_file_without_its_data_or_readable_by_neither_reader_is_refused(comm,
                                                                                 mpi_tmp_path):
    """A missing .h5 is named (DOLFINx named the .h5 of the XDMF's name); a file that neither
    DOLFINx nor meshio takes (two grids, none named ``mesh``) is a one-line error: meshio
    printed to stdout and ended the process (``SystemExit``)."""
    from dolfinx import mesh
    from dolfinx.io import XDMFFile

    square = mesh.create_unit_square(comm, 4, 4)
    good = mpi_tmp_path / "good.xdmf"
    with XDMFFile(comm, good, "w") as xdmf:
        xdmf.write_mesh(square)
        xdmf.write_meshtags(mesh.meshtags(square, 2, np.zeros(0, np.int32),
                                          np.zeros(0, np.int32)), square.geometry)
    moved, renamed = mpi_tmp_path / "moved.xdmf", mpi_tmp_path / "renamed.xdmf"
    if comm.rank == 0:
        text = good.read_text()
        moved.write_text(text.replace("good.h5:", "elsewhere/good.h5:"))
        renamed.write_text(text.replace('Name="mesh"', 'Name="domain"'))
        (mpi_tmp_path / "renamed.h5").write_bytes((mpi_tmp_path / "good.h5").read_bytes())
    comm.Barrier()
    _refused_in_one_line(moved, comm, "keeps its data in '.*elsewhere/good.h5', which does not "
                                      "exist: copy that file beside it")
    _refused_in_one_line(renamed, comm, "cannot read mesh file .* as XDMF: DOLFINx: .*; meshio: "
                                        ".*one grid")


def _grid_for_meshio(width: float = 6.0, height: float = 4.0):
    """A 6 x 4 grid's points ``(N, 3)`` (z = 0, as most formats store 2-D meshes), triangles,
    and its bottom and top boundary lines."""
    from fenics_red.domain import _boundary_facets

    arrays = MeshArrays.of_grid(ImageGrid(6, 4, width, height))
    lines = _boundary_facets(arrays.cells)
    depth = arrays.points[lines].mean(axis=1)[:, 1]
    return (np.c_[arrays.points, np.zeros(len(arrays.points))], arrays.cells,
            lines[depth == 0.0], lines[depth == height])


@pytest.mark.parametrize("suffix", [".vtu", ".vtk", ".inp", ".mesh", ".med"])
def test_meshes_in_vtk_abaqus_medit_and_med_files_are_read_through_meshio(suffix, comm,
                                                                          mpi_tmp_path):
    """Without boundary sets the depth default applies: the load on top, the support below."""
    path = mpi_tmp_path / f"grid{suffix}"
    points, cells, _, _ = _grid_for_meshio()
    if comm.rank == 0:
        meshio.write(path, meshio.Mesh(points, [("triangle", cells)]))
    comm.Barrier()
    domain = Domain.from_file(path, comm)
    assert domain.num_file_nodes == len(points) and domain.mesh.geometry.dim == 2
    np.testing.assert_allclose(_tagged_depths(domain), [4.0, 0.0], atol=1e-12)


def test_facets_from_a_second_file_mark_the_boundary_matched_by_coordinates(comm, mpi_tmp_path):
    """The layout of meshio's conversion (``mesh.xdmf`` with the triangles, ``facets.xdmf`` with
    the boundary lines and their ``name_to_read`` numbers): the facets file numbers its points
    in another order here, and marks the load at the bottom (unlike the default); an Abaqus
    facets file with node sets does the same. Facets off the mesh, inside it (a cell's
    diagonal: a traction there was never applied), both load and support, or none marked are
    refused in one line."""
    points, cells, bottom, top = _grid_for_meshio()
    order = np.random.default_rng(3).permutation(len(points))  # facets file point i = order[i]
    new_index = np.argsort(order)
    lines = new_index[np.vstack([bottom, top])]
    values = np.r_[np.full(len(bottom), LOAD), np.full(len(top), SUPPORT)]
    inner = next(c[[0, 2]] for c in cells if not np.isin(c[[0, 2]], np.r_[bottom.ravel(),
                                                                           top.ravel()]).any())
    files = {name: mpi_tmp_path / name for name in (
        "mesh.xdmf", "facets.xdmf", "nodes.inp", "shifted.xdmf", "inside.xdmf", "both.xdmf",
        "unmarked.vtu")}

    def facets_file(name, lines, values, shift=0.0):
        meshio.write(files[name], meshio.Mesh(points[order] + [shift, 0.0, 0.0], [("line", lines)],
                                              cell_data={"name_to_read": [values]}))

    if comm.rank == 0:
        meshio.write(files["mesh.xdmf"], meshio.Mesh(points, [("triangle", cells)], cell_data={
            "name_to_read": [np.ones(len(cells))]}))
        facets_file("facets.xdmf", lines, values)
        facets_file("shifted.xdmf", lines, values, shift=0.5)
        facets_file("inside.xdmf", np.vstack([lines, new_index[inner]]), np.r_[values, LOAD])
        facets_file("both.xdmf", np.vstack([lines, lines[:1]]), np.r_[values, SUPPORT])
        meshio.write(files["nodes.inp"], meshio.Mesh(points[order], [("line", lines)],
                                                     point_sets={"load": new_index[bottom[:, 0]],
                                                                 "support": new_index[top[:, 0]]}))
        meshio.write(files["unmarked.vtu"], meshio.Mesh(points, [("triangle", cells)]))
    comm.Barrier()
    mesh_file = files["mesh.xdmf"]
    np.testing.assert_allclose(_tagged_depths(Domain.from_file(mesh_file, comm)), [4.0, 0.0])
    for name in ("facets.xdmf", "nodes.inp"):
        domain = Domain.from_file(mesh_file, comm, facets=files[name])
        np.testing.assert_allclose(_tagged_depths(domain), [0.0, 4.0], atol=1e-12)
        assert domain.num_file_nodes == len(points)
    for name, message in (("shifted.xdmf", "marks nodes that are not nodes of the 2-D mesh; the "
                                           "facets must be drawn on the mesh's nodes"),
                          ("inside.xdmf", "facet\\(s\\) inside it, not on its boundary"),
                          ("both.xdmf", "marked as both load and support"),
                          ("unmarked.vtu", "holds no lines marked as load \\(1\\) or support")):
        with pytest.raises(ValueError, match=message) as error:
            Domain.from_file(mesh_file, comm, facets=files[name])
        assert "\n" not in str(error.value)


def test_facets_from_a_second_file_serve_a_curved_probe(comm, mpi_tmp_path):
    """The curved-probe sector (``meshes/sector-2d.msh``) converted to two files: its top is one
    node, so the mesh file alone has no load by the depth default (a first tagging pass of the
    mesh file alone refused it); its facets file gives the same boundary as the gmsh file."""
    source = meshio.read(MESHES / "sector-2d.msh")
    mesh_file, facets = mpi_tmp_path / "sector.xdmf", mpi_tmp_path / "sector-facets.xdmf"
    if comm.rank == 0:
        meshio.write(mesh_file, meshio.Mesh(source.points, [
            ("triangle", source.get_cells_type("triangle"))]))
        meshio.write(facets, meshio.Mesh(source.points, [("line", source.get_cells_type("line"))],
                                         cell_data={"name_to_read": [
                                             source.get_cell_data("gmsh:physical", "line")]}))
    comm.Barrier()
    copy = Domain.from_file(mesh_file, comm, facets=facets).to_arrays()
    gmsh = Domain.from_file(MESHES / "sector-2d.msh", comm).to_arrays()

    def as_set(facets):
        return {tuple(sorted(f)) for f in np.asarray(facets).tolist()}

    np.testing.assert_allclose(copy.points, gmsh.points, atol=1e-12)
    assert as_set(copy.load) == as_set(gmsh.load) and as_set(copy.support) == as_set(gmsh.support)


@pytest.mark.parametrize("sets", ["nodes", "lines", "mixed", "med", "med-nodes", "vtu",
                                  "vtu-numbers"])
def test_sets_named_load_and_support_mark_the_boundary(sets, comm, mpi_tmp_path):
    """Abaqus node sets (``*NSET``: the boundary facets whose nodes all lie in one), sets of
    line elements (``*ELSET``), one of each, MED groups of cells or nodes, sets that meshio
    wrote to VTK (cell data ``load-support``: 0 = load, 1 = support, -1 = none; its 1 was read
    as the load), in any case, or VTK numbers under MED's name ``cell_tags``; here the load at
    the bottom, unlike the default."""
    path = mpi_tmp_path / f"marked-{sets}.{sets[:3] if sets[:3] in ('med', 'vtu') else 'inp'}"
    points, cells, bottom, top = _grid_for_meshio()
    none, lines = np.zeros(0, np.int64), np.vstack([bottom, top])
    load_lines, support_lines = np.arange(len(bottom)), len(bottom) + np.arange(len(top))
    if comm.rank == 0:
        if sets == "nodes":
            marked = meshio.Mesh(points, [("triangle", cells)], point_sets={
                "LOAD": np.unique(bottom), "Support": np.unique(top)})
        elif sets in ("lines", "vtu"):  # VTK: meshio writes the sets as cell data
            marked = meshio.Mesh(points, [("triangle", cells), ("line", lines)],
                                 cell_sets={"load": [none, load_lines],
                                            "support": [none, support_lines]})
        elif sets == "mixed":  # the load's line elements, the support's nodes
            marked = meshio.Mesh(points, [("triangle", cells), ("line", lines)],
                                 cell_sets={"load": [none, load_lines]},
                                 point_sets={"support": np.unique(top)})
        elif sets == "med":  # MED: groups of families, the family numbers in cell data
            marked = meshio.Mesh(points, [("triangle", cells), ("line", lines)], cell_data={
                "cell_tags": [np.zeros(len(cells), int),
                              np.r_[np.full(len(bottom), -1), np.full(len(top), -2)]]})
            marked.cell_tags = {-1: ["Load"], -2: ["support"]}
        elif sets == "med-nodes":  # MED groups of nodes
            families = np.zeros(len(points), int)
            families[np.unique(bottom)], families[np.unique(top)] = 1, 2
            marked = meshio.Mesh(points, [("triangle", cells)],
                                 point_data={"point_tags": families})
            marked.point_tags = {1: ["load"], 2: ["Support"]}
        else:  # VTK cell data that is not MED's: its numbers, 1 = load, 2 = support
            marked = meshio.Mesh(points, [("triangle", cells), ("line", lines)], cell_data={
                "cell_tags": [np.zeros(len(cells), int), np.r_[np.full(len(bottom), 1),
                                                               np.full(len(top), 2)]]})
        meshio.write(path, marked)
    comm.Barrier()
    np.testing.assert_allclose(_tagged_depths(Domain.from_file(path, comm)), [0.0, 4.0],
                               atol=1e-12)


def test_one_set_that_meshio_wrote_to_vtk_is_read(comm, mpi_tmp_path):
    """meshio writes one set as cell data of its own name (0 in the set, -1 elsewhere): a load
    on the left half of the bottom, the support by the default on the rest of the bottom."""
    points, cells, bottom, _ = _grid_for_meshio()
    left = bottom[points[bottom].mean(axis=1)[:, 0] < 3.0]
    path = mpi_tmp_path / "one-set.vtu"
    if comm.rank == 0:
        meshio.write(path, meshio.Mesh(points, [("triangle", cells), ("line", left)], cell_sets={
            "load": [np.zeros(0, np.int64), np.arange(len(left))]}))
    comm.Barrier()
    domain = Domain.from_file(path, comm)
    np.testing.assert_allclose(_tagged_depths(domain), [0.0, 0.0], atol=1e-12)
    arrays = domain.to_arrays()
    assert len(arrays.load) == len(left) and len(arrays.support) == len(bottom) - len(left)


def test_boundary_marks_that_cannot_be_meant_are_refused_or_said(comm, mpi_tmp_path):
    """Medit references beside 1 and 2 are left free with a warning (they may be a mesher's own
    curve numbers); a load that covers the default support, and two sets of one name, are
    refused in one line (the first solved a system without support)."""
    points, cells, bottom, top = _grid_for_meshio()
    refs, covered, twice = (mpi_tmp_path / name for name in ("refs.mesh", "covered.inp",
                                                              "twice.inp"))
    from fenics_red.domain import _boundary_facets

    sides = [f for f in _boundary_facets(cells).tolist()
             if f not in np.vstack([bottom, top]).tolist()]
    inner = cells[len(cells) // 2, :2]  # an inner edge numbered 3 too: an interface, not refused
    if comm.rank == 0:
        meshio.write(refs, meshio.Mesh(points, [("triangle", cells),
                                                ("line", np.vstack([bottom, top, sides, inner]))],
                                       cell_data={"medit:ref": [
                                           np.zeros(len(cells), int),
                                           np.r_[np.full(len(bottom), 1), np.full(len(top), 2),
                                                 np.full(len(sides) + 1, 3)]]}))
        meshio.write(covered, meshio.Mesh(points, [("triangle", cells)],
                                          point_sets={"load": np.unique(bottom)}))
        meshio.write(twice, meshio.Mesh(points, [("triangle", cells)], point_sets={
            "LOAD": np.unique(bottom), "Load": np.unique(top)}))
    comm.Barrier()
    if comm.rank == 0:
        with pytest.warns(UserWarning, match="hold 3 beside 1 \\(load\\) and 2 \\(support\\); "
                                             "those facets are left free"):
            domain = Domain.from_file(refs, comm)
    else:
        domain = Domain.from_file(refs, comm)
    np.testing.assert_allclose(_tagged_depths(domain), [0.0, 4.0], atol=1e-12)
    _refused_in_one_line(covered, comm, "every support facet is also a load facet")
    _refused_in_one_line(twice, comm, "two sets are named 'load' \\(in some case\\): merge them")


def test_a_gmsh_group_named_load_that_holds_no_curves_is_refused(comm, mpi_tmp_path):
    """A .geo naming missing curves keeps the names and drops the groups: the depth-axis default
    took their place without a word."""
    path = mpi_tmp_path / "empty-groups.msh"
    if comm.rank == 0:
        gmsh = _gmsh()
        gmsh.model.occ.addRectangle(0, 0, 0, 40, 30)
        gmsh.model.occ.synchronize()
        gmsh.model.addPhysicalGroup(2, [1], 3, name="tissue")
        gmsh.model.addPhysicalGroup(1, [], 1, name="load")
        gmsh.model.addPhysicalGroup(1, [3], 2, name="support")
        gmsh.option.setNumber("Mesh.MeshSizeMax", 6.0)
        gmsh.model.mesh.generate(2)
        gmsh.write(str(path))
        gmsh.clear()
    comm.Barrier()
    _refused_in_one_line(path, comm, "names the group 'load' but it holds no elements")


@pytest.mark.parametrize("numbers", [{1: 2, 2: 1}, {1: 7, 2: 8}])
def test_meshio_converted_boundary_groups_are_read_as_1_load_and_2_support(comm, mpi_tmp_path,
                                                                           numbers):
    """``meshio convert roi.msh roi.xdmf`` keeps the boundary lines and their ``gmsh:physical``
    numbers (not the names): 1 and 2 are the load and the support, as in DOLFINx's XDMF tags
    (here swapped: the probe at the bottom; they were ignored and the depth default took their
    place); numbers that are neither are refused."""
    path = mpi_tmp_path / "converted.xdmf"
    data = meshio.read(MESHES / "roi-2d.msh")  # load 1 (top), support 2 (bottom)
    if comm.rank == 0:
        meshio.write(path, meshio.Mesh(data.points, data.cells, cell_data={
            "gmsh:physical": [np.vectorize(numbers.get)(v) if c.type == "line" else v
                              for c, v in zip(data.cells, data.cell_data["gmsh:physical"],
                                              strict=True)],
            "gmsh:geometrical": data.cell_data["gmsh:geometrical"]}))  # not read
    comm.Barrier()
    if 7 in numbers.values():
        with pytest.raises(ValueError, match="the facet cells' integer data\\) hold the values "
                                             "7, 8, and a mesh file's facet numbers are read as 1"):
            Domain.from_file(path, comm)
        return
    source, copy = (Domain.from_file(p, comm).to_arrays() for p in (MESHES / "roi-2d.msh", path))
    np.testing.assert_array_equal(copy.points, source.points)
    for mine, theirs in (("load", "support"), ("support", "load")):
        assert (sorted(map(tuple, np.sort(getattr(copy, mine), axis=1)))
                == sorted(map(tuple, np.sort(getattr(source, theirs), axis=1)))), mine


def test_an_xdmf_mesh_written_by_meshio_reads_as_its_gmsh_source(comm, mpi_tmp_path):
    """meshio's XDMF (one block of triangles, points with z = 0) is not DOLFINx's layout: it is
    read through meshio, the same nodes and cells in the same order, on any number of ranks."""
    path = mpi_tmp_path / "meshio.xdmf"
    data, points, cells, _ = _read("roi-2d")
    if comm.rank == 0:
        meshio.write(path, meshio.Mesh(data.points, [("triangle", cells)]))
    comm.Barrier()
    arrays = Domain.from_file(path, comm).to_arrays()
    assert arrays.points.shape == points.shape
    np.testing.assert_array_equal(arrays.points, points)
    np.testing.assert_array_equal(arrays.cells, cells)
    assert np.allclose(arrays.points[np.unique(arrays.load)][:, 1], 30.0)


def _squares(offset: tuple[float, float]):
    """Two unit squares of two triangles each, the second moved by ``offset``."""
    square = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    points = np.vstack([square, square + offset])
    cells = np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    return points, cells


def test_a_mesh_with_a_part_that_touches_no_support_is_refused_on_every_rank(comm):
    """A square floating above the supported one (the load on its top, nothing holding it) makes
    ``K`` singular: the solve would return huge displacements without a word."""
    points, cells = _squares((0.0, 2.0))
    with pytest.raises(ValueError, match="the mesh has 2 separate parts .* and 1 of them touches "
                                         "no support facet: its displacement is undetermined; "
                                         "remove it or connect it") as error:
        Domain.from_arrays(points, cells, comm)
    assert "\n" not in str(error.value)


def test_a_part_held_by_a_single_node_is_refused_as_it_turns_about_that_node(comm):
    """A square standing on the corner of the supported one shares a node with it and no edge:
    it rotates about that node, so ``K`` is singular. Cells are joined through facets."""
    points = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0],
                       [2.0, 1.0], [2.0, 2.0], [1.0, 2.0]])
    cells = np.array([[0, 1, 2], [0, 2, 3], [2, 4, 5], [2, 5, 6]])
    with pytest.raises(ValueError, match=r"the mesh has 2 separate parts \(cells joined through "
                                         r"shared edges: a shared node lets a part turn\) and 1 "
                                         "of them touches no support facet"):
        Domain.from_arrays(points, cells, comm)
    # the square on top of the supported one shares an edge: one part, held through it
    points = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 2.0], [0.0, 2.0]])
    cells = np.array([[0, 1, 2], [0, 2, 3], [3, 2, 4], [3, 4, 5]])
    assert Domain.from_arrays(points, cells, comm).num_file_nodes == len(points)


def _island_mesh(comm, ghosted: bool, n: int = 10):
    """The unit square of ``2 n²`` triangles, its middle quarter on the last rank and the rest
    on rank 0; ``ghosted``: each cell also a ghost on the ranks of its facet neighbours (as
    DOLFINx reads an XDMF mesh)."""
    import basix.ufl
    import ufl
    from dolfinx import graph, mesh

    xs = np.linspace(0.0, 1.0, n + 1)
    points = np.column_stack([c.ravel() for c in np.meshgrid(xs, xs, indexing="ij")])
    i, j = (a.ravel() for a in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    a, d = i * (n + 1) + j, i * (n + 1) + j + 1
    b, c = a + n + 1, d + n + 1
    cells = np.concatenate([np.column_stack([a, b, c]), np.column_stack([a, c, d])])
    owner = np.where((np.abs(points[cells].mean(axis=1) - 0.5) < 0.25).all(axis=1),
                     comm.size - 1, 0)
    edges = {}
    for k, cell in enumerate(cells):
        for e in ((0, 1), (1, 2), (0, 2)):
            edges.setdefault(tuple(sorted(cell[list(e)])), []).append(k)
    index = {tuple(sorted(cell)): k for k, cell in enumerate(cells)}

    def partition(_comm, _nparts, _types, topology):
        local = np.asarray(topology[0]).reshape(-1, 3)
        dest, offsets = [], [0]
        for cell in local:
            k = index[tuple(sorted(cell))]
            ranks = [int(owner[k])]
            for e in ((0, 1), (1, 2), (0, 2)) if ghosted else ():
                ranks += [int(owner[m]) for m in edges[tuple(sorted(cell[list(e)]))]
                          if int(owner[m]) not in ranks]
            dest += ranks
            offsets.append(len(dest))
        return graph.adjacencylist(np.array(dest, np.int32), np.array(offsets, np.int32))

    root = comm.rank == 0
    element = ufl.Mesh(basix.ufl.element("Lagrange", "triangle", 1, shape=(2,)))
    return mesh.create_mesh(comm, cells if root else np.zeros((0, 3), np.int64),
                            points if root else np.zeros((0, 2)), element, partition)


@pytest.mark.parametrize("ghosted", [False, True])
def test_one_part_spread_over_ranks_is_one_part_with_or_without_ghost_cells(comm, ghosted):
    """A rank's cells in the middle of another's, joined to them only across the ranks' cut;
    with ghost cells the facets of that cut have two local cells on both ranks. (With ghosts it
    was refused as two parts, one unsupported.)"""
    msh = _island_mesh(comm, ghosted)
    ghosts = comm.allreduce(msh.topology.index_map(2).num_ghosts, op=MPI.SUM)
    assert (ghosts > 0) == (ghosted and comm.size > 1)
    domain = Domain.from_mesh(msh)
    assert comm.allreduce(len(domain.facets(SUPPORT)), op=MPI.SUM) >= 10


def test_separate_parts_that_each_touch_the_support_are_taken(comm):
    """Two squares side by side on the support: two parts, each held."""
    points, cells = _squares((2.0, 0.0))
    domain = Domain.from_arrays(points, cells, comm)
    assert domain.num_file_nodes == len(points)
    assert comm.allreduce(len(domain.facets(SUPPORT)), op=MPI.SUM) >= 2


def _gmsh_file(path: Path, comm, make, **kwargs) -> None:
    """``make(path, **kwargs)`` on rank 0, then every rank goes on."""
    if comm.rank == 0:
        make(path, **kwargs)
    comm.Barrier()


def test_load_and_support_groups_on_the_same_edge_are_refused_as_overlapping(comm,
                                                                            mpi_tmp_path):
    """(DOLFINx keeps one tag per facet: the support lost its facets and the message said the
    mesh had none.)"""
    path = mpi_tmp_path / "same.msh"
    _gmsh_file(path, comm, _gmsh_rectangle, edges=(2, 2))
    with pytest.raises(ValueError, match=r"the groups 'load' and 'support' overlap \(they share "
                                         r"1 boundary curve, gmsh tag \d+\); a boundary part is "
                                         "either loaded or supported") as error:
        Domain.from_file(path, comm)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("groups", "words"), [
    (("load", None), "has a 'load' group but no 'support' group: the support goes on the bottom "
                     "(smallest depth coordinate); name a 'support' group to choose it"),
    ((None, "support"), "has a 'support' group but no 'load' group: the load goes on the top "
                        "(largest depth coordinate); name a 'load' group to choose it"),
])
def test_a_mesh_naming_only_one_of_load_and_support_says_where_the_other_goes(
        comm, mpi_tmp_path, groups, words):
    path = mpi_tmp_path / "one.msh"
    _gmsh_file(path, comm, _gmsh_rectangle, groups=groups)
    if comm.rank == 0:
        with pytest.warns(UserWarning, match=re.escape(words)) as caught:
            domain = Domain.from_file(path, comm)
        assert len(caught) == 1
    else:
        domain = Domain.from_file(path, comm)
    arrays = domain.to_arrays()
    assert np.allclose(arrays.points[np.unique(arrays.load)][:, 1], 30.0)
    assert np.allclose(arrays.points[np.unique(arrays.support)][:, 1], 0.0)


def _gmsh_box_without_a_volume_group(path: Path) -> None:
    gmsh = _gmsh()
    gmsh.model.occ.addBox(0, 0, 0, 10, 10, 10)
    gmsh.model.occ.synchronize()
    faces = [tag for _, tag in gmsh.model.getEntities(2)]
    gmsh.model.addPhysicalGroup(2, faces[:1], -1, "load")
    gmsh.model.addPhysicalGroup(2, faces[1:2], -1, "support")
    gmsh.option.setNumber("Mesh.MeshSizeMax", 5)
    gmsh.model.mesh.generate(3)
    gmsh.write(str(path))
    gmsh.clear()


def test_a_3d_mesh_without_a_volume_group_is_told_to_add_a_physical_volume(comm, mpi_tmp_path):
    path = mpi_tmp_path / "novolume.msh"
    _gmsh_file(path, comm, _gmsh_box_without_a_volume_group)
    with pytest.raises(ValueError, match=r"has no physical group of dimension 3: .*add e.g. "
                                         r"Physical Volume\(\"tissue\"\) to the .geo"):
        Domain.from_file(path, comm)
