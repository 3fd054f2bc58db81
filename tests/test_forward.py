"""Specification of the forward model ``K(E) u = D(u) E = f`` (paper, equation 1).

Every test runs serially and under ``mpirun -n 2``.
"""

from mpi4py import MPI

import numpy as np
import pytest
from manufactured import manufactured_l2_error

import ufl
from dolfinx import fem
from fenics_red import (
    ElasticityModel,
    ForwardSettings,
    ImageGrid,
    NodalImage,
    simulate_displacement,
)

_GRID = ImageGrid(12, 9, 1.2, 0.9)


def _random_function(function, rng, grid=_GRID):
    """Fill a function with random values drawn as an image, so that all ranks agree."""
    images = NodalImage(function.function_space, grid)
    images.from_images(rng.uniform(-1.0, 1.0, (images.block_size, *grid.shape)),
                       function.x.array)
    return function


@pytest.mark.parametrize("plane", ["stress", "strain"])
def test_D_times_E_equals_K_times_u_to_round_off(comm, rng, plane):
    model = ElasticityModel.on_grid(_GRID, comm, ForwardSettings(plane=plane))
    model.set_modulus(rng.uniform(0.1, 0.8, _GRID.shape))
    u = _random_function(fem.Function(model.V), rng)

    K = model.assemble_K(apply_bcs=False)
    D = model.assemble_D(u)
    Ku, DE = K.createVecLeft(), D.createVecLeft()
    K.mult(u.x.petsc_vec, Ku)
    D.mult(model.E.x.petsc_vec, DE)

    assert D.getSize() == (2 * np.prod(_GRID.shape), np.prod(_GRID.shape))
    assert (DE - Ku).norm() / Ku.norm() < 1e-10


def test_D_with_supports_keeps_only_free_equations(comm, rng):
    model = ElasticityModel.on_grid(_GRID, comm)
    model.set_modulus(rng.uniform(0.1, 0.8, _GRID.shape))
    u = _random_function(fem.Function(model.V), rng)
    D = model.assemble_D(u, apply_bcs=True)
    DE = D.createVecLeft()
    D.mult(model.E.x.petsc_vec, DE)
    free = model.free_dofs
    assert np.all(DE.array[~free] == 0.0)
    assert np.linalg.norm(DE.array[free]) > 0
    # the clamped bottom row holds both components of nx+1 nodes
    n_fixed = comm.allreduce(int((~free).sum()), op=MPI.SUM)
    assert n_fixed == 2 * (_GRID.nx + 1)


@pytest.mark.parametrize("plane", ["stress", "strain"])
def test_homogeneous_block_under_uniform_compression_matches_analytical_solution(comm, plane):
    E0, nu, P = 0.35, 0.495, 2e-3
    settings = ForwardSettings(nu=nu, plane=plane, traction=P, support="sliding")
    model = ElasticityModel.on_grid(_GRID, comm, settings)
    model.solve(np.full(_GRID.shape, E0))
    ux, uy = model.displacement_images()

    if plane == "stress":
        eps_xx, eps_yy = nu * P / E0, -P / E0
    else:
        eps_xx, eps_yy = nu * (1 + nu) * P / E0, -(1 - nu**2) * P / E0
    x = np.linspace(0, _GRID.width, _GRID.nx + 1)[None, :]
    y = np.linspace(_GRID.height, 0, _GRID.ny + 1)[:, None]  # row 0 is the top edge
    scale = abs(eps_yy) * _GRID.height
    np.testing.assert_allclose(ux, eps_xx * x + 0 * y, atol=1e-12 * scale, rtol=0)
    np.testing.assert_allclose(uy, eps_yy * y + 0 * x, atol=1e-12 * scale, rtol=0)


def _manufactured_error(n: int, comm) -> float:
    """L2 error of u for a smooth modulus and displacement with the matching body force."""
    grid = ImageGrid(n, n)
    msh = grid.create_mesh(comm)
    x = ufl.SpatialCoordinate(msh)
    pi = np.pi
    E_exact = 1.0 + 0.5 * ufl.sin(pi * x[0]) * ufl.cos(pi * x[1])
    u_exact = ufl.as_vector([0.1 * ufl.sin(pi * x[0]) * ufl.sin(2 * pi * x[1]),
                             0.1 * ufl.cos(pi * x[0]) * x[1] ** 2])
    settings = ForwardSettings(nu=0.3, plane="stress", traction=0.0)
    return manufactured_l2_error(msh, E_exact, u_exact, settings, grid, quadrature_degree=8)


def test_manufactured_solution_converges_at_second_order_in_L2(comm):
    sizes = [8, 16, 32]
    errors = [_manufactured_error(n, comm) for n in sizes]
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert errors[-1] < 1e-3
    assert np.all(rates > 1.9), f"L2 errors {errors}, rates {rates}"


@pytest.mark.parametrize("space", ["scalar", "vector"])
def test_nodal_image_round_trip_is_exact(comm, rng, space):
    model = ElasticityModel.on_grid(_GRID, comm)
    V = model.Q if space == "scalar" else model.V
    images = NodalImage(V, _GRID)
    picture = rng.standard_normal((images.block_size, *_GRID.shape))
    function = fem.Function(V)
    images.from_images(picture, function.x.array)
    assert np.array_equal(images.to_images(function.x.array), picture)
    # ghosts were filled directly: a forward scatter changes nothing
    before = function.x.array.copy()
    function.x.scatter_forward()
    assert np.array_equal(function.x.array, before)


def test_image_rows_run_from_the_transducer_edge_down(comm):
    model = ElasticityModel.on_grid(_GRID, comm)
    off = 1e-14 * max(_GRID.height, _GRID.width)  # the interpolation's round-off (BLAS)
    model.E.interpolate(lambda p: p[1])  # E = y
    image = model.images("Q").to_image(model.E)
    np.testing.assert_allclose(image[0], _GRID.height)  # row 0 is the top, y = H
    np.testing.assert_allclose(image[-1], 0.0, atol=off)
    model.E.interpolate(lambda p: p[0])  # E = x
    image = model.images("Q").to_image(model.E)
    np.testing.assert_allclose(image[:, 0], 0.0, atol=off)  # column 0 is the left edge
    np.testing.assert_allclose(image[:, -1], _GRID.width)


@pytest.mark.usefixtures("several_ranks")
def test_displacement_is_identical_on_one_and_all_ranks(comm, rng):
    modulus = rng.uniform(0.1, 0.8, _GRID.shape)
    ux, uy = simulate_displacement(modulus, _GRID, comm=comm)
    ux1, uy1 = simulate_displacement(modulus, _GRID, comm=MPI.COMM_SELF)
    scale = np.abs(uy1).max()
    assert np.abs(ux - ux1).max() < 1e-10 * scale
    assert np.abs(uy - uy1).max() < 1e-10 * scale


def test_gamg_solver_with_rigid_body_modes_agrees_with_lu(comm, rng):
    modulus = rng.uniform(0.1, 0.8, _GRID.shape)
    _, uy_lu = simulate_displacement(modulus, _GRID, ForwardSettings(solver="lu"), comm)
    _, uy_mg = simulate_displacement(modulus, _GRID, ForwardSettings(solver="gamg"), comm)
    assert np.abs(uy_mg - uy_lu).max() < 1e-8 * np.abs(uy_lu).max()


def test_stiffness_is_reassembled_when_the_modulus_changes(comm):
    model = ElasticityModel.on_grid(_GRID, comm)
    uy_soft = model.displacement_images(model.solve(np.full(_GRID.shape, 0.1)))[1].copy()
    uy_stiff = model.displacement_images(model.solve(np.full(_GRID.shape, 0.2)))[1]
    np.testing.assert_allclose(uy_stiff, uy_soft / 2, atol=1e-12 * np.abs(uy_soft).max())


@pytest.mark.parametrize(
    "modulus, message",
    [(np.full((10, 13), np.nan), "non-finite"),
     (np.full((10, 13), -1.0), "strictly positive"),
     (np.zeros((10, 13)), "strictly positive"),
     (np.ones((4, 4)), "expected (10, 13)"),
     (np.ones(13), "an image of shape")])
def test_bad_modulus_is_rejected_with_a_clear_message(comm, modulus, message):
    model = ElasticityModel.on_grid(_GRID, comm)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model.set_modulus(modulus)


@pytest.mark.parametrize("kwargs", [{"nu": 0.5}, {"nu": float("nan")}, {"plane": "3d"},
                                    {"support": "glued"}, {"solver": "magic"},
                                    {"traction": float("inf")}])
def test_impossible_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        ForwardSettings(**kwargs)


@pytest.mark.parametrize("kwargs", [{"nx": 0, "ny": 3}, {"nx": 3, "ny": 3, "width": -1.0}])
def test_impossible_grids_are_rejected(kwargs):
    with pytest.raises(ValueError):
        ImageGrid(**kwargs)
