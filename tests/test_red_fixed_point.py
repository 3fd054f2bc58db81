"""Specification of RED by its fixed-point form (``REDSettings(solver="fixed-point")``): the
denoiser is held for an outer step while a few CG steps solve ``(H + λI) E = Dᵀ Γ⁻¹ f + λ C(E_k)``.

The loop must reach the point where RED's stationarity condition ``∇g(E) + λ(E − C(E)) = 0``
holds (paper, equations 10-11), the same point as the projected-gradient loop, in far fewer
denoiser calls, on any number of ranks.
"""

from mpi4py import MPI

import numpy as np
import pytest
from scipy import ndimage

from fenics_red.data import SimulationSettings, simulate_sample
from fenics_red.raster import ImageGrid
from fenics_red.red import REDReconstructor, REDSettings

GRID = ImageGrid(16, 16)


@pytest.fixture(scope="module")
def sample():
    return simulate_sample(0, SimulationSettings(GRID, seed=11))


class Halfway:
    """``C(E) = ½ (E + truth)``: an oracle-like denoiser with Jacobian ½ I (strongly passive)."""

    def __init__(self, truth):
        self.truth = truth
        self.calls = 0

    def __call__(self, image):
        self.calls += 1
        return 0.5 * (image + self.truth)


class Smoother:
    """``C(E) = ½ (E + G E)``, ``G`` a Gaussian blur: a denoiser that couples the nodes and knows
    nothing of the truth."""

    def __call__(self, image):
        return 0.5 * (image + ndimage.gaussian_filter(image, 1.0, mode="nearest"))


def _settings(**changes):
    """A strong weight, run to the fixed point: no significance stop, no misfit guard."""
    values = dict(solver="fixed-point", lam="lipschitz:0.1", start="ml", rtol=1e-9,
                  max_steps=200, min_misfit_decrease=0.0, misfit_guard=False, inner_steps=3)
    values.update(changes)
    return REDSettings(**values)


def _run(sample, settings, denoiser, comm=MPI.COMM_SELF):
    red = REDReconstructor(GRID, settings=settings, comm=comm, denoiser=denoiser)
    try:
        estimate, history, info = red.run_sample(sample)
        optimality = _optimality(red, denoiser, info["lam"])
    finally:
        red.destroy()
    return estimate, history, info, optimality


def _optimality(red, denoiser, lam):
    """``‖∇g(E) + λ(E − C(E))‖ / ‖∇g(E)‖`` at the estimate, ``Γ`` refreshed there, over the
    nodes above the positivity floor (there are none on the floor in these problems)."""
    fid, x = red.likelihood, red.red.x
    fid.refresh(x)
    gradient = fid.create_vector()
    fid.gradient(x, gradient)
    image = fid.to_image(x)
    prior = fid.from_image(image - denoiser(image))
    free = x.array_r > red.red.floor
    assert free.all()
    residual = gradient.array_r + lam * prior.array_r
    comm = fid.comm
    norm = np.sqrt(comm.allreduce(float(np.sum(residual[free] ** 2))))
    scale = np.sqrt(comm.allreduce(float(np.sum(gradient.array_r[free] ** 2))))
    gradient.destroy()
    prior.destroy()
    return norm / scale


def _error(estimate, truth):
    return np.linalg.norm(estimate - truth) / np.linalg.norm(truth)


def test_the_loop_ends_where_the_red_optimality_condition_holds(sample):
    denoiser = Halfway(sample.E)
    estimate, history, info, optimality = _run(sample, _settings(), denoiser)
    assert info["stop"] == "rtol"
    assert optimality < 1e-5  # the gradient of g and λ(E − C(E)) cancel
    assert np.all(estimate > 0)
    # one denoiser call per outer step (and one for the denoised-ml start), a few CG steps each
    assert info["denoiser_calls"] == info["steps"] == int(np.isfinite(history["grad_norm"]).sum())
    assert info["denoiser_calls"] < 40
    assert info["inner_steps"] == history["inner_steps"].sum() <= 3 * info["steps"]
    # the RED gradient falls along the outer steps
    grad = history["grad_norm"][np.isfinite(history["grad_norm"])]
    assert grad[-1] < 1e-4 * grad[0]


@pytest.mark.parametrize("denoiser", ["halfway", "smoother"])
def test_it_reaches_the_fixed_point_of_projected_gradients_in_far_fewer_denoiser_calls(
        sample, denoiser):
    make = {"halfway": lambda: Halfway(sample.E), "smoother": Smoother}[denoiser]
    fixed, _, fixed_info, fixed_optimality = _run(
        sample, _settings(acceleration="anderson"), make())
    # the same problem: the λ that the fixed-point loop set at its start (the gradient loop
    # would re-evaluate the Lipschitz rule at every refresh)
    pgd, _, pgd_info, pgd_optimality = _run(
        sample, _settings(solver="pgd", max_steps=3000, acceleration="none",
                          lam=repr(fixed_info["lam"])), make())
    assert fixed_optimality < 1e-5 and pgd_optimality < 1e-4
    np.testing.assert_allclose(fixed, pgd, rtol=1e-4)
    assert _error(fixed, sample.E) == pytest.approx(_error(pgd, sample.E), rel=1e-4)
    assert fixed_info["denoiser_calls"] < pgd_info["denoiser_calls"] / 4


def test_anderson_mixing_reaches_the_same_point_in_fewer_outer_steps(sample):
    plain, _, plain_info, _ = _run(sample, _settings(), Smoother())
    mixed, _, mixed_info, optimality = _run(sample, _settings(acceleration="anderson"),
                                            Smoother())
    assert mixed_info["stop"] == "rtol" and optimality < 1e-5
    assert mixed_info["steps"] < 0.5 * plain_info["steps"]
    np.testing.assert_allclose(mixed, plain, rtol=1e-4)


@pytest.mark.usefixtures("several_ranks")
def test_the_loop_gives_the_same_result_on_1_and_2_ranks(sample, comm):
    settings = _settings(rtol=0.0, max_steps=8, acceleration="anderson", lam="balance:1")
    results = [_run(sample, settings, Halfway(sample.E), c)[0] for c in (comm, MPI.COMM_SELF)]
    np.testing.assert_allclose(results[0], results[1], rtol=1e-7, atol=1e-9)


def test_the_default_stopping_rules_end_the_loop_after_few_denoiser_calls(sample):
    settings = REDSettings(solver="fixed-point", lam="lipschitz:0.1", start="ml", inner_steps=10)
    estimate, history, info, _ = _run(sample, settings, Halfway(sample.E))
    assert info["stop"] in ("insignificant", "misfit_guard", "rtol")
    assert info["denoiser_calls"] <= 5
    assert _error(estimate, sample.E) < 0.5 * info["ml_error"]


@pytest.mark.parametrize("kwargs, message", [
    ({"solver": "fixed point"}, "solver must be one of"),
    ({"solver": "fixed-point", "inner_steps": 0}, "inner_steps must be a positive integer"),
    ({"solver": "fixed-point", "inner_steps": 2.5}, "inner_steps must be a positive integer"),
    ({"solver": "fixed-point", "acceleration": "nesterov"}, "acceleration must be one of"),
    ({"solver": "pgd", "acceleration": "anderson"}, "solver='fixed-point' only"),
    ({"solver": "fixed-point", "max_steps": 0}, "max_steps"),
    ({"solver": "fixed-point", "rtol": -1.0}, "rtol"),
])
def test_impossible_fixed_point_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        REDSettings(**kwargs)


def test_the_fixed_point_form_is_the_default_and_its_budget_counts_outer_steps():
    assert REDSettings().solver == "fixed-point"
    settings = REDSettings(solver="fixed-point")
    assert settings.loop_settings().max_steps == settings.max_steps
