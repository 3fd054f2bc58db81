"""The independent reference FE code (``tests/reference_fe.py``) against analytical solutions.

Plain serial computations: under ``mpirun -n 2`` every rank does the same thing.
"""

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
from reference_fe import (
    dirichlet_dofs,
    facets_from_meshio,
    load_vector,
    solve_elasticity,
    stiffness_matrix,
)


# --------------------------------------------------------------------------------------------------
# Structured meshes (numpy only)
# --------------------------------------------------------------------------------------------------
def rectangle(nx, ny, lx=1.0, ly=1.0, perturb=0.0, rng=None):
    """Triangles on [0, lx] x [0, ly] (each square split along one diagonal) with the interior nodes
    moved at random by up to ``perturb`` times the spacing; also the top and bottom edges."""
    x, y = np.meshgrid(np.linspace(0.0, lx, nx + 1), np.linspace(0.0, ly, ny + 1), indexing="ij")
    points = np.column_stack([x.ravel(), y.ravel()])
    node = np.arange(points.shape[0]).reshape(nx + 1, ny + 1)
    n00, n10, n01, n11 = (node[:-1, :-1], node[1:, :-1], node[:-1, 1:], node[1:, 1:])
    cells = np.concatenate([np.stack([n00, n10, n11], -1).reshape(-1, 3),
                            np.stack([n00, n11, n01], -1).reshape(-1, 3)])
    if perturb:
        interior = (x.ravel() > 0) & (x.ravel() < lx) & (y.ravel() > 0) & (y.ravel() < ly)
        h = np.array([lx / nx, ly / ny])
        points[interior] += perturb * h * rng.uniform(-1.0, 1.0, (int(interior.sum()), 2))
    top = np.column_stack([node[:-1, -1], node[1:, -1]])
    bottom = np.column_stack([node[:-1, 0], node[1:, 0]])
    return points, cells, top, bottom


def box(nx, ny, nz, lengths=(1.0, 1.0, 1.0), perturb=0.0, rng=None):
    """Tetrahedra on [0, lx] x [0, ly] x [0, lz]: each hexahedron Kuhn-split into 6 tetrahedra
    along its (0, 0, 0)-(1, 1, 1) diagonal (a conforming mesh); interior nodes moved at random by
    up to ``perturb`` times the spacing; also the triangles of the top (z = lz) and bottom (z = 0)
    faces."""
    n = np.array([nx, ny, nz])
    lengths = np.asarray(lengths, dtype=float)
    axes = [np.linspace(0.0, lengths[i], n[i] + 1) for i in range(3)]
    X = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    node = np.arange(X.shape[0]).reshape(*(n + 1))
    corners = {}
    for c in itertools.product((0, 1), repeat=3):
        corners[c] = node[c[0]:c[0] + nx, c[1]:c[1] + ny, c[2]:c[2] + nz].ravel()
    cells = []
    for perm in itertools.permutations(range(3)):        # path 000 -> e_p0 -> e_p0+e_p1 -> 111
        path, corner = [(0, 0, 0)], [0, 0, 0]
        for axis in perm:
            corner[axis] = 1
            path.append(tuple(corner))
        cells.append(np.column_stack([corners[c] for c in path]))
    cells = np.concatenate(cells)
    if perturb:
        interior = np.all((X > 0) & (X < lengths), axis=1)
        X[interior] += perturb * lengths / n * rng.uniform(-1.0, 1.0, (int(interior.sum()), 3))

    def face(k):
        q = node[:, :, k]
        a, b, c, d = q[:-1, :-1], q[1:, :-1], q[:-1, 1:], q[1:, 1:]
        return np.concatenate([np.stack([a, b, d], -1).reshape(-1, 3),
                               np.stack([a, d, c], -1).reshape(-1, 3)])

    return X, cells, face(nz), face(0)


def signed_measures(points, cells):
    X = points[cells]
    return np.linalg.det(np.swapaxes(X[:, 1:] - X[:, :1], 1, 2))


def rigid_body_modes(points):
    """Columns: the rigid motions of the nodes (3 in 2-D, 6 in 3-D), interleaved dofs."""
    n, gdim = points.shape
    modes = []
    for axis in range(gdim):                              # translations
        m = np.zeros((n, gdim))
        m[:, axis] = 1.0
        modes.append(m)
    if gdim == 2:
        modes.append(np.column_stack([-points[:, 1], points[:, 0]]))
    else:
        for axis in range(3):                             # rotations: e_axis x r
            modes.append(np.cross(np.eye(3)[axis], points))
    return np.column_stack([m.ravel() for m in modes])


# --------------------------------------------------------------------------------------------------
# Patch tests
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def rng():
    return np.random.default_rng(20261125)


def test_meshes_are_valid(rng):
    points, cells, top, bottom = rectangle(6, 5, 1.5, 1.0, 0.2, rng)
    assert np.all(signed_measures(points, cells) > 0)  # counter-clockwise, also when perturbed
    assert np.isclose(np.abs(signed_measures(points, cells)).sum() / 2, 1.5)
    X, tets, top3, bottom3 = box(3, 4, 2, (1.0, 1.2, 0.8), 0.15, rng)
    X0, _, _, _ = box(3, 4, 2, (1.0, 1.2, 0.8))
    # Kuhn tetrahedra alternate in orientation; the perturbation must not flip any.
    assert np.all(signed_measures(X, tets) * signed_measures(X0, tets) > 0)
    assert np.isclose(np.abs(signed_measures(X, tets)).sum() / 6, 1.0 * 1.2 * 0.8)
    # Conforming: every interior face is shared by exactly two tetrahedra, the boundary faces
    # (each of the 6 box faces: 2 triangles per square) by one.
    faces = np.sort(np.concatenate([np.delete(tets, i, axis=1) for i in range(4)]), axis=1)
    _, counts = np.unique(faces, axis=0, return_counts=True)
    assert set(counts) == {1, 2}
    assert np.sum(counts == 1) == 2 * 2 * (3 * 4 + 4 * 2 + 3 * 2)


@pytest.mark.parametrize("plane", ["stress", "strain"])
def test_2d_patch_test_uniform_compression_sliding(rng, plane):
    E, nu, p, lx, ly = 3.0, 0.3, 0.02, 1.5, 1.0
    points, cells, top, bottom = rectangle(8, 6, lx, ly, 0.25, rng)
    u = solve_elasticity(points, cells, E, nu=nu, plane=plane, traction=[0.0, -p],
                         load_facets=top, support_facets=bottom, support="sliding")
    E_star, nu_star = (E, nu) if plane == "stress" else (E / (1 - nu**2), nu / (1 - nu))
    exact = np.column_stack([nu_star * p * points[:, 0] / E_star, -p * points[:, 1] / E_star])
    assert np.linalg.norm(u - exact) / np.linalg.norm(exact) < 1e-10
    # The same with a nodal (constant) modulus array and with the points given with a zero z.
    u2 = solve_elasticity(np.column_stack([points, np.zeros(len(points))]), cells,
                          np.full(len(points), E), nu=nu, plane=plane, traction=[0.0, -p],
                          load_facets=top, support_facets=bottom, support="sliding")
    np.testing.assert_allclose(u2, u, rtol=0, atol=1e-14 * np.abs(u).max())


def test_3d_patch_test_uniform_compression_sliding(rng):
    E, nu, p = 2.0, 0.35, 0.01
    points, cells, top, bottom = box(4, 3, 3, (1.2, 1.0, 0.9), 0.2, rng)
    u = solve_elasticity(points, cells, E, nu=nu, traction=[0.0, 0.0, -p], load_facets=top,
                         support_facets=bottom, support="sliding")
    exact = np.column_stack([nu * p * points[:, 0] / E, nu * p * points[:, 1] / E,
                             -p * points[:, 2] / E])
    assert np.linalg.norm(u - exact) / np.linalg.norm(exact) < 1e-10


@pytest.mark.parametrize("dim", [2, 3])
def test_patch_test_fixed_support_with_zero_poisson_ratio(rng, dim):
    """With nu = 0 a clamped base does not constrain the lateral motion: u = -p depth / E."""
    E, p = 1.5, 0.04
    if dim == 2:
        points, cells, top, bottom = rectangle(7, 5, 1.0, 0.8, 0.25, rng)
    else:
        points, cells, top, bottom = box(3, 3, 3, (1.0, 0.9, 0.8), 0.2, rng)
    traction = np.zeros(dim)
    traction[-1] = -p
    u = solve_elasticity(points, cells, E, nu=0.0, traction=traction, load_facets=top,
                         support_facets=bottom, support="fixed")
    exact = np.zeros_like(points)
    exact[:, -1] = -p * points[:, -1] / E
    assert np.linalg.norm(u - exact) / np.linalg.norm(exact) < 1e-10


@pytest.mark.parametrize("dim", [2, 3])
def test_variable_modulus_residual_of_exact_solution(rng, dim):
    """E linear in the lateral coordinates, nu = 0, u = (0, ..., -d depth / L): div sigma = 0, so
    K u has no interior or side rows and equals, on the top, the consistent load of the
    (varying) traction -E d / L. Checks the per-cell mean of the nodal E."""
    d = 0.01
    if dim == 2:
        points, cells, top, bottom = rectangle(7, 6, 1.3, 1.0, 0.25, rng)
        E = 1.0 + 2.0 * points[:, 0]
    else:
        points, cells, top, bottom = box(3, 4, 3, (1.0, 1.1, 1.0), 0.2, rng)
        E = 1.0 + 2.0 * points[:, 0] - 0.5 * points[:, 1]
    depth = points[:, -1].max()
    u = np.zeros_like(points)
    u[:, -1] = -d * points[:, -1] / depth
    r = (stiffness_matrix(points, cells, E, nu=0.0) @ u.ravel()).reshape(-1, dim)

    # Consistent load of t = -E d / depth (linear on a facet): int E phi_i = |f| (E_i + sum E) /
    # (nv (nv + 1)) for a facet with nv vertices.
    expected = np.zeros_like(points)
    X = points[top]
    if dim == 2:
        sizes = np.linalg.norm(X[:, 1] - X[:, 0], axis=1)
    else:
        sizes = 0.5 * np.linalg.norm(np.cross(X[:, 1] - X[:, 0], X[:, 2] - X[:, 0]), axis=1)
    Ef = E[top]
    weights = sizes[:, None] * (Ef + Ef.sum(axis=1, keepdims=True)) / (dim * (dim + 1))
    np.add.at(expected[:, -1], top.ravel(), (-d / depth * weights).ravel())

    on_bottom = np.isclose(points[:, -1], 0.0)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(r[~on_bottom], expected[~on_bottom], rtol=0, atol=1e-12 * scale)
    # A wrong cell weighting (E of the first vertex instead of the mean) would fail:
    assert np.abs(expected[~on_bottom]).max() > 0.1 * scale


# --------------------------------------------------------------------------------------------------
# Matrix properties
# --------------------------------------------------------------------------------------------------
def _mesh(dim, rng):
    if dim == 2:
        return rectangle(5, 4, 1.0, 0.8, 0.25, rng)
    return box(3, 2, 2, (1.0, 0.8, 0.7), 0.2, rng)


@pytest.mark.parametrize(("dim", "plane"), [(2, "stress"), (2, "strain"), (3, "stress")])
@pytest.mark.parametrize("support", ["fixed", "sliding"])
def test_symmetric_positive_definite_after_supports(rng, dim, plane, support):
    points, cells, _, bottom = _mesh(dim, rng)
    E = rng.uniform(0.2, 2.0, len(points))
    K = stiffness_matrix(points, cells, E, nu=0.3, plane=plane)
    assert isinstance(K, sp.csr_matrix) and K.shape == (dim * len(points),) * 2
    assert abs(K - K.T).max() <= 1e-14 * abs(K).max()
    free = np.setdiff1d(np.arange(K.shape[0]), dirichlet_dofs(points, bottom, support))
    Kf = K[free][:, free].toarray()
    eigenvalues = np.linalg.eigvalsh(0.5 * (Kf + Kf.T))
    assert eigenvalues.min() > 1e-8 * eigenvalues.max()
    np.linalg.cholesky(Kf)


@pytest.mark.parametrize(("dim", "plane"), [(2, "stress"), (2, "strain"), (3, "stress")])
def test_rigid_body_modes_span_the_null_space(rng, dim, plane):
    points, cells, _, _ = _mesh(dim, rng)
    E = rng.uniform(0.2, 2.0, len(points))
    K = stiffness_matrix(points, cells, E, nu=0.3, plane=plane)
    R = rigid_body_modes(points)
    assert R.shape[1] == (3 if dim == 2 else 6)
    KR = K @ R
    assert np.abs(KR).max() <= 1e-13 * abs(K).max() * np.abs(R).max()
    # ... and nothing else: exactly 3 (6) zero eigenvalues.
    eigenvalues = np.linalg.eigvalsh(K.toarray())
    n_zero = np.sum(np.abs(eigenvalues) < 1e-10 * eigenvalues.max())
    assert n_zero == R.shape[1]


@pytest.mark.parametrize(("dim", "plane"), [(2, "stress"), (2, "strain"), (3, "strain")])
def test_stiffness_is_linear_in_the_modulus(rng, dim, plane):
    points, cells, _, _ = _mesh(dim, rng)
    E1, E2 = rng.uniform(0.1, 1.0, (2, len(points)))
    K = lambda E: stiffness_matrix(points, cells, E, nu=0.27, plane=plane)  # noqa: E731
    difference = K(E1 + E2) - K(E1) - K(E2)
    assert abs(difference).max() <= 1e-14 * abs(K(E1 + E2)).max()
    assert abs(K(2.5 * E1) - 2.5 * K(E1)).max() <= 1e-14 * abs(K(E1)).max()


def test_plane_is_ignored_in_3d(rng):
    points, cells, _, _ = _mesh(3, rng)
    Ks = stiffness_matrix(points, cells, 1.0, nu=0.3, plane="stress")
    Kt = stiffness_matrix(points, cells, 1.0, nu=0.3, plane="strain")
    assert abs(Ks - Kt).max() == 0.0


def test_single_triangle_matches_hand_computation():
    """Unit right triangle, plane stress, E = 1, nu = 0: K = |T| B^T diag(1, 1, 1/2) B."""
    points = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    K = stiffness_matrix(points, [[0, 1, 2]], [1.0, 2.0, 3.0], nu=0.0).toarray()
    B = np.array([[-1, 0, 1, 0, 0, 0],
                  [0, -1, 0, 0, 0, 1],
                  [-1, -1, 0, 1, 1, 0]], dtype=float)
    expected = 2.0 * 0.5 * B.T @ np.diag([1.0, 1.0, 0.5]) @ B     # mean E = 2, area 1/2
    np.testing.assert_allclose(K, expected, rtol=0, atol=1e-15)


# --------------------------------------------------------------------------------------------------
# Load and supports
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [2, 3])
def test_load_vector_total_force(rng, dim):
    points, cells, top, _ = _mesh(dim, rng)
    t = rng.uniform(-1.0, 1.0, dim)
    f = load_vector(points, top, t).reshape(-1, dim)
    area = 1.0 if dim == 2 else 1.0 * 0.8
    np.testing.assert_allclose(f.sum(axis=0), t * area, rtol=1e-13)
    assert np.all(f[np.setdiff1d(np.arange(len(points)), top)] == 0.0)


def test_sliding_support_dofs_2d(rng):
    points, cells, _, bottom = rectangle(4, 3, 1.0, 1.0, 0.25, rng)
    nodes = np.unique(bottom)
    corner = nodes[np.argmin(points[nodes, 0])]
    assert np.allclose(points[corner], [0.0, 0.0])
    expected = np.sort(np.concatenate([2 * nodes + 1, [2 * corner]]))
    np.testing.assert_array_equal(dirichlet_dofs(points, bottom, "sliding"), expected)
    np.testing.assert_array_equal(dirichlet_dofs(points, bottom, "fixed"),
                                  np.sort(np.concatenate([2 * nodes, 2 * nodes + 1])))


def test_sliding_support_dofs_3d(rng):
    points, cells, _, bottom = box(3, 2, 2, (1.0, 0.8, 0.7), 0.2, rng)
    nodes = np.unique(bottom)
    a = nodes[np.flatnonzero(np.all(points[nodes] == [0.0, 0.0, 0.0], axis=1))[0]]
    b = nodes[np.flatnonzero(np.all(points[nodes] == [0.0, 0.8, 0.0], axis=1))[0]]
    expected = np.sort(np.concatenate([3 * nodes + 2, [3 * a, 3 * a + 1, 3 * b]]))
    np.testing.assert_array_equal(dirichlet_dofs(points, bottom, "sliding"), expected)


def test_sliding_support_3d_is_statically_determinate(rng):
    """A horizontal load on a sliding block: K is nonsingular, the reactions balance the load."""
    points, cells, top, bottom = box(2, 2, 2, (1.0, 1.0, 1.0), 0.2, rng)
    K = stiffness_matrix(points, cells, 1.0, nu=0.3)
    u = solve_elasticity(points, cells, 1.0, nu=0.3, traction=[0.0, 0.0, -0.01],
                         load_facets=top, support_facets=bottom, support="sliding")
    reaction = (K @ u.ravel() - load_vector(points, top, [0.0, 0.0, -0.01])).reshape(-1, 3)
    fixed = dirichlet_dofs(points, bottom, "sliding")
    free = np.setdiff1d(np.arange(K.shape[0]), fixed)
    assert np.abs(reaction.ravel()[free]).max() < 1e-14
    # The x and y reactions vanish (no lateral load, statically determinate lateral supports).
    assert np.abs(reaction[:, :2]).max() < 1e-14


def test_unused_nodes_are_nan_and_ignored(rng):
    points, cells, top, bottom = rectangle(4, 3, 1.0, 1.0, 0.0, rng)
    extra = np.vstack([points, [[5.0, 5.0]]])
    u = solve_elasticity(extra, cells, 1.0, nu=0.3, traction=[0.0, -0.1], load_facets=top,
                         support_facets=bottom, support="sliding")
    u0 = solve_elasticity(points, cells, 1.0, nu=0.3, traction=[0.0, -0.1], load_facets=top,
                          support_facets=bottom, support="sliding")
    assert np.all(np.isnan(u[-1]))
    np.testing.assert_array_equal(u[:-1], u0)


def test_input_validation(rng):
    points, cells, top, bottom = rectangle(3, 3, 1.0, 1.0, 0.0, rng)
    kw = dict(nu=0.3, traction=[0.0, -1.0], load_facets=top, support_facets=bottom)
    with pytest.raises(ValueError, match="cells"):
        solve_elasticity(points, cells[:, :2], 1.0, **kw)
    with pytest.raises(ValueError, match="columns"):
        solve_elasticity(points[:, :1], cells, 1.0, **kw)
    with pytest.raises(ValueError, match="non-zero z"):
        solve_elasticity(np.column_stack([points, np.ones(len(points))]), cells, 1.0, **kw)
    with pytest.raises(ValueError, match="E must be"):
        solve_elasticity(points, cells, np.ones(3), **kw)
    with pytest.raises(ValueError, match="positive"):
        solve_elasticity(points, cells, -1.0, **kw)
    with pytest.raises(ValueError, match="indices"):
        solve_elasticity(points, cells + 100, 1.0, **kw)
    with pytest.raises(ValueError, match="nu"):
        solve_elasticity(points, cells, 1.0, **{**kw, "nu": 0.5}, plane="strain")
    with pytest.raises(ValueError, match="plane"):
        solve_elasticity(points, cells, 1.0, **kw, plane="membrane")
    with pytest.raises(ValueError, match="support"):
        solve_elasticity(points, cells, 1.0, **kw, support="glued")
    with pytest.raises(ValueError, match="traction"):
        solve_elasticity(points, cells, 1.0, **{**kw, "traction": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="load_facets"):
        solve_elasticity(points, cells, 1.0, **{**kw, "load_facets": np.ones((2, 3), int)})
    with pytest.raises(ValueError, match="not boundary facets"):   # a diagonal: interior edge
        solve_elasticity(points, cells, 1.0, **{**kw, "load_facets": cells[:1, [0, 2]]})
    with pytest.raises(ValueError, match="degenerate"):
        flat = points.copy()
        flat[:, 1] = 0.0
        stiffness_matrix(flat, cells, 1.0, nu=0.3)
    # A sliding support on one vertical edge leaves the rotation free.
    with pytest.raises(np.linalg.LinAlgError, match="rigid motion"):
        solve_elasticity(points, cells, 1.0, **{**kw, "support_facets": [[0, 1]]},
                         support="sliding")


# --------------------------------------------------------------------------------------------------
# meshio
# --------------------------------------------------------------------------------------------------
def test_facets_from_meshio(rng):
    meshio = pytest.importorskip("meshio")
    points, cells, top, bottom = rectangle(4, 3, 1.0, 1.0, 0.0, rng)
    left = np.array([[0, 1], [1, 2]])
    mesh = meshio.Mesh(
        np.column_stack([points, np.zeros(len(points))]),
        [("line", np.concatenate([bottom, top])), ("triangle", cells), ("line", left)],
        cell_data={"gmsh:physical": [np.r_[np.full(len(bottom), 1), np.full(len(top), 2)],
                                     np.full(len(cells), 3), np.full(len(left), 1)]},
        field_data={"bottom": np.array([1, 1]), "top": np.array([2, 1]),
                    "domain": np.array([3, 2]), "left": np.array([4, 1])})
    np.testing.assert_array_equal(facets_from_meshio(mesh, "top"), top)
    np.testing.assert_array_equal(facets_from_meshio(mesh, "bottom"),
                                  np.concatenate([bottom, left]))
    np.testing.assert_array_equal(facets_from_meshio(mesh, "domain"), cells)
    with pytest.raises(KeyError):
        facets_from_meshio(mesh, "right")
    with pytest.raises(ValueError, match="no cells"):
        facets_from_meshio(mesh, "left")
    # A solve from the meshio arrays (points with a zero z column) matches the numpy one.
    u = solve_elasticity(mesh.points, mesh.get_cells_type("triangle"), 1.0, nu=0.3,
                         traction=[0.0, -0.1], load_facets=facets_from_meshio(mesh, "top"),
                         support_facets=bottom, support="sliding")
    u0 = solve_elasticity(points, cells, 1.0, nu=0.3, traction=[0.0, -0.1], load_facets=top,
                          support_facets=bottom, support="sliding")
    np.testing.assert_array_equal(u, u0)
