"""The walk-throughs in demos/ run end to end at a tiny size (FENICS_RED_DEMO_SMALL=1)."""

import runpy
from pathlib import Path

import pytest

DEMOS = Path(__file__).resolve().parents[1] / "demos"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["paper_comparison.py", "red_lambda_rules.py",
                                  "ml_solvers.py", "red_3d.py", "uncertainty.py",
                                  "out_of_family.py", "red_start_check.py",
                                  "data_visibility.py"])
def test_demo_runs_at_a_small_size(name, mpi_tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FENICS_RED_DEMO_SMALL", "1")
    monkeypatch.setenv("FENICS_RED_DEMO_OUT", str(mpi_tmp_path))
    monkeypatch.setattr("sys.argv", [name])
    runpy.run_path(str(DEMOS / name), run_name="__main__")
    out = capsys.readouterr().out
    if name == "paper_comparison.py":
        from mpi4py import MPI

        if MPI.COMM_WORLD.rank == 0:
            assert "| 35 dB |" in out and "| red |" in out
            assert (mpi_tmp_path / "paper-tables.md").exists()
    elif name == "red_3d.py":
        from mpi4py import MPI

        if MPI.COMM_WORLD.rank == 0:
            assert "| red | slice-wise |" in out and "| gn-tv | - |" in out
            assert (mpi_tmp_path / "red-3d-table.md").exists()
    elif name == "uncertainty.py":
        from mpi4py import MPI

        if MPI.COMM_WORLD.rank == 0:
            assert "| gn-tikhonov |" in out and "| ml |" in out
            assert (mpi_tmp_path / "calibration.md").exists()
    elif name == "out_of_family.py":
        from mpi4py import MPI

        if MPI.COMM_WORLD.rank == 0:  # the baselines tuned on validation, then every method
            assert "| gn-tv | discrepancy_tau = 0.7, tv_delta = 1 |" in out
            assert "## voronoi, 35 dB" in out and "## rings, 35 dB" in out
            assert "| gn-tv (tuned) |" in out and "RED / better GN-TV (" in out
            assert (mpi_tmp_path / "out-of-family" / "tables.md").exists()
    elif name == "red_start_check.py":  # an identity denoiser: every ratio is 1, no fallback
        rows = [line for line in out.splitlines() if line.startswith("| val-")]
        assert len(rows) == 2 and "check 20: " in out
        assert all(row.endswith("| 1 |") and row.count("(0)") == 5 for row in rows), rows
    elif name == "data_visibility.py":
        from mpi4py import MPI

        if MPI.COMM_WORLD.rank == 0:  # the data's error along H's eigenvectors is N(0, 1/μ):
            # its mean χ² per direction (2 x 121 directions) is 1 within its spread when Γ is
            # the noise model that made the data
            rows = [line.split("|") for line in out.splitlines() if line.startswith("| small |")]
            assert len(rows) == 1 and 0.7 < float(rows[0][3]) < 1.3
            assert "| κ = 0.001 |" in out and "| ε = 0.15 |" in out  # part 2: the MAP sweep
    elif name == "ml_solvers.py":
        assert "| 16², 200 dB | cg |" in out and "| 16², 35 dB | fista |" in out
        assert "| 16², 60 dB | cg |" in out and "| 16², 200 dB | default (auto) |" in out
    else:
        assert "red balance:1" in out


def test_the_own_data_walk_through_goes_from_a_mat_file_to_a_figure_and_a_mat_in_kpa(
        mpi_tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FENICS_RED_DEMO_SMALL", "1")
    monkeypatch.setenv("FENICS_RED_DEMO_OUT", str(mpi_tmp_path))
    runpy.run_path(str(DEMOS / "own_data.py"), run_name="__main__")
    from mpi4py import MPI

    if MPI.COMM_WORLD.rank == 0:
        import numpy as np
        import scipy.io

        out = capsys.readouterr().out
        assert "absolute Young's modulus in kPa" in out and "relative modulus" in out
        folder = mpi_tmp_path / "own-data"
        result = scipy.io.loadmat(folder / "estimate-modulus.mat")
        assert str(result["E_unit"][0]) == "kPa"
        truth = np.load(folder / "truth-kPa.npy")
        E = result["E"].ravel()
        # the walk-through recovers the phantom: not a fixed number, a sanity bound
        assert np.linalg.norm(E - truth) / np.linalg.norm(truth) < 0.5
        assert (folder / "estimate-modulus.png").stat().st_size > 10_000
        assert (folder / "estimate-modulus-mesh.xdmf").exists()
