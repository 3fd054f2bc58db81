"""Specification of the evaluation suite and ``fenics-red evaluate``/``demo``."""

import csv
import json

import numpy as np
import pytest
from mpi4py import MPI

from fenics_red.cli import main
from fenics_red.data import SimulationSettings, load_dataset, simulate_dataset
from fenics_red.evaluation import EvaluationSettings, evaluate, read_estimate
from fenics_red.grid import ImageGrid
from fenics_red.metrics import relative_rmse

GRID = ImageGrid(16, 16)
METHODS = ("gn-tikhonov", "ml")


@pytest.fixture
def dataset(mpi_tmp_path, comm):
    return simulate_dataset(mpi_tmp_path / "data.h5", 3, SimulationSettings(GRID, seed=3), comm,
                            progress=False)


def test_evaluate_writes_metrics_tables_and_figures(dataset, mpi_tmp_path, comm):
    out = mpi_tmp_path / "eval"
    summary = evaluate(dataset, out, EvaluationSettings(METHODS, xdmf=True), comm,
                       progress=False)
    assert set(summary) == set(METHODS)
    with open(out / "metrics.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 3 * len(METHODS)
    # the table's numbers are those of the stored estimates
    with load_dataset(dataset) as data:
        errors = [relative_rmse(read_estimate(out / "estimates" / "ml" / f"sample_{i}.npz")[0],
                                data.sample(i).E) for i in range(3)]
    stored = [float(r["relative_rmse"]) for r in rows if r["method"] == "ml"]
    np.testing.assert_allclose(stored, errors, rtol=1e-5)
    assert summary["ml"]["relative_rmse"]["mean"] == pytest.approx(np.mean(errors), rel=1e-12)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["ml"]["relative_rmse"]["count"] == 3
    assert "| gn-tikhonov |" in (out / "summary.md").read_text()
    for i in range(3):
        for name in (f"figures/sample_{i}.png", f"figures/profile_{i}.png",
                     f"xdmf/sample_{i}.xdmf", f"xdmf/sample_{i}.h5"):
            assert (out / name).stat().st_size > 0, name


def test_an_interrupted_evaluation_reuses_its_finished_runs(dataset, mpi_tmp_path, comm):
    out = mpi_tmp_path / "eval"
    settings = EvaluationSettings(("ml",), samples=(0, 2), figures=False)
    evaluate(dataset, out, settings, comm, progress=False)
    stamp = (out / "estimates" / "ml" / "sample_0.npz").stat().st_mtime_ns
    more = EvaluationSettings(("ml",), samples=(0, 1, 2), figures=False)
    summary = evaluate(dataset, out, more, comm, progress=False)
    assert (out / "estimates" / "ml" / "sample_0.npz").stat().st_mtime_ns == stamp
    assert summary["ml"]["relative_rmse"]["count"] == 3
    other = EvaluationSettings(("ml",), options={"ml": {"max_steps": 3}}, figures=False)
    with pytest.raises(ValueError, match="other settings of 'ml'.*--overwrite"):
        evaluate(dataset, out, other, comm, progress=False)
    evaluate(dataset, out, other, comm, progress=False, overwrite=True)
    _, stored, _ = read_estimate(out / "estimates" / "ml" / "sample_1.npz")
    assert stored["max_steps"] == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"methods": ()}, "at least one method"),
    ({"methods": ("ml", "magic")}, "unknown reconstruction method 'magic'"),
    ({"methods": ("ml", "ml")}, "listed twice"),
    ({"methods": ("ml",), "options": {"red": {}}}, "not evaluated"),
])
def test_impossible_evaluations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvaluationSettings(**kwargs)


def test_evaluate_command_line(dataset, mpi_tmp_path, capsys):
    out = mpi_tmp_path / "cli"
    assert main(["evaluate", str(dataset), "--methods", "ml", "--samples", "0-1", "--out",
                 str(out), "--figures", "1", "--quiet"]) == 0
    if MPI.COMM_WORLD.rank == 0:
        assert "| ml |" in capsys.readouterr().out
    assert (out / "figures" / "sample_0.png").exists()
    assert not (out / "figures" / "sample_1.png").exists()
    assert main(["evaluate", str(dataset), "--methods", "ml", "--samples", "7", "--out",
                 str(out), "--quiet"]) == 2
    assert "sample(s) [7] do not exist" in capsys.readouterr().err


def test_the_demo_runs_every_method_end_to_end(mpi_tmp_path, comm):
    """``make demo`` at a small size, with an untrained denoiser (the identity) saved to a file."""
    model = mpi_tmp_path / "identity.pt"
    if comm.rank == 0:
        from fenics_red.denoiser import Denoiser, UNetConfig

        Denoiser.untrained(UNetConfig(channels=4, depth=1)).save(model)
    comm.Barrier()
    out = mpi_tmp_path / "demo"
    assert main(["demo", "--grid", "12", "--out", str(out), "--denoiser", str(model),
                 "--quiet"]) == 0
    results = out / "results"
    metrics = json.loads((results / "metrics.json").read_text())
    assert list(metrics["summary"]) == ["gn-tikhonov", "gn-tv", "ml", "denoised-ml", "red"]
    ml = metrics["summary"]["ml"]["relative_rmse"]["mean"]
    # the identity denoiser leaves the ML estimate as it is
    assert metrics["summary"]["denoised-ml"]["relative_rmse"]["mean"] == pytest.approx(ml)
    for name in ("figures/sample_0.png", "figures/profile_0.png", "xdmf/sample_0.xdmf",
                 "summary.md", "metrics.csv"):
        assert (results / name).exists(), name
