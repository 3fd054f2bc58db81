"""Training the RED denoiser on (ML estimate, truth) pairs: data, learning, determinism, resume."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from fenics_red.denoiser import Denoiser, UNetConfig
from fenics_red.training import (
    PAIRS_FORMAT,
    TrainingSettings,
    card_path,
    checkpoint_path,
    read_pairs,
    settings_for_data,
    train_denoiser,
    validation_metrics,
)

TINY = UNetConfig(channels=6, depth=2)
FAST = TrainingSettings(epochs=3, batch_size=4, lr=3e-3, seed=3, val_fraction=0.25,
                        architecture=TINY, device="cpu", num_threads=1)


def make_pairs(n=24, shape=(17, 17), seed=0, noise=0.25):
    """Piecewise-constant phantoms (a disc or a square in a background) and a noisy version."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx]
    truth = np.empty((n, ny, nx))
    for k in range(n):
        image = np.full(shape, rng.uniform(0.1, 0.15))
        cy, cx = rng.uniform(0.3, 0.7) * ny, rng.uniform(0.3, 0.7) * nx
        r = rng.uniform(0.15, 0.3) * min(shape)
        inside = ((y - cy) ** 2 + (x - cx) ** 2 < r**2 if k % 2
                  else (abs(y - cy) < r) & (abs(x - cx) < r))
        image[inside] = rng.uniform(0.3, 0.8)
        truth[k] = image
    estimate = truth * (1 + noise * rng.standard_normal(truth.shape))
    return truth, np.maximum(estimate, 0.01)


def write_pairs(path, truth, estimate, *, method="ml", done=None, snr_db=35.0, fmt=PAIRS_FORMAT):
    """A file in the layout of `fenics-red reconstruct DATA.h5 --method ml --all --out PAIRS.h5`."""
    n = truth.shape[0]
    with h5py.File(path, "w") as f:
        f["estimate"] = estimate
        f["truth"] = truth
        f["index"] = np.arange(n, dtype=np.int64)
        f["done"] = np.ones(n, np.uint8) if done is None else np.asarray(done, np.uint8)
        f.create_group("history/0")
        f.attrs.update(format=fmt, format_version=1, fenics_red_version="test", method=method,
                       settings=json.dumps({"method": "fista", "max_steps": 150}),
                       data_path="/data/DATA.h5",
                       data_attrs=json.dumps({"snr_db": snr_db, "nx": truth.shape[-1] - 1,
                                              "ny": truth.shape[-2] - 1, "seed": 7}))
    return path


def make_volume_pairs(n=8, shape=(9, 11, 13), seed=0, noise=0.25):
    """Volumes (nz+1, ny+1, nx+1): a ball or a box in a background, and a noisy version."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[tuple(slice(0, m) for m in shape)]
    truth = np.empty((n, *shape))
    for k in range(n):
        volume = np.full(shape, rng.uniform(0.1, 0.15))
        c = [rng.uniform(0.3, 0.7) * m for m in shape]
        r = rng.uniform(0.2, 0.35) * min(shape)
        inside = ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < r**2 if k % 2
                  else (abs(z - c[0]) < r) & (abs(y - c[1]) < r) & (abs(x - c[2]) < r))
        volume[inside] = rng.uniform(0.3, 0.8)
        truth[k] = volume
    estimate = truth * (1 + noise * rng.standard_normal(truth.shape))
    return truth, np.maximum(estimate, 0.01)


@pytest.fixture
def pairs(tmp_path):
    return write_pairs(tmp_path / "pairs.h5", *make_pairs())


@pytest.fixture
def shared_pairs(mpi_tmp_path, comm):
    """A pairs file in a folder every rank sees (the command line is collective)."""
    path = mpi_tmp_path / "pairs.h5"
    if comm.rank == 0:
        write_pairs(path, *make_pairs())
    comm.Barrier()
    return path


def weights(path):
    return Denoiser.load(path).network.state_dict()


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


# -- the pairs file -------------------------------------------------------------------------------

def test_read_pairs_reads_truth_estimate_and_the_recipe(pairs):
    data = read_pairs(pairs)
    truth, estimate = make_pairs()
    np.testing.assert_array_equal(data.truth, truth)
    np.testing.assert_array_equal(data.estimate, estimate)
    assert data.n == 24
    assert data.recipe["method"] == "ml"
    assert data.recipe["settings"] == {"method": "fista", "max_steps": 150}  # JSON parsed
    assert data.recipe["data_attrs"]["snr_db"] == 35.0


def test_read_pairs_refuses_reconstructions_of_another_method(tmp_path):
    path = write_pairs(tmp_path / "red.h5", *make_pairs(4), method="red")
    with pytest.raises(ValueError, match="'red' reconstructions.*--method ml"):
        read_pairs(path)


def test_read_pairs_refuses_an_unfinished_file(tmp_path):
    path = write_pairs(tmp_path / "part.h5", *make_pairs(4), done=[1, 1, 0, 1])
    with pytest.raises(ValueError, match="unfinished: 3 of 4"):
        read_pairs(path)


def test_read_pairs_refuses_other_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_pairs(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5"):
        read_pairs(tmp_path / "text.h5")
    with h5py.File(tmp_path / "data.h5", "w") as f:  # a simulated data set, not its estimates
        f["E"] = np.ones((2, 3, 3))
        f["ux_noisy"] = np.ones((2, 3, 3))
        f.attrs["format"] = "fenics-red dataset"
    with pytest.raises(ValueError, match="simulated data set.*reconstruct"):
        read_pairs(tmp_path / "data.h5")


def test_read_pairs_refuses_bad_values(tmp_path):
    truth, estimate = make_pairs(4)
    estimate[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        read_pairs(write_pairs(tmp_path / "nan.h5", truth, estimate))
    with pytest.raises(ValueError, match="at least 2"):
        read_pairs(write_pairs(tmp_path / "one.h5", *make_pairs(1)))
    # estimates per mesh node: the message said only "must have shape (n, ny+1, nx+1)"
    nodal = np.ones((4, 30))
    with pytest.raises(ValueError, match="estimates per mesh node .*make its pairs on a grid"):
        read_pairs(write_pairs(tmp_path / "mesh.h5", nodal, nodal))


def test_several_pairs_files_are_concatenated_with_each_recipe(tmp_path):
    a = write_pairs(tmp_path / "a.h5", *make_pairs(4, seed=1), snr_db=25.0)
    b = write_pairs(tmp_path / "b.h5", *make_pairs(6, seed=2), snr_db=45.0)
    data = read_pairs([a, b])
    assert data.n == 10
    np.testing.assert_array_equal(data.truth[:4], make_pairs(4, seed=1)[0])
    np.testing.assert_array_equal(data.estimate[4:], make_pairs(6, seed=2)[1])
    sources = data.recipe["sources"]
    assert [s["pairs"] for s in sources] == [4, 6]
    assert [s["data_attrs"]["snr_db"] for s in sources] == [25.0, 45.0]
    assert sources[0]["sha256"] == read_pairs(a).sha256
    assert data.sha256 != read_pairs([b, a]).sha256  # the order is part of the data
    assert read_pairs([a]).sha256 == read_pairs(a).sha256


def test_the_checksum_names_the_pairs_not_the_file(tmp_path):
    truth, estimate = make_pairs(4)
    plain = read_pairs(write_pairs(tmp_path / "plain.h5", truth, estimate))
    with h5py.File(tmp_path / "plain.h5") as f, h5py.File(tmp_path / "slim.h5", "w") as g:
        for name in ("truth", "estimate", "done"):  # compressed copy without the history
            g.create_dataset(name, data=f[name][...], compression="gzip", shuffle=True)
        g.attrs.update(f.attrs)
    slim = read_pairs(tmp_path / "slim.h5")
    assert slim.sha256 == plain.sha256
    estimate[0, 0, 0] *= 1 + 1e-12
    assert read_pairs(write_pairs(tmp_path / "other.h5", truth, estimate)).sha256 != plain.sha256


def test_several_pairs_files_must_share_the_grid_and_not_repeat(tmp_path):
    a = write_pairs(tmp_path / "a.h5", *make_pairs(4))
    c = write_pairs(tmp_path / "c.h5", *make_pairs(4, shape=(9, 9)))
    with pytest.raises(ValueError, match="different shapes"):
        read_pairs([a, c])
    with pytest.raises(ValueError, match="more than once"):
        read_pairs([a, tmp_path / "." / "a.h5"])
    copy = tmp_path / "copy.h5"  # the same pairs under another name: in training and validation
    copy.write_bytes(a.read_bytes())
    with pytest.raises(ValueError, match="holds the same pairs as"):
        read_pairs([a, copy])
    with pytest.raises(ValueError, match="no pairs file"):
        read_pairs([])


@pytest.mark.usefixtures("one_process")
def test_training_on_several_files_records_each_in_the_card(tmp_path):
    a = write_pairs(tmp_path / "a.h5", *make_pairs(8, seed=1), snr_db=25.0)
    b = write_pairs(tmp_path / "b.h5", *make_pairs(8, seed=2), snr_db=35.0)
    card = train_denoiser([a, b], tmp_path / "model.pt", FAST.replace(epochs=1), progress=False)
    assert card["data"]["pairs"] == 16
    assert card["data"]["snr_db"] == [25.0, 35.0]
    assert card["data"]["path"] == [str(a.resolve()), str(b.resolve())]


def test_settings_are_checked():
    with pytest.raises(ValueError, match="clean_fraction"):
        TrainingSettings(clean_fraction=1.5)
    with pytest.raises(ValueError, match="epochs"):
        TrainingSettings(epochs=-1)
    with pytest.raises(ValueError, match="grad_clip"):
        TrainingSettings(grad_clip=0.0)
    assert TrainingSettings.from_dict(FAST.to_dict()) == FAST


# -- training -------------------------------------------------------------------------------------

@pytest.mark.usefixtures("one_process")
def test_training_reduces_the_held_out_error_and_writes_a_model_card(pairs, tmp_path):
    out = tmp_path / "model.pt"
    settings = FAST.replace(epochs=30, lr=1e-2)
    card = train_denoiser(pairs, out, settings, progress=False, command="test command")
    v = card["validation"]
    assert v["pairs"] == 6
    assert v["denoised_rel_error"] < 0.75 * v["input_rel_error"], v  # measured: 0.15 vs 0.25
    assert 0 <= v["clean_drift_1"] < 0.5 and np.isfinite(v["clean_drift_5"])
    # the model file holds the best epoch, and the network it loads reproduces the metric
    # (the card measures the network itself, without the flip average of inference)
    denoiser = Denoiser.load(out, flip_average=False)
    assert denoiser.card == card
    truth, estimate = make_pairs()
    val = card["split"]["validation_indices"]
    errors = [np.linalg.norm(denoiser(estimate[i]) - truth[i]) / np.linalg.norm(truth[i])
              for i in val]
    assert np.mean(errors) == pytest.approx(v["denoised_rel_error"], rel=1e-4)
    # the card beside the model: recipe, command, seed, epochs, history
    on_disk = json.loads(card_path(out).read_text())
    assert on_disk == card
    assert card["command"] == "test command" and card["seed"] == 3 and card["epochs"] == 30
    assert card["data"]["snr_db"] == 35.0
    assert card["data"]["recipe"]["settings"]["max_steps"] == 150
    assert len(card["history"]) == 30
    assert card["best_epoch"] == 1 + int(np.argmin([r["val_loss"] for r in card["history"]]))
    assert checkpoint_path(out).exists()


@pytest.mark.usefixtures("one_process")
def test_training_is_deterministic_by_seed(pairs, tmp_path):
    train_denoiser(pairs, tmp_path / "a.pt", FAST, progress=False)
    train_denoiser(pairs, tmp_path / "b.pt", FAST, progress=False)
    train_denoiser(pairs, tmp_path / "c.pt", FAST.replace(seed=4), progress=False)
    assert same_weights(weights(tmp_path / "a.pt"), weights(tmp_path / "b.pt"))
    assert not same_weights(weights(tmp_path / "a.pt"), weights(tmp_path / "c.pt"))


@pytest.mark.usefixtures("one_process")
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(pairs, tmp_path):
    settings = FAST.replace(epochs=4, idempotence_weight=0.5, fixed_point_weight=0.5)
    train_denoiser(pairs, tmp_path / "full.pt", settings, progress=False)

    class Interrupt(Exception):
        pass

    def stop_after_two(epoch, record):
        if epoch == 2:
            raise Interrupt

    out = tmp_path / "resumed.pt"
    with pytest.raises(Interrupt):
        train_denoiser(pairs, out, settings, progress=False, callback=stop_after_two)
    assert checkpoint_path(out).exists() and not out.exists()
    with pytest.raises(FileExistsError, match="--resume"):
        train_denoiser(pairs, out, settings, progress=False)
    with pytest.raises(ValueError, match="settings differ"):
        train_denoiser(pairs, out, settings.replace(lr=1e-3), progress=False, resume=True)
    card = train_denoiser(pairs, out, settings, progress=False, resume=True)
    assert [r["epoch"] for r in card["history"]] == [1, 2, 3, 4]
    assert same_weights(weights(tmp_path / "full.pt"), weights(out))
    assert card["legs"] == [{"start_epoch": 0, "epochs": 4}, {"start_epoch": 2, "epochs": 4}]
    with pytest.raises(ValueError, match="has run 4 epochs, more than --epochs 3"):
        train_denoiser(pairs, out, settings.replace(epochs=3), progress=False, resume=True)
    # extended: the card says that epochs 5-6 followed a 4-epoch schedule's first four
    card = train_denoiser(pairs, out, settings.replace(epochs=6), progress=False, resume=True)
    assert card["legs"][-1] == {"start_epoch": 4, "epochs": 6} and card["epochs"] == 6


@pytest.mark.usefixtures("one_process")
def test_a_run_from_init_starts_at_the_given_model_s_weights(pairs, tmp_path):
    from fenics_red.io import file_sha256

    train_denoiser(pairs, tmp_path / "base.pt", FAST, progress=False)
    still = FAST.replace(epochs=1, lr=1e-12)  # Adam moves each weight by about lr
    base_path = str(tmp_path / "base.pt")
    card = train_denoiser(pairs, tmp_path / "tuned.pt", still.replace(init=base_path),
                          progress=False)
    train_denoiser(pairs, tmp_path / "scratch.pt", still, progress=False)
    base, tuned = weights(tmp_path / "base.pt"), weights(tmp_path / "tuned.pt")
    assert all(torch.allclose(base[k].float(), tuned[k].float(), atol=1e-8) for k in base)
    assert not same_weights(base, weights(tmp_path / "scratch.pt"))
    assert card["init"]["sha256"] == file_sha256(tmp_path / "base.pt")
    base_card = Denoiser.load(tmp_path / "base.pt").card  # the base's recipe travels along
    assert card["init"]["card"]["command"] == base_card["command"]
    assert card["init"]["card"]["data"]["pairs"] == base_card["data"]["pairs"]
    assert card["settings"]["init"] == base_path
    with pytest.raises(ValueError, match="architecture"):
        train_denoiser(pairs, tmp_path / "wide.pt",
                       still.replace(init=base_path,
                                     architecture=UNetConfig(channels=4, depth=2)),
                       progress=False)
    with pytest.raises(FileNotFoundError):
        train_denoiser(pairs, tmp_path / "none.pt", still.replace(init=str(tmp_path / "no.pt")),
                       progress=False)


@pytest.mark.usefixtures("one_process")
def test_a_resume_is_refused_when_its_initial_model_changed(pairs, tmp_path):
    train_denoiser(pairs, tmp_path / "a.pt", FAST.replace(epochs=1), progress=False)
    train_denoiser(pairs, tmp_path / "b.pt", FAST.replace(epochs=1, seed=9), progress=False)
    init = tmp_path / "init.pt"
    init.write_bytes((tmp_path / "a.pt").read_bytes())
    settings = FAST.replace(epochs=3, init=str(init))

    def stop(epoch, record):
        raise KeyboardInterrupt

    out = tmp_path / "tuned.pt"
    with pytest.raises(KeyboardInterrupt):
        train_denoiser(pairs, out, settings, progress=False, callback=stop)
    init.write_bytes((tmp_path / "b.pt").read_bytes())  # another model at the same path
    with pytest.raises(ValueError, match="initial model .* has changed"):
        train_denoiser(pairs, out, settings, progress=False, resume=True)


def test_files_written_beside_the_model_never_replace_a_users_file(pairs, tmp_path):
    notes = tmp_path / "notes.json"  # the card of --out notes.pt would go here
    notes.write_text('{"my": "notes"}')
    with pytest.raises(FileExistsError, match="exists without its model"):
        train_denoiser(pairs, tmp_path / "notes.pt", FAST.replace(epochs=1), progress=False)
    assert notes.read_text() == '{"my": "notes"}'
    data = tmp_path / "pj.json"  # pairs whose name is the card's of --out pj.pt
    data.write_bytes(pairs.read_bytes())
    with pytest.raises(ValueError, match="writes beside the model, is its input"):
        train_denoiser(data, tmp_path / "pj.pt", FAST.replace(epochs=1), progress=False,
                       overwrite=True)
    assert data.read_bytes() == pairs.read_bytes()


@pytest.mark.usefixtures("one_process")
def test_a_second_run_on_the_same_model_is_refused_while_the_first_trains(pairs, tmp_path):
    out = tmp_path / "model.pt"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from fenics_red.io import OutputLock; "
        f"lock = OutputLock({str(out)!r}); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FileExistsError, match="is being written by another run"):
            train_denoiser(pairs, out, FAST.replace(epochs=1), progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()


def test_an_existing_model_is_kept_unless_overwrite(pairs, tmp_path):
    out = tmp_path / "model.pt"
    train_denoiser(pairs, out, FAST.replace(epochs=1), progress=False)
    with pytest.raises(FileExistsError):
        train_denoiser(pairs, out, FAST.replace(epochs=1), progress=False)
    card = train_denoiser(pairs, out, FAST.replace(epochs=2), progress=False, overwrite=True)
    assert len(card["history"]) == 2
    with pytest.raises(ValueError, match="exclude each other"):
        train_denoiser(pairs, out, FAST, progress=False, resume=True, overwrite=True)


# -- the command line -----------------------------------------------------------------------------

def test_the_train_command_writes_model_card_and_checkpoint(shared_pairs, mpi_tmp_path, comm,
                                                           capsys):
    from fenics_red.cli import main

    out = mpi_tmp_path / "model.pt"
    argv = ["train", "--data", str(shared_pairs), "--out", str(out), "--epochs", "2",
            "--batch-size", "8", "--seed", "5", "--val-fraction", "0.25", "--channels", "4",
            "--depth", "1",
            "--clean-fraction", "0.5", "--t-max", "1.2", "--idempotence-weight", "0.1",
            "--threads", "1", "--quiet"]
    assert main(argv) == 0
    if comm.rank == 0:  # rank 0 trains and reports
        assert "validation relative error" in capsys.readouterr().out
    card = json.loads(card_path(out).read_text())
    assert card["settings"]["architecture"] == {"name": "unet", "channels": 4, "depth": 1}
    assert card["settings"]["clean_fraction"] == 0.5 and card["settings"]["t_max"] == 1.2
    assert card["seed"] == 5 and card["epochs"] == 2 and card["split"]["validation"] == 6
    assert card["command"].startswith("fenics-red train --data")
    assert "--idempotence-weight 0.1" in card["command"]
    assert Denoiser.load(out).config == UNetConfig(4, 1)
    assert checkpoint_path(out).exists()
    # run again: refused without --resume/--overwrite; --resume with more epochs extends the run
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*argv[:5], "--epochs", "3", *argv[7:], "--resume"]) == 0
    assert len(json.loads(card_path(out).read_text())["history"]) == 3


def test_the_train_command_reports_a_bad_pairs_file(mpi_tmp_path, comm, capsys):
    from fenics_red.cli import main

    path = mpi_tmp_path / "red.h5"
    if comm.rank == 0:
        write_pairs(path, *make_pairs(4), method="red")
    comm.Barrier()
    out = str(mpi_tmp_path / "m.pt")
    assert main(["train", "--data", str(path), "--out", out, "--quiet"]) == 2
    assert "method 'ml'" in capsys.readouterr().err
    assert main(["train", "--data", str(mpi_tmp_path / "none.h5"), "--out", out,
                 "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_command_defaults_are_the_library_defaults():
    from fenics_red.cli.train import DEFAULTS

    settings = TrainingSettings()
    for name, value in DEFAULTS.items():
        expected = (getattr(settings.architecture, name) if name in ("channels", "depth")
                    else getattr(settings, name))
        assert value == expected, name


#: Run ``python -m fenics_red.cli.train`` with the FEniCSx stack and MPI made unimportable.
_WITHOUT_FENICSX = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("dolfinx", "petsc4py", "mpi4py", "ufl", "basix", "pyvista"):
            raise ImportError(name + " is not installed on this machine")
sys.meta_path.insert(0, Block())
sys.argv = ["train", *sys.argv[1:]]
runpy.run_module("fenics_red.cli.train", run_name="__main__")
"""


@pytest.mark.usefixtures("one_process")
def test_training_runs_on_a_machine_without_fenicsx_or_mpi(pairs, tmp_path):
    """A GPU node with torch but no DOLFINx, PETSc or mpi4py trains with the same command."""
    out = tmp_path / "model.pt"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_FENICSX, "--data", str(pairs), "--out", str(out),
         "--epochs", "1", "--batch-size", "8", "--channels", "6", "--depth", "2",
         "--device", "cpu", "--threads", "1", "--grad-clip", "1.0", "--quiet"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    card = Denoiser.load(out).card
    assert card["settings"]["grad_clip"] == 1.0
    assert card["command"].startswith("fenics-red train --data")
    # a bad input is reported in one line, without a traceback
    result = subprocess.run([sys.executable, "-c", _WITHOUT_FENICSX, "--data",
                             str(tmp_path / "missing.h5"), "--out", str(tmp_path / "m.pt")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert "missing.h5" in result.stderr and "Traceback" not in result.stderr


# -- volumes: pairs (n, nz+1, ny+1, nx+1) train a 3-D network --------------------------------------

def test_read_pairs_reads_pairs_of_volumes(tmp_path):
    truth, estimate = make_volume_pairs(4)
    data = read_pairs(write_pairs(tmp_path / "volumes.h5", truth, estimate))
    assert data.dims == 3 and data.n == 4
    np.testing.assert_array_equal(data.estimate, estimate)
    assert read_pairs(write_pairs(tmp_path / "images.h5", *make_pairs(4))).dims == 2
    with pytest.raises(ValueError, match=r"\(n, nz\+1, ny\+1, nx\+1\)"):
        read_pairs(write_pairs(tmp_path / "5d.h5", truth[:, None], estimate[:, None]))


@pytest.mark.usefixtures("one_process")
def test_training_on_volumes_lowers_the_loss_and_writes_a_loadable_3d_model(tmp_path):
    """The network follows the pairs: the (2-D) settings' channels and depth, as a 3-D UNet."""
    truth, estimate = make_volume_pairs(24)
    pairs = write_pairs(tmp_path / "volumes.h5", truth, estimate)
    out = tmp_path / "model3d.pt"
    # 2 epochs of 18 steps, without the penalties that hold the network at the identity
    settings = FAST.replace(epochs=2, lr=3e-3, batch_size=1, clean_fraction=0.0,
                            idempotence_weight=0.0, fixed_point_weight=0.0)
    card = train_denoiser(pairs, out, settings, progress=False)
    assert card["architecture"] == {"name": "unet", "channels": 6, "depth": 2, "dims": 3}
    assert card["settings"]["architecture"]["dims"] == 3
    assert card["data"]["image_shape"] == [9, 11, 13]
    denoiser = Denoiser.load(out)
    assert denoiser.config == UNetConfig(6, 2, dims=3) and denoiser.card == card
    # the loss on the training pairs is below the untrained network's (the identity's)
    train = np.setdiff1d(np.arange(24), card["split"]["validation_indices"])
    metrics = validation_metrics(denoiser.network, truth[train], estimate[train])
    assert metrics["denoised_rel_error"] < metrics["input_rel_error"], metrics
    denoised = denoiser(estimate[0])
    assert denoised.shape == (9, 11, 13) and np.isfinite(denoised).all()
    # resumed with the same (2-D) settings: the checkpoint's 3-D architecture is theirs
    card = train_denoiser(pairs, out, settings.replace(epochs=3), progress=False, resume=True)
    assert [r["epoch"] for r in card["history"]] == [1, 2, 3]


def test_a_3d_architecture_is_not_trained_on_images(pairs, tmp_path):
    settings = FAST.replace(epochs=1, architecture=UNetConfig(4, 1, dims=3))
    with pytest.raises(ValueError, match="3-D architecture cannot be trained on images"):
        train_denoiser(pairs, tmp_path / "model.pt", settings, progress=False)
    assert settings_for_data(FAST, read_pairs(pairs)) == FAST


def _mixed_as_before_volumes(truth, estimate, indices, rng, settings):
    """The augmentation of 2-D training as it was written before volumes existed."""
    truth, estimate = truth[indices], estimate[indices]
    t = rng.uniform(0.0, settings.t_max, len(indices))
    t[rng.random(len(indices)) < settings.clean_fraction] = 0.0
    flips = rng.random(len(indices)) < 0.5
    truth[flips] = truth[flips, :, ::-1]
    estimate[flips] = estimate[flips, :, ::-1]
    return truth + t[:, None, None] * (estimate - truth), truth


def test_2d_training_draws_the_same_mixing_and_flips_as_before_volumes(pairs):
    """2-D training is unchanged for a seed: the same random draws, in the same order."""
    from fenics_red.training import _Batches

    data = read_pairs(pairs)
    indices = np.arange(3, 19)
    inputs, truth = _Batches(data, FAST, "cpu").mixed(indices, np.random.default_rng(7), True)
    expected = _mixed_as_before_volumes(data.truth, data.estimate, indices,
                                        np.random.default_rng(7), FAST)
    np.testing.assert_array_equal(inputs[:, 0].numpy(), expected[0].astype(np.float32))
    np.testing.assert_array_equal(truth[:, 0].numpy(), expected[1].astype(np.float32))


def test_volumes_are_augmented_by_the_x_and_y_flips_only(tmp_path):
    """Each training volume is one of its four allowed flips (never flipped in depth); over many
    draws all four occur."""
    from fenics_red.training import _Batches

    truth, estimate = make_volume_pairs(8)
    data = read_pairs(write_pairs(tmp_path / "volumes.h5", truth, estimate))
    settings = FAST.replace(clean_fraction=1.0)  # inputs = truth: compare the flips alone
    batches = _Batches(data, settings, "cpu")
    rng = np.random.default_rng(0)
    group = {(): "none", (2,): "x", (1,): "y", (1, 2): "x and y"}
    seen = set()
    for _ in range(6):
        inputs, target = batches.mixed(np.arange(8), rng, flip=True)
        np.testing.assert_array_equal(inputs.numpy(), target.numpy())
        for k in range(8):
            matches = [name for axes, name in group.items()
                       if np.array_equal(target[k, 0].numpy(),
                                         np.flip(truth[k], axes).astype(np.float32))]
            assert matches, f"volume {k} is not an allowed flip of its truth"
            seen.update(matches)
    assert seen == set(group.values())


def test_volumes_with_ny_equal_nx_can_also_be_exchanged_in_x_and_y(tmp_path):
    """``exchange``: each volume is one of the eight lateral symmetries of its truth (flips and
    the exchange x <-> y, never the depth), all eight occur, and the estimate goes with it."""
    from fenics_red.training import _Batches

    rng = np.random.default_rng(3)  # random volumes: no two symmetries of one are equal
    truth = rng.uniform(1.0, 2.0, (8, 9, 11, 11))
    estimate = truth * rng.uniform(0.8, 1.2, truth.shape)
    data = read_pairs(write_pairs(tmp_path / "volumes.h5", truth, estimate))
    settings = FAST.replace(clean_fraction=0.0, exchange=True)
    batches = _Batches(data, settings, "cpu")
    rng = np.random.default_rng(0)

    def symmetries(volume):
        for swap in (False, True):
            v = np.swapaxes(volume, 1, 2) if swap else volume
            for axes in ((), (2,), (1,), (1, 2)):
                yield (swap, axes), np.flip(v, axes).astype(np.float32)

    seen = set()
    for _ in range(8):
        inputs, target = batches.mixed(np.arange(8), rng, flip=True, exchange=True)
        for k in range(8):
            matches = [key for key, v in symmetries(truth[k])
                       if np.array_equal(target[k, 0].numpy(), v)]
            assert len(matches) == 1, f"volume {k} is not a lateral symmetry of its truth"
            # the estimate went with its truth: input = g E + t (g Ẽ − g E) for one t in [0, 1]
            g_estimate = dict(symmetries(estimate[k]))[matches[0]]
            step = (g_estimate - target[k, 0].numpy()).ravel()
            moved = (inputs[k, 0].numpy() - target[k, 0].numpy()).ravel()
            t = step @ moved / (step @ step)
            assert -1e-6 <= t <= 1 + 1e-6
            np.testing.assert_allclose(moved, t * step, atol=1e-5)
            seen.update(matches)
    assert len(seen) == 8


def test_exchange_is_refused_on_images_and_on_volumes_with_ny_not_nx(pairs, tmp_path):
    settings = FAST.replace(epochs=1, exchange=True)
    with pytest.raises(ValueError, match="exchange x <-> y .* the pairs hold images"):
        train_denoiser(pairs, tmp_path / "model.pt", settings, progress=False)
    volumes = write_pairs(tmp_path / "volumes.h5", *make_volume_pairs(4))  # ny 11, nx 13
    with pytest.raises(ValueError, match="11 nodes along y and 13 along x"):
        train_denoiser(volumes, tmp_path / "model.pt", settings, progress=False)
    assert not (tmp_path / "model.pt").exists()


def test_the_command_s_volume_architecture_is_the_library_s_3d_default():
    from fenics_red.cli.train import DEFAULTS_3D
    from fenics_red.denoiser import DEFAULT_3D_CONFIG

    assert DEFAULTS_3D == {"channels": DEFAULT_3D_CONFIG.channels,
                           "depth": DEFAULT_3D_CONFIG.depth}
