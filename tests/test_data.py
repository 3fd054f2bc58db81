"""Synthetic data sets: reproducible from a seed on any rank count, resumable, validated on load."""

from mpi4py import MPI

import h5py
import numpy as np
import pytest

from fenics_red.data import (
    IMAGE_DATASETS,
    SimulationSettings,
    load_dataset,
    simulate_dataset,
    simulate_sample,
)
from fenics_red.jobs import partial_path
from fenics_red.measurements import measured_snr_db
from fenics_red.raster import ImageGrid

GRID = ImageGrid(12, 10, 1.2, 1.0)
SETTINGS = SimulationSettings(GRID, snr_db=35.0, noise_ratio=2.0, seed=7)


def _stacks(path):
    with h5py.File(path, "r") as f:
        return {name: f[name][...] for name in (*IMAGE_DATASETS, "mask", "noise_std",
                                                "force_std", "done")}


@pytest.fixture
def reference(mpi_tmp_path, comm):
    """The 5-sample set simulated serially on rank 0 (the ground truth for MPI runs)."""
    path = mpi_tmp_path / "serial.h5"
    if comm.rank == 0:
        simulate_dataset(path, 5, SETTINGS, MPI.COMM_SELF, progress=False)
    comm.Barrier()
    return path


def test_a_data_set_holds_what_the_docstring_says(reference):
    with load_dataset(reference) as data:
        assert len(data) == 5
        assert data.grid == GRID
        assert data.settings == SETTINGS
        sample = data.sample(3)
        for name in IMAGE_DATASETS:
            assert getattr(sample, name).shape == (11, 13)
        assert sample.mask.max() >= 1 and sample.mask.min() == 0
        # the mask marks the inclusions: they are stiffer than the background
        assert sample.E[sample.mask > 0].min() > sample.E[sample.mask == 0].max()
        sx, sy = sample.noise_std
        assert sx == pytest.approx(2.0 * sy)
        attrs = data.attrs
        assert attrs["snr_db"] == 35.0 and attrs["seed"] == 7 and attrs["nu"] == 0.495
        assert attrs["fenics_red_version"]


def test_samples_do_not_depend_on_the_set_size_or_on_resimulation(reference):
    with load_dataset(reference) as data:
        stored = data.sample(2)
    again = simulate_sample(2, SETTINGS)
    for name in (*IMAGE_DATASETS, "mask"):
        np.testing.assert_array_equal(getattr(again, name), getattr(stored, name))


def test_the_realised_snr_is_near_the_target(reference):
    with load_dataset(reference) as data:
        for sample in data:
            snr = measured_snr_db(sample.ux, sample.uy, sample.ux_noisy, sample.uy_noisy,
                                  free=np.stack([sample.ux_noisy != sample.ux,
                                                 sample.uy_noisy != sample.uy]))
            assert abs(snr - 35.0) < 1.5  # 12x10 grid: ~200 free dofs, scatter ~0.4 dB


def test_the_same_seed_gives_bit_identical_files_on_any_number_of_ranks(reference,
                                                                        mpi_tmp_path, comm):
    path = simulate_dataset(mpi_tmp_path / "parallel.h5", 5, SETTINGS, comm, progress=False,
                            batch_size=2)
    if comm.rank == 0:
        serial, parallel = _stacks(reference), _stacks(path)
        for name, array in serial.items():
            np.testing.assert_array_equal(parallel[name], array, err_msg=name)


def test_an_interrupted_run_resumes_to_the_same_file(reference, mpi_tmp_path, comm):
    path = mpi_tmp_path / "resumed.h5"

    class Interrupt(Exception):
        pass

    def stop_after_first_batch(n_done):
        raise Interrupt(f"stopped after {n_done}")

    with pytest.raises(Interrupt):
        simulate_dataset(path, 5, SETTINGS, comm, progress=False, batch_size=1,
                         on_batch=stop_after_first_batch)
    assert not path.exists()
    partial = path.with_name(path.name + ".partial")
    assert partial.exists()
    with pytest.raises(ValueError, match="incomplete"):
        load_dataset(partial)
    comm.Barrier()  # every rank has closed the partial file before rank 0 reopens it
    done = []
    simulate_dataset(path, 5, SETTINGS, comm, progress=False, batch_size=1,
                     on_batch=done.append)
    assert done[0] > comm.size  # the first batch was not simulated again
    assert not partial.exists()
    if comm.rank == 0:
        resumed, serial = _stacks(path), _stacks(reference)
        for name, array in serial.items():
            np.testing.assert_array_equal(resumed[name], array, err_msg=name)


def test_an_interrupted_overwrite_is_continued_by_the_same_command(reference, mpi_tmp_path,
                                                                  comm):
    """``--overwrite`` resumes its own unfinished run (same settings) instead of starting again,
    as the interruption's message says; the old output stays until the new one is complete."""
    path = mpi_tmp_path / "replaced.h5"
    simulate_dataset(path, 5, SimulationSettings(GRID, snr_db=25.0, seed=7), comm,
                     progress=False)

    def stop(n_done):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate_dataset(path, 5, SETTINGS, comm, progress=False, batch_size=1, overwrite=True,
                         on_batch=stop)
    with load_dataset(path) as old:
        assert old.settings.snr_db == 25.0
    comm.Barrier()
    done = []
    simulate_dataset(path, 5, SETTINGS, comm, progress=False, batch_size=1, overwrite=True,
                     on_batch=done.append)
    assert done[0] > comm.size  # the first batch was not simulated again
    if comm.rank == 0:
        replaced, serial = _stacks(path), _stacks(reference)
        for name, array in serial.items():
            np.testing.assert_array_equal(replaced[name], array, err_msg=name)


def test_an_unreadable_partial_file_is_refused_and_discarded_by_overwrite(reference,
                                                                         mpi_tmp_path, comm):
    path = mpi_tmp_path / "broken.h5"
    if comm.rank == 0:
        partial_path(path).write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    comm.Barrier()
    with pytest.raises(ValueError, match="not a readable HDF5 file.*pass --overwrite"):
        simulate_dataset(path, 5, SETTINGS, comm, progress=False)
    simulate_dataset(path, 5, SETTINGS, comm, progress=False, overwrite=True)
    if comm.rank == 0:
        for name, array in _stacks(reference).items():
            np.testing.assert_array_equal(_stacks(path)[name], array, err_msg=name)


def test_a_partial_file_with_other_settings_is_not_resumed(mpi_tmp_path, comm):
    path = mpi_tmp_path / "mixed.h5"

    def stop(n_done):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate_dataset(path, 4, SETTINGS, comm, progress=False, batch_size=1, on_batch=stop)
    other = SimulationSettings(GRID, snr_db=25.0, noise_ratio=2.0, seed=7)
    with pytest.raises(ValueError, match=r"different settings \(snr_db: 35.0 in the file, 25.0"):
        simulate_dataset(path, 4, other, comm, progress=False)
    simulate_dataset(path, 4, other, comm, progress=False, overwrite=True)
    with load_dataset(path) as data:
        assert data.settings.snr_db == 25.0


def test_an_existing_output_is_never_silently_overwritten(reference, comm):
    before = reference.read_bytes() if comm.rank == 0 else None
    with pytest.raises(FileExistsError, match="already exists.*--overwrite"):
        simulate_dataset(reference, 5, SETTINGS, comm, progress=False)
    if comm.rank == 0:
        assert reference.read_bytes() == before


def test_masks_from_a_folder_become_the_inclusions(mpi_tmp_path, comm):
    folder = mpi_tmp_path / "masks"
    if comm.rank == 0:
        folder.mkdir()
        square = np.zeros((40, 48), dtype=bool)
        square[10:20, 8:20] = True
        two = np.zeros((40, 48), dtype=bool)
        two[5:15, 5:15] = two[25:35, 30:44] = True
        np.save(folder / "a_square.npy", square)
        np.save(folder / "b_two.npy", two)
    comm.Barrier()
    path = simulate_dataset(mpi_tmp_path / "masks.h5", 3, SETTINGS, comm, masks_dir=folder,
                            progress=False)
    with load_dataset(path) as data:
        labels = data.read("mask")
        assert [int(m.max()) for m in labels] == [1, 2, 1]  # masks used in name order, cycled
        assert data.attrs["n_masks"] == 2 and len(data.attrs["masks_sha256"]) == 64


def _corrupt_copy(source, target, edit):
    with h5py.File(source, "r") as src, h5py.File(target, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for name in src:
            src.copy(name, dst)
        edit(dst)


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.attrs.__setitem__("format", "something else"), "not a fenics-red data set"),
    (lambda f: f.attrs.__setitem__("format_version", 99), "format version 99"),
    (lambda f: f.__delitem__("uy_noisy"), "'uy_noisy' is missing"),
    (lambda f: f.attrs.__setitem__("n_samples", 6), r"shape \(5, 11, 13\), expected \(6, 11, 13\)"),
    (lambda f: f.attrs.__setitem__("nx", 20), r"has shape \(5, 11, 13\), expected \(5, 11, 21\)"),
    (lambda f: f["E"].__setitem__((1, 2, 3), np.nan), "non-finite.*sample 1 at row 2, column 3"),
    (lambda f: f["E"].__setitem__((4, 0, 0), -1.0), "strictly positive; sample 4"),
    (lambda f: f["done"].__setitem__(2, 0), "incomplete: 4 of 5"),
    (lambda f: f.attrs.__delitem__("snr_db"), "snr_db"),
    (lambda f: f["noise_std"].__setitem__((3, 1), 0.0), r"'noise_std' must be finite and > 0; "
                                                        "sample 3"),
    # a sigma below the data's round-off: 1/sigma² (and the methods' misfit targets) overflow
    (lambda f: f["noise_std"].__setitem__((2, 0), 1e-300),
     r"'noise_std' of sample 2 is 1e-300, below 1e-12 of its largest displacement \([\d.e-]+\) "
     "where double precision's round-off dominates: give the measurement's real noise level"),
])
def test_corrupt_or_mismatched_files_are_rejected_clearly(reference, mpi_tmp_path, comm, edit,
                                                          message):
    bad = mpi_tmp_path / "bad.h5"
    if comm.rank == 0:
        _corrupt_copy(reference, bad, edit)
    comm.Barrier()
    with pytest.raises(ValueError, match=message):
        load_dataset(bad)


def test_files_that_are_not_data_sets_are_rejected(mpi_tmp_path, comm):
    truncated = mpi_tmp_path / "truncated.h5"
    if comm.rank == 0:
        truncated.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    comm.Barrier()
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        load_dataset(truncated)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(mpi_tmp_path / "missing.h5")


@pytest.mark.parametrize("kwargs, message", [
    ({"snr_db": float("nan")}, "snr_db must be a finite number"),
    ({"noise_ratio": 0.0}, "noise_ratio must be finite and > 0"),
    ({"force_noise": -1.0}, "force_noise must be finite and >= 0"),
    ({"seed": -3}, r"seed must be an integer in \[0, 2\^63 - 1\]"),
])
def test_impossible_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimulationSettings(GRID, **kwargs)


def test_bad_sample_counts_are_refused(mpi_tmp_path, comm):
    with pytest.raises(ValueError, match="positive integer"):
        simulate_dataset(mpi_tmp_path / "x.h5", 0, SETTINGS, comm, progress=False)


def test_outputs_get_the_permissions_of_any_new_file(tmp_path):
    """Written through a temporary file, an output is still readable by the group (umask)."""
    import os

    from fenics_red.io import atomic_output

    umask = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "out.txt") as tmp:
            tmp.write_text("result\n")
        assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


def test_a_grid_data_set_stores_its_mesh_with_the_pixels_as_nodes(reference):
    from fenics_red.domain import MeshArrays

    with h5py.File(reference, "r") as f:
        assert f.attrs["format_version"] == 2 and f.attrs["layout"] == "grid"
        stored = MeshArrays(*(f[f"mesh/{name}"][...] for name in
                              ("points", "cells", "load", "support")))
    np.testing.assert_allclose(stored.points, GRID.pixel_points(), rtol=0, atol=1e-12)
    assert len(stored.cells) == 2 * GRID.nx * GRID.ny
    assert np.allclose(stored.points[np.unique(stored.load), 1], GRID.height)
    assert np.allclose(stored.points[np.unique(stored.support), 1], 0.0)


def test_format_1_files_without_a_mesh_still_read(reference, mpi_tmp_path, comm):
    old = mpi_tmp_path / "version1.h5"
    if comm.rank == 0:
        with h5py.File(reference, "r") as source, h5py.File(old, "w") as target:
            for name in source:
                if name != "mesh":
                    source.copy(name, target)
            target.attrs.update({k: v for k, v in source.attrs.items()
                                 if k not in ("layout", "mesh_sha256")})
            target.attrs["format_version"] = 1
    comm.Barrier()
    with load_dataset(old) as data, load_dataset(reference) as new:
        assert data.format_version == 1 and data.mesh is None
        np.testing.assert_array_equal(data.sample(2).E, new.sample(2).E)
