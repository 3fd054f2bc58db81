"""Specification of RED reconstruction (paper, eqs. 6-12) and the denoised-ml yardstick."""

from mpi4py import MPI

import numpy as np
import pytest

from fenics_red.data import SimulationSettings, simulate_sample
from fenics_red.raster import ImageGrid
from fenics_red.red import REDReconstructor, REDSettings, load_denoiser

GRID = ImageGrid(16, 16)


@pytest.fixture(scope="module")
def sample():
    return simulate_sample(0, SimulationSettings(GRID, seed=11))


class Oracle:
    """A 'denoiser' that knows the answer: C(E) = truth for every E (a strong, smooth prior)."""

    def __init__(self, truth):
        self.truth = truth

    def __call__(self, image):
        return self.truth.copy()


class Identity:
    def __call__(self, image):
        return np.array(image, copy=True)


def _error(estimate, truth):
    return np.linalg.norm(estimate - truth) / np.linalg.norm(truth)


def test_an_identity_denoiser_leaves_the_ml_estimate_unchanged(sample):
    red = REDReconstructor(GRID, settings=REDSettings(), denoiser=Identity())
    try:
        denoised, _, info = red.run_sample(sample, "denoised-ml")
        assert info["denoised_ml_error"] == pytest.approx(info["ml_error"], rel=1e-12)
        assert _error(denoised, sample.E) == pytest.approx(info["ml_error"], rel=1e-12)
    finally:
        red.destroy()


def test_red_reaches_a_fixed_point_between_the_data_and_a_good_prior(sample):
    """The gradient loop (``solver="pgd"``; the default fixed-point form has its own file)."""
    settings = REDSettings(lam="lipschitz:0.1", start="ml", max_steps=400, rtol=1e-5,
                           min_misfit_decrease=0.0, solver="pgd")
    oracle = REDReconstructor(GRID, settings=settings, denoiser=Oracle(sample.E))
    try:
        estimate, history, info = oracle.run_sample(sample)
        assert info["stop"] == "rtol"  # a fixed point, not the budget
        assert history["change"][-1] < 1e-4
        # the prior pulls towards the truth, the data keep it honest: better than ML
        assert _error(estimate, sample.E) < 0.5 * info["ml_error"]
        assert np.all(estimate > 0)
        assert np.all(np.isfinite(history["objective"]))
    finally:
        oracle.destroy()
    # by default the loop ends earlier, at the first round that no longer lowers the misfit by
    # one standard deviation: still far better than ML, in fewer steps than the fixed point
    fixed_point_steps = info["steps"]
    oracle = REDReconstructor(GRID, settings=REDSettings(
        lam="lipschitz:0.1", start="ml", max_steps=400, rtol=1e-5, solver="pgd"),
        denoiser=Oracle(sample.E))
    try:
        early, _, info = oracle.run_sample(sample)
        assert info["stop"] == "insignificant" and info["steps"] < fixed_point_steps
        assert _error(early, sample.E) < 0.5 * info["ml_error"]
    finally:
        oracle.destroy()


class Scaled(Oracle):
    """A prior that pulls every map towards three times the truth: far from the data."""

    def __call__(self, image):
        return 3.0 * self.truth


def test_the_misfit_guard_stops_a_prior_that_pulls_away_from_the_data(sample):
    errors = {}
    for guard in (True, False):
        settings = REDSettings(lam="lipschitz:1", start="ml", max_steps=200, misfit_guard=guard,
                               min_misfit_decrease=0.0)  # the guard alone
        red = REDReconstructor(GRID, settings=settings, denoiser=Scaled(sample.E))
        try:
            estimate, history, info = red.run_sample(sample)
        finally:
            red.destroy()
        errors[guard] = _error(estimate, sample.E)
        if guard:
            assert info["stop"] == "misfit_guard"
            misfits = history["refresh_misfit"]
            assert misfits[-1] > misfits[0]  # the refresh that stopped it, recorded
            assert info["steps"] < 200
        else:
            assert info["stop"] != "misfit_guard"
    # unguarded, the iterate goes most of the way to 3 E; guarded, it stops near its start
    assert errors[False] > 1.0
    assert errors[True] < 0.5 * errors[False]


@pytest.mark.usefixtures("several_ranks")
def test_red_gives_the_same_result_on_1_and_2_ranks(sample, comm):
    settings = REDSettings(lam="balance:1", start="ml", max_steps=60)
    results = []
    for c in (comm, MPI.COMM_SELF):
        red = REDReconstructor(GRID, settings=settings, comm=c, denoiser=Oracle(sample.E))
        try:
            results.append(red.run_sample(sample)[0])
        finally:
            red.destroy()
    np.testing.assert_allclose(results[0], results[1], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kwargs, message", [
    ({"start": "nowhere"}, "start must be one of"),
    ({"lam": "sometimes"}, "not understood"),
    ({"max_steps": 0}, "max_steps"),
    ({"min_misfit_decrease": -1.0}, "min_misfit_decrease"),
])
def test_impossible_red_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        REDSettings(**kwargs)


def test_missing_or_corrupt_models_are_refused(mpi_tmp_path, comm):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_denoiser(mpi_tmp_path / "none.pt")
    bad = mpi_tmp_path / "bad.pt"
    if comm.rank == 0:
        bad.write_bytes(b"not a model at all")
    comm.Barrier()
    with pytest.raises(ValueError, match="not a torch file"):
        load_denoiser(bad)


# -- data outside the denoiser's training range ---------------------------------------------------

class Carded:
    def __init__(self, snr):
        self.card = {"data": {"snr_db": snr}}


def test_data_noisier_or_far_cleaner_than_the_training_data_get_a_warning():
    from fenics_red.red import snr_warning, training_snrs

    assert training_snrs(Carded(35.0)) == [35.0]
    assert training_snrs(Carded([25.0, 35.0])) == [25.0, 35.0]  # several pairs files
    message = snr_warning(Carded(35.0), 25.0)
    assert "25 dB" in message and "35 dB" in message and "--denoiser" in message
    assert snr_warning(Carded(35.0), 33.0) is None  # within the margin
    assert snr_warning(Carded(35.0), 45.0) is None  # cleaner data: validated
    # so clean that `ml` solves them by CG, far below the FISTA estimate RED starts from
    assert "cleaner than the denoiser's training data" in snr_warning(Carded([25.0, 45.0]), 80.0)
    assert snr_warning(Carded([25.0, 45.0]), 48.0) is None
    assert snr_warning(Carded([25.0, 35.0]), 25.0) is None
    assert snr_warning(Carded(None), 10.0) is None and snr_warning(Carded(35.0), None) is None
    assert snr_warning(Identity(), 10.0) is None  # no card, nothing to compare


def test_reconstructing_noisy_data_with_the_denoiser_warns_once_on_rank_0(mpi_tmp_path, comm):
    import warnings

    from fenics_red.data import simulate_dataset
    from fenics_red.denoiser import Denoiser, UNetConfig
    from fenics_red.reconstruction import reconstruct_dataset

    data = simulate_dataset(mpi_tmp_path / "noisy.h5", 2, SimulationSettings(GRID, snr_db=20.0),
                            comm, progress=False)
    model = mpi_tmp_path / "model.pt"
    if comm.rank == 0:
        Denoiser.untrained(UNetConfig(channels=4, depth=1)).save(
            model, {"data": {"snr_db": 35.0}})
    comm.Barrier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reconstruct_dataset(data, mpi_tmp_path / "dml.h5", comm, "denoised-ml",
                            {"denoiser": str(model)}, progress=False)
    messages = [str(w.message) for w in caught if "noisier than" in str(w.message)]
    assert len(messages) == (1 if comm.rank == 0 else 0)


class Upside(Oracle):
    """A 'denoiser' that answers with the truth turned upside down: a plausible-looking map the
    data contradict (a denoiser meeting shapes unlike its training)."""

    def __call__(self, image):
        return self.truth[::-1].copy()


def test_red_starts_from_the_ml_estimate_when_the_denoised_one_contradicts_the_data(sample):
    checked = REDReconstructor(GRID, settings=REDSettings(), denoiser=Upside(sample.E))
    unchecked = REDReconstructor(GRID, settings=REDSettings(start_check=0),
                                 denoiser=Upside(sample.E))
    trusted = REDReconstructor(GRID, settings=REDSettings(), denoiser=Oracle(sample.E))
    try:
        with pytest.warns(UserWarning, match="contradicts the data"):
            estimate, _, info = checked.run_sample(sample)
        assert info["start"] == "ml"
        assert info["start_misfit_ratio"] > REDSettings().start_check
        assert _error(estimate, sample.E) < info["denoised_ml_error"]  # the data lead
        _, _, info = unchecked.run_sample(sample)
        assert info["start"] == "denoised-ml" and "start_misfit_ratio" not in info
        _, _, info = trusted.run_sample(sample)  # the truth fits the data: kept
        assert info["start"] == "denoised-ml" and info["start_misfit_ratio"] < 2
    finally:
        for red in (checked, unchecked, trusted):
            red.destroy()
    with pytest.raises(ValueError, match="start_check"):
        REDSettings(start_check=-1)
