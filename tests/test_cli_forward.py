"""Specification of ``fenics-red forward``: modulus image in, displacement images out."""

import json

import numpy as np
import pytest
from mpi4py import MPI

from fenics_red import ImageGrid, simulate_displacement
from fenics_red.cli import main


def _write(path, array):
    if MPI.COMM_WORLD.rank == 0:
        np.save(path, array)
    MPI.COMM_WORLD.Barrier()


def test_forward_writes_displacement_images_and_settings(mpi_tmp_path, rng):
    modulus = rng.uniform(0.1, 0.8, (7, 9))
    _write(mpi_tmp_path / "E.npy", modulus)
    out = mpi_tmp_path / "u.npz"
    assert main(["forward", "--modulus", str(mpi_tmp_path / "E.npy"), "--out", str(out),
                 "--nu", "0.45", "--traction", "0.002"]) == 0
    with np.load(out) as data:
        ux, uy = data["ux"], data["uy"]
        meta = json.loads(str(data["settings"]))
    assert ux.shape == uy.shape == (7, 9)
    assert meta["forward"]["nu"] == 0.45 and meta["grid"]["nx"] == 8
    from fenics_red import ForwardSettings

    _, uy_ref = simulate_displacement(modulus, ImageGrid.from_shape((7, 9)),
                                      ForwardSettings(nu=0.45, traction=0.002))
    np.testing.assert_allclose(uy, uy_ref, rtol=0, atol=1e-12 * np.abs(uy_ref).max())
    assert uy[0].mean() < 0 and np.all(uy[-1] == 0)  # pressed from the top, clamped bottom


@pytest.mark.parametrize("content, message", [
    (np.full((5, 6), np.nan), "non-finite"),
    (np.full((5, 6), -0.2), "strictly positive"),
    (np.ones(6), "2-D"),
    (b"this is not a numpy file", "cannot read"),
])
def test_forward_rejects_bad_input_with_a_clear_error(mpi_tmp_path, capsys, content, message):
    path = mpi_tmp_path / "bad.npy"
    if MPI.COMM_WORLD.rank == 0:
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            np.save(path, content)
    MPI.COMM_WORLD.Barrier()
    out = mpi_tmp_path / "u.npz"
    assert main(["forward", "--modulus", str(path), "--out", str(out)]) != 0
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_forward_reports_a_missing_file(mpi_tmp_path, capsys):
    assert main(["forward", "--modulus", str(mpi_tmp_path / "nope.npy"),
                 "--out", str(mpi_tmp_path / "u.npz")]) != 0
    assert "does not exist" in capsys.readouterr().err


def test_forward_never_overwrites_a_good_output_by_accident(mpi_tmp_path, capsys):
    _write(mpi_tmp_path / "E.npy", np.full((5, 6), 0.3))
    out = mpi_tmp_path / "u.npz"
    if MPI.COMM_WORLD.rank == 0:
        out.write_bytes(b"previous result")
    MPI.COMM_WORLD.Barrier()
    args = ["forward", "--modulus", str(mpi_tmp_path / "E.npy"), "--out", str(out)]
    assert main(args) != 0
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"previous result"
    assert main([*args, "--overwrite"]) == 0
    with np.load(out) as data:
        assert data["uy"].shape == (5, 6)
