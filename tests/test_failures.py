"""Nothing lost: full disks, two runs on one output, killed runs and refused runs.

A full disk is made real in a child process by a file-size limit (``RLIMIT_FSIZE``: every write
past the limit fails with ``EFBIG``, as one on a full disk fails with ``ENOSPC``), or injected
in-process into the resumable file's flush. Every test runs serially and under ``mpirun -n 2``;
the ones that start child processes do so on rank 0 only.
"""

import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from mpi4py import MPI

import h5py
import numpy as np
import pytest

from fenics_red.cli import main
from fenics_red.data import (
    SimulationSettings,
    load_dataset,
    simulate_dataset,
    simulate_sample,
)
from fenics_red.io import OutputLock, atomic_output, lock_path
from fenics_red.jobs import ResumableFile, partial_path
from fenics_red.raster import ImageGrid
from fenics_red.reconstruction import load_reconstructions

SIMULATE = ["simulate", "--samples", "12", "--grid", "16", "--seed", "7", "--quiet"]


#: Settings of scripts/env for mpirun (root, shared memory), kept for a child's own mpirun.
_MPI_SETTINGS = ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "OMPI_MCA_btl",
                 "OMPI_MCA_rmaps_base_oversubscribe", "OMPI_MCA_mpi_yield_when_idle",
                 "PRTE_MCA_rmaps_default_mapping_policy")


def _env():
    """The environment of a child ``fenics-red`` (not a rank of this test's MPI job)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("OMPI_", "PMIX_", "PRTE_")) or k in _MPI_SETTINGS}


def _cli(args, file_limit: int | None = None, timeout: float = 300):
    """Run ``fenics-red ARGS`` in a child process, its files limited to ``file_limit`` bytes."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    code = "import sys; from fenics_red.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, env=_env(), timeout=timeout,
                          preexec_fn=None if file_limit is None else limit)


def _error_line(stderr: str) -> str:
    """The command's error line; fails on a traceback or on more than one error line."""
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def on_rank_0(comm):
    if comm.rank != 0:
        pytest.skip("runs child processes on rank 0")


# -- a full disk ---------------------------------------------------------------------------------

def test_a_full_disk_during_simulate_fails_in_one_line_keeps_the_old_output_and_resumes(
        mpi_tmp_path, on_rank_0):
    out = mpi_tmp_path / "set.h5"
    good = _cli([*SIMULATE, "--out", out])
    assert good.returncode == 0, good.stderr
    before = out.read_bytes()
    full = _cli([*SIMULATE, "--out", out, "--overwrite", "--batch-size", "2"],
                file_limit=120_000)
    assert full.returncode == 2, full.stderr
    error = _error_line(full.stderr)
    assert "File too large" in error and "wrote" not in full.stdout
    assert out.read_bytes() == before  # the good file is still there, unchanged
    _check_partial(partial_path(out), "E", error)
    # with space again, the same command (the old output removed first, so no --overwrite)
    # resumes (or starts again, the partial file removed) and gives what one run gives
    out.unlink()
    resumed = _cli([*SIMULATE, "--out", out])
    assert resumed.returncode == 0, resumed.stderr
    reference = _cli([*SIMULATE, "--out", mpi_tmp_path / "ref.h5"])
    assert reference.returncode == 0
    with load_dataset(out) as a, load_dataset(mpi_tmp_path / "ref.h5") as b:
        for name in ("E", "ux_noisy", "uy_noisy", "mask"):
            np.testing.assert_array_equal(a.read(name), b.read(name))


def _check_partial(path, name, error):
    """The partial file after a failed write: removed when the write left it unreadable (and
    the error says so), else its rows marked done hold their (positive) values."""
    if not path.exists():
        assert "it was removed" in error
        return
    with h5py.File(path, "r") as f:
        done = f["done"][...].astype(bool)
        assert (f[name][np.flatnonzero(done)].reshape(done.sum(), -1) > 0).all()


def test_a_full_disk_during_reconstruct_marks_no_row_done_that_is_not_written(
        mpi_tmp_path, on_rank_0):
    data, out = mpi_tmp_path / "set.h5", mpi_tmp_path / "ml.h5"
    simulate_dataset(data, 6, SimulationSettings(ImageGrid(8, 8, 1.0, 1.0), seed=3),
                     MPI.COMM_SELF, progress=False)
    args = ["reconstruct", data, "--all", "--method", "ml", "--max-steps", "20", "--out", out,
            "--quiet", "--batch-size", "1"]
    full = _cli(args, file_limit=40_000)
    assert full.returncode == 2, full.stderr
    error = _error_line(full.stderr)
    assert "File too large" in error and not out.exists()
    _check_partial(partial_path(out), "estimate", error)
    again = _cli([*args, "--overwrite"])
    assert again.returncode == 0, again.stderr
    estimates = load_reconstructions(out).estimates
    assert (estimates > 0).all()


def test_a_failed_write_in_the_run_is_an_error_and_marks_no_row_done(
        mpi_tmp_path, comm, monkeypatch, capsys):
    out = mpi_tmp_path / "set.h5"
    calls = {"n": 0}
    sync = ResumableFile._sync

    def failing_sync(self):
        calls["n"] += 1
        if calls["n"] > 3:  # creation, then the first batch's data and flags
            raise OSError(28, "No space left on device")
        sync(self)

    monkeypatch.setattr(ResumableFile, "_sync", failing_sync)
    assert main([*SIMULATE, "--out", str(out), "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    if comm.rank == 0:
        assert "No space left on device" in err and "resume" in err
        with h5py.File(partial_path(out)) as f:
            assert f["done"][...].sum() == comm.size  # the first batch only
    assert not out.exists()


def test_a_full_disk_during_train_names_the_file_and_the_same_command_resumes(mpi_tmp_path,
                                                                            on_rank_0):
    """(torch's zip writer said only ``. unexpected pos 8137 vs 8078``.)"""
    data, pairs, model = (mpi_tmp_path / name for name in ("set.h5", "pairs.h5", "model.pt"))
    simulate_dataset(data, 8, SimulationSettings(ImageGrid(16, 16, 1.0, 1.0), seed=5),
                     MPI.COMM_SELF, progress=False)
    made = _cli(["reconstruct", data, "--all", "--method", "ml", "--max-steps", "10", "--out",
                 pairs, "--quiet"])
    assert made.returncode == 0, made.stderr
    args = ["train", "--data", pairs, "--out", model, "--epochs", "2", "--channels", "4",
            "--depth", "1", "--quiet"]
    full = _cli(args, file_limit=3000)
    assert full.returncode == 2, full.stderr
    error = _error_line(full.stderr)
    assert f"could not write {str(model.with_suffix('.last.pt'))!r} (" in error, error
    assert "the disk is full (or a file size limit was reached): free space and run the same " \
           "command again (train: with --resume)" in error
    assert not model.exists() and not list(mpi_tmp_path.glob(".*.partial"))
    again = _cli([*args, "--resume"])
    assert again.returncode == 0, again.stderr
    assert model.exists()


def test_a_failed_xdmf_write_names_the_file_and_leaves_nothing(mpi_tmp_path, comm, monkeypatch):
    """HDF5's report of a full disk does not say which file it was writing."""
    from dolfinx import io
    from fenics_red.visualise import write_xdmf

    def full(self, *args, **kwargs):
        raise RuntimeError("HDF5-DIAG: Error detected in HDF5: H5Dwrite(): can't write data; "
                           "error message = 'No space left on device'")

    monkeypatch.setattr(io.XDMFFile, "write_function", full)
    out = mpi_tmp_path / "sample.xdmf"
    grid = ImageGrid(8, 8, 1.0, 1.0)
    with pytest.raises(OSError, match=re.escape(
            f"could not write {str(out)!r} (No space left on device); the disk is full")):
        write_xdmf({"truth": np.ones(grid.shape)}, out, grid, comm)
    comm.Barrier()
    assert list(mpi_tmp_path.iterdir()) == []


# -- refused and failed runs leave nothing behind ------------------------------------------------

def test_a_refused_run_leaves_no_partial_file_that_would_block_the_corrected_command(
        mpi_tmp_path, capsys):
    out = mpi_tmp_path / "set.h5"
    assert main(["simulate", "--samples", "2", "--grid", "1", "--out", str(out), "--quiet"]) == 2
    assert "too small" in capsys.readouterr().err
    MPI.COMM_WORLD.Barrier()
    assert not partial_path(out).exists() and not lock_path(out).exists()
    assert main(["simulate", "--samples", "2", "--grid", "8", "--out", str(out), "--quiet"]) == 0


# -- one run at a time ---------------------------------------------------------------------------

_HOLD = """
import sys, time
from fenics_red.io import OutputLock
with OutputLock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def held(mpi_tmp_path, comm):
    """A lock on ``set.h5`` held by another process (on rank 0) while the test runs."""
    out = mpi_tmp_path / "set.h5"
    holder = None
    if comm.rank == 0:
        holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], env=_env(),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "locked"
    comm.Barrier()
    yield out, holder
    if holder is not None:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_a_second_run_on_the_same_output_is_refused_naming_the_run_that_holds_it(held, capsys):
    out, holder = held
    assert main([*SIMULATE, "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    if holder is not None:
        assert "being written by another run" in err and f"pid {holder.pid}" in err
    assert not out.exists() and not partial_path(out).exists()


def test_an_atomic_output_is_refused_while_another_run_writes_it(held, comm):
    out, holder = held
    if holder is not None:
        with pytest.raises(FileExistsError, match="another run"):
            with atomic_output(out, overwrite=True) as tmp:
                tmp.write_text("x")
        assert not out.exists()


def test_a_lock_is_freed_when_its_holder_is_killed(mpi_tmp_path, on_rank_0):
    out = mpi_tmp_path / "model.pt"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], env=_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait(timeout=60)
    with OutputLock(out):  # a stale lock file does not block
        pass
    assert not lock_path(out).exists()


def test_an_atomic_output_never_replaces_a_file_that_appeared_while_it_was_written(tmp_path):
    out = tmp_path / "result.txt"
    with pytest.raises(FileExistsError, match="appeared while"):
        with atomic_output(out) as tmp:
            tmp.write_text("mine")
            out.write_text("theirs")  # another program, meanwhile
    assert out.read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]


def test_two_concurrent_simulate_runs_never_mix_their_data(mpi_tmp_path, on_rank_0):
    out = mpi_tmp_path / "set.h5"
    args = ["simulate", "--samples", "40", "--grid", "16", "--quiet", "--overwrite", "--out", out]
    code = "import sys; from fenics_red.cli import main; sys.exit(main(sys.argv[1:]))"
    runs = [subprocess.Popen([sys.executable, "-c", code, *map(str, args), "--seed", str(seed)],
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for seed in (1, 2)]
    results = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    winners = [seed for seed, (rc, _, _) in zip((1, 2), results, strict=True) if rc == 0]
    assert winners, results
    for rc, _, err in results:
        assert rc == 0 or "another run" in err or "appeared while" in err, err
    with load_dataset(out) as data:  # whole, and the data of a run that said it wrote it
        assert data.settings.seed in winners
        for i in (0, len(data) - 1):
            np.testing.assert_array_equal(data.sample(i).E,
                                          simulate_sample(i, data.settings).E)


# -- a killed launcher ---------------------------------------------------------------------------

_RANK = "import sys; from fenics_red.cli import console_main; sys.argv[0] = 'fenics-red'; " \
        "console_main()"


def test_ranks_stop_soon_after_their_launcher_is_killed(mpi_tmp_path, on_rank_0):
    out = mpi_tmp_path / "set.h5"
    launcher = subprocess.Popen(
        ["mpirun", "-n", "2", sys.executable, "-c", _RANK, "simulate", "--samples", "5000",
         "--grid", "16", "--batch-size", "1", "--quiet", "--out", str(out)],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = time.monotonic()
        holder = None
        while holder is None:  # the lock file names its holder once it is written
            assert launcher.poll() is None and time.monotonic() - started < 120
            time.sleep(0.1)
            words = (lock_path(out).read_text().split()
                     if partial_path(out).exists() and lock_path(out).exists() else [])
            if len(words) > 1 and words[0] == "pid" and words[1].isdigit():
                holder = int(words[1])  # "pid N on HOST since ..."
    finally:
        launcher.kill()  # SIGKILL: mpirun cannot tell its ranks
        launcher.wait(timeout=60)
    killed = time.monotonic()
    while os.path.exists(f"/proc/{holder}") and _state(holder) != "Z":
        assert time.monotonic() - killed < 30, "rank 0 runs on without its launcher"
        time.sleep(0.1)
    # its lock went with it (a zombie leader's other threads may hold the file a moment longer)
    while True:
        try:
            with OutputLock(out):
                break
        except FileExistsError:
            assert time.monotonic() - killed < 30, "rank 0's lock outlives it"
            time.sleep(0.1)


def test_sigterm_ends_a_run_as_ctrl_c_does_and_the_same_command_resumes_it(mpi_tmp_path,
                                                                          on_rank_0):
    """A batch system's time limit sends SIGTERM: the run says it was terminated (status 143),
    releases its lock and keeps the finished samples for the same command to continue."""
    out = mpi_tmp_path / "set.h5"
    args = ["simulate", "--samples", "400", "--grid", "16", "--batch-size", "1", "--quiet",
            "--out", str(out)]
    run = subprocess.Popen([sys.executable, "-c", _RANK, *args], env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    while not (partial_path(out).exists() and lock_path(out).exists()
               and "pid" in lock_path(out).read_text()):
        assert run.poll() is None and time.monotonic() - started < 120, run.communicate()
        time.sleep(0.1)
    time.sleep(1.0)  # a few samples in
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and err.strip().splitlines() == [
        "fenics-red simulate: terminated (SIGTERM); what was finished is kept: the same command "
        "continues it (train: with --resume)"]
    with OutputLock(out):  # released
        pass
    with h5py.File(partial_path(out)) as partial:
        done = int(np.sum(partial["done"][...]))
    assert 0 < done < 400 and not out.exists()


def test_a_launch_starts_beside_the_leftovers_of_a_killed_launcher_that_had_its_pid(
        mpi_tmp_path, on_rank_0):
    # A killed mpirun leaves <tmp>/prterun.<host>.<pid>.<uid>; PRRTE refuses to start on an existing
    # one, and pids come round again. scripts/bin/mpirun removes the dead launchers' directories.
    tmp = mpi_tmp_path / "tmp"
    tmp.mkdir()
    alive = tmp / f"prterun.{os.uname().nodename}.{os.getpid()}.{os.getuid()}"
    alive.mkdir()  # a live launcher's directory stays
    script = 'mkdir -p "$TMPDIR/prterun.$(hostname).$$.$(id -u)" && exec mpirun -n 1 true'
    run = subprocess.run(["bash", "-c", script], env={**_env(), "TMPDIR": str(tmp)},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert sorted(tmp.glob("prterun.*")) == [alive]


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "Z"


# -- a resume checks what it read ----------------------------------------------------------------

def test_a_reconstruction_is_not_resumed_on_data_changed_in_place(mpi_tmp_path, comm, capsys):
    data, out = mpi_tmp_path / "set.h5", mpi_tmp_path / "ml.h5"
    simulate_dataset(data, 4, SimulationSettings(ImageGrid(8, 8, 1.0, 1.0), seed=3), comm,
                     progress=False)
    args = ["reconstruct", str(data), "--all", "--method", "ml", "--max-steps", "5", "--out",
            str(out), "--quiet", "--batch-size", "1"]

    def stop(n_done):
        raise KeyboardInterrupt

    from fenics_red.reconstruction import reconstruct_dataset

    with pytest.raises(KeyboardInterrupt):
        reconstruct_dataset(data, out, comm, "ml", {"max_steps": 5}, batch_size=1,
                            progress=False, on_batch=stop)
    comm.Barrier()  # every rank has closed the data set (HDF5 refuses a writer beside readers)
    if comm.rank == 0:
        with h5py.File(data, "r+") as f:  # same attributes, other values
            f["uy_noisy"][...] *= 1.01
    comm.Barrier()
    assert main(args) == 2
    assert "different data" in capsys.readouterr().err


# -- one clear line ------------------------------------------------------------------------------

def test_an_error_of_every_rank_is_printed_once_without_an_abort_banner(mpi_tmp_path, on_rank_0):
    run = subprocess.run(["mpirun", "-n", "2", sys.executable, "-c", _RANK, "simulate",
                          "--samples", "2", "--snr", "nan", "--out", str(mpi_tmp_path / "x.h5")],
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "snr_db must be a finite number of dB, got nan" in _error_line(run.stderr)
    assert "MPI_ABORT" not in run.stderr and "[rank" not in run.stderr


def test_a_bad_command_line_is_one_line_not_the_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["simulate", "--samples", "2", "--snr", "-inf", "--out", "x.h5"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    if MPI.COMM_WORLD.rank == 0:
        assert err.count("\n") == 1 and "--option=-inf" in err and "usage" not in err


def test_show_refuses_an_output_that_is_not_a_png(mpi_tmp_path, capsys):
    assert main(["show", str(mpi_tmp_path / "set.h5"), "--out", str(mpi_tmp_path / "x.txt")]) == 2
    assert "must name a .png file" in capsys.readouterr().err
    assert not (mpi_tmp_path / "x.txt").exists()


def _tiny_set(folder, comm, samples: int):
    """``folder/set.h5``: a data set of ``samples`` phantoms on an 8² grid (seed 1)."""
    return simulate_dataset(folder / "set.h5", samples,
                            SimulationSettings(ImageGrid(8, 8, 1.0, 1.0), seed=1), comm,
                            progress=False)


def test_show_refuses_a_sample_whose_modulus_was_lost(mpi_tmp_path, comm, capsys):
    data = _tiny_set(mpi_tmp_path, comm, 2)
    comm.Barrier()
    if comm.rank == 0:
        with h5py.File(data, "r+") as f:
            f["E"][1] = 0.0  # what a lost write leaves
    comm.Barrier()
    assert main(["show", str(data), "--sample", "1", "--out", str(mpi_tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    if comm.rank == 0:
        assert ("dataset 'E' must be strictly positive; sample 1 has minimum 0.0 (all zero: a "
                "lost write?)") in err, err


# -- sizes -----------------------------------------------------------------------------------------

def test_a_grid_too_large_for_the_memory_is_refused_before_anything_is_allocated(
        mpi_tmp_path, capsys, monkeypatch):
    out = mpi_tmp_path / "big.h5"
    started = time.monotonic()
    monkeypatch.setenv("FENICS_RED_MEMORY_LIMIT", "64G")
    assert main(["simulate", "--samples", "1", "--grid", "5000", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    # every rank on this machine solves whole samples: 143 GB each
    needed = re.search(r"needs about ([\d.]+) GB of memory, more than the limit of 64 GB", err)
    assert needed and abs(float(needed[1]) / MPI.COMM_WORLD.size - 143.3) < 0.6, err
    assert time.monotonic() - started < 5 and not partial_path(out).exists()
    monkeypatch.setenv("FENICS_RED_MEMORY_LIMIT", "100M")
    assert main(["simulate", "--samples", "1", "--grid", "64", "--out", str(out)]) == 2
    assert "limit of 100 MB (FENICS_RED_MEMORY_LIMIT)" in capsys.readouterr().err


def test_a_denoiser_raster_too_large_for_the_memory_is_refused_before_any_estimate(
        mpi_tmp_path, comm, capsys, monkeypatch):
    """``--pixel`` of reconstruct and evaluate sizes the raster over a mesh: the check of
    simulate's phantom raster refuses one above the memory (a 0.001 mm pixel on the 40 x 30 mm
    ROI mesh: 1.2e9 pixels, which tried to allocate hundreds of GB and raised a traceback)."""
    mesh = Path(__file__).resolve().parents[1] / "meshes" / "roi-2d.msh"
    data = mpi_tmp_path / "roi.h5"
    assert main(["simulate", "--mesh", str(mesh), "--samples", "1", "--out", str(data),
                 "--quiet"]) == 0
    monkeypatch.setenv("FENICS_RED_MEMORY_LIMIT", "8G")
    started = time.monotonic()
    for argv, out in ((["reconstruct", str(data), "--sample", "0", "--method", "red"], "r.h5"),
                      (["evaluate", str(data), "--methods", "ml,red"], "ev")):
        assert main([*argv, "--pixel", "0.001", "--out", str(mpi_tmp_path / out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(
            r"a raster of 40000 x 30000 pixels \(--pixel 0.001\) needs about [\d.]+ TB of "
            r"memory, more than the limit of 8 GB \(FENICS_RED_MEMORY_LIMIT\)", err), err
        assert not (mpi_tmp_path / out).exists() and not partial_path(mpi_tmp_path / out).exists()
    assert time.monotonic() - started < 10


# -- refused before any work, nothing of the user's touched -------------------------------------

def _digest(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_output_that_is_an_input_is_refused_and_the_input_kept(mpi_tmp_path, comm, capsys):
    data = _tiny_set(mpi_tmp_path, comm, 1)
    modulus = mpi_tmp_path / "E.npy"
    if comm.rank == 0:
        np.save(modulus, np.ones((9, 9)))
    comm.Barrier()
    before = _digest(data), _digest(modulus)
    for argv in (["reconstruct", str(data), "--sample", "0", "--method", "ml"],
                 ["forward", "--modulus", str(modulus)]):
        out = data if argv[0] == "reconstruct" else modulus
        assert main([*argv, "--out", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") >= 1 and "is also this command's input" in err, err
    assert (_digest(data), _digest(modulus)) == before


def test_an_extra_output_that_is_the_imported_measurement_is_refused_and_the_file_kept(
        mpi_tmp_path, comm, capsys):
    """reconstruct of an imported measurement also writes OUT-modulus.<its suffix>: named so
    that this is the measurement file itself, it is refused like an --out that is an input
    (with --overwrite it replaced the user's data)."""
    from fenics_red.domain import MeshArrays

    data = _tiny_set(mpi_tmp_path, comm, 1)
    measured = mpi_tmp_path / "clash-modulus.npz"
    if comm.rank == 0:
        with load_dataset(data) as d:
            sample, mesh = d.sample(0), MeshArrays.of_grid(d.grid)
        np.savez(measured, points=mesh.points, cells=mesh.cells,
                 displacement=np.stack([sample.ux_noisy.ravel(), sample.uy_noisy.ravel()]))
    comm.Barrier()
    imported = mpi_tmp_path / "clash_data.h5"
    assert main(["import", str(measured), "--out", str(imported), "--noise-std", "1e-3",
                 "1e-3"]) == 0
    _reconstruct_refused_keeping(imported, mpi_tmp_path / "clash.h5", measured,
                                 "(the measurement it was imported from); write the output to "
                                 "another file", capsys)


def _reconstruct_refused_keeping(imported, out, kept, reason: str, capsys) -> None:
    """``reconstruct IMPORTED --out OUT --overwrite`` fails in one line: its extra output would
    be the input ``kept`` (``reason``: which input); ``kept`` is unchanged and OUT not
    written."""
    capsys.readouterr()
    before = _digest(kept)
    assert main(["reconstruct", str(imported), "--sample", "0", "--method", "ml", "--out",
                 str(out), "--overwrite", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and (
        f"the estimate's extra output {str(kept)!r} is also this command's input "
        f"{reason}") in err, err
    assert _digest(kept) == before and not out.exists()


def test_an_extra_output_that_is_the_mesh_of_an_import_is_refused_from_any_folder(
        mpi_tmp_path, comm, capsys, monkeypatch):
    """A measurement imported with ``--mesh`` given relative to one folder, reconstructed from
    another with ``--out`` beside the mesh: the estimate's XDMF mesh (``OUT-modulus-mesh.xdmf``)
    would be the user's mesh file. The check uses the mesh's path as resolved at import (the
    relative one named nothing in the second folder, and the mesh was replaced)."""
    import meshio

    from fenics_red.domain import MeshArrays

    data = _tiny_set(mpi_tmp_path, comm, 1)
    measured, mesh_file = mpi_tmp_path / "measured.npz", mpi_tmp_path / "clash-modulus-mesh.xdmf"
    if comm.rank == 0:
        with load_dataset(data) as d:
            sample, mesh = d.sample(0), MeshArrays.of_grid(d.grid)
        np.savez(measured, ux=sample.ux_noisy.ravel(), uy=sample.uy_noisy.ravel())
        meshio.write(mesh_file, meshio.Mesh(mesh.points, [("triangle", mesh.cells)]))
    comm.Barrier()
    monkeypatch.chdir(mpi_tmp_path)
    imported = mpi_tmp_path / "clash_data.h5"
    assert main(["import", str(measured), "--out", str(imported), "--mesh", mesh_file.name,
                 "--noise-std", "1e-3", "1e-3"]) == 0
    elsewhere = mpi_tmp_path / "elsewhere"
    if comm.rank == 0:
        elsewhere.mkdir()
    comm.Barrier()
    monkeypatch.chdir(elsewhere)
    _reconstruct_refused_keeping(imported, mpi_tmp_path / "clash.h5", mesh_file,
                                 "(the mesh it was imported with)", capsys)


@pytest.mark.parametrize(("argv", "words"), [
    (["simulate", "--samples", "1", "--grid", "8", "--height", "inf"], "--height: must be"),
    (["simulate", "--samples", "1", "--grid", "8", "--seed", str(2**64)], "[0, 2^63 - 1]"),
    (["simulate", "--samples", "1", "--grid", "8", "--facets", "facets.xdmf"],
     "--facets marks the boundary of a mesh file; give --mesh too"),
    (["forward", "--modulus", "{E16}", "--facets", "facets.xdmf"],
     "--facets marks the boundary of a mesh file; give --mesh too"),
    (["forward", "--modulus", "{E16}"], "spans a contrast of 1e+16"),
    (["simulate", "--samples", "1", "--grid", "4", "--grid-z", "4", "--plane-strain"],
     "--plane-strain applies to 2-D problems only; a 3-D mesh or grid is solved in 3-D"),
    (["forward", "--mesh", "{BOX}", "--modulus", "{E16}", "--plane-strain"],
     "--plane-strain applies to 2-D problems only"),
])
def test_impossible_settings_get_one_line_before_any_work(argv, words, mpi_tmp_path, comm,
                                                          capsys):
    """(A modulus spanning 16 orders of magnitude gave a wrong displacement without a word: the
    stiffness matrix is too ill-conditioned for double precision; --plane-strain was taken in
    3-D, where it does not apply.)"""
    E16 = mpi_tmp_path / "E16.npy"
    if comm.rank == 0:
        E = np.ones((9, 9))
        E[5:] = 1e-16
        np.save(E16, E)
    comm.Barrier()
    out = mpi_tmp_path / ("out.npz" if argv[0] == "forward" else "out.h5")
    box = Path(__file__).resolve().parents[1] / "meshes" / "box-3d.msh"
    argv = [a.replace("{E16}", str(E16)).replace("{BOX}", str(box)) for a in argv]
    argv += ["--out", str(out)]
    try:
        status = main(argv)
    except SystemExit as stop:  # argparse's refusal of an option's value
        status = stop.code
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") <= 1, err
    assert words in err or comm.rank > 0  # a bad command line is reported by rank 0 only
    assert not out.exists() and not list(mpi_tmp_path.glob("out.*partial"))


def test_a_folder_or_an_empty_name_as_output_file_is_refused(mpi_tmp_path, capsys):
    for out, words in ((mpi_tmp_path, "is a folder"), ("", "--out is empty")):
        assert main(["simulate", "--samples", "1", "--grid", "8", "--out", str(out),
                     "--overwrite"]) == 2
        assert words in capsys.readouterr().err
    assert mpi_tmp_path.is_dir() and not list(mpi_tmp_path.iterdir())


def test_the_demo_never_replaces_a_users_data_and_checks_settings_first(mpi_tmp_path, comm,
                                                                         capsys):
    folder = mpi_tmp_path / "mine"
    _tiny_set(mpi_tmp_path, comm, 1)
    if comm.rank == 0:
        folder.mkdir()
        (mpi_tmp_path / "set.h5").rename(folder / "data.h5")
    comm.Barrier()
    before = _digest(folder / "data.h5")
    base = ["demo", "--grid", "10", "--methods", "ml", "--max-steps", "2", "--quiet"]
    assert main([*base, "--out", str(folder)]) == 2
    assert "not the data set of an earlier demo" in capsys.readouterr().err
    assert _digest(folder / "data.h5") == before and not (folder / "masks").exists()
    for bad in (["--snr", "nan"], ["--methods", "foo"], ["--grid", "9"]):
        assert main([*base, *bad, "--out", str(mpi_tmp_path / "new")]) == 2
        assert not (mpi_tmp_path / "new").exists(), bad
    capsys.readouterr()
    # a method's options and model file are checked before the demo simulates its data set
    garbage = mpi_tmp_path / "garbage.pt"
    if comm.rank == 0:
        garbage.write_bytes(b"not a model")
    comm.Barrier()
    for bad, words in ((["--methods", "red", "--denoiser", str(mpi_tmp_path / "none.pt")],
                        "does not exist"), (["--methods", "red", "--lam", "-1"], "λ must be"),
                       (["--methods", "denoised-ml", "--denoiser", str(garbage)], "garbage.pt")):
        assert main([*base[:3], *base[5:], *bad, "--out", str(mpi_tmp_path / "new")]) == 2
        assert words in capsys.readouterr().err, bad
        assert not (mpi_tmp_path / "new").exists(), bad
    # a user's mask in OUT/masks: the demo simulated from it (its sample 0) and could overwrite
    # the user's file of its own mask's name
    masks = mpi_tmp_path / "with-masks" / "masks"
    if comm.rank == 0:
        masks.mkdir(parents=True)
        np.save(masks / "mine.npy", np.eye(11, dtype=bool))
    comm.Barrier()
    assert main([*base, "--out", str(masks.parent)]) == 2
    assert "holds mask files the demo did not write (mine.npy)" in capsys.readouterr().err
    assert sorted(p.name for p in masks.iterdir()) == ["mine.npy"]


def test_a_moved_or_copied_demo_folder_runs_again_and_a_user_data_set_beside_it_is_kept(
        mpi_tmp_path, comm, capsys):
    """The demo knew its data set by the absolute path of its masks, so a demo folder that was
    moved (or copied) was refused as a user's. It is known by the masks themselves now."""
    base = ["demo", "--grid", "10", "--methods", "ml", "--max-steps", "2", "--quiet"]
    first, moved = mpi_tmp_path / "first", mpi_tmp_path / "moved"
    assert main([*base, "--out", str(first)]) == 0
    if comm.rank == 0:
        first.rename(moved)
    comm.Barrier()
    assert main([*base, "--out", str(moved)]) == 0
    capsys.readouterr()
    # another data set in the moved folder, simulated from another mask, is still refused
    other = mpi_tmp_path / "other"
    if comm.rank == 0:
        other.mkdir()
        np.save(other / "mine.npy", np.eye(11, dtype=bool))
    comm.Barrier()
    assert main(["simulate", "--samples", "1", "--grid", "10", "--masks", str(other), "--out",
                 str(moved / "data.h5"), "--overwrite"]) == 0
    before = _digest(moved / "data.h5")
    assert main([*base, "--out", str(moved)]) == 2
    assert "not the data set of an earlier demo" in capsys.readouterr().err
    assert _digest(moved / "data.h5") == before


def test_an_evaluation_too_small_for_its_metrics_is_refused_before_any_estimate(
        mpi_tmp_path, comm, capsys):
    data = _tiny_set(mpi_tmp_path, comm, 1)
    assert main(["evaluate", str(data), "--methods", "ml", "--out",
                 str(mpi_tmp_path / "ev")]) == 2
    assert "SSIM needs at least 11 across" in capsys.readouterr().err
    assert not (mpi_tmp_path / "ev").exists()


def test_a_petsc_error_is_one_line_saying_what_petsc_found_wrong():
    from petsc4py import PETSc

    from fenics_red.cli import _one_line

    ksp = PETSc.KSP().create(MPI.COMM_SELF)
    PETSc.Options().setValue("badtest_ksp_type", "nonsense")
    ksp.setOptionsPrefix("badtest_")
    try:
        with pytest.raises(PETSc.Error) as error:
            ksp.setFromOptions()
    finally:
        PETSc.Options().delValue("badtest_ksp_type")
        ksp.destroy()
    line = _one_line(error.value)
    assert "\n" not in line and line.startswith("PETSc error code 86")
    assert "Unable to find requested KSP type nonsense" in line


def test_an_interrupted_command_says_that_it_can_be_continued(monkeypatch, capsys):
    import fenics_red.cli.show as show

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(show, "run", interrupted)
    assert main(["show", "data.h5", "--out", "x.png"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted; what was finished is kept" in err


def test_a_denoiser_raster_on_grid_data_is_refused(mpi_tmp_path, capsys):
    """A grid data set is its own raster: ``--pixel`` changed nothing there and was recorded in
    the output's settings as if it had."""
    data = mpi_tmp_path / "grid.h5"
    assert main(["simulate", "--grid", "8", "--samples", "1", "--out", str(data),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["reconstruct", str(data), "--sample", "0", "--method", "denoised-ml",
                 "--pixel", "2", "--out", str(mpi_tmp_path / "r.h5")]) == 2
    err = capsys.readouterr().err
    assert "--pixel sets the denoiser's raster over a mesh data set" in err
    assert not (mpi_tmp_path / "r.h5").exists()
