"""Specification of the 3-D data path: box grids whose nodes are voxels, 3-D phantoms in physical
coordinates, data sets with ``uz``, and the ML / Gauss-Newton estimates and evaluation on them.

Every test runs serially and under ``mpirun -n 2``.
"""

import h5py
import numpy as np
import pytest

from fenics_red.cli import main
from fenics_red.data import SimulationSettings, load_dataset, simulate_sample
from fenics_red.forward import ElasticityModel
from fenics_red.metrics import evaluate_metrics, ssim
from fenics_red.phantoms import SHAPES, PhantomSettings, random_phantom
from fenics_red.raster import ImageGrid, NodalImage, central_slice

BOX = ImageGrid(6, 5, 1.2, 1.0, nz=4, depth=0.8)


def test_a_box_grid_has_volumes_with_depth_first_and_the_top_face_at_index_0():
    assert BOX.shape == (5, 6, 7) and BOX.dim == 3
    assert BOX.spacing == pytest.approx((0.2, 0.2, 0.2))
    points = BOX.pixel_points()
    assert points.shape == (5 * 6 * 7, 3)
    assert points[0] == pytest.approx([0.0, 0.0, 0.8])  # voxel (0, 0, 0): top face, x = y = 0
    assert points[-1] == pytest.approx([1.2, 1.0, 0.0])
    np.testing.assert_array_equal(BOX.pixel_index(points), np.arange(len(points)))
    assert BOX.axial_plane() == ImageGrid(6, 4, 1.2, 0.8)


def test_voxel_images_round_trip_exactly_on_the_box_mesh(comm):
    from dolfinx import fem

    msh = BOX.create_mesh(comm)
    V = fem.functionspace(msh, ("Lagrange", 1, (3,)))
    raster = NodalImage(V, BOX)
    volumes = np.random.default_rng(0).standard_normal((3, *BOX.shape))
    u = fem.Function(V)
    raster.from_image(volumes, u)
    np.testing.assert_array_equal(raster.to_image(u), volumes)
    x = V.tabulate_dof_coordinates()[: V.dofmap.index_map.size_local]
    index = np.unravel_index(BOX.pixel_index(x), BOX.shape)
    np.testing.assert_array_equal(u.x.array[: 3 * len(x)].reshape(-1, 3)[:, 2],
                                  volumes[2][index])


@pytest.mark.parametrize("shape", SHAPES)
def test_3d_phantoms_of_every_shape_lie_inside_the_box_with_the_paper_s_moduli(shape):
    grid = ImageGrid(16, 16, nz=16)
    settings = PhantomSettings(shapes=(shape,), soft_edge=1.5, n_inclusions=(1, 3))
    E, labels = random_phantom(grid, np.random.default_rng(5), settings)
    again, _ = random_phantom(grid, np.random.default_rng(5), settings)
    np.testing.assert_array_equal(E, again)
    assert E.shape == labels.shape == grid.shape
    assert labels.max() >= 1
    for face in (labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[..., 0],
                 labels[..., -1]):
        assert not face.any()  # a one-cell margin to every face
    assert 0.10 <= E.min() and E.max() <= 0.80
    background = E[labels == 0]
    assert np.isclose(np.median(background), background.min())  # soft edges ramp upwards
    assert (E[labels > 0] > np.median(background)).all()


def test_a_sphere_phantom_is_round_in_physical_coordinates():
    grid = ImageGrid(24, 24, nz=24)
    _, labels = random_phantom(grid, np.random.default_rng(2),
                               PhantomSettings(shapes=("circle",), n_inclusions=(1, 1)))
    points = grid.pixel_points()[labels.ravel() > 0]
    radii = np.linalg.norm(points - points.mean(axis=0), axis=1)
    assert radii.max() <= 0.5 + 1.5 * grid.spacing[0]  # no wider than the field's third
    extent = points.max(axis=0) - points.min(axis=0)
    assert extent.max() - extent.min() <= 2 * grid.spacing[0] + 1e-12


def test_a_3d_sample_compresses_the_top_face_and_holds_the_bottom():
    grid = ImageGrid(8, 8, nz=8)
    sample = simulate_sample(0, SimulationSettings(grid, seed=3))
    assert sample.uz is not None and sample.uz_noisy.shape == grid.shape
    assert len(sample.noise_std) == 3
    assert sample.uz[0].mean() < 0  # the probe pushes the top face down
    np.testing.assert_array_equal(sample.uz[-1], 0.0)  # fixed support at the bottom
    model = ElasticityModel.on_grid(grid, __import__("mpi4py").MPI.COMM_SELF)
    try:
        model.set_modulus(sample.E)
        u = model.solve()
        np.testing.assert_allclose(model.images("V").to_image(u)[2], sample.uz, atol=1e-14)
    finally:
        model.destroy()


def test_simulate_writes_the_same_3d_data_set_on_any_number_of_ranks(comm, mpi_tmp_path):
    out = mpi_tmp_path / "box.h5"
    assert main(["simulate", "--samples", "3", "--grid", "6", "--grid-z", "5", "--seed", "4",
                 "--out", str(out), "--quiet"]) == 0
    with load_dataset(out) as data:
        assert data.value_shape == (6, 7, 7)
        assert data.read("uz_noisy").shape == (3, 6, 7, 7)
        assert data.read("noise_std").shape == (3, 3)
        assert data.attrs["nz"] == 5 and data.attrs["depth"] == pytest.approx(5 / 6)
        mine = data.read("uz_noisy")
    reference = simulate_sample(2, load_dataset(out).settings)
    np.testing.assert_allclose(mine[2], reference.uz_noisy, rtol=0, atol=1e-14)


@pytest.mark.slow
def test_ml_and_gauss_newton_tv_reconstruct_a_3d_inclusion_and_evaluate_writes_a_slice(
        comm, mpi_tmp_path):
    data = mpi_tmp_path / "box.h5"
    assert main(["simulate", "--samples", "1", "--grid", "11", "--grid-z", "11", "--seed", "1",
                 "--out", str(data), "--quiet", "--snr", "45"]) == 0
    out = mpi_tmp_path / "eval"
    assert main(["evaluate", str(data), "--methods", "ml,gn-tv", "--out", str(out),
                 "--quiet", "--figures", "1"]) == 0
    if comm.rank == 0:
        import json

        rows = json.loads((out / "metrics.json").read_text())["per_sample"]
        with load_dataset(data) as d:
            truth = d.sample(0).E
        flat = np.linalg.norm(truth - np.median(truth)) / np.linalg.norm(truth)
        for row in rows:  # better than the best homogeneous guess
            assert row["relative_rmse"] < 0.9 * flat, row
        assert (out / "figures" / "sample_0.png").stat().st_size > 0
        assert "x 11" in (out / "summary.md").read_text()


def test_a_3d_gmsh_mesh_takes_phantoms_and_ml_and_red_estimates_and_evaluate_reports_them(
        comm, mpi_tmp_path):
    """``simulate --mesh box-3d.msh``: 3-D phantoms on the voxel raster over the mesh, each node
    its nearest voxel; RED's 3-D denoiser sees the estimate through that raster; metrics on a
    raster at least SSIM's window wide (the mesh's own is 9 x 12 x 12 voxels)."""
    from pathlib import Path

    mesh = Path(__file__).resolve().parents[1] / "meshes" / "box-3d.msh"
    data = mpi_tmp_path / "box-mesh.h5"
    assert main(["simulate", "--mesh", str(mesh), "--samples", "1", "--seed", "4", "--snr", "45",
                 "--out", str(data), "--quiet"]) == 0
    with load_dataset(data) as d:
        assert d.grid.dim == 3 and d.value_shape == (856,)
        sample = d.sample(0)
    assert sample.uz_noisy.shape == (856,) and (sample.mask > 0).any()
    assert sample.E.max() > 1.5 * np.median(sample.E)  # an inclusion reached the nodes
    out = mpi_tmp_path / "eval"
    assert main(["evaluate", str(data), "--methods", "ml,red", "--out", str(out), "--quiet",
                 "--figures", "1"]) == 0
    if comm.rank == 0:
        import json

        rows = json.loads((out / "metrics.json").read_text())["per_sample"]
        with load_dataset(data) as d:
            truth = d.sample(0).E
        flat = np.linalg.norm(truth - np.median(truth)) / np.linalg.norm(truth)
        assert {row["method"] for row in rows} == {"ml", "red"}
        for row in rows:
            assert row["relative_rmse"] < flat and 0.0 < row["ssim"] <= 1.0, row
        assert (out / "figures" / "sample_0.png").stat().st_size > 0


def test_3d_ssim_is_one_for_equal_volumes_and_lower_for_a_shifted_one():
    grid = ImageGrid(16, 16, nz=16)
    E, labels = random_phantom(grid, np.random.default_rng(1),
                               PhantomSettings(n_inclusions=(2, 2), soft_edge=1.0))
    assert ssim(E, E) == pytest.approx(1.0)
    assert ssim(np.roll(E, 2, axis=1), E) < 0.95
    metrics = evaluate_metrics(E * 1.1, E, labels > 0)
    assert metrics["relative_rmse"] == pytest.approx(0.1)
    assert metrics["contrast_ratio_error"] == pytest.approx(0.0, abs=1e-12)


def test_the_figure_slice_is_the_elevation_with_most_inclusion():
    mask = np.zeros((4, 5, 6), dtype=bool)
    mask[1:3, 3, 2:4] = True
    assert central_slice(mask, mask.shape) == 3
    assert central_slice(None, mask.shape) == 2


def test_a_3d_data_set_with_a_flat_volume_is_refused_clearly(mpi_tmp_path, comm):
    out = mpi_tmp_path / "box.h5"
    assert main(["simulate", "--samples", "1", "--grid", "4", "--grid-z", "4",
                 "--out", str(out), "--quiet", "--min-size", "1"]) == 0
    comm.Barrier()
    if comm.rank == 0:
        with h5py.File(out, "r+") as f:
            del f["uz_noisy"]
    comm.Barrier()
    with pytest.raises(ValueError, match="uz_noisy"):
        load_dataset(out)


# -- RED in 3-D ------------------------------------------------------------------------------------

class _Oracle:
    """A 'denoiser' that knows the answer: C(E) = truth (a strong, smooth prior)."""

    def __init__(self, truth):
        self.truth = truth

    def __call__(self, volume):
        assert volume.shape == self.truth.shape
        return self.truth.copy()


def test_red_on_a_volume_pulls_towards_its_prior_and_keeps_the_data(comm):
    from fenics_red.red import REDReconstructor, REDSettings

    grid = ImageGrid(8, 8, nz=8)
    sample = simulate_sample(0, SimulationSettings(grid, seed=2, snr_db=45.0))
    # no misfit guard: with this heavy weight on the (oracle) prior the first step towards the
    # truth raises the refreshed misfit above the ML estimate's (2472 -> 2923 with the nodal bulk
    # part; the truth's is 1867), so the guard would end the loop at once
    settings = REDSettings(lam="lipschitz:0.1", start="ml", max_steps=100, rtol=1e-5,
                           min_misfit_decrease=0.0, misfit_guard=False)
    red = REDReconstructor(grid, settings=settings, denoiser=_Oracle(sample.E), comm=comm)
    try:
        estimate, _, info = red.run_sample(sample)
    finally:
        red.destroy()
    assert estimate.shape == sample.E.shape
    error = np.linalg.norm(estimate - sample.E) / np.linalg.norm(sample.E)
    assert error < 0.5 * info["ml_error"]


def test_a_2d_model_denoises_volumes_slice_by_slice_and_a_3d_model_refuses_images(
        mpi_tmp_path, comm):
    from fenics_red.denoiser import DEFAULT_3D_CONFIG, Denoiser, SliceWiseDenoiser, UNetConfig
    from fenics_red.red import load_denoiser

    two, three = mpi_tmp_path / "two.pt", mpi_tmp_path / "three.pt"
    if comm.rank == 0:
        Denoiser.untrained(UNetConfig(channels=4, depth=1)).save(two)
        Denoiser.untrained(DEFAULT_3D_CONFIG).save(three)
    comm.Barrier()
    assert isinstance(load_denoiser(two, dims=3), SliceWiseDenoiser)
    assert load_denoiser(three, dims=3).dims == 3
    with pytest.raises(ValueError, match="3-D denoiser but the data are 2-D"):
        load_denoiser(three, dims=2)


def test_the_denoised_ml_of_an_untrained_3d_denoiser_is_the_ml_estimate(mpi_tmp_path, comm):
    """Untrained = identity, exactly: the 3-D path adds nothing of its own to the ML estimate."""
    data = mpi_tmp_path / "box.h5"
    model = mpi_tmp_path / "three.pt"
    if comm.rank == 0:
        from fenics_red.denoiser import DEFAULT_3D_CONFIG, Denoiser

        Denoiser.untrained(DEFAULT_3D_CONFIG).save(model)
    comm.Barrier()
    assert main(["simulate", "--samples", "1", "--grid", "6", "--grid-z", "6", "--seed", "3",
                 "--out", str(data), "--quiet"]) == 0
    for method in ("ml", "denoised-ml"):
        extra = [] if method == "ml" else ["--denoiser", str(model)]
        assert main(["reconstruct", str(data), "--method", method, "--sample", "0", "--out",
                     str(mpi_tmp_path / f"{method}.h5"), "--quiet", *extra]) == 0
    comm.Barrier()
    with h5py.File(mpi_tmp_path / "ml.h5", "r") as a, \
            h5py.File(mpi_tmp_path / "denoised-ml.h5", "r") as b:
        assert a["estimate"].shape == (1, 7, 7, 7)
        np.testing.assert_allclose(b["estimate"][...], a["estimate"][...], rtol=1e-12)


def test_show_draws_a_3d_sample_on_the_slice_that_evaluate_draws(comm, mpi_tmp_path,
                                                                  monkeypatch):
    """``fenics-red show`` of a volume (a box grid, and a 3-D gmsh mesh through its voxel
    raster): the axial-lateral slice through the inclusions, ``ux`` and the axial ``uz``."""
    from pathlib import Path

    import matplotlib.axes

    drawn = []
    imshow = matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow",
                        lambda ax, image, **kw: (drawn.append(np.asarray(image)),
                                                 imshow(ax, image, **kw))[1])
    mesh = Path(__file__).resolve().parents[1] / "meshes" / "box-3d.msh"
    for name, space in (("grid", ["--grid", "6", "--grid-z", "5"]), ("mesh", ["--mesh",
                                                                             str(mesh)])):
        data, png = mpi_tmp_path / f"{name}.h5", mpi_tmp_path / f"{name}.png"
        assert main(["simulate", "--samples", "1", "--seed", "4", "--out", str(data), "--quiet",
                     *space]) == 0
        drawn.clear()
        assert main(["show", str(data), "--out", str(png)]) == 0
        if comm.rank == 0:
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            if name == "grid":
                with load_dataset(data) as d:
                    sample = d.sample(0)
                j = central_slice(sample.mask, sample.E.shape)
                expected = [sample.E[:, j, :], sample.ux[:, j, :], sample.ux_noisy[:, j, :],
                            sample.uz[:, j, :], sample.uz_noisy[:, j, :]]
                for image in expected:
                    assert any(np.array_equal(image, d) for d in drawn)
            assert all(d.ndim == 2 for d in drawn) and len(drawn) == 6
