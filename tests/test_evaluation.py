"""Specification of the evaluation suite and ``fenics-red evaluate``/``demo``."""

import csv
import json
import warnings

from mpi4py import MPI

import numpy as np
import pytest

from fenics_red.cli import main
from fenics_red.data import SimulationSettings, load_dataset, simulate_dataset
from fenics_red.evaluation import EvaluationSettings, evaluate, read_estimate
from fenics_red.metrics import relative_rmse
from fenics_red.raster import ImageGrid

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
    assert not list(out.rglob(".*")), "a temporary file of an atomic output is left over"


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


def test_json_records_are_strict_json_of_plain_values():
    import math
    from pathlib import Path

    from fenics_red.io import plain, to_json

    value = {"b": (1, np.int64(2)), "a": [np.float64(math.nan), math.inf], "c": Path("x"),
             "d": b"y", "e": np.array([0.5]), 3: np.bool_(True), "f": object}
    assert json.loads(to_json(value)) == {"a": [None, None], "b": [1, 2], "c": "x", "d": "y",
                                          "e": [0.5], "3": True, "f": str(object)}
    assert to_json({"b": 1, "a": 2}) == '{"a": 2, "b": 1}'
    assert to_json({"b": 1, "a": 2}, sort_keys=False) == '{"b": 1, "a": 2}'
    # values read from files keep what they are (NaN stays a number)
    assert math.isnan(plain(np.float64(math.nan))) and plain(b"x") == "x"
    assert plain(object) is object


def _skips_metrics(out, caught, comm):
    """The checks of an evaluation without truth: a warning (rank 0), estimates and their
    figures, no metrics and no truth panel."""
    messages = [str(w.message) for w in caught if "metrics and truth figures skipped" in
                str(w.message)]
    assert len(messages) == (1 if comm.rank == 0 else 0)
    assert not (out / "metrics.csv").exists() and not (out / "metrics.json").exists()
    assert "No metrics:" in (out / "summary.md").read_text()
    for name in ("figures/sample_0.png", "figures/profile_0.png", "xdmf/sample_0.xdmf"):
        assert (out / name).stat().st_size > 0, name
    assert 'Name="truth"' not in (out / "xdmf" / "sample_0.xdmf").read_text()
    assert 'Name="ml"' in (out / "xdmf" / "sample_0.xdmf").read_text()


def test_without_truth_metrics_are_skipped_and_estimates_written(dataset, mpi_tmp_path, comm):
    out = mpi_tmp_path / "eval"
    evaluate(dataset, out, EvaluationSettings(("ml",), samples=(0, 1), figures=False), comm,
             progress=False)
    assert (out / "metrics.csv").exists()
    stamp = (out / "estimates" / "ml" / "sample_0.npz").stat().st_mtime_ns
    settings = EvaluationSettings(("ml",), samples=(0, 1), xdmf=True, truth=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = evaluate(dataset, out, settings, comm, progress=False)
    assert summary == {}
    _skips_metrics(out, caught, comm)  # the earlier metrics are removed, not left stale
    assert "truth is turned off" in (out / "summary.md").read_text()
    # the runs made with the truth are reused (its use changes no estimate)
    assert (out / "estimates" / "ml" / "sample_0.npz").stat().st_mtime_ns == stamp


def test_a_data_set_without_truth_is_evaluated_without_metrics(dataset, mpi_tmp_path, comm,
                                                               capsys):
    """A real measurement: the simulated data set without its ``E`` and ``mask``."""
    import h5py

    measured = mpi_tmp_path / "measured.h5"
    if comm.rank == 0:
        with h5py.File(dataset, "r") as source, h5py.File(measured, "w") as target:
            target.attrs.update(source.attrs)
            for name in source:
                if name not in ("E", "mask"):
                    source.copy(name, target)
    comm.Barrier()
    with load_dataset(measured) as data:
        assert not data.has_truth and data.sample(0).E is None
    out = mpi_tmp_path / "eval"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = evaluate(measured, out, EvaluationSettings(("ml",), samples=(0,), xdmf=True),
                           comm, progress=False)
    assert summary == {}
    _skips_metrics(out, caught, comm)
    assert "no true modulus" in (out / "summary.md").read_text()
    assert read_estimate(out / "estimates" / "ml" / "sample_0.npz")[0].shape == GRID.shape
    capsys.readouterr()
    assert main(["evaluate", str(measured), "--methods", "ml", "--samples", "0", "--out",
                 str(out), "--quiet"]) == 0
    if comm.rank == 0:
        printed = capsys.readouterr().out
        assert "| ml |" not in printed and "estimates/, summary.md" in printed


@pytest.mark.parametrize("kwargs, message", [
    ({"methods": ()}, "at least one method"),
    ({"methods": ("ml", "magic")}, "unknown reconstruction method 'magic'"),
    ({"methods": ("ml", "ml")}, "listed twice"),
    ({"methods": ("ml",), "options": {"red": {}}}, "not evaluated"),
    ({"methods": ("ml",), "xdmf": True, "figure_limit": 0}, "--figures 0 leaves none"),
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
    assert "sample(s) 7 do not exist" in capsys.readouterr().err
    # an unknown method is named first, not a flag that no listed method takes
    assert main(["evaluate", str(dataset), "--methods", "foo", "--max-steps", "2", "--out",
                 str(out), "--quiet"]) == 2
    assert "unknown reconstruction method 'foo'" in capsys.readouterr().err


def test_the_demo_runs_every_method_end_to_end(mpi_tmp_path, comm):
    """``make demo`` at a small size, with an untrained denoiser (the identity) saved to a file."""
    from fenics_red.denoiser import save_identity

    model = save_identity(mpi_tmp_path / "identity.pt", comm)
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


def test_overwrite_never_deletes_a_folder_that_is_not_an_evaluation(dataset, mpi_tmp_path,
                                                                      comm):
    out = mpi_tmp_path / "mine"
    if comm.rank == 0:
        (out / "figures").mkdir(parents=True)
        (out / "figures" / "plot.png").write_bytes(b"precious")
        (out / "summary.md").write_text("my notes")
    comm.Barrier()
    settings = EvaluationSettings(("ml",), samples=(0,), figures=False)
    with pytest.raises(FileExistsError, match="not an evaluation folder"):
        evaluate(dataset, out, settings, comm, progress=False, overwrite=True)
    assert (out / "figures" / "plot.png").read_bytes() == b"precious"
    assert (out / "summary.md").read_text() == "my notes"


def test_an_evaluation_is_not_resumed_on_data_changed_in_place(dataset, mpi_tmp_path, comm):
    import h5py

    out = mpi_tmp_path / "eval"
    settings = EvaluationSettings(("ml",), samples=(0,), figures=False)
    evaluate(dataset, out, settings, comm, progress=False)
    comm.Barrier()  # every rank has closed the data set (HDF5 refuses a writer beside readers)
    if comm.rank == 0:
        with h5py.File(dataset, "r+") as f:  # same attributes, other values
            f["uy_noisy"][0] *= 1.01
    comm.Barrier()
    with pytest.raises(ValueError, match="values changed since the data set"):
        evaluate(dataset, out, settings, comm, progress=False)


def test_the_summary_says_which_metric_values_were_left_out():
    from fenics_red.evaluation import summarise, summary_table
    from fenics_red.metrics import METRIC_NAMES

    rows = [{"method": "ml", **dict.fromkeys(METRIC_NAMES, 1.0)} for _ in range(3)]
    rows[1]["cnr_db"] = float("nan")
    summary = summarise(rows, ["ml"])
    assert summary["ml"]["cnr_db"] == {"mean": 1.0, "std": 0.0, "count": 2, "non_finite": 1}
    table = summary_table(summary, ["ml"])
    assert "(2 of 3)†" in table and "left out" in table


def test_a_baseline_that_missed_its_discrepancy_target_is_named_in_the_summary(dataset,
                                                                              mpi_tmp_path, comm):
    out = mpi_tmp_path / "missed"
    settings = EvaluationSettings(("gn-tikhonov",), options={"gn-tikhonov": {
        "max_alpha_trials": 1, "alpha_initial": 1e6}}, samples=(0,), figures=False)
    evaluate(dataset, out, settings, comm, progress=False)
    if comm.rank == 0:
        text = (out / "summary.md").read_text()
        assert "gn-tikhonov did not reach its discrepancy target" in text and "[0]" in text


def test_overwrite_keeps_the_old_evaluation_until_the_new_one_is_complete(dataset, mpi_tmp_path,
                                                                          comm, monkeypatch):
    import fenics_red.evaluation as evaluation

    out = mpi_tmp_path / "eval"
    old = EvaluationSettings(("ml",), samples=(0, 1), figures=False)
    evaluate(dataset, out, old, comm, progress=False)
    if comm.rank == 0:
        (out / "notes.txt").write_text("mine")  # not the evaluation's: kept
    comm.Barrier()
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    new = EvaluationSettings(("ml",), options={"ml": {"max_steps": 3}}, samples=(0, 1),
                             figures=False)
    report = evaluation._report

    def failing_report(*args, **kwargs):
        raise OSError("No space left on device")
    monkeypatch.setattr(evaluation, "_report", failing_report)
    with pytest.raises(OSError, match="No space left"):
        evaluate(dataset, out, new, comm, progress=False, overwrite=True)
    comm.Barrier()  # rank 0 has released its locks (their files)
    # the old results are all there, untouched; the new runs wait aside
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    staged = mpi_tmp_path / "eval.partial" / "estimates" / "ml" / "sample_1.npz"
    assert read_estimate(staged)[1]["max_steps"] == 3
    stamp = staged.stat().st_mtime_ns
    comm.Barrier()
    monkeypatch.setattr(evaluation, "_report", report)
    # the same command finishes the new evaluation (reusing its runs) and swaps it in
    summary = evaluate(dataset, out, new, comm, progress=False, overwrite=True)
    assert summary["ml"]["relative_rmse"]["count"] == 2
    _, stored, _ = read_estimate(out / "estimates" / "ml" / "sample_1.npz")
    assert stored["max_steps"] == 3
    assert (out / "estimates" / "ml" / "sample_1.npz").stat().st_mtime_ns == stamp
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in mpi_tmp_path.iterdir()) == ["data.h5", "eval"]


def test_every_method_and_the_stored_runs_are_checked_before_any_solve(dataset, mpi_tmp_path,
                                                                       comm, capsys):
    out = mpi_tmp_path / "eval"
    missing = EvaluationSettings(("ml", "denoised-ml"), samples=(0,), figures=False,
                                 options={"denoised-ml": {"denoiser": str(mpi_tmp_path / "no.pt")}})
    with pytest.raises(FileNotFoundError, match="no.pt"):
        evaluate(dataset, out, missing, comm, progress=False)
    assert not out.exists()  # no ml run was made first
    assert main(["evaluate", str(dataset), "--methods", "ml,red", "--lam", "bogus", "--out",
                 str(out), "--quiet"]) == 2
    assert "'bogus'" in capsys.readouterr().err and not out.exists()
    evaluate(dataset, out, EvaluationSettings(("ml",), samples=(0,), figures=False), comm,
             progress=False)
    comm.Barrier()  # rank 0 has released its locks (their files)
    before = sorted(out.rglob("*"))
    other = EvaluationSettings(("gn-tikhonov", "ml"), options={"ml": {"max_steps": 3}},
                               samples=(0,), figures=False)
    with pytest.raises(ValueError, match="other settings of 'ml'"):  # before gn-tikhonov runs
        evaluate(dataset, out, other, comm, progress=False)
    # a refused --overwrite deletes nothing either
    with pytest.raises(FileNotFoundError, match="no.pt"):
        evaluate(dataset, out, missing, comm, progress=False, overwrite=True)
    comm.Barrier()
    assert sorted(out.rglob("*")) == before
    assert sorted(p.name for p in mpi_tmp_path.iterdir()) == ["data.h5", "eval"]


def test_an_overwrite_cut_between_its_renames_loses_nothing(dataset, mpi_tmp_path, comm):
    """``--overwrite`` swaps the new evaluation in by two renames (``OUT`` to
    ``OUT.replaced``, ``OUT.partial`` to ``OUT``); cut between them, the next run puts the old
    evaluation back (the new one stays in ``OUT.partial`` for the same command to finish)."""
    out = mpi_tmp_path / "eval"
    settings = EvaluationSettings(("ml",), samples=(0,), figures=False)
    evaluate(dataset, out, settings, comm, progress=False)
    run = out / "estimates" / "ml" / "sample_0.npz"
    stamp = run.stat().st_mtime_ns
    comm.Barrier()
    if comm.rank == 0:  # what the swap does before it is cut: mark, then the first rename
        (out / ".replacing").touch()
        out.rename(mpi_tmp_path / "eval.replaced")
    comm.Barrier()
    evaluate(dataset, out, settings, comm, progress=False)
    assert run.stat().st_mtime_ns == stamp  # the old evaluation, resumed
    assert sorted(p.name for p in mpi_tmp_path.iterdir()) == ["data.h5", "eval"]
    assert not (out / ".replacing").exists()


def test_a_users_folder_named_like_a_swap_leftover_is_kept(dataset, mpi_tmp_path, comm):
    """A user's copy of an evaluation named ``OUT.replaced`` was taken for a swap's leftover
    and deleted by a plain run; only a folder that a swap marked is. ``--overwrite``, whose swap
    needs that name, refuses before any work (it used to fail after all of it), and a mark
    that a swap cut before its first rename left in ``OUT`` does not make a later copy a
    leftover."""
    import shutil

    out = mpi_tmp_path / "eval"
    settings = EvaluationSettings(("ml",), samples=(0,), figures=False)
    evaluate(dataset, out, settings, comm, progress=False)
    comm.Barrier()
    copy = mpi_tmp_path / "eval.replaced"
    if comm.rank == 0:
        shutil.copytree(out, copy)
    comm.Barrier()
    evaluate(dataset, out, settings, comm, progress=False)
    assert (copy / "estimates" / "ml" / "sample_0.npz").exists()
    other = EvaluationSettings(("gn-tikhonov",), samples=(0,), figures=False)
    with pytest.raises(FileExistsError, match="eval.replaced' is in the way: --overwrite"):
        evaluate(dataset, out, other, comm, progress=False, overwrite=True)
    assert not (mpi_tmp_path / "eval.partial").exists()
    assert (copy / "estimates" / "ml" / "sample_0.npz").exists()
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(copy)
        (out / ".replacing").touch()  # a swap cut before its first rename
    comm.Barrier()
    evaluate(dataset, out, settings, comm, progress=False)
    assert not (out / ".replacing").exists()


def test_a_folder_with_someone_elses_evaluation_json_is_never_overwritten(dataset, mpi_tmp_path,
                                                                         comm):
    out = mpi_tmp_path / "project"
    if comm.rank == 0:
        (out / "figures").mkdir(parents=True)
        (out / "evaluation.json").write_text('{"accuracy": 0.93}')
        (out / "figures" / "plot.png").write_bytes(b"precious")
    comm.Barrier()
    settings = EvaluationSettings(("ml",), samples=(0,), figures=False)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="evaluation.json that fenics-red did not"):
            evaluate(dataset, out, settings, comm, progress=False, overwrite=overwrite)
    assert (out / "figures" / "plot.png").read_bytes() == b"precious"
    assert (out / "evaluation.json").read_text() == '{"accuracy": 0.93}'
    # nor a folder of that kind named OUT.partial, where --overwrite builds the new evaluation
    mine = mpi_tmp_path / "eval"
    evaluate(dataset, mine, settings, comm, progress=False)
    comm.Barrier()
    if comm.rank == 0:
        (out / "evaluation.json").rename(mpi_tmp_path / "mine.json")
        out.rename(mpi_tmp_path / "eval.partial")
        (mpi_tmp_path / "mine.json").rename(mpi_tmp_path / "eval.partial" / "evaluation.json")
    comm.Barrier()
    with pytest.raises(FileExistsError, match="evaluation.json that fenics-red did not"):
        evaluate(dataset, mine, settings, comm, progress=False, overwrite=True)
    assert (mpi_tmp_path / "eval.partial" / "figures" / "plot.png").read_bytes() == b"precious"


@pytest.mark.parametrize("damage", ["negative", "truncated", "negative std", "info a list"])
def test_a_damaged_run_file_is_refused_never_scored(dataset, mpi_tmp_path, comm, capsys,
                                                   damage):
    """A run file cut short or edited: evaluate scored a negated estimate (relative error 1.24
    instead of 0.38) and took a negative σ into the coverage, without a word; a truncated one
    ended in a traceback."""
    out = mpi_tmp_path / "eval"
    run = ["evaluate", str(dataset), "--methods", "gn-tikhonov", "--samples", "0", "--max-steps",
           "2", "--figures", "0", "--quiet", "--out", str(out),
           *(["--uncertainty", "--uncertainty-rank", "4"] if "std" in damage else [])]
    assert main(run) == 0
    path = out / "estimates" / "gn-tikhonov" / "sample_0.npz"
    if comm.rank == 0:
        if damage == "truncated":
            path.write_bytes(path.read_bytes()[:300])
        else:
            with np.load(path) as archive:
                arrays = dict(archive)
            if damage == "negative":
                arrays["estimate"] = -arrays["estimate"]
            elif damage == "negative std":
                arrays["std"] = -arrays["std"]
            else:
                arrays["info"] = np.array("[1, 2]")
            np.savez(path, **arrays)
    comm.Barrier()
    capsys.readouterr()
    assert main(run) == 2
    err = capsys.readouterr().err
    assert "is damaged" in err and "delete it to recompute it" in err and err.count("\n") == 1
    assert main([*run, "--overwrite"]) == 0  # --overwrite recomputes it
    assert read_estimate(path)[0].min() > 0
