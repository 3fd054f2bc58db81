"""Specification of the conjugate-gradient ML iteration (``--solver cg``: Γ frozen, Newton-Krylov).

With exact data the true modulus has zero misfit: CG on the frozen-Γ quadratic reaches it where
gradient steps stall; under noise it stops by the discrepancy rule like the gradient iterations.
Every test runs serially and under ``mpirun -n 2``.
"""

import numpy as np
import pytest

from fenics_red.data import SimulationSettings, simulate_sample
from fenics_red.forward import ElasticityModel
from fenics_red.likelihood import StatisticalLikelihood
from fenics_red.measurements import Measurement
from fenics_red.raster import ImageGrid
from fenics_red.solvers import FixedPointSolver, MLReconstructor, MLSettings

GRID = ImageGrid(24, 24)


def _run(sample, comm, **settings):
    ml = MLReconstructor(GRID, settings=MLSettings(**settings), comm=comm)
    try:
        return ml.run_sample(sample)
    finally:
        ml.destroy()


def _error(estimate, truth):
    return np.linalg.norm(estimate - truth) / np.linalg.norm(truth)


@pytest.mark.parametrize("seed", [11, 12])
def test_cg_recovers_sharp_phantoms_from_exact_data_where_fista_stalls(comm, seed):
    sample = simulate_sample(0, SimulationSettings(GRID, snr_db=200.0, seed=seed))
    cg, history = _run(sample, comm, method="cg", max_steps=3000)
    fista, _ = _run(sample, comm, method="fista", max_steps=3000)
    assert _error(cg, sample.E) < 0.02
    assert _error(fista, sample.E) > 2 * _error(cg, sample.E)


def test_the_misfit_cg_tracks_is_the_misfit_of_its_iterate(comm):
    """``g`` is updated from the step, not recomputed: check it against a fresh evaluation."""
    sample = simulate_sample(0, SimulationSettings(GRID, snr_db=35.0, seed=4))
    model = ElasticityModel.on_grid(GRID, comm)
    m = Measurement.from_sample(sample)
    likelihood = StatisticalLikelihood(model, m.displacement, m.noise)
    solver = FixedPointSolver(likelihood, MLSettings(method="cg", stop="budget", max_steps=12))
    try:
        E, history = solver.run()
        tracked = history.column("misfit")[-1]
        likelihood.refresh(solver._start)  # Γ of the round: frozen at the iterate it began from
        assert tracked == pytest.approx(likelihood.misfit(E), rel=1e-8)
        assert history.column("misfit")[0] > 1.5 * tracked
    finally:
        solver.destroy()
        likelihood.destroy()
        model.destroy()


def test_cg_stops_at_the_discrepancy_under_noise_and_keeps_the_estimate_positive(comm):
    sample = simulate_sample(0, SimulationSettings(GRID, snr_db=35.0, seed=12))
    estimate, history = _run(sample, comm, method="cg", steps_per_round=20)
    assert history.stop_reason in ("discrepancy", "max_steps")
    assert estimate.min() > 0
    fista, _ = _run(sample, comm)
    assert _error(estimate, sample.E) < 1.25 * _error(fista, sample.E)


def test_cg_refuses_a_prior():
    from fenics_red.red import REDSettings

    with pytest.raises(ValueError, match="REDSettings.solver"):
        REDSettings(solver="cg")


def test_an_estimate_does_not_depend_on_the_samples_solved_before_it(comm):
    """The preconditioner belongs to each data set: a reused solver gives what a fresh one does.

    A few steps, not the discrepancy stop: under MPI two solvers differ at round-off (their
    meshes' partitions), and CG's late steps under noise amplify it (measured at 45 dB: 1e-15 in
    the step size at step 6, 1e-3 at step 9, where the directions are the noise's). Its early
    steps are stable, and a preconditioner left over from the first sample changes them by
    percents.
    """
    first, second = (simulate_sample(i, SimulationSettings(GRID, snr_db=45.0, seed=8))
                     for i in range(2))
    settings = MLSettings(method="cg", stop="budget", max_steps=6)
    ml = MLReconstructor(GRID, settings=settings, comm=comm)
    try:
        ml.run_sample(first)
        after, _ = ml.run_sample(second)
    finally:
        ml.destroy()
    alone, _ = _run(second, comm, method="cg", stop="budget", max_steps=6)
    np.testing.assert_allclose(after, alone, rtol=1e-8)


# -- the "ml" method's default: the iteration chosen by the data's SNR ----------------------------

@pytest.mark.slow
def test_the_ml_method_with_default_settings_recovers_sharp_phantoms_from_exact_data(comm):
    """Issue "noise-free recovery under 2 %": `reconstruct --method ml` with no option, on random
    sharp phantoms of the default generator at 200 dB (32²; 64² in demos/ml_solvers.py)."""
    from fenics_red.methods import get_method

    grid = ImageGrid(32, 32)
    runner = get_method("ml").setup(grid, SimulationSettings(grid).forward, comm, {})
    try:
        for seed in (21, 22, 23):
            sample = simulate_sample(0, SimulationSettings(grid, snr_db=200.0, seed=seed))
            estimate, _, info = runner.run(sample)
            assert info["solver"] == "cg" and info["max_steps"] == 3000
            assert _error(estimate, sample.E) < 0.02, seed
        noisy = simulate_sample(0, SimulationSettings(grid, snr_db=35.0, seed=21))
        _, _, info = runner.run(noisy)  # the data recipe: FISTA's 150 steps
        assert info["solver"] == "fista" and info["max_steps"] == 150
    finally:
        runner.destroy()


@pytest.mark.parametrize("snr", [25.0, 45.0, 70.0])
def test_the_data_snr_is_read_off_the_measurement_and_its_noise_model(comm, snr):
    sample = simulate_sample(0, SimulationSettings(GRID, snr_db=snr, seed=5))
    model = ElasticityModel.on_grid(GRID, comm)
    likelihood = StatisticalLikelihood(model)
    try:
        m = Measurement.from_sample(sample)
        likelihood.set_data(m.displacement, m.noise)
        assert likelihood.data_snr_db() == pytest.approx(snr, abs=0.5)
    finally:
        likelihood.destroy()
        model.destroy()


def test_auto_takes_cg_from_50_db_without_a_prior_and_each_iteration_its_budget():
    auto = MLSettings(method="auto", max_steps=None)
    assert auto.resolved(49.9).method == "fista" and auto.resolved(49.9).max_steps == 150
    assert auto.resolved(50.0).method == "cg" and auto.resolved(50.0).max_steps == 3000
    assert auto.resolved(80.0, prior=True).method == "fista"  # CG takes no prior
    assert auto.replace(max_steps=7).resolved(80.0).max_steps == 7
    assert MLSettings().resolved() == MLSettings()  # the data recipe is concrete already
    with pytest.raises(ValueError, match="needs the data's SNR"):
        auto.resolved()
    with pytest.raises(ValueError, match="max_steps"):
        MLSettings(max_steps=0)
