"""Specification of the posterior standard deviation map (:mod:`fenics_red.uncertainty`).

On a tiny grid (8², 81 nodes) every piece is compared with dense linear algebra: the Hessian is
assembled column by column from its products with unit vectors, the prior precision from its
sparse matrix. Run serially and under ``mpirun -n 2`` (the dense matrices are gathered; the map
must not depend on the partition).
"""

import math
import re
from dataclasses import replace

from mpi4py import MPI

import h5py
import numpy as np
import pytest
import scipy.linalg as sla
from dense import dense_matrix, gather

from fenics_red.cli import main
from fenics_red.data import SimulationSettings, simulate_dataset, simulate_sample
from fenics_red.methods import get_method, split_uncertainty
from fenics_red.raster import ImageGrid
from fenics_red.reconstruction import load_reconstructions, load_std
from fenics_red.uncertainty import (
    PriorPrecision,
    UncertaintyRunner,
    UncertaintySettings,
    coverage,
    low_rank_posterior,
    map_misfit,
    matched_prior_weight,
)

GRID = ImageGrid(8, 8)
SETTINGS = SimulationSettings(GRID, seed=7100)
N_NODES = 81


@pytest.fixture(scope="module")
def sample():
    return simulate_sample(0, SETTINGS)


@pytest.fixture(scope="module")
def ml_problem(sample):
    """The ML runner after its estimate (Γ frozen), with dense H and prior precision R_γ."""
    comm = MPI.COMM_WORLD
    runner = get_method("ml").setup(GRID, SETTINGS.forward, comm, {})
    estimate, _, _ = runner.run(sample)
    likelihood = runner.reconstructor.likelihood
    prior = PriorPrecision(likelihood.model.Q, 1.0, 1.0)
    template = likelihood.create_vector()
    H = dense_matrix(likelihood.hessian_mult, template)
    R = dense_matrix(prior.mult, template)
    yield dict(runner=runner, likelihood=likelihood, prior=prior, template=template, H=H, R=R,
               estimate=estimate, comm=comm)
    template.destroy()
    prior.destroy()
    runner.destroy()


def _posterior(problem, rank, oversampling=10):
    lik = problem["likelihood"]
    return low_rank_posterior(lik.hessian_mult, problem["prior"], lik.model, problem["template"],
                              UncertaintySettings(rank=rank, oversampling=oversampling))


def test_the_hessian_and_the_prior_precision_are_symmetric_positive(ml_problem):
    H, R = ml_problem["H"], ml_problem["R"]
    assert H.shape == R.shape == (N_NODES, N_NODES)
    np.testing.assert_allclose(H, H.T, rtol=1e-9, atol=1e-9 * np.abs(H).max())
    np.testing.assert_allclose(R, R.T, rtol=1e-12, atol=1e-14)
    assert np.linalg.eigvalsh(R).min() > 0  # the mass term makes the prior proper


def test_the_prior_inverse_diagonal_is_exact(ml_problem):
    diagonal = gather(ml_problem["comm"], ml_problem["prior"].inverse_diagonal(block_size=16))
    np.testing.assert_allclose(diagonal, np.diag(np.linalg.inv(ml_problem["R"])), rtol=1e-10)


def test_a_cached_prior_diagonal_is_the_scaled_priors_exact_one(ml_problem):
    """``diag(P⁻¹)`` of ``P = diag(s) w R diag(s)`` from the cache that the first map of a run
    fills (``diag(R⁻¹)``) equals its own exact diagonal: the later samples skip the solves."""
    comm, likelihood = ml_problem["comm"], ml_problem["likelihood"]
    Q = likelihood.model.Q
    n_owned = Q.dofmap.index_map.size_local
    scale = 0.5 + np.random.default_rng(3).random(Q.dofmap.index_map.size_global)
    owned = scale[Q.dofmap.index_map.local_range[0]:Q.dofmap.index_map.local_range[1]]
    cache = {}
    ml_problem["prior"].inverse_diagonal(block_size=16, cache=cache)  # w = 1, no scale
    scaled = PriorPrecision(Q, 7.5, 1.0, scale=owned)
    try:
        cached = scaled.inverse_diagonal(block_size=16, cache=cache)
        exact = scaled.inverse_diagonal(block_size=16)
    finally:
        scaled.destroy()
    assert cached.shape == (n_owned,)
    np.testing.assert_allclose(gather(comm, cached), gather(comm, exact), rtol=1e-10)


def test_the_randomised_eigenpairs_match_a_dense_generalised_eigendecomposition(ml_problem):
    comm, H, R = ml_problem["comm"], ml_problem["H"], ml_problem["R"]
    # this spectrum decays slowly (λ₁/λ₄₀ ≈ 2e5 at 8²): the error of pair i follows
    # λ_{k+p+1}/λ_i, measured 5e-3 with p = 10 and 1.4e-6 with p = 50 for the first 10 pairs
    posterior = _posterior(ml_problem, rank=20, oversampling=50)
    lam_dense, V_dense = sla.eigh(H, R)
    lam_dense, V_dense = lam_dense[::-1], V_dense[:, ::-1]
    assert np.all(np.diff(posterior.eigenvalues) <= 0)
    np.testing.assert_allclose(posterior.eigenvalues[:8], lam_dense[:8], rtol=1e-5)
    V = np.column_stack([gather(comm, v) for v in posterior.vectors.T])
    np.testing.assert_allclose(V.T @ R @ V, np.eye(V.shape[1]), atol=1e-9)  # R-orthonormal
    for j in range(8):  # the same vectors up to sign
        assert abs(abs(V[:, j] @ R @ V_dense[:, j]) - 1.0) < 1e-4


def test_the_variance_is_the_dense_posterior_diagonal_when_the_rank_is_the_dimension(
        ml_problem):
    comm, H, R = ml_problem["comm"], ml_problem["H"], ml_problem["R"]
    posterior = _posterior(ml_problem, rank=N_NODES)
    # every eigenpair but those of H's round-off null space (two corner nodes that no strain
    # sees: λ ≈ 1e-10 against λ₁ ≈ 2e7, below what a product with H resolves)
    lam_dense = sla.eigvalsh(H, R)
    assert len(posterior.eigenvalues) == np.sum(lam_dense > 1e-14 * lam_dense[-1]) >= N_NODES - 2
    for beta in (1.0, 1e3):
        dense = np.diag(np.linalg.inv(H + beta * R))
        np.testing.assert_allclose(gather(comm, posterior.variance(beta)), dense, rtol=1e-7)


def test_a_truncated_rank_over_states_the_variance(ml_problem):
    comm, H, R = ml_problem["comm"], ml_problem["H"], ml_problem["R"]
    dense = np.diag(np.linalg.inv(H + 1e3 * R))
    low = gather(comm, _posterior(ml_problem, rank=5, oversampling=5).variance(1e3))
    assert np.all(low >= dense * (1 - 1e-9))
    assert np.any(low > dense * 1.01)  # and by a visible amount at this rank


def test_the_map_misfit_of_the_ml_prior_weight_matches_a_dense_solve(ml_problem):
    """β of the ML map: the misfit of the MAP estimate with prior N(E₀, (βR)⁻¹) from the
    eigenpairs equals the misfit of the directly solved MAP estimate."""
    comm, H, R, lik = ml_problem["comm"], ml_problem["H"], ml_problem["R"], ml_problem["likelihood"]
    nq = lik.model.Q.dofmap.index_map.size_local
    E0, b = lik.create_vector(), lik.create_vector()
    E0.array[:] = lik.gamma.E.x.array[:nq]
    r2 = 2.0 * lik.gradient(E0, b)
    b_dense = -gather(comm, b.array_r)
    posterior = _posterior(ml_problem, rank=N_NODES)
    V = np.column_stack([gather(comm, v) for v in posterior.vectors.T])
    c = V.T @ b_dense
    tail = b_dense @ np.linalg.solve(R, b_dense) - c @ c
    for beta in (10.0, 1e3, 1e5):
        x = np.linalg.solve(H + beta * R, b_dense)
        direct = r2 - 2 * b_dense @ x + x @ H @ x
        assert map_misfit(posterior, c, tail, r2, beta) == pytest.approx(direct, rel=1e-6)
    target = map_misfit(posterior, c, tail, r2, 321.0)
    beta, reached = matched_prior_weight(posterior, c, tail, r2, target)
    assert reached and beta == pytest.approx(321.0, rel=1e-6)
    E0.destroy()
    b.destroy()


def test_the_gn_map_is_the_gauss_newton_posterior_in_the_modulus(sample):
    """σ_E = E σ_m from the log-parameter equals diag((H_E + (α/s²) R_γ)⁻¹)^½ in E."""
    from fenics_red.gauss_newton import GaussNewtonInversion
    from fenics_red.measurements import Measurement
    from fenics_red.uncertainty import gn_posterior_std

    comm = MPI.COMM_WORLD
    runner = get_method("gn-tikhonov").setup(GRID, SETTINGS.forward, comm, {})
    try:
        estimate, _, info = runner.run(sample)
        m = Measurement.from_sample(sample)
        model = runner.model
        std, extra = gn_posterior_std(model, m.displacement, m.noise_std, estimate, info["alpha"],
                                      runner.gn_settings, UncertaintySettings(rank=N_NODES))
        sigma = np.asarray(m.noise_std)
        weighted = replace(runner.gn_settings, component_weights=tuple(1 / sigma**2))
        with GaussNewtonInversion(model, m.displacement, None, weighted) as inversion:
            inversion.set_parameter(np.log(estimate))
            inversion.objective()
            H = inversion.hessian()
            inversion.alpha = 0.0
            Hm = dense_matrix(H.mult, inversion.gradient_vec)
            E = gather(comm, np.exp(inversion.parameter()))
        prior = PriorPrecision(model.Q, 1.0, 1.0)
        R = dense_matrix(prior.mult, prior.mat.createVecLeft())
        prior.destroy()
        H_E = Hm / np.outer(E, E)
        dense = np.sqrt(np.diag(np.linalg.inv(H_E + extra["uncertainty_prior_weight"] * R)))
        np.testing.assert_allclose(gather(comm, std), dense, rtol=1e-6)
        # s = σ for unit weights and equal components: the prior weight is α/σ²
        assert extra["uncertainty_prior_weight"] == pytest.approx(
            info["alpha"] / np.mean(sigma**2), rel=1e-12)
    finally:
        runner.destroy()


@pytest.mark.parametrize("method", ["ml", "gn-tikhonov"])
def test_the_map_is_the_same_on_one_and_on_all_ranks(method, sample, comm):
    """The same estimate gets the same map on any partition. (gn-tikhonov's own estimate is
    not partition-independent to better than about 1e-4: its α is accepted anywhere within 1 %
    of the discrepancy target, and σ follows α; so its map is compared at one estimate and α.)"""
    from fenics_red.measurements import Measurement
    from fenics_red.uncertainty import gn_posterior_std

    settings = UncertaintySettings(rank=30)

    def run(on, given=None):
        runner = UncertaintyRunner(method, get_method(method).setup(GRID, SETTINGS.forward, on, {}),
                                   settings)
        try:
            if given is None:
                return runner.run_with_std(sample)
            estimate, info = given
            m = Measurement.from_sample(sample)
            model = runner.runner.model
            std, extra = gn_posterior_std(model, m.displacement, m.noise_std, estimate,
                                          info["alpha"], runner.runner.gn_settings, settings)
            return estimate, None, {**info, **extra}, model.to_values(std)
        finally:
            runner.destroy()

    estimate, _, info, std = run(comm)
    given = None if method == "ml" else (estimate, info)
    if given is not None:
        _, _, info, std = run(comm, given)
    _, _, _, alone = run(MPI.COMM_SELF, given)
    assert std.shape == estimate.shape == GRID.shape
    assert np.all(np.isfinite(std)) and np.all(std > 0)
    assert np.array_equal(comm.bcast(std, root=0), std)  # the map on every rank
    np.testing.assert_allclose(std, alone, rtol=1e-7)
    assert info["uncertainty_rank"] == 30 and info["uncertainty_hessian_products"] == 80
    # a map that means something: the truth is inside ±2σ at a fair share of the nodes
    assert coverage(sample.E, estimate, std) > 0.4


def test_bad_uncertainty_requests_are_refused_in_one_line():
    assert split_uncertainty("ml", {"max_steps": 3}) == ({"max_steps": 3}, None)
    own, settings = split_uncertainty("ml", {"max_steps": 3, "uncertainty": True,
                                             "uncertainty_rank": 7})
    assert own == {"max_steps": 3} and settings.rank == 7
    for method, options, message in [
            ("red", {"uncertainty": True}, "available for ml and gn-tikhonov, not 'red'"),
            ("gn-tv", {"uncertainty": True}, "not 'gn-tv'"),
            ("ml", {"uncertainty": True, "uncertainty_rank": 0}, "must be a positive integer"),
            ("ml", {"uncertainty_rank": 5}, "needs --uncertainty"),
            ("ml", {"uncertainty": {"rank": 3, "bogus": 1}}, "unknown uncertainty setting")]:
        with pytest.raises(ValueError, match=message):
            split_uncertainty(method, options)
    with pytest.raises(ValueError, match="oversampling"):
        UncertaintySettings(oversampling=-1)
    assert math.isclose(UncertaintySettings.from_dict(UncertaintySettings().to_dict()).rank, 200)


def test_the_command_line_writes_std_beside_the_estimate(mpi_tmp_path, comm, capsys):
    data = simulate_dataset(mpi_tmp_path / "set.h5", 2, SETTINGS, comm, progress=False)
    out = mpi_tmp_path / "ml.h5"
    assert main(["reconstruct", str(data), "--out", str(out), "--all", "--method", "ml",
                 "--uncertainty", "--uncertainty-rank", "20", "--batch-size", "1"]) == 0
    estimates, truth, _, attrs = load_reconstructions(out)
    std = load_std(out)
    assert std.shape == estimates.shape == (2, *GRID.shape)
    assert np.all(std > 0)
    assert attrs["settings"]["uncertainty"]["rank"] == 20
    if comm.rank == 0:
        assert "truth within ±2σ at" in capsys.readouterr().out
        with h5py.File(out) as f:
            assert f["history/0"].attrs["uncertainty_rank"] == 20
    # a file made without the map has none, and an unsupported method is refused in one line
    plain = mpi_tmp_path / "plain.h5"
    assert main(["reconstruct", str(data), "--out", str(plain), "--sample", "0",
                 "--quiet"]) == 0
    with pytest.raises(ValueError, match="made without --uncertainty"):
        load_std(plain)
    capsys.readouterr()
    assert main(["reconstruct", str(data), "--out", str(mpi_tmp_path / "red.h5"), "--sample",
                 "0", "--method", "gn-tv", "--uncertainty", "--quiet"]) == 2
    err = capsys.readouterr().err
    if comm.rank == 0:
        assert "--uncertainty applies to the methods gn-tikhonov and ml, not 'gn-tv'" in err
        assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("snr", "rank", "words"), [
    (5.0, 10, r"because the ML estimate fits the data no better than its uniform start \(it "
              r"stopped at step 0\), so std \(largest .*\) is only a bound; check the data's "
              r"noise level .* or use --method gn-tikhonov --uncertainty$"),
    (35.0, 10, r"because the ML estimate fits the data more closely than the 10 kept "
               r"eigenpairs can represent, so std .* is only a bound; raise --uncertainty-rank "
               "or use"),
    (35.0, 20, None),
])
def test_an_ml_map_without_a_matched_prior_weight_is_said_to_be_not_meaningful(
        mpi_tmp_path, comm, snr, rank, words):
    """No prior weight matches the ML estimate's misfit (this phantom: seed 0) when at 5 dB its
    uniform start already fits the data to the noise level (it stops at step 0: std near zero),
    or when it fits more closely than 10 eigenpairs reach (std understated): one warning
    (rank 0) says the map is not meaningful and what to do. 20 eigenpairs match: no warning."""
    import warnings

    data = simulate_dataset(mpi_tmp_path / "set.h5", 1, replace(SETTINGS, snr_db=snr, seed=0),
                            comm, progress=False)
    out = mpi_tmp_path / "ml.h5"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["reconstruct", str(data), "--out", str(out), "--sample", "0", "--method",
                     "ml", "--uncertainty", "--uncertainty-rank", str(rank), "--quiet"]) == 0
    said = [str(w.message) for w in caught if "uncertainty map" in str(w.message)]
    with h5py.File(out) as f:
        assert bool(f["history/0"].attrs["uncertainty_prior_weight_matched"]) == (words is None)
    if words is None or comm.rank > 0:  # said once, by rank 0
        assert said == []
    else:
        (line,) = said
        assert re.match(r"the ml uncertainty map \(std\) of sample 0 is not meaningful: no prior "
                        f"weight matches its misfit {words}", line), line


def test_the_evaluation_draws_the_map_and_reports_its_coverage(mpi_tmp_path, comm):
    from fenics_red.evaluation import EvaluationSettings, evaluate, read_std

    data = simulate_dataset(mpi_tmp_path / "one.h5", 1, SimulationSettings(ImageGrid(12, 12),
                                                                           seed=7100),
                            comm, progress=False)  # SSIM needs 11² pixels
    out = mpi_tmp_path / "eval"
    evaluate(data, out, EvaluationSettings(("ml", "gn-tv"), {"ml": {"uncertainty": True,
                                                                     "uncertainty_rank": 10}}),
             comm, progress=False)
    if comm.rank == 0:
        assert read_std(out / "estimates" / "ml" / "sample_0.npz").shape == (13, 13)
        assert read_std(out / "estimates" / "gn-tv" / "sample_0.npz") is None
        assert (out / "figures" / "uncertainty_0.png").stat().st_size > 10_000
        assert "ml: the truth lies within ±2σ" in (out / "summary.md").read_text()


def test_the_gn_map_on_a_mesh_of_the_grids_nodes_is_the_grids(sample, comm):
    """The same triangles as a mesh file (one value per node in the file's order, not the dof
    order) give the grid's map. (Before, the estimate's file order was read as the dof order:
    on one rank the map was computed at a permuted modulus, up to 23 % off; on two it failed.)"""
    from fenics_red.data import mesh_settings
    from fenics_red.domain import MeshArrays
    from fenics_red.measurements import Measurement
    from fenics_red.uncertainty import gn_posterior_std

    settings = UncertaintySettings(rank=30)
    mesh = MeshArrays.of_grid(GRID)
    maps = []
    for space, forward in ((GRID, SETTINGS.forward),
                           (mesh, mesh_settings(mesh, snr_db=SETTINGS.snr_db).forward)):
        runner = get_method("gn-tikhonov").setup(space, forward, comm, {})
        try:
            if space is GRID:
                estimate, _, info = runner.run(sample)
                m = Measurement.from_sample(sample)
                given = estimate
            else:  # the grid's data and estimate as values per node
                m = Measurement.from_sample({k: np.ravel(getattr(sample, k)) for k in
                                             ("ux_noisy", "uy_noisy", "noise_std")})
                given = estimate.ravel()
            std, _ = gn_posterior_std(runner.model, m.displacement, m.noise_std, given,
                                      info["alpha"], runner.gn_settings, settings)
            maps.append(np.ravel(runner.model.to_values(std)))
        finally:
            runner.destroy()
    np.testing.assert_allclose(maps[1], maps[0], rtol=1e-9)
