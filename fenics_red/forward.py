"""The forward model of quasi-static elastography, ``K(E) u = D(u) E = f`` (paper, equation 1).

Linear elasticity on P1 triangles (2-D) or tetrahedra (3-D) with a nodal (P1) Young's modulus
``E``, on a :class:`~fenics_red.domain.Domain`. The stiffness ``K(E)``
is the Jacobian of the residual form ``r(E; u, v) = inner(sigma(E, u), eps(v)) dx`` with respect to
``u``; because ``r`` is linear in ``E`` too, its derivative with respect to ``E`` gives the
rectangular operator ``D(u)`` (vector dofs x scalar dofs) with ``D(u) E = K(E) u`` to round-off.
Forms are compiled once per model and matrices reassembled in place when ``E`` or ``u`` change.

Near ``nu = 1/2`` (tissue: 0.495) plain P1 elements lock in 3-D and plane strain: at 16³ cells
their displacement is 14 % (axial) and 41 % (lateral) from P2's, thirteen times the noise at 35 dB,
and an ML estimate from data that no P1 model made (P2's plus noise) has 2.5 times the error.
There the bulk part of the stress is integrated per node by default (:class:`_NodalVolumetric`,
``ForwardSettings.volumetric``): 2 % and 5 % from P2, at 3-5 times the memory
(``benchmarks/volumetric.py``). ``D(u) E = K(E) u`` holds to round-off either way.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

from mpi4py import MPI
from petsc4py import PETSc

import numpy as np

import ufl
from dolfinx import fem, mesh
from dolfinx.fem import petsc as fem_petsc

from .domain import LOAD, SUPPORT, Domain, make_domain
from .raster import ImageGrid, NodalImage, NodeOrder, raster_for, validate_image

__all__ = ["ForwardSettings", "ElasticityModel", "strain", "stress", "deviatoric_stress",
           "bulk_factor", "lame_parameters", "reference_displacement", "simulate_displacement"]

#: MUMPS ICNTL(14): workspace above MUMPS's own estimate, in percent. Its default (20) ran out
#: (MUMPS error -9, PETSc reason 3) on 2 ranks for the nodal bulk part's wider stencil.
MUMPS_WORKSPACE = {"mat_mumps_icntl_14": 100}
_SOLVER_OPTIONS = {
    "lu": {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": "mumps",
           **MUMPS_WORKSPACE},
    "gamg": {"ksp_type": "cg", "pc_type": "gamg", "ksp_rtol": 1e-12, "ksp_atol": 1e-30,
             "ksp_max_it": 2000, "pc_gamg_coarse_eq_limit": 1000,
             "mg_levels_ksp_type": "chebyshev", "mg_levels_pc_type": "jacobi"},
}
_SOLVERS = ("auto", *_SOLVER_OPTIONS)

#: ``solver="auto"``: the largest 3-D problem (global displacement dofs) still solved by MUMPS LU.
#: A solve with a new ``K``, LU / GAMG (set-up + solve), on tetrahedral unit cubes (nu = 0.495,
#: 1 rank, OpenBLAS; ``benchmarks/forward3d.py``): 0.22 / 0.34 s at 12^3 cells (6.6k dofs),
#: 0.58 / 1.1 s at 16^3 (15k), 3.7 / 5.0 s at 24^3 (47k), 16 / 11 s at 32^3 (108k, LU 2.3 GB
#: against 0.3 GB): they break even near 60k dofs. (With the reference BLAS, before OpenBLAS was
#: installed, LU took 8 times longer and broke even near 4k dofs.)
AUTO_LU_MAX_DOFS = 50000
#: ``solver="auto"`` for a solver that solves *many* times with one ``K`` (Gauss-Newton's CG, the
#: likelihood's ``Γ`` within a round): the largest 3-D problem still factorised. A
#: back-substitution costs 1/15 to 1/25 of a GAMG solve, so the factorisation pays off far beyond
#: :data:`AUTO_LU_MAX_DOFS`; its time (~ N^2) and memory (~ N^(4/3)) set the limit (measurements:
#: :data:`fenics_red.likelihood.AUTO_CHOLESKY_MAX_DOFS`).
AUTO_FACTOR_MAX_DOFS = 300000
#: Memory of one process's Python, DOLFINx and PETSc (bytes), before any mesh.
SOLVE_BASE_BYTES = 200 * 2**20
#: Memory of a forward model and its solver per mesh node, all ranks together (bytes), measured
#: (``benchmarks/results/forward.md``, ``forward3d.md``): MUMPS LU about 6 kB per node in 2-D and
#: up to 64 kB in 3-D (0.45 GB at 20³ cells, 2.3 GB at 32³); CG + GAMG about 4 kB per dof
#: on 2 ranks (the parallel set-up's share included).
SOLVE_BYTES_PER_NODE = {("lu", 2): 6 * 2**10, ("lu", 3): 64 * 2**10,
                        ("gamg", 2): 8 * 2**10, ("gamg", 3): 12 * 2**10}
#: :data:`SOLVE_BYTES_PER_NODE` times this with ``volumetric="nodal"``, whose ``K`` couples the
#: nodes of a patch (about 4 times the nonzeros): peak memory above the process's base, 1 rank,
#: nodal over plain (2026-12-02, a loaded machine): LU 3.2 at 20³ cells and at 256² (plane
#: strain), GAMG 3.2 at 256² and 5.1 at 32³ (its coarse levels fill in too).
NODAL_MEMORY_FACTOR = {("lu", 2): 3.2, ("lu", 3): 3.2, ("gamg", 2): 3.2, ("gamg", 3): 5.1}
_instance_counter = itertools.count()


@dataclass(frozen=True)
class ForwardSettings:
    """Material law, loads, supports and linear solver of the forward model.

    Attributes:
        nu: Poisson ratio (tissue is nearly incompressible: 0.495 by default).
        plane: ``"stress"`` (default; does not lock for nu -> 1/2) or ``"strain"``; 2-D only.
        volumetric: how the volumetric (bulk) part of the stress is integrated where it is
            stiff (3-D and plane strain): ``"nodal"`` averages the volume change over each node's
            patch of cells (average nodal pressure, Bonet & Burton 1998), which removes the
            locking of P1 elements near ``nu = 1/2``; ``"element"`` is the plain P1 element,
            which locks (module docstring). Plane stress always uses ``"element"`` (nothing to
            lock). ``"auto"`` (default): ``"nodal"`` in 3-D and plane strain.
        traction: pressure of the probe on the loaded boundary (``t = -traction * n``: downward on
            a flat top), force per unit length (2-D) or area (3-D).
        shear_traction: traction on the loaded boundary along the first (lateral) axis.
        support: ``"fixed"`` clamps the supported boundary; ``"sliding"`` holds it along the depth
            axis only and pins the fewest lateral components that remove the rigid motions (free
            lateral expansion; see :meth:`ElasticityModel._supports`).
        solver: ``"auto"`` (default: MUMPS LU in 2-D and for 3-D problems up to
            :data:`AUTO_LU_MAX_DOFS` displacement dofs, GAMG above), ``"lu"`` (MUMPS) or
            ``"gamg"`` (CG + smoothed aggregation with the rigid-body near-nullspace, for large
            meshes). :meth:`resolve_solver` tells which one a mesh gets.
        petsc_options: extra PETSc options for the forward KSP (without prefix); they override the
            defaults of ``solver``.
    """

    nu: float = 0.495
    plane: str = "stress"
    volumetric: str = "auto"
    traction: float = 1e-3
    shear_traction: float = 0.0
    support: str = "fixed"
    solver: str = "auto"
    petsc_options: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self):
        if not (np.isfinite(self.nu) and -1.0 < self.nu < 0.5):
            raise ValueError(f"Poisson ratio nu must lie in (-1, 0.5), got {self.nu!r}")
        if self.plane not in ("stress", "strain"):
            raise ValueError(f"plane must be 'stress' or 'strain', got {self.plane!r}")
        if self.volumetric not in ("auto", "nodal", "element"):
            raise ValueError("volumetric must be 'auto', 'nodal' or 'element', got "
                             f"{self.volumetric!r}")
        if self.support not in ("fixed", "sliding"):
            raise ValueError(f"support must be 'fixed' or 'sliding', got {self.support!r}")
        if self.solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {list(_SOLVERS)}, got {self.solver!r}")
        for name in ("traction", "shear_traction"):
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        """Plain dictionary (for attributes of output files)."""
        out = asdict(self)
        out["petsc_options"] = dict(self.petsc_options)
        return out

    def resolve_volumetric(self, dim: int) -> str:
        """``"nodal"`` or ``"element"``: the volumetric integration for a mesh of dimension
        ``dim`` (plane stress is always ``"element"``)."""
        if dim == 2 and self.plane == "stress":
            return "element"
        return "nodal" if self.volumetric == "auto" else self.volumetric

    def resolve_solver(self, dim: int, n_dofs: int, many_solves: bool = False) -> str:
        """``"lu"`` or ``"gamg"``: the solver for a mesh of dimension ``dim`` with ``n_dofs``
        global displacement dofs (``"auto"``: GAMG only in 3-D above :data:`AUTO_LU_MAX_DOFS`, or
        above :data:`AUTO_FACTOR_MAX_DOFS` for a caller that solves ``many_solves`` times with
        one ``K``)."""
        if self.solver != "auto":
            return self.solver
        limit = AUTO_FACTOR_MAX_DOFS if many_solves else AUTO_LU_MAX_DOFS
        return "gamg" if dim == 3 and n_dofs > limit else "lu"


def solve_memory(nodes: int, dim: int, settings: ForwardSettings | None = None,
                 share: float = 1.0, processes: int = 1) -> float:
    """Bytes a forward solve on a mesh of ``nodes`` nodes needs on one machine: ``share`` of the
    model and solver of :data:`SOLVE_BYTES_PER_NODE` (the solver that ``settings`` resolves to;
    the machine's ranks over all ranks for a distributed mesh) and :data:`SOLVE_BASE_BYTES` per
    process on it."""
    settings = settings or ForwardSettings()
    solver = settings.resolve_solver(dim, nodes * dim)
    per_node = SOLVE_BYTES_PER_NODE[solver, dim]
    if settings.resolve_volumetric(dim) == "nodal":
        per_node *= NODAL_MEMORY_FACTOR[solver, dim]
    return processes * SOLVE_BASE_BYTES + share * per_node * nodes


def lame_parameters(E, nu: float, plane: str, dim: int = 2):
    """Lamé parameters ``(mu, lambda)`` of a modulus ``E`` (UFL or numbers).

    In 2-D, plane stress uses the effective ``lambda* = E nu / (1 - nu^2)`` and plane strain the
    3-D value; in 3-D (``dim=3``) ``plane`` does not apply.
    """
    mu = E / (2.0 * (1.0 + nu))
    if plane == "strain" or dim == 3:
        lmbda = E * nu / ((1.0 + nu) * (1.0 - 2.0 * nu))
    else:
        lmbda = E * nu / (1.0 - nu**2)
    return mu, lmbda


def strain(u):
    """Small-strain tensor ``sym(grad u)``."""
    return ufl.sym(ufl.grad(u))


def stress(E, u, nu: float, plane: str = "stress"):
    """Cauchy stress of isotropic linear elasticity, linear in both ``E`` and ``u``."""
    mu, lmbda = lame_parameters(E, nu, plane, len(u))
    eps = strain(u)
    return 2.0 * mu * eps + lmbda * ufl.tr(eps) * ufl.Identity(len(u))


def bulk_factor(nu: float) -> float:
    """``κ / E = 1 / (3 (1 - 2 nu))``: the bulk modulus ``κ = λ + 2μ/3`` per unit ``E`` (3-D and
    plane strain), the part of the stress that grows without bound as ``nu -> 1/2``."""
    return 1.0 / (3.0 * (1.0 - 2.0 * nu))


def deviatoric_stress(E, u, nu: float):
    """``σ − κ tr(ε) I = 2μ (ε − tr(ε)/3 I)``: the stress without its bulk part (3-D and plane
    strain; in 2-D ``I`` is the in-plane identity, and ``2μ ε + λ tr(ε) I`` is recovered exactly
    by adding ``κ tr(ε) I``)."""
    mu = E / (2.0 * (1.0 + nu))
    eps = strain(u)
    return 2.0 * mu * (eps - ufl.tr(eps) / 3.0 * ufl.Identity(len(u)))


class ElasticityModel:
    """Assembles ``K(E)``, ``D(u)`` and ``f``, and solves ``K(E) u = f`` with PETSc KSP.

    The communicator is the mesh's. ``E`` (:attr:`E`) lives in a scalar P1 space :attr:`Q`,
    displacements in a vector P1 space :attr:`V` with one component per geometric dimension.
    Dirichlet rows are the supports; the other (free) rows are the equations the inverse problem
    uses (:attr:`free_dofs`).

    Args:
        domain: a :class:`~fenics_red.domain.Domain` (mesh with tagged load and support facets),
            or a bare mesh, tagged by the depth-axis convention of :mod:`fenics_red.domain`.
        settings: material law, loads, supports, solver; kept as :attr:`settings` with
            ``solver="auto"`` resolved to the solver used (:attr:`solver`).
        grid: for a bare mesh made by :meth:`ImageGrid.create_mesh`, its grid (exact images).
        body_force: optional UFL vector expression added to the load (used by verification tests).
        bcs: optional callable ``bcs(V) -> list[DirichletBC]`` building Dirichlet conditions on
            the model's displacement space, replacing the supports of ``settings``.
    """

    def __init__(self, domain: Domain | mesh.Mesh, settings: ForwardSettings | None = None,
                 grid: ImageGrid | None = None, *, body_force=None, bcs=None):
        if not isinstance(domain, Domain):
            domain = Domain.from_mesh(domain, grid=grid, source="grid" if grid else "mesh")
        settings = settings or ForwardSettings()
        self.domain = domain
        self.mesh = msh = domain.mesh
        self.comm = msh.comm
        self.grid = domain.grid
        self.dim = msh.geometry.dim
        self.V, self.Q = self.function_spaces(msh)
        self.n_dofs = self.V.dofmap.index_map.size_global * self.V.dofmap.index_map_bs
        solver = settings.resolve_solver(self.dim, self.n_dofs)  # the same on every rank
        self.settings = settings = replace(settings, solver=solver,
                                           volumetric=settings.resolve_volumetric(self.dim))
        self.E = fem.Function(self.Q, name="E")
        self.E.x.array[:] = 1.0
        self.u = fem.Function(self.V, name="u")
        self.u_data = fem.Function(self.V, name="u_data")
        self.lower, self.upper = domain.bounds()

        ds = ufl.Measure("ds", domain=msh, subdomain_data=domain.facet_tags)
        v = ufl.TestFunction(self.V)
        if settings.volumetric == "nodal":  # the bulk part: _NodalVolumetric
            sigma = deviatoric_stress(self.E, self.u, settings.nu)
        else:
            sigma = stress(self.E, self.u, settings.nu, settings.plane)
        residual = ufl.inner(sigma, strain(v)) * ufl.dx
        data_residual = ufl.replace(residual, {self.u: self.u_data})
        self._a = fem.form(ufl.derivative(residual, self.u, ufl.TrialFunction(self.V)))
        self._D = fem.form(ufl.derivative(data_residual, self.E, ufl.TrialFunction(self.Q)))
        # The probe presses normal to the loaded boundary (t = -p n: downward on a flat top);
        # the shear traction acts along the first (lateral) axis.
        self._pressure = fem.Constant(msh, PETSc.ScalarType(settings.traction))
        shear = np.zeros(self.dim)
        shear[0] = settings.shear_traction
        self._shear = fem.Constant(msh, shear.astype(PETSc.ScalarType))
        n = ufl.FacetNormal(msh)
        load = ufl.inner(self._shear - self._pressure * n, v) * ds(LOAD)
        if body_force is not None:
            load = load + ufl.inner(body_force, v) * ufl.dx
        self._L = fem.form(load)

        self.bcs = self._supports() if bcs is None else list(bcs(self.V))

        self._matrices: dict[tuple[str, bool], PETSc.Mat] = {}
        self._nodal = _NodalVolumetric(self) if settings.volumetric == "nodal" else None
        self._rigid_body_modes: PETSc.NullSpace | None = None
        self._modulus_changed = True
        self.b = fem_petsc.create_vector(self._L)
        self.ksp = self._create_solver()
        self._images = {}
        self._force = None
        if domain.force is not None:  # nodal forces (file order) instead of the traction
            force = fem.Function(self.V, name="nodal force")
            self.from_values(np.asarray(domain.force).T, force.x.array, "V", "nodal force")
            n_owned = self.V.dofmap.index_map.size_local * self.V.dofmap.index_map_bs
            self._force = force.x.array[:n_owned].copy()
        #: pixel size of the raster of a mesh (:meth:`images`; ``None``: its mean node spacing)
        self.raster_spacing: float | None = None

    # -- construction ----------------------------------------------------------------------------

    @staticmethod
    def function_spaces(msh: mesh.Mesh) -> tuple[fem.FunctionSpace, fem.FunctionSpace]:
        """The displacement (vector P1) and modulus (scalar P1) spaces on ``msh``."""
        gdim = msh.geometry.dim
        return (fem.functionspace(msh, ("Lagrange", 1, (gdim,))),
                fem.functionspace(msh, ("Lagrange", 1)))

    @classmethod
    def on_grid(cls, grid, comm: MPI.Comm, settings: ForwardSettings | None = None
                ) -> ElasticityModel:
        """A model on the mesh of an image grid (or of any domain spec of
        :func:`~fenics_red.domain.make_domain`: a data set's mesh), distributed over ``comm``."""
        return cls(make_domain(grid, comm), settings)

    def _supports(self) -> list[fem.DirichletBC]:
        """``fixed``: every component zero on the support. ``sliding``: the depth component zero
        there, plus the fewest lateral components that remove the remaining rigid motions: in 2-D
        ``u_x`` at the support node of smallest ``(x, y)``; in 3-D ``u_x, u_y`` at the node A of
        smallest ``(x, y, z)`` and ``u_x`` at the node farthest from A in ``y``. Sliding needs a
        flat support normal to the depth axis."""
        fdim = self.mesh.topology.dim - 1
        support = self.domain.facets(SUPPORT)
        zero = PETSc.ScalarType(0)
        if self.settings.support == "fixed":
            dofs = fem.locate_dofs_topological(self.V, fdim, support)
            return [fem.dirichletbc(np.zeros(self.dim, dtype=PETSc.ScalarType), dofs, self.V)]
        depth = self.dim - 1
        self.mesh.topology.create_connectivity(fdim, 0)
        self.mesh.topology.create_connectivity(0, self.mesh.topology.dim)
        vertices = np.unique(mesh.compute_incident_entities(self.mesh.topology, support, fdim, 0))
        x = mesh.compute_midpoints(self.mesh, 0, vertices.astype(np.int32))[:, :self.dim]
        levels = self.comm.allgather((x[:, depth].min(initial=np.inf),
                                      x[:, depth].max(initial=-np.inf)))
        low, high = min(lv[0] for lv in levels), max(lv[1] for lv in levels)
        if high - low > 1e-8 * float(np.max(self.upper - self.lower)):
            raise ValueError("support='sliding' needs a flat support normal to the depth axis "
                             "(the last coordinate); use support='fixed' for this mesh")
        bcs = [fem.dirichletbc(zero, fem.locate_dofs_topological(self.V.sub(depth), fdim, support),
                               self.V.sub(depth))]
        first, (_, y_first, *_) = _extreme_vertex(self.comm, vertices, x, tuple)
        pinned = [(first, c) for c in range(depth)]
        if self.dim == 3:  # the node farthest from the first in y pins the rotation about z
            second, _ = _extreme_vertex(self.comm, vertices, x,
                                        lambda p: (-abs(p[1] - y_first), *p))
            pinned.append((second, 0))
        for vertex, component in pinned:
            dofs = fem.locate_dofs_topological(self.V.sub(component), 0, vertex)
            bcs.append(fem.dirichletbc(zero, dofs, self.V.sub(component)))
        return bcs

    def _create_solver(self) -> PETSc.KSP:
        """The forward KSP under the prefix ``fenics_red_forward_N_`` (unique per model): the
        defaults of ``settings.solver``, then command-line options with that prefix, then
        ``settings.petsc_options`` (:func:`fenics_red.petsc_options.set_options`)."""
        from .petsc_options import set_options

        K = self._matrix("K", True)
        ksp = PETSc.KSP().create(self.comm)
        ksp.setOperators(K)
        set_options(ksp, f"fenics_red_forward_{next(_instance_counter)}_",
                    _SOLVER_OPTIONS[self.settings.solver], self.settings.petsc_options)
        if ksp.getPC().getType() == "gamg":  # before the first solve sets the PC up
            K.setNearNullSpace(self.rigid_body_modes())
        return ksp

    @property
    def solver(self) -> str:
        """The forward solver in use, ``"lu"`` or ``"gamg"`` (``"auto"`` resolved)."""
        return self.settings.solver

    def rigid_body_modes(self) -> PETSc.NullSpace:
        """The rigid-body modes of the displacement space (3 in 2-D, 6 in 3-D), orthonormalised,
        as a PETSc near-nullspace: translations along each axis and rotations in each plane.

        Made once per model and shared (the forward KSP, ``Γ``'s ``K`` solver): its vectors
        borrow arrays that the model keeps alive. Collective on the first call."""
        if self._rigid_body_modes is not None:
            return self._rigid_body_modes
        n_owned = self.V.dofmap.index_map.size_local
        gdim = self.dim
        x = self.V.tabulate_dof_coordinates()[:n_owned, :gdim]
        planes = [(i, j) for i in range(gdim) for j in range(i + 1, gdim)]
        modes = np.zeros((gdim + len(planes), n_owned, gdim))
        for i in range(gdim):
            modes[i, :, i] = 1.0
        for k, (i, j) in enumerate(planes, start=gdim):
            modes[k, :, i], modes[k, :, j] = -x[:, j], x[:, i]
        modes = modes.reshape(len(modes), -1)
        for i in range(len(modes)):  # modified Gram-Schmidt with global dot products
            for j in range(i):
                modes[i] -= self.comm.allreduce(modes[j] @ modes[i], op=MPI.SUM) * modes[j]
            modes[i] /= np.sqrt(self.comm.allreduce(modes[i] @ modes[i], op=MPI.SUM))
        self._rigid_body_arrays = modes  # PETSc borrows this memory: keep it alive
        vectors = [PETSc.Vec().createWithArray(mode, bsize=gdim, comm=self.comm)
                   for mode in modes]
        self._rigid_body_modes = PETSc.NullSpace().create(vectors=vectors, comm=self.comm)
        return self._rigid_body_modes

    def _matrix(self, name: str, apply_bcs: bool) -> PETSc.Mat:
        """``"K"``, ``"D"`` (the forms' matrices; with the nodal bulk part, ``"K"`` has the
        pattern of both parts and ``"K_form"`` holds the form's part)."""
        key = (name, apply_bcs)
        if key not in self._matrices:
            if name == "K" and self._nodal is not None:
                self._matrices[key] = self._nodal.union_pattern(self._form_K(apply_bcs),
                                                                 apply_bcs)
            else:
                form = self._D if name == "D" else self._a
                self._matrices[key] = fem_petsc.create_matrix(form)
        return self._matrices[key]

    def _form_K(self, apply_bcs: bool) -> PETSc.Mat:
        """The stiffness of the residual form (all of ``K``, or its deviatoric part)."""
        K = self._matrix("K_form" if self._nodal is not None else "K", apply_bcs)
        K.zeroEntries()
        fem_petsc.assemble_matrix(K, self._a, bcs=self.bcs if apply_bcs else [])
        K.assemble()
        return K

    # -- images ----------------------------------------------------------------------------------

    def images(self, space: str) -> NodalImage:
        """The raster of ``"V"`` (displacement) or ``"Q"`` (modulus): exact on grid domains,
        interpolating on any other 2-D mesh (:func:`fenics_red.raster.raster_for`)."""
        if space not in self._images:
            self._images[space] = raster_for(self.V if space == "V" else self.Q, self.domain,
                                             self.raster_spacing)
        return self._images[space]

    def node_order(self, space: str) -> NodeOrder:
        """Exact map between local values of ``"V"`` or ``"Q"`` and arrays in the domain's file
        node order (:meth:`fenics_red.domain.Domain.node_indices`)."""
        key = ("order", space)
        if key not in self._images:
            V = self.V if space == "V" else self.Q
            self._images[key] = NodeOrder(V, self.domain.node_indices(V),
                                          self.domain.num_file_nodes)
        return self._images[key]

    def to_values(self, local: np.ndarray, space: str = "Q") -> np.ndarray:
        """Local dof values of ``"Q"`` (or ``"V"``) as arrays in file order on every rank:
        shape :attr:`Domain.value_shape` (an image on grids), with a leading component axis for
        ``"V"``. Exact. Collective."""
        arrays = self.node_order(space).gather(local)
        shape = self.domain.value_shape
        return arrays[0].reshape(shape) if space == "Q" else arrays.reshape(-1, *shape)

    def from_values(self, values, out: np.ndarray, space: str = "Q",
                    name: str = "nodal values") -> np.ndarray:
        """Write arrays in file order (shape :attr:`Domain.value_shape`, components first for
        ``"V"``) into local dof values ``out`` (owned and ghosts)."""
        values = np.asarray(values, dtype=np.float64)
        order = self.node_order(space)
        shape = self.domain.value_shape
        expected = shape if space == "Q" else (order.block_size, *shape)
        if values.shape != tuple(expected):
            what = "image" if self.grid is not None else "array of one value per mesh node"
            raise ValueError(f"{name}: expected an {what} of shape {tuple(expected)}, got "
                             f"{values.shape}")
        return order.scatter(values.reshape(order.block_size, -1), out)

    # -- state -----------------------------------------------------------------------------------

    def set_modulus(self, E) -> None:
        """Set ``E`` from an image ``(ny+1, nx+1)``, a function on :attr:`Q` or local dof values.

        Raises ``ValueError`` for non-finite or non-positive moduli.
        """
        if isinstance(E, fem.Function):
            values = E.x.array
        else:
            values = np.asarray(E, dtype=np.float64)
            if values.ndim >= 2:  # an image (a volume in 3-D)
                values = validate_image(values, self.grid.shape if self.grid else None,
                                        "modulus image", positive=True)
                self.images("Q").from_image(values, self.E)
                values = None
        if values is not None:
            if values.shape != self.E.x.array.shape:
                expected = f"an image of shape {self.grid.shape} or " if self.grid else ""
                raise ValueError(f"modulus must be {expected}{self.E.x.array.size} local nodal "
                                 f"values, got an array of shape {values.shape}")
            self.E.x.array[:] = values
        self.check_modulus()
        self._modulus_changed = True

    def check_modulus(self) -> None:
        """Raise ``ValueError`` on every rank if any rank holds a non-finite or non-positive E."""
        local = self.E.x.array
        bad = int(not (np.isfinite(local).all() and (local > 0).all()))
        if self.comm.allreduce(bad, op=MPI.MAX):
            finite = local[np.isfinite(local)]
            raise ValueError("Young's modulus must be finite and strictly positive everywhere "
                             f"(local minimum {finite.min() if len(finite) else 'n/a'})")

    def modulus_changed(self) -> None:
        """Declare that :attr:`E` was modified in place, so ``K(E)`` is reassembled when needed."""
        self._modulus_changed = True

    # -- assembly --------------------------------------------------------------------------------

    def assemble_K(self, apply_bcs: bool = True) -> PETSc.Mat:
        """Reassemble ``K(E)`` in place and return it.

        With ``apply_bcs`` the Dirichlet rows and columns are replaced by the identity, so the
        matrix is ``diag(K_ff, I)`` (free dofs first in this picture); without, it is the full
        stiffness for which ``D(u) E = K(E) u`` holds on every row.
        """
        if self._nodal is None:
            K = self._form_K(apply_bcs)
        else:
            K = self._matrix("K", apply_bcs)
            K.zeroEntries()
            K.axpy(1.0, self._form_K(apply_bcs), PETSc.Mat.Structure.SUBSET_NONZERO_PATTERN)
            K.axpy(1.0, self._nodal.stiffness(apply_bcs),
                   PETSc.Mat.Structure.SUBSET_NONZERO_PATTERN)
        if apply_bcs:
            self._modulus_changed = False
        return K

    def assemble_D(self, u=None, apply_bcs: bool = False) -> PETSc.Mat:
        """Reassemble ``D(u)`` (size ``dN x N`` in ``d`` dimensions) in place and return it.

        ``u`` (a function on :attr:`V` or local values) defaults to the current :attr:`u_data`.
        With ``apply_bcs`` the Dirichlet rows are zero, leaving the free equations only.
        """
        if u is not None:
            self.u_data.x.array[:] = u.x.array if isinstance(u, fem.Function) else u
        D = self._matrix("D", apply_bcs)
        D.zeroEntries()
        fem_petsc.assemble_matrix(D, self._D, bcs=self.bcs if apply_bcs else [])
        D.assemble()
        if self._nodal is not None:
            D.axpy(1.0, self._nodal.sensitivity(self.u_data, apply_bcs),
                   PETSc.Mat.Structure.SUBSET_NONZERO_PATTERN)
        return D

    def assemble_load(self) -> PETSc.Vec:
        """Reassemble the load vector ``f`` (Dirichlet rows hold the prescribed values): the
        traction's, plus the domain's nodal forces when it has them."""
        with self.b.localForm() as local:
            local.set(0.0)
        fem_petsc.assemble_vector(self.b, self._L)
        fem_petsc.apply_lifting(self.b, [self._a], bcs=[self.bcs])
        self.b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        if self._nodal is not None:  # the bulk part's lifting: b -= K_vol g (g: prescribed)
            self._nodal.lift(self.b)
        if self._force is not None:  # point loads: one value per owned dof
            self.b.array[:] += self._force
        fem_petsc.set_bc(self.b, self.bcs)
        return self.b

    @property
    def free_dofs(self) -> np.ndarray:
        """Boolean mask over owned displacement dofs (unrolled): True where not Dirichlet."""
        n = self.V.dofmap.index_map.size_local * self.V.dofmap.index_map_bs
        mask = np.ones(n, dtype=bool)
        for bc in self.bcs:
            dofs, _ = bc.dof_indices()
            mask[dofs[dofs < n]] = False
        return mask

    # -- solve -----------------------------------------------------------------------------------

    def solve(self, E=None) -> fem.Function:
        """Solve ``K(E) u = f`` and return :attr:`u`; ``E`` as in :meth:`set_modulus`."""
        if E is not None:
            self.set_modulus(E)
        if self._modulus_changed:
            self.assemble_K()
        self.assemble_load()
        self.ksp.solve(self.b, self.u.x.petsc_vec)
        reason = self.ksp.getConvergedReason()
        if reason < 0:
            raise RuntimeError(f"forward solve failed to converge (PETSc KSP reason {reason}); "
                               "check the modulus for extreme contrasts or use solver='lu'")
        self.u.x.scatter_forward()
        return self.u

    def displacement_images(self, u: fem.Function | None = None) -> tuple[np.ndarray, ...]:
        """The component images ``(ux, uy)`` of a displacement (default :attr:`u`) through the
        raster (2-D). Collective."""
        images = self.images("V").to_image(u or self.u)
        return tuple(images)

    def destroy(self) -> None:
        """Free the PETSc objects (collective)."""
        self.ksp.destroy()
        self.b.destroy()
        if self._rigid_body_modes is not None:
            self._rigid_body_modes.destroy()
            self._rigid_body_modes = None
        for matrix in self._matrices.values():
            matrix.destroy()
        self._matrices.clear()
        if self._nodal is not None:
            self._nodal.destroy()


class _NodalVolumetric:
    """The bulk part of ``K(E)`` and ``D(u)`` with the volume change averaged per node.

    Plain P1 elements lock near ``nu = 1/2``: every cell's volume change is held near zero, too
    many constraints for the nodes' displacements. Averaging it over each node's patch of cells
    (the average-nodal-pressure element of Bonet & Burton, 1998) leaves one constraint per node::

        K_vol(E) = Gᵀ diag(c E / V) G,      D_vol(u) = Gᵀ diag(c (G u) / V),

    with ``G_ai = ∫ N_a div(φ_i) dx`` (``N_a`` the P1 hat function of node ``a``, ``φ_i`` a
    displacement basis function), ``V_a = ∫ N_a dx`` and ``c = κ/E`` (:func:`bulk_factor`), so
    ``D_vol(u) E = K_vol(E) u`` exactly. With ``apply_bcs`` the columns of Dirichlet dofs in ``G``
    are zero, hence their rows and columns in ``K_vol`` and rows in ``D_vol``. PETSc products on
    the model's communicator; ``K_vol`` couples dofs of cells that share a node (a wider stencil
    than the form's).
    """

    def __init__(self, model: ElasticityModel):
        self.model = model
        self.c = bulk_factor(model.settings.nu)
        q, v = ufl.TestFunction(model.Q), ufl.TrialFunction(model.V)
        form = fem.form(q * ufl.div(v) * ufl.dx)
        self.G = {}
        for bcs in (False, True):
            G = fem_petsc.assemble_matrix(form, bcs=model.bcs if bcs else [])
            G.assemble()
            self.G[bcs] = G
        self.Gt = {bcs: G.transpose(PETSc.Mat()) for bcs, G in self.G.items()}
        volume = fem_petsc.assemble_vector(fem.form(q * ufl.dx))
        volume.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        self.inv_volume = self.G[False].createVecLeft()
        self.inv_volume.array[:] = 1.0 / volume.array_r[: self.inv_volume.getLocalSize()]
        volume.destroy()
        self.weights = self.inv_volume.duplicate()
        self._scaled = {}  # scratch copies of G (rows scaled) and Gᵀ (columns scaled)
        self._K = {}

    def _scratch(self, name: str, source: PETSc.Mat) -> PETSc.Mat:
        if name not in self._scaled:
            self._scaled[name] = source.copy()
        else:
            source.copy(self._scaled[name], PETSc.Mat.Structure.SAME_NONZERO_PATTERN)
        return self._scaled[name]

    def stiffness(self, apply_bcs: bool) -> PETSc.Mat:
        """``K_vol(E)`` at the model's current ``E``."""
        n = self.weights.getLocalSize()
        self.weights.array[:] = self.c * self.model.E.x.array[:n] * self.inv_volume.array_r
        scaled = self._scratch(("G", apply_bcs), self.G[apply_bcs])
        scaled.diagonalScale(L=self.weights)
        self._K[apply_bcs] = self.G[apply_bcs].transposeMatMult(
            scaled, result=self._K.get(apply_bcs))
        return self._K[apply_bcs]

    def sensitivity(self, u: fem.Function, apply_bcs: bool) -> PETSc.Mat:
        """``D_vol(u)``: ``Gᵀ`` with its columns scaled by ``c (G u) / V``."""
        self.G[False].mult(u.x.petsc_vec, self.weights)  # all of u, as the form's D(u)
        self.weights.pointwiseMult(self.weights, self.inv_volume)
        self.weights.scale(self.c)
        scaled = self._scratch(("Gt", apply_bcs), self.Gt[apply_bcs])
        scaled.diagonalScale(R=self.weights)
        return scaled

    def union_pattern(self, form_K: PETSc.Mat, apply_bcs: bool) -> PETSc.Mat:
        """A matrix with the nonzero pattern of ``form_K + K_vol`` (the model's ``K``)."""
        K = self.stiffness(apply_bcs).duplicate(copy=True)
        K.axpy(1.0, form_K, PETSc.Mat.Structure.DIFFERENT_NONZERO_PATTERN)
        K.setBlockSize(self.model.dim) if K.getBlockSize() != self.model.dim else None
        return K

    def lift(self, b: PETSc.Vec) -> None:
        """``b -= K_vol(E) g`` with ``g`` the prescribed Dirichlet values (zero on supports)."""
        g = self.G[False].createVecRight()
        t = g.duplicate()
        try:
            fem_petsc.set_bc(g, self.model.bcs)
            if g.norm(PETSc.NormType.NORM_INFINITY) > 0.0:
                self.stiffness(False).mult(g, t)
                b.axpy(-1.0, t)
        finally:
            g.destroy()
            t.destroy()

    def destroy(self) -> None:
        for mat in (*self.G.values(), *self.Gt.values(), *self._scaled.values(),
                    *self._K.values()):
            mat.destroy()
        for vec in (self.inv_volume, self.weights):
            vec.destroy()


def reference_displacement(model: ElasticityModel, degree: int = 2) -> np.ndarray:
    """The displacement of the model's modulus, traction and clamped support computed with
    Lagrange elements of ``degree`` and plain integration, at the model's nodes in file order
    (``(dim, N)``, on every rank): a reference for the discretisation error of the model, e.g.
    of plain P1 near ``nu = 1/2``. Only ``support="fixed"`` and the traction load. Collective."""
    s, msh, dim = model.settings, model.mesh, model.dim
    if s.support != "fixed" or model._force is not None:
        raise ValueError("reference_displacement supports the clamped support and the traction "
                         "load only")
    V = fem.functionspace(msh, ("Lagrange", degree, (dim,)))
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    a = fem.form(ufl.inner(stress(model.E, u, s.nu, s.plane), strain(v)) * ufl.dx)
    ds = ufl.Measure("ds", domain=msh, subdomain_data=model.domain.facet_tags)
    traction = model._shear - model._pressure * ufl.FacetNormal(msh)
    L = fem.form(ufl.inner(traction, v) * ds(LOAD))
    dofs = fem.locate_dofs_topological(V, dim - 1, model.domain.facets(SUPPORT))
    bc = fem.dirichletbc(np.zeros(dim, dtype=PETSc.ScalarType), dofs, V)
    A = fem_petsc.assemble_matrix(a, bcs=[bc])
    A.assemble()
    b = fem_petsc.assemble_vector(L)
    fem_petsc.apply_lifting(b, [a], bcs=[[bc]])
    b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
    fem_petsc.set_bc(b, [bc])
    ksp = PETSc.KSP().create(msh.comm)
    ksp.setOperators(A)
    ksp.setType("preonly")
    ksp.getPC().setType("lu")
    ksp.getPC().setFactorSolverType("mumps")
    high = fem.Function(V)
    try:
        ksp.solve(b, high.x.petsc_vec)
        high.x.scatter_forward()
        at_nodes = fem.Function(model.V)
        at_nodes.interpolate(high)
        return model.to_values(at_nodes.x.array, "V").reshape(dim, -1)
    finally:
        for obj in (ksp, A, b):
            obj.destroy()


def _extreme_vertex(comm: MPI.Comm, vertices: np.ndarray, x: np.ndarray, key):
    """``(local indices, key)`` of the vertex minimising ``key(coordinates)`` over all ranks:
    the indices hold it on the ranks that have it (possibly several, as a ghost), else none."""
    local = min(((tuple(key(p)), i) for i, p in enumerate(x)), default=None)
    best = min(item[0] for item in comm.allgather(local) if item is not None)
    if local is not None and np.allclose(local[0], best, rtol=0, atol=1e-12):
        return vertices[[local[1]]].astype(np.int32), best
    return np.zeros(0, dtype=np.int32), best


def simulate_displacement(modulus: np.ndarray, grid: ImageGrid | None = None,
                          settings: ForwardSettings | None = None,
                          comm: MPI.Comm = MPI.COMM_SELF) -> tuple[np.ndarray, np.ndarray]:
    """Displacement images ``(ux, uy)`` of a modulus image: one forward solve on ``comm``."""
    modulus = validate_image(modulus, None, "modulus image", positive=True)
    grid = grid or ImageGrid.from_shape(modulus.shape)
    model = ElasticityModel.on_grid(grid, comm, settings)
    try:
        model.solve(modulus)
        return model.displacement_images()
    finally:
        model.destroy()
