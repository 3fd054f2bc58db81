"""Specification of the statistical data term (paper, equations 2-9): ``Γ``, ``g``, ``∇g``, log|Γ|.

Every test runs serially and under ``mpirun -n 2``; grids are tiny (8² to 16²) so that dense
reference computations stay cheap.
"""

import math

import numpy as np
import pytest
from dense import dense_matrix, gather

from fenics_red.data import SimulationSettings, simulate_sample
from fenics_red.domain import make_domain
from fenics_red.forward import ElasticityModel
from fenics_red.likelihood import (
    LikelihoodSettings,
    NoiseModel,
    StatisticalLikelihood,
    best_uniform_modulus,
)
from fenics_red.raster import ImageGrid

_GRID = ImageGrid(10, 8, 1.0, 0.8)


def _likelihood(comm, grid=_GRID, force_std=0.0, seed=3, snr_db=35.0):
    """A likelihood on ``grid`` holding the noisy data of one random phantom (the truth)."""
    sample = simulate_sample(0, SimulationSettings(grid, seed=seed, snr_db=snr_db))
    model = ElasticityModel.on_grid(grid, comm)
    noise = NoiseModel(sample.noise_std, force_std)
    fid = StatisticalLikelihood(model, (sample.ux_noisy, sample.uy_noisy), noise)
    return fid, sample


def _destroy(fid):
    fid.destroy()
    fid.model.destroy()


def _random_vector(fid, rng, low=-1.0, high=1.0):
    """A random modulus-space vector drawn as an image (the same on any number of ranks)."""
    return fid.from_image(rng.uniform(low, high, fid.model.grid.shape))


def _dense(fid, apply):
    """The dense matrix of ``apply(x, y)`` on the displacement space (gathered on every rank)."""
    return dense_matrix(apply, fid.f), gather(fid.comm, fid.gamma.free.array_r.astype(bool))


def _gamma_reference(fid, noise_std, force_std):
    """``Γ_ff = Σw + K_ff Σn K_ffᵀ`` built densely from the forward model's own ``K(E)`` (not Γ's
    copy of it), the noise's ``σ`` per component and ``σw``, over the free dofs; and the mask of
    the free dofs (gathered on every rank)."""
    comm = fid.comm
    K = fid.model.assemble_K(apply_bcs=True)
    lo, hi = K.getOwnershipRange()
    n = K.getSize()[0]
    rows = np.zeros((hi - lo, n))
    for i in range(lo, hi):
        cols, values = K.getRow(i)
        rows[i - lo, cols] = values
    K_dense = np.concatenate(comm.allgather(rows))
    free = np.concatenate(comm.allgather(np.asarray(fid.model.free_dofs, dtype=bool)))
    sigma = np.asarray(noise_std, dtype=float)[np.arange(n) % len(noise_std)]  # interleaved
    K_ff = K_dense[np.ix_(free, free)]
    reference = K_ff @ np.diag(sigma[free] ** 2) @ K_ff.T + force_std**2 * np.eye(free.sum())
    return reference, free


# -- Γ as an operator ----------------------------------------------------------------------------

@pytest.mark.parametrize("force_std", [0.0, 3e-4])
def test_gamma_is_symmetric_and_solve_inverts_it(comm, rng, force_std):
    fid, sample = _likelihood(comm, force_std=force_std)
    gamma = fid.gamma
    fid.refresh(fid.from_image(sample.E))
    x, y, Gx, Gy = (fid.f.duplicate() for _ in range(4))
    for vec in (x, y):
        vec.setArray(rng.standard_normal(vec.getLocalSize()))
        vec.pointwiseMult(vec, gamma.free)
    gamma.mat.mult(x, Gx)
    gamma.mat.mult(y, Gy)
    # symmetry: yᵀΓx = xᵀΓy
    assert abs(y.dot(Gx) - x.dot(Gy)) <= 1e-12 * abs(y.dot(Gx))
    # Γ⁻¹(Γx) = x: exactly (two back-substitutions) for Σw = 0, to the CG tolerance otherwise
    back = fid.f.duplicate()
    gamma.solve(Gx, back)
    rel = (back - x).norm() / x.norm()
    assert gamma.exact == (force_std == 0.0)
    assert rel < (1e-10 if force_std == 0.0 else 1e-6), rel
    # the solve never touches Dirichlet rows: Γ⁻¹ r is zero there
    assert np.all(back.array_r[gamma.free.array_r == 0] == 0.0)
    # rᵀΓ⁻¹r by one back-substitution equals rᵀ(Γ⁻¹r)
    assert gamma.inv_norm2(Gx) == pytest.approx(Gx.dot(back), rel=1e-8)
    for vec in (x, y, Gx, Gy, back):
        vec.destroy()
    _destroy(fid)


@pytest.mark.parametrize("force_std", [0.0, 3e-4])
def test_logdet_equals_dense_log_determinant_on_free_dofs(comm, force_std):
    grid = ImageGrid(6, 5, 1.0, 0.8)
    fid, sample = _likelihood(comm, grid, force_std=force_std)
    fid.refresh(fid.from_image(sample.E))
    G, free = _dense(fid, fid.gamma.mult)
    G_ff = G[np.ix_(free, free)]
    # the reference is built independently of Γ's operator: from K, Σn and Σw
    reference, free_ref = _gamma_reference(fid, sample.noise_std, force_std)
    assert np.array_equal(free, free_ref)
    np.testing.assert_allclose(G_ff, reference, rtol=0, atol=1e-10 * np.abs(reference).max())
    sign, expected = np.linalg.slogdet(reference)
    assert sign == 1.0
    assert np.allclose(G_ff, G_ff.T, rtol=0, atol=1e-12 * np.abs(G_ff).max())
    assert fid.logdet() == pytest.approx(expected, rel=1e-9, abs=1e-7)
    # ... and the data term is ½ rᵀ Γ_ff⁻¹ r with the dense Γ
    E = fid.from_image(np.full(grid.shape, 0.2))
    r = fid.residual(E, fid.f.duplicate())
    r_all = np.concatenate(comm.allgather(r.array_r.copy()))[free]
    assert fid.value(E) == pytest.approx(0.5 * r_all @ np.linalg.solve(reference, r_all),
                                         rel=1e-8)
    _destroy(fid)


def test_logdet_is_nan_without_a_factorisation(comm):
    settings = LikelihoodSettings(k_petsc_options={"ksp_type": "cg", "pc_type": "gamg",
                                                   "ksp_rtol": 1e-12})
    grid = ImageGrid(8, 8)
    sample = simulate_sample(0, SimulationSettings(grid, seed=3))
    model = ElasticityModel.on_grid(grid, comm)
    fid = StatisticalLikelihood(model, (sample.ux_noisy, sample.uy_noisy),
                                NoiseModel(sample.noise_std), settings)
    fid.refresh(fid.create_vector(0.2))
    assert math.isnan(fid.logdet())
    _destroy(fid)


# -- the data term and its gradient -------------------------------------------------------------

def test_taylor_remainder_of_g_shrinks_at_second_order(comm, rng):
    """``|g(E + h δ) − g(E) − h ∇g(E)·δ|`` = O(h²) with Γ frozen; without the gradient, O(h)."""
    fid, sample = _likelihood(comm)
    E = fid.from_image(sample.E * rng.uniform(0.8, 1.2, sample.E.shape))
    fid.refresh(E)  # Γ frozen at E for the whole test
    direction = _random_vector(fid, rng, -1e-3, 1e-3)
    grad = fid.create_vector()
    g0 = fid.gradient(E, grad)
    assert g0 == pytest.approx(fid.value(E), rel=1e-12)
    slope = grad.dot(direction)
    hs = 0.5 ** np.arange(6)
    first, second = [], []
    trial = fid.create_vector()
    for h in hs:
        trial.waxpy(h, direction, E)
        gh = fid.value(trial)
        first.append(abs(gh - g0))
        second.append(abs(gh - g0 - h * slope))
    first_rates = np.log2(np.array(first[:-1]) / np.array(first[1:]))
    second_rates = np.log2(np.array(second[:-1]) / np.array(second[1:]))
    assert np.allclose(second_rates, 2.0, atol=0.05), second_rates
    assert np.allclose(first_rates[-3:], 1.0, atol=0.1), first_rates
    assert second[-1] < 0.02 * first[-1]
    for vec in (E, direction, grad, trial):
        vec.destroy()
    _destroy(fid)


def test_hessian_is_the_derivative_of_the_gradient_and_lipschitz_bounds_it(comm, rng):
    fid, sample = _likelihood(comm)
    E = fid.from_image(sample.E)
    fid.refresh(E)
    v = _random_vector(fid, rng)
    g1, g2, Hv, trial = (fid.create_vector() for _ in range(4))
    fid.gradient(E, g1)
    trial.waxpy(1.0, v, E)
    fid.gradient(trial, g2)  # g is quadratic for frozen Γ: ∇g(E + v) − ∇g(E) = H v exactly
    fid.hessian_mult(v, Hv)
    assert (g2 - g1 - Hv).norm() <= 1e-8 * Hv.norm()
    L, _ = fid.lipschitz(200, rtol=1e-10)
    rayleigh = v.dot(Hv) / v.dot(v)
    assert 0 < rayleigh <= L * (1 + 1e-10)
    for vec in (E, v, g1, g2, Hv, trial):
        vec.destroy()
    _destroy(fid)


def test_misfit_at_the_truth_is_about_the_number_of_free_equations(comm):
    """The discrepancy principle's target: ``E[(f − DE)ᵀΓ⁻¹(f − DE)] = n`` at the true ``E``."""
    grid = ImageGrid(16, 16)
    ratios = []
    for seed in range(4):
        fid, sample = _likelihood(comm, grid, seed=seed)
        E = fid.from_image(sample.E)
        fid.refresh(E)
        ratios.append(fid.misfit(E) / fid.n_equations)
        _destroy(fid)
    # n = 544 free equations: the χ²_n ratio has standard deviation √(2/n) ≈ 0.06
    assert fid.n_equations == 2 * 17 * 16
    assert abs(np.mean(ratios) - 1.0) < 0.15, ratios


def test_homogeneous_fit_recovers_a_uniform_modulus(comm):
    grid = ImageGrid(8, 8)
    from fenics_red.forward import simulate_displacement

    ux, uy = simulate_displacement(np.full(grid.shape, 0.37), grid)
    model = ElasticityModel.on_grid(grid, comm)
    fid = StatisticalLikelihood(model, (ux, uy), NoiseModel((1e-6, 1e-6)))
    assert fid.homogeneous_fit() == pytest.approx(0.37, rel=1e-10)
    _destroy(fid)


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma, message", [((0.0, 1.0), "strictly positive"),
                                            ((-1.0, 1.0), "strictly positive"),
                                            ((np.nan, 1.0), "finite"),
                                            ((1.0,), "pair")])
def test_noise_model_rejects_non_positive_or_malformed_sigma(sigma, message):
    with pytest.raises(ValueError, match=message):
        NoiseModel(sigma)
    with pytest.raises(ValueError, match="force_std"):
        NoiseModel((1.0, 1.0), force_std=-1.0)


def test_bad_displacements_raise_on_every_rank(comm):
    fid, sample = _likelihood(comm)
    bad = sample.ux_noisy.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fid.set_data((bad, sample.uy_noisy))
    with pytest.raises(ValueError, match="shape"):
        fid.set_data((sample.ux_noisy[:-1], sample.uy_noisy[:-1]))
    with pytest.raises(ValueError, match="shape"):
        fid.set_data(np.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        fid.from_image(np.ones((3, 3)))
    _destroy(fid)


def test_refresh_rejects_a_non_positive_modulus(comm):
    fid, sample = _likelihood(comm)
    E = fid.from_image(sample.E)
    E.array[:] = -1.0 if comm.rank == comm.size - 1 else E.array_r
    with pytest.raises(ValueError, match="strictly positive"):
        fid.refresh(E)
    E.destroy()
    _destroy(fid)


def test_using_gamma_before_a_refresh_is_an_error(comm):
    fid, _ = _likelihood(comm)
    with pytest.raises(RuntimeError, match="refresh"):
        fid.value(fid.create_vector(1.0))
    _destroy(fid)


# -- any dimension -------------------------------------------------------------------------------

def test_noise_model_has_one_standard_deviation_per_component():
    noise = NoiseModel((1.0, 2.0, 3.0), force_std=0.5)
    assert noise.sigma == (1.0, 2.0, 3.0) and noise.n_components == 3
    assert NoiseModel([4, 5]).sigma == (4.0, 5.0)
    for bad in ((1.0, 2.0, 3.0, 4.0), (), "ab"):
        with pytest.raises(ValueError, match="one standard deviation per displacement"):
            NoiseModel(bad)
    with pytest.raises(ValueError, match=r"sigma\[2\] must be finite and strictly positive"):
        NoiseModel((1.0, 1.0, 0.0))
    # the SNR rule with three components: σx = σy = r σz, Σ N_c σ_c² = ‖u‖² 10^(−SNR/10)
    noise = NoiseModel.from_snr(3.0, (10, 12, 20), 20.0, ratio=2.0, noisy=False)
    sx, sy, sz = noise.sigma
    assert sx == sy == pytest.approx(2 * sz, rel=1e-15)
    assert 10 * sx**2 + 12 * sy**2 + 20 * sz**2 == pytest.approx(3.0 / 100, rel=1e-13)
    # ... and with two the rule the simulated data sets were made with
    noise = NoiseModel.from_snr(3.0, (10, 20), 20.0, ratio=2.0, noisy=False)
    assert noise.sigma[1] == math.sqrt(0.03 / (2.0**2 * 10 + 20))


def _box_likelihood(comm, modulus=0.3, sigma=(1e-5, 2e-5, 3e-5)):
    """A likelihood on a small 3-D box (tetrahedra, no image grid) holding the exact data of a
    uniform modulus, given as a PETSc vector."""
    from dolfinx import mesh

    msh = mesh.create_box(comm, [np.zeros(3), np.array([1.0, 0.8, 0.6])], [3, 3, 2],
                          mesh.CellType.tetrahedron)
    model = ElasticityModel(msh)
    model.solve(np.full(model.E.x.array.shape, modulus))
    u = model.u.x.petsc_vec.copy()
    fid = StatisticalLikelihood(model, u, NoiseModel(sigma))
    u.destroy()
    return fid


def test_likelihood_on_a_3d_mesh_without_an_image_grid(comm):
    fid = _box_likelihood(comm)
    gamma = fid.gamma
    assert fid.model.grid is None and gamma.n_components == 3
    assert len(gamma.free_counts) == 3 and sum(gamma.free_counts) == fid.n_equations
    # Σn: σ_c² on the free dofs of component c (dofs blocked by node), 1 on Dirichlet dofs
    free = gamma.free.array_r.astype(bool)
    component = np.arange(len(free)) % 3
    expected = np.where(free, np.array([1e-5, 2e-5, 3e-5])[component] ** 2, 1.0)
    assert np.array_equal(gamma.sigma2.array_r, expected)
    assert fid.homogeneous_fit() == pytest.approx(0.3, rel=1e-10)
    E = fid.create_vector(0.3)
    fid.refresh(E)
    assert fid.misfit(E) < 1e-12 * fid.n_equations  # exact data
    # log|Γ| = 2 log|det K_ff| + Σ_free log σ² against a dense determinant
    G, free_all = _dense(fid, gamma.mult)
    sign, expected_logdet = np.linalg.slogdet(G[np.ix_(free_all, free_all)])
    assert sign == 1.0 and fid.logdet() == pytest.approx(expected_logdet, rel=1e-9)
    L, v = fid.lipschitz(200, rtol=1e-10)
    Hv = fid.create_vector()
    fid.hessian_mult(v, Hv)
    assert v.norm() == pytest.approx(1.0) and Hv.norm() == pytest.approx(L, rel=1e-6)
    with pytest.raises(ValueError, match="3 components"):
        fid.set_noise(NoiseModel((1e-5, 1e-5)))
    for vec in (E, Hv, v):
        vec.destroy()
    _destroy(fid)


def test_a_vector_of_owned_values_is_the_same_data_as_images(comm):
    fid, sample = _likelihood(comm)
    other = StatisticalLikelihood(ElasticityModel.on_grid(_GRID, comm), fid.u_m,
                                  NoiseModel(sample.noise_std))
    assert np.array_equal(other.u_m.array_r, fid.u_m.array_r)
    E = fid.from_image(sample.E)
    fid.refresh(E)
    other.refresh(E)
    # two models (two partitions, two MUMPS factorisations on 2 ranks): equal to round-off
    assert other.value(E) == pytest.approx(fid.value(E), rel=1e-12)
    with pytest.raises(ValueError, match="shape"):
        other.set_data(E)  # a modulus-space vector
    E.destroy()
    _destroy(other)
    _destroy(fid)


def test_a_gamma_solve_that_runs_out_of_iterations_says_why_in_one_line(comm):
    """With force noise and the ``K Σn K`` preconditioner, Γ is solved by CG; when it runs out of
    iterations (a large force noise: the auditor's 1e-4 on 32² data) the error names the cause
    and the settings, not 'is E positive'."""
    sample = simulate_sample(0, SimulationSettings(_GRID, seed=3))
    model = ElasticityModel.on_grid(_GRID, comm)
    fid = StatisticalLikelihood(model, (sample.ux_noisy, sample.uy_noisy),
                                NoiseModel(sample.noise_std, 1e-2),
                                settings=LikelihoodSettings(gamma_max_it=2, gamma_pc="k"))
    try:
        E = fid.from_image(sample.E)
        with pytest.raises(RuntimeError, match="did not converge in 2 CG iterations") as error:
            fid.refresh(E)
            fid.value(E)
        assert "\n" not in str(error.value) and "gamma_max_it" in str(error.value)
    finally:
        _destroy(fid)


def test_the_uniform_fit_factorises_k_alone_and_gamma_only_when_it_is_used(comm, rng,
                                                                          monkeypatch):
    """Under force noise the uniform fit needs ``K(1)⁻¹ f`` only: ``Γ``'s factorisation (3-5
    times ``K``'s) is put off until a ``Γ`` solve asks for it, and a refresh before that (the
    solver's, at the fitted level) makes none at ``E = 1``. Same fit, same ``Γ⁻¹`` as before."""
    grid = ImageGrid(16, 16)
    sample = simulate_sample(0, SimulationSettings(grid, seed=3))
    noise = NoiseModel(sample.noise_std, 1e-6)
    domain = make_domain(grid, comm)  # one mesh: the two likelihoods' vectors conform
    fid = StatisticalLikelihood(ElasticityModel(domain), (sample.ux_noisy, sample.uy_noisy),
                                noise)
    reference = StatisticalLikelihood(ElasticityModel(domain),
                                      (sample.ux_noisy, sample.uy_noisy), noise)
    calls = []
    factorise = type(fid.gamma)._factorise_gamma
    monkeypatch.setattr(type(fid.gamma), "_factorise_gamma",  # counted for fid's Γ only
                        lambda self: (self is fid.gamma and calls.append(1), factorise(self))[1])
    try:
        assert fid.gamma.gamma_pc == "gamma"
        level = fid.homogeneous_fit()
        assert not calls
        ones = reference.create_vector(1.0)
        reference.refresh(ones)
        u1 = reference.f.duplicate()
        reference.gamma.apply_K_inverse(reference.f, u1)
        weights = reference.f.duplicate()
        weights.pointwiseMult(reference.gamma.sigma2_inv, reference.gamma.free)
        assert level == pytest.approx(best_uniform_modulus(u1, reference.u_m, weights),
                                      rel=1e-12)
        r = fid.f.duplicate()
        r.setArray(rng.standard_normal(r.getLocalSize()))
        r.pointwiseMult(r, fid.gamma.free)
        x, expected = fid.gamma.solve(r, r.duplicate()), reference.gamma.solve(r, r.duplicate())
        assert len(calls) == 1 and (x - expected).norm() <= 1e-9 * expected.norm()
        assert fid.logdet() == pytest.approx(reference.logdet(), rel=1e-12)
        calls.clear()
        fid.homogeneous_fit()
        fid.gamma.set_noise(NoiseModel(sample.noise_std, 3e-6))  # still put off
        fid.refresh(fid.create_vector(level))
        assert len(calls) == 1  # the refresh's own, none at E = 1
        calls.clear()
        fid.homogeneous_fit()
        fid.gamma.set_noise(NoiseModel(sample.noise_std, 0.0))  # no Γ to factorise any more
        fid.gamma.solve(r, x)
        fid.refresh(fid.create_vector(level))
        fid.gamma.solve(r, x)
        assert fid.gamma.gamma_pc == "k" and not calls
    finally:
        _destroy(fid)
        _destroy(reference)


def test_with_force_noise_gamma_is_factorised_and_solved_in_one_or_two_cg_iterations(comm, rng):
    """The default preconditioner under force noise is a factorisation of the explicit ``Γ``: CG
    converges at once where ``K⁻¹ Σn⁻¹ K⁻¹`` needs tens of iterations, to the same ``Γ⁻¹ r``
    and the same log-determinant; a new noise model after the refresh is factorised anew."""
    grid = ImageGrid(16, 16)
    sample = simulate_sample(0, SimulationSettings(grid, seed=3))
    noise = NoiseModel(sample.noise_std, 1e-6)
    domain = make_domain(grid, comm)  # one mesh: the two likelihoods' vectors conform
    fids = {pc: StatisticalLikelihood(ElasticityModel(domain),
                                      (sample.ux_noisy, sample.uy_noisy), noise,
                                      LikelihoodSettings(gamma_pc=pc))
            for pc in ("auto", "k")}
    try:
        r = fids["k"].f.duplicate()
        r.setArray(rng.standard_normal(r.getLocalSize()))
        r.pointwiseMult(r, fids["k"].gamma.free)
        solutions, iterations = {}, {}
        for pc, fid in fids.items():
            fid.refresh(fid.from_image(sample.E))
            solutions[pc] = fid.gamma.solve(r, r.duplicate())
            iterations[pc] = fid.gamma.iterations
        assert fids["auto"].gamma.gamma_pc == "gamma" and fids["k"].gamma.gamma_pc == "k"
        assert iterations["auto"] <= 2 < 10 < iterations["k"], iterations
        diff = (solutions["auto"] - solutions["k"]).norm() / solutions["k"].norm()
        assert diff < 1e-7, diff
        assert fids["auto"].logdet() == pytest.approx(fids["k"].logdet(), rel=1e-12)
        # Σw changed after the refresh: Γ⁻¹ is that of the new Γ, still at once
        gamma = fids["auto"].gamma
        gamma.set_noise(NoiseModel(sample.noise_std, 3e-5))
        x = gamma.solve(r, r.duplicate())
        back = r.duplicate()
        gamma.mult(x, back)
        assert (back - r).norm() / r.norm() < 1e-9 and gamma.iterations <= 2
    finally:
        for fid in fids.values():
            _destroy(fid)
