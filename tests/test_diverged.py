"""A diverged model is an error, never a success: training, saving, loading and applying it.

Serial and under ``mpirun -n 2`` (training runs on every rank on its own files; the command line
parts are collective).
"""

import math

import numpy as np
import pytest
import torch
from test_training import FAST, make_pairs, write_pairs

from fenics_red.cli import main
from fenics_red.data import SimulationSettings, simulate_dataset
from fenics_red.denoiser import MODEL_FORMAT, MODEL_FORMAT_VERSION, Denoiser, UNetConfig
from fenics_red.raster import ImageGrid
from fenics_red.training import TrainingSettings, read_pairs, train_denoiser

TINY = UNetConfig(channels=4, depth=1)


@pytest.fixture
def pairs(tmp_path):
    return write_pairs(tmp_path / "pairs.h5", *make_pairs(n=8, shape=(9, 9)))


def test_a_diverged_training_run_is_an_error_and_writes_no_model(pairs, tmp_path):
    out = tmp_path / "bad.pt"
    settings = FAST.replace(epochs=2, lr=1e12, grad_clip=None, architecture=TINY)
    with pytest.raises(ValueError, match=r"training diverged in epoch 1: .*not finite; lower --lr"):
        train_denoiser(pairs, out, settings, progress=False)
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_the_train_command_exits_non_zero_on_divergence(pairs, tmp_path, capsys, comm):
    out = tmp_path / f"bad{comm.rank}.pt"
    pairs_here = write_pairs(tmp_path / f"p{comm.rank}.h5", *make_pairs(n=8, shape=(9, 9)))
    from fenics_red.cli.train import main as train_main

    assert train_main(["--data", str(pairs_here), "--out", str(out), "--epochs", "1",
                       "--lr", "1e12", "--grad-clip", "0", "--channels", "4", "--depth", "1",
                       "--quiet"]) == 2
    assert "training diverged" in capsys.readouterr().err
    assert not out.exists()


def test_zero_epochs_are_refused():
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        TrainingSettings(epochs=0)


def test_pairs_with_an_all_zero_estimate_are_refused(tmp_path):
    truth, estimate = make_pairs(n=6, shape=(9, 9))
    estimate[4] = 0.0  # a lost write
    path = write_pairs(tmp_path / "pairs.h5", truth, estimate)
    with pytest.raises(ValueError, match=r"estimate\(s\) \[4\] have no positive value"):
        read_pairs(path)


def _nan_model(path):
    denoiser = Denoiser.untrained(TINY)
    with torch.no_grad():
        next(denoiser.network.parameters()).fill_(math.nan)
    state = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION,
             "architecture": TINY.to_dict(), "card": {},
             "state_dict": {k: v.clone() for k, v in denoiser.network.state_dict().items()}}
    torch.save(state, path)
    return path


def test_a_model_with_non_finite_weights_is_neither_saved_nor_loaded(tmp_path):
    denoiser = Denoiser.untrained(TINY)
    with torch.no_grad():
        next(denoiser.network.parameters()).fill_(math.nan)
    with pytest.raises(ValueError, match="not finite"):
        denoiser.save(tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()
    with pytest.raises(ValueError, match="non-finite weights"):
        Denoiser.load(_nan_model(tmp_path / "nan.pt"))


def test_a_model_whose_output_overflows_is_an_error_not_an_estimate():
    denoiser = Denoiser.untrained(TINY)
    with torch.no_grad():
        for parameter in denoiser.network.parameters():
            parameter.fill_(1e30)
    with pytest.raises(ValueError, match="non-finite value"):
        denoiser(np.ones((9, 9)))


def test_reconstruct_with_a_nan_model_fails_and_writes_nothing(mpi_tmp_path, comm, capsys):
    data = simulate_dataset(mpi_tmp_path / "set.h5", 2,
                            SimulationSettings(ImageGrid(8, 8, 1.0, 1.0), seed=1), comm,
                            progress=False)
    model = mpi_tmp_path / "nan.pt"
    if comm.rank == 0:
        _nan_model(model)
    comm.Barrier()
    out = mpi_tmp_path / "est.h5"
    assert main(["reconstruct", str(data), "--all", "--method", "denoised-ml", "--denoiser",
                 str(model), "--out", str(out), "--quiet"]) == 2
    assert "non-finite weights" in capsys.readouterr().err
    assert not out.exists()
