"""Specification of the forward model and the likelihood in 3-D (tetrahedral boxes, no image grid).

Every test runs serially and under ``mpirun -n 2``. Values that every rank must agree on (moduli,
displacements, directions) are smooth functions of the coordinates or arrays in the mesh's own
node order (:meth:`ElasticityModel.to_values`), never draws on local dofs.
"""

from mpi4py import MPI

import numpy as np
import pytest
from manufactured import manufactured_l2_error

import ufl
from dolfinx import fem, mesh
from fenics_red.forward import (
    AUTO_FACTOR_MAX_DOFS,
    AUTO_LU_MAX_DOFS,
    ElasticityModel,
    ForwardSettings,
)
from fenics_red.likelihood import (
    AUTO_CHOLESKY_MAX_DOFS,
    LikelihoodSettings,
    NoiseModel,
    StatisticalLikelihood,
)
from fenics_red.linalg import taylor_test
from fenics_red.raster import ImageGrid

_LENGTHS = (1.0, 0.8, 0.6)


def _box(comm, n=(4, 3, 3), lengths=_LENGTHS):
    """A tetrahedral box ``[0, L]``: load on top (z = Lz), support at the bottom (z = 0)."""
    return mesh.create_box(comm, [np.zeros(3), np.array(lengths, dtype=float)], list(n),
                           mesh.CellType.tetrahedron)


def _stiff_inclusion(x):
    """A heterogeneous modulus: a smooth stiff inclusion (0.8) in a soft background (0.2)."""
    r2 = (x[0] - 0.6) ** 2 + (x[1] - 0.35) ** 2 + (x[2] - 0.3) ** 2
    return 0.2 + 0.6 * np.exp(-r2 / 0.04)


def _model(comm, n=(4, 3, 3), settings=None, modulus=_stiff_inclusion):
    model = ElasticityModel(_box(comm, n), settings)
    model.E.interpolate(modulus)
    model.modulus_changed()
    return model


def _displacement(model) -> np.ndarray:
    """The model's displacement ``(3, N)`` in the mesh's node order, on every rank."""
    return model.to_values(model.u.x.array, "V")


# -- the forward model ---------------------------------------------------------------------------

def test_D_times_E_equals_K_times_u_to_round_off_in_3d(comm, rng):
    model = _model(comm)
    u = fem.Function(model.V)
    model.from_values(rng.uniform(-1.0, 1.0, (3, model.domain.num_file_nodes)), u.x.array, "V")

    K = model.assemble_K(apply_bcs=False)
    D = model.assemble_D(u)
    Ku, DE = K.createVecLeft(), D.createVecLeft()
    K.mult(u.x.petsc_vec, Ku)
    D.mult(model.E.x.petsc_vec, DE)

    n_nodes = 5 * 4 * 4
    assert D.getSize() == (3 * n_nodes, n_nodes)
    assert (DE - Ku).norm() / Ku.norm() < 1e-12
    model.destroy()


def test_sliding_support_holds_the_bottom_in_depth_and_pins_three_lateral_components(comm):
    model = ElasticityModel(_box(comm), ForwardSettings(support="sliding"))
    n_fixed = comm.allreduce(int((~model.free_dofs).sum()), op=MPI.SUM)
    assert n_fixed == 5 * 4 + 3  # u_z on the bottom face; u_x, u_y at (0,0,0); u_x at (0,Ly,0)
    model.destroy()


def test_homogeneous_block_under_uniform_compression_matches_analytical_solution_in_3d(comm):
    """Sliding support, pressure p on top: ``u = (ν p x, ν p y, −p z) / E``, exact for P1."""
    E0, nu, p = 0.35, 0.495, 2e-3
    settings = ForwardSettings(nu=nu, traction=p, support="sliding")
    model = _model(comm, settings=settings, modulus=lambda x: np.full(x.shape[1], E0))
    model.solve()

    x = model.V.tabulate_dof_coordinates()  # one row per node of the blocked space
    expected = np.stack([nu * p * x[:, 0], nu * p * x[:, 1], -p * x[:, 2]]) / E0
    computed = model.u.x.array.reshape(-1, 3).T
    scale = p / E0 * _LENGTHS[2]
    assert np.abs(computed - expected).max() < 1e-10 * scale
    model.destroy()


def _manufactured_error(n: int, comm) -> float:
    """L2 error of u on the unit cube (n³ cells) for a smooth modulus and displacement with the
    matching body force and Dirichlet data on the whole boundary."""
    msh = _box(comm, (n, n, n), (1.0, 1.0, 1.0))
    x = ufl.SpatialCoordinate(msh)
    pi = np.pi
    E_exact = 1.0 + 0.5 * ufl.sin(pi * x[0]) * ufl.cos(pi * x[1]) * ufl.cos(pi * x[2])
    s, c = (lambda t: ufl.sin(pi * t / 2)), (lambda t: ufl.cos(pi * t / 2))
    u_exact = 0.1 * ufl.as_vector([s(x[0]) * s(x[1]) * x[2],
                                   c(x[1]) * x[0] ** 2 * s(x[2]),
                                   s(x[2]) * c(x[0]) + x[1] ** 2])
    return manufactured_l2_error(msh, E_exact, u_exact, ForwardSettings(nu=0.3, traction=0.0))


def test_manufactured_solution_converges_at_second_order_in_L2_in_3d(comm):
    sizes = [4, 8, 16]
    errors = [_manufactured_error(n, comm) for n in sizes]  # rates 1.95, 1.98 when written
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert errors[-1] < 1e-3
    assert np.all(rates > 1.8), f"L2 errors {errors}, rates {rates}"


# -- solver choice -------------------------------------------------------------------------------

def test_auto_solver_is_lu_in_2d_and_for_small_3d_problems_and_gamg_above_the_threshold():
    auto = ForwardSettings()
    assert auto.solver == "auto"
    assert auto.resolve_solver(3, AUTO_LU_MAX_DOFS) == "lu"
    assert auto.resolve_solver(3, AUTO_LU_MAX_DOFS + 1) == "gamg"
    assert auto.resolve_solver(2, 10**8) == "lu"
    assert ForwardSettings(solver="lu").resolve_solver(3, 10**8) == "lu"
    assert ForwardSettings(solver="gamg").resolve_solver(2, 10) == "gamg"
    # many solves with one K (Gauss-Newton, Γ): factorised up to the likelihood's Cholesky limit
    assert AUTO_LU_MAX_DOFS < AUTO_FACTOR_MAX_DOFS == AUTO_CHOLESKY_MAX_DOFS
    assert auto.resolve_solver(3, AUTO_FACTOR_MAX_DOFS, many_solves=True) == "lu"
    assert auto.resolve_solver(3, AUTO_FACTOR_MAX_DOFS + 1, many_solves=True) == "gamg"
    k_auto = LikelihoodSettings()
    assert k_auto.resolve_k_solver(3, AUTO_CHOLESKY_MAX_DOFS) == "cholesky"
    assert k_auto.resolve_k_solver(3, AUTO_CHOLESKY_MAX_DOFS + 1) == "gamg"
    assert k_auto.resolve_k_solver(2, 10**8) == "cholesky"
    assert LikelihoodSettings(k_solver="gamg").resolve_k_solver(2, 10) == "gamg"
    with pytest.raises(ValueError, match="k_solver"):
        LikelihoodSettings(k_solver="lu")


def test_models_record_the_solver_they_resolved_and_gamg_gets_six_rigid_body_modes(comm):
    n_small = 24  # 3 · 25³ = 46875 dofs ≤ AUTO_LU_MAX_DOFS < 3 · 26³ = 52728
    assert 3 * (n_small + 1) ** 3 <= AUTO_LU_MAX_DOFS < 3 * (n_small + 2) ** 3
    for n, expected in ((n_small, "lu"), (n_small + 1, "gamg")):
        model = ElasticityModel(_box(comm, (n, n, n), (1.0, 1.0, 1.0)))
        assert model.solver == expected and model.settings.to_dict()["solver"] == expected
        assert model.ksp.getPC().getType() == expected
        if expected == "gamg":
            K, _ = model.ksp.getOperators()
            assert len(K.getNearNullSpace().getVecs()) == 6
            # the likelihood still factorises K at this size
            fid = StatisticalLikelihood(model)
            assert fid.settings.to_dict()["k_solver"] == fid.gamma.k_solver == "cholesky"
            assert fid.gamma.k_ksp.getPC().getType() == "cholesky"
            fid.destroy()
        model.destroy()


def test_auto_solver_in_2d_is_mumps_lu_as_before(comm):
    model = ElasticityModel.on_grid(ImageGrid(40, 40), comm)  # 3362 dofs
    pc = model.ksp.getPC()
    assert model.solver == "lu" and model.ksp.getType() == "preonly"
    assert pc.getType() == "lu" and pc.getFactorSolverType() == "mumps"
    model.destroy()


def test_gamg_and_lu_agree_on_a_moderate_3d_box(comm):
    results = {}
    for solver in ("lu", "gamg"):
        model = _model(comm, (10, 8, 6), ForwardSettings(solver=solver))
        model.solve()
        assert model.solver == solver
        results[solver] = _displacement(model)
        model.destroy()
    scale = np.abs(results["lu"]).max()
    assert np.abs(results["gamg"] - results["lu"]).max() < 1e-8 * scale


# -- the likelihood ------------------------------------------------------------------------------

def _measured(x):
    """A smooth stand-in for measurement noise ``(3, n)``, the same on any number of ranks."""
    return np.stack([np.sin(17 * x[0] + 29 * x[1] + 7 * x[2] + c) for c in range(3)])


def _likelihood(comm, k_solver="auto", n=(4, 3, 3), force_std=0.0, gamma_pc="auto"):
    """A likelihood on a box: the displacement of the inclusion plus 1 % 'noise', Σn to match
    (and a force noise ``force_std``)."""
    model = _model(comm, n)
    u = model.solve()
    sigma = 0.01 * comm.allreduce(np.abs(u.x.array).max(), op=MPI.MAX)
    u_m = fem.Function(model.V)
    u_m.interpolate(lambda x: sigma * _measured(x))
    u_m.x.array[:] += u.x.array
    fid = StatisticalLikelihood(model, u_m, NoiseModel((sigma,) * 3, force_std),
                                LikelihoodSettings(k_solver=k_solver, gamma_pc=gamma_pc))
    return fid


def _destroy(fid):
    fid.destroy()
    fid.model.destroy()


def _vector(fid, function):
    """A modulus-space vector of nodal values of ``function(x)``."""
    q = fem.Function(fid.model.Q)
    q.interpolate(function)
    out = fid.create_vector()
    out.array[:] = q.x.array[: out.getLocalSize()]
    return out


@pytest.mark.parametrize("k_solver", ["cholesky", "gamg"])
def test_taylor_remainder_of_g_shrinks_at_second_order_in_3d(comm, k_solver):
    """``|g(E + h δ) − g(E) − h ∇g(E)·δ| = O(h²)`` with Γ frozen; ``∇g(E + v) − ∇g(E) = H v``."""
    fid = _likelihood(comm, k_solver)
    assert fid.gamma.k_solver == fid.settings.k_solver == k_solver
    assert fid.gamma.exact  # Σw = 0: Γ⁻¹ = K⁻¹ Σn⁻¹ K⁻¹ (a factorisation or CG to 1e-12)
    E = _vector(fid, lambda x: _stiff_inclusion(x) * (1.0 + 0.2 * np.sin(5 * x[0] + 3 * x[2])))
    fid.refresh(E)
    assert np.isnan(fid.logdet()) == (k_solver == "gamg")
    direction = _vector(fid, lambda x: 1e-2 * np.cos(4 * x[0] - 6 * x[1] + 5 * x[2]))
    grad = fid.create_vector()
    assert fid.gradient(E, grad) == pytest.approx(fid.value(E), rel=1e-10)
    # the package's one Taylor check; g is quadratic for frozen Γ, so its Hessian is constant
    result = taylor_test(fid.value, fid.gradient, E, direction, steps=[0.5**k for k in range(6)],
                         hessian_mult=lambda x, v, out: fid.hessian_mult(v, out))
    assert np.allclose(result["rates"], 2.0, atol=0.05), result["rates"]
    hessian = np.array(result["hessian_remainders"])
    assert hessian.max() <= 1e-8 * grad.norm(), hessian  # exact up to the K solves' tolerance
    for vec in (E, direction, grad):
        vec.destroy()
    _destroy(fid)


def test_gamg_k_solver_gives_the_gradient_of_the_cholesky_factorisation_after_a_refresh(comm):
    values = {}
    for k_solver in ("cholesky", "gamg"):
        fid = _likelihood(comm, k_solver)
        E = _vector(fid, _stiff_inclusion)
        grad = fid.create_vector(1.0)
        fid.refresh(grad)  # a first Γ, replaced below: GAMG is set up again for the new K
        fid.refresh(E)
        values[k_solver] = (fid.gradient(E, grad), fid.to_values(grad))
        E.destroy()
        grad.destroy()
        _destroy(fid)
    (g_lu, grad_lu), (g_mg, grad_mg) = values["cholesky"], values["gamg"]
    assert g_mg == pytest.approx(g_lu, rel=1e-9)
    assert np.abs(grad_mg - grad_lu).max() < 1e-8 * np.abs(grad_lu).max()


def test_force_noise_in_3d_gives_the_gradient_of_both_gamma_preconditioners(comm):
    """With ``Σw ≠ 0`` a small 3-D problem factorises the explicit ``Γ`` (``gamma_pc="auto"``):
    the same ``g`` and ``∇g`` as CG preconditioned by ``K⁻¹ Σn⁻¹ K⁻¹``, in one CG iteration."""
    values = {}
    for pc in ("auto", "k"):
        fid = _likelihood(comm, force_std=1e-5, gamma_pc=pc)
        E = _vector(fid, _stiff_inclusion)
        grad = fid.create_vector()
        fid.refresh(E)
        values[pc] = (fid.gradient(E, grad), fid.to_values(grad), fid.gamma.iterations,
                      fid.gamma.gamma_pc)
        E.destroy()
        grad.destroy()
        _destroy(fid)
    (g_auto, grad_auto, it_auto, pc_auto), (g_k, grad_k, it_k, pc_k) = values["auto"], values["k"]
    assert (pc_auto, pc_k) == ("gamma", "k")
    assert it_auto <= 2 < it_k, (it_auto, it_k)
    assert g_auto == pytest.approx(g_k, rel=1e-8)
    assert np.abs(grad_auto - grad_k).max() < 1e-7 * np.abs(grad_k).max()


# -- any number of ranks -------------------------------------------------------------------------

def _forward_and_gradient(comm, solver):
    """Displacement, g and ∇g (in the mesh's node order) of one box on ``comm``."""
    fid = _likelihood(comm, "cholesky" if solver == "lu" else "gamg")
    model = fid.model
    assert model.solver == "lu"
    if solver == "gamg":  # the forward solve again, by GAMG
        other = _model(comm, settings=ForwardSettings(solver="gamg"))
        other.solve()
        u = _displacement(other)
        other.destroy()
    else:
        u = _displacement(model)
    E = _vector(fid, _stiff_inclusion)
    grad = fid.create_vector()
    fid.refresh(E)
    g = fid.gradient(E, grad)
    out = u, g, fid.to_values(grad)
    E.destroy()
    grad.destroy()
    _destroy(fid)
    return out


@pytest.mark.parametrize("solver, tol", [("lu", 1e-10), ("gamg", 1e-8)])
@pytest.mark.usefixtures("several_ranks")
def test_displacement_and_gradient_are_the_same_on_one_and_all_ranks_in_3d(comm, solver, tol):
    u, g, grad = _forward_and_gradient(comm, solver)
    u1, g1, grad1 = _forward_and_gradient(MPI.COMM_SELF, solver)
    assert np.abs(u - u1).max() < tol * np.abs(u1).max()
    assert g == pytest.approx(g1, rel=tol)
    assert np.abs(grad - grad1).max() < tol * np.abs(grad1).max()


def test_the_memory_pre_check_covers_the_benchmarked_peaks_per_rank():
    """``solve_memory`` (the pre-check of ``forward``/``simulate``) against the peak memory per
    rank measured by ``benchmarks/forward3d.py``: never below it, at most twice it."""
    import json
    from pathlib import Path

    from fenics_red.forward import solve_memory

    table = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "forward3d.json"
    rows = [r for r in json.loads(table.read_text())["rows"] if r["what"] in ("gamg", "lu")]
    assert len(rows) >= 6
    for row in rows:
        nodes, ranks = row["dofs"] // 3, row["ranks"]
        settings = ForwardSettings(solver=row["what"], volumetric="element")  # as measured
        estimate = solve_memory(nodes, 3, settings, 1 / ranks, 1)
        measured = row["peak memory/rank [MB]"] * 2**20
        assert measured <= estimate <= 2 * measured, (row["cells"], ranks, estimate / measured)
