"""An independent P1 linear-elasticity code (numpy + scipy.sparse only) to check the DOLFINx model.

It solves the problem ``fenics_red.forward`` solves, on any triangle (2-D) or tetrahedron (3-D)
mesh, without DOLFINx, UFL or PETSc:

    find u (P1, vector) with  u = 0 on the supported dofs  and
    int sigma(E, u) : eps(v) dx = int_{load facets} t . v ds   for all admissible v,
    sigma = 2 mu eps + lambda tr(eps) I,   mu = E / (2 (1 + nu)),
    lambda = E nu / ((1 + nu)(1 - 2 nu))   (2-D plane strain and 3-D),
    lambda = E nu / (1 - nu^2)             (2-D plane stress),

with a nodal (P1) Young's modulus ``E`` and a constant traction vector ``t``. Everything below is
exact for these spaces (no quadrature): the P1 strain is constant in a cell and E is linear there,
so a cell contributes ``mean(E at its vertices) * |cell| * B^T C_1 B`` (C_1: the elasticity matrix
for E = 1, engineering shear strains); a load facet gives ``t |facet| / (its vertex count)`` to each
of its vertices. The Dirichlet dofs (all zero) are eliminated and the rest is solved with
``scipy.sparse.linalg.spsolve``.

Dofs are interleaved in the input node order: ``[u0x, u0y, (u0z), u1x, ...]``; the returned
displacement is ``(n_nodes, gdim)`` in the input node order. Nodes used by no cell (gmsh geometry
points, say) carry no dofs: their displacement is NaN.

Supports (``support_facets``, the same facet format as the load):

* ``"fixed"``: every component of every vertex of the support facets is zero.
* ``"sliding"``: the LAST component (the depth axis: y in 2-D, z in 3-D) is zero on every vertex of
  the support facets, whatever their orientation (meant for a flat bottom y = const / z = const),
  and the remaining rigid motions are removed by the fewest extra zero components:

  - 2-D (one motion left, x translation; rotation is held by the y constraints as soon as the
    support has two distinct x): the x component of the support vertex A with the smallest x,
    ties broken by the smallest y.  For a rectangle's bottom edge that is the lower-left corner,
    as in ``fenics_red.forward``.
  - 3-D (three motions left: x and y translation, rotation about z): the x and y components of the
    support vertex A that is lexicographically smallest in (x, y, z), and the x component of the
    support vertex B farthest from A in y (largest |y_B - y_A|, ties broken by the
    lexicographically smallest (x, y, z)).  For a box's bottom face z = z0 that is A = (x0, y0, z0)
    and B = (x0, y1, z0).  A support with y_B = y_A is rejected.

  ``dirichlet_dofs`` returns exactly the dofs either support fixes.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

__all__ = ["dirichlet_dofs", "elasticity_matrix", "facets_from_meshio", "load_vector",
           "solve_elasticity", "stiffness_matrix"]

# Gradients of the P1 basis functions on the reference simplex (rows: vertices).
_REFERENCE_GRADIENTS = {
    2: np.array([[-1.0, -1.0], [1.0, 0.0], [0.0, 1.0]]),
    3: np.array([[-1.0, -1.0, -1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
}
_CELL_TYPES = {3: 2, 4: 3}  # vertices per cell -> gdim (triangle, tetrahedron)
_GMSH_DIMENSION = {"vertex": 0, "line": 1, "triangle": 2, "quad": 2, "tetra": 3, "hexahedron": 3,
                   "wedge": 3, "pyramid": 3}


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------
def _mesh_arrays(points, cells) -> tuple[np.ndarray, np.ndarray, int]:
    """Checked ``(points (n, gdim) float, cells (m, gdim + 1) int64, gdim)``."""
    cells = np.asarray(cells)
    if cells.ndim != 2 or cells.shape[1] not in _CELL_TYPES or cells.shape[0] == 0:
        raise ValueError(f"cells must be a non-empty (m, 3) triangle or (m, 4) tetrahedron array, "
                         f"got shape {cells.shape}")
    if not np.issubdtype(cells.dtype, np.integer):
        raise ValueError(f"cells must hold integer vertex indices, got dtype {cells.dtype}")
    gdim = _CELL_TYPES[cells.shape[1]]
    points = np.asarray(points, dtype=float)
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"points must be a non-empty (n, {gdim}) array, got shape {points.shape}")
    if gdim == 2 and points.shape[1] == 3:
        if np.any(points[:, 2] != 0.0):
            raise ValueError("triangle mesh with a non-zero z coordinate: a 2-D mesh must be flat "
                             "(z = 0)")
        points = points[:, :2]
    if points.shape[1] != gdim:
        raise ValueError(f"points must have {gdim} columns for "
                         f"{'triangles' if gdim == 2 else 'tetrahedra'}, got shape {points.shape}")
    if not np.all(np.isfinite(points)):
        raise ValueError("points must be finite")
    cells = cells.astype(np.int64)
    if cells.min() < 0 or cells.max() >= points.shape[0]:
        raise ValueError(f"cell vertex indices must lie in [0, {points.shape[0]}), got "
                         f"[{cells.min()}, {cells.max()}]")
    if np.any(np.diff(np.sort(cells, axis=1), axis=1) == 0):
        raise ValueError("a cell repeats a vertex")
    return points, cells, gdim


def _modulus(E, n_nodes: int) -> np.ndarray:
    E = np.asarray(E, dtype=float)
    if E.ndim == 0:
        E = np.full(n_nodes, float(E))
    if E.shape != (n_nodes,):
        raise ValueError(f"E must be a scalar or one value per node, shape ({n_nodes},), "
                         f"got shape {E.shape}")
    if not np.all(np.isfinite(E)):
        raise ValueError("E must be finite")
    return E


def _check_material(nu: float, plane: str, gdim: int) -> float:
    if plane not in ("stress", "strain"):
        raise ValueError(f"plane must be 'stress' or 'strain', got {plane!r}")
    nu = float(nu)
    upper = 1.0 if (gdim == 2 and plane == "stress") else 0.5
    if not -1.0 < nu < upper:
        raise ValueError(f"nu must lie in (-1, {upper}) here, got {nu}")
    return nu


def _facet_array(facets, gdim: int, name: str) -> np.ndarray:
    facets = np.asarray(facets)
    if facets.size == 0:
        return np.zeros((0, gdim), dtype=np.int64)
    if facets.ndim != 2 or facets.shape[1] != gdim:
        kind = "edges" if gdim == 2 else "triangles"
        raise ValueError(f"{name} must be a (k, {gdim}) array of {kind} for a {gdim}-D mesh, "
                         f"got shape {facets.shape}")
    if not np.issubdtype(facets.dtype, np.integer):
        raise ValueError(f"{name} must hold integer vertex indices, got dtype {facets.dtype}")
    return facets.astype(np.int64)


def _cell_faces(cells: np.ndarray) -> np.ndarray:
    """All faces (facets) of all cells, vertex indices sorted in each row, with repeats."""
    nv = cells.shape[1]
    faces = [np.delete(cells, i, axis=1) for i in range(nv)]
    return np.sort(np.concatenate(faces), axis=1)


def _check_boundary_facets(facets: np.ndarray, cells: np.ndarray, name: str) -> None:
    """Every facet must be a face of exactly one cell (a boundary facet of the mesh)."""
    if facets.shape[0] == 0:
        return
    faces, counts = np.unique(_cell_faces(cells), axis=0, return_counts=True)
    boundary = faces[counts == 1]
    given = np.sort(facets, axis=1)
    both = np.concatenate([boundary, given])
    _, inverse, total = np.unique(both, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    # A given facet is on the boundary when its row also occurs among the boundary faces.
    on_boundary = np.zeros(total.shape[0], dtype=bool)
    on_boundary[inverse[:boundary.shape[0]]] = True
    bad = ~on_boundary[inverse[boundary.shape[0]:]]
    if np.any(bad):
        raise ValueError(f"{name}: {int(bad.sum())} of {facets.shape[0]} facets are not boundary "
                         f"facets of the mesh, e.g. {facets[np.argmax(bad)].tolist()}")


# --------------------------------------------------------------------------------------------------
# Element matrices
# --------------------------------------------------------------------------------------------------
def elasticity_matrix(nu: float, plane: str, gdim: int) -> np.ndarray:
    """C_1: the Voigt elasticity matrix for E = 1 (strains [xx, yy, (zz, 2yz, 2xz,) 2xy])."""
    mu = 1.0 / (2.0 * (1.0 + nu))
    if gdim == 2 and plane == "stress":
        lmbda = nu / (1.0 - nu**2)
    else:
        lmbda = nu / ((1.0 + nu) * (1.0 - 2.0 * nu))
    n_normal, n_shear = (2, 1) if gdim == 2 else (3, 3)
    C = np.zeros((n_normal + n_shear,) * 2)
    C[:n_normal, :n_normal] = lmbda
    C[np.arange(n_normal), np.arange(n_normal)] += 2.0 * mu
    C[np.arange(n_normal, n_normal + n_shear), np.arange(n_normal, n_normal + n_shear)] = mu
    return C


def _gradients_and_volumes(points: np.ndarray, cells: np.ndarray, gdim: int):
    """P1 basis gradients (m, gdim + 1, gdim) and cell volumes (m,)."""
    X = points[cells]                                   # (m, nv, gdim)
    J = np.swapaxes(X[:, 1:, :] - X[:, :1, :], 1, 2)    # columns: edges from vertex 0
    det = np.linalg.det(J)
    scale = np.max(np.ptp(points, axis=0))
    if np.any(np.abs(det) <= 1e-12 * scale**gdim):
        raise ValueError(f"{int(np.sum(np.abs(det) <= 1e-12 * scale**gdim))} degenerate cells "
                         f"(zero {'area' if gdim == 2 else 'volume'})")
    grads = _REFERENCE_GRADIENTS[gdim] @ np.linalg.inv(J)   # dphi_i/dx = dphi_i/dxi . dxi/dx
    volumes = np.abs(det) / (2.0 if gdim == 2 else 6.0)
    return grads, volumes


def _strain_displacement(grads: np.ndarray, gdim: int) -> np.ndarray:
    """B (m, n_voigt, nv * gdim) mapping the interleaved cell dofs to Voigt strains."""
    m, nv, _ = grads.shape
    if gdim == 2:
        rows = [((0, 0),), ((1, 1),), ((0, 1), (1, 0))]            # xx, yy, 2xy
    else:
        rows = [((0, 0),), ((1, 1),), ((2, 2),),                    # xx, yy, zz
                ((1, 2), (2, 1)), ((0, 2), (2, 0)), ((0, 1), (1, 0))]  # 2yz, 2xz, 2xy
    B = np.zeros((m, len(rows), nv, gdim))
    for r, terms in enumerate(rows):
        for component, derivative in terms:   # + d u_component / d x_derivative
            B[:, r, :, component] = grads[:, :, derivative]
    return B.reshape(m, len(rows), nv * gdim)


def _cell_dofs(cells: np.ndarray, gdim: int) -> np.ndarray:
    return (gdim * cells[:, :, None] + np.arange(gdim)).reshape(cells.shape[0], -1)


def stiffness_matrix(points, cells, E, *, nu, plane="stress") -> sp.csr_matrix:
    """The unconstrained stiffness K(E) ((n gdim) x (n gdim), interleaved dofs, CSR).

    ``plane`` is checked but only used in 2-D; ``E`` is a scalar or one value per node.
    """
    points, cells, gdim = _mesh_arrays(points, cells)
    nu = _check_material(nu, plane, gdim)
    E = _modulus(E, points.shape[0])
    grads, volumes = _gradients_and_volumes(points, cells, gdim)
    B = _strain_displacement(grads, gdim)
    C = elasticity_matrix(nu, plane, gdim)
    weights = E[cells].mean(axis=1) * volumes
    Ke = np.einsum("c,cki,kl,clj->cij", weights, B, C, B, optimize=True)
    dofs = _cell_dofs(cells, gdim)
    nd = dofs.shape[1]
    rows = np.repeat(dofs, nd, axis=1).ravel()
    cols = np.tile(dofs, (1, nd)).ravel()
    n = gdim * points.shape[0]
    return sp.coo_matrix((Ke.ravel(), (rows, cols)), shape=(n, n)).tocsr()


def load_vector(points, facets, traction) -> np.ndarray:
    """Consistent load of a constant traction on facets: t |facet| / nv to each facet vertex.

    ``gdim`` comes from the facets (edges: 2, triangles: 3); points may carry a zero z column
    in 2-D. Facets are not checked against a mesh here (``solve_elasticity`` does that).
    """
    facets = np.asarray(facets)
    if facets.ndim != 2 or facets.shape[1] not in (2, 3):
        raise ValueError(f"facets must be (k, 2) edges or (k, 3) triangles, got {facets.shape}")
    gdim = facets.shape[1]
    points = _points_for(points, gdim)
    facets = _facet_array(facets, gdim, "facets")
    traction = np.asarray(traction, dtype=float)
    if traction.shape != (gdim,) or not np.all(np.isfinite(traction)):
        raise ValueError(f"traction must be a finite vector of length {gdim}, got {traction!r}")
    if facets.size and (facets.min() < 0 or facets.max() >= points.shape[0]):
        raise ValueError("facet vertex indices out of range")
    X = points[facets]
    if gdim == 2:
        sizes = np.linalg.norm(X[:, 1] - X[:, 0], axis=1)
    else:
        sizes = 0.5 * np.linalg.norm(np.cross(X[:, 1] - X[:, 0], X[:, 2] - X[:, 0]), axis=1)
    f = np.zeros((points.shape[0], gdim))
    share = (sizes / gdim)[:, None] * traction[None, :]      # nv = gdim vertices per facet
    for i in range(gdim):
        np.add.at(f, facets[:, i], share)
    return f.ravel()


def _points_for(points, gdim: int) -> np.ndarray:
    points = np.asarray(points, dtype=float)
    if points.ndim != 2:
        raise ValueError(f"points must be an (n, {gdim}) array, got shape {points.shape}")
    if gdim == 2 and points.shape[1] == 3 and np.all(points[:, 2] == 0.0):
        points = points[:, :2]
    if points.shape[1] != gdim:
        raise ValueError(f"points must have {gdim} columns, got shape {points.shape}")
    return points


# --------------------------------------------------------------------------------------------------
# Supports and solve
# --------------------------------------------------------------------------------------------------
def dirichlet_dofs(points, support_facets, support="fixed") -> np.ndarray:
    """The sorted interleaved dofs a support sets to zero (see the module docstring).

    ``gdim`` comes from the facets: (k, 2) edges -> 2-D, (k, 3) triangles -> 3-D.
    """
    if support not in ("fixed", "sliding"):
        raise ValueError(f"support must be 'fixed' or 'sliding', got {support!r}")
    facets = np.asarray(support_facets)
    if facets.ndim != 2 or facets.shape[1] not in (2, 3) or facets.shape[0] == 0:
        raise ValueError(f"support_facets must be a non-empty (k, 2) edge or (k, 3) triangle "
                         f"array, got shape {facets.shape}")
    gdim = facets.shape[1]
    points = _points_for(points, gdim)
    facets = _facet_array(facets, gdim, "support_facets")
    if facets.min() < 0 or facets.max() >= points.shape[0]:
        raise ValueError("support facet vertex indices out of range")
    nodes = np.unique(facets)
    if support == "fixed":
        return np.sort((gdim * nodes[:, None] + np.arange(gdim)).ravel())
    X = points[nodes]
    dofs = [gdim * nodes + (gdim - 1)]                 # the normal (last) component everywhere
    # A: lexicographically smallest (x, y[, z]); np.lexsort sorts by its LAST key first.
    a = np.lexsort(X.T[::-1])[0]
    if gdim == 2:
        dofs.append([gdim * nodes[a] + 0])
    else:
        distance = np.abs(X[:, 1] - X[a, 1])
        candidates = np.flatnonzero(distance == distance.max())
        b = candidates[np.lexsort(X[candidates].T[::-1])[0]]
        if distance[b] == 0.0:
            raise ValueError("sliding support in 3-D needs support vertices at two different y")
        dofs.append([gdim * nodes[a] + 0, gdim * nodes[a] + 1, gdim * nodes[b] + 0])
    return np.unique(np.concatenate([np.asarray(d, dtype=np.int64) for d in dofs]))


def solve_elasticity(points, cells, E, *, nu, plane="stress", traction, load_facets,
                     support_facets, support="fixed") -> np.ndarray:
    """Displacement ``(n_nodes, gdim)`` in the input node order (NaN on nodes of no cell).

    ``load_facets`` (may be empty) and ``support_facets`` are (k, 2) edges in 2-D or (k, 3)
    triangles in 3-D and must be boundary facets of the mesh; ``traction`` is a constant vector of
    length gdim (force per unit length / area); ``support`` is ``"fixed"`` or ``"sliding"``.
    """
    points, cells, gdim = _mesh_arrays(points, cells)
    E = _modulus(E, points.shape[0])
    if np.any(E[np.unique(cells)] <= 0.0):
        raise ValueError("E must be positive on the mesh nodes")
    load_facets = _facet_array(load_facets, gdim, "load_facets")
    support_facets = _facet_array(support_facets, gdim, "support_facets")
    if support_facets.shape[0] == 0:
        raise ValueError("support_facets is empty")
    _check_boundary_facets(load_facets, cells, "load_facets")
    _check_boundary_facets(support_facets, cells, "support_facets")

    K = stiffness_matrix(points, cells, E, nu=nu, plane=plane)
    f = load_vector(points, load_facets, traction)
    n_dofs = gdim * points.shape[0]
    used = np.zeros(points.shape[0], dtype=bool)
    used[cells.ravel()] = True
    fixed = dirichlet_dofs(points, support_facets, support)
    modes = _rigid_body_modes(points, cells)
    if np.linalg.matrix_rank(modes[fixed]) < modes.shape[1]:
        raise np.linalg.LinAlgError(f"the supports ({support!r}) leave a rigid motion free")
    free = np.repeat(used, gdim)
    free[fixed] = False
    u = np.zeros(n_dofs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", spla.MatrixRankWarning)
        try:
            u[free] = spla.spsolve(K[free][:, free].tocsc(), f[free],
                                   permc_spec="MMD_AT_PLUS_A")  # symmetric pattern
        except spla.MatrixRankWarning as error:
            raise np.linalg.LinAlgError(f"singular stiffness after the supports ({support!r}): "
                                        f"rigid motions are not removed") from error
    if not np.all(np.isfinite(u)):
        raise np.linalg.LinAlgError("the solve returned non-finite values")
    u = u.reshape(-1, gdim)
    u[~used] = np.nan
    return u


def _rigid_body_modes(points: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Rigid motions (columns, interleaved dofs) about the mesh centre, scaled to unit size."""
    n, gdim = points.shape
    used = np.unique(cells)
    centre = points[used].mean(axis=0)
    r = (points - centre) / max(np.max(np.abs(points[used] - centre)), np.finfo(float).tiny)
    modes = [np.tile(np.eye(gdim)[axis], (n, 1)) for axis in range(gdim)]
    if gdim == 2:
        modes.append(np.column_stack([-r[:, 1], r[:, 0]]))
    else:
        modes += [np.cross(np.eye(3)[axis], r) for axis in range(3)]
    return np.column_stack([m.ravel() for m in modes])


# --------------------------------------------------------------------------------------------------
# meshio
# --------------------------------------------------------------------------------------------------
def facets_from_meshio(mesh, name) -> np.ndarray:
    """The cells of the physical group ``name`` of a gmsh mesh read by meshio, one array.

    Uses ``mesh.field_data[name] = [tag, dim]`` and ``mesh.cell_data["gmsh:physical"]``; returns the
    (k, nv) vertex indices of all cell blocks of dimension ``dim`` tagged ``tag`` (for a boundary
    group: (k, 2) edges in 2-D, (k, 3) triangles in 3-D), in file order.
    """
    if name not in mesh.field_data:
        raise KeyError(f"no physical group {name!r}; the mesh has {sorted(mesh.field_data)}")
    tag, dim = (int(v) for v in np.asarray(mesh.field_data[name]).ravel()[:2])
    if "gmsh:physical" not in mesh.cell_data:
        raise KeyError("the mesh has no cell_data['gmsh:physical'] (not a gmsh mesh?)")
    blocks = []
    for block, tags in zip(mesh.cells, mesh.cell_data["gmsh:physical"], strict=True):
        if _GMSH_DIMENSION.get(block.type) != dim:
            continue
        selected = np.asarray(block.data)[np.asarray(tags).ravel() == tag]
        if selected.shape[0]:
            blocks.append(selected)
    if not blocks:
        raise ValueError(f"physical group {name!r} (tag {tag}, dimension {dim}) has no cells")
    if len({b.shape[1] for b in blocks}) > 1:
        raise ValueError(f"physical group {name!r} mixes cell types")
    return np.concatenate(blocks).astype(np.int64)
