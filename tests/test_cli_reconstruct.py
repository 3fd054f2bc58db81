"""Specification of ``fenics-red reconstruct``, the method registry and the reconstruction files."""

import json
import re
from pathlib import Path

from mpi4py import MPI

import h5py
import numpy as np
import pytest

from fenics_red.cli import main
from fenics_red.data import SimulationSettings, load_dataset, simulate_dataset
from fenics_red.methods import METHODS, Runner, get_method
from fenics_red.raster import ImageGrid
from fenics_red.reconstruction import (
    FORMAT,
    load_history,
    load_reconstructions,
    reconstruct_dataset,
)
from fenics_red.solvers import ML_DEFAULTS, MLSettings

SETTINGS = SimulationSettings(ImageGrid(10, 8, 1.0, 0.8), seed=7)
N = 5


@pytest.fixture
def data(mpi_tmp_path, comm):
    return simulate_dataset(mpi_tmp_path / "set.h5", N, SETTINGS, comm, progress=False)


def _reconstruct(data, out, *extra):
    return main(["reconstruct", str(data), "--out", str(out), "--quiet", *extra])


class Interrupt(Exception):
    pass


def _interrupted(data, out, comm, options) -> Path:
    """Run ``reconstruct_dataset`` and stop it after its first batch; ``OUT.partial``."""
    def stop(n_done):
        raise Interrupt(n_done)

    with pytest.raises(Interrupt):
        reconstruct_dataset(data, out, comm, options=options, progress=False, batch_size=1,
                            on_batch=stop)
    return out.with_name(out.name + ".partial")


def test_all_samples_are_written_in_the_documented_layout(data, mpi_tmp_path, comm):
    out = mpi_tmp_path / "ml.h5"
    assert _reconstruct(data, out, "--all", "--max-steps", "40") == 0
    estimates, truth, index, attrs = load_reconstructions(out)
    shape = SETTINGS.grid.shape
    assert estimates.shape == truth.shape == (N, *shape)
    assert np.array_equal(index, np.arange(N))
    with load_dataset(data) as dataset:
        assert np.array_equal(truth, dataset.read("E"))
        assert attrs["data_attrs"]["seed"] == 7 and attrs["data_attrs"]["nx"] == 10
    assert attrs["format"] == FORMAT and attrs["format_version"] == 1
    assert attrs["method"] == "ml" and attrs["data_path"] == str(data.resolve())
    assert MLSettings.from_dict(attrs["settings"]) == ML_DEFAULTS.replace(max_steps=40)
    errors = np.linalg.norm(estimates - truth, axis=(1, 2)) / np.linalg.norm(truth, axis=(1, 2))
    assert np.all(errors < 0.8)
    history, info = load_history(out, 2)
    assert history["misfit"].ndim == 1 and len(history["misfit"]) == info["steps"] + 1
    assert info["stop_reason"] in ("discrepancy", "max_steps")
    assert info["solver"] == "fista" and info["max_steps"] == 40  # 35 dB: "auto" is FISTA
    if comm.rank == 0:
        with h5py.File(out) as f:
            assert {"estimate", "truth", "index", "done", "history"} <= set(f)
            assert f["estimate"].dtype == np.float64 and f["index"].dtype == np.int64
            assert f["done"].dtype == np.uint8 and len(f["history"]) == N


def test_spreading_samples_or_the_mesh_gives_the_same_estimate(data, mpi_tmp_path, comm):
    """``--all`` (samples over ranks, COMM_SELF each) and ``--sample i`` (mesh over all ranks)."""
    every, one = mpi_tmp_path / "all.h5", mpi_tmp_path / "one.h5"
    assert _reconstruct(data, every, "--all", "--stop", "budget", "--max-steps", "30") == 0
    assert _reconstruct(data, one, "--sample", "3", "--stop", "budget", "--max-steps", "30") == 0
    all_estimates, *_ = load_reconstructions(every)
    single, _, index, _ = load_reconstructions(one)
    assert np.array_equal(index, [3]) and single.shape == (1, *SETTINGS.grid.shape)
    rel = np.linalg.norm(single[0] - all_estimates[3]) / np.linalg.norm(all_estimates[3])
    assert rel < 1e-8


def test_solver_options_reach_the_method(data, mpi_tmp_path):
    out = mpi_tmp_path / "pgd.h5"
    assert _reconstruct(data, out, "--sample", "0", "--solver", "pgd", "--stop", "budget",
                        "--max-steps", "7") == 0
    *_, attrs = load_reconstructions(out)
    assert attrs["settings"]["method"] == "pgd" and attrs["settings"]["max_steps"] == 7
    history, info = load_history(out, 0)
    assert info["steps"] == 7 and np.array_equal(history["step"], np.arange(8))


def test_an_interrupted_run_resumes_without_redoing_samples(data, mpi_tmp_path, comm):
    out = mpi_tmp_path / "resumed.h5"
    reference = mpi_tmp_path / "reference.h5"
    reconstruct_dataset(data, reference, comm, options={"max_steps": 25}, progress=False)
    partial = _interrupted(data, out, comm, {"max_steps": 25})
    assert partial.exists() and not out.exists()
    with pytest.raises(FileNotFoundError, match="unfinished run"):
        load_reconstructions(out)
    # another method setting does not mix into the unfinished file
    with pytest.raises(ValueError, match="different settings"):
        reconstruct_dataset(data, out, comm, options={"max_steps": 26}, progress=False)
    done = []
    reconstruct_dataset(data, out, comm, options={"max_steps": 25}, progress=False,
                        batch_size=1, on_batch=done.append)
    assert done[0] > comm.size  # the first batch was not solved again
    assert not partial.exists()
    resumed, expected = load_reconstructions(out), load_reconstructions(reference)
    np.testing.assert_allclose(resumed.estimates, expected.estimates, rtol=1e-12)


@pytest.mark.parametrize("edit", ["nan", "zero"])
def test_an_unfinished_run_with_a_damaged_finished_row_is_not_resumed(data, mpi_tmp_path, comm,
                                                                      edit):
    """A finished row of ``OUT.partial`` that holds NaN or a zero modulus: the zero row used to
    be taken into the output without a word, the NaN one was renamed to ``OUT`` and only then
    refused (a bad file under the final name)."""
    out, options = mpi_tmp_path / "resumed.h5", {"max_steps": 3}
    partial = _interrupted(data, out, comm, options)
    row = None
    if comm.rank == 0:
        with h5py.File(partial, "r+") as f:
            row = int(np.flatnonzero(f["done"][...])[0])
            f["estimate"][row] = np.nan if edit == "nan" else 0.0
    row = comm.bcast(row)
    with pytest.raises(ValueError, match=f"it is damaged \\(row {row} of dataset 'estimate', "
                                         "marked done"):
        reconstruct_dataset(data, out, comm, options=options, progress=False)
    assert not out.exists()
    reconstruct_dataset(data, out, comm, options=options, progress=False, overwrite=True)
    assert (load_reconstructions(out).estimates > 0).all()


def test_an_unfinished_run_of_other_samples_is_named_as_such(data, mpi_tmp_path, comm):
    out = mpi_tmp_path / "other.h5"
    _interrupted(data, out, comm, {"max_steps": 3})
    with pytest.raises(ValueError, match="is a run of other samples of the data set; run its "
                                         "command again"):
        reconstruct_dataset(data, out, comm, options={"max_steps": 3}, indices=[0],
                            progress=False)


def test_ctrl_c_inside_a_petsc_solve_is_reported_as_an_interruption(data, mpi_tmp_path,
                                                                      monkeypatch, capsys):
    """Ctrl-C while PETSc runs the likelihood's Python preconditioner comes back from PETSc as
    ``PETSc.Error`` (error code -1): the command says it was interrupted (status 130), as it does
    for Ctrl-C anywhere else, not that PETSc failed."""
    from fenics_red import likelihood

    calls = []

    def interrupt(self, pc, x, y):
        calls.append(1)
        raise KeyboardInterrupt
    monkeypatch.setattr(likelihood._GammaPreconditioner, "apply", interrupt)
    capsys.readouterr()
    assert _reconstruct(data, mpi_tmp_path / "x.h5", "--all", "--batch-size", "1") == 130
    err = capsys.readouterr().err
    assert calls, "the interruption did not happen inside the preconditioner"
    assert "interrupted; what was finished is kept" in err and "PETSc" not in err


def test_existing_outputs_and_bad_requests_are_refused(data, mpi_tmp_path, capsys):
    out = mpi_tmp_path / "x.h5"
    assert _reconstruct(data, out, "--sample", "0", "--max-steps", "3") == 0
    assert _reconstruct(data, out, "--sample", "0") == 2
    assert "already exists" in capsys.readouterr().err
    assert _reconstruct(data, out, "--sample", "0", "--max-steps", "3", "--overwrite") == 0
    for extra, message in [(["--sample", str(N)], "sample indices must be integers in 0..4"),
                           (["--sample", "-1"], "non-negative"),
                           (["--all", "--max-steps", "0"], "--max-steps must be a positive"),
                           (["--all", "--no-flip-average"], "--no-flip-average applies to"),
                           (["--all", "--min-misfit-decrease", "2"],
                            "--min-misfit-decrease applies to")]:
        assert _reconstruct(data, mpi_tmp_path / "y.h5", *extra) == 2
        assert message in capsys.readouterr().err
    assert _reconstruct(mpi_tmp_path / "missing.h5", mpi_tmp_path / "y.h5", "--all") == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (mpi_tmp_path / "y.h5").exists()


def test_loader_reports_damaged_files(data, mpi_tmp_path, comm):
    out = mpi_tmp_path / "ml.h5"
    reconstruct_dataset(data, out, comm, indices=[1, 2], options={"max_steps": 3},
                        progress=False)
    broken = mpi_tmp_path / "broken.h5"
    if comm.rank == 0:
        import shutil

        shutil.copy(out, broken)
        with h5py.File(broken, "r+") as f:
            f.attrs["format_version"] = 99
    comm.Barrier()
    with pytest.raises(ValueError, match="format version 99"):
        load_reconstructions(broken)
    comm.Barrier()  # every rank has closed the file before rank 0 rewrites it
    if comm.rank == 0:
        with h5py.File(broken, "r+") as f:
            f.attrs["format_version"] = 1
            f["estimate"][0, 0, 0] = np.nan
    comm.Barrier()
    with pytest.raises(ValueError, match="non-finite"):
        load_reconstructions(broken)
    with pytest.raises(ValueError, match="not a fenics-red reconstruction"):
        load_reconstructions(data)


# -- the registry -------------------------------------------------------------------------------

def test_registry_builds_runners_with_the_documented_contract(comm):
    from fenics_red.data import simulate_sample

    assert "ml" in METHODS
    runner = get_method("ml").setup(SETTINGS.grid, SETTINGS.forward, comm,
                                    {"solver": "fista", "max_steps": 10})
    assert isinstance(runner, Runner)
    estimate, history, info = runner.run(simulate_sample(0, SETTINGS))
    runner.destroy()
    assert estimate.shape == SETTINGS.grid.shape and np.all(estimate > 0)
    assert all(isinstance(v, np.ndarray) and v.ndim == 1 for v in history.values())
    json.dumps(info)
    json.dumps(runner.settings)
    with pytest.raises(ValueError, match="unknown reconstruction method 'nope'"):
        get_method("nope")
    with pytest.raises(ValueError, match="no option 'lambda'"):
        get_method("ml").setup(SETTINGS.grid, SETTINGS.forward, MPI.COMM_SELF, {"lambda": 1})


def test_the_command_line_takes_every_method_flag_from_the_registry():
    """Each flag of each registered method once, in a group named after the methods taking it."""
    from fenics_red.cli import build_parser
    from fenics_red.methods import argument_groups, flag_users

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for command in ("reconstruct", "evaluate", "demo"):
        groups = {g.title: {a.option_strings[0] for a in g._group_actions if a.option_strings}
                  for g in commands[command]._action_groups}
        for title, flags in argument_groups():
            assert groups[title] == {flag.name for flag in flags}, (command, title)
    for flag, users in flag_users().items():
        assert all(flag in METHODS[name].flags for name in users)
    for name, method in METHODS.items():
        for flag in method.flags:
            assert name in flag_users()[flag]


@pytest.mark.parametrize("extra, message", [
    (["--method", "red", "--stop", "budget"], "--stop applies to the method ml, not 'red'"),
    (["--method", "denoised-ml", "--lam", "0.1"], "--lam applies to the method red, not "
                                                  "'denoised-ml'"),
    (["--method", "denoised-ml", "--max-steps", "5"],
     "--max-steps applies to the methods gn-tikhonov, gn-tv, ml and red, not 'denoised-ml'"),
    (["--method", "red", "--lam", "sometimes"], "'sometimes' not understood"),
    (["--method", "gn-tv", "--max-steps", "0"], "--max-steps must be a positive integer"),
    (["--method", "gn-tikhonov", "--tv-delta", "0.3"], "--tv-delta applies to the method gn-tv, "
                                                       "not 'gn-tikhonov'"),
    (["--method", "ml", "--tau", "1.2"], "--tau applies to the methods gn-tikhonov and gn-tv"),
    (["--method", "gn-tv", "--tau", "-1"], "discrepancy_tau"),
])
def test_method_flags_are_checked_against_the_registry(data, mpi_tmp_path, capsys, extra,
                                                       message):
    assert _reconstruct(data, mpi_tmp_path / "z.h5", "--all", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (mpi_tmp_path / "z.h5").exists()


def test_method_flags_reach_each_method_that_takes_them():
    from fenics_red.cli import build_parser
    from fenics_red.cli.evaluate import settings_from_args
    from fenics_red.cli.reconstruct import options_from_args

    parser = build_parser()
    args = parser.parse_args(["reconstruct", "d.h5", "--all", "--out", "o.h5", "--method",
                              "gn-tv", "--max-steps", "3"])
    assert options_from_args(args) == {"max_steps": 3}
    assert get_method("gn-tv").options(options_from_args(args)).max_iterations == 3

    def evaluate(*extra):
        return settings_from_args(parser.parse_args(["evaluate", "d.h5", "--out", "o", *extra]))

    settings = evaluate("--methods", "ml,gn-tv,denoised-ml", "--max-steps", "5",
                        "--no-flip-average")
    assert settings.options == {"ml": {"max_steps": 5}, "gn-tv": {"max_steps": 5},
                                "denoised-ml": {"flip_average": False}}
    assert evaluate("--methods", "ml").options == {}
    tuned = evaluate("--methods", "gn-tikhonov,gn-tv,ml", "--tau", "1.3", "--tv-delta", "0.3")
    assert tuned.options == {"gn-tikhonov": {"discrepancy_tau": 1.3},
                             "gn-tv": {"discrepancy_tau": 1.3, "tv_delta": 0.3}}
    tv = get_method("gn-tv").options(tuned.options["gn-tv"])
    assert tv.discrepancy_tau == 1.3 and tv.tv_delta == 0.3 and tv.regulariser == "tv"
    for extra, message in [
            (["--methods", "ml", "--denoiser", "m.pt"],
             "--denoiser is used by the methods denoised-ml and red; neither is in --methods"),
            (["--methods", "ml,gn-tv", "--lam", "0.1"],
             "--lam is used by the method red; it is not in --methods")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            evaluate(*extra)
