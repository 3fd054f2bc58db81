"""Specification of ``fenics-red simulate`` and ``fenics-red show``."""

from mpi4py import MPI

import numpy as np
import pytest

from fenics_red.cli import main
from fenics_red.data import load_dataset


def _simulate(out, *extra):
    return main(["simulate", "--samples", "3", "--grid", "10", "--grid-y", "8", "--snr", "30",
                 "--seed", "4", "--out", str(out), "--quiet", *extra])


def test_simulate_writes_a_data_set_with_the_requested_settings(mpi_tmp_path):
    out = mpi_tmp_path / "set.h5"
    assert _simulate(out, "--noise-ratio", "1.5", "--inclusions", "1", "2",
                     "--plane-strain") == 0
    with load_dataset(out) as data:
        assert len(data) == 3
        assert (data.grid.nx, data.grid.ny) == (10, 8)
        assert data.grid.height == pytest.approx(0.8)  # square cells by default
        s = data.settings
        assert (s.snr_db, s.noise_ratio, s.seed) == (30.0, 1.5, 4)
        assert s.forward.plane == "strain" and s.phantoms.n_inclusions == (1, 2)
        assert all(1 <= m.max() <= 2 for m in data.read("mask"))


def test_simulate_draws_the_family_asked_for_and_stores_it(mpi_tmp_path):
    out = mpi_tmp_path / "voronoi.h5"
    assert main(["simulate", "--samples", "2", "--grid", "16", "--family", "voronoi", "--seed",
                 "4", "--out", str(out), "--quiet"]) == 0
    paper = mpi_tmp_path / "paper.h5"
    assert main(["simulate", "--samples", "2", "--grid", "16", "--seed", "4", "--out",
                 str(paper), "--quiet"]) == 0
    with load_dataset(out) as data, load_dataset(paper) as other:
        assert data.settings.phantoms.family == "voronoi"
        assert other.settings.phantoms.family == "inclusions"
        masks = data.read("mask")
        edges = np.concatenate([masks[:, 0], masks[:, -1], masks[:, :, 0], masks[:, :, -1]])
        assert edges.any()  # Voronoi cells reach the field's edges; the paper's never do
        assert not np.concatenate([m[[0, -1]].ravel() for m in other.read("mask")]).any()


def test_simulate_is_reproducible_and_refuses_to_overwrite(mpi_tmp_path, capsys):
    first, second = mpi_tmp_path / "a.h5", mpi_tmp_path / "b.h5"
    assert _simulate(first) == 0 and _simulate(second) == 0
    with load_dataset(first) as a, load_dataset(second) as b:
        np.testing.assert_array_equal(a.read("uy_noisy"), b.read("uy_noisy"))
    assert _simulate(first) == 2
    assert "already exists" in capsys.readouterr().err
    assert _simulate(first, "--overwrite") == 0


@pytest.mark.parametrize("extra, message", [
    (["--snr", "nan"], "snr_db must be a finite number"),
    (["--noise-ratio", "-1"], "noise_ratio must be finite and > 0"),
    (["--masks", "/nonexistent/folder"], "does not exist"),
    (["--masks", ".", "--shapes", "circle", "--inclusions", "1", "2"],
     "--inclusions, --shapes shape the random phantoms, and --masks gives the inclusions"),
    (["--masks", ".", "--family", "rings"], "--family draws random phantoms and --masks gives "
                                            "them: choose one"),
    (["--grid-z", "4", "--masks", "."], "mask images (--masks) are 2-D; the phantoms of a 3-D "
                                        "grid or mesh come from the generator"),
])
def test_simulate_reports_impossible_settings(mpi_tmp_path, capsys, extra, message):
    assert _simulate(mpi_tmp_path / "x.h5", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (mpi_tmp_path / "x.h5").exists()


def test_show_plots_a_sample(mpi_tmp_path):
    data, fig = mpi_tmp_path / "set.h5", mpi_tmp_path / "sample.png"
    assert _simulate(data) == 0
    assert main(["show", str(data), "--sample", "2", "--out", str(fig)]) == 0
    if MPI.COMM_WORLD.rank == 0:
        assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_refuses_a_missing_sample_or_file(mpi_tmp_path, capsys):
    data = mpi_tmp_path / "set.h5"
    assert _simulate(data) == 0
    assert main(["show", str(data), "--sample", "3", "--out", str(mpi_tmp_path / "f.png")]) == 2
    assert "--sample 3 does not exist" in capsys.readouterr().err
    assert main(["show", str(mpi_tmp_path / "none.h5"), "--out",
                 str(mpi_tmp_path / "f.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [
    ("noise", "dataset 'noise_std' must be finite and > 0; sample 1 has [nan"),
    ("zero noise", "dataset 'noise_std' must be finite and > 0; sample 1 has [0.0"),
    ("negative", "dataset 'E' must be strictly positive; sample 1 has minimum"),
    ("displacement", "dataset 'uy_noisy' has 1 non-finite value(s) (NaN or inf), first in "
                     "sample 1 at row 3, column 4"),
])
def test_show_refuses_a_damaged_sample_and_says_what_is_wrong(mpi_tmp_path, capsys, edit,
                                                              message):
    """The same check of values as loading a data set, for the sample drawn (a NaN noise level
    was drawn as 'σ = nan', a zero one let through; a negative modulus was called 'all
    zero')."""
    import h5py

    data = mpi_tmp_path / "set.h5"
    assert _simulate(data) == 0
    if MPI.COMM_WORLD.rank == 0:
        with h5py.File(data, "r+") as f:
            if edit == "noise":
                f["noise_std"][1] = np.nan
            elif edit == "zero noise":
                f["noise_std"][1] = 0.0
            elif edit == "negative":
                f["E"][1] = -f["E"][1]
            else:
                f["uy_noisy"][1, 3, 4] = np.inf
    MPI.COMM_WORLD.Barrier()
    capsys.readouterr()
    assert main(["show", str(data), "--sample", "1", "--out", str(mpi_tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err
    if MPI.COMM_WORLD.rank == 0:
        assert message in err and "all zero" not in err
    assert not (mpi_tmp_path / "f.png").exists()
    # a damaged sample keeps no other from being drawn
    assert main(["show", str(data), "--sample", "2", "--out", str(mpi_tmp_path / "f.png")]) == 0

