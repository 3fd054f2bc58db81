"""Specification of data sets on meshes (format 2) and of the methods and evaluation on them.

A mesh data set stores the mesh and one value per node in the mesh's own order; every method of
the registry reconstructs it, the evaluation measures it through the raster, and the file is the
same whatever the number of ranks.
"""

import json
from pathlib import Path

from mpi4py import MPI

import h5py
import numpy as np
import pytest

from fenics_red.cli import main
from fenics_red.data import load_dataset, mesh_settings, simulate_dataset
from fenics_red.domain import Domain, MeshArrays
from fenics_red.evaluation import EvaluationSettings, evaluate
from fenics_red.methods import method_names

MESHES = Path(__file__).resolve().parents[1] / "meshes"


def _mesh(name: str, comm) -> MeshArrays:
    return Domain.from_file(MESHES / f"{name}.msh", comm).to_arrays()


@pytest.fixture(scope="module")
def sector_data(tmp_path_factory):
    """Four samples on the sector mesh at 35 dB (a shared folder, made once on every rank)."""
    comm = MPI.COMM_WORLD
    folder = comm.bcast(str(tmp_path_factory.mktemp("mesh-data")) if comm.rank == 0 else None)
    path = Path(folder) / "sector.h5"
    settings = mesh_settings(_mesh("sector-2d", comm), 2.0, snr_db=35.0, seed=11)
    simulate_dataset(path, 4, settings, comm, progress=False)
    return path


def test_a_mesh_data_set_stores_the_mesh_and_one_value_per_node(sector_data, comm):
    mesh = _mesh("sector-2d", comm)
    with load_dataset(sector_data) as data:
        assert data.format_version == 2
        assert data.value_shape == (len(mesh.points),)
        np.testing.assert_array_equal(data.mesh.points, mesh.points)
        np.testing.assert_array_equal(data.mesh.cells, mesh.cells)
        sample = data.sample(0)
        assert sample.E.shape == sample.ux_noisy.shape == sample.mask.shape == mesh.shape
        assert sample.mask.max() >= 1 and 0.1 <= sample.E.min() and sample.E.max() <= 0.8
        # each inclusion's nodes carry one modulus (sharp phantoms), stiffer than the background
        inside = sample.mask > 0
        assert sample.E[inside].min() > sample.E[~inside].max()
        # support nodes are held: no noise and no displacement there
        support = np.unique(data.mesh.support)
        assert np.all(sample.ux_noisy[support] == 0) and np.all(sample.uy[support] == 0)


def test_a_damaged_mesh_block_is_called_damaged(sector_data, mpi_tmp_path, comm):
    """Zeroed cells (a damaged file) were refused with the advice to remove the nodes that no
    cell uses; the fingerprint says the file is damaged."""
    import shutil

    copy = mpi_tmp_path / "damaged.h5"
    if comm.rank == 0:
        shutil.copy(sector_data, copy)
        with h5py.File(copy, "r+") as f:
            f["mesh/cells"][...] = 0
    comm.Barrier()
    with pytest.raises(ValueError, match="does not match its fingerprint mesh_sha256 "
                                         "\\(damaged file\\?\\)"):
        load_dataset(copy)


def test_mesh_data_sets_are_the_same_on_any_number_of_ranks(sector_data, mpi_tmp_path, comm):
    serial = mpi_tmp_path / "serial.h5"
    if comm.rank == 0:
        settings = mesh_settings(_mesh("sector-2d", MPI.COMM_SELF), 2.0, snr_db=35.0, seed=11)
        simulate_dataset(serial, 4, settings, MPI.COMM_SELF, progress=False)
    comm.Barrier()
    with h5py.File(serial) as a, h5py.File(sector_data) as b:
        for name in ("E", "ux_noisy", "uy_noisy", "mask", "noise_std", "mesh/points",
                     "mesh/cells"):
            np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)


@pytest.mark.parametrize("method", method_names())
def test_every_method_reconstructs_a_mesh_data_set(sector_data, mpi_tmp_path, comm, method):
    out = mpi_tmp_path / f"{method}.h5"
    assert main(["reconstruct", str(sector_data), "--method", method, "--all",
                 "--out", str(out), "--quiet"]) == 0
    with h5py.File(out) as f, load_dataset(sector_data) as data:
        estimates, truths = f["estimate"][...], f["truth"][...]
        assert estimates.shape == (4, *data.value_shape)
        assert np.all(estimates > 0)
        homogeneous = [np.linalg.norm(t - np.median(t)) / np.linalg.norm(t) for t in truths]
        errors = [np.linalg.norm(e - t) / np.linalg.norm(t) for e, t in zip(estimates, truths,
                                                                            strict=True)]
    # better than the best guess without data (the truth's own median), on every sample
    assert max(e / h for e, h in zip(errors, homogeneous, strict=True)) < 1.0, errors


def test_evaluation_of_a_mesh_data_set_measures_inside_the_field_of_view(sector_data,
                                                                          mpi_tmp_path, comm):
    out = mpi_tmp_path / "evaluation"
    settings = EvaluationSettings(methods=("ml", "denoised-ml"), samples=(0, 1), xdmf=True)
    summary = evaluate(sector_data, out, settings, comm, progress=False)
    # the relative RMSE is that of the raster images over the pixels inside the sector only
    from fenics_red.evaluation import read_estimate
    from fenics_red.raster import ValueRaster

    with load_dataset(sector_data) as data:
        raster = ValueRaster(data.mesh, data.grid)
        truth = raster.image(data.sample(1).E)[raster.mask]
    estimate = raster.image(read_estimate(out / "estimates" / "ml" / "sample_1.npz")[0])
    error = np.linalg.norm(estimate[raster.mask] - truth) / np.linalg.norm(truth)
    rows = json.loads((out / "metrics.json").read_text())["per_sample"]
    stored = next(r["relative_rmse"] for r in rows if r["sample"] == 1 and r["method"] == "ml")
    assert not raster.mask.all() and summary["ml"]["relative_rmse"]["count"] == 2
    assert abs(stored - error) <= 1e-12 * error
    assert (out / "figures" / "sample_0.png").exists()
    assert (out / "xdmf" / "sample_0.xdmf").exists() and (out / "xdmf" / "sample_0.h5").exists()


def test_show_draws_a_sample_of_a_mesh_data_set_through_its_raster(sector_data, mpi_tmp_path):
    out = mpi_tmp_path / "sample.png"
    assert main(["show", str(sector_data), "--sample", "2", "--out", str(out)]) == 0
    assert out.exists() and out.stat().st_size > 10_000
