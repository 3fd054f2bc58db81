"""Specification of every registered reconstruction method (:mod:`fenics_red.methods`).

Each method of the registry reconstructs the same small simulated phantom (16², 35 dB, three
inclusions) and must beat the best homogeneous modulus, return the documented outputs, refuse bad
options with a ``ValueError`` that names them, and give the same estimate on one rank as on all of
them (run the file under ``mpirun -n 2``). A newly registered method is tested here as it is.
"""

import json
import math
import os
import re
import subprocess
import sys

from mpi4py import MPI

import numpy as np
import pytest

from fenics_red.data import SimulationSettings, simulate_sample
from fenics_red.methods import Runner, get_method, method_names
from fenics_red.raster import ImageGrid

GRID = ImageGrid(16, 16)
SETTINGS = SimulationSettings(GRID, seed=1)

#: Measured at 16², seed 1: errors of 0.297 (gn-tv) to 0.343 (gn-tikhonov) against 0.516 for the
#: best homogeneous modulus (ratios 0.58-0.66); every method must stay below this fraction of it.
BASELINE_FRACTION = 0.8

#: Agreement of the estimates on one rank and on two (relative L2). Measured: 5e-14 for ml,
#: denoised-ml and red, 1e-7 for gn-tikhonov and 9e-5 for gn-tv, whose alpha (discrepancy
#: principle) is accepted anywhere within ``discrepancy_rtol`` = 1 % of the target, a band in
#: which round-off moves it.
RANKS_RTOL = 1e-3


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Denoiser calls on two shared cores: oversubscribed torch threads cost 10-30 times more
    (the whole file, every method with its defaults, then takes about 10 s)."""
    try:
        import torch
    except ImportError:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sample():
    return simulate_sample(0, SETTINGS)


def _reconstruct(name: str, comm, sample, options=None) -> dict:
    method = get_method(name)
    runner = method.setup(GRID, SETTINGS.forward, comm, options)
    try:
        assert isinstance(runner, Runner)
        estimate, history, info = runner.run(sample)
        return {"estimate": estimate, "history": history, "info": info,
                "settings": runner.settings, "options": runner.options}
    finally:
        runner.destroy()


@pytest.fixture(scope="module")
def results(sample):
    """The estimate of each method on all ranks of ``COMM_WORLD``, computed once."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _reconstruct(name, MPI.COMM_WORLD, sample)
        return cache[name]
    return get


def _error(estimate, truth) -> float:
    return float(np.linalg.norm(estimate - truth) / np.linalg.norm(truth))


@pytest.mark.parametrize("name", method_names())
def test_the_method_beats_the_best_homogeneous_modulus(name, sample, results):
    truth = sample.E
    baseline = _error(np.full_like(truth, truth.mean()), truth)  # the best constant image
    error = _error(results(name)["estimate"], truth)
    assert error < BASELINE_FRACTION * baseline, (error, baseline)


@pytest.mark.parametrize("name", method_names())
def test_the_method_returns_the_documented_outputs(name, results, comm):
    result = results(name)
    estimate, history, info = result["estimate"], result["history"], result["info"]
    assert estimate.shape == GRID.shape and estimate.dtype == np.float64
    assert np.all(np.isfinite(estimate)) and np.all(estimate > 0)
    assert np.array_equal(comm.bcast(estimate, root=0), estimate)  # the image on every rank
    assert isinstance(history, dict) and history
    assert all(isinstance(v, np.ndarray) and v.ndim == 1 for v in history.values())
    assert any(len(v) for v in history.values())
    assert isinstance(info, dict)
    json.dumps(info)
    # the stored settings are JSON as they are, and the options round-trip through the method
    assert json.loads(json.dumps(result["settings"])) == result["settings"]
    method, options = get_method(name), result["options"]
    assert method.options() == options == method.options({})  # the defaults
    assert method.options(json.loads(json.dumps(options.to_dict()))) == options
    assert method.options(options) is options


@pytest.mark.parametrize("name", method_names())
def test_the_method_refuses_bad_options(name):
    method = get_method(name)
    with pytest.raises(ValueError, match=f"method '{name}' has no option.*accepted"):
        method.options({"no_such_option": 1})
    with pytest.raises(ValueError, match="no_such_option"):
        method.setup(GRID, SETTINGS.forward, MPI.COMM_SELF, {"no_such_option": 1})
    # a value of the wrong kind for every option with a plain default, named in the message
    checked = 0
    for key, default in method.options().to_dict().items():
        if isinstance(default, bool):
            bad = "yes"
        elif isinstance(default, int | float):
            bad = math.nan
        elif isinstance(default, str):
            bad = "bogus"
        else:
            continue
        with pytest.raises(ValueError, match=f"{re.escape(key)}|bogus"):
            method.options({key: bad})
        checked += 1
    assert checked > 0


@pytest.mark.usefixtures("several_ranks")
@pytest.mark.parametrize("name", method_names())
def test_the_estimate_is_the_same_on_one_and_on_all_ranks(name, sample, results):
    alone = _reconstruct(name, MPI.COMM_SELF, sample)["estimate"]
    here = results(name)["estimate"]
    assert _error(here, alone) < RANKS_RTOL


#: Build the command line, read a RED command's options and validate them; torch stays out.
_NO_TORCH = """
import sys
from fenics_red.cli import build_parser
from fenics_red.cli.reconstruct import options_from_args
args = build_parser().parse_args(["reconstruct", "data.h5", "--all", "--out", "out.h5",
                                  "--method", "red", "--lam", "paper:1", "--no-flip-average"])
assert options_from_args(args) == {"lam": "paper:1", "flip_average": False}
assert "torch" not in sys.modules, "torch was imported"
print("no torch")
"""


def test_the_command_line_and_the_registry_do_not_import_torch(comm):
    """The RED method imports torch when it sets up its denoiser, not before."""
    if comm.rank == 0:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
        result = subprocess.run([sys.executable, "-c", _NO_TORCH], capture_output=True,
                                text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        assert "no torch" in result.stdout


@pytest.mark.parametrize(("method", "options", "words"), [
    ("ml", {"max_steps": 10**20}, "max_steps must be a positive integer \\(at most 1e9 steps\\)"),
    ("gn-tikhonov", {"max_steps": 10**20}, "max_iterations"),
    ("red", {"max_steps": 10**20}, "max_steps"),
    ("gn-tv", {"tv_delta": 1e200}, "tv_delta must be at most 1e12"),  # delta² overflowed
])
def test_settings_too_large_to_run_are_refused_before_any_work(method, options, words):
    """(A budget above 2^64 ran the whole solve, then failed to store its history; a TV
    smoothing above 1e154 overflowed in the solve, both with a traceback.)"""
    with pytest.raises(ValueError, match=words):
        get_method(method).options(options)


def test_a_simulation_above_the_noise_floor_of_double_precision_is_refused(tmp_path):
    """Noise below the data's round-off, which every method refuses, is not simulated: a data
    set made at 250 dB (or at 200 dB with a noise ratio of 0.01) was written and then useless.
    Settings themselves take any SNR, so a data set made before still reads back."""
    from fenics_red.data import simulate_dataset

    for snr, ratio in ((250.0, 1.0), (200.0, 0.01)):
        settings = SimulationSettings(ImageGrid(8, 8), snr_db=snr, noise_ratio=ratio)
        with pytest.raises(ValueError, match="above 220 dB where it falls below double"):
            simulate_dataset(tmp_path / "floor.h5", 1, settings, MPI.COMM_SELF, progress=False)
        assert not (tmp_path / "floor.h5").exists()
    simulate_dataset(tmp_path / "floor.h5", 1, SimulationSettings(ImageGrid(8, 8), snr_db=200.0),
                     MPI.COMM_SELF, progress=False)  # noise-free for every purpose
