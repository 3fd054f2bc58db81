"""Specification of ``fenics-red forward``: modulus image in, displacement images out."""

import json
from pathlib import Path

from mpi4py import MPI

import numpy as np
import pytest

from fenics_red import ImageGrid, simulate_displacement
from fenics_red.cli import main

MESHES = Path(__file__).resolve().parents[1] / "meshes"


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
    (b"this is not a numpy file", "is not a .npy array file"),
    (b"1.0 2.0\n3.0 4.0\n", "is not a .npy array file"),  # a text file named .npy
    (np.full((5, 6), 1e-320), "smallest normal number"),  # subnormal: u would overflow to inf
    (np.array([[0.2, 5e-324], [0.2, 0.2]]), "pixel (row 0, column 1) has 5e-324"),
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


def test_forward_on_a_gmsh_mesh_keeps_the_file_node_order(mpi_tmp_path):
    """``--mesh``: one modulus per node in the file's order in, ux, uy per node in that order
    out, equal to the independent reference code (``tests/reference_fe.py``) to round-off."""
    import meshio
    from reference_fe import facets_from_meshio, solve_elasticity

    mesh_path = MESHES / "roi-2d.msh"
    data = meshio.read(mesh_path)
    points = data.points[:, :2]
    modulus = 0.1 + 0.4 * np.exp(-((points[:, 0] - 20) ** 2 + (points[:, 1] - 15) ** 2) / 20)
    _write(mpi_tmp_path / "E.npy", modulus)
    out = mpi_tmp_path / "u.npz"
    assert main(["forward", "--mesh", str(mesh_path), "--modulus", str(mpi_tmp_path / "E.npy"),
                 "--out", str(out), "--traction", "0.002"]) == 0
    with np.load(out) as saved:
        u = np.column_stack([saved["ux"], saved["uy"]])
        np.testing.assert_allclose(saved["points"], points, rtol=0, atol=1e-12)
        meta = json.loads(str(saved["settings"]))
    assert meta["num_nodes"] == len(points) and meta["dim"] == 2
    reference = solve_elasticity(points, data.cells_dict["triangle"], modulus, nu=0.495,
                                 traction=[0.0, -0.002],
                                 load_facets=facets_from_meshio(data, "load"),
                                 support_facets=facets_from_meshio(data, "support"))
    assert np.linalg.norm(u - reference) <= 1e-10 * np.linalg.norm(reference)


@pytest.mark.parametrize("values, message", [
    (np.ones(10), "one value per node"),
    (np.ones((3, 4)), "one value per node"),
    ("nan", "node 0"),
])
def test_forward_on_a_mesh_rejects_moduli_that_do_not_fit_it(mpi_tmp_path, capsys, values,
                                                             message):
    n = 856  # nodes of meshes/box-3d.msh
    if isinstance(values, str):
        values = np.full(n, np.nan)
    _write(mpi_tmp_path / "E.npy", values)
    out = mpi_tmp_path / "u.npz"
    status = main(["forward", "--mesh", str(MESHES / "box-3d.msh"), "--modulus",
                   str(mpi_tmp_path / "E.npy"), "--out", str(out)], abort_on_error=False)
    assert status == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_forward_writes_uz_on_a_3d_mesh(mpi_tmp_path):
    _write(mpi_tmp_path / "E.npy", np.full(856, 0.2))
    out = mpi_tmp_path / "u.npz"
    assert main(["forward", "--mesh", str(MESHES / "box-3d.msh"), "--modulus",
                 str(mpi_tmp_path / "E.npy"), "--out", str(out)]) == 0
    with np.load(out) as saved:
        assert saved["uz"].shape == (856,) and saved["points"].shape == (856, 3)
        assert saved["uz"].min() < 0 and saved["uz"][saved["points"][:, 2] == 0].max() == 0


def test_forward_says_an_npz_archive_or_pickled_objects_are_not_a_npy_array(mpi_tmp_path,
                                                                            capsys):
    archive, objects = mpi_tmp_path / "archive.npy", mpi_tmp_path / "objects.npy"
    if MPI.COMM_WORLD.rank == 0:
        with open(archive, "wb") as fh:
            np.savez(fh, E=np.full((5, 6), 0.2))
        np.save(objects, np.array([[0.2, "x"]], dtype=object), allow_pickle=True)
    MPI.COMM_WORLD.Barrier()
    for path, message in ((archive, "holds an archive (.npz)"), (objects, "Python objects")):
        assert main(["forward", "--modulus", str(path), "--out",
                     str(mpi_tmp_path / "u.npz")]) == 2
        err = capsys.readouterr().err
        assert message in err and "pickled data when allow_pickle" not in err


def test_forward_refuses_an_image_too_large_for_the_memory_before_reading_it(
        mpi_tmp_path, capsys, monkeypatch):
    """A 5000² image needs far more than 8 GB in a direct solve: refused from the file's header
    (the data are never read: here the file is sparse, 200 MB of which none is on the disk)."""
    path = mpi_tmp_path / "huge.npy"
    if MPI.COMM_WORLD.rank == 0:
        with open(path, "wb") as fh:  # a (5001, 5001) float64 array of zeros, as a sparse file
            np.lib.format.write_array_header_1_0(
                fh, {"descr": "<f8", "fortran_order": False, "shape": (5001, 5001)})
            fh.truncate(fh.tell() + 5001 * 5001 * 8)
    MPI.COMM_WORLD.Barrier()
    monkeypatch.setenv("FENICS_RED_MEMORY_LIMIT", "8G")
    out = mpi_tmp_path / "u.npz"
    assert main(["forward", "--modulus", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "5001 x 5001 modulus image needs about" in err and "limit of 8 GB" in err
    assert not out.exists()
    # the same limit lets an ordinary image through
    _write(mpi_tmp_path / "E.npy", np.full((9, 9), 0.2))
    assert main(["forward", "--modulus", str(mpi_tmp_path / "E.npy"), "--out", str(out)]) == 0


def test_forward_on_a_mesh_refuses_a_mesh_too_large_for_the_memory(mpi_tmp_path, capsys,
                                                                  monkeypatch):
    _write(mpi_tmp_path / "E.npy", np.full(1105, 0.2))
    monkeypatch.setenv("FENICS_RED_MEMORY_LIMIT", "100M")  # below the solver's base estimate
    assert main(["forward", "--mesh", str(MESHES / "sector-2d.msh"), "--modulus",
                 str(mpi_tmp_path / "E.npy"), "--out", str(mpi_tmp_path / "u.npz")]) == 2
    assert "1105-node mesh needs about" in capsys.readouterr().err


def test_forward_on_a_mesh_refuses_a_subnormal_modulus(mpi_tmp_path, capsys):
    values = np.full(1105, 0.2)  # nodes of meshes/sector-2d.msh
    values[7] = 1e-320
    _write(mpi_tmp_path / "E.npy", values)
    assert main(["forward", "--mesh", str(MESHES / "sector-2d.msh"), "--modulus",
                 str(mpi_tmp_path / "E.npy"), "--out", str(mpi_tmp_path / "u.npz")]) == 2
    assert "node 7 (0-based, file order) has 1e-320" in capsys.readouterr().err


def test_forward_on_a_mesh_names_the_first_non_positive_node_as_a_plain_number(mpi_tmp_path,
                                                                                capsys):
    values = np.full(1105, 0.2)  # nodes of meshes/sector-2d.msh
    values[[5, 9]] = -0.5
    _write(mpi_tmp_path / "E.npy", values)
    assert main(["forward", "--mesh", str(MESHES / "sector-2d.msh"), "--modulus",
                 str(mpi_tmp_path / "E.npy"), "--out", str(mpi_tmp_path / "u.npz")]) == 2
    assert "node 5 (0-based, file order) has -0.5\n" in capsys.readouterr().err
