"""Specification of the simulated measurements ``u_m = u + n`` at a target SNR (paper, eqs. 2-5)."""

from mpi4py import MPI

import numpy as np
import pytest

from dolfinx import fem
from fenics_red import ElasticityModel, ForwardSettings, ImageGrid
from fenics_red.measurements import (
    add_noise,
    component_noise_std,
    draw_noise,
    free_dof_images,
    measured_snr_db,
    noise_std_for_snr,
    noise_std_from_energy,
    realised_snr_db,
    set_displacement,
    simulate_measurement,
)

GRID = ImageGrid(24, 24)


def _modulus(grid=GRID):
    rows, cols = np.mgrid[0: grid.ny + 1, 0: grid.nx + 1]
    inside = (rows - grid.ny / 2) ** 2 + (cols - grid.nx / 2) ** 2 < (grid.nx / 5) ** 2
    return np.where(inside, 0.5, 0.12)


@pytest.fixture(scope="module")
def fixed():
    """A model with a clamped bottom (on COMM_SELF) and its clean solution."""
    model = ElasticityModel.on_grid(GRID, MPI.COMM_SELF, ForwardSettings())
    model.solve(_modulus())
    ux, uy = model.displacement_images()
    yield model, ux, uy, free_dof_images(model)
    model.destroy()


def test_free_dofs_leave_out_the_supports(fixed):
    _, _, _, free = fixed
    assert free.shape == (2, *GRID.shape) and free.dtype == bool
    assert not free[:, -1].any()  # clamped bottom row (row ny is y = 0)
    assert free[:, :-1].all()
    sliding = ElasticityModel.on_grid(ImageGrid(6, 5), MPI.COMM_SELF,
                                      ForwardSettings(support="sliding"))
    free = free_dof_images(sliding)
    sliding.destroy()
    assert not free[1, -1].any() and free[1, :-1].all()  # uy held on the bottom
    assert not free[0, -1, 0] and free[0].sum() == free[0].size - 1  # ux at one corner only


def test_sigma_follows_the_expected_noise_energy_exactly(fixed):
    _, ux, uy, free = fixed
    for snr, ratio in [(35.0, 1.0), (25.0, 2.0), (45.0, 0.5)]:
        sx, sy = noise_std_for_snr(ux, uy, free, snr, ratio)
        assert sx == pytest.approx(ratio * sy, rel=1e-15)
        energy = np.sum(ux[free[0]] ** 2) + np.sum(uy[free[1]] ** 2)
        expected = sy**2 * (ratio**2 * free[0].sum() + free[1].sum())
        assert expected == pytest.approx(energy / 10 ** (snr / 10), rel=1e-13)


@pytest.mark.parametrize("snr", [25.0, 35.0, 45.0])
@pytest.mark.parametrize("ratio", [1.0, 2.0])
def test_realised_snr_is_the_requested_one_within_half_a_db(fixed, snr, ratio):
    _, ux, uy, free = fixed
    rng = np.random.default_rng(11)
    realised = []
    for _ in range(20):
        uxn, uyn, _ = add_noise(ux, uy, free, snr, rng, ratio)
        realised.append(measured_snr_db(ux, uy, uxn, uyn, free))
    assert np.all(np.abs(np.array(realised) - snr) < 0.5)
    assert abs(np.mean(realised) - snr) < 0.1  # unbiased: sigma from the expected energy


def test_supports_stay_noise_free_and_the_lateral_noise_follows_the_ratio(fixed):
    _, ux, uy, free = fixed
    uxn, uyn, (sx, sy) = add_noise(ux, uy, free, 30.0, np.random.default_rng(1), 3.0)
    assert np.array_equal(uxn[~free[0]], ux[~free[0]])
    assert np.array_equal(uyn[~free[1]], uy[~free[1]])
    nx, ny = (uxn - ux)[free[0]], (uyn - uy)[free[1]]
    assert np.std(nx) / np.std(ny) == pytest.approx(3.0, rel=0.1)
    assert np.std(ny) == pytest.approx(sy, rel=0.1)
    assert abs(np.mean(ny)) < 4 * sy / np.sqrt(ny.size)


def test_noise_is_deterministic_given_the_generator(fixed):
    _, ux, uy, free = fixed
    a = add_noise(ux, uy, free, 35.0, np.random.default_rng(5))
    b = add_noise(ux, uy, free, 35.0, np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_simulate_measurement_returns_the_clean_field_and_the_noise_levels(fixed):
    model, ux, uy, free = fixed
    m = simulate_measurement(model, _modulus(), np.random.default_rng(2), 35.0, 2.0)
    assert np.array_equal(m.ux, ux) and np.array_equal(m.uy, uy)
    assert m.noise_std == noise_std_for_snr(ux, uy, free, 35.0, 2.0)
    assert m.force_std == 0.0 and np.array_equal(m.free, free)
    assert abs(measured_snr_db(m.ux, m.uy, m.ux_noisy, m.uy_noisy, m.free) - 35.0) < 0.5


def test_force_noise_perturbs_the_load_linearly_and_keeps_the_displacement_noise(fixed):
    model, _, _, _ = fixed
    E = _modulus()
    base = simulate_measurement(model, E, np.random.default_rng(4), 35.0)
    one = simulate_measurement(model, E, np.random.default_rng(4), 35.0, force_noise=1e-6)
    two = simulate_measurement(model, E, np.random.default_rng(4), 35.0, force_noise=2e-6)
    assert np.array_equal(one.ux, base.ux) and one.force_std == 1e-6
    d1 = np.stack([one.ux_noisy - base.ux_noisy, one.uy_noisy - base.uy_noisy])
    d2 = np.stack([two.ux_noisy - base.ux_noisy, two.uy_noisy - base.uy_noisy])
    assert np.abs(d1).max() > 0
    np.testing.assert_allclose(d2, 2 * d1, rtol=1e-6, atol=1e-9 * np.abs(d1).max())
    assert np.array_equal(d1[:, -1], np.zeros_like(d1[:, -1]))  # supports stay exact


def test_a_distributed_model_gives_the_same_measurement(fixed, comm):
    """The draws are made on whole images, so the rank count changes only round-off."""
    _, ux, uy, _ = fixed
    model = ElasticityModel.on_grid(GRID, comm, ForwardSettings())
    try:
        m = simulate_measurement(model, _modulus(), np.random.default_rng(9), 35.0)
    finally:
        model.destroy()
    np.testing.assert_allclose(m.uy, uy, rtol=0, atol=1e-12 * np.abs(uy).max())
    n_serial = add_noise(ux, uy, free_dof_images_serial(), 35.0, np.random.default_rng(9))[1] - uy
    np.testing.assert_allclose(m.uy_noisy - m.uy, n_serial, rtol=1e-9, atol=1e-18)


def free_dof_images_serial():
    model = ElasticityModel.on_grid(GRID, MPI.COMM_SELF, ForwardSettings())
    try:
        return free_dof_images(model)
    finally:
        model.destroy()


@pytest.mark.parametrize("kwargs, message", [
    ({"snr_db": float("nan")}, "finite number of dB"),
    ({"noise_ratio": 0.0}, "noise ratio"),
    ({"noise_ratio": float("inf")}, "noise ratio"),
    ({"force_noise": -1.0}, "force noise"),
])
def test_bad_noise_settings_are_refused(fixed, kwargs, message):
    model, _, _, _ = fixed
    with pytest.raises(ValueError, match=message):
        simulate_measurement(model, _modulus(), np.random.default_rng(0), **kwargs)


def test_a_displacement_without_energy_has_no_snr():
    zero = np.zeros(GRID.shape)
    free = np.ones((2, *GRID.shape), dtype=bool)
    with pytest.raises(ValueError, match="no energy"):
        noise_std_for_snr(zero, zero, free, 35.0)
    with pytest.raises(ValueError, match="no free"):
        noise_std_for_snr(zero + 1, zero, ~free, 35.0)


# -- any number of components ----------------------------------------------------------------------

def test_the_two_dimensional_functions_are_the_generic_ones_on_two_components(fixed):
    """``add_noise`` draws exactly what ``draw_noise`` draws on the stacked components."""
    _, ux, uy, free = fixed
    uxn, uyn, sigma = add_noise(ux, uy, free, 35.0, np.random.default_rng(3), 2.0)
    noisy, sigma_generic = draw_noise(np.stack([ux, uy]), free, 35.0, np.random.default_rng(3),
                                      2.0)
    assert sigma == sigma_generic
    assert np.array_equal(noisy[0], uxn) and np.array_equal(noisy[1], uyn)
    assert measured_snr_db(ux, uy, uxn, uyn, free) == realised_snr_db(np.stack([ux, uy]), noisy,
                                                                      free)


def test_three_components_share_the_snr_with_lateral_noise_r_times_the_axial():
    rng = np.random.default_rng(8)
    u = rng.normal(size=(3, 6, 7, 5))          # (components, nodes...) in any layout
    free = np.ones(u.shape, dtype=bool)
    free[:, 0] = False                          # a support
    free[2, 1, 0, 0] = False                    # one more axial dof held
    sigma = component_noise_std(u, free, 30.0, noise_ratio=2.0)
    assert len(sigma) == 3
    assert sigma[0] == sigma[1] == pytest.approx(2.0 * sigma[2], rel=1e-15)
    counts = free.reshape(3, -1).sum(axis=1)
    energy = np.sum(u[free] ** 2)
    assert np.sum(counts * np.square(sigma)) == pytest.approx(energy / 10**3, rel=1e-13)
    assert noise_std_from_energy(energy, counts, 30.0, 2.0) == pytest.approx(sigma, rel=1e-13)
    noisy, drawn = draw_noise(u, free, 30.0, np.random.default_rng(1), 2.0)
    assert drawn == sigma
    assert np.array_equal(noisy[~free], u[~free])
    expected = u + np.random.default_rng(1).standard_normal(u.shape) * \
        np.asarray(sigma)[:, None, None, None] * free
    assert np.array_equal(noisy, expected)
    realised = [realised_snr_db(u, draw_noise(u, free, 30.0, rng)[0], free) for _ in range(20)]
    assert abs(np.mean(realised) - 30.0) < 0.3


def test_noise_std_from_energy_with_the_noisy_correction():
    """From the energy of ``u_m = u + n`` the expected ``‖u‖²(1 + 10^(−SNR/10))`` is undone."""
    counts, energy = (40, 40, 50), 2.5
    clean = noise_std_from_energy(energy, counts, 20.0)
    noisy = noise_std_from_energy(energy * 1.01, counts, 20.0, noisy=True)
    assert noisy == pytest.approx(clean, rel=1e-14)
    with pytest.raises(ValueError, match="no free displacement dofs"):
        noise_std_from_energy(1.0, (0, 0, 0), 20.0)
    with pytest.raises(ValueError, match="finite number of dB"):
        noise_std_from_energy(1.0, (3, 3), float("inf"))


def test_set_displacement_takes_every_form_of_a_displacement(fixed, comm):
    _, ux, uy, _ = fixed
    model = ElasticityModel.on_grid(GRID, comm, ForwardSettings())
    try:
        reference = fem.Function(model.V)
        set_displacement(model, (ux, uy), reference)
        for form in (reference, reference.x.petsc_vec, reference.x.array.copy(), [ux, uy]):
            out = fem.Function(model.V)
            set_displacement(model, form, out)
            assert np.array_equal(out.x.array, reference.x.array)
        out = fem.Function(model.V)
        with pytest.raises(ValueError, match="shape"):
            set_displacement(model, np.zeros(5), out)
        with pytest.raises(ValueError, match="u_m uy has shape"):
            set_displacement(model, (ux, uy[:-1]), out, name="u_m")
        bad = reference.x.array.copy()
        if comm.rank == comm.size - 1:
            bad[0] = np.inf
        with pytest.raises(ValueError, match="non-finite"):  # on every rank
            set_displacement(model, bad, out)
    finally:
        model.destroy()


@pytest.mark.parametrize("snr_db", [25.0, 35.0, 45.0])
@pytest.mark.parametrize("where", ["grid", "roi mesh"])
def test_the_noise_estimate_is_within_20_percent_of_the_true_sigma(snr_db, where):
    """``estimate_noise_std`` (local linear fits, robust scale) on simulated data whose ``σ``
    is known exactly, lateral noise twice the axial; 3 phantoms each (serial: no MPI here)."""
    from pathlib import Path

    from fenics_red.data import SimulationSettings, mesh_settings, simulate_sample
    from fenics_red.domain import Domain
    from fenics_red.measurements import estimate_noise_std

    common = dict(snr_db=snr_db, noise_ratio=2.0, seed=31)
    if where == "grid":
        settings = SimulationSettings(ImageGrid(48, 40, 1.2, 1.0), **common)
    else:
        path = Path(__file__).resolve().parents[1] / "meshes" / "roi-2d.msh"
        settings = mesh_settings(Domain.from_file(path, MPI.COMM_SELF).to_arrays(), **common)
    for index in range(3):
        sample = simulate_sample(index, settings)
        estimate = estimate_noise_std(settings.space, (sample.ux_noisy, sample.uy_noisy))
        for found, true in zip(estimate, sample.noise_std, strict=True):
            assert abs(found / true - 1.0) < 0.2, (estimate, sample.noise_std)


def test_the_noise_estimate_refuses_arrays_that_do_not_fit_the_mesh():
    from fenics_red.measurements import estimate_noise_std

    grid = ImageGrid(8, 6)
    with pytest.raises(ValueError, match="one per node"):
        estimate_noise_std(grid, (np.zeros(5), np.zeros(5)))
    with pytest.raises(ValueError, match="finite"):
        estimate_noise_std(grid, (np.full(grid.shape, np.nan), np.zeros(grid.shape)))
