"""Gauss-Newton-CG output-error baseline: derivatives, recovery, noise, MPI agreement.

Every test runs serially and under ``mpirun -n 2``; inputs are drawn as images so that all ranks
agree.
"""

import json
import math

from mpi4py import MPI

import numpy as np
import pytest

from fenics_red import ElasticityModel, ImageGrid
from fenics_red.gauss_newton import (
    GaussNewtonInversion,
    GaussNewtonSettings,
    expand_component_weights,
    l_curve_corner,
    reconstruct_gauss_newton,
)

_SMALL = ImageGrid(10, 8, 1.0, 0.8)
_GRID = ImageGrid(16, 16)


def _smooth_phantom(grid):
    x = np.linspace(0, grid.width, grid.nx + 1)[None, :]
    y = np.linspace(grid.height, 0, grid.ny + 1)[:, None]
    return 0.12 + 0.3 * np.exp(-((x - 0.5) ** 2 + (y - 0.55) ** 2) / (2 * 0.15**2))


def _inclusion_phantom(grid):
    x = np.linspace(0, grid.width, grid.nx + 1)[None, :]
    y = np.linspace(grid.height, 0, grid.ny + 1)[:, None]
    mask = (x - 0.5) ** 2 + (y - 0.55) ** 2 < 0.22**2
    return np.where(mask, 0.5, 0.12), mask


def _data(grid, E, comm):
    model = ElasticityModel.on_grid(grid, comm)
    model.solve(E)
    ux, uy = model.displacement_images()
    return model, ux, uy


def _noise(model, ux, uy, snr_db, rng):
    """Noise at ``snr_db`` over the free dofs (SNR = 10 log10(|u|^2 / |n|^2)), same on all ranks."""
    u = np.stack([ux, uy])
    free = np.ones_like(u, dtype=bool)
    free[:, -1, :] = False  # the clamped bottom row (last image row)
    sigma = math.sqrt(np.sum(u[free] ** 2) / (free.sum() * 10 ** (snr_db / 10)))
    noise = rng.normal(0.0, sigma, u.shape)
    return ux + noise[0], uy + noise[1], sigma


def _relative_error(estimate, truth):
    return float(np.linalg.norm(estimate - truth) / np.linalg.norm(truth))


@pytest.mark.parametrize("regulariser", ["tikhonov", "tv"])
def test_reduced_gradient_passes_the_taylor_test(comm, rng, regulariser):
    E = rng.uniform(0.1, 0.6, _SMALL.shape)
    model, ux, uy = _data(_SMALL, E, comm)
    ux = ux + rng.normal(0, 0.1 * np.abs(ux).max(), ux.shape)
    settings = GaussNewtonSettings(regulariser=regulariser, component_weights=(0.5, 2.0))
    with GaussNewtonInversion(model, ux, uy, settings) as inversion:
        inversion.set_tv_smoothing(0.2)
        m = np.log(rng.uniform(0.1, 0.6, _SMALL.shape))
        direction = rng.normal(size=_SMALL.shape)
        # alpha large enough that the regulariser's share of the gradient is checked too
        result = inversion.taylor_test(m, direction, alpha=1e-5)
    remainders, rates = result["remainders"], result["rates"]
    assert abs(result["directional_derivative"]) > 0
    assert remainders[-1] < 1e-2 * abs(result["directional_derivative"]) * result["steps"][-1]
    assert min(rates) > 1.9, f"first-order remainders {remainders} converge at rates {rates}"
    model.destroy()


def test_gauss_newton_hessian_is_the_exact_hessian_at_zero_residual(comm, rng):
    """With exact data at the current E and alpha = 0, the second-order terms dropped by
    Gauss-Newton vanish, so H_GN p equals the derivative of the gradient along p."""
    E = rng.uniform(0.1, 0.6, _SMALL.shape)
    model, ux, uy = _data(_SMALL, E, comm)
    with GaussNewtonInversion(model, ux, uy) as inversion:
        inversion.alpha = 0.0
        p_image = rng.normal(size=_SMALL.shape)
        inversion.set_parameter(p_image)
        p = inversion.parameter()
        m = np.log(E)
        inversion.set_parameter(m)
        m = inversion.parameter()
        inversion.objective()
        inversion.gradient()
        H = inversion.hessian()
        x, Hp = H.createVecs()
        x.array[:] = p
        H.mult(x, Hp)
        Hp = Hp.array.copy()
        h = 1e-5
        gradients = []
        for sign in (1, -1):
            inversion.set_parameter(m + sign * h * p)
            inversion.objective()
            gradients.append(inversion.gradient().array.copy())
        fd = (gradients[0] - gradients[1]) / (2 * h)
        norm = math.sqrt(comm.allreduce(float(Hp @ Hp), op=MPI.SUM))
        diff = math.sqrt(comm.allreduce(float((fd - Hp) @ (fd - Hp)), op=MPI.SUM))
        assert norm > 0
        assert diff < 1e-5 * norm
        x.destroy()
        Hp = None
    model.destroy()


@pytest.mark.parametrize("regulariser", ["tikhonov", "tv"])
def test_the_whole_dense_hessian_is_symmetric_with_non_negative_eigenvalues(comm, rng,
                                                                            regulariser):
    """Every column of the Gauss-Newton Hessian (``H e_j`` for each unit vector, gathered on every
    rank): symmetric to round-off, and all its eigenvalues positive."""
    E = rng.uniform(0.1, 0.6, _SMALL.shape)
    model, ux, uy = _data(_SMALL, 1.3 * E, comm)
    with GaussNewtonInversion(model, ux, uy, GaussNewtonSettings(regulariser=regulariser)) as inv:
        inv.set_tv_smoothing(0.2)
        inv.alpha = 1e-6
        inv.set_parameter(np.log(E))
        inv.objective()
        inv.gradient()
        H = inv.hessian()
        e, He = H.createVecLeft(), H.createVecLeft()
        lo, hi = e.getOwnershipRange()
        columns = []
        for j in range(e.getSize()):
            e.set(0.0)
            if lo <= j < hi:
                e.array[j - lo] = 1.0
            H.mult(e, He)
            columns.append(np.concatenate(comm.allgather(He.array_r.copy())))
        dense = np.array(columns).T
        e.destroy()
        He.destroy()
    model.destroy()
    scale = np.abs(dense).max()
    assert scale > 0
    np.testing.assert_allclose(dense, dense.T, rtol=0, atol=1e-12 * scale)
    eigenvalues = np.linalg.eigvalsh(0.5 * (dense + dense.T))
    # positive definite, well above round-off (here the ratio is about 1e-3)
    assert eigenvalues.min() > 1e-8 * eigenvalues.max(), eigenvalues[:3]


def test_recovers_a_smooth_phantom_from_noise_free_data(comm):
    E = _smooth_phantom(_GRID)
    model, ux, uy = _data(_GRID, E, comm)
    settings = GaussNewtonSettings(alpha=1e-9, gradient_rtol=1e-8, decrement_rtol=1e-10)
    estimate, history = reconstruct_gauss_newton(model, ux, uy, None, settings)
    error = _relative_error(estimate, E)
    initial_error = _relative_error(np.full_like(E, history["initial_modulus"]), E)
    assert error < 0.01, f"relative error {error:.3g}"
    assert initial_error > 0.3
    objectives = [record["objective"] for record in history["iterations"]]
    assert all(b <= a for a, b in zip(objectives, objectives[1:], strict=False))
    misfits = [record["misfit"] for record in history["iterations"]]
    assert misfits[-1] < 1e-6 * misfits[0]
    model.destroy()


@pytest.mark.parametrize("regulariser, bound", [("tikhonov", 0.30), ("tv", 0.20)])
def test_noisy_data_at_35_db_with_the_discrepancy_principle(comm, rng, regulariser, bound):
    grid = ImageGrid(24, 24)
    E, mask = _inclusion_phantom(grid)
    model, ux, uy = _data(grid, E, comm)
    ux_noisy, uy_noisy, sigma = _noise(model, ux, uy, 35.0, rng)
    settings = GaussNewtonSettings(regulariser=regulariser)
    estimate, history = reconstruct_gauss_newton(model, ux_noisy, uy_noisy, sigma, settings)
    error = _relative_error(estimate, E)
    assert history["discrepancy_reached"]
    chosen = [t for t in history["alpha_trials"] if t["alpha"] == history["alpha"]][-1]
    assert abs(chosen["residual_norm2"] / history["target_residual"] - 1) <= 0.01
    assert error < bound, f"{regulariser}: relative error {error:.3g} with alpha {history['alpha']}"
    # the inclusion is found: clearly stiffer than the background
    assert estimate[mask].mean() > 2.5 * estimate[~mask].mean()
    assert (estimate > 0).all() and np.isfinite(estimate).all()
    # smaller alpha fits the data more closely: the search is monotone where it was explored
    trials = sorted(history["alpha_trials"], key=lambda t: t["alpha"])
    residuals = [t["residual_norm2"] for t in trials]
    assert all(b >= a * (1 - 1e-3) for a, b in zip(residuals, residuals[1:], strict=False))
    model.destroy()


@pytest.mark.slow
@pytest.mark.parametrize("regulariser, alpha, tolerance", [("tikhonov", 1e-6, 1e-6),
                                                          ("tikhonov", None, 1e-2),
                                                          ("tv", None, 1e-2)])
@pytest.mark.usefixtures("several_ranks")
def test_results_do_not_depend_on_the_number_of_ranks(comm, rng, regulariser, alpha, tolerance):
    """Same result on the model's ranks and on COMM_SELF, both solved tightly.

    Round-off differs (MUMPS, CG sums); at a fixed alpha the minimiser is unique, so the results
    agree to the solver tolerance. The discrepancy principle accepts any alpha whose residual lies
    within ``discrepancy_rtol`` of the target, and the residual is a flat function of alpha, so
    there the agreement is only as good as that band (measured at 16^2: alpha to ~1e-3)."""
    E, _ = _inclusion_phantom(_GRID)
    model, ux, uy = _data(_GRID, E, comm)
    ux_noisy, uy_noisy, sigma = _noise(model, ux, uy, 35.0, rng)
    settings = GaussNewtonSettings(regulariser=regulariser, alpha=alpha, discrepancy_rtol=1e-3,
                                   decrement_rtol=1e-12, gradient_rtol=1e-9, max_iterations=100)
    estimate, history = reconstruct_gauss_newton(model, ux_noisy, uy_noisy, sigma, settings)
    reference, reference_history = reconstruct_gauss_newton(
        _GRID, ux_noisy, uy_noisy, sigma, settings, MPI.COMM_SELF)
    assert history["alpha"] == pytest.approx(reference_history["alpha"], rel=5 * tolerance)
    assert _relative_error(estimate, reference) < tolerance
    model.destroy()


def test_cg_preconditioned_by_the_regulariser_reaches_the_same_minimiser_in_fewer_iterations(
        comm, rng):
    """At a fixed alpha the minimiser is unique: Gauss-Newton with the inner CG preconditioned by
    ``alpha E R'' E + beta I`` and with plain CG, both solved tightly, give the same estimate
    (Tikhonov and TV); for TV, whose small smoothing makes R'' ill-conditioned, in under a third
    of the CG iterations (measured at 24²: 6581 against 1424)."""
    grid = ImageGrid(24, 24)
    E, _ = _inclusion_phantom(grid)
    model, ux, uy = _data(grid, E, comm)
    ux_noisy, uy_noisy, sigma = _noise(model, ux, uy, 35.0, rng)
    for regulariser in ("tikhonov", "tv"):
        estimates, cg = {}, {}
        for preconditioner in ("none", "regulariser"):
            settings = GaussNewtonSettings(regulariser=regulariser, alpha=5e-6,
                                           preconditioner=preconditioner, decrement_rtol=1e-12,
                                           gradient_rtol=1e-8, max_iterations=100)
            estimates[preconditioner], history = reconstruct_gauss_newton(
                model, ux_noisy, uy_noisy, sigma, settings)
            cg[preconditioner] = sum(r["cg_iterations"] for r in history["iterations"])
        difference = _relative_error(estimates["regulariser"], estimates["none"])
        assert difference < 1e-4, f"{regulariser}: {difference:.2e}"
        if regulariser == "tv":
            assert cg["regulariser"] < cg["none"] / 3, cg
    # "auto": the regulariser for TV in 2-D (where it was measured), plain CG otherwise
    assert [GaussNewtonSettings(regulariser=r).resolve_preconditioner(d)
            for r in ("tv", "tikhonov") for d in (2, 3)] == ["regulariser", "none", "none", "none"]
    with pytest.raises(ValueError, match="preconditioner must be one of"):
        GaussNewtonSettings(preconditioner="jacobi")
    model.destroy()

def test_fixed_alpha_and_settings_round_trip(comm):
    E = _smooth_phantom(_SMALL)
    model, ux, uy = _data(_SMALL, E, comm)
    settings = GaussNewtonSettings(regulariser="tv", alpha=1e-7, tv_delta=0.5, max_iterations=3,
                                   component_weights=(1, 2))
    assert GaussNewtonSettings.from_dict(settings.to_dict()) == settings
    estimate, history = reconstruct_gauss_newton(model, ux, uy, None, settings, comm=comm)
    assert estimate.shape == _SMALL.shape
    assert history["alpha"] == 1e-7 and history["discrepancy_reached"] is None
    assert history["settings"] == settings.to_dict()
    assert len(history["iterations"]) <= 4
    record = history["iterations"][-1]
    assert set(record) == {"alpha", "iteration", "objective", "misfit", "regularisation",
                           "gradient_norm", "step", "cg_iterations", "time"}
    assert json.loads(json.dumps(history)) == history
    model.destroy()


def test_bad_settings_and_inputs_are_rejected(comm):
    with pytest.raises(ValueError, match="regulariser"):
        GaussNewtonSettings(regulariser="l1")
    with pytest.raises(ValueError, match="alpha"):
        GaussNewtonSettings(alpha=-1.0)
    with pytest.raises(ValueError, match="component_weights"):
        GaussNewtonSettings(component_weights=(0, 0))
    with pytest.raises(ValueError, match="unknown"):
        GaussNewtonSettings.from_dict({"alfa": 1.0})
    E = _smooth_phantom(_SMALL)
    model, ux, uy = _data(_SMALL, E, comm)
    with pytest.raises(ValueError, match="noise_std"):
        reconstruct_gauss_newton(model, ux, uy, None, GaussNewtonSettings())
    with pytest.raises(ValueError, match="shape"):
        reconstruct_gauss_newton(model, ux[:-1], uy, 1e-5, GaussNewtonSettings())
    with pytest.raises(ValueError, match="non-finite"):
        reconstruct_gauss_newton(model, np.full_like(ux, np.nan), uy, 1e-5)
    with pytest.raises(ValueError, match="correlate"):
        reconstruct_gauss_newton(model, -ux, -uy, 1e-5)
    with pytest.raises(TypeError, match="ElasticityModel or an ImageGrid"):
        reconstruct_gauss_newton("grid", ux, uy, 1e-5)
    model.destroy()


def test_l_curve_and_initial_image(comm, rng):
    E, _ = _inclusion_phantom(_SMALL)
    model, ux, uy = _data(_SMALL, E, comm)
    ux_noisy, uy_noisy, _ = _noise(model, ux, uy, 35.0, rng)
    with GaussNewtonInversion(model, ux_noisy, uy_noisy) as inversion:
        result = inversion.l_curve([1e-4, 1e-6, 1e-5, 1e-7])
    alphas = [p["alpha"] for p in result["points"]]
    residuals = [p["residual_norm2"] for p in result["points"]]
    regularisations = [p["regularisation"] for p in result["points"]]
    assert alphas == sorted(alphas, reverse=True)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(residuals, residuals[1:], strict=False))
    assert all(b >= a * (1 - 1e-6)
               for a, b in zip(regularisations, regularisations[1:], strict=False))
    assert result["corner"] in alphas[1:-1]
    assert set(result["images"]) == set(alphas)
    # started at the truth with exact data, the iteration has nothing to do
    estimate, history = reconstruct_gauss_newton(model, ux, uy, None,
                                                 GaussNewtonSettings(alpha=0.0), initial=E)
    assert _relative_error(estimate, E) < 1e-8
    assert history["initial_modulus"] == pytest.approx(E.mean())
    model.destroy()


def test_l_curve_corner_of_an_ideal_l():
    # log-log points along a vertical branch, a corner at alpha = 1e-3, then a horizontal branch
    alphas = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    residuals = [1.0, 1.01, 1.02, 1.05, 10.0, 100.0, 1000.0]
    regularisations = [1000.0, 100.0, 10.0, 1.05, 1.02, 1.01, 1.0]
    assert l_curve_corner(alphas, residuals, regularisations) == 1e-3
    with pytest.raises(ValueError, match="three"):
        l_curve_corner([1.0, 2.0], [1.0, 2.0], [2.0, 1.0])


def test_gauss_newton_hessian_passes_the_taylor_test_at_zero_residual(comm, rng):
    """At exact data, alpha = 0: ``‖∇J(m + h p) − ∇J(m) − h H p‖ = O(h²)`` (the generic check)."""
    E = rng.uniform(0.1, 0.6, _SMALL.shape)
    model, ux, uy = _data(_SMALL, E, comm)
    with GaussNewtonInversion(model, ux, uy) as inversion:
        result = inversion.taylor_test(np.log(E), rng.normal(size=_SMALL.shape), alpha=0.0,
                                       check_hessian=True)
        assert np.allclose(np.exp(inversion.parameter()), inversion._E_owned())  # left at m
    assert min(result["hessian_rates"]) > 1.9, result["hessian_remainders"]
    assert min(result["rates"]) > 1.9, result["remainders"]
    model.destroy()


def test_component_weights_and_noise_per_component():
    assert list(expand_component_weights((1.0, 2.0), 2)) == [1.0, 2.0]
    assert list(expand_component_weights((1.0, 2.0), 3)) == [1.0, 1.0, 2.0]  # (lateral, axial)
    assert list(expand_component_weights((0.5,), 3)) == [0.5, 0.5, 0.5]
    assert list(expand_component_weights((1.0, 2.0, 3.0), 3)) == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="do not fit"):
        expand_component_weights((1.0, 2.0, 3.0), 2)
    assert GaussNewtonSettings(component_weights=(1, 1, 2)).component_weights == (1.0, 1.0, 2.0)
    with pytest.raises(ValueError, match="component_weights"):
        GaussNewtonSettings(component_weights=(1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"component_weights\[1\]"):
        GaussNewtonSettings(component_weights=(1, -1))


def test_gauss_newton_on_a_3d_mesh_without_an_image_grid(comm):
    """Tetrahedra, displacement as local values, estimate per node in the mesh's order."""
    from dolfinx import mesh

    msh = mesh.create_box(comm, [np.zeros(3), np.array([1.0, 0.8, 0.6])], [3, 3, 2],
                          mesh.CellType.tetrahedron)
    model = ElasticityModel(msh)
    x = model.Q.tabulate_dof_coordinates()
    truth = 0.2 + 0.1 * x[:, 0] * x[:, 1]
    model.solve(truth)
    u = model.u.x.array.copy()
    settings = GaussNewtonSettings(alpha=1e-12, gradient_rtol=1e-10, decrement_rtol=1e-14,
                                   max_iterations=100)
    estimate, history = reconstruct_gauss_newton(model, u, None, 1e-6, settings)
    truth_values = model.to_values(truth)  # the file (mesh input) order, on every rank
    assert estimate.shape == truth_values.shape == (model.domain.num_file_nodes,)
    assert history["noise_std"] == [1e-6] * 3
    misfits = [record["misfit"] for record in history["iterations"]]
    assert misfits[-1] < 1e-9 * misfits[0]
    error = np.abs(estimate - truth_values).max() / truth_values.max()
    assert error < 0.01  # 48 nodes: a coarse, ill-conditioned fit
    with pytest.raises(ValueError, match="no ImageGrid"):
        reconstruct_gauss_newton(model, u, u, 1e-6, settings)
    with GaussNewtonInversion(model, u) as inversion:
        with pytest.raises(ValueError, match="noise_std"):
            inversion.expected_noise_energy((1e-6, 1e-6))  # three components
        assert inversion.expected_noise_energy(2.0) == pytest.approx(
            4.0 * inversion.free_counts.sum())
    model.destroy()
