"""The RED prior (paper, eqs. 10-12) on distributed nodal vectors, and the rules for λ.

Runs serially and under ``mpirun -n 2``: every expectation is computed from the full image with
the denoiser called directly (as rank 0 calls it), so agreement on 1 and 2 ranks is checked
against the same numbers.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fenics_red.data import SimulationSettings, simulate_sample
from fenics_red.denoiser import Denoiser, UNetConfig
from fenics_red.forward import ElasticityModel, ForwardSettings
from fenics_red.likelihood import StatisticalLikelihood
from fenics_red.measurements import Measurement
from fenics_red.priors import (
    BalanceLambda,
    FixedLambda,
    GradientNormLambda,
    LipschitzFractionLambda,
    RedPrior,
    parse_lambda_rule,
)
from fenics_red.raster import ImageGrid
from fenics_red.solvers import FixedPointSolver, MLSettings, Prior
from fenics_red.threads import torch_threads

GRID = ImageGrid(12, 10)
TINY = UNetConfig(channels=4, depth=2)


def denoised_on_root(prior: RedPrior, image: np.ndarray) -> np.ndarray:
    """``C(image)`` called directly, as rank 0 calls it (with its threads: torch's sums differ
    in the last bits between thread counts), the same array on every rank."""
    def call():
        with torch_threads(prior.root_threads):
            return np.asarray(prior.denoiser(image), dtype=np.float64)
    return prior.comm.bcast(call() if prior.comm.rank == 0 else None, root=0)


def perturbed_denoiser(seed=1) -> Denoiser:
    """A denoiser that is not the identity (random, non-zero output layer)."""
    denoiser = Denoiser.untrained(TINY, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in denoiser.network.unet.out.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return denoiser


@pytest.fixture
def fidelity(comm):
    model = ElasticityModel.on_grid(GRID, comm, ForwardSettings())
    lik = StatisticalLikelihood(model)
    yield lik
    lik.destroy()
    model.destroy()


def modulus_image(seed=0):
    rng = np.random.default_rng(seed)  # the same image on every rank
    image = np.full(GRID.shape, 0.12) + 0.02 * rng.standard_normal(GRID.shape)
    image[3:7, 4:9] = 0.5
    return image


def test_red_prior_implements_the_solver_protocol(fidelity):
    assert isinstance(RedPrior(perturbed_denoiser(), fidelity), Prior)


def test_the_gradient_is_the_image_minus_its_denoised_version_on_any_rank_count(fidelity):
    """∇R(E) = E − C(E) (eq. 10) and R(E) = ½ Eᵀ(E − C(E)) (eq. 11), from the full image."""
    denoiser = perturbed_denoiser()
    prior = RedPrior(denoiser, fidelity)
    image = modulus_image()
    E = fidelity.from_image(image)
    out = fidelity.create_vector()
    R = prior.gradient(E, out)

    expected = image - denoised_on_root(prior, image)  # the direct computation, whole image
    assert np.abs(expected).max() > 1e-3  # the check is not trivial
    np.testing.assert_allclose(fidelity.to_image(out), expected, rtol=0,
                               atol=1e-12 * np.abs(image).max())
    assert R == pytest.approx(0.5 * np.sum(image * expected), rel=1e-10)
    assert prior.value(E) == R
    # the vector product agrees with the image sum (each node owned once)
    assert 0.5 * E.dot(out) == pytest.approx(R, rel=1e-10)
    assert prior.calls == 1  # gradient and value at the same E: one network call
    E.destroy(), out.destroy()


def test_the_network_runs_once_per_new_modulus(fidelity):
    calls = []

    def identity_with_log(image):
        calls.append(image.copy())
        return 0.9 * image

    prior = RedPrior(identity_with_log, fidelity)
    E = fidelity.from_image(modulus_image())
    out = fidelity.create_vector()
    prior.gradient(E, out)
    prior.value(E)
    E.scale(2.0)
    prior.value(E)
    assert prior.calls == 2
    assert len(calls) == (2 if fidelity.comm.rank == 0 else 0)  # rank 0 denoises, all receive
    np.testing.assert_allclose(fidelity.to_image(out), 0.1 * modulus_image(), atol=1e-15)
    E.destroy(), out.destroy()


def test_with_an_untrained_denoiser_the_prior_vanishes(fidelity):
    prior = RedPrior(Denoiser.untrained(TINY), fidelity)
    E = fidelity.from_image(modulus_image())
    out = fidelity.create_vector(1.0)
    assert prior.gradient(E, out) == 0.0
    assert out.norm() == 0.0
    assert prior.value(E) == 0.0
    E.destroy(), out.destroy()


def test_a_failing_denoiser_raises_on_every_rank(fidelity):
    prior = RedPrior(lambda image: np.full_like(image, np.nan), fidelity)
    E = fidelity.from_image(modulus_image())
    with pytest.raises(ValueError, match="non-finite"):
        prior.value(E)
    with pytest.raises(ValueError, match="non-finite"):
        prior.denoise(modulus_image())  # the denoised-ml pass: the same checks
    E.destroy()


def test_a_denoiser_returning_another_shape_is_refused_on_every_rank(fidelity):
    prior = RedPrior(lambda image: image[1:], fidelity)
    E = fidelity.from_image(modulus_image())
    with pytest.raises(ValueError, match="returned shape"):
        prior.value(E)
    with pytest.raises(ValueError, match="returned shape"):
        prior.denoise(modulus_image())
    assert prior.calls == 0
    E.destroy()


def test_the_one_denoiser_pass_is_the_denoisers_output_on_every_rank(fidelity):
    prior = RedPrior(perturbed_denoiser(), fidelity)
    image = modulus_image()
    np.testing.assert_array_equal(prior.denoise(image), denoised_on_root(prior, image))
    assert prior.calls == 0  # the loop's calls are counted, the one pass before it is not


# -- λ rules --------------------------------------------------------------------------------------

def test_lambda_rules_follow_their_formulas(fidelity):
    denoiser = perturbed_denoiser()
    prior = RedPrior(denoiser, fidelity)
    image = modulus_image()
    E = fidelity.from_image(image)
    state = SimpleNamespace(E=E, grad_norm=3.0)
    assert FixedLambda(0.25)(state) == 0.25
    assert GradientNormLambda()(state) == 3.0  # eq. 12 with equality
    assert GradientNormLambda(2.0)(state) == 6.0
    residual = np.linalg.norm(image - denoised_on_root(prior, image))
    assert BalanceLambda(prior)(state) == pytest.approx(3.0 / residual, rel=1e-10)
    assert BalanceLambda(prior, 0.5, max_value=1.0)(state) == min(1.5 / residual, 1.0)
    assert BalanceLambda(RedPrior(Denoiser.untrained(TINY), fidelity))(state) == 0.0
    rule = LipschitzFractionLambda(0.01)
    assert rule(SimpleNamespace(E=E, grad_norm=3.0, lipschitz=200.0)) == pytest.approx(2.0)
    assert rule.values == [pytest.approx(2.0)]
    with pytest.raises(ValueError, match="needs the fidelity"):
        rule(state)
    E.destroy()


def test_lambda_rules_parse_from_the_command_line(fidelity):
    prior = RedPrior(Denoiser.untrained(TINY), fidelity)
    assert isinstance(parse_lambda_rule("0.01"), FixedLambda)
    assert parse_lambda_rule("fixed:0.5").value == 0.5
    assert parse_lambda_rule("paper").factor == 1.0
    assert parse_lambda_rule("paper:2").factor == 2.0
    assert isinstance(parse_lambda_rule("balance:0.5", prior), BalanceLambda)
    assert parse_lambda_rule("lipschitz:0.005", fidelity=fidelity).fraction == 0.005
    for bad in ("often", "paper:x", "lipschitz", "fixed:-1", "wobble:1"):
        with pytest.raises(ValueError):
            parse_lambda_rule(bad, prior, fidelity)


# -- inside the fixed-point loop ------------------------------------------------------------------

@pytest.fixture
def measured(fidelity):
    sample = simulate_sample(0, SimulationSettings(GRID, snr_db=35.0, seed=11))
    m = Measurement.from_sample(sample)
    displacement, noise, truth = m.displacement, m.noise, m.truth
    fidelity.set_data(displacement, noise)
    return truth


def run(fidelity, prior, lam, steps=12):
    settings = MLSettings(stop="budget", max_steps=steps, steps_per_round=4, method="pgd")
    solver = FixedPointSolver(fidelity, settings, prior=prior, lam=lam)
    try:
        E, history = solver.run()
        return fidelity.to_image(E), history
    finally:
        solver.destroy()


def test_red_with_the_identity_denoiser_and_the_balance_rule_is_the_ml_iteration(fidelity,
                                                                                 measured):
    ml, _ = run(fidelity, None, 0.0)
    prior = RedPrior(Denoiser.untrained(TINY), fidelity)
    rule = BalanceLambda(prior)
    red, history = run(fidelity, prior, rule)
    # (bit for bit serially; parallel MUMPS solves may differ in the last bits between runs)
    np.testing.assert_allclose(red, ml, rtol=1e-12, atol=1e-12 * np.abs(ml).max())
    assert rule.values == [0.0] * len(history.refreshes)


def test_red_steps_with_the_paper_rule_report_the_explicit_objective(fidelity, measured):
    prior = RedPrior(perturbed_denoiser(), fidelity)
    rule = GradientNormLambda(1.0)
    E, history = run(fidelity, prior, rule, steps=8)
    assert np.isfinite(E).all() and (E > 0).all()
    lam = history.column("lam")
    assert (lam > 0).all() and len(rule.values) == len(history.refreshes) >= 2
    # every objective value is g + λ R with R = ½ Eᵀ(E − C(E)) (eq. 11): check the last one
    x = fidelity.from_image(E)
    g = fidelity.value(x)
    assert history.final["objective"] == pytest.approx(g + lam[-1] * prior.value(x), rel=1e-8)
    assert prior.calls >= 8
    assert math.isfinite(prior.seconds)
    x.destroy()
