"""Specification of the raster: the one conversion between nodal fields and images.

Exact copies on grid meshes (see also ``test_forward.py``); on any other 2-D or 3-D mesh, sampling
at the pixels (voxels) with a mask of pixels outside, a bilinear (trilinear) way back and an exact
adjoint. The same images on 1 and 2 ranks.
"""

from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest

from dolfinx import fem
from fenics_red.domain import Domain
from fenics_red.raster import ImageGrid, NodalImage, PointRaster, raster_for, validate_image

MESHES = Path(__file__).resolve().parents[1] / "meshes"


def _raster(name: str, comm, spacing=None):
    domain = Domain.from_file(MESHES / f"{name}.msh", comm)
    Q = fem.functionspace(domain.mesh, ("Lagrange", 1))
    return domain, Q, raster_for(Q, domain, spacing)


def _smooth(x, y):
    return 1.0 + 0.5 * np.sin(x / 6.0) * np.cos(y / 9.0)


def test_grid_domains_get_the_exact_raster(comm):
    grid = ImageGrid(5, 4)
    domain = Domain.rectangle(grid, comm)
    Q = fem.functionspace(domain.mesh, ("Lagrange", 1))
    raster = raster_for(Q, domain)
    assert type(raster) is NodalImage and raster.mask.all()
    image = np.arange(np.prod(grid.shape), dtype=float).reshape(grid.shape)
    values = raster.from_images(image, np.empty(len(Q.tabulate_dof_coordinates())))
    assert np.array_equal(raster.to_images(values)[0], image)


def test_sampling_reproduces_linear_fields_exactly_inside_the_mesh(comm):
    domain, Q, raster = _raster("roi-2d", comm)
    assert isinstance(raster, PointRaster)
    f = fem.Function(Q)
    f.interpolate(lambda p: 2.0 + 0.3 * p[0] - 0.1 * p[1])
    image = raster.to_image(f)
    x, y = raster.grid.pixel_points().T
    inside = raster.mask.ravel()
    assert inside.all()  # the rectangle fills its bounding box
    np.testing.assert_allclose(image.ravel(), 2.0 + 0.3 * x - 0.1 * y, rtol=0, atol=1e-10)
    # and the bilinear way back is exact for linear fields too
    back = raster.from_images(image, np.empty_like(f.x.array))
    np.testing.assert_allclose(back, f.x.array, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["roi-2d", "sector-2d"])
def test_round_trip_error_of_smooth_fields_falls_with_the_pixel_size(comm, name):
    """Nodes -> image -> nodes on a fixed mesh: the bilinear way back of a P1 field (kinks at the
    cell edges, and the boundary of the sector) converges at first order in the pixel size
    (measured in docs/raster.md: max error 0.0108 -> 0.0009 on the ROI from 2 to 0.25 mm)."""
    errors = []
    for spacing in (2.0, 1.0, 0.5):
        _, Q, raster = _raster(name, comm, spacing)
        f = fem.Function(Q)
        f.interpolate(lambda p: _smooth(p[0], p[1]))
        back = raster.from_images(raster.to_images(f.x.array), np.empty_like(f.x.array))
        n = Q.dofmap.index_map.size_local
        local = np.abs(back[:n] - f.x.array[:n]).max(initial=0.0)
        errors.append(comm.allreduce(local, op=MPI.MAX))
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert errors[-1] < 0.04
    assert rates.min() > 0.5, (errors, rates)


def test_sector_pixels_outside_the_field_of_view_are_masked_and_filled(comm):
    _, Q, raster = _raster("sector-2d", comm)
    inside = raster.mask
    hx, hy = raster.grid.spacing
    area = np.pi / 6.0 * (60.0**2 - 20.0**2)  # half the opening angle (60 degrees) times R² - r²
    assert abs(inside.sum() * hx * hy - area) < 0.05 * area
    assert not inside[0, 0] and not inside[-1, 0] and inside[inside.shape[0] // 2,
                                                              inside.shape[1] // 2]
    f = fem.Function(Q)
    f.x.array[:] = 3.0
    image = raster.to_image(f)
    np.testing.assert_allclose(image, 3.0, rtol=1e-12)  # outside pixels filled from inside


def _assert_adjoint(raster, Q, comm, rng) -> None:
    """``<S v, w> = <v, Sᵀ w>`` to round-off for random nodal ``v`` and image ``w``."""
    n_owned = Q.dofmap.index_map.size_local
    v = fem.Function(Q)
    raster.from_images(rng.uniform(size=raster.grid.shape), v.x.array)  # same on every rank
    w = rng.uniform(size=raster.grid.shape)
    lhs = float(np.sum(raster.to_images(v.x.array) * w))
    adjoint = raster.adjoint_images(w, np.zeros_like(v.x.array))
    rhs = comm.allreduce(float(adjoint[:n_owned] @ v.x.array[:n_owned]), op=MPI.SUM)
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)


@pytest.mark.parametrize("name", ["roi-2d", "sector-2d"])
def test_adjoint_is_the_transpose_of_the_raster(comm, rng, name):
    _, Q, raster = _raster(name, comm)
    _assert_adjoint(raster, Q, comm, rng)


def test_rasters_agree_on_one_and_on_all_ranks(comm):
    _, Q, raster = _raster("sector-2d", comm)
    f = fem.Function(Q)
    f.interpolate(lambda p: _smooth(p[0], p[1]))
    image = raster.to_image(f)
    _, Q1, serial = _raster("sector-2d", MPI.COMM_SELF)
    g = fem.Function(Q1)
    g.interpolate(lambda p: _smooth(p[0], p[1]))
    np.testing.assert_allclose(image, serial.to_image(g), rtol=1e-13, atol=1e-13)
    assert np.array_equal(raster.mask, serial.mask)


def test_a_3d_mesh_gets_a_voxel_raster_that_reproduces_linear_fields_exactly(comm):
    domain, Q, raster = _raster("box-3d", comm)
    assert isinstance(raster, PointRaster) and raster.grid.dim == 3
    assert raster.grid.extent == pytest.approx((30.0, 30.0, 20.0))
    f = fem.Function(Q)
    f.interpolate(lambda p: 2.0 + 0.3 * p[0] - 0.1 * p[1] + 0.05 * p[2])
    volume = raster.to_image(f)
    assert volume.shape == raster.grid.shape and raster.mask.all()  # the box fills its box
    x, y, z = raster.grid.pixel_points().T
    np.testing.assert_allclose(volume.ravel(), 2.0 + 0.3 * x - 0.1 * y + 0.05 * z, atol=1e-10)
    # voxel 0 is the top face's corner x = y = 0, z = 20 (axis 0 counts down from the probe)
    assert volume[0, 0, 0] == pytest.approx(2.0 + 0.05 * 20.0)
    # the trilinear way back is exact for linear fields too
    back = raster.from_images(volume, np.empty_like(f.x.array))
    np.testing.assert_allclose(back, f.x.array, rtol=0, atol=1e-10)


def test_the_3d_adjoint_is_the_transpose_and_the_raster_is_the_same_on_all_ranks(comm, rng):
    _, Q, raster = _raster("box-3d", comm, spacing=4.0)
    _assert_adjoint(raster, Q, comm, rng)
    f = fem.Function(Q)
    f.interpolate(lambda p: _smooth(p[0], p[1]) * (1.0 + 0.01 * p[2]))
    _, Q1, serial = _raster("box-3d", MPI.COMM_SELF, spacing=4.0)
    g = fem.Function(Q1)
    g.interpolate(lambda p: _smooth(p[0], p[1]) * (1.0 + 0.01 * p[2]))
    # a voxel on a facet shared by two cells takes the cell its rank found: round-off apart
    np.testing.assert_allclose(raster.to_image(f), serial.to_image(g), rtol=1e-11, atol=1e-11)


def test_pixel_indices_and_image_coordinates_agree_in_2d_and_3d():
    for grid in (ImageGrid(4, 3, 2.0, 1.5, 1.0, -1.0),
                 ImageGrid(4, 3, 2.0, 1.5, 1.0, -1.0, nz=5, depth=2.5, z0=3.0)):
        points = grid.pixel_points()
        np.testing.assert_allclose(
            grid.image_coordinates(points),
            np.column_stack(np.unravel_index(np.arange(len(points)), grid.shape)), atol=1e-12)
        assert np.array_equal(grid.pixel_index(points), np.arange(len(points)))
        with pytest.raises(ValueError, match="outside"):
            grid.pixel_index(points[:1] - 1.0)


def test_a_grid_covering_a_3d_box_is_3d_with_cubic_voxels():
    grid = ImageGrid.covering([0.0, 0.0, -2.0], [30.0, 20.0, 8.0], 2.5)
    assert (grid.nx, grid.ny, grid.nz) == (12, 8, 4)
    assert grid.origin == (0.0, 0.0, -2.0) and grid.extent == (30.0, 20.0, 10.0)
    assert ImageGrid.covering([0.0, 0.0], [3.0, 2.0], 1.0).dim == 2


def test_a_non_positive_modulus_image_is_named_by_pixel_and_plain_numbers():
    image = np.full((4, 5), 2.0)
    image[1, 3], image[2, 0] = -1.5, -4.0
    with pytest.raises(ValueError) as error:
        validate_image(image, (4, 5), "modulus image", positive=True)
    message = str(error.value)
    assert "found -1.5 at" in message and "(minimum -4.0)" in message, message
