"""The walk-throughs in demos/ run end to end at a tiny size (FENICS_RED_DEMO_SMALL=1)."""

import runpy
from pathlib import Path

import pytest

DEMOS = Path(__file__).resolve().parents[1] / "demos"


@pytest.mark.parametrize("name", ["paper_comparison.py", "red_lambda_rules.py"])
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
    else:
        assert "red balance:1" in out
